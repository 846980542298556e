//! One test per rule of SPEC sections 2, 3, 4, 5 and 9, against the
//! accounting engine. Every scenario runs on one shard and on three (see
//! `common::scenario`), and both must agree.

mod common;

use common::*;
use flowcap_engine::command::{parse_command, ErrorCode};
use flowcap_engine::cycle::CycleId;
use flowcap_engine::event::{Cause, DeadlineKind, LateCrossingEvent, PoolCycleTotal};
use flowcap_engine::{ActionEvent, CardState, Lane, Output};
use serde_json::json;

fn active_suspended(reasons: &[&str]) -> (String, Vec<String>) {
    (
        "suspended".to_owned(),
        reasons.iter().map(|r| (*r).to_owned()).collect(),
    )
}

fn active_state() -> (String, Vec<String>) {
    ("active".to_owned(), Vec::new())
}

fn st(a: &str, b: &str) -> (String, String) {
    (a.to_owned(), b.to_owned())
}

// ===== section 2: over_quota ==================================================

#[test]
fn over_quota_is_set_by_the_crossing_record_with_usage_limit_and_overshoot() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        let out = s.rec(1, "r1", &nov(10, 1, 0), mb(20));
        assert!(card_events(&out).is_empty());
        // Exactly at the allowance is not over it.
        let out = s.rec(1, "r2", &nov(10, 2, 0), mb(10));
        assert!(card_events(&out).is_empty(), "{out:#?}");
        assert_eq!(s.state(1), active_state());
        let out = s.rec(1, "r3", &nov(10, 3, 0), 1234);
        // The cut follows the crossing record's accounting, in the same call.
        assert!(matches!(out[0], Output::Accounted(a) if a.counted));
        let e = event_of(&out, 1);
        assert_eq!(states(&e), st("active", "suspended"));
        assert_eq!(reasons(&e), ["over_quota"]);
        assert_eq!(e.usage_bytes, mb(30) + 1234);
        assert_eq!(e.limit_bytes, Some(mb(30)));
        assert_eq!(e.overshoot_bytes, Some(1234));
        assert_eq!(e.cause, record_cause(1, "r3"));
        assert_eq!(e.event_time, ts(&nov(10, 3, 0)));
        assert_eq!(e.cycle, CycleId::new(2026, 11));
        assert_eq!(s.state(1), active_suspended(&["over_quota"]));
        // A later record of the suspended card is accounted, no new event.
        let out = s.rec(1, "r4", &nov(10, 4, 0), mb(1));
        assert!(card_events(&out).is_empty());
        assert_eq!(s.view(1).usage_bytes, mb(31) + 1234);
    });
}

#[test]
fn over_quota_is_lifted_by_a_card_add_on_above_usage_only() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        s.rec(1, "r1", &nov(10, 1, 0), mb(35));
        assert_eq!(s.state(1), active_suspended(&["over_quota"]));
        s.at = nov(10, 2, 0);
        // 30 + 4 = 34 MB is still below the 35 MB used.
        let out = s.ok("add_on", json!({"iccid": iccid_text(1), "mb": 4}));
        assert!(
            card_events(&out).is_empty(),
            "34 MB < 35 MB used: still cut"
        );
        assert_eq!(s.state(1), active_suspended(&["over_quota"]));
        let out = s.ok("add_on", json!({"iccid": iccid_text(1), "mb": 6}));
        let e = event_of(&out, 1);
        assert_eq!(states(&e), st("suspended", "active"));
        assert!(e.reasons.is_empty());
        assert_eq!(s.state(1), active_state());
        assert_eq!(s.view(1).addon_mb, 10);
        // The add-on raises the limit for later records too.
        let out = s.rec(1, "r2", &nov(10, 3, 0), mb(4));
        assert!(card_events(&out).is_empty());
        let out = s.rec(1, "r3", &nov(10, 4, 0), mb(2));
        let e = event_of(&out, 1);
        assert_eq!(e.limit_bytes, Some(mb(40)));
        assert_eq!(e.overshoot_bytes, Some(mb(1)));
    });
}

#[test]
fn over_quota_is_lifted_next_cycle_and_add_ons_do_not_carry_over() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        s.tick(&nov(30, 12, 0));
        s.ok("add_on", json!({"iccid": iccid_text(1), "mb": 10}));
        s.rec(1, "r1", &nov(30, 13, 0), mb(41));
        assert_eq!(s.state(1), active_suspended(&["over_quota"]));
        let out = s.rec(1, "r2", &dec(1, 0, 5), mb(31));
        // Rollover first (resume), then the December record crosses the plain
        // 30 MB allowance again: the add-on was for November only.
        let events = card_events(&out);
        assert_eq!(events.len(), 2, "{events:#?}");
        assert_eq!(states(&events[0]), st("suspended", "active"));
        assert_eq!(
            events[0].cause,
            Cause::Rollover {
                cycle: CycleId::new(2026, 12)
            }
        );
        assert_eq!(events[0].event_time, ts(&dec(1, 0, 0)));
        assert_eq!(states(&events[1]), st("active", "suspended"));
        assert_eq!(events[1].limit_bytes, Some(mb(30)));
        assert_eq!(events[1].overshoot_bytes, Some(mb(1)));
        let v = s.view(1);
        assert_eq!(v.usage_bytes, mb(31));
        assert_eq!(v.addon_mb, 0);
        assert_eq!(v.cycle, CycleId::new(2026, 12));
    });
}

// ===== over_threshold ========================================================

#[test]
fn over_threshold_zero_cuts_at_the_first_byte() {
    scenario(|s| {
        s.active(1, "ctcc-30m");
        s.ok("set_threshold", json!({"iccids": iccids(&[1]), "mb": 0}));
        assert_eq!(s.state(1), active_state());
        let out = s.rec(1, "r1", &nov(10, 1, 0), 1);
        let e = event_of(&out, 1);
        assert_eq!(reasons(&e), ["over_threshold"]);
        assert_eq!(e.limit_bytes, Some(0));
        assert_eq!(e.overshoot_bytes, Some(1));
        assert_eq!(e.usage_bytes, 1);
    });
}

#[test]
fn over_threshold_n_cuts_once_usage_exceeds_n_mb() {
    scenario(|s| {
        s.active(1, "ctcc-30m");
        s.ok("set_threshold", json!({"iccids": iccids(&[1]), "mb": 5}));
        let out = s.rec(1, "r1", &nov(10, 1, 0), mb(5));
        assert!(card_events(&out).is_empty(), "5 MB does not exceed 5 MB");
        let out = s.rec(1, "r2", &nov(10, 2, 0), 700);
        let e = event_of(&out, 1);
        assert_eq!(states(&e), st("active", "suspended"));
        assert_eq!(reasons(&e), ["over_threshold"]);
        assert_eq!(e.usage_bytes, mb(5) + 700);
        assert_eq!(e.limit_bytes, Some(mb(5)));
        assert_eq!(e.overshoot_bytes, Some(700));
    });
}

#[test]
fn over_threshold_is_lifted_by_raising_it_above_usage() {
    scenario(|s| {
        s.active(1, "ctcc-30m");
        s.ok("set_threshold", json!({"iccids": iccids(&[1]), "mb": 5}));
        s.rec(1, "r1", &nov(10, 1, 0), mb(8));
        assert_eq!(s.state(1), active_suspended(&["over_threshold"]));
        s.at = nov(10, 2, 0);
        let out = s.ok("set_threshold", json!({"iccids": iccids(&[1]), "mb": 7}));
        assert!(card_events(&out).is_empty(), "7 MB is still below usage");
        assert_eq!(s.state(1), active_suspended(&["over_threshold"]));
        let out = s.ok("set_threshold", json!({"iccids": iccids(&[1]), "mb": 10}));
        assert_eq!(states(&event_of(&out, 1)), st("suspended", "active"));
        assert_eq!(s.view(1).threshold_mb, 10);
        let out = s.rec(1, "r2", &nov(10, 3, 0), mb(3));
        assert_eq!(event_of(&out, 1).limit_bytes, Some(mb(10)));
    });
}

#[test]
fn over_threshold_is_lifted_by_minus_one() {
    scenario(|s| {
        s.active(1, "ctcc-30m");
        s.ok("set_threshold", json!({"iccids": iccids(&[1]), "mb": 0}));
        s.rec(1, "r1", &nov(10, 1, 0), 10);
        assert_eq!(s.state(1), active_suspended(&["over_threshold"]));
        let out = s.ok("set_threshold", json!({"iccids": iccids(&[1]), "mb": -1}));
        assert_eq!(states(&event_of(&out, 1)), st("suspended", "active"));
        assert_eq!(s.view(1).threshold_mb, -1);
        // No threshold any more: only the plan allowance applies.
        let out = s.rec(1, "r2", &nov(10, 2, 0), mb(20));
        assert!(card_events(&out).is_empty());
    });
}

#[test]
fn clearing_the_threshold_does_not_lift_an_existing_cut() {
    scenario(|s| {
        s.active(1, "ctcc-30m");
        s.ok("set_threshold", json!({"iccids": iccids(&[1]), "mb": 1}));
        s.rec(1, "r1", &nov(10, 1, 0), mb(2));
        assert_eq!(s.state(1), active_suspended(&["over_threshold"]));
        let out = s.ok("clear_threshold", json!({"iccids": iccids(&[1])}));
        assert!(card_events(&out).is_empty());
        assert_eq!(s.view(1).threshold_mb, -1);
        assert_eq!(s.state(1), active_suspended(&["over_threshold"]));
        let out = s.rec(1, "r2", &nov(10, 2, 0), 100);
        assert!(card_events(&out).is_empty());
        assert_eq!(s.state(1), active_suspended(&["over_threshold"]));
        // ...but the next cycle does.
        s.tick(&nov(30, 23, 0));
        let out = s.tick(&dec(1, 0, 1));
        assert_eq!(states(&event_of(&out, 1)), st("suspended", "active"));
    });
}

#[test]
fn over_threshold_is_lifted_next_cycle_and_the_threshold_stays() {
    scenario(|s| {
        s.active(1, "ctcc-30m");
        s.ok("set_threshold", json!({"iccids": iccids(&[1]), "mb": 2}));
        s.tick(&nov(30, 20, 0));
        s.rec(1, "r1", &nov(30, 21, 0), mb(3));
        assert_eq!(s.state(1), active_suspended(&["over_threshold"]));
        let out = s.rec(1, "r2", &dec(1, 1, 0), mb(1));
        let e = event_of(&out, 1);
        assert_eq!(states(&e), st("suspended", "active"));
        assert_eq!(
            e.cause,
            Cause::Rollover {
                cycle: CycleId::new(2026, 12)
            }
        );
        assert_eq!(s.view(1).threshold_mb, 2);
        let out = s.rec(1, "r3", &dec(1, 2, 0), mb(1) + 1);
        assert_eq!(reasons(&event_of(&out, 1)), ["over_threshold"]);
    });
}

