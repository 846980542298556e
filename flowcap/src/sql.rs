//! `flowcap sql`, `flowcap query` and `flowcap export`: SQL over the
//! Parquet history (see `flowcap_sql`), printed as a table or
//! written as CSV, JSON lines or Parquet.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::prelude::SessionContext;
use flowcap_ingest::pipeline::HISTORY_DIR;
use flowcap_sql::{self as sql, ConsoleQuery};
use flowcap_storage::HistoryLocation;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

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
        /// The cycle (YYYY-MM; default each carrier's current cycle).
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

/// `[sql]` of the configuration file: who may use `POST /sql` and how much
/// one query may take. `flowcap serve`'s flags override the limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct SqlConfig {
    /// SHA-256 (64 hex digits) of each bearer token `POST /sql` accepts
    /// (`printf %s "$TOKEN" | sha256sum`). `FLOWCAP_SQL_TOKENS` adds
    /// tokens in clear, comma-separated. With none, `/sql` answers only on
    /// a loopback address.
    pub(crate) token_sha256: Vec<String>,
    /// Largest result, in rows: a larger one is refused (413).
    pub(crate) max_rows: usize,
    /// Largest result, in MB of Arrow memory: a larger one is refused (413).
    pub(crate) max_result_mb: usize,
    /// Longest query, in seconds: a slower one is cancelled (503).
    pub(crate) timeout_secs: u64,
    /// Memory all running queries may hold together, in MB: a query that
    /// needs more fails (400); nothing spills to disk.
    pub(crate) memory_limit_mb: usize,
    /// Queries running at once: one more is answered 429.
    pub(crate) max_concurrent: usize,
}

impl Default for SqlConfig {
    fn default() -> Self {
        SqlConfig {
            token_sha256: Vec::new(),
            max_rows: 100_000,
            max_result_mb: 64,
            timeout_secs: 30,
            memory_limit_mb: 512,
            max_concurrent: 2,
        }
    }
}

/// The environment variable with `POST /sql` bearer tokens in clear
/// (comma-separated), added to the config's `token_sha256`.
pub(crate) const TOKENS_ENV: &str = "FLOWCAP_SQL_TOKENS";

/// The bearer tokens `POST /sql` accepts, kept as SHA-256 digests only.
/// A presented token is hashed and compared with every digest in constant
/// time ([`subtle`]), so neither the comparison nor the stored form tells
/// a token away.
#[derive(Clone, Default)]
pub(crate) struct Tokens(Vec<[u8; 32]>);

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} configured)", self.0.len())
    }
}

impl Tokens {
    /// The config's digests plus the clear tokens of `env` (comma-separated;
    /// blanks ignored).
    pub(crate) fn new(sha256_hex: &[String], env: Option<&str>) -> Result<Tokens> {
        let mut digests = Vec::new();
        for (i, text) in sha256_hex.iter().enumerate() {
            let mut digest = [0u8; 32];
            hex::decode_to_slice(text.trim(), &mut digest).map_err(|_| {
                anyhow::anyhow!(
                    "[sql] token_sha256 #{}: not 64 hex digits (the SHA-256 of a token)",
                    i + 1
                )
            })?;
            digests.push(digest);
        }
        for token in env.unwrap_or("").split(',').map(str::trim) {
            if !token.is_empty() {
                digests.push(Sha256::digest(token.as_bytes()).into());
            }
        }
        Ok(Tokens(digests))
    }

    /// From the configuration and [`TOKENS_ENV`].
    pub(crate) fn from_config(config: &SqlConfig) -> Result<Tokens> {
        Tokens::new(
            &config.token_sha256,
            std::env::var(TOKENS_ENV).ok().as_deref(),
        )
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `token` is one of them.
    fn accepts(&self, token: &str) -> bool {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.0
            .iter()
            .fold(subtle::Choice::from(0), |found, d| {
                found | d.as_slice().ct_eq(presented.as_slice())
            })
            .into()
    }
}

/// Whether `/sql` may be served on `addr`: anywhere with tokens, only on a
/// loopback address without (docs/DECISIONS.md, "SQL over HTTP").
pub(crate) fn sql_allowed_on(addr: std::net::SocketAddr, tokens: &Tokens) -> bool {
    addr.ip().is_loopback() || !tokens.is_empty()
}

/// Limits of `POST /sql` (from [`SqlConfig`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SqlLimits {
    /// Largest result, in rows.
    pub(crate) max_rows: usize,
    /// Largest result, in bytes of Arrow memory.
    pub(crate) max_result_bytes: usize,
    /// Longest query.
    pub(crate) timeout: std::time::Duration,
    /// Memory of all running queries together, in bytes.
    pub(crate) memory_limit_bytes: usize,
    /// Queries running at once.
    pub(crate) max_concurrent: usize,
}

