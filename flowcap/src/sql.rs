//! `flowcap sql`, `flowcap query` and `flowcap export`: SQL over the
//! Parquet history (see `flowcap_storage::sql`), printed as a table or
//! written as CSV, JSON lines or Parquet.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::prelude::SessionContext;
use flowcap_ingest::embedded::HISTORY_DIR;
use flowcap_storage::sql::{self, ConsoleQuery};
use flowcap_storage::HistoryLocation;

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    /// An aligned text table.
    Table,
    /// CSV with a header line.
    Csv,
    /// JSON lines: one object per row.
    Json,
    /// Parquet (needs `--output`).
    Parquet,
}

#[derive(Debug, Args)]
pub(crate) struct Target {
    /// The pipeline's output directory (its `history/` is queried), or a
    /// history directory itself.
    #[arg(
        long,
        short,
        default_value = "flowcap-data",
        env = "FLOWCAP_DATA",
        global = true
    )]
    pub(crate) data: PathBuf,
    /// The history itself, instead of `<data>/history`: a directory or an
    /// `s3://bucket/prefix` URL (credentials and endpoint from the AWS_*
    /// environment variables).
    #[arg(long, env = "FLOWCAP_HISTORY", global = true, value_name = "LOCATION")]
    pub(crate) history: Option<String>,
    /// Output format (default: a table, or from the --output extension).
    #[arg(long, short, value_enum, global = true)]
    format: Option<Format>,
    /// Write to FILE instead of standard output.
    #[arg(long, short, global = true)]
    output: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct SqlArgs {
    /// One read-only query (SELECT, WITH, EXPLAIN, SHOW, DESCRIBE). Without
    /// it an interactive prompt opens (history in ~/.flowcap_sql_history).
    query: Option<String>,
    #[command(flatten)]
    target: Target,
}

#[derive(Debug, Args)]
pub(crate) struct ExportArgs {
    /// The query whose result is exported.
    query: String,
    #[command(flatten)]
    target: Target,
}

#[derive(Debug, Args)]
pub(crate) struct QueryArgs {
    #[command(subcommand)]
    query: Named,
    #[command(flatten)]
    target: Target,
    /// Print the SQL instead of running it.
    #[arg(long, global = true)]
    show_sql: bool,
}

/// The console's queries (SPEC section 8). "Now" is the newest day in the
/// history.
#[derive(Debug, Subcommand)]
enum Named {
    /// One card's usage per cycle (last 6) and per day (last 2 months).
    CardUsage {
        /// The card.
        iccid: String,
        /// Cycles to show.
        #[arg(long, default_value_t = 6)]
        cycles: u32,
        /// Days to show.
        #[arg(long, default_value_t = 61)]
        days: u32,
    },
    /// Top cards by usage in a cycle.
    TopCards {
        /// The cycle (YYYY-MM; default the newest).
        #[arg(long)]
        cycle: Option<String>,
        /// How many.
        #[arg(long, short = 'n', default_value_t = 10)]
        limit: u32,
    },
    /// Total usage per day.
    DailyTotals {
        /// Days to show.
        #[arg(long, default_value_t = 30)]
        days: u32,
    },
    /// A pool's (or every pool's) used / remaining / allowance per cycle.
    PoolUsage {
        /// The pool (default all).
        pool: Option<String>,
    },
    /// Cards per state.
    StateCounts,
    /// Cards whose plan expires within 30, 60 and 90 days.
    Expiring,
    /// Rule executions by rule, card and time, newest first.
    RuleExecutions {
        /// One rule.
        #[arg(long)]
        rule: Option<String>,
        /// One card.
        #[arg(long)]
        iccid: Option<String>,
        /// How many.
        #[arg(long, short = 'n', default_value_t = 100)]
        limit: u32,
    },
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the query runtime")
}

/// The history to query: `--history` when given, else `<data>/history`,
/// or `<data>` itself if it is one.
pub(crate) fn history_location(data: &Path, history: Option<&str>) -> Result<HistoryLocation> {
    if let Some(location) = history {
        return Ok(HistoryLocation::parse(location)?);
    }
    let nested = data.join(HISTORY_DIR);
    if nested.is_dir() {
        return Ok(HistoryLocation::Local(nested));
    }
    if data.join("usage_records").is_dir() || data.join("cards").is_dir() {
        return Ok(HistoryLocation::Local(data.to_owned()));
    }
    bail!(
        "no history in {}: run `flowcap run --out {}` first",
        data.display(),
        data.display()
    )
}

