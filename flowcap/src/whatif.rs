//! `flowcap rules replay`: what a draft rule would have done.
//!
//! The usage history and the command journal in Parquet fully determine
//! the engine's state (SPEC section 5), so the replay rebuilds it: a fresh
//! engine, on one thread, gets every journaled command and every accounted
//! usage record again in their original input order (both tables carry
//! `input_seq`), with the draft rule added, and nothing is sent: the
//! replay has no notifier. Firings of the draft inside `--from`..`--to`
//! (local days of the billing time zone) are reported: when, which card
//! or pool, what was observed, and which record or command caused it.
//!
//! The draft joins at the first usage record, after the set-up commands
//! that precede it; a draft that names something created later (a
//! webhook, a pool, a tag) joins after the first command that makes it
//! valid. From then on it behaves as a rule the operator had added at that
//! point (docs/DECISIONS.md: a rule added mid-cycle fires at once for the
//! targets already inside). A rule of the history with the draft's id is
//! left out of the replay: the draft takes its place.
//!
//! Records after `--to` are not read. The replay starts at the beginning of
//! the history: reminder windows and card state before `--from` count.
//!
//! The replay itself ([`firings`]) is shared with the operator API's
//! what-if (`POST /api/v1/rules/what-if`), which answers the same rows
//! ([`Firing`]) as JSON.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use datafusion::arrow::array::{Array, AsArray, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Int64Type, Schema};
use flowcap_engine::command::{parse_command, CommandKind};
use flowcap_engine::event::RuleFiredEvent;
use flowcap_engine::{
    ActionEvent, Carrier, Engine, EngineConfig, Output, RecordId, Timestamp, Usage,
};
use flowcap_storage::HistoryLocation;
use futures::StreamExt;
use serde::Serialize;

use crate::sql::{emit, history_location, Target};

/// `flowcap rules replay` arguments.
#[derive(Debug, Args)]
pub(crate) struct ReplayArgs {
    /// The draft rule: a TOML file with the fields of `upsert_rule`'s
    /// `rule` (id, name, type, condition, filter, actions, reminder).
    #[arg(long, value_name = "FILE")]
    rule: PathBuf,
    /// First local day to report (YYYY-MM-DD).
    #[arg(long, value_name = "DATE")]
    from: String,
    /// Last local day to report (YYYY-MM-DD), included.
    #[arg(long, value_name = "DATE")]
    to: String,
    #[command(flatten)]
    target: Target,
}

const DRAFT_COMMAND: &str = "flowcap-whatif-draft";

fn local_midnight(date: &str, offset_secs: i32) -> Result<Timestamp> {
    let sign = if offset_secs < 0 { '-' } else { '+' };
    let off = offset_secs.unsigned_abs();
    let text = format!(
        "{date}T00:00:00{sign}{:02}:{:02}",
        off / 3600,
        off % 3600 / 60
    );
    Timestamp::parse_rfc3339(&text).with_context(|| format!("{date:?} is not a date (YYYY-MM-DD)"))
}

/// The draft as the `rule` of an `upsert_rule` command.
fn draft_rule(path: &PathBuf) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: toml::Value =
        toml::from_str(&text).with_context(|| format!("draft {}", path.display()))?;
    let mut rule = serde_json::to_value(value)?;
    let Some(obj) = rule.as_object_mut() else {
        bail!("draft {}: expected a table", path.display());
    };
    if !obj.get("id").is_some_and(|v| v.is_string()) {
        bail!("draft {}: needs an `id`", path.display());
    }
    obj.insert("enabled".into(), serde_json::Value::Bool(true));
    Ok(rule)
}

/// One input of the replay, in `input_seq` order.
enum Input {
    Command(u64, Vec<u8>),
    Usage(u64, Usage),
}

/// A column cast to `to` (Parquet strings may come back as views or
/// dictionaries, whatever the query asked).
fn column(batch: &RecordBatch, name: &str, to: &DataType) -> Result<Arc<dyn Array>> {
    let c = batch
        .column_by_name(name)
        .with_context(|| format!("history column {name} missing"))?;
    Ok(datafusion::arrow::compute::cast(c, to)?)
}

