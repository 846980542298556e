//! One shard: the single owner of a subset of cards and of every pool whose
//! members it holds.
//!
//! A shard is plain single-threaded state. The router hands it records in
//! input order together with the event clock at that point, and the engine
//! applies commands to it between records; it never takes a lock and never
//! looks at another shard. All members of a pool live in the pool's shard,
//! so a pool's crossing is decided on the one record that crosses, before
//! any later record of any member is accounted (SPEC section 9).
//!
//! State changes are collected per cause: the first change to a card or pool
//! remembers its visible state before, and [`Shard::finish`] emits one event
//! per subject whose visible state differs after. One event per subject and
//! cause is what makes event ids (a hash of subject and cause) unique.
//!
//! The files: this one holds the state and the lookups; [`clock`] moves the
//! event clock (cycle rollovers, and deadlines through [`deadlines`]);
//! [`closed`] keeps a closed cycle's figures through the allowed lateness;
//! [`usage`] accounts records; [`reasons`] derives a card's and a pool's
//! cut-off reasons from their usage and limits; [`events`] turns what
//! changed under one cause into events; [`cards`] and [`pools`] add,
//! move and group cards; [`arrears`] takes a backward pool through
//! freeze, retention, abandonment and re-enable; [`device`] binds cards
//! to devices; [`rules`] evaluates automation rules.

mod arrears;
mod cards;
mod clock;
mod closed;
mod deadlines;
mod device;
mod events;
mod pools;
mod reasons;
pub(crate) mod rules;
mod usage;

pub(crate) use cards::slots_with_tag;
pub(crate) use closed::ClosedCard;
use closed::{ClosedPool, Closing};
pub(crate) use device::{Device, MAX_REBINDS_PER_MONTH};
pub(crate) use pools::member_slots;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use hashbrown::HashSet;
use serde::{Deserialize, Serialize};

use crate::command::PoolKind;
use crate::config::EngineConfig;
use crate::cycle::CycleId;
use crate::domain::{CardState, Carrier, Reasons, TrafficType, MB};
use crate::event::{CauseKind, DeadlineKind, PoolState};
use crate::ids::{Iccid, PoolId};
use crate::record::Usage;
use crate::rule::Mark;
use crate::time::Timestamp;

use rules::ShardRule;

/// Marks "no pool" in [`Card::pool`].
pub(crate) const NO_POOL: u32 = u32::MAX;

/// A plan as shards need it (replicated to every shard).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PlanInfo {
    /// Id and display name (rule firings name the plan).
    pub(crate) id: crate::ids::PlanId,
    pub(crate) name: String,
    pub(crate) allowance_bytes: u64,
    pub(crate) traffic: TrafficType,
    pub(crate) term_months: u32,
}

/// Per-card accounting state. Kept small: it is multiplied by millions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Card {
    pub(crate) iccid: Iccid,
    /// Bytes counted in the current cycle.
    pub(crate) usage: u64,
    pub(crate) activated_at: Timestamp,
    /// `Timestamp::MAX` when the card has no expiry.
    pub(crate) expires_at: Timestamp,
    pub(crate) plan: u16,
    pub(crate) carrier: Carrier,
    /// Life-cycle state; never `Suspended` (that is derived from reasons).
    pub(crate) lifecycle: CardState,
    pub(crate) reasons: Reasons,
    /// Pool index in this shard, or [`NO_POOL`].
    pub(crate) pool: u32,
    /// Interned tag set index (0 = no tags).
    pub(crate) tagset: u32,
    pub(crate) threshold_mb: i32,
    /// Add-on packs bought for the current cycle, in MB.
    pub(crate) addon_mb: u32,
    /// The slot was vacated (card moved to another shard).
    pub(crate) vacant: bool,
    /// The SIM is in another device than its bound one and has no network
    /// (ctcc, tri: `device`).
    pub(crate) separated: bool,
}

/// A card's recent past, beside it (parallel to `cards`): when its newest
/// record ended and its last visible change, so that "why is this card
/// cut?" is answered from live state. Fixed size (40 bytes): the change's
/// details are in its `card_state` event, named by id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Trail {
    /// The latest `end` of the card's accounted records (`MIN`: none).
    pub(crate) last_record: Timestamp,
    /// Event time of the last change's cause (`MIN`: none yet).
    pub(crate) changed_at: Timestamp,
    /// That change's event id, as two words (keeps the record 8-aligned).
    pub(crate) change_event: [u64; 2],
    /// The visible state before it.
    pub(crate) changed_from: CardState,
    /// What caused it.
    pub(crate) cause: CauseKind,
}

