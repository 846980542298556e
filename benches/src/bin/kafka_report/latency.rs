//! Phase 2, latency: produce -> action at a paced rate with flowcap
//! running live, and the broker alone at the same rate (what any consumer
//! of this broker sees before flowcap adds anything).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use flowcap_benches::progress;
use flowcap_engine::{RecordId, Timestamp, Usage};
use flowcap_loadgen::{Workload, WorkloadConfig};
use hdrhistogram::Histogram;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::Producer;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};

use crate::broker::{
    produce_commands, start_broker, valid_record, Sender, ACTIONS, FLOWCAP_CONSUMER, USAGE,
};
use crate::child::{run_to_idle, Flowcap};
use crate::probes::snapshots_so_far;
use crate::{wall_ms, wall_us, xorshift, yes, Args, Report};

/// 500 GiB: above any default plan (2 GiB) and any forward pool (100
/// members x 2 GiB + add-on), below the decoder's 1 TiB per field.
const HUGE_BYTES: u64 = 500 << 30;

pub(crate) fn latency(
    args: &Args,
    bin: &Path,
    work: &Path,
    rate: f64,
    report: &mut Report,
) -> Result<()> {
    eprintln!("== latency: produce -> action at {rate:.0} records/s");
    let broker = start_broker(args.partitions)?;
    // Event times near now: setup at now - 3 h, records end at their send time.
    let start = Timestamp((wall_ms() - 3 * 3_600_000) / 1000 * 1000);
    let workload = Workload::new(WorkloadConfig {
        cards: args.latency_cards,
        start,
        duration_hours: 1,
        records_per_card_per_hour: 1.0,
        ..WorkloadConfig::default()
    })?;
    produce_commands(&broker, &workload)?;
    let dir = work.join("latency");
    run_to_idle(bin, &broker, &dir, "bench-lat", args, "applying setup")?;

    let mut fc = Flowcap::spawn(bin, &broker, &dir, "bench-lat", args, &[])?;
    fc.wait_for("consuming", Duration::from_secs(120))?;

    // Actions consumer: (record counter, action timestamp ms, received us).
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<(u64, i64, i64)>>> = Arc::default();
    let actions_total = Arc::new(AtomicU64::new(0));
    let reader = {
        let (stop, seen, total) = (stop.clone(), seen.clone(), actions_total.clone());
        let config = broker.client_config();
        thread::spawn(move || read_actions(config, &stop, &seen, &total))
    };

    let n = workload.card_count();
    let huge_every = (1.0 / args.latency_huge_share.clamp(1e-6, 1.0)).round() as u64;
    let stride = [1_000_003u64, 999_983, 7919]
        .into_iter()
        .find(|p| n % p != 0)
        .unwrap_or(1);
    let expected = (rate * args.latency_secs as f64) as usize + 1024;
    let mut sent_us: Vec<i64> = Vec::with_capacity(expected);
    let mut sent_ms: Vec<i64> = Vec::with_capacity(expected);
    let mut sender = Sender::new(&broker, USAGE, args.latency_linger_ms)?;
    let snapshots_before = snapshots_so_far(&fc.metrics);
    let bar = progress(Some(rate as u64 * args.latency_secs), "paced records");
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut huge = 0u64;
    let mut message = Vec::new();
    let began = Instant::now();
    let length = Duration::from_secs(args.latency_secs);
    let mut k = 0u64;
    while began.elapsed() < length {
        let due = (rate * began.elapsed().as_secs_f64()) as u64;
        while k < due {
            let (card, bytes) = if k % huge_every == huge_every - 1 {
                huge += 1;
                ((huge * stride) % n, HUGE_BYTES)
            } else {
                rng = xorshift(rng);
                (rng % n, 1024 + (rng >> 40) % 65_536)
            };
            let now_us = wall_us();
            let now_ms = now_us / 1000;
            let iccid = workload.iccid(card).context("card index")?;
            let usage = Usage {
                record_id: RecordId::new(&format!("lat-{k}")).context("record id")?,
                iccid,
                start: Some(Timestamp(now_ms - 300_000)),
                end: Timestamp(now_ms),
                bytes_up: bytes / 8,
                bytes_down: bytes - bytes / 8,
                carrier: workload.carrier(card),
                imei: None,
            };
            args.encoding.write(&valid_record(usage, k), &mut message);
            sender.send(Some(iccid.to_string().as_bytes()), &message, Some(now_ms))?;
            sent_us.push(now_us);
            sent_ms.push(now_ms);
            k += 1;
        }
        sender.poll();
        bar.set_position(k);
        thread::sleep(Duration::from_micros(200));
    }
    let paced_secs = began.elapsed().as_secs_f64();
    sender.flush()?;
    bar.finish_and_clear();
    let achieved = k as f64 / paced_secs;
    eprintln!("sent {k} records ({huge} huge) in {paced_secs:.1} s: {achieved:.0}/s");
    // Wait for the actions to settle (nothing new for 3 s).
    let mut last = (usize::MAX, Instant::now());
    loop {
        let len = seen.lock().map_or(0, |s| s.len());
        if len != last.0 {
            last = (len, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(3) {
            break;
        }
        thread::sleep(Duration::from_millis(100));
        if fc.exited()? {
            bail!(
                "flowcap exited during the latency phase:\n{}",
                fc.log_tail()
            );
        }
    }
    stop.store(true, Ordering::SeqCst);
    reader
        .join()
        .map_err(|_| anyhow!("actions reader panicked"))??;
    // Snapshot barriers hold every record that arrives meanwhile: they are
    // where the latency's tail comes from.
    let snapshots_after = snapshots_so_far(&fc.metrics);
    let snapshots = snapshots_after.0 - snapshots_before.0;
    let snapshot_secs = snapshots_after.1 - snapshots_before.1;
    let snapshot_pause_secs = snapshots_after.2 - snapshots_before.2;
    eprintln!(
        "{snapshots:.0} snapshots during the paced phase: {snapshot_secs:.2} s from cut to durable, inputs held {snapshot_pause_secs:.3} s"
    );
    fc.terminate()?;
    let fin = fc.wait("stopping (SIGTERM)")?;
    if !fin.status.success() {
        bail!("flowcap failed: {}\n{}", fin.status, fin.log_tail());
    }

    // One sample per causing record (a pool's crossing cuts every member
    // with the same cause: the first action of a cause is its latency).
    let warmup_us =
        sent_us.first().copied().unwrap_or(0) + args.latency_warmup_secs as i64 * 1_000_000;
    let mut by_cause: HashMap<u64, (i64, i64)> = HashMap::new();
    let seen = std::mem::take(&mut *seen.lock().map_err(|_| anyhow!("poisoned"))?);
    for &(k, ts_ms, recv_us) in &seen {
        let e = by_cause.entry(k).or_insert((ts_ms, recv_us));
        e.0 = e.0.min(ts_ms);
        e.1 = e.1.min(recv_us);
    }
    let mut at_action: Histogram<u64> = Histogram::new(3)?;
    let mut observed: Histogram<u64> = Histogram::new(3)?;
    let (mut negative, mut warm) = (0u64, 0u64);
    // Per second of the phase: is latency flat or does a backlog build up?
    let mut per_second = PerSecond::new(sent_us.first().copied().unwrap_or(0));
    for (&k, &(ts_ms, recv_us)) in &by_cause {
        let Some(&send_us) = sent_us.get(k as usize) else {
            continue;
        };
        if send_us < warmup_us {
            warm += 1;
            continue;
        }
        let ms = ts_ms - sent_ms[k as usize];
        if ms < 0 {
            negative += 1;
        }
        at_action.record((ms.max(0) * 1000) as u64)?;
        observed.record((recv_us - send_us).max(0) as u64)?;
        per_second.record(send_us, (ms.max(0) * 1000) as u64)?;
    }
    let per_second = per_second.summary();
    eprintln!("per second of the phase [samples, p50 ms, p99 ms]: {per_second:?}");
    let q = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let p50_p99_p999 = |h: &Histogram<u64>| {
        format!(
            "{:.1} / {:.1} / {:.1} ms",
            q(h, 0.5),
            q(h, 0.99),
            q(h, 0.999)
        )
    };
    let samples = at_action.len();
    eprintln!(
        "{} card_state actions from paced records ({} causes, {} in warm-up dropped, {} negative clamped), {} actions in all",
        seen.len(),
        by_cause.len(),
        warm,
        negative,
        actions_total.load(Ordering::Relaxed)
    );
    let cdf = |h: &Histogram<u64>| -> Vec<[f64; 2]> {
        h.iter_quantiles(4)
            .map(|v| {
                [
                    v.value_iterated_to() as f64 / 1000.0,
                    v.quantile_iterated_to(),
                ]
            })
            .collect()
    };
    report.line(
        "latency",
        "summary",
        json!({"rate_target": rate, "rate_achieved": achieved, "records": k, "huge": huge,
               "cards": n, "samples": samples, "warmup_dropped": warm,
               "actions": actions_total.load(Ordering::Relaxed),
               "p50_ms": q(&at_action, 0.5), "p99_ms": q(&at_action, 0.99),
               "p999_ms": q(&at_action, 0.999), "max_ms": at_action.max() as f64 / 1000.0,
               "observed_p50_ms": q(&observed, 0.5), "observed_p99_ms": q(&observed, 0.99),
               "observed_p999_ms": q(&observed, 0.999),
               "observed_max_ms": observed.max() as f64 / 1000.0,
               "per_second": per_second,
               "snapshots": snapshots, "snapshot_secs": snapshot_secs,
               "snapshot_pause_secs": snapshot_pause_secs,
               "cdf": cdf(&at_action), "observed_cdf": cdf(&observed)}),
    )?;
    report.row(
        format!("paced rate (target {rate:.0}/s)"),
        format!("{achieved:.0} records/s ({samples} samples)"),
        "",
        "",
    );
    report.row(
        format!("latency produce -> action message at {achieved:.0}/s, p50 / p99 / p99.9"),
        p50_p99_p999(&at_action),
        "p99 <= 10 ms",
        yes(samples > 0 && q(&at_action, 0.99) <= 10.0),
    );
    report.row(
        format!("snapshots during the paced phase at {achieved:.0}/s: cut to durable; inputs held by the cut"),
        format!("{snapshots:.0}: {snapshot_secs:.2} s; {snapshot_pause_secs:.3} s"),
        "",
        "",
    );
    report.row(
        format!("latency produce -> action received by a consumer at {achieved:.0}/s, p50 / p99 / p99.9"),
        p50_p99_p999(&observed),
        "",
        "",
    );
    Ok(())
}

/// Latency samples by the second of the paced phase they were sent in:
/// shows whether latency stays flat or a backlog builds up.
struct PerSecond {
    start_us: i64,
    seconds: Vec<Histogram<u64>>,
}

impl PerSecond {
    fn new(start_us: i64) -> PerSecond {
        PerSecond {
            start_us,
            seconds: Vec::new(),
        }
    }

    fn record(&mut self, sent_us: i64, latency_us: u64) -> Result<()> {
        let second = ((sent_us - self.start_us).max(0) / 1_000_000) as usize;
        while self.seconds.len() <= second {
            self.seconds.push(Histogram::new(3)?);
        }
        self.seconds[second].record(latency_us)?;
        Ok(())
    }

    /// `[samples, p50 ms, p99 ms]` per second.
    fn summary(&self) -> Vec<[f64; 3]> {
        self.seconds
            .iter()
            .map(|h| {
                [
                    h.len() as f64,
                    h.value_at_quantile(0.5) as f64 / 1000.0,
                    h.value_at_quantile(0.99) as f64 / 1000.0,
                ]
            })
            .collect()
    }
}

/// The broker alone: the same paced production, read back by a plain
/// consumer with flowcap's settings; latency = receive - send. What any
/// consumer of this broker sees before flowcap adds anything.
pub(crate) fn broker_latency(args: &Args, rate: f64, report: &mut Report) -> Result<()> {
    eprintln!("== broker latency: produce -> plain consumer at {rate:.0} records/s");
    let broker = start_broker(args.partitions)?;
    let stop = Arc::new(AtomicBool::new(false));
    let received: Arc<Mutex<Vec<(u64, i64)>>> = Arc::default();
    let reader = {
        let (stop, received) = (stop.clone(), received.clone());
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", broker.bootstrap());
        for (k, v) in FLOWCAP_CONSUMER {
            config.set(*k, *v);
        }
        config.set("group.id", "bench-broker-latency");
        let partitions = args.partitions;
        thread::spawn(move || -> Result<()> {
            let consumer: BaseConsumer = config.create()?;
            let mut tpl = TopicPartitionList::new();
            for p in 0..partitions {
                tpl.add_partition_offset(USAGE, p, Offset::Beginning)?;
            }
            consumer.assign(&tpl)?;
            while !stop.load(Ordering::SeqCst) {
                if let Some(m) = consumer.poll(Duration::from_millis(50)) {
                    let m = m?;
                    let now = wall_us();
                    let k = std::str::from_utf8(m.key().unwrap_or_default())
                        .ok()
                        .and_then(|k| k.parse::<u64>().ok());
                    if let (Some(k), Ok(mut r)) = (k, received.lock()) {
                        r.push((k, now));
                    }
                }
            }
            Ok(())
        })
    };
    thread::sleep(Duration::from_secs(1));
    let mut sender = Sender::new(&broker, USAGE, args.latency_linger_ms)?;
    let filler = "x".repeat(380);
    let mut sent_us = Vec::new();
    let began = Instant::now();
    let length = Duration::from_secs(args.latency_secs);
    let mut k = 0u64;
    while began.elapsed() < length {
        let due = (rate * began.elapsed().as_secs_f64()) as u64;
        while k < due {
            let now = wall_us();
            sender.send(
                Some(k.to_string().as_bytes()),
                filler.as_bytes(),
                Some(now / 1000),
            )?;
            sent_us.push(now);
            k += 1;
        }
        sender.poll();
        thread::sleep(Duration::from_micros(200));
    }
    sender.flush()?;
    let acks = sender.producer.context();
    eprintln!(
        "producer: mean ack {:.1} ms, max {} ms",
        acks.ack_ms_sum.load(Ordering::Relaxed) as f64 / k.max(1) as f64,
        acks.ack_ms_max.load(Ordering::Relaxed)
    );
    thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    reader.join().map_err(|_| anyhow!("reader panicked"))??;
    let warmup =
        sent_us.first().copied().unwrap_or(0) + args.latency_warmup_secs as i64 * 1_000_000;
    let mut h: Histogram<u64> = Histogram::new(3)?;
    let mut per_second = PerSecond::new(sent_us.first().copied().unwrap_or(0));
    let received = received.lock().map_err(|_| anyhow!("poisoned"))?;
    for &(k, recv) in received.iter() {
        if let Some(&send) = sent_us.get(k as usize) {
            if send >= warmup {
                let us = (recv - send).max(0) as u64;
                h.record(us)?;
                per_second.record(send, us)?;
            }
        }
    }
    let per_second = per_second.summary();
    eprintln!("broker alone per second of the phase [samples, p50 ms, p99 ms]: {per_second:?}");
    let q = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    eprintln!(
        "broker alone: {} of {k} received; p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms",
        received.len(),
        q(0.5),
        q(0.99),
        q(0.999),
        h.max() as f64 / 1000.0
    );
    report.line(
        "broker_latency",
        "summary",
        json!({"rate": rate, "sent": k, "received": received.len(), "samples": h.len(),
               "p50_ms": q(0.5), "p99_ms": q(0.99), "p999_ms": q(0.999),
               "max_ms": h.max() as f64 / 1000.0, "per_second": per_second,
               "cdf": h.iter_quantiles(4)
                   .map(|v| [v.value_iterated_to() as f64 / 1000.0, v.quantile_iterated_to()])
                   .collect::<Vec<_>>()}),
    )?;
    report.row(
        format!("latency produce -> plain consumer (broker alone, {rate:.0}/s), p50 / p99 / p99.9"),
        format!("{:.1} / {:.1} / {:.1} ms", q(0.5), q(0.99), q(0.999)),
        "",
        "",
    );
    Ok(())
}

/// Reads the actions topic until `stop`: every `card_state` action caused
/// by a paced record (`lat-K`) as (K, message timestamp, receive time us).
fn read_actions(
    mut config: ClientConfig,
    stop: &AtomicBool,
    seen: &Mutex<Vec<(u64, i64, i64)>>,
    total: &AtomicU64,
) -> Result<()> {
    config
        .set("group.id", "bench-actions")
        .set("enable.auto.commit", "false");
    let consumer: BaseConsumer = config.create()?;
    let metadata = consumer.fetch_metadata(Some(ACTIONS), Duration::from_secs(10))?;
    let partitions = metadata
        .topics()
        .first()
        .map_or(0, |t| t.partitions().len());
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(ACTIONS, p as i32, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    while !stop.load(Ordering::SeqCst) {
        let Some(message) = consumer.poll(Duration::from_millis(50)) else {
            continue;
        };
        let message = message?;
        let recv_us = wall_us();
        total.fetch_add(1, Ordering::Relaxed);
        let Ok(event) = serde_json::from_slice::<Value>(message.payload().unwrap_or_default())
        else {
            continue;
        };
        if event["kind"] != "card_state" || event["cause"]["type"] != "record" {
            continue;
        }
        let Some(k) = event["cause"]["record_id"]
            .as_str()
            .and_then(|id| id.strip_prefix("lat-"))
            .and_then(|k| k.parse::<u64>().ok())
        else {
            continue;
        };
        let ts = message.timestamp().to_millis().unwrap_or(0);
        seen.lock()
            .map_err(|_| anyhow!("poisoned"))?
            .push((k, ts, recv_us));
    }
    Ok(())
}
