//! Limit commands: what a card or pool may use in its cycle beyond its
//! plan. A card's threshold (a cut-off below its allowance) and add-on
//! packs for a card or a forward pool.

use crate::command::{CardResult, CommandError, ErrorCode, PoolKind};
use crate::domain::{CardState, Carrier, Reason, ThresholdMb, TrafficType, GENERAL_CAP_BYTES, MB};
use crate::ids::{Iccid, PoolId};
use crate::time::Timestamp;

use super::commands::err;
use super::{Engine, Loc};

impl Engine {
    pub(super) fn set_threshold(
        &mut self,
        iccids: &[Iccid],
        mb: i64,
    ) -> Result<Vec<CardResult>, CommandError> {
        if mb < -1 {
            return Err(err(
                ErrorCode::InvalidThreshold,
                format!("threshold {mb} MB: use -1 for none, 0 or a positive MB value"),
            ));
        }
        let Ok(mb32) = i32::try_from(mb) else {
            return Err(err(
                ErrorCode::InvalidValue,
                format!("threshold {mb} MB is too large"),
            ));
        };
        Ok(self.per_card(iccids, |e, loc| {
            e.live(loc)?;
            let card = e.card(loc);
            if card.carrier.threshold_needs_forward_pool() && !e.in_forward_pool(loc) {
                return Err(err(
                    ErrorCode::ThresholdNotAllowed,
                    format!(
                        "{} card {} is not in a forward pool",
                        card.carrier, card.iccid
                    ),
                ));
            }
            let shard = &mut e.shards[loc.shard as usize];
            shard.touch(loc.slot);
            let card = &mut shard.cards[loc.slot as usize];
            card.threshold_mb = mb32;
            let over = ThresholdMb(mb)
                .limit_bytes()
                .is_some_and(|l| card.usage > l);
            card.reasons = card.reasons.set(Reason::OverThreshold, over);
            Ok(())
        }))
    }

    pub(super) fn clear_threshold(&mut self, iccids: &[Iccid]) -> Vec<CardResult> {
        self.per_card(iccids, |e, loc| {
            e.live(loc)?;
            e.shards[loc.shard as usize].cards[loc.slot as usize].threshold_mb = -1;
            Ok(())
        })
    }

    pub(super) fn add_on(
        &mut self,
        iccid: Option<&Iccid>,
        pool: Option<&PoolId>,
        mb: u64,
        at: Timestamp,
    ) -> Result<(), CommandError> {
        if mb == 0 {
            return Err(err(ErrorCode::InvalidValue, "an add-on pack needs mb >= 1"));
        }
        let cal = self.config.calendar;
        match (iccid, pool) {
            (Some(&iccid), None) => {
                let loc = self.locate(iccid)?;
                self.live(loc)?;
                if self.in_forward_pool(loc) {
                    return Err(err(
                        ErrorCode::InvalidState,
                        format!("card {iccid} is in a forward pool: buy the add-on for the pool"),
                    ));
                }
                let mb32 = u32::try_from(mb).map_err(|_| {
                    err(
                        ErrorCode::InvalidValue,
                        format!("add-on of {mb} MB is too large"),
                    )
                })?;
                self.check_card_add_on(loc, mb)?;
                let shard = &mut self.shards[loc.shard as usize];
                let carrier = shard.cards[loc.slot as usize].carrier;
                if cal.cycle_of(carrier, at) != shard.cycle(carrier) {
                    return Err(err(
                        ErrorCode::InvalidValue,
                        format!("add-on bought at {at} belongs to a closed cycle"),
                    ));
                }
                shard.touch(loc.slot);
                let card = &mut shard.cards[loc.slot as usize];
                card.addon_mb = card.addon_mb.saturating_add(mb32);
                shard.refresh_card(loc.slot);
                Ok(())
            }
            (None, Some(pool)) => {
                let entry = self.pool_entry(pool)?.clone();
                self.check_not_abandoned(&entry, pool)?;
                if entry.kind != PoolKind::Forward {
                    return Err(err(
                        ErrorCode::WrongPoolKind,
                        format!(
                            "pool {pool} is a backward pool; add-on packs are for forward pools"
                        ),
                    ));
                }
                let shard = &mut self.shards[entry.shard as usize];
                let carrier = shard.pools[entry.index as usize]
                    .carrier
                    .unwrap_or(Carrier::Cmcc);
                if cal.cycle_of(carrier, at) != shard.cycle(carrier) {
                    return Err(err(
                        ErrorCode::InvalidValue,
                        format!("add-on bought at {at} belongs to a closed cycle"),
                    ));
                }
                let p = &mut shard.pools[entry.index as usize];
                p.addon_mb = p.addon_mb.saturating_add(mb);
                shard.refresh_pool(entry.index);
                Ok(())
            }
            _ => Err(err(
                ErrorCode::Malformed,
                "add_on takes exactly one of iccid and pool",
            )),
        }
    }

    /// The carriers' add-on rules for one card (SPEC section 2.1): it is
    /// activated and either active or suspended for its usage (one of
    /// [`ADD_ON_REASONS`] holds, maybe beside others), and a `general` card's plan plus add-ons stay
    /// within the 100 MB general cap.
    fn check_card_add_on(&self, loc: Loc, mb: u64) -> Result<(), CommandError> {
        let shard = &self.shards[loc.shard as usize];
        let card = &shard.cards[loc.slot as usize];
        let (state, reasons) = shard.visible_state(loc.slot);
        let for_usage = reasons.is_empty() || reasons.iter().any(|r| ADD_ON_REASONS.contains(&r));
        if card.lifecycle != CardState::Active || !for_usage {
            return Err(err(
                ErrorCode::AddOnNotAllowed,
                format!(
                    "card {} is {state}{}: add-ons are for active cards and cards \
                     suspended for their usage",
                    card.iccid,
                    if reasons.is_empty() {
                        String::new()
                    } else {
                        format!(" ({reasons:?})")
                    }
                ),
            ));
        }
        let plan = shard
            .plans
            .get(usize::from(card.plan))
            .and_then(Option::as_ref);
        if let Some(plan) = plan.filter(|p| p.traffic == TrafficType::General) {
            let total = u64::from(card.addon_mb)
                .saturating_add(mb)
                .saturating_mul(MB)
                .saturating_add(plan.allowance_bytes);
            if total > GENERAL_CAP_BYTES {
                return Err(err(
                    ErrorCode::GeneralCapExceeded,
                    format!(
                        "general card {}: plan {} MB + add-ons {} MB + {mb} MB would pass \
                         the 100 MB general cap",
                        card.iccid,
                        plan.allowance_bytes / MB,
                        card.addon_mb
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The reasons that let a suspended card buy an add-on: its cycle usage
/// against its allowance, threshold or the general cap.
const ADD_ON_REASONS: [Reason; 3] = [Reason::OverQuota, Reason::OverThreshold, Reason::GeneralCap];
