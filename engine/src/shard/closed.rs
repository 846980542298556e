//! Closed cycles within the allowed lateness (SPEC section 3): a record
//! of the cycle that just closed still counts for it until the lateness
//! has passed.
//!
//! The rollover stays at the boundary (cut cards come back at midnight,
//! add-ons bought at 00:30 belong to the new cycle), so the closed
//! cycle's figures are kept beside the current ones: each card's usage,
//! add-ons and usage reasons, each pool's usage, allowance and flags. A
//! record of the closed cycle adds to them; when it crosses a limit the
//! closed cycle had not crossed yet, a `late_crossing` event records it.
//! Nothing else follows: the card keeps its current cycle's state, no
//! carrier call and no rule (a cut of a cycle that is over would only be
//! lifted again). When the lateness has passed, each pool's final total
//! is emitted and the figures are dropped; later records of the cycle
//! are `late`, history only.
//!
//! Only cards with something to remember get an entry (usage, add-ons,
//! a usage reason or a pool); any other card's closed cycle is zero usage,
//! no add-on, no pool. Plan allowance, general traffic and threshold are
//! read from the card as it is when the record comes.

use serde::{Deserialize, Serialize};

use crate::command::PoolKind;
use crate::cycle::CycleId;
use crate::domain::{
    CardState, Carrier, Reason, Reasons, ThresholdMb, TrafficType, GENERAL_CAP_BYTES, MB,
};
use crate::event::{
    event_id, ActionEvent, Cause, LateCrossingEvent, Output, PoolCycleTotal, PoolState,
};
use crate::record::Usage;
use crate::time::Timestamp;

use super::{Shard, NO_POOL};

/// The reasons a card's usage sets within a cycle.
const USAGE_REASONS: [Reason; 3] = [Reason::OverQuota, Reason::GeneralCap, Reason::OverThreshold];

/// A carrier's cycle that closed less than the allowed lateness ago.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Closing {
    pub(crate) cycle: CycleId,
    /// The cycle's end plus the lateness: its records count through this.
    pub(crate) until: Timestamp,
}

/// A card's figures for its closed cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ClosedCard {
    pub(crate) carrier: Carrier,
    pub(crate) cycle: CycleId,
    pub(crate) usage: u64,
    pub(crate) addon_mb: u32,
    /// Usage reasons the cycle had (or gained late).
    pub(crate) reasons: Reasons,
    /// Its pool at the close (an index of this shard), or [`NO_POOL`];
    /// [`NO_POOL`] too once the card moved to another shard.
    pub(crate) pool: u32,
    /// It was in a pool at the close (no `over_quota` of its own).
    pub(crate) pooled: bool,
}

/// A pool's figures for its closed cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ClosedPool {
    pub(crate) carrier: Carrier,
    pub(crate) cycle: CycleId,
    pub(crate) usage: u64,
    pub(crate) allowance: u64,
    pub(crate) suspend_at: Option<u64>,
    pub(crate) exhausted: bool,
    pub(crate) cut: bool,
    pub(crate) state: PoolState,
    pub(crate) members: u64,
}

impl Shard {
    /// At the rollover of `carriers` at `end`, before anything resets:
    /// keeps the closing cycle's figures and emits each pool's total.
    pub(super) fn close_cycle(
        &mut self,
        carriers: &[Carrier],
        end: Timestamp,
        out: &mut Vec<Output>,
    ) {
        let cal = self.config.calendar;
        let until = end.plus_millis(self.config.allowed_lateness_ms);
        for &c in carriers {
            if self.closing[c.index()].is_some() {
                // A lateness longer than a cycle: the older one ends here.
                self.expire_closing(c, end, out);
            }
            let cycle = cal.cycle_of(c, Timestamp(end.0 - 1));
            self.closing[c.index()] = Some(Closing { cycle, until });
        }
        for (slot, card) in self.cards.iter().enumerate() {
            if card.vacant
                || card.lifecycle == CardState::Deregistered
                || !carriers.contains(&card.carrier)
            {
                continue;
            }
            let reasons = usage_reasons(card.reasons);
            if card.usage == 0 && card.addon_mb == 0 && reasons.is_empty() && card.pool == NO_POOL {
                continue;
            }
            self.closed_cards.insert(
                slot as u32,
                ClosedCard {
                    carrier: card.carrier,
                    cycle: cal.cycle_of(card.carrier, Timestamp(end.0 - 1)),
                    usage: card.usage,
                    addon_mb: card.addon_mb,
                    reasons,
                    pool: card.pool,
                    pooled: card.pool != NO_POOL,
                },
            );
        }
        for p in 0..self.pools.len() as u32 {
            let pool = &self.pools[p as usize];
            let carrier = pool.cycle_carrier();
            if pool.removed || !carriers.contains(&carrier) {
                continue;
            }
            let closed = ClosedPool {
                carrier,
                cycle: cal.cycle_of(carrier, Timestamp(end.0 - 1)),
                usage: pool.usage,
                allowance: pool.allowance_bytes(),
                suspend_at: pool.suspend_at,
                exhausted: pool.exhausted,
                cut: pool.cut,
                state: pool.visible(),
                members: pool.members.len() as u64,
            };
            self.closed_pools.insert(p, closed);
            out.push(self.pool_total(p, &closed, end, false));
        }
    }

