//! `GET` of live state: cards (one, or a filtered page), pools, plans,
//! tags and webhooks. Every answer is computed on the driver's thread from
//! the engine with its shards home ([`super::live`]) and names the input
//! position it is consistent at (`position.seq`).
//!
//! Pages are ordered by ICCID (pool members too); the cursor is the last
//! ICCID of the page before, hex-encoded so that clients treat it as
//! opaque. A card is on at most one page of a walk, and every card that
//! exists for the whole walk is on one.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::Json;
use flowcap_engine::command::PoolKind;
use flowcap_engine::{CardView, Engine, Iccid, PoolId, PoolView, TrafficType, MB};
use serde::Serialize;

use super::access::Scope;
use super::problem::Problem;
use super::Api;

/// Most items on one page.
pub(crate) const MAX_PAGE: usize = 1_000;
/// Items on a page unless `limit` says.
const DEFAULT_PAGE: usize = 100;
/// A general card's plan plus add-ons never exceeds this (SPEC 2.1).
const GENERAL_CAP_BYTES: u64 = 100 * MB;
/// Top consumers listed for a pool.
const TOP_CONSUMERS: usize = 10;

type Answer = Result<Json<serde_json::Value>, Problem>;

/// A card as the API shows it: the engine's view plus what follows from
/// its plan.
#[derive(Debug, Serialize)]
pub(crate) struct CardOut {
    #[serde(flatten)]
    view: CardView,
    /// The plan's traffic type.
    traffic: Option<TrafficType>,
    /// The card's own allowance this cycle (plan plus add-ons, capped for
    /// general traffic); `None` in a forward pool (the pool's counts) or
    /// without a plan.
    limit_bytes: Option<u64>,
    /// `limit_bytes` minus the usage, at least 0.
    remaining_bytes: Option<u64>,
    /// Usage as a percentage of `limit_bytes`.
    usage_pct: Option<f64>,
}

fn card_out(engine: &Engine, view: CardView) -> CardOut {
    let plan = view.plan.as_ref().and_then(|p| engine.plan_spec(p));
    let pooled = view
        .pool
        .as_ref()
        .and_then(|p| engine.pool_view(p))
        .is_some_and(|p| p.kind == PoolKind::Forward);
    let limit = plan.filter(|_| !pooled).map(|plan| {
        let own = plan
            .allowance_mb
            .saturating_add(view.addon_mb)
            .saturating_mul(MB);
        match plan.traffic {
            TrafficType::General => own.min(GENERAL_CAP_BYTES),
            TrafficType::Directed => own,
        }
    });
    CardOut {
        traffic: plan.map(|p| p.traffic),
        limit_bytes: limit,
        remaining_bytes: limit.map(|l| l.saturating_sub(view.usage_bytes)),
        usage_pct: limit.map(|l| pct(view.usage_bytes, l)),
        view,
    }
}

fn pct(used: u64, of: u64) -> f64 {
    if of == 0 {
        if used == 0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        used as f64 * 100.0 / of as f64
    }
}

fn parse_iccid(text: &str) -> Result<Iccid, Problem> {
    text.parse()
        .map_err(|_| Problem::bad_request("bad_iccid", format!("`{text}` is not an ICCID")))
}

fn cursor_of(iccid: &Iccid) -> String {
    hex::encode(iccid.to_string())
}

fn parse_cursor(text: &str) -> Result<Iccid, Problem> {
    hex::decode(text)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Problem::bad_request("bad_cursor", "the cursor is not one this API gave"))
}

fn page_size(query: &HashMap<String, String>) -> Result<usize, Problem> {
    match query.get("limit") {
        None => Ok(DEFAULT_PAGE),
        Some(text) => match text.parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
            _ => Err(Problem::bad_request(
                "bad_limit",
                format!("limit is 1 to {MAX_PAGE}"),
            )),
        },
    }
}

fn with_position(
    mut doc: serde_json::Value,
    at: flowcap_ingest::requests::Position,
) -> serde_json::Value {
    doc["position"] = serde_json::json!({ "seq": at.seq });
    doc
}

/// `GET /cards/{iccid}`.
pub(crate) async fn card(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(iccid): Path<String>,
) -> Answer {
    api.access.check(&headers, Scope::Read)?;
    let iccid = parse_iccid(&iccid)?;
    let (card, at) = api
        .live
        .read(move |engine| engine.card_view(iccid).map(|v| card_out(engine, v)))
        .await?;
    let card = card.ok_or_else(|| Problem::not_found(format!("no card {iccid}")))?;
    Ok(Json(with_position(json(&card)?, at)))
}

