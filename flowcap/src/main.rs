//! The `flowcap` binary: CLI, configuration and wiring.
//!
//! `flowcap run` is the main job. With no Kafka configured it runs
//! embedded: usage from `--input FILE` (JSON lines) or the built-in load
//! generator, commands from `--commands FILE` (or the generator's set-up),
//! outputs, snapshots and the dedupe index in `--out DIR`. Run it again on
//! the same directory after a crash and it resumes from the last snapshot
//! with every output line written exactly once.
//!
//! `--http ADDR` serves the operations endpoints (`/metrics`, `/livez`,
//! `/readyz`, see [`ops`]) while it runs.

mod api;
mod ops;
mod sql;
mod whatif;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use flowcap_engine::EngineConfig;
use flowcap_ingest::embedded::{self, EmbeddedOptions, Input};
use flowcap_ingest::files::{FileStatus, Role};
use flowcap_ingest::metrics::Source;
use flowcap_ingest::pipeline::{self, Start, Summary};
use flowcap_ingest::{Health, HistoryConfig, SizeLimits};
use flowcap_loadgen::{Expected, Workload, WorkloadConfig};
use flowcap_storage::history::compact::CompactionPolicy;
use flowcap_storage::history::ZSTD_LEVELS;
use flowcap_storage::HistoryLocation;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;

/// jemalloc, not glibc's malloc: under a long backlog glibc's per-thread
/// arenas kept what the history encoder, the compactor and librdkafka had
/// freed, and the resident set climbed to 2.5 GB over 20M records; with
/// jemalloc it stays at 1.0-1.35 GB, with peaks of 1.8 GB at the end
/// (docs/DECISIONS.md, *Kafka*: "jemalloc as the binary's allocator").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// flowcap: usage accounting and cut-off decisions for IoT SIM cards.
#[derive(Debug, Parser)]
#[command(name = "flowcap", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the pipeline: usage and commands in, actions, rejects, journal
    /// and history out (embedded: files or the built-in generator).
    Run(Box<RunArgs>),
    /// Write a generated workload (commands, usage, expected totals) to
    /// JSON-lines files.
    Loadgen(LoadgenArgs),
    /// SQL over the Parquet history: one query, or an interactive prompt.
    Sql(sql::SqlArgs),
    /// The console's named queries over the history (card usage, top
    /// cards, daily totals, pools, states, expiring, rule executions).
    Query(sql::QueryArgs),
    /// Export a query's result to a CSV, JSON-lines or Parquet file.
    Export(sql::ExportArgs),
    /// Serve `POST /sql` over the history (JSON, CSV or Arrow IPC), and
    /// `/api/v1` read-only over the newest snapshot.
    Serve(sql::ServeArgs),
    /// Automation rules: `replay` a draft rule over the history (what-if).
    #[command(subcommand)]
    Rules(RulesCommand),
}

