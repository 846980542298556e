//! Phase 3, recovery after `kill -9`: the time from a restart to the
//! first record processed and to consuming again, per card count and
//! consumer variant.

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use flowcap_engine::{Iccid, RecordId, Timestamp, Usage};
use flowcap_loadgen::{Workload, WorkloadConfig};
use flowcap_testkit::Broker;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;

use crate::broker::{
    produce_commands, produce_workload_records, start_broker, valid_record, Encoding, Sender, DLQ,
    USAGE,
};
use crate::child::{run_to_idle, Flowcap};
use crate::{human, newest_snapshot_len, secs, wall_ms, xorshift, Args, Report};

pub(crate) fn recovery(
    args: &Args,
    bin: &Path,
    work: &Path,
    cards: u64,
    report: &mut Report,
) -> Result<()> {
    eprintln!("== recovery after kill -9 with {cards} cards");
    let broker = start_broker(args.partitions)?;
    let per_card_hour = args.recovery_records as f64 / cards as f64;
    let workload = Workload::new(WorkloadConfig {
        cards,
        duration_hours: 1,
        records_per_card_per_hour: per_card_hour,
        ..WorkloadConfig::default()
    })?;
    let began = Instant::now();
    let commands = produce_commands(&broker, &workload)?;
    let produce_commands_secs = began.elapsed().as_secs_f64();
    let dir = work.join(format!("recovery-{cards}"));
    let group = format!("bench-rec-{cards}");
    // Commands first (records of cards not yet created would be rejected),
    // then the records.
    let setup = run_to_idle(bin, &broker, &dir, &group, args, "applying setup")?;
    eprintln!(
        "{commands} commands produced in {produce_commands_secs:.1} s, applied by flowcap in {:.1} s",
        setup.total.as_secs_f64()
    );
    let records = produce_workload_records(&broker, &workload, args.encoding)?;
    let accounted = run_to_idle(bin, &broker, &dir, &group, args, "accounting records")?;
    let snapshot_bytes = newest_snapshot_len(&dir);
    eprintln!(
        "{records} records accounted in {:.1} s; snapshot {:.0} MiB",
        accounted.total.as_secs_f64(),
        snapshot_bytes as f64 / (1 << 20) as f64
    );
    report.line(
        "recovery",
        "setup",
        json!({"cards": cards, "commands": commands, "records": records,
               "produce_commands_secs": produce_commands_secs,
               "apply_commands_secs": setup.total.as_secs_f64(),
               "account_records_secs": accounted.total.as_secs_f64(),
               "snapshot_bytes": snapshot_bytes,
               "setup_summary": setup.summary, "records_summary": accounted.summary}),
    )?;

    let end = workload.config().start.plus_millis(3_600_000);
    let mut next_record = 0u64;
    for variant in &args.recovery_variants {
        let extra: Vec<String> = match variant.as_str() {
            "default" => Vec::new(),
            "session3s" => vec!["-X".into(), "session.timeout.ms=3000".into()],
            "static" => vec!["-X".into(), format!("group.instance.id={group}-1")],
            other => bail!("unknown recovery variant {other:?} (default, session3s, static)"),
        };
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        // Live again (from the last graceful snapshot), fed, killed.
        let mut fc = Flowcap::spawn(bin, &broker, &dir, &group, args, &extra)?;
        let restart1 = fc.wait_for("consuming", Duration::from_secs(1800))?;
        produce_backlog(
            &broker,
            &workload,
            end,
            next_record,
            next_record + args.recovery_backlog,
            args.encoding,
        )?;
        next_record += args.recovery_backlog;
        thread::sleep(secs(args.recovery_kill_after));
        fc.kill9()?;
        eprintln!(
            "[{variant}] start from the graceful snapshot: consuming after {:.2} s; kill -9 after {:.1} s of feeding",
            restart1.as_secs_f64(),
            args.recovery_kill_after
        );
        produce_backlog(
            &broker,
            &workload,
            end,
            next_record,
            next_record + args.recovery_backlog,
            args.encoding,
        )?;
        next_record += args.recovery_backlog;

        // The restart being measured, in the same group (the dead
        // instance's member still holds the lease until the broker expires
        // its session).
        let same = measured_restart(bin, &broker, &dir, &group, args, &extra)?;
        let record = |report: &mut Report, how: &str, r: &Restart| -> Result<()> {
            let s = |d: Option<f64>| d.map_or("-".to_owned(), |s| format!("{s:.2} s"));
            eprintln!(
                "[{variant}, {how}] restart after kill -9: {}",
                match r.consuming {
                    Some(c) => format!(
                        "first record processed (first dead letter) after {}, consuming after {c:.2} s; lease acquired {}, snapshot restored {}, replay started {}",
                        s(r.first_output), s(r.lease), s(r.restored), s(r.replaying)
                    ),
                    None => format!("no lease within {:.0} s", args.recovery_timeout_secs),
                }
            );
            report.line(
                "recovery",
                "kill9",
                json!({"cards": cards, "variant": variant, "group": how,
                       "snapshot_bytes": snapshot_bytes,
                       "start_from_graceful_consuming_secs": restart1.as_secs_f64(),
                       "timeout_secs": args.recovery_timeout_secs,
                       "to_first_output_secs": r.first_output,
                       "to_consuming_secs": r.consuming,
                       "lease_acquired_secs": r.lease,
                       "restored_secs": r.restored,
                       "replay_started_secs": r.replaying,
                       "log": r.log}),
            )?;
            let what = format!("{} cards, {variant}, {how}", human(cards));
            match r.consuming {
                Some(c) => {
                    report.row(
                        format!("kill -9 -> first record processed, {what}"),
                        s(r.first_output),
                        "",
                        "",
                    );
                    report.row(
                        format!("kill -9 -> replay done, consuming, {what}"),
                        format!(
                            "{c:.2} s (lease {}, restore done {})",
                            s(r.lease),
                            s(r.restored)
                        ),
                        "",
                        "",
                    );
                }
                None => report.row(
                    format!("kill -9 -> consuming, {what}"),
                    format!("no lease within {:.0} s", args.recovery_timeout_secs),
                    "",
                    "",
                ),
            }
            Ok(())
        };
        record(report, "same group", &same)?;
        if same.consuming.is_none() {
            // Evidence for the report, then flowcap's own recovery time
            // without the broker's group coordinator in the way.
            let saved = args
                .out
                .with_file_name(format!("kafka_report-broker-{cards}-{variant}.log"));
            let _ = fs::copy(broker.dir().join("broker.log"), &saved);
            eprintln!("broker log copied to {}", saved.display());
            let fresh = format!("{group}-{variant}-fresh");
            let r = measured_restart(bin, &broker, &dir, &fresh, args, &extra)?;
            record(report, "new group", &r)?;
        }
    }
    Ok(())
}