/// What `GET /cards` keeps.
#[derive(Debug, Default)]
struct CardFilter {
    state: Option<String>,
    reason: Option<String>,
    carrier: Option<String>,
    plan: Option<String>,
    pool: Option<String>,
    tag: Option<String>,
    usage_pct_gte: Option<f64>,
}

impl CardFilter {
    fn of(query: &HashMap<String, String>) -> Result<CardFilter, Problem> {
        let text = |k: &str| query.get(k).cloned();
        let usage_pct_gte =
            match query.get("usage_pct_gte") {
                None => None,
                Some(t) => Some(t.parse::<f64>().ok().filter(|v| v.is_finite()).ok_or_else(
                    || Problem::bad_request("bad_filter", "usage_pct_gte is a number"),
                )?),
            };
        for key in query.keys() {
            if !matches!(
                key.as_str(),
                "state"
                    | "reason"
                    | "carrier"
                    | "plan"
                    | "pool"
                    | "tag"
                    | "usage_pct_gte"
                    | "cursor"
                    | "limit"
            ) {
                return Err(Problem::bad_request(
                    "bad_filter",
                    format!("unknown parameter `{key}`"),
                ));
            }
        }
        Ok(CardFilter {
            state: text("state"),
            reason: text("reason"),
            carrier: text("carrier"),
            plan: text("plan"),
            pool: text("pool"),
            tag: text("tag"),
            usage_pct_gte,
        })
    }

    fn keeps(&self, card: &CardOut) -> bool {
        let v = &card.view;
        let is = |want: &Option<String>, have: Option<&str>| {
            want.as_deref().is_none_or(|w| have == Some(w))
        };
        is(&self.state, Some(v.state.as_str()))
            && is(&self.carrier, Some(v.carrier.as_str()))
            && is(&self.plan, v.plan.as_ref().map(|p| p.as_str()))
            && is(&self.pool, v.pool.as_ref().map(|p| p.as_str()))
            && self
                .reason
                .as_deref()
                .is_none_or(|r| v.reasons.iter().any(|have| have.as_str() == r))
            && self
                .tag
                .as_deref()
                .is_none_or(|t| v.tags.iter().any(|have| have.as_str() == t))
            && self
                .usage_pct_gte
                .is_none_or(|min| card.usage_pct.is_some_and(|p| p >= min))
    }
}

