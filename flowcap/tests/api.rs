//! The operator API (`/api/v1`) on the real binary: `flowcap run` over
//! loadgen files with `--http` and `--linger`, driven over HTTP.
//!
//! - the state answered for every card (walked page by page, each card
//!   once) equals what the run's events and the generator's expectation
//!   say;
//! - commands sent through the API are journaled and have the events of
//!   the same commands read from the commands file, a repeated id is
//!   answered with the first result, and no answer shows a secret;
//! - missing, wrong and under-scoped tokens, a burst over the rate and
//!   bodies over the limits are refused with problem details.
//!
//! No sleeps decide anything: the tests wait on the lines the binary
//! prints (`ops: listening`, `ops: run finished`) and on its exit.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{json_lines, line_starting, sorted_lines, stdout_of, Running, BIN};
use serde_json::Value;

const OPS: &str = "ops-token-7f3a";
const VIEWER: &str = "viewer-token-51c2";
const ROOT: &str = "root-token-9e1d";
const FLOOD: &str = "flood-token-c4b8";
const WEBHOOK_SECRET: &str = "whsec-do-not-show-8812";
const WEBHOOK_PASSWORD: &str = "pw-do-not-show-3321";

/// The rate and limits every test runs with: a burst of 300 requests per
/// token and (practically) no refill, so the 301st is refused whatever
/// the machine's speed.
const CONFIG: &str =
    "[api]\nrate_per_sec = 0.001\nburst = 300\nmax_body_kb = 64\nmax_batch = 100\n";

/// One HTTP answer.
#[derive(Debug)]
struct Reply {
    status: u16,
    /// The header block, names lowercased.
    headers: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// A problem document with this status and type code.
    fn assert_problem(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{self:?}"
        );
        let doc = self.json();
        assert_eq!(doc["status"], status);
        assert_eq!(doc["type"], format!("urn:flowcap:problem:{code}"));
        assert!(doc["detail"].as_str().is_some_and(|d| !d.is_empty()));
    }
}

/// A server under test and every answer it gave (checked for secrets).
struct Server {
    addr: SocketAddr,
    answers: Vec<String>,
}

impl Server {
    fn call(&mut self, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> Reply {
        let mut stream = TcpStream::connect(self.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            self.addr
        );
        if let Some(token) = token {
            head.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        let body = body.unwrap_or("");
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        ));
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body.as_bytes()).unwrap();
        let mut response = String::new();
        // A refused body may close the connection before all of it is
        // sent; what was answered is still read.
        let _ = stream.read_to_string(&mut response);
        let (headers, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let status = headers
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        self.answers.push(response.clone());
        Reply {
            status,
            headers: headers.to_owned(),
            body: body.to_owned(),
        }
    }

    fn get(&mut self, path: &str, token: &str) -> Value {
        let reply = self.call("GET", path, Some(token), None);
        assert_eq!(reply.status, 200, "GET {path}: {reply:?}");
        reply.json()
    }

    fn post(&mut self, path: &str, token: &str, body: &str) -> Reply {
        self.call("POST", path, Some(token), Some(body))
    }

    /// No answer so far shows a token or the webhook's secrets.
    fn assert_no_secret(&self) {
        for answer in &self.answers {
            for secret in [OPS, VIEWER, ROOT, FLOOD, WEBHOOK_SECRET, WEBHOOK_PASSWORD] {
                assert!(!answer.contains(secret), "`{secret}` in {answer}");
            }
        }
    }
}

/// `flowcap loadgen` into `dir`.
fn loadgen(dir: &Path, cards: u32) {
    stdout_of(
        Command::new(BIN)
            .args(["loadgen", "--hours", "2", "--cards"])
            .arg(cards.to_string())
            .arg("--out")
            .arg(dir),
        "flowcap loadgen",
    );
}

