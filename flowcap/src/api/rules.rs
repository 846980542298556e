//! A rule's executions and the what-if replay.
//!
//! - `GET /rules/{id}/executions`: the history's `rule_executions`, each
//!   with its delivery's outcome from `rule_deliveries` (the same join as
//!   `flowcap query rule-executions`), newest first, in pages. The cursor
//!   is the last row's `(fired_at, execution_id)`, so rows written while
//!   an operator pages (newer ones) never shift a page.
//! - `POST /rules/{id}/what-if` and `POST /rules/what-if` (a draft in the
//!   body): [`crate::whatif::firings`], the replay of `flowcap rules
//!   replay`, over the same history, answered as JSON. The replay reads
//!   every record up to the window's end on one thread: one at a time per
//!   server (503 `busy` while one runs), off the server's workers.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use flowcap_engine::command::RuleSpec;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::access::Scope;
use super::answers::{without_userinfo, ProblemDoc};
use super::history::{cursor_of, page_size, parse_cursor, quote, rows};
use super::problem::Problem;
use super::Api;
use crate::whatif::{self, Firing};

/// Executions on a page unless `limit` says.
const DEFAULT_PAGE: usize = 100;
/// Most executions on a page.
const MAX_PAGE: usize = 1_000;
/// Most firings listed in a what-if answer (the cards and pools are all
/// listed).
pub(crate) const MAX_FIRINGS: usize = 1_000;

/// One execution of a rule: a firing's action as decided, and its
/// delivery's outcome once there is one.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Execution {
    pub(crate) execution_id: String,
    /// RFC 3339, UTC.
    pub(crate) fired_at: String,
    pub(crate) iccid: Option<String>,
    pub(crate) pool_id: Option<String>,
    /// The condition, as JSON.
    pub(crate) condition: String,
    /// What the condition saw.
    pub(crate) observed: String,
    /// record or command.
    pub(crate) cause: String,
    pub(crate) cause_id: String,
    /// webhook, email, sms, suspend, or none.
    pub(crate) channel: String,
    /// The webhook's URL or the recipients, credentials redacted.
    pub(crate) endpoint: Option<String>,
    /// The delivery's outcome (delivered, failed, ...), else the decision's
    /// (pending, skipped, ...).
    pub(crate) outcome: String,
    pub(crate) attempts: i64,
    /// The delivery's last error.
    pub(crate) error: Option<String>,
    /// When the delivery finished, RFC 3339, UTC.
    pub(crate) done_at: Option<String>,
}

/// `GET /rules/{id}/executions`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ExecutionPage {
    pub(crate) rule: String,
    /// Newest first.
    pub(crate) items: Vec<Execution>,
    pub(crate) next_cursor: Option<String>,
}

fn ms_text(ms: Option<i64>) -> Option<String> {
    ms.map(|ms| flowcap_engine::Timestamp(ms).to_rfc3339(0))
}

