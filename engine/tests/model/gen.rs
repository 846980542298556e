//! Random input sequences for the model-based properties: a fixed small
//! universe (5 plans, 8 cards of mixed carriers plus 2 never registered, 4
//! pools), abstract operations, and their concrete records and commands.

use std::collections::BTreeMap;

use flowcap_engine::command::{CardSpec, PlanSpec, PoolKind, PoolSpec};
use flowcap_engine::record::RecordId;
use flowcap_engine::{
    CardState, Carrier, Command, CommandKind, Iccid, Imei, PlanId, PoolId, Timestamp, TrafficType,
    Usage,
};
use proptest::prelude::*;

pub const HOUR: i64 = 3_600_000;
pub const DAY: i64 = 24 * HOUR;

// ----- fixed universe -------------------------------------------------------

/// (id, carrier, default allowance MB, default traffic).
pub const PLANS: [(&str, Carrier, u64, TrafficType); 5] = [
    ("cmcc-30m", Carrier::Cmcc, 30, TrafficType::Directed),
    ("cmcc-200m", Carrier::Cmcc, 200, TrafficType::General),
    ("cucc-50m", Carrier::Cucc, 50, TrafficType::Directed),
    ("ctcc-100m", Carrier::Ctcc, 100, TrafficType::General),
    ("tri-20m", Carrier::Tri, 20, TrafficType::General),
];

/// 8 known cards (mixed carriers) then 2 never-registered ones.
pub const CARDS: [(&str, Carrier); 10] = [
    ("89860000000000000001", Carrier::Cmcc),
    ("89860000000000000002", Carrier::Cmcc),
    ("89860000000000000003", Carrier::Cmcc),
    ("89860000000000000004", Carrier::Cucc),
    ("89860000000000000005", Carrier::Cucc),
    ("89860000000000000006", Carrier::Ctcc),
    ("89860000000000000007", Carrier::Tri),
    ("89860000000000000008", Carrier::Cmcc),
    ("89869999999999999998", Carrier::Cmcc),
    ("8986999999999999999X", Carrier::Cmcc),
];
pub const KNOWN_CARDS: usize = 8;

/// (id, kind, carrier, plan index).
pub const POOLS: [(&str, PoolKind, Option<Carrier>, Option<usize>); 4] = [
    ("fwd-cmcc", PoolKind::Forward, Some(Carrier::Cmcc), Some(0)),
    ("fwd-cucc", PoolKind::Forward, Some(Carrier::Cucc), Some(2)),
    ("bwd-any", PoolKind::Backward, None, None),
    ("bwd-cucc", PoolKind::Backward, Some(Carrier::Cucc), None),
];

/// Rules every generated run starts with (the model checks their firings):
/// card usage >= 20 MB, card remaining <= 5 MB (true at zero usage on a
/// 5 MB plan), pool usage >= 50 MB, any change to suspended.
pub const RULES: [&str; 4] = [
    r#"{"id": "m-used", "type": 2, "condition": {"used_mb_gte": 20}}"#,
    r#"{"id": "m-left", "type": 2, "condition": {"remaining_mb_lte": 5}}"#,
    r#"{"id": "m-pool", "type": 3, "condition": {"used_mb_gte": 50}}"#,
    r#"{"id": "m-cut", "type": 4, "condition": {"to": ["suspended"]}}"#,
];

/// Custom attribute names the generator uses (the last never declared).
pub const ATTRIBUTES: [&str; 4] = ["customer", "site", "batch", "colour"];

/// Name lists `set_attribute_names` declares (the last has too many).
pub const ATTRIBUTE_NAME_SETS: [&[&str]; 4] = [
    &["customer", "site", "batch"],
    &["site", "customer"],
    &[],
    &["a", "b", "c", "d", "e", "f", "g"],
];

/// The devices records come from.
pub const DEVICES: [&str; 3] = ["864000000000001", "864000000000002", "864000000000003"];

pub fn iccid(i: usize) -> Iccid {
    Iccid::parse(CARDS[i].0).unwrap()
}

pub fn plans_of(carrier: Carrier) -> Vec<usize> {
    (0..PLANS.len())
        .filter(|&p| PLANS[p].1 == carrier)
        .collect()
}

// ----- abstract operations ----------------------------------------------------