/// `flowcap run` writing to `out`: over `files` (usage, commands), or
/// the generator's `cards` for 2 hours.
fn run_args(files: Option<(&Path, &Path)>, cards: u32, out: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "-q", "--json", "--no-notify", "--shards", "2"]);
    match files {
        Some((usage, commands)) => {
            cmd.arg("--input")
                .arg(usage)
                .arg("--commands")
                .arg(commands);
        }
        None => {
            cmd.args(["--hours", "2", "--cards", &cards.to_string()]);
        }
    }
    cmd.arg("--out").arg(out);
    cmd
}

/// `run` with the API on a free port, lingering; returns once the run is
/// over, with the printed summary.
fn start(mut run: Command, out: &Path) -> (Running, Server, Value) {
    let config = out.with_extension("toml");
    std::fs::write(&config, CONFIG).unwrap();
    let child = run
        .args(["--http", "127.0.0.1:0", "--linger", "--config"])
        .arg(&config)
        .env(
            "FLOWCAP_API_TOKENS",
            format!("ops:write:{OPS},viewer:read:{VIEWER},root:admin:{ROOT},flood:read:{FLOOD}"),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Running(child);
    let mut stderr = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let addr = line_starting(&mut stderr, "ops: listening on http://")
        .trim_start_matches("ops: listening on http://")
        .parse()
        .unwrap();
    line_starting(&mut stderr, "ops: run finished");
    // Keep draining stderr so the child never blocks on it.
    std::thread::spawn(move || for _ in stderr {});
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
    let summary: Value = serde_json::from_str(&doc).unwrap();
    let server = Server {
        addr,
        answers: Vec::new(),
    };
    (child, server, summary["summary"].clone())
}

/// SIGTERM, and the exit must be clean.
fn stop(mut child: Running) {
    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.0.wait().unwrap();
    assert!(exit.success(), "flowcap exited with {exit}");
}

/// Every card, walking `GET /cards` pages with `query`: each card on
/// exactly one page, in ICCID order, every page at `seq`.
fn walk(server: &mut Server, query: &str, seq: u64) -> Vec<Value> {
    let mut cards: Vec<Value> = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/api/v1/cards?limit=1000{query}");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let page = server.get(&path, VIEWER);
        assert_eq!(page["position"]["seq"], seq, "{path}");
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 1000);
        cards.extend(items.iter().cloned());
        match page["next_cursor"].as_str() {
            Some(next) => {
                assert_eq!(items.len(), 1000, "a page before the last is full");
                cursor = Some(next.to_owned());
            }
            None => break,
        }
    }
    let iccids: Vec<&str> = cards.iter().map(|c| c["iccid"].as_str().unwrap()).collect();
    assert!(
        iccids.windows(2).all(|w| w[0] < w[1]),
        "pages are in ICCID order, each card once"
    );
    cards
}

/// The newest `card_state` event of each card: (state, reasons).
fn replayed_states(out: &Path) -> BTreeMap<String, (Value, Value)> {
    let text = std::fs::read_to_string(out.join("events.jsonl")).unwrap();
    let mut states = BTreeMap::new();
    for event in json_lines(&text) {
        if event["kind"] == "card_state" {
            states.insert(
                event["iccid"].as_str().unwrap().to_owned(),
                (event["new"].clone(), event["reasons"].clone()),
            );
        }
    }
    states
}

