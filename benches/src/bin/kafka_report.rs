//! The Kafka pipeline benchmark (issue #4): throughput through a real
//! broker against the raw consume rate of the same topic, latency from
//! produce to action at half the maximum rate, and the time back to
//! processing after `kill -9`.
//!
//! ```text
//! cargo build --release -p flowcap -p flowcap-benches
//! ./target/release/kafka_report                                 # every phase, defaults
//! ./target/release/kafka_report --phases recovery --recovery-cards 1000000,10000000
//! ./target/release/kafka_report --plot-only --plot docs/img     # plots from target/kafka_report.jsonl
//! ```
//!
//! Why a separate binary and not a criterion bench: each measurement drives
//! the real `flowcap` release binary as a child process against a Tansu
//! broker (`flowcap-testkit`), the way it runs in production, and some
//! phases take minutes. Criterion's repeated timing loops do not fit.
//!
//! Phases (each on its own `memory://` broker, which is fast but whose high
//! watermarks count batches: nothing here counts messages by end offsets):
//!
//! 1. **throughput**: loadgen setup commands are produced and applied by one
//!    `flowcap run` (a template data directory); then the workload's records
//!    are produced (keyed by ICCID, timestamp = arrival). Each repetition
//!    reads the whole usage topic with a plain rdkafka consumer (flowcap's
//!    consumer settings, payloads touched, nothing else: the baseline), then
//!    runs flowcap on a copy of the template until idle. flowcap's rate is
//!    its summary's `inputs` over the time from the first message it took
//!    (its order log grows) to the last record accounted (its `/metrics`,
//!    polled every 5 ms): startup (connect, lease, restore) and the final
//!    snapshot are excluded and reported separately. The median of the
//!    repetitions is reported. Every 250 ms the process's resident set and
//!    each thread's CPU time are read from `/proc` (`rss_timeline`,
//!    `thread_cpu_secs`: where the CPU went, by thread name). The first repetition's history is then
//!    checked against the generator's expectation: every (card, cycle)
//!    total, and the overshoot of every cut (`flowcap_benches::history_check`).
//! 2. **latency**: a fresh setup whose event times are now; flowcap runs
//!    live while a paced producer sends records at half the measured flowcap
//!    rate with `CreateTime` = send time. A share of the records is huge
//!    (500 GiB: crosses any plan or pool limit) for cards not hit before,
//!    so thousands of cards are cut during the phase. Latency = the action's
//!    message timestamp (set by flowcap's producer at send) - the causing
//!    record's produce timestamp (ms resolution), and, for reference, the
//!    time this process received the action - the send time (us).
//! 3. **recovery**: N cards set up and some records processed, a graceful
//!    stop (snapshot); flowcap started again, fed, `kill -9`ed; more records
//!    produced; then the time from the restart to the first output on the
//!    dead-letter topic (1 % of the fed records are for unknown cards, so
//!    the first one comes within ~100 processed records) and to the
//!    `consuming` log line (replay done), with the lease wait and the
//!    snapshot restore as logged.
//!
//! `--encoding binary` writes the usage records in flowcap's compact binary
//! encoding instead of JSON (every phase; the baseline reads the same
//! messages), to show what decoding JSON costs end to end.
//!
//! Output: one JSON line per measurement appended to
//! `target/kafka_report.jsonl` (`--out`), a Markdown table on stdout, and
//! with `--plot DIR` two PNGs (throughput bars, latency CDF).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use flowcap_benches::{check_history, cpu_model, median, plot, progress};
use flowcap_engine::{Iccid, RecordId, Timestamp, Usage};
use flowcap_loadgen::{
    to_json_line, GeneratedRecord, Payload, RecordKind, Workload, WorkloadConfig,
};
use flowcap_testkit::{Broker, Storage};
use hdrhistogram::Histogram;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde_json::{json, Value};

/// flowcap's consumer settings (`CONSUMER_DEFAULTS` in
/// `ingest/src/kafka/mod.rs`; keep in sync): the raw baseline fetches
/// exactly as flowcap does.
const FLOWCAP_CONSUMER: &[(&str, &str)] = &[
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
    ("auto.offset.reset", "earliest"),
    ("fetch.wait.max.ms", "5"),
    ("fetch.min.bytes", "1"),
    ("fetch.max.bytes", "52428800"),
    ("max.partition.fetch.bytes", "8388608"),
    ("queued.max.messages.kbytes", "65536"),
    ("fetch.queue.backoff.ms", "10"),
    ("session.timeout.ms", "10000"),
    ("heartbeat.interval.ms", "1000"),
];

const USAGE: &str = "flowcap.usage";
const COMMANDS: &str = "flowcap.commands";
const ACTIONS: &str = "flowcap.actions";
const DLQ: &str = "flowcap.dlq";
const RESULTS: &str = "flowcap.command-results";

