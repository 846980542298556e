//! A tiny reference model of the accounting engine (SPEC sections 2-5 and
//! the lead's decisions), written for obviousness, not speed.
//!
//! Every card's reasons are recomputed from scratch after each input; the
//! only remembered reason state is what the SPEC says is remembered
//! (`over_threshold` latch, `manual`, `violation`, pool freeze). Pool usage
//! and allowance are derived from the members every time.
//!
//! Covered: upsert_plan, upsert_card, create_pool (forward and backward),
//! add/remove_pool_members, set/clear_threshold, add_on (card and pool),
//! suspend, resume, deregister, freeze/unfreeze, retain and re-enable
//! (retention ends as the clock passes them), activate, custom attribute
//! names, values, and enabling or disabling a name; usage records
//! (unknown cards, duplicates, far future, late, cycle rollovers), the
//! fleet's clock (a majority of the cards furthest ahead, every card's
//! latest time sorted) and records ahead of it (counted at their cycle's
//! start, in input order); records of the cycle that closed within the
//! allowed lateness (counted toward it: each card's and pool's closed
//! figures, a late crossing when one of its limits is crossed, and each
//! pool's total at the rollover and, final, when the lateness ends).
//! Rules: the four rules of `gen::RULES` (no filter, cycle windows for the
//! usage rules, every transition for the state rule), checked the obvious
//! way: after each input, every live card and pool inside a usage condition
//! fires unless it already fired for that rule in its current cycle; at
//! each cycle start (in time order, carriers of one instant together),
//! cards inside "remaining" at zero usage and pools inside "used" fire for
//! that cycle; every change to `suspended` fires the state rule.
//! Device binding: records from one of three devices (or none), moves by
//! each carrier's rule, rebind (with or without an IMEI), and resume's
//! refusal for a cmcc card that moved.
//! Not covered: testable cards, deadlines (plan expiry, silent/test end),
//! renew, other rules and windows, tags, attribute filters,
//! report_violation, remove_plan,
//! carrier changes.

#![allow(dead_code, unreachable_pub)]

pub mod gen;

use std::collections::{BTreeMap, BTreeSet, HashSet};

use flowcap_engine::command::{CardSpec, PoolKind};
use flowcap_engine::{
    CardState, Carrier, Command, CommandKind, Iccid, Imei, Reason, Reasons, Timestamp, TrafficType,
    Usage, MB,
};

/// 100 MB general-traffic cap.
pub const GENERAL_CAP: u64 = 100 * MB;
/// UTC+8.
pub const OFFSET_SECS: i32 = 8 * 3600;

/// Where a cycle (month index) of a carrier starts.
pub fn cycle_start(carrier: Carrier, cycle: i64) -> Timestamp {
    let (y, m) = (cycle.div_euclid(12), (cycle.rem_euclid(12) + 1) as u32);
    if carrier == Carrier::Cucc {
        let prev = cycle - 1;
        let (py, pm) = (prev.div_euclid(12), (prev.rem_euclid(12) + 1) as u32);
        Timestamp::from_civil(py, pm, 27, OFFSET_SECS)
    } else {
        Timestamp::from_civil(y, m, 1, OFFSET_SECS)
    }
}

/// One calendar month after `t` (UTC+8, day clamped to the month's end).
pub fn plus_month(t: Timestamp) -> Timestamp {
    let (y, m, d) = t.civil_date(OFFSET_SECS);
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    let last = flowcap_engine::time::days_in_month(ny, nm);
    let day_ms = (t.0 + i64::from(OFFSET_SECS) * 1000).rem_euclid(86_400_000);
    Timestamp::from_civil(ny, nm, d.min(last), OFFSET_SECS).plus_millis(day_ms)
}

/// A cycle as a month index (`year * 12 + month - 1` of the month it ends in).
pub fn cycle_of(carrier: Carrier, t: Timestamp) -> i64 {
    let (y, m, d) = t.civil_date(OFFSET_SECS);
    let month = y * 12 + i64::from(m) - 1;
    if carrier == Carrier::Cucc && d >= 27 {
        month + 1
    } else {
        month
    }
}

#[derive(Debug, Clone)]
pub struct ModelPlan {
    pub carrier: Carrier,
    pub allowance_bytes: u64,
    pub general: bool,
}

#[derive(Debug, Clone)]
pub struct ModelCard {
    pub carrier: Carrier,
    pub plan: String,
    /// Never `Suspended`: that is derived.
    pub lifecycle: CardState,
    pub usage: u64,
    pub addon_mb: u64,
    pub threshold_mb: i64,
    pub over_threshold: bool,
    pub manual: bool,
    pub pool: Option<String>,
    /// Device binding (SPEC 2.1): the bound device, a violation from
    /// device moves, the ctcc/tri separation, and this calendar month's
    /// counts (cucc changes, ctcc/tri rebinds).
    pub bound: Option<Imei>,
    pub violation: bool,
    pub separated: bool,
    pub device_month: i64,
    pub changes: u8,
    pub rebinds: u8,
    /// Custom attribute values by name (disabled names included).
    pub attributes: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct ModelPool {
    pub forward: bool,
    pub carrier: Option<Carrier>,
    pub plan: Option<String>,
    pub addon_mb: u64,
    pub frozen: bool,
    /// A forward pool whose last member was deregistered, a backward pool
    /// whose retention ended.
    pub abandoned: bool,
    /// A retained backward pool: when its retention ends.
    pub retained_until: Option<Timestamp>,
    /// An abandoned backward pool: when, for the one-month re-enable.
    pub abandoned_at: Option<Timestamp>,
}

/// What happened to a record.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum RecordOutcome {
    Counted,
    NotCounted,
    Duplicate,
    Rejected(String),
}

