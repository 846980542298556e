//! `flowcap run --http`: the operations endpoints on the real binary.
//!
//! The run is small and `--linger` keeps the server up after it, so the
//! test scrapes the final values and compares them with the run's own
//! summary: no sleeps, no timing. The test waits on the lines the binary
//! prints on stderr (`ops: listening on ...`, `ops: run finished ...`).

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{line_starting, Running};

const BIN: &str = env!("CARGO_BIN_EXE_flowcap");

/// A plain HTTP/1.1 GET: (status, body).
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Sample lines of the Prometheus text format: `name{labels}` -> value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The address the server says it listens on (its `ops: listening` line).
fn listening(lines: &mut impl Iterator<Item = std::io::Result<String>>) -> SocketAddr {
    const PREFIX: &str = "ops: listening on http://";
    line_starting(lines, PREFIX)
        .trim_start_matches(PREFIX)
        .parse()
        .unwrap()
}

#[test]
fn run_with_http_exports_what_the_summary_says() {
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(BIN)
        .args([
            "run",
            "-q",
            "--json",
            "--fresh",
            "--cards",
            "1000",
            "--hours",
            "2",
            "--shards",
            "2",
            // Many small history windows, merged as soon as two are old
            // enough: the compaction counters have something to show.
            "--snapshot-every",
            "300",
            "--history-compact-files",
            "2",
            "--http",
            "127.0.0.1:0",
            "--linger",
            "--out",
        ])
        .arg(dir.path().join("out"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Running(child);
    let mut stderr = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let addr = listening(&mut stderr);
    let (status, body) = get(addr, "/livez");
    assert_eq!((status, body.trim()), (200, "ok"));

    line_starting(&mut stderr, "ops: run finished");
    // The summary is printed before that line; stdout stays open while the
    // process lingers, so read the JSON document up to its closing brace.
    let mut stdout = BufReader::new(child.0.stdout.take().unwrap());
    let mut doc = String::new();
    loop {
        let mut line = String::new();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "no summary");
        doc.push_str(&line);
        if line.trim_end() == "}" {
            break;
        }
    }
    let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
    let summary = &doc["summary"];
    let n = |key: &str| summary[key].as_u64().unwrap() as f64;

    let (status, text) = get(addr, "/metrics");
    assert_eq!(status, 200);
    let m = samples(&text);
    let value = |series: &str| {
        *m.get(series)
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    assert_eq!(value("flowcap_records_counted_total"), n("counted"));
    assert_eq!(
        value("flowcap_records_history_only_total"),
        n("history_only")
    );
    assert_eq!(value("flowcap_records_late_total"), n("late"));
    assert_eq!(value("flowcap_duplicates_total"), n("duplicates"));
    assert_eq!(
        value(r#"flowcap_commands_total{outcome="ok"}"#),
        n("commands_ok")
    );
    assert_eq!(
        value(r#"flowcap_commands_total{outcome="failed"}"#),
        n("commands_failed")
    );
    assert_eq!(
        value(r#"flowcap_actions_out_total{kind="card_state"}"#),
        n("card_events")
    );
    assert_eq!(
        value(r#"flowcap_actions_out_total{kind="pool_state"}"#),
        n("pool_events")
    );
    assert_eq!(value("flowcap_snapshots_total"), n("snapshots"));
    let rejected = summary["rejected"].as_object().unwrap();
    assert!(!rejected.is_empty(), "the workload has rejects");
    let mut rejects = 0.0;
    for (reason, count) in rejected {
        let count = count.as_u64().unwrap() as f64;
        assert_eq!(
            value(&format!(r#"flowcap_rejects_total{{reason="{reason}"}}"#)),
            count
        );
        rejects += count;
    }
    // Every record read ends up counted, in history, dropped as a duplicate
    // or rejected: exactly one of them.
    assert_eq!(
        value(r#"flowcap_records_in_total{source="generator"}"#),
        n("counted") + n("history_only") + n("duplicates") + rejects
    );
    let cards: u64 = summary["cards_by_state"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(value("flowcap_engine_cards"), cards as f64);
    assert!(value("flowcap_event_clock_seconds") > 1.5e9);
    for shard in 0..2 {
        assert_eq!(
            value(&format!(r#"flowcap_shard_queue_depth{{shard="{shard}"}}"#)),
            0.0
        );
    }
    // Copied from the compactor at each snapshot: what it had done by the
    // last one. Every merge takes at least two files, none of the
    // writer's files needs sorting again, and none fails.
    let merges = value("flowcap_history_compactions_total");
    assert!(value("flowcap_history_compacted_files_total") >= 2.0 * merges);
    assert!(value("flowcap_history_compacted_rows_total") >= merges);
    assert!(value("flowcap_history_compaction_milliseconds_total") >= 0.0);
    assert_eq!(value("flowcap_history_compaction_sorted_again_total"), 0.0);
    assert_eq!(value("flowcap_history_compaction_failures_total"), 0.0);
    // Requests queued for the compaction thread at the last snapshot
    // (it runs on idle CPU only): at most the snapshots taken.
    let waiting = value("flowcap_history_compaction_requests_waiting");
    assert!(waiting >= 0.0 && waiting <= value("flowcap_snapshots_total"));
    assert!(value("flowcap_last_snapshot_timestamp_seconds") > 1.5e9);
    assert!(value("flowcap_snapshot_age_seconds") >= 0.0);
    assert_eq!(
        value("flowcap_snapshot_duration_seconds_count"),
        n("snapshots")
    );

    let (status, body) = get(addr, "/readyz");
    assert_eq!(status, 503, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["ready"], false);
    assert!(
        ready["reason"].as_str().unwrap().contains("run finished"),
        "{body}"
    );
}

#[test]
fn linger_needs_http() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args([
            "run", "-q", "--cards", "1000", "--hours", "1", "--linger", "--out",
        ])
        .arg(dir.path().join("out"))
        .env_remove("FLOWCAP_HTTP")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--linger needs --http"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_config_file_can_turn_http_on() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("flowcap.toml");
    std::fs::write(&config, "[run]\nhttp = \"127.0.0.1:0\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["run", "-q", "--cards", "1000", "--hours", "1", "--config"])
        .arg(&config)
        .arg("--out")
        .arg(dir.path().join("out"))
        .env_remove("FLOWCAP_HTTP")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("ops: listening on http://127.0.0.1:"),
        "{stderr}"
    );
}

/// A line over the record size limit is a reject like any other:
/// `flowcap_rejects_total{reason="too_large"}` and a record read.
#[test]
fn an_oversized_line_counts_in_the_rejects_metric() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("usage.jsonl");
    let small = r#"{"record_id":"r1","iccid":"89860312345678901234","end":"2026-11-01T01:00:00+08:00","bytes_up":1,"bytes_down":0}"#;
    std::fs::write(&input, format!("{small}\n{}\n", "x".repeat(3 << 20))).unwrap();
    let child = Command::new(BIN)
        .args(["run", "-q", "--json", "--no-notify", "--input"])
        .arg(&input)
        .args(["--http", "127.0.0.1:0", "--linger", "--out"])
        .arg(dir.path().join("out"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Running(child);
    let mut stderr = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let addr = listening(&mut stderr);
    line_starting(&mut stderr, "ops: run finished");
    let (status, text) = get(addr, "/metrics");
    assert_eq!(status, 200);
    let m = samples(&text);
    assert_eq!(
        m.get(r#"flowcap_rejects_total{reason="too_large"}"#),
        Some(&1.0),
        "{text}"
    );
    // The other line: a record of a card never created.
    assert_eq!(
        m.get(r#"flowcap_rejects_total{reason="unknown_card"}"#),
        Some(&1.0),
        "{text}"
    );
    assert_eq!(
        m.get(r#"flowcap_records_in_total{source="file"}"#),
        Some(&2.0),
        "{text}"
    );
}