// ===== general_cap ===========================================================

#[test]
fn general_cap_cuts_general_cards_above_100_mb_and_add_ons_do_not_raise_it() {
    scenario(|s| {
        s.active(1, "cmcc-gen");
        s.active(2, "cmcc-30m"); // directed: no general cap
                                 // A 1 GB general plan is already above the cap: no add-on is sold
                                 // (carrier_rules.rs).
        s.fails(
            "add_on",
            json!({"iccid": iccid_text(1), "mb": 500}),
            ErrorCode::GeneralCapExceeded,
        );
        let out = s.rec(1, "r1", &nov(10, 1, 0), mb(100));
        assert!(card_events(&out).is_empty(), "100 MB is not above the cap");
        let out = s.rec(1, "r2", &nov(10, 2, 0), 99);
        let e = event_of(&out, 1);
        assert_eq!(reasons(&e), ["general_cap"]);
        assert_eq!(e.limit_bytes, Some(mb(100)));
        assert_eq!(e.overshoot_bytes, Some(99));
        assert_eq!(s.state(1), active_suspended(&["general_cap"]));
        // Directed plan: only its own allowance (with add-on) counts.
        s.ok("add_on", json!({"iccid": iccid_text(2), "mb": 200}));
        let out = s.rec(2, "r1", &nov(10, 4, 0), mb(150));
        assert!(card_events(&out).is_empty());
    });
}

#[test]
fn general_cap_applies_to_forward_pool_members_and_pool_add_ons_do_not_raise_it() {
    scenario(|s| {
        s.active(1, "cmcc-gen");
        s.active(2, "cmcc-gen");
        s.forward_pool("pg", "cmcc-gen", &[1, 2]);
        s.ok("add_on", json!({"pool": "pg", "mb": 1000}));
        let out = s.rec(1, "r1", &nov(10, 1, 0), mb(100) + 5);
        let e = event_of(&out, 1);
        assert_eq!(reasons(&e), ["general_cap"]);
        assert_eq!(e.overshoot_bytes, Some(5));
        no_event_of(&out, 2);
        s.at = nov(10, 2, 0);
        s.ok("add_on", json!({"pool": "pg", "mb": 1000}));
        assert_eq!(s.state(1), active_suspended(&["general_cap"]));
        assert_eq!(s.state(2), active_state());
    });
}

#[test]
fn general_cap_is_lifted_next_cycle() {
    scenario(|s| {
        s.active(1, "cmcc-gen");
        s.tick(&nov(30, 20, 0));
        s.rec(1, "r1", &nov(30, 21, 0), mb(101));
        assert_eq!(s.state(1), active_suspended(&["general_cap"]));
        let out = s.rec(1, "r2", &dec(1, 0, 0), 10);
        let e = event_of(&out, 1);
        assert_eq!(states(&e), st("suspended", "active"));
        assert_eq!(
            e.cause,
            Cause::Rollover {
                cycle: CycleId::new(2026, 12)
            }
        );
        assert_eq!(s.view(1).usage_bytes, 10);
    });
}

// ===== pool_exhausted ========================================================

/// Forward pool `p1` of three active cmcc-30m cards (90 MB) plus, when
/// asked, activatable member 4.
fn exhausted_pool(s: &mut Sim, with_activatable: bool) {
    for n in [1, 2, 3] {
        s.active(n, "cmcc-30m");
    }
    let mut members = vec![1, 2, 3];
    if with_activatable {
        s.card_with(4, "cmcc-30m", "activatable", json!({}));
        members.push(4);
    }
    s.forward_pool("p1", "cmcc-30m", &members);
    assert_eq!(s.pool("p1").allowance_bytes, mb(90));
    s.rec(1, "a1", &nov(10, 1, 0), mb(40));
    s.rec(2, "b1", &nov(10, 2, 0), mb(40));
    s.rec(3, "c1", &nov(10, 3, 0), mb(11));
    for n in [1, 2, 3] {
        assert_eq!(
            s.state(n),
            active_suspended(&["pool_exhausted"]),
            "card {n}"
        );
    }
    s.at = nov(10, 4, 0);
}

#[test]
fn pool_exhausted_cuts_every_member_on_the_exact_crossing_record() {
    scenario(|s| {
        for n in [1, 2, 3] {
            s.active(n, "cmcc-30m");
        }
        s.active(9, "cmcc-30m"); // not in the pool
        s.forward_pool("p1", "cmcc-30m", &[1, 2, 3]);
        // Members at different positions: card 1 far above its own 30 MB
        // plan, card 3 far below; nobody is cut until the pool total is.
        let out = s.rec(1, "a1", &nov(10, 1, 0), mb(45));
        assert!(
            card_events(&out).is_empty(),
            "no over_quota inside a forward pool"
        );
        s.rec(2, "b1", &nov(10, 2, 0), mb(40));
        let out = s.rec(3, "c1", &nov(10, 3, 0), mb(5));
        assert!(card_events(&out).is_empty(), "exactly 90 MB: not exhausted");
        assert_eq!(s.pool("p1").usage_bytes, mb(90));
        let out = s.rec(3, "c2", &nov(10, 4, 0), 77);
        assert!(matches!(out[0], Output::Accounted(a) if a.usage.record_id.as_str() == "c2"));
        let pools = pool_events(&out);
        assert_eq!(pools.len(), 1);
        assert_eq!(pools[0].usage_bytes, mb(90) + 77);
        assert_eq!(pools[0].limit_bytes, Some(mb(90)));
        assert_eq!(pools[0].overshoot_bytes, Some(77));
        for n in [1, 2, 3] {
            let e = event_of(&out, n);
            assert_eq!(states(&e), st("active", "suspended"), "card {n}");
            assert_eq!(reasons(&e), ["pool_exhausted"], "card {n}");
            assert_eq!(e.usage_bytes, mb(90) + 77);
            assert_eq!(e.limit_bytes, Some(mb(90)));
            assert_eq!(e.overshoot_bytes, Some(77));
            assert_eq!(e.cause, record_cause(3, "c2"));
        }
        no_event_of(&out, 9);
        // A later record of any member: accounted, no further event.
        let out = s.rec(2, "b2", &nov(10, 5, 0), mb(1));
        assert!(card_events(&out).is_empty());
        assert_eq!(s.pool("p1").usage_bytes, mb(91) + 77);
    });
}

#[test]
fn pool_exhausted_lift_by_pool_add_on_emits_resume_for_every_member() {
    scenario(|s| {
        exhausted_pool(s, false);
        s.rec(1, "a2", &nov(10, 5, 0), mb(4)); // 95 MB used
        s.at = nov(10, 6, 0);
        let out = s.ok("add_on", json!({"pool": "p1", "mb": 4}));
        assert!(
            card_events(&out).is_empty(),
            "94 MB < 95 MB: still exhausted"
        );
        let out = s.ok("add_on", json!({"pool": "p1", "mb": 10}));
        for n in [1, 2, 3] {
            assert_eq!(states(&event_of(&out, n)), st("suspended", "active"));
        }
        let pools = pool_events(&out);
        assert_eq!(pools.len(), 1);
        assert_eq!(s.pool("p1").allowance_bytes, mb(104));
    });
}

#[test]
fn pool_exhausted_is_lifted_by_the_activate_command_on_another_member() {
    scenario(|s| {
        exhausted_pool(s, true);
        assert_eq!(
            s.pool("p1").allowance_bytes,
            mb(90),
            "activatable members add nothing"
        );
        let out = s.ok("activate", json!({"iccids": iccids(&[4])}));
        for n in [1, 2, 3] {
            assert_eq!(
                states(&event_of(&out, n)),
                st("suspended", "active"),
                "card {n}"
            );
        }
        assert_eq!(states(&event_of(&out, 4)), st("activatable", "active"));
        assert_eq!(s.pool("p1").allowance_bytes, mb(120));
    });
}

#[test]
fn pool_exhausted_is_lifted_by_upserting_a_member_from_activatable_to_active() {
    scenario(|s| {
        exhausted_pool(s, true);
        s.active(4, "cmcc-30m");
        for n in [1, 2, 3, 4] {
            assert_eq!(s.state(n), active_state(), "card {n}");
        }
        assert_eq!(s.pool("p1").allowance_bytes, mb(120));
    });
}

#[test]
fn pool_exhausted_is_lifted_by_power_on_activation_of_a_member() {
    scenario(|s| {
        exhausted_pool(s, true);
        // Member 4's first record activates it: +30 MB allowance, 1 MB used.
        let out = s.rec(4, "d1", &nov(10, 5, 0), mb(1));
        for n in [1, 2, 3] {
            assert_eq!(
                states(&event_of(&out, n)),
                st("suspended", "active"),
                "card {n}"
            );
        }
        assert_eq!(states(&event_of(&out, 4)), st("activatable", "active"));
        assert_eq!(s.pool("p1").usage_bytes, mb(92));
    });
}

#[test]
fn pool_exhausted_is_lifted_next_cycle() {
    scenario(|s| {
        exhausted_pool(s, false);
        s.tick(&nov(30, 23, 0));
        let out = s.tick(&dec(1, 0, 0));
        for n in [1, 2, 3] {
            let e = event_of(&out, n);
            assert_eq!(states(&e), st("suspended", "active"));
            assert_eq!(
                e.cause,
                Cause::Rollover {
                    cycle: CycleId::new(2026, 12)
                }
            );
        }
        let p = s.pool("p1");
        assert_eq!(p.usage_bytes, 0);
        assert_eq!(p.allowance_bytes, mb(90));
    });
}