/// What a command answered: whole-command error, per-card oks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutcome {
    pub whole_error: bool,
    pub per_card: Vec<bool>,
}

/// Figures of a card's closed cycle (kept through the lateness).
#[derive(Debug, Clone)]
pub struct ClosedCard {
    pub cycle: i64,
    pub usage: u64,
    pub addon_mb: u64,
    /// Usage reasons it had, or gained late.
    pub reasons: Reasons,
    pub pool: Option<String>,
}

/// Figures of a pool's closed cycle.
#[derive(Debug, Clone)]
pub struct ClosedPool {
    pub carrier: Carrier,
    pub cycle: i64,
    pub usage: u64,
    pub allowance: u64,
    pub exhausted: bool,
}

/// A closed cycle's limit crossed late: subject, reasons gained, usage.
pub type LateCrossing = (String, Reasons, u64);

/// A pool's closed-cycle total: pool, cycle, usage, final.
pub type PoolTotal = (String, i64, u64, bool);

/// The allowed lateness (the engine's default).
pub const LATENESS_MS: i64 = 2 * 3_600_000;

/// One `card_state` event as the model sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelEvent {
    pub iccid: Iccid,
    pub old: CardState,
    pub new: CardState,
    pub reasons: Reasons,
}

#[derive(Debug, Clone)]
pub struct Model {
    pub max_future_ms: i64,
    /// How long a backward pool is retained before it is abandoned.
    pub retention_ms: i64,
    /// How many of the cards furthest ahead the clock listens to.
    pub quorum: usize,
    pub clock: Option<Timestamp>,
    /// Every card's latest accepted `end`.
    pub latest: BTreeMap<Iccid, Timestamp>,
    /// Records of a later cycle than the clock's (card, cycle, bytes), in
    /// input order: counted when their cycle starts.
    pub ahead: Vec<(Iccid, i64, Usage)>,
    pub plans: BTreeMap<String, ModelPlan>,
    pub cards: BTreeMap<Iccid, ModelCard>,
    pub pools: BTreeMap<String, ModelPool>,
    pub seen: HashSet<(Iccid, String)>,
    /// Last visible (state, reasons, separated) per card, for events.
    pub visible: BTreeMap<Iccid, (CardState, Reasons, bool)>,
    pub events: Vec<ModelEvent>,
    /// Rules installed (`upsert_rule` seen).
    pub rules: bool,
    /// (rule, target, cycle) already fired.
    pub fired: BTreeSet<(String, String, i64)>,
    /// Firings of the current input: (rule, target).
    pub firings: Vec<(String, String)>,
    /// Cycles closed within the lateness: (carrier, cycle, counted
    /// through).
    pub closing: Vec<(Carrier, i64, Timestamp)>,
    pub closed_cards: BTreeMap<Iccid, ClosedCard>,
    pub closed_pools: BTreeMap<String, ClosedPool>,
    pub late_crossings: Vec<LateCrossing>,
    pub pool_totals: Vec<PoolTotal>,
    /// Declared custom attribute names, and the disabled ones.
    pub attribute_names: Vec<String>,
    pub disabled_attributes: BTreeSet<String>,
}

impl Model {
    pub fn new(max_future_ms: i64, quorum: usize) -> Model {
        Model {
            max_future_ms,
            retention_ms: 90 * 86_400_000,
            quorum,
            clock: None,
            latest: BTreeMap::new(),
            ahead: Vec::new(),
            plans: BTreeMap::new(),
            cards: BTreeMap::new(),
            pools: BTreeMap::new(),
            seen: HashSet::new(),
            visible: BTreeMap::new(),
            events: Vec::new(),
            rules: false,
            fired: BTreeSet::new(),
            firings: Vec::new(),
            closing: Vec::new(),
            closed_cards: BTreeMap::new(),
            closed_pools: BTreeMap::new(),
            late_crossings: Vec::new(),
            pool_totals: Vec::new(),
            attribute_names: Vec::new(),
            disabled_attributes: BTreeSet::new(),
        }
    }

    /// A card's attributes as views show them (not the disabled names).
    pub fn visible_attributes(&self, iccid: Iccid) -> BTreeMap<String, String> {
        let mut shown = self.cards[&iccid].attributes.clone();
        shown.retain(|name, _| !self.disabled_attributes.contains(name));
        shown
    }

    // ----- derived values ----------------------------------------------

    pub fn current_cycle(&self, carrier: Carrier) -> i64 {
        cycle_of(carrier, self.clock.unwrap_or(Timestamp(0)))
    }

    pub fn members(&self, pool: &str) -> Vec<Iccid> {
        self.cards
            .iter()
            .filter(|(_, c)| c.pool.as_deref() == Some(pool))
            .map(|(i, _)| *i)
            .collect()
    }

    pub fn pool_usage(&self, pool: &str) -> u64 {
        self.members(pool).iter().map(|i| self.cards[i].usage).sum()
    }

    pub fn pool_allowance(&self, pool: &str) -> u64 {
        let members: u64 = self
            .members(pool)
            .iter()
            .map(|i| &self.cards[i])
            .filter(|c| c.lifecycle == CardState::Active)
            .map(|c| self.plans[&c.plan].allowance_bytes)
            .sum();
        members + self.pools[pool].addon_mb * MB
    }

