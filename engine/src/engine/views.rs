//! What queries see: [`CardView`] and [`PoolView`], built from a shard's
//! state and named through the registry's tables.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::command::PoolKind;
use crate::domain::{CardState, Carrier, Reasons};
use crate::event::{CauseKind, PoolState};
use crate::ids::{Iccid, PlanId, PoolId, TagId};
use crate::shard::{Shard, NO_POOL};
use crate::time::Timestamp;

use super::registry::PoolEntry;
use super::{Engine, Loc};

/// A card as queries see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardView {
    /// ICCID.
    pub iccid: Iccid,
    /// Carrier.
    pub carrier: Carrier,
    /// Plan id.
    pub plan: Option<PlanId>,
    /// Visible state.
    pub state: CardState,
    /// Suspension reasons (when suspended).
    pub reasons: Reasons,
    /// Usage counted in the current cycle.
    pub usage_bytes: u64,
    /// Current cycle.
    pub cycle: crate::cycle::CycleId,
    /// Cut-off threshold in MB (-1 none).
    pub threshold_mb: i64,
    /// Add-ons for the current cycle in MB.
    pub addon_mb: u64,
    /// Pool membership.
    pub pool: Option<PoolId>,
    /// Tags.
    pub tags: Vec<TagId>,
    /// Activation time.
    pub activated_at: Option<Timestamp>,
    /// Plan expiry.
    pub expires_at: Option<Timestamp>,
    /// MSISDN.
    pub msisdn: Option<String>,
    /// IMSI.
    pub imsi: Option<String>,
    /// IMEI.
    pub imei: Option<String>,
    /// The SIM is in another device than its bound one and has no network
    /// (ctcc, tri; SPEC section 2.1): a rebind restores it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub separated: bool,
    /// Custom attributes, by name (not the disabled names).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
    /// The latest end of the card's records (none yet: `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_record_at: Option<Timestamp>,
    /// Its last visible state change (none yet: `None`): with the state
    /// and reasons above, why the card is as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_change: Option<CardChange>,
}

/// A card's last visible state change: the state and reasons it led to
/// are the card's current ones; the cause's details are in the
/// `card_state` event `event_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardChange {
    /// Event time of the cause.
    pub at: Timestamp,
    /// The visible state before.
    pub old: CardState,
    /// What kind of cause.
    pub cause: CauseKind,
    /// The change's event id.
    pub event_id: String,
}

/// A pool as queries see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolView {
    /// Id.
    pub id: PoolId,
    /// Kind.
    pub kind: PoolKind,
    /// State.
    pub state: PoolState,
    /// Members' summed usage in the current cycle.
    pub usage_bytes: u64,
    /// Allowance (forward pools).
    pub allowance_bytes: u64,
    /// Members, by ICCID.
    pub members: Vec<Iccid>,
    /// Display name.
    pub name: String,
    /// The carrier whose cycle the pool follows (forward pools: the
    /// members' carrier).
    pub carrier: Option<Carrier>,
    /// The pool's current cycle.
    pub cycle: crate::cycle::CycleId,
    /// A retained backward pool: when it will be abandoned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retained_until: Option<Timestamp>,
    /// An abandoned backward pool: when it was abandoned (it can be
    /// re-enabled for one month after).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abandoned_at: Option<Timestamp>,
}
impl Engine {
    /// One card's view, if known.
    pub fn card_view(&self, iccid: Iccid) -> Option<CardView> {
        let loc = self.directory.get(&iccid)?;
        Some(self.view_at(loc))
    }

    fn view_at(&self, loc: Loc) -> CardView {
        card_view(
            &self.shards[loc.shard as usize],
            loc.slot,
            &self.registry.plan_ids,
            &self.registry.tag_names,
            &self.registry.disabled_attributes,
        )
    }

    /// Every card's view, ordered by ICCID.
    pub fn card_views(&self) -> Vec<CardView> {
        card_views(
            &self.shards,
            &self.registry.plan_ids,
            &self.registry.tag_names,
            &self.registry.disabled_attributes,
        )
    }

    /// The declared custom attribute names, in the order they were
    /// declared (their slots, 1 to 6, in the `cards` history table).
    pub fn attribute_names(&self) -> &[String] {
        &self.registry.attribute_names
    }

