//! Helpers the integration tests share: running the real binary, queries
//! over a run's Parquet history through `flowcap sql`, and the operator
//! API's event stream.

#![allow(dead_code)] // each test file uses some of them

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

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

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sse {
    pub(crate) id: String,
    pub(crate) kind: String,
    pub(crate) data: serde_json::Value,
}

/// An open stream of `/api/v1/events` (HTTP/1.0: the body is the
/// stream, no chunks).
pub(crate) struct Stream {
    lines: BufReader<TcpStream>,
}

impl Stream {
    /// `GET /api/v1/events` as a stream with `token`, resumed after
    /// `last_id`.
    pub(crate) fn open(addr: SocketAddr, token: &str, last_id: Option<&str>) -> Stream {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let resume = last_id.map_or(String::new(), |id| format!("Last-Event-ID: {id}\r\n"));
        write!(
            stream,
            "GET /api/v1/events HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
             Accept: text/event-stream\r\n{resume}\r\n"
        )
        .unwrap();
        let mut lines = BufReader::new(stream);
        let mut status = String::new();
        lines.read_line(&mut status).unwrap();
        assert!(status.contains(" 200 "), "{status}");
        loop {
            let mut header = String::new();
            lines.read_line(&mut header).unwrap();
            if header.trim_end().is_empty() {
                break;
            }
            if header.to_ascii_lowercase().starts_with("content-type:") {
                assert!(header.contains("text/event-stream"), "{header}");
            }
        }
        Stream { lines }
    }

    /// The next event (comments, the keep-alives, skipped).
    pub(crate) fn next(&mut self) -> Sse {
        let (mut id, mut kind, mut data): (Option<String>, Option<String>, Option<String>) =
            (None, None, None);
        loop {
            let mut line = String::new();
            assert!(
                self.lines.read_line(&mut line).unwrap() > 0,
                "the stream ended"
            );
            let line = line.trim_end_matches('\n');
            if line.is_empty() {
                if let Some(data) = data.take() {
                    return Sse {
                        id: id.take().expect("every event has an id"),
                        kind: kind.take().expect("every event has a kind"),
                        data: serde_json::from_str(&data).unwrap(),
                    };
                }
                continue;
            }
            if let Some(v) = line.strip_prefix("id: ") {
                id = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("event: ") {
                kind = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("data: ") {
                data = Some(v.to_owned());
            }
        }
    }
}
