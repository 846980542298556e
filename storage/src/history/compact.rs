//! Compaction: merges the many small files the writer leaves behind into
//! few large ones.
//!
//! # Why
//!
//! The writer closes a file set at every snapshot (every minute in Kafka
//! mode), so a day partition collects hundreds of small files; a year of
//! them makes every query list and open tens of thousands of files, and
//! the `*_parts` delta tables keep one row per card per window where one
//! per card per day would do. Compaction rewrites a run of small files of
//! one partition as one file: raw tables sorted again (ICCID, then time),
//! delta tables summed per card (and day or cycle), so the aggregate views
//! read one row per card per partition.
//!
//! # Exactly once, still
//!
//! Only windows up to the *oldest snapshot kept* are merged: whichever
//! snapshot a restart restores, it keeps every file of those windows, so a
//! merged file is never half-replayed. The merged file is named by the
//! range of windows it covers, `part-<first from>-m<last from>.parquet`;
//! it is written atomically, and then its inputs are deleted. A crash
//! between the two leaves inputs whose range lies inside a merged file's:
//! [`super::recover`] deletes them on restart, so no row is ever counted
//! twice by a reader after recovery. (A query running at the very moment
//! between the merged file's rename and its inputs' deletion can see both:
//! that is the one window, a few milliseconds per merge, in which a reader
//! may double count. Dumps (`cards`, `pool_cycle_usage`) are never merged:
//! each replaces the previous one.)
//!
//! A run of files to merge is contiguous in window order: a big file in the
//! middle of a partition ends a run, so that a merged range never contains
//! a file that was not merged into it. A merged file is merged again only
//! with at least as many bytes of new files, so a row is rewritten a few
//! times on its way to a full-size file, not once per merge.
//!
//! # Merged, not sorted again
//!
//! The encoder writes every file of a raw table already sorted (usage by
//! ICCID, end time and input sequence; quarantine and the command journal
//! by input sequence; deliveries by time and execution id), so those are
//! merged k ways, comparing the sort columns in Arrow's row format, and
//! their rows gathered in that order: no sort. Each input's order is
//! checked as it is merged; a file out of order (one written by an older
//! build, say) sends the whole merge to a sort instead, so the merged
//! file is sorted either way. The ICCID is compared as text on both sides:
//! [`flowcap_engine::Iccid`] orders as its text does. The delta tables
//! (sorted by card) are merged the same way, the rows of one card and day
//! (or cycle and carrier) summed as they meet. Only the state changes and
//! rule firings, ordered by card or pool, are always sorted.
//!
//! Every sort here is Arrow's row format and a stable sort of row
//! indexes, ascending with nulls last as SQL's `ORDER BY` (the tests hold
//! each merge against DataFusion's SQL): the pipeline that writes the
//! history compiles no query engine.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use arrow::array::{Array, ArrayRef, AsArray, Int64Array, UInt64Array};
use arrow::compute::kernels::zip::zip;
use arrow::compute::{
    cast, concat_batches, interleave, interleave_record_batch, is_not_null, take_record_batch,
    SortOptions,
};
use arrow::datatypes::{Int64Type, SchemaRef};
use arrow::record_batch::RecordBatch;
use arrow::row::{RowConverter, Rows, SortField};
use crossbeam_channel::{Receiver, Sender};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::schema;
use super::{encode_parquet, file_range, is_dump, HistoryError, HistoryOptions};
use crate::location::{HistoryFiles, HistoryLocation, StoredFile};

/// When partitions are compacted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactionPolicy {
    /// Merge a partition once it has a run of at least this many small
    /// files (0: never compact).
    pub min_files: usize,
    /// Files at least this large are left alone, and a merge takes files
    /// until their sizes add up to this.
    pub target_bytes: u64,
    /// A merge stops reading inputs once they hold this many bytes decoded
    /// (Arrow memory), at the end of the window it is in, and merges what
    /// it has read: `target_bytes` counts compressed bytes, and a run of
    /// well-compressed files can decode to ten times as much.
    pub max_merge_bytes: usize,
}

impl Default for CompactionPolicy {
    fn default() -> Self {
        CompactionPolicy {
            min_files: 8,
            target_bytes: 64 << 20,
            max_merge_bytes: 256 << 20,
        }
    }
}

/// What the compactor has done, for metrics and tests.
#[derive(Debug, Default)]
pub struct CompactionStats {
    /// Merges done.
    pub merges: AtomicU64,
    /// Input files merged (and deleted).
    pub files_merged: AtomicU64,
    /// Merges that failed (logged; the inputs stay and are retried).
    pub failures: AtomicU64,
    /// Rows written into merged files.
    pub rows_written: AtomicU64,
    /// Wall-clock time spent merging, in nanoseconds (reading, merging and
    /// writing files).
    pub busy_nanos: AtomicU64,
    /// Merges of already-sorted tables that found an input out of order
    /// and sorted with SQL instead.
    pub sorted_again: AtomicU64,
    /// Requests (one per snapshot) the thread has not taken up yet: how far
    /// compaction is behind while it waits for idle CPU.
    pub requests_waiting: AtomicU64,
}

struct Job {
    /// Windows with a start up to this may be merged.
    through: u64,
    /// Partition directories (`table/col=value`) written to since the last
    /// job.
    dirs: BTreeSet<String>,
}

