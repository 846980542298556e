//! One shard: the single owner of a subset of cards and of every pool whose
//! members it holds.
//!
//! A shard is plain single-threaded state. The router hands it records in
//! input order together with the event clock at that point, and the engine
//! applies commands to it between records; it never takes a lock and never
//! looks at another shard. All members of a pool live in the pool's shard,
//! so a pool's crossing is decided on the one record that crosses, before
//! any later record of any member is accounted (SPEC section 9).
//!
//! State changes are collected per cause: the first change to a card or pool
//! remembers its visible state before, and [`Shard::finish`] emits one event
//! per subject whose visible state differs after. One event per subject and
//! cause is what makes event ids (a hash of subject and cause) unique.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use hashbrown::HashSet;
use serde::{Deserialize, Serialize};

use crate::command::{CommandError, ErrorCode, PoolKind};
use crate::config::EngineConfig;
use crate::cycle::CycleId;
use crate::domain::{
    CardState, Carrier, Reason, Reasons, ThresholdMb, TrafficType, GENERAL_CAP_BYTES, MB,
};
use crate::event::{
    event_id, Accounted, ActionEvent, CardStateEvent, Cause, DeadlineKind, Output, PoolState,
    PoolStateEvent,
};
use crate::ids::{Iccid, PoolId};
use crate::record::Usage;
use crate::rule::Mark;
use crate::shard_rules::{Change, ShardRule};
use crate::time::Timestamp;

/// Marks "no pool" in [`Card::pool`].
pub(crate) const NO_POOL: u32 = u32::MAX;

/// A plan as shards need it (replicated to every shard).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PlanInfo {
    /// Id and display name (rule firings name the plan).
    pub(crate) id: crate::ids::PlanId,
    pub(crate) name: String,
    pub(crate) allowance_bytes: u64,
    pub(crate) traffic: TrafficType,
    pub(crate) term_months: u32,
}

/// Per-card accounting state. Kept small: it is multiplied by millions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Card {
    pub(crate) iccid: Iccid,
    /// Bytes counted in the current cycle.
    pub(crate) usage: u64,
    pub(crate) activated_at: Timestamp,
    /// `Timestamp::MAX` when the card has no expiry.
    pub(crate) expires_at: Timestamp,
    pub(crate) plan: u16,
    pub(crate) carrier: Carrier,
    /// Life-cycle state; never `Suspended` (that is derived from reasons).
    pub(crate) lifecycle: CardState,
    pub(crate) reasons: Reasons,
    /// Pool index in this shard, or [`NO_POOL`].
    pub(crate) pool: u32,
    /// Interned tag set index (0 = no tags).
    pub(crate) tagset: u32,
    pub(crate) threshold_mb: i32,
    /// Add-on packs bought for the current cycle, in MB.
    pub(crate) addon_mb: u32,
    /// The slot was vacated (card moved to another shard).
    pub(crate) vacant: bool,
}

/// Rarely present card attributes, kept out of [`Card`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CardExtra {
    pub(crate) msisdn: Option<String>,
    pub(crate) imsi: Option<String>,
    pub(crate) imei: Option<String>,
    pub(crate) attributes: BTreeMap<String, String>,
    pub(crate) test_ends_at: Option<Timestamp>,
    pub(crate) test_allowance_mb: Option<u64>,
    pub(crate) test_used: u64,
    pub(crate) silent_ends_at: Option<Timestamp>,
    /// Records of a later cycle than the shard's current one, with their
    /// sequence numbers: the card got there before the fleet's clock did
    /// (see [`Shard::account`]). Counted when the clock reaches their cycle.
    pub(crate) ahead: Vec<(u64, Usage)>,
}

impl CardExtra {
    fn is_empty(&self) -> bool {
        *self == CardExtra::default()
    }
}

/// A pool, owned by the shard holding all of its members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Pool {
    pub(crate) id: PoolId,
    pub(crate) name: String,
    pub(crate) kind: PoolKind,
    /// Forward pools: the members' carrier. Backward pools: the carrier
    /// whose cycle the pool follows (calendar month when none).
    pub(crate) carrier: Option<Carrier>,
    /// Forward pools: the members' plan.
    pub(crate) plan: Option<u16>,
    /// Members' slots. Iteration order is irrelevant: pool-wide changes
    /// touch every member and events are emitted sorted by ICCID.
    pub(crate) members: std::collections::HashSet<u32>,
    /// Sum of the members' current-cycle usage.
    pub(crate) usage: u64,
    /// Sum of the plan allowances of activated members.
    pub(crate) member_allowance: u64,
    /// Pool add-on packs for the current cycle, in MB.
    pub(crate) addon_mb: u64,
    pub(crate) exhausted: bool,
    pub(crate) frozen: bool,
    /// A backward-pool suspend rule fired this cycle.
    pub(crate) cut: bool,
    /// Lowest "used >= N" threshold among enabled backward suspend rules.
    pub(crate) suspend_at: Option<u64>,
    pub(crate) removed: bool,
}

impl Pool {
    pub(crate) fn allowance_bytes(&self) -> u64 {
        self.member_allowance
            .saturating_add(self.addon_mb.saturating_mul(MB))
    }

    pub(crate) fn cycle_carrier(&self) -> Carrier {
        self.carrier.unwrap_or(Carrier::Cmcc)
    }