#[derive(Debug, Subcommand)]
enum RulesCommand {
    /// Replay the usage history and command journal through a draft rule,
    /// sending nothing, and report which cards or pools it would have fired
    /// for, and when.
    Replay {
        #[command(flatten)]
        args: whatif::ReplayArgs,
        /// Configuration file whose `[engine]` table the history was made
        /// with (time zone, lateness).
        #[arg(long, env = "FLOWCAP_CONFIG")]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
struct WorkloadArgs {
    /// Workload definition (JSON, see `flowcap_loadgen::WorkloadConfig`);
    /// the flags below override it.
    #[arg(long, env = "FLOWCAP_WORKLOAD")]
    workload: Option<PathBuf>,
    /// Number of cards.
    #[arg(long)]
    cards: Option<u64>,
    /// Hours of event time to generate.
    #[arg(long)]
    hours: Option<u32>,
    /// Random seed (same seed, same workload).
    #[arg(long)]
    seed: Option<u64>,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Configuration file (TOML with `[engine]` and `[run]` tables; see
    /// flowcap.example.toml). Flags override it.
    #[arg(long, env = "FLOWCAP_CONFIG")]
    config: Option<PathBuf>,
    /// Output directory: events, rejects, journal, history, snapshots.
    #[arg(long, env = "FLOWCAP_OUT")]
    out: Option<PathBuf>,
    /// Usage records, one JSON object per line. Without it the built-in
    /// generator produces the input.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Commands, one JSON object per line, merged with the records by time.
    #[arg(long)]
    commands: Option<PathBuf>,
    /// Shards (default: one per core).
    #[arg(long, env = "FLOWCAP_SHARDS")]
    shards: Option<usize>,
    /// Take a snapshot every N inputs (0: only at the end).
    #[arg(long)]
    snapshot_every: Option<u64>,
    /// Do not write the Parquet history (`<out>/history`).
    #[arg(long)]
    no_history: bool,
    /// Where the Parquet history goes: a directory or an
    /// `s3://bucket/prefix` URL (credentials, region and endpoint from the
    /// AWS_* environment variables). Default `<out>/history`.
    #[arg(long, env = "FLOWCAP_HISTORY", value_name = "LOCATION")]
    history: Option<String>,
    /// History rows buffered before a Parquet chunk is written between
    /// snapshots (bounds the writer's memory; default 262144).
    #[arg(long)]
    history_roll_rows: Option<usize>,
    /// Merge a history partition's small files once it has this many of
    /// windows covered by every kept snapshot (0: never; default 8).
    #[arg(long, value_name = "N")]
    history_compact_files: Option<usize>,
    /// zstd level of the history's Parquet files, 1 (least CPU) to 22
    /// (smallest files); default 1.
    #[arg(
        long,
        value_name = "LEVEL",
        value_parser = clap::value_parser!(i32)
            .range(i64::from(*ZSTD_LEVELS.start())..=i64::from(*ZSTD_LEVELS.end()))
    )]
    history_zstd_level: Option<i32>,
    /// Largest usage record read, in bytes (a records-file line or a usage
    /// message); a larger one is dead-lettered as `too_large`. Default
    /// 65536.
    #[arg(long, env = "FLOWCAP_MAX_RECORD_SIZE", value_name = "BYTES")]
    max_record_size: Option<usize>,
    /// Largest command read, in bytes (a commands-file line or a commands
    /// message); a larger one is refused as `too_large`. Default 67108864.
    #[arg(long, env = "FLOWCAP_MAX_COMMAND_SIZE", value_name = "BYTES")]
    max_command_size: Option<usize>,
    /// Ignore snapshots in the output directory and start over: the
    /// outputs and the history are cleared (in Kafka mode every input is
    /// read again from the oldest offset the broker keeps; the output
    /// topics keep what they hold).
    #[arg(long)]
    fresh: bool,
    /// Record rule firings but send no notification (webhooks, email,
    /// SMS); the outbox is left as it is.
    #[arg(long)]
    no_notify: bool,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
    /// Print the summary as JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Serve the operations endpoints on ADDR while running: Prometheus
    /// /metrics, /livez, /readyz (e.g. 127.0.0.1:9464; port 0 picks a free
    /// port, printed on stderr). Off by default.
    #[arg(long, env = "FLOWCAP_HTTP", value_name = "ADDR")]
    http: Option<SocketAddr>,
    /// After the run, keep serving --http until interrupted (Ctrl-C,
    /// SIGTERM), so the final metrics can be scraped.
    #[arg(long)]
    linger: bool,
    #[command(flatten)]
    workload: WorkloadArgs,
    #[command(flatten)]
    kafka: KafkaArgs,
}

/// Kafka mode: set a bootstrap address (flag, env or `[kafka]` in the
/// config) and `flowcap run` consumes and produces real topics.
#[derive(Debug, Args)]
struct KafkaArgs {
    /// Kafka bootstrap servers; turns Kafka mode on (no --input/generator).
    #[arg(
        long = "kafka",
        env = "FLOWCAP_KAFKA_BOOTSTRAP",
        value_name = "HOST:PORT"
    )]
    bootstrap: Option<String>,
    /// Consumer group (holds the single-instance lease and the committed offsets).
    #[arg(long, env = "FLOWCAP_KAFKA_GROUP")]
    group: Option<String>,
    /// librdkafka property for every client, `key=value` (repeatable); wins
    /// over the config file and flowcap's defaults.
    #[arg(short = 'X', long = "kafka-property", value_name = "KEY=VALUE")]
    properties: Vec<String>,
    /// Snapshot at least this often while inputs arrive, in seconds.
    #[arg(long)]
    snapshot_interval_secs: Option<u64>,
    /// Stop (snapshot, commit, exit 0) once every partition is consumed to
    /// its end and nothing arrived for this many seconds (tests, benchmarks).
    #[arg(long, value_name = "SECS")]
    exit_when_idle: Option<f64>,
}