#[test]
fn joining_a_forward_pool_brings_usage_in() {
    scenario(|s| {
        for n in [1, 2] {
            s.active(n, "cmcc-30m");
        }
        s.active(3, "cmcc-30m");
        s.forward_pool("p1", "cmcc-30m", &[1, 2]);
        s.rec(1, "a1", &nov(10, 1, 0), mb(50));
        s.rec(3, "c1", &nov(10, 2, 0), mb(25));
        assert_eq!(s.pool("p1").usage_bytes, mb(50));
        s.at = nov(10, 3, 0);
        // 50 + 25 = 75 MB of 90 MB: fine.
        s.ok(
            "add_pool_members",
            json!({"pool": "p1", "iccids": iccids(&[3])}),
        );
        assert_eq!(s.pool("p1").usage_bytes, mb(75));
        let out = s.rec(3, "c2", &nov(10, 4, 0), mb(16));
        for n in [1, 2, 3] {
            assert_eq!(reasons(&event_of(&out, n)), ["pool_exhausted"]);
        }
    });
}

// ===== backward_pool_threshold ===============================================

fn backward_rule(s: &mut Sim, used_mb: u64) {
    s.ok(
        "upsert_rule",
        json!({"rule": {"id": "bp-cut", "name": "cut bp", "type": 3,
            "condition": {"used_mb_gte": used_mb},
            "filter": {"backward_pools": ["bp"]},
            "actions": [{"type": "suspend"}]}}),
    );
}

#[test]
fn backward_pool_threshold_cuts_every_member_when_the_rule_fires() {
    scenario(|s| {
        for n in [1, 2, 3] {
            s.active(n, "cmcc-30m");
        }
        s.backward_pool("bp", "cmcc", &[1, 2]);
        backward_rule(s, 50);
        // Backward members have no allowance of their own: no over_quota.
        let out = s.rec(1, "a1", &nov(10, 1, 0), mb(35));
        assert!(card_events(&out).is_empty());
        let out = s.rec(2, "b1", &nov(10, 2, 0), mb(14));
        assert!(card_events(&out).is_empty());
        let out = s.rec(2, "b2", &nov(10, 3, 0), mb(1) - 10);
        assert!(card_events(&out).is_empty(), "10 bytes short of 50 MB");
        // used MB >= 50: reaching it exactly fires.
        let out = s.rec(2, "b3", &nov(10, 3, 30), 10);
        let pools = pool_events(&out);
        assert_eq!(pools.len(), 1);
        assert_eq!(pools[0].limit_bytes, Some(mb(50)));
        for n in [1, 2] {
            let e = event_of(&out, n);
            assert_eq!(reasons(&e), ["backward_pool_threshold"], "card {n}");
            assert_eq!(e.usage_bytes, mb(50));
            assert_eq!(e.limit_bytes, Some(mb(50)));
            assert_eq!(e.overshoot_bytes, Some(0));
            assert_eq!(e.cause, record_cause(2, "b3"));
        }
        no_event_of(&out, 3);
    });
}

#[test]
fn backward_pool_threshold_is_lifted_next_cycle() {
    scenario(|s| {
        for n in [1, 2] {
            s.active(n, "cmcc-30m");
        }
        s.backward_pool("bp", "cmcc", &[1, 2]);
        backward_rule(s, 10);
        s.tick(&nov(30, 20, 0));
        s.rec(1, "a1", &nov(30, 21, 0), mb(11));
        for n in [1, 2] {
            assert_eq!(s.state(n), active_suspended(&["backward_pool_threshold"]));
        }
        // The fleet's clock reaches December (one of two cards cannot move
        // it alone: see tests/clock.rs).
        let out = s.tick(&dec(1, 0, 20));
        for n in [1, 2] {
            let e = event_of(&out, n);
            assert_eq!(states(&e), st("suspended", "active"));
            assert!(matches!(e.cause, Cause::Rollover { .. }), "{e:?}");
        }
        s.rec(2, "b1", &dec(1, 0, 30), mb(1));
        assert_eq!(s.pool("bp").usage_bytes, mb(1));
    });
}

// ===== pool_frozen ===========================================================

#[test]
fn pool_frozen_holds_from_freeze_to_unfreeze_across_cycles() {
    scenario(|s| {
        for n in [1, 2, 3] {
            s.active(n, "cmcc-30m");
        }
        s.backward_pool("bp", "cmcc", &[1, 2]);
        s.forward_pool("fp", "cmcc-30m", &[3]);
        s.fails(
            "freeze_pool",
            json!({"pool": "fp"}),
            ErrorCode::WrongPoolKind,
        );
        let out = s.ok("freeze_pool", json!({"pool": "bp"}));
        for n in [1, 2] {
            let e = event_of(&out, n);
            assert_eq!(reasons(&e), ["pool_frozen"]);
            assert_eq!(e.limit_bytes, None);
        }
        no_event_of(&out, 3);
        s.tick(&nov(30, 23, 0));
        let out = s.tick(&dec(1, 0, 1));
        no_event_of(&out, 1);
        assert_eq!(s.state(1), active_suspended(&["pool_frozen"]));
        s.at = dec(1, 1, 0);
        let out = s.ok("unfreeze_pool", json!({"pool": "bp"}));
        for n in [1, 2] {
            assert_eq!(states(&event_of(&out, n)), st("suspended", "active"));
        }
    });
}

// ===== plan_expired ==========================================================

#[test]
fn plan_expired_is_set_when_event_time_passes_expiry_and_lifted_by_a_new_expiry() {
    scenario(|s| {
        s.card_with(
            1,
            "cmcc-30m",
            "active",
            json!({"expires_at": "2026-11-10T12:00:00+08:00"}),
        );
        s.active(2, "cmcc-30m");
        let out = s.rec(1, "r1", &nov(10, 11, 59), 100);
        assert!(card_events(&out).is_empty());
        // The fleet's clock passes the expiry.
        let out = s.tick(&nov(10, 12, 30));
        let e = event_of(&out, 1);
        assert_eq!(states(&e), st("active", "suspended"));
        assert_eq!(reasons(&e), ["plan_expired"]);
        assert_eq!(
            e.cause,
            Cause::Deadline {
                kind: DeadlineKind::PlanExpiry,
                at: ts("2026-11-10T12:00:00+08:00")
            }
        );
        assert_eq!(e.event_time, ts("2026-11-10T12:00:00+08:00"));
        s.at = nov(10, 13, 0);
        // An expired card is not renewed (SPEC 2.1, carrier_rules.rs); the
        // operator may still correct its expiry.
        s.card_fails(
            "renew",
            json!({"iccids": iccids(&[1]), "months": 12}),
            ErrorCode::CardExpired,
        );
        let out = s.ok(
            "upsert_card",
            json!({"card": {"iccid": iccid_text(1), "carrier": "cmcc", "plan": "cmcc-30m",
                "expires_at": "2027-11-10T13:00:00+08:00"}}),
        );
        assert_eq!(states(&event_of(&out, 1)), st("suspended", "active"));
        // Renewing before expiry extends the current expiry.
        s.ok("renew", json!({"iccids": iccids(&[2]), "months": 1}));
        assert_eq!(s.view(2).expires_at, Some(ts("2027-02-05T00:00:00+08:00")));
    });
}

#[test]
fn plan_expired_is_not_lifted_next_cycle() {
    scenario(|s| {
        s.card_with(
            1,
            "cmcc-30m",
            "active",
            json!({"expires_at": "2026-11-20T00:00:00+08:00"}),
        );
        s.tick(&nov(21, 0, 0));
        assert_eq!(s.state(1), active_suspended(&["plan_expired"]));
        s.tick(&nov(30, 23, 0));
        let out = s.tick(&dec(1, 0, 1));
        no_event_of(&out, 1);
        assert_eq!(s.state(1), active_suspended(&["plan_expired"]));
    });
}

// ===== manual and violation ==================================================

#[test]
fn manual_is_set_by_suspend_and_lifted_by_resume_only() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        let out = s.ok("suspend", json!({"iccids": iccids(&[1])}));
        let e = event_of(&out, 1);
        assert_eq!(reasons(&e), ["manual"]);
        assert!(matches!(e.cause, Cause::Command { .. }));
        s.tick(&nov(30, 23, 0));
        s.tick(&dec(1, 0, 1));
        assert_eq!(
            s.state(1),
            active_suspended(&["manual"]),
            "not lifted by rollover"
        );
        s.ok(
            "rebind",
            json!({"iccid": iccid_text(1), "imei": "864000000000002"}),
        );
        assert_eq!(
            s.state(1),
            active_suspended(&["manual"]),
            "rebind lifts violation only"
        );
        let out = s.ok("resume", json!({"iccids": iccids(&[1])}));
        assert_eq!(states(&event_of(&out, 1)), st("suspended", "active"));
    });
}

#[test]
fn upsert_card_in_state_suspended_is_active_with_manual() {
    scenario(|s| {
        s.card_with(1, "cmcc-30m", "suspended", json!({}));
        assert_eq!(s.state(1), active_suspended(&["manual"]));
        s.ok("resume", json!({"iccids": iccids(&[1])}));
        assert_eq!(s.state(1), active_state());
    });
}

#[test]
fn violation_is_lifted_by_resume() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        let out = s.ok("report_violation", json!({"iccids": iccids(&[1])}));
        assert_eq!(reasons(&event_of(&out, 1)), ["violation"]);
        s.tick(&nov(30, 23, 0));
        s.tick(&dec(1, 0, 1));
        assert_eq!(
            s.state(1),
            active_suspended(&["violation"]),
            "not lifted by rollover"
        );
        let out = s.ok("resume", json!({"iccids": iccids(&[1])}));
        assert_eq!(states(&event_of(&out, 1)), st("suspended", "active"));
    });
}

#[test]
fn violation_is_lifted_by_rebind() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        s.ok("report_violation", json!({"iccids": iccids(&[1])}));
        let out = s.ok(
            "rebind",
            json!({"iccid": iccid_text(1), "imei": "864000000000009"}),
        );
        assert_eq!(states(&event_of(&out, 1)), st("suspended", "active"));
    });
}

// ===== several reasons =======================================================

#[test]
fn a_card_with_two_reasons_stays_suspended_until_both_are_gone() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        s.ok("suspend", json!({"iccids": iccids(&[1])}));
        // A reason added while suspended: old = new = suspended.
        let out = s.rec(1, "r1", &nov(10, 1, 0), mb(31));
        let e = event_of(&out, 1);
        assert_eq!(states(&e), st("suspended", "suspended"));
        assert_eq!(reasons(&e), ["over_quota", "manual"]);
        assert_eq!(e.limit_bytes, Some(mb(30)));
        assert_eq!(e.overshoot_bytes, Some(mb(1)));
        s.at = nov(10, 2, 0);
        // One reason removed: still suspended, event with the new set.
        let out = s.ok("add_on", json!({"iccid": iccid_text(1), "mb": 5}));
        let e = event_of(&out, 1);
        assert_eq!(states(&e), st("suspended", "suspended"));
        assert_eq!(reasons(&e), ["manual"]);
        let out = s.ok("resume", json!({"iccids": iccids(&[1])}));
        let e = event_of(&out, 1);
        assert_eq!(states(&e), st("suspended", "active"));
        assert!(e.reasons.is_empty());
    });
}

