//! `GET /cards/{iccid}/usage`: a card's usage per day or per cycle from
//! the Parquet history (the per-card sums the history keeps, through
//! the same limited SQL service as `/sql`), with the current cycle taken
//! from the live engine: the history holds what the last snapshot
//! window closed, the engine every input up to the answer's position.
//! Per hour is summed from the card's raw records (`usage_records`), so
//! it is bounded: at most [`MAX_HOUR_DAYS`] days a request, read through
//! the day partitions; like the days, it holds what the history has.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use flowcap_engine::{CycleId, Iccid, Timestamp};
use serde::Serialize;
use utoipa::ToSchema;

use super::access::Scope;
use super::answers::{Position, ProblemDoc};
use super::problem::Problem;
use super::Api;

/// Most days `granularity=hour` sums at once (raw records are read).
const MAX_HOUR_DAYS: i64 = 7;
/// The history's day: UTC+8.
const DAY_OFFSET_MS: i64 = 8 * 3_600_000;
const HOUR_MS: i64 = 3_600_000;

/// What one item sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Granularity {
    Hour,
    Day,
    Cycle,
}

impl Granularity {
    fn name(self) -> &'static str {
        match self {
            Granularity::Hour => "hour",
            Granularity::Day => "day",
            Granularity::Cycle => "cycle",
        }
    }
}

/// Midnight (UTC+8) starting `day` (YYYY-MM-DD), checked.
fn day_start(day: &str) -> Option<Timestamp> {
    Timestamp::parse_rfc3339(&format!("{day}T00:00:00+08:00")).ok()
}

/// The UTC+8 day of `t`.
fn day_of(t: Timestamp) -> String {
    t.to_rfc3339(8 * 3600)[..10].to_owned()
}

/// One period's usage.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub(crate) struct Period {
    /// The hour (its start, RFC 3339 at +08:00), day (YYYY-MM-DD,
    /// UTC+8) or cycle (YYYY-MM).
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
    /// hour, day or cycle.
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
    if ok && digits && (!day || day_start(text).is_some()) {
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

/// A card's usage per hour, day or cycle.
#[utoipa::path(
    get,
    path = "/cards/{iccid}/usage",
    tag = "cards",
    params(
        ("iccid" = String, Path, description = "The card's ICCID"),
        ("granularity" = Option<String>, Query, description = "hour, day or cycle (default cycle)"),
        ("from" = Option<String>, Query, description = "First day (hour, day) or cycle, inclusive; for hours default `to`"),
        ("to" = Option<String>, Query, description = "Last day (hour, day) or cycle, inclusive; for hours default the event clock's day, at most 7 days after `from`"),
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
    let granularity = match query.get("granularity").map(String::as_str) {
        None | Some("cycle") => Granularity::Cycle,
        Some("day") => Granularity::Day,
        Some("hour") => Granularity::Hour,
        Some(other) => {
            return Err(Problem::bad_request(
                "bad_granularity",
                format!("granularity is hour, day or cycle, not `{other}`"),
            ))
        }
    };
    let day = granularity != Granularity::Cycle;
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
        .read(move |engine| {
            engine
                .card_view(card)
                .map(|v| (v.cycle, v.usage_bytes, engine.clock()))
        })
        .await?;
    let (cycle, live_bytes, clock) =
        live.ok_or_else(|| Problem::not_found(format!("no card {card}")))?;
    if granularity == Granularity::Hour {
        let items = hours(&history, card, from, to, clock).await?;
        return Ok(Json(UsageAnswer {
            iccid: card.to_string(),
            granularity: granularity.name().into(),
            items,
            position: at.into(),
        }));
    }
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
    let rows = rows(&history, &text).await?;
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
        granularity: granularity.name().into(),
        items,
        position: at.into(),
    }))
}

/// The rows of a query of the history.
async fn rows(
    history: &crate::sql::SqlService,
    text: &str,
) -> Result<Vec<serde_json::Value>, Problem> {
    history
        .json_rows(text)
        .await
        .map_err(|(status, detail)| match status {
            StatusCode::BAD_REQUEST if detail.contains("no history") => Problem::not_found(detail),
            _ => Problem::new(status, "history", detail),
        })
}

/// The card's usage per hour (UTC+8) of the days `from` to `to` (default:
/// the day of `clock`), summed from its raw records, every accounted one
/// (late ones too, as the day sums).
async fn hours(
    history: &crate::sql::SqlService,
    card: Iccid,
    from: Option<String>,
    to: Option<String>,
    clock: Timestamp,
) -> Result<Vec<Period>, Problem> {
    let to = to.unwrap_or_else(|| day_of(clock.max(Timestamp(0))));
    let from = from.unwrap_or_else(|| to.clone());
    let span = match (day_start(&from), day_start(&to)) {
        (Some(f), Some(t)) => (t.0 - f.0) / (24 * HOUR_MS),
        _ => -1,
    };
    if !(0..MAX_HOUR_DAYS).contains(&span) {
        return Err(Problem::bad_request(
            "bad_range",
            format!("hours are summed over 1 to {MAX_HOUR_DAYS} days: from {from} to {to}"),
        ));
    }
    let text = format!(
        "SELECT hour, COUNT(*) AS records, SUM(bytes) AS bytes FROM \
         (SELECT (CAST(end_time AS BIGINT) + {DAY_OFFSET_MS}) / {HOUR_MS} AS hour, bytes \
          FROM usage_records WHERE iccid = '{card}' AND date >= '{from}' AND date <= '{to}') \
         GROUP BY hour ORDER BY hour"
    );
    Ok(rows(history, &text)
        .await?
        .iter()
        .filter_map(|r| {
            let start = Timestamp(r["hour"].as_i64()? * HOUR_MS - DAY_OFFSET_MS);
            Some(Period {
                period: start.to_rfc3339(8 * 3600),
                records: r["records"].as_u64(),
                bytes: r["bytes"].as_u64().unwrap_or(0),
                live: false,
            })
        })
        .collect())
}
