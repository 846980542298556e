//! Resuming on a directory that already holds outputs, as an operator
//! meets it (docs/DECISIONS.md, "The resume rule"):
//!
//! - no usable snapshot (all corrupt, of another format version, or not
//!   readable) refuses to start, names each snapshot and why, and leaves
//!   every file under `--out` as it was; only `--fresh` starts over;
//! - input files are known by identity (path, size, content hash): day
//!   files fed one run at a time equal one run over their concatenation, a
//!   file consumed already is skipped and said so, a file changed under its
//!   recorded position is refused, a grown commands file applies only its
//!   new commands.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;

use common::{sorted_lines as lines, sql_rows, tree, BIN};

/// `flowcap run -q --json ARGS --out OUT`, whatever its outcome.
fn run(out: &Path, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "-q", "--json"]);
    for a in args {
        cmd.arg(a);
    }
    cmd.arg("--out").arg(out).output().unwrap()
}

/// The summary of a run that must succeed.
fn summary(output: &Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()["summary"].clone()
}

const GENERATOR: [&str; 8] = [
    "--cards",
    "1000",
    "--hours",
    "24",
    "--seed",
    "5",
    "--snapshot-every",
    "5000",
];

/// A generator run with several snapshots; their paths, oldest first.
fn generated(out: &Path) -> Vec<PathBuf> {
    let args: Vec<&dyn AsRef<std::ffi::OsStr>> =
        GENERATOR.iter().map(|a| a as &dyn AsRef<_>).collect();
    summary(&run(out, &args));
    let mut snapshots: Vec<PathBuf> = std::fs::read_dir(out.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .collect();
    snapshots.sort();
    assert!(snapshots.len() >= 2, "{snapshots:?}");
    snapshots
}

/// Runs the generator again on `out`: it must be refused, name every
/// snapshot with `why` (one per snapshot, oldest first), say how to go on,
/// and leave every file as it was.
fn refused(out: &Path, snapshots: &[PathBuf], why: &[&str]) {
    let before = tree(out);
    let args: Vec<&dyn AsRef<std::ffi::OsStr>> =
        GENERATOR.iter().map(|a| a as &dyn AsRef<_>).collect();
    let output = run(out, &args);
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "started: {err}");
    for (path, why) in snapshots.iter().zip(why) {
        let name = path.file_name().unwrap().to_str().unwrap();
        let line = err
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("{name} not named: {err}"));
        assert!(line.contains(why), "{name}: {why}? {err}");
    }
    assert!(err.contains("--fresh"), "no way on: {err}");
    let after = tree(out);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    assert!(before == after, "a file under --out changed");
}

#[test]
fn every_snapshot_corrupt_refuses_to_start_and_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let snapshots = generated(&out);
    for path in &snapshots {
        let mut bytes = std::fs::read(path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        std::fs::write(path, bytes).unwrap();
    }
    refused(&out, &snapshots, &vec!["checksum"; snapshots.len()]);

    // Starting over is there when asked for.
    let args: Vec<&dyn AsRef<std::ffi::OsStr>> = GENERATOR
        .iter()
        .chain(&["--fresh"])
        .map(|a| a as &dyn AsRef<_>)
        .collect();
    let s = summary(&run(&out, &args));
    assert!(s["resumed_after_seq"].is_null(), "{s}");
}

#[test]
fn snapshots_of_an_older_format_are_refused_by_name_and_version() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let snapshots = generated(&out);
    for path in &snapshots {
        let mut bytes = std::fs::read(path).unwrap();
        bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
        std::fs::write(path, bytes).unwrap();
    }
    refused(&out, &snapshots, &vec!["format version 1"; snapshots.len()]);
}

/// A snapshot format version this build does not read.
const OTHER_VERSION: u32 = flowcap_engine::snapshot::SNAPSHOT_VERSION + 1;

#[test]
fn a_restore_failing_on_io_errors_is_refused_and_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let snapshots = generated(&out);
    // The newest is a directory where a file is expected (read fails with
    // an I/O error); the others are unusable too, each for its own reason.
    let (newest, older) = snapshots.split_last().unwrap();
    std::fs::remove_file(newest).unwrap();
    std::fs::create_dir(newest).unwrap();
    let other_version = format!("format version {OTHER_VERSION}");
    let mut why = Vec::new();
    for (i, path) in older.iter().enumerate() {
        let mut bytes = std::fs::read(path).unwrap();
        if i % 2 == 0 {
            bytes.truncate(bytes.len() - 10);
            why.push("truncated");
        } else {
            bytes[8..12].copy_from_slice(&OTHER_VERSION.to_le_bytes());
            why.push(other_version.as_str());
        }
        std::fs::write(path, bytes).unwrap();
    }
    why.push("I/O error");
    refused(&out, &snapshots, &why);
}