/// The background compaction thread (one per writer).
pub(crate) struct Compactor {
    jobs: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<CompactionStats>,
}

impl std::fmt::Debug for Compactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compactor").finish_non_exhaustive()
    }
}

impl Compactor {
    /// Starts the thread. `dirs` are the partitions to look at first (those
    /// with more than one file at open).
    pub(crate) fn start(
        location: HistoryLocation,
        options: HistoryOptions,
        dirs: BTreeSet<String>,
    ) -> Result<Compactor, HistoryError> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let stats = Arc::new(CompactionStats::default());
        let files = HistoryFiles::new(location)?;
        let thread_stats = Arc::clone(&stats);
        // Nothing waits for a merge but a shutdown: it runs on idle CPU.
        let thread = crate::background::spawn_when_idle("flowcap-compact", move || {
            run(files, options, dirs, rx, &thread_stats)
        })
        .map_err(|e| HistoryError::Compaction(e.to_string()))?;
        Ok(Compactor {
            jobs: Some(tx),
            thread: Some(thread),
            stats,
        })
    }

    /// Asks for the partitions in `dirs` (and any still pending) to be
    /// compacted up to window `through`. Never blocks.
    pub(crate) fn request(&self, through: u64, dirs: BTreeSet<String>) {
        if let Some(tx) = &self.jobs {
            // The thread only goes away on drop.
            let _ = tx.send(Job { through, dirs });
            self.stats
                .requests_waiting
                .store(tx.len() as u64, Ordering::Relaxed);
        }
    }

    pub(crate) fn stats(&self) -> Arc<CompactionStats> {
        Arc::clone(&self.stats)
    }
}

impl Drop for Compactor {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(
    files: HistoryFiles,
    options: HistoryOptions,
    mut watch: BTreeSet<String>,
    jobs: Receiver<Job>,
    stats: &CompactionStats,
) {
    while let Ok(first) = jobs.recv() {
        // Catch up: one pass for every job queued meanwhile.
        let mut through = first.through;
        watch.extend(first.dirs);
        for job in jobs.try_iter() {
            through = through.max(job.through);
            watch.extend(job.dirs);
        }
        stats
            .requests_waiting
            .store(jobs.len() as u64, Ordering::Relaxed);
        let mut done = BTreeSet::new();
        for dir in &watch {
            let started = Instant::now();
            match compact_dir(&files, dir, through, &options) {
                Ok(Outcome {
                    merged,
                    rows,
                    sorted_again,
                    settled,
                }) => {
                    if merged > 0 {
                        stats.merges.fetch_add(1, Ordering::Relaxed);
                        stats.files_merged.fetch_add(merged, Ordering::Relaxed);
                        stats.rows_written.fetch_add(rows, Ordering::Relaxed);
                        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                        stats.busy_nanos.fetch_add(nanos, Ordering::Relaxed);
                    }
                    if sorted_again {
                        stats.sorted_again.fetch_add(1, Ordering::Relaxed);
                    }
                    if settled {
                        done.insert(dir.clone());
                    }
                }
                Err(e) => {
                    stats.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(dir, error = %e, "history compaction failed; will retry");
                }
            }
            if !jobs.is_empty() {
                // New windows closed meanwhile: the writer comes first.
                break;
            }
        }
        for dir in done {
            watch.remove(&dir);
        }
    }
}

#[derive(Default)]
struct Outcome {
    /// Files merged.
    merged: u64,
    /// Rows in the merged file.
    rows: u64,
    /// Inputs of a sorted table were out of order: they were sorted again.
    sorted_again: bool,
    /// Nothing left to do in this partition until it is written to again.
    settled: bool,
}

impl Outcome {
    fn nothing(settled: bool) -> Outcome {
        Outcome {
            settled,
            ..Outcome::default()
        }
    }
}

fn compact_dir(
    files: &HistoryFiles,
    dir: &str,
    through: u64,
    options: &HistoryOptions,
) -> Result<Outcome, HistoryError> {
    let table = dir.split('/').next().unwrap_or("");
    let Some(how) = merge_of(table) else {
        return Ok(Outcome::nothing(true));
    };
    let listed = files.list_dir(dir)?;
    let pending = listed
        .iter()
        .filter_map(|f| file_range(f.name()))
        .any(|(from, _)| from > through);
    let Some(run) = plan(&listed, through, &options.compaction) else {
        return Ok(Outcome::nothing(!pending));
    };
    let def = schema::tables()
        .into_iter()
        .find(|t| t.name == table)
        .ok_or_else(|| HistoryError::Compaction(format!("unknown table {table}")))?;
    let inputs = read_inputs(&run, options.compaction.max_merge_bytes, |file| {
        read_file(files, file, &def.schema)
    })?;
    let run = &run[..inputs.len()];
    let first = run.first().and_then(|f| file_range(f.name()));
    let last = run.last().and_then(|f| file_range(f.name()));
    let (Some((from, _)), Some((_, to))) = (first, last) else {
        return Ok(Outcome::nothing(true));
    };
    let (merged, sorted_again) = match how {
        Merge::Sorted { keys } => match merge_sorted(&inputs, keys)? {
            Some(merged) => (merged, false),
            None => (sort_rows(&def.schema, &inputs, &columns(keys))?, true),
        },
        Merge::Summed { keys, max } => match merge_summed(&inputs, keys, max)? {
            Some(merged) => (merged, false),
            None => (sum_unsorted(&def.schema, &inputs, keys, max)?, true),
        },
        Merge::Ordered(keys) => (sort_rows(&def.schema, &inputs, keys)?, false),
    };
    let merged = conform(&def.schema, &merged)?;
    let name = format!("part-{from:020}-m{to:020}.parquet");
    let rel = format!("{dir}/{name}");
    files.put(&rel, encode_parquet(&merged, options, &rel)?)?;
    for file in run {
        if file.rel != rel {
            files.delete(&file.rel)?;
        }
    }
    tracing::debug!(
        dir,
        files = run.len(),
        rows = merged.num_rows(),
        sorted_again,
        "compacted"
    );
    Ok(Outcome {
        merged: run.len() as u64,
        rows: merged.num_rows() as u64,
        sorted_again,
        settled: false,
    })
}

/// The first files of `run` one merge reads, read by `read`: all of them,
/// or fewer once at least two are read and they hold `max_bytes` decoded.
/// It stops only where a window ends: the merged file is named by the
/// windows it covers, and a restart deletes every file inside that range,
/// so a window's chunks are merged together or not at all.
fn read_inputs(
    run: &[StoredFile],
    max_bytes: usize,
    mut read: impl FnMut(&StoredFile) -> Result<RecordBatch, HistoryError>,
) -> Result<Vec<RecordBatch>, HistoryError> {
    let mut inputs = Vec::with_capacity(run.len());
    let mut decoded = 0usize;
    let mut window = None;
    for file in run {
        let range = file_range(file.name());
        let new_window = window.is_some_and(|w| w != range);
        if inputs.len() >= 2 && decoded >= max_bytes && new_window {
            break;
        }
        window = Some(range);
        let batch = read(file)?;
        decoded = decoded.saturating_add(batch.get_array_memory_size());
        inputs.push(batch);
    }
    Ok(inputs)
}

/// One file's rows as one batch (files are a few MB; the merge holds all
/// of a run's in memory either way, up to
/// [`CompactionPolicy::max_merge_bytes`]).
fn read_file(
    files: &HistoryFiles,
    file: &StoredFile,
    schema: &SchemaRef,
) -> Result<RecordBatch, HistoryError> {
    let parquet_err = |source| HistoryError::Parquet {
        path: file.rel.clone(),
        source,
    };
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes_of(files.get(&file.rel)?))
        .map_err(parquet_err)?;
    let rows = usize::try_from(builder.metadata().file_metadata().num_rows()).unwrap_or(0);
    let reader = builder
        .with_batch_size(rows.max(1))
        .build()
        .map_err(parquet_err)?;
    let mut batches = reader.collect::<Result<Vec<_>, _>>()?;
    Ok(match batches.len() {
        0 => RecordBatch::new_empty(schema.clone()),
        1 => batches.swap_remove(0),
        _ => concat_batches(&batches[0].schema(), &batches)?,
    })
}