impl Trail {
    pub(crate) const NONE: Trail = Trail {
        last_record: Timestamp::MIN,
        changed_at: Timestamp::MIN,
        change_event: [0; 2],
        changed_from: CardState::Inactive,
        cause: CauseKind::Command,
    };
}

/// Rarely present card attributes, kept out of [`Card`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CardExtra {
    pub(crate) msisdn: Option<String>,
    pub(crate) imsi: Option<String>,
    pub(crate) imei: Option<String>,
    pub(crate) attributes: BTreeMap<String, String>,
    pub(crate) test_ends_at: Option<Timestamp>,
    pub(crate) test_allowance_mb: Option<u64>,
    pub(crate) test_used: u64,
    pub(crate) silent_ends_at: Option<Timestamp>,
    /// Records of a later cycle than the shard's current one, with their
    /// sequence numbers: the card got there before the fleet's clock did
    /// (see [`Shard::account`]). Counted when the clock reaches their cycle.
    pub(crate) ahead: Vec<(u64, Usage)>,
    /// Device moves and their monthly counts (`device`).
    pub(crate) device: Option<Device>,
}

impl CardExtra {
    fn is_empty(&self) -> bool {
        *self == CardExtra::default()
    }
}

/// A pool, owned by the shard holding all of its members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Pool {
    pub(crate) id: PoolId,
    pub(crate) name: String,
    pub(crate) kind: PoolKind,
    /// Forward pools: the members' carrier. Backward pools: the carrier
    /// whose cycle the pool follows (calendar month when none).
    pub(crate) carrier: Option<Carrier>,
    /// Forward pools: the members' plan.
    pub(crate) plan: Option<u16>,
    /// Members' slots. Iteration order is irrelevant: pool-wide changes
    /// touch every member and events are emitted sorted by ICCID.
    pub(crate) members: std::collections::HashSet<u32>,
    /// Sum of the members' current-cycle usage.
    pub(crate) usage: u64,
    /// Sum of the plan allowances of activated members.
    pub(crate) member_allowance: u64,
    /// Pool add-on packs for the current cycle, in MB.
    pub(crate) addon_mb: u64,
    pub(crate) exhausted: bool,
    pub(crate) frozen: bool,
    /// A backward-pool suspend rule fired this cycle.
    pub(crate) cut: bool,
    /// Lowest "used >= N" threshold among enabled backward suspend rules.
    pub(crate) suspend_at: Option<u64>,
    /// No longer live: a forward pool abandoned when its last member was
    /// deregistered, a backward pool whose retention ended (SPEC 2.1).
    /// Rollovers, rules and plans pass it by.
    pub(crate) removed: bool,
    /// Backward pools: retained (frozen, arrears unsettled) until then,
    /// when it is abandoned ([`arrears`]).
    pub(crate) retained_until: Option<Timestamp>,
    /// Backward pools: when the retention ended; a re-enable is accepted
    /// within one month of it.
    pub(crate) abandoned_at: Option<Timestamp>,
}

impl Pool {
    pub(crate) fn allowance_bytes(&self) -> u64 {
        self.member_allowance
            .saturating_add(self.addon_mb.saturating_mul(MB))
    }

    pub(crate) fn cycle_carrier(&self) -> Carrier {
        self.carrier.unwrap_or(Carrier::Cmcc)
    }

    fn visible(&self) -> PoolState {
        if self.removed {
            return PoolState::Abandoned;
        }
        match self.kind {
            PoolKind::Forward if self.exhausted => PoolState::Exhausted,
            PoolKind::Forward => PoolState::Available,
            PoolKind::Backward if self.frozen && self.retained_until.is_some() => {
                PoolState::Retained
            }
            PoolKind::Backward if self.frozen => PoolState::Frozen,
            PoolKind::Backward if self.cut => PoolState::Suspended,
            PoolKind::Backward => PoolState::Available,
        }
    }
}

