//! Encoding and storing history chunks on a thread of their own.
//!
//! A chunk (up to [`HistoryOptions::roll_rows`] rows of every table) is
//! sorted, built into Arrow batches, encoded as zstd Parquet and stored
//! with two fsyncs per file. On the writer thread that took about a second
//! per 262,144 rows, during which no output left the writer: the shards
//! blocked on its full channel, the driver on the shards, and the Kafka
//! pipeline's throughput fell to zero every few seconds (and every action
//! emitted meanwhile waited). Here the writer hands the chunk over and
//! goes on buffering the next one; it waits only when two jobs are still
//! outstanding (memory stays bounded: at most three chunks wait here).
//! A snapshot's cut hands over the window's last chunk and the state dumps
//! (pools, cards) without waiting and takes a [`StoredTicket`]; the
//! snapshot itself is written once the ticket's jobs are durable, while
//! the pipeline goes on.

use std::thread::JoinHandle;

use arrow::record_batch::RecordBatch;
use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use flowcap_engine::event::{Accounted, PoolCycleTotal};
use flowcap_engine::{CardView, Carrier, CycleId, Iccid, PoolView, Timestamp};
use flowcap_rules::message::DeliveryRow;
use flowcap_rules::ExecutionRecord;
// foldhash, not SipHash: a lookup per accounted record.
use hashbrown::HashMap;

use super::{
    cards_batch, change_key, changes_batch, closed_pools_batch, cycle_batch, daily_batch,
    date_value, deliveries_batch, encode_parquet, executions_batch, journal_batch, pools_batch,
    quarantine_batch, remove_older_than, schema, usage_batch, HistoryError, HistoryOptions,
    JournalRow, Partitioning, Quarantined, StateChange, UsageSums,
};
use crate::location::{HistoryFiles, HistoryLocation};

/// The rows of one chunk, per table and partition.
#[derive(Default)]
pub(super) struct ChunkRows {
    /// Accounted records by local day. The per-card daily and cycle sums
    /// are derived from them here, on the encoder's thread: summing on the
    /// writer (two map updates per record, mostly cache misses) was two
    /// fifths of the writer's time, on the record path.
    pub(super) usage: HashMap<i64, Vec<Accounted>>,
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

    /// Encodes `batch` and stores it as `<table>/<column>=<value>/<name>`
    /// atomically (see [`HistoryFiles::put`]), and notes the file and its
    /// partition directory.
    #[allow(clippy::too_many_arguments)]
    fn store(
        &mut self,
        files: &HistoryFiles,
        options: &HistoryOptions,
        table: &str,
        partitioning: Partitioning,
        value: &str,
        name: &str,
        batch: &RecordBatch,
    ) -> Result<(), HistoryError> {
        let dir = format!("{table}/{}={value}", partitioning.column());
        let rel = format!("{dir}/{name}");
        let bytes = encode_parquet(batch, options, &rel)?;
        files.put(&rel, bytes)?;
        self.dirs.push(dir);
        self.files += 1;
        Ok(())
    }
}

enum Job {
    /// One chunk of rows, stored as the file `name` of each partition.
    Chunk { name: String, rows: Box<ChunkRows> },
    /// The window's last job before its state dumps: its per-card sums
    /// and the closed cycles' pool totals it emitted, stored as the file
    /// `name` of each partition.
    CloseWindow {
        name: String,
        through: u64,
        closed: Vec<PoolCycleTotal>,
    },
    /// The state dumps of a snapshot through `through`: every pool, and
    /// (when `cards`) every card, in the partition of local day `day`.
    State {
        through: u64,
        clock: Timestamp,
        day: i64,
        pools: Vec<PoolView>,
        cards: Option<CardsDump>,
    },
}

/// The cards a snapshot dumps into the `cards` table: every card's view,
/// still being built elsewhere (from the snapshot's copy of the state, so
/// that the inputs do not wait for them). The encoder takes them when it
/// comes to the dump; a sender dropped without sending fails the dump, and
/// with it the snapshot ([`HistoryError::CardViewsMissing`]).
/// The custom attributes go into the columns of their names' slots
/// (`attribute_names`, as declared when the snapshot was cut).
#[derive(Debug)]
pub struct CardsDump {
    views: Receiver<Vec<CardView>>,
    attribute_names: Vec<String>,
}

