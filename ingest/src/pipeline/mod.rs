//! The pipeline every driver shares: the engine on its shards, the writer
//! thread that owns every output, and the snapshot protocol that lets a
//! crash rewind exactly. The drivers ([`crate::embedded`], [`crate::files`],
//! [`crate::kafka`]) read inputs, number them and say when to snapshot;
//! what must stay consistent across a crash is here, once, so the modes
//! cannot drift apart.
//!
//! ```text
//!  driver (seq) --decode--> ShardedEngine --outputs--> writer thread --> files,
//!     |                                                 ^   ^             history, Kafka
//!     \--letters (dead letters, bad commands) ----------/   |
//!     \--control (barrier, cut, commit) --------------------/
//! ```
//!
//! Every input has a sequence number (its position in the input, or in
//! Kafka mode its place in the order log). When the driver asks (every
//! `snapshot_every` inputs, and at the end), the pipeline takes a snapshot
//! in two phases. The *cut* holds the inputs back:
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
//! Metrics ([`crate::metrics`]): the writer counts what it writes, the
//! snapshot code times the cut and the commit.
//!
//! - `writer`: the writer thread, the only one that writes outputs.
//! - `snapshot`: the cut and the commit, the driver's side and the
//!   writer's.
//! - `letters`: the shapes of dead letters and command results, bounded
//!   whatever the input.
//! - `restore`: finding the snapshot to resume from, or refusing to start.

mod letters;
mod restore;
mod snapshot;
mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use flowcap_clock::SharedClock;
use flowcap_engine::{Engine, EngineConfig, ShardedEngine};
use flowcap_storage::history::compact::CompactionPolicy;
use flowcap_storage::HistoryLocation;
use flowcap_storage::{
    DiskIdStore, HistoryError, HistoryOptions, HistoryWriter, JsonlError, JsonlSink, SnapshotStore,
    SnapshotStoreError,
};
use serde::Serialize;

use flowcap_delivery::{Notifier, NotifyConfig};

use crate::metrics::OutputMetrics;
use crate::requests::{DurableEvents, DurableMark};