    fn visible(&self) -> PoolState {
        match self.kind {
            PoolKind::Forward if self.exhausted => PoolState::Exhausted,
            PoolKind::Forward => PoolState::Available,
            PoolKind::Backward if self.frozen => PoolState::Frozen,
            PoolKind::Backward if self.cut => PoolState::Suspended,
            PoolKind::Backward => PoolState::Available,
        }
    }
}

/// What a card looks like from outside: state and (if suspended) reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Visible {
    state: CardState,
    reasons: Reasons,
}

/// A card taken out of one shard to move into another.
#[derive(Debug, Clone)]
pub(crate) struct MovedCard {
    pub(crate) card: Card,
    pub(crate) extra: Option<CardExtra>,
    pub(crate) tags: Vec<u32>,
    /// Fired state of rules for the card (rule key, mark).
    pub(crate) marks: Vec<(u32, Mark)>,
}

/// One shard's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Shard {
    pub(crate) config: EngineConfig,
    pub(crate) plans: Vec<Option<PlanInfo>>,
    pub(crate) cards: Vec<Card>,
    pub(crate) extras: BTreeMap<u32, CardExtra>,
    /// MSISDN, IMSI and IMEI of each card (parallel to `cards`), packed as
    /// digits (see [`pack_digits`]); 0 when absent or kept as text in
    /// `extras` (non-digit or over 17 digits). Most cards have all three:
    /// 24 bytes here instead of ~390 for three strings in a map entry.
    pub(crate) idents: Vec<[u64; 3]>,
    pub(crate) pools: Vec<Pool>,
    /// Interned tag sets; index 0 is the empty set.
    pub(crate) tagsets: Vec<Vec<u32>>,
    #[serde(skip)]
    tagset_index: HashMap<Vec<u32>, u32>,
    /// Deadlines: (time, slot, kind), one 16-byte entry each. Entries may be
    /// stale (a renewed card keeps its old entry); checked when due.
    pub(crate) deadlines: BTreeSet<(i64, u32, DeadlineKind)>,
    /// Event clock as last seen.
    pub(crate) clock: Timestamp,
    /// Current cycle per carrier (`None` before the first clock).
    pub(crate) cycles: Option<[CycleId; 4]>,
    #[serde(skip)]
    pub(crate) pending: Pending,
    /// Cached earliest end of the current cycles (derived from `cycles`).
    #[serde(skip)]
    next_boundary: Option<Timestamp>,
    /// Enabled automation rules, resolved to this shard (rebuilt from the
    /// registry: [`Shard::set_rules`]).
    #[serde(skip)]
    pub(crate) rules: Vec<ShardRule>,
    /// Whether a type 1 rule is enabled (day starts are then evaluated).
    #[serde(skip)]
    pub(crate) has_day_rules: bool,
    /// Fired state per (card slot, rule key).
    pub(crate) card_marks: BTreeMap<(u32, u32), Mark>,
    /// Fired state per (pool index, rule key).
    pub(crate) pool_marks: BTreeMap<(u32, u32), Mark>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Pending {
    cards: Vec<(u32, Visible)>,
    card_set: HashSet<u32>,
    pools: Vec<(u32, PoolState)>,
    /// Rules to evaluate on every target at the end of the cause.
    pub(crate) scan_rules: Vec<u32>,
    /// Carriers rolled over under the cause.
    pub(crate) rollovers: Vec<Carrier>,
}

impl Shard {
    pub(crate) fn new(config: EngineConfig) -> Shard {
        let mut shard = Shard {
            config,
            plans: Vec::new(),
            cards: Vec::new(),
            extras: BTreeMap::new(),
            idents: Vec::new(),
            pools: Vec::new(),
            tagsets: vec![Vec::new()],
            tagset_index: HashMap::new(),
            deadlines: BTreeSet::new(),
            clock: Timestamp::MIN,
            cycles: None,
            pending: Pending::default(),
            next_boundary: None,
            rules: Vec::new(),
            has_day_rules: false,
            card_marks: BTreeMap::new(),
            pool_marks: BTreeMap::new(),
        };
        shard.rebuild_indexes();
        shard
    }

    /// Rebuilds what snapshots leave out.
    pub(crate) fn rebuild_indexes(&mut self) {
        self.tagset_index = self
            .tagsets
            .iter()
            .enumerate()
            .map(|(i, set)| (set.clone(), i as u32))
            .collect();
    }

    // ----- clock, cycles, deadlines -------------------------------------

    pub(crate) fn cycle(&self, carrier: Carrier) -> CycleId {
        match self.cycles {
            Some(c) => c[carrier.index()],
            None => self
                .config
                .calendar
                .cycle_of(carrier, self.clock.max(Timestamp(0))),
        }
    }

