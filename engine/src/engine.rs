//! The sequential engine: the router (event clock, card directory, dedupe),
//! the registry (plans, pools, tags, rules, webhooks, command results) and
//! the shards, driven from one thread.
//!
//! [`Engine`] is the reference semantics. [`crate::sharded::ShardedEngine`]
//! runs the same shards on worker threads for throughput and falls back to
//! this code for commands, so both give the same state and the same events.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::command::{
    CardResult, CardSpec, Command, CommandError, CommandKind, CommandResult, ErrorCode, PlanSpec,
    PoolKind, PoolSpec, RuleSpec, TagSpec, WebhookSpec, MAX_ATTRIBUTE_NAMES, MAX_BATCH,
    MAX_MONTHS_AHEAD, MAX_TAGS, MAX_TAGS_PER_CARD,
};
use crate::config::EngineConfig;
use crate::dedupe::{DedupeConfig, DedupeError, Deduper, IdStore, MemIdStore, Sighting};
use crate::domain::{CardState, Carrier, Reason, Reasons, ThresholdMb, MB};
use crate::event::{Cause, JournalEntry, Output, PoolState, Rejection};
use crate::ids::{CommandId, Iccid, PlanId, PoolId, TagId};
use crate::record::Usage;
use crate::rule::Compiled;
use crate::shard::{add_months, Card, CardExtra, PlanInfo, Pool, Shard, NO_POOL};
use crate::shard_rules::ShardRule;
use crate::time::Timestamp;
use crate::watermark::Lane;

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

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PlanEntry {
    pub(crate) index: u16,
    pub(crate) spec: PlanSpec,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PoolEntry {
    pub(crate) shard: u32,
    pub(crate) index: u32,
    pub(crate) kind: PoolKind,
}

/// Everything global that commands read and write.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Registry {
    pub(crate) plans: BTreeMap<PlanId, PlanEntry>,
    pub(crate) plan_ids: Vec<Option<PlanId>>,
    pub(crate) pools: BTreeMap<PoolId, PoolEntry>,
    pub(crate) tags: BTreeMap<TagId, (u32, TagSpec)>,
    pub(crate) tag_names: Vec<Option<TagId>>,
    pub(crate) rules: BTreeMap<String, RuleSpec>,
    /// Key of each rule's fired state in the shards: kept while the rule's
    /// type, condition and filter stay the same, new otherwise.
    #[serde(default)]
    pub(crate) rule_keys: BTreeMap<String, u32>,
    #[serde(default)]
    pub(crate) next_rule_key: u32,
    pub(crate) webhooks: BTreeMap<String, WebhookSpec>,
    pub(crate) attribute_names: Vec<String>,
    /// First results, by command id (kept outside the JSON part of
    /// snapshots: there can be millions).
    #[serde(skip)]
    pub(crate) results: CommandResults,
}

/// The first result of every command id, compactly. Most commands succeed
/// with no per-card detail (`upsert_card`, ...), and an all-ok batch is
/// answered again from the repeat's own card list, so each of those costs
/// 16 bytes (the 128-bit xxh3 of the id, whose two low bits say which kind
/// of result it was) plus a 4-byte hash-table slot. Only failed commands
/// keep their full result. A collision between two ids has probability
/// ~n^2/2^127: about 1e-24 for ten million commands.
#[derive(Debug, Clone, Default)]
pub(crate) struct CommandResults {
    table: hashbrown::HashTable<u32>,
    keys: Vec<u128>,
    failures: hashbrown::HashMap<u128, Box<str>>,
}

/// Kinds of remembered result, in the two low bits of a key.
const RESULT_OK: u128 = 0;
const RESULT_ALL_CARDS_OK: u128 = 1;
const RESULT_FAILED: u128 = 2;
const KIND_BITS: u128 = 3;

fn id_key(id: &CommandId) -> u128 {
    xxhash_rust::xxh3::xxh3_128(id.as_str().as_bytes()) & !KIND_BITS
}

fn slot_hash(key: u128) -> u64 {
    (key >> 64) as u64
}

/// The remembered results, as snapshots store them: keys and failures
/// sorted, so that equal results encode equally whatever order they came
/// in. Sorted when serialized, not when copied: a snapshot's cut copies
/// them while the inputs wait, and its own thread encodes the copy
/// (sorting a million keys was a third of the copy at 1M cards).
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct StoredResults {
    keys: Vec<u128>,
    failures: Vec<(u128, String)>,
}

impl Serialize for StoredResults {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        fn sorted<T: Ord + Clone>(items: &[T]) -> std::borrow::Cow<'_, [T]> {
            if items.is_sorted() {
                std::borrow::Cow::Borrowed(items)
            } else {
                let mut items = items.to_vec();
                items.sort_unstable();
                std::borrow::Cow::Owned(items)
            }
        }
        // Field for field what `derive(Serialize)` wrote (a slice encodes
        // as the `Vec` it came from).
        let mut state = serializer.serialize_struct("StoredResults", 2)?;
        state.serialize_field("keys", &*sorted(&self.keys))?;
        state.serialize_field("failures", &*sorted(&self.failures))?;
        state.end()
    }
}

impl CommandResults {
    fn find(&self, key: u128) -> Option<u128> {
        self.table
            .find(slot_hash(key), |&i| {
                self.keys[i as usize] & !KIND_BITS == key
            })
            .map(|&i| self.keys[i as usize])
    }

    /// The first result of this command's id, if it was seen before.
    pub(crate) fn first_result(&self, command: &Command) -> Option<CommandResult> {
        let key = id_key(&command.id);
        let stored = self.find(key)?;
        let ok = |results| CommandResult {
            command_id: command.id.clone(),
            ok: true,
            error: None,
            results,
        };
        Some(match stored & KIND_BITS {
            RESULT_ALL_CARDS_OK => ok(command
                .kind
                .batch()
                .unwrap_or_default()
                .iter()
                .map(|&iccid| CardResult {
                    iccid,
                    ok: true,
                    error: None,
                })
                .collect()),
            RESULT_FAILED => self
                .failures
                .get(&key)
                .and_then(|json| serde_json::from_str(json).ok())
                .unwrap_or_else(|| {
                    CommandResult::rejected(
                        command.id.clone(),
                        CommandError::new(ErrorCode::Malformed, "repeat of a failed command"),
                    )
                }),
            _ => ok(Vec::new()),
        })
    }

    /// Remembers a command's first result.
    pub(crate) fn remember(&mut self, id: &CommandId, result: &CommandResult) {
        let key = id_key(id);
        let kind = if result.ok && result.results.is_empty() {
            RESULT_OK
        } else if result.ok {
            RESULT_ALL_CARDS_OK
        } else {
            let json = serde_json::to_string(result).unwrap_or_default();
            self.failures.insert(key, json.into_boxed_str());
            RESULT_FAILED
        };
        self.insert(key | kind);
    }

    fn insert(&mut self, tagged: u128) {
        let key = tagged & !KIND_BITS;
        if self.find(key).is_some() {
            return;
        }
        let index = self.keys.len() as u32;
        crate::directory::push_compact(&mut self.keys, tagged);
        let keys = &self.keys;
        self.table.insert_unique(slot_hash(key), index, |&i| {
            slot_hash(keys[i as usize] & !KIND_BITS)
        });
    }

