//! Helpers the integration tests share: running the real binary, and
//! queries over a run's Parquet history through `flowcap sql`.

#![allow(dead_code)] // each test file uses some of them

use std::path::Path;
use std::process::{Child, Command};

/// The binary under test.
pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_flowcap");

/// Runs `cmd`; its standard output. Panics with `what` and the standard
/// error when it fails.
pub(crate) fn stdout_of(cmd: &mut Command, what: &str) -> String {
    let res = cmd.output().unwrap();
    assert!(
        res.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    String::from_utf8(res.stdout).unwrap()
}

/// JSON lines as values.
pub(crate) fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `flowcap sql --format FORMAT --data OUT QUERY`'s standard output;
/// panics with its standard error when it fails.
pub(crate) fn sql_text(out: &Path, format: &str, query: &str) -> String {
    stdout_of(
        Command::new(BIN)
            .args(["sql", "--format", format, "--data"])
            .arg(out)
            .arg(query),
        query,
    )
}

/// A query's rows as JSON objects.
pub(crate) fn sql_rows(out: &Path, query: &str) -> Vec<serde_json::Value> {
    json_lines(&sql_text(out, "json", query))
}

/// `flowcap run -q --json ARGS --out OUT` on the built-in generator; the
/// printed summary. Panics with its standard error when it fails.
pub(crate) fn run_generator(out: &Path, args: &[&str]) -> serde_json::Value {
    let text = stdout_of(
        Command::new(BIN)
            .args(["run", "-q", "--json"])
            .args(args)
            .arg("--out")
            .arg(out),
        "flowcap run",
    );
    serde_json::from_str(&text).unwrap()
}

/// The lines of an output file, sorted, without the wall-clock field.
pub(crate) fn sorted_lines(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines: Vec<String> = text
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            if let Some(o) = v.as_object_mut() {
                o.remove("processed_at");
            }
            v.to_string()
        })
        .collect();
    lines.sort();
    lines
}

/// Every file and directory under a directory with its bytes.
#[allow(unused_imports)] // each test file uses some of them
pub(crate) use flowcap_testkit::files::tree;

/// A running flowcap process, killed when dropped (a failing test leaves
/// no process behind).
pub(crate) struct Running(pub(crate) Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads lines until one starts with `prefix`; returns it. Panics with the
/// lines read when the stream ends first.
pub(crate) fn line_starting(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    prefix: &str,
) -> String {
    let mut seen = Vec::new();
    for line in lines {
        let line = line.unwrap();
        if line.starts_with(prefix) {
            return line;
        }
        seen.push(line);
    }
    panic!(
        "flowcap exited without printing `{prefix}`:\n{}",
        seen.join("\n")
    );
}

/// One plain HTTP/1.1 request to `addr` (with a bearer `token` and a JSON
/// `body` when given): the status and the body.
pub(crate) fn http(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(300)))
        .unwrap();
    let body = body.unwrap_or("");
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let (headers, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = headers
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_owned())
}