#[test]
fn a_corrupt_newest_snapshot_falls_back_to_an_older_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let snapshots = generated(&out);
    let newest = snapshots.last().unwrap();
    let bytes = std::fs::read(newest).unwrap();
    std::fs::write(newest, &bytes[..bytes.len() / 2]).unwrap();
    let args: Vec<&dyn AsRef<std::ffi::OsStr>> =
        GENERATOR.iter().map(|a| a as &dyn AsRef<_>).collect();
    let s = summary(&run(&out, &args));
    assert!(s["resumed_after_seq"].as_u64().is_some(), "{s}");
}

/// A generated workload's commands and records, the records split into
/// `parts` day files (in order); paths of (commands, all records, parts).
fn workload(dir: &Path, parts: usize) -> (PathBuf, PathBuf, Vec<PathBuf>) {
    let gen = dir.join("gen");
    let status = Command::new(BIN)
        .args([
            "loadgen", "--cards", "1000", "--hours", "48", "--seed", "11", "--out",
        ])
        .arg(&gen)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let all = gen.join("usage.jsonl");
    let text = std::fs::read_to_string(&all).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let per = lines.len().div_ceil(parts);
    let days = lines
        .chunks(per)
        .enumerate()
        .map(|(i, chunk)| {
            let path = dir.join(format!("day{}.jsonl", i + 1));
            std::fs::write(&path, chunk.join("\n") + "\n").unwrap();
            path
        })
        .collect();
    (gen.join("commands.jsonl"), all, days)
}

/// `lines` without the wall-clock receive time that `future_time`
/// messages quote (file records are stamped when read), sorted again.
fn without_received(lines: Vec<String>) -> Vec<String> {
    let mut lines: Vec<String> = lines
        .into_iter()
        .map(|mut l| {
            if let Some(at) = l.find("(received ") {
                if let Some(len) = l[at..].find(')') {
                    l.replace_range(at..=at + len, "");
                }
            }
            l
        })
        .collect();
    lines.sort();
    lines
}

fn card_totals(out: &Path) -> Vec<serde_json::Value> {
    sql_rows(
        out,
        "SELECT iccid, cycle, records, bytes FROM card_cycle_usage ORDER BY iccid, cycle",
    )
}

#[test]
fn day_files_fed_one_run_at_a_time_equal_one_run_over_all() {
    let dir = tempfile::tempdir().unwrap();
    let (commands, all, days) = workload(dir.path(), 3);
    let whole = dir.path().join("whole");
    let s = summary(&run(&whole, &[&"--input", &all, &"--commands", &commands]));
    assert!(s["counted"].as_u64().unwrap() > 10_000, "{s}");

    let daily = dir.path().join("daily");
    let mut inputs = 0;
    for (i, day) in days.iter().enumerate() {
        let s = if i == 0 {
            summary(&run(&daily, &[&"--input", day, &"--commands", &commands]))
        } else {
            summary(&run(&daily, &[&"--input", day]))
        };
        assert!(s["inputs"].as_u64().unwrap() > 0, "day {}: {s}", i + 1);
        inputs += s["inputs"].as_u64().unwrap();
    }
    let commands_n = std::fs::read_to_string(&commands).unwrap().lines().count();
    let records_n = std::fs::read_to_string(&all).unwrap().lines().count();
    assert_eq!(inputs as usize, commands_n + records_n);
    for file in ["events.jsonl", "rejects.jsonl", "journal.jsonl"] {
        assert_eq!(
            without_received(lines(&whole.join(file))),
            without_received(lines(&daily.join(file))),
            "{file} differs"
        );
    }
    let totals = card_totals(&whole);
    assert!(totals.len() >= 1000);
    assert_eq!(totals, card_totals(&daily));
}

