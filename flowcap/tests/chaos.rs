//! The chaos suite (issue #23): flowcap through Kafka at the scale of the
//! goals, under kill -9, broker restarts, duplicate and malformed storms, a
//! 10x burst and a dead webhook endpoint. Minutes to hours: every test is
//! ignored, so the default `cargo test` runs only the smaller versions of
//! the same properties (`tests/kafka.rs`, `tests/notify.rs`). Run:
//!
//! ```sh
//! cargo test --release --workspace --locked --test chaos -- --ignored --nocapture --test-threads 1
//! ```
//!
//! `chaos_suite` runs every scenario and writes `target/chaos/report.md`
//! with a plot per scenario; each `chaos_<scenario>` test runs one and
//! writes `report-<scenario>.md`. Progress is printed every 10 s.
//!
//! Every scenario ends with the same checks (`kit::check`): each card's
//! total per cycle summed from the Parquet history equals the generator's
//! independent expectation; no (card, record id) twice in the history;
//! every card cut of an uninterrupted reference run of the same workload
//! (the embedded pipeline) is present; the actions topic holds exactly the
//! final decisions; the dead letters on the topic equal the generator's
//! bad records (`CHAOS_ASSERT_DLQ=0` only reports them).
//!
//! Scale (environment; defaults are the issue's):
//! - `CHAOS_RECORDS` (10,000,000) and `CHAOS_KILLS` (20): the kill -9 loop;
//! - `CHAOS_SCENARIO_RECORDS` (a tenth of `CHAOS_RECORDS`, at least
//!   100,000): the other scenarios;
//! - `CHAOS_BROKER_RESTARTS` (5), `CHAOS_STORM_KILLS` (5),
//!   `CHAOS_WEBHOOK_KILLS` (3);
//! - `CHAOS_BURST_RATE` (5,000 records/s before and after the burst, ten
//!   times that during it) and `CHAOS_BURST_SECS` (30: each steady phase;
//!   the burst lasts half of it);
//! - `CHAOS_ASSERT_RSS=1` makes the burst's resident-set bound a check
//!   (reported otherwise: see docs/RELIABILITY.md);
//! - `CHAOS_SEED` repeats a run's kill points; `CHAOS_KEEP=1` keeps the
//!   data directories; `CHAOS_REPORT_DIR` moves the report.

mod common;
#[path = "support/chaos_kit.rs"]
mod kit;
#[path = "support/process.rs"]
mod process;
#[path = "support/chaos_report.rs"]
mod report;

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use flowcap_loadgen::WorkloadConfig;
use flowcap_testkit::{Broker, Storage};
use kit::{env_u64, Monitor};
use report::Outcome;

#[test]
#[ignore = "chaos suite: minutes to hours, see the module doc"]
fn chaos_suite() {
    type Scenario = (&'static str, &'static str, fn(&mut Outcome));
    let scenarios: [Scenario; 5] = [
        ("kill_9_loop", "kill -9 loop", kill_9_loop),
        ("broker_restarts", "broker restarts", broker_restarts),
        (
            "storm_during_kills",
            "30 % duplicates and 10 % malformed during kills",
            storm_during_kills,
        ),
        ("burst", "10x burst, resident set bounded", burst),
        ("dead_webhook", "dead webhook endpoint", dead_webhook),
    ];
    let mut outcomes = Vec::new();
    for (name, title, scenario) in scenarios {
        outcomes.push(run(name, title, scenario));
        // After each scenario: a long run stopped early keeps its figures.
        report::write(&outcomes, "report.md");
    }
    conclude(&outcomes, "report.md");
}

#[test]
#[ignore = "chaos suite"]
fn chaos_kill_9_loop() {
    let o = run("kill_9_loop", "kill -9 loop", kill_9_loop);
    conclude(&[o], "report-kill_9_loop.md");
}

