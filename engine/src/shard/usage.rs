//! Accounting a record: which cycle it counts for (its closed cycle
//! within the allowed lateness, or late past it, or early for a cycle the
//! clock has not reached), and what
//! counting it does to the card: its device, activation on first use, the
//! test allowance (test traffic counts there only), the pool's usage.

use crate::domain::{CardState, MB};
use crate::event::{Accounted, Cause, Output};
use crate::record::Usage;
use crate::time::Timestamp;

use super::{add_months, Shard, NO_POOL};

impl Shard {
    /// Accounts one fresh record of the card in `slot`, at event clock
    /// `clock`. The record is judged by `lane_time`, the later of the
    /// clock and its input lane's own time: a lane that crossed a cycle
    /// boundary the slower lanes (and so the clock) have not yet makes
    /// its records of the closing cycle closed-cycle records (counted
    /// toward it within the lateness, late past it), exactly as they would
    /// be had the other lanes been read as far. So a record's verdict
    /// depends on its own lane's inputs only, not on how the lanes
    /// interleave.
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
        if slot as usize >= self.cards.len() {
            return;
        }
        let trail = self.trail_mut(slot);
        trail.last_record = trail.last_record.max(usage.end);
        let card = &self.cards[slot as usize];
        let cycle = self.config.calendar.cycle_of(card.carrier, usage.end);
        let current = self.cycle(card.carrier);
        let open = if lane_time > self.clock {
            current.max(self.config.calendar.cycle_of(card.carrier, lane_time))
        } else {
            current
        };
        let lifecycle = card.lifecycle;
        if cycle < open || lifecycle == CardState::Deregistered {
            // Of a closed cycle: it counts toward that cycle within the
            // allowed lateness, is `late` (history only) past it.
            let cycle_end = self.config.calendar.bounds(card.carrier, cycle).1;
            let within =
                self.clock.max(lane_time) <= cycle_end.plus_millis(self.config.allowed_lateness_ms);
            let counted = within
                && lifecycle != CardState::Deregistered
                && (cycle == current || self.closed_counts(slot, cycle));
            out.push(Output::Accounted(Accounted {
                seq,
                usage: *usage,
                cycle,
                counted,
                late: cycle < open && !within,
            }));
            if !counted {
                return;
            }
            if cycle == current {
                // Its lane has closed the cycle, this shard not yet: it
                // counts toward the closed cycle at the rollover, as if
                // the slower lanes had been read as far.
                self.behind.push((seq, slot, *usage));
            } else {
                self.count_closed(slot, usage, out);
            }
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
    pub(super) fn count(&mut self, slot: u32, usage: &Usage, out: &mut Vec<Output>) {
        let bytes = usage.bytes();
        let lifecycle = self.cards[slot as usize].lifecycle;
        if lifecycle == CardState::Deregistered {
            // Deregistered while its record waited for its cycle: history
            // only, as it would have been had it come now.
            return;
        }
        self.touch(slot);
        if let Some(imei) = usage.imei {
            self.check_device(slot, imei, usage.end);
        }
        match lifecycle {
            CardState::Activatable => self.activate(slot, usage.end),
            CardState::Testable => {
                // Test traffic uses the test allowance, not the first
                // cycle's (docs/DECISIONS.md, "Test usage").
                self.count_test_usage(slot, bytes);
                self.finish(
                    &Cause::Record {
                        iccid: usage.iccid,
                        record_id: usage.record_id,
                    },
                    usage.end,
                    out,
                );
                return;
            }
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
            self.schedule_expiry(slot, expires);
        }
        self.adjust_member_allowance(slot, contribution);
    }
}