impl SqlLimits {
    pub(crate) fn of(config: &SqlConfig) -> SqlLimits {
        SqlLimits {
            max_rows: config.max_rows,
            max_result_bytes: config.max_result_mb.saturating_mul(1 << 20),
            timeout: std::time::Duration::from_secs(config.timeout_secs),
            memory_limit_bytes: config.memory_limit_mb.saturating_mul(1 << 20),
            max_concurrent: config.max_concurrent.max(1),
        }
    }
}

impl Default for SqlLimits {
    fn default() -> Self {
        SqlLimits::of(&SqlConfig::default())
    }
}

/// `POST /sql` over one history directory: a new session per request (so
/// every answer sees the files written so far), read-only, authenticated
/// when tokens are configured, limited in rows, result size, time, memory
/// (one pool shared by every session) and queries at once.
#[derive(Debug)]
pub(crate) struct SqlService {
    root: HistoryLocation,
    limits: SqlLimits,
    tokens: Tokens,
    runtime: Arc<RuntimeEnv>,
    running: Arc<tokio::sync::Semaphore>,
}

/// Arrow IPC stream media type.
const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";

/// Why a request got no rows: its status and message.
type Refusal = (axum::http::StatusCode, String);

impl SqlService {
    pub(crate) fn new(root: HistoryLocation, limits: SqlLimits, tokens: Tokens) -> Result<Self> {
        Ok(SqlService {
            root,
            limits,
            tokens,
            runtime: sql::limited_runtime(limits.memory_limit_bytes)?,
            running: Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent)),
        })
    }

    /// The history it queries.
    pub(crate) fn root(&self) -> &HistoryLocation {
        &self.root
    }

    /// Whether the request carries an accepted token (always, without
    /// tokens configured).
    fn authorized(&self, headers: &axum::http::HeaderMap) -> Result<(), Refusal> {
        use axum::http::{header, StatusCode};
        if self.tokens.is_empty() {
            return Ok(());
        }
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            });
        match presented {
            None => Err((
                StatusCode::UNAUTHORIZED,
                "POST /sql needs an `Authorization: Bearer <token>` header".into(),
            )),
            Some(token) if !self.tokens.accepts(token) => Err((
                StatusCode::UNAUTHORIZED,
                "the bearer token is not accepted".into(),
            )),
            Some(_) => Ok(()),
        }
    }

    /// Runs `text`, a query of this process's own, within the limits;
    /// the rows as JSON objects.
    pub(crate) async fn json_rows(&self, text: &str) -> Result<Vec<serde_json::Value>, Refusal> {
        use axum::http::StatusCode;
        let batches = tokio::time::timeout(self.limits.timeout, self.run(text))
            .await
            .map_err(|_| {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the history query ran out of time".to_owned(),
                )
            })??;
        let internal = |e: String| (StatusCode::INTERNAL_SERVER_ERROR, e);
        let bytes = encode_json_array(&batches).map_err(|e| internal(e.to_string()))?;
        serde_json::from_slice(&bytes).map_err(|e| internal(e.to_string()))
    }

    /// Plans and runs `text`, collecting at most the row and size limits
    /// (one row and one batch beyond them, to tell).
    async fn run(&self, text: &str) -> Result<Vec<RecordBatch>, Refusal> {
        use axum::http::StatusCode;
        use futures::StreamExt;
        let limits = self.limits;
        // Every failure here is the request's: a 400 with the message.
        let bad = |e: sql::SqlError| {
            let message = match &e {
                sql::SqlError::DataFusion(d)
                    if matches!(
                        d.find_root(),
                        datafusion::error::DataFusionError::ResourcesExhausted(_)
                    ) =>
                {
                    format!(
                        "the query needs more memory than /sql allows ({} MB for all \
                         running queries; [sql] memory_limit_mb): {e}",
                        limits.memory_limit_bytes >> 20
                    )
                }
                _ => e.to_string(),
            };
            (StatusCode::BAD_REQUEST, message)
        };
        if let HistoryLocation::Local(dir) = &self.root {
            if !dir.is_dir() {
                return Err((StatusCode::BAD_REQUEST, "no history yet".into()));
            }
        }
        let ctx = sql::open_in(&self.root, self.runtime.clone())
            .await
            .map_err(bad)?;
        let df = sql::plan(&ctx, text).await.map_err(bad)?;
        let df = df
            .limit(0, Some(limits.max_rows.saturating_add(1)))
            .map_err(|e| bad(e.into()))?;
        let mut stream = df.execute_stream().await.map_err(|e| bad(e.into()))?;
        let (mut batches, mut rows, mut bytes) = (Vec::new(), 0usize, 0usize);
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(|e| bad(e.into()))?;
            rows += batch.num_rows();
            bytes += batch.get_array_memory_size();
            batches.push(batch);
            if rows > limits.max_rows {
                return Err((
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "the result has more than {} rows: add a LIMIT or aggregate",
                        limits.max_rows
                    ),
                ));
            }
            if bytes > limits.max_result_bytes {
                return Err((
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "the result is larger than {} MB: add a LIMIT, aggregate or select \
                         fewer columns",
                        limits.max_result_bytes >> 20
                    ),
                ));
            }
        }
        Ok(batches)
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
            let mut response =
                (status, axum::Json(serde_json::json!({ "error": message }))).into_response();
            let extra = match status {
                StatusCode::UNAUTHORIZED => Some((header::WWW_AUTHENTICATE, "Bearer")),
                StatusCode::TOO_MANY_REQUESTS => Some((header::RETRY_AFTER, "1")),
                _ => None,
            };
            if let Some((name, value)) = extra {
                response
                    .headers_mut()
                    .insert(name, axum::http::HeaderValue::from_static(value));
            }
            response
        };
        if let Err((status, message)) = self.authorized(headers) {
            return error(status, message);
        }
        let Ok(_permit) = self.running.clone().try_acquire_owned() else {
            return error(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "{} queries are already running (the limit, [sql] max_concurrent): \
                     retry later",
                    self.limits.max_concurrent
                ),
            );
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
        let batches = match tokio::time::timeout(limits.timeout, self.run(&text)).await {
            Err(_) => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "query cancelled: it ran longer than the {} s limit",
                        limits.timeout.as_secs_f64()
                    ),
                )
            }
            Ok(Err((status, message))) => return error(status, message),
            Ok(Ok(batches)) => batches,
        };
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
    /// Configuration file: its `[sql]` table (tokens, limits).
    #[arg(long, env = "FLOWCAP_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (`/sql`, `/livez`, `/readyz`, `/metrics`). A
    /// non-loopback address needs a token ([sql] token_sha256 or
    /// FLOWCAP_SQL_TOKENS).
    #[arg(long, default_value = "127.0.0.1:8089")]
    http: std::net::SocketAddr,
    /// Largest result of `/sql`, in rows (default [sql] max_rows).
    #[arg(long)]
    max_rows: Option<usize>,
    /// Longest `/sql` query, in seconds (default [sql] timeout_secs).
    #[arg(long)]
    timeout_secs: Option<u64>,
    /// Memory of all running `/sql` queries together, in MB (default [sql]
    /// memory_limit_mb).
    #[arg(long)]
    memory_limit_mb: Option<usize>,
    /// `/sql` queries running at once (default [sql] max_concurrent).
    #[arg(long)]
    max_concurrent: Option<usize>,
}