#[test]
#[ignore = "chaos suite"]
fn chaos_broker_restarts() {
    let o = run("broker_restarts", "broker restarts", broker_restarts);
    conclude(&[o], "report-broker_restarts.md");
}

#[test]
#[ignore = "chaos suite"]
fn chaos_storm_during_kills() {
    let o = run(
        "storm_during_kills",
        "30 % duplicates and 10 % malformed during kills",
        storm_during_kills,
    );
    conclude(&[o], "report-storm_during_kills.md");
}

#[test]
#[ignore = "chaos suite"]
fn chaos_burst() {
    let o = run("burst", "10x burst, resident set bounded", burst);
    conclude(&[o], "report-burst.md");
}

#[test]
#[ignore = "chaos suite"]
fn chaos_dead_webhook() {
    let o = run("dead_webhook", "dead webhook endpoint", dead_webhook);
    conclude(&[o], "report-dead_webhook.md");
}

/// Runs one scenario; a panic ends it early and is reported, not raised,
/// so the suite goes on and the report is written.
fn run(name: &'static str, title: &'static str, scenario: fn(&mut Outcome)) -> Outcome {
    eprintln!("=== {title}");
    let mut outcome = Outcome {
        name,
        title,
        ..Outcome::default()
    };
    let started = Instant::now();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scenario(&mut outcome)));
    outcome.seconds = started.elapsed().as_secs_f64();
    if let Err(panic) = result {
        let text = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "panic".into());
        outcome.error = Some(kit::tail(&text, 3000).to_owned());
    }
    eprintln!(
        "=== {title}: {:.0} s, {}",
        outcome.seconds,
        match outcome.failures().len() {
            0 => "passed".to_owned(),
            n => format!("{n} failures"),
        }
    );
    outcome
}

