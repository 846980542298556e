//! The operator API's answers from the Parquet history, on the real
//! binary (`flowcap run --http --linger` over small files with a live
//! rule and some bad input):
//!
//! - `GET /rules/{id}/executions` walks every execution of the history
//!   once, newest first, with the outcome the history has;
//! - `POST /rules/what-if` (a draft) and `/rules/{id}/what-if` answer the
//!   rows `flowcap rules replay` prints for the same draft and days;
//! - `GET /dead-letters` shows each quarantined input once, by reason,
//!   raw, with its secret redacted;
//! - `GET /ingestion` counts the records and dead letters the run read.
//!
//! No sleeps decide anything: the tests wait on the lines the binary
//! prints.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::live_rule::{end, iccid, replay, write_inputs, CARDS};
use common::{http, linger, sql_rows, Running, BIN};
use serde_json::{json, Value};

const VIEWER: &str = "viewer-token-2a61";
/// A bad record's secret: never in an answer.
const SECRET: &str = "pw-never-shown-7731";

/// The scenario's inputs, with three bad lines after step 4: not JSON,
/// a record of an ICCID that is not one (carrying a secret), a cut line.
fn write_bad_inputs(dir: &Path) {
    let bad = json!({"record_id": "bad-iccid", "iccid": "12345", "end": end(4),
        "bytes_up": 1, "bytes_down": 1, "password": SECRET});
    let lines = [
        "this is not JSON".to_owned(),
        bad.to_string(),
        "{\"record_id\": \"cut".to_owned(),
    ];
    write_inputs(dir, &lines);
}

/// `flowcap run` over the inputs with the API, lingering: the process
/// and its address once the run is over.
fn start(dir: &Path) -> (Running, String) {
    write_bad_inputs(dir);
    let run = linger(
        Command::new(BIN)
            .args(["run", "-q", "--json", "--no-notify", "--input"])
            .arg(dir.join("usage.jsonl"))
            .arg("--commands")
            .arg(dir.join("commands.jsonl"))
            .arg("--out")
            .arg(dir.join("out"))
            .env("FLOWCAP_API_TOKENS", format!("viewer:read:{VIEWER}")),
    );
    (run.child, run.addr.to_string())
}

