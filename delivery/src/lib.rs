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
//! - **Compaction**: each snapshot cut marks the logs ([`Notifier::mark`]);
//!   what is delivered, in the history and beyond the replay of every kept
//!   snapshot is then dropped (`compact`), so the outbox stays bounded.
//! - **Isolation**: each destination has its own task and its own log; the
//!   queue is the log on disk, memory holds the one message in flight. A
//!   slow or dead receiver delays only its own destination, and its
//!   backlog is the `flowcap_notification_backlog` gauge.
//!
//! What is sent (templates, bodies, signatures, execution records, the
//! [`Message`] itself) is rendered by the pure `flowcap-rules`; this crate
//! is the part with IO: the outbox files, threads, the async runtime and
//! the HTTP and SMTP clients.

mod compact;
pub mod outbox;
pub mod retry;
mod send;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use flowcap_engine::command::WebhookSpec;
use flowcap_engine::event::RuleFiredEvent;
use flowcap_engine::rule::Channel;
use flowcap_engine::Timestamp;
use serde::{Deserialize, Serialize};

use flowcap_rules::execution::execution_id;
use flowcap_rules::message::{DeliveryRow, Done, Final, Message, MessageChannel};
use flowcap_rules::template::{template, TemplateOptions};
use flowcap_rules::webhook::{merged_bodies, message_id, single_body, MAX_MERGED};
pub use retry::RetryPolicy;

use outbox::{Buffered, Cursor, Entry, Log, MergeKey, Next};

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
use retry::Verdict;

/// Delivery settings (`[notify]` in flowcap's configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotifyConfig {
    /// Attempts per message in all, the first included.
    pub max_attempts: u32,
    /// Back-off before the second attempt, in ms (doubles each time).
    pub backoff_initial_ms: u64,
    /// Longest back-off, in ms.
    pub backoff_max_ms: u64,
    /// Longest wait a receiver's `Retry-After` may ask for, in ms.
    pub retry_after_max_ms: u64,
    /// Timeout of one attempt (connect and answer), in ms.
    pub request_timeout_ms: u64,
    /// A merged webhook message is sent when it has 500 firings or its
    /// oldest firing waited this long, in ms.
    pub merge_interval_ms: u64,
    /// How long an embedded run that reached the end of its input waits for
    /// notifications still queued, in ms (what is left is sent by the next
    /// run on the same directory).
    pub drain_timeout_ms: u64,
    /// SMTP relay for email actions.
    pub smtp: Option<SmtpRelay>,
    /// HTTP gateway for SMS actions.
    pub sms: Option<SmsGateway>,
    /// Webhook endpoint (registered by command) that receives push-failure
    /// alerts.
    pub alert_webhook: Option<String>,
    /// Addresses that receive push-failure alerts by email.
    pub alert_email: Vec<String>,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        let r = RetryPolicy::default();
        NotifyConfig {
            max_attempts: r.max_attempts,
            backoff_initial_ms: r.initial.as_millis() as u64,
            backoff_max_ms: r.max.as_millis() as u64,
            retry_after_max_ms: r.retry_after_max.as_millis() as u64,
            request_timeout_ms: 10_000,
            merge_interval_ms: 2_000,
            drain_timeout_ms: 30_000,
            smtp: None,
            sms: None,
            alert_webhook: None,
            alert_email: Vec::new(),
        }
    }
}

impl NotifyConfig {
    /// The retry policy these settings describe.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts.max(1),
            initial: Duration::from_millis(self.backoff_initial_ms),
            max: Duration::from_millis(self.backoff_max_ms),
            retry_after_max: Duration::from_millis(self.retry_after_max_ms),
        }
    }

    fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms.max(1))
    }
}

/// An SMTP relay (plain SMTP, optionally with AUTH; see docs/DECISIONS.md).
/// Its `Debug` shows the password redacted.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpRelay {
    /// Host name or address.
    pub host: String,
    /// Port.
    #[serde(default = "default_smtp_port")]
    pub port: u16,
    /// Sender address.
    pub from: String,
    /// AUTH user name.
    #[serde(default)]
    pub username: Option<String>,
    /// AUTH password.
    #[serde(default)]
    pub password: Option<String>,
}

fn default_smtp_port() -> u16 {
    25
}

/// An SMS gateway: flowcap POSTs `{"id", "to": [...], "text"}` as JSON,
/// with the message id as `Idempotency-Key`. Its `Debug` shows the token
/// redacted.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmsGateway {
    /// URL to POST to.
    pub url: String,
    /// Bearer token, if the gateway wants one.
    #[serde(default)]
    pub token: Option<String>,
}

