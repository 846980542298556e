//! One test per carrier rule of SPEC section 2.1 and issue #27 (patching
//! a card, add-ons, renewal, device binding, pools), against the
//! accounting engine. Every scenario runs on one shard and on three (see
//! `common::scenario`), and both must agree.

mod common;

use common::*;
use flowcap_engine::command::{parse_command, ErrorCode};
use flowcap_engine::event::{CardStateEvent, Cause, DeadlineKind, PoolState};
use flowcap_engine::{CardState, Imei};
use serde_json::json;

fn st(a: &str, b: &str) -> (String, String) {
    (a.to_owned(), b.to_owned())
}

fn attrs(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

// ===== upsert_card on an existing card: a patch ==============================

fn full_card(s: &mut Sim) {
    s.ok("upsert_tag", json!({"tag": {"name": "fleet-a"}}));
    s.ok("upsert_tag", json!({"tag": {"name": "fleet-b"}}));
    s.ok(
        "set_attribute_names",
        json!({"names": ["customer", "site"]}),
    );
    s.card_with(
        1,
        "cmcc-30m",
        "active",
        json!({"msisdn": "1440412345678", "imsi": "460041234567890",
            "imei": "864000000000001", "tags": ["fleet-a"],
            "attributes": {"customer": "acme", "site": "north"}}),
    );
}

#[test]
fn upsert_card_keeps_the_fields_it_leaves_out() {
    scenario(|s| {
        full_card(s);
        // Only the plan changes: identities, tags and attributes stay.
        s.ok(
            "upsert_card",
            json!({"card": {"iccid": iccid_text(1), "carrier": "cmcc", "plan": "cmcc-50m"}}),
        );
        let v = s.view(1);
        assert_eq!(v.plan.as_ref().map(|p| p.as_str()), Some("cmcc-50m"));
        assert_eq!(v.state.as_str(), "active");
        assert_eq!(v.msisdn.as_deref(), Some("1440412345678"));
        assert_eq!(v.imsi.as_deref(), Some("460041234567890"));
        assert_eq!(v.imei.as_deref(), Some("864000000000001"));
        assert_eq!(v.tags.len(), 1);
        assert_eq!(v.tags[0].as_str(), "fleet-a");
        assert_eq!(
            v.attributes,
            attrs(&[("customer", "acme"), ("site", "north")])
        );
    });
}

#[test]
fn upsert_card_sets_what_it_gives_and_merges_attributes_by_name() {
    scenario(|s| {
        full_card(s);
        s.ok(
            "upsert_card",
            json!({"card": {"iccid": iccid_text(1), "carrier": "cmcc", "plan": "cmcc-30m",
                "imei": "864000000000002", "tags": ["fleet-b"],
                "attributes": {"site": "south"}}}),
        );
        let v = s.view(1);
        assert_eq!(v.imei.as_deref(), Some("864000000000002"));
        assert_eq!(v.msisdn.as_deref(), Some("1440412345678"));
        assert_eq!(
            v.tags.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
            ["fleet-b"],
            "a tag list given replaces the card's tags"
        );
        assert_eq!(
            v.attributes,
            attrs(&[("customer", "acme"), ("site", "south")])
        );
    });
}

#[test]
fn upsert_card_clears_only_the_fields_it_names_in_clear() {
    scenario(|s| {
        full_card(s);
        s.ok(
            "upsert_card",
            json!({"card": {"iccid": iccid_text(1), "carrier": "cmcc", "plan": "cmcc-30m",
                "clear": ["imei", "tags", "attributes"]}}),
        );
        let v = s.view(1);
        assert_eq!(v.imei, None);
        assert!(v.tags.is_empty());
        assert!(v.attributes.is_empty());
        assert_eq!(v.msisdn.as_deref(), Some("1440412345678"));
        assert_eq!(v.imsi.as_deref(), Some("460041234567890"));
        // Clearing what is already empty is fine.
        s.ok(
            "upsert_card",
            json!({"card": {"iccid": iccid_text(1), "carrier": "cmcc", "plan": "cmcc-30m",
                "clear": ["imei", "msisdn"]}}),
        );
        assert_eq!(s.view(1).msisdn, None);
        assert_eq!(s.view(1).imsi.as_deref(), Some("460041234567890"));
    });
}

#[test]
fn upsert_card_refuses_a_field_both_given_and_cleared_and_changes_nothing() {
    scenario(|s| {
        full_card(s);
        let before = s.view(1);
        let e = s.fails(
            "upsert_card",
            json!({"card": {"iccid": iccid_text(1), "carrier": "cmcc", "plan": "cmcc-50m",
                "imei": "864000000000009", "clear": ["imei"]}}),
            ErrorCode::InvalidValue,
        );
        assert!(e.message.contains("imei is both"), "{}", e.message);
        assert_eq!(s.view(1), before);
        // An unknown field name in `clear` does not parse.
        let line = json!({"id": "bad-clear", "type": "upsert_card", "at": s.at,
            "card": {"iccid": iccid_text(1), "carrier": "cmcc", "plan": "cmcc-30m",
                "clear": ["plan"]}})
        .to_string();
        let e = parse_command(line.as_bytes()).expect_err("plan cannot be cleared");
        assert_eq!(e.code, ErrorCode::Malformed);
    });
}

// ===== add-ons: active cards, or cut for their usage only ====================

#[test]
fn add_on_is_sold_to_active_cards_and_cards_cut_for_usage() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        s.ok("add_on", json!({"iccid": iccid_text(1), "mb": 5}));
        s.rec(1, "r1", &nov(10, 1, 0), mb(40));
        assert_eq!(s.state(1).1, ["over_quota"]);
        s.at = nov(10, 2, 0);
        let out = s.ok("add_on", json!({"iccid": iccid_text(1), "mb": 10}));
        assert_eq!(states(&event_of(&out, 1)).1, "active");
        assert_eq!(s.view(1).addon_mb, 15);
        // Cut for usage and by the operator: the add-on is sold (and lifts
        // the usage reason only).
        s.rec(1, "r2", &nov(10, 3, 0), mb(10));
        s.ok("suspend", json!({"iccids": iccids(&[1])}));
        s.ok("add_on", json!({"iccid": iccid_text(1), "mb": 10}));
        assert_eq!(s.state(1).1, ["manual"]);
    });
}

