//! Builders for the SPEC rule tests: command lines through the real parser
//! (`parse_command`), usage records, an engine with the default UTC+8
//! configuration, and a runner that plays every scenario on one shard and on
//! three and checks that both end in the same place.

#![allow(dead_code)]

use flowcap_engine::command::{parse_command, CommandError, CommandResult, ErrorCode};
use flowcap_engine::event::{CardStateEvent, Cause, PoolStateEvent};
use flowcap_engine::{
    ActionEvent, CardView, Engine, EngineConfig, Iccid, Lane, Output, PoolId, PoolView, RecordId,
    Timestamp, Usage, MB,
};
use serde_json::{json, Value};

/// Time of the standard setup: the engine's clock starts here.
pub(crate) const SETUP_AT: &str = "2026-11-10T00:00:00+08:00";

/// `2026-11-DD hh:mm` at +08:00.
pub(crate) fn nov(day: u32, hour: u32, minute: u32) -> String {
    format!("2026-11-{day:02}T{hour:02}:{minute:02}:00+08:00")
}

/// `2026-12-DD hh:mm` at +08:00.
pub(crate) fn dec(day: u32, hour: u32, minute: u32) -> String {
    format!("2026-12-{day:02}T{hour:02}:{minute:02}:00+08:00")
}

pub(crate) fn ts(text: &str) -> Timestamp {
    Timestamp::parse_rfc3339(text).unwrap_or_else(|e| panic!("bad time {text}: {e:?}"))
}

/// The ICCID of test card `n` (20 digits).
pub(crate) fn ic(n: u32) -> Iccid {
    Iccid::parse(&iccid_text(n)).expect("valid ICCID")
}

pub(crate) fn iccid_text(n: u32) -> String {
    format!("898604{n:014}")
}

/// `n` MB in bytes.
pub(crate) fn mb(n: u64) -> u64 {
    n * MB
}

/// The default configuration (UTC+8, 2 h lateness, 1 day future) with a
/// fixed shard count.
pub(crate) fn config(shards: usize) -> EngineConfig {
    EngineConfig {
        shards,
        ..EngineConfig::default()
    }
}

/// An engine plus everything it emitted.
pub(crate) struct Sim {
    pub(crate) engine: Engine,
    /// Every output, in order.
    pub(crate) log: Vec<Output>,
    /// Event time used for commands that do not name one.
    pub(crate) at: String,
    seq: u64,
    next_cmd: u64,
    pools: Vec<String>,
}

impl Sim {
    pub(crate) fn new(shards: usize) -> Sim {
        Sim::with_config(config(shards))
    }