impl CardsDump {
    /// A dump, and where its views are to be sent; `attribute_names` are
    /// the declared custom attribute names in order
    /// (`Engine::attribute_names`).
    pub fn later(attribute_names: Vec<String>) -> (Sender<Vec<CardView>>, CardsDump) {
        let (views, dump) = bounded(1);
        (
            views,
            CardsDump {
                views: dump,
                attribute_names,
            },
        )
    }

    fn views(&self) -> Result<Vec<CardView>, HistoryError> {
        let waiting = std::time::Instant::now();
        let views = self
            .views
            .recv()
            .map_err(|_| HistoryError::CardViewsMissing)?;
        // Time this thread stood idle for them (it may hold the writer up
        // meanwhile).
        tracing::debug!(
            cards = views.len(),
            waited_ms = waiting.elapsed().as_secs_f64() * 1e3,
            "cards dump: views received"
        );
        Ok(views)
    }
}

/// Everything handed to the encoder up to some point: [`ChunkEncoder::ticket`]
/// then, [`ChunkEncoder::is_stored`] later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct StoredTicket(u64);

/// Emptied usage vectors the encoder keeps for the writer. A day's vector
/// of a full chunk is tens of MB; allocated fresh for every chunk, its
/// pages were zeroed by the kernel on first touch, which was 30 % of the
/// writer's time (BENCHMARKS §8). A chunk usually spans one day, two at
/// midnight; at most this many more vectors than before are alive.
const RECYCLED_VECS: usize = 2;

/// Whether handing a chunk to the encoder waits for room first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Room {
    /// Waits while two jobs are outstanding (the writer's rolls: memory
    /// stays bounded).
    WaitFor,
    /// Hands it over at once (a window's last chunk: the commit waits
    /// for it anyway).
    Skip,
}

/// The encoder thread and its channels.
pub(super) struct ChunkEncoder {
    /// Usage vectors back from stored chunks.
    recycled: Receiver<Vec<Accounted>>,
    /// Capacity of a fresh usage vector: a chunk's rows.
    roll_rows: usize,
    jobs: Option<Sender<Job>>,
    done: Receiver<Result<Written, HistoryError>>,
    /// Jobs handed over, and jobs reported back (in order: one thread).
    submitted: u64,
    completed: u64,
    thread: Option<JoinHandle<()>>,
}

impl ChunkEncoder {
    /// Starts the thread with its own file operations on `location`.
    pub(super) fn start(
        location: HistoryLocation,
        options: HistoryOptions,
    ) -> Result<ChunkEncoder, HistoryError> {
        let files = HistoryFiles::new(location)?;
        // Unbounded: the writer bounds it itself (`submit_chunk` waits
        // while two jobs are outstanding; a snapshot's cut never waits).
        let (jobs, job_rx) = unbounded::<Job>();
        let (done_tx, done) = unbounded();
        let (recycle_tx, recycled) = bounded(RECYCLED_VECS);
        let thread = crate::background::spawn("flowcap-history", move || {
            let mut sums = WindowSums::default();
            for job in job_rx {
                let result = match job {
                    Job::Chunk { name, rows } => {
                        store_chunk(&files, &options, &name, *rows, &mut sums, &recycle_tx)
                    }
                    Job::CloseWindow {
                        name,
                        through,
                        closed,
                    } => store_sums(&files, &options, &name, &mut sums).and_then(|mut w| {
                        w.add(store_closed(&files, &options, &name, through, &closed)?);
                        Ok(w)
                    }),
                    Job::State {
                        through,
                        clock,
                        day,
                        pools,
                        cards,
                    } => store_state(&files, &options, through, clock, day, &pools, cards),
                };
                if done_tx.send(result).is_err() {
                    return;
                }
            }
        })
        .map_err(HistoryError::EncoderStart)?;
        Ok(ChunkEncoder {
            recycled,
            roll_rows: options.roll_rows,
            jobs: Some(jobs),
            done,
            submitted: 0,
            completed: 0,
            thread: Some(thread),
        })
    }

