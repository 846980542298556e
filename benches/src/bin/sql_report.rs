//! SQL over a long history, flowcap's DataFusion against DuckDB on the same
//! Parquet files, and what writing that history costs the ingestion
//! (issue #5; figures in docs/BENCHMARKS.md §10).
//!
//! ```text
//! cargo build --release -p flowcap -p flowcap-benches
//! ./target/release/sql_report                                  # 20,000 cards, a year, both phases
//! ./target/release/sql_report --cards 2000 --hours 2160        # smaller: 90 days
//! ./target/release/sql_report --phases queries --data DIR      # an existing `flowcap run --out DIR`
//! ```
//!
//! Phases:
//! - `queries`: the history under `--data` is generated first when it has
//!   none (`flowcap run --cards N --hours H`: the built-in generator, one
//!   record per card and hour, with its duplicates, malformed, unknown-card,
//!   late and out-of-order records). Then every console query of SPEC §8,
//!   in the text `ConsoleQuery::sql` gives (the same text for both
//!   engines), plus two analyst queries over the raw `usage_records`. Each
//!   runs once (reported as "first") and then `--reps` times, of which the
//!   median is the figure. DataFusion runs in this process over
//!   `flowcap_sql::open`; DuckDB in one Python process over
//!   `read_parquet` views of the same directories
//!   (`flowcap/tests/support/duckdb_queries.py`, the script the agreement
//!   test uses). Both fetch every row. The engines' row counts must agree.
//! - `history-cost`: one generated workload (`flowcap loadgen`, written to
//!   files once) run through `flowcap run` with the history and with
//!   `--no-history`, alternating, `--cost-rounds` times; the figure is the
//!   ratio of inputs/s.
//!
//! Writes `report.md`, `results.json`, `sql_times.png` and
//! `history_cost.png` to `--report`.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use clap::Parser;
use flowcap_benches::plot::{self, sql::QueryTimes};
use flowcap_benches::{batch_rows, cpu_model, duckdb, median, progress};
use flowcap_sql::{self as sql, ConsoleQuery, Latest};
use flowcap_storage::HistoryLocation;
use serde_json::{json, Value};

