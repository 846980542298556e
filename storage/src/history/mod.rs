//! Parquet history: everything flowcap sees and decides, in tables an
//! analyst queries with SQL (see [`crate::sql`]) or reads with any Parquet
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
//! `card_daily_usage_parts` and `card_cycle_usage_parts` hold, per window
//! (chunk), the usage each card added to each day and cycle: a few rows per
//! card per window instead of one per record, so console queries never
//! scan raw records. The SQL views `card_daily_usage` and
//! `card_cycle_usage` sum them. A late record lands in its own (closed)
//! day and cycle and is counted in `late_records` / `late_bytes` there.
//! `pool_cycle_usage` and `cards` are written from the engine's state at
//! snapshots.

pub mod schema;

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::errors::ParquetError;
use datafusion::parquet::file::properties::{EnabledStatistics, WriterProperties};
use flowcap_engine::command::CommandResult;
use flowcap_engine::event::{Accounted, ActionEvent, Cause};
use flowcap_engine::{
    CardView, Carrier, Command, CycleCalendar, CycleId, Iccid, PoolView, Reasons, Timestamp,
};
use serde::Serialize;

use schema::{Columns, Partitioning};

/// Errors of the history writer.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// A file or directory operation failed.
    #[error("history {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Building a batch failed (a bug: the schemas are fixed).
    #[error("history batch: {0}")]
    Arrow(#[from] ArrowError),
    /// Writing Parquet failed.
    #[error("history parquet {path}: {source}")]
    Parquet {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: ParquetError,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> HistoryError + '_ {
    move |source| HistoryError::Io {
        path: path.to_owned(),
        source,
    }
}

/// How the writer sizes its files.
#[derive(Debug, Clone, Copy)]
pub struct HistoryOptions {
    /// Write a chunk when this many rows are buffered (all tables). Bounds
    /// the writer's memory between snapshots.
    pub roll_rows: usize,
    /// Rows per Parquet row group: the unit of statistics-based pruning.
    pub row_group_rows: usize,
    /// zstd level.
    pub zstd_level: i32,
    /// The billing calendar (its UTC offset names the `date` partitions).
    pub calendar: CycleCalendar,
}

impl Default for HistoryOptions {
    fn default() -> Self {
        HistoryOptions {
            roll_rows: 262_144,
            row_group_rows: 65_536,
            zstd_level: 3,
            calendar: CycleCalendar::default(),
        }
    }
}

/// Where a rejected input came from (Kafka), when it has a position.
#[derive(Debug, Clone, Default)]
pub struct SourcePosition {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// The message timestamp, when it has one.
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

#[derive(Debug, Clone)]
struct StateChange {
    event: ActionEvent,
}

#[derive(Debug, Clone)]
struct JournalRow {
    seq: u64,
    command_id: String,
    command_type: Option<String>,
    at: Option<i64>,
    operator: Option<String>,
    ok: bool,
    error_code: Option<String>,
    error_message: Option<String>,
    failed_cards: i64,
    repeat: bool,
    command: String,
    result: String,
}

#[derive(Debug, Clone, Copy, Default)]
struct UsageSums {
    records: i64,
    bytes_up: i64,
    bytes_down: i64,
    late_records: i64,
    late_bytes: i64,
    through_seq: i64,
}

impl UsageSums {
    fn add(&mut self, a: &Accounted) {
        let up = to_i64(a.usage.bytes_up);
        let down = to_i64(a.usage.bytes_down);
        self.records += 1;
        self.bytes_up = self.bytes_up.saturating_add(up);
        self.bytes_down = self.bytes_down.saturating_add(down);
        if a.late {
            self.late_records += 1;
            self.late_bytes = self.late_bytes.saturating_add(up.saturating_add(down));
        }
        self.through_seq = self.through_seq.max(to_i64(a.seq));
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The history writer. Not thread-safe: the pipeline's writer thread owns
/// it. See the module docs for the protocol.
pub struct HistoryWriter {
    root: PathBuf,
    options: HistoryOptions,
    /// First input sequence number of the current window.
    window_from: u64,
    /// Chunks written in the current window.
    chunk: u32,
    /// Latest event time seen (names partitions of rows without a time).
    clock: Option<Timestamp>,
    usage: HashMap<i64, Vec<Accounted>>,
    daily: HashMap<(i64, Iccid), UsageSums>,
    cycle: HashMap<(CycleId, Iccid), (Option<Carrier>, UsageSums)>,
    quarantine: HashMap<i64, Vec<Quarantined>>,
    changes: HashMap<i64, Vec<StateChange>>,
    journal: HashMap<i64, Vec<JournalRow>>,
    buffered: usize,
    /// Day of the last `cards` dump.
    cards_day: Option<i64>,
    files_written: u64,
}

impl std::fmt::Debug for HistoryWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HistoryWriter")
            .field("root", &self.root)
            .field("window_from", &self.window_from)
            .field("buffered", &self.buffered)
            .finish_non_exhaustive()
    }
}

impl HistoryWriter {
    /// Opens the history under `root` for a pipeline that resumes after
    /// input `resume_after` (`None`: starting empty, every file goes).
    /// Deletes what a crash left behind: files of windows after the
    /// snapshot, temporary files, superseded `cards` dumps.
    pub fn open(
        root: impl Into<PathBuf>,
        resume_after: Option<u64>,
        options: HistoryOptions,
    ) -> Result<HistoryWriter, HistoryError> {
        let root = root.into();
        match resume_after {
            None if root.exists() => {
                std::fs::remove_dir_all(&root).map_err(io_err(&root))?;
            }
            None => {}
            Some(after) => recover(&root, after)?,
        }
        std::fs::create_dir_all(&root).map_err(io_err(&root))?;
        Ok(HistoryWriter {
            root,
            options,
            window_from: resume_after.map_or(0, |s| s + 1),
            chunk: 0,
            clock: None,
            usage: HashMap::new(),
            daily: HashMap::new(),
            cycle: HashMap::new(),
            quarantine: HashMap::new(),
            changes: HashMap::new(),
            journal: HashMap::new(),
            buffered: 0,
            cards_day: None,
            files_written: 0,
        })
    }

    /// The history directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Parquet files written since open.
    pub fn files_written(&self) -> u64 {
        self.files_written
    }

    fn day(&self, t: Timestamp) -> i64 {
        self.options.calendar.local_day(t)
    }

    fn clock_day(&self) -> i64 {
        let t = self.clock.unwrap_or_else(wall_clock);
        self.day(t)
    }

    /// An accepted record.
    pub fn accounted(&mut self, a: &Accounted) -> Result<(), HistoryError> {
        let day = self.day(a.usage.end);
        self.clock = Some(self.clock.map_or(a.usage.end, |c| c.max(a.usage.end)));
        self.usage.entry(day).or_default().push(*a);
        self.daily.entry((day, a.usage.iccid)).or_default().add(a);
        let entry = self
            .cycle
            .entry((a.cycle, a.usage.iccid))
            .or_insert((a.usage.carrier, UsageSums::default()));
        entry.1.add(a);
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
        self.quarantine.entry(day).or_default().push(q);
        self.buffered += 1;
        self.roll_if_full()
    }

    /// A card or pool state change.
    pub fn action(&mut self, event: &ActionEvent) -> Result<(), HistoryError> {
        let t = match event {
            ActionEvent::CardState(e) => e.event_time,
            ActionEvent::PoolState(e) => e.event_time,
        };
        let day = self.day(t);
        self.changes.entry(day).or_default().push(StateChange {
            event: event.clone(),
        });
        self.buffered += 1;
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
        self.journal.entry(day).or_default().push(row);
        self.buffered += 1;
        self.roll_if_full()
    }

    fn roll_if_full(&mut self) -> Result<(), HistoryError> {
        if self.buffered >= self.options.roll_rows {
            self.write_chunk()?;
        }
        Ok(())
    }

    /// Closes the window at a snapshot covering inputs through `through`:
    /// writes every buffered row, the pools' state, and (once per event
    /// day, or when `final_cards`) every card's; all durable on return.
    pub fn snapshot(
        &mut self,
        through: u64,
        clock: Timestamp,
        pools: &[PoolView],
        cards: Option<&[CardView]>,
    ) -> Result<(), HistoryError> {
        self.write_chunk()?;
        if clock != Timestamp::MIN {
            self.write_pools(through, clock, pools)?;
            if let Some(cards) = cards {
                self.write_cards(through, clock, cards)?;
            }
        }
        self.window_from = through + 1;
        self.chunk = 0;
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

    fn write_chunk(&mut self) -> Result<(), HistoryError> {
        if self.buffered == 0 {
            return Ok(());
        }
        let name = self.part_name();
        let usage = std::mem::take(&mut self.usage);
        for (day, mut rows) in usage {
            rows.sort_unstable_by_key(|a| (a.usage.iccid, a.usage.end, a.seq));
            let batch = usage_batch(&rows)?;
            self.write(
                schema::USAGE_RECORDS,
                Partitioning::Date,
                &date_value(day),
                &name,
                &batch,
            )?;
        }
        let daily = std::mem::take(&mut self.daily);
        let mut by_day: HashMap<i64, Vec<(Iccid, UsageSums)>> = HashMap::new();
        for ((day, iccid), sums) in daily {
            by_day.entry(day).or_default().push((iccid, sums));
        }
        for (day, mut rows) in by_day {
            rows.sort_unstable_by_key(|r| r.0);
            let batch = daily_batch(day, &rows)?;
            self.write(
                schema::CARD_DAILY_USAGE_PARTS,
                Partitioning::Date,
                &date_value(day),
                &name,
                &batch,
            )?;
        }
        let cycles = std::mem::take(&mut self.cycle);
        let mut by_cycle: HashMap<CycleId, Vec<(Iccid, Option<Carrier>, UsageSums)>> =
            HashMap::new();
        for ((cycle, iccid), (carrier, sums)) in cycles {
            by_cycle
                .entry(cycle)
                .or_default()
                .push((iccid, carrier, sums));
        }
        for (cycle, mut rows) in by_cycle {
            rows.sort_unstable_by_key(|r| r.0);
            let batch = cycle_batch(&rows)?;
            self.write(
                schema::CARD_CYCLE_USAGE_PARTS,
                Partitioning::Cycle,
                &cycle.to_string(),
                &name,
                &batch,
            )?;
        }
        let quarantine = std::mem::take(&mut self.quarantine);
        for (day, mut rows) in quarantine {
            rows.sort_by_key(|q| q.seq);
            let batch = quarantine_batch(&rows)?;
            self.write(
                schema::QUARANTINE,
                Partitioning::Date,
                &date_value(day),
                &name,
                &batch,
            )?;
        }
        let changes = std::mem::take(&mut self.changes);
        for (day, mut rows) in changes {
            rows.sort_by_cached_key(|r| change_key(&r.event));
            let batch = changes_batch(&rows)?;
            self.write(
                schema::STATE_CHANGES,
                Partitioning::Date,
                &date_value(day),
                &name,
                &batch,
            )?;
        }
        let journal = std::mem::take(&mut self.journal);
        for (day, mut rows) in journal {
            rows.sort_by_key(|r| r.seq);
            let batch = journal_batch(&rows)?;
            self.write(
                schema::COMMAND_JOURNAL,
                Partitioning::Date,
                &date_value(day),
                &name,
                &batch,
            )?;
        }
        self.buffered = 0;
        self.chunk += 1;
        Ok(())
    }

    fn write_pools(
        &mut self,
        through: u64,
        clock: Timestamp,
        pools: &[PoolView],
    ) -> Result<(), HistoryError> {
        if pools.is_empty() {
            return Ok(());
        }
        let mut by_cycle: HashMap<CycleId, Vec<&PoolView>> = HashMap::new();
        for p in pools {
            by_cycle.entry(p.cycle).or_default().push(p);
        }
        let name = format!("part-{through:020}-pools.parquet");
        for (cycle, rows) in by_cycle {
            let batch = pools_batch(&rows, through, clock)?;
            let dir = self
                .root
                .join(schema::POOL_CYCLE_USAGE)
                .join(format!("cycle={cycle}"));
            self.write(
                schema::POOL_CYCLE_USAGE,
                Partitioning::Cycle,
                &cycle.to_string(),
                &name,
                &batch,
            )?;
            // Only the newest state per cycle is kept: it supersedes the
            // older ones (a pool's usage only grows within a cycle).
            remove_older_than(&dir, &name)?;
        }
        Ok(())
    }

    fn write_cards(
        &mut self,
        through: u64,
        clock: Timestamp,
        cards: &[CardView],
    ) -> Result<(), HistoryError> {
        let day = self.day(clock);
        let name = format!("part-{through:020}-cards.parquet");
        for (i, chunk) in cards.chunks(self.options.roll_rows.max(1)).enumerate() {
            let batch = cards_batch(chunk, through, clock)?;
            let chunk_name = format!("part-{through:020}-cards-{i:04}.parquet");
            self.write(
                schema::CARDS,
                Partitioning::Date,
                &date_value(day),
                &chunk_name,
                &batch,
            )?;
        }
        let dir = self
            .root
            .join(schema::CARDS)
            .join(format!("date={}", date_value(day)));
        remove_older_than(&dir, &name)?;
        self.cards_day = Some(day);
        Ok(())
    }

    /// Writes one file atomically: a hidden temporary name, fsync, rename,
    /// directory fsync.
    fn write(
        &mut self,
        table: &str,
        partitioning: Partitioning,
        value: &str,
        name: &str,
        batch: &RecordBatch,
    ) -> Result<(), HistoryError> {
        let dir = self
            .root
            .join(table)
            .join(format!("{}={value}", partitioning.column()));
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        let file = File::create(&tmp).map_err(io_err(&tmp))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(
                ZstdLevel::try_new(self.options.zstd_level).unwrap_or_default(),
            ))
            .set_max_row_group_row_count(Some(self.options.row_group_rows))
            .set_statistics_enabled(EnabledStatistics::Page)
            .build();
        let parquet_err = |source| HistoryError::Parquet {
            path: tmp.clone(),
            source,
        };
        let mut writer =
            ArrowWriter::try_new(file, batch.schema(), Some(props)).map_err(parquet_err)?;
        writer.write(batch).map_err(parquet_err)?;
        let file = writer.into_inner().map_err(parquet_err)?;
        file.sync_all().map_err(io_err(&tmp))?;
        drop(file);
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&dir))?;
        self.files_written += 1;
        Ok(())
    }
}