/// `flowcap serve`: `POST /sql` over a history until interrupted.
pub(crate) fn serve(args: ServeArgs) -> Result<()> {
    let root = history_location(&args.data, args.history.as_deref())?;
    let file = crate::load_config(args.config.as_deref())?;
    let mut config = file.sql;
    config.max_rows = args.max_rows.unwrap_or(config.max_rows);
    config.timeout_secs = args.timeout_secs.unwrap_or(config.timeout_secs);
    config.memory_limit_mb = args.memory_limit_mb.unwrap_or(config.memory_limit_mb);
    config.max_concurrent = args.max_concurrent.unwrap_or(config.max_concurrent);
    let tokens = Tokens::from_config(&config)?;
    if !sql_allowed_on(args.http, &tokens) {
        bail!(
            "refusing to serve /sql on {} without a token: bind a loopback address \
             (127.0.0.1) or set [sql] token_sha256 in --config or {TOKENS_ENV}",
            args.http
        );
    }
    let health = std::sync::Arc::new(flowcap_ingest::Health::new());
    health.set_ready();
    let service = std::sync::Arc::new(SqlService::new(root, SqlLimits::of(&config), tokens)?);
    // The operator API, read-only, over the newest snapshot (if any).
    let mut answering = None;
    let api = match crate::api::snapshot::newest(&args.data)? {
        Some((engine, seq)) if file.api.enabled => {
            let (api, requests) = crate::api::build(
                &file.api,
                args.http,
                crate::api::Submit::Embedded,
                Some(service.clone()),
                &args.data,
            )?;
            // The events as far as this snapshot covers them.
            let events = format!("out.{}", flowcap_ingest::pipeline::EVENTS_FILE);
            if let Some(&bytes) = engine.positions().get(&events) {
                requests
                    .durable_mark()
                    .set(flowcap_ingest::requests::DurableEvents {
                        bytes: u64::try_from(bytes).unwrap_or(0),
                        seq,
                    });
            }
            answering = Some((crate::api::snapshot::serve(engine, seq, requests)?, seq));
            Some(api)
        }
        _ => None,
    };
    let server = crate::ops::serve(args.http, health, Some(service), api)?;
    eprintln!(
        "serving POST http://{}/sql until interrupted",
        server.local_addr()
    );
    if let Some((_, seq)) = &answering {
        eprintln!(
            "serving http://{}/api/v1 read-only at input #{seq} (the newest snapshot)",
            server.local_addr()
        );
    }
    crate::wait_for_interrupt()?;
    server.shutdown();
    // The thread ends with the server's last request sender.
    drop(answering);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::SocketAddr;
    use std::time::Duration;

    const TOKEN: &str = "s3cret-for-sql";

    fn sha256_hex(text: &str) -> String {
        hex::encode(Sha256::digest(text.as_bytes()))
    }

    /// One HTTP/1.1 POST /sql: (status, head, body).
    fn post(addr: SocketAddr, token: Option<&str>, sql: &str) -> (u16, String, String) {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        write!(
            stream,
            "POST /sql HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}\
             Content-Length: {}\r\n\r\n{sql}",
            sql.len()
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, head.to_owned(), body.to_owned())
    }

    fn get(addr: SocketAddr, path: &str) -> u16 {
        crate::ops::tests::get(addr, path).0
    }

    /// A server over an empty history, with `TOKEN` (and `other` from the
    /// environment's form) accepted.
    fn server(config: SqlConfig) -> (tempfile::TempDir, crate::ops::OpsServer) {
        let dir = tempfile::tempdir().unwrap();
        let tokens = Tokens::new(&config.token_sha256, Some(" other , ")).unwrap();
        let service = SqlService::new(
            HistoryLocation::Local(dir.path().to_owned()),
            SqlLimits::of(&config),
            tokens,
        )
        .unwrap();
        let health = Arc::new(flowcap_ingest::Health::new());
        let server = crate::ops::serve(
            "127.0.0.1:0".parse().unwrap(),
            health,
            Some(Arc::new(service)),
            None,
        )
        .unwrap();
        (dir, server)
    }

    fn with_token() -> SqlConfig {
        SqlConfig {
            token_sha256: vec![sha256_hex(TOKEN)],
            ..SqlConfig::default()
        }
    }

    #[test]
    fn sql_needs_a_right_token_and_the_other_endpoints_none() {
        let (_dir, server) = server(with_token());
        let addr = server.local_addr();
        let (status, head, body) = post(addr, None, "SELECT 1 AS one");
        assert_eq!(status, 401, "{body}");
        assert!(
            head.to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{head}"
        );
        assert!(body.contains("Authorization: Bearer"), "{body}");
        let (status, _, body) = post(addr, Some("wrong"), "SELECT 1 AS one");
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("not accepted"), "{body}");
        let (status, _, body) = post(addr, Some(&format!("{TOKEN}x")), "SELECT 1 AS one");
        assert_eq!(status, 401, "{body}");
        for token in [TOKEN, "other"] {
            let (status, _, body) = post(addr, Some(token), "SELECT 1 AS one");
            assert_eq!((status, body.as_str()), (200, r#"[{"one":1}]"#));
        }
        assert_eq!(get(addr, "/livez"), 200);
        assert_eq!(get(addr, "/metrics"), 200);
        assert_eq!(get(addr, "/readyz"), 503, "open, and not ready yet");
    }

    #[test]
    fn ddl_dml_and_statements_are_refused() {
        let (_dir, server) = server(with_token());
        let addr = server.local_addr();
        for bad in [
            "CREATE VIEW v AS SELECT 1",
            "CREATE TABLE t AS SELECT 1",
            "INSERT INTO cards VALUES (1)",
            "COPY (SELECT 1) TO '/tmp/flowcap-sql-test.csv'",
            "SET datafusion.execution.batch_size = 1",
            "DROP VIEW card_daily_usage",
        ] {
            let (status, _, body) = post(addr, Some(TOKEN), bad);
            assert_eq!(status, 400, "{bad}: {body}");
            assert!(body.contains("read-only"), "{bad}: {body}");
        }
        assert!(!Path::new("/tmp/flowcap-sql-test.csv").exists());
    }

    #[test]
    fn a_memory_hungry_query_fails_cleanly_and_the_server_keeps_serving() {
        let (_dir, server) = server(SqlConfig {
            memory_limit_mb: 8,
            max_result_mb: 2,
            ..with_token()
        });
        let addr = server.local_addr();
        {
            let hungry =
                "SELECT value % 3 AS k, array_agg(value) AS all FROM generate_series(1, 5000000) GROUP BY k";
            let (status, _, body) = post(addr, Some(TOKEN), hungry);
            assert_eq!(status, 400, "{hungry}: {body}");
            assert!(body.contains("needs more memory"), "{hungry}: {body}");
        }
        // A generated series is not held in the pool: the result limits
        // stop it.
        let (status, _, body) = post(
            addr,
            Some(TOKEN),
            "SELECT value FROM generate_series(1, 1000000000000)",
        );
        assert_eq!(status, 413, "{body}");
        assert!(body.contains("more than 100000 rows"), "{body}");
        let (status, _, body) = post(
            addr,
            Some(TOKEN),
            "SELECT repeat('x', 1000) AS s FROM generate_series(1, 5000)",
        );
        assert_eq!(status, 413, "{body}");
        assert!(body.contains("larger than 2 MB"), "{body}");
        let (status, _, body) = post(addr, Some(TOKEN), "SELECT 1 AS one");
        assert_eq!((status, body.as_str()), (200, r#"[{"one":1}]"#));
    }

    #[tokio::test]
    async fn a_query_beyond_the_concurrency_limit_is_answered_429() {
        let dir = tempfile::tempdir().unwrap();
        let config = SqlConfig {
            max_concurrent: 1,
            ..SqlConfig::default()
        };
        let service = SqlService::new(
            HistoryLocation::Local(dir.path().to_owned()),
            SqlLimits::of(&config),
            Tokens::default(),
        )
        .unwrap();
        let headers = axum::http::HeaderMap::new();
        let body = |r: axum::response::Response| async move {
            let status = r.status().as_u16();
            let retry = r.headers().get("retry-after").cloned();
            let bytes = axum::body::to_bytes(r.into_body(), usize::MAX)
                .await
                .unwrap();
            (status, retry, String::from_utf8(bytes.to_vec()).unwrap())
        };
        // One query running (its permit held).
        let running = service.running.clone().try_acquire_owned().unwrap();
        let (status, retry, text) =
            body(service.answer(&headers, "SELECT 1 AS one".into()).await).await;
        assert_eq!(status, 429, "{text}");
        assert_eq!(retry.unwrap(), "1");
        assert!(text.contains("1 queries are already running"), "{text}");
        drop(running);
        let (status, _, text) =
            body(service.answer(&headers, "SELECT 1 AS one".into()).await).await;
        assert_eq!((status, text.as_str()), (200, r#"[{"one":1}]"#));
    }

    #[tokio::test]
    async fn the_plan_check_refuses_ddl_dml_and_statements_on_its_own() {
        let ctx = SessionContext::new();
        for bad in [
            "CREATE VIEW v AS SELECT 1",
            "CREATE TABLE t AS SELECT 1",
            "SET datafusion.execution.batch_size = 1",
        ] {
            let e = ctx
                .sql_with_options(bad, sql::read_only_options())
                .await
                .err()
                .unwrap_or_else(|| panic!("{bad} planned"));
            assert!(e.to_string().contains("not supported"), "{bad}: {e}");
        }
        let ctx = SessionContext::new_with_config(
            datafusion::prelude::SessionConfig::new().with_information_schema(true),
        );
        for ok in ["SELECT 1", "SHOW TABLES", "EXPLAIN SELECT 1"] {
            sql::plan(&ctx, ok)
                .await
                .unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn sql_is_served_off_loopback_only_with_a_token() {
        let none = Tokens::default();
        let some = Tokens::new(&[], Some("t")).unwrap();
        let any: SocketAddr = "0.0.0.0:8089".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:8089".parse().unwrap();
        let local6: SocketAddr = "[::1]:8089".parse().unwrap();
        assert!(!sql_allowed_on(any, &none));
        assert!(sql_allowed_on(any, &some));
        assert!(sql_allowed_on(local, &none) && sql_allowed_on(local6, &none));
        let e = Tokens::new(&["abc".into()], None).unwrap_err();
        assert!(e.to_string().contains("token_sha256 #1"), "{e}");
        assert!(Tokens::new(&[], Some(" , ")).unwrap().is_empty());
        assert_eq!(format!("{some:?}"), "Tokens(1 configured)");
    }
}