#[test]
fn every_card_answered_as_the_events_and_the_generator_say() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // The generator's expectation, and a run of the same workload.
    loadgen(&data, 100_000);
    let out = dir.path().join("out");
    let (child, mut server, summary) = start(run_args(None, 100_000, &out), &out);
    let cards_known: u64 = summary["cards_by_state"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    let seq = summary["inputs"].as_u64().unwrap() - 1;

    let cards = walk(&mut server, "", seq);
    assert_eq!(cards.len() as u64, cards_known);
    let expected: BTreeMap<(String, String), u64> =
        json_lines(&std::fs::read_to_string(data.join("expected.jsonl")).unwrap())
            .into_iter()
            .map(|e| {
                (
                    (
                        e["iccid"].as_str().unwrap().to_owned(),
                        e["cycle"].as_str().unwrap().to_owned(),
                    ),
                    e["bytes"].as_u64().unwrap(),
                )
            })
            .collect();
    let replayed = replayed_states(&out);
    assert!(replayed.len() > 50, "the workload changes states");
    let mut checked = 0;
    for card in &cards {
        let iccid = card["iccid"].as_str().unwrap();
        let cycle = card["cycle"].as_str().unwrap();
        let want = expected
            .get(&(iccid.to_owned(), cycle.to_owned()))
            .copied()
            .unwrap_or(0);
        assert_eq!(card["usage_bytes"], want, "usage of {iccid}");
        if let Some((state, reasons)) = replayed.get(iccid) {
            assert_eq!(
                (&card["state"], &card["reasons"]),
                (state, reasons),
                "state of {iccid}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, replayed.len());

    // Usage: the current cycle live, and per day from the history, for a
    // card whose usage is all in that cycle and on time.
    let mut entries: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for e in json_lines(&std::fs::read_to_string(data.join("expected.jsonl")).unwrap()) {
        entries
            .entry(e["iccid"].as_str().unwrap().to_owned())
            .or_default()
            .push(e);
    }
    let plain = cards
        .iter()
        .find(|c| {
            entries.get(c["iccid"].as_str().unwrap()).is_some_and(|e| {
                e.len() == 1
                    && e[0]["cycle"] == c["cycle"]
                    && e[0]["late_bytes"] == 0
                    && e[0]["bytes"].as_u64() > Some(0)
            })
        })
        .unwrap();
    let path = format!("/api/v1/cards/{}/usage", plain["iccid"].as_str().unwrap());
    let cycles = server.get(&path, VIEWER);
    assert_eq!(cycles["position"]["seq"], seq);
    let last = cycles["items"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["period"], plain["cycle"]);
    assert_eq!(last["live"], true);
    assert_eq!(last["bytes"], plain["usage_bytes"]);
    let days = server.get(&format!("{path}?granularity=day"), VIEWER);
    let days = days["items"].as_array().unwrap();
    assert!(!days.is_empty());
    let summed: u64 = days.iter().map(|d| d["bytes"].as_u64().unwrap()).sum();
    assert_eq!(summed, plain["usage_bytes"].as_u64().unwrap());
    let first_day = days[0]["period"].as_str().unwrap();
    let later = server.get(&format!("{path}?granularity=day&from=2099-01-01"), VIEWER);
    assert_eq!(later["items"], serde_json::json!([]));
    assert!(first_day.len() == 10);
    server
        .call(
            "GET",
            &format!("{path}?granularity=week"),
            Some(VIEWER),
            None,
        )
        .assert_problem(400, "bad_granularity");

    // One card alone answers what its page said, at the same position.
    let one = &cards[cards.len() / 2];
    let mut alone = server.get(
        &format!("/api/v1/cards/{}", one["iccid"].as_str().unwrap()),
        VIEWER,
    );
    assert_eq!(alone["position"]["seq"], seq);
    alone.as_object_mut().unwrap().remove("position");
    assert_eq!(&alone, one);

    // Filters keep exactly the cards they name.
    let count = |f: &dyn Fn(&Value) -> bool| cards.iter().filter(|c| f(c)).count();
    let suspended = walk(&mut server, "&state=suspended", seq);
    assert!(!suspended.is_empty());
    assert_eq!(suspended.len(), count(&|c| c["state"] == "suspended"));
    let over = walk(&mut server, "&reason=over_threshold&carrier=cmcc", seq);
    assert_eq!(
        over.len(),
        count(&|c| c["carrier"] == "cmcc"
            && c["reasons"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r == "over_threshold"))
    );
    let high = walk(&mut server, "&usage_pct_gte=1", seq);
    assert_eq!(
        high.len(),
        count(&|c| c["usage_pct"].as_f64().is_some_and(|p| p >= 1.0))
    );
    let tag = cards[0]["tags"][0].as_str().unwrap().to_owned();
    let tagged = walk(&mut server, &format!("&tag={tag}"), seq);
    assert_eq!(
        tagged.len(),
        count(&|c| c["tags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == tag.as_str()))
    );

    // Pools: the members of each page add up to the member count.
    let pools = server.get("/api/v1/pools", VIEWER);
    let pool = pools["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["kind"] == "forward")
        .unwrap()
        .clone();
    let id = pool["id"].as_str().unwrap();
    let mut members = HashSet::new();
    let mut cursor = String::new();
    loop {
        let page = server.get(&format!("/api/v1/pools/{id}?limit=7{cursor}"), VIEWER);
        assert_eq!(page["member_count"], pool["member_count"]);
        for m in page["members"]["items"].as_array().unwrap() {
            assert!(members.insert(m.as_str().unwrap().to_owned()));
            let card = cards.iter().find(|c| c["iccid"] == *m).unwrap();
            assert_eq!(card["pool"], id);
        }
        let top = page["top_consumers"].as_array().unwrap();
        assert!(!top.is_empty() && top.len() <= 10);
        match page["members"]["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(members.len() as u64, pool["member_count"].as_u64().unwrap());
    let plans = server.get("/api/v1/plans", VIEWER);
    assert!(!plans["items"].as_array().unwrap().is_empty());
    let rules = server.get("/api/v1/rules", VIEWER);
    assert!(rules["items"].is_array());
    let tags = server.get("/api/v1/tags", VIEWER);
    assert!(tags["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["name"] == tag.as_str()));

    // Refusals, each a problem document.
    let path = "/api/v1/plans";
    let reply = server.call("GET", path, None, None);
    reply.assert_problem(401, "unauthenticated");
    assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
    server
        .call("GET", path, Some("not-a-token"), None)
        .assert_problem(401, "unauthenticated");
    let iccid = cards[0]["iccid"].as_str().unwrap();
    let suspend = format!(
        r#"{{"id":"refused-1","at":"2026-11-26T12:00:00+08:00","type":"suspend","iccids":["{iccid}"]}}"#
    );
    server
        .post("/api/v1/commands", VIEWER, &suspend)
        .assert_problem(403, "forbidden");
    server
        .post(&format!("/api/v1/cards/{iccid}/suspend"), VIEWER, "")
        .assert_problem(403, "forbidden");
    let tag_command = r#"{"id":"refused-2","at":"2026-11-26T12:00:00+08:00","type":"upsert_tag","tag":{"name":"x"}}"#;
    server
        .post("/api/v1/commands", OPS, tag_command)
        .assert_problem(403, "forbidden");
    server
        .call(
            "GET",
            "/api/v1/cards/89860000000000000000000",
            Some(VIEWER),
            None,
        )
        .assert_problem(400, "bad_iccid");
    server
        .call(
            "GET",
            "/api/v1/cards/89869999999999999999",
            Some(VIEWER),
            None,
        )
        .assert_problem(404, "not_found");
    server
        .call("GET", "/api/v1/nothing", Some(VIEWER), None)
        .assert_problem(404, "not_found");
    server
        .call("GET", "/api/v1/cards?limit=1001", Some(VIEWER), None)
        .assert_problem(400, "bad_limit");
    server
        .post("/api/v1/commands", ROOT, &" ".repeat(65 * 1024))
        .assert_problem(413, "too_large");
    let batch: Vec<String> = (0..101).map(|_| suspend.clone()).collect();
    server
        .post("/api/v1/commands", ROOT, &format!("[{}]", batch.join(",")))
        .assert_problem(413, "batch_too_large");
    server
        .post("/api/v1/commands", ROOT, r#"{"id":"x","type":"suspend"}"#)
        .assert_problem(400, "bad_command");

    // A burst over the rate: the token's 301st request is refused, and
    // another token is not.
    for i in 1..=300 {
        let reply = server.call("GET", path, Some(FLOOD), None);
        assert_eq!(reply.status, 200, "request {i}: {reply:?}");
    }
    let reply = server.call("GET", path, Some(FLOOD), None);
    reply.assert_problem(429, "rate_limited");
    let retry: u64 = reply.header("retry-after").unwrap().parse().unwrap();
    assert!(retry >= 1);
    server.get(path, VIEWER);

    // The contract: the served OpenAPI document is the committed one.
    let reply = server.call("GET", "/api/v1/openapi.json", None, None);
    assert_eq!(reply.status, 200);
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json"))
            .unwrap();
    assert_eq!(reply.body, committed);

    server.assert_no_secret();
    stop(child);
}

/// The commands the API test sends, as lines of a commands file (with
/// the operator the API records): a webhook with secrets, a suspend, and
/// the suspend again.
fn api_commands(at: &str, iccid: &str) -> [String; 3] {
    let webhook = format!(
        r#"{{"id":"api-hook-1","at":"{at}","operator":"root","type":"upsert_webhook","webhook":{{"id":"ops-hook","url":"https://alerts:{WEBHOOK_PASSWORD}@hooks.example/flowcap","secret":"{WEBHOOK_SECRET}"}}}}"#
    );
    let suspend = format!(
        r#"{{"id":"api-suspend-1","at":"{at}","operator":"ops","type":"suspend","iccids":["{iccid}"]}}"#
    );
    [webhook, suspend.clone(), suspend]
}

/// The usage file without the records of another day (the generator's
/// records from the future), written to `to`; and the latest end of those
/// kept plus one second, as RFC 3339: a command then is merged after
/// every record.
fn without_other_days(usage: &Path, to: &Path) -> String {
    let text = std::fs::read_to_string(usage).unwrap();
    let end = |line: &str| {
        serde_json::from_str::<Value>(line)
            .ok()
            .and_then(|r| r["end"].as_str().map(str::to_owned))
    };
    let mut ends: Vec<String> = text.lines().filter_map(end).collect();
    ends.sort();
    let day = ends[ends.len() / 2][..11].to_owned();
    let same_day = |e: &str| e.starts_with(&day) && e.ends_with("+08:00") && e.len() == 25;
    let mut kept = String::new();
    for line in text.lines() {
        if end(line).is_none_or(|e| same_day(&e)) {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    std::fs::write(to, kept).unwrap();
    let newest = ends.into_iter().filter(|e| same_day(e)).max().unwrap();
    // Every generated end is "YYYY-MM-DDTHH:MM:SS+08:00".
    let (time, zone) = newest.split_at(19);
    let (date, clock) = time.split_at(11);
    let parts: Vec<u32> = clock.split(':').map(|p| p.parse().unwrap()).collect();
    let secs = parts[0] * 3600 + parts[1] * 60 + parts[2] + 1;
    assert!(secs < 86_400, "the records end before midnight");
    format!(
        "{date}{:02}:{:02}:{:02}{zone}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[test]
fn a_command_through_the_api_equals_the_same_command_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    loadgen(&data, 2_000);
    let usage = dir.path().join("usage.jsonl");
    let at = without_other_days(&data.join("usage.jsonl"), &usage);

    // Through the API, after the files.
    let api_out = dir.path().join("api");
    let (child, mut server, summary) = start(
        run_args(Some((&usage, &data.join("commands.jsonl"))), 0, &api_out),
        &api_out,
    );
    let seq = summary["inputs"].as_u64().unwrap() - 1;
    let active = walk(&mut server, "&state=active", seq);
    let iccid = active[0]["iccid"].as_str().unwrap().to_owned();
    let [webhook, suspend, _] = api_commands(&at, &iccid);
    let without_operator = |line: &str| {
        let mut v: Value = serde_json::from_str(line).unwrap();
        v.as_object_mut().unwrap().remove("operator");
        v.to_string()
    };
    let reply = server.post("/api/v1/commands", ROOT, &without_operator(&webhook));
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json()["result"]["ok"], true, "{reply:?}");
    assert_eq!(reply.json()["position"]["seq"], seq + 1);
    let first = server.post("/api/v1/commands", OPS, &without_operator(&suspend));
    assert_eq!(first.status, 200, "{first:?}");
    let first = first.json();
    assert_eq!(first["result"]["ok"], true, "{first}");
    assert_eq!(first["position"]["seq"], seq + 2);
    let again = server.post("/api/v1/commands", OPS, &without_operator(&suspend));
    assert_eq!(again.status, 200);
    assert_eq!(
        again.json()["result"],
        first["result"],
        "a repeat has the first result"
    );
    let stored = server.get("/api/v1/commands/api-suspend-1", VIEWER);
    assert_eq!(stored["result"], first["result"]);
    let card = server.get(&format!("/api/v1/cards/{iccid}"), VIEWER);
    assert_eq!(card["state"], "suspended");
    assert_eq!(card["reasons"], serde_json::json!(["manual"]));
    assert_eq!(card["position"]["seq"], seq + 3);
    let hooks = server.get("/api/v1/webhooks", VIEWER);
    assert_eq!(
        hooks["items"],
        serde_json::json!([{
            "id": "ops-hook",
            "url": "https://hooks.example/flowcap",
            "signed": true,
            "private_ca": false,
        }])
    );
    server.assert_no_secret();
    stop(child);

    // `flowcap serve` answers the same, read-only, from the newest snapshot.
    let child = Command::new(BIN)
        .args(["serve", "--http", "127.0.0.1:0", "--data"])
        .arg(&api_out)
        .env(
            "FLOWCAP_API_TOKENS",
            format!("ops:write:{OPS},viewer:read:{VIEWER}"),
        )
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Running(child);
    let mut stderr = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let line = line_starting(&mut stderr, "serving POST http://");
    let addr = line
        .trim_start_matches("serving POST http://")
        .trim_end_matches("/sql until interrupted")
        .parse()
        .unwrap();
    std::thread::spawn(move || for _ in stderr {});
    let mut served = Server {
        addr,
        answers: Vec::new(),
    };
    let mut from_snapshot = served.get(&format!("/api/v1/cards/{iccid}"), VIEWER);
    assert_eq!(from_snapshot["position"]["seq"], seq + 3);
    let mut live = card.clone();
    for doc in [&mut from_snapshot, &mut live] {
        doc.as_object_mut().unwrap().remove("position");
    }
    assert_eq!(from_snapshot, live);
    served
        .post("/api/v1/commands", OPS, &without_operator(&suspend))
        .assert_problem(409, "not_now");
    stop(child);

    // The same commands at the end of the commands file.
    let commands = dir.path().join("commands.jsonl");
    let mut text = std::fs::read_to_string(data.join("commands.jsonl")).unwrap();
    for line in api_commands(&at, &iccid) {
        text.push_str(&line);
        text.push('\n');
    }
    std::fs::write(&commands, text).unwrap();
    let file_out = dir.path().join("file");
    stdout_of(
        &mut run_args(Some((&usage, &commands)), 0, &file_out),
        "flowcap run",
    );

    let journal = |out: &Path| std::fs::read_to_string(out.join("journal.jsonl")).unwrap();
    assert_eq!(journal(&api_out), journal(&file_out));
    assert_eq!(
        sorted_lines(&api_out.join("events.jsonl")),
        sorted_lines(&file_out.join("events.jsonl"))
    );
    assert!(journal(&api_out).contains(r#""operator":"ops","type":"suspend""#));
}
