//! The operator API in Kafka mode (Tansu, started per test): reads answer
//! from the live pipeline while it runs, and a command sent through the
//! API goes through the commands topic, is journaled with the token's
//! name as its operator and answered with the engine's result; a repeat
//! of its id is answered with the first result; the event stream carries
//! the command's events once a snapshot commits them, in the file's
//! order.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flowcap_loadgen::{Workload, WorkloadConfig};
use flowcap_testkit::{produce, Broker, Record, Storage};
use serde_json::Value;

use common::{Running, Stream};

const OPS: &str = "ops-token-kafka-1";

/// One request; (status, body).
fn call(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Authorization: Bearer {OPS}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[test]
fn commands_go_through_the_topic_and_reads_see_the_live_state() {
    let broker = Broker::start(Storage::Memory).expect("broker starts");
    for (topic, partitions) in [
        ("flowcap.usage", 2),
        ("flowcap.commands", 1),
        ("flowcap.actions", 1),
        ("flowcap.dlq", 1),
        ("flowcap.command-results", 1),
        ("flowcap.lease", 1),
    ] {
        broker
            .create_topic(topic, partitions)
            .expect("topic created");
    }
    let workload = Workload::new(WorkloadConfig {
        cards: 1000,
        duration_hours: 1,
        ..WorkloadConfig::default()
    })
    .unwrap();
    let commands: Vec<Vec<u8>> = workload
        .setup_commands()
        .map(|c| serde_json::to_vec(&c).unwrap())
        .collect();
    let n_commands = produce(
        &broker,
        "flowcap.commands",
        commands.iter().map(|c| Record::new(c)),
    )
    .expect("commands produced");
    let records: Vec<(String, Vec<u8>, i64)> = workload
        .records()
        .map(|r| {
            let mut line = String::new();
            r.to_json_line(&mut line);
            (r.iccid().to_string(), line.into_bytes(), r.arrival.millis())
        })
        .collect();
    let n_records = produce(
        &broker,
        "flowcap.usage",
        records.iter().map(|(key, bytes, ts)| {
            Record::new(bytes.as_slice())
                .key(key.as_bytes())
                .timestamp_ms(*ts)
        }),
    )
    .expect("records produced");

    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_flowcap"))
        .args(["run", "-q", "--json", "--no-notify", "--shards", "2"])
        .args([
            "--kafka",
            &broker.bootstrap(),
            "--http",
            "127.0.0.1:0",
            "--snapshot-interval-secs",
            "1",
            "--out",
        ])
        .arg(dir.path().join("out"))
        .env("FLOWCAP_API_TOKENS", format!("ops:write:{OPS}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Running(child);
    let mut stderr = BufReader::new(child.0.stderr.take().unwrap()).lines();
    const PREFIX: &str = "ops: listening on http://";
    let addr: SocketAddr = loop {
        let line = stderr
            .next()
            .expect("flowcap says where it listens")
            .unwrap();
        if let Some(addr) = line.strip_prefix(PREFIX) {
            break addr.parse().unwrap();
        }
    };
    std::thread::spawn(move || for _ in stderr {});

    // Reads while it runs; wait until every input is applied.
    let last = (n_commands + n_records - 1) as u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    let page = loop {
        let (status, page) = call(addr, "GET", "/api/v1/cards?state=active&limit=10", "");
        if status == 200 && page["position"]["seq"].as_u64() >= Some(last) {
            break page;
        }
        assert!(Instant::now() < deadline, "inputs not applied: {page}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let iccid = page["items"][0]["iccid"].as_str().unwrap().to_owned();

    let suspend = format!(
        r#"{{"id":"kafka-api-1","at":"2026-11-26T12:30:00+08:00","type":"suspend","iccids":["{iccid}"]}}"#
    );
    let (status, first) = call(addr, "POST", "/api/v1/commands", &suspend);
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["status"], "done");
    assert_eq!(first["result"]["ok"], true, "{first}");
    let (status, again) = call(addr, "POST", "/api/v1/commands", &suspend);
    assert_eq!(status, 200);
    assert_eq!(again["result"], first["result"]);
    let (status, card) = call(addr, "GET", &format!("/api/v1/cards/{iccid}"), "");
    assert_eq!(status, 200);
    assert_eq!(card["state"], "suspended");
    assert_eq!(card["reasons"], serde_json::json!(["manual"]));
    assert!(card["position"]["seq"].as_u64().unwrap() > last);
    // The shortcut takes the same path.
    let (status, resumed) = call(addr, "POST", &format!("/api/v1/cards/{iccid}/resume"), "");
    assert_eq!(status, 200, "{resumed}");
    assert_eq!(resumed["result"]["ok"], true);

    // The stream from the start: every event up to the resume's, which
    // comes once a snapshot (every second here) commits it.
    let mut stream = Stream::open(addr, OPS, None);
    let mut streamed = Vec::new();
    loop {
        let event = stream.next();
        let done = event.data["iccid"] == iccid.as_str()
            && event.data["new"] == "active"
            && event.data["cause"]["command_id"] == resumed["id"];
        streamed.push(event);
        if done {
            break;
        }
    }
    drop(stream);
    let (status, page) = call(
        addr,
        "GET",
        &format!("/api/v1/events?iccid={iccid}&kind=card_state&limit=1000"),
        "",
    );
    assert_eq!(status, 200, "{page}");
    let states: Vec<&Value> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| &i["event"]["new"])
        .collect();
    assert!(
        states.ends_with(&[&Value::from("suspended"), &Value::from("active")]),
        "{states:?}"
    );

    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(child.0.wait().unwrap().success(), "SIGTERM exits 0");
    let journal = std::fs::read_to_string(dir.path().join("out").join("journal.jsonl")).unwrap();
    let ours: Vec<Value> = journal
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["command"]["operator"] == "ops")
        .collect();
    assert_eq!(ours.len(), 3, "{ours:?}");
    assert_eq!(ours[0]["command"]["id"], "kafka-api-1");
    assert_eq!(ours[0]["repeat"], false);
    assert_eq!(ours[1]["repeat"], true);
    assert_eq!(ours[1]["result"], first["result"]);
    assert_eq!(ours[2]["command"]["type"], "resume");
    // What the stream gave is the events file's beginning, in its order.
    let events = std::fs::read_to_string(dir.path().join("out").join("events.jsonl")).unwrap();
    let file: Vec<Value> = events
        .lines()
        .take(streamed.len())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let streamed: Vec<Value> = streamed.into_iter().map(|e| e.data).collect();
    assert_eq!(streamed, file);
}