fn conclude(outcomes: &[Outcome], file: &str) {
    report::write(outcomes, file);
    let failures: Vec<String> = outcomes
        .iter()
        .flat_map(|o| {
            o.failures()
                .into_iter()
                .map(move |f| format!("{}: {f}", o.title))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn scenario_records() -> u64 {
    env_u64(
        "CHAOS_SCENARIO_RECORDS",
        (env_u64("CHAOS_RECORDS", 10_000_000) / 10).max(100_000),
    )
}

/// A scenario's broker, data directory and workload, its set-up commands
/// applied by a first run.
struct Setup {
    broker: Broker,
    work: tempfile::TempDir,
    dir: PathBuf,
    config: PathBuf,
    w: flowcap_loadgen::Workload,
}

impl Setup {
    fn new(
        storage: Storage,
        partitions: i32,
        records: u64,
        tweak: impl FnOnce(&mut WorkloadConfig),
        extra_commands: &[serde_json::Value],
        config: &str,
    ) -> Setup {
        let broker = kit::broker(storage, partitions);
        let mut work = tempfile::tempdir().unwrap();
        if kit::env_flag("CHAOS_KEEP") {
            work.disable_cleanup(true);
            eprintln!("keeping {}", work.path().display());
        }
        let dir = work.path().join("kafka");
        let config_path = work.path().join("flowcap.toml");
        std::fs::write(&config_path, config).unwrap();
        let w = kit::workload(records, tweak);
        kit::produce_commands(&broker, &w, extra_commands);
        let log = work.path().join("flowcap-setup.log");
        let mut child = kit::spawn_flowcap(
            &broker,
            &dir,
            &config_path,
            &log,
            &["--exit-when-idle", "2"],
        );
        let summary = kit::finish(&mut child, &log, Duration::from_secs(600));
        assert_eq!(summary["summary"]["commands_failed"], 0, "{summary}");
        Setup {
            broker,
            work,
            dir,
            config: config_path,
            w,
        }
    }

    fn log(&self, name: &str) -> PathBuf {
        self.work.path().join(format!("flowcap-{name}.log"))
    }

    fn spawn(&self, log: &Path, extra: &[&str]) -> Child {
        kit::spawn_flowcap(&self.broker, &self.dir, &self.config, log, extra)
    }

    /// The last run: to the end of the input, then idle for 5 s.
    fn final_run(&self, monitor: &Monitor, snapshot_every: u64) -> serde_json::Value {
        let log = self.log("final");
        let every = snapshot_every.to_string();
        let mut child = self.spawn(&log, &["--exit-when-idle", "5", "--snapshot-every", &every]);
        monitor.watch(&child, &log);
        monitor.mark("final run");
        let summary = kit::finish(&mut child, &log, Duration::from_secs(4 * 3600));
        monitor.mark("final run done");
        summary
    }
}

/// Snapshot interval of a kill loop: about three snapshots between two
/// kill points, so kills replay from different snapshots.
fn snapshot_every(records: u64, kills: u64) -> u64 {
    (records / (kills + 1) / 3).max(5_000)
}

/// What a kill scenario runs: its scale, the encoding of each record
/// (`binary(seq)`: the compact binary encoding instead of JSON), commands
/// besides the workload's set-up, and flowcap's configuration file.
struct Kills<'a> {
    records: u64,
    kills: u64,
    binary: &'a dyn Fn(u64) -> bool,
    commands: &'a [serde_json::Value],
    config: &'a str,
}

/// A kill loop over a Kafka backlog on the broker's durable storage, then
/// a last run to the end, then the checks; `after` adds scenario checks.
fn kill_scenario(
    o: &mut Outcome,
    k: Kills<'_>,
    tweak: impl FnOnce(&mut WorkloadConfig),
    after: impl FnOnce(&Setup, &mut kit::Checks),
) {
    let Kills {
        records,
        kills,
        binary,
        commands: extra_commands,
        config,
    } = k;
    let partitions = kit::partitions_for(records);
    o.scale = vec![
        ("records".into(), records.to_string()),
        ("kills (SIGKILL)".into(), kills.to_string()),
        ("usage partitions".into(), partitions.to_string()),
    ];
    let s = Setup::new(
        Storage::Sqlite,
        partitions,
        records,
        tweak,
        extra_commands,
        config,
    );
    let reference = kit::reference_cuts(s.work.path(), &s.w);
    kit::produce_all(&s.broker, &s.w, o.name, binary);
    let mut seed = kit::kill_seed(o.name);
    let every = snapshot_every(records, kills);
    let monitor = Monitor::start(o.name, &s.dir, records);
    // The kills spread over the inputs after the set-up run's (its commands
    // count as inputs, and it may have left no snapshot past them), all of
    // them: duplicates and malformed ones too.
    let setup_commands = (s.w.setup_commands().count() + extra_commands.len()) as u64;
    let base = kit::newest_snapshot(&s.dir)
        .unwrap_or(0)
        .max(setup_commands);
    let inputs = s.w.total_records();
    let done = kit::kill_loop(
        &s.broker,
        &s.dir,
        &s.config,
        s.work.path(),
        &monitor,
        (base, inputs),
        kills,
        every,
        &mut seed,
    );
    let killed_at: Vec<String> = done
        .iter()
        .map(|k| {
            format!(
                "{} / {}{}",
                k.position.unwrap_or(0),
                k.snapshot.unwrap_or(0),
                if k.in_replay { " (replay)" } else { "" }
            )
        })
        .collect();
    o.notes.push(format!(
        "Kill points (input position / newest snapshot at each kill; a snapshot every \
         {every} inputs; `CHAOS_SEED` as printed): {}. Killed processes ran {:.0} s on \
         average.",
        killed_at.join(", "),
        done.iter().map(|k| k.ran_secs).sum::<f64>() / done.len().max(1) as f64
    ));
    let summary = s.final_run(&monitor, every);
    o.timeline = monitor.finish();
    let mut checks = kit::check(&s.broker, &s.dir, &s.w, &reference);
    let aimed: Vec<u64> = done
        .iter()
        .filter(|k| !k.in_replay)
        .filter_map(|k| k.position)
        .collect();
    checks.extra.push((
        "kills spread over the input (the last past its middle)".into(),
        aimed.len() < 2 || aimed.last().is_some_and(|l| *l >= base + inputs / 2),
        format!("positions {aimed:?} after {base}, of {inputs} inputs"),
    ));
    checks.extra.push((
        "last run resumed from a snapshot".into(),
        summary["summary"]["resumed_after_seq"].is_u64(),
        format!("after input {}", summary["summary"]["resumed_after_seq"]),
    ));
    after(&s, &mut checks);
    o.checks = Some(checks);
}

/// Kill -9 twenty times over ten million records through Kafka (5 %
/// duplicates, 1 % malformed, 1 % unknown cards).
fn kill_9_loop(o: &mut Outcome) {
    let records = env_u64("CHAOS_RECORDS", 10_000_000);
    let kills = env_u64("CHAOS_KILLS", 20);
    kill_scenario(
        o,
        Kills {
            records,
            kills,
            binary: &|_| false,
            commands: &[],
            config: "",
        },
        |c| {
            c.seed = 17;
            c.duplicate_pct = 5.0;
            c.malformed_pct = 1.0;
            c.unknown_card_pct = 1.0;
        },
        |_, _| {},
    );
}

/// 30 % duplicates and 10 % malformed records, half of the messages in the
/// binary encoding (a resend may come in the other encoding), under kills.
fn storm_during_kills(o: &mut Outcome) {
    let records = scenario_records();
    let kills = env_u64("CHAOS_STORM_KILLS", 5);
    kill_scenario(
        o,
        Kills {
            records,
            kills,
            binary: &|seq| seq % 2 == 1,
            commands: &[],
            config: "",
        },
        |c| {
            c.seed = 13;
            c.duplicate_pct = 30.0;
            c.malformed_pct = 10.0;
        },
        |_, _| {},
    );
}

/// A rule whose webhook endpoint accepts connections and never answers,
/// under kills: accounting goes on, every firing ends in a `push_failed`
/// alert, each rule execution is in the history once.
fn dead_webhook(o: &mut Outcome) {
    let records = scenario_records();
    let kills = env_u64("CHAOS_WEBHOOK_KILLS", 3);
    // A black hole: connections are accepted and held, nothing is answered.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", hole.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in hole.incoming() {
            held.push(stream);
        }
    });
    let at = "2026-11-26T12:00:00+08:00";
    let commands = [
        serde_json::json!({"id": "chaos-hook", "type": "upsert_webhook", "at": at,
            "webhook": {"id": "dead", "url": url}}),
        serde_json::json!({"id": "chaos-rule", "type": "upsert_rule", "at": at,
            "rule": {"id": "used30", "type": 2, "condition": {"used_mb_gte": 30},
                     "actions": [{"type": "webhook", "endpoint": "dead", "merge": true}]}}),
    ];
    let config = "[notify]\nmax_attempts = 2\nbackoff_initial_ms = 100\nbackoff_max_ms = 200\n\
                  request_timeout_ms = 1000\nmerge_interval_ms = 500\ndrain_timeout_ms = 120000\n";
    kill_scenario(
        o,
        Kills {
            records,
            kills,
            binary: &|_| false,
            commands: &commands,
            config,
        },
        |c| c.seed = 29,
        |s, checks| {
            let events = kit::jsonl(&s.dir.join("events.jsonl"));
            let fired: std::collections::BTreeSet<String> = events
                .iter()
                .filter(|e| e["kind"] == "rule_fired")
                .filter_map(|e| e["id"].as_str().map(str::to_owned))
                .collect();
            let failed: std::collections::BTreeSet<String> =
                kit::jsonl(&s.dir.join("alerts.jsonl"))
                    .iter()
                    .filter(|e| e["kind"] == "push_failed")
                    .flat_map(|e| e["firings"].as_array().cloned().unwrap_or_default())
                    .filter_map(|f| f.as_str().map(str::to_owned))
                    .collect();
            let unaccounted = fired.difference(&failed).count();
            checks.extra.push((
                "rule firings (used >= 30 MB)".into(),
                !fired.is_empty(),
                fired.len().to_string(),
            ));
            checks.extra.push((
                "firings not ended in a push_failed alert".into(),
                unaccounted == 0,
                format!("{unaccounted} of {}", fired.len()),
            ));
            let rows = common::sql_rows(
                &s.dir,
                "SELECT COUNT(*) AS n, COUNT(DISTINCT firing_id) AS firings FROM rule_executions",
            );
            let (n, distinct) = (rows[0]["n"].as_u64(), rows[0]["firings"].as_u64());
            checks.extra.push((
                "rule executions in the history, once per firing".into(),
                n == distinct && distinct == Some(fired.len() as u64),
                format!("{n:?} rows, {distinct:?} firings"),
            ));
        },
    );
}