fn redacted(secret: &Option<String>) -> Option<String> {
    secret.as_deref().map(flowcap_engine::redact::secret)
}

impl std::fmt::Debug for SmtpRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpRelay")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("from", &self.from)
            .field("username", &self.username)
            .field("password", &redacted(&self.password))
            .finish()
    }
}

impl std::fmt::Debug for SmsGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmsGateway")
            .field("url", &self.url)
            .field("token", &redacted(&self.token))
            .finish()
    }
}

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
    /// The delivery threads could not start.
    #[error("starting delivery: {0}")]
    Start(String),
    /// The outbox thread is gone (it failed earlier; see the log).
    #[error("the notification outbox stopped: {0}")]
    Stopped(String),
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
    queued: AtomicU64,
    completed: AtomicU64,
    synced: AtomicU64,
    wake: tokio::sync::Notify,
    /// The task's place in the files (a compaction moves it).
    cursor: std::sync::Mutex<Cursor>,
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
    Sync(Sender<Result<(), String>>),
    /// A snapshot cut: mark the logs, compact them when due.
    Cut(compact::Cut),
    /// Send every merge buffer now.
    Flush(Sender<Result<(), String>>),
    /// Queue the alert of a failed message; answered once durable.
    Alert(Box<PushFailedEvent>, tokio::sync::oneshot::Sender<()>),
    Stop,
}