    /// Moves the event clock forward, firing due deadlines and cycle
    /// rollovers in time order.
    pub(crate) fn advance(&mut self, clock: Timestamp, out: &mut Vec<Output>) {
        if clock <= self.clock {
            return;
        }
        let before = self.clock;
        self.clock = clock;
        if self.has_day_rules {
            self.rule_days(before, clock, out);
        }
        // Fast path, taken by almost every record: nothing falls due.
        if let Some(cycles) = self.cycles {
            let boundary = *self.next_boundary.get_or_insert_with(|| {
                Carrier::ALL
                    .iter()
                    .map(|&c| self.config.calendar.bounds(c, cycles[c.index()]).1)
                    .min()
                    .unwrap_or(Timestamp::MAX)
            });
            let deadline_due = self.deadlines.first().is_some_and(|d| d.0 <= clock.0);
            if clock < boundary && !deadline_due {
                return;
            }
        }
        let cal = self.config.calendar;
        let Some(mut cycles) = self.cycles else {
            self.cycles = Some(Carrier::ALL.map(|c| cal.cycle_of(c, clock)));
            self.fire_deadlines(clock, out);
            return;
        };
        loop {
            // The earliest cycle boundary at or before the clock, if any.
            let boundary = Carrier::ALL
                .iter()
                .map(|&c| (cal.bounds(c, cycles[c.index()]).1, c))
                .filter(|(end, _)| *end <= clock)
                .min();
            let deadline = self
                .deadlines
                .first()
                .map(|d| d.0)
                .filter(|t| *t <= clock.0);
            match (boundary, deadline) {
                (Some((end, _)), Some(d)) if d < end.0 => self.fire_deadlines(Timestamp(d), out),
                (Some((end, carrier)), _) => {
                    // Every carrier whose cycle ends at this instant rolls
                    // over under one cause (cmcc, ctcc and tri share their
                    // boundaries): a pool with members of several carriers
                    // is never seen half rolled over.
                    let next = cal.cycle_of(carrier, end);
                    let due: Vec<Carrier> = Carrier::ALL
                        .into_iter()
                        .filter(|&c| cal.bounds(c, cycles[c.index()]).1 == end)
                        .collect();
                    for &c in &due {
                        cycles[c.index()] = cal.cycle_of(c, end);
                    }
                    self.cycles = Some(cycles);
                    self.next_boundary = None;
                    self.rollover(&due, next, end, out);
                }
                (None, Some(_)) => self.fire_deadlines(clock, out),
                (None, None) => break,
            }
        }
    }

    fn fire_deadlines(&mut self, upto: Timestamp, out: &mut Vec<Output>) {
        while self.deadlines.first().is_some_and(|d| d.0 <= upto.0) {
            if let Some((at, slot, kind)) = self.deadlines.pop_first() {
                self.fire_deadline(slot, kind, Timestamp(at), out);
            }
        }
    }

    fn fire_deadline(
        &mut self,
        slot: u32,
        kind: DeadlineKind,
        at: Timestamp,
        out: &mut Vec<Output>,
    ) {
        let Some(card) = self.cards.get(slot as usize) else {
            return;
        };
        if card.vacant || card.lifecycle == CardState::Deregistered {
            return;
        }
        let extra = self.extras.get(&slot);
        let still_due = match kind {
            DeadlineKind::PlanExpiry => card.expires_at == at,
            DeadlineKind::TestEnd => {
                card.lifecycle == CardState::Testable
                    && extra.and_then(|e| e.test_ends_at) == Some(at)
            }
            DeadlineKind::SilentEnd => {
                card.lifecycle == CardState::Activatable
                    && extra.and_then(|e| e.silent_ends_at) == Some(at)
            }
            // Never scheduled: day starts are found by `rule_days`.
            DeadlineKind::RuleDay => false,
        };
        if !still_due {
            return;
        }
        self.touch(slot);
        match kind {
            DeadlineKind::PlanExpiry => {
                let card = &mut self.cards[slot as usize];
                card.reasons = card.reasons.with(Reason::PlanExpired);
            }
            DeadlineKind::TestEnd => self.cards[slot as usize].lifecycle = CardState::Activatable,
            DeadlineKind::SilentEnd => self.activate(slot, at),
            DeadlineKind::RuleDay => {}
        }
        self.finish(&Cause::Deadline { kind, at }, at, out);
    }

    fn schedule(&mut self, slot: u32, kind: DeadlineKind, at: Timestamp) {
        if at == Timestamp::MAX || at == Timestamp::MIN {
            return;
        }
        self.deadlines.insert((at.0, slot, kind));
    }

    fn rollover(
        &mut self,
        carriers: &[Carrier],
        cycle: CycleId,
        start: Timestamp,
        out: &mut Vec<Output>,
    ) {
        for slot in 0..self.cards.len() as u32 {
            let card = &self.cards[slot as usize];
            if card.vacant || !carriers.contains(&card.carrier) {
                continue;
            }
            if card.reasons != card.reasons.after_rollover() {
                self.touch(slot);
            }
            let card = &mut self.cards[slot as usize];
            let (pool, usage) = (card.pool, card.usage);
            card.usage = 0;
            card.addon_mb = 0;
            card.reasons = card.reasons.after_rollover();
            // Pool usage is the sum of the members' current-cycle usage, also
            // for backward pools whose members follow another carrier's cycle.
            if pool != NO_POOL {
                let p = &mut self.pools[pool as usize];
                p.usage = p.usage.saturating_sub(usage);
                if !self.rules.is_empty() {
                    self.touch_pool(pool);
                }
            }
        }
        for p in 0..self.pools.len() as u32 {
            let pool = &self.pools[p as usize];
            if pool.removed || !carriers.contains(&pool.cycle_carrier()) {
                continue;
            }
            self.touch_pool(p);
            let pool = &mut self.pools[p as usize];
            pool.addon_mb = 0;
            pool.exhausted = false;
            pool.cut = false;
            let members: Vec<u32> = pool.members.iter().copied().collect();
            for m in members {
                self.touch(m);
                self.refresh_card(m);
            }
        }
        for &carrier in carriers {
            self.rules_rollover(carrier);
        }
        self.finish(&Cause::Rollover { cycle }, start, out);
        // Records of the new cycle that came before the clock got here are
        // counted now, in input order, each as its own cause: exactly as
        // if they had come after the rollover.
        for (_, slot, usage) in self.take_ahead(carriers) {
            self.count(slot, &usage, out);
        }
    }

