//! Bad input bounded, in file mode: a line over the size limit is
//! dead-lettered as `too_large` with its first bytes and its length, never
//! read whole, and the inputs after it are processed; a replay writes the
//! same dead letters.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::BIN;

const CARD: &str = "89860312345678901234";

const SETUP: [&str; 2] = [
    r#"{"id":"c1","type":"upsert_plan","at":"2026-11-01T00:00:00+08:00","plan":{"id":"ct-30","carrier":"ctcc","allowance_mb":30,"traffic":"directed"}}"#,
    r#"{"id":"c2","type":"upsert_card","at":"2026-11-01T00:00:00+08:00","card":{"iccid":"89860312345678901234","carrier":"ctcc","plan":"ct-30","state":"active"}}"#,
];

fn rec(id: &str) -> String {
    format!(
        r#"{{"record_id":"{id}","iccid":"{CARD}","end":"2026-11-01T01:00:00+08:00","bytes_up":1000,"bytes_down":0}}"#
    )
}

/// A record line of `len` bytes or more: valid JSON with a huge unknown
/// field.
fn huge(id: &str, len: usize) -> String {
    format!(
        r#"{{"record_id":"{id}","iccid":"{CARD}","end":"2026-11-01T01:00:00+08:00","bytes_up":1,"bytes_down":0,"pad":"{}"}}"#,
        "x".repeat(len)
    )
}

/// Writes the files and runs `flowcap run -q --json` on them with `args`;
/// the summary.
fn run(
    dir: &Path,
    out: &Path,
    commands: &[String],
    records: &[String],
    args: &[&str],
) -> serde_json::Value {
    run_with(dir, out, commands, records, args, &[])
}

/// [`run`] with environment variables.
fn run_with(
    dir: &Path,
    out: &Path,
    commands: &[String],
    records: &[String],
    args: &[&str],
    env: &[(&str, &str)],
) -> serde_json::Value {
    let commands_path = dir.join("commands.jsonl");
    std::fs::write(&commands_path, commands.join("\n")).unwrap();
    let input = dir.join("usage.jsonl");
    std::fs::write(&input, records.join("\n")).unwrap();
    let text = common::stdout_of(
        Command::new(BIN)
            .args(["run", "-q", "--json", "--no-notify", "--input"])
            .arg(&input)
            .arg("--commands")
            .arg(&commands_path)
            .arg("--out")
            .arg(out)
            .args(args)
            .envs(env.iter().copied()),
        "flowcap run",
    );
    serde_json::from_str(&text).unwrap()
}

fn setup() -> Vec<String> {
    SETUP.iter().map(|s| s.to_string()).collect()
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    common::json_lines(&std::fs::read_to_string(path).unwrap())
}

#[test]
fn a_multi_megabyte_line_is_dead_lettered_as_too_large_and_the_rest_counts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let big = huge("big", 5 << 20);
    let records = [rec("r1"), big.clone(), rec("r2"), rec("r3")];
    let summary = run(dir.path(), &out, &setup(), &records, &[]);
    let s = &summary["summary"];
    assert_eq!(s["counted"], 3, "{summary}");
    assert_eq!(s["rejected"]["too_large"], 1, "{summary}");

    let rejects = std::fs::read_to_string(out.join("rejects.jsonl")).unwrap();
    assert!(rejects.len() < 8 * 1024, "{} bytes", rejects.len());
    let letter = &lines(&out.join("rejects.jsonl"))[0];
    assert_eq!(letter["code"], "too_large");
    assert_eq!(
        letter["message"],
        format!(
            "record of {} bytes exceeds the limit of 65536 bytes",
            big.len()
        )
    );
    assert_eq!(letter["raw_truncated"], true);
    assert_eq!(letter["raw_len"], big.len() as u64);
    assert_eq!(letter["raw"], big[..4096]);

    // The history's quarantine row is as bounded.
    let rows = common::sql_rows(
        &out,
        "SELECT reason, octet_length(CAST(raw AS VARCHAR)) AS n, message FROM quarantine",
    );
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["reason"], "too_large");
    assert_eq!(rows[0]["n"], 4096);
    assert!(
        rows[0]["message"]
            .as_str()
            .unwrap()
            .ends_with(&format!("(raw: the first 4096 of {} bytes)", big.len())),
        "{rows:?}"
    );
}

