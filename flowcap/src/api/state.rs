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
use flowcap_engine::{CardView, Engine, Iccid, PoolId, TrafficType, MB};

use super::access::Scope;
use super::answers::{
    Card, CardAnswer, CardPage, Consumer, MemberPage, Plan, PlanList, Pool, PoolAnswer, PoolList,
    ProblemDoc, RuleList, Tag, TagList, Webhook, WebhookList,
};
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

/// The card's view with what follows from its plan.
pub(crate) fn card_of(engine: &Engine, view: CardView) -> Card {
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
    let traffic = plan.map(|p| match p.traffic {
        TrafficType::General => "general".to_owned(),
        TrafficType::Directed => "directed".to_owned(),
    });
    Card::new(view, traffic, limit)
}

fn parse_iccid(text: &str) -> Result<Iccid, Problem> {
    text.parse()
        .map_err(|_| Problem::bad_request("bad_iccid", format!("`{text}` is not an ICCID")))
}

fn cursor_of(iccid: &str) -> String {
    hex::encode(iccid)
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

/// One card's live state.
#[utoipa::path(
    get,
    path = "/cards/{iccid}",
    tag = "cards",
    params(("iccid" = String, Path, description = "The card's ICCID")),
    responses(
        (status = 200, description = "The card", body = CardAnswer),
        (status = 400, description = "Not an ICCID", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such card", body = ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["read"]))
)]
pub(crate) async fn card(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(iccid): Path<String>,
) -> Result<Json<CardAnswer>, Problem> {
    api.access.check(&headers, Scope::Read)?;
    let iccid = parse_iccid(&iccid)?;
    let (card, at) = api
        .live
        .read(move |engine| engine.card_view(iccid).map(|v| card_of(engine, v)))
        .await?;
    let card = card.ok_or_else(|| Problem::not_found(format!("no card {iccid}")))?;
    Ok(Json(CardAnswer {
        card,
        position: at.into(),
    }))
}

/// What `GET /cards` keeps.
#[derive(Debug, Default)]
struct CardFilter {
    iccid_prefix: Option<String>,
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
        for key in query.keys() {
            if !matches!(
                key.as_str(),
                "iccid_prefix"
                    | "state"
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
        let usage_pct_gte =
            match query.get("usage_pct_gte") {
                None => None,
                Some(t) => Some(t.parse::<f64>().ok().filter(|v| v.is_finite()).ok_or_else(
                    || Problem::bad_request("bad_filter", "usage_pct_gte is a number"),
                )?),
            };
        let text = |k: &str| query.get(k).cloned();
        Ok(CardFilter {
            iccid_prefix: text("iccid_prefix"),
            state: text("state"),
            reason: text("reason"),
            carrier: text("carrier"),
            plan: text("plan"),
            pool: text("pool"),
            tag: text("tag"),
            usage_pct_gte,
        })
    }

    fn keeps(&self, card: &Card) -> bool {
        let is = |want: &Option<String>, have: Option<&String>| {
            want.as_ref().is_none_or(|w| have == Some(w))
        };
        let has =
            |want: &Option<String>, have: &[String]| want.as_ref().is_none_or(|w| have.contains(w));
        self.iccid_prefix
            .as_ref()
            .is_none_or(|p| card.iccid.starts_with(p.as_str()))
            && is(&self.state, Some(&card.state))
            && is(&self.carrier, Some(&card.carrier))
            && is(&self.plan, card.plan.as_ref())
            && is(&self.pool, card.pool.as_ref())
            && has(&self.reason, &card.reasons)
            && has(&self.tag, &card.tags)
            && self
                .usage_pct_gte
                .is_none_or(|min| card.usage_pct.is_some_and(|p| p >= min))
    }
}

/// A page of cards, filtered, in ICCID order.
#[utoipa::path(
    get,
    path = "/cards",
    tag = "cards",
    params(
        ("iccid_prefix" = Option<String>, Query, description = "Only cards whose ICCID starts with this"),
        ("state" = Option<String>, Query, description = "Only cards in this state"),
        ("reason" = Option<String>, Query, description = "Only cards suspended for this reason"),
        ("carrier" = Option<String>, Query, description = "Only this carrier's cards"),
        ("plan" = Option<String>, Query, description = "Only cards on this plan"),
        ("pool" = Option<String>, Query, description = "Only this pool's members"),
        ("tag" = Option<String>, Query, description = "Only cards with this tag"),
        ("usage_pct_gte" = Option<f64>, Query, description = "Only cards that used at least this percentage of their own limit"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the page before"),
        ("limit" = Option<usize>, Query, description = "Items on the page, 1 to 1000 (default 100)"),
    ),
    responses(
        (status = 200, description = "A page", body = CardPage),
        (status = 400, description = "A bad filter, cursor or limit", body = ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["read"]))
)]
pub(crate) async fn cards(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<CardPage>, Problem> {
    api.access.check(&headers, Scope::Read)?;
    let filter = CardFilter::of(&query)?;
    let after = query.get("cursor").map(|c| parse_cursor(c)).transpose()?;
    let limit = page_size(&query)?;
    let ((items, more), at) = api
        .live
        .read(move |engine| {
            let mut items = Vec::with_capacity(limit);
            let mut more = false;
            for view in engine.card_views_after(after) {
                let card = card_of(engine, view);
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
    let next_cursor = more
        .then(|| items.last().map(|c| cursor_of(&c.iccid)))
        .flatten();
    Ok(Json(CardPage {
        items,
        next_cursor,
        position: at.into(),
    }))
}

/// Every pool.
#[utoipa::path(
    get,
    path = "/pools",
    tag = "pools",
    responses((status = 200, description = "The pools, by id", body = PoolList)),
    security(("bearer" = ["read"]))
)]
pub(crate) async fn pools(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
) -> Result<Json<PoolList>, Problem> {
    api.access.check(&headers, Scope::Read)?;
    let (items, at) = api
        .live
        .read(|engine| engine.pool_views().iter().map(Pool::new).collect())
        .await?;
    Ok(Json(PoolList {
        items,
        position: at.into(),
    }))
}

/// One pool, a page of its members and its top consumers.
#[utoipa::path(
    get,
    path = "/pools/{id}",
    tag = "pools",
    params(
        ("id" = String, Path, description = "The pool's id"),
        ("cursor" = Option<String>, Query, description = "`members.next_cursor` of the page before"),
        ("limit" = Option<usize>, Query, description = "Members on the page, 1 to 1000 (default 100)"),
    ),
    responses(
        (status = 200, description = "The pool", body = PoolAnswer),
        (status = 404, description = "No such pool", body = ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["read"]))
)]
pub(crate) async fn pool(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<PoolAnswer>, Problem> {
    api.access.check(&headers, Scope::Read)?;
    let after = query.get("cursor").map(|c| parse_cursor(c)).transpose()?;
    let limit = page_size(&query)?;
    let pool_id = PoolId::from(id.as_str());
    let (found, at) = api
        .live
        .read(move |engine| {
            let pool = engine.pool_view(&pool_id)?;
            let start = after.map_or(0, |a| pool.members.partition_point(|m| *m <= a));
            let items: Vec<String> = pool.members[start..]
                .iter()
                .take(limit)
                .map(|m| m.to_string())
                .collect();
            let more = pool.members.len() > start + items.len();
            let mut top: Vec<(u64, Iccid)> = pool
                .members
                .iter()
                .filter_map(|m| engine.card_view(*m).map(|v| (v.usage_bytes, *m)))
                .collect();
            top.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            top.truncate(TOP_CONSUMERS);
            Some((Pool::new(&pool), items, more, top))
        })
        .await?;
    let (pool, items, more, top) =
        found.ok_or_else(|| Problem::not_found(format!("no pool {id}")))?;
    let next_cursor = more.then(|| items.last().map(|m| cursor_of(m))).flatten();
    Ok(Json(PoolAnswer {
        pool,
        members: MemberPage { items, next_cursor },
        top_consumers: top
            .into_iter()
            .map(|(used_bytes, iccid)| Consumer {
                iccid: iccid.to_string(),
                used_bytes,
            })
            .collect(),
        position: at.into(),
    }))
}

/// Every plan.
#[utoipa::path(
    get,
    path = "/plans",
    tag = "registry",
    responses((status = 200, description = "The plans, by id", body = PlanList)),
    security(("bearer" = ["read"]))
)]
pub(crate) async fn plans(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
) -> Result<Json<PlanList>, Problem> {
    api.access.check(&headers, Scope::Read)?;
    let (items, at) = api
        .live
        .read(|engine| engine.plan_specs().map(Plan::from).collect())
        .await?;
    Ok(Json(PlanList {
        items,
        position: at.into(),
    }))
}

