//! The live-rule scenario that `whatif.rs` and `api_history.rs` replay:
//! plan `p100` (cmcc, 100 MB), cards 1 to [`CARDS`], the live rule
//! `live12` (12 MB used), and 3 MB per record and card for 10 records,
//! five a day from 2026-11-10. Each card passes 12 MB at step 3 (day 10)
//! and 20 MB at step 6 (day 11).

use std::io::Write;
use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

use super::{json_lines, stdout_of, BIN};

/// Cards in the scenario.
pub(crate) const CARDS: u32 = 40;

/// Card `n`'s ICCID.
pub(crate) fn iccid(n: u32) -> String {
    format!("8986041234{n:010}")
}

/// The end time of step `s`: five records a day, 4 hours apart, from
/// 2026-11-10 on.
pub(crate) fn end(s: u32) -> String {
    format!("2026-11-{:02}T{:02}:00:00+08:00", 10 + s / 5, (s % 5) * 4)
}

/// Writes `commands.jsonl` and `usage.jsonl` into `dir`; `bad` lines go
/// into the usage after step 4.
pub(crate) fn write_inputs(dir: &Path, bad: &[String]) {
    let at = "2026-11-01T00:00:00+08:00";
    let mut commands = vec![json!({"id": "c-plan", "type": "upsert_plan", "at": at,
        "plan": {"id": "p100", "name": "CMCC 100MB", "carrier": "cmcc",
                 "allowance_mb": 100, "traffic": "directed"}})];
    for n in 1..=CARDS {
        commands.push(
            json!({"id": format!("c-card-{n}"), "type": "upsert_card", "at": at,
            "card": {"iccid": iccid(n), "carrier": "cmcc", "plan": "p100", "state": "active",
                "activated_at": "2026-01-05T00:00:00+08:00",
                "expires_at": "2027-01-05T00:00:00+08:00"}}),
        );
    }
    commands.push(json!({"id": "c-rule", "type": "upsert_rule", "at": at,
        "rule": {"id": "live12", "type": 2, "condition": {"used_mb_gte": 12}}}));
    let text: Vec<String> = commands.iter().map(Value::to_string).collect();
    std::fs::write(dir.join("commands.jsonl"), text.join("\n") + "\n").unwrap();
    let mut usage = std::fs::File::create(dir.join("usage.jsonl")).unwrap();
    for s in 0..10 {
        for n in 1..=CARDS {
            let r = json!({"record_id": format!("r-{n}-{s}"), "iccid": iccid(n), "end": end(s),
                "bytes_up": 1_048_576, "bytes_down": 2 * 1_048_576});
            writeln!(usage, "{r}").unwrap();
        }
        if s == 4 {
            for line in bad {
                writeln!(usage, "{line}").unwrap();
            }
        }
    }
}

/// `flowcap rules replay` of `draft` (TOML) over the run in `dir/out`:
/// its JSON rows.
pub(crate) fn replay(dir: &Path, draft: &str, from: &str, to: &str) -> Vec<Value> {
    let path = dir.join("draft.toml");
    std::fs::write(&path, draft).unwrap();
    json_lines(&stdout_of(
        Command::new(BIN)
            .args(["rules", "replay", "--format", "json", "--rule"])
            .arg(&path)
            .args(["--from", from, "--to", to, "--data"])
            .arg(dir.join("out")),
        "flowcap rules replay",
    ))
}