#[derive(Debug, Clone)]
pub enum RecordTime {
    Now,
    /// Up to this many ms before the generator time.
    Late(i64),
    /// Up to this many ms before the start of the card's current cycle
    /// (its closed cycle: within the lateness right after a boundary).
    Closed(i64),
    /// Slightly ahead (accepted).
    Ahead(i64),
    /// Far ahead (rejected).
    Future,
}

#[derive(Debug, Clone)]
pub enum Op {
    Record {
        card: usize,
        bytes: u64,
        time: RecordTime,
        /// Index into [`DEVICES`].
        device: Option<usize>,
    },
    /// Resend an earlier record (index modulo the records so far).
    Resend(usize),
    /// A new record reusing an earlier record's id on another card.
    ReuseId {
        earlier: usize,
        card: usize,
        bytes: u64,
    },
    UpsertPlan {
        plan: usize,
        allowance_mb: u64,
        general: bool,
    },
    UpsertCard {
        card: usize,
        plan: usize,
        state: CardState,
    },
    CreatePool(usize),
    AddMembers(usize, Vec<usize>),
    RemoveMembers(usize, Vec<usize>),
    SetThreshold(Vec<usize>, i64),
    ClearThreshold(Vec<usize>),
    AddOnCard(usize, u64),
    AddOnPool(usize, u64),
    Suspend(Vec<usize>),
    Resume(Vec<usize>),
    Deregister(Vec<usize>),
    Activate(Vec<usize>),
    /// Rebind a card to a device of [`DEVICES`], or to its next one.
    Rebind(usize, Option<usize>),
    Freeze(usize),
    Unfreeze(usize),
    Retain(usize),
    Reenable(usize),
    UpsertRule(usize),
    /// Declare the names of [`ATTRIBUTE_NAME_SETS`] at this index.
    SetAttributeNames(usize),
    /// Set (or, `None`, remove) the [`ATTRIBUTES`] name at the index.
    SetAttributes(Vec<usize>, usize, Option<usize>),
    EnableAttribute(usize),
    DisableAttribute(usize),
}

#[derive(Debug, Clone)]
pub struct Step {
    pub dt_ms: i64,
    pub op: Op,
}

/// A card index, mostly a known card.
pub fn any_card() -> impl Strategy<Value = usize> + Clone {
    prop_oneof![12 => 0..KNOWN_CARDS, 1 => KNOWN_CARDS..CARDS.len()]
}

/// One to three distinct cards.
pub fn card_set() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::btree_set(any_card(), 1..=3)
        .prop_map(|s| s.into_iter().collect::<Vec<_>>())
        .prop_shuffle()
}

pub fn bytes() -> impl Strategy<Value = u64> {
    prop_oneof![
        10 => 0u64..2_000_000,
        6 => 2_000_000u64..40_000_000,
        2 => 40_000_000u64..150_000_000,
    ]
}

pub fn state() -> impl Strategy<Value = CardState> {
    prop_oneof![
        4 => Just(CardState::Active),
        2 => Just(CardState::Activatable),
        1 => Just(CardState::Suspended),
        1 => Just(CardState::Inactive),
    ]
}

/// No device (most records), or one of three.
pub fn device() -> impl Strategy<Value = Option<usize>> {
    prop_oneof![3 => Just(None), 2 => (0..DEVICES.len()).prop_map(Some)]
}

/// A step's `dt_ms` that moves time to just after the next cycle start.
pub const NEXT_CYCLE: i64 = -1;

pub fn dt() -> impl Strategy<Value = i64> {
    prop_oneof![
        80 => 0..2 * HOUR,
        17 => 0..DAY,
        3 => 3 * DAY..35 * DAY,
        3 => Just(NEXT_CYCLE),
    ]
}

/// The first cycle start (of any carrier) after `t`, plus a few minutes.
fn after_next_cycle_start(t: Timestamp) -> Timestamp {
    [Carrier::Cmcc, Carrier::Cucc]
        .into_iter()
        .map(|c| super::cycle_start(c, super::cycle_of(c, t) + 1))
        .min()
        .unwrap()
        .plus_millis(10 * 60_000)
}

