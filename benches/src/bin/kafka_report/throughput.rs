//! Phase 1, throughput: the raw consume rate of the usage topic (the
//! baseline) against flowcap end to end over the same messages, and the
//! first repetition's history checked for exactness and overshoot.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use flowcap_benches::{check_history, median, progress};
use flowcap_loadgen::{Workload, WorkloadConfig};
use flowcap_testkit::Broker;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;

use crate::broker::{
    average_record_len, produce_commands, produce_workload_records, start_broker, FLOWCAP_CONSUMER,
    USAGE,
};
use crate::child::{run_to_idle, run_to_idle_with};
use crate::probes::{broker_pid, cpu_ticks};
use crate::{copy_dir, secs, yes, Args, Report};

pub(crate) fn throughput(args: &Args, bin: &Path, work: &Path, report: &mut Report) -> Result<f64> {
    eprintln!("== throughput: raw consume vs flowcap end to end");
    let broker = start_broker(args.partitions)?;
    let workload = Workload::new(WorkloadConfig {
        cards: args.cards,
        duration_hours: args.hours,
        records_per_card_per_hour: args.per_card_hour,
        ..WorkloadConfig::default()
    })?;
    let commands = produce_commands(&broker, &workload)?;
    let template = work.join("throughput-template");
    let setup = run_to_idle(
        bin,
        &broker,
        &template,
        "bench-setup",
        args,
        "applying setup",
    )?;
    eprintln!(
        "setup: {commands} commands applied in {:.1} s",
        setup.total.as_secs_f64()
    );
    let records = produce_workload_records(&broker, &workload, args.encoding)?;
    report.line(
        "throughput",
        "workload",
        json!({"cards": args.cards, "records": records, "commands": commands,
               "partitions": args.partitions, "encoding": args.encoding.name(),
               "record_bytes_mean": average_record_len(&workload, args.encoding)}),
    )?;

    let mut raw_rates = Vec::new();
    let mut fc_rates = Vec::new();
    let (mut raw_cpu, mut fc_cpu) = (Vec::new(), Vec::new());
    let (mut nh_rates, mut nh_cpu) = (Vec::new(), Vec::new());
    for rep in 0..args.repeats {
        let raw = raw_consume(&broker, args.partitions, records, rep)?;
        if raw.records != records {
            eprintln!(
                "warning: raw consumer read {} of {records} records",
                raw.records
            );
        }
        // Rate from the first message to the last: the consumer's start-up
        // (metadata, offsets, first fetch) is excluded, as for flowcap.
        let raw_rate = raw.records as f64 / raw.first_to_last.as_secs_f64();
        let raw_rate_assign = raw.records as f64 / raw.assign_to_last.as_secs_f64();
        let secs_window = raw.first_to_last.as_secs_f64();
        eprintln!(
            "rep {rep}: raw consume {} records, {raw_rate:.0}/s first message to last ({raw_rate_assign:.0}/s from assign); CPU: consumer {:.2} cores ({:.0} records per CPU-s), broker {:.2} cores",
            raw.records,
            raw.cpu / secs_window,
            raw.records as f64 / raw.cpu.max(0.01),
            raw.broker_cpu / secs_window,
        );
        report.line(
            "throughput",
            "raw_consume",
            json!({"rep": rep, "records": raw.records, "bytes": raw.bytes,
                   "secs": raw.first_to_last.as_secs_f64(),
                   "secs_from_assign": raw.assign_to_last.as_secs_f64(),
                   "cpu_secs": raw.cpu, "broker_cpu_secs": raw.broker_cpu,
                   "records_per_cpu_sec": raw.records as f64 / raw.cpu.max(0.01),
                   "rate": raw_rate, "rate_from_assign": raw_rate_assign}),
        )?;
        raw_cpu.push(raw.records as f64 / raw.cpu.max(0.01));
        raw_rates.push(raw_rate);

        // The first repetition's history is checked against the
        // generator's expectation (exactness, overshoot of every cut).
        let (rate, per_cpu) = flowcap_rep(
            args,
            bin,
            &broker,
            &template,
            work,
            rep,
            records,
            &[],
            (rep == 0).then_some(&workload),
            report,
        )?;
        fc_rates.push(rate);
        fc_cpu.push(per_cpu);
        if args.also_no_history {
            let (rate, per_cpu) = flowcap_rep(
                args,
                bin,
                &broker,
                &template,
                work,
                rep,
                records,
                &["--no-history"],
                None,
                report,
            )?;
            nh_rates.push(rate);
            nh_cpu.push(per_cpu);
        }
    }
    let raw = median(&raw_rates);
    let fc = median(&fc_rates);
    let ratio = fc / raw;
    report.line(
        "throughput",
        "summary",
        json!({"raw_median": raw, "flowcap_median": fc, "ratio": ratio,
               "raw_rates": raw_rates, "flowcap_rates": fc_rates, "records": records,
               "raw_per_cpu_sec": raw_cpu, "flowcap_per_cpu_sec": fc_cpu,
               "raw_per_cpu_sec_median": median(&raw_cpu),
               "no_history_rates": nh_rates, "no_history_per_cpu_sec": nh_cpu,
               "flowcap_per_cpu_sec_median": median(&fc_cpu)}),
    )?;
    report.row(
        format!(
            "raw rdkafka consume, {} partitions (median of {})",
            args.partitions, args.repeats
        ),
        format!("{:.0} records/s", raw),
        "",
        "",
    );
    report.row(
        "flowcap end to end (median)",
        format!("{:.0} records/s", fc),
        ">= 300,000/s",
        yes(fc >= 300_000.0),
    );
    report.row(
        "ratio flowcap / raw",
        format!("{ratio:.2}"),
        ">= 0.8",
        yes(ratio >= 0.8),
    );
    if !nh_rates.is_empty() {
        report.row(
            "flowcap end to end with --no-history (median)",
            format!(
                "{:.0} records/s, {:.0} per CPU-s",
                median(&nh_rates),
                median(&nh_cpu)
            ),
            "",
            "",
        );
    }
    report.row(
        "records per CPU-second: raw consumer process / flowcap process (medians)",
        format!("{:.0} / {:.0}", median(&raw_cpu), median(&fc_cpu)),
        "",
        "",
    );
    Ok(fc)
}

