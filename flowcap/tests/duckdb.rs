//! The same Parquet files read by DuckDB give the same answers to the
//! console queries as flowcap's DataFusion. The SQL text is flowcap's own
//! (`ConsoleQuery::sql`), run by both engines over the same history.
//!
//! Needs Python with `duckdb` (`.ci/run` installs it from PyPI). Without it
//! the test fails with the install command, unless FLOWCAP_SKIP_DUCKDB=1.

use std::path::Path;
use std::process::{Command, Stdio};

use flowcap_sql::ConsoleQuery;

mod common;

fn duckdb_available() -> bool {
    Command::new("python3")
        .args(["-c", "import duckdb"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A query's rows from `flowcap sql --format json`, as lists of values in
/// column order (integers as integers, everything else as text).
fn datafusion_rows(out: &Path, sql: &str) -> Vec<Vec<serde_json::Value>> {
    common::sql_text(out, "csv", sql)
        .lines()
        .skip(1)
        .map(|line| {
            line.split(',')
                .map(|v| match v.parse::<i64>() {
                    Ok(n) => serde_json::json!(n),
                    Err(_) if v.is_empty() => serde_json::Value::Null,
                    Err(_) => serde_json::json!(v),
                })
                .collect()
        })
        .collect()
}

fn duckdb_rows(root: &Path, queries: &[String]) -> Vec<Vec<Vec<serde_json::Value>>> {
    let request = serde_json::json!({ "root": root, "queries": queries });
    let answer = flowcap_testkit::duckdb::duckdb(
        Path::new(flowcap_testkit::duckdb::DUCKDB_SCRIPT),
        &request,
    )
    .unwrap_or_else(|e| panic!("duckdb: {e}"));
    serde_json::from_value(answer).unwrap()
}

#[test]
fn duckdb_reads_the_history_and_agrees_on_every_console_query() {
    if !duckdb_available() {
        if std::env::var_os("FLOWCAP_SKIP_DUCKDB").is_some() {
            eprintln!("skipped: python3 -m pip install duckdb to run it");
            return;
        }
        panic!("DuckDB for Python is missing: python3 -m pip install duckdb (or FLOWCAP_SKIP_DUCKDB=1)");
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    common::run_generator(&out, &["--cards", "1000", "--hours", "80", "--seed", "11"]);
    let root = out.join("history");
    let latest = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(flowcap_sql::Latest::of(
            &flowcap_storage::HistoryLocation::Local(root.clone()),
        ))
        .unwrap();
    let top = datafusion_rows(
        &out,
        &ConsoleQuery::TopCards {
            cycle: None,
            limit: 1,
        }
        .sql(&latest)
        .unwrap(),
    );
    let iccid = top[0][0].as_str().unwrap().to_owned();
    // Timestamps print differently in the two engines: the pool query is
    // compared without `as_of` (its last column).
    let pool = ConsoleQuery::PoolUsage { pool: None }.sql(&latest).unwrap();
    let pool = pool.replace(", as_of FROM", " FROM");
    let queries: Vec<String> = vec![
        ConsoleQuery::CardCycles {
            iccid: iccid.clone(),
            cycles: 6,
        }
        .sql(&latest)
        .unwrap(),
        ConsoleQuery::CardDays { iccid, days: 61 }
            .sql(&latest)
            .unwrap(),
        ConsoleQuery::DailyTotals { days: 30 }.sql(&latest).unwrap(),
        ConsoleQuery::TopCards {
            cycle: None,
            limit: 20,
        }
        .sql(&latest)
        .unwrap(),
        pool,
        ConsoleQuery::StateCounts.sql(&latest).unwrap(),
        ConsoleQuery::Expiring.sql(&latest).unwrap(),
        "SELECT COUNT(*), SUM(bytes), COUNT(DISTINCT iccid) FROM usage_records".to_owned(),
        "SELECT reason, COUNT(*) FROM quarantine GROUP BY reason ORDER BY reason".to_owned(),
        "SELECT COUNT(*) FROM state_changes".to_owned(),
    ];
    let duck = duckdb_rows(&root, &queries);
    for (sql, duck) in queries.iter().zip(duck) {
        let ours = datafusion_rows(&out, sql);
        assert!(!ours.is_empty(), "{sql}: no rows");
        assert_eq!(ours, duck, "{sql}");
    }
}