    /// A copy as snapshots store it (sorted when serialized).
    pub(crate) fn to_stored(&self) -> StoredResults {
        StoredResults {
            keys: self.keys.clone(),
            failures: self
                .failures
                .iter()
                .map(|(k, v)| (*k, v.to_string()))
                .collect(),
        }
    }

    /// Rebuilds from [`CommandResults::to_stored`].
    pub(crate) fn from_stored(stored: StoredResults) -> CommandResults {
        let mut results = CommandResults {
            table: hashbrown::HashTable::with_capacity(stored.keys.len()),
            keys: Vec::with_capacity(stored.keys.len()),
            failures: stored
                .failures
                .into_iter()
                .map(|(k, v)| (k, v.into_boxed_str()))
                .collect(),
        };
        for key in stored.keys {
            results.insert(key);
        }
        results
    }
}

/// A card as queries see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardView {
    /// ICCID.
    pub iccid: Iccid,
    /// Carrier.
    pub carrier: Carrier,
    /// Plan id.
    pub plan: Option<PlanId>,
    /// Visible state.
    pub state: CardState,
    /// Suspension reasons (when suspended).
    pub reasons: Reasons,
    /// Usage counted in the current cycle.
    pub usage_bytes: u64,
    /// Current cycle.
    pub cycle: crate::cycle::CycleId,
    /// Cut-off threshold in MB (-1 none).
    pub threshold_mb: i64,
    /// Add-ons for the current cycle in MB.
    pub addon_mb: u64,
    /// Pool membership.
    pub pool: Option<PoolId>,
    /// Tags.
    pub tags: Vec<TagId>,
    /// Activation time.
    pub activated_at: Option<Timestamp>,
    /// Plan expiry.
    pub expires_at: Option<Timestamp>,
    /// MSISDN.
    pub msisdn: Option<String>,
    /// IMSI.
    pub imsi: Option<String>,
    /// IMEI.
    pub imei: Option<String>,
}

/// A pool as queries see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolView {
    /// Id.
    pub id: PoolId,
    /// Kind.
    pub kind: PoolKind,
    /// State.
    pub state: PoolState,
    /// Members' summed usage in the current cycle.
    pub usage_bytes: u64,
    /// Allowance (forward pools).
    pub allowance_bytes: u64,
    /// Members, by ICCID.
    pub members: Vec<Iccid>,
    /// Display name.
    pub name: String,
    /// The carrier whose cycle the pool follows (forward pools: the
    /// members' carrier).
    pub carrier: Option<Carrier>,
    /// The pool's current cycle.
    pub cycle: crate::cycle::CycleId,
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

fn err(code: ErrorCode, message: impl Into<String>) -> CommandError {
    CommandError::new(code, message)
}

