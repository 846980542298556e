//! Fuzzing the command parser and applier (issue #23): whatever arrives on
//! the commands topic, nothing panics, and a command refused as a whole
//! leaves state, clock and outputs as they were (SPEC section 5: "changes
//! nothing"); only its journal entry is written.
//!
//! Commands are built from the SPEC's types with fields drawn from values
//! that break arithmetic and validation: huge and negative numbers, empty
//! and long strings, unknown ids, far-away times. Raw bytes go through the
//! parser too. `PROPTEST_CASES` raises the case count (default 256).

mod common;

use common::*;
use flowcap_engine::command::parse_command;
use flowcap_engine::Output;
use proptest::prelude::*;
use serde_json::{json, Value};

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(0)),
        Just(json!(-1)),
        Just(json!(1)),
        Just(json!(12)),
        Just(json!(i64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(u64::MAX)),
        Just(json!(u32::MAX)),
        Just(json!(i32::MAX)),
        Just(json!(1e300)),
        Just(json!(-0.5)),
        any::<i64>().prop_map(|n| json!(n)),
        (0u64..100_000).prop_map(|n| json!(n)),
    ]
}

fn text() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!("")),
        Just(json!(iccid_text(1))),
        Just(json!(iccid_text(2))),
        Just(json!("89860400000000000099")),
        Just(json!("cmcc-30m")),
        Just(json!("p1")),
        Just(json!("fwd")),
        Just(json!("r1")),
        Just(json!("cmcc")),
        Just(json!("general")),
        Just(json!("active")),
        Just(json!("forward")),
        Just(json!("backward")),
        Just(json!("9999-12-31T23:59:59+08:00")),
        Just(json!("0001-01-01T00:00:00Z")),
        Just(json!("x".repeat(300))),
        "[a-z0-9_-]{0,12}".prop_map(|s| json!(s)),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => number(),
        3 => text(),
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::Bool),
    ]
}

/// A value for a field: a leaf, a list of ICCIDs, or an object of fields.
fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(2, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(field_name(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn field_name() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "id",
        "iccid",
        "iccids",
        "plan",
        "pool",
        "card",
        "rule",
        "webhook",
        "tag",
        "tags",
        "mb",
        "months",
        "allowance_mb",
        "term_months",
        "carrier",
        "traffic",
        "state",
        "kind",
        "name",
        "activated_at",
        "expires_at",
        "test_ends_at",
        "silent_ends_at",
        "test_allowance_mb",
        "type",
        "condition",
        "action",
        "filter",
        "url",
        "secret",
        "names",
        "imei",
        "enabled",
    ])
    .prop_map(str::to_owned)
}

/// Valid commands of every SPEC type against [`fleet`], to be mutated.
fn templates() -> Vec<Value> {
    let c1 = iccid_text(1);
    let c3 = iccid_text(3);
    vec![
        json!({"type": "upsert_plan", "plan": {"id": "cmcc-9m", "name": "n", "carrier": "cmcc",
            "allowance_mb": 9, "traffic": "directed", "term_months": 12}}),
        json!({"type": "remove_plan", "plan": "cmcc-50m"}),
        json!({"type": "upsert_card", "card": {"iccid": iccid_text(9), "carrier": "cmcc",
            "plan": "cmcc-30m", "state": "active", "activated_at": SETUP_AT,
            "expires_at": "2027-11-10T00:00:00+08:00", "tags": [], "attributes": {}}}),
        json!({"type": "activate", "iccids": [c3]}),
        json!({"type": "suspend", "iccids": [c1, c3]}),
        json!({"type": "resume", "iccids": [c1]}),
        json!({"type": "deregister", "iccids": [c3]}),
        json!({"type": "renew", "iccids": [c3], "months": 12}),
        json!({"type": "set_threshold", "iccids": [c3], "mb": 50}),
        json!({"type": "clear_threshold", "iccids": [c3]}),
        json!({"type": "add_on", "iccid": c3, "mb": 100}),
        json!({"type": "add_on", "pool": "fwd", "mb": 100}),
        json!({"type": "create_pool", "pool": {"id": "p2", "kind": "backward", "name": "b",
            "carrier": "cmcc"}}),
        json!({"type": "add_pool_members", "pool": "fwd", "iccids": [c3]}),
        json!({"type": "remove_pool_members", "pool": "fwd", "iccids": [c1]}),
        json!({"type": "freeze_pool", "pool": "fwd"}),
        json!({"type": "unfreeze_pool", "pool": "fwd"}),
        json!({"type": "upsert_rule", "rule": {"id": "r1", "type": 2,
            "condition": {"used_mb_gte": 20}}}),
        json!({"type": "enable_rule", "rule": "r1"}),
        json!({"type": "disable_rule", "rule": "r1"}),
        json!({"type": "remove_rule", "rule": "r1"}),
        json!({"type": "upsert_webhook", "webhook": {"id": "w1", "url": "http://127.0.0.1:9/h",
            "secret": "whsec_c2VjcmV0"}}),
        json!({"type": "remove_webhook", "webhook": "w1"}),
        json!({"type": "upsert_tag", "tag": {"name": "t1"}}),
        json!({"type": "remove_tag", "tag": "t1"}),
        json!({"type": "bind_tags", "iccids": [c1], "tags": ["t1"]}),
        json!({"type": "unbind_tags", "iccids": [c1], "tags": ["t1"]}),
        json!({"type": "set_attribute_names", "names": ["customer"]}),
        json!({"type": "no_such_type"}),
    ]
}

