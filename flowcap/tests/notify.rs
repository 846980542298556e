//! Rule notifications through the real binary (issue #6): `flowcap run`
//! fires automation rules and delivers their webhooks to a local receiver
//! that keeps failing; the process is killed with SIGKILL while
//! notifications are undelivered (during the input and during the final
//! drain), restarted on the same directory, and finally the receiver
//! recovers. Every firing must arrive, signed, in exactly one message id
//! (repeats only under the same `webhook-id` and body), and the
//! `rule_executions` history must hold every execution once.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flowcap_testkit::receiver::{HttpReceiver, Reply};
use serde_json::{json, Value};

mod common;

use common::{json_lines, sql_rows, sql_text, stdout_of, BIN};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const CARDS: u32 = 300;

fn iccid(n: u32) -> String {
    format!("8986041234{n:010}")
}

/// Commands and records: every card crosses 20 MB once (rule `single`,
/// one message per card) and 25 MB once (rule `merged`, merged messages).
fn write_inputs(dir: &Path, url: &str) {
    write_usage(dir, url, CARDS, 10, |_| 3);
}

/// [`write_inputs`] for `cards` cards, each with `steps` records of
/// `mb(card)` MB.
fn write_usage(dir: &Path, url: &str, cards: u32, steps: u32, mb: impl Fn(u32) -> u64) {
    let at = "2026-11-01T00:00:00+08:00";
    let mut commands = Vec::new();
    let mut cmd = |ty: &str, body: Value| {
        let mut c = json!({"id": format!("c{}", commands.len()), "type": ty, "at": at});
        c.as_object_mut()
            .unwrap()
            .extend(body.as_object().unwrap().clone());
        commands.push(c.to_string());
    };
    cmd(
        "upsert_plan",
        json!({"plan": {"id": "p100", "name": "CMCC 100MB", "carrier": "cmcc",
            "allowance_mb": 100, "traffic": "directed"}}),
    );
    cmd(
        "upsert_webhook",
        json!({"webhook": {"id": "hook", "url": url, "secret": SECRET}}),
    );
    // Refused as malformed (an unknown field): its raw text, secret
    // included, would go to the journal and the dead letters.
    cmd(
        "upsert_webhook",
        json!({"webhook": {"id": "hook2", "url": url, "secret": SECRET, "colour": "red"}}),
    );
    for n in 1..=cards {
        cmd(
            "upsert_card",
            json!({"card": {"iccid": iccid(n), "carrier": "cmcc", "plan": "p100", "state": "active",
                "activated_at": "2026-01-05T00:00:00+08:00", "expires_at": "2027-01-05T00:00:00+08:00"}}),
        );
    }
    cmd(
        "upsert_rule",
        json!({"rule": {"id": "single", "type": 2, "condition": {"used_mb_gte": 20},
            "actions": [{"type": "webhook", "endpoint": "hook"}]}}),
    );
    cmd(
        "upsert_rule",
        json!({"rule": {"id": "merged", "type": 2, "condition": {"used_mb_gte": 25},
            "actions": [{"type": "webhook", "endpoint": "hook", "merge": true}]}}),
    );
    std::fs::write(dir.join("commands.jsonl"), commands.join("\n") + "\n").unwrap();
    let mut usage = std::fs::File::create(dir.join("usage.jsonl")).unwrap();
    for step in 0..steps {
        for n in 1..=cards {
            let end = format!("2026-11-10T{:02}:{:02}:00+08:00", step, n % 60);
            writeln!(
                usage,
                "{}",
                json!({"record_id": format!("r-{n}-{step}"), "iccid": iccid(n), "end": end,
                    "bytes_up": 0, "bytes_down": mb(n) * 1_048_576})
            )
            .unwrap();
        }
    }
}

fn flowcap(dir: &Path) -> Command {
    flowcap_on(dir, "usage.jsonl")
}

/// `flowcap run` on the input file `input` of `dir`.
fn flowcap_on(dir: &Path, input: &str) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "run",
        "-q",
        "--json",
        "--shards",
        "2",
        "--snapshot-every",
        "500",
    ])
    .arg("--config")
    .arg(dir.join("flowcap.toml"))
    .arg("--input")
    .arg(dir.join(input))
    .arg("--commands")
    .arg(dir.join("commands.jsonl"))
    .arg("--out")
    .arg(dir.join("out"))
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    cmd
}

