//! The Parquet history as an analyst meets it: `flowcap run` on the
//! built-in generator, then `flowcap sql` / `flowcap query` / `flowcap
//! export` over the output directory. Every table must say what the engine
//! emitted (the JSON-lines outputs of the same run) and what the generator
//! expects, and SQL must refuse anything but reads.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

mod common;

use common::BIN;

fn run(out: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["--seed", "5", "--snapshot-every", "20000", "--shards", "2"];
    args.extend_from_slice(extra);
    common::run_generator(out, &args)
}

fn sql(data: &Path, query: &str) -> Vec<serde_json::Value> {
    common::sql_rows(data, query)
}

fn one_i64(data: &Path, query: &str) -> i64 {
    let rows = sql(data, query);
    assert_eq!(rows.len(), 1, "{query}: {rows:?}");
    let v = rows[0].as_object().unwrap().values().next().unwrap();
    v.as_i64().unwrap_or_else(|| panic!("{query}: {v}"))
}

fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn every_table_says_what_the_engine_emitted() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let summary = run(&out, &["--cards", "1000", "--hours", "60"]);
    let s = &summary["summary"];
    assert_eq!(summary["exactness"]["mismatched"], 0);

    // usage_records: every accounted record, once.
    let accounted = s["counted"].as_i64().unwrap() + s["history_only"].as_i64().unwrap();
    assert!(accounted > 50_000, "{s}");
    assert_eq!(
        one_i64(&out, "SELECT COUNT(*) FROM usage_records"),
        accounted
    );
    assert_eq!(
        one_i64(
            &out,
            "SELECT COUNT(*) FROM (SELECT DISTINCT iccid, record_id FROM usage_records)"
        ),
        accounted
    );
    assert_eq!(
        one_i64(&out, "SELECT COUNT(*) FROM usage_records WHERE late"),
        s["late"].as_i64().unwrap()
    );
    // The date partition is the UTC+8 day of the record's end.
    assert_eq!(
        one_i64(
            &out,
            "SELECT COUNT(*) FROM usage_records \
             WHERE date <> to_char(end_time + INTERVAL '8 hours', '%Y-%m-%d')"
        ),
        0
    );

    // card_cycle_usage: the generator's independent expectation, exactly.
    let w = flowcap_loadgen::Workload::new(flowcap_loadgen::WorkloadConfig {
        cards: 1000,
        duration_hours: 60,
        seed: 5,
        ..flowcap_loadgen::WorkloadConfig::default()
    })
    .unwrap();
    let expected: BTreeMap<(String, String), i64> = w
        .expected()
        .entries()
        .map(|e| ((e.iccid.to_string(), e.cycle.to_string()), e.bytes as i64))
        .collect();
    let got: BTreeMap<(String, String), i64> =
        sql(&out, "SELECT iccid, cycle, bytes FROM card_cycle_usage")
            .into_iter()
            .map(|r| {
                (
                    (
                        r["iccid"].as_str().unwrap().to_owned(),
                        r["cycle"].as_str().unwrap().to_owned(),
                    ),
                    r["bytes"].as_i64().unwrap(),
                )
            })
            .filter(|(_, b)| *b > 0)
            .collect();
    let expected: BTreeMap<_, _> = expected.into_iter().filter(|(_, b)| *b > 0).collect();
    assert_eq!(got.len(), expected.len());
    assert!(
        got == expected,
        "card_cycle_usage differs from the generator"
    );

    // card_daily_usage sums to usage_records per day.
    let raw = sql(
        &out,
        "SELECT date, SUM(bytes) AS b, COUNT(*) AS n FROM usage_records GROUP BY date ORDER BY date",
    );
    let daily = sql(
        &out,
        "SELECT date, SUM(bytes) AS b, SUM(records) AS n FROM card_daily_usage GROUP BY date ORDER BY date",
    );
    assert!(raw.len() >= 3, "{raw:?}");
    assert_eq!(raw, daily);

    // quarantine: every reject, with its reason and raw bytes.
    let rejects = jsonl(&out.join("rejects.jsonl"));
    assert!(!rejects.is_empty());
    let got: BTreeSet<(i64, String)> = sql(&out, "SELECT input_seq, reason FROM quarantine")
        .into_iter()
        .map(|r| {
            (
                r["input_seq"].as_i64().unwrap(),
                r["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want: BTreeSet<(i64, String)> = rejects
        .iter()
        .map(|r| {
            (
                r["seq"].as_i64().unwrap(),
                r["code"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(got, want);
    assert_eq!(
        one_i64(
            &out,
            "SELECT COUNT(*) FROM quarantine WHERE raw = CAST('' AS BYTEA)"
        ),
        0
    );

    // state_changes: every action event, with its id.
    let events = jsonl(&out.join("events.jsonl"));
    assert!(!events.is_empty());
    let got: BTreeSet<String> = sql(&out, "SELECT event_id FROM state_changes")
        .into_iter()
        .map(|r| r["event_id"].as_str().unwrap().to_owned())
        .collect();
    let want: BTreeSet<String> = events
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got.len(), events.len(), "an event id twice?");
    assert_eq!(got, want);
    let cuts = one_i64(
        &out,
        "SELECT COUNT(*) FROM state_changes WHERE CAST(new_state AS VARCHAR) = 'suspended' \
         AND overshoot_bytes IS NOT NULL",
    );
    assert!(cuts > 0, "the workload crosses limits: cuts expected");

    // command_journal: every command.
    let journal = jsonl(&out.join("journal.jsonl"));
    assert_eq!(
        one_i64(&out, "SELECT COUNT(*) FROM command_journal"),
        journal.len() as i64
    );

    // cards: the final dump has every card, states as the summary says.
    let states: BTreeMap<String, i64> = sql(
        &out,
        "SELECT CAST(state AS VARCHAR) AS state, COUNT(*) AS n FROM cards_current GROUP BY 1",
    )
    .into_iter()
    .map(|r| {
        (
            r["state"].as_str().unwrap().to_owned(),
            r["n"].as_i64().unwrap(),
        )
    })
    .collect();
    let want: BTreeMap<String, i64> = s["cards_by_state"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_i64().unwrap()))
        .collect();
    assert_eq!(states, want);

    // pools: per pool and cycle the newest snapshot's row; a closed cycle
    // (the cucc 27th here) also has its row at the rollover and one final
    // row, its billed total.
    assert!(one_i64(&out, "SELECT COUNT(*) FROM pool_cycle_usage") > 0);
    assert_eq!(
        one_i64(
            &out,
            "SELECT COUNT(*) FROM (SELECT pool_id, cycle, COUNT(*) AS n FROM pool_cycle_usage \
             WHERE NOT final GROUP BY pool_id, cycle) WHERE n > 2"
        ),
        0
    );
    assert!(one_i64(&out, "SELECT COUNT(*) FROM pool_cycle_usage WHERE final") > 0);
    assert_eq!(
        one_i64(
            &out,
            "SELECT COUNT(*) FROM (SELECT pool_id, cycle, COUNT(*) AS n FROM pool_cycle_usage \
             WHERE final GROUP BY pool_id, cycle) WHERE n > 1"
        ),
        0
    );
}

#[test]
fn console_queries_run_and_agree_with_plain_sql() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    run(&out, &["--cards", "1000", "--hours", "60"]);
    let query = |args: &[&str]| -> String {
        let res = Command::new(BIN)
            .arg("query")
            .args(args)
            .args(["--format", "csv", "--data"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            res.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&res.stderr)
        );
        String::from_utf8(res.stdout).unwrap()
    };
    let top = query(&["top-cards", "-n", "5"]);
    let lines: Vec<&str> = top.lines().collect();
    assert_eq!(lines[0], "iccid,bytes,records");
    assert_eq!(lines.len(), 6, "{top}");
    let first_iccid = lines[1].split(',').next().unwrap().to_owned();
    let usage = query(&["card-usage", &first_iccid]);
    assert!(
        usage.contains("per cycle:") && usage.contains("per day:"),
        "{usage}"
    );
    let daily = query(&["daily-totals", "--days", "3"]);
    assert_eq!(daily.lines().count(), 4, "{daily}");
    for q in [
        &["pool-usage"][..],
        &["state-counts"],
        &["expiring"],
        &["rule-executions"],
    ] {
        query(q);
    }
    // The named query is the same as the SQL it prints.
    let res = Command::new(BIN)
        .args(["query", "top-cards", "-n", "5", "--show-sql", "--data"])
        .arg(&out)
        .output()
        .unwrap();
    let text = String::from_utf8(res.stdout).unwrap();
    assert!(text.contains("card_cycle_usage_parts"), "{text}");
    let bad = Command::new(BIN)
        .args(["query", "card-usage", "12ab", "--data"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("ICCID"));
}

#[test]
fn sql_refuses_writes_and_export_writes_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    run(&out, &["--cards", "1000", "--hours", "10"]);
    for bad in [
        "CREATE TABLE x AS SELECT 1",
        "COPY (SELECT 1) TO 'x.csv'",
        "DROP VIEW card_daily_usage",
    ] {
        let res = Command::new(BIN)
            .args(["sql", "--data"])
            .arg(&out)
            .arg(bad)
            .output()
            .unwrap();
        assert!(!res.status.success(), "{bad} ran");
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(err.contains("read-only"), "{bad}: {err}");
    }
    for ext in ["csv", "parquet", "jsonl"] {
        let file = dir.path().join(format!("top.{ext}"));
        let res = Command::new(BIN)
            .args([
                "export",
                "SELECT iccid, bytes FROM card_cycle_usage ORDER BY bytes DESC LIMIT 7",
            ])
            .arg("--data")
            .arg(&out)
            .arg("--output")
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            res.status.success(),
            "{}",
            String::from_utf8_lossy(&res.stderr)
        );
        assert!(std::fs::metadata(&file).unwrap().len() > 0);
    }
    let csv = std::fs::read_to_string(dir.path().join("top.csv")).unwrap();
    assert_eq!(csv.lines().count(), 8);
    use datafusion::parquet::file::reader::{FileReader, SerializedFileReader};
    let parquet = std::fs::File::open(dir.path().join("top.parquet")).unwrap();
    let reader = SerializedFileReader::new(parquet).unwrap();
    assert_eq!(reader.metadata().file_metadata().num_rows(), 7);
}

/// One HTTP/1.1 POST: (status, content type, body).
fn post(addr: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String, Vec<u8>) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header block");
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    let mut body = response[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, content_type, body)
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[..line_end]).unwrap().trim(), 16)
                .unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[line_end + 2..line_end + 2 + size]);
        data = &data[line_end + 4 + size..];
    }
}

