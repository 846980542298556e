//! # flowcap-delivery
//!
//! Delivery of rule notifications: webhooks, email, SMS, and push-failure
//! alerts, delivered once, never lost, never in ingestion's way.
//!
//! ```text
//!  writer thread ──submit(firing)──▶ [flowcap-notify thread]  (unbounded channel: never blocks)
//!                                     render (template, merge ≤ 500), dedupe by execution id,
//!                                     append to <dest>.log, fsync (group commit)
//!                                            │ durable length + wake-up
//!                                            ▼
//!                  [flowcap-deliver runtime] one task per destination
//!                  reads its log from disk, one message in flight:
//!                  send ─▶ retry with back-off / Retry-After ─▶ <dest>.done
//!                  failed ─▶ push_failed event + alert notification (queued like any message)
//! ```
//!
//! - **Write-ahead**: a message is sent only once its log line is fsynced
//!   (see [`outbox`]), so whatever a receiver may have seen is on disk and
//!   is sent again after a crash under the same id.
//! - **Replays**: every action of a firing has a deterministic execution id
//!   ([`flowcap_rules::execution::execution_id`]); ids already in the outbox are
//!   not queued again, so the engine replaying inputs after a restart does
//!   not notify twice.
//! - **Snapshot barriers** call [`Notifier::sync`]: everything submitted
//!   before is durable (merge buffers too) before the engine snapshot that
//!   covers its cause is written. A crash before the barrier loses nothing
//!   either: the engine replays those causes and fires again.
//! - **Isolation**: each destination has its own task and its own log; the
//!   queue is the log on disk, memory holds the one message in flight. A
//!   slow or dead receiver delays only its own destination, and its
//!   backlog is the `flowcap_notification_backlog` gauge.
//!
//! What is sent (templates, bodies, signatures, execution records, the
//! [`Message`] itself) is rendered by the pure `flowcap-rules`; this crate
//! is the part with IO: the outbox files, threads, the async runtime and
//! the HTTP and SMTP clients.
//!
//! Here the service ([`Notifier`]) and what its threads share; `config`
//! the settings; `queue` the `flowcap-notify` thread (render, dedupe,
//! merge buffers, append, fsync); `worker` a destination's task (send,
//! retry, outcome); `send` one attempt per channel; [`outbox`] the files;
//! [`retry`] the back-off.

mod config;
pub mod outbox;
mod queue;
pub mod retry;
mod send;
mod worker;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use flowcap_clock::SharedClock;
use flowcap_engine::command::WebhookSpec;
use flowcap_engine::event::RuleFiredEvent;
use flowcap_engine::rule::Channel;
use flowcap_engine::Timestamp;
use serde::{Deserialize, Serialize};

pub use config::{NotifyConfig, SmsGateway, SmtpRelay};
use flowcap_rules::message::{DeliveryRow, Done, Message, MessageChannel};
use flowcap_rules::template::TemplateOptions;
pub use retry::RetryPolicy;

use queue::OutboxThread;

/// Metric: messages queued, by `channel`.
pub const METRIC_QUEUED: &str = "flowcap_notifications_queued_total";
/// Metric: messages at their outcome, by `channel` and `outcome`.
pub const METRIC_DONE: &str = "flowcap_notifications_total";
/// Metric: attempts, by `channel` and `result` (delivered, retry, refused).
pub const METRIC_ATTEMPTS: &str = "flowcap_notification_attempts_total";
/// Metric: messages queued on disk and not yet at an outcome, by
/// `destination`.
pub const METRIC_BACKLOG: &str = "flowcap_notification_backlog";
/// Metric: push-failure alerts raised, by `channel`.
pub const METRIC_PUSH_FAILED: &str = "flowcap_push_failed_total";