#[test]
fn a_reason_set_again_while_held_emits_nothing() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        s.ok("suspend", json!({"iccids": iccids(&[1])}));
        let out = s.ok("suspend", json!({"iccids": iccids(&[1])}));
        assert!(card_events(&out).is_empty());
        let out = s.ok("resume", json!({"iccids": iccids(&[1])}));
        assert_eq!(card_events(&out).len(), 1);
        let out = s.ok("resume", json!({"iccids": iccids(&[1])}));
        assert!(card_events(&out).is_empty());
    });
}

// ===== life cycle ============================================================

#[test]
fn power_on_activation_on_the_first_record() {
    scenario(|s| {
        s.card_with(1, "cmcc-30m", "activatable", json!({}));
        assert_eq!(s.view(1).state, CardState::Activatable);
        let out = s.rec(1, "r1", &nov(10, 1, 0), 1000);
        let e = event_of(&out, 1);
        assert_eq!(states(&e), st("activatable", "active"));
        assert_eq!(e.cause, record_cause(1, "r1"));
        let v = s.view(1);
        assert_eq!(v.state, CardState::Active);
        assert_eq!(v.activated_at, Some(ts(&nov(10, 1, 0))));
        assert_eq!(v.expires_at, Some(ts("2027-11-10T01:00:00+08:00")));
        assert_eq!(v.usage_bytes, 1000, "the activating record counts");
    });
}

#[test]
fn testable_becomes_activatable_when_the_test_allowance_is_used_up() {
    scenario(|s| {
        s.card_with(
            1,
            "cmcc-30m",
            "testable",
            json!({"test_allowance_mb": 5, "test_ends_at": "2027-01-01T00:00:00+08:00"}),
        );
        let out = s.rec(1, "r1", &nov(10, 1, 0), mb(3));
        assert!(card_events(&out).is_empty());
        assert_eq!(s.view(1).state, CardState::Testable);
        let out = s.rec(1, "r2", &nov(10, 2, 0), mb(3));
        assert_eq!(states(&event_of(&out, 1)), st("testable", "activatable"));
        // The next record is a power-on activation.
        let out = s.rec(1, "r3", &nov(10, 3, 0), 10);
        assert_eq!(states(&event_of(&out, 1)), st("activatable", "active"));
        assert_eq!(s.view(1).activated_at, Some(ts(&nov(10, 3, 0))));
    });
}

#[test]
fn testable_becomes_activatable_when_the_test_period_ends() {
    scenario(|s| {
        s.card_with(
            1,
            "cmcc-30m",
            "testable",
            json!({"test_ends_at": "2026-11-12T00:00:00+08:00"}),
        );
        s.tick(&nov(11, 23, 0));
        assert_eq!(s.view(1).state, CardState::Testable);
        let out = s.tick(&nov(12, 0, 30));
        let e = event_of(&out, 1);
        assert_eq!(states(&e), st("testable", "activatable"));
        assert_eq!(
            e.cause,
            Cause::Deadline {
                kind: DeadlineKind::TestEnd,
                at: ts("2026-11-12T00:00:00+08:00")
            }
        );
    });
}

#[test]
fn forced_activation_when_the_silent_period_ends_without_traffic() {
    scenario(|s| {
        s.card_with(
            1,
            "cmcc-30m",
            "activatable",
            json!({"silent_ends_at": "2026-11-20T00:00:00+08:00"}),
        );
        s.active(2, "cmcc-30m");
        for day in 11..=20 {
            s.rec(2, &format!("x{day}"), &nov(day, 0, 0), 1);
        }
        let log = s.log.clone();
        let e = event_of(&log, 1);
        assert_eq!(states(&e), st("activatable", "active"));
        assert_eq!(
            e.cause,
            Cause::Deadline {
                kind: DeadlineKind::SilentEnd,
                at: ts("2026-11-20T00:00:00+08:00")
            }
        );
        let v = s.view(1);
        assert_eq!(v.activated_at, Some(ts("2026-11-20T00:00:00+08:00")));
        assert_eq!(v.expires_at, Some(ts("2027-11-20T00:00:00+08:00")));
    });
}

#[test]
fn default_silent_period_is_six_months_from_issue() {
    scenario(|s| {
        s.card_with(1, "cmcc-30m", "activatable", json!({}));
        s.tick("2027-05-09T23:00:00+08:00");
        assert_eq!(s.view(1).state, CardState::Activatable);
        s.tick("2027-05-10T00:00:00+08:00");
        assert_eq!(s.view(1).state, CardState::Active);
        assert_eq!(
            s.view(1).activated_at,
            Some(ts("2027-05-10T00:00:00+08:00"))
        );
    });
}

#[test]
fn deregistered_card_usage_is_recorded_but_never_changes_state() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        s.forward_pool("p1", "cmcc-30m", &[1]);
        s.rec(1, "r1", &nov(10, 1, 0), mb(10));
        s.at = nov(10, 2, 0);
        s.ok("deregister", json!({"iccids": iccids(&[1])}));
        assert_eq!(s.view(1).state, CardState::Deregistered);
        assert_eq!(s.view(1).pool, None);
        let out = s.rec(1, "r2", &nov(10, 3, 0), mb(100));
        let acc = accounted(&out);
        assert_eq!(acc.len(), 1);
        assert!(!acc[0].counted);
        assert!(!acc[0].late);
        assert!(card_events(&out).is_empty());
        assert_eq!(s.view(1).state, CardState::Deregistered);
        // Terminal: commands cannot bring it back.
        s.card_fails(
            "resume",
            json!({"iccids": iccids(&[1])}),
            ErrorCode::Deregistered,
        );
        s.card_fails(
            "activate",
            json!({"iccids": iccids(&[1])}),
            ErrorCode::Deregistered,
        );
        s.fails(
            "upsert_card",
            json!({"card": {"iccid": iccid_text(1), "carrier": "cmcc", "plan": "cmcc-30m", "state": "active"}}),
            ErrorCode::Deregistered,
        );
        s.tick(&nov(30, 23, 0));
        let out = s.tick(&dec(1, 0, 1));
        no_event_of(&out, 1);
        assert_eq!(s.view(1).state, CardState::Deregistered);
    });
}

// ===== section 3: cycles =====================================================

#[test]
fn calendar_month_cycles_for_cmcc_ctcc_and_tri() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        s.active(2, "ctcc-30m");
        s.active(3, "tri-30m");
        s.tick(&nov(30, 23, 0));
        for n in [1, 2, 3] {
            let out = s.rec(n, "last", "2026-11-30T23:59:59+08:00", mb(29));
            assert_eq!(accounted(&out)[0].cycle, CycleId::new(2026, 11));
        }
        for n in [1, 2, 3] {
            let out = s.rec(n, "first", "2026-12-01T00:00:00+08:00", mb(2));
            let acc = accounted(&out);
            assert_eq!(acc[0].cycle, CycleId::new(2026, 12));
            assert!(acc[0].counted);
        }
        // Two of the three cards in December move the clock there; the
        // first card's record, ahead of it until then, counts then.
        for n in [1, 2, 3] {
            let v = s.view(n);
            assert_eq!(v.cycle, CycleId::new(2026, 12), "card {n}");
            assert_eq!(v.usage_bytes, mb(2), "card {n}: counters restart at zero");
            assert_eq!(
                v.state,
                CardState::Active,
                "unused allowance never carries over"
            );
        }
    });
}

#[test]
fn cucc_cycle_ends_on_the_26th_at_24_00() {
    scenario(|s| {
        s.active(1, "cucc-30m");
        s.active(2, "cmcc-30m");
        s.tick(&nov(26, 23, 0));
        let out = s.rec(1, "a", "2026-11-26T23:59:59+08:00", mb(31));
        assert_eq!(accounted(&out)[0].cycle, CycleId::new(2026, 11));
        assert_eq!(reasons(&event_of(&out, 1)), ["over_quota"]);
        s.rec(2, "a", "2026-11-26T23:59:59+08:00", mb(31));
        assert_eq!(s.state(2), active_suspended(&["over_quota"]));
        // The cmcc card reaches the 27th first (still its November); the
        // cucc card's record then moves the clock: both cards agree.
        s.rec(2, "b", "2026-11-27T00:00:00+08:00", 1);
        let out = s.rec(1, "b", "2026-11-27T00:00:00+08:00", mb(1));
        let acc = accounted(&out);
        assert_eq!(
            acc[0].cycle,
            CycleId::new(2026, 12),
            "cucc 2026-12 starts 27 Nov"
        );
        let e = event_of(&out, 1);
        assert_eq!(states(&e), st("suspended", "active"));
        assert_eq!(
            e.cause,
            Cause::Rollover {
                cycle: CycleId::new(2026, 12)
            }
        );
        assert_eq!(e.event_time, ts("2026-11-27T00:00:00+08:00"));
        assert_eq!(s.view(1).usage_bytes, mb(1));
        assert_eq!(s.view(1).cycle, CycleId::new(2026, 12));
        // The cmcc card is still in November.
        no_event_of(&out, 2);
        assert_eq!(s.view(2).cycle, CycleId::new(2026, 11));
        assert_eq!(s.state(2), active_suspended(&["over_quota"]));
    });
}