/// Milestones of a restart, seconds since spawn.
struct Restart {
    first_output: Option<f64>,
    consuming: Option<f64>,
    lease: Option<f64>,
    restored: Option<f64>,
    replaying: Option<f64>,
    log: Vec<String>,
}

/// Starts flowcap on `dir`, waits for `consuming` (up to
/// `--recovery-timeout-secs`), lets it work 3 s, stops it with SIGTERM (a
/// graceful snapshot for what follows). On a timeout the process is
/// killed (-9) and `consuming` is `None`. The first record processed is the
/// first dead letter produced after the spawn.
fn measured_restart(
    bin: &Path,
    broker: &Broker,
    dir: &Path,
    group: &str,
    args: &Args,
    extra: &[&str],
) -> Result<Restart> {
    let dlq = DlqWatch::start(broker)?;
    let spawned_ms = wall_ms();
    let mut fc = Flowcap::spawn(bin, broker, dir, group, args, extra)?;
    if let Err(e) = fc.wait_for("consuming", secs(args.recovery_timeout_secs)) {
        eprintln!("restart did not get back to consuming: {e:#}");
        fc.kill9()?;
        dlq.stop();
        return Ok(Restart {
            first_output: None,
            consuming: None,
            lease: fc.at("lease acquired").map(|d| d.as_secs_f64()),
            restored: None,
            replaying: None,
            log: fc.lines_with_times(),
        });
    }
    let first_output_ms = dlq.first_at_or_after(spawned_ms, Duration::from_secs(120));
    thread::sleep(Duration::from_secs(3));
    fc.terminate()?;
    let fin = fc.wait("stopping (SIGTERM)")?;
    dlq.stop();
    if !fin.status.success() {
        eprintln!(
            "warning: flowcap exited {}:\n{}",
            fin.status,
            fin.log_tail()
        );
    }
    let f = |needle: &str| fin.at(needle).map(|d| d.as_secs_f64());
    Ok(Restart {
        first_output: first_output_ms.map(|ms| (ms - spawned_ms) as f64 / 1000.0),
        consuming: f("consuming"),
        lease: f("lease acquired"),
        restored: f("resuming from snapshot"),
        replaying: f("replaying the logged input order"),
        log: fin
            .lines
            .iter()
            .map(|(t, l)| format!("{:.3} {l}", t.as_secs_f64()))
            .collect(),
    })
}