/// `GET /cards`: a page of cards, filtered, ordered by ICCID.
pub(crate) async fn cards(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Answer {
    api.access.check(&headers, Scope::Read)?;
    let filter = CardFilter::of(&query)?;
    let after = query.get("cursor").map(|c| parse_cursor(c)).transpose()?;
    let limit = page_size(&query)?;
    let ((items, more), at) = api
        .live
        .read(move |engine| {
            let views = engine.card_views();
            let start = after.map_or(0, |a| views.partition_point(|v| v.iccid <= a));
            let mut items = Vec::with_capacity(limit);
            let mut more = false;
            for view in views.into_iter().skip(start) {
                let card = card_out(engine, view);
                if filter.keeps(&card) {
                    if items.len() == limit {
                        more = true;
                        break;
                    }
                    items.push(card);
                }
            }
            (items, more)
        })
        .await?;
    let next = more
        .then(|| items.last().map(|c| cursor_of(&c.view.iccid)))
        .flatten();
    Ok(Json(with_position(
        serde_json::json!({ "items": json(&items)?, "next_cursor": next }),
        at,
    )))
}

fn pool_summary(pool: &PoolView) -> serde_json::Value {
    let remaining = (pool.kind == PoolKind::Forward)
        .then(|| pool.allowance_bytes.saturating_sub(pool.usage_bytes));
    serde_json::json!({
        "id": pool.id,
        "name": pool.name,
        "kind": pool.kind,
        "state": pool.state,
        "carrier": pool.carrier,
        "cycle": pool.cycle,
        "used_bytes": pool.usage_bytes,
        "allowance_bytes": (pool.kind == PoolKind::Forward).then_some(pool.allowance_bytes),
        "remaining_bytes": remaining,
        "member_count": pool.members.len(),
    })
}

/// `GET /pools`.
pub(crate) async fn pools(State(api): State<Arc<Api>>, headers: HeaderMap) -> Answer {
    api.access.check(&headers, Scope::Read)?;
    let (pools, at) = api
        .live
        .read(|engine| {
            engine
                .pool_views()
                .iter()
                .map(pool_summary)
                .collect::<Vec<_>>()
        })
        .await?;
    Ok(Json(with_position(
        serde_json::json!({ "items": pools }),
        at,
    )))
}

/// `GET /pools/{id}`: the pool, a page of its members (`cursor`,
/// `limit`) and its top consumers.
pub(crate) async fn pool(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Answer {
    api.access.check(&headers, Scope::Read)?;
    let after = query.get("cursor").map(|c| parse_cursor(c)).transpose()?;
    let limit = page_size(&query)?;
    let pool_id = PoolId::from(id.as_str());
    let (found, at) = api
        .live
        .read(move |engine| {
            let pool = engine.pool_view(&pool_id)?;
            let start = after.map_or(0, |a| pool.members.partition_point(|m| *m <= a));
            let members: Vec<Iccid> = pool.members[start..].iter().take(limit).copied().collect();
            let more = pool.members.len() > start + members.len();
            let mut top: Vec<(u64, Iccid)> = pool
                .members
                .iter()
                .filter_map(|m| engine.card_view(*m).map(|v| (v.usage_bytes, *m)))
                .collect();
            top.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            top.truncate(TOP_CONSUMERS);
            Some((pool_summary(&pool), members, more, top))
        })
        .await?;
    let (mut doc, members, more, top) =
        found.ok_or_else(|| Problem::not_found(format!("no pool {id}")))?;
    doc["members"] = serde_json::json!({
        "items": members,
        "next_cursor": more.then(|| members.last().map(cursor_of)).flatten(),
    });
    doc["top_consumers"] = top
        .iter()
        .map(|(used, iccid)| serde_json::json!({ "iccid": iccid, "used_bytes": used }))
        .collect();
    Ok(Json(with_position(doc, at)))
}

/// `GET /plans`.
pub(crate) async fn plans(State(api): State<Arc<Api>>, headers: HeaderMap) -> Answer {
    api.access.check(&headers, Scope::Read)?;
    let (plans, at) = api
        .live
        .read(|engine| engine.plan_specs().cloned().collect::<Vec<_>>())
        .await?;
    Ok(Json(with_position(
        serde_json::json!({ "items": plans }),
        at,
    )))
}

/// `GET /tags`.
pub(crate) async fn tags(State(api): State<Arc<Api>>, headers: HeaderMap) -> Answer {
    api.access.check(&headers, Scope::Read)?;
    let (tags, at) = api
        .live
        .read(|engine| engine.tag_specs().cloned().collect::<Vec<_>>())
        .await?;
    Ok(Json(with_position(
        serde_json::json!({ "items": tags }),
        at,
    )))
}

/// `GET /webhooks`: ids and URLs, never the signing secret nor the
/// URL's user information; whether a secret and a CA are set.
pub(crate) async fn webhooks(State(api): State<Arc<Api>>, headers: HeaderMap) -> Answer {
    api.access.check(&headers, Scope::Read)?;
    let (hooks, at) = api
        .live
        .read(|engine| {
            engine
                .webhooks()
                .map(|w| {
                    serde_json::json!({
                        "id": w.id,
                        "url": without_userinfo(&w.url),
                        "signed": w.secret.is_some(),
                        "private_ca": w.ca_cert.is_some(),
                    })
                })
                .collect::<Vec<_>>()
        })
        .await?;
    Ok(Json(with_position(
        serde_json::json!({ "items": hooks }),
        at,
    )))
}

/// `url` without `user:password@` (a credential some receivers take).
fn without_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => format!("{scheme}://{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

fn json<T: Serialize>(value: &T) -> Result<serde_json::Value, Problem> {
    serde_json::to_value(value).map_err(|e| {
        Problem::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("encoding the answer: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_credentials_only() {
        assert_eq!(
            without_userinfo("https://u:p@hooks.example/x?a=b@c"),
            "https://hooks.example/x?a=b@c"
        );
        assert_eq!(without_userinfo("http://h:8080/p"), "http://h:8080/p");
    }

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        let iccid: Iccid = "89860412345678901234".parse().unwrap();
        assert_eq!(parse_cursor(&cursor_of(&iccid)).unwrap(), iccid);
        assert_eq!(parse_cursor("zz").unwrap_err().status.as_u16(), 400);
    }
}