fn get(addr: &str, path: &str) -> Value {
    let (status, body) = http(addr, "GET", path, Some(VIEWER), None);
    assert_eq!(status, 200, "GET {path}: {body}");
    assert!(!body.contains(SECRET), "GET {path}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn post(addr: &str, path: &str, body: &Value) -> (u16, Value) {
    let (status, text) = http(addr, "POST", path, Some(VIEWER), Some(&body.to_string()));
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Each field of each CLI row equals the API item's.
fn assert_same_rows(cli: &[Value], api: &Value) {
    let items = api["items"].as_array().unwrap();
    assert_eq!(items.len(), cli.len(), "{api}");
    for (row, item) in cli.iter().zip(items) {
        for (key, value) in row.as_object().unwrap() {
            assert_eq!(&item[key], value, "{key} of {item}");
        }
    }
}

#[test]
fn rule_executions_and_what_if_answer_from_the_history() {
    let dir = tempfile::tempdir().unwrap();
    let (_child, addr) = start(dir.path());
    let rules = get(&addr, "/api/v1/rules");
    assert!(rules["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["id"] == "live12"));

    // Every execution once, newest first, page by page.
    let mut seen = Vec::new();
    let mut path = "/api/v1/rules/live12/executions?limit=7".to_owned();
    loop {
        let page = get(&addr, &path);
        assert_eq!(page["rule"], "live12");
        seen.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("/api/v1/rules/live12/executions?limit=7&cursor={c}"),
            None => break,
        }
    }
    let history = sql_rows(
        &dir.path().join("out"),
        "SELECT execution_id, iccid, cause_id, CAST(outcome AS VARCHAR) AS outcome \
         FROM rule_executions WHERE rule = 'live12' ORDER BY execution_id",
    );
    assert_eq!(history.len(), CARDS as usize);
    let mut got: Vec<(String, String, String, String)> = seen
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap().to_owned();
            (s("execution_id"), s("iccid"), s("cause_id"), s("outcome"))
        })
        .collect();
    let times: Vec<&str> = seen
        .iter()
        .map(|e| e["fired_at"].as_str().unwrap())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {times:?}"
    );
    got.sort();
    let want: Vec<(String, String, String, String)> = history
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap().to_owned();
            (s("execution_id"), s("iccid"), s("cause_id"), s("outcome"))
        })
        .collect();
    assert_eq!(got, want);
    let none = get(&addr, "/api/v1/rules/no-such-rule/executions");
    assert_eq!(none["items"], json!([]));

    // A draft: the same rows as `flowcap rules replay`.
    let draft = json!({"id": "draft12", "type": 2, "condition": {"used_mb_gte": 12}});
    let cli = replay(
        dir.path(),
        "id = \"draft12\"\ntype = 2\n[condition]\nused_mb_gte = 12\n",
        "2026-11-01",
        "2026-11-30",
    );
    assert_eq!(cli.len(), CARDS as usize);
    let body = json!({"rule": draft, "from": "2026-11-01", "to": "2026-11-30"});
    let (status, answer) = post(&addr, "/api/v1/rules/what-if", &body);
    assert_eq!(status, 200, "{answer}");
    assert_same_rows(&cli, &answer);
    let cards: Vec<String> = (1..=CARDS).map(iccid).collect();
    assert_eq!(answer["cards"], json!(cards));
    assert_eq!(answer["pools"], json!([]));
    assert_eq!(answer["firings"], CARDS);
    assert_eq!(answer["rule"], "draft12");

    // The declared rule, replayed from the start, fires where it did.
    let (status, answer) = post(
        &addr,
        "/api/v1/rules/live12/what-if",
        &json!({"from": "2026-11-01", "to": "2026-11-30"}),
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["cards"], json!(cards));
    assert!(answer["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|f| f["rule"] == "live12" && f["fired_at"] == cli[0]["fired_at"]));
    // Only the days asked: 12 MB was crossed on the 10th.
    let (status, answer) = post(
        &addr,
        "/api/v1/rules/what-if",
        &json!({"rule": draft, "from": "2026-11-11", "to": "2026-11-30"}),
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        (answer["firings"].clone(), answer["cards"].clone()),
        (json!(0), json!([]))
    );

    // Refusals, as problem details.
    for (path, body, status, code) in [
        (
            "/api/v1/rules/what-if",
            json!({"rule": {"type": 2}, "from": "2026-11-01", "to": "2026-11-02"}),
            400,
            "bad_rule",
        ),
        (
            "/api/v1/rules/what-if",
            json!({"rule": draft, "from": "2026-11-05", "to": "2026-11-01"}),
            400,
            "bad_range",
        ),
        (
            "/api/v1/rules/what-if",
            json!({"rule": draft, "from": "11/05/2026", "to": "2026-11-01"}),
            400,
            "bad_range",
        ),
        (
            "/api/v1/rules/nope/what-if",
            json!({"from": "2026-11-01", "to": "2026-11-02"}),
            404,
            "not_found",
        ),
    ] {
        let (got, answer) = post(&addr, path, &body);
        assert_eq!(got, status, "{path} {body}: {answer}");
        assert_eq!(
            answer["type"],
            format!("urn:flowcap:problem:{code}"),
            "{answer}"
        );
    }
    let (status, _) = http(&addr, "GET", "/api/v1/rules/live12/executions", None, None);
    assert_eq!(status, 401);
}

#[test]
fn dead_letters_and_ingestion_answer_what_the_run_read() {
    let dir = tempfile::tempdir().unwrap();
    let (_child, addr) = start(dir.path());
    let history = sql_rows(
        &dir.path().join("out"),
        "SELECT input_seq, CAST(reason AS VARCHAR) AS reason FROM quarantine \
         ORDER BY input_seq DESC",
    );
    assert_eq!(history.len(), 3);

    // Each letter once, newest first, a page of one at a time.
    let mut seen = Vec::new();
    let mut path = "/api/v1/dead-letters?limit=1".to_owned();
    loop {
        let page = get(&addr, &path);
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 1);
        seen.extend(items.iter().cloned());
        let mut by_reason = std::collections::BTreeMap::new();
        for r in &history {
            *by_reason.entry(r["reason"].as_str().unwrap()).or_insert(0) += 1;
        }
        assert_eq!(page["reasons"], json!(by_reason));
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("/api/v1/dead-letters?limit=1&cursor={c}"),
            None => break,
        }
    }
    let seqs: Vec<&Value> = seen.iter().map(|l| &l["seq"]).collect();
    let want: Vec<&Value> = history.iter().map(|r| &r["input_seq"]).collect();
    assert_eq!(seqs, want);
    let raws: BTreeSet<&str> = seen.iter().map(|l| l["raw"].as_str().unwrap()).collect();
    assert!(raws.contains("this is not JSON"), "{raws:?}");
    assert!(raws.contains("{\"record_id\": \"cut"), "{raws:?}");
    assert!(
        raws.iter()
            .any(|r| r.contains("\"iccid\":\"12345\"") && r.contains("redacted:sha256:")),
        "{raws:?}"
    );

    // By reason.
    let reason = history[0]["reason"].as_str().unwrap();
    let page = get(&addr, &format!("/api/v1/dead-letters?reason={reason}"));
    let items = page["items"].as_array().unwrap();
    let want = history.iter().filter(|r| r["reason"] == reason).count();
    assert_eq!(items.len(), want);
    assert!(items.iter().all(|l| l["reason"] == reason));
    let (status, _) = http(
        &addr,
        "GET",
        "/api/v1/dead-letters?color=red",
        Some(VIEWER),
        None,
    );
    assert_eq!(status, 400);

    // The last hour: every record read and every dead letter, no lag
    // (not reading Kafka).
    let ingestion = get(&addr, "/api/v1/ingestion");
    let records = u64::from(CARDS) * 10 + 3;
    assert_eq!(ingestion["records"], records, "{ingestion}");
    assert_eq!(ingestion["dead_letters"], 3, "{ingestion}");
    assert_eq!(ingestion["lag"], Value::Null);
    let minutes = ingestion["minutes"].as_array().unwrap();
    assert!(!minutes.is_empty() && minutes.len() <= 60, "{ingestion}");
    let sum: u64 = minutes.iter().map(|m| m["records"].as_u64().unwrap()).sum();
    assert_eq!(sum, records);
}
