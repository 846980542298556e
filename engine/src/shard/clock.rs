//! The event clock reaches a shard: cycle rollovers, due deadlines and the
//! ends of closed cycles' lateness fire in time order; the records that
//! came early for the new cycle are counted once their cycle starts, and
//! those their lane already saw closed count toward the closed cycle.

use crate::cycle::CycleId;
use crate::domain::Carrier;
use crate::event::{Cause, Output};
use crate::record::Usage;
use crate::time::Timestamp;

use super::{Shard, NO_POOL};

impl Shard {
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
            if clock < boundary && !deadline_due && self.closing_due(clock).is_none() {
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
            if let Some((at, carrier)) = self.closing_due(clock) {
                if boundary.is_none_or(|(end, _)| at < end) && deadline.is_none_or(|d| at.0 <= d) {
                    self.expire_closing(carrier, at, out);
                    continue;
                }
            }
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

    fn rollover(
        &mut self,
        carriers: &[Carrier],
        cycle: CycleId,
        start: Timestamp,
        out: &mut Vec<Output>,
    ) {
        self.close_cycle(carriers, start, out);
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
        // Records of the closed cycle that their lane judged after this
        // boundary count toward it now, as they would have had this shard
        // been there first.
        for (_, slot, usage) in self.take_behind(carriers) {
            self.count_closed(slot, &usage, out);
        }
        // Records of the new cycle that came before the clock got here are
        // counted now, in input order, each as its own cause: exactly as
        // if they had come after the rollover.
        for (_, slot, usage) in self.take_ahead(carriers) {
            self.count(slot, &usage, out);
        }
    }

    /// Takes the records kept for the cycle the `carriers` just closed.
    fn take_behind(&mut self, carriers: &[Carrier]) -> Vec<(u64, u32, Usage)> {
        let (due, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.behind)
            .into_iter()
            .partition(|&(_, slot, _)| carriers.contains(&self.cards[slot as usize].carrier));
        self.behind = kept;
        due
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
}
