//! Pool commands: create a pool, add and remove members, rename, and the
//! arrears life cycle of a backward pool (freeze, unfreeze, retain,
//! re-enable; `shard::arrears`). A card that joins a pool moves to the pool's shard: all
//! members of a pool live in one shard, so a pool's crossing is decided
//! on the one record that crosses.

use crate::command::{CardResult, CommandError, ErrorCode, PoolKind, PoolSpec};
use crate::domain::CardState;
use crate::ids::{Iccid, PoolId};
use crate::shard::{add_months, Pool, NO_POOL};
use crate::time::{Timestamp, MS_PER_DAY};

use super::commands::err;
use super::registry::PoolEntry;
use super::{Engine, Loc};

impl Engine {
    pub(super) fn create_pool(&mut self, spec: &PoolSpec) -> Result<(), CommandError> {
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
            retained_until: None,
            abandoned_at: None,
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
        if card.lifecycle == CardState::Testable {
            return Err(err(
                ErrorCode::TestPeriodCard,
                format!(
                    "card {} is in its test period: it cannot join a pool",
                    card.iccid
                ),
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
            *dst.trail_mut(slot) = moved.trail;
            dst.put_closed(slot, moved.closed);
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

    pub(super) fn add_pool_members(
        &mut self,
        pool: &PoolId,
        iccids: &[Iccid],
    ) -> Result<Vec<CardResult>, CommandError> {
        let entry = self.pool_entry(pool)?.clone();
        self.check_not_abandoned(&entry, pool)?;
        Ok(self.per_card(iccids, |e, loc| e.add_member(&entry, loc)))
    }

    pub(super) fn remove_pool_members(
        &mut self,
        pool: &PoolId,
        iccids: &[Iccid],
    ) -> Result<Vec<CardResult>, CommandError> {
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

    /// An abandoned pool takes no member, add-on, freeze or retention.
    pub(super) fn check_not_abandoned(
        &self,
        entry: &PoolEntry,
        pool: &PoolId,
    ) -> Result<(), CommandError> {
        if self.shards[entry.shard as usize].pools[entry.index as usize].removed {
            return Err(err(
                ErrorCode::PoolAbandoned,
                format!("pool {pool} is abandoned"),
            ));
        }
        Ok(())
    }

    /// Renames a pool (its id stays).
    pub(super) fn rename_pool(&mut self, pool: &PoolId, name: &str) -> Result<(), CommandError> {
        let entry = self.pool_entry(pool)?.clone();
        self.shards[entry.shard as usize].pools[entry.index as usize].name = name.to_owned();
        Ok(())
    }

    /// Freezes or unfreezes a backward pool; unfreezing also ends a
    /// retention (the arrears are settled).
    pub(super) fn set_pool_frozen(
        &mut self,
        pool: &PoolId,
        frozen: bool,
    ) -> Result<(), CommandError> {
        let entry = self.backward_pool_entry(pool)?;
        self.check_not_abandoned(&entry, pool)?;
        self.shards[entry.shard as usize].set_frozen(entry.index, frozen);
        Ok(())
    }

    /// Retains a frozen backward pool for `pool_retention_days` from `at`.
    pub(super) fn retain_pool(&mut self, pool: &PoolId, at: Timestamp) -> Result<(), CommandError> {
        let entry = self.backward_pool_entry(pool)?;
        self.check_not_abandoned(&entry, pool)?;
        let shard = &mut self.shards[entry.shard as usize];
        if !shard.pools[entry.index as usize].frozen {
            return Err(err(
                ErrorCode::PoolNotFrozen,
                format!("pool {pool} is not frozen for arrears (freeze_pool comes first)"),
            ));
        }
        let days = i64::from(self.config.pool_retention_days);
        shard.retain(entry.index, at.plus_millis(days * MS_PER_DAY));
        Ok(())
    }

    /// Re-enables an abandoned backward pool within one month (billing
    /// time zone) of its abandonment.
    pub(super) fn reenable_pool(
        &mut self,
        pool: &PoolId,
        at: Timestamp,
    ) -> Result<(), CommandError> {
        let entry = self.backward_pool_entry(pool)?;
        let offset = self.config.calendar.utc_offset_secs;
        let shard = &mut self.shards[entry.shard as usize];
        let Some(abandoned) = shard.pools[entry.index as usize].abandoned_at else {
            return Err(err(
                ErrorCode::PoolNotAbandoned,
                format!("pool {pool} is not abandoned"),
            ));
        };
        let last = add_months(abandoned, 1, offset);
        if at > last {
            return Err(err(
                ErrorCode::ReenableExpired,
                format!(
                    "pool {pool} was abandoned at {abandoned}: it could be re-enabled until {last}"
                ),
            ));
        }
        shard.reenable(entry.index);
        self.refresh_backward_rules();
        Ok(())
    }

    /// The entry of a backward pool (`wrong_pool_kind` for a forward one).
    fn backward_pool_entry(&self, pool: &PoolId) -> Result<PoolEntry, CommandError> {
        let entry = self.pool_entry(pool)?.clone();
        if entry.kind != PoolKind::Backward {
            return Err(err(
                ErrorCode::WrongPoolKind,
                format!("pool {pool} is a forward pool; only backward pools go into arrears"),
            ));
        }
        Ok(entry)
    }
}