fn usages(batch: &RecordBatch) -> Result<Vec<Input>> {
    let (i64s, text) = (DataType::Int64, DataType::Utf8);
    let (seq, iccid, record) = (
        column(batch, "seq", &i64s)?,
        column(batch, "iccid", &text)?,
        column(batch, "record_id", &text)?,
    );
    let (start, end, up, down, carrier) = (
        column(batch, "start_ms", &i64s)?,
        column(batch, "end_ms", &i64s)?,
        column(batch, "bytes_up", &i64s)?,
        column(batch, "bytes_down", &i64s)?,
        column(batch, "carrier", &text)?,
    );
    let (seq, start, end) = (
        seq.as_primitive::<Int64Type>(),
        start.as_primitive::<Int64Type>(),
        end.as_primitive::<Int64Type>(),
    );
    let (up, down) = (
        up.as_primitive::<Int64Type>(),
        down.as_primitive::<Int64Type>(),
    );
    let (iccid, record, carrier) = (
        iccid.as_string::<i32>(),
        record.as_string::<i32>(),
        carrier.as_string::<i32>(),
    );
    let mut out = Vec::with_capacity(batch.num_rows());
    for i in 0..batch.num_rows() {
        let usage = Usage {
            record_id: RecordId::new(record.value(i))
                .with_context(|| format!("record id {:?}", record.value(i)))?,
            iccid: iccid
                .value(i)
                .parse()
                .map_err(|e| anyhow::anyhow!("iccid {:?}: {e:?}", iccid.value(i)))?,
            start: (!start.is_null(i)).then(|| Timestamp(start.value(i))),
            end: Timestamp(end.value(i)),
            bytes_up: u64::try_from(up.value(i)).unwrap_or(0),
            bytes_down: u64::try_from(down.value(i)).unwrap_or(0),
            carrier: (!carrier.is_null(i))
                .then(|| Carrier::parse(carrier.value(i).as_bytes()))
                .flatten(),
            imei: None,
        };
        out.push(Input::Usage(
            u64::try_from(seq.value(i)).unwrap_or(0),
            usage,
        ));
    }
    Ok(out)
}

/// What the replay found.
pub(crate) struct Replayed {
    /// The draft's firings inside the window, in input order.
    pub(crate) firings: Vec<RuleFiredEvent>,
    /// Usage records replayed.
    pub(crate) records: u64,
    /// Commands replayed.
    pub(crate) commands: u64,
    /// The replay's input number at which the draft joined (none: it never
    /// validated).
    pub(crate) joined_at: Option<u64>,
}

struct Replay {
    engine: Engine,
    draft: serde_json::Value,
    draft_id: String,
    joined: bool,
    window: (Timestamp, Timestamp),
    out: Vec<Output>,
    found: Replayed,
}

impl Replay {
    fn try_join(&mut self, seq: u64, at: Timestamp) {
        // A repeated command id is answered with its first result: a new id
        // for every try.
        let command = serde_json::json!({"id": format!("{DRAFT_COMMAND}-{seq}"),
            "type": "upsert_rule", "at": at.to_rfc3339(0), "rule": self.draft});
        let Ok(command) = parse_command(command.to_string().as_bytes()) else {
            return;
        };
        self.engine.process_command(command, seq, &mut self.out);
        self.joined = self
            .out
            .iter()
            .any(|o| matches!(o, Output::Journal(j) if j.result.ok));
        if self.joined {
            self.found.joined_at = Some(seq);
        }
        self.collect();
    }

    fn collect(&mut self) {
        for o in self.out.drain(..) {
            if let Output::Action(ActionEvent::RuleFired(f)) = o {
                if f.rule == self.draft_id
                    && f.event_time >= self.window.0
                    && f.event_time < self.window.1
                {
                    self.found.firings.push(*f);
                }
            }
        }
    }