/// 500 GiB: above any default plan (2 GiB) and any forward pool (100
/// members x 2 GiB + add-on), below the decoder's 1 TiB per field.
const HUGE_BYTES: u64 = 500 << 30;

/// How a usage record is written into the usage topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Encoding {
    Json,
    Binary,
}

impl Encoding {
    /// Replaces `out` with `record` in this encoding (a malformed record:
    /// its raw bytes either way).
    fn write(self, record: &GeneratedRecord, out: &mut Vec<u8>) {
        out.clear();
        match self {
            Encoding::Binary => record.to_binary(out),
            Encoding::Json => {
                // Empty after the clear, so valid UTF-8: the buffer is reused.
                let mut line = String::from_utf8(std::mem::take(out)).unwrap_or_default();
                to_json_line(record, &mut line);
                *out = line.into_bytes();
            }
        }
    }

    fn name(self) -> &'static str {
        match self {
            Encoding::Json => "json",
            Encoding::Binary => "binary",
        }
    }
}

/// Kafka pipeline benchmark: raw consume vs flowcap, latency, recovery.
#[derive(Debug, Parser)]
#[command(name = "kafka_report")]
struct Args {
    /// Phases to run, comma-separated: throughput, latency, broker-latency,
    /// recovery.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "throughput,latency,broker-latency,recovery"
    )]
    phases: Vec<String>,
    /// Partitions of the usage topic.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Cards of the throughput workload.
    #[arg(long, default_value_t = 100_000)]
    cards: u64,
    /// Hours of event time of the throughput workload.
    #[arg(long, default_value_t = 20)]
    hours: u32,
    /// Records per card per hour of the throughput workload (records =
    /// cards x hours x this).
    #[arg(long, default_value_t = 1.0)]
    per_card_hour: f64,
    /// How usage records are written into the usage topic: `json` (SPEC
    /// section 4) or `binary` (flowcap's compact encoding; malformed
    /// records stay the raw bytes they are). Every phase uses it; the raw
    /// consume baseline reads the same messages.
    #[arg(long, value_enum, default_value_t = Encoding::Json)]
    encoding: Encoding,
    /// Repetitions of the throughput pair (median reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// flowcap's idle wait before it exits (`--exit-when-idle`), seconds.
    #[arg(long, default_value_t = 2.0)]
    idle_secs: f64,
    /// Shards of flowcap (default: its own default, one per core).
    #[arg(long)]
    shards: Option<usize>,
    /// Paced rates of the latency phases, records/s (default: the
    /// `--latency-fractions` of this run's flowcap rate).
    #[arg(long, value_delimiter = ',')]
    latency_rate: Vec<f64>,
    /// Fractions of the measured flowcap rate to pace at (100,000/s stands
    /// for the rate when the throughput phase did not run).
    #[arg(long, value_delimiter = ',', default_value = "0.5")]
    latency_fractions: Vec<f64>,
    /// Also run flowcap with `--no-history` in each throughput repetition
    /// (shows the writer's share).
    #[arg(long)]
    also_no_history: bool,
    /// Length of the paced phase, seconds.
    #[arg(long, default_value_t = 20)]
    latency_secs: u64,
    /// Samples from the first seconds of the paced phase are dropped (warm-up).
    #[arg(long, default_value_t = 2)]
    latency_warmup_secs: u64,
    /// `linger.ms` of the paced producer. On Tansu 0.6 a producer that
    /// sends many small requests (linger 0-2 ms at tens of thousands of
    /// records/s) queues behind the broker: acknowledgements take hundreds
    /// of ms. 5 ms gave the lowest broker-alone latency (see the
    /// broker-latency phase).
    #[arg(long, default_value_t = 5)]
    latency_linger_ms: u32,
    /// Cards of the latency phase.
    #[arg(long, default_value_t = 100_000)]
    latency_cards: u64,
    /// Share of paced records that are huge (cross their card's limit).
    #[arg(long, default_value_t = 0.01)]
    latency_huge_share: f64,
    /// Card counts of the recovery phase.
    #[arg(long, value_delimiter = ',', default_value = "1000000")]
    recovery_cards: Vec<u64>,
    /// Recovery variants, each a kill -9 / restart cycle on the same setup:
    /// `default` (flowcap's settings), `session3s` (`-X
    /// session.timeout.ms=3000`), `static` (`-X group.instance.id=...`:
    /// static group membership, the restart takes the dead member's place).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "default,session3s,static"
    )]
    recovery_variants: Vec<String>,
    /// Records processed before the snapshot in the recovery phase.
    #[arg(long, default_value_t = 1_000_000)]
    recovery_records: u64,
    /// Records fed to the running instance before `kill -9`, and again
    /// while it is down.
    #[arg(long, default_value_t = 300_000)]
    recovery_backlog: u64,
    /// Seconds the instance runs on the backlog before `kill -9`.
    #[arg(long, default_value_t = 3.0)]
    recovery_kill_after: f64,
    /// Seconds a restart after kill -9 may take to get back to consuming
    /// before the variant is reported as failed.
    #[arg(long, default_value_t = 300.0)]
    recovery_timeout_secs: f64,
    /// librdkafka property passed to every flowcap run (`-X KEY=VALUE`,
    /// repeatable), e.g. `debug=cgrp` to see the lease's group protocol.
    #[arg(long)]
    flowcap_x: Vec<String>,
    /// Argument added to every flowcap run (repeatable, after the phase's
    /// own), e.g. `--flowcap-arg=--snapshot-every=0` to see the latency
    /// between snapshots.
    #[arg(long, allow_hyphen_values = true)]
    flowcap_arg: Vec<String>,
    /// The flowcap binary (default: target/release/flowcap of this workspace).
    #[arg(long)]
    flowcap: Option<PathBuf>,
    /// Scratch directory for data directories (default: system temp).
    #[arg(long)]
    work: Option<PathBuf>,
    /// JSON lines output (appended).
    #[arg(long, default_value = "target/kafka_report.jsonl")]
    out: PathBuf,
    /// Draw PNG plots into this directory (from the JSON lines).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Diagnostic: print a consumer group's state and members (`BOOTSTRAP/GROUP`).
    #[arg(long)]
    describe_group: Option<String>,
    /// Only draw the plots from `--out`; run nothing.
    #[arg(long)]
    plot_only: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(spec) = &args.describe_group {
        let (bootstrap, group) = spec.split_once('/').context("BOOTSTRAP/GROUP")?;
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .create()?;
        let list = consumer.fetch_group_list(Some(group), Duration::from_secs(10))?;
        for g in list.groups() {
            println!(
                "group {} state {} protocol {} {}",
                g.name(),
                g.state(),
                g.protocol_type(),
                g.protocol()
            );
            for m in g.members() {
                println!(
                    "  member {} client {} host {}",
                    m.id(),
                    m.client_id(),
                    m.client_host()
                );
            }
        }
        return Ok(());
    }
    if args.plot_only {
        let dir = args
            .plot
            .as_deref()
            .context("--plot-only needs --plot DIR")?;
        return Ok(plot::kafka::draw(&args.out, dir)?);
    }
    let bin = match &args.flowcap {
        Some(p) => p.clone(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/flowcap"),
    };
    if !bin.is_file() {
        bail!(
            "{} not found: cargo build --release -p flowcap (or pass --flowcap)",
            bin.display()
        );
    }
    let work = tempfile::Builder::new()
        .prefix("kafka-report-")
        .tempdir_in(args.work.clone().unwrap_or_else(std::env::temp_dir))
        .context("creating the scratch directory")?;
    let mut report = Report::new(&args)?;
    report.machine()?;
    let phase = |name: &str| args.phases.iter().any(|p| p == name);

    let mut flowcap_rate = None;
    if phase("throughput") {
        flowcap_rate = Some(throughput(&args, &bin, work.path(), &mut report)?);
    }
    let rates: Vec<f64> = if args.latency_rate.is_empty() {
        let max = flowcap_rate.unwrap_or(100_000.0);
        args.latency_fractions.iter().map(|f| f * max).collect()
    } else {
        args.latency_rate.clone()
    };
    for &rate in &rates {
        if phase("latency") {
            latency(&args, &bin, work.path(), rate, &mut report)?;
        }
        if phase("broker-latency") {
            broker_latency(&args, rate, &mut report)?;
        }
    }
    if phase("recovery") {
        for &cards in &args.recovery_cards {
            recovery(&args, &bin, work.path(), cards, &mut report)?;
        }
    }
    report.print_table();
    if let Some(dir) = &args.plot {
        plot::kafka::draw(&args.out, dir)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Report: JSON lines and the Markdown table.

struct Report {
    run: u64,
    out: fs::File,
    rows: Vec<(String, String, String, String)>,
}

impl Report {
    fn new(args: &Args) -> Result<Report> {
        if let Some(parent) = args.out.parent() {
            fs::create_dir_all(parent).ok();
        }
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&args.out)
            .with_context(|| format!("opening {}", args.out.display()))?;
        Ok(Report {
            run: wall_ms() as u64 / 1000,
            out,
            rows: Vec::new(),
        })
    }

    /// Appends one measurement (with the run id) to the JSON lines.
    fn line(&mut self, phase: &str, measure: &str, mut fields: Value) -> Result<()> {
        if let Some(map) = fields.as_object_mut() {
            map.insert("run".into(), json!(self.run));
            map.insert("phase".into(), json!(phase));
            map.insert("measure".into(), json!(measure));
        }
        writeln!(self.out, "{fields}").context("writing the JSON lines")?;
        Ok(())
    }

    fn row(&mut self, what: impl Into<String>, value: impl Into<String>, goal: &str, met: &str) {
        self.rows
            .push((what.into(), value.into(), goal.to_owned(), met.to_owned()));
    }

    fn machine(&mut self) -> Result<()> {
        let nproc = thread::available_parallelism().map_or(0, |n| n.get());
        let cpu = cpu_model();
        let tansu = Command::new("tansu")
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        eprintln!("machine: {nproc} cores, {cpu}, {tansu}");
        self.line(
            "machine",
            "machine",
            json!({"nproc": nproc, "cpu": cpu, "tansu": tansu}),
        )
    }

    fn print_table(&self) {
        println!("\n| measure | figure | goal | met |\n| --- | --- | --- | --- |");
        for (what, value, goal, met) in &self.rows {
            println!("| {what} | {value} | {goal} | {met} |");
        }
    }
}

fn yes(ok: bool) -> &'static str {
    if ok {
        "yes"
    } else {
        "no"
    }
}