/// Sets `path` (dot-separated object keys) in `v` to `leaf`, creating
/// objects on the way.
fn set_path(v: &mut Value, path: &[String], leaf: Value) {
    let Some((first, rest)) = path.split_first() else {
        *v = leaf;
        return;
    };
    if !v.is_object() {
        *v = json!({});
    }
    let child = v
        .as_object_mut()
        .expect("object")
        .entry(first.clone())
        .or_insert(Value::Null);
    set_path(child, rest, leaf);
}

/// A command line: a valid command of some type with up to three fields
/// (at any depth, known or not) replaced by awkward values, `at` near the
/// clock or far from it.
fn command_line() -> impl Strategy<Value = Vec<u8>> {
    (
        0..templates().len(),
        prop::collection::vec((prop::collection::vec(field_name(), 1..3), value()), 0..3),
        prop_oneof![
            4 => Just(nov(10, 1, 0)),
            1 => Just("2099-01-01T00:00:00+08:00".to_owned()),
            1 => Just("1970-01-01T00:00:00Z".to_owned()),
        ],
        0u32..20,
    )
        .prop_map(|(t, mutations, at, id)| {
            let mut command = templates().swap_remove(t);
            for (path, leaf) in mutations {
                if !matches!(path[0].as_str(), "id" | "type") {
                    set_path(&mut command, &path, leaf);
                }
            }
            let object = command.as_object_mut().expect("object");
            object.insert("id".into(), json!(format!("fuzz-{id}")));
            object.insert("at".into(), json!(at));
            command.to_string().into_bytes()
        })
}

/// A small fleet: two cmcc cards in a forward pool, a ctcc card, a rule.
fn fleet() -> Sim {
    let mut s = Sim::new(1);
    s.setup();
    s.active(1, "cmcc-30m");
    s.active(2, "cmcc-30m");
    s.active(3, "ctcc-30m");
    s.forward_pool("fwd", "cmcc-30m", &[1, 2]);
    s.rec(1, "r1", &nov(10, 1, 0), mb(5));
    s
}

fn state_of(s: &Sim) -> (String, String) {
    let pools: Vec<String> = s
        .pool_ids()
        .iter()
        .map(|p| format!("{:?}", s.pool(p)))
        .collect();
    (
        format!("{:?} {:?}", s.engine.card_views(), s.engine.clock()),
        pools.join("\n"),
    )
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn raw_bytes_never_panic_the_parser(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = parse_command(&bytes);
    }

    #[test]
    fn a_command_never_panics_and_a_refused_one_changes_nothing(
        lines in prop::collection::vec(command_line(), 1..12),
    ) {
        let mut s = fleet();
        for (i, line) in lines.iter().enumerate() {
            let Ok(command) = parse_command(line) else { continue };
            let before = state_of(&s);
            let mut out = Vec::new();
            s.engine.process_command_received(
                command,
                Some(ts(&nov(10, 2, 0))),
                1_000 + i as u64,
                &mut out,
            );
            let Some(Output::Journal(entry)) = out.last() else {
                return Err(TestCaseError::fail(format!("not journaled: {out:?}")));
            };
            if entry.result.error.is_some() {
                prop_assert_eq!(out.len(), 1, "a refused command emits only its journal entry: {:?}", out);
                prop_assert_eq!(state_of(&s), before, "refused {}", String::from_utf8_lossy(line));
            }
        }
    }
}