    fn feed(&mut self, input: Input) -> Result<()> {
        match input {
            Input::Command(seq, bytes) => {
                self.found.commands += 1;
                let Ok(command) = parse_command(&bytes) else {
                    return Ok(());
                };
                // The draft replaces a historic rule of the same id.
                if let CommandKind::UpsertRule { rule } = &command.kind {
                    if rule.id == self.draft_id {
                        return Ok(());
                    }
                }
                if let CommandKind::EnableRule { rule }
                | CommandKind::DisableRule { rule }
                | CommandKind::RemoveRule { rule } = &command.kind
                {
                    if *rule == self.draft_id {
                        return Ok(());
                    }
                }
                let at = command.at;
                self.engine.process_command(command, seq * 2, &mut self.out);
                self.collect();
                if !self.joined && self.found.records > 0 {
                    self.try_join(seq * 2 + 1, at);
                }
            }
            Input::Usage(seq, usage) => {
                if !self.joined && self.found.records == 0 {
                    self.try_join(seq * 2, usage.end);
                }
                self.found.records += 1;
                // Rejections cannot happen to accounted records; a record
                // the replay refuses anyway changes nothing, as it did not.
                let _ = self
                    .engine
                    .process_usage(&usage, seq * 2 + 1, &mut self.out);
                self.collect();
            }
        }
        Ok(())
    }
}

/// The local days `from..=to` (YYYY-MM-DD) of the billing zone, as the
/// times `[start, end)`.
pub(crate) fn window(from: &str, to: &str, offset_secs: i32) -> Result<(Timestamp, Timestamp)> {
    let start = local_midnight(from, offset_secs)?;
    let end = Timestamp(local_midnight(to, offset_secs)?.0 + 86_400_000);
    if end <= start {
        bail!("--to {to} is before --from {from}");
    }
    Ok((start, end))
}

/// Runs `flowcap rules replay`.
pub(crate) fn replay(args: ReplayArgs, config: EngineConfig) -> Result<()> {
    let offset = config.calendar.utc_offset_secs;
    let window = window(&args.from, &args.to, offset)?;
    let draft = draft_rule(&args.rule)?;
    let draft_id = draft["id"].as_str().unwrap_or_default().to_owned();
    let root = history_location(&args.target.data, args.target.history.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the query runtime")?;
    let found = runtime.block_on(firings(&root, draft, window, config))?;
    eprintln!(
        "replayed {} records and {} commands; the draft {draft_id:?} {}; {} firing(s) from {} to {}",
        found.records,
        found.commands,
        match found.joined_at {
            Some(seq) => format!("joined at input #{}", seq / 2),
            None => "never validated (see its references)".to_owned(),
        },
        found.firings.len(),
        args.from,
        args.to,
    );
    emit(&[report(&found.firings, offset)?], &args.target)
}

/// Replays the history at `root` with `draft` (an `upsert_rule`'s `rule`,
/// with an `id`) added; its firings inside `window`.
pub(crate) async fn firings(
    root: &HistoryLocation,
    draft: serde_json::Value,
    window: (Timestamp, Timestamp),
    config: EngineConfig,
) -> Result<Replayed> {
    let draft_id = draft["id"].as_str().unwrap_or_default().to_owned();
    let to = window.1;
    let ctx = flowcap_sql::open(root).await?;
    let commands = ctx
        .sql(
            "SELECT input_seq AS seq, command FROM command_journal \
              WHERE command_type IS NOT NULL AND NOT repeat ORDER BY input_seq",
        )
        .await?
        .collect()
        .await?;
    let mut pending: std::collections::VecDeque<Input> = std::collections::VecDeque::new();
    for b in &commands {
        let seq = column(b, "seq", &DataType::Int64)?;
        let seq = seq.as_primitive::<Int64Type>();
        let text = column(b, "command", &DataType::Utf8)?;
        let text = text.as_string::<i32>();
        for i in 0..b.num_rows() {
            pending.push_back(Input::Command(
                u64::try_from(seq.value(i)).unwrap_or(0),
                text.value(i).as_bytes().to_vec(),
            ));
        }
    }
    let usage_sql = format!(
        "SELECT input_seq AS seq, iccid, record_id, CAST(start_time AS BIGINT) AS start_ms, \
         CAST(end_time AS BIGINT) AS end_ms, bytes_up, bytes_down, \
         CAST(carrier AS VARCHAR) AS carrier FROM usage_records \
         WHERE CAST(end_time AS BIGINT) < {} ORDER BY input_seq",
        to.0
    );
    let mut stream = ctx.sql(&usage_sql).await?.execute_stream().await?;
    let mut replay = Replay {
        engine: Engine::new(EngineConfig {
            shards: 1,
            ..config
        }),
        draft,
        draft_id,
        joined: false,
        window,
        out: Vec::new(),
        found: Replayed {
            firings: Vec::new(),
            records: 0,
            commands: 0,
            joined_at: None,
        },
    };
    while let Some(batch) = stream.next().await {
        for input in usages(&batch?)? {
            let Input::Usage(seq, _) = &input else {
                continue;
            };
            while matches!(pending.front(), Some(Input::Command(s, _)) if s < seq) {
                if let Some(c) = pending.pop_front() {
                    replay.feed(c)?;
                }
            }
            replay.feed(input)?;
        }
    }
    while let Some(c) = pending.pop_front() {
        replay.feed(c)?;
    }
    // Bring the clock to the end of the window: day starts and
    // deadlines up to `to` fire (expiry reminders need no record).
    replay
        .engine
        .advance_clock(Timestamp(to.0 - 1), &mut replay.out);
    replay.collect();
    Ok(replay.found)
}

/// One firing of the draft, as reported: a row of `flowcap rules replay`
/// and an item of the API's what-if answer.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub(crate) struct Firing {
    /// When (the billing zone's local time).
    pub(crate) fired_at: String,
    pub(crate) rule: String,
    pub(crate) iccid: Option<String>,
    pub(crate) pool_id: Option<String>,
    /// What the condition saw.
    pub(crate) observed: String,
    /// The condition, as JSON.
    pub(crate) condition: String,
    /// record or command.
    pub(crate) cause: String,
    /// The record's or command's id.
    pub(crate) cause_id: String,
    /// The actions' channels, comma-separated.
    pub(crate) channels: String,
}

