//! Notification delivery against real local receivers (issue #6): an
//! engine fires the rules, the [`Notifier`] delivers them over HTTP and
//! SMTP to the testkit's scripted receiver and SMTP sink.
//!
//! - a receiver answering 500, then timing out, then 429 with Retry-After,
//!   then 200 gets the notification, each attempt under the same
//!   `webhook-id` and with a valid signature;
//! - a dead receiver yields the push-failure alert with the failed payload
//!   (as an event and as an alert notification);
//! - a merged firing of 1,201 cards arrives as 500 + 500 + 201;
//! - a restart resends what was not delivered, and the engine's replay of
//!   the same firings queues nothing twice;
//! - a receiver that hangs delays only its own endpoint;
//! - email reaches an SMTP sink, SMS a gateway.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use flowcap_clock::{ManualClock, SystemClock};
use flowcap_delivery::{Notifier, NotifyConfig, PushFailedEvent, Reports, SmsGateway, SmtpRelay};
use flowcap_engine::command::{parse_command, WebhookSpec};
use flowcap_engine::event::RuleFiredEvent;
use flowcap_engine::{ActionEvent, Engine, EngineConfig, Output, Timestamp, Usage, MB};
use flowcap_rules::message::{Done, Final, Message};
use flowcap_rules::{Signer, TemplateOptions};
use flowcap_testkit::receiver::{HttpReceiver, Reply, SmtpSink};
use serde_json::{json, Value};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const WAIT: Duration = Duration::from_secs(30);

/// An engine with a 30 MB plan, cards 1..=n and the given rule.
struct Sim {
    engine: Engine,
    seq: u64,
}

fn iccid(n: u32) -> String {
    format!("8986041234{n:010}")
}

impl Sim {
    fn new(cards: u32, rule: Value, hooks: &[(&str, String)]) -> Sim {
        let mut s = Sim {
            engine: Engine::new(EngineConfig {
                shards: 2,
                ..EngineConfig::default()
            }),
            seq: 0,
        };
        s.cmd(
            "upsert_plan",
            json!({"plan": {"id": "cmcc-30m", "name": "CMCC 30MB monthly",
                "carrier": "cmcc", "allowance_mb": 30, "traffic": "directed"}}),
        );
        for (id, url) in hooks {
            s.cmd(
                "upsert_webhook",
                json!({"webhook": {"id": id, "url": url, "secret": SECRET}}),
            );
        }
        let iccids: Vec<String> = (1..=cards).map(iccid).collect();
        for i in &iccids {
            s.cmd(
                "upsert_card",
                json!({"card": {"iccid": i, "carrier": "cmcc", "plan": "cmcc-30m", "state": "active",
                    "activated_at": "2026-01-05T00:00:00+08:00", "expires_at": "2027-01-05T00:00:00+08:00"}}),
            );
        }
        s.cmd("upsert_rule", json!({ "rule": rule }));
        s
    }

    fn cmd(&mut self, ty: &str, body: Value) -> Vec<Output> {
        self.seq += 1;
        let mut c = json!({"id": format!("c{}", self.seq), "type": ty,
            "at": "2026-11-10T00:00:00+08:00"});
        c.as_object_mut()
            .unwrap()
            .extend(body.as_object().unwrap().clone());
        let mut out = Vec::new();
        let command = parse_command(c.to_string().as_bytes()).unwrap();
        self.engine.process_command(command, self.seq, &mut out);
        assert!(
            out.iter()
                .any(|o| matches!(o, Output::Journal(j) if j.result.ok)),
            "{ty} failed: {out:?}"
        );
        out
    }

    /// A record of `mb` MB for card `n`.
    fn use_mb(&mut self, n: u32, mb: u64) -> Vec<RuleFiredEvent> {
        self.seq += 1;
        let usage = Usage {
            record_id: flowcap_engine::RecordId::new(&format!("r{}", self.seq)).unwrap(),
            iccid: iccid(n).parse().unwrap(),
            start: None,
            end: Timestamp::parse_rfc3339("2026-11-10T04:00:00+08:00").unwrap(),
            bytes_up: 0,
            bytes_down: mb * MB,
            carrier: None,
            imei: None,
        };
        let mut out = Vec::new();
        self.engine
            .process_usage(&usage, self.seq, &mut out)
            .unwrap();
        firings(&out)
    }