/// `what` (months) above [`MAX_MONTHS_AHEAD`].
fn months_too_far(what: &str, months: u32) -> CommandError {
    err(
        ErrorCode::InvalidMonths,
        format!("{what} {months}: at most {MAX_MONTHS_AHEAD} (6 years from the command's at)"),
    )
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
    pub fn webhooks(&self) -> impl Iterator<Item = &crate::command::WebhookSpec> {
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
    /// id store entry ([`IdStore::warm`]), then its directory key and
    /// location. Those are the router's cache
    /// misses (a random access each, ~300 ns on the benchmark VM); one
    /// record at a time they are paid one after another, in a batch they
    /// overlap. Reads only: what routing then does is exactly what it does
    /// without it. Returns a value made of the loaded words (for
    /// [`std::hint::black_box`], so the loads stay).
    pub fn warm<'a>(&self, usages: impl Iterator<Item = &'a Usage> + Clone) -> u64 {
        let mut loaded = 0u64;
        for u in usages.clone() {
            let fp = crate::dedupe::fingerprint(u.iccid, &u.record_id);
            loaded ^= self.directory.warm_slot(crate::directory::hash(u.iccid));
            loaded ^= self.deduper.warm_slot(fp);
            loaded ^= self.id_store.warm(fp, u.iccid, &u.record_id);
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

    /// Processes one command: validates, applies, answers, journals.
    pub fn process_command(&mut self, command: Command, seq: u64, out: &mut Vec<Output>) {
        self.process_command_received(command, None, seq, out);
    }

    /// [`Engine::process_command`] for a command that came with a receive
    /// time (the Kafka message timestamp, the time a file line was read):
    /// a command whose `at` is more than `max_future_ms` ahead of the later
    /// of the event clock and that time is refused as a whole
    /// (`future_at`) and moves nothing, so no command can carry the clock
    /// into the future. An accepted command moves the clock to its `at`
    /// (the operator's time), also when it then fails for another reason.
    /// Without a receive time (tests, the what-if replay) the caller vouches
    /// for `at`: it is not bounded.
    pub fn process_command_received(
        &mut self,
        command: Command,
        received_at: Option<Timestamp>,
        seq: u64,
        out: &mut Vec<Output>,
    ) {
        self.last_seq = Some(seq);
        if let Some(result) = self.registry.results.first_result(&command) {
            out.push(Output::Journal(Box::new(JournalEntry {
                seq,
                command,
                result,
                repeat: true,
            })));
            return;
        }
        let result = if received_at.is_some_and(|received| {
            command.at
                > self
                    .clock
                    .max(received)
                    .plus_millis(self.config.max_future_ms)
        }) {
            CommandResult::rejected(
                command.id.clone(),
                err(
                    ErrorCode::FutureAt,
                    format!(
                        "at {} is more than {} ms ahead of the event clock {} (received {})",
                        command.at,
                        self.config.max_future_ms,
                        self.clock,
                        received_at.map_or_else(|| "-".to_owned(), |t| t.to_string())
                    ),
                ),
            )
        } else {
            self.advance_clock(command.at, out);
            self.apply(&command, out)
        };
        self.registry.results.remember(&command.id, &result);
        out.push(Output::Journal(Box::new(JournalEntry {
            seq,
            command,
            result,
            repeat: false,
        })));
    }

    fn apply(&mut self, command: &Command, out: &mut Vec<Output>) -> CommandResult {
        let id = command.id.clone();
        let at = command.at;
        if let Some(batch) = command.kind.batch() {
            if let Err(e) = check_batch(batch) {
                return CommandResult::rejected(id, e);
            }
        }
        let outcome = self.apply_kind(&command.kind, at);
        let cause = Cause::Command {
            command_id: id.clone(),
        };
        for shard in &mut self.shards {
            shard.finish(&cause, at, out);
        }
        match outcome {
            Err(e) => CommandResult::rejected(id, e),
            Ok(results) => CommandResult {
                command_id: id,
                ok: results.iter().all(|r| r.ok),
                error: None,
                results,
            },
        }
    }

    fn apply_kind(
        &mut self,
        kind: &CommandKind,
        at: Timestamp,
    ) -> Result<Vec<CardResult>, CommandError> {
        match kind {
            CommandKind::UpsertPlan { plan } => self.upsert_plan(plan).map(|()| Vec::new()),
            CommandKind::RemovePlan { plan } => self.remove_plan(plan).map(|()| Vec::new()),
            CommandKind::UpsertCard { card } => self.upsert_card(card, at).map(|()| Vec::new()),
            CommandKind::Activate { iccids } => Ok(self.per_card(iccids, |e, loc| {
                let card = e.card(loc);
                match card.lifecycle {
                    CardState::Deregistered => Err(deregistered(card.iccid)),
                    CardState::Active => Err(err(
                        ErrorCode::InvalidState,
                        format!("card {} is already active", card.iccid),
                    )),
                    _ => {
                        e.shards[loc.shard as usize].activate(loc.slot, at);
                        e.apply_due_dates(loc, at);
                        Ok(())
                    }
                }
            })),
            CommandKind::Suspend { iccids } => Ok(self.per_card(iccids, |e, loc| {
                let card = e.card(loc);
                if card.lifecycle != CardState::Active {
                    return Err(err(
                        ErrorCode::InvalidState,
                        format!(
                            "card {} is {}; only active cards can be suspended",
                            card.iccid, card.lifecycle
                        ),
                    ));
                }
                e.set_reason(loc, Reason::Manual, true);
                Ok(())
            })),
            CommandKind::Resume { iccids } => Ok(self.per_card(iccids, |e, loc| {
                let card = e.card(loc);
                if card.lifecycle == CardState::Deregistered {
                    return Err(deregistered(card.iccid));
                }
                e.set_reason(loc, Reason::Manual, false);
                e.set_reason(loc, Reason::Violation, false);
                Ok(())
            })),
            CommandKind::Deregister { iccids } => Ok(self.per_card(iccids, |e, loc| {
                e.live(loc)?;
                e.deregister(loc);
                Ok(())
            })),
            CommandKind::Renew { iccids, months } => {
                if *months == 0 {
                    return Err(err(ErrorCode::InvalidValue, "renew needs months >= 1"));
                }
                if *months > MAX_MONTHS_AHEAD {
                    return Err(months_too_far("renew months", *months));
                }
                let offset = self.config.calendar.utc_offset_secs;
                let bound = add_months(at, MAX_MONTHS_AHEAD, offset);
                Ok(self.per_card(iccids, |e, loc| {
                    e.live(loc)?;
                    let card = e.card(loc);
                    let base = if card.expires_at == Timestamp::MAX {
                        at
                    } else {
                        card.expires_at.max(at)
                    };
                    // `base` past the bound is refused before any month is
                    // added to it: the sum stays inside the date range.
                    let new_expiry = (base <= bound)
                        .then(|| add_months(base, *months, offset))
                        .filter(|t| *t <= bound)
                        .ok_or_else(|| {
                            err(
                                ErrorCode::InvalidMonths,
                                format!(
                                    "renewing {} by {months} months from {base} reaches beyond \
                                     6 years from {at} ({bound})",
                                    card.iccid
                                ),
                            )
                        })?;
                    let shard = &mut e.shards[loc.shard as usize];
                    shard.touch(loc.slot);
                    shard.cards[loc.slot as usize].expires_at = new_expiry;
                    shard.reschedule(loc.slot);
                    e.apply_due_dates(loc, at);
                    Ok(())
                }))
            }
            CommandKind::SetThreshold { iccids, mb } => {
                if *mb < -1 {
                    return Err(err(
                        ErrorCode::InvalidThreshold,
                        format!("threshold {mb} MB: use -1 for none, 0 or a positive MB value"),
                    ));
                }
                let Ok(mb32) = i32::try_from(*mb) else {
                    return Err(err(
                        ErrorCode::InvalidValue,
                        format!("threshold {mb} MB is too large"),
                    ));
                };
                Ok(self.per_card(iccids, |e, loc| {
                    e.live(loc)?;
                    let card = e.card(loc);
                    if card.carrier.threshold_needs_forward_pool() && !e.in_forward_pool(loc) {
                        return Err(err(
                            ErrorCode::ThresholdNotAllowed,
                            format!(
                                "{} card {} is not in a forward pool",
                                card.carrier, card.iccid
                            ),
                        ));
                    }
                    let shard = &mut e.shards[loc.shard as usize];
                    shard.touch(loc.slot);
                    let card = &mut shard.cards[loc.slot as usize];
                    card.threshold_mb = mb32;
                    let over = ThresholdMb(*mb)
                        .limit_bytes()
                        .is_some_and(|l| card.usage > l);
                    card.reasons = card.reasons.set(Reason::OverThreshold, over);
                    Ok(())
                }))
            }
            CommandKind::ClearThreshold { iccids } => Ok(self.per_card(iccids, |e, loc| {
                e.live(loc)?;
                e.shards[loc.shard as usize].cards[loc.slot as usize].threshold_mb = -1;
                Ok(())
            })),
            CommandKind::AddOn { iccid, pool, mb } => self
                .add_on(iccid.as_ref(), pool.as_ref(), *mb, at)
                .map(|()| Vec::new()),
            CommandKind::CreatePool { pool } => self.create_pool(pool).map(|()| Vec::new()),
            CommandKind::AddPoolMembers { pool, iccids } => {
                let entry = self.pool_entry(pool)?.clone();
                Ok(self.per_card(iccids, |e, loc| e.add_member(&entry, loc)))
            }
            CommandKind::RemovePoolMembers { pool, iccids } => {
                let entry = self.pool_entry(pool)?.clone();
                Ok(self.per_card(iccids, |e, loc| {
                    if loc.shard != entry.shard || e.card(loc).pool != entry.index {
                        return Err(err(
                            ErrorCode::NotInPool,
                            format!("card {} is not a member of pool {pool}", e.card(loc).iccid),
                        ));
                    }
                    e.shards[loc.shard as usize].remove_member(loc.slot);
                    Ok(())
                }))
            }
            CommandKind::FreezePool { pool } | CommandKind::UnfreezePool { pool } => {
                let freeze = matches!(kind, CommandKind::FreezePool { .. });
                let entry = self.pool_entry(pool)?.clone();
                if entry.kind != PoolKind::Backward {
                    return Err(err(
                        ErrorCode::WrongPoolKind,
                        format!("pool {pool} is a forward pool; only backward pools are frozen"),
                    ));
                }
                let shard = &mut self.shards[entry.shard as usize];
                shard.pools[entry.index as usize].frozen = freeze;
                let members = crate::shard::member_slots(&shard.pools[entry.index as usize]);
                touch_pool_members(shard, &members);
                Ok(Vec::new())
            }
            CommandKind::ReportViolation { iccids } => Ok(self.per_card(iccids, |e, loc| {
                e.live(loc)?;
                e.set_reason(loc, Reason::Violation, true);
                Ok(())
            })),
            CommandKind::Rebind { iccid, imei } => {
                let loc = self.locate(*iccid)?;
                self.live(loc)?;
                self.set_reason(loc, Reason::Violation, false);
                if let Some(imei) = imei {
                    self.shards[loc.shard as usize].set_ident(loc.slot, 2, Some(imei.clone()));
                }
                Ok(Vec::new())
            }
            CommandKind::UpsertRule { rule } => self.upsert_rule(rule).map(|()| Vec::new()),
            CommandKind::EnableRule { rule } | CommandKind::DisableRule { rule } => {
                let enable = matches!(kind, CommandKind::EnableRule { .. });
                let Some(spec) = self.registry.rules.get(rule) else {
                    return Err(err(ErrorCode::UnknownRule, format!("no rule {rule:?}")));
                };
                let mut spec = spec.clone();
                let was_enabled = spec.enabled;
                spec.enabled = enable;
                if enable {
                    self.validate_rule(&spec)?;
                }
                self.registry.rules.insert(rule.clone(), spec);
                self.refresh_backward_rules();
                self.push_rules();
                if enable && !was_enabled {
                    self.scan_rule(rule);
                }
                Ok(Vec::new())
            }
            CommandKind::RemoveRule { rule } => {
                if self.registry.rules.remove(rule).is_none() {
                    return Err(err(ErrorCode::UnknownRule, format!("no rule {rule:?}")));
                }
                self.registry.rule_keys.remove(rule);
                self.refresh_backward_rules();
                self.push_rules();
                Ok(Vec::new())
            }
            CommandKind::UpsertWebhook { webhook } => {
                if !(webhook.url.starts_with("http://") || webhook.url.starts_with("https://")) {
                    return Err(err(
                        ErrorCode::InvalidValue,
                        format!(
                            "webhook URL {:?} must start with http:// or https://",
                            webhook.url
                        ),
                    ));
                }
                self.registry
                    .webhooks
                    .insert(webhook.id.clone(), webhook.clone());
                Ok(Vec::new())
            }
            CommandKind::RemoveWebhook { webhook } => {
                if let Some(rule) = self.registry.rules.values().find(|r| {
                    r.enabled
                        && r.actions.iter().any(|a| {
                            a.get("endpoint").and_then(|e| e.as_str()) == Some(webhook.as_str())
                        })
                }) {
                    return Err(err(
                        ErrorCode::WebhookInUse,
                        format!("webhook {webhook:?} is used by enabled rule {:?}", rule.id),
                    ));
                }
                if self.registry.webhooks.remove(webhook).is_none() {
                    return Err(err(
                        ErrorCode::UnknownWebhook,
                        format!("no webhook {webhook:?}"),
                    ));
                }
                Ok(Vec::new())
            }
            CommandKind::UpsertTag { tag } => {
                if !self.registry.tags.contains_key(&tag.name) {
                    if self.registry.tags.len() >= MAX_TAGS {
                        return Err(err(
                            ErrorCode::TagLimitReached,
                            format!("an operator has at most {MAX_TAGS} tags"),
                        ));
                    }
                    let index = self.registry.tag_names.len() as u32;
                    self.registry.tag_names.push(Some(tag.name.clone()));
                    self.registry
                        .tags
                        .insert(tag.name.clone(), (index, tag.clone()));
                } else if let Some(entry) = self.registry.tags.get_mut(&tag.name) {
                    entry.1 = tag.clone();
                }
                Ok(Vec::new())
            }
            CommandKind::RemoveTag { tag } => self.remove_tag(tag).map(|()| Vec::new()),
            CommandKind::BindTags { iccids, tags } | CommandKind::UnbindTags { iccids, tags } => {
                let bind = matches!(kind, CommandKind::BindTags { .. });
                let indexes = self.tag_indexes(tags)?;
                Ok(self.per_card(iccids, |e, loc| {
                    e.live(loc)?;
                    let shard = &mut e.shards[loc.shard as usize];
                    let mut current: BTreeSet<u32> =
                        shard.tags_of(loc.slot).iter().copied().collect();
                    for t in &indexes {
                        if bind {
                            current.insert(*t);
                        } else {
                            current.remove(t);
                        }
                    }
                    if current.len() > MAX_TAGS_PER_CARD {
                        return Err(err(
                            ErrorCode::TooManyTags,
                            format!(
                                "card {} would hold {} tags; at most {MAX_TAGS_PER_CARD}",
                                shard.cards[loc.slot as usize].iccid,
                                current.len()
                            ),
                        ));
                    }
                    shard.set_tags(loc.slot, &current.into_iter().collect::<Vec<_>>());
                    Ok(())
                }))
            }
            CommandKind::SetAttributeNames { names } => {
                if names.len() > MAX_ATTRIBUTE_NAMES {
                    return Err(err(
                        ErrorCode::InvalidAttribute,
                        format!(
                            "{} attribute names; at most {MAX_ATTRIBUTE_NAMES}",
                            names.len()
                        ),
                    ));
                }
                let unique: BTreeSet<&String> = names.iter().collect();
                if unique.len() != names.len() || names.iter().any(String::is_empty) {
                    return Err(err(
                        ErrorCode::InvalidAttribute,
                        "attribute names must be non-empty and distinct",
                    ));
                }
                self.registry.attribute_names = names.clone();
                Ok(Vec::new())
            }
        }
    }

    // ----- helpers ------------------------------------------------------

    fn per_card(
        &mut self,
        iccids: &[Iccid],
        mut f: impl FnMut(&mut Engine, Loc) -> Result<(), CommandError>,
    ) -> Vec<CardResult> {
        iccids
            .iter()
            .map(|&iccid| {
                let outcome = self.locate(iccid).and_then(|loc| f(self, loc));
                match outcome {
                    Ok(()) => CardResult {
                        iccid,
                        ok: true,
                        error: None,
                    },
                    Err(e) => CardResult {
                        iccid,
                        ok: false,
                        error: Some(e),
                    },
                }
            })
            .collect()
    }

    fn locate(&self, iccid: Iccid) -> Result<Loc, CommandError> {
        self.directory.get(&iccid).ok_or_else(|| {
            err(
                ErrorCode::UnknownCard,
                format!("no card with ICCID {iccid}"),
            )
        })
    }

    pub(crate) fn card(&self, loc: Loc) -> &Card {
        &self.shards[loc.shard as usize].cards[loc.slot as usize]
    }

    fn live(&self, loc: Loc) -> Result<(), CommandError> {
        let card = self.card(loc);
        if card.lifecycle == CardState::Deregistered {
            Err(deregistered(card.iccid))
        } else {
            Ok(())
        }
    }

    fn in_forward_pool(&self, loc: Loc) -> bool {
        let shard = &self.shards[loc.shard as usize];
        let p = shard.cards[loc.slot as usize].pool;
        p != NO_POOL && shard.pools[p as usize].kind == PoolKind::Forward
    }

    fn set_reason(&mut self, loc: Loc, reason: Reason, present: bool) {
        let shard = &mut self.shards[loc.shard as usize];
        shard.touch(loc.slot);
        let card = &mut shard.cards[loc.slot as usize];
        card.reasons = card.reasons.set(reason, present);
    }

    fn deregister(&mut self, loc: Loc) {
        let shard = &mut self.shards[loc.shard as usize];
        shard.touch(loc.slot);
        shard.remove_member(loc.slot);
        let card = &mut shard.cards[loc.slot as usize];
        card.lifecycle = CardState::Deregistered;
        card.reasons = Reasons::EMPTY;
    }

    /// Applies dates already past at `at` within the current command:
    /// expiry (`plan_expired` set or lifted), end of test or silent period.
    fn apply_due_dates(&mut self, loc: Loc, at: Timestamp) {
        let shard = &mut self.shards[loc.shard as usize];
        shard.touch(loc.slot);
        let card = &shard.cards[loc.slot as usize];
        if card.lifecycle == CardState::Deregistered {
            return;
        }
        let expired = card.expires_at <= at;
        let lifecycle = card.lifecycle;
        let (test_end, silent_end) = shard
            .extra(loc.slot)
            .map_or((None, None), |e| (e.test_ends_at, e.silent_ends_at));
        let card = &mut shard.cards[loc.slot as usize];
        card.reasons = card.reasons.set(Reason::PlanExpired, expired);
        if lifecycle == CardState::Testable && test_end.is_some_and(|t| t <= at) {
            card.lifecycle = CardState::Activatable;
        }
        let lifecycle = card.lifecycle;
        if let Some(silent_end) =
            silent_end.filter(|t| lifecycle == CardState::Activatable && *t <= at)
        {
            // Forced activation dates from the end of the silent period.
            shard.activate(loc.slot, silent_end);
            let card = &mut shard.cards[loc.slot as usize];
            card.reasons = card.reasons.set(Reason::PlanExpired, card.expires_at <= at);
        }
        shard.refresh_card(loc.slot);
    }

    fn pool_entry(&self, pool: &PoolId) -> Result<&PoolEntry, CommandError> {
        self.registry
            .pools
            .get(pool)
            .ok_or_else(|| err(ErrorCode::UnknownPool, format!("no pool {pool}")))
    }

    fn plan_entry(&self, plan: &PlanId) -> Result<&PlanEntry, CommandError> {
        self.registry
            .plans
            .get(plan)
            .ok_or_else(|| err(ErrorCode::UnknownPlan, format!("no plan {plan}")))
    }

    fn tag_indexes(&self, tags: &[TagId]) -> Result<Vec<u32>, CommandError> {
        tags.iter()
            .map(|t| {
                self.registry
                    .tags
                    .get(t)
                    .map(|(i, _)| *i)
                    .ok_or_else(|| err(ErrorCode::UnknownTag, format!("no tag {t}")))
            })
            .collect()
    }

    fn shard_for_card(&self, iccid: Iccid) -> u32 {
        (iccid.stable_hash() % self.shards.len() as u64) as u32
    }

    // ----- plans --------------------------------------------------------

    fn upsert_plan(&mut self, spec: &PlanSpec) -> Result<(), CommandError> {
        if spec.id.as_str().is_empty() {
            return Err(err(ErrorCode::InvalidValue, "plan id must not be empty"));
        }
        if spec.term_months > MAX_MONTHS_AHEAD {
            return Err(months_too_far("plan term_months", spec.term_months));
        }
        let info = PlanInfo {
            id: spec.id.clone(),
            name: spec.name.clone(),
            allowance_bytes: spec.allowance_mb.saturating_mul(MB),
            traffic: spec.traffic,
            term_months: spec.term_months,
        };
        let index = match self.registry.plans.get(&spec.id) {
            Some(existing) => {
                if existing.spec.carrier != spec.carrier && self.plan_in_use(existing.index) {
                    return Err(err(
                        ErrorCode::PlanInUse,
                        format!(
                            "plan {} is used by cards or pools; its carrier cannot change",
                            spec.id
                        ),
                    ));
                }
                existing.index
            }
            None => {
                let index = u16::try_from(self.registry.plan_ids.len())
                    .map_err(|_| err(ErrorCode::InvalidValue, "too many plans (at most 65,535)"))?;
                self.registry.plan_ids.push(Some(spec.id.clone()));
                index
            }
        };
        self.registry.plans.insert(
            spec.id.clone(),
            PlanEntry {
                index,
                spec: spec.clone(),
            },
        );
        for shard in &mut self.shards {
            let i = usize::from(index);
            if shard.plans.len() <= i {
                shard.plans.resize(i + 1, None);
            }
            shard.plans[i] = Some(info.clone());
            // A changed allowance or traffic type re-evaluates the plan's cards and pools.
            let slots: Vec<u32> = shard
                .live_slots()
                .filter(|&s| shard.cards[s as usize].plan == index)
                .collect();
            for s in slots {
                shard.touch(s);
                shard.refresh_card(s);
            }
            for p in 0..shard.pools.len() as u32 {
                if !shard.pools[p as usize].removed {
                    shard.recompute_member_allowance(p);
                }
            }
        }
        Ok(())
    }

    fn plan_in_use(&self, index: u16) -> bool {
        self.shards.iter().any(|s| {
            s.live_slots()
                .any(|slot| s.cards[slot as usize].plan == index)
                || s.pools.iter().any(|p| !p.removed && p.plan == Some(index))
        })
    }

    fn remove_plan(&mut self, plan: &PlanId) -> Result<(), CommandError> {
        let index = self.plan_entry(plan)?.index;
        if self.plan_in_use(index) {
            return Err(err(
                ErrorCode::PlanInUse,
                format!("plan {plan} is used by cards or pools"),
            ));
        }
        self.registry.plans.remove(plan);
        self.registry.plan_ids[usize::from(index)] = None;
        for shard in &mut self.shards {
            shard.plans[usize::from(index)] = None;
        }
        Ok(())
    }

    // ----- cards --------------------------------------------------------

    fn upsert_card(&mut self, spec: &CardSpec, at: Timestamp) -> Result<(), CommandError> {
        let plan = self.plan_entry(&spec.plan)?;
        if plan.spec.carrier != spec.carrier {
            return Err(err(
                ErrorCode::CarrierMismatch,
                format!(
                    "plan {} is a {} plan; card {} is a {} card",
                    spec.plan, plan.spec.carrier, spec.iccid, spec.carrier
                ),
            ));
        }
        let (plan_index, term) = (plan.index, plan.spec.term_months);
        if spec.tags.len() > MAX_TAGS_PER_CARD {
            return Err(err(
                ErrorCode::TooManyTags,
                format!(
                    "card {} has {} tags; at most {MAX_TAGS_PER_CARD}",
                    spec.iccid,
                    spec.tags.len()
                ),
            ));
        }
        let tags = self.tag_indexes(&spec.tags)?;
        if let Some(name) = spec
            .attributes
            .keys()
            .find(|k| !self.registry.attribute_names.contains(k))
        {
            return Err(err(
                ErrorCode::InvalidAttribute,
                format!("attribute {name:?} is not declared (set_attribute_names)"),
            ));
        }
        let offset = self.config.calendar.utc_offset_secs;
        // An existing card keeps what the command leaves out.
        let existing = self.directory.get(&spec.iccid).map(|loc| {
            let card = self.card(loc);
            let state =
                if card.lifecycle == CardState::Active && card.reasons.contains(Reason::Manual) {
                    CardState::Suspended
                } else {
                    card.lifecycle
                };
            let silent = self.shards[loc.shard as usize]
                .extra(loc.slot)
                .and_then(|e| e.silent_ends_at);
            (state, card.activated_at, card.expires_at, silent)
        });
        let state = spec
            .state
            .or(existing.map(|e| e.0))
            .unwrap_or(CardState::Activatable);
        let (lifecycle, manual) = match state {
            CardState::Suspended => (CardState::Active, true),
            s => (s, false),
        };
        let kept_activation = existing.map(|e| e.1).filter(|t| *t != Timestamp::MIN);
        let activated_at = match (spec.activated_at.or(kept_activation), lifecycle) {
            (Some(t), _) => t,
            (None, CardState::Active) => at,
            _ => Timestamp::MIN,
        };
        let kept_expiry = existing.map(|e| e.2).filter(|t| *t != Timestamp::MAX);
        let expires_at = match (spec.expires_at.or(kept_expiry), lifecycle) {
            (Some(t), _) => t,
            (None, CardState::Active) => add_months(activated_at, term, offset),
            _ => Timestamp::MAX,
        };
        let silent_ends_at = match (
            spec.silent_ends_at.or(existing.and_then(|e| e.3)),
            lifecycle,
        ) {
            (Some(t), _) => Some(t),
            (None, CardState::Activatable) => {
                Some(add_months(at, self.config.silent_period_months, offset))
            }
            _ => None,
        };

        if let Some(loc) = self.directory.get(&spec.iccid) {
            let card = self.card(loc);
            if card.lifecycle == CardState::Deregistered {
                return Err(deregistered(spec.iccid));
            }
            let shard = &self.shards[loc.shard as usize];
            if card.pool != NO_POOL {
                let mut candidate = card.clone();
                candidate.plan = plan_index;
                candidate.carrier = spec.carrier;
                shard.check_member(card.pool, &candidate)?;
            }
            let shard = &mut self.shards[loc.shard as usize];
            shard.touch(loc.slot);
            let contribution = shard.member_contribution(loc.slot);
            let card = &mut shard.cards[loc.slot as usize];
            card.plan = plan_index;
            card.carrier = spec.carrier;
            card.lifecycle = lifecycle;
            card.activated_at = activated_at;
            card.expires_at = expires_at;
            card.reasons = card.reasons.set(Reason::Manual, manual);
            if lifecycle == CardState::Deregistered {
                card.reasons = Reasons::EMPTY;
            }
            let extra = shard.extra_mut(loc.slot);
            fill_extra(extra, spec, silent_ends_at);
            for (which, value) in [&spec.msisdn, &spec.imsi, &spec.imei]
                .into_iter()
                .enumerate()
            {
                shard.set_ident(loc.slot, which, value.clone());
            }
            shard.set_tags(loc.slot, &tags);
            shard.adjust_member_allowance(loc.slot, contribution);
            if lifecycle == CardState::Deregistered {
                shard.remove_member(loc.slot);
            }
            shard.reschedule(loc.slot);
            self.apply_due_dates(loc, at);
            return Ok(());
        }

        let card = Card {
            iccid: spec.iccid,
            usage: 0,
            activated_at,
            expires_at,
            plan: plan_index,
            carrier: spec.carrier,
            lifecycle,
            reasons: if manual {
                Reasons::EMPTY.with(Reason::Manual)
            } else {
                Reasons::EMPTY
            },
            pool: NO_POOL,
            tagset: 0,
            threshold_mb: -1,
            addon_mb: 0,
            vacant: false,
        };
        let mut extra = CardExtra::default();
        fill_extra(&mut extra, spec, silent_ends_at);
        let shard_index = self.shard_for_card(spec.iccid);
        let shard = &mut self.shards[shard_index as usize];
        let slot = shard.insert_card(card, Some(extra), &tags);
        let loc = Loc {
            shard: shard_index,
            slot,
        };
        self.directory.insert(spec.iccid, loc);
        self.apply_due_dates(loc, at);
        Ok(())
    }

    fn add_on(
        &mut self,
        iccid: Option<&Iccid>,
        pool: Option<&PoolId>,
        mb: u64,
        at: Timestamp,
    ) -> Result<(), CommandError> {
        if mb == 0 {
            return Err(err(ErrorCode::InvalidValue, "an add-on pack needs mb >= 1"));
        }
        let cal = self.config.calendar;
        match (iccid, pool) {
            (Some(&iccid), None) => {
                let loc = self.locate(iccid)?;
                self.live(loc)?;
                if self.in_forward_pool(loc) {
                    return Err(err(
                        ErrorCode::InvalidState,
                        format!("card {iccid} is in a forward pool: buy the add-on for the pool"),
                    ));
                }
                let mb32 = u32::try_from(mb).map_err(|_| {
                    err(
                        ErrorCode::InvalidValue,
                        format!("add-on of {mb} MB is too large"),
                    )
                })?;
                let shard = &mut self.shards[loc.shard as usize];
                let carrier = shard.cards[loc.slot as usize].carrier;
                if cal.cycle_of(carrier, at) != shard.cycle(carrier) {
                    return Err(err(
                        ErrorCode::InvalidValue,
                        format!("add-on bought at {at} belongs to a closed cycle"),
                    ));
                }
                shard.touch(loc.slot);
                let card = &mut shard.cards[loc.slot as usize];
                card.addon_mb = card.addon_mb.saturating_add(mb32);
                shard.refresh_card(loc.slot);
                Ok(())
            }
            (None, Some(pool)) => {
                let entry = self.pool_entry(pool)?.clone();
                if entry.kind != PoolKind::Forward {
                    return Err(err(
                        ErrorCode::WrongPoolKind,
                        format!(
                            "pool {pool} is a backward pool; add-on packs are for forward pools"
                        ),
                    ));
                }
                let shard = &mut self.shards[entry.shard as usize];
                let carrier = shard.pools[entry.index as usize]
                    .carrier
                    .unwrap_or(Carrier::Cmcc);
                if cal.cycle_of(carrier, at) != shard.cycle(carrier) {
                    return Err(err(
                        ErrorCode::InvalidValue,
                        format!("add-on bought at {at} belongs to a closed cycle"),
                    ));
                }
                let p = &mut shard.pools[entry.index as usize];
                p.addon_mb = p.addon_mb.saturating_add(mb);
                shard.refresh_pool(entry.index);
                Ok(())
            }
            _ => Err(err(
                ErrorCode::Malformed,
                "add_on takes exactly one of iccid and pool",
            )),
        }
    }

    // ----- pools --------------------------------------------------------

    fn create_pool(&mut self, spec: &PoolSpec) -> Result<(), CommandError> {
        if self.registry.pools.contains_key(&spec.id) {
            return Err(err(
                ErrorCode::AlreadyExists,
                format!("pool {} already exists", spec.id),
            ));
        }
        if spec.id.as_str().is_empty() {
            return Err(err(ErrorCode::InvalidValue, "pool id must not be empty"));
        }
        let plan = match (spec.kind, &spec.plan, spec.carrier) {
            (PoolKind::Forward, Some(plan), Some(carrier)) => {
                let entry = self.plan_entry(plan)?;
                if entry.spec.carrier != carrier {
                    return Err(err(
                        ErrorCode::CarrierMismatch,
                        format!(
                            "plan {plan} is a {} plan; pool {} is for {carrier}",
                            entry.spec.carrier, spec.id
                        ),
                    ));
                }
                Some(entry.index)
            }
            (PoolKind::Forward, _, _) => {
                return Err(err(
                    ErrorCode::InvalidValue,
                    format!("forward pool {} needs a carrier and a plan", spec.id),
                ));
            }
            (PoolKind::Backward, _, _) => None,
        };
        let shard_index = (spec.id.stable_hash() % self.shards.len() as u64) as u32;
        let shard = &mut self.shards[shard_index as usize];
        let index = shard.pools.len() as u32;
        shard.pools.push(Pool {
            id: spec.id.clone(),
            name: spec.name.clone(),
            kind: spec.kind,
            carrier: spec.carrier,
            plan,
            members: std::collections::HashSet::new(),
            usage: 0,
            member_allowance: 0,
            addon_mb: 0,
            exhausted: false,
            frozen: false,
            cut: false,
            suspend_at: None,
            removed: false,
        });
        self.registry.pools.insert(
            spec.id.clone(),
            PoolEntry {
                shard: shard_index,
                index,
                kind: spec.kind,
            },
        );
        self.refresh_backward_rules();
        Ok(())
    }

    fn add_member(&mut self, entry: &PoolEntry, loc: Loc) -> Result<(), CommandError> {
        self.live(loc)?;
        let card = self.card(loc);
        if card.pool != NO_POOL {
            if loc.shard == entry.shard && card.pool == entry.index {
                return Ok(());
            }
            let other = &self.shards[loc.shard as usize].pools[card.pool as usize].id;
            return Err(err(
                ErrorCode::AlreadyInPool,
                format!("card {} is already in pool {other}", card.iccid),
            ));
        }
        self.shards[entry.shard as usize].check_member(entry.index, card)?;
        let loc = if loc.shard == entry.shard {
            loc
        } else {
            let moved = self.shards[loc.shard as usize].take_card(loc.slot);
            let iccid = moved.card.iccid;
            let dst = &mut self.shards[entry.shard as usize];
            let slot = dst.insert_card(moved.card, moved.extra, &moved.tags);
            dst.put_marks(slot, moved.marks);
            let new_loc = Loc {
                shard: entry.shard,
                slot,
            };
            self.directory.insert(iccid, new_loc);
            new_loc
        };
        self.shards[loc.shard as usize].add_member(entry.index, loc.slot);
        Ok(())
    }

    // ----- rules and tags -----------------------------------------------

    fn validate_rule(&self, rule: &RuleSpec) -> Result<Compiled, CommandError> {
        let webhooks = &self.registry.webhooks;
        let compiled = crate::rule::compile(rule, &|id| webhooks.contains_key(id))?;
        for plan in &rule.filter.plans {
            self.plan_entry(plan)?;
        }
        self.tag_indexes(&rule.filter.tags)?;
        for (pools, kind) in [
            (&rule.filter.forward_pools, PoolKind::Forward),
            (&rule.filter.backward_pools, PoolKind::Backward),
        ] {
            for pool in pools {
                if self.pool_entry(pool)?.kind != kind {
                    return Err(err(
                        ErrorCode::WrongPoolKind,
                        format!("pool {pool} is not a {kind:?} pool").to_lowercase(),
                    ));
                }
            }
        }
        Ok(compiled)
    }

    fn upsert_rule(&mut self, rule: &RuleSpec) -> Result<(), CommandError> {
        if rule.id.is_empty() {
            return Err(err(ErrorCode::InvalidValue, "rule id must not be empty"));
        }
        if rule.id.len() > crate::ids::MAX_NAME_ID_LEN {
            return Err(err(
                ErrorCode::InvalidValue,
                format!(
                    "rule id is {} bytes long; at most {}",
                    rule.id.len(),
                    crate::ids::MAX_NAME_ID_LEN
                ),
            ));
        }
        self.validate_rule(rule)?;
        // Same type, condition and filter: the same rule (its fired state
        // stays); otherwise a new version that starts with none.
        let same = self.registry.rules.get(&rule.id).is_some_and(|old| {
            old.rule_type == rule.rule_type
                && old.condition == rule.condition
                && old.filter == rule.filter
        });
        if !same {
            let key = self.registry.next_rule_key;
            self.registry.next_rule_key = key.wrapping_add(1);
            self.registry.rule_keys.insert(rule.id.clone(), key);
        }
        self.registry.rules.insert(rule.id.clone(), rule.clone());
        self.refresh_backward_rules();
        self.push_rules();
        if rule.enabled {
            self.scan_rule(&rule.id);
        }
        Ok(())
    }

    /// Evaluates a rule on every card or pool at the end of the current
    /// command: a rule added, changed or enabled fires at once for the
    /// targets already inside its condition (unless they fired in the
    /// current window).
    fn scan_rule(&mut self, id: &str) {
        if let Some(&key) = self.registry.rule_keys.get(id) {
            for shard in &mut self.shards {
                shard.scan_rule(key);
            }
        }
    }

    /// Installs the enabled rules in every shard, filters resolved to the
    /// shard's indexes. Called after every rule change and on restore.
    pub(crate) fn push_rules(&mut self) {
        let live: BTreeSet<u32> = self.registry.rule_keys.values().copied().collect();
        let mut per_shard: Vec<Vec<ShardRule>> = vec![Vec::new(); self.shards.len()];
        for (id, spec) in &self.registry.rules {
            if !spec.enabled {
                continue;
            }
            // Validated when upserted or enabled; what it references can
            // only go away through commands that check enabled rules first.
            let Ok(compiled) = crate::rule::compile(spec, &|_| true) else {
                continue;
            };
            let Some(&key) = self.registry.rule_keys.get(id) else {
                continue;
            };
            let plans: Vec<u16> = spec
                .filter
                .plans
                .iter()
                .filter_map(|p| self.registry.plans.get(p).map(|e| e.index))
                .collect();
            let tags: Vec<u32> = spec
                .filter
                .tags
                .iter()
                .filter_map(|t| self.registry.tags.get(t).map(|(i, _)| *i))
                .collect();
            let named: Vec<&PoolEntry> = spec
                .filter
                .forward_pools
                .iter()
                .chain(&spec.filter.backward_pools)
                .filter_map(|p| self.registry.pools.get(p))
                .collect();
            let any_pool =
                spec.filter.forward_pools.is_empty() && spec.filter.backward_pools.is_empty();
            for (s, rules) in per_shard.iter_mut().enumerate() {
                let pools = (!any_pool).then(|| {
                    named
                        .iter()
                        .filter(|e| e.shard as usize == s)
                        .map(|e| e.index)
                        .collect()
                });
                rules.push(ShardRule {
                    key,
                    id: id.clone(),
                    name: spec.name.clone(),
                    rule: compiled.clone(),
                    plans: plans.clone(),
                    tags: tags.clone(),
                    pools,
                });
            }
        }
        for (shard, rules) in self.shards.iter_mut().zip(per_shard) {
            shard.set_rules(rules, &live);
        }
    }

    /// Recomputes every backward pool's suspend threshold from the enabled
    /// suspend rules; a pool already past a new threshold is cut at once.
    fn refresh_backward_rules(&mut self) {
        let rules: Vec<(u64, Vec<PoolId>)> = self
            .registry
            .rules
            .values()
            .filter(|r| r.enabled && r.rule_type == 3)
            .filter(|r| {
                r.actions
                    .iter()
                    .any(|a| a.get("type").and_then(|t| t.as_str()) == Some("suspend"))
            })
            .filter_map(|r| {
                backward_suspend_threshold(r).map(|t| (t, r.filter.backward_pools.clone()))
            })
            .collect();
        for shard in &mut self.shards {
            for p in 0..shard.pools.len() as u32 {
                let pool = &shard.pools[p as usize];
                if pool.kind != PoolKind::Backward || pool.removed {
                    continue;
                }
                let at = rules
                    .iter()
                    .filter(|(_, pools)| pools.is_empty() || pools.contains(&pool.id))
                    .map(|(t, _)| *t)
                    .min();
                shard.pools[p as usize].suspend_at = at;
                shard.refresh_pool(p);
            }
        }
    }

    fn remove_tag(&mut self, tag: &TagId) -> Result<(), CommandError> {
        let Some(&(index, _)) = self.registry.tags.get(tag) else {
            return Err(err(ErrorCode::UnknownTag, format!("no tag {tag}")));
        };
        if let Some(rule) = self
            .registry
            .rules
            .values()
            .find(|r| r.enabled && r.filter.tags.contains(tag))
        {
            return Err(err(
                ErrorCode::TagInUse,
                format!("tag {tag} is used by enabled rule {:?}", rule.id),
            ));
        }
        self.registry.tags.remove(tag);
        self.registry.tag_names[index as usize] = None;
        for shard in &mut self.shards {
            for slot in crate::shard::slots_with_tag(shard, index) {
                let tags: Vec<u32> = shard
                    .tags_of(slot)
                    .iter()
                    .copied()
                    .filter(|t| *t != index)
                    .collect();
                shard.set_tags(slot, &tags);
            }
        }
        Ok(())
    }

    // ----- queries ------------------------------------------------------

    /// One card's view, if known.
    pub fn card_view(&self, iccid: Iccid) -> Option<CardView> {
        let loc = self.directory.get(&iccid)?;
        Some(self.view_at(loc))
    }

    fn view_at(&self, loc: Loc) -> CardView {
        card_view(
            &self.shards[loc.shard as usize],
            loc.slot,
            &self.registry.plan_ids,
            &self.registry.tag_names,
        )
    }

    /// Every card's view, ordered by ICCID.
    pub fn card_views(&self) -> Vec<CardView> {
        card_views(
            &self.shards,
            &self.registry.plan_ids,
            &self.registry.tag_names,
        )
    }

    /// One pool's view, if known.
    pub fn pool_view(&self, id: &PoolId) -> Option<PoolView> {
        let entry = self.registry.pools.get(id)?;
        Some(self.pool_view_of(entry))
    }

    /// Every pool's view, ordered by id.
    pub fn pool_views(&self) -> Vec<PoolView> {
        self.registry
            .pools
            .values()
            .map(|entry| self.pool_view_of(entry))
            .collect()
    }

    fn pool_view_of(&self, entry: &PoolEntry) -> PoolView {
        let shard = &self.shards[entry.shard as usize];
        let pool = &shard.pools[entry.index as usize];
        PoolView {
            id: pool.id.clone(),
            kind: pool.kind,
            state: shard.pool_state(entry.index),
            usage_bytes: pool.usage,
            allowance_bytes: pool.allowance_bytes(),
            members: {
                let mut members: Vec<Iccid> = pool
                    .members
                    .iter()
                    .map(|&m| shard.cards[m as usize].iccid)
                    .collect();
                members.sort_unstable();
                members
            },
            name: pool.name.clone(),
            carrier: pool.carrier,
            cycle: shard.cycle(pool.cycle_carrier()),
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

fn deregistered(iccid: Iccid) -> CommandError {
    err(
        ErrorCode::Deregistered,
        format!("card {iccid} is deregistered"),
    )
}

fn check_batch(batch: &[Iccid]) -> Result<(), CommandError> {
    if batch.is_empty() {
        return Err(err(ErrorCode::EmptyBatch, "the batch names no card"));
    }
    if batch.len() > MAX_BATCH {
        return Err(err(
            ErrorCode::BatchTooLarge,
            format!("the batch names {} cards; at most {MAX_BATCH}", batch.len()),
        ));
    }
    let mut seen = hashbrown::HashSet::with_capacity(batch.len());
    if let Some(dup) = batch.iter().find(|i| !seen.insert(**i)) {
        return Err(err(
            ErrorCode::DuplicateCard,
            format!("card {dup} appears twice in the batch"),
        ));
    }
    Ok(())
}

fn fill_extra(extra: &mut CardExtra, spec: &CardSpec, silent_ends_at: Option<Timestamp>) {
    extra.msisdn.clone_from(&spec.msisdn);
    extra.imsi.clone_from(&spec.imsi);
    extra.imei.clone_from(&spec.imei);
    extra.attributes.clone_from(&spec.attributes);
    extra.test_ends_at = spec.test_ends_at;
    extra.test_allowance_mb = spec.test_allowance_mb;
    extra.silent_ends_at = silent_ends_at;
}

fn touch_pool_members(shard: &mut Shard, members: &[u32]) {
    for &m in members {
        shard.touch(m);
        shard.refresh_card(m);
    }
}

/// `used_mb_gte` of a backward suspend rule, in bytes.
fn backward_suspend_threshold(rule: &RuleSpec) -> Option<u64> {
    rule.condition
        .get("used_mb_gte")
        .and_then(serde_json::Value::as_u64)
        .map(|mb| mb.saturating_mul(MB))
}

/// The view of the card in `slot` of `shard`; plans and tags are named
/// through the registry's tables.
fn card_view(
    shard: &Shard,
    slot: u32,
    plan_ids: &[Option<PlanId>],
    tag_names: &[Option<TagId>],
) -> CardView {
    let card = &shard.cards[slot as usize];
    let (state, reasons) = shard.visible_state(slot);
    CardView {
        iccid: card.iccid,
        carrier: card.carrier,
        plan: plan_ids.get(usize::from(card.plan)).cloned().flatten(),
        state,
        reasons,
        usage_bytes: card.usage,
        cycle: shard.cycle(card.carrier),
        threshold_mb: i64::from(card.threshold_mb),
        addon_mb: u64::from(card.addon_mb),
        pool: (card.pool != NO_POOL).then(|| shard.pools[card.pool as usize].id.clone()),
        tags: shard
            .tags_of(slot)
            .iter()
            .filter_map(|t| tag_names.get(*t as usize).cloned().flatten())
            .collect(),
        activated_at: (card.activated_at != Timestamp::MIN).then_some(card.activated_at),
        expires_at: (card.expires_at != Timestamp::MAX).then_some(card.expires_at),
        msisdn: shard.ident(slot, 0),
        imsi: shard.ident(slot, 1),
        imei: shard.ident(slot, 2),
    }
}

/// Every live card's view over `shards`, ordered by ICCID: the engine's
/// own and a snapshot copy's ([`crate::SnapshotCopy::card_views`]) are the
/// same function of the same state.
pub(crate) fn card_views(
    shards: &[Shard],
    plan_ids: &[Option<PlanId>],
    tag_names: &[Option<TagId>],
) -> Vec<CardView> {
    let mut slots: Vec<(Iccid, u32, u32)> = shards
        .iter()
        .enumerate()
        .flat_map(|(s, shard)| {
            shard
                .live_slots()
                .map(move |slot| (shard.cards[slot as usize].iccid, s as u32, slot))
        })
        .collect();
    slots.sort_unstable_by_key(|&(iccid, ..)| iccid);
    slots
        .into_iter()
        .map(|(_, s, slot)| card_view(&shards[s as usize], slot, plan_ids, tag_names))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_results_encode_sorted_whatever_order_they_came_in() {
        let key = |n: u128| n << 2;
        let unsorted = StoredResults {
            keys: vec![key(3), key(1) | RESULT_FAILED, key(2)],
            failures: vec![(key(9), "b".into()), (key(1), "a".into())],
        };
        let sorted = StoredResults {
            keys: vec![key(1) | RESULT_FAILED, key(2), key(3)],
            failures: vec![(key(1), "a".into()), (key(9), "b".into())],
        };
        let bytes = bincode::serialize(&unsorted).unwrap();
        assert_eq!(bytes, bincode::serialize(&sorted).unwrap());
        let back: StoredResults = bincode::deserialize(&bytes).unwrap();
        assert_eq!(back.keys, sorted.keys);
        assert_eq!(back.failures, sorted.failures);
    }
}
