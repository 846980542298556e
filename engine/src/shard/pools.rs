//! Pool membership: a card joins or leaves a pool of this shard, and
//! whether it may (forward pools: same carrier, traffic type and plan).

use crate::command::{CommandError, ErrorCode, PoolKind};

use super::{Card, Pool, Shard, NO_POOL};

impl Shard {
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

    /// A deregistered card leaves its pool for good; a forward pool left
    /// with no member that way is abandoned (SPEC 2.1).
    pub(crate) fn leave_for_good(&mut self, slot: u32) {
        let p = self.cards[slot as usize].pool;
        self.remove_member(slot);
        if p == NO_POOL {
            return;
        }
        let pool = &self.pools[p as usize];
        if pool.kind == PoolKind::Forward && pool.members.is_empty() && !pool.removed {
            self.touch_pool(p);
            self.pools[p as usize].removed = true;
        }
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
}

/// Iterate deterministic pool member slots (helper for the engine).
pub(crate) fn member_slots(pool: &Pool) -> Vec<u32> {
    pool.members.iter().copied().collect()
}