pub fn op() -> impl Strategy<Value = Op> {
    let card = any_card();
    let known = 0..KNOWN_CARDS;
    let pool = 0..POOLS.len();
    let time = prop_oneof![
        12 => Just(RecordTime::Now),
        3 => (0..5 * DAY).prop_map(RecordTime::Late),
        3 => (1..3 * HOUR).prop_map(RecordTime::Closed),
        1 => (0..12 * HOUR).prop_map(RecordTime::Ahead),
        1 => Just(RecordTime::Future),
    ];
    prop_oneof![
        40 => (card.clone(), bytes(), time, device()).prop_map(|(card, bytes, time, device)| Op::Record { card, bytes, time, device }),
        4 => any::<usize>().prop_map(Op::Resend),
        1 => (any::<usize>(), card, bytes()).prop_map(|(earlier, card, bytes)| Op::ReuseId { earlier, card, bytes }),
        1 => (0..PLANS.len(), prop::sample::select(vec![5u64, 20, 30, 50, 100, 200]), any::<bool>())
            .prop_map(|(plan, allowance_mb, general)| Op::UpsertPlan { plan, allowance_mb, general }),
        2 => (known, 0..2usize, state()).prop_map(|(card, plan, state)| Op::UpsertCard { card, plan, state }),
        1 => pool.clone().prop_map(Op::CreatePool),
        5 => (pool.clone(), card_set()).prop_map(|(p, c)| Op::AddMembers(p, c)),
        2 => (pool.clone(), card_set()).prop_map(|(p, c)| Op::RemoveMembers(p, c)),
        4 => (card_set(), prop::sample::select(vec![-2i64, -1, 0, 5, 20, 60, 150])).prop_map(|(c, mb)| Op::SetThreshold(c, mb)),
        1 => card_set().prop_map(Op::ClearThreshold),
        3 => (any_card(), prop::sample::select(vec![0u64, 10, 50, 200])).prop_map(|(c, mb)| Op::AddOnCard(c, mb)),
        2 => (pool.clone(), prop::sample::select(vec![0u64, 10, 50, 200])).prop_map(|(p, mb)| Op::AddOnPool(p, mb)),
        2 => card_set().prop_map(Op::Suspend),
        2 => card_set().prop_map(Op::Resume),
        1 => any_card().prop_map(|c| Op::Deregister(vec![c])),
        2 => card_set().prop_map(Op::Activate),
        2 => (any_card(), device()).prop_map(|(c, d)| Op::Rebind(c, d)),
        2 => pool.clone().prop_map(Op::Freeze),
        1 => pool.clone().prop_map(Op::Unfreeze),
        1 => pool.clone().prop_map(Op::Retain),
        1 => pool.prop_map(Op::Reenable),
        1 => (0..ATTRIBUTE_NAME_SETS.len()).prop_map(Op::SetAttributeNames),
        2 => (card_set(), 0..ATTRIBUTES.len(), prop::option::of(0..3usize))
            .prop_map(|(c, a, v)| Op::SetAttributes(c, a, v)),
        1 => (0..ATTRIBUTES.len()).prop_map(Op::EnableAttribute),
        1 => (0..ATTRIBUTES.len()).prop_map(Op::DisableAttribute),
    ]
}

pub fn steps(len: std::ops::Range<usize>) -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec((dt(), op()).prop_map(|(dt_ms, op)| Step { dt_ms, op }), len)
}

/// Setup: every plan, most cards, one or two pools with some members.
pub fn setup() -> impl Strategy<Value = Vec<Op>> {
    (
        prop::collection::vec((any::<bool>(), 0..2usize, state(), 0..10u8), KNOWN_CARDS),
        proptest::sample::subsequence((0..POOLS.len()).collect::<Vec<_>>(), 1..=2),
        prop::collection::vec(card_set(), 0..3),
    )
        .prop_map(|(cards, pools, members)| {
            let mut ops: Vec<Op> = (0..PLANS.len())
                .map(|p| Op::UpsertPlan {
                    plan: p,
                    allowance_mb: PLANS[p].2,
                    general: PLANS[p].3 == TrafficType::General,
                })
                .collect();
            for (i, (_, plan, state, skip)) in cards.into_iter().enumerate() {
                if skip > 0 {
                    ops.push(Op::UpsertCard {
                        card: i,
                        plan,
                        state,
                    });
                }
            }
            for (k, members) in members.into_iter().enumerate() {
                ops.push(Op::AddMembers(pools[k % pools.len()], members));
            }
            let first_card = PLANS.len();
            for (k, &p) in pools.iter().enumerate() {
                ops.insert(first_card + k, Op::CreatePool(p));
            }
            for k in (0..RULES.len()).rev() {
                ops.insert(0, Op::UpsertRule(k));
            }
            ops
        })
}