/// What a card looks like from outside: state and (if suspended) reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Visible {
    state: CardState,
    reasons: Reasons,
    separated: bool,
}

/// A card taken out of one shard to move into another.
#[derive(Debug, Clone)]
pub(crate) struct MovedCard {
    pub(crate) card: Card,
    pub(crate) extra: Option<CardExtra>,
    pub(crate) tags: Vec<u32>,
    /// Fired state of rules for the card (rule key, mark).
    pub(crate) marks: Vec<(u32, Mark)>,
    /// Its closed cycle's figures, within the lateness.
    pub(crate) closed: Option<ClosedCard>,
    pub(crate) trail: Trail,
}

/// One shard's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Shard {
    pub(crate) config: EngineConfig,
    pub(crate) plans: Vec<Option<PlanInfo>>,
    pub(crate) cards: Vec<Card>,
    pub(crate) extras: BTreeMap<u32, CardExtra>,
    /// MSISDN, IMSI and IMEI of each card (parallel to `cards`), packed as
    /// digits (see [`pack_digits`]); 0 when absent or kept as text in
    /// `extras` (non-digit or over 17 digits). Most cards have all three:
    /// 24 bytes here instead of ~390 for three strings in a map entry.
    pub(crate) idents: Vec<[u64; 3]>,
    /// Each card's [`Trail`] (parallel to `cards`, dense up to the highest
    /// card that has one).
    pub(crate) trails: Vec<Trail>,
    pub(crate) pools: Vec<Pool>,
    /// Interned tag sets; index 0 is the empty set.
    pub(crate) tagsets: Vec<Vec<u32>>,
    #[serde(skip)]
    tagset_index: HashMap<Vec<u32>, u32>,
    /// Deadlines: (time, slot, kind), one 16-byte entry each; for
    /// `RetentionEnd` the slot is a pool index. Entries may be stale (a
    /// renewed card keeps its old entry); checked when due.
    pub(crate) deadlines: BTreeSet<(i64, u32, DeadlineKind)>,
    /// Event clock as last seen.
    pub(crate) clock: Timestamp,
    /// Current cycle per carrier (`None` before the first clock).
    pub(crate) cycles: Option<[CycleId; 4]>,
    /// Per carrier, the cycle that closed less than the allowed lateness
    /// ago (`closed`).
    pub(crate) closing: [Option<Closing>; 4],
    /// Closed-cycle figures of the cards that have any, by slot.
    pub(crate) closed_cards: BTreeMap<u32, ClosedCard>,
    /// Closed-cycle figures of the pools, by index.
    pub(crate) closed_pools: BTreeMap<u32, ClosedPool>,
    /// Records of the cycle their input lane has closed but this shard
    /// has not yet (seq, slot, record): counted toward the closed cycle
    /// right after the rollover (see [`Shard::account`]).
    pub(crate) behind: Vec<(u64, u32, Usage)>,
    #[serde(skip)]
    pub(crate) pending: Pending,
    /// Cached earliest end of the current cycles (derived from `cycles`).
    #[serde(skip)]
    next_boundary: Option<Timestamp>,
    /// Enabled automation rules, resolved to this shard (rebuilt from the
    /// registry: [`Shard::set_rules`]).
    #[serde(skip)]
    pub(crate) rules: Vec<ShardRule>,
    /// Whether a type 1 rule is enabled (day starts are then evaluated).
    #[serde(skip)]
    pub(crate) has_day_rules: bool,
    /// Fired state per (card slot, rule key).
    pub(crate) card_marks: BTreeMap<(u32, u32), Mark>,
    /// Fired state per (pool index, rule key).
    pub(crate) pool_marks: BTreeMap<(u32, u32), Mark>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Pending {
    cards: Vec<(u32, Visible)>,
    card_set: HashSet<u32>,
    pools: Vec<(u32, PoolState)>,
    /// Rules to evaluate on every target at the end of the cause.
    pub(crate) scan_rules: Vec<u32>,
    /// Carriers rolled over under the cause.
    pub(crate) rollovers: Vec<Carrier>,
    /// Device moves seen under the cause, for their cards' events.
    pub(crate) devices: Vec<(u32, crate::event::DeviceChange)>,
}