#[test]
fn rollover_lifts_next_cycle_reasons_for_every_card_and_emits_resume_events() {
    // One card moves time here (quorum 1): this is about the rollover on
    // the record that crosses, not about who may move the clock.
    scenario_with(
        |c| c.clock_quorum = 1,
        |s| {
            // Cards 1..=6 suspended in different ways; card 7 only moves the
            // clock (and lives, depending on the shard count, elsewhere).
            for n in [1, 2, 3, 5, 6, 7] {
                s.active(n, "cmcc-30m");
            }
            s.active(4, "ctcc-30m");
            s.tick(&nov(30, 12, 0));
            s.ok("set_threshold", json!({"iccids": iccids(&[4]), "mb": 0}));
            s.ok("suspend", json!({"iccids": iccids(&[2, 3])}));
            s.ok("report_violation", json!({"iccids": iccids(&[6])}));
            s.rec(1, "r", &nov(30, 13, 0), mb(31)); // over_quota
            s.rec(3, "r", &nov(30, 13, 0), mb(31)); // manual + over_quota
            s.rec(4, "r", &nov(30, 13, 0), 1); // over_threshold
            s.rec(5, "r", &nov(30, 13, 0), mb(30)); // exactly at the allowance
            s.rec(7, "r", &nov(30, 23, 30), 1);
            assert_eq!(s.state(3), active_suspended(&["over_quota", "manual"]));
            let out = s.rec(7, "first-dec", &dec(1, 0, 10), 1);
            let rollover = Cause::Rollover {
                cycle: CycleId::new(2026, 12),
            };
            for n in [1, 4] {
                let e = event_of(&out, n);
                assert_eq!(states(&e), st("suspended", "active"), "card {n}");
                assert_eq!(e.cause, rollover);
                assert_eq!(e.event_time, ts(&dec(1, 0, 0)));
                assert_eq!(e.cycle, CycleId::new(2026, 12));
            }
            let e = event_of(&out, 3);
            assert_eq!(states(&e), st("suspended", "suspended"));
            assert_eq!(reasons(&e), ["manual"]);
            for n in [2, 5, 6, 7] {
                no_event_of(&out, n);
            }
            assert_eq!(s.state(2), active_suspended(&["manual"]));
            assert_eq!(s.state(6), active_suspended(&["violation"]));
            // Right after the record that crossed the boundary, every card is in
            // the new cycle with zero usage, whichever shard holds it.
            for n in 1..=6 {
                let v = s.view(n);
                assert_eq!(v.cycle, CycleId::new(2026, 12), "card {n}");
                assert_eq!(v.usage_bytes, 0, "card {n}");
            }
            // The resume events come before the record that crossed is accounted.
            let first_accounted = out
                .iter()
                .position(|o| matches!(o, Output::Accounted(_)))
                .expect("accounted");
            assert_eq!(first_accounted, out.len() - 1, "{out:#?}");
        },
    );
}

#[test]
fn late_record_beyond_allowed_lateness_is_flagged_and_changes_nothing() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        s.tick(&nov(30, 20, 0));
        s.rec(1, "nov", &nov(30, 21, 0), mb(29));
        s.rec(1, "dec", &dec(1, 3, 0), mb(29));
        // The November cycle closed 3 h ago (lateness 2 h): late.
        let out = s.rec(1, "late", &nov(30, 23, 59), mb(500));
        let acc = accounted(&out);
        assert_eq!(acc.len(), 1);
        assert_eq!(acc[0].cycle, CycleId::new(2026, 11));
        assert!(!acc[0].counted);
        assert!(acc[0].late);
        assert!(card_events(&out).is_empty());
        assert_eq!(s.view(1).usage_bytes, mb(29));
        assert_eq!(s.state(1), active_state());
    });
}

fn late_crossings(out: &[Output]) -> Vec<LateCrossingEvent> {
    out.iter()
        .filter_map(|o| match o {
            Output::Action(ActionEvent::LateCrossing(e)) => Some(e.clone()),
            _ => None,
        })
        .collect()
}

fn pool_totals(out: &[Output]) -> Vec<PoolCycleTotal> {
    out.iter()
        .filter_map(|o| match o {
            Output::PoolCycle(t) => Some((**t).clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_record_of_the_closed_cycle_within_the_lateness_counts_and_its_crossing_is_reported() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        s.tick(&nov(30, 12, 0));
        s.rec(1, "nov", &nov(30, 13, 0), mb(29));
        s.rec(1, "dec", &dec(1, 0, 30), mb(1));
        // The November cycle closed 30 min ago, within the 2 h lateness,
        // even though the record itself ended 4 h 30 min before the clock.
        let out = s.rec(1, "nov-2", &nov(30, 20, 0), mb(2));
        let acc = accounted(&out);
        assert_eq!(acc[0].cycle, CycleId::new(2026, 11));
        assert!(acc[0].counted, "cycle closed 30 min ago: within lateness");
        assert!(!acc[0].late);
        let crossings = late_crossings(&out);
        assert_eq!(crossings.len(), 1, "{out:#?}");
        let e = &crossings[0];
        assert_eq!(e.iccid, Some(ic(1)));
        assert_eq!(e.pool, None);
        assert_eq!(e.cycle, CycleId::new(2026, 11));
        assert_eq!(
            e.reasons.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
            ["over_quota"]
        );
        assert_eq!(e.usage_bytes, mb(31));
        assert_eq!(e.limit_bytes, mb(30));
        assert_eq!(e.overshoot_bytes, mb(1));
        assert_eq!(e.cause, record_cause(1, "nov-2"));
        assert_eq!(e.event_time, ts(&nov(30, 20, 0)));
        // The closed cycle's crossing is reported once.
        let out = s.rec(1, "nov-3", &nov(30, 21, 0), mb(1));
        assert!(accounted(&out)[0].counted);
        assert!(late_crossings(&out).is_empty(), "{out:#?}");
    });
}

#[test]
fn a_late_crossing_never_changes_the_current_state() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        s.ok(
            "upsert_rule",
            json!({"rule": {"id": "cut", "type": 4, "condition": {"to": ["suspended"]}}}),
        );
        s.tick(&nov(30, 12, 0));
        s.rec(1, "nov", &nov(30, 13, 0), mb(29));
        s.rec(1, "dec", &dec(1, 0, 30), mb(1));
        let out = s.rec(1, "nov-2", &nov(30, 20, 0), mb(2));
        assert_eq!(late_crossings(&out).len(), 1);
        // No state change, no carrier action, no rule.
        assert!(card_events(&out).is_empty(), "{out:#?}");
        assert!(pool_events(&out).is_empty());
        assert!(
            !out.iter()
                .any(|o| matches!(o, Output::Action(ActionEvent::RuleFired(_)))),
            "{out:#?}"
        );
        assert_eq!(s.state(1), active_state());
        assert_eq!(s.view(1).cycle, CycleId::new(2026, 12));
        assert_eq!(s.view(1).usage_bytes, mb(1));
        // The new cycle still cuts on its own records only.
        let out = s.rec(1, "dec-2", &dec(1, 1, 0), mb(29) + 1);
        assert_eq!(states(&event_of(&out, 1)), st("active", "suspended"));
    });
}

#[test]
fn a_record_of_the_closed_cycle_past_the_lateness_is_recorded_only() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        s.tick(&nov(30, 12, 0));
        s.rec(1, "nov", &nov(30, 13, 0), mb(29));
        s.rec(1, "dec", &dec(1, 1, 59), mb(1));
        // Exactly at the end of the lateness: still counted.
        s.tick(&dec(1, 2, 0));
        let out = s.rec(1, "edge", &nov(30, 23, 0), 1);
        assert!(accounted(&out)[0].counted);
        // One millisecond later the closed cycle is over for good.
        s.tick("2026-12-01T02:00:00.001+08:00");
        let out = s.rec(1, "past", &nov(30, 23, 30), mb(5));
        let acc = accounted(&out);
        assert!(!acc[0].counted);
        assert!(acc[0].late);
        assert!(late_crossings(&out).is_empty());
        assert!(card_events(&out).is_empty());
        assert_eq!(s.view(1).usage_bytes, mb(1));
    });
}

#[test]
fn a_pool_crossed_within_the_lateness_reports_it_and_its_final_total_is_exact() {
    scenario(|s| {
        for n in [1, 2, 3] {
            s.active(n, "cmcc-30m");
        }
        s.forward_pool("p1", "cmcc-30m", &[1, 2, 3]);
        s.tick(&nov(30, 12, 0));
        s.rec(1, "a1", &nov(30, 13, 0), mb(40));
        s.rec(2, "b1", &nov(30, 23, 59), mb(40));
        let out = s.tick(&dec(1, 0, 20));
        // At the rollover: the closed cycle's total so far.
        let totals = pool_totals(&out);
        assert_eq!(totals.len(), 1, "{out:#?}");
        assert_eq!(totals[0].cycle, CycleId::new(2026, 11));
        assert_eq!(totals[0].usage_bytes, mb(80));
        assert_eq!(totals[0].allowance_bytes, mb(90));
        assert!(!totals[0].final_total);
        assert_eq!(totals[0].at, ts(&dec(1, 0, 0)));
        // Within the lateness, a member's November record crosses the
        // closed cycle's allowance: reported for the pool, no cut.
        let out = s.rec(3, "c-nov", &nov(30, 23, 50), mb(11));
        assert!(accounted(&out)[0].counted);
        let crossings = late_crossings(&out);
        assert_eq!(crossings.len(), 1, "{out:#?}");
        assert_eq!(crossings[0].pool.as_ref().map(|p| p.as_str()), Some("p1"));
        assert_eq!(crossings[0].usage_bytes, mb(91));
        assert_eq!(crossings[0].limit_bytes, mb(90));
        assert!(card_events(&out).is_empty());
        assert!(pool_events(&out).is_empty());
        assert_eq!(s.pool("p1").usage_bytes, 0);
        // When the lateness has passed: the final total, every counted byte.
        let out = s.tick(&dec(1, 3, 0));
        let totals = pool_totals(&out);
        assert_eq!(totals.len(), 1, "{out:#?}");
        assert!(totals[0].final_total);
        assert_eq!(totals[0].usage_bytes, mb(91));
        assert_eq!(totals[0].at, ts("2026-12-01T02:00:00.001+08:00"));
    });
}

#[test]
fn a_record_its_lane_saw_the_cycle_close_counts_toward_it_at_the_rollover() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        s.active(2, "cmcc-30m");
        s.tick(&nov(30, 12, 0));
        s.engine.declare_lanes(2);
        s.rec_from(Lane(0), &usage(1, "a", &nov(30, 22, 0), mb(1)));
        s.rec_from(Lane(1), &usage(2, "b", &nov(30, 22, 0), mb(29)));
        // Lane 1 crosses midnight; lane 0 (and so the clock) has not.
        s.rec_from(Lane(1), &usage(2, "b-dec", &dec(1, 0, 30), mb(1)));
        assert_eq!(s.view(2).cycle, CycleId::new(2026, 11));
        // A November record of lane 1: the closed cycle's, as it would be
        // had lane 0 been read as far. Counted, but not yet toward it.
        let out = s.rec_from(Lane(1), &usage(2, "b-nov", &nov(30, 23, 0), mb(2)));
        assert!(accounted(&out)[0].counted, "{out:#?}");
        assert!(late_crossings(&out).is_empty());
        assert!(card_events(&out).is_empty());
        // Lane 0 crosses: the rollover, then the kept record's crossing.
        let out = s.rec_from(Lane(0), &usage(1, "a-dec", &dec(1, 0, 40), mb(1)));
        let crossings = late_crossings(&out);
        assert_eq!(crossings.len(), 1, "{out:#?}");
        assert_eq!(crossings[0].iccid, Some(ic(2)));
        assert_eq!(crossings[0].usage_bytes, mb(31));
        assert_eq!(crossings[0].cycle, CycleId::new(2026, 11));
        no_event_of(&out, 2);
        assert_eq!(s.state(2), active_state());
        assert_eq!(s.view(2).usage_bytes, mb(1));
    });
}

