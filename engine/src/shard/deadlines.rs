//! Deadlines: a card's plan expiry, the end of its grace and of its test
//! and silent periods, and a backward pool's end of retention. Each is
//! one entry in the shard's ordered set, checked again when it falls due
//! (a renewed card leaves its old entry behind).

use crate::domain::{CardState, Reason};
use crate::event::{Cause, DeadlineKind, Output};
use crate::time::Timestamp;

use super::Shard;

impl Shard {
    pub(super) fn fire_deadlines(&mut self, upto: Timestamp, out: &mut Vec<Output>) {
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
        if kind == DeadlineKind::RetentionEnd {
            // `slot` is a pool index here.
            self.end_retention(slot, at, out);
            return;
        }
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
            // Not renewed since (a renewal moves the expiry, and with it
            // the end of its grace).
            DeadlineKind::ExpiryGraceEnd => {
                card.reasons.contains(Reason::PlanExpired)
                    && self.config.grace_end(card.expires_at) == Some(at)
            }
            // Handled above.
            DeadlineKind::RetentionEnd => false,
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
            DeadlineKind::RuleDay | DeadlineKind::RetentionEnd => {}
            DeadlineKind::ExpiryGraceEnd => self.deregister(slot),
        }
        self.finish(&Cause::Deadline { kind, at }, at, out);
    }

    pub(super) fn schedule(&mut self, slot: u32, kind: DeadlineKind, at: Timestamp) {
        if at == Timestamp::MAX || at == Timestamp::MIN {
            return;
        }
        self.deadlines.insert((at.0, slot, kind));
    }
    /// Schedules a card's expiry and the end of its grace.
    pub(super) fn schedule_expiry(&mut self, slot: u32, expires: Timestamp) {
        self.schedule(slot, DeadlineKind::PlanExpiry, expires);
        if let Some(end) = self.config.grace_end(expires) {
            self.schedule(slot, DeadlineKind::ExpiryGraceEnd, end);
        }
    }

    pub(super) fn schedule_card(&mut self, slot: u32, expires: Timestamp) {
        self.schedule_expiry(slot, expires);
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
}