#[derive(Debug, Args)]
struct LoadgenArgs {
    /// Directory to write commands.jsonl, usage.jsonl and expected.jsonl to.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    workload: WorkloadArgs,
}

/// The configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileConfig {
    /// Engine settings (time zone, lateness, shards, dedupe).
    engine: EngineConfig,
    /// Run settings.
    run: RunSection,
    /// Kafka settings (Kafka mode when `bootstrap` is set).
    kafka: KafkaSection,
    /// The largest record and command read (`too_large` above).
    limits: SizeLimits,
    /// Rule notification delivery: retries, SMTP relay, SMS gateway,
    /// push-failure alert channels.
    notify: flowcap_delivery::NotifyConfig,
    /// `POST /sql`: bearer tokens and limits.
    sql: sql::SqlConfig,
    /// The operator API (`/api/v1`): tokens, rate, limits.
    api: api::ApiConfig,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct KafkaSection {
    bootstrap: Option<String>,
    group: String,
    topics: flowcap_ingest::kafka::Topics,
    snapshot_interval_secs: u64,
    max_run: usize,
    max_queued_records: usize,
    pause_after_ms: u64,
    partition_skew_ms: u64,
    partition_idle_ms: u64,
    partition_max_hold_ms: u64,
    lease_timeout_secs: u64,
    /// librdkafka properties for every client.
    properties: std::collections::BTreeMap<String, String>,
    /// librdkafka properties for the consumers.
    consumer: std::collections::BTreeMap<String, String>,
    /// librdkafka properties for the producer.
    producer: std::collections::BTreeMap<String, String>,
}

impl Default for KafkaSection {
    fn default() -> Self {
        let d = flowcap_ingest::kafka::KafkaOptions::new("", "");
        KafkaSection {
            bootstrap: None,
            group: d.group,
            topics: d.topics,
            snapshot_interval_secs: d.snapshot_interval.as_secs(),
            max_run: d.max_run,
            max_queued_records: d.max_queued_records,
            pause_after_ms: millis(d.pause_after),
            partition_skew_ms: millis(d.align.skew),
            partition_idle_ms: millis(d.align.idle),
            partition_max_hold_ms: millis(d.align.max_hold),
            lease_timeout_secs: d.lease_timeout.as_secs(),
            properties: Default::default(),
            consumer: Default::default(),
            producer: Default::default(),
        }
    }
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RunSection {
    /// Output directory.
    out: PathBuf,
    /// Snapshot every N inputs.
    snapshot_every: u64,
    /// Write the Parquet history.
    history: bool,
    /// Where: a directory or `s3://bucket/prefix` (default `<out>/history`).
    history_location: Option<String>,
    /// Merge a partition's small files once it has this many (0: never).
    history_compact_files: usize,
    /// zstd level of the Parquet files (1-22).
    history_zstd_level: i32,
    /// Address of the operations HTTP server (off when absent).
    http: Option<SocketAddr>,
}

impl Default for RunSection {
    fn default() -> Self {
        RunSection {
            out: PathBuf::from("flowcap-data"),
            snapshot_every: 1_000_000,
            history: true,
            history_location: None,
            history_compact_files: CompactionPolicy::default().min_files,
            history_zstd_level: HistoryConfig::default().zstd_level,
            http: None,
        }
    }
}

fn load_config(path: Option<&Path>) -> Result<FileConfig> {
    match path {
        None => Ok(FileConfig::default()),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("config {}", path.display()))
        }
    }
}

fn workload(args: &WorkloadArgs) -> Result<Workload> {
    let mut config = match &args.workload {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading workload {}", path.display()))?;
            WorkloadConfig::from_json(&text)?
        }
        None => WorkloadConfig::default(),
    };
    if let Some(cards) = args.cards {
        config.cards = cards;
    }
    if let Some(hours) = args.hours {
        config.duration_hours = hours;
    }
    if let Some(seed) = args.seed {
        config.seed = seed;
    }
    Ok(Workload::new(config)?)
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLOWCAP_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Run(args) => run(*args),
        Command::Loadgen(args) => loadgen(args),
        Command::Sql(args) => sql::sql(args),
        Command::Query(args) => sql::query(args),
        Command::Export(args) => sql::export(args),
        Command::Serve(args) => sql::serve(args),
        Command::Rules(RulesCommand::Replay { args, config }) => {
            whatif::replay(args, load_config(config.as_deref())?.engine)
        }
    }
}

