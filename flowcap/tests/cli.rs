//! The CLI as a user meets it: help, the example config, file input with
//! bad lines, clear errors.

use std::process::Command;

mod common;

use common::{sql_text, stdout_of, BIN};

/// Runs `flowcap run --json` on a records file and a commands file (lines
/// written to a temporary directory) and returns the parsed output and the
/// output directory.
fn run_files(
    dir: &std::path::Path,
    commands: &[&str],
    records: &[String],
) -> (serde_json::Value, std::path::PathBuf) {
    let commands_path = dir.join("commands.jsonl");
    std::fs::write(&commands_path, commands.join("\n")).unwrap();
    let input = dir.join("usage.jsonl");
    std::fs::write(&input, records.join("\n")).unwrap();
    let out_dir = dir.join("out");
    let out = stdout_of(
        Command::new(BIN)
            .args(["run", "-q", "--json", "--input"])
            .arg(&input)
            .arg("--commands")
            .arg(&commands_path)
            .arg("--out")
            .arg(&out_dir),
        "flowcap run",
    );
    (serde_json::from_str(&out).unwrap(), out_dir)
}

#[test]
fn help_lists_the_subcommands_and_run_flags() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("run") && text.contains("loadgen"), "{text}");
    let out = Command::new(BIN).args(["run", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--out",
        "--input",
        "--commands",
        "--shards",
        "--snapshot-every",
        "--fresh",
        "--http",
        "--linger",
    ] {
        assert!(text.contains(flag), "run --help lacks {flag}");
    }
}

#[test]
fn a_zstd_level_out_of_range_is_refused_from_the_flag_and_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["run", "-q", "--history-zstd-level", "23", "--out"])
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--history-zstd-level") && err.contains("23"),
        "{err}"
    );

    let config = dir.path().join("zstd.toml");
    std::fs::write(&config, "[run]\nhistory_zstd_level = 0\n").unwrap();
    let out = Command::new(BIN)
        .args(["run", "-q", "--config"])
        .arg(&config)
        .arg("--out")
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("history_zstd_level 0"), "{err}");
    assert!(
        !dir.path().join("out").exists(),
        "nothing runs with a bad level"
    );
}

#[test]
fn the_example_config_is_valid_and_unknown_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../flowcap.example.toml");
    let out = Command::new(BIN)
        .args([
            "run", "-q", "--cards", "1000", "--hours", "2", "--config", example, "--out",
        ])
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[engine]\nallowed_lateness = 5\n").unwrap();
    let out = Command::new(BIN)
        .args(["run", "-q", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown field") && err.contains("allowed_lateness"),
        "{err}"
    );
}