    pub(crate) fn with_config(config: EngineConfig) -> Sim {
        Sim {
            engine: Engine::new(config),
            log: Vec::new(),
            at: SETUP_AT.to_owned(),
            seq: 0,
            next_cmd: 0,
            pools: Vec::new(),
        }
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// One raw command line, parsed by `parse_command`; returns its result
    /// and the outputs it produced.
    pub(crate) fn line(&mut self, line: &str) -> (CommandResult, Vec<Output>) {
        let command = parse_command(line.as_bytes())
            .unwrap_or_else(|e| panic!("command does not parse: {e:?}\n{line}"));
        if let flowcap_engine::CommandKind::CreatePool { pool } = &command.kind {
            self.pools.push(pool.id.to_string());
        }
        let seq = self.next_seq();
        let mut out = Vec::new();
        self.engine.process_command(command, seq, &mut out);
        self.log.extend(out.iter().cloned());
        let result = out
            .iter()
            .find_map(|o| match o {
                Output::Journal(j) => Some(j.result.clone()),
                _ => None,
            })
            .expect("every command is journaled");
        (result, out)
    }

    /// A command of `ty` with the fields of `body`; `id` and `at` are filled
    /// in unless `body` names them.
    pub(crate) fn cmd_out(&mut self, ty: &str, body: Value) -> (CommandResult, Vec<Output>) {
        self.next_cmd += 1;
        let mut command =
            json!({"id": format!("cmd-{}", self.next_cmd), "type": ty, "at": self.at});
        let Value::Object(fields) = body else {
            panic!("command body must be an object");
        };
        command.as_object_mut().expect("object").extend(fields);
        self.line(&command.to_string())
    }

    pub(crate) fn cmd(&mut self, ty: &str, body: Value) -> CommandResult {
        self.cmd_out(ty, body).0
    }

    /// A command that must succeed.
    pub(crate) fn ok(&mut self, ty: &str, body: Value) -> Vec<Output> {
        let (result, out) = self.cmd_out(ty, body.clone());
        assert!(result.ok, "{ty} {body} failed: {result:?}");
        out
    }

    /// A command that must fail as a whole with `code`.
    pub(crate) fn fails(&mut self, ty: &str, body: Value, code: ErrorCode) -> CommandError {
        let result = self.cmd(ty, body.clone());
        assert!(!result.ok, "{ty} {body} should fail with {code:?}");
        let error = result
            .error
            .unwrap_or_else(|| panic!("{ty} {body}: no whole-command error: {:?}", result.results));
        assert_eq!(error.code, code, "{ty} {body}: {}", error.message);
        error
    }

    /// A batch command whose only card must fail with `code`.
    pub(crate) fn card_fails(&mut self, ty: &str, body: Value, code: ErrorCode) {
        let result = self.cmd(ty, body.clone());
        assert!(!result.ok, "{ty} {body} should fail with {code:?}");
        assert!(result.error.is_none(), "{result:?}");
        assert_eq!(result.results.len(), 1, "{result:?}");
        let error = result.results[0].error.as_ref().expect("card error");
        assert_eq!(error.code, code, "{ty} {body}: {}", error.message);
    }

    /// One usage record of card `n`: `bytes` split over up- and downlink.
    pub(crate) fn rec(&mut self, n: u32, record_id: &str, end: &str, bytes: u64) -> Vec<Output> {
        self.rec_usage(&usage(n, record_id, end, bytes))
    }

    pub(crate) fn rec_usage(&mut self, usage: &Usage) -> Vec<Output> {
        self.rec_from(Lane(0), usage)
    }

    /// A record read from input `lane` (a Kafka partition).
    pub(crate) fn rec_from(&mut self, lane: Lane, usage: &Usage) -> Vec<Output> {
        let seq = self.next_seq();
        let mut out = Vec::new();
        self.engine
            .process_usage_from(lane, usage, None, seq, &mut out)
            .expect("in-memory dedupe never fails");
        self.log.extend(out.iter().cloned());
        out
    }

    /// Input lane `lane` is read to its end and silent.
    pub(crate) fn lane_idle(&mut self, lane: Lane) -> Vec<Output> {
        let seq = self.next_seq();
        let mut out = Vec::new();
        self.engine.lane_idle(lane, seq, &mut out);
        self.log.extend(out.iter().cloned());
        out
    }

    /// Moves the event clock (as an idle pipeline does) and sets the
    /// default command time.
    pub(crate) fn tick(&mut self, at: &str) -> Vec<Output> {
        let mut out = Vec::new();
        self.engine.advance_clock(ts(at), &mut out);
        self.log.extend(out.iter().cloned());
        self.at = at.to_owned();
        out
    }

    pub(crate) fn view(&self, n: u32) -> CardView {
        self.engine
            .card_view(ic(n))
            .unwrap_or_else(|| panic!("card {n} unknown"))
    }

    pub(crate) fn state(&self, n: u32) -> (String, Vec<String>) {
        let v = self.view(n);
        (
            v.state.to_string(),
            v.reasons.iter().map(|r| r.to_string()).collect(),
        )
    }

    pub(crate) fn pool(&self, id: &str) -> PoolView {
        self.engine
            .pool_view(&PoolId::from(id))
            .unwrap_or_else(|| panic!("pool {id} unknown"))
    }

    // ----- standard setup -------------------------------------------------

    /// Plans used throughout the tests (all 12-month terms).
    pub(crate) fn setup(&mut self) {
        for (id, carrier, allowance, traffic) in [
            ("cmcc-30m", "cmcc", 30, "directed"),
            ("cmcc-50m", "cmcc", 50, "directed"),
            ("cmcc-gen", "cmcc", 1024, "general"),
            ("ctcc-30m", "ctcc", 30, "directed"),
            ("cucc-30m", "cucc", 30, "directed"),
            ("tri-30m", "tri", 30, "directed"),
        ] {
            self.ok(
                "upsert_plan",
                json!({"plan": {"id": id, "name": id, "carrier": carrier,
                    "allowance_mb": allowance, "traffic": traffic, "term_months": 12}}),
            );
        }
    }

    /// Card `n` on `plan` in `state` (plus extra card fields).
    pub(crate) fn card_with(&mut self, n: u32, plan: &str, state: &str, extra: Value) {
        let carrier = plan.split('-').next().expect("plan id starts with carrier");
        let mut card =
            json!({"iccid": iccid_text(n), "carrier": carrier, "plan": plan, "state": state});
        if state == "active" || state == "suspended" {
            card["activated_at"] = json!("2026-01-05T00:00:00+08:00");
            card["expires_at"] = json!("2027-01-05T00:00:00+08:00");
        }
        let Value::Object(fields) = extra else {
            panic!("extra card fields must be an object");
        };
        card.as_object_mut().expect("object").extend(fields);
        self.ok("upsert_card", json!({ "card": card }));
    }

    /// An active card `n` on `plan` (activated 2026-01-05, expires 2027-01-05).
    pub(crate) fn active(&mut self, n: u32, plan: &str) {
        self.card_with(n, plan, "active", json!({}));
    }

    pub(crate) fn forward_pool(&mut self, id: &str, plan: &str, members: &[u32]) {
        let carrier = plan.split('-').next().expect("carrier");
        self.ok(
            "create_pool",
            json!({"pool": {"id": id, "kind": "forward", "name": id, "carrier": carrier, "plan": plan}}),
        );
        if !members.is_empty() {
            self.ok(
                "add_pool_members",
                json!({"pool": id, "iccids": iccids(members)}),
            );
        }
    }

    pub(crate) fn backward_pool(&mut self, id: &str, carrier: &str, members: &[u32]) {
        self.ok(
            "create_pool",
            json!({"pool": {"id": id, "kind": "backward", "name": id, "carrier": carrier}}),
        );
        if !members.is_empty() {
            self.ok(
                "add_pool_members",
                json!({"pool": id, "iccids": iccids(members)}),
            );
        }
    }

    pub(crate) fn pool_ids(&self) -> Vec<String> {
        self.pools.clone()
    }
}

/// ICCID strings of cards.
pub(crate) fn iccids(cards: &[u32]) -> Vec<String> {
    cards.iter().map(|&n| iccid_text(n)).collect()
}

/// A usage record of card `n`.
pub(crate) fn usage(n: u32, record_id: &str, end: &str, bytes: u64) -> Usage {
    let end = ts(end);
    Usage {
        record_id: RecordId::new(record_id).expect("record id"),
        iccid: ic(n),
        start: Some(end.plus_millis(-300_000)),
        end,
        bytes_up: bytes / 3,
        bytes_down: bytes - bytes / 3,
        carrier: None,
        imei: None,
    }
}

// ----- output inspection ----------------------------------------------------

pub(crate) fn card_events(out: &[Output]) -> Vec<CardStateEvent> {
    out.iter()
        .filter_map(|o| match o {
            Output::Action(ActionEvent::CardState(e)) => Some(e.clone()),
            _ => None,
        })
        .collect()
}

pub(crate) fn pool_events(out: &[Output]) -> Vec<PoolStateEvent> {
    out.iter()
        .filter_map(|o| match o {
            Output::Action(ActionEvent::PoolState(e)) => Some(e.clone()),
            _ => None,
        })
        .collect()
}

/// The only card event of card `n` in `out`.
pub(crate) fn event_of(out: &[Output], n: u32) -> CardStateEvent {
    let events: Vec<_> = card_events(out)
        .into_iter()
        .filter(|e| e.iccid == ic(n))
        .collect();
    assert_eq!(events.len(), 1, "card {n}: {events:#?}");
    events.into_iter().next().expect("one")
}

pub(crate) fn no_event_of(out: &[Output], n: u32) {
    let events: Vec<_> = card_events(out)
        .into_iter()
        .filter(|e| e.iccid == ic(n))
        .collect();
    assert!(events.is_empty(), "card {n}: unexpected {events:#?}");
}

/// Reason names of an event.
pub(crate) fn reasons(e: &CardStateEvent) -> Vec<String> {
    e.reasons.iter().map(|r| r.to_string()).collect()
}

pub(crate) fn states(e: &CardStateEvent) -> (String, String) {
    (e.old.to_string(), e.new.to_string())
}

pub(crate) fn record_cause(n: u32, record_id: &str) -> Cause {
    Cause::Record {
        iccid: ic(n),
        record_id: RecordId::new(record_id).expect("record id"),
    }
}

pub(crate) fn accounted(out: &[Output]) -> Vec<flowcap_engine::event::Accounted> {
    out.iter()
        .filter_map(|o| match o {
            Output::Accounted(a) => Some(*a),
            _ => None,
        })
        .collect()
}

/// Runs `scenario` on a fresh engine (standard plans set up) with one shard
/// and with three, and checks that both reach the same card and pool views
/// and emitted the same outputs (order across shards aside).
pub(crate) fn scenario(f: impl Fn(&mut Sim)) {
    scenario_with(|_| {}, f);
}

/// [`scenario`] with a configuration changed by `tweak`.
pub(crate) fn scenario_with(tweak: impl Fn(&mut EngineConfig), f: impl Fn(&mut Sim)) {
    let run = |shards: usize| {
        let mut config = config(shards);
        tweak(&mut config);
        let mut sim = Sim::with_config(config);
        sim.setup();
        f(&mut sim);
        sim
    };
    let one = run(1);
    let three = run(3);
    assert_eq!(
        one.engine.card_views(),
        three.engine.card_views(),
        "card views differ between 1 and 3 shards"
    );
    for id in one.pool_ids() {
        assert_eq!(one.pool(&id), three.pool(&id), "pool {id} differs");
    }
    let sorted = |log: &[Output]| {
        let mut lines: Vec<String> = log
            .iter()
            .map(|o| serde_json::to_string(o).expect("outputs serialize"))
            .collect();
        lines.sort();
        lines
    };
    assert_eq!(
        sorted(&one.log),
        sorted(&three.log),
        "outputs differ between 1 and 3 shards"
    );
}