/// Now, by the system clock (the one place flowcap's IO crates read it).
pub fn wall_clock() -> Timestamp {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    Timestamp(ms)
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

/// The window start (`from`) a history file name carries, if it is one.
fn window_of(name: &str) -> Option<u64> {
    let rest = name.strip_prefix("part-")?;
    rest.get(..20)?.parse().ok()
}

/// Deletes every file of windows after `after`, every temporary file, and
/// every superseded `cards` / `pool_cycle_usage` file.
fn recover(root: &Path, after: u64) -> Result<(), HistoryError> {
    if !root.exists() {
        return Ok(());
    }
    for table in read_dir(root)? {
        if !table.is_dir() {
            continue;
        }
        for partition in read_dir(&table)? {
            if !partition.is_dir() {
                continue;
            }
            for file in read_dir(&partition)? {
                let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
                let stale =
                    name.starts_with('.') || window_of(name).is_some_and(|from| from > after);
                if stale {
                    std::fs::remove_file(&file).map_err(io_err(&file))?;
                }
            }
            if let Some(newest) = read_dir(&partition)?
                .iter()
                .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
                .filter(|n| n.contains("-cards") || n.contains("-pools"))
                .max()
            {
                remove_older_than(&partition, &newest)?;
            }
        }
    }
    Ok(())
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>, HistoryError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        out.push(entry.map_err(io_err(dir))?.path());
    }
    out.sort();
    Ok(out)
}

