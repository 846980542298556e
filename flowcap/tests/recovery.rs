//! Exactness through crashes: the real `flowcap` process is killed with
//! SIGKILL at random points of a run, restarted on the same directory each
//! time, and finally allowed to finish. Its outputs must equal those of a
//! run that was never interrupted: the same accounted records, rejects,
//! journal and action events (with the same ids), each exactly once, and
//! every card's cycle total equal to the generator's own expectation.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{sorted_lines as lines, BIN};

fn flowcap(out: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "run", "-q", "--json", "--cards", "4000", "--hours", "72", "--seed", "7",
    ])
    // Small history chunks: files of the window a kill cuts short are on
    // disk when it lands, and the restart must drop them.
    .args(["--snapshot-every", "15000", "--history-roll-rows", "2000"])
    // Small chunks and eager compaction: kills land with files of an
    // unfinished window on disk, and during merges.
    .args(["--history-compact-files", "3"])
    .args(["--shards", "2", "--out"])
    .arg(out)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    cmd
}

fn summary(stdout: &[u8]) -> serde_json::Value {
    serde_json::from_slice(stdout)
        .unwrap_or_else(|e| panic!("summary JSON: {e}: {}", String::from_utf8_lossy(stdout)))
}

#[test]
fn kill_9_at_random_points_then_resume_equals_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    let crashed = dir.path().join("crashed");

    let started = Instant::now();
    let reference = flowcap(&straight).output().unwrap();
    assert!(
        reference.status.success(),
        "{}",
        String::from_utf8_lossy(&reference.stderr)
    );
    let full_run = started.elapsed();
    let reference = summary(&reference.stdout);
    assert_eq!(reference["exactness"]["mismatched"], 0);

    // Kill at pseudo-random points: each time after the run has published a
    // snapshot it had not before (so every kill lands after progress) plus a
    // random delay (so kills fall anywhere between snapshots, mid-batch,
    // mid-write). The seed is fixed so a failure reproduces; process timing
    // still varies.
    let newest_snapshot = || -> Option<String> {
        std::fs::read_dir(crashed.join("snapshots"))
            .ok()?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".bin"))
            .max()
    };
    let mut kills = 0;
    let mut state = 0x9e37_79b9_u64;
    while kills < 6 {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let delay = Duration::from_millis((state >> 33) % 250);
        let before = newest_snapshot();
        let mut child = flowcap(&crashed).spawn().unwrap();
        let deadline = Instant::now() + full_run * 4 + Duration::from_secs(10);
        while newest_snapshot() == before
            && child.try_wait().unwrap().is_none()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(delay);
        if child.try_wait().unwrap().is_some() {
            break; // finished before the kill: the run is complete
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
    }
    assert!(kills >= 5, "only {kills} kills landed mid-run");
    let last = flowcap(&crashed).output().unwrap();
    assert!(
        last.status.success(),
        "{}",
        String::from_utf8_lossy(&last.stderr)
    );
    let last = summary(&last.stdout);
    assert_eq!(last["exactness"]["mismatched"], 0, "{last}");
    assert!(last["exactness"]["cards_checked"].as_u64().unwrap() >= 4000);

    for file in ["rejects.jsonl", "journal.jsonl", "events.jsonl"] {
        let want = lines(&straight.join(file));
        let got = lines(&crashed.join(file));
        assert!(!want.is_empty(), "{file} is empty");
        assert_eq!(
            want.len(),
            got.len(),
            "{file}: line count after {kills} kills"
        );
        assert!(want == got, "{file} differs after {kills} kills");
    }
    // The Parquet history holds the same rows, each once: every table but
    // the snapshot dumps (whose cadence follows the restarts) and the
    // wall-clock `processed_at`.
    for query in [
        "SELECT iccid, record_id, end_time, bytes, cycle, counted, late, input_seq, date \
         FROM usage_records ORDER BY iccid, record_id",
        "SELECT input_seq, reason, message, raw, date FROM quarantine ORDER BY input_seq",
        "SELECT event_id, iccid, pool_id, old_state, new_state, reasons, usage_bytes, \
         overshoot_bytes, cause_id, date FROM state_changes ORDER BY event_id",
        "SELECT input_seq, command_id, ok, result FROM command_journal ORDER BY input_seq",
        "SELECT iccid, day, records, bytes, late_bytes FROM card_daily_usage ORDER BY iccid, day",
        "SELECT iccid, cycle, records, bytes FROM card_cycle_usage ORDER BY iccid, cycle",
        // The closed cycles' billed pool totals (the cucc 27th).
        "SELECT pool_id, cycle, used_bytes, as_of FROM pool_cycle_usage WHERE final \
         ORDER BY pool_id, cycle",
    ] {
        let want = history(&straight, query);
        let got = history(&crashed, query);
        assert!(want.lines().count() > 1, "{query}: empty");
        assert_eq!(
            want.lines().count(),
            got.lines().count(),
            "{query}: row count after {kills} kills"
        );
        assert!(want == got, "{query}: differs after {kills} kills");
    }
    let dupes = history(
        &crashed,
        "SELECT COUNT(*) AS n FROM (SELECT iccid, record_id FROM usage_records \
         GROUP BY iccid, record_id HAVING COUNT(*) > 1)",
    );
    assert_eq!(dupes, "n\n0\n", "records accounted twice");
    // No temporary file is left where readers look; compaction ran.
    let mut merged = 0;
    let mut stack = vec![crashed.join("history")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                assert!(
                    name.ends_with(".parquet") && !name.starts_with('.'),
                    "{name}"
                );
                merged += usize::from(name.contains("-m"));
            }
        }
    }
    assert!(merged > 0, "no history file was compacted");
}

/// A query over a run's history, as CSV (`flowcap sql`).
fn history(out: &Path, query: &str) -> String {
    common::sql_text(out, "csv", query)
}