/// Every tag.
#[utoipa::path(
    get,
    path = "/tags",
    tag = "registry",
    responses((status = 200, description = "The tags, by name", body = TagList)),
    security(("bearer" = ["read"]))
)]
pub(crate) async fn tags(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
) -> Result<Json<TagList>, Problem> {
    api.access.check(&headers, Scope::Read)?;
    let (items, at) = api
        .live
        .read(|engine| engine.tag_specs().map(Tag::from).collect())
        .await?;
    Ok(Json(TagList {
        items,
        position: at.into(),
    }))
}

/// Every webhook endpoint: ids and URLs, never the signing secret nor
/// the URL's user information.
#[utoipa::path(
    get,
    path = "/webhooks",
    tag = "registry",
    responses((status = 200, description = "The webhooks, by id", body = WebhookList)),
    security(("bearer" = ["read"]))
)]
pub(crate) async fn webhooks(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
) -> Result<Json<WebhookList>, Problem> {
    api.access.check(&headers, Scope::Read)?;
    let (items, at) = api
        .live
        .read(|engine| engine.webhooks().map(Webhook::from).collect())
        .await?;
    Ok(Json(WebhookList {
        items,
        position: at.into(),
    }))
}

/// Every automation rule, as declared.
#[utoipa::path(
    get,
    path = "/rules",
    tag = "registry",
    responses((status = 200, description = "The rules, by id", body = RuleList)),
    security(("bearer" = ["read"]))
)]
pub(crate) async fn rules(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
) -> Result<Json<RuleList>, Problem> {
    api.access.check(&headers, Scope::Read)?;
    let (items, at) = api
        .live
        .read(|engine| {
            engine
                .rule_specs()
                .filter_map(|r| serde_json::to_value(r).ok())
                .collect()
        })
        .await?;
    Ok(Json(RuleList {
        items,
        position: at.into(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        let iccid: Iccid = "89860412345678901234".parse().unwrap();
        assert_eq!(parse_cursor(&cursor_of(&iccid.to_string())).unwrap(), iccid);
        assert_eq!(parse_cursor("zz").unwrap_err().status.as_u16(), 400);
    }
}