#[derive(Debug, Parser)]
#[command(
    about = "DataFusion vs DuckDB over flowcap's history, and the ingest cost of the history"
)]
struct Args {
    /// Phases to run, comma-separated: queries, history-cost.
    #[arg(long, value_delimiter = ',', default_value = "queries,history-cost")]
    phases: Vec<String>,
    /// The flowcap binary (release build for figures).
    #[arg(long, default_value = "target/release/flowcap")]
    flowcap: PathBuf,
    /// Output directory of the run whose history is queried (`<data>/history`);
    /// generated with --cards/--hours/--seed when it has no history yet.
    #[arg(long, default_value = "target/sql-bench/history")]
    data: PathBuf,
    /// Cards of the generated history.
    #[arg(long, default_value_t = 20_000)]
    cards: u64,
    /// Hours of event time of the generated history (8760: a year).
    #[arg(long, default_value_t = 8760)]
    hours: u32,
    /// Seed of the generated history.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Timed repetitions of each query after its first run (median reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// DuckDB's side: a Python script with the timing mode.
    #[arg(long, default_value = flowcap_benches::DUCKDB_SCRIPT)]
    duckdb_script: PathBuf,
    /// Cards of the history-cost workload.
    #[arg(long, default_value_t = 20_000)]
    cost_cards: u64,
    /// Hours of the history-cost workload.
    #[arg(long, default_value_t = 48)]
    cost_hours: u32,
    /// Rounds of the history-cost pair (with, without).
    #[arg(long, default_value_t = 3)]
    cost_rounds: usize,
    /// Where the report goes.
    #[arg(long, default_value = "target/sql_report")]
    report: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    for phase in &args.phases {
        ensure!(
            matches!(phase.as_str(), "queries" | "history-cost"),
            "unknown phase {phase:?} (queries, history-cost)"
        );
    }
    ensure!(
        args.flowcap.is_file(),
        "{} missing: cargo build --release -p flowcap",
        args.flowcap.display()
    );
    fs::create_dir_all(&args.report)?;
    let labels = plot::register_font()?;
    let mut results = json!({ "machine": machine() });
    let mut md = String::new();
    writeln!(md, "# flowcap SQL and history report\n")?;
    writeln!(md, "Machine: {}\n", machine())?;
    if args.phases.iter().any(|p| p == "queries") {
        let timings = queries(&args)?;
        markdown_queries(&mut md, &args, &timings)?;
        let times: Vec<QueryTimes<'_>> = timings
            .queries
            .iter()
            .map(|q| QueryTimes {
                name: &q.name,
                datafusion_ms: median(&q.datafusion_ms),
                duckdb_ms: median(&q.duckdb_ms),
            })
            .collect();
        plot::sql::query_times(&times, &args.report.join("sql_times.png"), labels)?;
        results["queries"] = serde_json::to_value(&timings)?;
    }
    if args.phases.iter().any(|p| p == "history-cost") {
        let rounds = history_cost(&args)?;
        markdown_cost(&mut md, &args, &rounds)?;
        let pairs: Vec<(f64, f64)> = rounds
            .iter()
            .map(|r| (r.with_history, r.without_history))
            .collect();
        plot::sql::history_cost(&pairs, &args.report.join("history_cost.png"), labels)?;
        results["history_cost"] = serde_json::to_value(&rounds)?;
    }
    fs::write(args.report.join("report.md"), &md)?;
    fs::write(
        args.report.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    print!("{md}");
    eprintln!("report: {}", args.report.join("report.md").display());
    Ok(())
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{}, {cores} cores", cpu_model())
}

fn spinner(what: &str) -> indicatif::ProgressBar {
    let bar = progress(None, what);
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

// ---------------------------------------------------------------------------
// Queries.

/// One query's timings in both engines, milliseconds.
#[derive(Debug, serde::Serialize)]
struct QueryTiming {
    name: String,
    /// A console query over one card (goal: under 100 ms).
    per_card: bool,
    sql: String,
    rows: usize,
    datafusion_first_ms: f64,
    datafusion_ms: Vec<f64>,
    duckdb_first_ms: f64,
    duckdb_ms: Vec<f64>,
}

impl QueryTiming {
    fn ratio(&self) -> f64 {
        median(&self.datafusion_ms) / median(&self.duckdb_ms).max(1e-9)
    }
}

#[derive(serde::Serialize)]
struct Timings {
    history_bytes: u64,
    history_files: u64,
    usage_rows: u64,
    days: usize,
    datafusion_open_ms: f64,
    duckdb_open_ms: f64,
    duckdb_threads: String,
    queries: Vec<QueryTiming>,
}

fn queries(args: &Args) -> Result<Timings> {
    let root = args.data.join("history");
    if !root.join("usage_records").is_dir() {
        generate_history(args)?;
    }
    let location = HistoryLocation::Local(root.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    let ctx = rt.block_on(sql::open(&location))?;
    let datafusion_open_ms = started.elapsed().as_secs_f64() * 1000.0;
    let latest = rt.block_on(Latest::of(&location))?;
    let cycles = rt.block_on(sql::partitions(
        &location,
        flowcap_storage::history::schema::CARD_CYCLE_USAGE_PARTS,
    ))?;
    let days = rt
        .block_on(sql::partitions(
            &location,
            flowcap_storage::history::schema::USAGE_RECORDS,
        ))?
        .len();
    let run = |q: &str| -> Result<Vec<Vec<String>>> {
        let batches = rt.block_on(sql::query(&ctx, q))?;
        Ok(batch_rows(&batches))
    };
    let usage_rows: u64 = run("SELECT COUNT(*) FROM usage_records")?[0][0].parse()?;
    let newest = ConsoleQuery::TopCards {
        cycle: None,
        limit: 1,
    };
    let top = run(&newest.sql(&latest)?)?;
    let top_card = top.first().context("no usage in the history")?[0].clone();
    let cards = run(&format!(
        "SELECT iccid FROM cards WHERE date = '{}' ORDER BY iccid",
        latest.cards_date.clone().context("no cards dump")?
    ))?;
    let middle_card = cards[cards.len() / 2][0].clone();
    let from_30 = sql::days_before(&latest.day.clone().context("no usage")?, 29)?;
    let mut list: Vec<(String, bool, String)> = Vec::new();
    let mut add = |name: &str, per_card: bool, q: ConsoleQuery| -> Result<()> {
        list.push((name.to_owned(), per_card, q.sql(&latest)?));
        Ok(())
    };
    add(
        "card-usage per cycle, top card, 12 cycles",
        true,
        ConsoleQuery::CardCycles {
            iccid: top_card.clone(),
            cycles: 12,
        },
    )?;
    add(
        "card-usage per day, top card, 61 days",
        true,
        ConsoleQuery::CardDays {
            iccid: top_card.clone(),
            days: 61,
        },
    )?;
    add(
        "card-usage per cycle, middle card, 12 cycles",
        true,
        ConsoleQuery::CardCycles {
            iccid: middle_card.clone(),
            cycles: 12,
        },
    )?;
    add(
        "card-usage per day, middle card, 365 days",
        true,
        ConsoleQuery::CardDays {
            iccid: middle_card.clone(),
            days: 365,
        },
    )?;
    add(
        "daily-totals, 30 days",
        false,
        ConsoleQuery::DailyTotals { days: 30 },
    )?;
    add(
        "daily-totals, 365 days",
        false,
        ConsoleQuery::DailyTotals { days: 365 },
    )?;
    add(
        "top-cards, newest cycle, 20",
        false,
        ConsoleQuery::TopCards {
            cycle: None,
            limit: 20,
        },
    )?;
    if let Some(oldest) = cycles.iter().min() {
        add(
            "top-cards, oldest cycle, 20",
            false,
            ConsoleQuery::TopCards {
                cycle: Some(oldest.clone()),
                limit: 20,
            },
        )?;
    }
    add(
        "pool-usage, every pool",
        false,
        ConsoleQuery::PoolUsage { pool: None },
    )?;
    add("state-counts", false, ConsoleQuery::StateCounts)?;
    add("expiring", false, ConsoleQuery::Expiring)?;
    let has_rules = !rt
        .block_on(sql::partitions(
            &location,
            flowcap_storage::history::schema::RULE_EXECUTIONS,
        ))?
        .is_empty();
    if has_rules {
        add(
            "rule-executions, newest 100",
            false,
            ConsoleQuery::RuleExecutions {
                rule: None,
                iccid: None,
                limit: 100,
            },
        )?;
    }
    list.push((
        "raw usage_records: one card, 30 days".into(),
        true,
        format!(
            "SELECT COUNT(*) AS records, SUM(bytes) AS bytes FROM usage_records \
             WHERE iccid = '{middle_card}' AND date >= '{from_30}'"
        ),
    ));
    list.push((
        "raw usage_records: whole year, count / sum / distinct cards".into(),
        false,
        "SELECT COUNT(*) AS records, SUM(bytes) AS bytes, COUNT(DISTINCT iccid) AS cards \
         FROM usage_records"
            .into(),
    ));

    // DataFusion, in this process.
    let bar = progress(Some((list.len() * (args.reps + 1)) as u64), "DataFusion");
    let mut timed = Vec::new();
    for (name, per_card, q) in &list {
        bar.set_message(format!("DataFusion: {name}"));
        let mut ms = Vec::new();
        let mut rows = 0;
        for _ in 0..=args.reps {
            // Only the query: its rows are counted, not turned into text.
            let t = Instant::now();
            let batches = rt.block_on(sql::query(&ctx, q))?;
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
            rows = batches.iter().map(|b| b.num_rows()).sum();
            bar.inc(1);
        }
        timed.push(QueryTiming {
            name: name.clone(),
            per_card: *per_card,
            sql: q.clone(),
            rows,
            datafusion_first_ms: ms[0],
            datafusion_ms: ms[1..].to_vec(),
            duckdb_first_ms: 0.0,
            duckdb_ms: Vec::new(),
        });
    }
    bar.finish_and_clear();
    drop(ctx);

    // DuckDB, in one Python process, after DataFusion (the same page cache).
    let bar = spinner("DuckDB: the same queries");
    let texts: Vec<&String> = list.iter().map(|(_, _, q)| q).collect();
    let request = json!({ "root": root, "queries": texts, "reps": args.reps });
    let duck = duckdb(&args.duckdb_script, &request).map_err(anyhow::Error::msg)?;
    bar.finish_and_clear();
    let duck_results = duck["results"].as_array().context("duckdb results")?;
    ensure!(
        duck_results.len() == timed.len(),
        "duckdb answered {} queries",
        duck_results.len()
    );
    for (t, d) in timed.iter_mut().zip(duck_results) {
        let rows = d["rows"].as_u64().unwrap_or(u64::MAX) as usize;
        ensure!(
            rows == t.rows,
            "{}: DataFusion returned {} rows, DuckDB {rows}",
            t.name,
            t.rows
        );
        t.duckdb_first_ms = d["first_ms"].as_f64().unwrap_or(0.0);
        t.duckdb_ms = d["ms"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
    }
    let (history_bytes, history_files) = dir_size(&root)?;
    Ok(Timings {
        history_bytes,
        history_files,
        usage_rows,
        days,
        datafusion_open_ms,
        duckdb_open_ms: duck["open_ms"].as_f64().unwrap_or(0.0),
        duckdb_threads: duck["threads"].to_string(),
        queries: timed,
    })
}

fn generate_history(args: &Args) -> Result<()> {
    eprintln!(
        "generating the history: {} cards, {} hours (flowcap run --out {})",
        args.cards,
        args.hours,
        args.data.display()
    );
    let started = Instant::now();
    // flowcap draws its own progress bar on this terminal.
    let status = Command::new(&args.flowcap)
        .args(["run", "--fresh", "--no-notify", "--out"])
        .arg(&args.data)
        .args(["--cards", &args.cards.to_string()])
        .args(["--hours", &args.hours.to_string()])
        .args(["--seed", &args.seed.to_string()])
        .status()
        .context("starting flowcap run")?;
    ensure!(status.success(), "flowcap run failed: {status}");
    eprintln!(
        "history generated in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn dir_size(dir: &Path) -> Result<(u64, u64)> {
    let (mut bytes, mut files) = (0, 0);
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            let (b, f) = dir_size(&entry.path())?;
            bytes += b;
            files += f;
        } else {
            bytes += entry.metadata()?.len();
            files += 1;
        }
    }
    Ok((bytes, files))
}

fn markdown_queries(md: &mut String, args: &Args, t: &Timings) -> Result<()> {
    writeln!(md, "## Console queries: DataFusion vs DuckDB\n")?;
    writeln!(
        md,
        "History: `{}`: {} days, {} usage records, {} files, {:.2} GiB. \
         Medians of {} repetitions after a first run; both engines fetch every row. \
         Opening the history: DataFusion {:.0} ms (listing every table), DuckDB {:.0} ms \
         (views; DuckDB threads: {}).\n",
        args.data.join("history").display(),
        t.days,
        t.usage_rows,
        t.history_files,
        t.history_bytes as f64 / (1u64 << 30) as f64,
        args.reps,
        t.datafusion_open_ms,
        t.duckdb_open_ms,
        t.duckdb_threads,
    )?;
    writeln!(
        md,
        "| query | rows | DataFusion ms (first) | DuckDB ms (first) | DataFusion / DuckDB | goal |"
    )?;
    writeln!(md, "| --- | --- | --- | --- | --- | --- |")?;
    for q in &t.queries {
        let df = median(&q.datafusion_ms);
        let ratio = q.ratio();
        let mut goal = if ratio <= 1.0 {
            "<= 1.0x: yes"
        } else {
            "<= 1.0x: no"
        }
        .to_owned();
        if q.per_card {
            goal += if df < 100.0 {
                ", < 100 ms: yes"
            } else {
                ", < 100 ms: no"
            };
        }
        writeln!(
            md,
            "| {} | {} | {:.1} ({:.1}) | {:.1} ({:.1}) | {:.2} | {} |",
            q.name,
            q.rows,
            df,
            q.datafusion_first_ms,
            median(&q.duckdb_ms),
            q.duckdb_first_ms,
            ratio,
            goal
        )?;
    }
    let met = t.queries.iter().filter(|q| q.ratio() <= 1.0).count();
    writeln!(
        md,
        "\n{met} of {} queries at or under DuckDB's time. ![query times](sql_times.png)\n",
        t.queries.len()
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------
// History cost.

#[derive(Debug, serde::Serialize)]
struct CostRound {
    round: usize,
    with_history: f64,
    without_history: f64,
}

fn history_cost(args: &Args) -> Result<Vec<CostRound>> {
    let work = tempfile::Builder::new()
        .prefix("flowcap-history-cost")
        .tempdir_in(args.report.as_path())?;
    let workload = work.path().join("workload");
    let bar = spinner("history cost: generating the workload");
    let status = Command::new(&args.flowcap)
        .args(["loadgen", "--out"])
        .arg(&workload)
        .args(["--cards", &args.cost_cards.to_string()])
        .args(["--hours", &args.cost_hours.to_string()])
        .args(["--seed", "3"])
        .stdout(Stdio::null())
        .status()?;
    ensure!(status.success(), "flowcap loadgen failed: {status}");
    let mut rounds = Vec::new();
    for round in 1..=args.cost_rounds {
        let rate = |history: bool| -> Result<f64> {
            bar.set_message(format!(
                "history cost: round {round}/{}, history {}",
                args.cost_rounds,
                if history { "on" } else { "off" }
            ));
            let out = work.path().join("out");
            let mut cmd = Command::new(&args.flowcap);
            cmd.args(["run", "-q", "--json", "--fresh", "--no-notify", "--input"])
                .arg(workload.join("usage.jsonl"))
                .arg("--commands")
                .arg(workload.join("commands.jsonl"))
                .arg("--out")
                .arg(&out);
            if !history {
                cmd.arg("--no-history");
            }
            let res = cmd.stderr(Stdio::inherit()).output()?;
            ensure!(res.status.success(), "flowcap run failed: {}", res.status);
            let summary: Value = serde_json::from_slice(&res.stdout)
                .context("flowcap run --json printed no JSON summary")?;
            let rate = summary["summary"]["inputs_per_sec"]
                .as_f64()
                .context("summary without inputs_per_sec")?;
            fs::remove_dir_all(&out)?;
            Ok(rate)
        };
        // Alternate the order so that neither variant always runs first.
        let (with_history, without_history) = if round % 2 == 1 {
            let w = rate(true)?;
            (w, rate(false)?)
        } else {
            let wo = rate(false)?;
            (rate(true)?, wo)
        };
        rounds.push(CostRound {
            round,
            with_history,
            without_history,
        });
    }
    bar.finish_and_clear();
    Ok(rounds)
}

fn markdown_cost(md: &mut String, args: &Args, rounds: &[CostRound]) -> Result<()> {
    writeln!(md, "## Ingest with the history on vs off\n")?;
    writeln!(
        md,
        "`flowcap loadgen --cards {} --hours {} --seed 3`, then `flowcap run --input ... --commands ...` \
         with and without `--no-history`, alternating ({} rounds).\n",
        args.cost_cards, args.cost_hours, args.cost_rounds
    )?;
    writeln!(
        md,
        "| round | history on, inputs/s | history off, inputs/s | on / off |"
    )?;
    writeln!(md, "| --- | --- | --- | --- |")?;
    for r in rounds {
        writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.2} |",
            r.round,
            r.with_history,
            r.without_history,
            r.with_history / r.without_history
        )?;
    }
    let on: f64 = rounds.iter().map(|r| r.with_history).sum::<f64>() / rounds.len() as f64;
    let off: f64 = rounds.iter().map(|r| r.without_history).sum::<f64>() / rounds.len() as f64;
    writeln!(
        md,
        "| mean | {on:.0} | {off:.0} | **{:.2}** |\n\nThe history costs {:.1} % of the \
         ingestion rate (goal: <= 15 %). ![history cost](history_cost.png)\n",
        on / off,
        (1.0 - on / off) * 100.0
    )?;
    Ok(())
}