fn bytes_of(v: Vec<u8>) -> bytes::Bytes {
    bytes::Bytes::from(v)
}

/// How a table's files are merged.
#[derive(Debug, Clone, Copy)]
enum Merge {
    /// Each file is sorted by `keys` (ascending): merged k ways, or sorted
    /// again ([`sort_rows`]) if an input is not.
    Sorted { keys: &'static [&'static str] },
    /// Each file is sorted by `keys`: merged k ways and the rows of equal
    /// keys combined (`max` columns by their maximum, the others summed);
    /// sorted first ([`sum_unsorted`]) if an input is not.
    Summed {
        keys: &'static [&'static str],
        max: &'static [&'static str],
    },
    /// Ordered by `keys`, one of them computed: sorted ([`sort_rows`]).
    Ordered(&'static [Key]),
}

/// A sort key of [`sort_rows`].
#[derive(Debug, Clone, Copy)]
enum Key {
    /// A column.
    Column(&'static str),
    /// The first of two columns that is not null (SQL's `COALESCE`).
    Coalesce(&'static str, &'static str),
}

impl Key {
    /// This key's values for the rows of `batch`.
    fn of(self, batch: &RecordBatch) -> Result<ArrayRef, HistoryError> {
        let column = |name: &str| {
            batch.column_by_name(name).cloned().ok_or_else(|| {
                HistoryError::Compaction(format!("merge input has no column {name}"))
            })
        };
        match self {
            Key::Column(name) => column(name),
            Key::Coalesce(first, second) => {
                let (first, second) = (column(first)?, column(second)?);
                Ok(zip(&is_not_null(&first)?, &first, &second)?)
            }
        }
    }
}

/// `names` as [`Key::Column`]s.
fn columns(names: &[&'static str]) -> Vec<Key> {
    names.iter().map(|&name| Key::Column(name)).collect()
}

/// How a table is merged, or `None` for tables that are never merged.
fn merge_of(table: &str) -> Option<Merge> {
    Some(match table {
        schema::USAGE_RECORDS => Merge::Sorted {
            keys: &["iccid", "end_time", "input_seq"],
        },
        schema::QUARANTINE => Merge::Sorted {
            keys: &["input_seq"],
        },
        schema::COMMAND_JOURNAL => Merge::Sorted {
            keys: &["input_seq"],
        },
        schema::RULE_DELIVERIES => Merge::Sorted {
            keys: &["done_at", "execution_id"],
        },
        schema::CARD_DAILY_USAGE_PARTS => Merge::Summed {
            keys: &["iccid", "day"],
            max: &["through_seq"],
        },
        schema::CARD_CYCLE_USAGE_PARTS => Merge::Summed {
            keys: &["iccid", "carrier"],
            max: &["through_seq"],
        },
        schema::STATE_CHANGES => Merge::Ordered(&[
            Key::Coalesce("iccid", "pool_id"),
            Key::Column("event_time"),
            Key::Column("event_id"),
        ]),
        schema::RULE_EXECUTIONS => Merge::Ordered(&[
            Key::Coalesce("iccid", "pool_id"),
            Key::Column("fired_at"),
            Key::Column("execution_id"),
        ]),
        _ => return None,
    })
}

/// Every row of `inputs` (cast to `schema`, so that a file of an older
/// layout lines up) in the order of `keys`: ascending, nulls last, as
/// SQL's `ORDER BY`; rows of equal keys keep their input order.
fn sort_rows(
    schema: &SchemaRef,
    inputs: &[RecordBatch],
    keys: &[Key],
) -> Result<RecordBatch, HistoryError> {
    let inputs = inputs
        .iter()
        .map(|batch| conform(schema, batch))
        .collect::<Result<Vec<_>, _>>()?;
    let all = concat_batches(schema, &inputs)?;
    let mut values = Vec::with_capacity(keys.len());
    for key in keys {
        values.push(key.of(&all)?);
    }
    let options = SortOptions {
        descending: false,
        nulls_first: false,
    };
    let fields = values
        .iter()
        .map(|v| SortField::new_with_options(v.data_type().clone(), options))
        .collect();
    let rows = RowConverter::new(fields)?.convert_columns(&values)?;
    let mut order: Vec<usize> = (0..all.num_rows()).collect();
    order.sort_by(|&a, &b| rows.row(a).cmp(&rows.row(b)));
    let order = UInt64Array::from_iter_values(order.into_iter().map(|i| i as u64));
    Ok(take_record_batch(&all, &order)?)
}

/// [`merge_summed`] of inputs that are not each sorted (or not of one
/// layout): their rows sorted together first. A sum that does not fit, or
/// a column that is not a 64-bit integer without nulls, fails the merge
/// (the files stay as they are).
fn sum_unsorted(
    schema: &SchemaRef,
    inputs: &[RecordBatch],
    keys: &[&'static str],
    max: &[&str],
) -> Result<RecordBatch, HistoryError> {
    let sorted = sort_rows(schema, inputs, &columns(keys))?;
    merge_summed(&[sorted], keys, max)?.ok_or_else(|| {
        HistoryError::Compaction(format!(
            "cannot sum by {keys:?}: a column is not an integer without nulls, or a sum overflows"
        ))
    })
}

/// Merges inputs that are each sorted by `keys` into one sorted batch, or
/// `None` when an input is not sorted (the caller sorts instead).
fn merge_sorted(
    inputs: &[RecordBatch],
    keys: &[&str],
) -> Result<Option<RecordBatch>, HistoryError> {
    let Some(MergeOrder { order, .. }) = merge_order(inputs, keys)? else {
        return Ok(None);
    };
    let batches: Vec<&RecordBatch> = inputs.iter().collect();
    Ok(Some(interleave_record_batch(&batches, &order)?))
}

/// Merges inputs that are each sorted by `keys` and combines the rows of
/// equal keys: the `max` columns by their maximum, every other column
/// (each an `Int64` without nulls) summed. `None` when an input is not
/// sorted or not of that shape, or a sum overflows.
fn merge_summed(
    inputs: &[RecordBatch],
    keys: &[&str],
    max: &[&str],
) -> Result<Option<RecordBatch>, HistoryError> {
    let Some(MergeOrder { keys: rows, order }) = merge_order(inputs, keys)? else {
        return Ok(None);
    };
    // Where each run of equal keys starts in `order`.
    let mut starts = Vec::new();
    for (i, &(input, at)) in order.iter().enumerate() {
        let continues = i > 0 && {
            let (prev_input, prev_at) = order[i - 1];
            rows[prev_input].row(prev_at) == rows[input].row(at)
        };
        if !continues {
            starts.push(i);
        }
    }
    let firsts: Vec<(usize, usize)> = starts.iter().map(|&i| order[i]).collect();
    let schema = inputs[0].schema();
    let mut columns = Vec::with_capacity(schema.fields().len());
    for (c, field) in schema.fields().iter().enumerate() {
        let arrays: Vec<&dyn Array> = inputs.iter().map(|b| b.column(c).as_ref()).collect();
        if keys.contains(&field.name().as_str()) {
            columns.push(interleave(&arrays, &firsts)?);
            continue;
        }
        let mut values = Vec::with_capacity(arrays.len());
        for array in &arrays {
            match array.as_primitive_opt::<Int64Type>() {
                Some(v) if v.null_count() == 0 => values.push(v.values()),
                _ => return Ok(None),
            }
        }
        let take_max = max.contains(&field.name().as_str());
        let mut out = Vec::with_capacity(starts.len());
        for (run, &start) in starts.iter().enumerate() {
            let end = starts.get(run + 1).copied().unwrap_or(order.len());
            let mut acc = if take_max { i64::MIN } else { 0 };
            for &(input, at) in &order[start..end] {
                let v = values[input][at];
                acc = if take_max {
                    acc.max(v)
                } else {
                    match acc.checked_add(v) {
                        Some(sum) => sum,
                        None => return Ok(None),
                    }
                };
            }
            out.push(acc);
        }
        columns.push(Arc::new(Int64Array::from(out)) as ArrayRef);
    }
    Ok(Some(RecordBatch::try_new(schema, columns)?))
}

/// The k-way merge of sorted inputs.
struct MergeOrder {
    /// Each input's sort keys in Arrow's row format.
    keys: Vec<Rows>,
    /// Every row as (input, row), in order.
    order: Vec<(usize, usize)>,
}

/// The k-way merge of inputs each sorted by `keys`; `None` when an input
/// is not sorted or has another schema than the first.
fn merge_order(inputs: &[RecordBatch], keys: &[&str]) -> Result<Option<MergeOrder>, HistoryError> {
    let Some(first) = inputs.first() else {
        return Ok(None);
    };
    let schema = first.schema();
    let mut fields = Vec::with_capacity(keys.len());
    for key in keys {
        fields.push(SortField::new(
            schema.field_with_name(key)?.data_type().clone(),
        ));
    }
    let converter = RowConverter::new(fields)?;
    let mut rows: Vec<Rows> = Vec::with_capacity(inputs.len());
    for input in inputs {
        if input.schema() != schema {
            // A file of an older layout: sort_rows lines the columns up.
            return Ok(None);
        }
        let mut columns = Vec::with_capacity(keys.len());
        for key in keys {
            let column = input.column_by_name(key).ok_or_else(|| {
                HistoryError::Compaction(format!("merge input has no column {key}"))
            })?;
            columns.push(Arc::clone(column));
        }
        let converted = converter.convert_columns(&columns)?;
        if (1..converted.num_rows()).any(|i| converted.row(i - 1) > converted.row(i)) {
            return Ok(None);
        }
        rows.push(converted);
    }
    let total: usize = inputs.iter().map(RecordBatch::num_rows).sum();
    let mut order = Vec::with_capacity(total);
    // The smallest next row of each input; ties go to the earlier file.
    let mut heads = BinaryHeap::with_capacity(inputs.len());
    for (input, r) in rows.iter().enumerate() {
        if r.num_rows() > 0 {
            heads.push(Reverse((r.row(0), input, 0usize)));
        }
    }
    while let Some(mut head) = heads.peek_mut() {
        let Reverse((_, input, at)) = *head;
        order.push((input, at));
        if at + 1 < rows[input].num_rows() {
            *head = Reverse((rows[input].row(at + 1), input, at + 1));
        } else {
            std::collections::binary_heap::PeekMut::pop(head);
        }
    }
    Ok(Some(MergeOrder { keys: rows, order }))
}

/// `batch` cast to the table's schema (aggregates and dictionaries may
/// come out typed otherwise).
fn conform(schema: &SchemaRef, batch: &RecordBatch) -> Result<RecordBatch, HistoryError> {
    let mut columns = Vec::with_capacity(schema.fields().len());
    for field in schema.fields() {
        let column = batch.column_by_name(field.name()).ok_or_else(|| {
            HistoryError::Compaction(format!("merge lost column {}", field.name()))
        })?;
        columns.push(cast(column, field.data_type())?);
    }
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

/// The files of one partition to merge now: the first contiguous run (in
/// window order) of small files of windows up to `through` with at least
/// `min_files` files, cut to `target_bytes` at a window boundary.
fn plan(listed: &[StoredFile], through: u64, policy: &CompactionPolicy) -> Option<Vec<StoredFile>> {
    if policy.min_files < 2 {
        return None;
    }
    // Window groups: files sharing a range (a window's chunks, or one
    // merged file), in window order.
    let mut groups: Vec<((u64, u64), Vec<&StoredFile>)> = Vec::new();
    let mut parts: Vec<_> = listed
        .iter()
        .filter(|f| !f.name().starts_with('.') && !is_dump(f.name()))
        .filter_map(|f| Some((file_range(f.name())?, f)))
        .collect();
    parts.sort_by(|a, b| (a.0, &a.1.rel).cmp(&(b.0, &b.1.rel)));
    for (range, file) in parts {
        match groups.last_mut() {
            Some((r, files)) if *r == range => files.push(file),
            _ => groups.push((range, vec![file])),
        }
    }
    let mut run: Vec<&[&StoredFile]> = Vec::new();
    let mut best = None;
    let eligible = |range: (u64, u64), files: &[&StoredFile]| {
        range.1 <= through && files.iter().all(|f| f.size < policy.target_bytes)
    };
    let enough =
        |run: &[&[&StoredFile]]| run.iter().map(|g| g.len()).sum::<usize>() >= policy.min_files;
    for (range, files) in &groups {
        if eligible(*range, files) {
            run.push(files);
            continue;
        }
        let trimmed = without_big_head(std::mem::take(&mut run));
        if enough(&trimmed) {
            best = Some(trimmed);
            break;
        }
    }
    if best.is_none() {
        let trimmed = without_big_head(run);
        best = enough(&trimmed).then_some(trimmed);
    }
    let best = best?;
    let mut out = Vec::new();
    let mut bytes = 0u64;
    for group in best {
        if out.len() >= 2 && bytes >= policy.target_bytes {
            break;
        }
        for f in group {
            bytes += f.size;
            out.push((*f).clone());
        }
    }
    (out.len() >= 2).then_some(out)
}

/// `run` without its leading window groups that are larger than the rest
/// of the run together: a merged file is merged again only with at least
/// as many bytes of new rows, so each row is rewritten a logarithmic number
/// of times (at most ~log2 of the target over a window's size), not once
/// per merge until the file reaches the target.
fn without_big_head<'a, 'f>(mut run: Vec<&'a [&'f StoredFile]>) -> Vec<&'a [&'f StoredFile]> {
    let size = |group: &[&StoredFile]| group.iter().map(|f| f.size).sum::<u64>();
    let mut rest: u64 = run.iter().map(|g| size(g)).sum();
    let mut skip = 0;
    while skip + 1 < run.len() {
        let head = size(run[skip]);
        rest -= head;
        if head <= rest {
            break;
        }
        skip += 1;
    }
    run.drain(..skip);
    run
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, size: u64) -> StoredFile {
        StoredFile {
            rel: format!("usage_records/date=2026-11-01/{name}"),
            size,
        }
    }

    fn plain(from: u64, chunk: u32, size: u64) -> StoredFile {
        file(&format!("part-{from:020}-{chunk:04}.parquet"), size)
    }

    fn names(files: &[StoredFile]) -> Vec<&str> {
        files.iter().map(StoredFile::name).collect()
    }

    const POLICY: CompactionPolicy = CompactionPolicy {
        min_files: 3,
        target_bytes: 100,
        max_merge_bytes: usize::MAX,
    };

    #[test]
    fn merges_a_run_of_small_files_of_snapshotted_windows() {
        let listed = vec![
            plain(0, 0, 10),
            plain(10, 0, 10),
            plain(20, 0, 10),
            plain(30, 0, 10),
        ];
        // Windows from 30 on are not covered by the oldest snapshot.
        let run = plan(&listed, 29, &POLICY).unwrap();
        assert_eq!(run.len(), 3);
        assert!(plan(&listed, 19, &POLICY).is_none(), "too few files");
        assert!(plan(
            &listed,
            29,
            &CompactionPolicy {
                min_files: 0,
                ..POLICY
            }
        )
        .is_none());
    }

    #[test]
    fn a_big_file_ends_a_run_and_chunks_stay_together() {
        let listed = vec![
            plain(0, 0, 10),
            plain(0, 1, 10),
            plain(10, 0, 500),
            plain(20, 0, 10),
            plain(30, 0, 10),
            plain(30, 1, 10),
            file(&format!("part-{:020}-m{:020}.parquet", 40, 60), 20),
            file(&format!("part-{:020}-cards-0000.parquet", 70), 1),
        ];
        let run = plan(&listed, 100, &POLICY).unwrap();
        // Two files before the big one are too few: the run after it.
        assert_eq!(
            names(&run),
            vec![
                "part-00000000000000000020-0000.parquet",
                "part-00000000000000000030-0000.parquet",
                "part-00000000000000000030-0001.parquet",
                "part-00000000000000000040-m00000000000000000060.parquet",
            ]
        );
        // Cut at the target size, but never inside a window.
        let small = CompactionPolicy {
            target_bytes: 25,
            ..POLICY
        };
        let listed = vec![
            plain(0, 0, 20),
            plain(10, 0, 10),
            plain(10, 1, 10),
            plain(20, 0, 10),
        ];
        let run = plan(&listed, 100, &small).unwrap();
        assert_eq!(run.len(), 3, "{:?}", names(&run));
    }

    #[test]
    fn a_merged_file_waits_for_as_many_new_bytes() {
        let merged = |to: u64, size| file(&format!("part-{:020}-m{to:020}.parquet", 0), size);
        let listed = vec![
            merged(30, 40),
            plain(40, 0, 10),
            plain(50, 0, 10),
            plain(60, 0, 10),
        ];
        // 40 bytes merged, 30 new: only the new files are merged.
        let run = plan(&listed, 100, &POLICY).unwrap();
        assert_eq!(
            names(&run),
            vec![
                "part-00000000000000000040-0000.parquet",
                "part-00000000000000000050-0000.parquet",
                "part-00000000000000000060-0000.parquet",
            ]
        );
        // 40 merged and 40 new: all together.
        let mut more = listed.clone();
        more.push(plain(70, 0, 10));
        assert_eq!(plan(&more, 100, &POLICY).unwrap().len(), 5);
        // Too few new files once the merged one is left out.
        assert!(plan(&listed[..3], 100, &POLICY).is_none());
    }

    #[test]
    fn a_merge_reads_up_to_its_memory_bound_and_never_splits_a_window() {
        let run = vec![
            plain(0, 0, 10),
            plain(10, 0, 10),
            plain(10, 1, 10),
            plain(10, 2, 10),
            plain(20, 0, 10),
            plain(30, 0, 10),
        ];
        let one = usage(&[("8986", 1, 1), ("8987", 2, 2)]);
        let size = one.get_array_memory_size();
        let taken = |max_bytes: usize| {
            let mut read = Vec::new();
            let inputs = read_inputs(&run, max_bytes, |f| {
                read.push(f.name().to_owned());
                Ok(one.clone())
            })
            .unwrap();
            assert_eq!(inputs.len(), read.len(), "reads only what it merges");
            inputs.len()
        };
        assert_eq!(taken(usize::MAX), 6, "no bound: the whole run");
        // Two files hold the bound, but the second window has two more
        // chunks: all of it, not a file more.
        assert_eq!(taken(2 * size), 4);
        // Always at least two files.
        assert_eq!(taken(0), 4, "the second file's window is read whole");
        let singles = [plain(0, 0, 10), plain(10, 0, 10), plain(20, 0, 10)];
        let inputs = read_inputs(&singles, 0, |_| Ok(one.clone())).unwrap();
        assert_eq!(inputs.len(), 2);
        // The bound reached with the fifth file, at a window's end.
        assert_eq!(taken(5 * size), 5);
    }

    /// A usage-shaped batch of (iccid, end_time, input_seq) rows.
    fn usage(rows: &[(&str, i64, i64)]) -> RecordBatch {
        use arrow::array::{Int64Array, StringArray};
        use arrow::datatypes::{DataType, Field, Schema};
        let schema = Arc::new(Schema::new(vec![
            Field::new("iccid", DataType::Utf8, false),
            Field::new("end_time", DataType::Int64, false),
            Field::new("input_seq", DataType::Int64, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.2))),
            ],
        )
        .unwrap()
    }