#[test]
fn a_command_over_the_limit_is_refused_as_too_large() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let iccids: Vec<String> = (0..2000).map(|_| format!("\"{CARD}\"")).collect();
    let threshold = format!(
        r#"{{"id":"huge","type":"set_threshold","at":"2026-11-01T00:00:00+08:00","iccids":[{}],"mb":1}}"#,
        iccids.join(",")
    );
    let mut commands = setup();
    commands.push(threshold.clone());
    // By the environment (FLOWCAP_MAX_COMMAND_SIZE, as --max-command-size).
    let summary = run_with(
        dir.path(),
        &out,
        &commands,
        &[rec("r1"), rec("r2")],
        &[],
        &[("FLOWCAP_MAX_COMMAND_SIZE", "10000")],
    );
    let s = &summary["summary"];
    assert_eq!(s["commands_ok"], 2, "{summary}");
    assert_eq!(s["commands_failed"], 1, "{summary}");
    assert_eq!(s["counted"], 2, "{summary}");
    // No threshold was set: no cut.
    assert_eq!(s["card_events"], 0, "{summary}");
    let journal = lines(&out.join("journal.jsonl"));
    let refused = journal
        .iter()
        .find(|l| l.get("raw").is_some())
        .expect("the refused command in the journal");
    assert_eq!(refused["result"]["error"]["code"], "too_large", "{refused}");
    assert_eq!(refused["raw_truncated"], true);
    assert_eq!(refused["raw_len"], threshold.len() as u64);
    assert_eq!(refused["raw"], threshold[..4096]);
    let message = refused["result"]["error"]["message"].as_str().unwrap();
    assert_eq!(
        message,
        format!(
            "command of {} bytes exceeds the limit of 10000 bytes",
            threshold.len()
        )
    );
}

/// The snapshots in `out`, oldest first.
fn snapshots(out: &Path) -> Vec<PathBuf> {
    let mut all: Vec<PathBuf> = std::fs::read_dir(out.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .collect();
    all.sort();
    all
}

/// A crash before the last snapshots were written (simulated by removing
/// them): the restart rewinds the outputs and replays the inputs after the
/// oldest snapshot, dead letters of oversized lines among them, and
/// writes them as the same bytes.
#[test]
fn dead_letters_are_the_same_bytes_after_a_replay() {
    let dir = tempfile::tempdir().unwrap();
    let records = [
        rec("r1"),
        huge("big1", 100_000),
        rec("r2"),
        "{not json".to_owned(),
        huge("big2", 3 << 20),
        rec("r3"),
    ];
    let whole = dir.path().join("whole");
    let first = run(
        dir.path(),
        &whole,
        &setup(),
        &records,
        &["--snapshot-every", "2"],
    );
    assert_eq!(first["summary"]["rejected"]["too_large"], 2, "{first}");

    let replayed = dir.path().join("replayed");
    run(
        dir.path(),
        &replayed,
        &setup(),
        &records,
        &["--snapshot-every", "2"],
    );
    let kept = snapshots(&replayed);
    assert!(kept.len() >= 2, "{kept:?}");
    for newer in &kept[1..] {
        std::fs::remove_file(newer).unwrap();
    }
    let again = run(
        dir.path(),
        &replayed,
        &setup(),
        &records,
        &["--snapshot-every", "2"],
    );
    assert!(
        again["summary"]["rejected"]["too_large"].as_u64() >= Some(1),
        "the replay covers an oversized line: {again}"
    );
    for file in ["rejects.jsonl", "journal.jsonl", "events.jsonl"] {
        let want = std::fs::read(whole.join(file)).unwrap();
        let got = std::fs::read(replayed.join(file)).unwrap();
        assert!(want == got, "{file} differs after the replay");
    }
    let query = "SELECT input_seq, reason, message, raw FROM quarantine ORDER BY input_seq";
    assert_eq!(
        common::sql_text(&whole, "csv", query),
        common::sql_text(&replayed, "csv", query)
    );
}