// ---------------------------------------------------------------------------
// Phase 1: throughput.

fn throughput(args: &Args, bin: &Path, work: &Path, report: &mut Report) -> Result<f64> {
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

// ---------------------------------------------------------------------------
// Phase 2: latency.

fn latency(args: &Args, bin: &Path, work: &Path, rate: f64, report: &mut Report) -> Result<()> {
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
        format!(
            "{:.1} / {:.1} / {:.1} ms",
            q(&at_action, 0.5),
            q(&at_action, 0.99),
            q(&at_action, 0.999)
        ),
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
        format!(
            "{:.1} / {:.1} / {:.1} ms",
            q(&observed, 0.5),
            q(&observed, 0.99),
            q(&observed, 0.999)
        ),
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
fn broker_latency(args: &Args, rate: f64, report: &mut Report) -> Result<()> {
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

// ---------------------------------------------------------------------------
// Phase 3: recovery after kill -9.

fn recovery(args: &Args, bin: &Path, work: &Path, cards: u64, report: &mut Report) -> Result<()> {
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

// ---------------------------------------------------------------------------
// Broker, producing, flowcap processes.

fn start_broker(partitions: i32) -> Result<Broker> {
    let broker = Broker::start(Storage::Memory)?;
    for (topic, n) in [
        (USAGE, partitions),
        (COMMANDS, 1),
        (ACTIONS, 2),
        (DLQ, 1),
        (RESULTS, 1),
        ("flowcap.lease", 1),
    ] {
        broker.create_topic(topic, n)?;
    }
    eprintln!("broker: tansu memory:// on {}", broker.bootstrap());
    Ok(broker)
}

#[derive(Default)]
struct Acks {
    ok: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
    /// Sum and max of (acknowledged - message timestamp), ms.
    ack_ms_sum: AtomicU64,
    ack_ms_max: AtomicU64,
}

impl ClientContext for Acks {}

impl ProducerContext for Acks {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(m) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                if let Some(ts) = m.timestamp().to_millis() {
                    let ms = (wall_ms() - ts).max(0) as u64;
                    self.ack_ms_sum.fetch_add(ms, Ordering::Relaxed);
                    self.ack_ms_max.fetch_max(ms, Ordering::Relaxed);
                }
            }
            Err((e, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut first) = self.first_error.lock() {
                    first.get_or_insert_with(|| e.to_string());
                }
            }
        }
    }
}

/// A producer to one topic that counts acknowledgements (`acks=all`).
struct Sender {
    producer: BaseProducer<Acks>,
    topic: &'static str,
    sent: u64,
}

impl Sender {
    fn new(broker: &Broker, topic: &'static str, linger_ms: u32) -> Result<Sender> {
        let mut config = broker.client_config();
        let config = config
            .set("acks", "all")
            .set("linger.ms", linger_ms.to_string())
            .set("batch.num.messages", "10000")
            .set("batch.size", "1000000")
            .set("queue.buffering.max.messages", "1000000")
            .set("queue.buffering.max.kbytes", "1048576")
            .set("message.timeout.ms", "60000");
        let producer = config.create_with_context(Acks::default())?;
        Ok(Sender {
            producer,
            topic,
            sent: 0,
        })
    }

    fn send(&mut self, key: Option<&[u8]>, value: &[u8], timestamp_ms: Option<i64>) -> Result<()> {
        let mut record = BaseRecord::<[u8], [u8]>::to(self.topic).payload(value);
        record.key = key;
        record.timestamp = timestamp_ms;
        loop {
            match self.producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    self.producer.poll(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e).context(format!("producing to {}", self.topic)),
            }
        }
        self.sent += 1;
        if self.sent.is_multiple_of(1024) {
            self.poll();
            if self.producer.context().failed.load(Ordering::Relaxed) > 0 {
                return Err(self.failure());
            }
        }
        Ok(())
    }

    fn poll(&self) {
        self.producer.poll(Duration::ZERO);
    }

    fn failure(&self) -> anyhow::Error {
        let first = self
            .producer
            .context()
            .first_error
            .lock()
            .ok()
            .and_then(|e| e.clone());
        anyhow!("delivery to {} failed: {first:?}", self.topic)
    }

    /// Waits until every message is acknowledged (fails on any failure or
    /// on 60 s without progress).
    fn flush(&mut self) -> Result<u64> {
        let acks = self.producer.context().clone();
        let mut progress = (u64::MAX, Instant::now());
        loop {
            if acks.failed.load(Ordering::Relaxed) > 0 {
                return Err(self.failure());
            }
            let ok = acks.ok.load(Ordering::Relaxed);
            if ok == self.sent {
                return Ok(ok);
            }
            if ok != progress.0 {
                progress = (ok, Instant::now());
            } else if progress.1.elapsed() > Duration::from_secs(60) {
                bail!(
                    "{} of {} messages to {} acknowledged after 60 s",
                    ok,
                    self.sent,
                    self.topic
                );
            }
            self.producer.poll(Duration::from_millis(20));
        }
    }
}

