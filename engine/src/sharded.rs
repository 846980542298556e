//! The threaded engine: the same shards as [`Engine`], each on its own
//! worker thread, fed by the router through bounded crossbeam channels.
//!
//! Records are the hot path: the router (the caller's thread) decides the
//! card's shard and the event clock, batches records per shard and sends the
//! batches; each worker owns its shard outright (no lock) and accounts its
//! records in arrival order. Commands are rare and may touch many shards
//! (batches, pool members moving to their pool's shard): for them the
//! router takes every shard back (each worker first finishes what is queued,
//! then sends its shard by value), runs the command on the sequential
//! [`Engine`] code, and lends the shards out again when the next record
//! comes. Consecutive commands share one recall. Because every cross-shard
//! effect happens while the router holds all shards, the threaded engine
//! produces the same state and the same events as the sequential one; only
//! the interleaving of different cards' outputs differs.
//!
//! Delivery guarantee of the output channel: every output is sent exactly
//! once, in processing order per card and per pool. The receiver must be
//! drained concurrently (the channel is bounded: a slow consumer applies
//! backpressure to the router).

use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::engine::{Engine, EngineError, Loc};
use crate::event::{Output, Rejection};
use crate::record::Usage;
use crate::shard::Shard;
use crate::time::Timestamp;
use crate::watermark::Lane;
use crate::Command;

/// Records per batch sent to a shard.
pub const BATCH: usize = 512;
/// Batches queued per shard before the router blocks.
pub const QUEUE_BATCHES: usize = 64;

struct Item {
    slot: u32,
    seq: u64,
    clock: Timestamp,
    lane_time: Timestamp,
    usage: Usage,
}

enum Msg {
    Records(Vec<Item>),
    Lend(Box<Shard>),
    Recall(Sender<Box<Shard>>),
    Stop,
}

struct Worker {
    tx: Sender<Msg>,
    handle: Option<JoinHandle<()>>,
    pending: Vec<Item>,
    depth: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Worker {
    /// Records sent to the shard and not yet applied, plus its partial batch.
    fn queued(&self) -> usize {
        self.depth.load(std::sync::atomic::Ordering::Relaxed) + self.pending.len()
    }
}

/// The sharded, threaded engine. See the module docs.
pub struct ShardedEngine {
    engine: Engine,
    workers: Vec<Worker>,
    lent: bool,
    out: Sender<Vec<Output>>,
    local: Vec<Output>,
    recycled: Receiver<Vec<Item>>,
}

impl std::fmt::Debug for ShardedEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedEngine")
            .field("workers", &self.workers.len())
            .field("lent", &self.lent)
            .finish_non_exhaustive()
    }
}

impl ShardedEngine {
    /// Starts one worker thread per shard of `engine`. Outputs arrive on the
    /// returned receiver in batches.
    pub fn start(engine: Engine, output_capacity: usize) -> (ShardedEngine, Receiver<Vec<Output>>) {
        let (out, out_rx) = bounded(output_capacity.max(1));
        let (recycle_tx, recycled) = bounded(QUEUE_BATCHES * engine.shard_count() * 2);
        let workers = (0..engine.shard_count())
            .map(|i| {
                let (tx, rx) = bounded::<Msg>(QUEUE_BATCHES);
                let out = out.clone();
                let recycle = recycle_tx.clone();
                let depth = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
                let worker_depth = depth.clone();
                let handle = std::thread::Builder::new()
                    .name(format!("flowcap-shard-{i}"))
                    .spawn(move || run_worker(rx, out, recycle, worker_depth))
                    .ok();
                Worker {
                    tx,
                    handle,
                    pending: Vec::with_capacity(BATCH),
                    depth,
                }
            })
            .collect();
        let sharded = ShardedEngine {
            engine,
            workers,
            lent: false,
            out,
            local: Vec::new(),
            recycled,
        };
        (sharded, out_rx)
    }

    /// Processes one record (batched: call [`ShardedEngine::flush`] to push
    /// partial batches).
    pub fn process_usage(&mut self, usage: &Usage, seq: u64) -> Result<(), EngineError> {
        self.process_usage_received(usage, None, seq).map(drop)
    }