pub(crate) fn sql(args: SqlArgs) -> Result<()> {
    let root = history_location(&args.target.data, args.target.history.as_deref())?;
    let rt = runtime()?;
    rt.block_on(async {
        let ctx = sql::open(&root).await?;
        match &args.query {
            Some(q) => {
                let batches = sql::query(&ctx, q).await?;
                emit(&batches, &args.target)
            }
            None => repl(&ctx).await,
        }
    })
}

pub(crate) fn export(args: ExportArgs) -> Result<()> {
    if args.target.output.is_none() {
        bail!("export needs --output FILE (.csv, .json, .jsonl or .parquet)");
    }
    let root = history_location(&args.target.data, args.target.history.as_deref())?;
    runtime()?.block_on(async {
        let ctx = sql::open(&root).await?;
        let batches = sql::query(&ctx, &args.query).await?;
        emit(&batches, &args.target)
    })
}

pub(crate) fn query(args: QueryArgs) -> Result<()> {
    let root = history_location(&args.target.data, args.target.history.as_deref())?;
    let queries: Vec<(&str, ConsoleQuery)> = match &args.query {
        Named::CardUsage {
            iccid,
            cycles,
            days,
        } => vec![
            (
                "per cycle",
                ConsoleQuery::CardCycles {
                    iccid: iccid.clone(),
                    cycles: *cycles,
                },
            ),
            (
                "per day",
                ConsoleQuery::CardDays {
                    iccid: iccid.clone(),
                    days: *days,
                },
            ),
        ],
        Named::TopCards { cycle, limit } => vec![(
            "",
            ConsoleQuery::TopCards {
                cycle: cycle.clone(),
                limit: *limit,
            },
        )],
        Named::DailyTotals { days } => vec![("", ConsoleQuery::DailyTotals { days: *days })],
        Named::PoolUsage { pool } => vec![("", ConsoleQuery::PoolUsage { pool: pool.clone() })],
        Named::StateCounts => vec![("", ConsoleQuery::StateCounts)],
        Named::Expiring => vec![("", ConsoleQuery::Expiring)],
        Named::RuleExecutions { rule, iccid, limit } => vec![(
            "",
            ConsoleQuery::RuleExecutions {
                rule: rule.clone(),
                iccid: iccid.clone(),
                limit: *limit,
            },
        )],
    };
    if queries.len() > 1 && args.target.output.is_some() {
        bail!("this query has several results: print them, or export each with `flowcap export`");
    }
    runtime()?.block_on(async {
        let ctx = sql::open(&root).await?;
        let latest = sql::Latest::of(&root).await?;
        for (title, q) in &queries {
            let text = q.sql(&latest)?;
            if args.show_sql {
                println!("{text};");
                continue;
            }
            if !title.is_empty() {
                println!("{title}:");
            }
            let batches = sql::query(&ctx, &text).await?;
            emit(&batches, &args.target)?;
        }
        Ok(())
    })
}