fn produce_commands(broker: &Broker, workload: &Workload) -> Result<u64> {
    let total = workload.setup_commands().count() as u64;
    let bar = progress(Some(total), "setup commands produced");
    let mut sender = Sender::new(broker, COMMANDS, 5)?;
    let mut buf = Vec::new();
    for (i, command) in workload.setup_commands().enumerate() {
        buf.clear();
        serde_json::to_writer(&mut buf, &command)?;
        sender.send(None, &buf, None)?;
        if i % 4096 == 0 {
            bar.set_position(i as u64);
        }
    }
    sender.flush()?;
    bar.finish_and_clear();
    Ok(total)
}

/// Produces the workload's records keyed by ICCID with their arrival as the
/// message timestamp (as `flowcap/tests/kafka.rs` does); returns how many.
fn produce_workload_records(
    broker: &Broker,
    workload: &Workload,
    encoding: Encoding,
) -> Result<u64> {
    let total = workload.total_records();
    let bar = progress(Some(total), "records produced");
    let mut sender = Sender::new(broker, USAGE, 5)?;
    let mut message = Vec::new();
    let mut key = String::new();
    let began = Instant::now();
    for (i, r) in workload.records().enumerate() {
        encoding.write(&r, &mut message);
        key.clear();
        let _ = write!(key, "{}", r.iccid());
        sender.send(Some(key.as_bytes()), &message, Some(r.arrival.millis()))?;
        if i % 4096 == 0 {
            bar.set_position(i as u64);
        }
    }
    let n = sender.flush()?;
    bar.finish_and_clear();
    eprintln!(
        "produced {n} records in {:.1} s ({:.0}/s)",
        began.elapsed().as_secs_f64(),
        n as f64 / began.elapsed().as_secs_f64()
    );
    Ok(n)
}