    /// Takes the records kept for the cycle the `carriers` just started.
    fn take_ahead(&mut self, carriers: &[Carrier]) -> Vec<(u64, u32, Usage)> {
        let (Some(cycles), cal) = (self.cycles, self.config.calendar) else {
            return Vec::new();
        };
        let mut due = Vec::new();
        let mut emptied = Vec::new();
        for (&slot, extra) in &mut self.extras {
            if extra.ahead.is_empty() {
                continue;
            }
            let carrier = self.cards[slot as usize].carrier;
            if !carriers.contains(&carrier) {
                continue;
            }
            let current = cycles[carrier.index()];
            extra.ahead.retain(|(seq, usage)| {
                let cycle = cal.cycle_of(carrier, usage.end);
                if cycle == current {
                    due.push((*seq, slot, *usage));
                }
                cycle > current
            });
            if extra.ahead.is_empty() {
                emptied.push(slot);
            }
        }
        for slot in emptied {
            self.drop_empty_extra(slot);
        }
        due.sort_unstable_by_key(|&(seq, _, _)| seq);
        due
    }

    // ----- usage --------------------------------------------------------

    /// Accounts one fresh record of the card in `slot`, at event clock
    /// `clock`. The record is judged by `lane_time`, the later of the
    /// clock and its input lane's own time: a lane that crossed a cycle
    /// boundary the slower lanes (and so the clock) have not yet makes
    /// its records of the closing cycle previous-cycle records (recorded
    /// only, late past the lateness), exactly as they would be had the
    /// other lanes been read as far. So a record's verdict depends on its
    /// own lane's inputs only, not on how the lanes interleave.
    pub(crate) fn account(
        &mut self,
        slot: u32,
        usage: &Usage,
        seq: u64,
        clock: Timestamp,
        lane_time: Timestamp,
        out: &mut Vec<Output>,
    ) {
        self.advance(clock, out);
        let Some(card) = self.cards.get(slot as usize) else {
            return;
        };
        let cycle = self.config.calendar.cycle_of(card.carrier, usage.end);
        let current = self.cycle(card.carrier);
        let open = if lane_time > self.clock {
            current.max(self.config.calendar.cycle_of(card.carrier, lane_time))
        } else {
            current
        };
        if cycle < open || card.lifecycle == CardState::Deregistered {
            // Late: its cycle closed more than the allowed lateness ago.
            let cycle_end = self.config.calendar.bounds(card.carrier, cycle).1;
            let late = cycle < open
                && self.clock.max(lane_time)
                    > cycle_end.plus_millis(self.config.allowed_lateness_ms);
            out.push(Output::Accounted(Accounted {
                seq,
                usage: *usage,
                cycle,
                counted: false,
                late,
            }));
            return;
        }
        out.push(Output::Accounted(Accounted {
            seq,
            usage: *usage,
            cycle,
            counted: true,
            late: false,
        }));
        if cycle > current {
            // A record of a later cycle than the fleet's clock has reached
            // (its device's clock runs ahead, or it is simply early) counts
            // for its own cycle once the clock gets there. It neither adds
            // to this cycle nor closes it for the card: one wrong clock must
            // not lift a cut.
            self.extra_mut(slot).ahead.push((seq, *usage));
            return;
        }
        self.count(slot, usage, out);
    }

    /// Counts a record of the current cycle: usage, reasons, events.
    fn count(&mut self, slot: u32, usage: &Usage, out: &mut Vec<Output>) {
        let bytes = usage.bytes();
        let lifecycle = self.cards[slot as usize].lifecycle;
        if lifecycle == CardState::Deregistered {
            // Deregistered while its record waited for its cycle: history
            // only, as it would have been had it come now.
            return;
        }
        self.touch(slot);
        match lifecycle {
            CardState::Activatable => self.activate(slot, usage.end),
            CardState::Testable => self.count_test_usage(slot, bytes),
            _ => {}
        }
        let card = &mut self.cards[slot as usize];
        card.usage = card.usage.saturating_add(bytes);
        let pool = card.pool;
        self.refresh_card(slot);
        if pool != NO_POOL {
            let p = &mut self.pools[pool as usize];
            p.usage = p.usage.saturating_add(bytes);
            self.refresh_pool(pool);
        }
        self.finish(
            &Cause::Record {
                iccid: usage.iccid,
                record_id: usage.record_id,
            },
            usage.end,
            out,
        );
    }

    fn count_test_usage(&mut self, slot: u32, bytes: u64) {
        let extra = self.extras.entry(slot).or_default();
        extra.test_used = extra.test_used.saturating_add(bytes);
        if let Some(allowance) = extra.test_allowance_mb {
            if extra.test_used > allowance.saturating_mul(MB) {
                self.cards[slot as usize].lifecycle = CardState::Activatable;
            }
        }
    }

    /// Activates a card at `at` (power-on activation, forced activation or
    /// the `activate` command).
    pub(crate) fn activate(&mut self, slot: u32, at: Timestamp) {
        self.touch(slot);
        let contribution = self.member_contribution(slot);
        let term = self.plan(slot).map_or(12, |p| p.term_months);
        let card = &mut self.cards[slot as usize];
        card.lifecycle = CardState::Active;
        card.activated_at = at;
        if card.expires_at == Timestamp::MAX {
            card.expires_at = add_months(at, term, self.config.calendar.utc_offset_secs);
            let expires = card.expires_at;
            self.schedule(slot, DeadlineKind::PlanExpiry, expires);
        }
        self.adjust_member_allowance(slot, contribution);
    }

