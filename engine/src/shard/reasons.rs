//! Derived reasons: a card's or pool's cut-off reasons follow from its
//! usage, limits and pool, and are recomputed whenever one of those
//! changes.

use crate::command::PoolKind;
use crate::domain::{CardState, Reason, Reasons, ThresholdMb, TrafficType, GENERAL_CAP_BYTES, MB};

use super::{Shard, NO_POOL};

impl Shard {
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
}