fn average_record_len(workload: &Workload, encoding: Encoding) -> f64 {
    let mut message = Vec::new();
    let (mut n, mut len) = (0usize, 0usize);
    for r in workload.records().take(10_000) {
        encoding.write(&r, &mut message);
        n += 1;
        len += message.len();
    }
    len as f64 / n.max(1) as f64
}

/// A valid usage record as the generator would make it, to encode.
fn valid_record(usage: Usage, seq: u64) -> GeneratedRecord {
    GeneratedRecord {
        seq,
        arrival: usage.end,
        kind: RecordKind::Fresh,
        payload: Payload::Valid(usage),
    }
}

/// A running `flowcap run --kafka`, its stderr lines timestamped on arrival
/// (relative to the spawn).
struct Flowcap {
    child: Child,
    spawned: Instant,
    lines: Arc<Mutex<Vec<(Duration, String)>>>,
    stderr: Option<JoinHandle<()>>,
    stdout: Option<JoinHandle<String>>,
    watch: Option<FileWatch>,
    /// Where its `/metrics` is served.
    metrics: String,
}

struct Finished {
    status: ExitStatus,
    summary: Value,
    total: Duration,
    /// Peak resident memory of the process (VmHWM), KiB.
    peak_rss_kb: u64,
    /// Resident memory (VmRSS) every [`RSS_EVERY`]: (since the spawn, KiB).
    rss: Vec<(Duration, u64)>,
    /// CPU-seconds by thread name (threads of one name summed), as last
    /// read, at most [`RSS_EVERY`] before the exit.
    thread_cpu: BTreeMap<String, f64>,
    lines: Vec<(Duration, String)>,
    /// Changes of the order log and of the accounted count, with CPU times.
    files: Vec<Sample>,
}

/// One observation of a running flowcap from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sample {
    /// Since the spawn.
    at: Duration,
    /// Bytes in the order log (all segments).
    order: u64,
    /// Records accounted so far (counted, duplicates, history only), from
    /// flowcap's `/metrics`.
    usage: u64,
    /// CPU time of the flowcap process and of the broker, clock ticks.
    cpu: u64,
    broker_cpu: u64,
}