    /// [`ShardedEngine::process_usage`] with a receive time; see
    /// [`Engine::process_usage_received`]. Returns the rejection when the
    /// router refused the record (unknown card, far future), so a transport
    /// can dead-letter the raw message it still holds; the rejection is
    /// also among the outputs, as always.
    pub fn process_usage_received(
        &mut self,
        usage: &Usage,
        received_at: Option<Timestamp>,
        seq: u64,
    ) -> Result<Option<Rejection>, EngineError> {
        self.process_usage_from(Lane::default(), usage, received_at, seq)
    }

    /// [`ShardedEngine::process_usage_received`] for a record read from
    /// input `lane`; see [`Engine::process_usage_from`].
    pub fn process_usage_from(
        &mut self,
        lane: Lane,
        usage: &Usage,
        received_at: Option<Timestamp>,
        seq: u64,
    ) -> Result<Option<Rejection>, EngineError> {
        self.lend();
        let routed = self
            .engine
            .route(lane, usage, received_at, seq, &mut self.local)?;
        let rejected = match (&routed, self.local.last()) {
            (None, Some(Output::Rejected(r))) if r.seq == seq => Some(r.clone()),
            _ => None,
        };
        if let Some(d) = routed {
            let Loc { shard, slot } = d.loc;
            let worker = &mut self.workers[shard as usize];
            worker.pending.push(Item {
                slot,
                seq,
                clock: d.clock,
                lane_time: d.lane_time,
                usage: *usage,
            });
            if worker.pending.len() >= BATCH {
                self.send_batch(shard as usize);
            }
        }
        if self.local.len() >= BATCH {
            self.flush_local();
        }
        Ok(rejected)
    }

