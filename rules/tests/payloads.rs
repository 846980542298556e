//! Webhook bodies, texts and execution records of real firings: an engine
//! fires the rules, this crate renders them. Bodies are compared key by key
//! with the SPEC section 6 examples.

use flowcap_engine::command::parse_command;
use flowcap_engine::event::RuleFiredEvent;
use flowcap_engine::{ActionEvent, Engine, EngineConfig, Output, Timestamp, Usage, MB};
use flowcap_rules::execution::{records, Outcome};
use flowcap_rules::text::{email, sms};
use flowcap_rules::{merged_bodies, single_body, Signer, TemplateOptions, MAX_MERGED};
use serde_json::{json, Value};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const ICCID: &str = "89860412345678901234";

struct Sim {
    engine: Engine,
    seq: u64,
    at: String,
}

impl Sim {
    fn new() -> Sim {
        let mut sim = Sim {
            engine: Engine::new(EngineConfig {
                shards: 2,
                ..EngineConfig::default()
            }),
            seq: 0,
            at: "2026-11-10T00:00:00+08:00".to_owned(),
        };
        sim.cmd(
            "upsert_plan",
            json!({"plan": {"id": "cmcc-30m", "name": "CMCC 30MB monthly",
            "carrier": "cmcc", "allowance_mb": 30, "traffic": "directed"}}),
        );
        sim.cmd(
            "upsert_webhook",
            json!({"webhook": {"id": "hook", "url": "https://example.com/hook", "secret": SECRET}}),
        );
        sim
    }

    fn cmd(&mut self, ty: &str, body: Value) -> Vec<Output> {
        self.seq += 1;
        let mut c = json!({"id": format!("c{}", self.seq), "type": ty, "at": self.at});
        c.as_object_mut()
            .unwrap()
            .extend(body.as_object().unwrap().clone());
        let command = parse_command(c.to_string().as_bytes()).unwrap();
        let mut out = Vec::new();
        self.engine.process_command(command, self.seq, &mut out);
        let ok = out
            .iter()
            .any(|o| matches!(o, Output::Journal(j) if j.result.ok));
        assert!(ok, "{ty} {body} failed: {out:?}");
        out
    }

    fn card(&mut self, iccid: &str, expires: &str) {
        self.cmd(
            "upsert_card",
            json!({"card": {"iccid": iccid, "carrier": "cmcc", "plan": "cmcc-30m", "state": "active",
                "activated_at": "2026-01-05T00:00:00+08:00", "expires_at": expires}}),
        );
    }

    fn rec(&mut self, iccid: &str, id: &str, end: &str, bytes: u64) -> Vec<Output> {
        self.seq += 1;
        let usage = Usage {
            record_id: flowcap_engine::RecordId::new(id).unwrap(),
            iccid: iccid.parse().unwrap(),
            start: None,
            end: Timestamp::parse_rfc3339(end).unwrap(),
            bytes_up: 0,
            bytes_down: bytes,
            carrier: None,
            imei: None,
        };
        let mut out = Vec::new();
        self.engine
            .process_usage(&usage, self.seq, &mut out)
            .unwrap();
        out
    }
}

fn firings(out: &[Output]) -> Vec<RuleFiredEvent> {
    out.iter()
        .filter_map(|o| match o {
            Output::Action(ActionEvent::RuleFired(e)) => Some((**e).clone()),
            _ => None,
        })
        .collect()
}

fn body(firing: &RuleFiredEvent) -> Value {
    serde_json::from_str(&single_body(firing, "hook", TemplateOptions::default()).body).unwrap()
}