    const KEYS: &[&str] = &["iccid", "end_time", "input_seq"];

    /// DataFusion's answer to `sql` over `inputs` (as table `t`): the
    /// oracle every merge is held against.
    fn sql(inputs: Vec<RecordBatch>, sql: &str) -> RecordBatch {
        use datafusion::datasource::MemTable;
        use datafusion::prelude::SessionContext;
        let schema = inputs[0].schema();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let ctx = SessionContext::new();
            let table = MemTable::try_new(schema.clone(), vec![inputs]).unwrap();
            ctx.register_table("t", Arc::new(table)).unwrap();
            let out = ctx.sql(sql).await.unwrap().collect().await.unwrap();
            let out_schema = out.first().map_or_else(|| schema.clone(), |b| b.schema());
            concat_batches(&out_schema, &out).unwrap()
        })
    }

    fn sql_sorted(inputs: Vec<RecordBatch>) -> RecordBatch {
        sql(
            inputs,
            "SELECT * FROM t ORDER BY iccid, end_time, input_seq",
        )
    }

    #[test]
    fn sorted_inputs_merge_to_what_the_sql_sort_gives() {
        // Mixed 19- and 20-digit ICCIDs, one card in several files, equal
        // end times told apart by the input sequence, an empty input.
        let inputs = vec![
            usage(&[
                ("8986000000000000000", 5, 1),
                ("89860000000000000001", 3, 2),
                ("8986000000000000002", 1, 3),
            ]),
            usage(&[]),
            usage(&[
                ("0986000000000000009", 9, 9),
                ("8986000000000000000", 5, 0),
                ("8986000000000000000", 7, 4),
                ("8986000000000000002", 1, 5),
            ]),
            usage(&[
                ("89860000000000000001", 1, 6),
                ("8986000000000000003", 2, 7),
            ]),
        ];
        let merged = merge_sorted(&inputs, KEYS)
            .unwrap()
            .expect("inputs are sorted");
        assert_eq!(merged, sql_sorted(inputs));
        assert_eq!(merged.num_rows(), 9);
    }

    /// A delta-shaped batch of (iccid, day, records, through_seq) rows.
    fn deltas(rows: &[(&str, i64, i64, i64)]) -> RecordBatch {
        use arrow::datatypes::{DataType, Field, Schema};
        let schema = Arc::new(Schema::new(vec![
            Field::new("iccid", DataType::Utf8, false),
            Field::new("day", DataType::Int64, false),
            Field::new("records", DataType::Int64, false),
            Field::new("through_seq", DataType::Int64, false),
        ]));
        let ints = |f: fn(&(&str, i64, i64, i64)) -> i64| -> ArrayRef {
            Arc::new(Int64Array::from_iter_values(rows.iter().map(f)))
        };
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(arrow::array::StringArray::from_iter_values(
                    rows.iter().map(|r| r.0),
                )),
                ints(|r| r.1),
                ints(|r| r.2),
                ints(|r| r.3),
            ],
        )
        .unwrap()
    }

    const DELTAS_SQL: &str = "SELECT iccid, day, SUM(records) AS records, \
        MAX(through_seq) AS through_seq FROM t GROUP BY iccid, day ORDER BY iccid, day";

    #[test]
    fn sorted_deltas_merge_to_what_the_sql_sum_gives() {
        let inputs = vec![
            deltas(&[
                ("8986000000000000000", 1, 2, 10),
                ("89860000000000000001", 1, 1, 11),
                ("8986000000000000002", 1, 5, 12),
            ]),
            deltas(&[
                ("8986000000000000000", 1, 3, 20),
                ("8986000000000000002", 1, 1, 9),
                ("8986000000000000002", 2, 4, 21),
            ]),
            deltas(&[("89860000000000000001", 1, 7, 30)]),
        ];
        let merged = merge_summed(&inputs, &["iccid", "day"], &["through_seq"])
            .unwrap()
            .expect("inputs are sorted");
        let sql = sql(inputs.clone(), DELTAS_SQL);
        assert_eq!(merged, conform(&inputs[0].schema(), &sql).unwrap());
        // Four (card, day) rows: 5, 8, 6 and 4 records.
        let records = merged.column(2).as_primitive::<Int64Type>();
        assert_eq!(records.values().to_vec(), vec![5, 8, 6, 4]);
    }

    #[test]
    fn an_input_out_of_order_is_sorted_as_the_sql_sort_does() {
        let inputs = vec![
            usage(&[("8986000000000000000", 5, 1)]),
            // Ordered by the ICCID's number, not its text.
            usage(&[
                ("8986000000000000002", 1, 3),
                ("89860000000000000001", 3, 2),
            ]),
            usage(&[("8986000000000000000", 5, 0), ("0986000000000000009", 9, 9)]),
        ];
        assert!(merge_sorted(&inputs, KEYS).unwrap().is_none());
        let sorted = sort_rows(&inputs[0].schema(), &inputs, &columns(KEYS)).unwrap();
        assert_eq!(sorted, sql_sorted(inputs));
        assert_eq!(sorted.num_rows(), 5);
    }

    #[test]
    fn unsorted_deltas_sum_to_what_the_sql_sum_gives() {
        let inputs = vec![
            deltas(&[
                ("8986000000000000002", 1, 5, 12),
                ("8986000000000000000", 1, 2, 10),
            ]),
            deltas(&[
                ("8986000000000000000", 1, 3, 20),
                ("89860000000000000001", 1, 1, 11),
                ("8986000000000000002", 1, 1, 9),
            ]),
        ];
        assert!(merge_summed(&inputs, &["iccid", "day"], &["through_seq"])
            .unwrap()
            .is_none());
        let schema = inputs[0].schema();
        let summed = sum_unsorted(&schema, &inputs, &["iccid", "day"], &["through_seq"]).unwrap();
        let sql = sql(inputs, DELTAS_SQL);
        assert_eq!(summed, conform(&schema, &sql).unwrap());
        assert_eq!(summed.num_rows(), 3);
    }

    #[test]
    fn a_sum_that_overflows_fails_the_merge() {
        let inputs = vec![
            deltas(&[("8986000000000000000", 1, i64::MAX, 1)]),
            deltas(&[("8986000000000000000", 1, 1, 2)]),
        ];
        let keys = &["iccid", "day"];
        assert!(merge_summed(&inputs, keys, &["through_seq"])
            .unwrap()
            .is_none());
        let schema = inputs[0].schema();
        assert!(matches!(
            sum_unsorted(&schema, &inputs, keys, &["through_seq"]),
            Err(HistoryError::Compaction(_))
        ));
    }

    #[test]
    fn state_changes_sort_by_card_or_pool_as_the_sql_does() {
        use arrow::array::StringArray;
        use arrow::datatypes::{DataType, Field, Schema};
        let layout = Arc::new(Schema::new(vec![
            Field::new("iccid", DataType::Utf8, true),
            Field::new("pool_id", DataType::Utf8, true),
            Field::new("event_time", DataType::Int64, false),
            Field::new("event_id", DataType::Utf8, false),
        ]));
        let batch = |rows: &[(Option<&str>, Option<&str>, i64, &str)]| {
            RecordBatch::try_new(
                layout.clone(),
                vec![
                    Arc::new(StringArray::from_iter(rows.iter().map(|r| r.0))),
                    Arc::new(StringArray::from_iter(rows.iter().map(|r| r.1))),
                    Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.2))),
                    Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.3))),
                ],
            )
            .unwrap()
        };
        // Cards and pools interleave by id; a card's row names its pool
        // too; equal times are told apart by the event id.
        let inputs = vec![
            batch(&[
                (Some("8986000000000000002"), None, 5, "e1"),
                (None, Some("pool-a"), 3, "e2"),
                (Some("8986000000000000001"), Some("pool-z"), 7, "e3"),
            ]),
            batch(&[
                (None, Some("8986000000000000001x"), 1, "e4"),
                (Some("8986000000000000002"), None, 5, "e0"),
                (Some("8986000000000000001"), None, 2, "e5"),
            ]),
        ];
        let Some(Merge::Ordered(keys)) = merge_of(schema::STATE_CHANGES) else {
            panic!("state changes are sorted by an expression");
        };
        let sorted = sort_rows(&layout, &inputs, keys).unwrap();
        let want = sql(
            inputs,
            "SELECT * FROM t ORDER BY COALESCE(iccid, pool_id), event_time, event_id",
        );
        assert_eq!(sorted, want);
        let ids = sorted.column(3).as_string::<i32>();
        assert_eq!(ids.value(0), "e5");
        assert_eq!(ids.value(5), "e2");
    }
}