    /// Hands `rows` over as the file `name` of each partition. With
    /// [`Room::WaitFor`], first waits while two jobs are outstanding (so
    /// memory holds at most three chunks besides the one being filled).
    /// Returns what earlier jobs stored since the last call, or the first
    /// error.
    pub(super) fn submit_chunk(
        &mut self,
        name: String,
        rows: ChunkRows,
        room: Room,
    ) -> Result<Written, HistoryError> {
        let mut written = self.poll()?;
        let waiting = std::time::Instant::now();
        let mut waited = false;
        while room == Room::WaitFor && self.submitted - self.completed >= 2 {
            written.add(self.recv()?);
            waited = true;
        }
        if waited {
            // While it waits no output leaves the writer (the shards block).
            tracing::debug!(
                waited_ms = waiting.elapsed().as_secs_f64() * 1e3,
                "writer waited for the history encoder"
            );
        }
        self.send(Job::Chunk {
            name,
            rows: Box::new(rows),
        })?;
        Ok(written)
    }

    /// Closes the window: its per-card sums are stored as the files
    /// `name` (never waits).
    pub(super) fn close_window(
        &mut self,
        name: String,
        through: u64,
        closed: Vec<PoolCycleTotal>,
    ) -> Result<Written, HistoryError> {
        let written = self.poll()?;
        self.send(Job::CloseWindow {
            name,
            through,
            closed,
        })?;
        Ok(written)
    }

    /// An empty vector for a day's usage rows: one a stored chunk held,
    /// while there is one, else one with room for a whole chunk. Growing
    /// from empty reallocated it ~20 times (glibc copies a block below
    /// its mmap threshold, and zeroed pages were touched twice): a fifth
    /// of the writer's time in a 2M-record run. Room that is never
    /// written is address space only: the kernel backs a page when it is
    /// first touched.
    pub(super) fn usage_rows(&self) -> Vec<Accounted> {
        self.recycled
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(self.roll_rows))
    }

    /// Hands a snapshot's state dumps over (never waits).
    pub(super) fn submit_state(
        &mut self,
        through: u64,
        clock: Timestamp,
        day: i64,
        pools: Vec<PoolView>,
        cards: Option<CardsDump>,
    ) -> Result<Written, HistoryError> {
        let written = self.poll()?;
        self.send(Job::State {
            through,
            clock,
            day,
            pools,
            cards,
        })?;
        Ok(written)
    }

    fn send(&mut self, job: Job) -> Result<(), HistoryError> {
        let jobs = self.jobs.as_ref().ok_or_else(stopped)?;
        jobs.send(job).map_err(|_| stopped())?;
        self.submitted += 1;
        Ok(())
    }

    fn recv(&mut self) -> Result<Written, HistoryError> {
        let result = self.done.recv().map_err(|_| stopped())?;
        self.completed += 1;
        result
    }

    /// What finished jobs stored, without waiting.
    pub(super) fn poll(&mut self) -> Result<Written, HistoryError> {
        let mut written = Written::default();
        while let Ok(result) = self.done.try_recv() {
            self.completed += 1;
            written.add(result?);
        }
        Ok(written)
    }

    /// Names everything handed over so far.
    pub(super) fn ticket(&self) -> StoredTicket {
        StoredTicket(self.submitted)
    }

    /// True once every job up to `ticket` is stored (durable). Call
    /// [`ChunkEncoder::poll`] first.
    pub(super) fn is_stored(&self, ticket: StoredTicket) -> bool {
        self.completed >= ticket.0
    }

    /// Waits until every job up to `ticket` is stored (durable).
    pub(super) fn wait(&mut self, ticket: StoredTicket) -> Result<Written, HistoryError> {
        let mut written = self.poll()?;
        while self.completed < ticket.0 {
            written.add(self.recv()?);
        }
        Ok(written)
    }
}