    fn plan(&self, slot: u32) -> Option<&PlanInfo> {
        let card = &self.cards[slot as usize];
        self.plans
            .get(usize::from(card.plan))
            .and_then(Option::as_ref)
    }

    // ----- derived reasons ---------------------------------------------

    /// Recomputes the usage- and pool-derived reasons of one card.
    pub(crate) fn refresh_card(&mut self, slot: u32) {
        let card = &self.cards[slot as usize];
        if card.lifecycle == CardState::Deregistered {
            self.cards[slot as usize].reasons = Reasons::EMPTY;
            return;
        }
        let (allowance, general) = match self.plan(slot) {
            Some(p) => (p.allowance_bytes, p.traffic == TrafficType::General),
            None => (0, false),
        };
        let pool = (card.pool != NO_POOL).then(|| &self.pools[card.pool as usize]);
        let in_forward = pool.is_some_and(|p| p.kind == PoolKind::Forward);
        let in_backward = pool.is_some_and(|p| p.kind == PoolKind::Backward);
        let limit = allowance.saturating_add(u64::from(card.addon_mb).saturating_mul(MB));
        let mut r = card.reasons;
        r = r.set(
            Reason::OverQuota,
            !in_forward && !in_backward && card.usage > limit,
        );
        r = r.set(
            Reason::GeneralCap,
            general && card.usage > GENERAL_CAP_BYTES,
        );
        if ThresholdMb(i64::from(card.threshold_mb))
            .limit_bytes()
            .is_some_and(|l| card.usage > l)
        {
            r = r.with(Reason::OverThreshold);
        }
        r = r.set(
            Reason::PoolExhausted,
            in_forward && pool.is_some_and(|p| p.exhausted),
        );
        r = r.set(
            Reason::BackwardPoolThreshold,
            in_backward && pool.is_some_and(|p| p.cut),
        );
        r = r.set(
            Reason::PoolFrozen,
            in_backward && pool.is_some_and(|p| p.frozen),
        );
        self.cards[slot as usize].reasons = r;
    }

    /// Recomputes a pool's exhausted/cut flags and, when they change, every
    /// member's reasons.
    pub(crate) fn refresh_pool(&mut self, p: u32) {
        if !self.rules.is_empty() {
            // Usage or allowance may have changed: pool rules look again.
            self.touch_pool(p);
        }
        let pool = &self.pools[p as usize];
        let (exhausted, cut) = match pool.kind {
            PoolKind::Forward => (pool.usage > pool.allowance_bytes(), false),
            PoolKind::Backward => (
                false,
                pool.cut || pool.suspend_at.is_some_and(|t| pool.usage >= t),
            ),
        };
        if exhausted == pool.exhausted && cut == pool.cut {
            return;
        }
        self.touch_pool(p);
        let pool = &mut self.pools[p as usize];
        pool.exhausted = exhausted;
        pool.cut = cut;
        let members: Vec<u32> = pool.members.iter().copied().collect();
        for m in members {
            self.touch(m);
            self.refresh_card(m);
        }
    }

    /// What one card adds to its forward pool's allowance: its plan's
    /// allowance while it is activated (active, suspended included).
    pub(crate) fn member_contribution(&self, slot: u32) -> u64 {
        if self.cards[slot as usize].lifecycle == CardState::Active {
            self.plan(slot).map_or(0, |p| p.allowance_bytes)
        } else {
            0
        }
    }

    /// After a change to a member (activation, plan, life cycle), moves its
    /// pool's allowance by the change of its contribution (`before` is the
    /// contribution measured before the change): O(1), not O(members).
    pub(crate) fn adjust_member_allowance(&mut self, slot: u32, before: u64) {
        let p = self.cards[slot as usize].pool;
        if p == NO_POOL {
            return;
        }
        let after = self.member_contribution(slot);
        if after != before {
            let pool = &mut self.pools[p as usize];
            pool.member_allowance = pool
                .member_allowance
                .saturating_sub(before)
                .saturating_add(after);
            self.refresh_pool(p);
        }
    }

    /// Recomputes a pool's allowance from all members (after a plan change).
    pub(crate) fn recompute_member_allowance(&mut self, p: u32) {
        let pool = &self.pools[p as usize];
        let total = pool
            .members
            .iter()
            .map(|&m| self.member_contribution(m))
            .fold(0u64, u64::saturating_add);
        self.pools[p as usize].member_allowance = total;
        self.refresh_pool(p);
    }

    // ----- change tracking and events ----------------------------------

    fn visible(&self, slot: u32) -> Visible {
        let card = &self.cards[slot as usize];
        if card.lifecycle == CardState::Active && !card.reasons.is_empty() {
            Visible {
                state: CardState::Suspended,
                reasons: card.reasons,
            }
        } else {
            Visible {
                state: card.lifecycle,
                reasons: Reasons::EMPTY,
            }
        }
    }

    /// Remembers a card's visible state before the current cause changes it.
    pub(crate) fn touch(&mut self, slot: u32) {
        if self.pending.card_set.insert(slot) {
            let before = self.visible(slot);
            self.pending.cards.push((slot, before));
        }
    }

    fn touch_pool(&mut self, p: u32) {
        if !self.pending.pools.iter().any(|(q, _)| *q == p) {
            let before = self.pools[p as usize].visible();
            self.pending.pools.push((p, before));
        }
    }