// ===== section 4: records, dedupe, rejection =================================

#[test]
fn usage_of_a_record_is_bytes_up_plus_bytes_down() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        let mut u = usage(1, "r1", &nov(10, 1, 0), 0);
        u.bytes_up = 12345;
        u.bytes_down = 67890;
        s.rec_usage(&u);
        assert_eq!(s.view(1).usage_bytes, 80235);
    });
}

#[test]
fn a_record_id_is_counted_once_per_card_ever() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        s.active(2, "cmcc-30m");
        s.rec(1, "r1", &nov(10, 1, 0), mb(1));
        let out = s.rec(1, "r1", &nov(10, 1, 0), mb(1));
        assert!(
            matches!(&out[..], [Output::Duplicate { record_id, .. }] if record_id.as_str() == "r1"),
            "{out:#?}"
        );
        // A resend with other content is still the same record.
        let out = s.rec(1, "r1", &nov(10, 2, 0), mb(7));
        assert!(matches!(&out[..], [Output::Duplicate { .. }]), "{out:#?}");
        assert_eq!(s.view(1).usage_bytes, mb(1));
        // The same id on another card is another record.
        let out = s.rec(2, "r1", &nov(10, 1, 0), mb(1));
        assert!(accounted(&out)[0].counted);
        assert_eq!(s.view(2).usage_bytes, mb(1));
        // Much later (next cycle, weeks on), the same resend: still a
        // duplicate (its window bucket is gone; the id store decides).
        s.tick(&dec(20, 0, 0));
        let out = s.rec(1, "r1", &nov(10, 1, 0), mb(1));
        assert!(matches!(&out[..], [Output::Duplicate { .. }]), "{out:#?}");
        assert_eq!(s.view(1).usage_bytes, 0);
    });
}

/// The documented limit of the default dedupe: an id reused with a new
/// `end` inside the hot window after its original left the window is not
/// checked against the id store. `dedupe_verify_misses` closes it.
#[test]
fn an_id_reused_with_a_new_end_weeks_later_needs_verify_misses() {
    use flowcap_engine::command::parse_command;
    use flowcap_engine::{Engine, EngineConfig, Iccid, RecordId, Timestamp, Usage};
    let run = |verify: bool| {
        let mut engine = Engine::new(EngineConfig {
            shards: 1,
            dedupe_verify_misses: verify,
            ..Default::default()
        });
        let mut out = Vec::new();
        let at = "2026-11-01T00:00:00+08:00";
        for line in [
            format!(
                r#"{{"id":"p","type":"upsert_plan","at":"{at}","plan":{{"id":"pl","carrier":"ctcc","allowance_mb":1000,"traffic":"directed"}}}}"#
            ),
            format!(
                r#"{{"id":"c","type":"upsert_card","at":"{at}","card":{{"iccid":"89860300000000000001","carrier":"ctcc","plan":"pl","state":"active"}}}}"#
            ),
        ] {
            engine.process_command(parse_command(line.as_bytes()).unwrap(), 0, &mut out);
        }
        let usage = |end: &str| Usage {
            record_id: RecordId::new("r1").unwrap(),
            iccid: Iccid::parse("89860300000000000001").unwrap(),
            start: None,
            end: Timestamp::parse_rfc3339(end).unwrap(),
            bytes_up: 1,
            bytes_down: 0,
            carrier: None,
            imei: None,
        };
        engine.advance_clock(
            Timestamp::parse_rfc3339("2026-11-10T00:00:00+08:00").unwrap(),
            &mut out,
        );
        engine
            .process_usage(&usage("2026-11-10T01:00:00+08:00"), 1, &mut out)
            .unwrap();
        assert!(matches!(out.last(), Some(Output::Accounted(a)) if a.counted));
        engine.advance_clock(
            Timestamp::parse_rfc3339("2026-11-20T00:00:00+08:00").unwrap(),
            &mut out,
        );
        let mut later = Vec::new();
        engine
            .process_usage(&usage("2026-11-20T01:00:00+08:00"), 2, &mut later)
            .unwrap();
        later
    };
    let verified = run(true);
    assert!(
        matches!(&verified[..], [Output::Duplicate { .. }]),
        "{verified:#?}"
    );
    assert!(matches!(run(false).first(), Some(Output::Accounted(_))));
}

#[test]
fn unknown_card_and_far_future_records_are_rejected_with_a_reason() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        s.rec(1, "r0", &nov(10, 1, 0), 1);
        let out = s.rec(99, "r1", &nov(10, 2, 0), 1);
        assert!(
            matches!(&out[..], [Output::Rejected(r)] if r.code == "unknown_card"),
            "{out:#?}"
        );
        // More than max_future_ms (1 day) ahead of the event clock.
        let out = s.rec(1, "r2", &nov(12, 2, 0), 1);
        assert!(
            matches!(&out[..], [Output::Rejected(r)] if r.code == "future_time"),
            "{out:#?}"
        );
        assert_eq!(s.view(1).usage_bytes, 1);
        assert_eq!(
            s.engine.clock(),
            ts(&nov(10, 1, 0)),
            "rejections do not move the clock"
        );
        // Not remembered by the dedupe: the same id is accepted once valid.
        let out = s.rec(1, "r2", &nov(10, 3, 0), 1);
        assert!(accounted(&out)[0].counted);
    });
}

// ===== section 5: validation =================================================

#[test]
fn threshold_is_accepted_for_ctcc_everywhere_but_for_cmcc_and_cucc_only_in_a_forward_pool() {
    scenario(|s| {
        s.active(1, "ctcc-30m");
        s.active(2, "cmcc-30m");
        s.active(3, "cucc-30m");
        s.active(4, "cmcc-30m");
        s.active(5, "cucc-30m");
        s.active(6, "cmcc-30m");
        s.ok("set_threshold", json!({"iccids": iccids(&[1]), "mb": 10}));
        assert_eq!(s.view(1).threshold_mb, 10);
        for n in [2, 3] {
            s.card_fails(
                "set_threshold",
                json!({"iccids": iccids(&[n]), "mb": 10}),
                ErrorCode::ThresholdNotAllowed,
            );
            assert_eq!(s.view(n).threshold_mb, -1);
        }
        s.forward_pool("pm", "cmcc-30m", &[4]);
        s.forward_pool("pu", "cucc-30m", &[5]);
        s.backward_pool("bp", "cmcc", &[6]);
        s.ok(
            "set_threshold",
            json!({"iccids": iccids(&[4, 5]), "mb": 10}),
        );
        assert_eq!(s.view(4).threshold_mb, 10);
        assert_eq!(s.view(5).threshold_mb, 10);
        s.card_fails(
            "set_threshold",
            json!({"iccids": iccids(&[6]), "mb": 10}),
            ErrorCode::ThresholdNotAllowed,
        );
        s.fails(
            "set_threshold",
            json!({"iccids": iccids(&[1]), "mb": -2}),
            ErrorCode::InvalidThreshold,
        );
    });
}

#[test]
fn a_card_holds_at_most_10_tags() {
    scenario(|s| {
        for t in 0..11 {
            s.ok("upsert_tag", json!({"tag": {"name": format!("t{t}")}}));
        }
        let ten: Vec<String> = (0..10).map(|t| format!("t{t}")).collect();
        let eleven: Vec<String> = (0..11).map(|t| format!("t{t}")).collect();
        s.card_with(1, "cmcc-30m", "active", json!({"tags": ten}));
        assert_eq!(s.view(1).tags.len(), 10);
        s.card_fails(
            "bind_tags",
            json!({"iccids": iccids(&[1]), "tags": ["t10"]}),
            ErrorCode::TooManyTags,
        );
        assert_eq!(s.view(1).tags.len(), 10);
        s.fails(
            "upsert_card",
            json!({"card": {"iccid": iccid_text(2), "carrier": "cmcc", "plan": "cmcc-30m",
                "state": "active", "tags": eleven}}),
            ErrorCode::TooManyTags,
        );
        assert!(s.engine.card_view(ic(2)).is_none(), "nothing created");
        // Rebinding a tag the card already has is not an 11th.
        s.ok("bind_tags", json!({"iccids": iccids(&[1]), "tags": ["t0"]}));
    });
}

#[test]
fn the_views_after_an_iccid_are_the_rest_of_the_ordered_views() {
    // The API's card pages start after a cursor ICCID without building
    // the views before it.
    scenario(|s| {
        for n in [4, 1, 3, 2, 5] {
            s.active(n, "cmcc-30m");
        }
        let all = s.engine.card_views();
        assert_eq!(all.len(), 5);
        assert_eq!(s.engine.card_views_after(None).collect::<Vec<_>>(), all);
        let after = s.engine.card_views_after(Some(all[1].iccid));
        assert_eq!(after.collect::<Vec<_>>(), all[2..]);
        let last = s.engine.card_views_after(Some(all[4].iccid));
        assert_eq!(last.count(), 0);
    });
}

#[test]
fn a_snapshot_copy_views_every_card_as_the_engine_did_at_the_copy() {
    // A snapshot's cut builds the cards dump from its copy, off the
    // inputs' path: plans, tags, pools and usage must be the engine's.
    scenario(|s| {
        s.ok("upsert_tag", json!({"tag": {"name": "fleet"}}));
        s.card_with(1, "cmcc-30m", "active", json!({"tags": ["fleet"]}));
        s.active(2, "cmcc-50m");
        s.active(3, "ctcc-30m");
        s.rec(2, "r1", "2026-03-10T10:00:00+08:00", 40 << 20);
        let copy = s.engine.snapshot_copy();
        let at_copy = s.engine.card_views();
        assert_eq!(copy.card_views(), at_copy);
        assert_eq!(at_copy[0].tags, vec![flowcap_engine::TagId::from("fleet")]);
        assert!(at_copy.iter().all(|v| v.plan.is_some()));
        // The engine goes on; the copy stays at its position.
        s.rec(3, "r2", "2026-03-10T10:01:00+08:00", 1 << 20);
        s.ok(
            "unbind_tags",
            json!({"iccids": iccids(&[1]), "tags": ["fleet"]}),
        );
        assert_ne!(s.engine.card_views(), at_copy);
        assert_eq!(copy.card_views(), at_copy);
    });
}

