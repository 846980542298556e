//! Parquet history: everything flowcap sees and decides, in tables an
//! analyst queries with SQL (the `flowcap-sql` crate) or reads with any Parquet
//! reader.
//!
//! # Layout
//!
//! ```text
//! <root>/<table>/date=YYYY-MM-DD/part-<from>-<chunk>.parquet
//! <root>/<table>/cycle=YYYY-MM/part-<from>-<chunk>.parquet
//! ```
//!
//! Hive-style partitions (UTC+8 calendar day, or billing cycle), zstd,
//! rows sorted by ICCID then time, statistics on, row groups of
//! [`HistoryOptions::row_group_rows`].
//!
//! # Exactly once, through crashes
//!
//! The pipeline's snapshots cut the input into *windows*: the inputs after
//! one snapshot through the next. Every file belongs to one window and is
//! named by the window's first input sequence number (`from`, 20 digits)
//! and a chunk number within it (rows are written when
//! [`HistoryOptions::roll_rows`] are buffered, and whatever is left when the
//! snapshot comes). A snapshot is written only after its window's files
//! are durable (written under a temporary name, fsynced, renamed, directory
//! fsynced). So after a crash, restoring the snapshot that covers inputs
//! through `S`:
//!
//! - every file with `from <= S` holds rows of inputs `<= S` only, and all
//!   of them: they stay;
//! - every file with `from > S` was written by the window the crash cut
//!   short: it is deleted ([`HistoryWriter::open`]) and the replay writes
//!   it again.
//!
//! So no `record_id` ever appears twice in `usage_records`, and readers
//! never see a half-written file (temporary names start with `.`, which
//! Hive-style readers skip).
//!
//! # Aggregates
//!
//! `card_daily_usage_parts` and `card_cycle_usage_parts` hold, per window,
//! the usage each card added to each day and cycle: a few rows per card
//! per window instead of one per record, so console queries never scan
//! raw records. They are written when the window closes (or earlier, with
//! a chunk, once they hold [`HistoryOptions::roll_rows`] entries). The
//! SQL views `card_daily_usage` and `card_cycle_usage` sum them. A late
//! record lands in its own (closed) day and cycle and is counted in
//! `late_records` / `late_bytes` there.
//! `pool_cycle_usage` and `cards` are written from the engine's state at
//! snapshots. `pool_cycle_usage` also gets each closed cycle's pool
//! totals the engine emits, at the rollover and (`final`) when the
//! allowed lateness has passed: written with their window, not as a dump,
//! so no later dump replaces them.

pub mod compact;
mod encoder;
mod recovery;
mod rows;
pub mod schema;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use flowcap_clock::{SharedClock, SystemClock};
use flowcap_engine::command::CommandResult;
use flowcap_engine::event::{Accounted, ActionEvent, Cause, PoolCycleTotal};
use flowcap_engine::{
    CardView, Carrier, Command, CycleCalendar, Iccid, PoolView, Reasons, Timestamp,
};
use flowcap_rules::message::DeliveryRow;
use flowcap_rules::ExecutionRecord;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::errors::ParquetError;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use serde::Serialize;

use crate::location::{HistoryFiles, HistoryLocation, LocationError, StoredFile};
use compact::{CompactionPolicy, CompactionStats, Compactor};
pub use encoder::{CardsDump, StoredTicket};
use encoder::{ChunkEncoder, ChunkRows, Room, Written};
use recovery::*;
use rows::*;
use schema::{Columns, Partitioning};

/// Errors of the history writer.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// Storing, listing or deleting a file failed.
    #[error(transparent)]
    Location(#[from] LocationError),
    /// Building a batch failed (a bug: the schemas are fixed).
    #[error("history batch: {0}")]
    Arrow(#[from] ArrowError),
    /// Writing or reading Parquet failed.
    #[error("history parquet {path}: {source}")]
    Parquet {
        /// The file, relative to the history root.
        path: String,
        /// The cause.
        source: ParquetError,
    },
    /// Compaction could not merge files.
    #[error("history compaction: {0}")]
    Compaction(String),
    /// A merged file covers windows both before and after the snapshot
    /// being restored: the snapshots it relied on were removed by hand.
    #[error(
        "history file {0} covers windows after the restored snapshot (through input {1}); \
         restore a newer snapshot or start without --resume"
    )]
    MergedPastSnapshot(String, u64),
    /// The thread that encodes chunks could not start (external: the
    /// system's limits).
    #[error("history encoder thread: {0}")]
    EncoderStart(#[source] std::io::Error),
    /// The thread that encodes chunks is gone (it panicked: a bug; its
    /// own errors are answered as they are).
    #[error("history encoder thread: the thread is gone")]
    EncoderStopped,
    /// A cards dump's views were to come from another thread
    /// ([`CardsDump`]), which stopped without sending them.
    #[error("history cards dump: the thread building the card views stopped before sending them")]
    CardViewsMissing,
    /// [`HistoryOptions::zstd_level`] is outside [`ZSTD_LEVELS`].
    #[error(
        "history zstd level {0}: levels are {low} to {high}",
        low = ZSTD_LEVELS.start(),
        high = ZSTD_LEVELS.end()
    )]
    ZstdLevel(i32),
}

