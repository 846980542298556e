//! The embedded pipeline: inputs from an iterator, outputs to a directory.
//!
//! ```text
//!  inputs (seq = position) --decode--> ShardedEngine --outputs--> writer thread
//!        \--bad JSON-----------------------------------------------^   (JSON lines)
//! ```
//!
//! Every input has a sequence number: its position in the input. Every
//! `snapshot_every` inputs, and at the end, the driver takes a snapshot in
//! two phases. The *cut* holds the inputs back:
//!
//! 1. the engine takes every shard home (all queued records accounted);
//! 2. the writer drains every output, reports each file's length, closes
//!    the history window (its last chunk and the state dumps go to the
//!    history thread) and closes the producer's epoch;
//! 3. the lengths go into the engine's positions, the dedupe store seals
//!    its buffer of new ids (its own thread writes them) and the engine's
//!    state is copied (a thread of the commit's own encodes the copy).
//!
//! Then inputs flow again while the *commit* completes: once the sealed
//! dedupe ids and the window's history files are stored and every Kafka
//! output of the epoch is acknowledged, the writer fsyncs the output files
//! and the notification outbox, and the commit's thread writes the
//! snapshot atomically.
//! Until then the previous snapshot is the newest: a crash rewinds to it,
//! which deletes the history files and cuts the output files back exactly
//! as before. One commit is in flight at a time (the next cut waits).
//!
//! On start, if the directory holds a snapshot, the engine is restored from
//! it, every output file is cut back to the length the snapshot recorded,
//! and inputs up to the snapshot's sequence number are skipped. Whatever a
//! crash interrupted after the snapshot is produced again, identically
//! (same order per card, same event ids), so each output line exists
//! exactly once.
//!
//! Metrics ([`crate::metrics`]) are recorded as it goes: the writer counts
//! what it writes, the driver counts records in, samples shard queue depths
//! and times snapshots. They cost nothing when no recorder is installed.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, select, Receiver, Sender};
use flowcap_engine::command::{parse_command, CommandKind, CommandResult};
use flowcap_engine::decode::{decode_json, DecodeLimits};
use flowcap_engine::event::{ActionEvent, JournalEntry, Output};
use flowcap_engine::redact;
use flowcap_engine::snapshot::SnapshotCopy;
use flowcap_engine::PoolView;
use flowcap_engine::{CommandId, Durability, Engine, EngineConfig, ShardedEngine, Timestamp};
use flowcap_storage::history::compact::CompactionPolicy;
pub(crate) use flowcap_storage::history::wall_clock;
use flowcap_storage::history::{
    CardsDump, Quarantined, SourcePosition as HistorySource, StoredTicket,
};
use flowcap_storage::HistoryLocation;
use flowcap_storage::{
    DiskIdStore, HistoryError, HistoryOptions, HistoryWriter, JsonlError, JsonlSink, SnapshotStore,
    SnapshotStoreError,
};
use serde::Serialize;

use flowcap_delivery::{Notifier, NotifyConfig};

use crate::health::Health;
use crate::limits::{cut_str, fit, text, InputKind, Oversized, SizeLimits, MESSAGE_KEPT, RAW_KEPT};
use crate::metrics::{self, DriverMetrics, OutputMetrics, Source};

/// Errors that stop the embedded pipeline. Bad input never does: it is
/// rejected into `rejects.jsonl`.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// An output file failed (external: disk).
    #[error("output: {0}")]
    Output(#[from] JsonlError),
    /// The snapshot store failed (external: disk).
    #[error("snapshots: {0}")]
    Snapshots(#[from] SnapshotStoreError),
    /// The engine failed (dedupe store IO, or a snapshot that does not decode).
    #[error("engine: {0}")]
    Engine(#[from] flowcap_engine::EngineError),
    /// The dedupe cold index could not be opened.
    #[error("dedupe cold index: {0}")]
    IdStore(#[from] flowcap_engine::IdStoreError),
    /// The Parquet history could not be opened or recovered.
    #[error("history: {0}")]
    History(#[from] HistoryError),
    /// The output directory could not be prepared.
    #[error("output directory {path}: {source}")]
    Directory {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The output writer thread stopped unexpectedly.
    #[error("output writer stopped: {0}")]
    Writer(String),
    /// The directory has snapshots but none restores (all corrupt, of
    /// another format version, or unreadable): starting over would delete
    /// committed outputs and history, so the start is refused (the user's
    /// to decide: `--fresh`, or the build that wrote them).
    #[error("{}", no_usable_snapshot(dir, failures))]
    NoUsableSnapshot {
        /// The data directory.
        dir: PathBuf,
        /// Every snapshot tried, oldest first, with why it failed.
        failures: Vec<SnapshotFailure>,
    },
    /// An input file could not be opened or read (the user's path, or
    /// external: disk).
    #[error("input {}: {source}", path.display())]
    Input {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// An input file's bytes changed under the position a snapshot
    /// recorded for it (the user's: a file edited or replaced after it was
    /// read). Nothing is read: counting it again would count twice.
    #[error(
        "input {} changed since this directory read it: {why}. A file is known by its path \
         and the bytes read from it: give new data as a new file (or append to this one); \
         to count the changed file from scratch, start over with --fresh",
        path.display()
    )]
    InputChanged {
        /// The file.
        path: PathBuf,
        /// What differs.
        why: String,
    },
    /// A run over files was interrupted by a crash and one of its files
    /// is not given again (the user's): it must be finished first.
    #[error(
        "a run over {} (as {}) was interrupted before it finished; give it again \
         (with the other files of that run) so that run completes first",
        path.display(),
        match role { crate::files::Role::Records => "--input", crate::files::Role::Commands => "--commands" }
    )]
    InputMissing {
        /// The file.
        path: PathBuf,
        /// Its role in that run.
        role: crate::files::Role,
    },
}

/// One input line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A usage record (one JSON object).
    Record(Vec<u8>),
    /// A usage record with the time it was received (part of the input, so
    /// a replay judges "far in the future" the same way).
    ReceivedRecord(Vec<u8>, Timestamp),
    /// A control command (one JSON object).
    Command(Vec<u8>),
    /// A control command with the time it was received: its `at` is
    /// bounded by it (`future_at`), as a record's `end` is.
    ReceivedCommand(Vec<u8>, Timestamp),
    /// A record or command over its size limit, never read whole: it is
    /// dead-lettered as `too_large` ([`crate::limits`]).
    Oversized(Oversized),
}

/// How to run.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// Directory for outputs, snapshots and the dedupe cold index.
    pub out_dir: PathBuf,
    /// Engine configuration (ignored when resuming: the snapshot's wins).
    pub engine: EngineConfig,
    /// Take a snapshot every this many inputs (0: only at the end).
    pub snapshot_every: u64,
    /// Write the Parquet history (see [`flowcap_storage::history`]);
    /// `None`: no history.
    pub history: Option<HistoryConfig>,
    /// Resume from the newest snapshot in `out_dir` if there is one;
    /// otherwise start empty and clear previous outputs.
    pub resume: bool,
    /// Limits for record decoding.
    pub limits: DecodeLimits,
    /// Largest record and command read ([`crate::limits`]).
    pub sizes: SizeLimits,
    /// Report progress every this many inputs.
    pub progress_every: u64,
    /// Where the records come from (the `source` label of the records-in metric).
    pub source: Source,
    /// Set ready when the pipeline starts processing, if given.
    pub health: Option<Arc<Health>>,
    /// Deliver rule notifications (webhooks, email, SMS) with these
    /// settings; `None`: firings are recorded but nothing is sent.
    pub notify: Option<NotifyConfig>,
}

impl EmbeddedOptions {
    /// Defaults for a directory.
    pub fn new(out_dir: impl Into<PathBuf>) -> EmbeddedOptions {
        EmbeddedOptions {
            out_dir: out_dir.into(),
            engine: EngineConfig::default(),
            snapshot_every: 1_000_000,
            history: Some(HistoryConfig::default()),
            resume: true,
            limits: DecodeLimits::default(),
            sizes: SizeLimits::default(),
            progress_every: 100_000,
            source: Source::File,
            health: None,
            notify: Some(NotifyConfig::default()),
        }
    }
}

/// Progress so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// Inputs read (including skipped ones when resuming).
    pub inputs: u64,
    /// Seconds since start.
    pub elapsed_secs: f64,
}

/// What a run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Snapshot sequence resumed from, if any.
    pub resumed_after_seq: Option<u64>,
    /// Inputs read in this run (after any skipped on resume).
    pub inputs: u64,
    /// Records accounted and counted in their card's current cycle.
    pub counted: u64,
    /// Records accounted to history only (previous cycle or deregistered card).
    pub history_only: u64,
    /// Of those, records that arrived after their cycle closed.
    pub late: u64,
    /// Duplicate resends dropped.
    pub duplicates: u64,
    /// Rejected records by reason code.
    pub rejected: BTreeMap<String, u64>,
    /// Commands processed (ok, failed).
    pub commands_ok: u64,
    /// Commands that failed as a whole or for some card.
    pub commands_failed: u64,
    /// Card state events emitted.
    pub card_events: u64,
    /// Pool state events emitted.
    pub pool_events: u64,
    /// Rule firings emitted.
    pub rule_firings: u64,
    /// Notification delivery (webhooks, email, SMS) when it is on.
    pub notifications: Option<flowcap_delivery::DeliveryTotals>,
    /// Cards per visible state at the end.
    pub cards_by_state: BTreeMap<String, u64>,
    /// Snapshots written.
    pub snapshots: u64,
    /// Wall-clock seconds.
    pub elapsed_secs: f64,
    /// Inputs per second.
    pub inputs_per_sec: f64,
    /// Output directory.
    pub out_dir: PathBuf,
    /// Input files (file mode): what the run did with each.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<crate::files::InputFile>,
}