/// Polls every 25 ms (a scrape of `/metrics` costs flowcap CPU: every
/// 5 ms took 8 % of its cycles; 25 ms bounds the error of an 8 s window
/// at 0.3 %): the order log in the data directory grows (one
/// `write` per run of messages, before the run is processed) when the
/// driver takes a message; flowcap's Prometheus `/metrics` (`--http`)
/// counts records as their outputs leave the shards (`flowcap_records_*`,
/// `flowcap_duplicates_total`). Together they bracket the processing from
/// outside the process. Each change is kept with the CPU time of flowcap
/// and of the broker at that moment.
struct FileWatch {
    stop: Arc<AtomicBool>,
    changes: Arc<Mutex<Vec<Sample>>>,
    thread: Option<JoinHandle<()>>,
}

impl FileWatch {
    fn start(
        dir: &Path,
        metrics: String,
        spawned: Instant,
        pid: u32,
        broker_pid: Option<u32>,
    ) -> FileWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let changes: Arc<Mutex<Vec<Sample>>> = Arc::default();
        let order = dir.join("order");
        let thread = {
            let (stop, changes) = (stop.clone(), changes.clone());
            thread::spawn(move || {
                let mut segments: Vec<PathBuf> = Vec::new();
                let mut listed = Instant::now() - Duration::from_secs(1);
                let mut last: Option<(u64, u64)> = None;
                while !stop.load(Ordering::SeqCst) {
                    if listed.elapsed() >= Duration::from_millis(50) {
                        segments = fs::read_dir(&order)
                            .into_iter()
                            .flatten()
                            .flatten()
                            .map(|e| e.path())
                            .collect();
                        listed = Instant::now();
                    }
                    let now = (
                        segments
                            .iter()
                            .filter_map(|p| fs::metadata(p).ok())
                            .map(|m| m.len())
                            .sum(),
                        accounted(&metrics).unwrap_or(last.map_or(0, |l| l.1)),
                    );
                    if last != Some(now) {
                        last = Some(now);
                        let sample = Sample {
                            at: spawned.elapsed(),
                            order: now.0,
                            usage: now.1,
                            cpu: cpu_ticks(pid).unwrap_or(0),
                            broker_cpu: broker_pid.and_then(cpu_ticks).unwrap_or(0),
                        };
                        if let Ok(mut c) = changes.lock() {
                            c.push(sample);
                        }
                    }
                    thread::sleep(Duration::from_millis(25));
                }
            })
        };
        FileWatch {
            stop,
            changes,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.changes
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default()
    }
}

/// Records accounted so far by the flowcap serving `/metrics` at `addr`
/// (`None` before it listens).
fn accounted(addr: &str) -> Option<u64> {
    let total = metric_sum(
        addr,
        &[
            "flowcap_records_counted_total",
            "flowcap_records_history_only_total",
            "flowcap_duplicates_total",
        ],
    )?;
    Some(total as u64)
}

/// The sum of every sample (all label sets) of the metrics `names` that
/// the flowcap serving `/metrics` at `addr` exports now.
fn metric_sum(addr: &str, names: &[&str]) -> Option<f64> {
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    let mut total = 0.0;
    for line in body.lines() {
        let name = line.split([' ', '{']).next().unwrap_or("");
        if names.contains(&name) {
            total += line.rsplit(' ').next()?.parse::<f64>().ok()?;
        }
    }
    Some(total)
}

/// Snapshots written so far, the seconds they took from cut to durable,
/// and the seconds their cuts held the inputs, from `/metrics`.
fn snapshots_so_far(addr: &str) -> (f64, f64, f64) {
    (
        metric_sum(addr, &["flowcap_snapshots_total"]).unwrap_or(0.0),
        metric_sum(addr, &["flowcap_snapshot_duration_seconds_sum"]).unwrap_or(0.0),
        metric_sum(addr, &["flowcap_snapshot_pause_seconds_sum"]).unwrap_or(0.0),
    )
}

/// A free port on loopback (bound, then released for the child to take).
fn free_addr() -> Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.to_string())
}

/// The peak resident set (VmHWM) of a live process, KiB.
/// A figure in KiB of a `/proc/<pid>/status` text (`VmHWM:`, `VmRSS:`).
fn status_kb(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Records the CPU ticks so far of every thread of `pid` (by thread id:
/// its name and ticks); a thread that has ended keeps its last reading.
fn thread_ticks(pid: u32, threads: &mut BTreeMap<u32, (String, u64)>) {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        if let Some(reading) = fs::read_to_string(task.path().join("stat"))
            .ok()
            .and_then(|stat| stat_ticks(&stat))
        {
            threads.insert(tid, reading);
        }
    }
}

/// How often a waited-for flowcap's resident memory is sampled.
const RSS_EVERY: Duration = Duration::from_millis(250);

/// User + system CPU time of a process, in clock ticks (1/100 s).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat_ticks(&stat)?.1)
}