/// How the writer sizes its files.
#[derive(Debug, Clone, Copy)]
pub struct HistoryOptions {
    /// Write a chunk when this many rows are buffered (all tables). Bounds
    /// the writer's memory between snapshots.
    pub roll_rows: usize,
    /// Also write a chunk once the journal's and the quarantine's buffered
    /// text and raw bytes reach this. Arrow's string and binary columns
    /// have 32-bit offsets: a chunk whose column passed 2 GiB (a thousand
    /// batch commands of 100,000 cards, or one huge bad line) panicked the
    /// encoder. One row is bounded by the pipeline's size limits
    /// (`flowcap_ingest::limits`), so a column stays far under 2 GiB.
    /// Default 256 MiB.
    pub roll_bytes: usize,
    /// Rows per Parquet row group: the unit of statistics-based pruning.
    /// Files are sorted by ICCID, so a one-card query reads one group per
    /// file: 8192 rows made DuckDB's 61-day card query 2.9x faster than
    /// one group per file on a year of history (docs/BENCHMARKS.md §10),
    /// and whole-table scans do not mind.
    pub row_group_rows: usize,
    /// zstd level (1-22). 1 by default: on the generator's workload it
    /// made files 1.6 % smaller than level 3 (the columns without a
    /// dictionary compress as well at either level) and took 7 % less of
    /// the encoder thread (docs/BENCHMARKS.md §8).
    pub zstd_level: i32,
    /// The billing calendar (its UTC offset names the `date` partitions).
    pub calendar: CycleCalendar,
    /// When small files are merged ([`compact`]).
    pub compaction: CompactionPolicy,
}

impl Default for HistoryOptions {
    fn default() -> Self {
        HistoryOptions {
            roll_rows: 262_144,
            roll_bytes: 256 << 20,
            row_group_rows: 8_192,
            zstd_level: 1,
            calendar: CycleCalendar::default(),
            compaction: CompactionPolicy::default(),
        }
    }
}

/// Where a rejected input came from (Kafka), when it has a position: in
/// the `quarantine` table, and in the dead letters the pipeline writes
/// (as JSON).
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourcePosition {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// The message timestamp, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp_ms: Option<i64>,
}

/// A rejected input, for the `quarantine` table.
#[derive(Debug, Clone)]
pub struct Quarantined {
    /// Input sequence number.
    pub seq: u64,
    /// Reason code.
    pub reason: String,
    /// Detail.
    pub message: String,
    /// The card, when known.
    pub iccid: Option<String>,
    /// The record id, when known.
    pub record_id: Option<String>,
    /// Source position, when the input has one.
    pub source: Option<SourcePosition>,
    /// The input as received.
    pub raw: Vec<u8>,
    /// The event clock when it was rejected (`Timestamp::MIN`: none yet):
    /// names the partition when the source has no timestamp.
    pub clock: Timestamp,
}

/// The history writer. Not thread-safe: the pipeline's writer thread owns
/// it. See the module docs for the protocol.
pub struct HistoryWriter {
    files: HistoryFiles,
    options: HistoryOptions,
    /// Merges small files in the background; `None` when compaction is off.
    compactor: Option<Compactor>,
    /// Partition directories written since the last compaction request.
    touched: BTreeSet<String>,
    /// First input sequence number of the current window.
    window_from: u64,
    /// Chunks written in the current window.
    chunk: u32,
    /// Latest event time seen (names partitions of rows without a time).
    clock: Option<Timestamp>,
    /// The time of day, for rows without a time before any event time.
    wall: SharedClock,
    /// Rows of the current chunk.
    rows: ChunkRows,
    buffered: usize,
    /// Text and raw bytes of the buffered journal and quarantine rows.
    buffered_bytes: usize,
    /// Encodes and stores full chunks on its own thread.
    encoder: ChunkEncoder,
    /// Day of the last `cards` dump.
    cards_day: Option<i64>,
    files_written: u64,
    /// Closed cycles' pool totals of the current window.
    closed_pools: Vec<PoolCycleTotal>,
}

impl std::fmt::Debug for HistoryWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HistoryWriter")
            .field("location", self.files.location())
            .field("window_from", &self.window_from)
            .field("buffered", &self.buffered)
            .finish_non_exhaustive()
    }
}

impl HistoryWriter {
    /// Opens the history at `location` for a pipeline that resumes after
    /// input `resume_after` (`None`: starting empty, every file goes).
    /// Deletes what a crash left behind: files of windows after the
    /// snapshot, temporary files, superseded `cards` dumps, inputs of a
    /// merge whose merged file exists.
    pub fn open(
        location: HistoryLocation,
        resume_after: Option<u64>,
        options: HistoryOptions,
    ) -> Result<HistoryWriter, HistoryError> {
        if !ZSTD_LEVELS.contains(&options.zstd_level) {
            return Err(HistoryError::ZstdLevel(options.zstd_level));
        }
        let files = HistoryFiles::new(location.clone())?;
        let mut crowded = BTreeSet::new();
        match resume_after {
            None => files.clear()?,
            Some(after) => crowded = recover(&files, after)?,
        }
        let encoder = ChunkEncoder::start(location.clone(), options)?;
        let compactor = if options.compaction.min_files >= 2 {
            Some(Compactor::start(location, options, crowded)?)
        } else {
            None
        };
        Ok(HistoryWriter {
            files,
            options,
            compactor,
            touched: BTreeSet::new(),
            window_from: resume_after.map_or(0, |s| s + 1),
            chunk: 0,
            clock: None,
            wall: SystemClock::shared(),
            rows: ChunkRows::default(),
            buffered: 0,
            buffered_bytes: 0,
            encoder,
            cards_day: None,
            files_written: 0,
            closed_pools: Vec::new(),
        })
    }