    pub fn pool_exhausted(&self, pool: &str) -> bool {
        self.pools[pool].forward && self.pool_usage(pool) > self.pool_allowance(pool)
    }

    fn threshold_crossed(card: &ModelCard) -> bool {
        card.threshold_mb >= 0 && card.usage > card.threshold_mb as u64 * MB
    }

    pub fn reasons(&self, iccid: Iccid) -> Reasons {
        let card = &self.cards[&iccid];
        if card.lifecycle == CardState::Deregistered {
            return Reasons::EMPTY;
        }
        let plan = &self.plans[&card.plan];
        let pool = card.pool.as_deref();
        let forward_pool = pool.filter(|p| self.pools[*p].forward);
        let backward_pool = pool.filter(|p| !self.pools[*p].forward);
        let mut r = Reasons::EMPTY;
        let own_limit = plan.allowance_bytes + card.addon_mb * MB;
        r = r.set(Reason::OverQuota, pool.is_none() && card.usage > own_limit);
        r = r.set(Reason::OverThreshold, card.over_threshold);
        r = r.set(Reason::GeneralCap, plan.general && card.usage > GENERAL_CAP);
        r = r.set(
            Reason::PoolExhausted,
            forward_pool.is_some_and(|p| self.pool_exhausted(p)),
        );
        r = r.set(
            Reason::PoolFrozen,
            backward_pool.is_some_and(|p| self.pools[p].frozen),
        );
        r = r.set(Reason::Manual, card.manual);
        r = r.set(Reason::Violation, card.violation);
        r
    }

    /// Visible state and reasons (reasons empty unless suspended).
    pub fn view(&self, iccid: Iccid) -> (CardState, Reasons) {
        let card = &self.cards[&iccid];
        let reasons = self.reasons(iccid);
        if card.lifecycle == CardState::Active && !reasons.is_empty() {
            (CardState::Suspended, reasons)
        } else {
            (card.lifecycle, Reasons::EMPTY)
        }
    }