/// Removes the snapshot dumps (`-cards`, `-pools`) in `dir` older than the
/// one whose name starts like `newest` (same window prefix).
fn remove_older_than(dir: &Path, newest: &str) -> Result<(), HistoryError> {
    let Some(keep) = window_of(newest) else {
        return Ok(());
    };
    for file in read_dir(dir)? {
        let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let dump = name.contains("-cards") || name.contains("-pools");
        if dump && window_of(name).is_some_and(|w| w < keep) {
            std::fs::remove_file(&file).map_err(io_err(&file))?;
        }
    }
    Ok(())
}

fn change_key(e: &ActionEvent) -> (String, i64) {
    match e {
        ActionEvent::CardState(c) => (c.iccid.to_string(), c.event_time.0),
        ActionEvent::PoolState(p) => (p.pool.to_string(), p.event_time.0),
    }
}

fn opt_i64(v: Option<u64>) -> Option<i64> {
    v.map(to_i64)
}

fn reasons_text(r: Reasons) -> String {
    r.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(",")
}

fn usage_batch(rows: &[Accounted]) -> Result<RecordBatch, ArrowError> {
    let iccids: Vec<String> = rows.iter().map(|a| a.usage.iccid.to_string()).collect();
    let cycles: Vec<String> = rows.iter().map(|a| a.cycle.to_string()).collect();
    let mut c = Columns::new(table_schema(schema::USAGE_RECORDS));
    c.utf8(iccids.iter().map(|s| Some(s.as_str())));
    c.utf8(rows.iter().map(|a| Some(a.usage.record_id.as_str())));
    c.ts(rows.iter().map(|a| a.usage.start.map(|t| t.0)));
    c.ts(rows.iter().map(|a| Some(a.usage.end.0)));
    c.i64(rows.iter().map(|a| Some(to_i64(a.usage.bytes_up))));
    c.i64(rows.iter().map(|a| Some(to_i64(a.usage.bytes_down))));
    c.i64(rows.iter().map(|a| Some(to_i64(a.usage.bytes()))));
    c.dict(rows.iter().map(|a| a.usage.carrier.map(Carrier::as_str)));
    c.dict(cycles.iter().map(|s| Some(s.as_str())));
    c.bool(rows.iter().map(|a| a.counted));
    c.bool(rows.iter().map(|a| a.late));
    c.i64(rows.iter().map(|a| Some(to_i64(a.seq))));
    c.finish()
}