    fn webhooks(&self) -> Vec<WebhookSpec> {
        self.engine.webhooks().cloned().collect()
    }
}

fn firings(out: &[Output]) -> Vec<RuleFiredEvent> {
    out.iter()
        .filter_map(|o| match o {
            Output::Action(ActionEvent::RuleFired(e)) => Some((**e).clone()),
            _ => None,
        })
        .collect()
}

fn used_rule(actions: Value) -> Value {
    json!({"id": "used20", "name": "20 MB used", "type": 2,
        "condition": {"used_mb_gte": 20}, "actions": actions})
}

#[derive(Default)]
struct Captured {
    failed: Mutex<Vec<PushFailedEvent>>,
    outcomes: Mutex<Vec<(String, Final)>>,
}

impl Reports for Captured {
    fn outcome(&self, message: &Message, done: &Done) {
        self.outcomes
            .lock()
            .unwrap()
            .push((message.id.clone(), done.outcome));
    }
    fn push_failed(&self, event: &PushFailedEvent) {
        self.failed.lock().unwrap().push(event.clone());
    }
}

fn fast() -> NotifyConfig {
    NotifyConfig {
        max_attempts: 4,
        backoff_initial_ms: 20,
        backoff_max_ms: 100,
        request_timeout_ms: 500,
        merge_interval_ms: 200,
        ..NotifyConfig::default()
    }
}

fn start(dir: &Path, config: NotifyConfig, sim: &Sim, reports: Arc<Captured>) -> Notifier {
    start_reported(dir, config, sim, reports, &BTreeMap::new())
}

fn start_reported(
    dir: &Path,
    config: NotifyConfig,
    sim: &Sim,
    reports: Arc<Captured>,
    reported: &BTreeMap<String, u64>,
) -> Notifier {
    Notifier::start(
        dir,
        config,
        sim.webhooks(),
        TemplateOptions::default(),
        reports,
        reported,
        SystemClock::shared(),
    )
    .unwrap()
}

fn verify(request: &flowcap_testkit::receiver::Request) {
    let id = request.header("webhook-id").expect("webhook-id");
    let ts: i64 = request
        .header("webhook-timestamp")
        .expect("webhook-timestamp")
        .parse()
        .unwrap();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    Signer::new(SECRET)
        .unwrap()
        .verify(
            id,
            ts,
            &request.body,
            request.header("webhook-signature").expect("signature"),
            now,
            300,
        )
        .expect("signature verifies");
}

#[test]
fn retries_through_500_timeout_and_429_then_delivers_under_one_id() {
    let receiver = HttpReceiver::start(vec![
        Reply::status(500),
        Reply::Hang(Duration::from_secs(2)),
        Reply::Status(429, vec![("Retry-After".into(), "1".into())]),
        Reply::status(200),
    ]);
    let mut sim = Sim::new(
        1,
        used_rule(json!([{"type": "webhook", "endpoint": "hook"}])),
        &[("hook", receiver.url())],
    );
    let fired = sim.use_mb(1, 21);
    assert_eq!(fired.len(), 1);
    let dir = tempfile::tempdir().unwrap();
    let reports = Arc::new(Captured::default());
    let n = start(dir.path(), fast(), &sim, reports.clone());
    n.submit(&fired[0]);
    let totals = n.drain(WAIT).unwrap();
    assert_eq!(
        (totals.delivered, totals.failed, totals.pending),
        (1, 0, 0),
        "{totals:?}"
    );
    assert_eq!(totals.retries, 3);
    let got = receiver.requests();
    assert_eq!(
        got.iter().map(|r| r.answered).collect::<Vec<_>>(),
        [Some(500), None, Some(429), Some(200)]
    );
    let ids: BTreeSet<_> = got
        .iter()
        .map(|r| r.header("webhook-id").unwrap())
        .collect();
    assert_eq!(ids.len(), 1, "every attempt carries the same webhook-id");
    for r in &got {
        verify(r);
        assert_eq!(r.body, got[0].body);
    }
    let body: Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(body["templateName"], "api_rule_flow_usage");
    assert_eq!(body["cid"], iccid(1));
    assert!(reports.failed.lock().unwrap().is_empty());
}