/// Five broker restarts (SIGKILL of the broker, durable storage) while
/// flowcap consumes; records keep arriving between them.
fn broker_restarts(o: &mut Outcome) {
    let records = scenario_records();
    let restarts = env_u64("CHAOS_BROKER_RESTARTS", 5);
    let partitions = kit::partitions_for(records);
    o.scale = vec![
        ("records".into(), records.to_string()),
        ("broker restarts (SIGKILL)".into(), restarts.to_string()),
        ("usage partitions".into(), partitions.to_string()),
    ];
    let mut s = Setup::new(
        Storage::Sqlite,
        partitions,
        records,
        |c| c.seed = 19,
        &[],
        "",
    );
    let reference = kit::reference_cuts(s.work.path(), &s.w);
    let mut seed = kit::kill_seed(o.name);
    let chunk = records.div_ceil(restarts + 1);
    let every = (chunk / 4).max(5_000);
    let base = kit::newest_snapshot(&s.dir).unwrap_or(0);
    let monitor = Monitor::start(o.name, &s.dir, records);
    let mut records_left = s.w.records();
    let mut produced = 0u64;
    produce_more(&s.broker, &mut records_left, chunk, &mut produced, &monitor);
    let every_arg = every.to_string();
    // Idle for 30 s: a broker being restarted is not the end of the input.
    let args = ["--exit-when-idle", "30", "--snapshot-every", &every_arg];
    let mut runs = 1;
    let mut log = s.log("run-1");
    let mut child = s.spawn(&log, &args);
    monitor.watch(&child, &log);
    let mut exits = Vec::new();
    for i in 0..restarts {
        // Flowcap is somewhere in the middle of what was produced so far.
        let target = base + i * chunk + random_within(&mut seed, chunk);
        loop {
            let exited = kit::wait_for(
                &mut child,
                &log,
                Duration::from_secs(3600),
                "progress to the broker restart",
                || kit::newest_snapshot(&s.dir).is_some_and(|n| n >= target),
            );
            let Some(status) = exited else { break };
            // It ran out of input (or failed): start it again.
            exits.push(status.to_string());
            runs += 1;
            log = s.log(&format!("run-{runs}"));
            child = s.spawn(&log, &args);
            monitor.watch(&child, &log);
        }
        s.broker.kill().unwrap();
        monitor.mark(format!("broker restart #{}", i + 1));
        std::thread::sleep(kit::jitter(&mut seed, 500, 3_000));
        s.broker.restart().unwrap();
        produce_more(&s.broker, &mut records_left, chunk, &mut produced, &monitor);
    }
    let summary = kit::finish(&mut child, &log, Duration::from_secs(4 * 3600));
    monitor.mark("run done");
    o.timeline = monitor.finish();
    let skipped = (1..=runs).any(|r| {
        std::fs::read_to_string(s.log(&format!("run-{r}")))
            .unwrap_or_default()
            .contains("offsets skipped")
    });
    let mut checks = kit::check(&s.broker, &s.dir, &s.w, &reference);
    checks.extra.push((
        "flowcap processes that failed".into(),
        exits.iter().all(|e| e.contains("exit status: 0")),
        format!(
            "{} exits before the end ({}), summary {}",
            exits.len(),
            exits.join(", "),
            summary["summary"]["inputs"]
        ),
    ));
    checks.extra.push((
        "input partitions that skipped offsets across a restart".into(),
        !skipped,
        if skipped { "some" } else { "none" }.into(),
    ));
    o.checks = Some(checks);
}