impl Firing {
    pub(crate) fn of(f: &RuleFiredEvent, offset: i32) -> Firing {
        let (cause, cause_id, _) = flowcap_rules::execution::cause_parts(&f.cause);
        Firing {
            fired_at: flowcap_rules::template::format_time(f.event_time, offset),
            rule: f.rule.clone(),
            iccid: f.iccid.map(|i| i.to_string()),
            pool_id: f.pool.as_ref().map(|p| p.to_string()),
            observed: flowcap_rules::execution::observed_text(&f.observed),
            condition: f.condition.to_json(),
            cause: cause.to_owned(),
            cause_id,
            channels: f
                .actions
                .iter()
                .map(|a| a.channel.as_str())
                .collect::<Vec<_>>()
                .join(","),
        }
    }
}

fn report(firings: &[RuleFiredEvent], offset: i32) -> Result<RecordBatch> {
    let rows: Vec<Firing> = firings.iter().map(|f| Firing::of(f, offset)).collect();
    let text = |f: &dyn Fn(&Firing) -> Option<&str>| -> Arc<dyn Array> {
        Arc::new(rows.iter().map(f).collect::<StringArray>())
    };
    let names = [
        "fired_at",
        "rule",
        "iccid",
        "pool_id",
        "observed",
        "condition",
        "cause",
        "cause_id",
        "channels",
    ];
    let columns = vec![
        text(&|f| Some(&f.fired_at)),
        text(&|f| Some(&f.rule)),
        text(&|f| f.iccid.as_deref()),
        text(&|f| f.pool_id.as_deref()),
        text(&|f| Some(&f.observed)),
        text(&|f| Some(&f.condition)),
        text(&|f| Some(&f.cause)),
        text(&|f| Some(&f.cause_id)),
        text(&|f| Some(&f.channels)),
    ];
    let schema = Schema::new(
        names
            .iter()
            .map(|n| Field::new(*n, DataType::Utf8, true))
            .collect::<Vec<_>>(),
    );
    Ok(RecordBatch::try_new(Arc::new(schema), columns)?)
}
