//! `GET /api/v1/events` on the real binary: `flowcap run` over loadgen
//! files with `--http` and `--linger`.
//!
//! - the pages, walked by cursor, are the events file line for line, and
//!   a filter keeps exactly the lines it names; newest first
//!   (`order=desc`) they are the same lines backwards;
//! - a Server-Sent Events stream cut mid-way and resumed with
//!   `Last-Event-ID` gives every event once: the union of the two
//!   connections is the whole file, in order, including the event of a
//!   command sent while the second one listened;
//! - `flowcap serve` gives the same pages from the directory;
//! - a command not sent through the server is answered from the journal.
//!
//! No sleeps decide anything: the tests wait on the lines the binary
//! prints and on the stream's own events.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use common::{http, json_lines, linger, serve, stdout_of, Running, Sse, Stream, BIN};
use serde_json::Value;

const VIEWER: &str = "viewer-token-20ab";
const OPS: &str = "ops-token-93ce";

/// `GET path` with the read token: status and body.
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(&addr.to_string(), "GET", path, Some(VIEWER), None)
}

fn get_json(addr: SocketAddr, path: &str) -> Value {
    let (status, body) = get(addr, path);
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// `POST path` with the write token; the answer must be 200.
fn post(addr: SocketAddr, path: &str, body: &str) -> Value {
    let (status, answer) = http(&addr.to_string(), "POST", path, Some(OPS), Some(body));
    assert_eq!(status, 200, "POST {path}: {answer}");
    serde_json::from_str(&answer).unwrap()
}

/// Every event, walking pages of `limit` with `query`: (position, event).
fn walk(addr: SocketAddr, query: &str, limit: usize) -> Vec<(String, Value)> {
    let mut items = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = get_json(
            addr,
            &format!("/api/v1/events?limit={limit}{query}{cursor}"),
        );
        let got = page["items"].as_array().unwrap();
        assert!(got.len() <= limit);
        for item in got {
            items.push((
                item["position"].as_str().unwrap().to_owned(),
                item["event"].clone(),
            ));
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => {
                let end = page["end"].as_str().unwrap();
                if let Some((last, _)) = items.last() {
                    if query.is_empty() {
                        assert_eq!(last, end, "the last page ends at the end");
                    }
                }
                return items;
            }
        }
    }
}

/// Every event newest first, walking pages of `limit` back with `query`.
fn walk_back(addr: SocketAddr, query: &str, limit: usize) -> Vec<(String, Value)> {
    let mut items = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = get_json(
            addr,
            &format!("/api/v1/events?order=desc&limit={limit}{query}{cursor}"),
        );
        for item in page["items"].as_array().unwrap() {
            items.push((
                item["position"].as_str().unwrap().to_owned(),
                item["event"].clone(),
            ));
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => return items,
        }
    }
}

/// The events file's lines as values.
fn file_events(out: &Path) -> Vec<Value> {
    json_lines(&std::fs::read_to_string(out.join("events.jsonl")).unwrap())
}

/// `flowcap run` over a loadgen day with the API, lingering: the running
/// child, its address, the summary it printed.
fn start(dir: &Path) -> (Running, SocketAddr, Value) {
    let data = dir.join("data");
    stdout_of(
        Command::new(BIN)
            .args(["loadgen", "--hours", "2", "--cards", "2000", "--out"])
            .arg(&data),
        "flowcap loadgen",
    );
    let out = dir.join("out");
    let run = linger(
        Command::new(BIN)
            .args(["run", "-q", "--json", "--no-notify", "--shards", "2"])
            .arg("--input")
            .arg(data.join("usage.jsonl"))
            .arg("--commands")
            .arg(data.join("commands.jsonl"))
            .arg("--out")
            .arg(&out)
            .env(
                "FLOWCAP_API_TOKENS",
                format!("viewer:read:{VIEWER},ops:write:{OPS}"),
            ),
    );
    (run.child, run.addr, run.summary)
}