    /// [`Engine::prefetch`] for records about to be processed: call it with a
    /// batch (tens of records), then process them one by one as usual.
    pub fn prefetch<'a>(&self, usages: impl Iterator<Item = &'a Usage> + Clone) {
        std::hint::black_box(self.engine.prefetch(usages));
    }

    /// Processes one command with every shard recalled.
    pub fn process_command(&mut self, command: Command, seq: u64) {
        self.process_command_received(command, None, seq);
    }

    /// [`ShardedEngine::process_command`] with a receive time; see
    /// [`Engine::process_command_received`].
    pub fn process_command_received(
        &mut self,
        command: Command,
        received_at: Option<Timestamp>,
        seq: u64,
    ) {
        self.recall();
        self.engine
            .process_command_received(command, received_at, seq, &mut self.local);
        self.flush_local();
    }

    /// Input `seq`: `lane` is idle; see [`Engine::lane_idle`]. With every
    /// shard recalled, like a command.
    pub fn lane_idle(&mut self, lane: Lane, seq: u64) {
        self.recall();
        self.engine.lane_idle(lane, seq, &mut self.local);
        self.flush_local();
    }

    /// Input `seq`: every lane is active again; see
    /// [`Engine::lanes_awake`] (the router's state only).
    pub fn lanes_awake(&mut self, seq: u64) {
        self.engine.lanes_awake(seq);
    }

    /// Sends every partial batch to its shard.
    pub fn flush(&mut self) {
        for i in 0..self.workers.len() {
            if !self.workers[i].pending.is_empty() {
                self.send_batch(i);
            }
        }
        self.flush_local();
    }

    /// Records queued per shard (for the queue-depth metric).
    pub fn queue_depths(&self) -> Vec<usize> {
        self.workers.iter().map(Worker::queued).collect()
    }

    /// Records queued in all shards together (for backpressure: once per
    /// driver iteration, so no allocation).
    pub fn queued_records(&self) -> usize {
        self.workers.iter().map(Worker::queued).sum()
    }

    /// The event clock as the router sees it (no recall: for metrics).
    pub fn clock(&self) -> Timestamp {
        self.engine.clock()
    }

    /// Known cards, from the router's directory (no recall: for metrics).
    pub fn card_count(&self) -> usize {
        self.engine.card_count()
    }

    /// Number of shards.
    pub fn shard_count(&self) -> usize {
        self.workers.len()
    }

    /// Waits until every queued record is accounted and returns the engine
    /// with all shards home (for snapshots, queries, commands).
    pub fn engine(&mut self) -> &mut Engine {
        self.recall();
        &mut self.engine
    }

    /// Drains, stops the workers and returns the sequential engine.
    pub fn finish(mut self) -> Engine {
        self.recall();
        self.flush_local();
        for w in &mut self.workers {
            let _ = w.tx.send(Msg::Stop);
            if let Some(h) = w.handle.take() {
                let _ = h.join();
            }
        }
        std::mem::replace(
            &mut self.engine,
            Engine::new(crate::EngineConfig {
                shards: 1,
                ..Default::default()
            }),
        )
    }

    fn send_batch(&mut self, shard: usize) {
        let fresh = self
            .recycled
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(BATCH));
        let worker = &mut self.workers[shard];
        let batch = std::mem::replace(&mut worker.pending, fresh);
        worker
            .depth
            .fetch_add(batch.len(), std::sync::atomic::Ordering::Relaxed);
        // A send fails only if the worker died (a panic, i.e. a bug); its
        // shard is then lost and `recall` reports it.
        let _ = worker.tx.send(Msg::Records(batch));
    }

    fn flush_local(&mut self) {
        if !self.local.is_empty() {
            let batch = std::mem::take(&mut self.local);
            let _ = self.out.send(batch);
        }
    }

    fn lend(&mut self) {
        if self.lent {
            return;
        }
        let shards = std::mem::take(&mut self.engine.shards);
        for (worker, shard) in self.workers.iter().zip(shards) {
            let _ = worker.tx.send(Msg::Lend(Box::new(shard)));
        }
        self.lent = true;
    }

    fn recall(&mut self) {
        if !self.lent {
            return;
        }
        self.flush();
        // Ask every worker first so they drain in parallel, then collect the
        // shards in index order, each on its own reply channel.
        let replies: Vec<Receiver<Box<Shard>>> = self
            .workers
            .iter()
            .map(|worker| {
                let (tx, rx) = bounded(1);
                let _ = worker.tx.send(Msg::Recall(tx));
                rx
            })
            .collect();
        self.engine.shards = replies
            .into_iter()
            .map(|rx| match rx.recv() {
                Ok(shard) => *shard,
                // Only reachable if a worker thread died (a bug): fail loudly
                // rather than continue with a shard's cards silently missing.
                Err(_) => panic!("flowcap shard worker died; its state is lost"),
            })
            .collect();
        self.lent = false;
        // Shards only saw the clock of their own records while lent: bring
        // every one up to the router's clock (deadlines, rollovers).
        let clock = self.engine.clock();
        self.engine.advance_clock(clock, &mut self.local);
    }
}

fn run_worker(
    rx: Receiver<Msg>,
    out: Sender<Vec<Output>>,
    recycle: Sender<Vec<Item>>,
    depth: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let mut shard: Option<Box<Shard>> = None;
    let mut outputs = Vec::with_capacity(BATCH * 2);
    while let Ok(msg) = rx.recv() {
        match msg {
            Msg::Records(mut batch) => {
                if let Some(shard) = shard.as_mut() {
                    for item in &batch {
                        shard.account(
                            item.slot,
                            &item.usage,
                            item.seq,
                            item.clock,
                            item.lane_time,
                            &mut outputs,
                        );
                    }
                }
                depth.fetch_sub(batch.len(), std::sync::atomic::Ordering::Relaxed);
                batch.clear();
                let _ = recycle.try_send(batch);
                if !outputs.is_empty() {
                    let full = std::mem::replace(&mut outputs, Vec::with_capacity(BATCH * 2));
                    let _ = out.send(full);
                }
            }
            Msg::Lend(s) => shard = Some(s),
            Msg::Recall(reply) => {
                if let Some(s) = shard.take() {
                    let _ = reply.send(s);
                }
            }
            Msg::Stop => break,
        }
    }
}