async fn repl(ctx: &SessionContext) -> Result<()> {
    use rustyline::error::ReadlineError;
    let mut editor = rustyline::DefaultEditor::new().context("opening the prompt")?;
    let history = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".flowcap_sql_history"));
    if let Some(h) = &history {
        let _ = editor.load_history(h);
    }
    println!("flowcap SQL over the history. Tables: SHOW TABLES; end a query with ';'; quit with \\q or Ctrl-D.");
    let target = Target {
        data: PathBuf::new(),
        history: None,
        format: Some(Format::Table),
        output: None,
    };
    let mut buffer = String::new();
    loop {
        let prompt = if buffer.is_empty() {
            "flowcap> "
        } else {
            "    ...> "
        };
        match editor.readline(prompt) {
            Ok(line) => {
                let trimmed = line.trim();
                if buffer.is_empty() && matches!(trimmed, "\\q" | "quit" | "exit") {
                    break;
                }
                buffer.push_str(&line);
                buffer.push('\n');
                if !trimmed.ends_with(';') {
                    continue;
                }
                let text = std::mem::take(&mut buffer);
                let _ = editor.add_history_entry(text.trim());
                let started = std::time::Instant::now();
                match sql::query(ctx, text.trim().trim_end_matches(';')).await {
                    Ok(batches) => {
                        emit(&batches, &target)?;
                        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
                        println!("{rows} rows in {:.3} s", started.elapsed().as_secs_f64());
                    }
                    Err(e) => eprintln!("error: {e}"),
                }
            }
            Err(ReadlineError::Interrupted) => buffer.clear(),
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(h) = &history {
        let _ = editor.save_history(h);
    }
    Ok(())
}

fn format_of(target: &Target) -> Result<Format> {
    if let Some(f) = target.format {
        return Ok(f);
    }
    let ext = target
        .output
        .as_ref()
        .and_then(|p| p.extension())
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    Ok(match ext.as_deref() {
        None => Format::Table,
        Some("csv") => Format::Csv,
        Some("json" | "jsonl" | "ndjson") => Format::Json,
        Some("parquet") => Format::Parquet,
        Some("txt") => Format::Table,
        Some(other) => bail!("unknown output extension .{other}: pass --format"),
    })
}

/// Writes query results in the target's format.
pub(crate) fn emit(batches: &[RecordBatch], target: &Target) -> Result<()> {
    let format = format_of(target)?;
    let mut out: Box<dyn Write + Send> = match &target.output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None if format == Format::Parquet => bail!("--format parquet needs --output FILE"),
        None => Box::new(std::io::stdout()),
    };
    match format {
        Format::Table => {
            let text = datafusion::arrow::util::pretty::pretty_format_batches(batches)?;
            writeln!(out, "{text}")?;
        }
        Format::Csv => write_csv(&mut out, batches)?,
        Format::Json => {
            let mut w = datafusion::arrow::json::LineDelimitedWriter::new(&mut out);
            for b in batches {
                w.write(b)?;
            }
            w.finish()?;
        }
        Format::Parquet => {
            let Some(schema) = batches.first().map(RecordBatch::schema) else {
                bail!("the query returned no batches: nothing to write");
            };
            let mut w = datafusion::parquet::arrow::ArrowWriter::try_new(&mut out, schema, None)?;
            for b in batches {
                w.write(b)?;
            }
            w.close()?;
        }
    }
    out.flush()?;
    Ok(())
}

/// Limits of `POST /sql`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SqlLimits {
    /// Largest result, in rows: a larger one is refused (413).
    pub(crate) max_rows: usize,
    /// Longest query: a slower one is cancelled (503).
    pub(crate) timeout: std::time::Duration,
}

impl Default for SqlLimits {
    fn default() -> Self {
        SqlLimits {
            max_rows: 100_000,
            timeout: std::time::Duration::from_secs(30),
        }
    }
}

/// `POST /sql` over one history directory: a new session per request (so
/// every answer sees the files written so far), read-only, limited.
#[derive(Debug)]
pub(crate) struct SqlService {
    root: HistoryLocation,
    limits: SqlLimits,
}

/// Arrow IPC stream media type.
const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";

impl SqlService {
    pub(crate) fn new(root: HistoryLocation, limits: SqlLimits) -> SqlService {
        SqlService { root, limits }
    }

