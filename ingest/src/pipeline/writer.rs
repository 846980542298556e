//! The writer thread: the only one that writes outputs (the JSON-lines
//! files, the history, the Kafka topics, the notification outbox), so
//! each output is written once and in the engine's order, and a snapshot's
//! cut can ask one place how long every output is.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{select, Receiver};
use flowcap_clock::SharedClock;
use flowcap_engine::command::CommandKind;
use flowcap_engine::event::{ActionEvent, JournalEntry, Output};
use flowcap_engine::{redact, Timestamp};
use flowcap_storage::history::{Quarantined, SourcePosition};
use flowcap_storage::{
    HistoryError, HistoryWriter, JsonlError, JsonlSink, SnapshotStore, SnapshotStoreError,
};

use flowcap_delivery::Notifier;

use crate::kafka::SideOutput;
use crate::metrics::OutputMetrics;

use super::letters::{quarantined, without_secrets};
use super::letters::{BadCommand, DeadLetter, ResultMessage};
use super::snapshot::{CutMark, InFlight};
use super::{Control, Letter, Side, Summary, Wait, EVENTS_FILE, JOURNAL_FILE, REJECTS_FILE};

/// Kafka topics the writer produces to, besides its local files.
pub(crate) struct KafkaOut {
    pub(crate) producer: crate::kafka::KafkaProducer,
    pub(crate) actions: String,
    pub(crate) dlq: String,
    pub(crate) results: String,
    /// The producer's settings (push-failure alerts get a producer of
    /// their own: they come from the delivery threads, not the writer).
    pub(crate) producer_config: rdkafka::ClientConfig,
    /// Set when the process is asked to stop: a barrier then gives up
    /// waiting for an unreachable broker instead of hanging shutdown.
    pub(crate) give_up: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl KafkaOut {
    /// The producer's `message.max.bytes` (librdkafka's default when not
    /// set): no dead letter is larger ([`DeadLetter::bounded`]).
    fn max_message(&self) -> usize {
        self.producer_config
            .get("message.max.bytes")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(1_000_000)
    }
}

pub(crate) struct Writer {
    pub(super) sinks: BTreeMap<&'static str, JsonlSink>,
    pub(super) history: Option<HistoryWriter>,
    pub(super) summary: Summary,
    pub(super) kafka: Option<KafkaOut>,
    pub(super) metrics: OutputMetrics,
    pub(super) notifier: Option<Arc<Notifier>>,
    /// Per notification destination: outcomes in the history so far.
    pub(super) reported: BTreeMap<String, u64>,
    /// Where commits write snapshots.
    pub(super) store: Arc<SnapshotStore>,
    /// The last cut, until its commit arrives.
    pub(super) last_cut: Option<CutMark>,
    /// The commit in flight.
    pub(super) commit: Option<(CutMark, InFlight)>,
    /// The time of day, for the processing time of action events.
    pub(super) clock: SharedClock,
}

impl Writer {
    fn write_outputs(&mut self, outputs: Vec<Output>) -> Result<(), WriteError> {
        let now = Timestamp(self.clock.now_ms());
        for output in outputs {
            self.metrics.output(&output);
            match output {
                Output::Accounted(a) => {
                    if a.counted {
                        self.summary.counted += 1;
                    } else {
                        self.summary.history_only += 1;
                        self.summary.late += u64::from(a.late);
                    }
                    if let Some(h) = &mut self.history {
                        h.accounted(&a)?;
                    }
                }
                Output::Duplicate { .. } => self.summary.duplicates += 1,
                // The driver dead-letters router rejections itself (it still
                // holds the raw input); see `Letter::rejected`.
                Output::Rejected(_) => {}
                Output::Action(mut event) => {
                    match &mut event {
                        ActionEvent::CardState(e) => {
                            self.summary.card_events += 1;
                            e.processed_at = Some(now);
                        }
                        ActionEvent::PoolState(e) => {
                            self.summary.pool_events += 1;
                            e.processed_at = Some(now);
                        }
                        ActionEvent::LateCrossing(e) => {
                            self.summary.late_crossings += 1;
                            e.processed_at = Some(now);
                        }
                        ActionEvent::RuleFired(e) => {
                            self.summary.rule_firings += 1;
                            e.processed_at = Some(now);
                            if let Some(n) = &self.notifier {
                                n.submit(e);
                            }
                        }
                    }
                    self.sink(EVENTS_FILE).write(&event)?;
                    if let Some(h) = &mut self.history {
                        h.action(&event)?;
                    }
                    if let Some(k) = &mut self.kafka {
                        let payload = serde_json::to_vec(&event)?;
                        let id = event.id().as_bytes();
                        let kind: &[u8] = event.kind().as_bytes();
                        k.producer.send(
                            &k.actions,
                            Some(event.key().as_bytes()),
                            &payload,
                            &[("flowcap.event-id", id), ("flowcap.kind", kind)],
                        )?;
                    }
                }
                Output::Journal(entry) => {
                    if let (Some(n), true) = (&self.notifier, entry.result.ok) {
                        match &entry.command.kind {
                            CommandKind::UpsertWebhook { webhook } => {
                                n.upsert_endpoint(webhook.clone())
                            }
                            CommandKind::RemoveWebhook { webhook } => n.remove_endpoint(webhook),
                            _ => {}
                        }
                    }
                    if entry.result.ok {
                        self.summary.commands_ok += 1;
                    } else {
                        self.summary.commands_failed += 1;
                    }
                    // Written out with its secret redacted; the notifier
                    // above and the engine keep it to sign with.
                    let entry: Cow<'_, JournalEntry> = match redact::command(&entry.command) {
                        Cow::Borrowed(_) => Cow::Borrowed(&*entry),
                        Cow::Owned(command) => Cow::Owned(JournalEntry {
                            command,
                            ..(*entry).clone()
                        }),
                    };
                    self.sink(JOURNAL_FILE).write(&*entry)?;
                    if let Some(h) = &mut self.history {
                        h.journal(
                            entry.seq,
                            Some(&entry.command),
                            b"",
                            &entry.result,
                            entry.repeat,
                            entry.command.at,
                        )?;
                    }
                    if let Some(k) = &mut self.kafka {
                        let id = entry.result.command_id.as_str().as_bytes();
                        for page in
                            ResultMessage::pages(entry.seq, &entry.result, entry.repeat, None)
                        {
                            let payload = serde_json::to_vec(&page)?;
                            let at = SideOutput::page(entry.seq, page.page);
                            k.producer
                                .send_once(&k.results, at, Some(id), &payload, &[])?;
                        }
                    }
                }
                Output::PoolCycle(total) => {
                    if let Some(h) = &mut self.history {
                        h.pool_cycle(*total)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn write_letters(&mut self, letters: Vec<Letter>) -> Result<(), WriteError> {
        letters
            .into_iter()
            .try_for_each(|letter| self.write_letter(letter))
    }

    fn write_letter(&mut self, letter: Letter) -> Result<(), WriteError> {
        let budget = self.kafka.as_ref().map(KafkaOut::max_message);
        match letter {
            Letter::DeadLetter {
                seq,
                code,
                message,
                iccid,
                record_id,
                source,
                raw,
                raw_len,
                clock,
            } => {
                let raw = without_secrets(raw);
                self.metrics.reject(&code);
                *self.summary.rejected.entry(code.clone()).or_default() += 1;
                let (letter, kept) = DeadLetter::bounded(
                    seq,
                    &code,
                    &message,
                    iccid.as_deref(),
                    record_id.as_deref(),
                    source.as_ref(),
                    &raw,
                    raw_len,
                    budget,
                )?;
                self.sink(REJECTS_FILE).write(&letter)?;
                if let Some(k) = &mut self.kafka {
                    let payload = serde_json::to_vec(&letter)?;
                    dead_letter(
                        k,
                        seq,
                        &code,
                        letter.message,
                        source.as_ref(),
                        iccid.as_deref(),
                        &payload,
                    )?;
                }
                if let Some(h) = &mut self.history {
                    let quarantined = quarantined(seq, &code, letter.message, kept, raw_len, clock);
                    h.quarantined(Quarantined {
                        iccid,
                        record_id,
                        source,
                        ..quarantined
                    })?;
                }
                Ok(())
            }
            Letter::BadCommand {
                seq,
                code,
                source,
                raw,
                raw_len,
                result,
                clock,
            } => {
                let raw = without_secrets(raw);
                self.metrics.command(false);
                self.summary.commands_failed += 1;
                let truncated = raw.len() as u64 != raw_len;
                let line = BadCommand {
                    seq,
                    raw: String::from_utf8_lossy(&raw).into_owned(),
                    raw_truncated: truncated,
                    raw_len: truncated.then_some(raw_len),
                    result: &result,
                };
                self.sink(JOURNAL_FILE).write(&line)?;
                let message = result.error.as_ref().map_or("", |e| e.message.as_str());
                let (letter, kept) = DeadLetter::bounded(
                    seq,
                    code,
                    message,
                    None,
                    None,
                    source.as_ref(),
                    &raw,
                    raw_len,
                    budget,
                )?;
                if let Some(k) = &mut self.kafka {
                    let id = result.command_id.as_str().as_bytes();
                    for mut page in ResultMessage::pages(seq, &result, false, Some(&line.raw)) {
                        page.raw_truncated |= truncated;
                        let payload = serde_json::to_vec(&page)?;
                        let at = SideOutput::page(seq, page.page);
                        k.producer
                            .send_once(&k.results, at, Some(id), &payload, &[])?;
                    }
                    let envelope = serde_json::to_vec(&letter)?;
                    let source = source.as_ref();
                    dead_letter(k, seq, code, letter.message, source, None, &envelope)?;
                }
                if let Some(h) = &mut self.history {
                    h.journal(seq, None, &raw, &result, false, clock)?;
                    let quarantined = quarantined(seq, code, letter.message, kept, raw_len, clock);
                    h.quarantined(Quarantined {
                        source,
                        ..quarantined
                    })?;
                }
                Ok(())
            }
        }
    }

    /// Notification outcomes join this window; the snapshot records how
    /// far (a restart offers the rest again).
    pub(super) fn take_outcomes(&mut self) -> Result<(), WriteError> {
        if let Some(n) = &self.notifier {
            let rows = n.take_outcomes();
            for r in &rows {
                let at = self.reported.entry(r.destination.clone()).or_default();
                *at = (*at).max(r.index + 1);
            }
            if let Some(h) = &mut self.history {
                h.deliveries(rows)?;
            }
        }
        Ok(())
    }

    /// The positions a snapshot records for the outputs: every file's
    /// length and the notification cursors.
    pub(super) fn lengths(&self) -> BTreeMap<String, u64> {
        let mut lengths: BTreeMap<String, u64> = self
            .reported
            .iter()
            .map(|(d, n)| (format!("{}{d}", crate::notify::REPORTED_PREFIX), *n))
            .collect();
        for (name, sink) in &self.sinks {
            lengths.insert(format!("out.{name}"), sink.len());
        }
        lengths
    }

    fn sink(&mut self, name: &'static str) -> &mut JsonlSink {
        // Every name used is opened in `run` before the writer starts.
        self.sinks.get_mut(name).expect("sink opened at start")
    }

    fn sync_all(&mut self) -> Result<BTreeMap<String, u64>, WriteError> {
        self.advance_commit(Wait::Block)?;
        self.take_outcomes()?;
        for sink in self.sinks.values_mut() {
            sink.sync()?;
        }
        let lengths = self.lengths();
        if let Some(n) = &self.notifier {
            n.sync()?;
        }
        if let Some(k) = &mut self.kafka {
            let give_up = &k.give_up;
            k.producer
                .settle(&|| give_up.load(std::sync::atomic::Ordering::Relaxed))?;
        }
        Ok(lengths)
    }
}

/// What stops the writer thread, and fails the barrier, cut or commit
/// that met it. Kept typed across the threads it crosses (the writer's,
/// the snapshot's, the driver's), so a caller can tell what failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// An output file failed (external: disk).
    #[error("{0}")]
    File(#[from] JsonlError),
    /// The Kafka producer failed for good (external: the broker, or the
    /// producer's settings).
    #[error("kafka producer: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// An output did not encode as JSON (a bug).
    #[error("encoding an output: {0}")]
    Encode(#[from] serde_json::Error),
    /// The history failed (external: disk or object store).
    #[error("{0}")]
    History(#[from] HistoryError),
    /// The notification outbox failed (external: disk).
    #[error("{0}")]
    Notify(#[from] flowcap_delivery::DeliveryError),
    /// A snapshot could not be written (external: disk).
    #[error("writing a snapshot: {0}")]
    Snapshot(#[from] SnapshotStoreError),
    /// The dedupe ids of a snapshot could not be made durable (external:
    /// disk).
    #[error("dedupe id store: {0}")]
    Dedupe(#[from] flowcap_engine::IdStoreError),
    /// The snapshot's thread could not be started (external: the
    /// system's limits).
    #[error("starting the snapshot's thread: {0}")]
    Thread(std::io::Error),
    /// The writer stopped, for an error of its own, before the snapshot's
    /// outputs were durable: the snapshot is not written.
    #[error("the writer stopped before the snapshot's outputs were durable")]
    Stopped,
}

/// The DLQ message of input `seq` (unless the topic holds it already:
/// [`crate::kafka::KafkaProducer::send_once`]): the JSON envelope as value, the
/// reason and the source position also as headers (for consumers that
/// route without parsing).
fn dead_letter(
    k: &mut KafkaOut,
    seq: u64,
    code: &str,
    message: &str,
    source: Option<&SourcePosition>,
    key: Option<&str>,
    payload: &[u8],
) -> Result<(), WriteError> {
    let (topic, partition, offset) =
        source.map_or((String::new(), String::new(), String::new()), |s| {
            (
                s.topic.clone(),
                s.partition.to_string(),
                s.offset.to_string(),
            )
        });
    let sent = k.producer.send_once(
        &k.dlq,
        SideOutput::of(seq),
        key.map(str::as_bytes),
        payload,
        &[
            ("flowcap.reason", code.as_bytes()),
            ("flowcap.message", message.as_bytes()),
            ("flowcap.source.topic", topic.as_bytes()),
            ("flowcap.source.partition", partition.as_bytes()),
            ("flowcap.source.offset", offset.as_bytes()),
        ],
    )?;
    if sent {
        crate::metrics::dlq(code);
    }
    Ok(())
}

pub(super) fn run_writer(
    mut writer: Writer,
    outputs: Receiver<Vec<Output>>,
    side: Receiver<Side>,
) -> Result<Summary, WriteError> {
    loop {
        // A commit in flight is looked at between messages and every
        // millisecond while idle.
        let tick = if writer.commit.is_some() {
            crossbeam_channel::after(Duration::from_millis(1))
        } else {
            crossbeam_channel::never()
        };
        select! {
            recv(outputs) -> batch => match batch {
                Ok(batch) => writer.write_outputs(batch)?,
                Err(_) => {
                    // The engine is gone: drain the side channel and stop.
                    while let Ok(s) = side.try_recv() {
                        match s {
                            Side::Control(Control::Barrier(reply)) => {
                                let _ = reply.send(writer.sync_all());
                            }
                            Side::Control(Control::Cut(reply, seq, cut)) => {
                                let _ = reply.send(writer.cut(seq, cut));
                            }
                            Side::Control(Control::Commit(commit)) => {
                                writer.begin_commit(commit)?;
                                writer.advance_commit(Wait::Block)?;
                            }
                            Side::Letters(letters) => writer.write_letters(letters)?,
                        }
                    }
                    writer.sync_all()?;
                    return Ok(writer.summary);
                }
            },
            recv(side) -> msg => match msg {
                Ok(Side::Control(Control::Barrier(reply))) => {
                    // Everything the engine produced before the barrier is
                    // already queued: drain it, then make it durable.
                    while let Ok(batch) = outputs.try_recv() {
                        writer.write_outputs(batch)?;
                    }
                    let _ = reply.send(writer.sync_all());
                }
                Ok(Side::Control(Control::Cut(reply, seq, cut))) => {
                    while let Ok(batch) = outputs.try_recv() {
                        writer.write_outputs(batch)?;
                    }
                    let _ = reply.send(writer.cut(seq, cut));
                }
                Ok(Side::Control(Control::Commit(commit))) => {
                    writer.begin_commit(commit)?
                }
                Ok(Side::Letters(letters)) => writer.write_letters(letters)?,
                Err(_) => {}
            },
            recv(tick) -> _ => {}
        }
        if writer.commit.is_some() {
            writer.advance_commit(Wait::Poll)?;
        }
    }
}