fn sums_columns<'a>(c: &mut Columns, sums: impl Iterator<Item = &'a UsageSums> + Clone) {
    c.i64(sums.clone().map(|s| Some(s.records)));
    c.i64(sums.clone().map(|s| Some(s.bytes_up)));
    c.i64(sums.clone().map(|s| Some(s.bytes_down)));
    c.i64(
        sums.clone()
            .map(|s| Some(s.bytes_up.saturating_add(s.bytes_down))),
    );
    c.i64(sums.clone().map(|s| Some(s.late_records)));
    c.i64(sums.clone().map(|s| Some(s.late_bytes)));
    c.i64(sums.map(|s| Some(s.through_seq)));
}

fn table_schema(name: &str) -> datafusion::arrow::datatypes::SchemaRef {
    schema::tables()
        .into_iter()
        .find(|t| t.name == name)
        .map(|t| t.schema)
        .unwrap_or_else(|| std::sync::Arc::new(datafusion::arrow::datatypes::Schema::empty()))
}

fn daily_batch(day: i64, rows: &[(Iccid, UsageSums)]) -> Result<RecordBatch, ArrowError> {
    let iccids: Vec<String> = rows.iter().map(|r| r.0.to_string()).collect();
    let mut c = Columns::new(table_schema(schema::CARD_DAILY_USAGE_PARTS));
    c.utf8(iccids.iter().map(|s| Some(s.as_str())));
    let day32 = i32::try_from(day).unwrap_or(i32::MAX);
    c.date(rows.iter().map(|_| day32));
    sums_columns(&mut c, rows.iter().map(|r| &r.1));
    c.finish()
}