/// Produces the next `n` records (JSON), telling the monitor.
fn produce_more(
    broker: &Broker,
    records: &mut impl Iterator<Item = flowcap_loadgen::GeneratedRecord>,
    n: u64,
    produced: &mut u64,
    monitor: &Monitor,
) {
    let mut left = n;
    while left > 0 {
        let k = kit::produce_next(broker, records, left.min(50_000) as usize, &|_| false);
        if k == 0 {
            break;
        }
        left -= k as u64;
        *produced += k as u64;
        monitor.produced(*produced);
    }
}

/// A point in the middle half of `span`.
fn random_within(seed: &mut u64, span: u64) -> u64 {
    kit::random(seed, span / 4, (span * 3 / 4).max(span / 4 + 1))
}

/// Records arrive at a steady rate, then ten times as fast, then steady
/// again, while flowcap runs with small queues. The resident set during
/// the burst may exceed the steady phase after it (which has seen every
/// record of the burst: what grows with the input seen is in both) by at
/// most what the configured queues hold. Against the steady phase before
/// it the bound is reported (a check with `CHAOS_ASSERT_RSS=1`).
fn burst(o: &mut Outcome) {
    let rate = env_u64("CHAOS_BURST_RATE", 5_000);
    let secs = env_u64("CHAOS_BURST_SECS", 30);
    let burst_secs = (secs / 2).max(1);
    let records = rate * secs * 2 + rate * 10 * burst_secs;
    const PARTITIONS: i32 = 4;
    // The memory-bounding configuration: per-partition prefetch (count and
    // bytes), records queued in the shards before the partitions pause,
    // history rows buffered before a chunk is written.
    const PREFETCH_MESSAGES: u64 = 5_000;
    const PREFETCH_KBYTES: u64 = 4_096;
    const MAX_QUEUED: u64 = 16_384;
    const ROLL_ROWS: u64 = 65_536;
    let config = format!(
        "[kafka]\nmax_queued_records = {MAX_QUEUED}\n\
         [kafka.consumer]\n\"queued.min.messages\" = \"{PREFETCH_MESSAGES}\"\n\
         \"queued.max.messages.kbytes\" = \"{PREFETCH_KBYTES}\"\n"
    );
    o.scale = vec![
        ("records".into(), records.to_string()),
        (
            "records/s (steady, burst)".into(),
            format!("{rate}, {}", rate * 10),
        ),
        (
            "seconds (steady, burst, steady)".into(),
            format!("{secs}, {burst_secs}, {secs}"),
        ),
    ];
    // No kill here: the fast in-memory broker.
    let s = Setup::new(
        Storage::Memory,
        PARTITIONS,
        records,
        |c| c.seed = 37,
        &[],
        &config,
    );
    let reference = kit::reference_cuts(s.work.path(), &s.w);
    let monitor = Monitor::start(o.name, &s.dir, records);
    let log = s.log("burst");
    let roll = ROLL_ROWS.to_string();
    let mut child = s.spawn(
        &log,
        &["--exit-when-idle", "10", "--history-roll-rows", &roll],
    );
    monitor.watch(&child, &log);
    std::thread::sleep(Duration::from_secs(2));
    let mut left = s.w.records();
    let mut produced = 0u64;
    let mut phase = |what: &str, per_sec: u64, secs: u64, produced: &mut u64| -> (f64, u64) {
        monitor.mark(what.to_owned());
        let started = Instant::now();
        let tick = Duration::from_millis(100);
        let mut n = 0;
        for t in 1..=secs * 10 {
            let k = kit::produce_next(&s.broker, &mut left, (per_sec / 10) as usize, &|_| false);
            n += k as u64;
            *produced += k as u64;
            monitor.produced(*produced);
            if let Some(wait) = (tick * t as u32).checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        (started.elapsed().as_secs_f64(), n)
    };
    let steady1 = phase("steady", rate, secs, &mut produced);
    let burst_from = monitor.elapsed();
    let burst = phase("burst (10x)", rate * 10, burst_secs, &mut produced);
    let burst_to = monitor.elapsed();
    let steady2 = phase("steady again", rate, secs, &mut produced);
    let steady2_to = monitor.elapsed();
    let summary = kit::finish(&mut child, &log, Duration::from_secs(4 * 3600));
    monitor.mark("run done");
    let timeline = monitor.finish();
    let steady_peak = timeline.peak_rss_mib(0.0, burst_from).unwrap_or(0.0);
    let burst_peak = timeline.peak_rss_mib(burst_from, f64::MAX).unwrap_or(0.0);
    let during = timeline.peak_rss_mib(burst_from, burst_to).unwrap_or(0.0);
    // The second half of the steady phase after the burst: the process has
    // seen every record of the burst (what grows with the input seen is
    // in), and a backlog still draining would only raise it.
    let after = timeline
        .peak_rss_mib((burst_to + steady2_to) / 2.0, steady2_to)
        .unwrap_or(0.0);
    // What the configured queues may add: each partition's prefetch (its
    // byte bound, and librdkafka's per-message overhead of ~300 bytes on
    // its count bound), the shards' queue (~1 KiB a record in flight)
    // and the history rows buffered (~1 KiB a row, encoder included).
    let headroom_mib = (PARTITIONS as u64 * (PREFETCH_KBYTES * 1024 + PREFETCH_MESSAGES * 300)
        + MAX_QUEUED * 1024
        + ROLL_ROWS * 1024) as f64
        / 1_048_576.0;
    let bound = steady_peak + headroom_mib;
    o.timeline = timeline;
    let rate_of = |(secs, n): (f64, u64)| n as f64 / secs;
    o.notes.push(format!(
        "Produced {:.0} records/s steady, {:.0} during the burst ({:.1}x), {:.0} after; \
         flowcap read {} inputs. Queues: prefetch {PREFETCH_MESSAGES} messages / \
         {PREFETCH_KBYTES} KiB per partition ({PARTITIONS} partitions), \
         `max_queued_records` {MAX_QUEUED}, `--history-roll-rows` {ROLL_ROWS}.",
        rate_of(steady1),
        rate_of(burst),
        rate_of(burst) / rate_of(steady1).max(1.0),
        rate_of(steady2),
        summary["summary"]["inputs"]
    ));
    let mut checks = kit::check(&s.broker, &s.dir, &s.w, &reference);
    checks.extra.push((
        "peak resident set during the burst <= the steady phase after it + configured queues"
            .into(),
        during <= after + headroom_mib,
        format!(
            "{during:.0} MiB <= {after:.0} + {headroom_mib:.0} = {:.0} MiB",
            after + headroom_mib
        ),
    ));
    // Checked only on request: the resident set also grows with the input
    // seen (dedupe window, history, snapshots), which this bound leaves
    // out (docs/RELIABILITY.md).
    let what = "peak resident set from the burst on <= steady peak before it + configured queues";
    let figure =
        format!("{burst_peak:.0} MiB; bound {steady_peak:.0} + {headroom_mib:.0} = {bound:.0} MiB");
    if kit::env_flag("CHAOS_ASSERT_RSS") {
        checks
            .extra
            .push((what.into(), burst_peak <= bound, figure));
    } else {
        checks.measured.push((what.into(), figure));
    }
    o.checks = Some(checks);
}