/// The times a notification carries are its notifier's clock's: the
/// signing timestamp, the queue time and the outcome time.
#[test]
fn a_notification_carries_the_time_of_its_clock() {
    let receiver = HttpReceiver::start(vec![Reply::status(200)]);
    let mut sim = Sim::new(
        1,
        used_rule(json!([{"type": "webhook", "endpoint": "hook"}])),
        &[("hook", receiver.url())],
    );
    let fired = sim.use_mb(1, 21);
    let dir = tempfile::tempdir().unwrap();
    // 2015-10-21T07:28:00Z: far from any system clock running this test.
    let then_ms = 1_445_412_480_000;
    let n = Notifier::start(
        dir.path(),
        fast(),
        sim.webhooks(),
        TemplateOptions::default(),
        Arc::new(Captured::default()),
        &BTreeMap::new(),
        ManualClock::at(then_ms),
    )
    .unwrap();
    n.submit(&fired[0]);
    let totals = n.drain(WAIT).unwrap();
    assert_eq!((totals.delivered, totals.pending), (1, 0), "{totals:?}");
    let got = receiver.requests();
    let r = &got[0];
    assert_eq!(r.header("webhook-timestamp"), Some("1445412480"));
    Signer::new(SECRET)
        .unwrap()
        .verify(
            r.header("webhook-id").unwrap(),
            1_445_412_480,
            &r.body,
            r.header("webhook-signature").unwrap(),
            1_445_412_480,
            0,
        )
        .expect("signed at the clock's time");
    let rows = n.take_outcomes();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].message.queued_ms, then_ms);
    assert_eq!(rows[0].done.at_ms, then_ms);
}

#[test]
fn a_dead_receiver_raises_the_push_failure_alert_with_the_payload() {
    let alerts = HttpReceiver::start(vec![]);
    // Nothing listens on a port just released.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/hook", l.local_addr().unwrap())
    };
    let refuses = HttpReceiver::start(vec![Reply::status(404)]);
    let mut sim = Sim::new(
        2,
        used_rule(json!([{"type": "webhook", "endpoint": "dead"}])),
        &[
            ("dead", dead),
            ("gone", refuses.url()),
            ("ops", alerts.url()),
        ],
    );
    sim.cmd(
        "upsert_rule",
        json!({"rule": {"id": "used25", "type": 2, "condition": {"used_mb_gte": 25},
            "actions": [{"type": "webhook", "endpoint": "gone"}]}}),
    );
    let fired = sim.use_mb(1, 26);
    assert_eq!(fired.len(), 2);
    let dir = tempfile::tempdir().unwrap();
    let reports = Arc::new(Captured::default());
    let config = NotifyConfig {
        alert_webhook: Some("ops".into()),
        ..fast()
    };
    let n = start(dir.path(), config, &sim, reports.clone());
    for f in &fired {
        n.submit(f);
    }
    let totals = n.drain(WAIT).unwrap();
    // Two failures, two alerts delivered to "ops".
    assert_eq!(
        (totals.failed, totals.delivered, totals.pending),
        (2, 2, 0),
        "{totals:?}"
    );
    assert_eq!(refuses.requests().len(), 1, "a 404 is not retried");
    let events = reports.failed.lock().unwrap().clone();
    assert_eq!(events.len(), 2);
    let dead_event = events
        .iter()
        .find(|e| e.endpoint.as_deref() == Some("dead"))
        .unwrap();
    assert_eq!(dead_event.kind, "push_failed");
    assert_eq!(dead_event.attempts, 4, "every attempt used");
    let used20 = fired.iter().find(|f| f.rule == "used20").unwrap();
    assert_eq!(dead_event.firings, std::slice::from_ref(&used20.id));
    assert_eq!(dead_event.payload["templateName"], "api_rule_flow_usage");
    assert_eq!(dead_event.payload["cid"], iccid(1));
    let gone = events
        .iter()
        .find(|e| e.endpoint.as_deref() == Some("gone"))
        .unwrap();
    assert_eq!((gone.attempts, gone.status), (1, Some(404)));
    let got = alerts.wait_for(2, WAIT);
    let bodies: Vec<Value> = got
        .iter()
        .map(|r| serde_json::from_slice(&r.body).unwrap())
        .collect();
    let alert = bodies.iter().find(|b| b["endpoint"] == "dead").unwrap();
    assert_eq!(alert["kind"], "push_failed");
    assert_eq!(alert["payload"], dead_event.payload);
    for r in &got {
        verify(r);
    }
}