#[test]
fn add_on_is_refused_to_cards_not_activated_or_cut_for_another_reason() {
    scenario(|s| {
        s.card_with(1, "cmcc-30m", "testable", json!({}));
        s.card_with(2, "cmcc-30m", "activatable", json!({}));
        s.card_with(3, "cmcc-30m", "inactive", json!({}));
        s.card_with(4, "cmcc-30m", "suspended", json!({}));
        s.active(5, "cmcc-30m");
        s.ok("report_violation", json!({"iccids": iccids(&[5])}));
        s.card_with(
            6,
            "cmcc-30m",
            "active",
            json!({"expires_at": "2026-11-01T00:00:00+08:00"}),
        );
        for n in 1..=6 {
            let before = s.view(n);
            let e = s.fails(
                "add_on",
                json!({"iccid": iccid_text(n), "mb": 10}),
                ErrorCode::AddOnNotAllowed,
            );
            assert!(e.message.contains(&iccid_text(n)), "{}", e.message);
            assert_eq!(s.view(n), before, "card {n} changed");
        }
    });
}

#[test]
fn add_on_may_not_take_a_general_card_past_the_100_mb_cap() {
    scenario(|s| {
        s.ok(
            "upsert_plan",
            json!({"plan": {"id": "cmcc-g60", "name": "g60", "carrier": "cmcc",
                "allowance_mb": 60, "traffic": "general", "term_months": 12}}),
        );
        s.active(1, "cmcc-g60");
        s.active(2, "cmcc-gen");
        s.ok("add_on", json!({"iccid": iccid_text(1), "mb": 30}));
        s.fails(
            "add_on",
            json!({"iccid": iccid_text(1), "mb": 11}),
            ErrorCode::GeneralCapExceeded,
        );
        // Exactly 100 MB is within the cap.
        s.ok("add_on", json!({"iccid": iccid_text(1), "mb": 10}));
        assert_eq!(s.view(1).addon_mb, 40);
        // A general plan already above the cap takes no add-on at all.
        let e = s.fails(
            "add_on",
            json!({"iccid": iccid_text(2), "mb": 1}),
            ErrorCode::GeneralCapExceeded,
        );
        assert!(e.message.contains("100 MB"), "{}", e.message);
        // Directed plans are not capped.
        s.active(3, "cmcc-30m");
        s.ok("add_on", json!({"iccid": iccid_text(3), "mb": 500}));
    });
}

// ===== renewal ===============================================================

#[test]
fn renewal_adds_the_months_to_the_old_expiry() {
    scenario(|s| {
        // Expires 2027-01-05; renewed on 2026-11-10.
        s.active(1, "cmcc-30m");
        s.ok("renew", json!({"iccids": iccids(&[1]), "months": 12}));
        assert_eq!(s.view(1).expires_at, Some(ts("2028-01-05T00:00:00+08:00")));
        // A suspended (activated) card is renewed too.
        s.card_with(2, "cmcc-30m", "suspended", json!({}));
        s.ok("renew", json!({"iccids": iccids(&[2]), "months": 1}));
        assert_eq!(s.view(2).expires_at, Some(ts("2027-02-05T00:00:00+08:00")));
    });
}

#[test]
fn renewal_is_refused_to_cards_never_activated() {
    scenario(|s| {
        s.card_with(1, "cmcc-30m", "testable", json!({}));
        s.card_with(2, "cmcc-30m", "activatable", json!({}));
        s.card_with(3, "cmcc-30m", "inactive", json!({}));
        for n in 1..=3 {
            s.card_fails(
                "renew",
                json!({"iccids": iccids(&[n]), "months": 12}),
                ErrorCode::NotActivated,
            );
            assert_eq!(s.view(n).expires_at, None);
        }
        s.active(4, "cmcc-30m");
        s.ok("deregister", json!({"iccids": iccids(&[4])}));
        s.card_fails(
            "renew",
            json!({"iccids": iccids(&[4]), "months": 12}),
            ErrorCode::Deregistered,
        );
    });
}

#[test]
fn renewal_is_refused_to_an_expired_card() {
    scenario(|s| {
        s.card_with(
            1,
            "cmcc-30m",
            "active",
            json!({"expires_at": "2026-11-10T12:00:00+08:00"}),
        );
        s.tick(&nov(10, 12, 0));
        assert_eq!(s.state(1).1, ["plan_expired"]);
        s.card_fails(
            "renew",
            json!({"iccids": iccids(&[1]), "months": 1}),
            ErrorCode::CardExpired,
        );
        assert_eq!(s.view(1).expires_at, Some(ts("2026-11-10T12:00:00+08:00")));
        assert_eq!(s.state(1).1, ["plan_expired"]);
    });
}

#[test]
fn renewal_is_refused_to_a_backward_pool_member_but_not_a_forward_one() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        s.active(2, "cmcc-30m");
        s.backward_pool("b1", "cmcc", &[1]);
        s.forward_pool("f1", "cmcc-30m", &[2]);
        s.card_fails(
            "renew",
            json!({"iccids": iccids(&[1]), "months": 1}),
            ErrorCode::InBackwardPool,
        );
        s.ok("renew", json!({"iccids": iccids(&[2]), "months": 1}));
        s.ok(
            "remove_pool_members",
            json!({"pool": "b1", "iccids": iccids(&[1])}),
        );
        s.ok("renew", json!({"iccids": iccids(&[1]), "months": 1}));
    });
}

#[test]
fn a_card_not_renewed_is_deregistered_when_the_grace_period_ends() {
    scenario_with(
        |c| c.expiry_grace_days = Some(10),
        |s| {
            s.card_with(
                1,
                "cmcc-30m",
                "active",
                json!({"expires_at": "2026-11-12T00:00:00+08:00"}),
            );
            s.card_with(
                2,
                "cmcc-30m",
                "active",
                json!({"expires_at": "2026-11-12T00:00:00+08:00"}),
            );
            s.backward_pool("b1", "cmcc", &[1]);
            // Card 2 is renewed in time, card 1 is not.
            s.ok("renew", json!({"iccids": iccids(&[2]), "months": 1}));
            let out = s.tick(&nov(12, 1, 0));
            assert_eq!(reasons(&event_of(&out, 1)), ["plan_expired"]);
            no_event_of(&out, 2);
            // One day before the grace ends: still suspended.
            let out = s.tick(&nov(21, 23, 0));
            no_event_of(&out, 1);
            let out = s.tick(&nov(22, 0, 0));
            let e = event_of(&out, 1);
            assert_eq!(states(&e), st("suspended", "deregistered"));
            assert_eq!(
                e.cause,
                Cause::Deadline {
                    kind: DeadlineKind::ExpiryGraceEnd,
                    at: ts(&nov(22, 0, 0))
                }
            );
            assert_eq!(e.event_time, ts(&nov(22, 0, 0)));
            let v = s.view(1);
            assert_eq!(v.state, CardState::Deregistered);
            assert_eq!(v.pool, None, "a closed card leaves its pool");
            assert_eq!(s.state(2), ("active".to_owned(), Vec::new()));
            // For good: usage is history only, commands are refused.
            let out = s.rec(1, "late-use", &nov(22, 1, 0), mb(1));
            assert!(accounted(&out).iter().all(|a| !a.counted));
            s.card_fails(
                "resume",
                json!({"iccids": iccids(&[1])}),
                ErrorCode::Deregistered,
            );
        },
    );
}

