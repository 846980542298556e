//! Encoding and storing history chunks on a thread of their own.
//!
//! A chunk (up to [`HistoryOptions::roll_rows`] rows of every table) is
//! sorted, built into Arrow batches, encoded as zstd Parquet and stored
//! with two fsyncs per file. On the writer thread that took about a second
//! per 262,144 rows, during which no output left the writer: the shards
//! blocked on its full channel, the driver on the shards, and the Kafka
//! pipeline's throughput fell to zero every few seconds (and every action
//! emitted meanwhile waited). Here the writer hands the chunk over and
//! goes on buffering the next one; it waits only when one more chunk is
//! already queued (memory stays bounded: at most three chunks exist) and
//! at a snapshot, which must not be written before its window's files are
//! durable ([`ChunkEncoder::settle`]).

use std::collections::HashMap;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};
use flowcap_engine::event::Accounted;
use flowcap_engine::{Carrier, CycleId, Iccid};
use flowcap_rules::delivery::DeliveryRow;
use flowcap_rules::ExecutionRecord;

use super::{
    change_key, changes_batch, cycle_batch, daily_batch, date_value, deliveries_batch,
    executions_batch, journal_batch, quarantine_batch, schema, usage_batch, write_file,
    HistoryError, HistoryOptions, JournalRow, Partitioning, Quarantined, StateChange, UsageSums,
};
use crate::location::{HistoryFiles, HistoryLocation};

/// The rows of one chunk, per table and partition.
#[derive(Default)]
pub(super) struct ChunkRows {
    pub(super) usage: HashMap<i64, Vec<Accounted>>,
    pub(super) daily: HashMap<(i64, Iccid), UsageSums>,
    pub(super) cycle: HashMap<(CycleId, Iccid), (Option<Carrier>, UsageSums)>,
    pub(super) quarantine: HashMap<i64, Vec<Quarantined>>,
    pub(super) changes: HashMap<i64, Vec<StateChange>>,
    pub(super) journal: HashMap<i64, Vec<JournalRow>>,
    pub(super) executions: HashMap<i64, Vec<ExecutionRecord>>,
    pub(super) deliveries: HashMap<i64, Vec<DeliveryRow>>,
}

/// What stored chunks added: files, and the partition directories they
/// went to (for the compactor).
#[derive(Debug, Default)]
pub(super) struct Written {
    pub(super) files: u64,
    pub(super) dirs: Vec<String>,
}

impl Written {
    fn add(&mut self, other: Written) {
        self.files += other.files;
        self.dirs.extend(other.dirs);
    }
}

struct Job {
    name: String,
    rows: ChunkRows,
}

/// The encoder thread and its two channels.
pub(super) struct ChunkEncoder {
    jobs: Option<Sender<Job>>,
    done: Receiver<Result<Written, HistoryError>>,
    /// Chunks handed over and not yet reported back.
    pending: usize,
    thread: Option<JoinHandle<()>>,
}