/// A rule's executions, newest first, with their delivery outcomes.
#[utoipa::path(
    get,
    path = "/rules/{id}/executions",
    tag = "registry",
    params(
        ("id" = String, Path, description = "The rule's id"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the page before"),
        ("limit" = Option<usize>, Query, description = "Items on the page, 1 to 1000 (default 100)"),
    ),
    responses(
        (status = 200, description = "A page of executions", body = ExecutionPage),
        (status = 400, description = "A bad cursor or limit", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No history on this server", body = ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["read"]))
)]
pub(crate) async fn executions(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<ExecutionPage>, Problem> {
    api.access.check(&headers, Scope::Read)?;
    let limit = page_size(query.get("limit"), DEFAULT_PAGE, MAX_PAGE)?;
    let mut filter = format!("e.rule = {}", quote(&id));
    if let Some(cursor) = query.get("cursor") {
        let parts = parse_cursor(cursor, 2)?;
        let ms: i64 = parts[0].parse().map_err(|_| {
            Problem::bad_request("bad_cursor", "the cursor is not one this API gave")
        })?;
        filter.push_str(&format!(
            " AND (CAST(e.fired_at AS BIGINT) < {ms} OR (CAST(e.fired_at AS BIGINT) = {ms} \
             AND e.execution_id < {}))",
            quote(&parts[1])
        ));
    }
    // A resend after a crash may add a second delivery row: "delivered"
    // wins, attempts add up (as `flowcap query rule-executions`).
    let sql = format!(
        "SELECT e.execution_id, CAST(e.fired_at AS BIGINT) AS fired_ms, e.iccid, e.pool_id, \
         e.condition, e.observed, CAST(e.cause AS VARCHAR) AS cause, e.cause_id, \
         CAST(e.channel AS VARCHAR) AS channel, e.endpoint, \
         COALESCE(d.outcome, CAST(e.outcome AS VARCHAR)) AS outcome, \
         CAST(COALESCE(d.attempts, e.attempts) AS BIGINT) AS attempts, d.error, \
         CAST(d.done_at AS BIGINT) AS done_ms \
         FROM rule_executions e LEFT JOIN \
         (SELECT execution_id, MIN(CAST(outcome AS VARCHAR)) AS outcome, \
          CAST(SUM(attempts) AS INT) AS attempts, MAX(error) AS error, \
          MAX(done_at) AS done_at FROM rule_deliveries GROUP BY execution_id) d \
         ON d.execution_id = e.execution_id WHERE {filter} \
         ORDER BY e.fired_at DESC, e.execution_id DESC LIMIT {}",
        limit + 1
    );
    let found = rows(&api, &sql).await?;
    let more = found.len() > limit;
    let text = |r: &serde_json::Value, k: &str| r[k].as_str().map(str::to_owned);
    let items: Vec<Execution> = found
        .iter()
        .take(limit)
        .map(|r| Execution {
            execution_id: text(r, "execution_id").unwrap_or_default(),
            fired_at: ms_text(r["fired_ms"].as_i64()).unwrap_or_default(),
            iccid: text(r, "iccid"),
            pool_id: text(r, "pool_id"),
            condition: text(r, "condition").unwrap_or_default(),
            observed: text(r, "observed").unwrap_or_default(),
            cause: text(r, "cause").unwrap_or_default(),
            cause_id: text(r, "cause_id").unwrap_or_default(),
            channel: text(r, "channel").unwrap_or_default(),
            endpoint: text(r, "endpoint").map(|e| without_userinfo(&e)),
            outcome: text(r, "outcome").unwrap_or_default(),
            attempts: r["attempts"].as_i64().unwrap_or(0),
            error: text(r, "error"),
            done_at: ms_text(r["done_ms"].as_i64()),
        })
        .collect();
    let next_cursor = more
        .then(|| {
            let last = found.get(limit - 1)?;
            let ms = last["fired_ms"].as_i64()?.to_string();
            Some(cursor_of(&[&ms, last["execution_id"].as_str()?]))
        })
        .flatten();
    Ok(Json(ExecutionPage {
        rule: id,
        items,
        next_cursor,
    }))
}

/// The body of a what-if.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct WhatIf {
    /// First local day (YYYY-MM-DD, the billing zone) to report.
    pub(crate) from: String,
    /// Last local day to report, included.
    pub(crate) to: String,
    /// The draft rule: the fields of `upsert_rule`'s `rule` (SPEC 6). For
    /// `/rules/{id}/what-if`, none: the rule as declared.
    #[schema(value_type = Option<Object>)]
    pub(crate) rule: Option<serde_json::Value>,
}

/// What a rule would have done.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct WhatIfAnswer {
    /// The draft's id.
    pub(crate) rule: String,
    pub(crate) from: String,
    pub(crate) to: String,
    /// Usage records and commands replayed.
    pub(crate) records: u64,
    pub(crate) commands: u64,
    /// The replay's input at which the draft joined (null: it never
    /// validated, e.g. it names a webhook or pool that never existed).
    pub(crate) joined_at_input: Option<u64>,
    /// How many times it would have fired in the window.
    pub(crate) firings: usize,
    /// Every card it would have fired for, in ICCID order.
    pub(crate) cards: Vec<String>,
    /// Every pool it would have fired for (pool rules; a card's firing
    /// names its pool in its item, not here).
    pub(crate) pools: Vec<String>,
    /// The firings in input order, the first 1000 (`flowcap rules
    /// replay`'s rows).
    pub(crate) items: Vec<Firing>,
}

fn parse_body(body: Result<Bytes, BytesRejection>) -> Result<WhatIf, Problem> {
    let body = body.map_err(super::commands::body_problem)?;
    serde_json::from_slice(&body).map_err(|e| Problem::bad_request("bad_body", e.to_string()))
}

fn check_day(text: &str) -> Result<(), Problem> {
    let b = text.as_bytes();
    let ok = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    ok.then_some(()).ok_or_else(|| {
        Problem::bad_request("bad_range", format!("`{text}` is not a day (YYYY-MM-DD)"))
    })
}