/// Why delivery could not start or a barrier failed.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// Reading or writing the outbox.
    #[error("outbox {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Encoding an outbox line.
    #[error("encoding an outbox line: {0}")]
    Encode(String),
    /// A delivery thread (which one) could not start (external: the
    /// system's limits).
    #[error("starting delivery's {what}: {source}")]
    Start {
        /// The thread or runtime.
        what: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// The HTTP client could not be built (external: the system's TLS
    /// roots).
    #[error("starting delivery's HTTP client: {0}")]
    HttpClient(#[source] reqwest::Error),
    /// The outbox thread stopped after this error of its own (shared by
    /// every caller told); what it was doing is lost to the pipeline
    /// until a restart resumes the outbox.
    #[error("the notification outbox stopped: {0}")]
    Failed(Arc<DeliveryError>),
    /// The outbox thread is gone without an error (it was stopped, or it
    /// panicked: a bug).
    #[error("the notification outbox stopped")]
    Stopped,
}

/// A push-failure alert: a notification that could not be delivered
/// (refused, or retries exhausted), with the payload that failed. It is an
/// action event (`kind: push_failed`, SPEC section 5.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushFailedEvent {
    /// Deterministic: xxh3-128 of `push_failed|<message id>`.
    pub id: String,
    /// Always `push_failed`.
    pub kind: String,
    /// Channel of the failed message.
    pub channel: MessageChannel,
    /// Webhook endpoint id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Email or SMS recipients.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<String>,
    /// The failed message's id (`webhook-id`).
    pub message_id: String,
    /// Rule id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Firings the message carried.
    pub firings: Vec<String>,
    /// Execution ids the message carried.
    pub executions: Vec<String>,
    /// Attempts made.
    pub attempts: u32,
    /// Last HTTP status or SMTP code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Last error.
    pub error: String,
    /// The failed payload: the webhook body as JSON, or the text.
    pub payload: serde_json::Value,
    /// When it was given up (wall clock).
    pub failed_at: Timestamp,
}

/// Where delivery outcomes and alerts are reported (the pipeline writes
/// them to its outputs). Called from the delivery threads.
pub trait Reports: Send + Sync {
    /// A message reached its outcome.
    fn outcome(&self, message: &Message, done: &Done);
    /// A message failed for good; its alert notification is queued.
    fn push_failed(&self, event: &PushFailedEvent);
}

/// Reports nowhere.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoReports;

impl Reports for NoReports {
    fn outcome(&self, _: &Message, _: &Done) {}
    fn push_failed(&self, _: &PushFailedEvent) {}
}

/// Totals since start, for summaries and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryTotals {
    /// Messages queued (this process).
    pub queued: u64,
    /// Messages delivered (this process).
    pub delivered: u64,
    /// Messages failed for good (this process).
    pub failed: u64,
    /// Retries (attempts after the first).
    pub retries: u64,
    /// Messages not yet at an outcome, including those of earlier runs and
    /// firings waiting in merge buffers.
    pub pending: u64,
}

struct Destination {
    name: String,
    log: PathBuf,
    queued: AtomicU64,
    completed: AtomicU64,
    synced: AtomicU64,
    wake: tokio::sync::Notify,
}

impl Destination {
    fn backlog(&self) -> u64 {
        self.queued
            .load(Ordering::Acquire)
            .saturating_sub(self.completed.load(Ordering::Acquire))
    }

    fn gauge(&self) {
        metrics::gauge!(METRIC_BACKLOG, "destination" => self.name.clone())
            .set(self.backlog() as f64);
    }
}

struct Shared {
    config: NotifyConfig,
    policy: RetryPolicy,
    endpoints: RwLock<HashMap<String, Result<Arc<send::Endpoint>, String>>>,
    http: reqwest::Client,
    reports: Arc<dyn Reports>,
    requests: Sender<Request>,
    delivered: AtomicU64,
    failed: AtomicU64,
    retries: AtomicU64,
    queued: AtomicU64,
    buffered: AtomicU64,
    destinations: RwLock<BTreeMap<String, Arc<Destination>>>,
    stopping: AtomicBool,
    outcomes: std::sync::Mutex<Vec<DeliveryRow>>,
    /// The time of day: queue and outcome times, signing timestamps,
    /// `Retry-After` dates.
    clock: SharedClock,
}