/// Output file names inside the directory.
pub const EVENTS_FILE: &str = "events.jsonl";
/// Rejected inputs (dead letters), with reason and raw bytes.
pub const REJECTS_FILE: &str = "rejects.jsonl";
/// Command journal: command + result.
pub const JOURNAL_FILE: &str = "journal.jsonl";
/// The notification outbox inside the output directory
/// (`flowcap_delivery::outbox`).
pub const OUTBOX_DIR: &str = "outbox";
/// Push-failure alerts (`push_failed` action events), appended as they
/// happen (wall-clock order; not rewound on restart).
pub const ALERTS_FILE: &str = "alerts.jsonl";
/// The Parquet history directory inside the output directory (the
/// default location).
pub const HISTORY_DIR: &str = "history";

/// Where and how the pipeline writes its Parquet history.
#[derive(Debug, Clone)]
pub struct HistoryConfig {
    /// Where: a local directory or an object store; `None`: `history/`
    /// in the output directory.
    pub location: Option<HistoryLocation>,
    /// Rows buffered before a chunk is written between snapshots.
    pub roll_rows: usize,
    /// When small files are merged.
    pub compaction: CompactionPolicy,
    /// zstd level of the Parquet files (1-22; [`HistoryOptions`]' default
    /// 1, the least CPU).
    pub zstd_level: i32,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            location: None,
            roll_rows: HistoryOptions::default().roll_rows,
            compaction: CompactionPolicy::default(),
            zstd_level: HistoryOptions::default().zstd_level,
        }
    }
}

impl HistoryConfig {
    /// The location, given the pipeline's data directory.
    pub fn location_in(&self, dir: &Path) -> HistoryLocation {
        self.location
            .clone()
            .unwrap_or_else(|| HistoryLocation::Local(dir.join(HISTORY_DIR)))
    }
}
/// Snapshot position: sequence number of the last input the snapshot covers.
const INPUT_POSITION: &str = "input.last_seq";
const FILES: [&str; 3] = [EVENTS_FILE, REJECTS_FILE, JOURNAL_FILE];

/// Where a dead letter came from, when the input has positions (Kafka).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SourcePosition {
    pub(crate) topic: String,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) timestamp_ms: Option<i64>,
}

/// `raw` with its secrets redacted ([`redact::raw`]): what a dead letter,
/// the journal and the history keep of an input that is not a command.
fn without_secrets(raw: Vec<u8>) -> Vec<u8> {
    let redacted = match redact::raw(&raw) {
        Cow::Owned(r) => Some(r),
        Cow::Borrowed(_) => None,
    };
    redacted.unwrap_or(raw)
}

/// One dead letter: `rejects.jsonl` line and DLQ message value.
#[derive(Serialize)]
pub(crate) struct DeadLetter<'a> {
    seq: u64,
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    iccid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    record_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<&'a SourcePosition>,
    /// The input as received, when it is UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    raw: Option<&'a str>,
    /// The input as received, hex, when it is not UTF-8 (binary records).
    #[serde(skip_serializing_if = "Option::is_none")]
    raw_hex: Option<String>,
    /// `raw` (or `raw_hex`) holds only the input's first bytes
    /// ([`crate::limits`]).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    raw_truncated: bool,
    /// The input's full length in bytes, when `raw` is truncated.
    #[serde(skip_serializing_if = "Option::is_none")]
    raw_len: Option<u64>,
}

/// What a Kafka dead letter's value may use of the producer's
/// `message.max.bytes`: the rest is left to its key, its headers (the
/// message among them, at most [`MESSAGE_KEPT`] bytes) and the record's
/// framing.
const DLQ_HEADROOM: usize = 8 * 1024;

impl<'a> DeadLetter<'a> {
    /// The dead letter of an input, bounded ([`crate::limits`]): of `raw`
    /// (`raw_len` bytes in full) it keeps at most [`RAW_KEPT`] bytes, of
    /// the message [`MESSAGE_KEPT`], and with a `budget` (a Kafka
    /// producer's `message.max.bytes`) fewer raw bytes until the whole
    /// message fits. The letter and the raw bytes it keeps.
    #[allow(clippy::too_many_arguments)]
    fn bounded(
        seq: u64,
        code: &'a str,
        message: &'a str,
        iccid: Option<&'a str>,
        record_id: Option<&'a str>,
        source: Option<&'a SourcePosition>,
        raw: &'a [u8],
        raw_len: u64,
        budget: Option<usize>,
    ) -> Result<(DeadLetter<'a>, &'a [u8]), serde_json::Error> {
        let message = cut_str(message, MESSAGE_KEPT);
        let letter = |keep: usize| {
            let kept = &raw[..keep];
            let truncated = (keep as u64) < raw_len;
            let utf8 = text(kept, truncated);
            DeadLetter {
                seq,
                code,
                message,
                iccid,
                record_id,
                source,
                raw: utf8,
                raw_hex: utf8.is_none().then(|| hex(kept)),
                raw_truncated: truncated,
                raw_len: truncated.then_some(raw_len),
            }
        };
        let start = raw.len().min(RAW_KEPT);
        let keep = match budget {
            None => start,
            Some(max) => fit(start, max.saturating_sub(DLQ_HEADROOM), |keep| {
                serde_json::to_vec(&letter(keep)).map(|v| v.len())
            })?,
        };
        Ok((letter(keep), &raw[..keep]))
    }
}

#[derive(Serialize)]
struct BadCommand<'a> {
    seq: u64,
    raw: String,
    /// `raw` holds only the first bytes of a command over its size limit.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    raw_truncated: bool,
    /// The command's full length in bytes, when `raw` is truncated.
    #[serde(skip_serializing_if = "Option::is_none")]
    raw_len: Option<u64>,
    result: &'a CommandResult,
}

/// Most failed cards a results-topic message lists, and most bytes of a
/// bad command's raw text it repeats.
const RESULT_MESSAGE_FAILED_CARDS: usize = 1_000;
const RESULT_MESSAGE_RAW_BYTES: usize = 64 * 1024;

/// What `flowcap.command-results` carries for one command: the answer, not
/// the command again. A batch of 20k cards echoed with one outcome per card
/// passed librdkafka's 1 MB message limit and stopped the pipeline; this
/// stays far below it whatever the command: successes are counted, failed
/// cards listed up to [`RESULT_MESSAGE_FAILED_CARDS`], a bad command's
/// raw text cut at [`RESULT_MESSAGE_RAW_BYTES`]. The whole command and
/// result are in the journal (`journal.jsonl`, `command_journal`).
#[derive(Serialize)]
struct ResultMessage<'a> {
    seq: u64,
    command_id: &'a CommandId,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a flowcap_engine::command::CommandError>,
    repeat: bool,
    cards_ok: usize,
    cards_failed: usize,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    failed: Vec<&'a flowcap_engine::command::CardResult>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    failed_truncated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    raw: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    raw_truncated: bool,
}

impl<'a> ResultMessage<'a> {
    fn new(seq: u64, result: &'a CommandResult, repeat: bool, raw: Option<&'a str>) -> Self {
        let failed_all = result.results.iter().filter(|r| !r.ok);
        let cards_failed = failed_all.clone().count();
        let raw_cut = raw.map(|r| cut_str(r, RESULT_MESSAGE_RAW_BYTES));
        ResultMessage {
            seq,
            command_id: &result.command_id,
            ok: result.ok,
            error: result.error.as_ref(),
            repeat,
            cards_ok: result.results.len() - cards_failed,
            cards_failed,
            failed: failed_all.take(RESULT_MESSAGE_FAILED_CARDS).collect(),
            failed_truncated: cards_failed > RESULT_MESSAGE_FAILED_CARDS,
            raw_truncated: raw_cut.map(str::len) != raw.map(str::len),
            raw: raw_cut,
        }
    }
}

pub(crate) enum Side {
    DeadLetter {
        seq: u64,
        code: String,
        message: String,
        iccid: Option<String>,
        record_id: Option<String>,
        source: Option<SourcePosition>,
        /// The input, or its first bytes when it is longer ([`crate::limits`]).
        raw: Vec<u8>,
        /// The input's full length.
        raw_len: u64,
        /// The router's event clock when it was rejected (stamped by
        /// [`Pipeline::side`]): names the history partition.
        clock: Timestamp,
    },
    BadCommand {
        seq: u64,
        code: &'static str,
        source: Option<SourcePosition>,
        /// The command, or its first bytes when it is over its size limit.
        raw: Vec<u8>,
        /// The command's full length.
        raw_len: u64,
        result: CommandResult,
        clock: Timestamp,
    },
    /// Make everything written so far durable (snapshots cut with
    /// [`Side::Cut`] instead).
    Barrier(Sender<Result<BTreeMap<String, u64>, String>>),
    /// The first phase of a snapshot: close the window and the producer's
    /// epoch, answer with the output lengths at once (nothing waits for
    /// durability yet).
    Cut(
        Sender<Result<BTreeMap<String, u64>, String>>,
        /// The last input the snapshot covers.
        u64,
        Option<Box<HistoryCut>>,
    ),
    /// The second phase: write the encoded snapshot once everything before
    /// the cut is durable.
    Commit(Commit),
    /// Dead letters and bad commands sent together ([`Pipeline::side_later`]):
    /// one send and one wake-up of the writer per batch, not per letter.
    Letters(Vec<Side>),
}