    /// Emits one event per card and pool whose visible state changed since
    /// it was first touched under this cause.
    pub(crate) fn finish(&mut self, cause: &Cause, event_time: Timestamp, out: &mut Vec<Output>) {
        let rules = !self.rules.is_empty();
        let mut pools = std::mem::take(&mut self.pending.pools);
        pools.sort_by(|a, b| {
            self.pools[a.0 as usize]
                .id
                .cmp(&self.pools[b.0 as usize].id)
        });
        let touched_pools: Vec<u32> = if rules {
            pools.iter().map(|(p, _)| *p).collect()
        } else {
            Vec::new()
        };
        for (p, before) in pools.drain(..) {
            let pool = &self.pools[p as usize];
            let after = pool.visible();
            if after == before {
                continue;
            }
            let (limit, usage) = match after {
                PoolState::Exhausted => (Some(pool.allowance_bytes()), pool.usage),
                PoolState::Suspended => (pool.suspend_at, pool.usage),
                _ => (None, pool.usage),
            };
            out.push(Output::Action(ActionEvent::PoolState(PoolStateEvent {
                id: event_id("pool_state", pool.id.as_str(), cause),
                pool: pool.id.clone(),
                old: before,
                new: after,
                event_time,
                processed_at: None,
                cycle: self.cycle(pool.cycle_carrier()),
                usage_bytes: usage,
                limit_bytes: limit,
                overshoot_bytes: limit.map(|l| usage.saturating_sub(l)),
                cause: cause.clone(),
            })));
        }
        self.pending.pools = pools;

        let mut cards = std::mem::take(&mut self.pending.cards);
        self.pending.card_set.clear();
        cards.sort_by_key(|(slot, _)| self.cards[*slot as usize].iccid);
        let touched_cards: Vec<u32> = if rules {
            cards.iter().map(|(s, _)| *s).collect()
        } else {
            Vec::new()
        };
        let mut changes = Vec::new();
        for (slot, before) in cards.drain(..) {
            let after = self.visible(slot);
            if after == before {
                continue;
            }
            if rules && after.state != before.state {
                changes.push(Change {
                    slot,
                    old: before.state,
                    new: after.state,
                    reasons: after.reasons,
                });
            }
            let card = &self.cards[slot as usize];
            let added = Reasons::from_bits(after.reasons.bits() & !before.reasons.bits());
            let (usage, limit) = self.cut_limit(slot, added);
            out.push(Output::Action(ActionEvent::CardState(CardStateEvent {
                id: event_id("card_state", &card.iccid.to_string(), cause),
                iccid: card.iccid,
                old: before.state,
                new: after.state,
                reasons: after.reasons,
                event_time,
                processed_at: None,
                cycle: self.cycle(card.carrier),
                usage_bytes: usage,
                limit_bytes: limit,
                overshoot_bytes: limit.map(|l| usage.saturating_sub(l)),
                cause: cause.clone(),
            })));
        }
        self.pending.cards = cards;
        self.fire_rules(
            cause,
            event_time,
            &touched_cards,
            &changes,
            &touched_pools,
            out,
        );
    }

    /// For a cut caused by usage, the usage and the tightest limit crossed.
    fn cut_limit(&self, slot: u32, added: Reasons) -> (u64, Option<u64>) {
        let card = &self.cards[slot as usize];
        let pool = (card.pool != NO_POOL).then(|| &self.pools[card.pool as usize]);
        let allowance =
            self.plan(slot).map_or(0, |p| p.allowance_bytes) + u64::from(card.addon_mb) * MB;
        let candidates = [
            (Reason::OverQuota, card.usage, Some(allowance)),
            (
                Reason::OverThreshold,
                card.usage,
                ThresholdMb(i64::from(card.threshold_mb)).limit_bytes(),
            ),
            (Reason::GeneralCap, card.usage, Some(GENERAL_CAP_BYTES)),
            (
                Reason::PoolExhausted,
                pool.map_or(0, |p| p.usage),
                pool.map(Pool::allowance_bytes),
            ),
            (
                Reason::BackwardPoolThreshold,
                pool.map_or(0, |p| p.usage),
                pool.and_then(|p| p.suspend_at),
            ),
        ];
        candidates
            .into_iter()
            .filter(|(r, _, _)| added.contains(*r))
            .filter_map(|(_, usage, limit)| limit.map(|l| (usage, l)))
            .max_by_key(|(usage, limit)| usage.saturating_sub(*limit))
            .map_or((card.usage, None), |(usage, limit)| (usage, Some(limit)))
    }

    // ----- cards: insertion, removal, tags ------------------------------

    pub(crate) fn insert_card(
        &mut self,
        card: Card,
        extra: Option<CardExtra>,
        tags: &[u32],
    ) -> u32 {
        let slot = self.cards.len() as u32;
        let mut card = card;
        card.tagset = self.intern_tags(tags);
        card.pool = NO_POOL;
        let expires = card.expires_at;
        crate::directory::push_compact(&mut self.cards, card);
        if let Some(mut extra) = extra {
            let values = [extra.msisdn.take(), extra.imsi.take(), extra.imei.take()];
            self.extras.insert(slot, extra);
            for (which, value) in values.into_iter().enumerate() {
                self.set_ident(slot, which, value);
            }
            self.drop_empty_extra(slot);
        }
        self.schedule_card(slot, expires);
        slot
    }