/// Replays the history with `draft` (checked as a rule first).
async fn what_if(
    api: &Api,
    draft: serde_json::Value,
    body: WhatIf,
    config: flowcap_engine::EngineConfig,
) -> Result<Json<WhatIfAnswer>, Problem> {
    let spec: RuleSpec = serde_json::from_value(draft.clone())
        .map_err(|e| Problem::bad_request("bad_rule", format!("the draft is not a rule: {e}")))?;
    check_day(&body.from)?;
    check_day(&body.to)?;
    let window = whatif::window(&body.from, &body.to, config.calendar.utc_offset_secs)
        .map_err(|e| Problem::bad_request("bad_range", e.to_string()))?;
    let Some(history) = api.history.clone() else {
        return Err(Problem::not_found(
            "this server has no history (run without --no-history)",
        ));
    };
    let Ok(permit) = api.what_if.clone().try_acquire_owned() else {
        return Err(Problem::busy("a what-if replay is running; try again", 5));
    };
    let root = history.root().clone();
    let mut draft = draft;
    if let Some(obj) = draft.as_object_mut() {
        obj.insert("enabled".into(), serde_json::Value::Bool(true));
    }
    let offset = config.calendar.utc_offset_secs;
    let found = tokio::task::spawn_blocking(move || {
        // Held by the replay, not the request: a client that goes away
        // does not let a second replay start beside this one.
        let _permit = permit;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(whatif::firings(&root, draft, window, config))
    })
    .await
    .map_err(|e| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "history", e.to_string()))?
    .map_err(|e| {
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "history",
            format!("{e:#}"),
        )
    })?;
    let cards: BTreeSet<String> = found
        .firings
        .iter()
        .filter_map(|f| f.iccid.map(|i| i.to_string()))
        .collect();
    // A card's firing names its pool too; a pool fired when no card did.
    let pools: BTreeSet<String> = found
        .firings
        .iter()
        .filter(|f| f.iccid.is_none())
        .filter_map(|f| f.pool.as_ref().map(|p| p.to_string()))
        .collect();
    Ok(Json(WhatIfAnswer {
        rule: spec.id,
        from: body.from,
        to: body.to,
        records: found.records,
        commands: found.commands,
        joined_at_input: found.joined_at.map(|seq| seq / 2),
        firings: found.firings.len(),
        cards: cards.into_iter().collect(),
        pools: pools.into_iter().collect(),
        items: found
            .firings
            .iter()
            .take(MAX_FIRINGS)
            .map(|f| Firing::of(f, offset))
            .collect(),
    }))
}

/// What a draft rule would have done over a date range.
#[utoipa::path(
    post,
    path = "/rules/what-if",
    tag = "registry",
    request_body = WhatIf,
    responses(
        (status = 200, description = "The cards and pools it would have fired for", body = WhatIfAnswer),
        (status = 400, description = "A bad draft or range", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No history on this server", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "Another what-if is running", body = ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["read"]))
)]
pub(crate) async fn what_if_draft(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<WhatIfAnswer>, Problem> {
    api.access.check(&headers, Scope::Read)?;
    let body = parse_body(body)?;
    let Some(draft) = body.rule.clone() else {
        return Err(Problem::bad_request(
            "bad_rule",
            "the body needs the draft `rule`",
        ));
    };
    let (config, _) = api.live.read(|engine| engine.config().clone()).await?;
    what_if(&api, draft, body, config).await
}

/// What a declared rule would have done over a date range, had it been
/// there from the start.
#[utoipa::path(
    post,
    path = "/rules/{id}/what-if",
    tag = "registry",
    params(("id" = String, Path, description = "The rule's id")),
    request_body = WhatIf,
    responses(
        (status = 200, description = "The cards and pools it would have fired for", body = WhatIfAnswer),
        (status = 400, description = "A bad range", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such rule, or no history", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "Another what-if is running", body = ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["read"]))
)]
pub(crate) async fn what_if_rule(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<WhatIfAnswer>, Problem> {
    api.access.check(&headers, Scope::Read)?;
    let body = parse_body(body)?;
    if body.rule.is_some() {
        return Err(Problem::bad_request(
            "bad_rule",
            "a declared rule's what-if takes no `rule` (POST /rules/what-if takes a draft)",
        ));
    }
    let wanted = id.clone();
    let (found, _) = api
        .live
        .read(move |engine| {
            let spec = engine.rule_specs().find(|r| r.id == wanted).cloned();
            (spec, engine.config().clone())
        })
        .await?;
    let (spec, config) = found;
    let spec = spec.ok_or_else(|| Problem::not_found(format!("no rule {id}")))?;
    let draft = serde_json::to_value(spec)
        .map_err(|e| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "history", e.to_string()))?;
    what_if(&api, draft, body, config).await
}