/// A snapshot waiting for the outputs before its cut to be durable.
pub(crate) struct Commit {
    seq: u64,
    /// The engine's state at the cut, encoded and written by the
    /// snapshot's own thread (the inputs waited only for the copy); shared
    /// with the thread building the cards dump from it.
    state: Arc<SnapshotCopy>,
    /// The dedupe ids through `seq`, written by the id store's own thread.
    dedupe: Durability,
    /// When the cut began (the snapshot's duration is measured from it).
    started: Instant,
    /// Told once the snapshot is written (or why it could not be).
    done: Sender<Result<(), String>>,
}

/// The writer's side of a commit: what it waits for besides the cut's
/// mark, and the word that lets the snapshot's thread write it.
struct InFlight {
    dedupe: Durability,
    go: Sender<()>,
}

/// What a cut closed and its commit waits for.
#[derive(Debug, Default, Clone, Copy)]
struct CutMark {
    history: Option<StoredTicket>,
    epoch: Option<u64>,
}

/// What the history needs at a snapshot: the inputs it covers and the
/// engine's state to dump.
pub(crate) struct HistoryCut {
    through: u64,
    clock: Timestamp,
    pools: Vec<PoolView>,
    cards: Option<CardsDump>,
    /// The oldest snapshot kept covers inputs through this: windows up to
    /// it may be compacted.
    compact_through: Option<u64>,
}

impl Side {
    /// A dead letter for an input the router refused.
    pub(crate) fn rejected(
        r: flowcap_engine::event::Rejection,
        raw: Vec<u8>,
        source: Option<SourcePosition>,
    ) -> Side {
        let (raw, raw_len) = kept(raw);
        Side::DeadLetter {
            seq: r.seq,
            code: r.code,
            message: r.message,
            iccid: r.iccid.map(|i| i.to_string()),
            record_id: r.record_id.map(|id| id.as_str().to_owned()),
            source,
            raw,
            raw_len,
            clock: Timestamp::MIN,
        }
    }

    /// A command that does not parse: a failed result for its id (if it
    /// has one) and a dead letter.
    pub(crate) fn bad_command(
        seq: u64,
        error: flowcap_engine::command::CommandError,
        raw: Vec<u8>,
        source: Option<SourcePosition>,
    ) -> Side {
        let code = match error.code {
            flowcap_engine::command::ErrorCode::UnknownType => "unknown_command_type",
            _ => "malformed_command",
        };
        let result = CommandResult::rejected(command_id_of(&raw), error);
        Side::BadCommand {
            seq,
            code,
            source,
            raw_len: raw.len() as u64,
            raw,
            result,
            clock: Timestamp::MIN,
        }
    }

    /// A dead letter for bytes that do not decode.
    pub(crate) fn undecodable(
        seq: u64,
        error: &flowcap_engine::decode::DecodeError,
        raw: Vec<u8>,
        source: Option<SourcePosition>,
    ) -> Side {
        let (raw, raw_len) = kept(raw);
        Side::DeadLetter {
            seq,
            code: error.code().to_owned(),
            message: error.to_string(),
            iccid: None,
            record_id: None,
            source,
            raw,
            raw_len,
            clock: Timestamp::MIN,
        }
    }

    /// An input over its size limit, never read: a `too_large` dead letter
    /// with its first bytes (a command's also a failed result, with no id:
    /// its id was not read).
    pub(crate) fn too_large(seq: u64, input: Oversized, source: Option<SourcePosition>) -> Side {
        let message = input.message();
        match input.kind {
            InputKind::Record => Side::DeadLetter {
                seq,
                code: Oversized::CODE.to_owned(),
                message,
                iccid: None,
                record_id: None,
                source,
                raw: input.head,
                raw_len: input.len,
                clock: Timestamp::MIN,
            },
            InputKind::Command => Side::BadCommand {
                seq,
                code: Oversized::CODE,
                source,
                raw: input.head,
                raw_len: input.len,
                result: CommandResult::rejected(
                    CommandId::from(""),
                    flowcap_engine::command::CommandError::new(
                        flowcap_engine::command::ErrorCode::TooLarge,
                        message,
                    ),
                ),
                clock: Timestamp::MIN,
            },
        }
    }
}

/// What a dead letter can keep of `raw` (its first [`RAW_KEPT`] bytes, see
/// [`DeadLetter::bounded`]), so a letter waiting for the writer holds no
/// more; and its full length.
fn kept(mut raw: Vec<u8>) -> (Vec<u8>, u64) {
    let len = raw.len() as u64;
    if raw.len() > RAW_KEPT {
        raw.truncate(RAW_KEPT);
        raw.shrink_to_fit();
    }
    (raw, len)
}

/// Kafka topics the writer produces to, besides its local files.
pub(crate) struct KafkaOut {
    pub(crate) outbox: crate::kafka::Outbox,
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
    sinks: BTreeMap<&'static str, JsonlSink>,
    history: Option<HistoryWriter>,
    summary: Summary,
    kafka: Option<KafkaOut>,
    metrics: OutputMetrics,
    notifier: Option<Arc<Notifier>>,
    /// Per notification destination: outcomes in the history so far.
    reported: BTreeMap<String, u64>,
    /// Where commits write snapshots.
    store: Arc<SnapshotStore>,
    /// The last cut, until its commit arrives.
    last_cut: Option<CutMark>,
    /// The commit in flight.
    commit: Option<(CutMark, InFlight)>,
}

impl Writer {
    fn write_outputs(&mut self, outputs: Vec<Output>) -> Result<(), WriteError> {
        let now = wall_clock();
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
                // holds the raw input); see `Side::rejected`.
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
                        k.outbox.send(
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
                        let message =
                            ResultMessage::new(entry.seq, &entry.result, entry.repeat, None);
                        let payload = serde_json::to_vec(&message)?;
                        let id = entry.result.command_id.as_str().as_bytes();
                        k.outbox
                            .send_once(&k.results, entry.seq, Some(id), &payload, &[])?;
                    }
                }
            }
        }
        Ok(())
    }

    fn write_side(&mut self, side: Side) -> Result<(), WriteError> {
        let budget = self.kafka.as_ref().map(KafkaOut::max_message);
        match side {
            Side::DeadLetter {
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
                        source: source.map(history_source),
                        ..quarantined
                    })?;
                }
                Ok(())
            }
            Side::BadCommand {
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
                    let mut message = ResultMessage::new(seq, &result, false, Some(&line.raw));
                    message.raw_truncated |= truncated;
                    let payload = serde_json::to_vec(&message)?;
                    let id = result.command_id.as_str().as_bytes();
                    k.outbox
                        .send_once(&k.results, seq, Some(id), &payload, &[])?;
                    let envelope = serde_json::to_vec(&letter)?;
                    let source = source.as_ref();
                    dead_letter(k, seq, code, letter.message, source, None, &envelope)?;
                }
                if let Some(h) = &mut self.history {
                    h.journal(seq, None, &raw, &result, false, clock)?;
                    let quarantined = quarantined(seq, code, letter.message, kept, raw_len, clock);
                    h.quarantined(Quarantined {
                        source: source.map(history_source),
                        ..quarantined
                    })?;
                }
                Ok(())
            }
            Side::Letters(letters) => letters
                .into_iter()
                .try_for_each(|letter| self.write_side(letter)),
            Side::Barrier(..) | Side::Cut(..) | Side::Commit(..) => Ok(()),
        }
    }

    /// The cut of a snapshot through input `seq` (see the module docs): the
    /// output lengths (and where the side topics are read back from, in
    /// Kafka mode) now; durability comes with the commit.
    fn cut(
        &mut self,
        seq: u64,
        cut: Option<Box<HistoryCut>>,
    ) -> Result<BTreeMap<String, u64>, WriteError> {
        self.take_outcomes()?;
        let mut mark = CutMark::default();
        if let (Some(h), Some(cut)) = (&mut self.history, cut) {
            let HistoryCut {
                through,
                clock,
                pools,
                cards,
                compact_through,
            } = *cut;
            mark.history = Some(h.cut(through, clock, pools, cards, compact_through)?);
            if let Some(stats) = h.compaction_stats() {
                metrics::history_compaction(&stats);
            }
        }
        let mut lengths = self.lengths();
        if let Some(k) = &mut self.kafka {
            mark.epoch = Some(k.outbox.close_epoch());
            lengths.extend(k.outbox.cut_marks(seq));
        }
        self.last_cut = Some(mark);
        Ok(lengths)
    }

    /// Starts waiting to write `commit` (for the last cut): its own
    /// thread encodes the state meanwhile and writes the snapshot once
    /// told, so neither holds up the outputs (encoding took 0.3-0.5 s at
    /// 100k cards, BENCHMARKS §8, and takes seconds at 10M; the write
    /// fsyncs it).
    fn begin_commit(&mut self, commit: Commit) -> Result<(), WriteError> {
        let mark = self.last_cut.take().unwrap_or_default();
        let Commit {
            seq,
            state,
            dedupe,
            started,
            done,
        } = commit;
        let (go, go_rx) = bounded::<()>(1);
        let store = Arc::clone(&self.store);
        flowcap_storage::background::spawn("flowcap-snapshot", move || {
            let encoding = Instant::now();
            let bytes = state.encode();
            drop(state);
            let encoded = encoding.elapsed();
            if go_rx.recv().is_err() {
                let _ = done.send(Err(
                    "the writer stopped before the snapshot's outputs were durable".into(),
                ));
                return;
            }
            let writing = Instant::now();
            let result = store
                .write(seq, &bytes)
                .map(|_| ())
                .map_err(|e| WriteError::from(e).to_string());
            tracing::debug!(
                seq,
                bytes = bytes.len(),
                encode_ms = ms(encoded),
                write_ms = ms(writing.elapsed()),
                "snapshot written"
            );
            if result.is_ok() {
                metrics::snapshot_written(started.elapsed());
            }
            let _ = done.send(result);
        })
        .map_err(WriteError::Thread)?;
        self.commit = Some((mark, InFlight { dedupe, go }));
        Ok(())
    }

    /// Lets the snapshot in flight be written once everything before its
    /// cut is durable (with `wait`, waits for that). True when none is
    /// left.
    fn advance_commit(&mut self, wait: bool) -> Result<bool, WriteError> {
        let Some((mark, _)) = &self.commit else {
            return Ok(true);
        };
        let mark = *mark;
        match self.try_commit(mark, wait) {
            Ok(false) => Ok(false),
            Ok(true) => {
                if let Some((_, in_flight)) = self.commit.take() {
                    // The snapshot's thread writes it and tells the driver.
                    let _ = in_flight.go.send(());
                }
                Ok(true)
            }
            Err(e) => {
                // Dropping `go` tells the snapshot's thread to give up.
                self.commit = None;
                Err(e)
            }
        }
    }

    /// Whether everything before the cut of the commit in flight is
    /// durable (with `wait`, waits for it): the sealed dedupe ids, the
    /// window's history files, the broker's acknowledgements; then the
    /// output files and the outbox are fsynced.
    fn try_commit(&mut self, mark: CutMark, wait: bool) -> Result<bool, WriteError> {
        if let Some((_, in_flight)) = &self.commit {
            if wait {
                in_flight.dedupe.wait()?;
            } else if !in_flight.dedupe.poll()? {
                return Ok(false);
            }
        }
        if let (Some(h), Some(ticket)) = (&mut self.history, mark.history) {
            if wait {
                h.wait_stored(ticket)?;
            } else if !h.is_stored(ticket)? {
                return Ok(false);
            }
        }
        if let (Some(k), Some(epoch)) = (&mut self.kafka, mark.epoch) {
            if wait {
                let give_up = &k.give_up;
                k.outbox
                    .settle(&|| give_up.load(std::sync::atomic::Ordering::Relaxed))?;
            } else if !k.outbox.settled_through(epoch)? {
                return Ok(false);
            }
        }
        // Every file at least as long as the cut reported (appends since
        // are made durable too: harmless, a restart cuts them off).
        for sink in self.sinks.values_mut() {
            sink.sync()?;
        }
        if let Some(n) = &self.notifier {
            n.sync()?;
        }
        Ok(true)
    }

    /// Notification outcomes join this window; the snapshot records how
    /// far (a restart offers the rest again).
    fn take_outcomes(&mut self) -> Result<(), WriteError> {
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
    fn lengths(&self) -> BTreeMap<String, u64> {
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
        self.advance_commit(true)?;
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
            k.outbox
                .settle(&|| give_up.load(std::sync::atomic::Ordering::Relaxed))?;
        }
        Ok(lengths)
    }
}