#[test]
fn an_operator_has_at_most_10_000_tags() {
    scenario(|s| {
        for t in 0..10_000 {
            s.ok("upsert_tag", json!({"tag": {"name": format!("tag-{t}")}}));
        }
        s.fails(
            "upsert_tag",
            json!({"tag": {"name": "one-too-many"}}),
            ErrorCode::TagLimitReached,
        );
        // Updating an existing tag is not a new one.
        s.ok(
            "upsert_tag",
            json!({"tag": {"name": "tag-5", "description": "x"}}),
        );
        s.ok("remove_tag", json!({"tag": "tag-5"}));
        s.ok("upsert_tag", json!({"tag": {"name": "now-fits"}}));
    });
}

#[test]
fn a_tag_referenced_by_an_enabled_rule_cannot_be_removed() {
    scenario(|s| {
        s.ok("upsert_tag", json!({"tag": {"name": "fleet"}}));
        s.active(1, "cmcc-30m");
        s.ok(
            "bind_tags",
            json!({"iccids": iccids(&[1]), "tags": ["fleet"]}),
        );
        s.ok(
            "upsert_rule",
            json!({"rule": {"id": "r1", "type": 2, "condition": {"used_mb_gte": 10},
                "filter": {"tags": ["fleet"]}, "actions": [{"type": "email", "to": ["ops@example.com"]}]}}),
        );
        s.fails("remove_tag", json!({"tag": "fleet"}), ErrorCode::TagInUse);
        assert_eq!(s.view(1).tags.len(), 1);
        s.ok("disable_rule", json!({"rule": "r1"}));
        s.ok("remove_tag", json!({"tag": "fleet"}));
        assert!(s.view(1).tags.is_empty());
    });
}

#[test]
fn at_most_6_custom_attribute_names() {
    scenario(|s| {
        let seven: Vec<String> = (0..7).map(|i| format!("a{i}")).collect();
        s.fails(
            "set_attribute_names",
            json!({"names": seven}),
            ErrorCode::InvalidAttribute,
        );
        s.fails(
            "upsert_card",
            json!({"card": {"iccid": iccid_text(1), "carrier": "cmcc", "plan": "cmcc-30m",
                "attributes": {"a0": "x"}}}),
            ErrorCode::InvalidAttribute,
        );
        let six: Vec<String> = (0..6).map(|i| format!("a{i}")).collect();
        s.ok("set_attribute_names", json!({"names": six}));
        s.card_with(
            1,
            "cmcc-30m",
            "active",
            json!({"attributes": {"a0": "x", "a5": "y"}}),
        );
    });
}

#[test]
fn forward_pool_members_must_share_carrier_traffic_type_and_plan() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        s.active(2, "cmcc-50m");
        s.active(3, "ctcc-30m");
        s.active(4, "cmcc-gen");
        s.forward_pool("p1", "cmcc-30m", &[1]);
        for n in [2, 3, 4] {
            s.card_fails(
                "add_pool_members",
                json!({"pool": "p1", "iccids": iccids(&[n])}),
                ErrorCode::PoolMemberMismatch,
            );
            assert_eq!(s.view(n).pool, None);
        }
        // A member cannot switch to another plan.
        s.fails(
            "upsert_card",
            json!({"card": {"iccid": iccid_text(1), "carrier": "cmcc", "plan": "cmcc-50m",
                "state": "active"}}),
            ErrorCode::PoolMemberMismatch,
        );
        assert_eq!(
            s.view(1).plan.as_ref().map(|p| p.to_string()),
            Some("cmcc-30m".into())
        );
        // A card is in at most one pool.
        s.active(5, "cmcc-30m");
        s.forward_pool("p2", "cmcc-30m", &[5]);
        s.card_fails(
            "add_pool_members",
            json!({"pool": "p2", "iccids": iccids(&[1])}),
            ErrorCode::AlreadyInPool,
        );
        assert_eq!(s.pool("p1").allowance_bytes, mb(30));
    });
}

#[test]
fn batch_of_100_001_cards_is_rejected_and_changes_nothing() {
    let mut s = Sim::new(1);
    s.setup();
    s.active(1, "cmcc-30m");
    let mut cards: Vec<String> = (1..=100_001).map(iccid_text).collect();
    let err = s.fails(
        "suspend",
        json!({ "iccids": cards }),
        ErrorCode::BatchTooLarge,
    );
    assert!(err.message.contains("100000"), "{}", err.message);
    assert_eq!(s.state(1), active_state());
    // 100,000 is accepted (all but card 1 unknown, reported per card).
    cards.truncate(100_000);
    let result = s.cmd("suspend", json!({ "iccids": cards }));
    assert!(result.error.is_none());
    assert_eq!(result.results.len(), 100_000);
    assert!(result.results[0].ok);
    assert_eq!(s.state(1), active_suspended(&["manual"]));
}

#[test]
fn empty_batch_and_duplicate_card_in_a_batch_are_rejected_whole() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        s.active(2, "cmcc-30m");
        s.fails("suspend", json!({"iccids": []}), ErrorCode::EmptyBatch);
        s.fails(
            "suspend",
            json!({"iccids": iccids(&[2, 1, 2])}),
            ErrorCode::DuplicateCard,
        );
        assert_eq!(s.state(1), active_state());
        assert_eq!(s.state(2), active_state());
    });
}

#[test]
fn each_card_of_a_batch_succeeds_or_fails_on_its_own() {
    scenario(|s| {
        for n in [1, 2, 3] {
            s.active(n, "cmcc-30m");
        }
        s.ok("deregister", json!({"iccids": iccids(&[3])}));
        let result = s.cmd("resume", json!({"iccids": iccids(&[1, 99, 3, 2])}));
        assert!(!result.ok);
        assert!(result.error.is_none());
        let summary: Vec<_> = result
            .results
            .iter()
            .map(|r| (r.iccid, r.ok, r.error.as_ref().map(|e| e.code)))
            .collect();
        assert_eq!(
            summary,
            [
                (ic(1), true, None),
                (ic(99), false, Some(ErrorCode::UnknownCard)),
                (ic(3), false, Some(ErrorCode::Deregistered)),
                (ic(2), true, None),
            ]
        );
        let result = s.cmd("suspend", json!({"iccids": iccids(&[1, 99, 2])}));
        assert!(!result.ok);
        assert_eq!(s.state(1), active_suspended(&["manual"]));
        assert_eq!(s.state(2), active_suspended(&["manual"]));
    });
}

#[test]
fn a_repeated_command_id_is_answered_with_the_first_result_and_changes_nothing() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        let line = |ty: &str, n: u32, id: &str| {
            format!(
                r#"{{"id":"{id}","type":"{ty}","at":"{}","iccids":["{}"]}}"#,
                nov(10, 5, 0),
                iccid_text(n)
            )
        };
        let (first, _) = s.line(&line("suspend", 1, "same"));
        assert!(first.ok);
        let (again, out) = s.line(&line("resume", 1, "same"));
        assert_eq!(again, first);
        assert!(card_events(&out).is_empty());
        assert!(
            matches!(&out[..], [Output::Journal(j)] if j.repeat),
            "{out:#?}"
        );
        assert_eq!(s.state(1), active_suspended(&["manual"]));
        // Also a failed first attempt.
        let (failed, _) = s.line(&line("resume", 99, "bad"));
        assert!(!failed.ok);
        let (again, _) = s.line(&line("resume", 1, "bad"));
        assert_eq!(again, failed);
        assert_eq!(s.state(1), active_suspended(&["manual"]));
    });
}

#[test]
fn unknown_type_and_malformed_commands_are_parse_errors() {
    let e = parse_command(br#"{"id":"x","type":"explode","at":"2026-11-01T00:00:00+08:00"}"#)
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::UnknownType);
    let e = parse_command(br#"{"id":"x","at":"2026-11-01T00:00:00+08:00"}"#).unwrap_err();
    assert_eq!(e.code, ErrorCode::Malformed);
    let e = parse_command(br#"{"id":"x","type":"suspend","at":"2026-11-01T00:00:00+08:00"}"#)
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Malformed);
    // A known type with a bad enum value inside is malformed, not an
    // unknown type.
    let e = parse_command(
        br#"{"id":"x","type":"upsert_plan","at":"2026-11-01T00:00:00+08:00",
            "plan":{"id":"p","carrier":"att","allowance_mb":1,"traffic":"general"}}"#,
    )
    .unwrap_err();
    assert_eq!(e.code, ErrorCode::Malformed, "{}", e.message);
    let e = parse_command(
        br#"{"id":"x","type":"create_pool","at":"2026-11-01T00:00:00+08:00",
            "pool":{"id":"p","kind":"sideways"}}"#,
    )
    .unwrap_err();
    assert_eq!(e.code, ErrorCode::Malformed, "{}", e.message);
}