#[test]
fn a_card_expired_beyond_its_grace_at_upsert_is_deregistered_at_once() {
    scenario_with(
        |c| c.expiry_grace_days = Some(30),
        |s| {
            s.card_with(
                1,
                "cmcc-30m",
                "active",
                json!({"expires_at": "2026-09-01T00:00:00+08:00"}),
            );
            s.card_with(
                2,
                "cmcc-30m",
                "active",
                json!({"expires_at": "2026-10-20T00:00:00+08:00"}),
            );
            assert_eq!(s.view(1).state, CardState::Deregistered);
            assert_eq!(s.state(2).1, ["plan_expired"]);
        },
    );
}

#[test]
fn without_a_grace_period_an_expired_card_stays_suspended() {
    scenario(|s| {
        s.card_with(
            1,
            "cmcc-30m",
            "active",
            json!({"expires_at": "2026-09-01T00:00:00+08:00"}),
        );
        s.tick(&dec(31, 0, 0));
        assert_eq!(s.state(1).1, ["plan_expired"]);
    });
}

// ===== device binding ========================================================

const DEV_A: &str = "864000000000001";
const DEV_B: &str = "864000000000002";
const DEV_C: &str = "864000000000003";
const DEV_D: &str = "864000000000004";

/// A record of card `n` from device `imei`.
fn rec_in(s: &mut Sim, n: u32, id: &str, end: &str, imei: &str) -> Vec<flowcap_engine::Output> {
    let mut u = usage(n, id, end, 1000);
    u.imei = Imei::parse(imei.as_bytes());
    s.rec_usage(&u)
}

fn device(e: &CardStateEvent) -> Option<(Option<String>, String)> {
    e.device
        .map(|d| (d.bound.map(|b| b.to_string()), d.seen.to_string()))
}

#[test]
fn a_card_binds_to_the_device_of_its_first_record() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        s.active(2, "cmcc-30m");
        // A record without a device binds nothing.
        s.rec(1, "r0", &nov(10, 0, 30), 1000);
        assert_eq!(s.view(1).imei, None);
        let out = rec_in(s, 1, "r1", &nov(10, 1, 0), DEV_A);
        no_event_of(&out, 1);
        assert_eq!(s.view(1).imei.as_deref(), Some(DEV_A));
        assert_eq!(s.view(1).usage_bytes, 2000, "both records count");
        // Bound now: the same device again changes nothing.
        let out = rec_in(s, 1, "r2", &nov(10, 2, 0), DEV_A);
        no_event_of(&out, 1);
        // A record whose imei is not in digits binds nothing either.
        let mut u = usage(2, "r1", &nov(10, 1, 0), 1000);
        u.imei = Imei::parse(b"86400000000000X");
        s.rec_usage(&u);
        assert_eq!(s.view(2).imei, None);
    });
}

#[test]
fn cmcc_a_move_is_a_violation_that_only_a_rebind_lifts() {
    scenario(|s| {
        s.card_with(1, "cmcc-30m", "active", json!({"imei": DEV_A}));
        let out = rec_in(s, 1, "r1", &nov(10, 1, 0), DEV_B);
        let e = event_of(&out, 1);
        assert_eq!(states(&e), st("active", "suspended"));
        assert_eq!(reasons(&e), ["violation"]);
        assert_eq!(e.cause, record_cause(1, "r1"));
        assert_eq!(device(&e), Some((Some(DEV_A.to_owned()), DEV_B.to_owned())));
        assert_eq!(s.view(1).imei.as_deref(), Some(DEV_A), "still bound to A");
        assert_eq!(s.view(1).usage_bytes, 1000, "the record still counts");
        // resume does not lift it, nor does a new cycle.
        s.card_fails(
            "resume",
            json!({"iccids": iccids(&[1])}),
            ErrorCode::RebindRequired,
        );
        s.tick(&dec(1, 0, 1));
        assert_eq!(s.state(1).1, ["violation"]);
        // A rebind to the new device does.
        let out = s.ok("rebind", json!({"iccid": iccid_text(1), "imei": DEV_B}));
        assert_eq!(states(&event_of(&out, 1)), st("suspended", "active"));
        assert_eq!(s.view(1).imei.as_deref(), Some(DEV_B));
        let out = rec_in(s, 1, "r2", &dec(1, 1, 0), DEV_B);
        no_event_of(&out, 1);
        // A carrier-reported violation is still lifted by resume.
        s.ok("report_violation", json!({"iccids": iccids(&[1])}));
        s.ok("resume", json!({"iccids": iccids(&[1])}));
        assert_eq!(s.state(1).0, "active");
    });
}

#[test]
fn cmcc_a_rebind_without_an_imei_binds_the_next_device() {
    scenario(|s| {
        s.card_with(1, "cmcc-30m", "active", json!({"imei": DEV_A}));
        rec_in(s, 1, "r1", &nov(10, 1, 0), DEV_B);
        s.ok("rebind", json!({"iccid": iccid_text(1)}));
        assert_eq!(s.view(1).imei, None);
        let out = rec_in(s, 1, "r2", &nov(10, 2, 0), DEV_C);
        no_event_of(&out, 1);
        assert_eq!(s.view(1).imei.as_deref(), Some(DEV_C));
    });
}

#[test]
fn ctcc_a_move_cuts_the_network_while_the_card_stays_active() {
    scenario(|s| {
        s.card_with(1, "ctcc-30m", "active", json!({"imei": DEV_A}));
        let out = rec_in(s, 1, "r1", &nov(10, 1, 0), DEV_B);
        let e = event_of(&out, 1);
        assert_eq!(states(&e), st("active", "active"));
        assert!(e.reasons.is_empty(), "not a violation");
        assert_eq!(e.separated, Some(true));
        assert_eq!(device(&e), Some((Some(DEV_A.to_owned()), DEV_B.to_owned())));
        let v = s.view(1);
        assert_eq!(v.state, CardState::Active);
        assert!(v.separated);
        // More records from the new device: no new event.
        no_event_of(&rec_in(s, 1, "r2", &nov(10, 2, 0), DEV_B), 1);
        // A rebind to the new device restores the network.
        let out = s.ok("rebind", json!({"iccid": iccid_text(1), "imei": DEV_B}));
        let e = event_of(&out, 1);
        assert_eq!(e.separated, Some(false));
        assert!(!s.view(1).separated);
        assert_eq!(s.view(1).imei.as_deref(), Some(DEV_B));
    });
}