#[test]
fn http_sql_answers_json_csv_and_arrow_and_refuses_writes_and_big_results() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    run(&out, &["--cards", "1000", "--hours", "10"]);
    let mut server = Command::new(BIN)
        .args([
            "serve",
            "--http",
            "127.0.0.1:0",
            "--max-rows",
            "50",
            "--data",
        ])
        .arg(&out)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(server.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();

    let q = "SELECT iccid, SUM(bytes) AS bytes FROM card_cycle_usage GROUP BY iccid ORDER BY bytes DESC LIMIT 3";
    let (status, ct, body) = post(&addr, "/sql", &[], q);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(ct.starts_with("application/json"), "{ct}");
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
    assert_eq!(rows.len(), 3);
    assert!(rows[0]["bytes"].as_i64().unwrap() >= rows[1]["bytes"].as_i64().unwrap());

    let json_body = serde_json::json!({ "sql": q }).to_string();
    let (status, ct, body) = post(
        &addr,
        "/sql",
        &[("Content-Type", "application/json"), ("Accept", "text/csv")],
        &json_body,
    );
    assert_eq!(status, 200);
    assert!(ct.starts_with("text/csv"), "{ct}");
    let csv = String::from_utf8(body).unwrap();
    assert_eq!(csv.lines().next(), Some("iccid,bytes"));
    assert_eq!(csv.lines().count(), 4);

    let (status, ct, body) = post(
        &addr,
        "/sql",
        &[("Accept", "application/vnd.apache.arrow.stream")],
        q,
    );
    assert_eq!(status, 200);
    assert_eq!(ct, "application/vnd.apache.arrow.stream");
    let reader =
        datafusion::arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(body), None)
            .unwrap();
    let rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(rows, 3);

    for bad in [
        "DROP VIEW card_daily_usage",
        "COPY (SELECT 1) TO '/tmp/x.csv'",
        "CREATE TABLE t AS SELECT 1",
    ] {
        let (status, _, body) = post(&addr, "/sql", &[], bad);
        assert_eq!(status, 400, "{bad}");
        let err: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(
            err["error"].as_str().unwrap().contains("read-only"),
            "{err}"
        );
    }
    let (status, _, body) = post(&addr, "/sql", &[], "SELECT * FROM usage_records");
    assert_eq!(status, 413);
    let err: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(
        err["error"].as_str().unwrap().contains("more than 50 rows"),
        "{err}"
    );
    let (status, _, _) = post(&addr, "/sql", &[], "SELECT nonsense FROM nowhere");
    assert_eq!(status, 400);
    server.kill().unwrap();
    server.wait().unwrap();
}

