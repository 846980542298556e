//! The sequential engine: the router (event clock, card directory, dedupe),
//! the registry (plans, pools, tags, rules, webhooks, command results) and
//! the shards, driven from one thread.
//!
//! [`Engine`] is the reference semantics. [`crate::sharded::ShardedEngine`]
//! runs the same shards on worker threads for throughput and falls back to
//! this code for commands, so both give the same state and the same events.
//!
//! This file holds the engine's state and the way of a record (the
//! router); the way of a command is in `commands.rs`, which hands each
//! command family to a file of its own: `cards.rs` (life cycle),
//! `limits.rs` (thresholds, add-ons), `plans.rs`, `pools.rs`, `rules.rs`
//! (rules and webhooks) and `tags.rs` (tags and attribute names). What
//! commands share lives in `registry.rs`, the first result of every
//! command id in `results.rs`, and what queries see in `views.rs`.

mod cards;
mod catalog;
mod commands;
mod limits;
mod plans;
mod pools;
mod registry;
mod results;
mod rules;
mod tags;
mod views;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::command::WebhookSpec;
use crate::config::EngineConfig;
use crate::dedupe::{DedupeConfig, DedupeError, Deduper, IdStore, MemIdStore, Sighting};
use crate::event::{Output, Rejection};
use crate::record::Usage;
use crate::shard::Shard;
use crate::time::Timestamp;
use crate::watermark::Lane;

pub(crate) use registry::Registry;
pub(crate) use results::{CommandResults, StoredResults};
pub(crate) use views::card_views;
pub use views::{CardChange, CardView, PoolView};

/// Errors that stop the engine (never caused by bad input: bad input is
/// rejected into the outputs).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The dedupe id store failed (external, retryable: disk).
    #[error("dedupe store failed: {0}")]
    Dedupe(#[from] DedupeError),
    /// A snapshot could not be decoded (corrupt or from another version).
    #[error("snapshot: {0}")]
    Snapshot(#[from] crate::snapshot::SnapshotError),
}

/// Where a card lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Loc {
    pub(crate) shard: u32,
    pub(crate) slot: u32,
}

/// A record ready for its shard.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dispatch {
    pub(crate) loc: Loc,
    pub(crate) clock: Timestamp,
    /// The later of the clock and the record's lane's own time: what the
    /// record is judged by (`Shard::account`).
    pub(crate) lane_time: Timestamp,
}

/// The sequential engine. See the crate docs.
pub struct Engine {
    pub(crate) config: EngineConfig,
    pub(crate) shards: Vec<Shard>,
    pub(crate) directory: crate::directory::Directory,
    pub(crate) deduper: Deduper,
    pub(crate) id_store: Box<dyn IdStore>,
    pub(crate) registry: Registry,
    pub(crate) clock: Timestamp,
    /// Each input lane's cards furthest ahead: the slowest active lane's
    /// agreed time moves `clock` (`crate::watermark`).
    pub(crate) lanes: crate::watermark::Lanes,
    pub(crate) last_seq: Option<u64>,
    pub(crate) positions: BTreeMap<String, i64>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("shards", &self.shards.len())
            .field("cards", &self.directory.len())
            .field("clock", &self.clock)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// An empty engine with an in-memory dedupe id store.
    pub fn new(config: EngineConfig) -> Engine {
        Engine::with_id_store(config, Box::new(MemIdStore::default()))
    }

