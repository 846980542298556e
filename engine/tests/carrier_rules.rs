//! One test per carrier rule of SPEC section 2.1 and issue #27 (patching
//! a card, add-ons, renewal, device binding, pools), against the
//! accounting engine. Every scenario runs on one shard and on three (see
//! `common::scenario`), and both must agree.

mod common;

use common::*;
use flowcap_engine::command::{parse_command, ErrorCode};
use serde_json::json;

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
        assert!(e.message.contains("Imei"), "{}", e.message);
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