#[test]
fn a_merged_firing_of_1201_cards_arrives_as_500_500_201() {
    let receiver = HttpReceiver::start(vec![]);
    let mut sim = Sim::new(
        1201,
        json!({"id": "placeholder", "type": 2, "condition": {"used_mb_gte": 29}}),
        &[("hook", receiver.url())],
    );
    for n in 1..=1201 {
        sim.use_mb(n, 21);
    }
    // Added now: fires at once for every card already past 20 MB.
    let out = sim.cmd(
        "upsert_rule",
        json!({"rule": used_rule(json!([{"type": "webhook", "endpoint": "hook", "merge": true}]))}),
    );
    let fired = firings(&out);
    assert_eq!(fired.len(), 1201);
    let dir = tempfile::tempdir().unwrap();
    let n = start(dir.path(), fast(), &sim, Arc::new(Captured::default()));
    for f in &fired {
        n.submit(f);
    }
    let totals = n.drain(WAIT).unwrap();
    assert_eq!((totals.delivered, totals.pending), (3, 0), "{totals:?}");
    let got = receiver.requests();
    let mut sizes: Vec<usize> = Vec::new();
    let mut cards = BTreeSet::new();
    for r in &got {
        verify(r);
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["templateName"], "api_rule_flow_usage");
        assert_eq!(body["ruleType"], 2);
        let list = body["templateParamsList"].as_array().unwrap();
        sizes.push(list.len());
        for entry in list {
            let params = entry["templateParams"].as_array().unwrap();
            cards.insert(params[0]["value"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(sizes, [500, 500, 201]);
    assert_eq!(cards.len(), 1201, "every card once");
}

#[test]
fn a_restart_resends_undelivered_under_the_same_id_and_a_replay_queues_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    // The endpoint is down for the first run: nothing is delivered.
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut sim = Sim::new(
        3,
        used_rule(json!([
            {"type": "webhook", "endpoint": "hook"},
            {"type": "webhook", "endpoint": "hook", "merge": true}
        ])),
        &[("hook", format!("http://{down}/hook"))],
    );
    let mut fired = Vec::new();
    for n in 1..=3 {
        fired.extend(sim.use_mb(n, 21));
    }
    assert_eq!(fired.len(), 3);
    let patient = NotifyConfig {
        max_attempts: 1000,
        backoff_initial_ms: 50,
        backoff_max_ms: 50,
        merge_interval_ms: 60_000,
        ..fast()
    };
    {
        let n = start(
            dir.path(),
            patient.clone(),
            &sim,
            Arc::new(Captured::default()),
        );
        for f in &fired {
            n.submit(f);
        }
        // The snapshot barrier: singles queued, merged firings buffered,
        // all on disk.
        n.sync().unwrap();
        assert_eq!(n.totals().pending, 6, "{:?}", n.totals());
    } // dropped with everything undelivered
    let receiver = HttpReceiver::start(vec![]);
    sim.cmd(
        "upsert_webhook",
        json!({"webhook": {"id": "hook", "url": receiver.url(), "secret": SECRET}}),
    );
    let n = start(dir.path(), patient, &sim, Arc::new(Captured::default()));
    // The engine replays the same inputs after its snapshot: same firings.
    for f in &fired {
        n.submit(f);
    }
    let totals = n.drain(WAIT).unwrap();
    assert_eq!(totals.pending, 0, "{totals:?}");
    let got = receiver.requests();
    let mut by_id: BTreeMap<String, usize> = BTreeMap::new();
    for r in &got {
        verify(r);
        *by_id
            .entry(r.header("webhook-id").unwrap().to_owned())
            .or_default() += 1;
    }
    // Three single messages and one merged message of three cards.
    assert_eq!(by_id.len(), 4, "{by_id:?}");
    assert!(by_id.values().all(|&c| c == 1), "{by_id:?}");
    let merged: Vec<Value> = got
        .iter()
        .map(|r| serde_json::from_slice::<Value>(&r.body).unwrap())
        .filter(|b| b.get("templateParamsList").is_some())
        .collect();
    assert_eq!(merged.len(), 1);
    assert_eq!(merged[0]["templateParamsList"].as_array().unwrap().len(), 3);
    drop(n);
    // A third start finds everything done: nothing is sent again.
    let n = start(dir.path(), fast(), &sim, Arc::new(Captured::default()));
    for f in &fired {
        n.submit(f);
    }
    assert_eq!(n.drain(WAIT).unwrap().queued, 0);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(receiver.requests().len(), got.len());
    // Outcomes for the history: the four, in done-file order; a start
    // told the history has three of them offers the fourth again.
    let rows = n.take_outcomes();
    assert_eq!(rows.len(), 4);
    assert_eq!(
        rows.iter().map(|r| r.index).collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );
    assert!(rows
        .iter()
        .all(|r| r.destination == "webhook:hook" && r.done.outcome == Final::Delivered));
    assert!(n.take_outcomes().is_empty(), "taken once");
    drop(n);
    let reported = BTreeMap::from([("webhook:hook".to_owned(), 3)]);
    let n = start_reported(
        dir.path(),
        fast(),
        &sim,
        Arc::new(Captured::default()),
        &reported,
    );
    let again = n.take_outcomes();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].index, 3);
    assert_eq!(again[0].message.id, rows[3].message.id);
}

