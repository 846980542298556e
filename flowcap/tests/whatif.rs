//! `flowcap rules replay` (issue #6): a draft rule replayed over a run's
//! Parquet history fires exactly where the same rule fired live, reports
//! only its `--from`..`--to` days, and replaces a live rule of its id.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

mod common;

use common::live_rule::{end, iccid, replay, write_inputs, CARDS};
use common::{sql_rows, stdout_of, BIN};

/// Each card uses 3 MB per record, 10 records: it passes 12 MB at step 3
/// (day 10) and 20 MB at step 6 (day 11). The live rule fires at 12 MB.
fn run_live(dir: &Path) {
    write_inputs(dir, &[]);
    stdout_of(
        Command::new(BIN)
            .args([
                "run",
                "-q",
                "--json",
                "--no-notify",
                "--snapshot-every",
                "100",
            ])
            .arg("--input")
            .arg(dir.join("usage.jsonl"))
            .arg("--commands")
            .arg(dir.join("commands.jsonl"))
            .arg("--out")
            .arg(dir.join("out")),
        "flowcap run",
    );
}

fn pairs(rows: &[Value]) -> Vec<(String, String)> {
    let mut p: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["iccid"].as_str().unwrap().to_owned(),
                r["fired_at"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    p.sort();
    p
}

#[test]
fn a_draft_replayed_over_the_history_fires_where_the_live_rule_fired() {
    let dir = tempfile::tempdir().unwrap();
    run_live(dir.path());
    let live = sql_rows(
        &dir.path().join("out"),
        "SELECT iccid, CAST(fired_at AS BIGINT) AS ms, cause_id FROM rule_executions \
         WHERE rule = 'live12' ORDER BY iccid",
    );
    assert_eq!(live.len(), CARDS as usize);

    let draft12 = "id = \"draft12\"\ntype = 2\n[condition]\nused_mb_gte = 12\n";
    let rows = replay(dir.path(), draft12, "2026-11-01", "2026-11-30");
    let want: Vec<(String, String)> = (1..=CARDS).map(|n| (iccid(n), end(3))).collect();
    assert_eq!(pairs(&rows), want);
    // The same causes as live: the record that crossed.
    let mut causes: Vec<&str> = rows
        .iter()
        .map(|r| r["cause_id"].as_str().unwrap())
        .collect();
    causes.sort();
    let mut live_causes: Vec<&str> = live
        .iter()
        .map(|r| r["cause_id"].as_str().unwrap())
        .collect();
    live_causes.sort();
    assert_eq!(causes, live_causes);
    assert!(rows
        .iter()
        .all(|r| r["rule"] == "draft12" && r["cause"] == "record"));

    // Only the reported days: 12 MB was crossed on the 10th.
    assert!(replay(dir.path(), draft12, "2026-11-11", "2026-11-30").is_empty());
    let draft20 = "id = \"draft20\"\ntype = 2\n[condition]\nused_mb_gte = 20\n";
    let rows = replay(dir.path(), draft20, "2026-11-11", "2026-11-11");
    let want: Vec<(String, String)> = (1..=CARDS).map(|n| (iccid(n), end(6))).collect();
    assert_eq!(pairs(&rows), want);

    // A draft with a live rule's id replaces it for the whole replay.
    let replaced = "id = \"live12\"\ntype = 2\n[condition]\nused_mb_gte = 20\n";
    let rows = replay(dir.path(), replaced, "2026-11-01", "2026-11-30");
    assert_eq!(pairs(&rows), want);
}