fn progress_bar(total: Option<u64>, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = match total {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::new_spinner(),
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {human_pos}/{human_len} inputs ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// The history settings of a run: flags over the `[run]` table.
fn history_config(args: &RunArgs, run: &RunSection) -> Result<Option<HistoryConfig>> {
    if !run.history || args.no_history {
        return Ok(None);
    }
    let location = match args.history.as_deref().or(run.history_location.as_deref()) {
        Some(text) => Some(HistoryLocation::parse(text)?),
        None => None,
    };
    let zstd_level = args.history_zstd_level.unwrap_or(run.history_zstd_level);
    if !ZSTD_LEVELS.contains(&zstd_level) {
        bail!(
            "history_zstd_level {zstd_level} in the [run] table: zstd levels are {} to {}",
            ZSTD_LEVELS.start(),
            ZSTD_LEVELS.end()
        );
    }
    let defaults = HistoryConfig::default();
    Ok(Some(HistoryConfig {
        zstd_level,
        location,
        roll_rows: args.history_roll_rows.unwrap_or(defaults.roll_rows),
        compaction: CompactionPolicy {
            min_files: args
                .history_compact_files
                .unwrap_or(run.history_compact_files),
            ..defaults.compaction
        },
    }))
}

/// The size limits of a run: flags over the `[limits]` table.
fn size_limits(args: &RunArgs, file: &SizeLimits) -> Result<SizeLimits> {
    let sizes = SizeLimits {
        max_record_size: args.max_record_size.unwrap_or(file.max_record_size),
        max_command_size: args.max_command_size.unwrap_or(file.max_command_size),
    };
    if sizes.max_record_size == 0 || sizes.max_command_size == 0 {
        bail!(
            "max_record_size ({}) and max_command_size ({}) must be at least 1 byte",
            sizes.max_record_size,
            sizes.max_command_size
        );
    }
    Ok(sizes)
}

fn run(args: RunArgs) -> Result<()> {
    let file = load_config(args.config.as_deref())?;
    let sizes = size_limits(&args, &file.limits)?;
    let mut engine = file.engine;
    if let Some(shards) = args.shards {
        engine.shards = shards;
    }
    let history = history_config(&args, &file.run)?;
    let out = args.out.clone().unwrap_or(file.run.out);
    let http = args.http.or(file.run.http);
    if args.linger && http.is_none() {
        bail!("--linger needs --http (or `http` in the [run] table of the config)");
    }
    let health = Arc::new(Health::new());
    let bootstrap = args
        .kafka
        .bootstrap
        .clone()
        .or(file.kafka.bootstrap.clone());
    let mut requests = None;
    let server = match http {
        Some(addr) => {
            let tokens = sql::Tokens::from_config(&file.sql)?;
            // /sql needs a token off loopback; the other endpoints stay.
            let sql_here = sql::sql_allowed_on(addr, &tokens);
            if history.is_some() && !sql_here {
                eprintln!(
                    "ops: /sql is off on {addr}: no token ([sql] token_sha256 or {})",
                    sql::TOKENS_ENV
                );
            }
            let sql = match history.as_ref().filter(|_| sql_here) {
                Some(h) => Some(Arc::new(sql::SqlService::new(
                    h.location_in(&out),
                    sql::SqlLimits::of(&file.sql),
                    tokens,
                )?)),
                None => None,
            };
            let api = match file.api.enabled {
                true => {
                    let submit = match &bootstrap {
                        Some(bootstrap) => api_producer(bootstrap, &file.kafka, &args.kafka)?,
                        None => api::Submit::Embedded,
                    };
                    // The API's own handle on the history: its queries are
                    // its own, so no /sql token applies.
                    let history = match history.as_ref() {
                        Some(h) => Some(Arc::new(sql::SqlService::new(
                            h.location_in(&out),
                            sql::SqlLimits::of(&file.sql),
                            sql::Tokens::default(),
                        )?)),
                        None => None,
                    };
                    let (api, rx) = api::build(&file.api, addr, submit, history, &out)?;
                    requests = Some(rx);
                    Some(api)
                }
                false => None,
            };
            let server = ops::serve(addr, health.clone(), sql, api)?;
            eprintln!("ops: listening on http://{}", server.local_addr());
            Some(server)
        }
        None => None,
    };
    if let Some(bootstrap) = bootstrap {
        if args.input.is_some() || args.commands.is_some() {
            bail!("--input/--commands are for the embedded mode; in Kafka mode inputs come from the topics");
        }
        let mut options = flowcap_ingest::kafka::KafkaOptions::new(bootstrap, out);
        options.engine = engine;
        options.sizes = sizes;
        options.group = args.kafka.group.clone().unwrap_or(file.kafka.group);
        options.topics = file.kafka.topics;
        options.properties = file.kafka.properties;
        for kv in &args.kafka.properties {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("-X {kv}: expected key=value"))?;
            options
                .properties
                .insert(k.trim().to_owned(), v.trim().to_owned());
        }
        options.consumer_properties = file.kafka.consumer;
        options.producer_properties = file.kafka.producer;
        options.snapshot_every = args.snapshot_every.unwrap_or(file.run.snapshot_every);
        options.snapshot_interval = std::time::Duration::from_secs(
            args.kafka
                .snapshot_interval_secs
                .unwrap_or(file.kafka.snapshot_interval_secs),
        );
        options.history = history;
        options.notify = (!args.no_notify).then(|| file.notify.clone());
        options.max_run = file.kafka.max_run;
        options.max_queued_records = file.kafka.max_queued_records;
        options.pause_after = std::time::Duration::from_millis(file.kafka.pause_after_ms);
        options.align = flowcap_ingest::kafka::AlignSettings {
            skew: std::time::Duration::from_millis(file.kafka.partition_skew_ms),
            idle: std::time::Duration::from_millis(file.kafka.partition_idle_ms),
            max_hold: std::time::Duration::from_millis(file.kafka.partition_max_hold_ms),
        };
        options.lease_timeout = std::time::Duration::from_secs(file.kafka.lease_timeout_secs);
        options.exit_when_idle = args
            .kafka
            .exit_when_idle
            .map(std::time::Duration::from_secs_f64);
        options.start = if args.fresh {
            Start::Fresh
        } else {
            Start::Resume
        };
        options.requests = requests;
        return run_kafka(&options, args.json, &health);
    }
    let options = EmbeddedOptions {
        out_dir: out,
        engine,
        snapshot_every: args.snapshot_every.unwrap_or(file.run.snapshot_every),
        history,
        start: if args.fresh {
            Start::Fresh
        } else {
            Start::Resume
        },
        limits: Default::default(),
        sizes,
        progress_every: 10_000,
        source: match args.input {
            Some(_) => Source::File,
            None => Source::Generator,
        },
        health: Some(health.clone()),
        notify: (!args.no_notify).then(|| file.notify.clone()),
        requests: requests.clone(),
        linger: None,
        clock: flowcap_clock::SystemClock::shared(),
    };
    if args.input.is_none() && args.commands.is_some() {
        bail!("--commands needs --input (the generator makes its own commands)");
    }

    let (summary, engine, expected, workload) = match &args.input {
        Some(input) => {
            let bar = progress_bar(None, args.quiet);
            let (summary, engine) = flowcap_ingest::files::run(
                &options,
                Some(input),
                args.commands.as_deref(),
                &mut |p| bar.set_position(p.inputs),
            )?;
            bar.finish_and_clear();
            (summary, engine, None, None)
        }
        None => {
            let workload = workload(&args.workload)?;
            let setup: Vec<Input> = workload
                .setup_commands()
                .map(|c| Input::Command(serde_json::to_vec(&c).unwrap_or_default()))
                .collect();
            let total = setup.len() as u64 + workload.total_records();
            let mut line = String::new();
            let records = workload.records().map(move |r| {
                line.clear();
                r.to_json_line(&mut line);
                Input::ReceivedRecord(line.as_bytes().to_vec(), r.arrival)
            });
            let bar = progress_bar(Some(total), args.quiet);
            let (summary, engine) =
                embedded::run(&options, setup.into_iter().chain(records), &mut |p| {
                    bar.set_position(p.inputs)
                })?;
            bar.finish_and_clear();
            let expected = workload.expected();
            (summary, engine, Some(expected), Some(workload))
        }
    };

    let check = match (&expected, &workload) {
        (Some(expected), Some(workload)) => Some(check_exactness(&engine, workload, expected)),
        _ => None,
    };
    // Not kept while lingering: the API's pipeline restores its own.
    drop(engine);
    if args.json {
        let doc = serde_json::json!({ "summary": summary, "exactness": check });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print_summary(&summary, check.as_ref());
    }
    if let Some(server) = server {
        if args.linger {
            health.set_not_ready("run finished; serving metrics until interrupted");
            eprintln!(
                "ops: run finished; serving http://{} until interrupted",
                server.local_addr()
            );
            match requests {
                Some(requests) => linger_with_api(&options, requests)?,
                None => wait_for_interrupt()?,
            }
        }
        server.shutdown();
    }
    if let Some(check) = check {
        if check.mismatched > 0 {
            bail!(
                "{} cards' cycle totals differ from the generator's expectation",
                check.mismatched
            );
        }
    }
    Ok(())
}

fn run_kafka(
    options: &flowcap_ingest::kafka::KafkaOptions,
    json: bool,
    health: &Health,
) -> Result<()> {
    use flowcap_ingest::kafka::Status;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("installing a signal handler")?;
    }
    let summary = flowcap_ingest::kafka::run(options, stop, &mut |status| {
        tracing::info!(?status, "pipeline status");
        match status {
            Status::Starting => health.set_not_ready("starting"),
            Status::StandingBy(reason) => {
                eprintln!("flowcap: {reason}");
                health.set_not_ready(reason.clone());
            }
            Status::Replaying => health.set_not_ready("replaying after restart"),
            Status::Running => health.set_ready(),
            Status::Stopping => health.set_not_ready("stopping"),
        }
    })?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "summary": summary }))?
        );
    } else {
        print_summary(&summary, None);
    }
    Ok(())
}

