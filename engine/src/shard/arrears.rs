//! A backward pool in arrears (SPEC section 2.1): frozen (`freeze_pool`),
//! then retained for a period (`retain_pool`), then abandoned when the
//! retention ends; an abandoned pool can be re-enabled within one month.
//!
//! The members stay suspended `pool_frozen` from the freeze until the pool
//! is unfrozen or re-enabled: abandonment keeps the cards and their data
//! (they stay members), it only takes the pool out of rules, rollovers and
//! new memberships. The pool's visible state tells the stages apart.

use crate::command::PoolKind;
use crate::event::{Cause, DeadlineKind, Output};
use crate::time::Timestamp;

use super::Shard;

impl Shard {
    /// Freezes a backward pool, or lifts its freeze and any retention.
    pub(crate) fn set_frozen(&mut self, p: u32, frozen: bool) {
        self.touch_pool(p);
        let pool = &mut self.pools[p as usize];
        pool.frozen = frozen;
        if !frozen {
            pool.retained_until = None;
        }
        self.refresh_members(p);
    }

    /// Retains a frozen backward pool until `until`, when it is abandoned
    /// (at once if the clock is already there). A pool already retained
    /// keeps its first deadline: a repeated notice does not extend it.
    pub(crate) fn retain(&mut self, p: u32, until: Timestamp) {
        if self.pools[p as usize].retained_until.is_some() {
            return;
        }
        self.touch_pool(p);
        self.pools[p as usize].retained_until = Some(until);
        if until <= self.clock {
            self.abandon(p, until);
        } else {
            self.schedule(p, DeadlineKind::RetentionEnd, until);
        }
    }

    /// The retention deadline of pool `p` fell due at `at`.
    pub(super) fn end_retention(&mut self, p: u32, at: Timestamp, out: &mut Vec<Output>) {
        let Some(pool) = self.pools.get(p as usize) else {
            return;
        };
        // Unfrozen since, or abandoned already: a stale entry.
        if pool.removed || pool.retained_until != Some(at) {
            return;
        }
        self.touch_pool(p);
        self.abandon(p, at);
        self.finish(
            &Cause::Deadline {
                kind: DeadlineKind::RetentionEnd,
                at,
            },
            at,
            out,
        );
    }

    /// Abandons a retained backward pool: no rule cuts it any more (the
    /// freeze still holds its members).
    fn abandon(&mut self, p: u32, at: Timestamp) {
        let pool = &mut self.pools[p as usize];
        debug_assert_eq!(pool.kind, PoolKind::Backward);
        pool.removed = true;
        pool.abandoned_at = Some(at);
        pool.cut = false;
        pool.suspend_at = None;
        self.refresh_members(p);
    }

    /// Brings an abandoned backward pool back, unfrozen. The caller
    /// recomputes its suspend threshold from the rules.
    pub(crate) fn reenable(&mut self, p: u32) {
        self.touch_pool(p);
        let pool = &mut self.pools[p as usize];
        pool.removed = false;
        pool.abandoned_at = None;
        pool.retained_until = None;
        pool.frozen = false;
        self.refresh_members(p);
    }

    fn refresh_members(&mut self, p: u32) {
        let members = super::member_slots(&self.pools[p as usize]);
        for m in members {
            self.touch(m);
            self.refresh_card(m);
        }
    }
}