impl Shared {
    fn endpoint(&self, id: &str) -> Result<Arc<send::Endpoint>, String> {
        let endpoints = self.endpoints.read().unwrap_or_else(|e| e.into_inner());
        match endpoints.get(id) {
            Some(e) => e.clone(),
            None => Err(format!(
                "webhook endpoint {id:?} is not registered (removed?)"
            )),
        }
    }

    fn set_endpoint(&self, spec: WebhookSpec) {
        let id = spec.id.clone();
        let endpoint = send::Endpoint::new(spec, self.config.request_timeout()).map(Arc::new);
        if let Err(e) = &endpoint {
            tracing::warn!(endpoint = %id, error = %e, "webhook endpoint unusable: its messages will fail");
        }
        self.endpoints
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, endpoint);
    }
}

enum Request {
    Fire(Box<RuleFiredEvent>),
    Endpoint(Box<WebhookSpec>),
    RemoveEndpoint(String),
    /// Make everything submitted so far durable (merge buffers included).
    Sync(Sender<Result<(), Arc<DeliveryError>>>),
    /// Send every merge buffer now.
    Flush(Sender<Result<(), Arc<DeliveryError>>>),
    /// Queue the alert of a failed message; answered once durable.
    Alert(Box<PushFailedEvent>, tokio::sync::oneshot::Sender<()>),
    Stop,
}

/// The delivery service: its own threads, fed by [`Notifier::submit`].
pub struct Notifier {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
    runtime: Option<tokio::runtime::Runtime>,
    failure: Arc<RwLock<Option<Arc<DeliveryError>>>>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("totals", &self.totals())
            .finish()
    }
}

impl Notifier {
    /// Opens the outbox in `dir` (created if missing), resumes every
    /// message a previous run left undelivered, and starts delivering.
    /// `endpoints` are the webhook endpoints registered now (later changes
    /// come through [`Notifier::upsert_endpoint`]). `reported`: per
    /// destination, how many outcomes the history already has (see
    /// [`DeliveryRow`]); the later ones are offered again. `clock`: the
    /// time of day (a [`flowcap_clock::SystemClock`] but in tests).
    pub fn start(
        dir: &Path,
        config: NotifyConfig,
        endpoints: impl IntoIterator<Item = WebhookSpec>,
        options: TemplateOptions,
        reports: Arc<dyn Reports>,
        reported: &BTreeMap<String, u64>,
        clock: SharedClock,
    ) -> Result<Notifier, DeliveryError> {
        std::fs::create_dir_all(dir).map_err(|source| DeliveryError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let loaded = outbox::load(dir, reported)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(4)
            .thread_name("flowcap-deliver")
            .enable_all()
            .build()
            .map_err(|source| DeliveryError::Start {
                what: "runtime",
                source,
            })?;
        let http =
            send::client(config.request_timeout(), None).map_err(DeliveryError::HttpClient)?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared {
            policy: config.retry_policy(),
            config,
            endpoints: RwLock::new(HashMap::new()),
            http,
            reports,
            requests: tx,
            delivered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            buffered: AtomicU64::new(0),
            destinations: RwLock::new(BTreeMap::new()),
            stopping: AtomicBool::new(false),
            outcomes: std::sync::Mutex::new(Vec::new()),
            clock,
        });
        for spec in endpoints {
            shared.set_endpoint(spec);
        }
        let mut state = OutboxThread {
            dir: dir.to_owned(),
            seen: loaded.seen,
            logs: HashMap::new(),
            merges: BTreeMap::new(),
            touched: HashSet::new(),
            shared: shared.clone(),
            runtime: runtime.handle().clone(),
            options,
            merge_interval: Duration::from_millis(shared.config.merge_interval_ms),
        };
        let resumed: u64 = loaded
            .destinations
            .values()
            .map(|d| d.queued.saturating_sub(d.done.len() as u64))
            .sum();
        for (name, d) in loaded.destinations {
            shared
                .outcomes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(
                    d.unreported
                        .into_iter()
                        .map(|(index, message, done)| DeliveryRow {
                            destination: name.clone(),
                            index,
                            message,
                            done,
                        }),
                );
            state.open_destination(&name, d.queued, d.done, d.done_lines)?;
        }
        for b in loaded.buffered {
            state.buffer(b, true)?;
        }
        if resumed > 0 {
            tracing::info!(messages = resumed, "resuming undelivered notifications");
        }
        let failure = Arc::new(RwLock::new(None));
        let failed = failure.clone();
        let thread = std::thread::Builder::new()
            .name("flowcap-notify".into())
            .spawn(move || {
                if let Err(e) = state.run(&rx) {
                    tracing::error!(error = %e, "notification outbox stopped");
                    let e = Arc::new(e);
                    *failed.write().unwrap_or_else(|e| e.into_inner()) = Some(e.clone());
                    // Answer whoever waits, so no barrier hangs.
                    for r in rx.try_iter() {
                        match r {
                            Request::Sync(reply) | Request::Flush(reply) => {
                                let _ = reply.send(Err(e.clone()));
                            }
                            _ => {}
                        }
                    }
                }
            })
            .map_err(|source| DeliveryError::Start {
                what: "outbox thread",
                source,
            })?;
        Ok(Notifier {
            shared,
            thread: Some(thread),
            runtime: Some(runtime),
            failure,
        })
    }