/// After an embedded run, until SIGINT or SIGTERM: the pipeline resumed
/// from the run's last snapshot with no input, answering the operator
/// API's reads and commands (each command journaled and covered by a
/// snapshot before it is answered; `flowcap_ingest::requests`).
fn linger_with_api(
    options: &EmbeddedOptions,
    requests: flowcap_ingest::requests::Requests,
) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone()).context("installing a signal handler")?;
    }
    let options = EmbeddedOptions {
        start: Start::Resume,
        health: None,
        requests: Some(requests),
        linger: Some(stop),
        ..options.clone()
    };
    let (summary, _) = embedded::run(&options, std::iter::empty(), &mut |_| {})?;
    if summary.commands_ok + summary.commands_failed > 0 {
        eprintln!(
            "ops: {} commands through the API ({} failed)",
            summary.commands_ok + summary.commands_failed,
            summary.commands_failed
        );
    }
    Ok(())
}

/// The API's producer to the commands topic (Kafka mode): the same
/// client properties as the pipeline's producer.
fn api_producer(bootstrap: &str, file: &KafkaSection, args: &KafkaArgs) -> Result<api::Submit> {
    let mut config = rdkafka::ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    for (k, v) in file.properties.iter().chain(&file.producer) {
        config.set(k, v);
    }
    for kv in &args.properties {
        if let Some((k, v)) = kv.split_once('=') {
            config.set(k.trim(), v.trim());
        }
    }
    let producer: api::CommandProducer = config
        .create_with_context(api::Reports)
        .context("creating the operator API's producer")?;
    Ok(api::Submit::Kafka {
        producer: Arc::new(producer),
        topic: file.topics.commands.clone(),
    })
}