/// The delivery service: its own threads, fed by [`Notifier::submit`].
pub struct Notifier {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
    runtime: Option<tokio::runtime::Runtime>,
    failure: Arc<RwLock<Option<String>>>,
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
    /// [`DeliveryRow`]); the later ones are offered again.
    pub fn start(
        dir: &Path,
        config: NotifyConfig,
        endpoints: impl IntoIterator<Item = WebhookSpec>,
        options: TemplateOptions,
        reports: Arc<dyn Reports>,
        reported: &BTreeMap<String, u64>,
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
            .map_err(|e| DeliveryError::Start(e.to_string()))?;
        let http = send::client(config.request_timeout(), None).map_err(DeliveryError::Start)?;
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
            compaction: compact::State::new(
                loaded
                    .destinations
                    .values()
                    .map(|d| d.done.len() as u64)
                    .sum(),
                loaded.lines,
            ),
            tail: loaded.tail,
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
                    *failed.write().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                    // Answer whoever waits, so no barrier hangs.
                    for r in rx.try_iter() {
                        match r {
                            Request::Sync(reply) | Request::Flush(reply) => {
                                let _ = reply.send(Err(e.to_string()));
                            }
                            _ => {}
                        }
                    }
                }
            })
            .map_err(|e| DeliveryError::Start(e.to_string()))?;
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
        make: impl FnOnce(Sender<Result<(), String>>) -> Request,
    ) -> Result<(), DeliveryError> {
        let stopped = || {
            DeliveryError::Stopped(
                self.failure
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
                    .unwrap_or_else(|| "stopped".into()),
            )
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.shared.requests.send(make(tx)).map_err(|_| stopped())?;
        rx.recv()
            .map_err(|_| stopped())?
            .map_err(DeliveryError::Stopped)
    }

    /// A snapshot cut through input `seq` (everything submitted before
    /// comes from inputs it covers), `reported` the cursors it records,
    /// `oldest_kept` the oldest snapshot on disk: the outbox marks its logs
    /// and drops what no kept snapshot can replay (see `compact`). Never
    /// blocks.
    pub fn mark(&self, seq: u64, oldest_kept: Option<u64>, reported: &BTreeMap<String, u64>) {
        let _ = self.shared.requests.send(Request::Cut(compact::Cut {
            seq,
            oldest_kept,
            reported: reported.clone(),
        }));
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

struct MergeBuffer {
    firings: Vec<(RuleFiredEvent, String)>,
    /// How many of `firings` already have a `buf` line on disk.
    persisted: usize,
    since: Instant,
}

/// The `flowcap-notify` thread: renders, dedupes, appends, fsyncs.
struct OutboxThread {
    dir: PathBuf,
    seen: HashSet<u128>,
    logs: HashMap<String, Log>,
    merges: BTreeMap<MergeKey, MergeBuffer>,
    touched: HashSet<String>,
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
    options: TemplateOptions,
    merge_interval: Duration,
    compaction: compact::State,
    /// Executions of the lines earlier runs left after their last mark.
    tail: HashMap<u128, String>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl OutboxThread {
    fn run(&mut self, rx: &Receiver<Request>) -> Result<(), DeliveryError> {
        let tick = self
            .merge_interval
            .clamp(Duration::from_millis(5), Duration::from_millis(100));
        let mut acks: Vec<Sender<Result<(), String>>> = Vec::new();
        let mut alert_acks: Vec<tokio::sync::oneshot::Sender<()>> = Vec::new();
        loop {
            let first = match rx.recv_timeout(tick) {
                Ok(r) => Some(r),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            };
            let mut stop = false;
            let batch = first.into_iter().chain(rx.try_iter().take(10_000));
            for request in batch {
                match request {
                    Request::Fire(f) => self.fire(*f)?,
                    Request::Endpoint(spec) => self.shared.set_endpoint(*spec),
                    Request::RemoveEndpoint(id) => {
                        self.shared
                            .endpoints
                            .write()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&id);
                    }
                    Request::Sync(reply) => {
                        self.persist_buffers()?;
                        acks.push(reply);
                    }
                    Request::Cut(cut) => self.cut(cut)?,
                    Request::Flush(reply) => {
                        let keys: Vec<MergeKey> = self.merges.keys().cloned().collect();
                        for k in keys {
                            self.flush_merge(&k)?;
                        }
                        acks.push(reply);
                    }
                    Request::Alert(event, reply) => {
                        self.alert(&event)?;
                        alert_acks.push(reply);
                    }
                    Request::Stop => {
                        self.persist_buffers()?;
                        stop = true;
                    }
                }
            }
            let due: Vec<MergeKey> = self
                .merges
                .iter()
                .filter(|(_, b)| b.since.elapsed() >= self.merge_interval)
                .map(|(k, _)| k.clone())
                .collect();
            for k in due {
                self.flush_merge(&k)?;
            }
            self.commit()?;
            for a in acks.drain(..) {
                let _ = a.send(Ok(()));
            }
            for a in alert_acks.drain(..) {
                let _ = a.send(());
            }
            if stop {
                return Ok(());
            }
        }
    }

    /// Fsyncs every log written since the last commit and wakes its task.
    fn commit(&mut self) -> Result<(), DeliveryError> {
        for name in std::mem::take(&mut self.touched) {
            let Some(log) = self.logs.get_mut(&name) else {
                continue;
            };
            let len = log.sync()?;
            let dest = self.destination(&name);
            if let Some(d) = dest {
                d.synced.store(len, Ordering::Release);
                d.gauge();
                d.wake.notify_one();
            }
        }
        Ok(())
    }

    fn destination(&self, name: &str) -> Option<Arc<Destination>> {
        self.shared
            .destinations
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Opens (or creates) a destination's log and starts its task.
    fn open_destination(
        &mut self,
        name: &str,
        queued: u64,
        done: HashSet<String>,
        done_lines: u64,
    ) -> Result<(), DeliveryError> {
        if self.logs.contains_key(name) {
            return Ok(());
        }
        let path = outbox::log_path(&self.dir, name);
        let mut log = Log::open(path.clone())?;
        let completed = done.len() as u64;
        let cursor = Cursor::open(path, outbox::done_path(&self.dir, name), done, done_lines)?;
        let dest = Arc::new(Destination {
            name: name.to_owned(),
            queued: AtomicU64::new(queued),
            completed: AtomicU64::new(completed),
            synced: AtomicU64::new(0),
            wake: tokio::sync::Notify::new(),
            cursor: std::sync::Mutex::new(cursor),
        });
        // What is on disk already is durable.
        dest.synced.store(log.sync()?, Ordering::Release);
        dest.gauge();
        self.logs.insert(name.to_owned(), log);
        self.shared
            .destinations
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned(), dest.clone());
        let shared = self.shared.clone();
        self.runtime
            .spawn(async move { worker(dest, shared).await });
        Ok(())
    }

    fn append(&mut self, destination: &str, entry: &Entry) -> Result<(), DeliveryError> {
        if !self.logs.contains_key(destination) {
            // Its log may hold no message any more, its done file still
            // counts the outcomes before.
            let file = outbox::read_done(&outbox::done_path(&self.dir, destination))?;
            let done = file.outcomes.into_iter().map(|(_, d)| d.id).collect();
            self.open_destination(destination, 0, done, file.next)?;
        }
        if let Some(log) = self.logs.get_mut(destination) {
            log.append(entry)?;
        }
        self.touched.insert(destination.to_owned());
        Ok(())
    }

    fn queue(&mut self, message: Message) -> Result<(), DeliveryError> {
        let name = message.destination();
        metrics::counter!(METRIC_QUEUED, "channel" => message.channel.as_str()).increment(1);
        self.append(&name, &Entry::Msg(message))?;
        self.shared.queued.fetch_add(1, Ordering::AcqRel);
        if let Some(d) = self.destination(&name) {
            d.queued.fetch_add(1, Ordering::AcqRel);
        }
        Ok(())
    }

    fn fire(&mut self, firing: RuleFiredEvent) -> Result<(), DeliveryError> {
        for (index, action) in firing.actions.iter().enumerate() {
            if action.channel == Channel::Suspend {
                continue;
            }
            let execution = execution_id(&firing.id, index);
            if !self.seen.insert(outbox::execution_key(&execution)) {
                // Queued before: a replay after a restart.
                self.again(&execution)?;
                continue;
            }
            let base = |channel, body: String| Message {
                id: String::new(),
                channel,
                endpoint: None,
                to: Vec::new(),
                subject: None,
                body,
                executions: vec![execution.clone()],
                firings: vec![firing.id.clone()],
                rule: Some(firing.rule.clone()),
                alert_for: None,
                queued_ms: now_ms(),
            };
            match action.channel {
                Channel::Webhook => {
                    let endpoint = action.endpoint.clone().unwrap_or_default();
                    if action.merge {
                        let key = MergeKey {
                            endpoint,
                            rule: firing.rule.clone(),
                            template: template(&firing, self.options).name.as_str().to_owned(),
                        };
                        self.buffer(
                            Buffered {
                                key,
                                execution,
                                firing: firing.clone(),
                            },
                            false,
                        )?;
                    } else {
                        let w = single_body(&firing, &endpoint, self.options);
                        let mut m = base(MessageChannel::Webhook, w.body);
                        m.id = w.id;
                        m.endpoint = Some(endpoint);
                        self.queue(m)?;
                    }
                }
                Channel::Email => {
                    let e = flowcap_rules::text::email(&firing, self.options);
                    let mut m = base(MessageChannel::Email, e.body);
                    m.id = message_id(["email", execution.as_str()]);
                    m.subject = Some(e.subject);
                    m.to = action.to.clone();
                    self.queue(m)?;
                }
                Channel::Sms => {
                    let mut m = base(
                        MessageChannel::Sms,
                        flowcap_rules::text::sms(&firing, self.options),
                    );
                    m.id = message_id(["sms", execution.as_str()]);
                    m.to = action.to.clone();
                    self.queue(m)?;
                }
                Channel::Suspend => {}
            }
        }
        Ok(())
    }

    /// Adds a firing to its merge buffer (`persisted`: its `buf` line is
    /// already on disk); a full buffer is sent at once.
    fn buffer(&mut self, b: Buffered, persisted: bool) -> Result<(), DeliveryError> {
        self.seen.insert(outbox::execution_key(&b.execution));
        let key = b.key.clone();
        let buffer = self
            .merges
            .entry(key.clone())
            .or_insert_with(|| MergeBuffer {
                firings: Vec::new(),
                persisted: 0,
                since: Instant::now(),
            });
        buffer.firings.push((b.firing, b.execution));
        if persisted {
            buffer.persisted = buffer.firings.len();
        }
        self.shared.buffered.fetch_add(1, Ordering::AcqRel);
        if buffer.firings.len() >= MAX_MERGED {
            self.flush_merge(&key)?;
        }
        Ok(())
    }

    fn flush_merge(&mut self, key: &MergeKey) -> Result<(), DeliveryError> {
        let Some(buffer) = self.merges.remove(key) else {
            return Ok(());
        };
        self.shared
            .buffered
            .fetch_sub(buffer.firings.len() as u64, Ordering::AcqRel);
        let firings: Vec<&RuleFiredEvent> = buffer.firings.iter().map(|(f, _)| f).collect();
        let messages = match merged_bodies(&firings, &key.endpoint, self.options) {
            Ok(m) => m,
            // Empty, or mixed templates: the merge key rules both out.
            Err(e) => {
                tracing::error!(endpoint = %key.endpoint, rule = %key.rule, firings = firings.len(),
                    error = %e, "merged webhook could not be built; its firings are not sent");
                return Ok(());
            }
        };
        for (w, chunk) in messages.into_iter().zip(buffer.firings.chunks(MAX_MERGED)) {
            self.queue(Message {
                id: w.id,
                channel: MessageChannel::Webhook,
                endpoint: Some(key.endpoint.clone()),
                to: Vec::new(),
                subject: None,
                body: w.body,
                executions: chunk.iter().map(|(_, e)| e.clone()).collect(),
                firings: w.firing_ids,
                rule: Some(key.rule.clone()),
                alert_for: None,
                queued_ms: now_ms(),
            })?;
        }
        Ok(())
    }

    /// Writes a `buf` line for every buffered firing not yet on disk.
    fn persist_buffers(&mut self) -> Result<(), DeliveryError> {
        let mut lines = Vec::new();
        for (key, buffer) in &mut self.merges {
            for (firing, execution) in &buffer.firings[buffer.persisted..] {
                lines.push(Entry::Buf(Buffered {
                    key: key.clone(),
                    execution: execution.clone(),
                    firing: firing.clone(),
                }));
            }
            buffer.persisted = buffer.firings.len();
        }
        for line in lines {
            if let Entry::Buf(b) = &line {
                let name = outbox::destination_of_key(&b.key);
                self.append(&name, &line)?;
            }
        }
        Ok(())
    }

    /// Queues the alert notifications of a failed message.
    fn alert(&mut self, event: &PushFailedEvent) -> Result<(), DeliveryError> {
        let execution = format!("alert|{}", event.message_id);
        if !self.seen.insert(outbox::execution_key(&execution)) {
            return Ok(());
        }
        metrics::counter!(METRIC_PUSH_FAILED, "channel" => event.channel.as_str()).increment(1);
        self.shared.reports.push_failed(event);
        let body =
            serde_json::to_string(event).map_err(|e| DeliveryError::Encode(e.to_string()))?;
        let base = Message {
            id: String::new(),
            channel: MessageChannel::Webhook,
            endpoint: None,
            to: Vec::new(),
            subject: None,
            body: String::new(),
            executions: vec![execution.clone()],
            firings: event.firings.clone(),
            rule: event.rule.clone(),
            alert_for: Some(event.message_id.clone()),
            queued_ms: now_ms(),
        };
        if let Some(endpoint) = self.shared.config.alert_webhook.clone() {
            let mut m = base.clone();
            m.id = message_id(["alert", "webhook", event.message_id.as_str()]);
            m.endpoint = Some(endpoint);
            m.body = body.clone();
            self.queue(m)?;
        }
        if !self.shared.config.alert_email.is_empty() {
            let mut m = base;
            m.id = message_id(["alert", "email", event.message_id.as_str()]);
            m.channel = MessageChannel::Email;
            m.to = self.shared.config.alert_email.clone();
            let target = event
                .endpoint
                .clone()
                .unwrap_or_else(|| event.to.join(", "));
            m.subject = Some(format!(
                "flowcap: {} notification to {target} failed",
                event.channel.as_str()
            ));
            m.body = format!(
                "A {} notification of rule {} could not be delivered to {target} after {} attempt(s).\n\
                 Last error: {}\nMessage id: {}\n\nThe failed payload:\n{}\n",
                event.channel.as_str(),
                event.rule.as_deref().unwrap_or("-"),
                event.attempts,
                event.error,
                event.message_id,
                event.payload,
            );
            self.queue(m)?;
        }
        Ok(())
    }
}

/// One destination's task: reads its log from disk up to the durable
/// length and delivers each message not yet done, one at a time.
async fn worker(dest: Arc<Destination>, shared: Arc<Shared>) {
    let name = dest.name.clone();
    if let Err(e) = run_worker(&dest, &shared).await {
        tracing::error!(destination = %name, error = %e, "notification delivery stopped for this destination");
    }
}

async fn run_worker(dest: &Destination, shared: &Shared) -> Result<(), DeliveryError> {
    let cursor = || dest.cursor.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if shared.stopping.load(Ordering::Acquire) {
            return Ok(());
        }
        let next = cursor().next(dest.synced.load(Ordering::Acquire))?;
        let message = match next {
            Next::Wait => {
                dest.wake.notified().await;
                continue;
            }
            Next::Retry => {
                // Synced length not visible through this handle yet.
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            Next::Skip => continue,
            Next::Message(m) => *m,
        };
        let done = deliver(shared, &message).await;
        if done.outcome == Final::Failed && message.alert_for.is_none() {
            let event = push_failed(&message, &done);
            let (tx, rx) = tokio::sync::oneshot::channel();
            if shared
                .requests
                .send(Request::Alert(Box::new(event), tx))
                .is_ok()
            {
                let _ = rx.await;
            }
        }
        let index = cursor().record(&done)?;
        match done.outcome {
            Final::Delivered => shared.delivered.fetch_add(1, Ordering::AcqRel),
            Final::Failed => shared.failed.fetch_add(1, Ordering::AcqRel),
        };
        metrics::counter!(METRIC_DONE,
            "channel" => message.channel.as_str(), "outcome" => done.outcome.as_str())
        .increment(1);
        dest.completed.fetch_add(1, Ordering::AcqRel);
        dest.gauge();
        shared.reports.outcome(&message, &done);
        shared
            .outcomes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(DeliveryRow {
                destination: dest.name.clone(),
                index,
                message,
                done,
            });
    }
}

/// Attempts a message until it is delivered, refused, or out of attempts.
async fn deliver(shared: &Shared, message: &Message) -> Done {
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let attempt = match message.channel {
            MessageChannel::Webhook => {
                match shared.endpoint(message.endpoint.as_deref().unwrap_or_default()) {
                    Ok(endpoint) => send::webhook(&endpoint, message).await,
                    Err(e) => refused(e),
                }
            }
            MessageChannel::Sms => match &shared.config.sms {
                Some(gateway) => send::sms(gateway, &shared.http, message).await,
                None => refused("no SMS gateway is configured ([notify.sms])".into()),
            },
            MessageChannel::Email => match &shared.config.smtp {
                Some(relay) => send::email(relay, message, shared.config.request_timeout()).await,
                None => refused("no SMTP relay is configured ([notify.smtp])".into()),
            },
        };
        let result = match attempt.verdict {
            Verdict::Delivered => "delivered",
            Verdict::Retry(_) => "retry",
            Verdict::Refused => "refused",
        };
        metrics::counter!(METRIC_ATTEMPTS,
            "channel" => message.channel.as_str(), "result" => result)
        .increment(1);
        let done = |outcome| Done {
            id: message.id.clone(),
            outcome,
            attempts,
            status: attempt.status,
            error: attempt.error.clone(),
            at_ms: now_ms(),
        };
        match attempt.verdict {
            Verdict::Delivered => return done(Final::Delivered),
            Verdict::Refused => return done(Final::Failed),
            Verdict::Retry(after) => match shared.policy.wait(&message.id, attempts, after) {
                None => return done(Final::Failed),
                Some(wait) => {
                    tracing::debug!(id = %message.id, attempts, ?wait, error = ?attempt.error, "notification attempt failed; retrying");
                    shared.retries.fetch_add(1, Ordering::AcqRel);
                    tokio::time::sleep(wait).await;
                    if shared.stopping.load(Ordering::Acquire) {
                        // Left for the next start (still not done on disk).
                        std::future::pending::<()>().await;
                    }
                }
            },
        }
    }
}

fn refused(error: String) -> send::Attempt {
    send::Attempt {
        verdict: Verdict::Refused,
        status: None,
        error: Some(error),
    }
}

fn push_failed(message: &Message, done: &Done) -> PushFailedEvent {
    let key = format!("push_failed|{}", message.id);
    PushFailedEvent {
        id: format!("{:032x}", xxhash_rust::xxh3::xxh3_128(key.as_bytes())),
        kind: "push_failed".into(),
        channel: message.channel,
        endpoint: message.endpoint.clone(),
        to: message.to.clone(),
        message_id: message.id.clone(),
        rule: message.rule.clone(),
        firings: message.firings.clone(),
        executions: message.executions.clone(),
        attempts: done.attempts,
        status: done.status,
        error: done.error.clone().unwrap_or_default(),
        payload: serde_json::from_str(&message.body)
            .unwrap_or_else(|_| serde_json::Value::String(message.body.clone())),
        failed_at: Timestamp(done.at_ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_smtp_and_sms_credentials() {
        let smtp = SmtpRelay {
            host: "mail".into(),
            port: 25,
            from: "a@b".into(),
            username: Some("user".into()),
            password: Some("hunter2-smtp".into()),
        };
        let sms = SmsGateway {
            url: "http://sms".into(),
            token: Some("tok-sms-123".into()),
        };
        let text = format!("{smtp:?} {sms:?}");
        assert!(
            !text.contains("hunter2-smtp") && !text.contains("tok-sms-123"),
            "{text}"
        );
        assert!(
            text.contains("redacted:sha256:") && text.contains("user"),
            "{text}"
        );
    }
}