    /// An empty engine whose dedupe verifies against `id_store`.
    pub fn with_id_store(config: EngineConfig, id_store: Box<dyn IdStore>) -> Engine {
        let n = config.effective_shards();
        let deduper = Deduper::new(DedupeConfig {
            window_ms: config.dedupe_window_ms,
            bucket_ms: crate::time::MS_PER_HOUR,
            verify_misses: config.dedupe_verify_misses,
        });
        Engine {
            shards: (0..n).map(|_| Shard::new(config.clone())).collect(),
            config,
            directory: crate::directory::Directory::default(),
            deduper,
            id_store,
            registry: Registry::default(),
            clock: Timestamp::MIN,
            lanes: crate::watermark::Lanes::default(),
            last_seq: None,
            positions: BTreeMap::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Number of shards.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The event clock: the latest time a majority of the cards furthest
    /// ahead have reached (`EngineConfig::clock_quorum`), or a command's
    /// `at`.
    pub fn clock(&self) -> Timestamp {
        self.clock
    }

    /// Sequence number of the last input processed.
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    /// Input positions (e.g. Kafka partition offsets) covered by the state;
    /// stored in snapshots.
    pub fn positions(&self) -> &BTreeMap<String, i64> {
        &self.positions
    }

    /// The registered webhook endpoints (delivery starts with these; later
    /// changes are in the journal).
    pub fn webhooks(&self) -> impl Iterator<Item = &WebhookSpec> {
        self.registry.webhooks.values()
    }

    /// Records an input position (set by the pipeline after processing).
    pub fn set_position(&mut self, source: impl Into<String>, position: i64) {
        self.positions.insert(source.into(), position);
    }

    /// Number of known cards.
    pub fn card_count(&self) -> usize {
        self.directory.len()
    }

    /// Processes one decoded usage record.
    pub fn process_usage(
        &mut self,
        usage: &Usage,
        seq: u64,
        out: &mut Vec<Output>,
    ) -> Result<(), EngineError> {
        self.process_usage_received(usage, None, seq, out)
    }

    /// Processes one record that came with a receive time (the Kafka message
    /// timestamp, the generator's arrival): "far in the future" is then
    /// judged against the later of the event clock and that time, so a
    /// silence longer than `max_future_ms` cannot leave the clock behind
    /// forever. The receive time must be part of the stored input (it is,
    /// for Kafka) so a replay decides the same.
    pub fn process_usage_received(
        &mut self,
        usage: &Usage,
        received_at: Option<Timestamp>,
        seq: u64,
        out: &mut Vec<Output>,
    ) -> Result<(), EngineError> {
        self.process_usage_from(Lane::default(), usage, received_at, seq, out)
    }

    /// [`Engine::process_usage_received`] for a record read from input
    /// `lane` (a Kafka partition): the lane's own watermark takes it into
    /// account, and the clock follows the slowest active lane
    /// ([`crate::watermark`]'s lanes).
    pub fn process_usage_from(
        &mut self,
        lane: Lane,
        usage: &Usage,
        received_at: Option<Timestamp>,
        seq: u64,
        out: &mut Vec<Output>,
    ) -> Result<(), EngineError> {
        if let Some(d) = self.route(lane, usage, received_at, seq, out)? {
            // Every shard follows the event clock (rollovers, deadlines), not
            // only the record's: state must not depend on the shard count.
            for shard in &mut self.shards {
                shard.advance(d.clock, out);
            }
            self.shards[d.loc.shard as usize].account(
                d.loc.slot,
                usage,
                seq,
                d.clock,
                d.lane_time,
                out,
            );
        }
        Ok(())
    }

    /// Loads the memory routing `usages` will read, for all of them
    /// before any is routed: each record's directory slot, dedupe slot and
    /// id store entry ([`IdStore::prefetch`]), then its directory key and
    /// location. Those are the router's cache
    /// misses (a random access each, ~300 ns on the benchmark VM); one
    /// record at a time they are paid one after another, in a batch they
    /// overlap. Reads only: what routing then does is exactly what it does
    /// without it. Returns a value made of the loaded words (for
    /// [`std::hint::black_box`], so the loads stay).
    pub fn prefetch<'a>(&self, usages: impl Iterator<Item = &'a Usage> + Clone) -> u64 {
        let mut loaded = 0u64;
        for u in usages.clone() {
            let fp = crate::dedupe::fingerprint(u.iccid, &u.record_id);
            loaded ^= self
                .directory
                .prefetch_slot(crate::directory::hash(u.iccid));
            loaded ^= self.deduper.prefetch_slot(fp);
            loaded ^= self.id_store.prefetch(fp, u.iccid, &u.record_id);
        }
        for u in usages {
            loaded ^= self
                .directory
                .get(&u.iccid)
                .map_or(0, |l| u64::from(l.slot));
        }
        loaded
    }

    /// The router's share of a record: future check, card lookup, dedupe
    /// and the event clock. `None` when the record stops here.
    pub(crate) fn route(
        &mut self,
        lane: Lane,
        usage: &Usage,
        received_at: Option<Timestamp>,
        seq: u64,
        out: &mut Vec<Output>,
    ) -> Result<Option<Dispatch>, EngineError> {
        self.last_seq = Some(seq);
        let reject = |code: &str, message: String| {
            Output::Rejected(Rejection {
                seq,
                code: code.to_owned(),
                message,
                iccid: Some(usage.iccid),
                record_id: Some(usage.record_id),
            })
        };
        let reference = self.clock.max(received_at.unwrap_or(Timestamp::MIN));
        if reference != Timestamp::MIN
            && usage.end > reference.plus_millis(self.config.max_future_ms)
        {
            out.push(reject(
                "future_time",
                format!(
                    "end {} is more than {} ms ahead of the event clock {} (received {})",
                    usage.end,
                    self.config.max_future_ms,
                    self.clock,
                    received_at.map_or_else(|| "-".to_owned(), |t| t.to_string())
                ),
            ));
            return Ok(None);
        }
        let Some(loc) = self.directory.get(&usage.iccid) else {
            out.push(reject(
                "unknown_card",
                format!("no card with ICCID {}", usage.iccid),
            ));
            return Ok(None);
        };
        let window_clock = self.clock.max(usage.end);
        match self.deduper.observe(
            usage.iccid,
            &usage.record_id,
            usage.end,
            seq,
            window_clock,
            self.id_store.as_mut(),
        )? {
            Sighting::Duplicate => {
                out.push(Output::Duplicate {
                    seq,
                    iccid: usage.iccid,
                    record_id: usage.record_id,
                });
                return Ok(None);
            }
            Sighting::First => {}
        }
        let agreed = self
            .lanes
            .observe(lane, usage.iccid, usage.end, self.config.clock_quorum);
        if let Some(agreed) = agreed.filter(|&a| a > self.clock) {
            self.clock = agreed;
            self.deduper.advance(self.clock);
        }
        Ok(Some(Dispatch {
            loc,
            clock: self.clock,
            lane_time: self.clock.max(self.lanes.lane_time(lane)),
        }))
    }

    /// Makes sure input lanes `0..n` exist (a Kafka run: one per usage
    /// partition, at every start). A lane new to the engine holds the
    /// clock back until it reports or is declared idle.
    pub fn declare_lanes(&mut self, n: usize) {
        self.lanes.declare(n);
    }

    /// Number of input lanes the clock follows.
    pub fn lane_count(&self) -> usize {
        self.lanes.len()
    }

    /// Input `seq`: `lane`'s source is read to its end and has been silent,
    /// so it no longer holds the clock back (until its next record). The
    /// clock may move to the slowest remaining lane's time, with the
    /// rollovers and deadlines that brings. The transport decides when a
    /// lane is idle (wall time); it must log that decision like any input,
    /// so a replay repeats it at the same place.
    pub fn lane_idle(&mut self, lane: Lane, seq: u64, out: &mut Vec<Output>) {
        self.last_seq = Some(seq);
        let agreed = self.lanes.idle(lane);
        self.advance_clock(agreed, out);
    }

    /// Input `seq`: every lane is active again, so each holds the clock
    /// back until it reports or is declared idle anew. A transport does
    /// this at every start: a source that was idle (read to its end) when
    /// the last run stopped may have a backlog now, whose records must not
    /// meet a clock the other sources moved on alone. The clock itself
    /// never goes back.
    pub fn lanes_awake(&mut self, seq: u64) {
        self.last_seq = Some(seq);
        self.lanes.wake_all();
    }

    /// Moves the event clock to `at` (if later) and lets every shard fire
    /// due deadlines and rollovers.
    pub fn advance_clock(&mut self, at: Timestamp, out: &mut Vec<Output>) {
        if at > self.clock {
            self.clock = at;
            self.deduper.advance(at);
        }
        let clock = self.clock;
        for shard in &mut self.shards {
            shard.advance(clock, out);
        }
    }

    /// Approximate heap bytes of the accounting state (directory + shards),
    /// excluding the dedupe window.
    pub fn accounting_heap_bytes(&self) -> usize {
        let dir = self.directory.heap_bytes();
        dir + self.shards.iter().map(Shard::heap_bytes).sum::<usize>()
    }

    /// The dedupe hot window: remembered ids and their heap bytes.
    pub fn dedupe_stats(&self) -> (usize, usize) {
        (self.deduper.len(), self.deduper.heap_bytes())
    }
}