    /// Queues the notifications of a firing (its webhook, email and SMS
    /// actions; suspend is the engine's). Never blocks.
    pub fn submit(&self, firing: &RuleFiredEvent) {
        if firing.actions.iter().any(|a| a.channel != Channel::Suspend) {
            let _ = self
                .shared
                .requests
                .send(Request::Fire(Box::new(firing.clone())));
        }
    }

    /// A webhook endpoint was registered or changed (messages still queued
    /// for it go to the new URL, with the new secret).
    pub fn upsert_endpoint(&self, spec: WebhookSpec) {
        let _ = self.shared.requests.send(Request::Endpoint(Box::new(spec)));
    }

    /// A webhook endpoint was removed: messages still queued for it fail
    /// (and raise their alert).
    pub fn remove_endpoint(&self, id: &str) {
        let _ = self
            .shared
            .requests
            .send(Request::RemoveEndpoint(id.to_owned()));
    }

    fn ask(
        &self,
        make: impl FnOnce(Sender<Result<(), Arc<DeliveryError>>>) -> Request,
    ) -> Result<(), DeliveryError> {
        let stopped = || {
            self.failure
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .map_or(DeliveryError::Stopped, DeliveryError::Failed)
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.shared.requests.send(make(tx)).map_err(|_| stopped())?;
        rx.recv()
            .map_err(|_| stopped())?
            .map_err(DeliveryError::Failed)
    }

    /// Returns once everything submitted before is on disk (fsynced): the
    /// snapshot barrier.
    pub fn sync(&self) -> Result<(), DeliveryError> {
        self.ask(Request::Sync)
    }

    /// Sends every merge buffer now, then waits up to `timeout` for the
    /// queued messages to reach an outcome. Returns the totals then.
    pub fn drain(&self, timeout: Duration) -> Result<DeliveryTotals, DeliveryError> {
        self.ask(Request::Flush)?;
        let deadline = Instant::now() + timeout;
        while self.totals().pending > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(self.totals())
    }

    /// The outcomes reached since the last call (in done-file order per
    /// destination), for the history.
    pub fn take_outcomes(&self) -> Vec<DeliveryRow> {
        std::mem::take(
            &mut *self
                .shared
                .outcomes
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        )
    }

    /// Totals so far.
    pub fn totals(&self) -> DeliveryTotals {
        let s = &self.shared;
        let backlog: u64 = s
            .destinations
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|d| d.backlog())
            .sum();
        DeliveryTotals {
            queued: s.queued.load(Ordering::Acquire),
            delivered: s.delivered.load(Ordering::Acquire),
            failed: s.failed.load(Ordering::Acquire),
            retries: s.retries.load(Ordering::Acquire),
            pending: backlog + s.buffered.load(Ordering::Acquire),
        }
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        let _ = self.shared.requests.send(Request::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Messages in flight are abandoned: they are on disk and the next
        // start sends them again under the same id.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_millis(200));
        }
    }
}