/// A post-paid pool is billed on its closed cycle's total (issue #27): the
/// records just before the boundary and one that comes within the
/// lateness, after the rollover, are all in the cycle's one `final` row,
/// which the analyst takes with one query. The run stops after the late
/// record and a second run on the same directory brings the end of the
/// lateness.
#[test]
fn a_closed_cycle_pool_total_is_exact_and_final_in_pool_cycle_usage() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = ("89860012345678900001", "89860012345678900002");
    let rec = |id: &str, iccid: &str, end: &str, mb: u64| {
        format!(
            r#"{{"record_id":"{id}","iccid":"{iccid}","end":"{end}","bytes_up":{},"bytes_down":0}}"#,
            mb * 1_048_576
        ) + "\n"
    };
    let at = r#""at":"2026-11-01T00:00:00+08:00""#;
    let commands = dir.path().join("commands.jsonl");
    std::fs::write(
        &commands,
        [
            format!(r#"{{"id":"c1","type":"upsert_plan",{at},"plan":{{"id":"cm-30","carrier":"cmcc","allowance_mb":30,"traffic":"directed"}}}}"#),
            format!(r#"{{"id":"c2","type":"upsert_card",{at},"card":{{"iccid":"{a}","carrier":"cmcc","plan":"cm-30","state":"active"}}}}"#),
            format!(r#"{{"id":"c3","type":"upsert_card",{at},"card":{{"iccid":"{b}","carrier":"cmcc","plan":"cm-30","state":"active"}}}}"#),
            format!(r#"{{"id":"c4","type":"create_pool",{at},"pool":{{"id":"bp","kind":"backward","name":"bp","carrier":"cmcc"}}}}"#),
            format!(r#"{{"id":"c5","type":"add_pool_members",{at},"pool":"bp","iccids":["{a}","{b}"]}}"#),
        ]
        .join("\n")
            + "\n",
    )
    .unwrap();
    let day1 = dir.path().join("day1.jsonl");
    std::fs::write(
        &day1,
        [
            rec("a1", a, "2026-11-30T23:00:00+08:00", 10),
            rec("b1", b, "2026-11-30T23:59:59+08:00", 5),
            // Both cards in December: the pool rolls over.
            rec("a2", a, "2026-12-01T00:30:00+08:00", 1),
            rec("b2", b, "2026-12-01T00:40:00+08:00", 1),
            // November's, within the 2 h lateness.
            rec("b3", b, "2026-11-30T23:30:00+08:00", 7),
        ]
        .concat(),
    )
    .unwrap();
    let day2 = dir.path().join("day2.jsonl");
    std::fs::write(
        &day2,
        rec("a3", a, "2026-12-01T03:00:00+08:00", 1)
            + &rec("b4", b, "2026-12-01T03:00:00+08:00", 1),
    )
    .unwrap();
    let out = dir.path().join("out");
    for args in [
        vec![
            "--input",
            day1.to_str().unwrap(),
            "--commands",
            commands.to_str().unwrap(),
        ],
        vec!["--input", day2.to_str().unwrap()],
    ] {
        let status = Command::new(BIN)
            .args(["run", "-q"])
            .args(&args)
            .arg("--out")
            .arg(&out)
            .status()
            .unwrap();
        assert!(status.success());
    }
    let billed = sql(
        &out,
        "SELECT pool_id, used_bytes FROM pool_cycle_usage WHERE cycle = '2026-11' AND final",
    );
    assert_eq!(billed.len(), 1, "{billed:?}");
    assert_eq!(billed[0]["pool_id"], "bp");
    assert_eq!(
        billed[0]["used_bytes"],
        22 * 1_048_576,
        "10 + 5 + the late 7 MB"
    );
    // The row written at the rollover: the total then.
    let not_final = sql(
        &out,
        "SELECT used_bytes, CAST(as_of AS VARCHAR) AS t FROM pool_cycle_usage \
         WHERE cycle = '2026-11' AND NOT final",
    );
    let at_rollover: Vec<_> = not_final
        .iter()
        .filter(|r| r["t"].as_str().unwrap().starts_with("2026-11-30T16:00:00"))
        .collect();
    assert_eq!(at_rollover.len(), 1, "{not_final:?}");
    assert_eq!(at_rollover[0]["used_bytes"], 15 * 1_048_576);
}