    /// One pool's view, if known.
    pub fn pool_view(&self, id: &PoolId) -> Option<PoolView> {
        let entry = self.registry.pools.get(id)?;
        Some(self.pool_view_of(entry))
    }

    /// Every pool's view, ordered by id.
    pub fn pool_views(&self) -> Vec<PoolView> {
        self.registry
            .pools
            .values()
            .map(|entry| self.pool_view_of(entry))
            .collect()
    }

    fn pool_view_of(&self, entry: &PoolEntry) -> PoolView {
        let shard = &self.shards[entry.shard as usize];
        let pool = &shard.pools[entry.index as usize];
        PoolView {
            id: pool.id.clone(),
            kind: pool.kind,
            state: shard.pool_state(entry.index),
            usage_bytes: pool.usage,
            allowance_bytes: pool.allowance_bytes(),
            members: {
                let mut members: Vec<Iccid> = pool
                    .members
                    .iter()
                    .map(|&m| shard.cards[m as usize].iccid)
                    .collect();
                members.sort_unstable();
                members
            },
            name: pool.name.clone(),
            carrier: pool.carrier,
            cycle: shard.cycle(pool.cycle_carrier()),
            retained_until: pool.retained_until,
            abandoned_at: pool.abandoned_at,
        }
    }
}

/// The view of the card in `slot` of `shard`; plans and tags are named
/// through the registry's tables.
fn card_view(
    shard: &Shard,
    slot: u32,
    plan_ids: &[Option<PlanId>],
    tag_names: &[Option<TagId>],
    hidden: &BTreeSet<String>,
) -> CardView {
    let card = &shard.cards[slot as usize];
    let (state, reasons) = shard.visible_state(slot);
    let trail = shard.trail(slot);
    CardView {
        iccid: card.iccid,
        carrier: card.carrier,
        plan: plan_ids.get(usize::from(card.plan)).cloned().flatten(),
        state,
        reasons,
        usage_bytes: card.usage,
        cycle: shard.cycle(card.carrier),
        threshold_mb: i64::from(card.threshold_mb),
        addon_mb: u64::from(card.addon_mb),
        pool: (card.pool != NO_POOL).then(|| shard.pools[card.pool as usize].id.clone()),
        tags: shard
            .tags_of(slot)
            .iter()
            .filter_map(|t| tag_names.get(*t as usize).cloned().flatten())
            .collect(),
        activated_at: (card.activated_at != Timestamp::MIN).then_some(card.activated_at),
        expires_at: (card.expires_at != Timestamp::MAX).then_some(card.expires_at),
        msisdn: shard.ident(slot, 0),
        imsi: shard.ident(slot, 1),
        imei: shard.ident(slot, 2),
        separated: card.separated,
        attributes: shard
            .extra(slot)
            .map(|e| {
                e.attributes
                    .iter()
                    .filter(|(name, _)| !hidden.contains(*name))
                    .map(|(name, value)| (name.clone(), value.clone()))
                    .collect()
            })
            .unwrap_or_default(),
        last_record_at: Some(trail.last_record).filter(|&t| t != Timestamp::MIN),
        last_change: (trail.changed_at != Timestamp::MIN).then(|| CardChange {
            at: trail.changed_at,
            old: trail.changed_from,
            cause: trail.cause,
            event_id: format!(
                "{:032x}",
                u128::from(trail.change_event[0]) << 64 | u128::from(trail.change_event[1])
            ),
        }),
    }
}

/// Every live card's view over `shards`, ordered by ICCID: the engine's
/// own and a snapshot copy's ([`crate::SnapshotCopy::card_views`]) are the
/// same function of the same state.
pub(crate) fn card_views(
    shards: &[Shard],
    plan_ids: &[Option<PlanId>],
    tag_names: &[Option<TagId>],
    hidden: &BTreeSet<String>,
) -> Vec<CardView> {
    let mut slots: Vec<(Iccid, u32, u32)> = shards
        .iter()
        .enumerate()
        .flat_map(|(s, shard)| {
            shard
                .live_slots()
                .map(move |slot| (shard.cards[slot as usize].iccid, s as u32, slot))
        })
        .collect();
    slots.sort_unstable_by_key(|&(iccid, ..)| iccid);
    slots
        .into_iter()
        .map(|(_, s, slot)| card_view(&shards[s as usize], slot, plan_ids, tag_names, hidden))
        .collect()
}
