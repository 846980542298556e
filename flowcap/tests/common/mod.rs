//! Helpers the integration tests share: queries over a run's Parquet
//! history through the real `flowcap sql`.

#![allow(dead_code)] // each test file uses some of them

use std::path::Path;
use std::process::Command;

/// The binary under test.
pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_flowcap");

/// `flowcap sql --format FORMAT --data OUT QUERY`'s standard output;
/// panics with its standard error when it fails.
pub(crate) fn sql_text(out: &Path, format: &str, query: &str) -> String {
    let res = Command::new(BIN)
        .args(["sql", "--format", format, "--data"])
        .arg(out)
        .arg(query)
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{query}: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    String::from_utf8(res.stdout).unwrap()
}

/// A query's rows as JSON objects.
pub(crate) fn sql_rows(out: &Path, query: &str) -> Vec<serde_json::Value> {
    sql_text(out, "json", query)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `flowcap run -q --json ARGS --out OUT` on the built-in generator; the
/// printed summary. Panics with its standard error when it fails.
pub(crate) fn run_generator(out: &Path, args: &[&str]) -> serde_json::Value {
    let res = Command::new(BIN)
        .args(["run", "-q", "--json"])
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    serde_json::from_slice(&res.stdout).unwrap()
}