#[test]
fn file_input_with_bad_lines_rejects_them_and_counts_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let rec = |id: &str, bytes: u64| {
        format!(
            r#"{{"record_id":"{id}","iccid":"89860312345678901234","end":"2026-11-01T01:00:00+08:00","bytes_up":{bytes},"bytes_down":0}}"#
        )
    };
    let (v, out_dir) = run_files(
        dir.path(),
        &[
            r#"{"id":"c1","type":"upsert_plan","at":"2026-11-01T00:00:00+08:00","plan":{"id":"ct-30","carrier":"ctcc","allowance_mb":30,"traffic":"directed"}}"#,
            r#"{"id":"c2","type":"upsert_card","at":"2026-11-01T00:00:00+08:00","card":{"iccid":"89860312345678901234","carrier":"ctcc","plan":"ct-30","state":"active"}}"#,
            r#"{"id":"c3","type":"set_threshold","at":"2026-11-01T00:00:00+08:00","iccids":["89860312345678901234"],"mb":1}"#,
            r#"{"id":"c4","type":"teleport","at":"2026-11-01T00:00:00+08:00"}"#,
        ],
        &[
            rec("r1", 600_000),
            "{not json".into(),
            rec("r2", 600_000),
            rec("r2", 600_000),
            rec("r3", 1),
        ],
    );
    let s = &v["summary"];
    assert_eq!(s["counted"], 3);
    assert_eq!(s["duplicates"], 1);
    assert_eq!(s["rejected"]["not_json"], 1);
    assert_eq!(s["commands_failed"], 1);
    assert_eq!(s["card_events"], 1);
    let events = std::fs::read_to_string(out_dir.join("events.jsonl")).unwrap();
    assert!(
        events.contains(r#""reasons":["over_threshold"]"#),
        "{events}"
    );
    assert!(
        events.contains(r#""record_id":"r2""#),
        "the cut is on the crossing record: {events}"
    );
    let journal = std::fs::read_to_string(out_dir.join("journal.jsonl")).unwrap();
    assert!(journal.contains("unknown_type"), "{journal}");
    let rejects = std::fs::read_to_string(out_dir.join("rejects.jsonl")).unwrap();
    assert!(rejects.contains(r#""raw":"{not json""#), "{rejects}");
}

#[test]
fn missing_input_is_a_clear_error() {
    let out = Command::new(BIN)
        .args(["run", "-q", "--input", "/nonexistent/usage.jsonl"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/usage.jsonl"), "{err}");
}

/// The position a run resumes from is the driver's, not the engine's: an
/// input that never reached the engine (a line that does not decode) right
/// before a snapshot must not be processed again after a restart.
#[test]
fn a_malformed_last_input_is_not_replayed_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("usage.jsonl");
    // The first line reaches the engine (and is rejected there: unknown
    // card); the two after it never do.
    let unknown = r#"{"record_id":"r1","iccid":"89860312345678901234","end":"2026-11-01T01:00:00+08:00","bytes_up":1,"bytes_down":0}"#;
    std::fs::write(
        &input,
        format!("{unknown}\n{{not json\n{{\"also\": \"bad\"}}\n"),
    )
    .unwrap();
    let out_dir = dir.path().join("out");
    for _ in 0..2 {
        let out = Command::new(BIN)
            .args(["run", "-q", "--snapshot-every", "1", "--input"])
            .arg(&input)
            .arg("--out")
            .arg(&out_dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rejects = std::fs::read_to_string(out_dir.join("rejects.jsonl")).unwrap();
    assert_eq!(rejects.lines().count(), 3, "{rejects}");
}

/// Commands dated long before the records (a fleet set up weeks earlier)
/// must not make every record look "far in the future"; a record really in
/// the future (a device clock years ahead) still is.
#[test]
fn file_records_weeks_after_the_setup_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let rec = |id: &str, end: &str| {
        format!(
            r#"{{"record_id":"{id}","iccid":"89860312345678901234","end":"{end}","bytes_up":5,"bytes_down":0}}"#
        )
    };
    let (v, _) = run_files(
        dir.path(),
        &[
            r#"{"id":"c1","type":"upsert_plan","at":"2026-10-01T00:00:00+08:00","plan":{"id":"ct-30","carrier":"ctcc","allowance_mb":30,"traffic":"directed"}}"#,
            r#"{"id":"c2","type":"upsert_card","at":"2026-10-01T00:00:00+08:00","card":{"iccid":"89860312345678901234","carrier":"ctcc","plan":"ct-30","state":"active"}}"#,
        ],
        &[
            rec("r1", "2026-11-20T01:00:00+08:00"),
            rec("r2", "2099-01-01T00:00:00+08:00"),
        ],
    );
    assert_eq!(v["summary"]["counted"], 1, "{v}");
    assert_eq!(v["summary"]["rejected"]["future_time"], 1, "{v}");
}

/// From the 27th `cucc` cards are in the next cycle while the others are
/// still in the calendar month: `top-cards` without `--cycle` takes each
/// carrier's current cycle, not the newest partition (only `cucc` cards).
#[test]
fn top_cards_takes_each_carriers_current_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let (ct, cu_now, cu_before) = (
        "89860312345678901234",
        "89860112345678901234",
        "89860112345678905678",
    );
    let rec = |id: &str, iccid: &str, end: &str, bytes: u64| {
        format!(
            r#"{{"record_id":"{id}","iccid":"{iccid}","end":"{end}","bytes_up":{bytes},"bytes_down":0}}"#
        )
    };
    let card = |id: &str, iccid: &str, carrier: &str, plan: &str| {
        format!(
            r#"{{"id":"{id}","type":"upsert_card","at":"2026-11-01T00:00:00+08:00","card":{{"iccid":"{iccid}","carrier":"{carrier}","plan":"{plan}","state":"active"}}}}"#
        )
    };
    let commands = [
        r#"{"id":"p1","type":"upsert_plan","at":"2026-11-01T00:00:00+08:00","plan":{"id":"ct-1g","carrier":"ctcc","allowance_mb":1000,"traffic":"directed"}}"#.to_owned(),
        r#"{"id":"p2","type":"upsert_plan","at":"2026-11-01T00:00:00+08:00","plan":{"id":"cu-1g","carrier":"cucc","allowance_mb":1000,"traffic":"directed"}}"#.to_owned(),
        card("c1", ct, "ctcc", "ct-1g"),
        card("c2", cu_now, "cucc", "cu-1g"),
        card("c3", cu_before, "cucc", "cu-1g"),
    ];
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    let (v, out_dir) = run_files(
        dir.path(),
        &commands,
        &[
            rec("r1", ct, "2026-11-20T10:00:00+08:00", 3000),
            rec("r2", cu_before, "2026-11-20T10:00:00+08:00", 5000),
            rec("r3", ct, "2026-11-28T10:00:00+08:00", 1000),
            rec("r4", cu_now, "2026-11-28T10:00:00+08:00", 2000),
        ],
    );
    assert_eq!(v["summary"]["counted"], 4, "{v}");
    let text = stdout_of(
        Command::new(BIN)
            .args(["query", "top-cards", "--format", "csv", "--data"])
            .arg(&out_dir),
        "flowcap query top-cards",
    );
    let rows: Vec<&str> = text.lines().collect();
    // ctcc: its November (4000 bytes); cucc: the December cycle begun on
    // the 27th (2000 bytes); the cucc card used only in the closed cycle
    // is not there.
    assert_eq!(
        rows,
        [
            "iccid,bytes,records".to_owned(),
            format!("{ct},4000,2"),
            format!("{cu_now},2000,1"),
        ],
        "{text}"
    );
}

/// Custom attributes are in the `cards` table, one column per slot of the
/// declared names (`attr_1` the first), for plain SQL; a disabled name's
/// column is empty.
#[test]
fn custom_attributes_are_columns_of_the_cards_table() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = ("89860412345678901234", "89860412345678905678");
    let card = |id: &str, iccid: &str, attributes: &str| {
        format!(
            r#"{{"id":"{id}","type":"upsert_card","at":"2026-11-01T00:00:00+08:00","card":{{"iccid":"{iccid}","carrier":"cmcc","plan":"cm-1g","state":"active","attributes":{attributes}}}}}"#
        )
    };
    let commands = [
        r#"{"id":"p1","type":"upsert_plan","at":"2026-11-01T00:00:00+08:00","plan":{"id":"cm-1g","carrier":"cmcc","allowance_mb":1000,"traffic":"directed"}}"#.to_owned(),
        r#"{"id":"a1","type":"set_attribute_names","at":"2026-11-01T00:00:00+08:00","names":["customer","site","batch"]}"#.to_owned(),
        card("c1", one, r#"{"customer":"acme","site":"north","batch":"b7"}"#),
        card("c2", two, r#"{"customer":"globex"}"#),
        r#"{"id":"a2","type":"disable_attribute","at":"2026-11-01T00:00:00+08:00","name":"batch"}"#.to_owned(),
    ];
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    let record = format!(
        r#"{{"record_id":"r1","iccid":"{one}","end":"2026-11-20T10:00:00+08:00","bytes_up":100,"bytes_down":0}}"#
    );
    let (v, out_dir) = run_files(dir.path(), &commands, &[record]);
    assert_eq!(v["summary"]["counted"], 1, "{v}");
    let sql = |query: &str| sql_text(&out_dir, "csv", query);
    assert_eq!(
        sql("SELECT iccid, attr_1, attr_2, attr_3, attr_4 FROM cards_current ORDER BY iccid"),
        format!("iccid,attr_1,attr_2,attr_3,attr_4\n{one},acme,north,,\n{two},globex,,,\n")
    );
    assert_eq!(
        sql("SELECT iccid FROM cards_current WHERE attr_1 = 'acme'"),
        format!("iccid\n{one}\n")
    );
    // The whole table still exports as CSV.
    assert_eq!(sql("SELECT * FROM cards").lines().count(), 3);
}