// ----- concrete inputs -----------------------------------------------------------

#[derive(Debug, Clone)]
pub enum Input {
    Usage(Usage),
    Command(Command),
}

pub fn start_time() -> Timestamp {
    Timestamp::parse_rfc3339("2026-10-20T00:00:00+08:00").unwrap()
}

pub fn far_future() -> Timestamp {
    Timestamp::parse_rfc3339("2030-01-01T00:00:00+08:00").unwrap()
}

/// Turns abstract operations into concrete inputs with a running time.
pub fn concretize(setup: &[Op], steps: &[Step]) -> Vec<Input> {
    let mut t = start_time();
    let mut records: Vec<Usage> = Vec::new();
    let mut inputs = Vec::new();
    let mut next_cmd = 0u64;
    let all = setup
        .iter()
        .map(|op| (0, op))
        .chain(steps.iter().map(|s| (s.dt_ms, &s.op)));
    for (dt, op) in all {
        // Stay within 300 days: cards activated by usage get a 12-month
        // term, and the model leaves plan expiry out.
        let next = if dt == NEXT_CYCLE {
            after_next_cycle_start(t)
        } else {
            t.plus_millis(dt)
        };
        if next < start_time().plus_millis(300 * DAY) {
            t = next;
        }
        let usage =
            |card: usize, id: String, end: Timestamp, bytes: u64, device: Option<usize>| Usage {
                record_id: RecordId::new(&id).unwrap(),
                iccid: iccid(card),
                start: None,
                end,
                bytes_up: bytes / 3,
                bytes_down: bytes - bytes / 3,
                carrier: None,
                imei: device.and_then(|d| Imei::parse(DEVICES[d].as_bytes())),
            };
        let record = match op {
            Op::Record {
                card,
                bytes,
                time,
                device,
            } => {
                let end = match time {
                    RecordTime::Now => t,
                    RecordTime::Late(ms) => t.plus_millis(-ms),
                    RecordTime::Closed(ms) => {
                        let carrier = CARDS[*card].1;
                        super::cycle_start(carrier, super::cycle_of(carrier, t)).plus_millis(-ms)
                    }
                    RecordTime::Ahead(ms) => t.plus_millis(*ms),
                    RecordTime::Future => t.plus_millis(2 * DAY),
                };
                Some(usage(
                    *card,
                    format!("r{}", records.len()),
                    end,
                    *bytes,
                    *device,
                ))
            }
            Op::Resend(k) if !records.is_empty() => Some(records[k % records.len()]),
            Op::Resend(_) => None,
            Op::ReuseId {
                earlier,
                card,
                bytes,
            } if !records.is_empty() => {
                let id = records[earlier % records.len()].record_id;
                Some(usage(*card, id.as_str().to_owned(), t, *bytes, None))
            }
            Op::ReuseId { .. } => None,
            _ => None,
        };
        if let Some(u) = record {
            records.push(u);
            inputs.push(Input::Usage(u));
            continue;
        }
        let iccids = |cards: &[usize]| cards.iter().map(|&c| iccid(c)).collect::<Vec<_>>();
        let pool_id = |p: usize| PoolId::from(POOLS[p].0);
        let kind = match op {
            Op::Record { .. } | Op::Resend(_) | Op::ReuseId { .. } => continue,
            Op::UpsertPlan {
                plan,
                allowance_mb,
                general,
            } => CommandKind::UpsertPlan {
                plan: PlanSpec {
                    id: PlanId::from(PLANS[*plan].0),
                    name: String::new(),
                    carrier: PLANS[*plan].1,
                    allowance_mb: *allowance_mb,
                    traffic: if *general {
                        TrafficType::General
                    } else {
                        TrafficType::Directed
                    },
                    term_months: 12,
                },
            },
            Op::UpsertCard { card, plan, state } => {
                let carrier = CARDS[*card].1;
                let plans = plans_of(carrier);
                let plan = plans[plan % plans.len()];
                let active = matches!(state, CardState::Active | CardState::Suspended);
                CommandKind::UpsertCard {
                    card: CardSpec {
                        iccid: iccid(*card),
                        carrier,
                        plan: PlanId::from(PLANS[plan].0),
                        state: Some(*state),
                        activated_at: active
                            .then(|| Timestamp::parse_rfc3339("2026-01-01T00:00:00Z").unwrap()),
                        expires_at: active.then(far_future),
                        test_ends_at: None,
                        test_allowance_mb: None,
                        silent_ends_at: Some(far_future()),
                        msisdn: None,
                        imsi: None,
                        imei: None,
                        tags: Vec::new(),
                        attributes: BTreeMap::new(),
                        clear: Vec::new(),
                    },
                }
            }
            Op::CreatePool(p) => {
                let (id, kind, carrier, plan) = POOLS[*p];
                CommandKind::CreatePool {
                    pool: PoolSpec {
                        id: PoolId::from(id),
                        kind,
                        name: String::new(),
                        carrier,
                        plan: plan.map(|i| PlanId::from(PLANS[i].0)),
                    },
                }
            }
            Op::AddMembers(p, cards) => CommandKind::AddPoolMembers {
                pool: pool_id(*p),
                iccids: iccids(cards),
            },
            Op::RemoveMembers(p, cards) => CommandKind::RemovePoolMembers {
                pool: pool_id(*p),
                iccids: iccids(cards),
            },
            Op::SetThreshold(cards, mb) => CommandKind::SetThreshold {
                iccids: iccids(cards),
                mb: *mb,
            },
            Op::ClearThreshold(cards) => CommandKind::ClearThreshold {
                iccids: iccids(cards),
            },
            Op::AddOnCard(c, mb) => CommandKind::AddOn {
                iccid: Some(iccid(*c)),
                pool: None,
                mb: *mb,
            },
            Op::AddOnPool(p, mb) => CommandKind::AddOn {
                iccid: None,
                pool: Some(pool_id(*p)),
                mb: *mb,
            },
            Op::Suspend(cards) => CommandKind::Suspend {
                iccids: iccids(cards),
            },
            Op::Resume(cards) => CommandKind::Resume {
                iccids: iccids(cards),
            },
            Op::Deregister(cards) => CommandKind::Deregister {
                iccids: iccids(cards),
            },
            Op::Activate(cards) => CommandKind::Activate {
                iccids: iccids(cards),
            },
            Op::Rebind(c, d) => CommandKind::Rebind {
                iccid: iccid(*c),
                imei: d.map(|d| DEVICES[d].to_owned()),
            },
            Op::Freeze(p) => CommandKind::FreezePool { pool: pool_id(*p) },
            Op::Unfreeze(p) => CommandKind::UnfreezePool { pool: pool_id(*p) },
            Op::Retain(p) => CommandKind::RetainPool { pool: pool_id(*p) },
            Op::Reenable(p) => CommandKind::ReenablePool { pool: pool_id(*p) },
            Op::SetAttributeNames(k) => CommandKind::SetAttributeNames {
                names: ATTRIBUTE_NAME_SETS[*k]
                    .iter()
                    .map(|n| (*n).to_owned())
                    .collect(),
            },
            Op::SetAttributes(cards, a, v) => CommandKind::SetAttributes {
                iccids: iccids(cards),
                attributes: [(ATTRIBUTES[*a].to_owned(), v.map(|v| format!("v{v}")))]
                    .into_iter()
                    .collect(),
            },
            Op::EnableAttribute(a) => CommandKind::EnableAttribute {
                name: ATTRIBUTES[*a].to_owned(),
            },
            Op::DisableAttribute(a) => CommandKind::DisableAttribute {
                name: ATTRIBUTES[*a].to_owned(),
            },
            Op::UpsertRule(k) => CommandKind::UpsertRule {
                rule: serde_json::from_str(RULES[*k]).expect("valid rule"),
            },
        };
        next_cmd += 1;
        inputs.push(Input::Command(Command {
            id: format!("c{next_cmd}").as_str().into(),
            at: t,
            operator: None,
            kind,
        }));
    }
    inputs
}