#[test]
fn ctcc_a_card_is_rebound_at_most_twice_a_calendar_month() {
    scenario(|s| {
        s.card_with(1, "ctcc-30m", "active", json!({"imei": DEV_A}));
        s.ok("rebind", json!({"iccid": iccid_text(1), "imei": DEV_B}));
        s.ok("rebind", json!({"iccid": iccid_text(1), "imei": DEV_C}));
        s.fails(
            "rebind",
            json!({"iccid": iccid_text(1), "imei": DEV_D}),
            ErrorCode::RebindLimit,
        );
        assert_eq!(s.view(1).imei.as_deref(), Some(DEV_C));
        s.tick(&dec(1, 0, 0));
        s.ok("rebind", json!({"iccid": iccid_text(1), "imei": DEV_D}));
        assert_eq!(s.view(1).imei.as_deref(), Some(DEV_D));
    });
}

#[test]
fn tri_cards_follow_the_ctcc_rule() {
    scenario(|s| {
        s.card_with(1, "tri-30m", "active", json!({"imei": DEV_A}));
        let e = event_of(&rec_in(s, 1, "r1", &nov(10, 1, 0), DEV_B), 1);
        assert_eq!(e.separated, Some(true));
        assert_eq!(s.view(1).state, CardState::Active);
    });
}

#[test]
fn cucc_the_third_device_change_in_a_calendar_month_is_a_violation() {
    scenario(|s| {
        s.card_with(1, "cucc-30m", "active", json!({"imei": DEV_A}));
        // Two changes: the card follows the device, nothing else.
        no_event_of(&rec_in(s, 1, "r1", &nov(10, 1, 0), DEV_B), 1);
        assert_eq!(s.view(1).imei.as_deref(), Some(DEV_B));
        no_event_of(&rec_in(s, 1, "r2", &nov(10, 2, 0), DEV_C), 1);
        assert_eq!(s.state(1).0, "active");
        // The third: carrier risk control.
        let out = rec_in(s, 1, "r3", &nov(10, 3, 0), DEV_D);
        let e = event_of(&out, 1);
        assert_eq!(reasons(&e), ["violation"]);
        assert_eq!(device(&e), Some((Some(DEV_C.to_owned()), DEV_D.to_owned())));
        // No rebind for cucc; the operator's resume lifts it.
        s.fails(
            "rebind",
            json!({"iccid": iccid_text(1), "imei": DEV_A}),
            ErrorCode::RebindNotOffered,
        );
        s.ok("resume", json!({"iccids": iccids(&[1])}));
        assert_eq!(s.state(1).0, "active");
    });
}

#[test]
fn cucc_device_changes_count_per_calendar_month_not_per_cycle() {
    scenario(|s| {
        s.card_with(1, "cucc-30m", "active", json!({"imei": DEV_A}));
        // The 28th and 29th are in cucc's December cycle but in November.
        s.tick(&nov(28, 0, 0));
        rec_in(s, 1, "r1", &nov(28, 1, 0), DEV_B);
        rec_in(s, 1, "r2", &nov(29, 1, 0), DEV_C);
        s.tick(&nov(30, 12, 0));
        let out = rec_in(s, 1, "r3", &dec(1, 1, 0), DEV_D);
        no_event_of(&out, 1);
        assert_eq!(s.state(1).0, "active");
        assert_eq!(s.view(1).imei.as_deref(), Some(DEV_D));
    });
}

// ===== test usage ============================================================

#[test]
fn test_period_usage_does_not_count_toward_the_first_cycle() {
    scenario(|s| {
        s.card_with(
            1,
            "cmcc-30m",
            "testable",
            json!({"test_allowance_mb": 10, "test_ends_at": "2027-01-01T00:00:00+08:00"}),
        );
        let out = s.rec(1, "t1", &nov(10, 1, 0), mb(8));
        assert!(accounted(&out)[0].counted, "history keeps test traffic");
        assert_eq!(s.view(1).usage_bytes, 0);
        // Using up the test allowance is still test traffic.
        let out = s.rec(1, "t2", &nov(10, 2, 0), mb(3));
        assert_eq!(states(&event_of(&out, 1)), st("testable", "activatable"));
        assert_eq!(s.view(1).usage_bytes, 0);
        // The plan's 30 MB start with activation: 25 MB do not cut, though
        // the card used 36 MB in all this month.
        let out = s.rec(1, "u1", &nov(10, 3, 0), mb(25));
        assert_eq!(states(&event_of(&out, 1)), st("activatable", "active"));
        assert_eq!(s.view(1).usage_bytes, mb(25));
        assert_eq!(s.state(1).0, "active");
        let out = s.rec(1, "u2", &nov(10, 4, 0), mb(6));
        assert_eq!(reasons(&event_of(&out, 1)), ["over_quota"]);
    });
}

// ===== pools =================================================================

#[test]
fn a_card_in_its_test_period_cannot_join_a_pool() {
    scenario(|s| {
        s.card_with(1, "cmcc-30m", "testable", json!({}));
        s.card_with(2, "cmcc-30m", "testable", json!({}));
        s.forward_pool("f1", "cmcc-30m", &[]);
        s.backward_pool("b1", "cmcc", &[]);
        for pool in ["f1", "b1"] {
            s.card_fails(
                "add_pool_members",
                json!({"pool": pool, "iccids": iccids(&[1])}),
                ErrorCode::TestPeriodCard,
            );
        }
        assert_eq!(s.view(1).pool, None);
        // Once out of its test period it may.
        s.ok("activate", json!({"iccids": iccids(&[2])}));
        s.ok(
            "add_pool_members",
            json!({"pool": "f1", "iccids": iccids(&[2])}),
        );
    });
}