/// What stops the writer thread.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WriteError {
    #[error("{0}")]
    File(#[from] JsonlError),
    #[error("kafka producer: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("encoding an output: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("{0}")]
    History(#[from] HistoryError),
    #[error("{0}")]
    Notify(#[from] flowcap_delivery::DeliveryError),
    #[error("writing a snapshot: {0}")]
    Snapshot(#[from] SnapshotStoreError),
    #[error("dedupe cold index: {0}")]
    Dedupe(#[from] flowcap_engine::IdStoreError),
    #[error("starting the snapshot's thread: {0}")]
    Thread(std::io::Error),
}

fn history_source(s: SourcePosition) -> HistorySource {
    HistorySource {
        topic: s.topic,
        partition: s.partition,
        offset: s.offset,
        timestamp_ms: s.timestamp_ms,
    }
}

/// The history row of a dead letter: the raw bytes its letter kept, and
/// when they are not the whole input the message says so.
fn quarantined(
    seq: u64,
    code: &str,
    message: &str,
    kept: &[u8],
    raw_len: u64,
    clock: Timestamp,
) -> Quarantined {
    let message = if kept.len() as u64 == raw_len {
        message.to_owned()
    } else {
        format!(
            "{message} (raw: the first {} of {raw_len} bytes)",
            kept.len()
        )
    };
    Quarantined {
        seq,
        reason: code.to_owned(),
        message,
        iccid: None,
        record_id: None,
        source: None,
        raw: kept.to_vec(),
        clock,
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// The DLQ message of input `seq` (unless the topic holds it already:
/// [`crate::kafka::Outbox::send_once`]): the JSON envelope as value, the
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
    let sent = k.outbox.send_once(
        &k.dlq,
        seq,
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

fn run_writer(
    mut writer: Writer,
    outputs: Receiver<Vec<Output>>,
    side: Receiver<Side>,
) -> Result<Summary, String> {
    let fail = |e: WriteError| e.to_string();
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
                Ok(batch) => writer.write_outputs(batch).map_err(fail)?,
                Err(_) => {
                    // The engine is gone: drain the side channel and stop.
                    while let Ok(s) = side.try_recv() {
                        match s {
                            Side::Barrier(reply) => {
                                let _ = reply.send(writer.sync_all().map_err(fail));
                            }
                            Side::Cut(reply, seq, cut) => {
                                let _ = reply.send(writer.cut(seq, cut).map_err(fail));
                            }
                            Side::Commit(commit) => {
                                writer.begin_commit(commit).map_err(fail)?;
                                writer.advance_commit(true).map_err(fail)?;
                            }
                            other => writer.write_side(other).map_err(fail)?,
                        }
                    }
                    writer.sync_all().map_err(fail)?;
                    return Ok(writer.summary);
                }
            },
            recv(side) -> msg => match msg {
                Ok(Side::Barrier(reply)) => {
                    // Everything the engine produced before the barrier is
                    // already queued: drain it, then make it durable.
                    while let Ok(batch) = outputs.try_recv() {
                        writer.write_outputs(batch).map_err(fail)?;
                    }
                    let _ = reply.send(writer.sync_all().map_err(fail));
                }
                Ok(Side::Cut(reply, seq, cut)) => {
                    while let Ok(batch) = outputs.try_recv() {
                        writer.write_outputs(batch).map_err(fail)?;
                    }
                    let _ = reply.send(writer.cut(seq, cut).map_err(fail));
                }
                Ok(Side::Commit(commit)) => writer.begin_commit(commit).map_err(fail)?,
                Ok(other) => writer.write_side(other).map_err(fail)?,
                Err(_) => {}
            },
            recv(tick) -> _ => {}
        }
        if writer.commit.is_some() {
            writer.advance_commit(false).map_err(fail)?;
        }
    }
}

fn prepare_dir(dir: &Path) -> Result<(), IngestError> {
    std::fs::create_dir_all(dir).map_err(|source| IngestError::Directory {
        path: dir.to_owned(),
        source,
    })
}

/// The snapshot directory inside the data directory.
const SNAPSHOTS_DIR: &str = "snapshots";

fn clear_dir(dir: &Path) -> Result<(), IngestError> {
    for name in [SNAPSHOTS_DIR, "dedupe"] {
        let path = dir.join(name);
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .map_err(|source| IngestError::Directory { path, source })?;
        }
    }
    Ok(())
}

/// Why one snapshot file could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum Unusable {
    /// The bytes are damaged or of another format version.
    #[error("{0}")]
    Snapshot(#[from] flowcap_engine::snapshot::SnapshotError),
    /// The file could not be read (external: disk).
    #[error("I/O error reading it: {0}")]
    Read(std::io::Error),
    /// The dedupe index could not be brought back to the snapshot
    /// (external: disk).
    #[error("I/O error in the dedupe index while restoring it: {0}")]
    Dedupe(String),
}

/// One snapshot that was tried and not used.
#[derive(Debug)]
pub struct SnapshotFailure {
    /// The file.
    pub path: PathBuf,
    /// Why.
    pub why: Unusable,
}

/// The message of [`IngestError::NoUsableSnapshot`]: one line a file.
fn no_usable_snapshot(dir: &Path, failures: &[SnapshotFailure]) -> String {
    let mut text = format!(
        "{} holds outputs but no usable snapshot to resume them from; refusing to start \
         (nothing was changed). The snapshots:",
        dir.display()
    );
    for f in failures {
        let name = f.path.file_name().map_or_else(
            || f.path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        text.push_str(&format!("\n  {name}: {}", f.why));
    }
    text.push_str(
        "\nTo go on: run the flowcap build that wrote them (an upgrade never reads an older \
         snapshot format: finish with the old build, then upgrade), or start over on purpose \
         with `flowcap run --fresh`, which clears the outputs and the history (in Kafka mode \
         the inputs are then read again from the oldest offsets the topics keep).",
    );
    text
}

/// The directory's state before the pipeline starts: the engine restored
/// from the newest usable snapshot, or none.
///
/// Starting over deletes outputs, so it happens only when nothing
/// committed is there to lose or when asked for: with `resume` and at
/// least one snapshot file, some snapshot must restore, else loading
/// fails with [`IngestError::NoUsableSnapshot`] before anything is
/// touched. With no snapshot file at all, whatever the directory holds was
/// written by a first run that never committed a snapshot (a crash):
/// it is written again from the start, as any crash rewinds to its
/// snapshot. Without `resume` (`--fresh`) everything is cleared.
pub(crate) struct Restored {
    dir: PathBuf,
    resume: bool,
    engine: Option<Engine>,
    started: Instant,
}

impl Restored {
    /// Finds and restores the newest usable snapshot of `dir` (when
    /// `resume`); an unusable one is skipped for the one before it (they
    /// are kept for that), and if none restores the start is refused.
    pub(crate) fn load(dir: &Path, resume: bool) -> Result<Restored, IngestError> {
        let started = Instant::now();
        prepare_dir(dir)?;
        let snapshots_dir = dir.join(SNAPSHOTS_DIR);
        let mut engine = None;
        if resume && snapshots_dir.exists() {
            let store = SnapshotStore::open(&snapshots_dir)?;
            let mut failures = Vec::new();
            for stored in store.newest_first()? {
                let outcome = match stored.bytes {
                    Err(SnapshotStoreError::Io { source, .. }) => Err(Unusable::Read(source)),
                    Ok(bytes) => DiskIdStore::open(dir.join("dedupe"))
                        .map_err(|e| Unusable::Dedupe(e.to_string()))
                        .and_then(|ids| {
                            Engine::restore(&bytes, Box::new(ids)).map_err(|e| match e {
                                flowcap_engine::EngineError::Snapshot(e) => Unusable::Snapshot(e),
                                other => Unusable::Dedupe(other.to_string()),
                            })
                        }),
                };
                match outcome {
                    Ok(restored) => {
                        tracing::info!(seq = stored.seq, "resuming from snapshot");
                        engine = Some(restored);
                        break;
                    }
                    Err(why) => {
                        tracing::warn!(
                            snapshot = %stored.path.display(),
                            error = %why,
                            "snapshot unusable, trying an older one"
                        );
                        failures.push(SnapshotFailure {
                            path: stored.path,
                            why,
                        });
                    }
                }
            }
            if engine.is_none() && !failures.is_empty() {
                failures.reverse(); // oldest first, as listed on disk
                return Err(IngestError::NoUsableSnapshot {
                    dir: dir.to_owned(),
                    failures,
                });
            }
        }
        Ok(Restored {
            dir: dir.to_owned(),
            resume,
            engine,
            started,
        })
    }

    /// The positions the restored snapshot recorded (none when starting
    /// empty).
    pub(crate) fn positions(&self) -> Option<&BTreeMap<String, i64>> {
        self.engine.as_ref().map(Engine::positions)
    }
}

/// The parts every driver shares: the restored (or new) engine on its
/// shards, the writer thread, the snapshot store and the barrier protocol.
/// A driver feeds inputs with sequence numbers and calls
/// [`Pipeline::snapshot`]; the transport (files, Kafka) is its business.
pub(crate) struct Pipeline {
    pub(crate) sharded: ShardedEngine,
    pub(crate) side: Sender<Side>,
    /// Letters of [`Pipeline::side_later`] not sent yet.
    letters: Vec<Side>,
    writer_thread: std::thread::JoinHandle<Result<Summary, String>>,
    store: SnapshotStore,
    /// Sequence number of the last input the restored snapshot covers.
    pub(crate) resumed_after: Option<u64>,
    /// Positions recorded in the restored snapshot.
    pub(crate) restored_positions: BTreeMap<String, i64>,
    pub(crate) snapshots: u64,
    started: Instant,
    /// History on: snapshots send the writer a [`HistoryCut`].
    history: bool,
    /// Local day of the last `cards` dump.
    cards_day: Option<i64>,
    /// Dump every card at the next snapshot (the last one of a run).
    pub(crate) dump_cards: bool,
    /// Rule notification delivery, when on.
    notifier: Option<Arc<Notifier>>,
    /// How long `finish` waits for queued notifications.
    drain_timeout: Duration,
    /// The snapshot being committed by the writer: its sequence number
    /// and the answer to wait for.
    committing: Option<(u64, Receiver<Result<(), String>>)>,
}

impl Pipeline {
    /// Starts from the snapshot [`Restored::load`] restored (a driver
    /// reads its positions before it commits to running, see
    /// [`crate::files`] and [`crate::kafka`]), or empty, clearing the
    /// directory's state; rewinds the output files to the snapshot and
    /// starts the writer.
    pub(crate) fn start_from(
        restored: Restored,
        config: &EngineConfig,
        history: Option<&HistoryConfig>,
        notify: Option<&NotifyConfig>,
        kafka: Option<KafkaOut>,
    ) -> Result<Pipeline, IngestError> {
        let Restored {
            dir,
            resume,
            engine: restored,
            started,
        } = restored;
        let dir = dir.as_path();
        let snapshots_dir = dir.join(SNAPSHOTS_DIR);
        if restored.is_none() {
            clear_dir(dir)?;
            // The outbox survives a crash before the first snapshot: the
            // replay from the start fires the same executions, which it
            // recognises. Only starting over on purpose drops it.
            let outbox = dir.join(OUTBOX_DIR);
            if !resume && outbox.exists() {
                std::fs::remove_dir_all(&outbox).map_err(|source| IngestError::Directory {
                    path: outbox.clone(),
                    source,
                })?;
            }
            let alerts = dir.join(ALERTS_FILE);
            if !resume && alerts.exists() {
                std::fs::remove_file(&alerts).map_err(|source| IngestError::Directory {
                    path: alerts.clone(),
                    source,
                })?;
            }
        }
        let store = SnapshotStore::open(&snapshots_dir)?;
        // The driver's own position, not the engine's: inputs that never
        // reach the engine (lines that do not decode) are covered too.
        let resumed_after = restored.as_ref().and_then(|e| {
            e.positions()
                .get(INPUT_POSITION)
                .and_then(|p| u64::try_from(*p).ok())
                .or_else(|| e.last_seq())
        });
        let engine = match restored {
            Some(engine) => engine,
            None => Engine::with_id_store(
                config.clone(),
                Box::new(DiskIdStore::open(dir.join("dedupe"))?),
            ),
        };
        let restored_positions = if resumed_after.is_some() {
            engine.positions().clone()
        } else {
            BTreeMap::new()
        };
        let mut sinks = BTreeMap::new();
        for name in FILES {
            let rewind = restored_positions
                .get(&format!("out.{name}"))
                .map(|len| u64::try_from(*len).unwrap_or(0));
            sinks.insert(name, JsonlSink::open(dir.join(name), rewind)?);
        }
        let history_writer = match history {
            Some(h) => Some(HistoryWriter::open(
                h.location_in(dir),
                resumed_after,
                HistoryOptions {
                    calendar: engine.config().calendar,
                    roll_rows: h.roll_rows.max(1),
                    compaction: h.compaction,
                    zstd_level: h.zstd_level,
                    ..HistoryOptions::default()
                },
            )?),
            None => None,
        };
        let history = history_writer.is_some();
        let reported = crate::notify::reported(&restored_positions);
        let notifier = match notify {
            Some(config) => {
                let alerts = kafka.as_ref().map(|k| crate::notify::AlertTopic {
                    config: k.producer_config.clone(),
                    topic: k.actions.clone(),
                });
                Some(crate::notify::start(
                    dir, config, &engine, &reported, alerts,
                )?)
            }
            None => None,
        };
        let writer = Writer {
            sinks,
            history: history_writer,
            summary: Summary::default(),
            kafka,
            metrics: OutputMetrics::new(),
            notifier: notifier.clone(),
            reported,
            store: Arc::new(SnapshotStore::open(&snapshots_dir)?),
            last_cut: None,
            commit: None,
        };
        let (sharded, outputs) = ShardedEngine::start(engine, 64);
        let (side, side_rx) = bounded::<Side>(1024);
        let writer_thread = std::thread::Builder::new()
            .name("flowcap-writer".into())
            .spawn(move || {
                let result = run_writer(writer, outputs, side_rx);
                // The pipeline only sees a closed channel ("writer is
                // gone"): the cause is logged here.
                if let Err(e) = &result {
                    tracing::error!(error = %e, "output writer stopped");
                }
                result
            })
            .map_err(|e| IngestError::Writer(e.to_string()))?;
        Ok(Pipeline {
            sharded,
            side,
            letters: Vec::new(),
            writer_thread,
            store,
            resumed_after,
            restored_positions,
            snapshots: 0,
            started,
            history,
            cards_day: None,
            dump_cards: false,
            notifier,
            drain_timeout: Duration::from_millis(notify.map_or(0, |n| n.drain_timeout_ms)),
            committing: None,
        })
    }

    /// Sends a side output (dead letter, bad command) to the writer.
    pub(crate) fn side(&self, side: Side) -> Result<(), IngestError> {
        let side = self.stamped(side);
        self.send_side(side)
    }

    /// Like [`Pipeline::side`], but kept until [`Pipeline::flush_side`]
    /// (a driver calls it after each batch of inputs) or the next cut,
    /// barrier or finish, which flush first: a letter always reaches the
    /// writer before anything that follows it.
    pub(crate) fn side_later(&mut self, side: Side) {
        let side = self.stamped(side);
        self.letters.push(side);
    }

    /// Sends the letters kept by [`Pipeline::side_later`], in one message.
    pub(crate) fn flush_side(&mut self) -> Result<(), IngestError> {
        if self.letters.is_empty() {
            return Ok(());
        }
        let letters = std::mem::take(&mut self.letters);
        self.send_side(Side::Letters(letters))
    }

    /// `side` with the router's event clock (it names the history
    /// partition of a letter).
    fn stamped(&self, mut side: Side) -> Side {
        let now = self.sharded.clock();
        if let Side::DeadLetter { clock, .. } | Side::BadCommand { clock, .. } = &mut side {
            *clock = now;
        }
        side
    }

    fn send_side(&self, side: Side) -> Result<(), IngestError> {
        self.side
            .send(side)
            .map_err(|_| IngestError::Writer("writer is gone".into()))
    }

    /// Takes a snapshot covering inputs through `last_seq` and waits until
    /// it is durable (see [`Pipeline::begin_snapshot`]). Returns the wall
    /// time it took.
    pub(crate) fn snapshot(
        &mut self,
        last_seq: Option<u64>,
        positions: &BTreeMap<String, i64>,
    ) -> Result<Duration, IngestError> {
        let started = Instant::now();
        self.begin_snapshot(last_seq, positions)?;
        self.wait_snapshot()?;
        Ok(started.elapsed())
    }

    /// The cut of a snapshot covering inputs through `last_seq` (see the
    /// module docs): every shard home, every output so far handed to the
    /// writer and its length recorded, then the engine with `positions`
    /// and those lengths encoded and handed to the writer, which writes it
    /// once everything before the cut is durable. Waits for the previous
    /// snapshot's commit first. Returns how long inputs were held.
    pub(crate) fn begin_snapshot(
        &mut self,
        last_seq: Option<u64>,
        positions: &BTreeMap<String, i64>,
    ) -> Result<Duration, IngestError> {
        // Letters of the inputs before the cut go before it.
        self.flush_side()?;
        let Some(seq) = last_seq else {
            return Ok(Duration::ZERO);
        };
        // The inputs are held from here: waiting for the previous commit
        // (when snapshots come faster than the writer commits them) is part
        // of the pause.
        let waiting = Instant::now();
        self.wait_snapshot()?;
        let started = Instant::now();
        let waited = started - waiting;
        // Whichever snapshot a restart falls back to keeps every history
        // file up to the oldest one kept: those may be merged.
        let compact_through = if self.history {
            self.store.list()?.first().map(|(seq, _)| *seq)
        } else {
            None
        };
        let engine = self.sharded.engine();
        let recalled = started.elapsed();
        // The cards dump (once per event day) is built from the state's
        // copy on a thread of its own: built here, it held the inputs
        // ~0.6 µs a card (80 ms at 100k cards, seconds at 10M).
        let mut views_to = None;
        let cut = self.history.then(|| {
            let clock = engine.clock();
            let day = engine.config().calendar.local_day(clock);
            let cards = (self.dump_cards || self.cards_day != Some(day)).then(|| {
                self.cards_day = Some(day);
                let (views, dump) = CardsDump::later();
                views_to = Some(views);
                dump
            });
            Box::new(HistoryCut {
                through: seq,
                clock,
                pools: engine.pool_views(),
                cards,
                compact_through,
            })
        });
        let viewed = started.elapsed();
        let (reply_tx, reply_rx) = bounded(1);
        self.side
            .send(Side::Cut(reply_tx, seq, cut))
            .map_err(|_| IngestError::Writer("writer is gone".into()))?;
        let lengths = reply_rx
            .recv()
            .map_err(|_| IngestError::Writer("writer did not answer the snapshot cut".into()))?
            .map_err(IngestError::Writer)?;
        for (name, len) in lengths {
            engine.set_position(name, i64::try_from(len).unwrap_or(i64::MAX));
        }
        for (name, position) in positions {
            engine.set_position(name.clone(), *position);
        }
        engine.set_position(INPUT_POSITION, i64::try_from(seq).unwrap_or(i64::MAX));
        let writer_done = started.elapsed();
        let (state, dedupe) = engine.snapshot_durable_later()?;
        let state = Arc::new(state);
        if let Some(views_to) = views_to {
            let copy = Arc::clone(&state);
            // At normal priority, as when the inputs waited for it: the
            // history's encoder waits for these views and the writer for
            // the encoder (at nice 10, a 2M-record backlog ran ~8 % slower,
            // BENCHMARKS §8). A failed spawn drops the sender: the dump,
            // and so this snapshot's commit, fails.
            let spawned = std::thread::Builder::new()
                .name("flowcap-cards".into())
                .spawn(move || {
                    let building = Instant::now();
                    let views = copy.card_views();
                    tracing::debug!(
                        seq,
                        cards = views.len(),
                        build_ms = ms(building.elapsed()),
                        since_cut_ms = ms(started.elapsed()),
                        "cards dump built"
                    );
                    let _ = views_to.send(views);
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "could not start the cards dump's thread");
            }
        }
        let (done, done_rx) = bounded(1);
        self.side
            .send(Side::Commit(Commit {
                seq,
                state,
                dedupe,
                started,
                done,
            }))
            .map_err(|_| IngestError::Writer("writer is gone".into()))?;
        self.committing = Some((seq, done_rx));
        let held = waiting.elapsed();
        tracing::debug!(
            seq,
            wait_ms = ms(waited),
            recall_ms = ms(recalled),
            views_ms = ms(viewed - recalled),
            writer_ms = ms(writer_done - viewed),
            copy_ms = ms(held - waited - writer_done),
            "snapshot cut"
        );
        metrics::snapshot_paused(held);
        Ok(held)
    }

    /// True while a snapshot is being committed; never waits.
    pub(crate) fn snapshot_pending(&mut self) -> Result<bool, IngestError> {
        let Some((_, done)) = &self.committing else {
            return Ok(false);
        };
        match done.try_recv() {
            Ok(result) => {
                self.finish_commit(result)?;
                Ok(false)
            }
            Err(crossbeam_channel::TryRecvError::Empty) => Ok(true),
            Err(crossbeam_channel::TryRecvError::Disconnected) => Err(IngestError::Writer(
                "writer stopped before writing the snapshot".into(),
            )),
        }
    }

    /// Waits until the snapshot being committed (if any) is written.
    pub(crate) fn wait_snapshot(&mut self) -> Result<(), IngestError> {
        let Some((_, done)) = &self.committing else {
            return Ok(());
        };
        let result = done.recv().map_err(|_| {
            IngestError::Writer("writer stopped before writing the snapshot".into())
        })?;
        self.finish_commit(result)
    }

    fn finish_commit(&mut self, result: Result<(), String>) -> Result<(), IngestError> {
        let seq = self.committing.take().map(|(seq, _)| seq);
        result.map_err(IngestError::Writer)?;
        self.snapshots += 1;
        tracing::debug!(seq, "snapshot committed");
        Ok(())
    }

    /// Waits (up to the drain timeout) for the notifications queued so far,
    /// so that their outcomes join the history at the next snapshot: the
    /// writer first takes every output already produced and makes the
    /// outbox durable.
    pub(crate) fn settle_notifications(&mut self) -> Result<(), IngestError> {
        let Some(n) = self.notifier.clone() else {
            return Ok(());
        };
        self.wait_snapshot()?;
        self.flush_side()?;
        self.sharded.engine();
        let (reply_tx, reply_rx) = bounded(1);
        self.side
            .send(Side::Barrier(reply_tx))
            .map_err(|_| IngestError::Writer("writer is gone".into()))?;
        reply_rx
            .recv()
            .map_err(|_| IngestError::Writer("writer did not answer the barrier".into()))?
            .map_err(IngestError::Writer)?;
        n.drain(self.drain_timeout)
            .map_err(|e| IngestError::Writer(e.to_string()))?;
        Ok(())
    }

    /// Stops the shards and the writer; the summary and the final engine.
    pub(crate) fn finish(mut self) -> Result<(Summary, Engine), IngestError> {
        self.wait_snapshot()?;
        self.flush_side()?;
        let engine = self.sharded.finish();
        drop(self.side);
        let mut summary = self
            .writer_thread
            .join()
            .map_err(|_| IngestError::Writer("writer thread panicked".into()))?
            .map_err(IngestError::Writer)?;
        for view in engine.card_views() {
            *summary
                .cards_by_state
                .entry(view.state.as_str().to_owned())
                .or_default() += 1;
        }
        if let Some(n) = self.notifier {
            let totals = n
                .drain(self.drain_timeout)
                .map_err(|e| IngestError::Writer(e.to_string()))?;
            if totals.pending > 0 {
                tracing::warn!(
                    pending = totals.pending,
                    "notifications still undelivered; the next run on this directory sends them"
                );
            }
            summary.notifications = Some(totals);
        }
        summary.resumed_after_seq = self.resumed_after;
        summary.snapshots = self.snapshots;
        summary.elapsed_secs = self.started.elapsed().as_secs_f64();
        Ok((summary, engine))
    }
}

/// Milliseconds, for logs.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs the embedded pipeline over `inputs` (sequence number = position;
/// on resume, inputs up to the snapshot's are skipped: the generator's
/// input is the same sequence every time). Returns the summary and the
/// final engine (for queries and checks). Files are read by
/// [`crate::files::run`], which knows them by identity instead.
pub fn run(
    options: &EmbeddedOptions,
    inputs: impl IntoIterator<Item = Input>,
    progress: &mut dyn FnMut(Progress),
) -> Result<(Summary, Engine), IngestError> {
    let restored = Restored::load(&options.out_dir, options.resume)?;
    let segment = Segment {
        first_seq: Some(0),
        inputs: Box::new(inputs.into_iter()),
        positions: Box::new(|_, _| BTreeMap::new()),
    };
    drive(options, restored, vec![segment], progress)
}

/// Where a part of the input goes in the sequence and what a snapshot
/// inside it records.
pub(crate) struct Segment<'a> {
    /// The sequence number of its first input; `None`: right after the
    /// inputs before it (or the snapshot resumed from).
    pub(crate) first_seq: Option<u64>,
    /// Its inputs, in order.
    pub(crate) inputs: Box<dyn Iterator<Item = Input> + 'a>,
    /// The positions a snapshot records while in it, given its first
    /// sequence number and whether every input of it is covered.
    #[allow(clippy::type_complexity)]
    pub(crate) positions: Box<dyn Fn(u64, bool) -> BTreeMap<String, i64> + 'a>,
}

/// Feeds `segments` one after the other through the pipeline started from
/// `restored`: inputs a snapshot covers already are skipped, a snapshot is
/// taken every `snapshot_every` inputs and at the end (when anything was
/// read).
pub(crate) fn drive(
    options: &EmbeddedOptions,
    restored: Restored,
    segments: Vec<Segment<'_>>,
    progress: &mut dyn FnMut(Progress),
) -> Result<(Summary, Engine), IngestError> {
    let started = Instant::now();
    let dir = &options.out_dir;
    let mut pipeline = Pipeline::start_from(
        restored,
        &options.engine,
        options.history.as_ref(),
        options.notify.as_ref(),
        None,
    )?;
    let resumed_after = pipeline.resumed_after;
    let driver_metrics = DriverMetrics::new(options.source, pipeline.sharded.shard_count());
    let mut since_snapshot = 0u64;
    let mut last_seq: Option<u64> = resumed_after;
    let mut next_seq = resumed_after.map_or(0, |s| s + 1);
    let mut read = 0u64;
    let mut processed = 0u64;
    let mut positions = BTreeMap::new();
    metrics::pipeline_started();
    if let Some(health) = &options.health {
        health.set_ready();
    }
    for segment in segments {
        let first_seq = segment.first_seq.unwrap_or(next_seq);
        let open = (segment.positions)(first_seq, false);
        let mut inputs = segment.inputs.peekable();
        let mut seq = first_seq;
        let mut entered = false;
        while let Some(input) = inputs.next() {
            let this = seq;
            seq += 1;
            read += 1;
            if options.progress_every > 0 && read.is_multiple_of(options.progress_every) {
                progress(Progress {
                    inputs: read,
                    elapsed_secs: started.elapsed().as_secs_f64(),
                });
            }
            if read.is_multiple_of(metrics::SAMPLE_EVERY) {
                let depths = pipeline.sharded.queue_depths();
                driver_metrics.sample(
                    &depths,
                    pipeline.sharded.card_count(),
                    pipeline.sharded.clock(),
                );
            }
            if resumed_after.is_some_and(|s| this <= s) {
                continue;
            }
            feed(&mut pipeline, &driver_metrics, options, this, input)?;
            if !entered {
                entered = true;
                positions.clone_from(&open);
            }
            processed += 1;
            last_seq = Some(this);
            since_snapshot += 1;
            if options.snapshot_every > 0 && since_snapshot >= options.snapshot_every {
                if inputs.peek().is_none() {
                    positions = (segment.positions)(first_seq, true);
                }
                // Committed while the next inputs flow.
                pipeline.begin_snapshot(last_seq, &positions)?;
                since_snapshot = 0;
            }
        }
        if entered {
            positions = (segment.positions)(first_seq, true);
        }
        next_seq = next_seq.max(seq);
    }
    // Recalling the shards brings every one up to the final clock
    // (deadlines, rollovers); their outputs go through the writer.
    pipeline.sharded.engine();
    pipeline.dump_cards = true;
    pipeline.wait_snapshot()?;
    if since_snapshot > 0 {
        // Delivered before the last snapshot, so their outcomes are in it.
        // (A run with no new input takes no snapshot: outcomes it reaches
        // join the history at the next run's first snapshot.)
        pipeline.settle_notifications()?;
        pipeline.snapshot(last_seq, &positions)?;
    }
    driver_metrics.sample(
        &pipeline.sharded.queue_depths(),
        pipeline.sharded.card_count(),
        pipeline.sharded.clock(),
    );
    let (mut summary, engine) = pipeline.finish()?;
    summary.inputs = processed;
    summary.inputs_per_sec = summary.inputs as f64 / summary.elapsed_secs.max(1e-9);
    summary.out_dir = dir.clone();
    Ok((summary, engine))
}

/// One input into the pipeline at `seq`.
fn feed(
    pipeline: &mut Pipeline,
    driver_metrics: &DriverMetrics,
    options: &EmbeddedOptions,
    seq: u64,
    input: Input,
) -> Result<(), IngestError> {
    let (bytes, received) = match options.sizes.check(input) {
        Input::Record(bytes) => (bytes, None),
        Input::ReceivedRecord(bytes, received) => (bytes, Some(received)),
        Input::Command(bytes) => return run_command(pipeline, bytes, None, seq),
        Input::ReceivedCommand(bytes, received) => {
            return run_command(pipeline, bytes, Some(received), seq)
        }
        Input::Oversized(input) => {
            if input.kind == InputKind::Record {
                driver_metrics.record_in();
            }
            return pipeline.side(Side::too_large(seq, input, None));
        }
    };
    driver_metrics.record_in();
    match decode_json(&bytes, &options.limits) {
        Ok(usage) => {
            if let Some(r) = pipeline
                .sharded
                .process_usage_received(&usage, received, seq)?
            {
                pipeline.side(Side::rejected(r, bytes, None))?;
            }
        }
        Err(e) => pipeline.side(Side::undecodable(seq, &e, bytes, None))?,
    }
    Ok(())
}

/// Parses and runs one command line: a line that does not parse is
/// answered (journal, dead letter) without reaching the engine.
fn run_command(
    pipeline: &mut Pipeline,
    bytes: Vec<u8>,
    received: Option<Timestamp>,
    seq: u64,
) -> Result<(), IngestError> {
    match parse_command(&bytes) {
        Ok(command) => {
            pipeline
                .sharded
                .process_command_received(command, received, seq);
            Ok(())
        }
        Err(error) => pipeline.side(Side::bad_command(seq, error, bytes, None)),
    }
}

/// The `id` of a command that did not parse, if it has one.
fn command_id_of(bytes: &[u8]) -> CommandId {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| v.get("id").and_then(|id| id.as_str()).map(CommandId::from))
        .unwrap_or_else(|| CommandId::from(""))
}

#[cfg(test)]
mod tests {
    use flowcap_engine::command::{CardResult, CommandError, ErrorCode};
    use flowcap_engine::dedupe::DurabilitySettler;
    use flowcap_engine::Iccid;

    use super::*;

    /// A writer with no outputs, history, broker or notifier (only a
    /// snapshot store in a temporary directory), committing an empty
    /// engine's state at `seq` whose dedupe ids are durable once the
    /// returned settler says so; and the commit's `done` channel.
    fn pending_commit(
        seq: u64,
    ) -> (
        tempfile::TempDir,
        Writer,
        DurabilitySettler,
        Receiver<Result<(), String>>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = Writer {
            sinks: BTreeMap::new(),
            history: None,
            summary: Summary::default(),
            kafka: None,
            metrics: OutputMetrics::new(),
            notifier: None,
            reported: BTreeMap::new(),
            store: Arc::new(SnapshotStore::open(dir.path()).unwrap()),
            last_cut: None,
            commit: None,
        };
        let (dedupe, settler) = Durability::pending();
        let (state, _) = Engine::new(EngineConfig::default())
            .snapshot_durable_later()
            .unwrap();
        let (done, done_rx) = bounded(1);
        writer
            .begin_commit(Commit {
                seq,
                state: Arc::new(state),
                dedupe,
                started: Instant::now(),
                done,
            })
            .unwrap();
        (dir, writer, settler, done_rx)
    }

    /// The snapshot of a cut is written only once the dedupe ids before
    /// the cut are durable: a snapshot published before them would, after
    /// a crash, skip inputs whose ids the cold index never stored, so a
    /// resend of them would count twice.
    #[test]
    fn a_commit_waits_for_the_dedupe_ids_of_its_cut() {
        let (_dir, mut writer, settler, done) = pending_commit(5);
        for _ in 0..3 {
            assert!(!writer.advance_commit(false).unwrap());
            std::thread::sleep(Duration::from_millis(30));
        }
        assert!(
            done.try_recv().is_err(),
            "written before the ids were durable"
        );
        assert!(writer.store.list().unwrap().is_empty());

        settler.settle(Ok(()));
        assert!(writer.advance_commit(false).unwrap());
        done.recv_timeout(Duration::from_secs(30)).unwrap().unwrap();
        let written: Vec<u64> = writer
            .store
            .list()
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(written, [5]);
    }

    /// Ids that could not be made durable fail the commit: no snapshot.
    #[test]
    fn a_commit_whose_dedupe_ids_failed_writes_no_snapshot() {
        let (_dir, mut writer, settler, done) = pending_commit(9);
        settler.settle(Err("disk full".into()));
        assert!(writer.advance_commit(true).is_err());
        assert!(done.recv_timeout(Duration::from_secs(30)).unwrap().is_err());
        assert!(writer.store.list().unwrap().is_empty());
    }

    /// A dead letter is bounded whatever the input: its raw keeps at most
    /// `RAW_KEPT` bytes, marked truncated with the full length; under a
    /// producer limit the whole envelope fits it, even when every byte
    /// takes six as JSON; the same input gives the same bytes.
    #[test]
    fn dead_letters_are_bounded_and_fit_the_producer_limit() {
        let source = SourcePosition {
            topic: "flowcap.usage".into(),
            partition: 3,
            offset: 42,
            timestamp_ms: Some(1),
        };
        let raw = vec![1u8; 1_200_000];
        let long_message = "m".repeat(10_000);
        let letter = |budget| {
            let (letter, kept) = DeadLetter::bounded(
                7,
                "not_json",
                &long_message,
                None,
                None,
                Some(&source),
                &raw,
                raw.len() as u64,
                budget,
            )
            .unwrap();
            (serde_json::to_vec(&letter).unwrap(), kept.len())
        };
        let (file, kept) = letter(None);
        assert_eq!(kept, RAW_KEPT);
        let v: serde_json::Value = serde_json::from_slice(&file).unwrap();
        assert_eq!(v["raw_truncated"], true);
        assert_eq!(v["raw_len"], 1_200_000);
        assert_eq!(v["message"].as_str().unwrap().len(), MESSAGE_KEPT);
        assert_eq!(v["raw"].as_str().unwrap().len(), RAW_KEPT);

        let (kafka, kept) = letter(Some(100_000));
        assert!(kafka.len() <= 100_000 - DLQ_HEADROOM, "{}", kafka.len());
        assert!(kept > 0 && kept < RAW_KEPT, "{kept}");
        assert_eq!(letter(Some(100_000)).0, kafka, "not the same bytes");

        // A small input is kept whole and not marked.
        let (small, _) = DeadLetter::bounded(
            1,
            "not_json",
            "bad",
            None,
            None,
            None,
            b"\xff\x00",
            2,
            Some(1_000_000),
        )
        .unwrap();
        let v = serde_json::to_value(&small).unwrap();
        assert_eq!(v["raw_hex"], "ff00");
        assert!(v.get("raw_truncated").is_none() && v.get("raw_len").is_none());
    }

    /// Every file and directory under `dir`, with the files' bytes.
    fn tree(dir: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
        let mut found = BTreeMap::new();
        let mut stack = vec![dir.to_owned()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).unwrap() {
                let path = entry.unwrap().path();
                let rel = path.strip_prefix(dir).unwrap().to_owned();
                if path.is_dir() {
                    found.insert(rel, None);
                    stack.push(path);
                } else {
                    found.insert(rel, Some(std::fs::read(&path).unwrap()));
                }
            }
        }
        found
    }

    /// A card set up and 11 records for it, a snapshot every 3 inputs.
    fn small_run(options: &EmbeddedOptions) -> Result<(Summary, Engine), IngestError> {
        let iccid = "89860312345678901234";
        let mut inputs = vec![
            Input::Command(br#"{"id":"c1","type":"upsert_plan","at":"2026-11-01T00:00:00+08:00","plan":{"id":"ct-30","carrier":"ctcc","allowance_mb":30,"traffic":"directed"}}"#.to_vec()),
            Input::Command(format!(r#"{{"id":"c2","type":"upsert_card","at":"2026-11-01T00:00:00+08:00","card":{{"iccid":"{iccid}","carrier":"ctcc","plan":"ct-30","state":"active"}}}}"#).into_bytes()),
        ];
        for i in 0..11 {
            inputs.push(Input::Record(format!(
                r#"{{"record_id":"r{i}","iccid":"{iccid}","end":"2026-11-01T0{}:00:00+08:00","bytes_up":1000,"bytes_down":0}}"#,
                i % 9 + 1
            ).into_bytes()));
        }
        run(options, inputs, &mut |_| {})
    }

    fn small_options(dir: &Path) -> EmbeddedOptions {
        EmbeddedOptions {
            snapshot_every: 3,
            notify: None,
            ..EmbeddedOptions::new(dir)
        }
    }

    /// With snapshots present and none usable (one corrupt, one of an
    /// older format version, one unreadable), the start is refused with
    /// each named and why, and no file under the directory changes; only
    /// starting over on purpose (`resume: false`) clears it.
    #[test]
    fn no_usable_snapshot_refuses_to_start_and_changes_nothing() {
        use flowcap_engine::snapshot::SnapshotError;
        let dir = tempfile::tempdir().unwrap();
        let options = small_options(dir.path());
        small_run(&options).unwrap();
        let store = SnapshotStore::open(dir.path().join(SNAPSHOTS_DIR)).unwrap();
        let files: Vec<PathBuf> = store.list().unwrap().into_iter().map(|(_, p)| p).collect();
        assert_eq!(files.len(), 3, "{files:?}");
        let mut bytes = std::fs::read(&files[0]).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&files[0], bytes).unwrap();
        let mut bytes = std::fs::read(&files[1]).unwrap();
        bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
        std::fs::write(&files[1], bytes).unwrap();
        std::fs::remove_file(&files[2]).unwrap();
        std::fs::create_dir(&files[2]).unwrap();
        let before = tree(dir.path());

        let err = small_run(&options).map(|_| ()).unwrap_err();
        let IngestError::NoUsableSnapshot { failures, .. } = &err else {
            panic!("{err}");
        };
        let paths: Vec<&PathBuf> = failures.iter().map(|f| &f.path).collect();
        assert_eq!(paths, files.iter().collect::<Vec<_>>());
        assert!(matches!(
            failures[0].why,
            Unusable::Snapshot(SnapshotError::Checksum)
        ));
        assert!(matches!(
            failures[1].why,
            Unusable::Snapshot(SnapshotError::Version {
                found: 1,
                readable: flowcap_engine::snapshot::SNAPSHOT_VERSION
            })
        ));
        assert!(matches!(failures[2].why, Unusable::Read(_)));
        let text = err.to_string();
        assert!(text.contains("--fresh"), "{text}");
        assert!(before == tree(dir.path()), "a file changed");

        let fresh = EmbeddedOptions {
            resume: false,
            ..small_options(dir.path())
        };
        std::fs::remove_dir(&files[2]).unwrap();
        let (summary, _) = small_run(&fresh).unwrap();
        assert_eq!(summary.counted, 11);
    }

    /// A snapshot that fails is skipped for an older one (kept for that).
    #[test]
    fn a_corrupt_newest_snapshot_falls_back_to_the_one_before() {
        let dir = tempfile::tempdir().unwrap();
        let options = small_options(dir.path());
        small_run(&options).unwrap();
        let store = SnapshotStore::open(dir.path().join(SNAPSHOTS_DIR)).unwrap();
        let (newest_seq, newest) = store.list().unwrap().pop().unwrap();
        std::fs::write(&newest, b"FLOWCAPS").unwrap();
        let restored = Restored::load(dir.path(), true).unwrap();
        let engine = restored.engine.unwrap();
        let seq = engine.positions()[INPUT_POSITION];
        assert!(u64::try_from(seq).unwrap() < newest_seq);
    }

    /// A batch of 100,000 cards with 3,000 failures: the results-topic
    /// message counts the successes, lists the first 1,000 failures, and
    /// stays far under librdkafka's 1 MB message limit; a bad command's
    /// raw text is cut at 64 KiB on a character boundary.
    #[test]
    fn result_messages_stay_small_whatever_the_batch() {
        let results: Vec<CardResult> = (0..100_000u64)
            .map(|k| CardResult {
                iccid: Iccid::parse(&format!("8986010000{k:010}")).unwrap(),
                ok: k % 100 >= 3,
                error: (k % 100 < 3)
                    .then(|| CommandError::new(ErrorCode::UnknownCard, "no such card")),
            })
            .collect();
        let result = CommandResult {
            command_id: CommandId("batch-1".into()),
            ok: false,
            error: None,
            results,
        };
        let message = ResultMessage::new(7, &result, false, None);
        assert_eq!((message.cards_ok, message.cards_failed), (97_000, 3_000));
        assert_eq!(message.failed.len(), RESULT_MESSAGE_FAILED_CARDS);
        assert!(message.failed_truncated);
        let bytes = serde_json::to_vec(&message).unwrap();
        assert!(bytes.len() < 200_000, "{} bytes", bytes.len());
        assert!(serde_json::to_vec(&result).unwrap().len() > 1_000_000);

        let raw = "é".repeat(40_000); // 80,000 bytes, 2 bytes a character
        let bad = CommandResult::rejected(
            CommandId("bad".into()),
            CommandError::new(ErrorCode::Malformed, "not JSON"),
        );
        let message = ResultMessage::new(8, &bad, false, Some(&raw));
        let cut = message.raw.unwrap();
        assert!(message.raw_truncated);
        assert_eq!(cut.len(), RESULT_MESSAGE_RAW_BYTES);
        assert!(raw.starts_with(cut));
        let small = ResultMessage::new(9, &bad, true, Some("{}"));
        assert!(!small.raw_truncated && small.repeat);
    }
}