    /// Sets a card's MSISDN (0), IMSI (1) or IMEI (2): packed when it is
    /// all digits, else kept as text in its `CardExtra`.
    pub(crate) fn set_ident(&mut self, slot: u32, which: usize, value: Option<String>) {
        let packed = value.as_deref().and_then(pack_digits);
        if packed.is_some() && self.idents.len() <= slot as usize {
            // Dense up to the highest card that has an identity: cards
            // without any cost nothing.
            self.idents.resize(slot as usize + 1, [0; 3]);
        }
        if let Some(idents) = self.idents.get_mut(slot as usize) {
            idents[which] = packed.unwrap_or(0);
        }
        let text = if packed.is_some() { None } else { value };
        if text.is_some() || self.extras.contains_key(&slot) {
            let extra = self.extras.entry(slot).or_default();
            match which {
                0 => extra.msisdn = text,
                1 => extra.imsi = text,
                _ => extra.imei = text,
            }
        }
        self.drop_empty_extra(slot);
    }

    /// A card's MSISDN (0), IMSI (1) or IMEI (2).
    pub(crate) fn ident(&self, slot: u32, which: usize) -> Option<String> {
        let packed = self.idents.get(slot as usize).map_or(0, |i| i[which]);
        unpack_digits(packed).or_else(|| {
            let extra = self.extras.get(&slot)?;
            match which {
                0 => extra.msisdn.clone(),
                1 => extra.imsi.clone(),
                _ => extra.imei.clone(),
            }
        })
    }

    pub(crate) fn drop_empty_extra(&mut self, slot: u32) {
        if self.extras.get(&slot).is_some_and(CardExtra::is_empty) {
            self.extras.remove(&slot);
        }
    }

    fn schedule_card(&mut self, slot: u32, expires: Timestamp) {
        self.schedule(slot, DeadlineKind::PlanExpiry, expires);
        if let Some(extra) = self.extras.get(&slot) {
            let (test, silent) = (extra.test_ends_at, extra.silent_ends_at);
            if let Some(t) = test {
                self.schedule(slot, DeadlineKind::TestEnd, t);
            }
            if let Some(t) = silent {
                self.schedule(slot, DeadlineKind::SilentEnd, t);
            }
        }
    }

    /// Re-schedules the deadlines of a card whose dates changed.
    pub(crate) fn reschedule(&mut self, slot: u32) {
        let expires = self.cards[slot as usize].expires_at;
        self.schedule_card(slot, expires);
    }

    /// Takes a card out (it moves to another shard); the slot stays vacant.
    pub(crate) fn take_card(&mut self, slot: u32) -> MovedCard {
        let card = self.cards[slot as usize].clone();
        let tags = self.tagsets[card.tagset as usize].clone();
        let idents = [0, 1, 2].map(|which| self.ident(slot, which));
        if let Some(idents) = self.idents.get_mut(slot as usize) {
            *idents = [0; 3];
        }
        let mut extra = self.extras.remove(&slot).unwrap_or_default();
        [extra.msisdn, extra.imsi, extra.imei] = idents;
        let extra = Some(extra);
        let marks = self.take_marks(slot);
        let vacated = &mut self.cards[slot as usize];
        vacated.vacant = true;
        vacated.lifecycle = CardState::Deregistered;
        vacated.reasons = Reasons::EMPTY;
        MovedCard {
            card,
            extra,
            tags,
            marks,
        }
    }

    pub(crate) fn tags_of(&self, slot: u32) -> &[u32] {
        &self.tagsets[self.cards[slot as usize].tagset as usize]
    }

    pub(crate) fn set_tags(&mut self, slot: u32, tags: &[u32]) {
        let set = self.intern_tags(tags);
        self.cards[slot as usize].tagset = set;
    }

    fn intern_tags(&mut self, tags: &[u32]) -> u32 {
        let mut set: Vec<u32> = tags.to_vec();
        set.sort_unstable();
        set.dedup();
        if let Some(&i) = self.tagset_index.get(&set) {
            return i;
        }
        let i = self.tagsets.len() as u32;
        self.tagsets.push(set.clone());
        self.tagset_index.insert(set, i);
        i
    }

    pub(crate) fn extra_mut(&mut self, slot: u32) -> &mut CardExtra {
        self.extras.entry(slot).or_default()
    }

    pub(crate) fn extra(&self, slot: u32) -> Option<&CardExtra> {
        self.extras.get(&slot)
    }

    // ----- pools --------------------------------------------------------

    pub(crate) fn add_member(&mut self, p: u32, slot: u32) {
        self.touch(slot);
        let card = &mut self.cards[slot as usize];
        card.pool = p;
        let usage = card.usage;
        let contribution = self.member_contribution(slot);
        let pool = &mut self.pools[p as usize];
        pool.members.insert(slot);
        pool.usage = pool.usage.saturating_add(usage);
        pool.member_allowance = pool.member_allowance.saturating_add(contribution);
        self.refresh_pool(p);
        self.refresh_card(slot);
    }

    pub(crate) fn remove_member(&mut self, slot: u32) {
        let p = self.cards[slot as usize].pool;
        if p == NO_POOL {
            return;
        }
        self.touch(slot);
        let card = &mut self.cards[slot as usize];
        card.pool = NO_POOL;
        let usage = card.usage;
        let contribution = self.member_contribution(slot);
        let pool = &mut self.pools[p as usize];
        pool.members.remove(&slot);
        pool.usage = pool.usage.saturating_sub(usage);
        pool.member_allowance = pool.member_allowance.saturating_sub(contribution);
        self.refresh_pool(p);
        self.refresh_card(slot);
    }