fn cycle_batch(rows: &[(Iccid, Option<Carrier>, UsageSums)]) -> Result<RecordBatch, ArrowError> {
    let iccids: Vec<String> = rows.iter().map(|r| r.0.to_string()).collect();
    let mut c = Columns::new(table_schema(schema::CARD_CYCLE_USAGE_PARTS));
    c.utf8(iccids.iter().map(|s| Some(s.as_str())));
    c.dict(rows.iter().map(|r| r.1.map(Carrier::as_str)));
    sums_columns(&mut c, rows.iter().map(|r| &r.2));
    c.finish()
}

fn quarantine_batch(rows: &[Quarantined]) -> Result<RecordBatch, ArrowError> {
    let mut c = Columns::new(table_schema(schema::QUARANTINE));
    c.i64(rows.iter().map(|q| Some(to_i64(q.seq))));
    c.dict(rows.iter().map(|q| Some(q.reason.as_str())));
    c.utf8(rows.iter().map(|q| Some(q.message.as_str())));
    c.utf8(rows.iter().map(|q| q.iccid.as_deref()));
    c.utf8(rows.iter().map(|q| q.record_id.as_deref()));
    c.dict(
        rows.iter()
            .map(|q| q.source.as_ref().map(|s| s.topic.as_str())),
    );
    c.i32(rows.iter().map(|q| q.source.as_ref().map(|s| s.partition)));
    c.i64(rows.iter().map(|q| q.source.as_ref().map(|s| s.offset)));
    c.ts(rows
        .iter()
        .map(|q| q.source.as_ref().and_then(|s| s.timestamp_ms)));
    c.binary(rows.iter().map(|q| q.raw.as_slice()));
    c.finish()
}