#[test]
fn a_resumed_stream_misses_and_repeats_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (child, addr, summary) = start(dir.path());
    let seq = summary["inputs"].as_u64().unwrap() - 1;
    let before = file_events(&out);
    assert!(before.len() > 20, "the workload changes states");

    // Pages: the file, line for line, each with its position.
    let pages = walk(addr, "", 7);
    let events: Vec<&Value> = pages.iter().map(|(_, e)| e).collect();
    assert_eq!(events, before.iter().collect::<Vec<_>>());
    let page = get_json(addr, "/api/v1/events?limit=1");
    assert_eq!(page["position"]["seq"], seq);

    // Filters keep exactly what they name.
    let iccid = before
        .iter()
        .find(|e| e["kind"] == "card_state" && e["cause"]["type"] == "record")
        .unwrap()["iccid"]
        .as_str()
        .unwrap()
        .to_owned();
    let of_card = walk(addr, &format!("&iccid={iccid}"), 1000);
    let want: Vec<&Value> = before
        .iter()
        .filter(|e| e["iccid"].as_str() == Some(iccid.as_str()))
        .collect();
    assert!(!want.is_empty());
    assert_eq!(of_card.iter().map(|(_, e)| e).collect::<Vec<_>>(), want);
    for (position, event) in &of_card {
        assert!(pages.contains(&(position.clone(), event.clone())));
    }
    // Newest first: the same events and positions, backwards.
    let back = walk_back(addr, "", 7);
    assert_eq!(back, pages.iter().rev().cloned().collect::<Vec<_>>());
    let back = walk_back(addr, &format!("&iccid={iccid}"), 1);
    assert_eq!(back, of_card.iter().rev().cloned().collect::<Vec<_>>());
    let newest = get_json(addr, "/api/v1/events?order=desc&limit=1&kind=card_state");
    let last = pages.iter().rev().find(|(_, e)| e["kind"] == "card_state");
    assert_eq!(newest["items"][0]["event"], last.unwrap().1);
    let (status, body) = get(addr, "/api/v1/events?order=sideways");
    assert_eq!(status, 400, "{body}");
    let pool_states = walk(addr, "&kind=pool_state", 1000);
    assert_eq!(
        pool_states.len(),
        before.iter().filter(|e| e["kind"] == "pool_state").count()
    );
    // A command from the commands file, not sent through this server:
    // answered from the journal.
    let journal = json_lines(&std::fs::read_to_string(out.join("journal.jsonl")).unwrap());
    let first = &journal[0];
    let id = first["result"]["command_id"].as_str().unwrap();
    let answer = get_json(addr, &format!("/api/v1/commands/{id}"));
    assert_eq!(answer["status"], "done", "{answer}");
    assert_eq!(answer["result"], first["result"]);
    assert_eq!(answer["position"]["seq"], first["seq"]);
    let (status, body) = get(addr, "/api/v1/commands/no-such-command");
    assert_eq!(status, 404, "{body}");

    // Usage per hour of one day adds up to that day's.
    let days = get_json(
        addr,
        &format!("/api/v1/cards/{iccid}/usage?granularity=day"),
    );
    let day = &days["items"][0];
    let date = day["period"].as_str().unwrap();
    let hours = get_json(
        addr,
        &format!("/api/v1/cards/{iccid}/usage?granularity=hour&from={date}&to={date}"),
    );
    assert_eq!(hours["granularity"], "hour");
    let hours = hours["items"].as_array().unwrap();
    assert!(!hours.is_empty());
    let sum = |field: &str| {
        hours
            .iter()
            .map(|h| h[field].as_u64().unwrap())
            .sum::<u64>()
    };
    assert_eq!(sum("bytes"), day["bytes"].as_u64().unwrap());
    assert_eq!(sum("records"), day["records"].as_u64().unwrap());
    assert!(hours
        .iter()
        .all(|h| h["period"].as_str().unwrap().starts_with(date)));
    let (status, body) = get(
        addr,
        &format!("/api/v1/cards/{iccid}/usage?granularity=hour&from=2026-01-01&to=2026-02-01"),
    );
    assert_eq!(status, 400, "{body}");

    let (status, body) = get(addr, "/api/v1/events?cursor=1");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("bad_cursor"), "{body}");

    // A stream cut after a few events, resumed with the last id.
    let cut = before.len() / 3;
    let mut first = Stream::open(addr, VIEWER, None);
    let mut seen: Vec<Sse> = (0..cut).map(|_| first.next()).collect();
    drop(first);
    let last = seen.last().unwrap().id.clone();
    assert_eq!(last, pages[cut - 1].0, "the stream's id is the position");
    let mut second = Stream::open(addr, VIEWER, Some(&last));
    while seen.len() < before.len() {
        seen.push(second.next());
    }
    // A command while it listens: its event comes once committed.
    let active = get_json(addr, "/api/v1/cards?state=active&limit=1");
    let card = active["items"][0]["iccid"].as_str().unwrap().to_owned();
    let answer = post(addr, &format!("/api/v1/cards/{card}/suspend"), "");
    assert_eq!(answer["result"]["ok"], true, "{answer}");
    // Answered once a snapshot covers it: the file is whole again.
    let after = file_events(&out);
    assert!(after.len() > before.len());
    while seen.len() < after.len() {
        seen.push(second.next());
    }
    drop(second);
    assert!(seen[before.len()..].iter().any(|e| e.kind == "card_state"
        && e.data["iccid"] == card.as_str()
        && e.data["new"] == "suspended"));
    let streamed: Vec<&Value> = seen.iter().map(|e| &e.data).collect();
    assert_eq!(streamed, after.iter().collect::<Vec<_>>());
    for e in &seen {
        assert_eq!(e.kind, e.data["kind"].as_str().unwrap());
    }
    child.stop();

    // `flowcap serve` pages the same events from the directory.
    let (child, addr) = serve(&out, &format!("viewer:read:{VIEWER}"));
    let served = walk(addr, "", 1000);
    assert_eq!(
        served.iter().map(|(_, e)| e).collect::<Vec<_>>(),
        after.iter().collect::<Vec<_>>()
    );
    assert_eq!(
        served.iter().map(|(p, _)| p).collect::<Vec<_>>(),
        seen.iter().map(|e| &e.id).collect::<Vec<_>>()
    );
    child.stop();
}