/// The SPEC's example, key by key: `{"cid", "ruleType", "templateName",
/// "templateParams": [{key, value}...]}` with string values.
#[test]
fn remaining_flow_body_matches_the_spec_example() {
    let mut s = Sim::new();
    s.card(ICCID, "2027-01-05T00:00:00+08:00");
    s.cmd(
        "upsert_rule",
        json!({"rule": {"id": "r1", "type": 2, "condition": {"remaining_mb_lte": 10},
            "actions": [{"type": "webhook", "endpoint": "hook"}]}}),
    );
    let out = s.rec(ICCID, "a1", "2026-11-10T04:00:00+08:00", 20 * MB + MB / 2);
    let f = firings(&out);
    assert_eq!(f.len(), 1);
    let message = single_body(&f[0], "hook", TemplateOptions::default());
    let want = json!({"cid": ICCID, "ruleType": 2,
        "templateName": "api_rule_flow_usage_remain",
        "templateParams": [{"key": "cid", "value": ICCID},
                           {"key": "pricePlanName", "value": "CMCC 30MB monthly"},
                           {"key": "remainFlow", "value": "9.5"}]});
    let got: Value = serde_json::from_str(&message.body).unwrap();
    assert_eq!(got, want);
    // Exactly these keys, in the SPEC's order, every value a string.
    assert!(message.body.starts_with(&format!(
        r#"{{"cid":"{ICCID}","ruleType":2,"templateName":"#
    )));
    for p in got["templateParams"].as_array().unwrap() {
        assert_eq!(p.as_object().unwrap().len(), 2);
        assert!(p["value"].is_string());
    }
    // Deterministic id, stable across renderings; signed per Standard Webhooks.
    assert_eq!(
        message.id,
        single_body(&f[0], "hook", TemplateOptions::default()).id
    );
    assert!(message.id.starts_with("msg_"));
    let signer = Signer::new(SECRET).unwrap();
    let signature = signer.sign(&message.id, 1_800_000_000, message.body.as_bytes());
    signer
        .verify(
            &message.id,
            1_800_000_000,
            message.body.as_bytes(),
            &signature,
            1_800_000_000,
            300,
        )
        .unwrap();
    // The execution record: pending webhook to "hook".
    let rec = &records(&f[0])[0];
    assert_eq!(rec.channel, "webhook");
    assert_eq!(rec.endpoint.as_deref(), Some("hook"));
    assert_eq!(rec.outcome, Outcome::Pending);
    assert_eq!(rec.condition, r#"{"remaining_mb_lte":10}"#);
    assert_eq!(rec.observed, "used_mb=20.5 remaining_mb=9.5");
    assert_eq!(
        (rec.cause.as_str(), rec.cause_id.as_str()),
        ("record", "a1")
    );
    assert_eq!(rec.cause_iccid.as_deref(), Some(ICCID));
    assert_eq!(rec.firing_id, f[0].id);
}

#[test]
fn every_template_has_its_spec_keys() {
    let mut s = Sim::new();
    s.cmd(
        "upsert_plan",
        json!({"plan": {"id": "cmcc-gen", "name": "CMCC 1GB",
        "carrier": "cmcc", "allowance_mb": 1024, "traffic": "directed"}}),
    );
    s.card(ICCID, "2026-11-13T12:00:00+08:00");
    let other = "89860412345678901235";
    s.card(other, "2027-01-05T00:00:00+08:00");
    s.cmd(
        "create_pool",
        json!({"pool": {"id": "fp", "kind": "forward", "name": "Fleet A", "carrier": "cmcc", "plan": "cmcc-30m"}}),
    );
    s.cmd("add_pool_members", json!({"pool": "fp", "iccids": [other]}));
    s.cmd(
        "create_pool",
        json!({"pool": {"id": "bp", "kind": "backward", "name": "Post-paid", "carrier": "cmcc"}}),
    );
    let third = "89860412345678901236";
    s.card(third, "2027-01-05T00:00:00+08:00");
    s.cmd("add_pool_members", json!({"pool": "bp", "iccids": [third]}));
    let rules = [
        json!({"id": "t1", "type": 1, "condition": {"days_to_expiry_lte": 3}}),
        json!({"id": "t2u", "type": 2, "condition": {"used_mb_gte": 5}, "filter": {"plans": ["cmcc-30m"]}}),
        json!({"id": "t3r", "type": 3, "condition": {"remaining_mb_lte": 25}, "filter": {"forward_pools": ["fp"]}}),
        json!({"id": "t3u", "type": 3, "condition": {"used_mb_gte": 5}, "filter": {"backward_pools": ["bp"]}}),
        json!({"id": "t4", "type": 4, "condition": {"from": ["active"], "to": ["suspended"]}}),
    ];
    let mut all = Vec::new();
    for r in rules {
        all.extend(firings(&s.cmd("upsert_rule", json!({ "rule": r }))));
    }
    all.extend(firings(&s.rec(
        other,
        "b1",
        "2026-11-10T01:00:00+08:00",
        6 * MB,
    )));
    all.extend(firings(&s.rec(
        third,
        "c1",
        "2026-11-10T02:00:00+08:00",
        6 * MB,
    )));
    s.at = "2026-11-10T03:00:00+08:00".into();
    all.extend(firings(&s.cmd("suspend", json!({"iccids": [ICCID]}))));
    let bodies: Vec<(String, Value)> = all
        .iter()
        .map(|f| (format!("{}|{}", f.rule, f.target()), body(f)))
        .collect();
    let find = |key: &str| {
        bodies
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, b)| b.clone())
            .unwrap_or_else(|| panic!("no firing {key}: {bodies:?}"))
    };
    let params = |b: &Value| -> Vec<(String, String)> {
        b["templateParams"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["key"].as_str().unwrap().to_owned(),
                    p["value"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let kv = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    // Type 1: expiry on the 13th, rule added on the 10th: 3 days.
    let b = find(&format!("t1|{ICCID}"));
    assert_eq!(b["templateName"], "api_rule_price_plan_expired");
    assert_eq!(b["ruleType"], 1);
    assert_eq!(
        params(&b),
        kv(&[
            ("cid", ICCID),
            ("pricePlanName", "CMCC 30MB monthly"),
            ("daysToExpire", "3")
        ])
    );
    let b = find(&format!("t2u|{other}"));
    assert_eq!(b["templateName"], "api_rule_flow_usage");
    assert_eq!(
        params(&b),
        kv(&[
            ("cid", other),
            ("pricePlanName", "CMCC 30MB monthly"),
            ("usageFlow", "6")
        ])
    );
    let b = find("t3r|fp");
    assert_eq!(b["templateName"], "api_sim_pool_rule_flow_usage_remain");
    assert_eq!(b["poolId"], "fp");
    assert_eq!(b["ruleType"], 3);
    assert_eq!(
        params(&b),
        kv(&[
            ("poolId", "fp"),
            ("poolName", "Fleet A"),
            ("pricePlanName", "CMCC 30MB monthly"),
            ("remainFlow", "24")
        ])
    );
    let b = find("t3u|bp");
    assert_eq!(b["templateName"], "api_back_pool_rule_flow_usage");
    assert_eq!(
        params(&b),
        kv(&[
            ("poolId", "bp"),
            ("poolName", "Post-paid"),
            ("pricePlanName", ""),
            ("usageFlow", "6")
        ])
    );
    let b = find(&format!("t4|{ICCID}"));
    assert_eq!(b["templateName"], "api_rule_sim_status_modify");
    assert_eq!(b["cid"], ICCID);
    assert_eq!(
        params(&b),
        kv(&[
            ("cid", ICCID),
            ("modifyTime", "2026-11-10T03:00:00+08:00"),
            ("oldStatus", "active"),
            ("newStatus", "suspended")
        ])
    );
    // Texts say the same thing.
    let t4 = all.iter().find(|f| f.rule == "t4").unwrap();
    assert_eq!(
        sms(t4, TemplateOptions::default()),
        format!("[flowcap t4] Card {ICCID} changed from active to suspended at 2026-11-10T03:00:00+08:00.")
    );
    let t1 = all.iter().find(|f| f.rule == "t1").unwrap();
    let mail = email(t1, TemplateOptions::default());
    assert_eq!(
        mail.subject,
        format!("[flowcap] t1: The plan (CMCC 30MB monthly) of card {ICCID} expires in 3 days.")
    );
    assert!(
        mail.body.contains("Condition: {\"days_to_expiry_lte\":3}"),
        "{}",
        mail.body
    );
    assert!(mail.body.contains(&format!("Firing id: {}", t1.id)));
}

/// A rule added mid-cycle fires at once for 1,201 cards already inside; the
/// merged webhook sends them as 500 + 500 + 201.
#[test]
fn a_firing_of_1201_cards_merges_into_500_500_201() {
    let mut s = Sim::new();
    let iccids: Vec<String> = (0..1201).map(|i| format!("898604{i:014}")).collect();
    for iccid in &iccids {
        s.card(iccid, "2027-01-05T00:00:00+08:00");
    }
    let out = s.cmd(
        "upsert_rule",
        json!({"rule": {"id": "low", "type": 2, "condition": {"remaining_mb_lte": 40},
            "actions": [{"type": "webhook", "endpoint": "hook", "merge": true}]}}),
    );
    let fired = firings(&out);
    assert_eq!(fired.len(), 1201);
    let refs: Vec<&RuleFiredEvent> = fired.iter().collect();
    let messages = merged_bodies(&refs, "hook", TemplateOptions::default()).unwrap();
    let sizes: Vec<usize> = messages.iter().map(|m| m.firing_ids.len()).collect();
    assert_eq!(sizes, [500, 500, 201]);
    assert_eq!(MAX_MERGED, 500);
    let mut seen = Vec::new();
    for m in &messages {
        let b: Value = serde_json::from_str(&m.body).unwrap();
        let keys: Vec<&String> = b.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["ruleType", "templateName", "templateParamsList"]);
        assert_eq!(b["ruleType"], 2);
        assert_eq!(b["templateName"], "api_rule_flow_usage_remain");
        let list = b["templateParamsList"].as_array().unwrap();
        assert_eq!(list.len(), m.firing_ids.len());
        for entry in list {
            let p = entry["templateParams"].as_array().unwrap();
            assert_eq!(p[0]["key"], "cid");
            assert_eq!(p[2], json!({"key": "remainFlow", "value": "30"}));
            seen.push(p[0]["value"].as_str().unwrap().to_owned());
        }
    }
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(sorted, iccids, "every card exactly once");
    let ids: std::collections::BTreeSet<&str> = messages.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids.len(), 3, "distinct webhook ids");
    // Same firings, same messages (a resend after a crash keeps the ids).
    assert_eq!(
        merged_bodies(&refs, "hook", TemplateOptions::default()).unwrap(),
        messages
    );
}