#[test]
fn unknown_card_plan_pool_rule_webhook_and_tag_have_their_own_codes() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        s.card_fails(
            "suspend",
            json!({"iccids": iccids(&[42])}),
            ErrorCode::UnknownCard,
        );
        s.fails(
            "add_on",
            json!({"iccid": iccid_text(42), "mb": 1}),
            ErrorCode::UnknownCard,
        );
        s.fails(
            "rebind",
            json!({"iccid": iccid_text(42)}),
            ErrorCode::UnknownCard,
        );
        s.fails(
            "upsert_card",
            json!({"card": {"iccid": iccid_text(2), "carrier": "cmcc", "plan": "nope"}}),
            ErrorCode::UnknownPlan,
        );
        s.fails(
            "remove_plan",
            json!({"plan": "nope"}),
            ErrorCode::UnknownPlan,
        );
        s.fails(
            "add_pool_members",
            json!({"pool": "nope", "iccids": iccids(&[1])}),
            ErrorCode::UnknownPool,
        );
        s.fails(
            "freeze_pool",
            json!({"pool": "nope"}),
            ErrorCode::UnknownPool,
        );
        s.fails(
            "add_on",
            json!({"pool": "nope", "mb": 1}),
            ErrorCode::UnknownPool,
        );
        s.fails(
            "enable_rule",
            json!({"rule": "nope"}),
            ErrorCode::UnknownRule,
        );
        s.fails(
            "disable_rule",
            json!({"rule": "nope"}),
            ErrorCode::UnknownRule,
        );
        s.fails(
            "remove_rule",
            json!({"rule": "nope"}),
            ErrorCode::UnknownRule,
        );
        s.fails(
            "remove_webhook",
            json!({"webhook": "nope"}),
            ErrorCode::UnknownWebhook,
        );
        s.fails(
            "upsert_rule",
            json!({"rule": {"id": "r", "type": 2, "condition": {"used_mb_gte": 1},
                "actions": [{"type": "webhook", "endpoint": "nope"}]}}),
            ErrorCode::UnknownWebhook,
        );
        s.fails("remove_tag", json!({"tag": "nope"}), ErrorCode::UnknownTag);
        s.fails(
            "bind_tags",
            json!({"iccids": iccids(&[1]), "tags": ["nope"]}),
            ErrorCode::UnknownTag,
        );
        assert!(s.engine.card_view(ic(2)).is_none());
        assert_eq!(s.state(1), active_state());
    });
}

#[test]
fn plan_in_use_cannot_be_removed() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        s.fails(
            "remove_plan",
            json!({"plan": "cmcc-30m"}),
            ErrorCode::PlanInUse,
        );
        s.ok("remove_plan", json!({"plan": "tri-30m"}));
    });
}

// ===== determinism ===========================================================

fn busy_day(s: &mut Sim) {
    s.setup();
    for n in 1..=6 {
        s.active(n, "cmcc-30m");
    }
    s.card_with(7, "cmcc-30m", "activatable", json!({}));
    s.forward_pool("p1", "cmcc-30m", &[1, 2, 7]);
    s.backward_pool("bp", "cmcc", &[3, 4]);
    backward_rule(s, 20);
    s.ok("suspend", json!({"iccids": iccids(&[5])}));
    s.tick(&nov(30, 20, 0));
    for (i, n) in [1, 2, 3, 4, 5, 6, 7, 1, 2, 3].into_iter().enumerate() {
        s.rec(n, &format!("r{i}"), &nov(30, 21, i as u32), mb(15));
    }
    s.rec(1, "r0", &nov(30, 21, 0), mb(15));
    s.rec(6, "dec", &dec(1, 0, 1), mb(1));
    s.at = dec(1, 1, 0);
    s.ok("resume", json!({"iccids": iccids(&[5])}));
}

#[test]
fn the_same_inputs_give_identical_outputs_and_event_ids() {
    for shards in [1, 3] {
        let mut a = Sim::new(shards);
        busy_day(&mut a);
        let mut b = Sim::new(shards);
        busy_day(&mut b);
        assert_eq!(a.log, b.log);
        assert_eq!(a.engine.card_views(), b.engine.card_views());
        assert!(card_events(&a.log).len() >= 6, "{:#?}", card_events(&a.log));
    }
}

#[test]
fn event_ids_are_unique_and_differ_for_different_causes() {
    let mut s = Sim::new(1);
    busy_day(&mut s);
    let ids: Vec<String> = s
        .log
        .iter()
        .filter_map(|o| match o {
            Output::Action(a) => Some(a.id().to_owned()),
            _ => None,
        })
        .collect();
    let unique: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "event ids repeat");
    // Card 5: suspended by one command, resumed by another: different ids.
    let five: Vec<_> = card_events(&s.log)
        .into_iter()
        .filter(|e| e.iccid == ic(5))
        .collect();
    assert_eq!(five.len(), 2);
    assert_ne!(five[0].id, five[1].id);
    assert_eq!(five[0].id.len(), 32);
}

#[test]
fn a_silent_period_already_over_at_upsert_activates_at_its_end() {
    scenario(|s| {
        s.card_with(
            1,
            "cmcc-30m",
            "activatable",
            json!({"silent_ends_at": "2026-11-05T00:00:00+08:00"}),
        );
        let v = s.view(1);
        assert_eq!(v.state, CardState::Active);
        assert_eq!(v.activated_at, Some(ts("2026-11-05T00:00:00+08:00")));
        assert_eq!(v.expires_at, Some(ts("2027-11-05T00:00:00+08:00")));
    });
}

#[test]
fn leaving_a_forward_pool_takes_usage_out_and_the_card_is_judged_on_its_own_plan() {
    scenario(|s| {
        for n in [1, 2, 3] {
            s.active(n, "cmcc-30m");
        }
        s.forward_pool("p1", "cmcc-30m", &[1, 2, 3]);
        s.rec(1, "a1", &nov(10, 1, 0), mb(95));
        for n in [1, 2, 3] {
            assert_eq!(s.state(n), active_suspended(&["pool_exhausted"]));
        }
        s.at = nov(10, 2, 0);
        let out = s.ok(
            "remove_pool_members",
            json!({"pool": "p1", "iccids": iccids(&[1])}),
        );
        // Card 1 alone: 95 MB of its 30 MB plan.
        let e = event_of(&out, 1);
        assert_eq!(states(&e), st("suspended", "suspended"));
        assert_eq!(reasons(&e), ["over_quota"]);
        for n in [2, 3] {
            assert_eq!(states(&event_of(&out, n)), st("suspended", "active"));
        }
        let p = s.pool("p1");
        assert_eq!((p.usage_bytes, p.allowance_bytes), (0, mb(60)));
        assert_eq!(s.view(1).pool, None);
    });
}

// ===== renewal and plan terms: bounded months ================================

#[test]
fn renew_with_huge_months_is_refused_and_changes_nothing() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        let before = s.view(1);
        for months in [1u64 << 31, u64::from(u32::MAX), 73] {
            let e = s.fails(
                "renew",
                json!({"iccids": iccids(&[1]), "months": months}),
                ErrorCode::InvalidMonths,
            );
            assert!(e.message.contains("6 years"), "{}", e.message);
            assert_eq!(s.view(1), before, "renew {months} changed the card");
        }
    });
}

#[test]
fn renewal_may_not_reach_beyond_6_years_from_the_command() {
    scenario(|s| {
        // Expires 2027-01-05; the command is at 2026-11-10, so 6 years
        // reach 2032-11-10: 70 months more fit, 71 do not.
        s.active(1, "cmcc-30m");
        s.active(2, "cmcc-30m");
        s.card_fails(
            "renew",
            json!({"iccids": iccids(&[1]), "months": 71}),
            ErrorCode::InvalidMonths,
        );
        assert_eq!(s.view(1).expires_at, Some(ts("2027-01-05T00:00:00+08:00")));
        s.ok("renew", json!({"iccids": iccids(&[1]), "months": 70}));
        assert_eq!(s.view(1).expires_at, Some(ts("2032-11-05T00:00:00+08:00")));
        // Renewals add up: the next month would pass the bound.
        s.card_fails(
            "renew",
            json!({"iccids": iccids(&[1]), "months": 1}),
            ErrorCode::InvalidMonths,
        );
        // In a batch, only the card that would pass the bound is refused.
        let result = s.cmd("renew", json!({"iccids": iccids(&[1, 2]), "months": 12}));
        let codes: Vec<_> = result
            .results
            .iter()
            .map(|r| r.error.as_ref().map(|e| e.code))
            .collect();
        assert_eq!(codes, [Some(ErrorCode::InvalidMonths), None]);
        assert_eq!(s.view(2).expires_at, Some(ts("2028-01-05T00:00:00+08:00")));
    });
}

#[test]
fn a_plan_term_beyond_6_years_is_refused_and_the_plan_kept() {
    scenario(|s| {
        for term in [u64::from(u32::MAX), 1 << 31, 73] {
            let e = s.fails(
                "upsert_plan",
                json!({"plan": {"id": "cmcc-30m", "name": "x", "carrier": "cmcc",
                    "allowance_mb": 30, "traffic": "directed", "term_months": term}}),
                ErrorCode::InvalidMonths,
            );
            assert!(e.message.contains("term_months"), "{}", e.message);
        }
        // The plan keeps its 12 months: a card activated now expires in a year.
        s.card_with(1, "cmcc-30m", "inactive", json!({}));
        s.ok("activate", json!({"iccids": iccids(&[1])}));
        assert_eq!(s.view(1).expires_at, Some(ts("2027-11-10T00:00:00+08:00")));
        s.ok(
            "upsert_plan",
            json!({"plan": {"id": "long", "name": "x", "carrier": "cmcc",
                "allowance_mb": 30, "traffic": "directed", "term_months": 72}}),
        );
    });
}

mod months_never_panic {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

        /// Any `months` and `term_months` a command can carry (all of u32,
        /// and beyond it) is answered, never a panic, and a refused command
        /// leaves the card as it was.
        #[test]
        fn random_months_never_panic(
            months in prop_oneof![0u64..200, any::<u32>().prop_map(u64::from), any::<u64>()],
            term in prop_oneof![0u64..200, any::<u32>().prop_map(u64::from)],
        ) {
            let mut s = Sim::new(1);
            s.setup();
            let plan = s.cmd(
                "upsert_plan",
                json!({"plan": {"id": "cmcc-p", "name": "p", "carrier": "cmcc",
                    "allowance_mb": 30, "traffic": "directed", "term_months": term}}),
            );
            prop_assert_eq!(plan.ok, term <= 72);
            s.card_with(1, "cmcc-30m", "inactive", json!({}));
            if plan.ok {
                s.card_with(2, "cmcc-p", "inactive", json!({}));
                s.ok("activate", json!({"iccids": iccids(&[2])}));
            }
            s.active(3, "cmcc-30m");
            let before = s.view(3);
            let body = json!({"iccids": iccids(&[3]), "months": months});
            let line = json!({"id": "r", "type": "renew", "at": s.at}).to_string();
            let mut command: serde_json::Value = serde_json::from_str(&line).unwrap();
            command.as_object_mut().unwrap().extend(body.as_object().unwrap().clone());
            match parse_command(command.to_string().as_bytes()) {
                Err(_) => prop_assert!(months > u64::from(u32::MAX)),
                Ok(_) => {
                    let result = s.cmd("renew", body);
                    if !result.ok {
                        prop_assert_eq!(s.view(3), before);
                    }
                    prop_assert_eq!(result.ok, (1..=70).contains(&months));
                }
            }
        }
    }
}
