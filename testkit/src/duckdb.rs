//! DuckDB as a second reader of the Parquet history: the same SQL text
//! run by DuckDB (through Python) over the same files must give the same
//! answers as flowcap's DataFusion. An oracle for the tests and the SQL
//! benchmark report.

/// The Python script that runs SQL over a flowcap history with DuckDB (its
/// request and answer formats are in its docstring).
pub const DUCKDB_SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../flowcap/tests/support/duckdb_queries.py"
);

/// Runs `script` (see [`DUCKDB_SCRIPT`]) with `request` on its standard
/// input; its JSON answer, or what went wrong with its standard error.
pub fn duckdb(
    script: &std::path::Path,
    request: &serde_json::Value,
) -> Result<serde_json::Value, String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting python3 (DuckDB: python3 -m pip install duckdb): {e}"))?;
    child
        .stdin
        .take()
        .ok_or("no stdin for the DuckDB script")?
        .write_all(request.to_string().as_bytes())
        .map_err(|e| format!("writing the DuckDB request: {e}"))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for the DuckDB script: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "DuckDB failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("the DuckDB answer is not JSON: {e}"))
}
