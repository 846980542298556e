//! The `flowcap-notify` thread: renders each firing's messages, dedupes
//! them by execution id, appends them to their destination's log, and
//! fsyncs (group commit) before it wakes the destination's task.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use flowcap_engine::event::RuleFiredEvent;
use flowcap_engine::rule::Channel;
use flowcap_rules::execution::execution_id;
use flowcap_rules::message::{Message, MessageChannel};
use flowcap_rules::template::{template, TemplateOptions};
use flowcap_rules::webhook::{merged_bodies, message_id, single_body, MAX_MERGED};

use crate::outbox::{self, Appender, Buffered, Entry, MergeKey};
use crate::worker::worker;
use crate::{
    DeliveryError, Destination, PushFailedEvent, Request, Shared, METRIC_PUSH_FAILED, METRIC_QUEUED,
};

pub(crate) struct MergeBuffer {
    pub(crate) firings: Vec<(RuleFiredEvent, String)>,
    /// How many of `firings` already have a `buf` line on disk.
    pub(crate) persisted: usize,
    pub(crate) since: Instant,
}

/// The `flowcap-notify` thread: renders, dedupes, appends, fsyncs.
pub(crate) struct OutboxThread {
    pub(crate) dir: PathBuf,
    pub(crate) seen: HashSet<u128>,
    pub(crate) logs: HashMap<String, Appender>,
    pub(crate) merges: BTreeMap<MergeKey, MergeBuffer>,
    pub(crate) touched: HashSet<String>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) runtime: tokio::runtime::Handle,
    pub(crate) options: TemplateOptions,
    pub(crate) merge_interval: Duration,
}

impl OutboxThread {
    pub(crate) fn run(&mut self, rx: &Receiver<Request>) -> Result<(), DeliveryError> {
        let tick = self
            .merge_interval
            .clamp(Duration::from_millis(5), Duration::from_millis(100));
        let mut acks: Vec<Sender<Result<(), Arc<DeliveryError>>>> = Vec::new();
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
    pub(crate) fn commit(&mut self) -> Result<(), DeliveryError> {
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

    pub(crate) fn destination(&self, name: &str) -> Option<Arc<Destination>> {
        self.shared
            .destinations
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Opens (or creates) a destination's log and starts its task.
    pub(crate) fn open_destination(
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
        let mut log = Appender::open(path.clone())?;
        let dest = Arc::new(Destination {
            name: name.to_owned(),
            log: path,
            queued: AtomicU64::new(queued),
            completed: AtomicU64::new(done.len() as u64),
            synced: AtomicU64::new(0),
            wake: tokio::sync::Notify::new(),
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
        let done_path = outbox::done_path(&self.dir, name);
        let shared = self.shared.clone();
        self.runtime
            .spawn(async move { worker(dest, done_path, done, done_lines, shared).await });
        Ok(())
    }

    pub(crate) fn append(&mut self, destination: &str, entry: &Entry) -> Result<(), DeliveryError> {
        if !self.logs.contains_key(destination) {
            self.open_destination(destination, 0, HashSet::new(), 0)?;
        }
        if let Some(log) = self.logs.get_mut(destination) {
            log.append(entry)?;
        }
        self.touched.insert(destination.to_owned());
        Ok(())
    }

    pub(crate) fn queue(&mut self, message: Message) -> Result<(), DeliveryError> {
        let name = message.destination();
        metrics::counter!(METRIC_QUEUED, "channel" => message.channel.as_str()).increment(1);
        self.append(&name, &Entry::Msg(message))?;
        self.shared.queued.fetch_add(1, Ordering::AcqRel);
        if let Some(d) = self.destination(&name) {
            d.queued.fetch_add(1, Ordering::AcqRel);
        }
        Ok(())
    }

    pub(crate) fn fire(&mut self, firing: RuleFiredEvent) -> Result<(), DeliveryError> {
        for (index, action) in firing.actions.iter().enumerate() {
            if action.channel == Channel::Suspend {
                continue;
            }
            let execution = execution_id(&firing.id, index);
            if !self.seen.insert(outbox::execution_key(&execution)) {
                continue; // queued before: a replay after a restart
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
                queued_ms: self.shared.clock.now_ms(),
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
    pub(crate) fn buffer(&mut self, b: Buffered, persisted: bool) -> Result<(), DeliveryError> {
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

    pub(crate) fn flush_merge(&mut self, key: &MergeKey) -> Result<(), DeliveryError> {
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
                queued_ms: self.shared.clock.now_ms(),
            })?;
        }
        Ok(())
    }

    /// Writes a `buf` line for every buffered firing not yet on disk.
    pub(crate) fn persist_buffers(&mut self) -> Result<(), DeliveryError> {
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
    pub(crate) fn alert(&mut self, event: &PushFailedEvent) -> Result<(), DeliveryError> {
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
            queued_ms: self.shared.clock.now_ms(),
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