impl ChunkEncoder {
    /// Starts the thread with its own file operations on `location`.
    pub(super) fn start(
        location: HistoryLocation,
        options: HistoryOptions,
    ) -> Result<ChunkEncoder, HistoryError> {
        let files = HistoryFiles::new(location)?;
        // One chunk queued while one is encoded: the writer blocks on a
        // third, so memory holds at most three chunks.
        let (jobs, job_rx) = bounded::<Job>(1);
        let (done_tx, done) = bounded(2);
        let thread = std::thread::Builder::new()
            .name("flowcap-history".into())
            .spawn(move || {
                for job in job_rx {
                    let result = store_chunk(&files, &options, &job.name, job.rows);
                    if done_tx.send(result).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| HistoryError::EncoderStopped(e.to_string()))?;
        Ok(ChunkEncoder {
            jobs: Some(jobs),
            done,
            pending: 0,
            thread: Some(thread),
        })
    }

    /// Hands `rows` over as the file `name` of each partition. Returns
    /// what earlier chunks stored since the last call, or the first error.
    pub(super) fn submit(
        &mut self,
        name: String,
        rows: ChunkRows,
    ) -> Result<Written, HistoryError> {
        let mut written = Written::default();
        while let Ok(result) = self.done.try_recv() {
            self.pending -= 1;
            written.add(result?);
        }
        let jobs = self.jobs.as_ref().ok_or_else(stopped)?;
        jobs.send(Job { name, rows }).map_err(|_| stopped())?;
        self.pending += 1;
        Ok(written)
    }

    /// Waits until every chunk handed over is stored (durable).
    pub(super) fn settle(&mut self) -> Result<Written, HistoryError> {
        let mut written = Written::default();
        while self.pending > 0 {
            let result = self.done.recv().map_err(|_| stopped())?;
            self.pending -= 1;
            written.add(result?);
        }
        Ok(written)
    }
}

impl Drop for ChunkEncoder {
    fn drop(&mut self) {
        self.jobs = None;
        // Unblock a thread waiting to report, then let it finish.
        while self.done.try_recv().is_ok() {}
        drop(std::mem::replace(
            &mut self.done,
            crossbeam_channel::never(),
        ));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn stopped() -> HistoryError {
    HistoryError::EncoderStopped("the thread is gone".into())
}

/// Sorts, encodes and stores one chunk: one file per table and partition.
fn store_chunk(
    files: &HistoryFiles,
    options: &HistoryOptions,
    name: &str,
    rows: ChunkRows,
) -> Result<Written, HistoryError> {
    let mut written = Written::default();
    let usage = rows.usage;
    for (day, mut rows) in usage {
        rows.sort_unstable_by_key(|a| (a.usage.iccid, a.usage.end, a.seq));
        let batch = usage_batch(&rows)?;
        written.dirs.push(write_file(
            files,
            options,
            schema::USAGE_RECORDS,
            Partitioning::Date,
            &date_value(day),
            name,
            &batch,
        )?);
        written.files += 1;
    }
    let daily = rows.daily;
    let mut by_day: HashMap<i64, Vec<(Iccid, UsageSums)>> = HashMap::new();
    for ((day, iccid), sums) in daily {
        by_day.entry(day).or_default().push((iccid, sums));
    }
    for (day, mut rows) in by_day {
        rows.sort_unstable_by_key(|r| r.0);
        let batch = daily_batch(day, &rows)?;
        written.dirs.push(write_file(
            files,
            options,
            schema::CARD_DAILY_USAGE_PARTS,
            Partitioning::Date,
            &date_value(day),
            name,
            &batch,
        )?);
        written.files += 1;
    }
    let cycles = rows.cycle;
    let mut by_cycle: HashMap<CycleId, Vec<(Iccid, Option<Carrier>, UsageSums)>> = HashMap::new();
    for ((cycle, iccid), (carrier, sums)) in cycles {
        by_cycle
            .entry(cycle)
            .or_default()
            .push((iccid, carrier, sums));
    }
    for (cycle, mut rows) in by_cycle {
        rows.sort_unstable_by_key(|r| r.0);
        let batch = cycle_batch(&rows)?;
        written.dirs.push(write_file(
            files,
            options,
            schema::CARD_CYCLE_USAGE_PARTS,
            Partitioning::Cycle,
            &cycle.to_string(),
            name,
            &batch,
        )?);
        written.files += 1;
    }
    let quarantine = rows.quarantine;
    for (day, mut rows) in quarantine {
        rows.sort_by_key(|q| q.seq);
        let batch = quarantine_batch(&rows)?;
        written.dirs.push(write_file(
            files,
            options,
            schema::QUARANTINE,
            Partitioning::Date,
            &date_value(day),
            name,
            &batch,
        )?);
        written.files += 1;
    }
    let changes = rows.changes;
    for (day, mut rows) in changes {
        rows.sort_by_cached_key(|r| change_key(&r.event));
        let batch = changes_batch(&rows)?;
        written.dirs.push(write_file(
            files,
            options,
            schema::STATE_CHANGES,
            Partitioning::Date,
            &date_value(day),
            name,
            &batch,
        )?);
        written.files += 1;
    }
    let executions = rows.executions;
    for (day, mut rows) in executions {
        rows.sort_by(|a, b| {
            (
                a.iccid.as_ref().or(a.pool_id.as_ref()),
                a.fired_at,
                &a.execution_id,
            )
                .cmp(&(
                    b.iccid.as_ref().or(b.pool_id.as_ref()),
                    b.fired_at,
                    &b.execution_id,
                ))
        });
        let batch = executions_batch(&rows)?;
        written.dirs.push(write_file(
            files,
            options,
            schema::RULE_EXECUTIONS,
            Partitioning::Date,
            &date_value(day),
            name,
            &batch,
        )?);
        written.files += 1;
    }
    let deliveries = rows.deliveries;
    for (day, mut rows) in deliveries {
        rows.sort_by(|a, b| (a.done.at_ms, &a.message.id).cmp(&(b.done.at_ms, &b.message.id)));
        let batch = deliveries_batch(&rows)?;
        written.dirs.push(write_file(
            files,
            options,
            schema::RULE_DELIVERIES,
            Partitioning::Date,
            &date_value(day),
            name,
            &batch,
        )?);
        written.files += 1;
    }
    let journal = rows.journal;
    for (day, mut rows) in journal {
        rows.sort_by_key(|r| r.seq);
        let batch = journal_batch(&rows)?;
        written.dirs.push(write_file(
            files,
            options,
            schema::COMMAND_JOURNAL,
            Partitioning::Date,
            &date_value(day),
            name,
            &batch,
        )?);
        written.files += 1;
    }
    Ok(written)
}