/// Blocks until SIGINT or SIGTERM.
pub(crate) fn wait_for_interrupt() -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone()).context("installing a signal handler")?;
    }
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Cycle totals compared with the generator's own bookkeeping.
#[derive(Debug, serde::Serialize)]
struct Exactness {
    cards_checked: u64,
    mismatched: u64,
    first_mismatch: Option<String>,
}

fn check_exactness(
    engine: &flowcap_engine::Engine,
    workload: &Workload,
    expected: &Expected,
) -> Exactness {
    let mut check = Exactness {
        cards_checked: 0,
        mismatched: 0,
        first_mismatch: None,
    };
    for index in 0..workload.card_count() {
        let Some(iccid) = workload.iccid(index) else {
            continue;
        };
        let Some(view) = engine.card_view(iccid) else {
            continue;
        };
        check.cards_checked += 1;
        let want = expected.card_cycle_bytes(iccid, view.cycle);
        if view.usage_bytes != want {
            check.mismatched += 1;
            check.first_mismatch.get_or_insert_with(|| {
                format!(
                    "card {iccid} cycle {}: engine {} bytes, expected {want}",
                    view.cycle, view.usage_bytes
                )
            });
        }
    }
    check
}

fn print_summary(s: &Summary, check: Option<&Exactness>) {
    println!("flowcap run: {}", s.out_dir.display());
    if let Some(seq) = s.resumed_after_seq {
        println!("  resumed after input #{seq}");
    }
    for f in &s.files {
        let status = match f.status {
            FileStatus::New => "read".to_owned(),
            FileStatus::Grown => format!("read from byte {}", f.from),
            FileStatus::Resumed => format!("interrupted run finished (from byte {})", f.from),
            FileStatus::Consumed => "skipped: already consumed".to_owned(),
        };
        println!(
            "  {:<13} {} ({} bytes): {status}",
            match f.role {
                Role::Records => "input",
                Role::Commands => "commands",
            },
            f.path.display(),
            f.to
        );
    }
    println!(
        "  inputs        {:>12}  ({:.0}/s over {:.1}s)",
        s.inputs, s.inputs_per_sec, s.elapsed_secs
    );
    println!("  counted       {:>12}", s.counted);
    println!("  history only  {:>12}  (late: {})", s.history_only, s.late);
    println!("  duplicates    {:>12}", s.duplicates);
    let rejected: u64 = s.rejected.values().sum();
    println!("  rejected      {:>12}", rejected);
    for (code, n) in &s.rejected {
        println!("    {code:<20} {n:>10}");
    }
    println!(
        "  commands      {:>12}  ({} failed)",
        s.commands_ok + s.commands_failed,
        s.commands_failed
    );
    println!("  card events   {:>12}", s.card_events);
    println!("  pool events   {:>12}", s.pool_events);
    println!("  rule firings  {:>12}", s.rule_firings);
    if s.late_crossings > 0 {
        println!(
            "  late crossings {:>11}  (closed cycles' limits, no state change)",
            s.late_crossings
        );
    }
    if let Some(n) = &s.notifications {
        println!(
            "  notifications {:>12}  delivered, {} failed, {} retries, {} still queued (outbox/)",
            n.delivered, n.failed, n.retries, n.pending
        );
    }
    let states: Vec<String> = s
        .cards_by_state
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    println!("  cards         {}", states.join(", "));
    println!("  snapshots     {:>12}", s.snapshots);
    if let Some(c) = check {
        println!(
            "  exactness     {} cards checked against the generator, {} mismatched",
            c.cards_checked, c.mismatched
        );
        if let Some(m) = &c.first_mismatch {
            println!("    first: {m}");
        }
    }
    println!(
        "  outputs       {}/{{{}, {}, {}, {}/}}",
        s.out_dir.display(),
        pipeline::EVENTS_FILE,
        pipeline::REJECTS_FILE,
        pipeline::JOURNAL_FILE,
        pipeline::HISTORY_DIR
    );
    println!(
        "  query it      flowcap sql --data {} \"SELECT * FROM card_cycle_usage LIMIT 10\"",
        s.out_dir.display()
    );
}