/// One flowcap run over the whole usage topic from a copy of the template
/// data directory: (records/s first message to last accounted, records per
/// CPU-second of the flowcap process).
#[allow(clippy::too_many_arguments)]
fn flowcap_rep(
    args: &Args,
    bin: &Path,
    broker: &Broker,
    template: &Path,
    work: &Path,
    rep: usize,
    records: u64,
    extra: &[&str],
    check: Option<&Workload>,
    report: &mut Report,
) -> Result<(f64, f64)> {
    let label = if extra.is_empty() {
        "flowcap"
    } else {
        "flowcap_no_history"
    };
    let dir = work.join(format!("throughput-{rep}-{label}"));
    copy_dir(template, &dir)?;
    let group = format!("bench-tp-{rep}-{}", extra.len());
    let run = run_to_idle_with(
        bin,
        broker,
        &dir,
        &group,
        args,
        &format!("{label} rep {rep}"),
        extra,
    )?;
    let inputs = run.summary["inputs"].as_u64().unwrap_or(0);
    if inputs != records {
        eprintln!("warning: flowcap consumed {inputs} of {records} records");
    }
    let consuming = run
        .at("consuming")
        .context("flowcap did not log `consuming`")?;
    let stopping = run
        .at("Stopping")
        .context("flowcap did not log its Stopping status")?;
    // Primary: first message taken (order log) to last record accounted
    // (the metrics count) before the Stopping status. Cross-check: from the
    // `consuming` line to Stopping less the idle wait (this one ends at
    // the last message *taken*, not accounted, and starts before the
    // first fetch arrived).
    let (first, last) = run
        .processing_window(stopping)
        .context("no order log / history growth seen")?;
    let processing = last.at.saturating_sub(first.at);
    let rate = inputs as f64 / processing.as_secs_f64();
    let cpu = (last.cpu - first.cpu) as f64 / 100.0;
    let broker_cpu = (last.broker_cpu - first.broker_cpu) as f64 / 100.0;
    let by_log = stopping
        .saturating_sub(consuming)
        .saturating_sub(secs(args.idle_secs));
    let rate_by_log = inputs as f64 / by_log.as_secs_f64();
    eprintln!(
            "rep {rep}: {label} {inputs} inputs, {rate:.0}/s (first message to last accounted {:.2} s; by log lines {rate_by_log:.0}/s; startup to first message {:.2} s, final snapshot + exit {:.2} s); CPU: flowcap {:.2} cores ({:.0} records per CPU-s), broker {:.2} cores; peak RSS {:.0} MiB",
            processing.as_secs_f64(),
            first.at.as_secs_f64(),
            run.total.saturating_sub(stopping).as_secs_f64(),
            cpu / processing.as_secs_f64(),
            inputs as f64 / cpu.max(0.01),
            broker_cpu / processing.as_secs_f64(),
            run.peak_rss_kb as f64 / 1024.0,
        );
    let compactor = run
        .thread_cpu
        .get("flowcap-compact")
        .copied()
        .unwrap_or(0.0);
    eprintln!(
        "rep {rep}: CPU-s by thread: {}; history compactor {compactor:.2} CPU-s ({:.3} per 1M records)",
        run.thread_cpu
            .iter()
            .filter(|(_, secs)| **secs >= 0.1)
            .map(|(name, secs)| format!("{name} {secs:.1}"))
            .collect::<Vec<_>>()
            .join(", "),
        compactor * 1e6 / (inputs.max(1) as f64),
    );
    report.line(
        "throughput",
        label,
        json!({"rep": rep, "inputs": inputs,
                   "processing_secs": processing.as_secs_f64(),
                   "first_message_secs": first.at.as_secs_f64(),
                   "last_accounted_secs": last.at.as_secs_f64(),
                   "consuming_logged_secs": consuming.as_secs_f64(),
                   "stopping_logged_secs": stopping.as_secs_f64(),
                   "rate_by_log_lines": rate_by_log,
                   "cpu_secs": cpu, "broker_cpu_secs": broker_cpu,
                   "records_per_cpu_sec": inputs as f64 / cpu.max(0.01),
                   "standing_by_logged_secs": run.at("standing by").map(|d| d.as_secs_f64()),
                   "lease_acquired_logged_secs": run.at("lease acquired").map(|d| d.as_secs_f64()),
                   "shutdown_secs": run.total.saturating_sub(stopping).as_secs_f64(),
                   "wall_secs": run.total.as_secs_f64(),
                   "idle_secs": args.idle_secs,
                   "rate": rate,
                   "peak_rss_mib": run.peak_rss_kb as f64 / 1024.0,
                   "thread_cpu_secs": run.thread_cpu,
                   "timeline": run.timeline(first.at, last.at, inputs),
                   // (seconds since the first message, MiB); from the spawn
                   // to the exit, so negative times are the start-up.
                   "rss_timeline": run.rss.iter().map(|(at, kb)| {
                       json!([at.as_secs_f64() - first.at.as_secs_f64(), *kb as f64 / 1024.0])
                   }).collect::<Vec<_>>(),
                   "summary": run.summary}),
    )?;
    // The whole backlog is in the topic before flowcap starts: it consumes
    // as fast as it can, the burst case of bounded memory.
    report.row(
        format!("{label} peak RSS, rep {rep} ({inputs} records backlogged)"),
        format!("{:.0} MiB", run.peak_rss_kb as f64 / 1024.0),
        "",
        "",
    );
    // Records judged late (their cycle closed by the event clock): the
    // workload's own late records, plus those of partitions consumed
    // behind the others (the clock is the latest `end` over all of them;
    // DECISIONS, *Kafka*).
    let late = run.summary["late"].as_u64().unwrap_or(0);
    report.row(
        format!("{label} records classified late, rep {rep}"),
        format!(
            "{late} of {inputs} ({:.1} %)",
            late as f64 * 100.0 / inputs.max(1) as f64
        ),
        "",
        "",
    );
    if let Some(workload) = check {
        check_run(&dir, workload, report)?;
    }
    fs::remove_dir_all(&dir).ok();
    Ok((rate, inputs as f64 / cpu.max(0.01)))
}