    /// Answers one request: the SQL is the body, or `{"sql": "..."}` when
    /// the content type is JSON.
    pub(crate) async fn answer(
        &self,
        headers: &axum::http::HeaderMap,
        body: String,
    ) -> axum::response::Response {
        use axum::http::{header, StatusCode};
        use axum::response::IntoResponse;
        let header_of = |name| {
            headers
                .get(name)
                .and_then(|v: &axum::http::HeaderValue| v.to_str().ok())
                .unwrap_or("")
                .to_ascii_lowercase()
        };
        let error = |status: StatusCode, message: String| {
            (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
        };
        let text = if header_of(header::CONTENT_TYPE).starts_with("application/json") {
            match serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("sql")?.as_str().map(str::to_owned))
            {
                Some(t) => t,
                None => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "a JSON body must be {\"sql\": \"SELECT ...\"}".into(),
                    )
                }
            }
        } else {
            body
        };
        let accept = header_of(header::ACCEPT);
        let format = if accept.contains(ARROW_STREAM) {
            None
        } else if accept.contains("text/csv") {
            Some(Format::Csv)
        } else {
            Some(Format::Json)
        };
        let limits = self.limits;
        // Every failure here is the request's: a 400 with the message.
        let run = async {
            if let HistoryLocation::Local(dir) = &self.root {
                if !dir.is_dir() {
                    return Err("no history yet".to_owned());
                }
            }
            let ctx = sql::open(&self.root).await.map_err(|e| e.to_string())?;
            sql::check_read_only(&ctx, &text).map_err(|e| e.to_string())?;
            let df = ctx.sql(&text).await.map_err(|e| e.to_string())?;
            let df = df
                .limit(0, Some(limits.max_rows + 1))
                .map_err(|e| e.to_string())?;
            df.collect().await.map_err(|e| e.to_string())
        };
        let batches = match tokio::time::timeout(limits.timeout, run).await {
            Err(_) => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "query cancelled: it ran longer than the {} s limit",
                        limits.timeout.as_secs_f64()
                    ),
                )
            }
            Ok(Err(message)) => return error(StatusCode::BAD_REQUEST, message),
            Ok(Ok(batches)) => batches,
        };
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        if rows > limits.max_rows {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the result has more than {} rows: add a LIMIT or aggregate",
                    limits.max_rows
                ),
            );
        }
        let encoded = match format {
            None => encode_ipc(&batches).map(|b| (ARROW_STREAM, b)),
            Some(Format::Csv) => {
                let mut out = Vec::new();
                write_csv(&mut out, &batches).map(|()| ("text/csv", out))
            }
            Some(_) => encode_json_array(&batches).map(|b| ("application/json", b)),
        };
        match encoded {
            Ok((content_type, bytes)) => {
                ([(header::CONTENT_TYPE, content_type)], bytes).into_response()
            }
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
}

/// CSV with a header line (`flowcap sql -f csv` and `/sql`).
fn write_csv(out: impl Write, batches: &[RecordBatch]) -> Result<()> {
    let mut w = datafusion::arrow::csv::WriterBuilder::new()
        .with_header(true)
        .build(out);
    for b in batches {
        w.write(b)?;
    }
    Ok(())
}

fn encode_json_array(batches: &[RecordBatch]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut w = datafusion::arrow::json::ArrayWriter::new(&mut out);
    for b in batches {
        w.write(b)?;
    }
    w.finish()?;
    if out.is_empty() {
        out.extend_from_slice(b"[]");
    }
    Ok(out)
}

fn encode_ipc(batches: &[RecordBatch]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let Some(schema) = batches.first().map(RecordBatch::schema) else {
        return Ok(out);
    };
    let mut w = datafusion::arrow::ipc::writer::StreamWriter::try_new(&mut out, &schema)?;
    for b in batches {
        w.write(b)?;
    }
    w.finish()?;
    drop(w);
    Ok(out)
}

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// The pipeline's output directory (its `history/`), or a history
    /// directory.
    #[arg(long, short, default_value = "flowcap-data", env = "FLOWCAP_DATA")]
    pub(crate) data: PathBuf,
    /// The history itself, instead of `<data>/history`: a directory or an
    /// `s3://bucket/prefix` URL.
    #[arg(long, env = "FLOWCAP_HISTORY", value_name = "LOCATION")]
    history: Option<String>,
    /// Address to listen on (`/sql`, `/livez`, `/readyz`, `/metrics`).
    #[arg(long, default_value = "127.0.0.1:8089")]
    http: std::net::SocketAddr,
    /// Largest result of `/sql`, in rows.
    #[arg(long, default_value_t = SqlLimits::default().max_rows)]
    max_rows: usize,
    /// Longest `/sql` query, in seconds.
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
}

/// `flowcap serve`: `POST /sql` over a history until interrupted.
pub(crate) fn serve(args: ServeArgs) -> Result<()> {
    let root = history_location(&args.data, args.history.as_deref())?;
    let health = std::sync::Arc::new(flowcap_ingest::Health::new());
    health.set_ready();
    let service = std::sync::Arc::new(SqlService::new(
        root,
        SqlLimits {
            max_rows: args.max_rows,
            timeout: std::time::Duration::from_secs(args.timeout_secs),
        },
    ));
    let server = crate::ops::serve(args.http, health, Some(service))?;
    eprintln!(
        "serving POST http://{}/sql until interrupted",
        server.local_addr()
    );
    crate::wait_for_interrupt()?;
    server.shutdown();
    Ok(())
}
