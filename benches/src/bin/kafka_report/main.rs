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
//! 4. **api**: the operator API under ingestion (`api`): `GET
//!    /api/v1/cards/{iccid}` latency and requests/s at `--api-cards` cards
//!    while records are paced at half flowcap's rate, and a backlog's
//!    drain rate with and without that load, as a ratio.
//!
//! `--encoding binary` writes the usage records in flowcap's compact binary
//! encoding instead of JSON (every phase; the baseline reads the same
//! messages), to show what decoding JSON costs end to end.
//!
//! Output: one JSON line per measurement appended to
//! `target/kafka_report.jsonl` (`--out`), a Markdown table on stdout, and
//! with `--plot DIR` the charts of `flowcap_benches::plot::kafka`.
//!
//! Modules: one per phase (`throughput`, `latency`, `recovery`), the
//! broker and what is produced to it (`broker`), the flowcap child process
//! (`child`), and what is read from outside the processes (`probes`).

mod api;
mod broker;
mod child;
mod latency;
mod probes;
mod recovery;
mod throughput;

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Parser;
use flowcap_benches::{cpu_model, plot};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::{json, Value};

use crate::api::api;
use crate::broker::Encoding;
use crate::latency::{broker_latency, latency};
use crate::recovery::recovery;
use crate::throughput::throughput;

/// Kafka pipeline benchmark: raw consume vs flowcap, latency, recovery.
#[derive(Debug, Parser)]
#[command(name = "kafka_report")]
struct Args {
    /// Phases to run, comma-separated: throughput, latency, broker-latency,
    /// recovery, api.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "throughput,latency,broker-latency,recovery,api"
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
    /// Cards of the api phase.
    #[arg(long, default_value_t = 1_000_000)]
    api_cards: u64,
    /// Records per card of the api phase's backlog (one hour of event time).
    #[arg(long, default_value_t = 1.0)]
    api_per_card_hour: f64,
    /// Closed-loop clients of the api phase, one keep-alive connection each.
    #[arg(long, default_value_t = 4)]
    api_clients: usize,
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
    if phase("api") {
        api(&args, &bin, work.path(), &mut report)?;
    }
    report.print_table();
    if let Some(dir) = &args.plot {
        plot::kafka::draw(&args.out, dir)?;
    }
    Ok(())
}

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