    /// Reads the time of day from `clock` (the system clock otherwise).
    pub fn with_clock(mut self, clock: SharedClock) -> HistoryWriter {
        self.wall = clock;
        self
    }

    /// Where the history is.
    pub fn location(&self) -> &HistoryLocation {
        self.files.location()
    }

    /// The compactor's counters (`None` when compaction is off).
    pub fn compaction_stats(&self) -> Option<Arc<CompactionStats>> {
        self.compactor.as_ref().map(Compactor::stats)
    }

    /// Parquet files written since open.
    pub fn files_written(&self) -> u64 {
        self.files_written
    }

    fn day(&self, t: Timestamp) -> i64 {
        self.options.calendar.local_day(t)
    }

    fn clock_day(&self) -> i64 {
        let t = self.clock.unwrap_or_else(|| Timestamp(self.wall.now_ms()));
        self.day(t)
    }

    /// An accepted record.
    pub fn accounted(&mut self, a: &Accounted) -> Result<(), HistoryError> {
        let day = self.day(a.usage.end);
        self.clock = Some(self.clock.map_or(a.usage.end, |c| c.max(a.usage.end)));
        let encoder = &self.encoder;
        self.rows
            .usage
            .entry(day)
            .or_insert_with(|| encoder.usage_rows())
            .push(*a);
        self.buffered += 1;
        self.roll_if_full()
    }

    /// A rejected input.
    pub fn quarantined(&mut self, q: Quarantined) -> Result<(), HistoryError> {
        let day = match q.source.as_ref().and_then(|s| s.timestamp_ms) {
            Some(ms) => self.day(Timestamp(ms)),
            None if q.clock != Timestamp::MIN => self.day(q.clock),
            None => self.clock_day(),
        };
        self.buffered_bytes += q.raw.len() + q.message.len();
        self.rows.quarantine.entry(day).or_default().push(q);
        self.buffered += 1;
        self.roll_if_full()
    }

    /// A pool's closed-cycle total: written with its window into the
    /// cycle's `pool_cycle_usage` partition when the window closes.
    pub fn pool_cycle(&mut self, total: PoolCycleTotal) -> Result<(), HistoryError> {
        self.closed_pools.push(total);
        Ok(())
    }

    /// A card or pool state change (or a closed cycle's late crossing).
    pub fn action(&mut self, event: &ActionEvent) -> Result<(), HistoryError> {
        let t = match event {
            ActionEvent::CardState(e) => e.event_time,
            ActionEvent::PoolState(e) => e.event_time,
            ActionEvent::LateCrossing(e) => e.event_time,
            // Not a state change: a firing is one `rule_executions` row per
            // action.
            ActionEvent::RuleFired(f) => {
                let day = self.day(f.event_time);
                let rows = flowcap_rules::execution::records(f);
                self.buffered += rows.len();
                self.rows.executions.entry(day).or_default().extend(rows);
                return self.roll_if_full();
            }
        };
        let day = self.day(t);
        self.rows.changes.entry(day).or_default().push(StateChange {
            event: event.clone(),
        });
        self.buffered += 1;
        self.roll_if_full()
    }

    /// Notification outcomes (taken from the notifier at a snapshot
    /// barrier): one `rule_deliveries` row per execution a message carried.
    pub fn deliveries(&mut self, rows: Vec<DeliveryRow>) -> Result<(), HistoryError> {
        for row in rows {
            let day = self.day(Timestamp(row.done.at_ms));
            self.buffered += row.message.executions.len().max(1);
            self.rows.deliveries.entry(day).or_default().push(row);
        }
        self.roll_if_full()
    }

    /// A command and its result. `command` is `None` for input that did
    /// not parse as a command (then `raw` is kept as the command text and
    /// `clock`, the event clock then, names the partition).
    pub fn journal(
        &mut self,
        seq: u64,
        command: Option<&Command>,
        raw: &[u8],
        result: &CommandResult,
        repeat: bool,
        clock: Timestamp,
    ) -> Result<(), HistoryError> {
        let (command_type, at, operator, text) = match command {
            Some(c) => {
                let value = serde_json::to_value(c).unwrap_or_default();
                (
                    value
                        .get("type")
                        .and_then(|t| t.as_str())
                        .map(str::to_owned),
                    Some(c.at.0),
                    c.operator.clone(),
                    value.to_string(),
                )
            }
            None => (None, None, None, String::from_utf8_lossy(raw).into_owned()),
        };
        let day = match at {
            Some(ms) => self.day(Timestamp(ms)),
            None if clock != Timestamp::MIN => self.day(clock),
            None => self.clock_day(),
        };
        let row = JournalRow {
            seq,
            command_id: result.command_id.as_str().to_owned(),
            command_type,
            at,
            operator,
            ok: result.ok,
            error_code: result.error.as_ref().map(|e| serde_name(&e.code)),
            error_message: result.error.as_ref().map(|e| e.message.clone()),
            failed_cards: result.results.iter().filter(|r| !r.ok).count() as i64,
            repeat,
            command: text,
            result: serde_json::to_string(result).unwrap_or_default(),
        };
        self.buffered_bytes += row.command.len()
            + row.result.len()
            + row.error_message.as_ref().map_or(0, String::len);
        self.rows.journal.entry(day).or_default().push(row);
        self.buffered += 1;
        self.roll_if_full()
    }