#[test]
fn pool_rules_cannot_be_merged_into_one_webhook() {
    scenario(|s| {
        s.ok(
            "upsert_webhook",
            json!({"webhook": {"id": "hook", "url": "http://127.0.0.1:9/h"}}),
        );
        let e = s.fails(
            "upsert_rule",
            json!({"rule": {"id": "p", "type": 3, "condition": {"used_mb_gte": 10},
                "actions": [{"type": "webhook", "endpoint": "hook", "merge": true}]}}),
            ErrorCode::InvalidAction,
        );
        assert!(e.message.contains("not merged"), "{}", e.message);
        s.ok(
            "upsert_rule",
            json!({"rule": {"id": "p", "type": 3, "condition": {"used_mb_gte": 10},
                "actions": [{"type": "webhook", "endpoint": "hook", "merge": false}]}}),
        );
        // Card rules still merge.
        s.ok(
            "upsert_rule",
            json!({"rule": {"id": "c", "type": 2, "condition": {"used_mb_gte": 10},
                "actions": [{"type": "webhook", "endpoint": "hook", "merge": true}]}}),
        );
    });
}

#[test]
fn a_pool_can_be_renamed() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        s.forward_pool("f1", "cmcc-30m", &[1]);
        s.ok("rename_pool", json!({"pool": "f1", "name": "Fleet North"}));
        let p = s.pool("f1");
        assert_eq!(p.name, "Fleet North");
        assert_eq!(p.members.len(), 1);
        s.fails(
            "rename_pool",
            json!({"pool": "nope", "name": "x"}),
            ErrorCode::UnknownPool,
        );
    });
}

#[test]
fn a_forward_pool_whose_every_member_is_deregistered_is_abandoned() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        s.active(2, "cmcc-30m");
        s.active(3, "cmcc-30m");
        s.forward_pool("f1", "cmcc-30m", &[1, 2]);
        s.forward_pool("f2", "cmcc-30m", &[]);
        // A member leaving is not an abandonment, nor is an empty pool.
        s.ok(
            "remove_pool_members",
            json!({"pool": "f1", "iccids": iccids(&[2])}),
        );
        s.ok("deregister", json!({"iccids": iccids(&[2])}));
        assert_eq!(s.pool("f1").state, PoolState::Available);
        assert_eq!(s.pool("f2").state, PoolState::Available);
        let out = s.ok("deregister", json!({"iccids": iccids(&[1])}));
        let events = pool_events(&out);
        assert_eq!(events.len(), 1, "{events:#?}");
        assert_eq!(events[0].pool.as_str(), "f1");
        assert_eq!(events[0].new, PoolState::Abandoned);
        assert_eq!(s.pool("f1").state, PoolState::Abandoned);
        // It takes no member and no add-on any more; its plan is free.
        s.fails(
            "add_pool_members",
            json!({"pool": "f1", "iccids": iccids(&[3])}),
            ErrorCode::PoolAbandoned,
        );
        s.fails(
            "add_on",
            json!({"pool": "f1", "mb": 10}),
            ErrorCode::PoolAbandoned,
        );
    });
}

#[test]
fn a_forward_pool_is_abandoned_when_its_last_card_closes_at_the_grace_end() {
    scenario_with(
        |c| c.expiry_grace_days = Some(1),
        |s| {
            s.card_with(
                1,
                "cmcc-30m",
                "active",
                json!({"expires_at": "2026-11-11T00:00:00+08:00"}),
            );
            s.forward_pool("f1", "cmcc-30m", &[1]);
            let out = s.tick(&nov(12, 0, 0));
            assert_eq!(pool_events(&out)[0].new, PoolState::Abandoned);
        },
    );
}

// ===== backward pool in arrears ==============================================

/// Cards 1 and 2 in backward pool `bp`, frozen for arrears on the 10th; a
/// retention of 10 days.
fn frozen_backward_pool(s: &mut Sim) {
    s.active(1, "cmcc-30m");
    s.active(2, "cmcc-30m");
    s.backward_pool("bp", "cmcc", &[1, 2]);
    s.ok("freeze_pool", json!({"pool": "bp"}));
}

/// A member's state while its pool is in arrears.
fn held_for_arrears() -> (String, Vec<String>) {
    ("suspended".to_owned(), vec!["pool_frozen".to_owned()])
}

fn retention_days(days: u32) -> impl Fn(&mut flowcap_engine::EngineConfig) {
    move |c| c.pool_retention_days = days
}

#[test]
fn a_backward_pool_in_arrears_is_retained_then_abandoned_when_the_retention_ends() {
    scenario_with(retention_days(10), |s| {
        frozen_backward_pool(s);
        s.active(3, "cmcc-30m");
        let out = s.ok("retain_pool", json!({"pool": "bp"}));
        let events = pool_events(&out);
        assert_eq!(events.len(), 1, "{events:#?}");
        assert_eq!(
            (events[0].old, events[0].new),
            (PoolState::Frozen, PoolState::Retained)
        );
        // The members stay cut for the arrears; nothing changes for them.
        assert!(card_events(&out).is_empty(), "{out:#?}");
        let p = s.pool("bp");
        assert_eq!(p.retained_until, Some(ts(&nov(20, 0, 0))));
        // A repeated notice does not extend the retention.
        s.at = nov(15, 0, 0);
        let out = s.ok("retain_pool", json!({"pool": "bp"}));
        assert!(pool_events(&out).is_empty());
        assert_eq!(s.pool("bp").retained_until, Some(ts(&nov(20, 0, 0))));

        assert!(pool_events(&s.tick(&nov(19, 23, 59))).is_empty());
        let out = s.tick(&nov(20, 0, 1));
        let events = pool_events(&out);
        assert_eq!(events.len(), 1, "{events:#?}");
        assert_eq!(
            (events[0].old, events[0].new),
            (PoolState::Retained, PoolState::Abandoned)
        );
        assert_eq!(
            events[0].cause,
            Cause::Deadline {
                kind: DeadlineKind::RetentionEnd,
                at: ts(&nov(20, 0, 0))
            }
        );
        // Card data is kept: the cards stay members, held by the freeze.
        let p = s.pool("bp");
        assert_eq!(p.state, PoolState::Abandoned);
        assert_eq!(p.members.len(), 2);
        assert_eq!(p.abandoned_at, Some(ts(&nov(20, 0, 0))));
        assert_eq!(s.state(1), held_for_arrears());
        // It takes no member, no freeze and no retention any more.
        for (ty, body) in [
            (
                "add_pool_members",
                json!({"pool": "bp", "iccids": iccids(&[3])}),
            ),
            ("freeze_pool", json!({"pool": "bp"})),
            ("unfreeze_pool", json!({"pool": "bp"})),
            ("retain_pool", json!({"pool": "bp"})),
        ] {
            s.fails(ty, body, ErrorCode::PoolAbandoned);
        }
        // The operator may still take a card out (then it is on its own).
        let out = s.ok(
            "remove_pool_members",
            json!({"pool": "bp", "iccids": iccids(&[2])}),
        );
        assert_eq!(states(&event_of(&out, 2)), st("suspended", "active"));
    });
}

