//! Model-based property tests: random sequences of usage records and
//! commands applied to the reference model (`tests/model`), to the engine
//! with one shard and to the engine with three shards. After every input the
//! three must agree on every card's usage, visible state and reasons, every
//! pool's usage and state, and the outcome of the input; at the end, on the
//! per-card sequence of `card_state` events (and, between 1 and 3 shards, on
//! the full event set including ids).
//!
//! `PROPTEST_CASES` raises the case count (default 64); `MODEL_DEBUG=1`
//! prints both states when the rule firings differ.

mod model;

use std::collections::BTreeMap;

use flowcap_engine::{
    ActionEvent, CardState, CycleId, Engine, EngineConfig, Iccid, Output, PoolId, TrafficType,
};
use model::gen::*;
use model::{CommandOutcome, LateCrossing, Model, ModelEvent, RecordOutcome};
use proptest::prelude::*;

// ----- running and comparing ----------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Record(RecordOutcome),
    Command(CommandOutcome),
}

fn engine_outcome(out: &[Output]) -> Outcome {
    let mut found = None;
    for o in out {
        let this = match o {
            Output::Accounted(a) if a.counted => Outcome::Record(RecordOutcome::Counted),
            Output::Accounted(_) => Outcome::Record(RecordOutcome::NotCounted),
            Output::Duplicate { .. } => Outcome::Record(RecordOutcome::Duplicate),
            Output::Rejected(r) => Outcome::Record(RecordOutcome::Rejected(r.code.clone())),
            Output::Journal(j) => Outcome::Command(CommandOutcome {
                whole_error: j.result.error.is_some(),
                per_card: j.result.results.iter().map(|r| r.ok).collect(),
            }),
            Output::Action(_) | Output::PoolCycle(_) => continue,
        };
        assert!(found.is_none(), "two outcomes for one input: {out:?}");
        found = Some(this);
    }
    found.expect("an outcome for every input")
}

type Attributes = BTreeMap<String, String>;

/// Everything compared after each input.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Snapshot {
    cards: Vec<(Iccid, u64, CardState, Vec<String>, Attributes)>,
    pools: Vec<(String, u64, String, Vec<Iccid>)>,
}

fn reasons_vec(r: flowcap_engine::Reasons) -> Vec<String> {
    r.iter().map(|x| x.as_str().to_owned()).collect()
}

fn model_snapshot(m: &Model) -> Snapshot {
    Snapshot {
        cards: m
            .cards
            .iter()
            .map(|(i, c)| {
                let (state, reasons) = m.view(*i);
                (
                    *i,
                    c.usage,
                    state,
                    reasons_vec(reasons),
                    m.visible_attributes(*i),
                )
            })
            .collect(),
        pools: m
            .pools
            .keys()
            .map(|p| {
                (
                    p.clone(),
                    m.pool_usage(p),
                    m.pool_state(p).to_owned(),
                    m.members(p),
                )
            })
            .collect(),
    }
}

fn engine_snapshot(e: &Engine) -> Snapshot {
    Snapshot {
        cards: e
            .card_views()
            .into_iter()
            .map(|v| {
                (
                    v.iccid,
                    v.usage_bytes,
                    v.state,
                    reasons_vec(v.reasons),
                    v.attributes,
                )
            })
            .collect(),
        pools: POOLS
            .iter()
            .filter_map(|(id, ..)| e.pool_view(&PoolId::from(*id)))
            .map(|v| {
                let state = serde_json::to_value(v.state).unwrap();
                (
                    v.id.0.clone(),
                    v.usage_bytes,
                    state.as_str().unwrap().to_owned(),
                    v.members,
                )
            })
            .collect(),
    }
}

fn engine_snapshot_sorted(e: &Engine) -> Snapshot {
    let mut s = engine_snapshot(e);
    s.pools.sort();
    s
}

/// Days a backward pool is retained, in the engines and the model.
const RETENTION_DAYS: u32 = 2;

fn engine(shards: usize) -> Engine {
    Engine::new(EngineConfig {
        shards,
        // The model counts any reuse of an id as a duplicate, ever (the
        // generator reuses ids with other ends): the engine's exact mode.
        dedupe_verify_misses: true,
        // Short enough for runs to see retentions end.
        pool_retention_days: RETENTION_DAYS,
        ..EngineConfig::default()
    })
}

fn apply(e: &mut Engine, input: &Input, seq: u64, out: &mut Vec<Output>) {
    match input {
        Input::Usage(u) => e.process_usage(u, seq, out).unwrap(),
        Input::Command(c) => e.process_command(c.clone(), seq, out),
    }
}

fn late_crossings(events: &[ActionEvent]) -> Vec<LateCrossing> {
    let mut all: Vec<LateCrossing> = events
        .iter()
        .filter_map(|e| match e {
            ActionEvent::LateCrossing(l) => Some((l.target(), l.reasons, l.usage_bytes)),
            _ => None,
        })
        .collect();
    all.sort();
    all
}