struct ChangeText {
    subject: &'static str,
    iccid: Option<String>,
    pool: Option<String>,
    old: String,
    new: String,
    reasons: String,
    event_time: i64,
    processed_at: Option<i64>,
    cycle: String,
    usage: u64,
    limit: Option<u64>,
    overshoot: Option<u64>,
    cause: &'static str,
    cause_id: String,
    cause_iccid: Option<String>,
}

fn cause_text(c: &Cause) -> (&'static str, String, Option<String>) {
    {
        match c {
            Cause::Record { iccid, record_id } => (
                "record",
                record_id.as_str().to_owned(),
                Some(iccid.to_string()),
            ),
            Cause::Command { command_id } => ("command", command_id.as_str().to_owned(), None),
            Cause::Rollover { cycle } => ("rollover", cycle.to_string(), None),
            Cause::Deadline { kind, at } => (
                "deadline",
                format!("{}@{}", serde_name(kind), at.to_rfc3339(0)),
                None,
            ),
        }
    }
}

fn change_text(e: &ActionEvent) -> ChangeText {
    let (cause, cause_id, cause_iccid) = cause_text(match e {
        ActionEvent::CardState(c) => &c.cause,
        ActionEvent::PoolState(p) => &p.cause,
    });
    match e {
        ActionEvent::CardState(c) => ChangeText {
            subject: "card",
            iccid: Some(c.iccid.to_string()),
            pool: None,
            old: c.old.as_str().to_owned(),
            new: c.new.as_str().to_owned(),
            reasons: reasons_text(c.reasons),
            event_time: c.event_time.0,
            processed_at: c.processed_at.map(|t| t.0),
            cycle: c.cycle.to_string(),
            usage: c.usage_bytes,
            limit: c.limit_bytes,
            overshoot: c.overshoot_bytes,
            cause,
            cause_id,
            cause_iccid,
        },
        ActionEvent::PoolState(p) => ChangeText {
            subject: "pool",
            iccid: None,
            pool: Some(p.pool.to_string()),
            old: serde_name(&p.old),
            new: serde_name(&p.new),
            reasons: String::new(),
            event_time: p.event_time.0,
            processed_at: p.processed_at.map(|t| t.0),
            cycle: p.cycle.to_string(),
            usage: p.usage_bytes,
            limit: p.limit_bytes,
            overshoot: p.overshoot_bytes,
            cause,
            cause_id,
            cause_iccid,
        },
    }
}

