//! Change tracking: the first change to a card or pool under a cause
//! remembers its visible state before; [`Shard::finish`] emits one event
//! per subject whose visible state differs after, so event ids (a hash of
//! subject and cause) are unique.

use super::rules::Change;
use crate::domain::{CardState, Reason, Reasons, ThresholdMb, GENERAL_CAP_BYTES, MB};
use crate::event::{
    event_hash, event_id, ActionEvent, CardStateEvent, Cause, CauseKind, Output, PoolState,
    PoolStateEvent,
};
use crate::time::Timestamp;

use super::{Pool, Shard, Trail, Visible, NO_POOL};

impl Shard {
    pub(super) fn visible(&self, slot: u32) -> Visible {
        let card = &self.cards[slot as usize];
        if card.lifecycle == CardState::Active && !card.reasons.is_empty() {
            Visible {
                state: CardState::Suspended,
                reasons: card.reasons,
                separated: card.separated,
            }
        } else {
            Visible {
                state: card.lifecycle,
                reasons: Reasons::EMPTY,
                separated: card.separated,
            }
        }
    }

    /// Remembers a card's visible state before the current cause changes it.
    pub(crate) fn touch(&mut self, slot: u32) {
        if self.pending.card_set.insert(slot) {
            let before = self.visible(slot);
            self.pending.cards.push((slot, before));
        }
    }

    pub(super) fn touch_pool(&mut self, p: u32) {
        if !self.pending.pools.iter().any(|(q, _)| *q == p) {
            let before = self.pools[p as usize].visible();
            self.pending.pools.push((p, before));
        }
    }

    /// Emits one event per card and pool whose visible state changed since
    /// it was first touched under this cause.
    pub(crate) fn finish(&mut self, cause: &Cause, event_time: Timestamp, out: &mut Vec<Output>) {
        let rules = !self.rules.is_empty();
        let mut pools = std::mem::take(&mut self.pending.pools);
        pools.sort_by(|a, b| {
            self.pools[a.0 as usize]
                .id
                .cmp(&self.pools[b.0 as usize].id)
        });
        let touched_pools: Vec<u32> = if rules {
            pools.iter().map(|(p, _)| *p).collect()
        } else {
            Vec::new()
        };
        for (p, before) in pools.drain(..) {
            let pool = &self.pools[p as usize];
            let after = pool.visible();
            if after == before {
                continue;
            }
            let (limit, usage) = match after {
                PoolState::Exhausted => (Some(pool.allowance_bytes()), pool.usage),
                PoolState::Suspended => (pool.suspend_at, pool.usage),
                _ => (None, pool.usage),
            };
            out.push(Output::Action(ActionEvent::PoolState(PoolStateEvent {
                id: event_id("pool_state", pool.id.as_str(), cause),
                pool: pool.id.clone(),
                old: before,
                new: after,
                event_time,
                processed_at: None,
                cycle: self.cycle(pool.cycle_carrier()),
                usage_bytes: usage,
                limit_bytes: limit,
                overshoot_bytes: limit.map(|l| usage.saturating_sub(l)),
                cause: cause.clone(),
            })));
        }
        self.pending.pools = pools;

        let mut cards = std::mem::take(&mut self.pending.cards);
        self.pending.card_set.clear();
        cards.sort_by_key(|(slot, _)| self.cards[*slot as usize].iccid);
        let touched_cards: Vec<u32> = if rules {
            cards.iter().map(|(s, _)| *s).collect()
        } else {
            Vec::new()
        };
        let mut changes = Vec::new();
        let devices = std::mem::take(&mut self.pending.devices);
        for (slot, before) in cards.drain(..) {
            let after = self.visible(slot);
            if after == before {
                continue;
            }
            if rules && after.state != before.state {
                changes.push(Change {
                    slot,
                    old: before.state,
                    new: after.state,
                    reasons: after.reasons,
                });
            }
            let iccid = self.cards[slot as usize].iccid;
            let hash = event_hash("card_state", &iccid.to_string(), cause);
            *self.trail_mut(slot) = Trail {
                changed_at: event_time,
                change_event: [(hash >> 64) as u64, hash as u64],
                changed_from: before.state,
                cause: CauseKind::from(cause),
                ..self.trail(slot)
            };
            let card = &self.cards[slot as usize];
            let added = Reasons::from_bits(after.reasons.bits() & !before.reasons.bits());
            let (usage, limit) = self.cut_limit(slot, added);
            out.push(Output::Action(ActionEvent::CardState(CardStateEvent {
                id: format!("{hash:032x}"),
                iccid: card.iccid,
                old: before.state,
                new: after.state,
                reasons: after.reasons,
                event_time,
                processed_at: None,
                cycle: self.cycle(card.carrier),
                usage_bytes: usage,
                limit_bytes: limit,
                overshoot_bytes: limit.map(|l| usage.saturating_sub(l)),
                separated: (after.separated != before.separated).then_some(after.separated),
                device: devices
                    .iter()
                    .rev()
                    .find(|(s, _)| *s == slot)
                    .map(|(_, d)| *d),
                cause: cause.clone(),
            })));
        }
        self.pending.cards = cards;
        self.fire_rules(
            cause,
            event_time,
            &touched_cards,
            &changes,
            &touched_pools,
            out,
        );
    }

    /// For a cut caused by usage, the usage and the tightest limit crossed.
    fn cut_limit(&self, slot: u32, added: Reasons) -> (u64, Option<u64>) {
        let card = &self.cards[slot as usize];
        let pool = (card.pool != NO_POOL).then(|| &self.pools[card.pool as usize]);
        let allowance =
            self.plan(slot).map_or(0, |p| p.allowance_bytes) + u64::from(card.addon_mb) * MB;
        let candidates = [
            (Reason::OverQuota, card.usage, Some(allowance)),
            (
                Reason::OverThreshold,
                card.usage,
                ThresholdMb(i64::from(card.threshold_mb)).limit_bytes(),
            ),
            (Reason::GeneralCap, card.usage, Some(GENERAL_CAP_BYTES)),
            (
                Reason::PoolExhausted,
                pool.map_or(0, |p| p.usage),
                pool.map(Pool::allowance_bytes),
            ),
            (
                Reason::BackwardPoolThreshold,
                pool.map_or(0, |p| p.usage),
                pool.and_then(|p| p.suspend_at),
            ),
        ];
        candidates
            .into_iter()
            .filter(|(r, _, _)| added.contains(*r))
            .filter_map(|(_, usage, limit)| limit.map(|l| (usage, l)))
            .max_by_key(|(usage, limit)| usage.saturating_sub(*limit))
            .map_or((card.usage, None), |(usage, limit)| (usage, Some(limit)))
    }
}