/// The name and CPU ticks (user + system) of a `/proc/.../stat` text.
fn stat_ticks(stat: &str) -> Option<(String, u64)> {
    // The name is in parentheses (and may contain spaces); fields follow.
    let name = &stat[stat.find('(')? + 1..stat.rfind(')')?];
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some((name.to_owned(), ticks))
}

/// The pid of the `tansu` process listening on this broker's port.
fn broker_pid(broker: &Broker) -> Option<u32> {
    let url = format!("tcp://{}", broker.bootstrap());
    fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = fs::read(e.path().join("cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline);
        (cmdline.contains("tansu") && cmdline.contains(&url)).then_some(pid)
    })
}

impl Finished {
    /// Records accounted per second over `from..to`, in half-second steps:
    /// the accounted count, scaled by `records` over its growth in the
    /// window (rejects are not in it). `[[seconds since from, records/s], ...]`.
    fn timeline(&self, from: Duration, to: Duration, records: u64) -> Value {
        let in_window: Vec<&Sample> = self
            .files
            .iter()
            .filter(|s| s.at >= from && s.at <= to)
            .collect();
        let (Some(a), Some(b)) = (in_window.first(), in_window.last()) else {
            return json!([]);
        };
        let per_byte = records as f64 / (b.usage.saturating_sub(a.usage)).max(1) as f64;
        let step = Duration::from_millis(500);
        let mut out = Vec::new();
        let mut t = from;
        let mut prev = a.usage;
        while t < to {
            let next = t + step;
            let usage = in_window
                .iter()
                .rev()
                .find(|s| s.at <= next)
                .map_or(prev, |s| s.usage);
            let rate = (usage.saturating_sub(prev)) as f64 * per_byte / step.as_secs_f64();
            out.push(json!([(t - from).as_secs_f64(), rate.round()]));
            prev = usage;
            t = next;
        }
        json!(out)
    }

    /// From the first message the driver took (first order log growth
    /// after `after`) to the last accounted record written before
    /// `before` (last growth of the accounted count): the processing window.
    fn processing_window(&self, before: Duration) -> Option<(Sample, Sample)> {
        let base = self.files.first()?;
        let first = *self.files.iter().find(|s| s.order > base.order)?;
        let last = *self
            .files
            .iter()
            .filter(|s| s.at < before && s.usage > base.usage)
            .max_by_key(|s| s.at)?;
        Some((first, last))
    }

    fn at(&self, needle: &str) -> Option<Duration> {
        self.lines
            .iter()
            .find(|(_, l)| l.contains(needle))
            .map(|(t, _)| *t)
    }