impl Shard {
    pub(crate) fn new(config: EngineConfig) -> Shard {
        let mut shard = Shard {
            config,
            plans: Vec::new(),
            cards: Vec::new(),
            extras: BTreeMap::new(),
            idents: Vec::new(),
            trails: Vec::new(),
            pools: Vec::new(),
            tagsets: vec![Vec::new()],
            tagset_index: HashMap::new(),
            deadlines: BTreeSet::new(),
            clock: Timestamp::MIN,
            cycles: None,
            closing: [None; 4],
            closed_cards: BTreeMap::new(),
            closed_pools: BTreeMap::new(),
            behind: Vec::new(),
            pending: Pending::default(),
            next_boundary: None,
            rules: Vec::new(),
            has_day_rules: false,
            card_marks: BTreeMap::new(),
            pool_marks: BTreeMap::new(),
        };
        shard.rebuild_indexes();
        shard
    }

    /// Rebuilds what snapshots leave out.
    pub(crate) fn rebuild_indexes(&mut self) {
        self.tagset_index = self
            .tagsets
            .iter()
            .enumerate()
            .map(|(i, set)| (set.clone(), i as u32))
            .collect();
    }

    fn plan(&self, slot: u32) -> Option<&PlanInfo> {
        let card = &self.cards[slot as usize];
        self.plans
            .get(usize::from(card.plan))
            .and_then(Option::as_ref)
    }

    /// Live (non-vacant) card slots.
    pub(crate) fn live_slots(&self) -> impl Iterator<Item = u32> + '_ {
        self.cards
            .iter()
            .enumerate()
            .filter(|(_, c)| !c.vacant)
            .map(|(i, _)| i as u32)
    }

    /// The visible state of a card (for queries).
    pub(crate) fn visible_state(&self, slot: u32) -> (CardState, Reasons) {
        let v = self.visible(slot);
        (
            v.state,
            if v.state == CardState::Suspended {
                v.reasons
            } else {
                Reasons::EMPTY
            },
        )
    }

    pub(crate) fn pool_state(&self, p: u32) -> PoolState {
        self.pools[p as usize].visible()
    }

    /// Approximate heap bytes of the accounting state (cards, pools,
    /// extras, deadlines), for the memory benchmark.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.cards.capacity() * std::mem::size_of::<Card>()
            + self.idents.capacity() * 24
            + self.extras.len() * (std::mem::size_of::<CardExtra>() + 48)
            + self
                .pools
                .iter()
                .map(|p| p.members.capacity() * 5)
                .sum::<usize>()
            + self.deadlines.len() * 24
            + self.closed_cards.len() * (std::mem::size_of::<ClosedCard>() + 16)
    }
}
/// `t` plus `months` calendar months at a UTC offset (day clamped to the
/// end of the target month).
pub(crate) fn add_months(t: Timestamp, months: u32, offset_secs: i32) -> Timestamp {
    use crate::time::{days_in_month, MS_PER_DAY};
    let local = t.0 + i64::from(offset_secs) * 1000;
    let ms_of_day = local.rem_euclid(MS_PER_DAY);
    let (y, m, d) = t.civil_date(offset_secs);
    let total = y * 12 + i64::from(m) - 1 + i64::from(months);
    let (ny, nm) = (total.div_euclid(12), (total.rem_euclid(12) + 1) as u32);
    let nd = d.min(days_in_month(ny, nm));
    Timestamp::from_civil(ny, nm, nd, offset_secs).plus_millis(ms_of_day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_months_clamps_to_month_end() {
        let t = Timestamp::parse_rfc3339("2026-01-31T10:00:00+08:00").unwrap();
        assert_eq!(
            add_months(t, 1, 8 * 3600),
            Timestamp::parse_rfc3339("2026-02-28T10:00:00+08:00").unwrap()
        );
        assert_eq!(
            add_months(t, 12, 8 * 3600),
            Timestamp::parse_rfc3339("2027-01-31T10:00:00+08:00").unwrap()
        );
    }
}

#[cfg(test)]
mod size_tests {
    /// The per-card record is multiplied by millions: keep it from growing
    /// unnoticed (ARCHITECTURE.md quotes its size).
    #[test]
    fn card_record_stays_small() {
        assert_eq!(std::mem::size_of::<super::Card>(), 64);
    }
}