/// Exactness and overshoot of one run, from its history (report rows and a
/// JSON line).
fn check_run(dir: &Path, workload: &Workload, report: &mut Report) -> Result<()> {
    let bar = progress(None, "checking the history: exactness, overshoot");
    bar.enable_steady_tick(Duration::from_millis(200));
    let check = check_history(&dir.join("history"), &workload.expected())?;
    bar.finish_and_clear();
    eprintln!("history check: {check:?}");
    report.line("throughput", "check", serde_json::to_value(&check)?)?;
    report.row(
        "exactness: card cycle totals in the history vs the generator's expectation",
        format!(
            "{} of {} (card, cycle) differ{}",
            check.mismatched,
            check.cards_cycles_checked,
            check
                .first_mismatch
                .as_ref()
                .map_or(String::new(), |m| format!(" (first: {m})"))
        ),
        "0",
        yes(check.mismatched == 0),
    );
    report.row(
        format!(
            "overshoot: records accounted after the limit and before the cut, {} card cuts",
            check.cuts
        ),
        format!(
            "{} (most in one cut: {}; cuts without their record: {})",
            check.overshoot_records, check.max_overshoot_records, check.cuts_without_cause
        ),
        "0",
        yes(check.overshoot_records == 0 && check.cuts_without_cause == 0),
    );
    report.row(
        "overshoot bytes: the crossing record's bytes above the limit (mean / max per cut)",
        format!(
            "{:.0} / {} bytes",
            check.overshoot_bytes as f64 / check.cuts.max(1) as f64,
            check.max_overshoot_bytes
        ),
        "",
        "",
    );
    Ok(())
}