fn card_events(events: &[ActionEvent]) -> BTreeMap<Iccid, Vec<ModelEvent>> {
    let mut by_card: BTreeMap<Iccid, Vec<ModelEvent>> = BTreeMap::new();
    for e in events {
        if let ActionEvent::CardState(c) = e {
            by_card.entry(c.iccid).or_default().push(ModelEvent {
                iccid: c.iccid,
                old: c.old,
                new: c.new,
                reasons: c.reasons,
            });
        }
    }
    by_card
}

/// Runs the inputs through the model and both engines, comparing as it goes.
fn check(inputs: &[Input]) -> Result<(), TestCaseError> {
    let defaults = EngineConfig::default();
    let mut model = Model::new(defaults.max_future_ms, defaults.clock_quorum);
    model.retention_ms = i64::from(RETENTION_DAYS) * 86_400_000;
    let mut one = engine(1);
    let mut three = engine(3);
    let mut events_one = Vec::new();
    let mut events_three = Vec::new();
    let mut totals_one = Vec::new();
    let mut totals_three = Vec::new();
    for (seq, input) in inputs.iter().enumerate() {
        let seq = seq as u64;
        let expected = match input {
            Input::Usage(u) => Outcome::Record(model.record(u)),
            Input::Command(c) => Outcome::Command(model.command(c)),
        };
        let want = model_snapshot(&model);
        for (name, e, events, totals) in [
            ("1 shard", &mut one, &mut events_one, &mut totals_one),
            ("3 shards", &mut three, &mut events_three, &mut totals_three),
        ] {
            let mut out = Vec::new();
            apply(e, input, seq, &mut out);
            let got = engine_outcome(&out);
            prop_assert_eq!(
                &got,
                &expected,
                "{}: outcome of input {} {:?}",
                name,
                seq,
                input
            );
            let mut fired: Vec<(String, String)> = out
                .iter()
                .filter_map(|o| match o {
                    Output::Action(ActionEvent::RuleFired(f)) => Some((f.rule.clone(), f.target())),
                    _ => None,
                })
                .collect();
            fired.sort();
            let mut want_fired = model.firings.clone();
            want_fired.sort();
            if std::env::var("MODEL_DEBUG").is_ok() && fired != want_fired {
                eprintln!(
                    "model {:#?}\nengine {:#?}",
                    model_snapshot(&model),
                    engine_snapshot_sorted(e)
                );
            }
            prop_assert_eq!(
                &fired,
                &want_fired,
                "{}: rule firings of input {} {:?}",
                name,
                seq,
                input
            );
            for o in out {
                match o {
                    Output::Action(a) => events.push(a),
                    Output::PoolCycle(t) => totals.push((
                        t.pool.0.clone(),
                        t.cycle.to_string(),
                        t.usage_bytes,
                        t.final_total,
                    )),
                    _ => {}
                }
            }
            let have = engine_snapshot_sorted(e);
            prop_assert_eq!(
                &have,
                &want,
                "{}: state after input {} {:?}",
                name,
                seq,
                input
            );
        }
    }
    let mut model_events: BTreeMap<Iccid, Vec<ModelEvent>> = BTreeMap::new();
    for e in &model.events {
        model_events.entry(e.iccid).or_default().push(e.clone());
    }
    prop_assert_eq!(
        &card_events(&events_one),
        &model_events,
        "card_state events, 1 shard"
    );
    let mut want_crossings = model.late_crossings.clone();
    want_crossings.sort();
    prop_assert_eq!(
        late_crossings(&events_one),
        want_crossings,
        "late crossings"
    );
    let mut want_totals: Vec<(String, String, u64, bool)> = model
        .pool_totals
        .iter()
        .map(|(p, c, u, f)| {
            let cycle = CycleId::new(c.div_euclid(12), (c.rem_euclid(12) + 1) as u32);
            (p.clone(), cycle.to_string(), *u, *f)
        })
        .collect();
    want_totals.sort();
    totals_one.sort();
    totals_three.sort();
    prop_assert_eq!(&totals_one, &want_totals, "pool totals, 1 shard");
    prop_assert_eq!(&totals_three, &want_totals, "pool totals, 3 shards");
    let mut a: Vec<String> = events_one
        .iter()
        .map(|e| serde_json::to_string(e).unwrap())
        .collect();
    let mut b: Vec<String> = events_three
        .iter()
        .map(|e| serde_json::to_string(e).unwrap())
        .collect();
    a.sort();
    b.sort();
    prop_assert_eq!(a, b, "full event sets, 1 vs 3 shards");
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 4000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_model(setup in setup(), steps in steps(50..300)) {
        let inputs = concretize(&setup, &steps);
        check(&inputs)?;
    }
}

// ----- regressions: shrunk counterexamples that revealed engine bugs ----------