    fn roll_if_full(&mut self) -> Result<(), HistoryError> {
        if self.buffered >= self.options.roll_rows || self.buffered_bytes >= self.options.roll_bytes
        {
            self.write_chunk(Room::WaitFor)?;
        }
        Ok(())
    }

    /// Closes the window at a snapshot covering inputs through `through`:
    /// writes every buffered row and the pools' state; all durable on
    /// return (a cards dump goes through [`HistoryWriter::cut`]).
    /// `compact_through` is the oldest snapshot still kept (through which
    /// input): windows up to it may be merged in the background.
    pub fn snapshot(
        &mut self,
        through: u64,
        clock: Timestamp,
        pools: &[PoolView],
        compact_through: Option<u64>,
    ) -> Result<(), HistoryError> {
        let ticket = self.cut(through, clock, pools.to_vec(), None, compact_through)?;
        self.wait_stored(ticket)
    }

    /// [`HistoryWriter::snapshot`] without the wait: closes the window and
    /// hands its last chunk and the state dumps to the encoder thread.
    /// The window's files are durable once [`HistoryWriter::is_stored`]
    /// says so for the ticket returned; rows given meanwhile belong to the
    /// next window.
    pub fn cut(
        &mut self,
        through: u64,
        clock: Timestamp,
        pools: Vec<PoolView>,
        cards: Option<CardsDump>,
        compact_through: Option<u64>,
    ) -> Result<StoredTicket, HistoryError> {
        self.write_chunk(Room::Skip)?;
        let closed = std::mem::take(&mut self.closed_pools);
        let written = self
            .encoder
            .close_window(self.part_name(), through, closed)?;
        self.note_written(written);
        if clock != Timestamp::MIN && (!pools.is_empty() || cards.is_some()) {
            let day = self.day(clock);
            if cards.is_some() {
                self.cards_day = Some(day);
            }
            let written = self
                .encoder
                .submit_state(through, clock, day, pools, cards)?;
            self.note_written(written);
        }
        let ticket = self.encoder.ticket();
        self.window_from = through + 1;
        self.chunk = 0;
        if let (Some(compactor), Some(limit)) = (&self.compactor, compact_through) {
            compactor.request(limit, std::mem::take(&mut self.touched));
        }
        Ok(ticket)
    }

    /// True once every file handed over up to `ticket` is durable (or the
    /// first error of the encoder thread). Never waits.
    pub fn is_stored(&mut self, ticket: StoredTicket) -> Result<bool, HistoryError> {
        let written = self.encoder.poll()?;
        self.note_written(written);
        Ok(self.encoder.is_stored(ticket))
    }

    /// Waits until every file handed over up to `ticket` is durable.
    pub fn wait_stored(&mut self, ticket: StoredTicket) -> Result<(), HistoryError> {
        let written = self.encoder.wait(ticket)?;
        self.note_written(written);
        Ok(())
    }

    /// True when the `cards` table should get a dump at a snapshot with
    /// this event clock (a new event day since the last one).
    pub fn wants_cards(&self, clock: Timestamp) -> bool {
        clock != Timestamp::MIN && self.cards_day != Some(self.day(clock))
    }

    fn part_name(&self) -> String {
        format!("part-{:020}-{:04}.parquet", self.window_from, self.chunk)
    }

    /// Hands the buffered rows to the encoder as the window's next chunk
    /// (with [`Room::WaitFor`], it waits while two jobs are outstanding).
    fn write_chunk(&mut self, room: Room) -> Result<(), HistoryError> {
        if self.buffered == 0 {
            return Ok(());
        }
        let name = self.part_name();
        let rows = std::mem::take(&mut self.rows);
        let written = self.encoder.submit_chunk(name, rows, room)?;
        self.note_written(written);
        self.buffered = 0;
        self.buffered_bytes = 0;
        self.chunk += 1;
        Ok(())
    }

    fn note_written(&mut self, written: Written) {
        self.files_written += written.files;
        self.touched.extend(written.dirs);
    }
}

/// The zstd levels the history's files may be written at (what Parquet's
/// `ZstdLevel` accepts): one range for the CLI, the config check and here.
pub const ZSTD_LEVELS: std::ops::RangeInclusive<i32> = 1..=22;

/// Columns of (nearly) one value per row, written without a dictionary.
/// A row group's dictionary (8192 rows) never fills up, so Parquet keeps
/// one for every column: for these it interns (hashes) every value, then
/// compresses a dictionary page as large as the plain values besides the
/// indexes: a fifth of the history encoder's time (docs/BENCHMARKS.md
/// §8, "Less CPU beside the driver"). The card, cycle and carrier columns
/// keep theirs: few values, or long runs of one (rows are sorted by card).
const PLAIN_COLUMNS: [&str; 7] = [
    "record_id",
    "input_seq",
    "start_time",
    "end_time",
    "bytes_up",
    "bytes_down",
    "bytes",
];