impl Drop for ChunkEncoder {
    fn drop(&mut self) {
        self.jobs = None;
        // Let the thread finish what it has (its reports are dropped).
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn stopped() -> HistoryError {
    HistoryError::EncoderStopped
}

/// The state dumps of a snapshot: `pool_cycle_usage` (one file per cycle,
/// superseding older ones), `cards` when given (superseding older dumps of
/// the day).
fn store_state(
    files: &HistoryFiles,
    options: &HistoryOptions,
    through: u64,
    clock: Timestamp,
    day: i64,
    pools: &[PoolView],
    cards: Option<CardsDump>,
) -> Result<Written, HistoryError> {
    let mut written = Written::default();
    let mut store = |table: &str,
                     partitioning: Partitioning,
                     value: &str,
                     name: &str,
                     batch: &RecordBatch|
     -> Result<(), HistoryError> {
        written.store(files, options, table, partitioning, value, name, batch)
    };
    let mut by_cycle: HashMap<CycleId, Vec<&PoolView>> = HashMap::new();
    for p in pools {
        by_cycle.entry(p.cycle).or_default().push(p);
    }
    let name = format!("part-{through:020}-pools.parquet");
    for (cycle, rows) in by_cycle {
        let batch = pools_batch(&rows, through, clock)?;
        let dir = format!("{}/cycle={cycle}", schema::POOL_CYCLE_USAGE);
        store(
            schema::POOL_CYCLE_USAGE,
            Partitioning::Cycle,
            &cycle.to_string(),
            &name,
            &batch,
        )?;
        // Only the newest state per cycle is kept: it supersedes the
        // older ones (a pool's usage only grows within a cycle).
        remove_older_than(files, &files.list_dir(&dir)?, &name)?;
    }
    if let Some(cards) = cards {
        let views = cards.views()?;
        let name = format!("part-{through:020}-cards.parquet");
        for (i, chunk) in views.chunks(options.roll_rows.max(1)).enumerate() {
            let batch = cards_batch(chunk, &cards.attribute_names, through, clock)?;
            let chunk_name = format!("part-{through:020}-cards-{i:04}.parquet");
            store(
                schema::CARDS,
                Partitioning::Date,
                &date_value(day),
                &chunk_name,
                &batch,
            )?;
        }
        let dir = format!("{}/date={}", schema::CARDS, date_value(day));
        remove_older_than(files, &files.list_dir(&dir)?, &name)?;
    }
    Ok(written)
}

/// Stores the closed cycles' pool totals a window emitted as the file
/// `name` of each cycle partition of `pool_cycle_usage`. Not a dump (the
/// name has no `-pools`): a newer snapshot's dump of the same cycle (of
/// pools that follow another carrier's cycle) does not replace it, and a
/// crash's recovery keeps or deletes it with its window.
fn store_closed(
    files: &HistoryFiles,
    options: &HistoryOptions,
    name: &str,
    through: u64,
    closed: &[PoolCycleTotal],
) -> Result<Written, HistoryError> {
    let mut written = Written::default();
    let mut by_cycle: HashMap<CycleId, Vec<&PoolCycleTotal>> = HashMap::new();
    for t in closed {
        by_cycle.entry(t.cycle).or_default().push(t);
    }
    for (cycle, rows) in by_cycle {
        let batch = closed_pools_batch(&rows, through)?;
        written.store(
            files,
            options,
            schema::POOL_CYCLE_USAGE,
            Partitioning::Cycle,
            &cycle.to_string(),
            name,
            &batch,
        )?;
    }
    Ok(written)
}

/// Stores a window's per-card sums as the file `name` of each day and
/// cycle partition, sorted by card, and empties them.
fn store_sums(
    files: &HistoryFiles,
    options: &HistoryOptions,
    name: &str,
    sums: &mut WindowSums,
) -> Result<Written, HistoryError> {
    let mut written = Written::default();
    let mut by_day: HashMap<i64, Vec<(Iccid, UsageSums)>> = HashMap::new();
    for ((day, iccid), s) in sums.daily.drain() {
        by_day.entry(day).or_default().push((iccid, s));
    }
    for (day, mut rows) in by_day {
        rows.sort_unstable_by_key(|r| r.0);
        let batch = daily_batch(day, &rows)?;
        written.store(
            files,
            options,
            schema::CARD_DAILY_USAGE_PARTS,
            Partitioning::Date,
            &date_value(day),
            name,
            &batch,
        )?;
    }
    let mut by_cycle: HashMap<CycleId, Vec<(Iccid, Option<Carrier>, UsageSums)>> = HashMap::new();
    for ((cycle, iccid), (_, carrier, s)) in sums.cycles.drain() {
        by_cycle.entry(cycle).or_default().push((iccid, carrier, s));
    }
    for (cycle, mut rows) in by_cycle {
        rows.sort_unstable_by_key(|r| r.0);
        let batch = cycle_batch(&rows)?;
        written.store(
            files,
            options,
            schema::CARD_CYCLE_USAGE_PARTS,
            Partitioning::Cycle,
            &cycle.to_string(),
            name,
            &batch,
        )?;
    }
    Ok(written)
}

/// A window's per-card sums, added up over its chunks and stored when it
/// closes ([`store_sums`]): `card_daily_usage_parts` and
/// `card_cycle_usage_parts` then get a row per card and day (cycle) per
/// *window*, not per chunk. Per chunk, a chunk of records interleaved
/// from every partition touches nearly every card: the aggregate rows were
/// then almost as many as the records, and encoding them took a quarter
/// more of the encoder's time than when partitions came in long runs
/// (docs/BENCHMARKS.md §8). Stored early, with a chunk, once they hold
/// `roll_rows` entries (memory stays bounded whatever the window's length).
#[derive(Default)]
struct WindowSums {
    daily: HashMap<(i64, Iccid), UsageSums>,
    /// Per (cycle, card): the seq and carrier of its earliest record in
    /// the window, and the sums.
    cycles: HashMap<(CycleId, Iccid), (u64, Option<Carrier>, UsageSums)>,
}

impl WindowSums {
    fn len(&self) -> usize {
        self.daily.len() + self.cycles.len()
    }
}

/// Sorts, encodes and stores one chunk: one file per table and partition;
/// its per-card sums go to `sums` (stored with this chunk only when they
/// have grown to `roll_rows`).
fn store_chunk(
    files: &HistoryFiles,
    options: &HistoryOptions,
    name: &str,
    rows: ChunkRows,
    sums: &mut WindowSums,
    recycle: &Sender<Vec<Accounted>>,
) -> Result<Written, HistoryError> {
    let mut written = Written::default();
    for (day, mut rows) in rows.usage {
        rows.sort_unstable_by_key(|a| (a.usage.iccid, a.usage.end, a.seq));
        let batch = usage_batch(&rows)?;
        written.store(
            files,
            options,
            schema::USAGE_RECORDS,
            Partitioning::Date,
            &date_value(day),
            name,
            &batch,
        )?;
        // Summed per run of one card and cycle in the sorted rows first
        // (a card's rows of a day are one run, two across a cycle's end):
        // one update of each map per run, not per record.
        for run in rows.chunk_by(|a, b| (a.cycle, a.usage.iccid) == (b.cycle, b.usage.iccid)) {
            let mut chunk_sums = UsageSums::default();
            let mut earliest = &run[0];
            for a in run {
                chunk_sums.add(a);
                if a.seq < earliest.seq {
                    earliest = a;
                }
            }
            sums.daily
                .entry((day, earliest.usage.iccid))
                .or_default()
                .merge(&chunk_sums);
            let (first, carrier, window) = sums
                .cycles
                .entry((earliest.cycle, earliest.usage.iccid))
                .or_insert((earliest.seq, earliest.usage.carrier, UsageSums::default()));
            if earliest.seq < *first {
                (*first, *carrier) = (earliest.seq, earliest.usage.carrier);
            }
            window.merge(&chunk_sums);
        }
        rows.clear();
        // Full: the writer has enough; this one is freed.
        let _ = recycle.try_send(rows);
    }
    if sums.len() >= options.roll_rows {
        written.add(store_sums(files, options, name, sums)?);
    }
    let quarantine = rows.quarantine;
    for (day, mut rows) in quarantine {
        rows.sort_by_key(|q| q.seq);
        let batch = quarantine_batch(&rows)?;
        written.store(
            files,
            options,
            schema::QUARANTINE,
            Partitioning::Date,
            &date_value(day),
            name,
            &batch,
        )?;
    }
    let changes = rows.changes;
    for (day, mut rows) in changes {
        rows.sort_by_cached_key(|r| change_key(&r.event));
        let batch = changes_batch(&rows)?;
        written.store(
            files,
            options,
            schema::STATE_CHANGES,
            Partitioning::Date,
            &date_value(day),
            name,
            &batch,
        )?;
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
        written.store(
            files,
            options,
            schema::RULE_EXECUTIONS,
            Partitioning::Date,
            &date_value(day),
            name,
            &batch,
        )?;
    }
    let deliveries = rows.deliveries;
    for (day, mut rows) in deliveries {
        rows.sort_by(|a, b| (a.done.at_ms, &a.message.id).cmp(&(b.done.at_ms, &b.message.id)));
        let batch = deliveries_batch(&rows)?;
        written.store(
            files,
            options,
            schema::RULE_DELIVERIES,
            Partitioning::Date,
            &date_value(day),
            name,
            &batch,
        )?;
    }
    let journal = rows.journal;
    for (day, mut rows) in journal {
        rows.sort_by_key(|r| r.seq);
        let batch = journal_batch(&rows)?;
        written.store(
            files,
            options,
            schema::COMMAND_JOURNAL,
            Partitioning::Date,
            &date_value(day),
            name,
            &batch,
        )?;
    }
    Ok(written)
}