fn changes_batch(rows: &[StateChange]) -> Result<RecordBatch, ArrowError> {
    let t: Vec<ChangeText> = rows.iter().map(|r| change_text(&r.event)).collect();
    let mut c = Columns::new(table_schema(schema::STATE_CHANGES));
    c.utf8(rows.iter().map(|r| Some(r.event.id())));
    c.dict(t.iter().map(|x| Some(x.subject)));
    c.utf8(t.iter().map(|x| x.iccid.as_deref()));
    c.utf8(t.iter().map(|x| x.pool.as_deref()));
    c.dict(t.iter().map(|x| Some(x.old.as_str())));
    c.dict(t.iter().map(|x| Some(x.new.as_str())));
    c.utf8(t.iter().map(|x| Some(x.reasons.as_str())));
    c.ts(t.iter().map(|x| Some(x.event_time)));
    c.ts(t.iter().map(|x| x.processed_at));
    c.dict(t.iter().map(|x| Some(x.cycle.as_str())));
    c.i64(t.iter().map(|x| Some(to_i64(x.usage))));
    c.i64(t.iter().map(|x| opt_i64(x.limit)));
    c.i64(t.iter().map(|x| opt_i64(x.overshoot)));
    c.dict(t.iter().map(|x| Some(x.cause)));
    c.utf8(t.iter().map(|x| Some(x.cause_id.as_str())));
    c.utf8(t.iter().map(|x| x.cause_iccid.as_deref()));
    c.finish()
}

fn journal_batch(rows: &[JournalRow]) -> Result<RecordBatch, ArrowError> {
    let mut c = Columns::new(table_schema(schema::COMMAND_JOURNAL));
    c.i64(rows.iter().map(|r| Some(to_i64(r.seq))));
    c.utf8(rows.iter().map(|r| Some(r.command_id.as_str())));
    c.dict(rows.iter().map(|r| r.command_type.as_deref()));
    c.ts(rows.iter().map(|r| r.at));
    c.utf8(rows.iter().map(|r| r.operator.as_deref()));
    c.bool(rows.iter().map(|r| r.ok));
    c.dict(rows.iter().map(|r| r.error_code.as_deref()));
    c.utf8(rows.iter().map(|r| r.error_message.as_deref()));
    c.i64(rows.iter().map(|r| Some(r.failed_cards)));
    c.bool(rows.iter().map(|r| r.repeat));
    c.utf8(rows.iter().map(|r| Some(r.command.as_str())));
    c.utf8(rows.iter().map(|r| Some(r.result.as_str())));
    c.finish()
}

fn pools_batch(
    rows: &[&PoolView],
    through: u64,
    clock: Timestamp,
) -> Result<RecordBatch, ArrowError> {
    let ids: Vec<String> = rows.iter().map(|p| p.id.to_string()).collect();
    let kinds: Vec<String> = rows.iter().map(|p| serde_name(&p.kind)).collect();
    let states: Vec<String> = rows.iter().map(|p| serde_name(&p.state)).collect();
    let mut c = Columns::new(table_schema(schema::POOL_CYCLE_USAGE));
    c.utf8(ids.iter().map(|s| Some(s.as_str())));
    c.utf8(rows.iter().map(|p| Some(p.name.as_str())));
    c.dict(kinds.iter().map(|s| Some(s.as_str())));
    c.dict(rows.iter().map(|p| p.carrier.map(Carrier::as_str)));
    c.dict(states.iter().map(|s| Some(s.as_str())));
    c.i64(rows.iter().map(|p| Some(p.members.len() as i64)));
    c.i64(rows.iter().map(|p| Some(to_i64(p.usage_bytes))));
    c.i64(rows.iter().map(|p| Some(to_i64(p.allowance_bytes))));
    c.i64(
        rows.iter()
            .map(|p| Some(to_i64(p.allowance_bytes) - to_i64(p.usage_bytes))),
    );
    c.ts(rows.iter().map(|_| Some(clock.0)));
    c.i64(rows.iter().map(|_| Some(to_i64(through))));
    c.finish()
}

