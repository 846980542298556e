//! `GET /summary`: the counts an overview shows (cards by state and by
//! reason, cards near their own limit), taken in one read of the engine.
//! Without it a console would walk every card page to count them, a
//! thousand requests at 1M cards.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::access::Scope;
use super::answers::{Position, ProblemDoc};
use super::problem::Problem;
use super::state::card_of;
use super::Api;

/// The usage percentages of a card's own limit counted as "near".
const NEAR: [f64; 2] = [80.0, 90.0];

/// `GET /summary`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Summary {
    /// Every card known.
    pub(crate) cards: u64,
    /// Cards by state (only states some card is in).
    pub(crate) cards_by_state: BTreeMap<String, u64>,
    /// Suspended cards by reason; a card with two reasons counts in both.
    pub(crate) cards_by_reason: BTreeMap<String, u64>,
    /// Cards that used at least 80 % of their own limit (`usage_pct`).
    pub(crate) cards_at_80_pct: u64,
    /// Cards that used at least 90 % of their own limit.
    pub(crate) cards_at_90_pct: u64,
    /// The event clock (RFC 3339): the `at` a command sent now takes.
    pub(crate) clock: String,
    pub(crate) position: Position,
}

/// Counts of cards by state, by reason and near their limit.
#[utoipa::path(
    get,
    path = "/summary",
    tag = "cards",
    responses(
        (status = 200, description = "The counts", body = Summary),
        (status = 401, description = "No accepted token", body = ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["read"]))
)]
pub(crate) async fn summary(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
) -> Result<Json<Summary>, Problem> {
    api.access.check(&headers, Scope::Read)?;
    let (mut summary, at) = api
        .live
        .read(|engine| {
            let mut summary = Summary {
                cards: 0,
                cards_by_state: BTreeMap::new(),
                cards_by_reason: BTreeMap::new(),
                cards_at_80_pct: 0,
                cards_at_90_pct: 0,
                clock: serde_json::to_value(engine.clock())
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                position: Position { seq: None },
            };
            for view in engine.card_views_after(None) {
                let card = card_of(engine, view);
                summary.cards += 1;
                *summary
                    .cards_by_state
                    .entry(card.state.clone())
                    .or_default() += 1;
                for reason in &card.reasons {
                    *summary.cards_by_reason.entry(reason.clone()).or_default() += 1;
                }
                let pct = card.usage_pct.unwrap_or(0.0);
                summary.cards_at_80_pct += u64::from(pct >= NEAR[0]);
                summary.cards_at_90_pct += u64::from(pct >= NEAR[1]);
            }
            summary
        })
        .await?;
    summary.position = at.into();
    Ok(Json(summary))
}