/// (rule, card) of every firing a webhook body carries.
fn carried(body: &Value) -> Vec<String> {
    let lists: Vec<&Value> = match body.get("templateParamsList") {
        Some(list) => list.as_array().unwrap().iter().collect(),
        None => vec![body],
    };
    lists
        .iter()
        .map(|e| e["templateParams"][0]["value"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn kill_9_with_undelivered_notifications_then_restart_delivers_every_one_once() {
    let dir = tempfile::tempdir().unwrap();
    // Failing until the end of the test's kills.
    let receiver = HttpReceiver::start(vec![Reply::status(503); 1_000_000]);
    write_inputs(dir.path(), &receiver.url());
    std::fs::write(
        dir.path().join("flowcap.toml"),
        "[notify]\nmax_attempts = 100000\nbackoff_initial_ms = 20\nbackoff_max_ms = 50\n\
         request_timeout_ms = 2000\nmerge_interval_ms = 100\ndrain_timeout_ms = 120000\n",
    )
    .unwrap();

    // Kill 1: while inputs are processed (after the first snapshot).
    // Kill 2 and 3: in the final drain, notifications queued and failing.
    let snapshots = dir.path().join("out/snapshots");
    for kill in 0..3 {
        let mut child = flowcap(dir.path()).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        let seen = receiver.requests().len();
        loop {
            assert!(
                child.try_wait().unwrap().is_none(),
                "flowcap exited before kill {kill}"
            );
            assert!(Instant::now() < deadline, "no progress before kill {kill}");
            let snapshot = std::fs::read_dir(&snapshots).is_ok_and(|mut d| d.next().is_some());
            let attempts = receiver.requests().len();
            if (kill == 0 && snapshot) || (kill > 0 && attempts > seen + 50) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
    let failed_attempts = receiver.requests().len();
    assert!(
        failed_attempts > 100,
        "{failed_attempts} attempts before recovery"
    );

    receiver.set_script(vec![]);
    let out = flowcap(dir.path()).output().unwrap();
    assert!(out.status.success());
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        summary["summary"]["notifications"]["pending"], 0,
        "{summary}"
    );

    // Every delivered message: one body per webhook-id, signed.
    let requests = receiver.requests();
    let mut bodies: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let signer = flowcap_rules::Signer::new(SECRET).unwrap();
    for r in requests.iter().filter(|r| r.answered == Some(200)) {
        let id = r.header("webhook-id").unwrap().to_owned();
        let ts: i64 = r.header("webhook-timestamp").unwrap().parse().unwrap();
        signer
            .verify(
                &id,
                ts,
                &r.body,
                r.header("webhook-signature").unwrap(),
                ts,
                0,
            )
            .unwrap();
        let previous = bodies.insert(id.clone(), r.body.clone());
        assert!(
            previous.is_none_or(|p| p == r.body),
            "{id}: a repeat with another body"
        );
    }
    // Each (rule, card) in exactly one message id.
    let mut single = BTreeSet::new();
    let mut merged = BTreeSet::new();
    for body in bodies.values() {
        let body: Value = serde_json::from_slice(body).unwrap();
        let target = if body.get("templateParamsList").is_some() {
            &mut merged
        } else {
            &mut single
        };
        for card in carried(&body) {
            assert!(target.insert(card.clone()), "{card} notified under two ids");
        }
    }
    let all: BTreeSet<String> = (1..=CARDS).map(iccid).collect();
    assert_eq!(single, all, "one single message per card");
    assert_eq!(merged, all, "every card in one merged message");

    // The history's explanation: one execution per firing, all webhooks.
    let rows = sql_rows(
        &dir.path().join("out"),
        "SELECT rule, COUNT(*) AS n, COUNT(DISTINCT execution_id) AS ids, \
         COUNT(DISTINCT iccid) AS cards FROM rule_executions GROUP BY rule ORDER BY rule",
    );
    assert_eq!(
        rows,
        [
            json!({"rule": "merged", "n": CARDS, "ids": CARDS, "cards": CARDS}),
            json!({"rule": "single", "n": CARDS, "ids": CARDS, "cards": CARDS}),
        ]
    );
    // And every delivery's outcome, once per execution.
    let rows = sql_rows(
        &dir.path().join("out"),
        "SELECT COUNT(*) AS n, COUNT(DISTINCT d.execution_id) AS ids, \
         SUM(CASE WHEN CAST(d.outcome AS VARCHAR) = 'delivered' THEN 1 ELSE 0 END) AS delivered \
         FROM rule_deliveries d JOIN rule_executions e ON d.execution_id = e.execution_id",
    );
    let n = 2 * CARDS;
    assert_eq!(rows, [json!({"n": n, "ids": n, "delivered": n})]);
    let executions = json_lines(&stdout_of(
        Command::new(BIN)
            .args(["query", "rule-executions", "--format", "json", "--data"])
            .arg(dir.path().join("out")),
        "flowcap query rule-executions",
    ));
    let first = &executions[0];
    assert_eq!(first["outcome"], "delivered", "{first}");

    assert_no_secret_written(&dir.path().join("out"));
}

/// The outbox drops what is delivered and remembered by every snapshot
/// kept (issue #23): a day whose cards cross the rules' limits at
/// different times, killed with SIGKILL in the middle of its firings while
/// notifications are refused, run again to its end; then a second day's
/// file with many snapshots and nothing to notify. Every card's notification reached the
/// receiver under one id, repeats only of the message in flight at the
/// kill, and the outbox ends holding a small part of what it sent (it held
/// all of it before compaction).
#[test]
fn the_outbox_stays_bounded_over_many_snapshots_and_delivers_each_once() {
    const CARDS_LONG: u32 = 1_200;
    let dir = tempfile::tempdir().unwrap();
    let receiver = HttpReceiver::start(vec![Reply::status(503); 200]);
    // 3 to 7 MB a step: the 20 MB rule fires at steps 3 to 7 of 15, the
    // 25 MB rule at steps 4 to 9.
    write_usage(dir.path(), &receiver.url(), CARDS_LONG, 15, |n| {
        3 + u64::from(n % 5)
    });
    std::fs::write(
        dir.path().join("flowcap.toml"),
        "[notify]\nmax_attempts = 100000\nbackoff_initial_ms = 5\nbackoff_max_ms = 20\n\
         merge_interval_ms = 100\ndrain_timeout_ms = 120000\n",
    )
    .unwrap();
    // Killed in the middle of the firings (the input, with its 1,205
    // commands, ends at 19,204): what it queued after its last snapshot's
    // cut is a tail that the restart's replay fires again.
    let mut child = flowcap(dir.path()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let snapshots = dir.path().join("out/snapshots");
    let newest = || {
        std::fs::read_dir(&snapshots).map_or(0, |d| {
            d.filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                name.strip_prefix("snapshot-")?
                    .strip_suffix(".bin")?
                    .parse::<u64>()
                    .ok()
            })
            .max()
            .unwrap_or(0)
        })
    };
    while newest() < 7_999 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "exited before the kill"
        );
        assert!(Instant::now() < deadline, "no deliveries before the kill");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let out = flowcap(dir.path()).output().unwrap();
    assert!(out.status.success());

    // Day 2: records that notify nothing, 14 snapshots.
    let mut day2 = std::fs::File::create(dir.path().join("day2.jsonl")).unwrap();
    for i in 0..7_000u32 {
        let n = 1 + i % CARDS_LONG;
        writeln!(
            day2,
            "{}",
            json!({"record_id": format!("d2-{i}"), "iccid": iccid(n),
                "end": format!("2026-11-11T{:02}:00:00+08:00", i / 1_000), "bytes_up": 1, "bytes_down": 0})
        )
        .unwrap();
    }
    drop(day2);
    let out = flowcap_on(dir.path(), "day2.jsonl").output().unwrap();
    assert!(out.status.success());
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        summary["summary"]["notifications"]["pending"], 0,
        "{summary}"
    );

    // The receiver's count: each card once per rule, under one id.
    let mut ids: BTreeMap<String, usize> = BTreeMap::new();
    let mut single = BTreeMap::<String, BTreeSet<String>>::new();
    let mut merged = BTreeMap::<String, BTreeSet<String>>::new();
    for r in receiver
        .requests()
        .iter()
        .filter(|r| r.answered == Some(200))
    {
        let id = r.header("webhook-id").unwrap().to_owned();
        *ids.entry(id.clone()).or_default() += 1;
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        let target = if body.get("templateParamsList").is_some() {
            &mut merged
        } else {
            &mut single
        };
        for card in carried(&body) {
            target.entry(card).or_default().insert(id.clone());
        }
    }
    let all: BTreeSet<String> = (1..=CARDS_LONG).map(iccid).collect();
    for (rule, carried) in [("single", &single), ("merged", &merged)] {
        assert_eq!(
            carried.keys().cloned().collect::<BTreeSet<_>>(),
            all,
            "{rule}: every card notified"
        );
        let twice: Vec<_> = carried.iter().filter(|(_, ids)| ids.len() > 1).collect();
        assert!(twice.is_empty(), "{rule}: under two ids: {twice:?}");
    }
    let repeats: usize = ids.values().map(|n| n - 1).sum();
    assert!(
        repeats <= 1,
        "{repeats} repeats: only the message in flight at the kill may come again"
    );

    // What the outbox still holds.
    let mut lines = 0usize;
    let mut messages = 0usize;
    let mut kinds = BTreeMap::<String, usize>::new();
    for entry in std::fs::read_dir(dir.path().join("out/outbox")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        lines += text.lines().count();
        if path.extension().is_some_and(|e| e == "log") {
            messages += text.lines().filter(|l| l.contains(r#""t":"msg""#)).count();
        }
        for line in text.lines() {
            let kind = line.split(',').next().unwrap_or_default().to_owned();
            *kinds.entry(kind).or_default() += 1;
        }
    }
    let sent = ids.len();
    assert!(
        messages * 20 <= sent && lines * 10 <= sent,
        "the outbox holds {messages} messages in {lines} lines after sending {sent}: {kinds:?}"
    );

    // December: ten cards cross 20 MB again (the log held no message any
    // more, its done file only its base), then a day without firings. Each
    // delivery is in the history once: the outcomes after the compaction
    // keep their indices, so a restart does not offer them again.
    for (name, cards, mb) in [("day3.jsonl", 10u32, 21u64), ("day4.jsonl", 1_000, 0)] {
        let mut day = std::fs::File::create(dir.path().join(name)).unwrap();
        for n in 1..=cards {
            writeln!(
                day,
                "{}",
                json!({"record_id": format!("{name}-{n}"), "iccid": iccid(n),
                    "end": "2026-12-02T10:00:00+08:00", "bytes_up": 1, "bytes_down": mb * 1_048_576})
            )
            .unwrap();
        }
        drop(day);
        let out = flowcap_on(dir.path(), name).output().unwrap();
        assert!(out.status.success());
    }
    let rows = sql_rows(
        &dir.path().join("out"),
        "SELECT COUNT(*) AS n, COUNT(DISTINCT execution_id) AS ids FROM rule_deliveries",
    );
    let executions = 2 * CARDS_LONG + 10;
    assert_eq!(rows, [json!({"n": executions, "ids": executions})]);
}

/// The signing secret (which the deliveries above, across restarts, were
/// signed with) appears nowhere flowcap writes out: not in a file of the
/// output directory but the snapshots (which restarts sign with), not in
/// the history's command journal or quarantine.
fn assert_no_secret_written(out: &Path) {
    let redacted = flowcap_engine::redact::secret(SECRET);
    let mut files = vec![out.to_path_buf()];
    let mut texts = 0;
    while let Some(path) = files.pop() {
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "snapshots") {
                continue;
            }
            for entry in std::fs::read_dir(&path).unwrap() {
                files.push(entry.unwrap().path());
            }
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
            "the secret in clear in {}",
            path.display()
        );
        texts += 1;
    }
    assert!(texts > 3, "{texts} files read");
    let journal = std::fs::read_to_string(out.join("journal.jsonl")).unwrap();
    assert_eq!(journal.matches(&redacted).count(), 2, "{redacted}");

    let commands = sql_rows(out, "SELECT command FROM command_journal");
    assert!(commands.len() > CARDS as usize, "{}", commands.len());
    let webhooks: Vec<&str> = commands
        .iter()
        .filter_map(|r| r["command"].as_str())
        .filter(|c| c.contains("upsert_webhook"))
        .collect();
    assert_eq!(webhooks.len(), 2, "{webhooks:?}");
    for c in &webhooks {
        assert!(!c.contains(SECRET) && c.contains(&redacted), "{c}");
    }
    let raw = sql_text(
        out,
        "csv",
        "SELECT CAST(raw AS VARCHAR) AS raw FROM quarantine",
    );
    assert!(raw.contains("hook2") && !raw.contains(SECRET), "{raw}");
}