#[test]
fn an_abandoned_backward_pool_can_be_re_enabled_within_one_month() {
    scenario_with(retention_days(10), |s| {
        frozen_backward_pool(s);
        s.ok("retain_pool", json!({"pool": "bp"}));
        s.tick(&nov(25, 0, 0));
        assert_eq!(s.pool("bp").state, PoolState::Abandoned);
        // A month after the abandonment (20 November), to the minute.
        s.tick(&dec(20, 0, 0));
        let out = s.ok("reenable_pool", json!({"pool": "bp"}));
        let events = pool_events(&out);
        assert_eq!(
            (events[0].old, events[0].new),
            (PoolState::Abandoned, PoolState::Available)
        );
        for n in [1, 2] {
            let e = event_of(&out, n);
            assert_eq!(states(&e), st("suspended", "active"));
        }
        let p = s.pool("bp");
        assert_eq!((p.retained_until, p.abandoned_at), (None, None));
        // It is a pool again: it takes members and can go into arrears anew.
        s.active(3, "cmcc-30m");
        s.ok(
            "add_pool_members",
            json!({"pool": "bp", "iccids": iccids(&[3])}),
        );
        s.ok("freeze_pool", json!({"pool": "bp"}));
        assert_eq!(s.pool("bp").state, PoolState::Frozen);
    });
}

#[test]
fn an_abandoned_backward_pool_cannot_be_re_enabled_after_one_month() {
    scenario_with(retention_days(10), |s| {
        frozen_backward_pool(s);
        s.ok("retain_pool", json!({"pool": "bp"}));
        s.tick(&dec(20, 0, 1));
        let e = s.fails(
            "reenable_pool",
            json!({"pool": "bp"}),
            ErrorCode::ReenableExpired,
        );
        assert!(e.message.contains("until"), "{}", e.message);
        assert_eq!(s.pool("bp").state, PoolState::Abandoned);
        assert_eq!(s.state(1), held_for_arrears());
    });
}

#[test]
fn only_a_frozen_backward_pool_is_retained_and_only_an_abandoned_one_re_enabled() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        s.active(2, "cmcc-30m");
        s.backward_pool("bp", "cmcc", &[1]);
        s.forward_pool("fp", "cmcc-30m", &[2]);
        s.fails(
            "retain_pool",
            json!({"pool": "bp"}),
            ErrorCode::PoolNotFrozen,
        );
        s.fails(
            "retain_pool",
            json!({"pool": "fp"}),
            ErrorCode::WrongPoolKind,
        );
        s.fails(
            "reenable_pool",
            json!({"pool": "fp"}),
            ErrorCode::WrongPoolKind,
        );
        s.fails(
            "retain_pool",
            json!({"pool": "nope"}),
            ErrorCode::UnknownPool,
        );
        s.ok("freeze_pool", json!({"pool": "bp"}));
        s.fails(
            "reenable_pool",
            json!({"pool": "bp"}),
            ErrorCode::PoolNotAbandoned,
        );
        s.ok("retain_pool", json!({"pool": "bp"}));
        s.fails(
            "reenable_pool",
            json!({"pool": "bp"}),
            ErrorCode::PoolNotAbandoned,
        );
    });
}

#[test]
fn unfreezing_a_retained_backward_pool_settles_its_arrears() {
    scenario_with(retention_days(10), |s| {
        frozen_backward_pool(s);
        s.ok("retain_pool", json!({"pool": "bp"}));
        s.at = nov(12, 0, 0);
        let out = s.ok("unfreeze_pool", json!({"pool": "bp"}));
        let events = pool_events(&out);
        assert_eq!(
            (events[0].old, events[0].new),
            (PoolState::Retained, PoolState::Available)
        );
        assert_eq!(states(&event_of(&out, 1)), st("suspended", "active"));
        // The old retention deadline passes without effect.
        let out = s.tick(&nov(21, 0, 0));
        assert!(pool_events(&out).is_empty(), "{out:#?}");
        assert_eq!(s.pool("bp").state, PoolState::Available);
        // Frozen again, the retention starts from the new notice.
        s.ok("freeze_pool", json!({"pool": "bp"}));
        s.ok("retain_pool", json!({"pool": "bp"}));
        assert_eq!(s.pool("bp").retained_until, Some(ts(&dec(1, 0, 0))));
    });
}

/// A retention's deadline names a pool, not a card: the expiry rules,
/// which look ahead through the card deadlines, pass it by.
#[test]
fn a_retention_end_is_not_read_as_a_card_expiry() {
    scenario_with(retention_days(10), |s| {
        s.ok(
            "upsert_rule",
            json!({"rule": {"id": "exp", "type": 1, "condition": {"days_to_expiry_lte": 8},
                "actions": [{"type": "email", "to": ["ops@example.com"]}]}}),
        );
        // More pools than cards: the retained pool's index is no card's.
        for id in ["b0", "b1", "b2"] {
            s.backward_pool(id, "cmcc", &[]);
        }
        frozen_backward_pool(s);
        s.ok("retain_pool", json!({"pool": "bp"}));
        let out = s.tick(&nov(21, 0, 0));
        assert_eq!(pool_events(&out).len(), 1);
    });
}

#[test]
fn a_backward_pool_retention_is_exact_across_a_restart() {
    let run = |restart: bool| -> Vec<flowcap_engine::Output> {
        let mut config = config(3);
        config.pool_retention_days = 10;
        let mut s = Sim::with_config(config);
        s.setup();
        frozen_backward_pool(&mut s);
        s.ok("retain_pool", json!({"pool": "bp"}));
        if restart {
            let bytes = s.engine.snapshot();
            s.engine = flowcap_engine::Engine::restore(
                &bytes,
                Box::new(flowcap_engine::dedupe::MemIdStore::default()),
            )
            .unwrap();
        }
        s.tick(&nov(21, 0, 0))
    };
    let straight = run(false);
    assert_eq!(pool_events(&straight).len(), 1);
    assert_eq!(run(true), straight);
}

// ===== custom attributes =====================================================