    pub fn pool_state(&self, pool: &str) -> &'static str {
        let p = &self.pools[pool];
        if p.abandoned {
            "abandoned"
        } else if p.forward {
            if self.pool_exhausted(pool) {
                "exhausted"
            } else {
                "available"
            }
        } else if p.frozen && p.retained_until.is_some() {
            "retained"
        } else if p.frozen {
            "frozen"
        } else {
            "available"
        }
    }

    // ----- rules -----------------------------------------------------------

    /// A card's allowance for "remaining": plan + add-ons; none in a
    /// backward pool.
    fn card_allowance(&self, iccid: Iccid) -> Option<u64> {
        let card = &self.cards[&iccid];
        if card.pool.as_ref().is_some_and(|p| !self.pools[p].forward) {
            return None;
        }
        Some(self.plans[&card.plan].allowance_bytes + card.addon_mb * MB)
    }

    fn fire(&mut self, rule: &str, target: String, cycle: i64) {
        if self.fired.insert((rule.to_owned(), target.clone(), cycle)) {
            self.firings.push((rule.to_owned(), target));
        }
    }

    /// Usage rules, checked on the state after an input.
    fn check_rules(&mut self) {
        if !self.rules {
            return;
        }
        let cards: Vec<Iccid> = self.cards.keys().copied().collect();
        for iccid in cards {
            let card = &self.cards[&iccid];
            if card.lifecycle == CardState::Deregistered {
                continue;
            }
            let cycle = self.current_cycle(card.carrier);
            let usage = card.usage;
            if usage >= 20 * MB {
                self.fire("m-used", iccid.to_string(), cycle);
            }
            if self
                .card_allowance(iccid)
                .is_some_and(|a| a > 0 && a as i128 - usage as i128 <= 5 * MB as i128)
            {
                self.fire("m-left", iccid.to_string(), cycle);
            }
        }
        let pools: Vec<(String, Option<Carrier>)> = self
            .pools
            .iter()
            .filter(|(_, p)| !p.abandoned)
            .map(|(id, p)| (id.clone(), p.carrier))
            .collect();
        for (pool, carrier) in pools {
            if self.pool_usage(&pool) >= 50 * MB {
                let cycle = self.current_cycle(carrier.unwrap_or(Carrier::Cmcc));
                self.fire("m-pool", pool, cycle);
            }
        }
    }

    /// A cycle of `carrier` starts: its cards inside "remaining" at zero
    /// usage, and its pools inside "used" (carrier-less backward pools
    /// follow cmcc), fire for it.
    fn rules_at_cycle_start(&mut self, carrier: Carrier, cycle: i64) {
        if !self.rules {
            return;
        }
        let cards: Vec<Iccid> = self
            .cards
            .iter()
            .filter(|(_, c)| c.carrier == carrier && c.lifecycle != CardState::Deregistered)
            .map(|(i, _)| *i)
            .collect();
        for iccid in cards {
            if self
                .card_allowance(iccid)
                .is_some_and(|a| a > 0 && a <= 5 * MB)
            {
                self.fire("m-left", iccid.to_string(), cycle);
            }
        }
        let pools: Vec<String> = self
            .pools
            .iter()
            .filter(|(_, p)| !p.abandoned && p.carrier.unwrap_or(Carrier::Cmcc) == carrier)
            .map(|(id, _)| id.clone())
            .collect();
        for pool in pools {
            if self.pool_usage(&pool) >= 50 * MB {
                self.fire("m-pool", pool, cycle);
            }
        }
    }

    // ----- causes --------------------------------------------------------

    /// Ends one cause: latches thresholds, emits one event per card whose
    /// visible state changed.
    fn end_cause(&mut self) {
        for card in self.cards.values_mut() {
            if Self::threshold_crossed(card) {
                card.over_threshold = true;
            }
        }
        let iccids: Vec<Iccid> = self.cards.keys().copied().collect();
        for iccid in iccids {
            let (state, reasons) = self.view(iccid);
            let now = (state, reasons, self.cards[&iccid].separated);
            match self.visible.insert(iccid, now) {
                Some(before) if before != now => {
                    if self.rules
                        && now.0 == CardState::Suspended
                        && before.0 != CardState::Suspended
                    {
                        self.firings.push(("m-cut".to_owned(), iccid.to_string()));
                    }
                    self.events.push(ModelEvent {
                        iccid,
                        old: before.0,
                        new: now.0,
                        reasons: now.1,
                    })
                }
                _ => {}
            }
        }
    }

    /// Moves the clock to `t` if later; each carrier whose cycle changes
    /// rolls over (one cause per carrier).
    fn advance(&mut self, t: Timestamp) {
        let old = self.clock;
        if old.is_some_and(|c| c >= t) {
            return;
        }
        self.clock = Some(t);
        let Some(old) = old else { return };
        // Every cycle start crossed, in time order; carriers starting a
        // cycle at the same instant together (one cause).
        let mut starts: BTreeMap<Timestamp, Vec<(Carrier, i64)>> = BTreeMap::new();
        for carrier in Carrier::ALL {
            for cycle in cycle_of(carrier, old) + 1..=cycle_of(carrier, t) {
                starts
                    .entry(cycle_start(carrier, cycle))
                    .or_default()
                    .push((carrier, cycle));
            }
        }
        for (start, group) in starts {
            self.expire_closings(start);
            // Retentions that end before this cycle start (at the same
            // instant the rollover comes first).
            self.end_retentions(old, start.plus_millis(-1));
            // Rules evaluated at this cycle start see its cycles.
            self.clock = Some(start);
            for &(carrier, cycle) in &group {
                self.close(carrier, cycle - 1, start);
            }
            for &(carrier, _) in &group {
                for card in self.cards.values_mut() {
                    if card.carrier == carrier {
                        card.usage = 0;
                        card.addon_mb = 0;
                        card.over_threshold = false;
                    }
                }
                for pool in self.pools.values_mut() {
                    if pool.forward && pool.carrier == Some(carrier) {
                        pool.addon_mb = 0;
                    }
                }
            }
            self.end_cause();
            for &(carrier, cycle) in &group {
                self.rules_at_cycle_start(carrier, cycle);
            }
            // The records that came ahead of the clock for the cycles just
            // started count now, in input order, one cause each.
            let started = |iccid: &Iccid, cycle: i64, cards: &BTreeMap<Iccid, ModelCard>| {
                group.contains(&(cards[iccid].carrier, cycle))
            };
            let (due, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.ahead)
                .into_iter()
                .partition(|(i, c, _)| started(i, *c, &self.cards));
            self.ahead = kept;
            for (iccid, _, usage) in due {
                self.count(iccid, &usage);
                // The engine looks at rules after every cause: a later
                // cycle start in the same input must not hide a firing.
                self.check_rules();
            }
        }
        self.expire_closings(t);
        self.end_retentions(old, t);
        self.clock = Some(t);
    }

    /// `carrier`'s `cycle` ends at `end`: its cards' and pools' figures
    /// are kept through the lateness, each pool's total so far reported.
    fn close(&mut self, carrier: Carrier, cycle: i64, end: Timestamp) {
        self.closing
            .push((carrier, cycle, end.plus_millis(LATENESS_MS)));
        let usage_reasons = [Reason::OverQuota, Reason::GeneralCap, Reason::OverThreshold];
        let iccids: Vec<Iccid> = self
            .cards
            .iter()
            .filter(|(_, c)| c.carrier == carrier && c.lifecycle != CardState::Deregistered)
            .map(|(i, _)| *i)
            .collect();
        for iccid in iccids {
            let r = self.reasons(iccid);
            let reasons = usage_reasons
                .into_iter()
                .filter(|&x| r.contains(x))
                .fold(Reasons::EMPTY, Reasons::with);
            let card = &self.cards[&iccid];
            self.closed_cards.insert(
                iccid,
                ClosedCard {
                    cycle,
                    usage: card.usage,
                    addon_mb: card.addon_mb,
                    reasons,
                    pool: card.pool.clone(),
                },
            );
        }
        let pools: Vec<String> = self
            .pools
            .iter()
            .filter(|(_, p)| p.carrier.unwrap_or(Carrier::Cmcc) == carrier && !p.abandoned)
            .map(|(id, _)| id.clone())
            .collect();
        for pool in pools {
            let closed = ClosedPool {
                carrier,
                cycle,
                usage: self.pool_usage(&pool),
                allowance: self.pool_allowance(&pool),
                exhausted: self.pool_exhausted(&pool),
            };
            self.pool_totals
                .push((pool.clone(), cycle, closed.usage, false));
            self.closed_pools.insert(pool, closed);
        }
    }

    /// Closed cycles whose lateness ended before `t`: final pool totals,
    /// figures dropped.
    fn expire_closings(&mut self, t: Timestamp) {
        let (due, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.closing)
            .into_iter()
            .partition(|(_, _, until)| *until < t);
        self.closing = kept;
        for (carrier, _, _) in due {
            let cards = &self.cards;
            self.closed_cards.retain(|i, _| cards[i].carrier != carrier);
            let pools: Vec<String> = self
                .closed_pools
                .iter()
                .filter(|(_, p)| p.carrier == carrier)
                .map(|(id, _)| id.clone())
                .collect();
            for pool in pools {
                let p = self.closed_pools.remove(&pool).unwrap();
                self.pool_totals.push((pool, p.cycle, p.usage, true));
            }
        }
    }

    /// Backward pools whose retention ended after `from` and by `to` are
    /// abandoned (no card changes: the freeze still holds the members).
    fn end_retentions(&mut self, from: Timestamp, to: Timestamp) {
        for p in self.pools.values_mut() {
            match p.retained_until {
                Some(until) if !p.abandoned && until > from && until <= to => {
                    p.abandoned = true;
                    p.abandoned_at = Some(until);
                }
                _ => {}
            }
        }
    }

    /// Counts a record toward its card's closed cycle (and its pool's, if
    /// the card is still in the pool it was in then).
    fn count_closed(&mut self, iccid: Iccid, cycle: i64, u: &Usage) {
        let bytes = u.bytes_up + u.bytes_down;
        let card = &self.cards[&iccid];
        let plan = &self.plans[&card.plan];
        let closed = self.closed_cards.entry(iccid).or_insert(ClosedCard {
            cycle,
            usage: 0,
            addon_mb: 0,
            reasons: Reasons::EMPTY,
            pool: None,
        });
        closed.usage += bytes;
        let mut gained = Reasons::EMPTY;
        if closed.pool.is_none() && closed.usage > plan.allowance_bytes + closed.addon_mb * MB {
            gained = gained.with(Reason::OverQuota);
        }
        if plan.general && closed.usage > GENERAL_CAP {
            gained = gained.with(Reason::GeneralCap);
        }
        if card.threshold_mb >= 0 && closed.usage > card.threshold_mb as u64 * MB {
            gained = gained.with(Reason::OverThreshold);
        }
        let new = Reasons::from_bits(gained.bits() & !closed.reasons.bits());
        if !new.is_empty() {
            closed.reasons = Reasons::from_bits(closed.reasons.bits() | new.bits());
            self.late_crossings
                .push((iccid.to_string(), new, closed.usage));
        }
        let Some(pool) = closed
            .pool
            .clone()
            .filter(|p| card.pool.as_ref() == Some(p))
        else {
            return;
        };
        let carrier = card.carrier;
        let forward = self.pools[&pool].forward;
        let Some(p) = self.closed_pools.get_mut(&pool) else {
            return;
        };
        let same_cycle = cycle_start(carrier, cycle) == cycle_start(p.carrier, cycle)
            && cycle_start(carrier, cycle + 1) == cycle_start(p.carrier, cycle + 1);
        if p.cycle != cycle || !same_cycle {
            return;
        }
        p.usage += bytes;
        if forward && !p.exhausted && p.usage > p.allowance {
            p.exhausted = true;
            self.late_crossings
                .push((pool, Reasons::EMPTY.with(Reason::PoolExhausted), p.usage));
        }
    }

    // ----- records ---------------------------------------------------------

    pub fn record(&mut self, u: &Usage) -> RecordOutcome {
        self.firings.clear();
        let outcome = self.record_inner(u);
        self.check_rules();
        outcome
    }

    fn record_inner(&mut self, u: &Usage) -> RecordOutcome {
        if let Some(clock) = self.clock {
            if u.end > clock.plus_millis(self.max_future_ms) {
                return RecordOutcome::Rejected("future_time".into());
            }
        }
        if !self.cards.contains_key(&u.iccid) {
            return RecordOutcome::Rejected("unknown_card".into());
        }
        if !self.seen.insert((u.iccid, u.record_id.as_str().to_owned())) {
            return RecordOutcome::Duplicate;
        }
        let latest = self.latest.entry(u.iccid).or_insert(u.end);
        *latest = (*latest).max(u.end);
        let agreed = self.agreed();
        self.advance(agreed);
        let current = self.current_cycle(self.cards[&u.iccid].carrier);
        let card = self.cards.get_mut(&u.iccid).unwrap();
        let cycle = cycle_of(card.carrier, u.end);
        if card.lifecycle == CardState::Deregistered {
            return RecordOutcome::NotCounted;
        }
        if cycle < current {
            // Of a closed cycle: counted toward it within the lateness.
            let carrier = card.carrier;
            let closing = self
                .closing
                .iter()
                .any(|&(c, k, until)| c == carrier && k == cycle && self.clock.unwrap() <= until);
            if !closing {
                return RecordOutcome::NotCounted;
            }
            self.count_closed(u.iccid, cycle, u);
            return RecordOutcome::Counted;
        }
        if cycle > current {
            self.ahead.push((u.iccid, cycle, *u));
        } else {
            self.count(u.iccid, u);
        }
        RecordOutcome::Counted
    }

    /// Counts a record of the card's current cycle (one cause).
    fn count(&mut self, iccid: Iccid, u: &Usage) {
        let bytes = u.bytes_up + u.bytes_down;
        let card = self.cards.get_mut(&iccid).unwrap();
        if card.lifecycle == CardState::Deregistered {
            return;
        }
        // Device binding: first device binds; another one is a move.
        if let Some(imei) = u.imei {
            match card.bound {
                None => card.bound = Some(imei),
                Some(bound) if bound == imei => {}
                Some(_) => match card.carrier {
                    Carrier::Cmcc => card.violation = true,
                    Carrier::Ctcc | Carrier::Tri => card.separated = true,
                    Carrier::Cucc => {
                        card.bound = Some(imei);
                        let month = cycle_of(Carrier::Cmcc, u.end);
                        if card.device_month != month {
                            card.device_month = month;
                            card.changes = 0;
                            card.rebinds = 0;
                        }
                        card.changes += 1;
                        if card.changes >= 3 {
                            card.violation = true;
                        }
                    }
                },
            }
        }
        if card.lifecycle == CardState::Activatable {
            card.lifecycle = CardState::Active;
        }
        card.usage += bytes;
        self.end_cause();
    }

    // ----- commands --------------------------------------------------------

    /// The time a majority of the `quorum` cards furthest ahead have all
    /// reached: every card's latest time, sorted.
    fn agreed(&self) -> Timestamp {
        let mut times: Vec<(Timestamp, Iccid)> =
            self.latest.iter().map(|(i, t)| (*t, *i)).collect();
        times.sort_by(|a, b| b.cmp(a));
        times.truncate(self.quorum.max(1));
        times[times.len() / 2].0
    }

    pub fn command(&mut self, c: &Command) -> CommandOutcome {
        self.firings.clear();
        // Commands here have no receive time: their `at` is not bounded
        // (`Engine::process_command`).
        self.advance(c.at);
        let outcome = self.apply(c);
        self.end_cause();
        self.check_rules();
        outcome
    }

    fn whole(ok: bool) -> CommandOutcome {
        CommandOutcome {
            whole_error: !ok,
            per_card: Vec::new(),
        }
    }

    fn live(&self, iccid: &Iccid) -> Option<&ModelCard> {
        self.cards
            .get(iccid)
            .filter(|c| c.lifecycle != CardState::Deregistered)
    }

    /// Applies `f` to each card of a batch; unknown cards fail.
    fn batch(
        &mut self,
        iccids: &[Iccid],
        mut f: impl FnMut(&mut Model, Iccid) -> bool,
    ) -> CommandOutcome {
        let distinct: HashSet<&Iccid> = iccids.iter().collect();
        if iccids.is_empty() || distinct.len() != iccids.len() {
            return Self::whole(false);
        }
        let per_card = iccids
            .iter()
            .map(|&i| self.cards.contains_key(&i) && f(self, i))
            .collect();
        CommandOutcome {
            whole_error: false,
            per_card,
        }
    }

    fn apply(&mut self, c: &Command) -> CommandOutcome {
        let at = c.at;
        match &c.kind {
            CommandKind::UpsertPlan { plan } => {
                if let Some(old) = self.plans.get(plan.id.as_str()) {
                    assert_eq!(old.carrier, plan.carrier, "generator keeps plan carriers");
                }
                self.plans.insert(
                    plan.id.0.clone(),
                    ModelPlan {
                        carrier: plan.carrier,
                        allowance_bytes: plan.allowance_mb * MB,
                        general: plan.traffic == TrafficType::General,
                    },
                );
                Self::whole(true)
            }
            CommandKind::UpsertCard { card } => Self::whole(self.upsert_card(card)),
            CommandKind::CreatePool { pool } => {
                let id = pool.id.0.clone();
                if self.pools.contains_key(&id) {
                    return Self::whole(false);
                }
                let forward = pool.kind == PoolKind::Forward;
                if forward {
                    let (Some(plan), Some(carrier)) = (&pool.plan, pool.carrier) else {
                        return Self::whole(false);
                    };
                    match self.plans.get(plan.as_str()) {
                        Some(p) if p.carrier == carrier => {}
                        _ => return Self::whole(false),
                    }
                }
                self.pools.insert(
                    id,
                    ModelPool {
                        forward,
                        carrier: pool.carrier,
                        plan: if forward {
                            pool.plan.as_ref().map(|p| p.0.clone())
                        } else {
                            None
                        },
                        addon_mb: 0,
                        frozen: false,
                        abandoned: false,
                        retained_until: None,
                        abandoned_at: None,
                    },
                );
                Self::whole(true)
            }
            CommandKind::AddPoolMembers { pool, iccids } => {
                let Some(p) = self.pools.get(pool.as_str()).cloned() else {
                    return Self::whole(false);
                };
                let distinct: HashSet<&Iccid> = iccids.iter().collect();
                if p.abandoned && !iccids.is_empty() && distinct.len() == iccids.len() {
                    return Self::whole(false);
                }
                let id = pool.0.clone();
                self.batch(iccids, |m, i| {
                    let Some(card) = m.live(&i) else { return false };
                    match &card.pool {
                        Some(q) if *q == id => return true,
                        Some(_) => return false,
                        None => {}
                    }
                    let fits = if p.forward {
                        p.carrier == Some(card.carrier) && p.plan.as_ref() == Some(&card.plan)
                    } else {
                        p.carrier.is_none_or(|pc| pc == card.carrier)
                    };
                    if fits {
                        m.cards.get_mut(&i).unwrap().pool = Some(id.clone());
                    }
                    fits
                })
            }
            CommandKind::RemovePoolMembers { pool, iccids } => {
                if !self.pools.contains_key(pool.as_str()) {
                    return Self::whole(false);
                }
                let id = pool.0.clone();
                self.batch(iccids, |m, i| {
                    let card = m.cards.get_mut(&i).unwrap();
                    if card.pool.as_ref() != Some(&id) {
                        return false;
                    }
                    card.pool = None;
                    true
                })
            }
            CommandKind::SetThreshold { iccids, mb } => {
                let mb = *mb;
                if mb < -1 {
                    return Self::whole(false);
                }
                self.batch(iccids, |m, i| {
                    let Some(card) = m.live(&i) else { return false };
                    let in_forward = card.pool.as_ref().is_some_and(|p| m.pools[p].forward);
                    let needs_pool = matches!(card.carrier, Carrier::Cmcc | Carrier::Cucc);
                    if needs_pool && !in_forward {
                        return false;
                    }
                    let card = m.cards.get_mut(&i).unwrap();
                    card.threshold_mb = mb;
                    card.over_threshold = Self::threshold_crossed(card);
                    true
                })
            }
            CommandKind::ClearThreshold { iccids } => self.batch(iccids, |m, i| {
                if m.live(&i).is_none() {
                    return false;
                }
                m.cards.get_mut(&i).unwrap().threshold_mb = -1;
                true
            }),
            CommandKind::AddOn { iccid, pool, mb } => {
                let mb = *mb;
                if mb == 0 {
                    return Self::whole(false);
                }
                match (iccid, pool) {
                    (Some(i), None) => {
                        let Some(card) = self.live(i) else {
                            return Self::whole(false);
                        };
                        let in_forward = card.pool.as_ref().is_some_and(|p| self.pools[p].forward);
                        if in_forward
                            || cycle_of(card.carrier, at) != self.current_cycle(card.carrier)
                        {
                            return Self::whole(false);
                        }
                        // Only activated cards, not suspended or suspended
                        // (also) for usage, and a general card's plan +
                        // add-ons within 100 MB.
                        let reasons = self.reasons(*i);
                        let usage_only = reasons.is_empty()
                            || reasons.iter().any(|r| {
                                matches!(
                                    r,
                                    Reason::OverQuota | Reason::OverThreshold | Reason::GeneralCap
                                )
                            });
                        let plan = &self.plans[&card.plan];
                        let capped = plan.general
                            && plan.allowance_bytes + (card.addon_mb + mb) * MB > GENERAL_CAP;
                        if card.lifecycle != CardState::Active || !usage_only || capped {
                            return Self::whole(false);
                        }
                        self.cards.get_mut(i).unwrap().addon_mb += mb;
                        Self::whole(true)
                    }
                    (None, Some(p)) => {
                        let Some(pool) = self.pools.get(p.as_str()) else {
                            return Self::whole(false);
                        };
                        let carrier = pool.carrier.unwrap_or(Carrier::Cmcc);
                        if pool.abandoned
                            || !pool.forward
                            || cycle_of(carrier, at) != self.current_cycle(carrier)
                        {
                            return Self::whole(false);
                        }
                        self.pools.get_mut(p.as_str()).unwrap().addon_mb += mb;
                        Self::whole(true)
                    }
                    _ => Self::whole(false),
                }
            }
            CommandKind::Suspend { iccids } => self.batch(iccids, |m, i| {
                let card = m.cards.get_mut(&i).unwrap();
                if card.lifecycle != CardState::Active {
                    return false;
                }
                card.manual = true;
                true
            }),
            CommandKind::Resume { iccids } => self.batch(iccids, |m, i| {
                let card = m.cards.get_mut(&i).unwrap();
                if card.lifecycle == CardState::Deregistered {
                    return false;
                }
                // A cmcc device move takes a rebind.
                if card.carrier == Carrier::Cmcc && card.violation {
                    return false;
                }
                card.manual = false;
                card.violation = false;
                true
            }),
            CommandKind::Rebind { iccid, imei } => {
                let month = cycle_of(Carrier::Cmcc, at);
                let Some(card) = self.cards.get_mut(iccid) else {
                    return Self::whole(false);
                };
                if card.lifecycle == CardState::Deregistered {
                    return Self::whole(false);
                }
                match card.carrier {
                    Carrier::Cucc => return Self::whole(false),
                    Carrier::Ctcc | Carrier::Tri => {
                        if card.device_month != month {
                            card.device_month = month;
                            card.changes = 0;
                            card.rebinds = 0;
                        }
                        if card.rebinds >= 2 {
                            return Self::whole(false);
                        }
                        card.rebinds += 1;
                    }
                    Carrier::Cmcc => {}
                }
                card.violation = false;
                card.separated = false;
                card.bound = imei.as_deref().and_then(|t| Imei::parse(t.as_bytes()));
                Self::whole(true)
            }
            CommandKind::Deregister { iccids } => self.batch(iccids, |m, i| {
                let card = m.cards.get_mut(&i).unwrap();
                if card.lifecycle == CardState::Deregistered {
                    return false;
                }
                let pool = card.pool.clone();
                card.lifecycle = CardState::Deregistered;
                card.pool = None;
                card.manual = false;
                card.over_threshold = false;
                card.violation = false;
                card.separated = false;
                m.abandon_if_closed(pool);
                true
            }),
            CommandKind::Activate { iccids } => self.batch(iccids, |m, i| {
                let card = m.cards.get_mut(&i).unwrap();
                if matches!(card.lifecycle, CardState::Deregistered | CardState::Active) {
                    return false;
                }
                card.lifecycle = CardState::Active;
                true
            }),
            CommandKind::FreezePool { pool } | CommandKind::UnfreezePool { pool } => {
                let freeze = matches!(c.kind, CommandKind::FreezePool { .. });
                match self.pools.get_mut(pool.as_str()) {
                    Some(p) if !p.forward && !p.abandoned => {
                        p.frozen = freeze;
                        if !freeze {
                            p.retained_until = None;
                        }
                        Self::whole(true)
                    }
                    _ => Self::whole(false),
                }
            }
            CommandKind::RetainPool { pool } => {
                let clock = self.clock;
                let until = at.plus_millis(self.retention_ms);
                match self.pools.get_mut(pool.as_str()) {
                    Some(p) if !p.forward && !p.abandoned && p.frozen => {
                        if p.retained_until.is_none() {
                            p.retained_until = Some(until);
                            // Already over at the clock: abandoned at once.
                            if clock.is_some_and(|c| until <= c) {
                                p.abandoned = true;
                                p.abandoned_at = Some(until);
                            }
                        }
                        Self::whole(true)
                    }
                    _ => Self::whole(false),
                }
            }
            CommandKind::ReenablePool { pool } => match self.pools.get_mut(pool.as_str()) {
                Some(p) if !p.forward && p.abandoned_at.is_some_and(|t| at <= plus_month(t)) => {
                    p.abandoned = false;
                    p.abandoned_at = None;
                    p.retained_until = None;
                    p.frozen = false;
                    Self::whole(true)
                }
                _ => Self::whole(false),
            },
            CommandKind::UpsertRule { .. } => {
                self.rules = true;
                Self::whole(true)
            }
            CommandKind::SetAttributeNames { names } => {
                let distinct: BTreeSet<&String> = names.iter().collect();
                if names.len() > 6
                    || distinct.len() != names.len()
                    || names.iter().any(String::is_empty)
                {
                    return Self::whole(false);
                }
                self.attribute_names = names.clone();
                self.disabled_attributes.retain(|n| names.contains(n));
                Self::whole(true)
            }
            CommandKind::EnableAttribute { name } | CommandKind::DisableAttribute { name } => {
                if !self.attribute_names.contains(name) {
                    return Self::whole(false);
                }
                // The generated rules filter on no attribute.
                if matches!(c.kind, CommandKind::DisableAttribute { .. }) {
                    self.disabled_attributes.insert(name.clone());
                } else {
                    self.disabled_attributes.remove(name);
                }
                Self::whole(true)
            }
            CommandKind::SetAttributes { iccids, attributes } => {
                let usable = |n: &String| {
                    self.attribute_names.contains(n) && !self.disabled_attributes.contains(n)
                };
                let distinct: HashSet<&Iccid> = iccids.iter().collect();
                if iccids.is_empty()
                    || distinct.len() != iccids.len()
                    || attributes.is_empty()
                    || !attributes.keys().all(usable)
                {
                    return Self::whole(false);
                }
                self.batch(iccids, |m, i| {
                    if m.live(&i).is_none() {
                        return false;
                    }
                    let card = m.cards.get_mut(&i).unwrap();
                    for (name, value) in attributes {
                        match value {
                            Some(v) => card.attributes.insert(name.clone(), v.clone()),
                            None => card.attributes.remove(name),
                        };
                    }
                    true
                })
            }
            other => panic!("the model does not cover {}", other.type_name()),
        }
    }

    /// A forward pool whose last member was just deregistered is abandoned.
    fn abandon_if_closed(&mut self, pool: Option<String>) {
        if let Some(pool) = pool {
            if self.pools[&pool].forward && self.members(&pool).is_empty() {
                self.pools.get_mut(&pool).unwrap().abandoned = true;
            }
        }
    }

    fn upsert_card(&mut self, spec: &CardSpec) -> bool {
        match self.plans.get(spec.plan.as_str()) {
            Some(p) if p.carrier == spec.carrier => {}
            _ => return false,
        }
        // New cards default to activatable; an existing card keeps its state
        // when the command leaves it out.
        let existing = self.cards.get(&spec.iccid).map(|c| {
            if c.lifecycle == CardState::Active && c.manual {
                CardState::Suspended
            } else {
                c.lifecycle
            }
        });
        let (lifecycle, manual) = match spec.state.or(existing).unwrap_or(CardState::Activatable) {
            CardState::Suspended => (CardState::Active, true),
            s => (s, false),
        };
        match self.cards.get_mut(&spec.iccid) {
            Some(card) => {
                if card.lifecycle == CardState::Deregistered {
                    return false;
                }
                if let Some(pool) = &card.pool {
                    let p = &self.pools[pool];
                    let fits = if p.forward {
                        p.carrier == Some(spec.carrier) && p.plan.as_ref() == Some(&spec.plan.0)
                    } else {
                        p.carrier.is_none_or(|pc| pc == spec.carrier)
                    };
                    if !fits {
                        return false;
                    }
                }
                assert_eq!(card.carrier, spec.carrier, "generator keeps card carriers");
                card.plan = spec.plan.0.clone();
                card.lifecycle = lifecycle;
                card.manual = manual;
                if lifecycle == CardState::Deregistered {
                    let pool = card.pool.take();
                    card.over_threshold = false;
                    card.violation = false;
                    card.separated = false;
                    self.abandon_if_closed(pool);
                }
            }
            None => {
                self.cards.insert(
                    spec.iccid,
                    ModelCard {
                        carrier: spec.carrier,
                        plan: spec.plan.0.clone(),
                        lifecycle,
                        usage: 0,
                        addon_mb: 0,
                        threshold_mb: -1,
                        over_threshold: false,
                        manual,
                        pool: None,
                        bound: None,
                        violation: false,
                        separated: false,
                        device_month: 0,
                        changes: 0,
                        rebinds: 0,
                        attributes: BTreeMap::new(),
                    },
                );
                // A new card has no "before": no event for its creation.
                let (state, reasons) = self.view(spec.iccid);
                self.visible.insert(spec.iccid, (state, reasons, false));
            }
        }
        true
    }
}