pub(crate) use letters::Letter;
pub(crate) use restore::Restored;
use restore::{clear_dir, no_usable_snapshot, SNAPSHOTS_DIR};
pub use restore::{SnapshotFailure, Start, Unusable};
use snapshot::{Commit, HistoryCut};
pub(crate) use writer::KafkaOut;
pub use writer::WriteError;
use writer::{run_writer, Writer};

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
    /// The dedupe id store could not be opened.
    #[error("dedupe id store: {0}")]
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
    /// The output writer failed (external: disk, broker; see
    /// [`WriteError`]); it stops, and so does the pipeline.
    #[error("output writer stopped: {0}")]
    Writer(#[from] WriteError),
    /// The output writer thread is gone (it stopped after an error of its
    /// own, logged where it happened, or panicked: a bug); what the
    /// pipeline was doing when it found out.
    #[error("output writer stopped: {0}")]
    WriterGone(&'static str),
    /// A thread of the pipeline could not be started (external: the
    /// system's limits).
    #[error("starting the {name} thread: {source}")]
    Thread {
        /// The thread.
        name: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// Rule notification delivery could not start or drain (external:
    /// disk).
    #[error("notifications: {0}")]
    Notify(#[from] flowcap_delivery::DeliveryError),
    /// The producer of push-failure alerts could not be created (the
    /// user's producer properties).
    #[error("alert producer: {0}")]
    AlertProducer(rdkafka::error::KafkaError),
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
    /// Closed cycles' limits crossed within the lateness (`late_crossing`).
    pub late_crossings: u64,
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

/// Whether a step of the snapshot protocol waits for what is not durable
/// yet, or only looks and answers "not yet".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// Blocks until it is durable (or failed).
    Block,
    /// Never waits: what is pending stays pending.
    Poll,
}

/// Snapshot position: sequence number of the last input the snapshot covers.
const INPUT_POSITION: &str = "input.last_seq";
const FILES: [&str; 3] = [EVENTS_FILE, REJECTS_FILE, JOURNAL_FILE];

/// What a driver sends the writer besides the engine's outputs, on a
/// channel of its own: letters about inputs, or a step of the durability
/// protocol. Apart because the writer only writes letters, while a
/// control message is answered.
pub(crate) enum Side {
    /// Dead letters and bad commands, in input order; a batch of them
    /// ([`Pipeline::side_later`]) is one send and one wake-up of the
    /// writer, not one per letter.
    Letters(Vec<Letter>),
    /// A step of the snapshot protocol (see the module docs).
    Control(Control),
}

/// The writer's part in durability: each is answered.
pub(crate) enum Control {
    /// Make everything written so far durable (snapshots cut with
    /// [`Control::Cut`] instead).
    Barrier(Sender<Result<BTreeMap<String, u64>, WriteError>>),
    /// The first phase of a snapshot: close the window and the producer's
    /// epoch, answer with the output lengths at once (nothing waits for
    /// durability yet).
    Cut(
        Sender<Result<BTreeMap<String, u64>, WriteError>>,
        /// The last input the snapshot covers.
        u64,
        Option<Box<HistoryCut>>,
    ),
    /// The second phase: write the encoded snapshot once everything before
    /// the cut is durable.
    Commit(Commit),
}

/// The parts every driver shares: the restored (or new) engine on its
/// shards, the writer thread, the snapshot store and the barrier protocol.
/// A driver feeds inputs with sequence numbers and calls
/// [`Pipeline::snapshot`]; the transport (files, Kafka) is its business.
pub(crate) struct Pipeline {
    pub(crate) sharded: ShardedEngine,
    pub(crate) side: Sender<Side>,
    /// Letters of [`Pipeline::side_later`] not sent yet.
    letters: Vec<Letter>,
    writer_thread: std::thread::JoinHandle<Result<Summary, WriteError>>,
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
    committing: Option<(u64, Receiver<Result<(), WriteError>>)>,
    /// The events file's length at the cut of the snapshot being
    /// committed: durable once it is.
    committing_events: Option<u64>,
    /// Where durable events are published for the API, if it listens.
    durable: Option<DurableMark>,
}

impl Pipeline {
    /// Starts from the snapshot [`Restored::load`] restored (a driver
    /// reads its positions before it commits to running, see
    /// [`crate::files`] and [`crate::kafka`]), or empty, clearing the
    /// directory's state; rewinds the output files to the snapshot and
    /// starts the writer. `clock` is the time of day for every part.
    pub(crate) fn start_from(
        restored: Restored,
        config: &EngineConfig,
        history: Option<&HistoryConfig>,
        notify: Option<&NotifyConfig>,
        kafka: Option<KafkaOut>,
        clock: &SharedClock,
    ) -> Result<Pipeline, IngestError> {
        let Restored {
            dir,
            start,
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
            if start == Start::Fresh && outbox.exists() {
                std::fs::remove_dir_all(&outbox).map_err(|source| IngestError::Directory {
                    path: outbox.clone(),
                    source,
                })?;
            }
            let alerts = dir.join(ALERTS_FILE);
            if start == Start::Fresh && alerts.exists() {
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
            Some(h) => Some(
                HistoryWriter::open(
                    h.location_in(dir),
                    resumed_after,
                    HistoryOptions {
                        calendar: engine.config().calendar,
                        roll_rows: h.roll_rows.max(1),
                        compaction: h.compaction,
                        zstd_level: h.zstd_level,
                        ..HistoryOptions::default()
                    },
                )?
                .with_clock(clock.clone()),
            ),
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
                    dir,
                    config,
                    &engine,
                    &reported,
                    alerts,
                    clock.clone(),
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
            clock: clock.clone(),
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
            .map_err(|source| IngestError::Thread {
                name: "writer",
                source,
            })?;
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
            committing_events: None,
            durable: None,
        })
    }

    /// Publishes to `mark`, from now on, how much of the events file a
    /// committed snapshot covers: the restored snapshot's now, each
    /// commit's when it is written.
    pub(crate) fn publish_durable_events(&mut self, mark: DurableMark) {
        let restored = self.restored_positions.get(&format!("out.{EVENTS_FILE}"));
        if let (Some(seq), Some(&bytes)) = (self.resumed_after, restored) {
            mark.set(DurableEvents {
                bytes: u64::try_from(bytes).unwrap_or(0),
                seq,
            });
        }
        self.durable = Some(mark);
    }

    /// Sends a side output (dead letter, bad command) to the writer.
    pub(crate) fn side(&self, letter: Letter) -> Result<(), IngestError> {
        let letter = self.stamped(letter);
        self.send_side(Side::Letters(vec![letter]))
    }

    /// Like [`Pipeline::side`], but kept until [`Pipeline::flush_side`]
    /// (a driver calls it after each batch of inputs) or the next cut,
    /// barrier or finish, which flush first: a letter always reaches the
    /// writer before anything that follows it.
    pub(crate) fn side_later(&mut self, letter: Letter) {
        let letter = self.stamped(letter);
        self.letters.push(letter);
    }

    /// Sends the letters kept by [`Pipeline::side_later`], in one message.
    pub(crate) fn flush_side(&mut self) -> Result<(), IngestError> {
        if self.letters.is_empty() {
            return Ok(());
        }
        let letters = std::mem::take(&mut self.letters);
        self.send_side(Side::Letters(letters))
    }

    /// `letter` with the router's event clock (it names the history
    /// partition of a letter).
    fn stamped(&self, mut letter: Letter) -> Letter {
        let now = self.sharded.clock();
        let (Letter::DeadLetter { clock, .. } | Letter::BadCommand { clock, .. }) = &mut letter;
        *clock = now;
        letter
    }

    fn send_side(&self, side: Side) -> Result<(), IngestError> {
        self.side
            .send(side)
            .map_err(|_| IngestError::WriterGone("writer is gone"))
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
            .send(Side::Control(Control::Barrier(reply_tx)))
            .map_err(|_| IngestError::WriterGone("writer is gone"))?;
        reply_rx
            .recv()
            .map_err(|_| IngestError::WriterGone("writer did not answer the barrier"))??;
        n.drain(self.drain_timeout)?;
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
            .map_err(|_| IngestError::WriterGone("writer thread panicked"))??;
        for view in engine.card_views() {
            *summary
                .cards_by_state
                .entry(view.state.as_str().to_owned())
                .or_default() += 1;
        }
        if let Some(n) = self.notifier {
            let totals = n.drain(self.drain_timeout)?;
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