#[test]
fn attributes_are_set_in_batch_and_a_null_removes_one() {
    scenario(|s| {
        s.ok(
            "set_attribute_names",
            json!({"names": ["customer", "site"]}),
        );
        s.active(1, "cmcc-30m");
        s.active(2, "cmcc-30m");
        let result = s.cmd(
            "set_attributes",
            json!({"iccids": iccids(&[1, 2, 9]), "attributes": {"customer": "acme", "site": "n"}}),
        );
        let codes: Vec<_> = result
            .results
            .iter()
            .map(|r| r.error.as_ref().map(|e| e.code))
            .collect();
        assert_eq!(codes, [None, None, Some(ErrorCode::UnknownCard)]);
        assert_eq!(
            s.view(2).attributes,
            attrs(&[("customer", "acme"), ("site", "n")])
        );
        s.ok(
            "set_attributes",
            json!({"iccids": iccids(&[2]), "attributes": {"site": null}}),
        );
        assert_eq!(s.view(2).attributes, attrs(&[("customer", "acme")]));
        s.fails(
            "set_attributes",
            json!({"iccids": iccids(&[1]), "attributes": {"colour": "red"}}),
            ErrorCode::InvalidAttribute,
        );
    });
}

#[test]
fn a_disabled_attribute_is_kept_but_neither_set_shown_nor_filtered_on() {
    scenario(|s| {
        s.ok(
            "set_attribute_names",
            json!({"names": ["customer", "site"]}),
        );
        s.card_with(
            1,
            "cmcc-30m",
            "active",
            json!({"attributes": {"customer": "acme", "site": "north"}}),
        );
        s.ok("disable_attribute", json!({"name": "site"}));
        // Hidden from the card's view; the value is kept.
        assert_eq!(s.view(1).attributes, attrs(&[("customer", "acme")]));
        s.fails(
            "set_attributes",
            json!({"iccids": iccids(&[1]), "attributes": {"site": "south"}}),
            ErrorCode::AttributeDisabled,
        );
        s.fails(
            "upsert_card",
            json!({"card": {"iccid": iccid_text(1), "carrier": "cmcc", "plan": "cmcc-30m",
                "attributes": {"site": "south"}}}),
            ErrorCode::AttributeDisabled,
        );
        s.fails(
            "upsert_rule",
            json!({"rule": {"id": "u", "type": 2, "condition": {"used_mb_gte": 5},
                "filter": {"attributes": {"site": "north"}}}}),
            ErrorCode::AttributeDisabled,
        );
        // The other names are untouched.
        s.ok(
            "set_attributes",
            json!({"iccids": iccids(&[1]), "attributes": {"customer": "globex"}}),
        );
        // Enabled again, the kept value shows.
        s.ok("enable_attribute", json!({"name": "site"}));
        assert_eq!(
            s.view(1).attributes,
            attrs(&[("customer", "globex"), ("site", "north")])
        );
        s.fails(
            "disable_attribute",
            json!({"name": "colour"}),
            ErrorCode::InvalidAttribute,
        );
    });
}

#[test]
fn an_attribute_an_enabled_rule_filters_on_cannot_be_disabled() {
    scenario(|s| {
        s.ok("set_attribute_names", json!({"names": ["customer"]}));
        s.ok(
            "upsert_rule",
            json!({"rule": {"id": "u", "type": 2, "condition": {"used_mb_gte": 5},
                "filter": {"attributes": {"customer": "acme"}}}}),
        );
        s.fails(
            "disable_attribute",
            json!({"name": "customer"}),
            ErrorCode::AttributeInUse,
        );
        s.ok("disable_rule", json!({"rule": "u"}));
        s.ok("disable_attribute", json!({"name": "customer"}));
        // The rule cannot come back while its attribute is disabled.
        s.fails(
            "enable_rule",
            json!({"rule": "u"}),
            ErrorCode::AttributeDisabled,
        );
        // Declaring the names again keeps a name's switch.
        s.ok(
            "set_attribute_names",
            json!({"names": ["customer", "site"]}),
        );
        s.fails(
            "enable_rule",
            json!({"rule": "u"}),
            ErrorCode::AttributeDisabled,
        );
        s.ok("enable_attribute", json!({"name": "customer"}));
        s.ok("enable_rule", json!({"rule": "u"}));
    });
}

#[test]
fn a_rule_filter_can_name_attribute_values() {
    scenario(|s| {
        s.ok("set_attribute_names", json!({"names": ["customer"]}));
        s.active(1, "cmcc-30m");
        s.active(2, "cmcc-30m");
        s.ok(
            "set_attributes",
            json!({"iccids": iccids(&[1]), "attributes": {"customer": "acme"}}),
        );
        s.fails(
            "upsert_rule",
            json!({"rule": {"id": "u", "type": 2, "condition": {"used_mb_gte": 5},
                "filter": {"attributes": {"colour": "red"}}}}),
            ErrorCode::InvalidAttribute,
        );
        s.ok(
            "upsert_rule",
            json!({"rule": {"id": "u", "type": 2, "condition": {"used_mb_gte": 5},
                "filter": {"attributes": {"customer": "acme"}}}}),
        );
        let fired = |out: &[flowcap_engine::Output]| {
            out.iter()
                .filter(|o| {
                    matches!(
                        o,
                        flowcap_engine::Output::Action(flowcap_engine::ActionEvent::RuleFired(_))
                    )
                })
                .count()
        };
        assert_eq!(fired(&s.rec(1, "a", &nov(10, 1, 0), mb(6))), 1);
        assert_eq!(fired(&s.rec(2, "b", &nov(10, 1, 0), mb(6))), 0);
    });
}

// ===== reminder windows ======================================================

/// (target, event time, windows of the actions) of every firing.
fn reminders(
    out: &[flowcap_engine::Output],
) -> Vec<(String, flowcap_engine::Timestamp, Vec<String>)> {
    out.iter()
        .filter_map(|o| match o {
            flowcap_engine::Output::Action(flowcap_engine::ActionEvent::RuleFired(e)) => Some((
                e.target(),
                e.event_time,
                e.actions
                    .iter()
                    .map(|a| a.reminder.name().into_owned())
                    .collect(),
            )),
            _ => None,
        })
        .collect()
}

fn days_of(firings: &[(String, flowcap_engine::Timestamp, Vec<String>)]) -> Vec<String> {
    firings
        .iter()
        .map(|(_, t, _)| {
            let (y, m, d) = t.civil_date(8 * 3600);
            format!("{y:04}-{m:02}-{d:02}")
        })
        .collect()
}

