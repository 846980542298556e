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
//! a file that was not merged into it.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use datafusion::arrow::compute::cast;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::datasource::MemTable;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use datafusion::prelude::SessionContext;

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
}

impl Default for CompactionPolicy {
    fn default() -> Self {
        CompactionPolicy {
            min_files: 8,
            target_bytes: 64 << 20,
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
        let thread = crate::background::spawn("flowcap-compact", move || {
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
    let runtime = match tokio::runtime::Builder::new_current_thread().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "history compaction cannot start");
            return;
        }
    };
    while let Ok(first) = jobs.recv() {
        // Catch up: one pass for every job queued meanwhile.
        let mut through = first.through;
        watch.extend(first.dirs);
        for job in jobs.try_iter() {
            through = through.max(job.through);
            watch.extend(job.dirs);
        }
        let mut done = BTreeSet::new();
        for dir in &watch {
            match compact_dir(&files, &runtime, dir, through, &options) {
                Ok(Outcome { merged, settled }) => {
                    if merged > 0 {
                        stats.merges.fetch_add(1, Ordering::Relaxed);
                        stats.files_merged.fetch_add(merged, Ordering::Relaxed);
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

struct Outcome {
    /// Files merged.
    merged: u64,
    /// Nothing left to do in this partition until it is written to again.
    settled: bool,
}

fn compact_dir(
    files: &HistoryFiles,
    runtime: &tokio::runtime::Runtime,
    dir: &str,
    through: u64,
    options: &HistoryOptions,
) -> Result<Outcome, HistoryError> {
    let table = dir.split('/').next().unwrap_or("");
    let Some(sql) = merge_sql(table) else {
        return Ok(Outcome {
            merged: 0,
            settled: true,
        });
    };
    let listed = files.list_dir(dir)?;
    let pending = listed
        .iter()
        .filter_map(|f| file_range(f.name()))
        .any(|(from, _)| from > through);
    let Some(run) = plan(&listed, through, &options.compaction) else {
        return Ok(Outcome {
            merged: 0,
            settled: !pending,
        });
    };
    let first = run.first().and_then(|f| file_range(f.name()));
    let last = run.last().and_then(|f| file_range(f.name()));
    let (Some((from, _)), Some((_, to))) = (first, last) else {
        return Ok(Outcome {
            merged: 0,
            settled: true,
        });
    };
    let mut batches = Vec::new();
    for file in &run {
        let bytes = bytes_of(files.get(&file.rel)?);
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .and_then(|b| b.build())
            .map_err(|source| HistoryError::Parquet {
                path: file.rel.clone(),
                source,
            })?;
        for batch in reader {
            batches.push(batch?);
        }
    }
    let def = schema::tables()
        .into_iter()
        .find(|t| t.name == table)
        .ok_or_else(|| HistoryError::Compaction(format!("unknown table {table}")))?;
    let merged = runtime.block_on(merge(def.schema.clone(), batches, sql))?;
    let name = format!("part-{from:020}-m{to:020}.parquet");
    let rel = format!("{dir}/{name}");
    files.put(&rel, encode_parquet(&merged, options, &rel)?)?;
    for file in &run {
        if file.rel != rel {
            files.delete(&file.rel)?;
        }
    }
    tracing::debug!(
        dir,
        files = run.len(),
        rows = merged.num_rows(),
        "compacted"
    );
    Ok(Outcome {
        merged: run.len() as u64,
        settled: false,
    })
}

fn bytes_of(v: Vec<u8>) -> bytes::Bytes {
    bytes::Bytes::from(v)
}

/// The query that merges a table's rows (from `t`), or `None` for tables
/// that are never merged.
fn merge_sql(table: &str) -> Option<&'static str> {
    Some(match table {
        schema::USAGE_RECORDS => "SELECT * FROM t ORDER BY iccid, end_time, input_seq",
        schema::QUARANTINE => "SELECT * FROM t ORDER BY input_seq",
        schema::CARD_DAILY_USAGE_PARTS => {
            "SELECT iccid, day, SUM(records) AS records, SUM(bytes_up) AS bytes_up, \
             SUM(bytes_down) AS bytes_down, SUM(bytes) AS bytes, \
             SUM(late_records) AS late_records, SUM(late_bytes) AS late_bytes, \
             MAX(through_seq) AS through_seq \
             FROM t GROUP BY iccid, day ORDER BY iccid, day"
        }
        schema::CARD_CYCLE_USAGE_PARTS => {
            "SELECT iccid, carrier, SUM(records) AS records, SUM(bytes_up) AS bytes_up, \
             SUM(bytes_down) AS bytes_down, SUM(bytes) AS bytes, \
             SUM(late_records) AS late_records, SUM(late_bytes) AS late_bytes, \
             MAX(through_seq) AS through_seq \
             FROM t GROUP BY iccid, carrier ORDER BY iccid"
        }
        schema::STATE_CHANGES => {
            "SELECT * FROM t ORDER BY COALESCE(iccid, pool_id), event_time, event_id"
        }
        schema::RULE_EXECUTIONS => {
            "SELECT * FROM t ORDER BY COALESCE(iccid, pool_id), fired_at, execution_id"
        }
        schema::RULE_DELIVERIES => "SELECT * FROM t ORDER BY done_at, execution_id",
        schema::COMMAND_JOURNAL => "SELECT * FROM t ORDER BY input_seq",
        _ => return None,
    })
}

/// Runs `sql` over `batches` and casts the result back to the table's
/// schema (aggregates and dictionaries may come out typed otherwise).
async fn merge(
    schema: datafusion::arrow::datatypes::SchemaRef,
    batches: Vec<RecordBatch>,
    sql: &str,
) -> Result<RecordBatch, HistoryError> {
    let df_err = |e: datafusion::error::DataFusionError| HistoryError::Compaction(e.to_string());
    let ctx = SessionContext::new();
    let input = MemTable::try_new(schema.clone(), vec![batches]).map_err(df_err)?;
    ctx.register_table("t", Arc::new(input)).map_err(df_err)?;
    let out = ctx.sql(sql).await.map_err(df_err)?;
    let out = out.collect().await.map_err(df_err)?;
    let out_schema = out.first().map_or_else(|| schema.clone(), |b| b.schema());
    let one = datafusion::arrow::compute::concat_batches(&out_schema, &out)?;
    let mut columns = Vec::with_capacity(schema.fields().len());
    for field in schema.fields() {
        let column = one.column_by_name(field.name()).ok_or_else(|| {
            HistoryError::Compaction(format!("merge lost column {}", field.name()))
        })?;
        columns.push(cast(column, field.data_type())?);
    }
    Ok(RecordBatch::try_new(schema, columns)?)
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
    for (range, files) in &groups {
        if eligible(*range, files) {
            run.push(files);
            continue;
        }
        if run.iter().map(|g| g.len()).sum::<usize>() >= policy.min_files {
            best = Some(std::mem::take(&mut run));
            break;
        }
        run.clear();
    }
    if best.is_none() && run.iter().map(|g| g.len()).sum::<usize>() >= policy.min_files {
        best = Some(run);
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
            min_files: 3,
            target_bytes: 25,
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
}