#[test]
fn a_hanging_receiver_delays_only_its_own_endpoint() {
    let slow = HttpReceiver::start(vec![Reply::Hang(Duration::from_secs(20))]);
    let quick = HttpReceiver::start(vec![]);
    let mut sim = Sim::new(
        1,
        used_rule(json!([
            {"type": "webhook", "endpoint": "slow"},
            {"type": "webhook", "endpoint": "quick"}
        ])),
        &[("slow", slow.url()), ("quick", quick.url())],
    );
    let fired = sim.use_mb(1, 21);
    let dir = tempfile::tempdir().unwrap();
    let config = NotifyConfig {
        request_timeout_ms: 20_000,
        ..fast()
    };
    let n = start(dir.path(), config, &sim, Arc::new(Captured::default()));
    n.submit(&fired[0]);
    let got = quick.wait_for(1, WAIT);
    assert_eq!(got.len(), 1, "the quick endpoint is served");
    // Both are sent at once; under load the quick answer can come before
    // the slow request has even arrived.
    assert_eq!(
        slow.wait_for(1, WAIT).len(),
        1,
        "the slow one is still hanging"
    );
    let totals = n.totals();
    assert_eq!((totals.delivered, totals.pending), (1, 1), "{totals:?}");
}

#[test]
fn email_reaches_the_smtp_relay_and_sms_the_gateway() {
    let smtp = SmtpSink::start();
    let gateway = HttpReceiver::start(vec![Reply::status(503)]);
    let mut sim = Sim::new(
        1,
        used_rule(json!([
            {"type": "email", "to": ["ops@example.com", "noc@example.com"]},
            {"type": "sms", "to": "+8613800000000"}
        ])),
        &[],
    );
    let fired = sim.use_mb(1, 21);
    let dir = tempfile::tempdir().unwrap();
    let config = NotifyConfig {
        smtp: Some(SmtpRelay {
            host: smtp.addr().ip().to_string(),
            port: smtp.addr().port(),
            from: "flowcap@example.com".into(),
            username: None,
            password: None,
        }),
        sms: Some(SmsGateway {
            url: gateway.url(),
            token: Some("t0ken".into()),
        }),
        ..fast()
    };
    let n = start(dir.path(), config, &sim, Arc::new(Captured::default()));
    n.submit(&fired[0]);
    let totals = n.drain(WAIT).unwrap();
    assert_eq!((totals.delivered, totals.pending), (2, 0), "{totals:?}");
    let mails = smtp.wait_for(1, WAIT);
    assert_eq!(mails.len(), 1);
    let mail = &mails[0];
    assert_eq!(mail.from, "flowcap@example.com");
    assert_eq!(mail.to, ["ops@example.com", "noc@example.com"]);
    assert!(mail.data.contains(&iccid(1)), "{}", mail.data);
    assert!(mail.data.contains("Message-ID: <msg_"), "{}", mail.data);
    let sms = gateway.requests();
    assert_eq!(sms.len(), 2, "503 retried once");
    let body: Value = serde_json::from_slice(&sms[1].body).unwrap();
    assert_eq!(body["to"], json!(["+8613800000000"]));
    assert!(body["text"].as_str().unwrap().contains(&iccid(1)));
    assert_eq!(sms[1].header("idempotency-key"), body["id"].as_str());
    assert_eq!(sms[1].header("authorization"), Some("Bearer t0ken"));
}