#[test]
fn reminder_day_reminds_each_day_while_a_usage_condition_holds() {
    scenario(|s| {
        s.active(1, "cmcc-50m");
        s.ok(
            "upsert_rule",
            json!({"rule": {"id": "u20", "type": 2, "condition": {"used_mb_gte": 20},
                "actions": [{"type": "email", "to": ["ops@example.com"], "reminder": "day"}]}}),
        );
        let entry = reminders(&s.rec(1, "a1", &nov(10, 1, 0), mb(25)));
        assert_eq!(entry.len(), 1);
        assert_eq!(entry[0].2, ["day"]);
        // Each local midnight while it holds: one reminder a day.
        let out = reminders(&s.tick(&nov(13, 12, 0)));
        assert_eq!(out.len(), 3, "{out:?}");
        assert_eq!(out[0].1, ts(&nov(11, 0, 0)));
        assert_eq!(out[2].1, ts(&nov(13, 0, 0)));
        assert!(out
            .iter()
            .all(|(t, _, w)| *t == iccid_text(1) && w == &["day"]));
        // More usage the same day: no more.
        assert!(reminders(&s.rec(1, "a2", &nov(13, 13, 0), mb(1))).is_empty());
        // To the end of the cycle (Nov 14 to 30); the new cycle starts
        // outside (usage back to zero): no reminder on Dec 1.
        assert_eq!(reminders(&s.tick(&dec(1, 0, 5))).len(), 17);
        assert!(reminders(&s.tick(&dec(3, 0, 5))).is_empty());
        // Entering again in the new cycle fires.
        assert_eq!(reminders(&s.rec(1, "d1", &dec(3, 1, 0), mb(25))).len(), 1);
    });
}

#[test]
fn reminder_every_n_days_reminds_every_n_days_while_it_holds() {
    scenario(|s| {
        s.card_with(
            1,
            "cmcc-30m",
            "active",
            json!({"expires_at": "2026-11-25T10:00:00+08:00"}),
        );
        s.ok(
            "upsert_rule",
            json!({"rule": {"id": "exp10", "type": 1, "condition": {"days_to_expiry_lte": 10},
                "reminder": "every_3_days"}}),
        );
        // Enters on the 15th, then every third day.
        let out = reminders(&s.tick(&nov(30, 12, 0)));
        assert_eq!(
            days_of(&out),
            [
                "2026-11-15",
                "2026-11-18",
                "2026-11-21",
                "2026-11-24",
                "2026-11-27",
                "2026-11-30"
            ]
        );
        assert!(
            out.iter().all(|(_, _, w)| w.is_empty()),
            "a rule without actions"
        );
        // Out of range.
        s.fails(
            "upsert_rule",
            json!({"rule": {"id": "bad", "type": 1, "condition": {"days_to_expiry_lte": 10},
                "actions": [{"type": "email", "to": ["ops@example.com"], "reminder": "every_0_days"}]}}),
            ErrorCode::InvalidAction,
        );
    });
}

#[test]
fn reminder_every_and_once_fire_only_on_entry() {
    scenario(|s| {
        s.card_with(
            1,
            "cmcc-30m",
            "active",
            json!({"expires_at": "2026-11-15T10:00:00+08:00"}),
        );
        s.ok(
            "upsert_rule",
            json!({"rule": {"id": "exp3", "type": 1, "condition": {"days_to_expiry_lte": 3},
                "actions": [{"type": "email", "to": ["ops@example.com"], "reminder": "every"},
                    {"type": "sms", "to": ["+8613800000000"], "reminder": "once"}]}}),
        );
        let out = reminders(&s.tick(&nov(14, 12, 0)));
        assert_eq!(days_of(&out), ["2026-11-12"]);
        assert_eq!(out[0].2, ["every", "once"]);
        // Renewed (out), then near the new expiry (in) again: `every`
        // fires, `once` never again.
        s.at = nov(14, 13, 0);
        s.ok("renew", json!({"iccids": iccids(&[1]), "months": 1}));
        let out = reminders(&s.tick(&dec(14, 12, 0)));
        assert_eq!(days_of(&out), ["2026-12-12"]);
        assert_eq!(out[0].2, ["every"]);
    });
}

#[test]
fn reminder_cycle_reminds_once_each_cycle_while_it_holds() {
    scenario(|s| {
        s.card_with(
            1,
            "cmcc-30m",
            "active",
            json!({"expires_at": "2027-01-20T10:00:00+08:00"}),
        );
        s.ok(
            "upsert_rule",
            json!({"rule": {"id": "exp60", "type": 1, "condition": {"days_to_expiry_lte": 60},
                "actions": [{"type": "email", "to": ["ops@example.com"], "reminder": "cycle"}]}}),
        );
        // Enters on Nov 21 (60 days before Jan 20), then reminds at the
        // first day of each later cycle: Dec 1 and Jan 1.
        let out = reminders(&s.tick("2027-01-10T12:00:00+08:00"));
        assert_eq!(days_of(&out), ["2026-11-21", "2026-12-01", "2027-01-01"]);
        assert!(out.iter().all(|(_, _, w)| w == &["cycle"]));
    });
}

/// A snapshot anywhere in a run of daily and every-3-days reminders: the
/// restored engine goes on with exactly the same firings (none repeated,
/// none lost).
#[test]
fn reminders_are_exact_across_a_restart() {
    let ticks = [
        nov(13, 12, 0),
        nov(16, 12, 0),
        nov(17, 1, 0),
        nov(22, 12, 0),
    ];
    let run = |stop: Option<usize>| -> Vec<flowcap_engine::Output> {
        let mut s = Sim::new(3);
        s.setup();
        s.card_with(
            1,
            "cmcc-30m",
            "active",
            json!({"expires_at": "2026-11-20T10:00:00+08:00"}),
        );
        s.ok(
            "upsert_rule",
            json!({"rule": {"id": "exp5", "type": 1, "condition": {"days_to_expiry_lte": 8},
                "actions": [{"type": "email", "to": ["ops@example.com"], "reminder": "day"},
                    {"type": "sms", "to": ["+8613800000000"], "reminder": "every_3_days"}]}}),
        );
        let mut firings = Vec::new();
        for (i, at) in ticks.iter().enumerate() {
            if Some(i) == stop {
                let bytes = s.engine.snapshot();
                s.engine = flowcap_engine::Engine::restore(
                    &bytes,
                    Box::new(flowcap_engine::dedupe::MemIdStore::default()),
                )
                .unwrap();
            }
            firings.extend(s.tick(at).into_iter().filter(|o| {
                matches!(
                    o,
                    flowcap_engine::Output::Action(flowcap_engine::ActionEvent::RuleFired(_))
                )
            }));
        }
        firings
    };
    let straight = run(None);
    // Enters on the 12th: both; then `day` daily, `every_3_days` on the
    // 15th, 18th, 21st.
    let windows: Vec<usize> = reminders(&straight).iter().map(|f| f.2.len()).collect();
    assert_eq!(windows, [2, 1, 1, 2, 1, 1, 2, 1, 1, 2, 1]);
    for stop in 0..ticks.len() {
        assert_eq!(run(Some(stop)), straight, "restored before tick {stop}");
    }
}
