//! `GET /cards/{iccid}/usage`: a card's usage per day or per cycle from
//! the Parquet history (the per-card sums the history keeps, through
//! the same limited SQL service as `/sql`), with the current cycle taken
//! from the live engine: the history holds what the last snapshot
//! window closed, the engine every input up to the answer's position.
//! Per hour is not offered: the history sums by day and cycle only, and
//! raw records are for `/sql`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use flowcap_engine::{CycleId, Iccid};
use serde::Serialize;
use utoipa::ToSchema;

use super::access::Scope;
use super::answers::{Position, ProblemDoc};
use super::problem::Problem;
use super::Api;

/// One period's usage.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub(crate) struct Period {
    /// The day (YYYY-MM-DD, UTC+8) or cycle (YYYY-MM).
    pub(crate) period: String,
    /// Records counted (null for the live current cycle).
    pub(crate) records: Option<u64>,
    pub(crate) bytes: u64,
    /// Whether this is the live engine's figure (the current cycle).
    pub(crate) live: bool,
}

/// `GET /cards/{iccid}/usage`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct UsageAnswer {
    pub(crate) iccid: String,
    /// day or cycle.
    pub(crate) granularity: String,
    /// Oldest first.
    pub(crate) items: Vec<Period>,
    /// Of the live figure.
    pub(crate) position: Position,
}

fn check_period(text: &str, day: bool) -> Result<String, Problem> {
    let ok = if day {
        text.len() == 10 && text.as_bytes()[4] == b'-' && text.as_bytes()[7] == b'-'
    } else {
        CycleId::parse(text).is_some()
    };
    let digits = text.chars().all(|c| c.is_ascii_digit() || c == '-');
    if ok && digits {
        Ok(text.to_owned())
    } else {
        Err(Problem::bad_request(
            "bad_range",
            format!(
                "`{text}` is not a {}",
                if day {
                    "day (YYYY-MM-DD)"
                } else {
                    "cycle (YYYY-MM)"
                }
            ),
        ))
    }
}

/// A card's usage per day or per cycle.
#[utoipa::path(
    get,
    path = "/cards/{iccid}/usage",
    tag = "cards",
    params(
        ("iccid" = String, Path, description = "The card's ICCID"),
        ("granularity" = Option<String>, Query, description = "day or cycle (default cycle)"),
        ("from" = Option<String>, Query, description = "First day or cycle, inclusive"),
        ("to" = Option<String>, Query, description = "Last day or cycle, inclusive"),
    ),
    responses(
        (status = 200, description = "The usage, oldest first", body = UsageAnswer),
        (status = 400, description = "A bad range or granularity", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such card, or no history", body = ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["read"]))
)]
pub(crate) async fn usage(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(iccid): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<UsageAnswer>, Problem> {
    api.access.check(&headers, Scope::Read)?;
    let card: Iccid = iccid
        .parse()
        .map_err(|_| Problem::bad_request("bad_iccid", format!("`{iccid}` is not an ICCID")))?;
    let day = match query.get("granularity").map(String::as_str) {
        None | Some("cycle") => false,
        Some("day") => true,
        Some(other) => {
            return Err(Problem::bad_request(
                "bad_granularity",
                format!("granularity is day or cycle, not `{other}` (hours: query /sql)"),
            ))
        }
    };
    let from = query
        .get("from")
        .map(|t| check_period(t, day))
        .transpose()?;
    let to = query.get("to").map(|t| check_period(t, day)).transpose()?;
    let Some(history) = api.history.clone() else {
        return Err(Problem::not_found(
            "this server has no history (run without --no-history)",
        ));
    };
    let (live, at) = api
        .live
        .read(move |engine| engine.card_view(card).map(|v| (v.cycle, v.usage_bytes)))
        .await?;
    let (cycle, live_bytes) = live.ok_or_else(|| Problem::not_found(format!("no card {card}")))?;
    let (table, column) = if day {
        ("card_daily_usage_parts", "date")
    } else {
        ("card_cycle_usage_parts", "cycle")
    };
    let mut text = format!(
        "SELECT CAST({column} AS VARCHAR) AS period, SUM(records) AS records, SUM(bytes) AS bytes \
         FROM {table} WHERE iccid = '{card}'"
    );
    if let Some(from) = &from {
        text.push_str(&format!(" AND {column} >= '{from}'"));
    }
    if let Some(to) = &to {
        text.push_str(&format!(" AND {column} <= '{to}'"));
    }
    text.push_str(&format!(" GROUP BY {column} ORDER BY {column}"));
    let rows = history
        .json_rows(&text)
        .await
        .map_err(|(status, detail)| match status {
            StatusCode::BAD_REQUEST if detail.contains("no history") => Problem::not_found(detail),
            _ => Problem::new(status, "history", detail),
        })?;
    let mut items: Vec<Period> = rows
        .iter()
        .map(|r| Period {
            period: r["period"].as_str().unwrap_or_default().to_owned(),
            records: r["records"].as_u64(),
            bytes: r["bytes"].as_u64().unwrap_or(0),
            live: false,
        })
        .collect();
    if !day {
        // The current cycle as the engine has it, in place of the
        // history's partial sum.
        let current = serde_json::to_value(cycle)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let inside = from.as_ref().is_none_or(|f| *f <= current)
            && to.as_ref().is_none_or(|t| current <= *t);
        items.retain(|p| p.period != current);
        if inside {
            items.push(Period {
                period: current,
                records: None,
                bytes: live_bytes,
                live: true,
            });
            items.sort_by(|a, b| a.period.cmp(&b.period));
        }
    }
    Ok(Json(UsageAnswer {
        iccid: card.to_string(),
        granularity: if day { "day" } else { "cycle" }.into(),
        items,
        position: at.into(),
    }))
}