    /// Validates that a card may join pool `p` (forward pools: same
    /// carrier, traffic type and plan; the plan fixes the traffic type).
    pub(crate) fn check_member(&self, p: u32, card: &Card) -> Result<(), CommandError> {
        let pool = &self.pools[p as usize];
        if pool.kind == PoolKind::Forward {
            if pool.carrier != Some(card.carrier) || pool.plan != Some(card.plan) {
                return Err(CommandError::new(
                    ErrorCode::PoolMemberMismatch,
                    format!(
                        "card {} ({} card on another plan or traffic type) cannot join forward pool {}: members must share carrier, traffic type and plan",
                        card.iccid, card.carrier, pool.id
                    ),
                ));
            }
        } else if let Some(carrier) = pool.carrier {
            if carrier != card.carrier {
                return Err(CommandError::new(
                    ErrorCode::PoolMemberMismatch,
                    format!(
                        "card {} is a {} card; backward pool {} is for {carrier} cards",
                        card.iccid, card.carrier, pool.id
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Live (non-vacant) card slots.
    pub(crate) fn live_slots(&self) -> impl Iterator<Item = u32> + '_ {
        self.cards
            .iter()
            .enumerate()
            .filter(|(_, c)| !c.vacant)
            .map(|(i, _)| i as u32)
    }

    /// The visible state of a card (for queries).
    pub(crate) fn visible_state(&self, slot: u32) -> (CardState, Reasons) {
        let v = self.visible(slot);
        (
            v.state,
            if v.state == CardState::Suspended {
                v.reasons
            } else {
                Reasons::EMPTY
            },
        )
    }

    pub(crate) fn pool_state(&self, p: u32) -> PoolState {
        self.pools[p as usize].visible()
    }

    /// Approximate heap bytes of the accounting state (cards, pools,
    /// extras, deadlines), for the memory benchmark.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.cards.capacity() * std::mem::size_of::<Card>()
            + self.idents.capacity() * 24
            + self.extras.len() * (std::mem::size_of::<CardExtra>() + 48)
            + self
                .pools
                .iter()
                .map(|p| p.members.capacity() * 5)
                .sum::<usize>()
            + self.deadlines.len() * 24
    }
}

/// Packs 1 to 17 ASCII digits into a non-zero u64: the digit count in the
/// top 7 bits, the value below (10^17 < 2^57).
pub(crate) fn pack_digits(text: &str) -> Option<u64> {
    let bytes = text.as_bytes();
    if bytes.is_empty() || bytes.len() > 17 || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let value = bytes
        .iter()
        .fold(0u64, |acc, b| acc * 10 + u64::from(b - b'0'));
    Some((bytes.len() as u64) << 57 | value)
}

/// Reverses [`pack_digits`]; `None` for 0.
pub(crate) fn unpack_digits(packed: u64) -> Option<String> {
    let len = (packed >> 57) as usize;
    (len > 0).then(|| format!("{:0len$}", packed & ((1 << 57) - 1)))
}

/// `t` plus `months` calendar months at a UTC offset (day clamped to the
/// end of the target month).
pub(crate) fn add_months(t: Timestamp, months: u32, offset_secs: i32) -> Timestamp {
    use crate::time::{days_in_month, MS_PER_DAY};
    let local = t.0 + i64::from(offset_secs) * 1000;
    let ms_of_day = local.rem_euclid(MS_PER_DAY);
    let (y, m, d) = t.civil_date(offset_secs);
    let total = y * 12 + i64::from(m) - 1 + i64::from(months);
    let (ny, nm) = (total.div_euclid(12), (total.rem_euclid(12) + 1) as u32);
    let nd = d.min(days_in_month(ny, nm));
    Timestamp::from_civil(ny, nm, nd, offset_secs).plus_millis(ms_of_day)
}

/// Iterate deterministic pool member slots (helper for the engine).
pub(crate) fn member_slots(pool: &Pool) -> Vec<u32> {
    pool.members.iter().copied().collect()
}

/// Cards with the given tag index (helper for tag removal).
pub(crate) fn slots_with_tag(shard: &Shard, tag: u32) -> BTreeSet<u32> {
    shard
        .live_slots()
        .filter(|&s| shard.tags_of(s).contains(&tag))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_pack_and_unpack() {
        for text in [
            "0",
            "0012",
            "1440412345678",
            "460041234567890",
            "99999999999999999",
        ] {
            assert_eq!(
                unpack_digits(pack_digits(text).unwrap()).as_deref(),
                Some(text)
            );
        }
        for text in ["", "12a", "+8613800000000", "123456789012345678"] {
            assert_eq!(pack_digits(text), None);
        }
        assert_eq!(unpack_digits(0), None);
    }

    #[test]
    fn add_months_clamps_to_month_end() {
        let t = Timestamp::parse_rfc3339("2026-01-31T10:00:00+08:00").unwrap();
        assert_eq!(
            add_months(t, 1, 8 * 3600),
            Timestamp::parse_rfc3339("2026-02-28T10:00:00+08:00").unwrap()
        );
        assert_eq!(
            add_months(t, 12, 8 * 3600),
            Timestamp::parse_rfc3339("2027-01-31T10:00:00+08:00").unwrap()
        );
    }
}

#[cfg(test)]
mod size_tests {
    /// The per-card record is multiplied by millions: keep it from growing
    /// unnoticed (ARCHITECTURE.md quotes its size).
    #[test]
    fn card_record_stays_small() {
        assert_eq!(std::mem::size_of::<super::Card>(), 64);
    }
}