fn plans_setup() -> Vec<Op> {
    (0..PLANS.len())
        .map(|p| Op::UpsertPlan {
            plan: p,
            allowance_mb: PLANS[p].2,
            general: PLANS[p].3 == TrafficType::General,
        })
        .collect()
}

/// A command that changes nothing but moves the clock to its `at`: the
/// tri plan upserted again as it is.
fn tick() -> Op {
    Op::UpsertPlan {
        plan: 4,
        allowance_mb: PLANS[4].2,
        general: PLANS[4].3 == TrafficType::General,
    }
}

fn at(dt_ms: i64, op: Op) -> Step {
    Step { dt_ms, op }
}

fn record(card: usize, bytes: u64) -> Op {
    Op::Record {
        card,
        bytes,
        time: RecordTime::Now,
        device: None,
    }
}

/// A backward pool without a carrier follows the calendar month, but a
/// `cucc` member's usage resets on the 27th: the pool's usage must drop by
/// the member's usage then (pool usage = sum of the members' current-cycle
/// usage), not stay until the 1st and then go to zero.
#[test]
fn carrierless_backward_pool_usage_follows_cucc_member_rollover() {
    let mut setup = plans_setup();
    setup.push(Op::CreatePool(2));
    for card in [3, 0] {
        setup.push(Op::UpsertCard {
            card,
            plan: 0,
            state: CardState::Active,
        });
    }
    setup.push(Op::AddMembers(2, vec![3, 0]));
    // Start is 2026-10-20; the cucc cycle ends on the 27th, cmcc on the 1st.
    // The operator's commands walk the clock in 20 h steps (one card's
    // records cannot move it for the other), each followed by a record of
    // the cmcc card, past the 27th, then past the 1st.
    let mut steps = vec![at(HOUR, record(3, 5_000_000))];
    for _ in 0..9 {
        steps.push(at(20 * HOUR, tick()));
        steps.push(at(0, record(0, 1_000_000)));
    }
    steps.push(at(HOUR, record(3, 2_000_000)));
    let inputs = concretize(&setup, &steps);
    check(&inputs).unwrap();
    let mut e = engine(1);
    let mut out = Vec::new();
    for (seq, input) in inputs.iter().enumerate() {
        apply(&mut e, input, seq as u64, &mut out);
    }
    let member = e.card_view(iccid(3)).unwrap();
    assert_eq!(member.cycle.to_string(), "2026-11");
    assert_eq!(member.usage_bytes, 2_000_000);
    let pool = e.pool_view(&PoolId::from(POOLS[2].0)).unwrap();
    let cmcc_usage = e.card_view(iccid(0)).unwrap().usage_bytes;
    assert_eq!(pool.usage_bytes, 2_000_000 + cmcc_usage);
    for _ in 0..6 {
        steps.push(at(20 * HOUR, tick()));
        steps.push(at(0, record(3, 1_000_000)));
    }
    steps.push(at(HOUR, Op::RemoveMembers(2, vec![3])));
    check(&concretize(&setup, &steps)).unwrap();
}

/// With several shards, a record that moves the clock across a cycle
/// boundary must roll over every shard at once, not only its own: cards in
/// other shards are resumed (and their usage reset) immediately, as with one
/// shard.
#[test]
fn rollover_reaches_every_shard_on_the_crossing_record() {
    let mut setup = plans_setup();
    let cmcc = [0, 1, 2, 7];
    for card in cmcc {
        setup.push(Op::UpsertCard {
            card,
            plan: 0,
            state: CardState::Active,
        });
    }
    let mut steps: Vec<Step> = cmcc
        .iter()
        .map(|&c| at(HOUR, record(c, 40_000_000)))
        .collect();
    // Walk the clock in 20 h steps (commands: one card's records cannot
    // move it for the others) until 2026-11-02 12:00, a new cmcc cycle,
    // card 0 reporting after each.
    for _ in 0..16 {
        steps.push(at(20 * HOUR, tick()));
        steps.push(at(0, record(0, 1)));
    }
    check(&concretize(&setup, &steps)).unwrap();
    let mut e = engine(3);
    let mut out = Vec::new();
    for (seq, input) in concretize(&setup, &steps).iter().enumerate() {
        apply(&mut e, input, seq as u64, &mut out);
    }
    let shards: std::collections::BTreeSet<u32> = cmcc
        .iter()
        .map(|&c| (iccid(c).stable_hash() % 3) as u32)
        .collect();
    assert!(shards.len() > 1, "the cards should span shards");
    for c in cmcc {
        let v = e.card_view(iccid(c)).unwrap();
        assert_eq!(v.cycle.to_string(), "2026-11", "{v:?}");
        assert_eq!(v.state, CardState::Active, "{v:?}");
        if c != 0 {
            assert_eq!(v.usage_bytes, 0, "{v:?}");
        }
    }
}
