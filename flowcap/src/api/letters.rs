//! `GET /dead-letters`: the quarantined input, from the history's
//! `quarantine` table, newest first (by input position), filtered by
//! reason, in pages; with the counts by reason for the whole table.
//!
//! The raw input is shown as the pipeline wrote it: already bounded (at
//! most 64 KiB, the message saying when cut) and with secrets redacted
//! (docs/DECISIONS.md, "Secrets" and "Input size limits"); as text when it
//! is UTF-8, else hex, like the dead letters of `rejects.jsonl`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::access::Scope;
use super::answers::ProblemDoc;
use super::history::{cursor_of, page_size, parse_cursor, quote, rows};
use super::problem::Problem;
use super::Api;

/// Letters on a page unless `limit` says.
const DEFAULT_PAGE: usize = 50;
/// Most letters on a page (each up to 64 KiB of raw input).
const MAX_PAGE: usize = 200;

/// One quarantined input.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DeadLetter {
    /// Its input position.
    pub(crate) seq: u64,
    /// The history day it was written on (YYYY-MM-DD).
    pub(crate) date: String,
    /// The reason code (`not_json`, `bad_iccid`, `too_large`, ...).
    pub(crate) reason: String,
    pub(crate) message: String,
    pub(crate) iccid: Option<String>,
    pub(crate) record_id: Option<String>,
    /// Kafka: where it was read.
    pub(crate) source_topic: Option<String>,
    pub(crate) source_partition: Option<i32>,
    pub(crate) source_offset: Option<i64>,
    /// The input as kept (bounded, secrets redacted), when UTF-8.
    pub(crate) raw: Option<String>,
    /// The input as kept, hex, when not UTF-8.
    pub(crate) raw_hex: Option<String>,
}

/// `GET /dead-letters`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DeadLetterPage {
    /// Newest first.
    pub(crate) items: Vec<DeadLetter>,
    pub(crate) next_cursor: Option<String>,
    /// Every dead letter of the history, counted by reason.
    pub(crate) reasons: BTreeMap<String, u64>,
}

/// The quarantined input, newest first.
#[utoipa::path(
    get,
    path = "/dead-letters",
    tag = "input",
    params(
        ("reason" = Option<String>, Query, description = "Only letters with this reason code"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the page before"),
        ("limit" = Option<usize>, Query, description = "Items on the page, 1 to 200 (default 50)"),
    ),
    responses(
        (status = 200, description = "A page of dead letters", body = DeadLetterPage),
        (status = 400, description = "A bad cursor, limit or parameter", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No history on this server", body = ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["read"]))
)]
pub(crate) async fn dead_letters(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<DeadLetterPage>, Problem> {
    api.access.check(&headers, Scope::Read)?;
    if let Some(key) = query
        .keys()
        .find(|k| !matches!(k.as_str(), "reason" | "cursor" | "limit"))
    {
        return Err(Problem::bad_request(
            "bad_filter",
            format!("unknown parameter `{key}`"),
        ));
    }
    let limit = page_size(query.get("limit"), DEFAULT_PAGE, MAX_PAGE)?;
    let mut filters = Vec::new();
    if let Some(reason) = query.get("reason") {
        filters.push(format!("CAST(reason AS VARCHAR) = {}", quote(reason)));
    }
    if let Some(cursor) = query.get("cursor") {
        let seq: u64 = parse_cursor(cursor, 1)?[0].parse().map_err(|_| {
            Problem::bad_request("bad_cursor", "the cursor is not one this API gave")
        })?;
        filters.push(format!("input_seq < {seq}"));
    }
    let filter = if filters.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", filters.join(" AND "))
    };
    let sql = format!(
        "SELECT input_seq, CAST(date AS VARCHAR) AS date, CAST(reason AS VARCHAR) AS reason, \
         message, iccid, record_id, CAST(source_topic AS VARCHAR) AS source_topic, \
         source_partition, source_offset, encode(raw, 'hex') AS raw_hex \
         FROM quarantine {filter} ORDER BY input_seq DESC LIMIT {}",
        limit + 1
    );
    let found = rows(&api, &sql).await?;
    let counts = rows(
        &api,
        "SELECT CAST(reason AS VARCHAR) AS reason, COUNT(*) AS n FROM quarantine \
         GROUP BY CAST(reason AS VARCHAR)",
    )
    .await?;
    let more = found.len() > limit;
    let text = |r: &serde_json::Value, k: &str| r[k].as_str().map(str::to_owned);
    let items: Vec<DeadLetter> = found
        .iter()
        .take(limit)
        .map(|r| {
            let bytes = hex::decode(r["raw_hex"].as_str().unwrap_or_default()).unwrap_or_default();
            let (raw, raw_hex) = match String::from_utf8(bytes) {
                Ok(t) => (Some(t), None),
                Err(e) => (None, Some(hex::encode(e.into_bytes()))),
            };
            DeadLetter {
                seq: r["input_seq"].as_u64().unwrap_or(0),
                date: text(r, "date").unwrap_or_default(),
                reason: text(r, "reason").unwrap_or_default(),
                message: text(r, "message").unwrap_or_default(),
                iccid: text(r, "iccid"),
                record_id: text(r, "record_id"),
                source_topic: text(r, "source_topic"),
                source_partition: r["source_partition"].as_i64().map(|p| p as i32),
                source_offset: r["source_offset"].as_i64(),
                raw,
                raw_hex,
            }
        })
        .collect();
    let next_cursor = more
        .then(|| items.last().map(|l| cursor_of(&[&l.seq.to_string()])))
        .flatten();
    Ok(Json(DeadLetterPage {
        items,
        next_cursor,
        reasons: counts
            .iter()
            .filter_map(|r| Some((text(r, "reason")?, r["n"].as_u64()?)))
            .collect(),
    }))
}