    fn log_tail(&self) -> String {
        let n = self.lines.len();
        self.lines[n.saturating_sub(30)..]
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Flowcap {
    fn spawn(
        bin: &Path,
        broker: &Broker,
        dir: &Path,
        group: &str,
        args: &Args,
        extra: &[&str],
    ) -> Result<Flowcap> {
        let mut cmd = Command::new(bin);
        let bootstrap = broker.bootstrap();
        let metrics = free_addr()?;
        cmd.args([
            "run", "--kafka", &bootstrap, "--group", group, "-q", "--json", "--http", &metrics,
            "--out",
        ])
        .arg(dir)
        .args(extra)
        .env("FLOWCAP_LOG", "info")
        .env("NO_COLOR", "1")
        // An error's message, not its backtrace, ends the log tail.
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LIB_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        if let Some(shards) = args.shards {
            cmd.args(["--shards", &shards.to_string()]);
        }
        for property in &args.flowcap_x {
            cmd.args(["-X", property]);
        }
        cmd.args(&args.flowcap_arg);
        let spawned = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let watch = FileWatch::start(
            dir,
            metrics.clone(),
            spawned,
            child.id(),
            broker_pid(broker),
        );
        let lines: Arc<Mutex<Vec<(Duration, String)>>> = Arc::default();
        let stderr = child.stderr.take().context("stderr")?;
        let stderr = {
            let lines = lines.clone();
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let at = spawned.elapsed();
                    if let Ok(mut l) = lines.lock() {
                        l.push((at, line));
                    }
                }
            })
        };
        let mut stdout = child.stdout.take().context("stdout")?;
        let stdout = thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        Ok(Flowcap {
            child,
            spawned,
            lines,
            stderr: Some(stderr),
            stdout: Some(stdout),
            watch: Some(watch),
            metrics,
        })
    }

    fn at(&self, needle: &str) -> Option<Duration> {
        self.lines
            .lock()
            .ok()?
            .iter()
            .find(|(_, l)| l.contains(needle))
            .map(|(t, _)| *t)
    }

    fn log_tail(&self) -> String {
        self.lines.lock().map_or_else(
            |_| String::new(),
            |l| {
                l[l.len().saturating_sub(30)..]
                    .iter()
                    .map(|(_, l)| l.as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            },
        )
    }

    fn lines_with_times(&self) -> Vec<String> {
        self.lines.lock().map_or_else(
            |_| Vec::new(),
            |l| {
                l.iter()
                    .map(|(t, l)| format!("{:.3} {l}", t.as_secs_f64()))
                    .collect()
            },
        )
    }

    fn exited(&mut self) -> Result<bool> {
        Ok(self.child.try_wait()?.is_some())
    }

    /// Waits for a stderr line containing `needle`; its time since spawn.
    fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<Duration> {
        let bar = progress(None, &format!("flowcap: waiting for `{needle}`"));
        loop {
            if let Some(t) = self.at(needle) {
                bar.finish_and_clear();
                return Ok(t);
            }
            if self.exited()? {
                bail!("flowcap exited before `{needle}`:\n{}", self.log_tail());
            }
            if self.spawned.elapsed() > timeout {
                bail!(
                    "no `{needle}` from flowcap after {timeout:?}:\n{}",
                    self.log_tail()
                );
            }
            bar.tick();
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill9(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_none() {
            self.child.kill()?;
        }
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM: flowcap snapshots and exits.
    fn terminate(&self) -> Result<()> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -TERM {} failed", self.child.id());
        }
        Ok(())
    }

    fn wait(mut self, what: &str) -> Result<Finished> {
        let bar = progress(None, &format!("flowcap: {what}"));
        let mut peak_rss_kb = 0;
        let mut rss = Vec::new();
        let mut threads = BTreeMap::new();
        let pid = self.child.id();
        let status = loop {
            let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            // The kernel's high-water mark, read until the process is gone.
            peak_rss_kb = peak_rss_kb.max(status_kb(&status, "VmHWM:").unwrap_or(0));
            let at = self.spawned.elapsed();
            if rss.last().is_none_or(|(last, _)| at >= *last + RSS_EVERY) {
                if let Some(kb) = status_kb(&status, "VmRSS:") {
                    rss.push((at, kb));
                }
                thread_ticks(pid, &mut threads);
            }
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            bar.tick();
            thread::sleep(Duration::from_millis(10));
        };
        let total = self.spawned.elapsed();
        bar.finish_and_clear();
        let files = self.watch.take().map(FileWatch::finish).unwrap_or_default();
        if let Some(t) = self.stderr.take() {
            let _ = t.join();
        }
        let stdout = self
            .stdout
            .take()
            .map(|t| t.join().unwrap_or_default())
            .unwrap_or_default();
        let lines = std::mem::take(&mut *self.lines.lock().map_err(|_| anyhow!("poisoned"))?);
        let summary = serde_json::from_str::<Value>(&stdout)
            .map(|v| v["summary"].clone())
            .unwrap_or(Value::Null);
        let mut thread_cpu: BTreeMap<String, f64> = BTreeMap::new();
        for (name, ticks) in threads.into_values() {
            *thread_cpu.entry(name).or_default() += ticks as f64 / 100.0;
        }
        Ok(Finished {
            status,
            summary,
            total,
            peak_rss_kb,
            rss,
            thread_cpu,
            lines,
            files,
        })
    }
}

impl Drop for Flowcap {
    /// A report that fails half-way must not leave a flowcap running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `flowcap run ... --exit-when-idle SECS` to completion; fails unless it
/// succeeds.
fn run_to_idle(
    bin: &Path,
    broker: &Broker,
    dir: &Path,
    group: &str,
    args: &Args,
    what: &str,
) -> Result<Finished> {
    run_to_idle_with(bin, broker, dir, group, args, what, &[])
}

fn run_to_idle_with(
    bin: &Path,
    broker: &Broker,
    dir: &Path,
    group: &str,
    args: &Args,
    what: &str,
    extra: &[&str],
) -> Result<Finished> {
    let idle = args.idle_secs.to_string();
    let mut all = vec!["--exit-when-idle", idle.as_str()];
    all.extend_from_slice(extra);
    let fc = Flowcap::spawn(bin, broker, dir, group, args, &all)?;
    let fin = fc.wait(what)?;
    if !fin.status.success() {
        bail!("flowcap failed ({}):\n{}", fin.status, fin.log_tail());
    }
    if fin.summary["commands_failed"].as_u64().unwrap_or(0) > 0 {
        eprintln!(
            "warning: {} commands failed",
            fin.summary["commands_failed"]
        );
    }
    Ok(fin)
}

// ---------------------------------------------------------------------------
// Small helpers.

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}

fn newest_snapshot_len(dir: &Path) -> u64 {
    fs::read_dir(dir.join("snapshots"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            Some((
                e.metadata().ok()?.modified().ok()?,
                e.metadata().ok()?.len(),
            ))
        })
        .max()
        .map_or(0, |(_, len)| len)
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

fn wall_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

fn wall_ms() -> i64 {
    wall_us() / 1000
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

fn human(n: u64) -> String {
    if n >= 1_000_000 && n.is_multiple_of(1_000_000) {
        format!("{}M", n / 1_000_000)
    } else if n >= 1000 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}