fn cards_batch(
    rows: &[CardView],
    through: u64,
    clock: Timestamp,
) -> Result<RecordBatch, ArrowError> {
    let iccids: Vec<String> = rows.iter().map(|r| r.iccid.to_string()).collect();
    let cycles: Vec<String> = rows.iter().map(|r| r.cycle.to_string()).collect();
    let reasons: Vec<String> = rows.iter().map(|r| reasons_text(r.reasons)).collect();
    let plans: Vec<Option<String>> = rows
        .iter()
        .map(|r| r.plan.as_ref().map(|p| p.to_string()))
        .collect();
    let pools: Vec<Option<String>> = rows
        .iter()
        .map(|r| r.pool.as_ref().map(|p| p.to_string()))
        .collect();
    let tags: Vec<String> = rows
        .iter()
        .map(|r| {
            r.tags
                .iter()
                .map(|t| t.as_str())
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    let mut c = Columns::new(table_schema(schema::CARDS));
    c.utf8(iccids.iter().map(|s| Some(s.as_str())));
    c.dict(rows.iter().map(|r| Some(r.carrier.as_str())));
    c.utf8(plans.iter().map(|p| p.as_deref()));
    c.dict(rows.iter().map(|r| Some(r.state.as_str())));
    c.utf8(reasons.iter().map(|s| Some(s.as_str())));
    c.dict(cycles.iter().map(|s| Some(s.as_str())));
    c.i64(rows.iter().map(|r| Some(to_i64(r.usage_bytes))));
    c.i64(rows.iter().map(|r| Some(r.threshold_mb)));
    c.i64(rows.iter().map(|r| Some(to_i64(r.addon_mb))));
    c.utf8(pools.iter().map(|p| p.as_deref()));
    c.utf8(tags.iter().map(|s| Some(s.as_str())));
    c.ts(rows.iter().map(|r| r.activated_at.map(|t| t.0)));
    c.ts(rows.iter().map(|r| r.expires_at.map(|t| t.0)));
    c.utf8(rows.iter().map(|r| r.msisdn.as_deref()));
    c.utf8(rows.iter().map(|r| r.imsi.as_deref()));
    c.utf8(rows.iter().map(|r| r.imei.as_deref()));
    c.ts(rows.iter().map(|_| Some(clock.0)));
    c.i64(rows.iter().map(|_| Some(to_i64(through))));
    c.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowcap_engine::record::Usage;
    use flowcap_engine::RecordId;

    fn accounted(seq: u64, iccid: u64, end_ms: i64) -> Accounted {
        Accounted {
            seq,
            usage: Usage {
                record_id: RecordId::new(&format!("r{seq}")).unwrap(),
                iccid: Iccid::parse(&format!("8986{iccid:015}")).unwrap(),
                start: None,
                end: Timestamp(end_ms),
                bytes_up: 10,
                bytes_down: 5,
                carrier: Some(Carrier::Cmcc),
            },
            cycle: CycleId::new(2026, 11),
            counted: true,
            late: false,
        }
    }

    fn files(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_owned()];
        while let Some(dir) = stack.pop() {
            for p in read_dir(&dir).unwrap() {
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p.strip_prefix(root).unwrap().display().to_string());
                }
            }
        }
        out.sort();
        out
    }

    const DAY: i64 = 1_795_000_000_000;

    #[test]
    fn restart_keeps_the_snapshotted_windows_and_drops_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("history");
        let mut w = HistoryWriter::open(&root, None, HistoryOptions::default()).unwrap();
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
        w.write_chunk().unwrap();
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

        let _w = HistoryWriter::open(&root, Some(9), HistoryOptions::default()).unwrap();
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
        let _w = HistoryWriter::open(&root, None, HistoryOptions::default()).unwrap();
        assert!(files(&root).is_empty());
    }

    #[test]
    fn chunks_roll_by_rows_within_a_window() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("history");
        let options = HistoryOptions {
            roll_rows: 4,
            ..HistoryOptions::default()
        };
        let mut w = HistoryWriter::open(&root, None, options).unwrap();
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
}