    /// The earliest closed cycle whose lateness has passed by `clock`:
    /// the instant it passes and its carrier.
    pub(super) fn closing_due(&self, clock: Timestamp) -> Option<(Timestamp, Carrier)> {
        Carrier::ALL
            .iter()
            .filter_map(|&c| self.closing[c.index()].map(|k| (k.until.plus_millis(1), c)))
            .filter(|(at, _)| *at <= clock)
            .min()
    }

    /// The lateness of `carrier`'s closed cycle passed at `at`: each of its
    /// pools' final total, and its figures dropped.
    pub(super) fn expire_closing(
        &mut self,
        carrier: Carrier,
        at: Timestamp,
        out: &mut Vec<Output>,
    ) {
        self.closing[carrier.index()] = None;
        self.closed_cards.retain(|_, c| c.carrier != carrier);
        let due: Vec<(u32, ClosedPool)> = self
            .closed_pools
            .iter()
            .filter(|(_, p)| p.carrier == carrier)
            .map(|(&i, p)| (i, *p))
            .collect();
        for (p, closed) in due {
            self.closed_pools.remove(&p);
            out.push(self.pool_total(p, &closed, at, true));
        }
    }

    fn pool_total(&self, p: u32, closed: &ClosedPool, at: Timestamp, final_total: bool) -> Output {
        let pool = &self.pools[p as usize];
        Output::PoolCycle(Box::new(PoolCycleTotal {
            pool: pool.id.clone(),
            name: pool.name.clone(),
            kind: pool.kind,
            carrier: pool.carrier,
            cycle: closed.cycle,
            state: closed.state,
            members: closed.members,
            usage_bytes: closed.usage,
            allowance_bytes: closed.allowance,
            at,
            final_total,
        }))
    }

    /// Whether a record of `cycle` for the card in `slot` counts toward
    /// its closed cycle: that cycle closed within the lateness.
    pub(super) fn closed_counts(&self, slot: u32, cycle: CycleId) -> bool {
        let carrier = self.cards[slot as usize].carrier;
        self.closing[carrier.index()].is_some_and(|k| k.cycle == cycle)
    }