fn loadgen(args: LoadgenArgs) -> Result<()> {
    use std::io::Write;
    let workload = workload(&args.workload)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let open = |name: &str| -> Result<std::io::BufWriter<std::fs::File>> {
        let path = args.out.join(name);
        Ok(std::io::BufWriter::new(
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?,
        ))
    };
    let mut commands = open("commands.jsonl")?;
    for c in workload.setup_commands() {
        serde_json::to_writer(&mut commands, &c)?;
        commands.write_all(b"\n")?;
    }
    commands.flush()?;
    let bar = progress_bar(Some(workload.total_records()), false);
    let mut usage = open("usage.jsonl")?;
    let mut line = String::new();
    for (i, r) in workload.records().enumerate() {
        line.clear();
        r.to_json_line(&mut line);
        usage.write_all(line.as_bytes())?;
        usage.write_all(b"\n")?;
        if i % 10_000 == 0 {
            bar.set_position(i as u64);
        }
    }
    usage.flush()?;
    bar.finish_and_clear();
    let mut expected = open("expected.jsonl")?;
    for entry in workload.expected().entries() {
        serde_json::to_writer(&mut expected, &entry)?;
        expected.write_all(b"\n")?;
    }
    expected.flush()?;
    println!(
        "wrote {} commands, {} records for {} cards to {}",
        workload.setup_commands().count(),
        workload.total_records(),
        workload.card_count(),
        args.out.display()
    );
    Ok(())
}