/// One batch as a Parquet file: zstd, page statistics, row groups of
/// [`HistoryOptions::row_group_rows`]. `rel` names it in errors.
fn encode_parquet(
    batch: &RecordBatch,
    options: &HistoryOptions,
    rel: &str,
) -> Result<Vec<u8>, HistoryError> {
    let props = WriterProperties::builder()
        // A level outside the range never gets here (`HistoryWriter::open`).
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(options.zstd_level).unwrap_or_default(),
        ))
        .set_max_row_group_row_count(Some(options.row_group_rows))
        .set_statistics_enabled(EnabledStatistics::Page);
    let props = PLAIN_COLUMNS
        .iter()
        .fold(props, |props, column| {
            props.set_column_dictionary_enabled(ColumnPath::from(*column), false)
        })
        .build();
    let parquet_err = |source| HistoryError::Parquet {
        path: rel.to_owned(),
        source,
    };
    let mut writer =
        ArrowWriter::try_new(Vec::new(), batch.schema(), Some(props)).map_err(parquet_err)?;
    writer.write(batch).map_err(parquet_err)?;
    writer.into_inner().map_err(parquet_err)
}

fn serde_name<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}

/// `YYYY-MM-DD` of a local day number.
pub fn date_value(day: i64) -> String {
    let (y, m, d) = flowcap_engine::time::civil_from_days(day);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowcap_engine::record::Usage;
    use flowcap_engine::{CycleId, RecordId};
    use std::path::Path;
    use std::sync::atomic::Ordering;

    /// Card `n`'s ICCID: 19 digits for even `n`, 20 for odd, so that the
    /// text order (`…0`, `…01`, `…2`) is not the order of the numbers.
    fn card_text(n: u64) -> String {
        if n % 2 == 1 {
            format!("8986{n:016}")
        } else {
            format!("8986{n:015}")
        }
    }

    fn accounted(seq: u64, iccid: u64, end_ms: i64) -> Accounted {
        Accounted {
            seq,
            usage: Usage {
                record_id: RecordId::new(&format!("r{seq}")).unwrap(),
                iccid: Iccid::parse(&card_text(iccid)).unwrap(),
                start: None,
                end: Timestamp(end_ms),
                bytes_up: 10,
                bytes_down: 5,
                carrier: Some(Carrier::Cmcc),
                imei: None,
            },
            cycle: CycleId::new(2026, 11),
            counted: true,
            late: false,
        }
    }

    fn files(root: &Path) -> Vec<String> {
        HistoryFiles::new(local(root))
            .unwrap()
            .list()
            .unwrap()
            .into_iter()
            .map(|f| f.rel)
            .collect()
    }

    fn local(root: &Path) -> HistoryLocation {
        HistoryLocation::Local(root.to_owned())
    }

    const DAY: i64 = 1_795_000_000_000;

    #[test]
    fn run_texts_formats_each_run_of_equal_keys_once() {
        let (texts, at) = run_texts([7, 7, 8, 7, 7].into_iter());
        assert_eq!(texts, ["7", "8", "7"]);
        assert_eq!(at, [0, 0, 1, 2, 2]);
        assert_eq!(run_texts(std::iter::empty::<u8>()), (vec![], vec![]));
    }

    #[test]
    fn one_value_per_row_columns_are_written_without_a_dictionary() {
        use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        let rows: Vec<Accounted> = (0..100)
            .map(|i| accounted(i, i % 7, DAY + i as i64))
            .collect();
        let batch = usage_batch(&rows).unwrap();
        let bytes = encode_parquet(&batch, &HistoryOptions::default(), "test").unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes)).unwrap();
        let group = reader.metadata().row_group(0);
        let dictionary = |name: &str| {
            let column = (0..group.num_columns())
                .map(|i| group.column(i))
                .find(|c| c.column_path().string() == name)
                .unwrap_or_else(|| panic!("no column {name}"));
            column.dictionary_page_offset().is_some()
        };
        for name in PLAIN_COLUMNS {
            assert!(!dictionary(name), "{name} has a dictionary");
        }
        for name in ["iccid", "cycle", "carrier"] {
            assert!(dictionary(name), "{name} lost its dictionary");
        }
        assert_eq!(reader.build().unwrap().next().unwrap().unwrap(), batch);
    }

    #[test]
    fn a_zstd_level_out_of_range_is_refused_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("history");
        for level in [0, 23, -1] {
            let options = HistoryOptions {
                zstd_level: level,
                ..HistoryOptions::default()
            };
            let err = HistoryWriter::open(local(&root), None, options).unwrap_err();
            assert!(
                matches!(err, HistoryError::ZstdLevel(l) if l == level),
                "{err}"
            );
        }
        // Nothing was touched by the refused opens.
        assert!(!root.exists() || files(&root).is_empty());
    }

    #[test]
    fn restart_keeps_the_snapshotted_windows_and_drops_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("history");
        let mut w = HistoryWriter::open(local(&root), None, HistoryOptions::default()).unwrap();
        for seq in 0..10 {
            w.accounted(&accounted(seq, seq % 3, DAY + seq as i64))
                .unwrap();
        }
        w.snapshot(9, Timestamp(DAY), &[], None).unwrap();
        for seq in 10..15 {
            w.accounted(&accounted(seq, 1, DAY + seq as i64)).unwrap();
        }
        // A chunk of the next window reaches the disk, then the process dies
        // (a temporary file too).
        w.write_chunk(Room::WaitFor).unwrap();
        let usage_dir = root.join("usage_records").join(format!(
            "date={}",
            date_value(CycleCalendar::default().local_day(Timestamp(DAY)))
        ));
        std::fs::write(usage_dir.join(".part-x.tmp"), b"half").unwrap();
        drop(w);
        let before = files(&root);
        assert!(before
            .iter()
            .any(|f| f.contains("part-00000000000000000010-0000")));

        let _w = HistoryWriter::open(local(&root), Some(9), HistoryOptions::default()).unwrap();
        let after = files(&root);
        assert!(
            after
                .iter()
                .all(|f| f.contains("part-00000000000000000000-")),
            "{after:?}"
        );
        assert!(after.iter().any(|f| f.starts_with("usage_records/")));
        assert!(after
            .iter()
            .any(|f| f.starts_with("card_daily_usage_parts/")));
        assert!(after
            .iter()
            .any(|f| f.starts_with("card_cycle_usage_parts/cycle=2026-11/")));

        // Starting empty clears everything.
        let _w = HistoryWriter::open(local(&root), None, HistoryOptions::default()).unwrap();
        assert!(files(&root).is_empty());
    }

    #[test]
    fn a_cut_closes_the_window_at_once_and_its_ticket_says_when_it_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("history");
        let mut w = HistoryWriter::open(local(&root), None, HistoryOptions::default()).unwrap();
        for seq in 0..10 {
            w.accounted(&accounted(seq, seq % 3, DAY)).unwrap();
        }
        let first = w.cut(9, Timestamp(DAY), Vec::new(), None, None).unwrap();
        // Rows given after the cut belong to the next window.
        for seq in 10..12 {
            w.accounted(&accounted(seq, 1, DAY)).unwrap();
        }
        w.wait_stored(first).unwrap();
        assert!(w.is_stored(first).unwrap());
        let stored = files(&root);
        assert!(stored
            .iter()
            .any(|f| f.ends_with("part-00000000000000000000-0000.parquet")));
        assert!(
            !stored
                .iter()
                .any(|f| f.contains("part-00000000000000000010-")),
            "{stored:?}"
        );
        let second = w.cut(11, Timestamp(DAY), Vec::new(), None, None).unwrap();
        assert!(second > first);
        w.wait_stored(second).unwrap();
        assert!(files(&root)
            .iter()
            .any(|f| f.ends_with("part-00000000000000000010-0000.parquet")));
        assert_eq!(
            sums(&root).last(),
            Some(&("raw".to_owned(), 12, 12)),
            "every row once"
        );
    }

    /// The view of one card made by an engine from commands.
    fn one_card_view() -> CardView {
        let mut engine = flowcap_engine::Engine::new(flowcap_engine::EngineConfig::default());
        let lines = [
            r#"{"id":"c1","type":"upsert_plan","at":"2026-11-10T00:00:00+08:00","plan":{"id":"p","name":"p","carrier":"cmcc","allowance_mb":30,"traffic":"directed","term_months":12}}"#,
            r#"{"id":"c2","type":"upsert_card","at":"2026-11-10T00:00:00+08:00","card":{"iccid":"89860400000000000001","carrier":"cmcc","plan":"p","state":"testable"}}"#,
        ];
        for (seq, line) in lines.iter().enumerate() {
            let command = flowcap_engine::command::parse_command(line.as_bytes()).unwrap();
            engine.process_command(command, seq as u64 + 1, &mut Vec::new());
        }
        engine.card_views().pop().expect("the card exists")
    }

    #[test]
    fn cards_hold_each_custom_attribute_in_the_column_of_its_slot() {
        use arrow::array::{Array, StringArray};
        let mut view = one_card_view();
        view.attributes = [("site", "north"), ("customer", "acme"), ("old", "x")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let mut bare = view.clone();
        bare.attributes.clear();
        // Declared: customer (slot 1), colour (2, no value), site (3);
        // "old" is no longer declared.
        let names = ["customer", "colour", "site"].map(str::to_owned);
        let batch = cards_batch(&[view, bare], &names, 7, Timestamp(DAY)).unwrap();
        let column = |name: &str| -> Vec<Option<String>> {
            let array = batch
                .column_by_name(name)
                .unwrap_or_else(|| panic!("no column {name}"));
            let strings = array.as_any().downcast_ref::<StringArray>().unwrap();
            (0..strings.len())
                .map(|i| strings.is_valid(i).then(|| strings.value(i).to_owned()))
                .collect()
        };
        assert_eq!(column("attr_1"), [Some("acme".to_owned()), None]);
        assert_eq!(column("attr_2"), [None, None]);
        assert_eq!(column("attr_3"), [Some("north".to_owned()), None]);
        for slot in 4..=flowcap_engine::command::MAX_ATTRIBUTE_NAMES {
            assert_eq!(column(&schema::attribute_column(slot)), [None, None]);
        }
    }

    #[test]
    fn a_cards_dump_built_after_the_cut_is_stored_with_it_or_fails_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("history");
        let mut w = HistoryWriter::open(local(&root), None, HistoryOptions::default()).unwrap();
        w.accounted(&accounted(0, 1, DAY)).unwrap();
        // A cut whose cards views come later (as from a snapshot's copy).
        let cut_with_views_later = |w: &mut HistoryWriter, through: u64| {
            let (views, dump) = CardsDump::later(Vec::new());
            let ticket = w.cut(through, Timestamp(DAY), Vec::new(), Some(dump), None);
            (views, ticket.unwrap())
        };
        // The ticket covers the views sent after the cut.
        let (views, ticket) = cut_with_views_later(&mut w, 0);
        views.send(vec![one_card_view()]).unwrap();
        w.wait_stored(ticket).unwrap();
        assert!(
            files(&root).iter().any(|f| f.starts_with("cards/")
                && f.ends_with("part-00000000000000000000-cards-0000.parquet")),
            "{:?}",
            files(&root)
        );
        // Views that never come fail the dump, not silently skip it.
        let (views, ticket) = cut_with_views_later(&mut w, 1);
        drop(views);
        assert!(matches!(
            w.wait_stored(ticket),
            Err(HistoryError::CardViewsMissing)
        ));
    }

    #[test]
    fn chunks_roll_by_rows_within_a_window() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("history");
        let options = HistoryOptions {
            roll_rows: 4,
            ..HistoryOptions::default()
        };
        let mut w = HistoryWriter::open(local(&root), None, options).unwrap();
        for seq in 0..10 {
            w.accounted(&accounted(seq, seq, DAY)).unwrap();
        }
        w.snapshot(9, Timestamp(DAY), &[], None).unwrap();
        let usage: Vec<String> = files(&root)
            .into_iter()
            .filter(|f| f.starts_with("usage_records/"))
            .collect();
        assert_eq!(usage.len(), 3, "{usage:?}");
        assert!(usage[2].ends_with("part-00000000000000000000-0002.parquet"));
    }

    /// Big text and raw rows roll a chunk before their column nears
    /// Arrow's 2 GiB offsets, however few rows they are.
    #[test]
    fn chunks_roll_by_bytes_of_raw_and_text() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("history");
        let options = HistoryOptions {
            roll_bytes: 1000,
            ..HistoryOptions::default()
        };
        let mut w = HistoryWriter::open(local(&root), None, options).unwrap();
        for seq in 0..3 {
            w.quarantined(Quarantined {
                seq,
                reason: "not_json".into(),
                message: "not valid JSON".into(),
                iccid: None,
                record_id: None,
                source: None,
                raw: vec![b'x'; 600],
                clock: Timestamp(DAY),
            })
            .unwrap();
        }
        w.snapshot(2, Timestamp(DAY), &[], None).unwrap();
        let quarantine: Vec<String> = files(&root)
            .into_iter()
            .filter(|f| f.starts_with("quarantine/"))
            .collect();
        assert_eq!(quarantine.len(), 2, "{quarantine:?}");
    }

    #[test]
    fn card_sums_are_written_once_per_window_unless_they_grow_to_a_chunk() {
        let parts = |root: &Path| {
            files(root)
                .into_iter()
                .filter(|f| {
                    f.starts_with("card_daily_usage_parts/")
                        || f.starts_with("card_cycle_usage_parts/")
                })
                .collect::<Vec<_>>()
        };
        // Two cards over three chunks: one daily and one cycle file for the
        // window, named after it (its next chunk number), with both cards.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("history");
        let options = HistoryOptions {
            roll_rows: 5,
            ..HistoryOptions::default()
        };
        let mut w = HistoryWriter::open(local(&root), None, options).unwrap();
        for seq in 0..12 {
            w.accounted(&accounted(seq, seq % 2, DAY + seq as i64))
                .unwrap();
        }
        w.snapshot(11, Timestamp(DAY), &[], None).unwrap();
        let written = parts(&root);
        assert_eq!(written.len(), 2, "{written:?}");
        assert!(written
            .iter()
            .all(|f| f.ends_with("part-00000000000000000000-0003.parquet")));
        let got = sums(&root);
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(
            got.iter()
                .filter(|r| r.0 != "raw")
                .map(|r| r.1)
                .sum::<i64>(),
            12
        );

        // Five cards, chunks of 5 rows: the sums reach roll_rows with the
        // first chunk and go out with it; every record is still summed once.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("history");
        let mut w = HistoryWriter::open(local(&root), None, options).unwrap();
        for seq in 0..12 {
            w.accounted(&accounted(seq, seq % 5, DAY + seq as i64))
                .unwrap();
        }
        w.snapshot(11, Timestamp(DAY), &[], None).unwrap();
        assert!(parts(&root).len() > 2, "{:?}", parts(&root));
        let got = sums(&root);
        assert_eq!(
            got.iter()
                .filter(|r| r.0 != "raw")
                .map(|r| r.1)
                .sum::<i64>(),
            12
        );
        assert_eq!(got.last(), Some(&("raw".to_owned(), 12, 12)));
    }

    /// Per card, its records and bytes summed over `card_daily_usage_parts`,
    /// then ("raw", rows, distinct record ids) of `usage_records`; read
    /// from the Parquet files themselves (what any reader sees: every
    /// `.parquet` file not hidden by a leading dot).
    fn sums(root: &Path) -> Vec<(String, i64, i64)> {
        use arrow::array::{Array, AsArray};
        use arrow::compute::cast;
        use arrow::datatypes::{DataType, Int64Type};
        use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                if path.is_dir() {
                    files(&path, out);
                } else if !name.starts_with('.') && name.ends_with(".parquet") {
                    out.push(path);
                }
            }
        }
        let batches = |table: &str| {
            let mut paths = Vec::new();
            files(&root.join(table), &mut paths);
            let mut batches = Vec::new();
            for path in paths {
                let file = std::fs::File::open(&path).unwrap();
                let reader = ParquetRecordBatchReaderBuilder::try_new(file)
                    .unwrap()
                    .build()
                    .unwrap();
                batches.extend(reader.map(Result::unwrap));
            }
            batches
        };
        let text = |b: &RecordBatch, name: &str| -> Vec<String> {
            let column = cast(b.column_by_name(name).unwrap(), &DataType::Utf8).unwrap();
            let column = column.as_string::<i32>();
            (0..column.len())
                .map(|i| column.value(i).to_owned())
                .collect()
        };
        let ints = |b: &RecordBatch, name: &str| -> Vec<i64> {
            let column = b.column_by_name(name).unwrap();
            column.as_primitive::<Int64Type>().values().to_vec()
        };
        let mut per_card = std::collections::BTreeMap::<String, (i64, i64)>::new();
        for b in batches(schema::CARD_DAILY_USAGE_PARTS) {
            let (cards, records, bytes) =
                (text(&b, "iccid"), ints(&b, "records"), ints(&b, "bytes"));
            for (i, card) in cards.into_iter().enumerate() {
                let sum = per_card.entry(card).or_default();
                sum.0 += records[i];
                sum.1 += bytes[i];
            }
        }
        let mut rows = 0i64;
        let mut ids = std::collections::HashSet::new();
        for b in batches(schema::USAGE_RECORDS) {
            rows += b.num_rows() as i64;
            ids.extend(text(&b, "record_id"));
        }
        let mut out: Vec<_> = per_card.into_iter().map(|(c, (r, b))| (c, r, b)).collect();
        out.push(("raw".to_owned(), rows, ids.len() as i64));
        out
    }

    #[test]
    fn compaction_merges_snapshotted_windows_and_keeps_every_row_once() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("history");
        let off = HistoryOptions {
            compaction: CompactionPolicy {
                min_files: 0,
                ..CompactionPolicy::default()
            },
            ..HistoryOptions::default()
        };
        let on = HistoryOptions {
            compaction: CompactionPolicy {
                min_files: 4,
                target_bytes: 1 << 20,
                ..CompactionPolicy::default()
            },
            ..HistoryOptions::default()
        };
        // The same 12 windows of 3 records each, without and with compaction.
        let write = |root: &Path, options: HistoryOptions| {
            let mut w = HistoryWriter::open(local(root), None, options).unwrap();
            for window in 0..12u64 {
                for i in 0..3 {
                    let seq = window * 3 + i;
                    w.accounted(&accounted(seq, seq % 5, DAY + seq as i64))
                        .unwrap();
                }
                // The oldest snapshot kept lags three windows behind.
                let through = window * 3 + 2;
                let kept = window.checked_sub(3).map(|w| w * 3 + 2);
                w.snapshot(through, Timestamp(DAY), &[], kept).unwrap();
            }
            let stats = w.compaction_stats();
            drop(w);
            stats
        };
        let plain_root = dir.path().join("plain");
        assert!(write(&plain_root, off).is_none());
        let stats = write(&root, on).unwrap();
        assert!(stats.merges.load(Ordering::Relaxed) > 0);
        assert!(stats.rows_written.load(Ordering::Relaxed) > 0);
        // The encoder's files are in the merge's order (ICCIDs of 19 and
        // 20 digits among them): merged without sorting again.
        assert_eq!(stats.sorted_again.load(Ordering::Relaxed), 0);
        let listed = files(&root);
        let usage: Vec<&String> = listed
            .iter()
            .filter(|f| f.starts_with("usage_records/"))
            .collect();
        assert!(usage.len() < 12, "{usage:?}");
        assert!(usage.iter().any(|f| f.contains("-m0")), "{usage:?}");
        // Windows after the last oldest-kept snapshot (input 26) stay plain.
        for f in &usage {
            let name = f.rsplit('/').next().unwrap();
            if let Some((_, last)) = file_range(name) {
                assert!(!name.contains("-m") || last <= 26, "{name}");
            }
        }
        assert_eq!(sums(&root), sums(&plain_root));
        assert!(sums(&root).contains(&("raw".to_owned(), 36, 36)));

        // A merge cut short by a crash: the merged file and its inputs
        // both on disk. Recovery deletes the inputs.
        let merged = listed
            .iter()
            .find(|f| f.starts_with("card_daily_usage_parts/") && f.contains("-m"))
            .unwrap()
            .clone();
        let (from, last) = file_range(merged.rsplit('/').next().unwrap()).unwrap();
        let dir_rel = merged.rsplit_once('/').unwrap().0.to_owned();
        let copy = HistoryFiles::new(local(&plain_root)).unwrap();
        let into = HistoryFiles::new(local(&root)).unwrap();
        let mut restored = 0;
        for f in copy.list_dir(&dir_rel).unwrap() {
            if file_range(f.name()).is_some_and(|(a, _)| a >= from && a <= last) {
                into.put(&f.rel, copy.get(&f.rel).unwrap()).unwrap();
                restored += 1;
            }
        }
        assert!(restored >= 2);
        let doubled = sums(&root);
        assert_ne!(doubled, sums(&plain_root), "the leftovers double count");
        let w = HistoryWriter::open(local(&root), Some(35), off).unwrap();
        drop(w);
        assert_eq!(sums(&root), sums(&plain_root));
    }

    #[test]
    fn recovery_refuses_a_merged_file_past_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("history");
        let files = HistoryFiles::new(local(&root)).unwrap();
        let name = format!(
            "usage_records/date=2026-11-01/part-{:020}-m{:020}.parquet",
            0, 20
        );
        files.put(&name, b"x".to_vec()).unwrap();
        let err =
            HistoryWriter::open(local(&root), Some(10), HistoryOptions::default()).unwrap_err();
        assert!(matches!(err, HistoryError::MergedPastSnapshot(..)), "{err}");
    }
}