/// Records `from..to` of the recovery backlog: fresh ids, `end` and message
/// timestamp at the workload's end, uniform cards; every 100th is for an
/// unknown card (a dead letter: a visible sign of processing).
fn produce_backlog(
    broker: &Broker,
    workload: &Workload,
    end: Timestamp,
    from: u64,
    to: u64,
    encoding: Encoding,
) -> Result<()> {
    let mut sender = Sender::new(broker, USAGE, 5)?;
    let mut rng = 0x2545_f491_4f6c_dd1du64 ^ from;
    let mut message = Vec::new();
    let n = workload.card_count();
    for k in from..to {
        rng = xorshift(rng);
        let (iccid, carrier) = if k % 100 == 99 {
            (Iccid::parse(&format!("898699{k:014}"))?, None)
        } else {
            let card = rng % n;
            (
                workload.iccid(card).context("card")?,
                workload.carrier(card),
            )
        };
        let usage = Usage {
            record_id: RecordId::new(&format!("rec-{k}")).context("record id")?,
            iccid,
            start: Some(end.plus_millis(-300_000)),
            end,
            bytes_up: 1000 + rng % 10_000,
            bytes_down: 1000 + (rng >> 20) % 100_000,
            carrier,
            imei: None,
        };
        encoding.write(&valid_record(usage, k), &mut message);
        sender.send(
            Some(iccid.to_string().as_bytes()),
            &message,
            Some(end.millis()),
        )?;
    }
    sender.flush()?;
    Ok(())
}

/// Watches the dead-letter topic for the first message produced at or after
/// a given time (its `CreateTime`, set by flowcap's producer).
struct DlqWatch {
    stop: Arc<AtomicBool>,
    /// Every message timestamp seen, in arrival order.
    stamps: Arc<Mutex<Vec<i64>>>,
    thread: Option<JoinHandle<()>>,
}

impl DlqWatch {
    fn start(broker: &Broker) -> Result<DlqWatch> {
        let mut config = broker.client_config();
        config
            .set("group.id", "bench-dlq")
            .set("enable.auto.commit", "false");
        let consumer: BaseConsumer = config.create()?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(DLQ, 0, Offset::Beginning)?;
        consumer.assign(&tpl)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stamps: Arc<Mutex<Vec<i64>>> = Arc::default();
        let thread = {
            let (stop, stamps) = (stop.clone(), stamps.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if let Some(Ok(m)) = consumer.poll(Duration::from_millis(20)) {
                        if let (Some(ts), Ok(mut s)) = (m.timestamp().to_millis(), stamps.lock()) {
                            s.push(ts);
                        }
                    }
                }
            })
        };
        Ok(DlqWatch {
            stop,
            stamps,
            thread: Some(thread),
        })
    }

    /// The earliest timestamp >= `since_ms`, waiting up to `timeout`.
    fn first_at_or_after(&self, since_ms: i64, timeout: Duration) -> Option<i64> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self
                .stamps
                .lock()
                .ok()
                .and_then(|s| s.iter().copied().filter(|&t| t >= since_ms).min());
            if found.is_some() || Instant::now() >= deadline {
                return found;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