    /// Counts a record toward its card's closed cycle (and the pool the
    /// card was in then, if it still is), reporting any limit it crosses.
    pub(super) fn count_closed(&mut self, slot: u32, usage: &Usage, out: &mut Vec<Output>) {
        let card = &self.cards[slot as usize];
        if card.lifecycle == CardState::Deregistered {
            // Deregistered while its record waited: history only.
            return;
        }
        let cal = self.config.calendar;
        let cycle = cal.cycle_of(card.carrier, usage.end);
        let mut closed = self.closed_cards.get(&slot).copied().unwrap_or(ClosedCard {
            carrier: card.carrier,
            cycle,
            usage: 0,
            addon_mb: 0,
            reasons: Reasons::EMPTY,
            pool: NO_POOL,
            pooled: false,
        });
        if closed.cycle != cycle {
            return;
        }
        let bytes = usage.bytes();
        closed.usage = closed.usage.saturating_add(bytes);
        let (allowance, general) = match self.plan(slot) {
            Some(p) => (p.allowance_bytes, p.traffic == TrafficType::General),
            None => (0, false),
        };
        let limits = [
            (
                Reason::OverQuota,
                (!closed.pooled).then(|| {
                    allowance.saturating_add(u64::from(closed.addon_mb).saturating_mul(MB))
                }),
            ),
            (Reason::GeneralCap, general.then_some(GENERAL_CAP_BYTES)),
            (
                Reason::OverThreshold,
                ThresholdMb(i64::from(card.threshold_mb)).limit_bytes(),
            ),
        ];
        let crossed: Vec<(Reason, u64)> = limits
            .into_iter()
            .filter_map(|(r, limit)| limit.map(|l| (r, l)))
            .filter(|&(r, l)| closed.usage > l && !closed.reasons.contains(r))
            .collect();
        let cause = Cause::Record {
            iccid: usage.iccid,
            record_id: usage.record_id,
        };
        if let Some(&(_, limit)) = crossed.iter().min_by_key(|(_, l)| *l) {
            let gained = crossed
                .iter()
                .fold(Reasons::EMPTY, |r, &(reason, _)| r.with(reason));
            closed.reasons = Reasons::from_bits(closed.reasons.bits() | gained.bits());
            out.push(late_crossing(
                Some(card.iccid),
                None,
                gained,
                closed.cycle,
                closed.usage,
                limit,
                usage.end,
                cause.clone(),
            ));
        }
        let still_member = closed.pool != NO_POOL && card.pool == closed.pool;
        let card_bounds = cal.bounds(card.carrier, cycle);
        self.closed_cards.insert(slot, closed);
        if !still_member {
            return;
        }
        let pool = &self.pools[closed.pool as usize];
        let (kind, id) = (pool.kind, pool.id.clone());
        let Some(p) = self.closed_pools.get_mut(&closed.pool) else {
            return;
        };
        if p.cycle != cycle || cal.bounds(p.carrier, p.cycle) != card_bounds {
            // The pool follows another carrier's cycle: the record is not
            // of the cycle the pool closed.
            return;
        }
        p.usage = p.usage.saturating_add(bytes);
        let crossed = match kind {
            PoolKind::Forward if !p.exhausted && p.usage > p.allowance => {
                p.exhausted = true;
                Some((Reason::PoolExhausted, p.allowance))
            }
            PoolKind::Backward if !p.cut && p.suspend_at.is_some_and(|t| p.usage >= t) => {
                p.cut = true;
                p.suspend_at.map(|t| (Reason::BackwardPoolThreshold, t))
            }
            _ => None,
        };
        if let Some((reason, limit)) = crossed {
            out.push(late_crossing(
                None,
                Some(id),
                Reasons::EMPTY.with(reason),
                p.cycle,
                p.usage,
                limit,
                usage.end,
                cause,
            ));
        }
    }

    /// A card's closed figures leave with it to another shard: its pool
    /// there is another index, so it takes no pool with it.
    pub(crate) fn take_closed(&mut self, slot: u32) -> Option<ClosedCard> {
        self.closed_cards
            .remove(&slot)
            .map(|c| ClosedCard { pool: NO_POOL, ..c })
    }

    pub(crate) fn put_closed(&mut self, slot: u32, closed: Option<ClosedCard>) {
        if let Some(c) = closed {
            self.closed_cards.insert(slot, c);
        }
    }
}

fn usage_reasons(r: Reasons) -> Reasons {
    USAGE_REASONS
        .into_iter()
        .filter(|&x| r.contains(x))
        .fold(Reasons::EMPTY, Reasons::with)
}

#[allow(clippy::too_many_arguments)]
fn late_crossing(
    iccid: Option<crate::ids::Iccid>,
    pool: Option<crate::ids::PoolId>,
    reasons: Reasons,
    cycle: CycleId,
    usage: u64,
    limit: u64,
    event_time: Timestamp,
    cause: Cause,
) -> Output {
    let subject = match (&iccid, &pool) {
        (Some(i), _) => i.to_string(),
        (None, Some(p)) => p.to_string(),
        (None, None) => String::new(),
    };
    Output::Action(ActionEvent::LateCrossing(LateCrossingEvent {
        id: event_id("late_crossing", &subject, &cause),
        iccid,
        pool,
        reasons,
        event_time,
        processed_at: None,
        cycle,
        usage_bytes: usage,
        limit_bytes: limit,
        overshoot_bytes: usage.saturating_sub(limit),
        cause,
    }))
}