struct RawResult {
    records: u64,
    bytes: u64,
    /// CPU seconds of this process and of the broker, first message to last.
    cpu: f64,
    broker_cpu: f64,
    assign_to_last: Duration,
    first_to_last: Duration,
}

/// Reads every usage partition from the beginning with flowcap's consumer
/// settings, touching each payload, until `expect` messages or 5 s idle.
fn raw_consume(broker: &Broker, partitions: i32, expect: u64, rep: usize) -> Result<RawResult> {
    let broker_pid = broker_pid(broker);
    let own = std::process::id();
    let ticks = || {
        (
            cpu_ticks(own).unwrap_or(0),
            broker_pid.and_then(cpu_ticks).unwrap_or(0),
        )
    };
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", broker.bootstrap());
    for (k, v) in FLOWCAP_CONSUMER {
        config.set(*k, *v);
    }
    config.set("group.id", format!("bench-raw-{rep}"));
    let consumer: BaseConsumer = config.create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(USAGE, p, Offset::Beginning)?;
    }
    let assigned = Instant::now();
    consumer.assign(&tpl)?;
    let (mut records, mut bytes, mut check) = (0u64, 0u64, 0u8);
    let mut first = None;
    let mut cpu_first = (0, 0);
    let mut last = assigned;
    while records < expect && last.elapsed() < Duration::from_secs(5) {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let payload = m.payload().unwrap_or_default();
                bytes += payload.len() as u64;
                check ^= payload.last().copied().unwrap_or(0);
                records += 1;
                last = Instant::now();
                if first.is_none() {
                    first = Some(last);
                    cpu_first = ticks();
                }
            }
            Some(Err(e)) => eprintln!("raw consumer: {e}"),
            None => {}
        }
    }
    std::hint::black_box(check);
    let cpu_last = ticks();
    let first = first.context("the raw consumer read nothing")?;
    Ok(RawResult {
        records,
        bytes,
        cpu: (cpu_last.0 - cpu_first.0) as f64 / 100.0,
        broker_cpu: (cpu_last.1 - cpu_first.1) as f64 / 100.0,
        assign_to_last: last - assigned,
        first_to_last: last - first,
    })
}