#[test]
fn a_consumed_file_given_again_is_skipped_and_said_so() {
    let dir = tempfile::tempdir().unwrap();
    let (commands, _, days) = workload(dir.path(), 2);
    let out = dir.path().join("out");
    summary(&run(
        &out,
        &[&"--input", &days[0], &"--commands", &commands],
    ));
    let before = tree(&out);
    let output = run(&out, &[&"--input", &days[0], &"--commands", &commands]);
    let s = summary(&output);
    assert_eq!(s["inputs"], 0, "{s}");
    let files = s["files"].as_array().unwrap();
    assert_eq!(files.len(), 2, "{s}");
    for f in files {
        assert_eq!(f["status"], "consumed", "{s}");
    }
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("already consumed") && err.contains("day1.jsonl"),
        "{err}"
    );
    // Nothing new was written (no snapshot either: nothing was read).
    assert!(before == tree(&out), "outputs changed");
}

#[test]
fn a_file_changed_under_its_recorded_position_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (commands, _, days) = workload(dir.path(), 2);
    let out = dir.path().join("out");
    summary(&run(
        &out,
        &[&"--input", &days[0], &"--commands", &commands],
    ));
    let mut bytes = std::fs::read(&days[0]).unwrap();
    let at = bytes.iter().position(|b| b.is_ascii_digit()).unwrap();
    bytes[at] = if bytes[at] == b'9' { b'8' } else { b'9' };
    std::fs::write(&days[0], bytes).unwrap();
    let before = tree(&out);
    let output = run(&out, &[&"--input", &days[0]]);
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "started: {err}");
    assert!(
        err.contains(days[0].file_name().unwrap().to_str().unwrap()) && err.contains("changed"),
        "{err}"
    );
    assert!(before == tree(&out), "outputs changed");

    // A file shorter than its recorded position also changed.
    std::fs::write(&days[0], b"").unwrap();
    let output = run(&out, &[&"--input", &days[0]]);
    assert!(!output.status.success());
}

#[test]
fn a_grown_commands_file_applies_only_its_new_commands() {
    let dir = tempfile::tempdir().unwrap();
    let iccid = "89860312345678901234";
    let rec = |id: &str, end: &str, bytes: u64| {
        format!(
            r#"{{"record_id":"{id}","iccid":"{iccid}","end":"{end}","bytes_up":{bytes},"bytes_down":0}}"#
        ) + "\n"
    };
    let commands = dir.path().join("commands.jsonl");
    std::fs::write(
        &commands,
        [
            r#"{"id":"c1","type":"upsert_plan","at":"2026-11-01T00:00:00+08:00","plan":{"id":"ct-30","carrier":"ctcc","allowance_mb":30,"traffic":"directed"}}"#,
            r#"{"id":"c2","type":"upsert_card","at":"2026-11-01T00:00:00+08:00","card":{"iccid":"89860312345678901234","carrier":"ctcc","plan":"ct-30","state":"active"}}"#,
        ]
        .join("\n")
            + "\n",
    )
    .unwrap();
    let day1 = dir.path().join("day1.jsonl");
    std::fs::write(&day1, rec("r1", "2026-11-01T01:00:00+08:00", 600_000)).unwrap();
    let out = dir.path().join("out");
    let s = summary(&run(&out, &[&"--input", &day1, &"--commands", &commands]));
    assert_eq!(s["commands_ok"], 2, "{s}");

    // Day 2: a threshold of 1 MB set in the morning, then records.
    let mut grown = std::fs::read_to_string(&commands).unwrap();
    grown.push_str(&format!(
        r#"{{"id":"c3","type":"set_threshold","at":"2026-11-02T00:00:00+08:00","iccids":["{iccid}"],"mb":1}}"#
    ));
    grown.push('\n');
    std::fs::write(&commands, grown).unwrap();
    let day2 = dir.path().join("day2.jsonl");
    std::fs::write(
        &day2,
        rec("r2", "2026-11-02T01:00:00+08:00", 300_000)
            + &rec("r3", "2026-11-02T02:00:00+08:00", 300_000),
    )
    .unwrap();
    let s = summary(&run(&out, &[&"--input", &day2, &"--commands", &commands]));
    assert_eq!(s["commands_ok"], 1, "only c3 is new: {s}");
    assert_eq!(s["counted"], 2, "{s}");
    assert_eq!(s["card_events"], 1, "the threshold cuts on r3: {s}");
    let journal = std::fs::read_to_string(out.join("journal.jsonl")).unwrap();
    assert_eq!(journal.lines().count(), 3, "{journal}");
    assert!(!journal.contains(r#""repeat":true"#), "{journal}");
    let events = std::fs::read_to_string(out.join("events.jsonl")).unwrap();
    assert!(events.contains(r#""record_id":"r3""#), "{events}");
}
