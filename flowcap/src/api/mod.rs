//! The operator API, `/api/v1`: live card and pool state and commands
//! over HTTP, served by `flowcap run --http` beside the operations
//! endpoints ([`crate::ops`]).
//!
//! - `access`: bearer tokens with scopes, the per-token rate limit.
//! - `problem`: every error as RFC 9457 problem details.
//! - `live`: reads and commands handed to the pipeline's driver
//!   ([`flowcap_ingest::requests`]), which answers from the engine with
//!   its shards home, at a named input position.
//! - `state`: `GET` cards, pools, plans, tags, webhooks, rules;
//!   `usage`: a card's usage per day or cycle (history and live).
//! - `commands`: `POST /commands`, `GET /commands/{id}`, the card
//!   shortcuts.
//! - `events`: `GET /events`, the action events from the events file as
//!   far as a committed snapshot covers it, as pages or a resumable
//!   Server-Sent Events stream.
//! - `snapshot`: `flowcap serve`'s read-only state, the newest snapshot.
//! - `summary`: `GET /summary`, the counts the console's overview shows.
//! - `rules`: a rule's executions (history) and the what-if replay;
//!   `letters`: the dead letters (history); `history`: the API's own
//!   queries over the history.
//! - `ingestion`: records, dead letters and lag over the last hour, from
//!   the process's counters.
//! - `ui`: the web console at `/ui`, built in `console/` and embedded.
//! - `answers`: the answer types; `doc`: the OpenAPI document made from
//!   them and the handlers (`/api/v1/openapi.json`, `docs/openapi.json`).
//!
//! The API runs on the operations server's runtime, never on a pipeline
//! thread; a request costs the pipeline one recall of its shards between
//! two inputs (reads waiting together share it).

mod access;
mod answers;
mod commands;
mod doc;
mod events;
mod history;
mod ingestion;
mod letters;
mod live;
mod problem;
mod rules;
pub(crate) mod snapshot;
mod state;
mod summary;
mod ui;
mod usage;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Result};
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use flowcap_ingest::requests::{self, Requests};
use serde::Deserialize;

pub(crate) use access::TOKENS_ENV;
use access::{Access, Limiter, TokenConfig};
use live::Live;
pub(crate) use live::{CommandProducer, Reports, Submit};
use problem::Problem;

/// Requests that may wait for the driver at once; one more is 503.
const QUEUE: usize = 256;

/// `[api]` of the configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ApiConfig {
    /// Serve `/api/v1` with `--http` (default true).
    pub(crate) enabled: bool,
    /// Bearer tokens (`[[api.tokens]]`: `name`, `sha256`, `scopes`);
    /// `FLOWCAP_API_TOKENS` adds `name:scope:token` entries. Without any,
    /// the API is open and served on a loopback address only.
    pub(crate) tokens: Vec<TokenConfig>,
    /// Requests a second per token, on average.
    pub(crate) rate_per_sec: f64,
    /// Requests per token at once, above the rate.
    pub(crate) burst: u32,
    /// Largest request body, in KiB (413 above).
    pub(crate) max_body_kb: usize,
    /// Most commands in one `POST /commands` (413 above).
    pub(crate) max_batch: usize,
    /// How long a request waits for the pipeline (503 after), and a
    /// Kafka command for its result (202 after), in seconds.
    pub(crate) wait_secs: u64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            enabled: true,
            tokens: Vec::new(),
            rate_per_sec: 50.0,
            burst: 100,
            max_body_kb: 1024,
            max_batch: 1000,
            wait_secs: 10,
        }
    }
}

/// Limits of the API.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_batch: usize,
}

/// What every handler shares.
pub(crate) struct Api {
    access: Access,
    live: Live,
    limits: Limits,
    sent: Mutex<commands::Sent>,
    max_body: usize,
    /// The history, for `/cards/{iccid}/usage` (none without one).
    history: Option<Arc<crate::sql::SqlService>>,
    /// The last hour's ingestion readings.
    ingestion: Arc<ingestion::Ingestion>,
    /// One what-if replay at a time.
    what_if: Arc<tokio::sync::Semaphore>,
    /// The pipeline's events file, for `/events`.
    events: Arc<PathBuf>,
    /// The pipeline's command journal, for `/commands/{id}`.
    journal: PathBuf,
}

impl Api {
    /// Takes ingestion readings (one now, then each minute) until the
    /// server's runtime stops.
    pub(crate) fn sample_ingestion(&self) -> impl std::future::Future<Output = ()> + Send {
        let ingestion = self.ingestion.clone();
        ingestion.sample();
        ingestion::sample(ingestion)
    }
}

/// The API for a server on `addr` over the pipeline writing to `data`,
/// and the driver's end of its request channel. Refuses an open API (no
/// token) off a loopback address.
pub(crate) fn build(
    config: &ApiConfig,
    addr: SocketAddr,
    submit: Submit,
    history: Option<Arc<crate::sql::SqlService>>,
    data: &std::path::Path,
) -> Result<(Arc<Api>, Requests)> {
    let access = Access::new(
        &config.tokens,
        std::env::var(TOKENS_ENV).ok().as_deref(),
        Limiter::new(config.rate_per_sec, config.burst),
    )?;
    if access.is_open() && !addr.ip().is_loopback() {
        bail!(
            "the operator API on {addr} needs bearer tokens ([[api.tokens]] or {TOKENS_ENV}); \
             without them it is served on a loopback address only (or set [api] enabled = false)"
        );
    }
    let (tx, rx) = requests::channel(QUEUE);
    let api = Api {
        access,
        live: Live::new(tx, Duration::from_secs(config.wait_secs.max(1)), submit),
        limits: Limits {
            max_batch: config.max_batch.max(1),
        },
        sent: Mutex::new(commands::Sent::default()),
        max_body: config.max_body_kb.saturating_mul(1024).max(1),
        history,
        ingestion: Arc::default(),
        what_if: Arc::new(tokio::sync::Semaphore::new(1)),
        events: Arc::new(data.join(flowcap_ingest::pipeline::EVENTS_FILE)),
        journal: data.join(flowcap_ingest::pipeline::JOURNAL_FILE),
    };
    Ok((Arc::new(api), rx))
}

/// The routes under `/api/v1`.
pub(crate) fn router(api: Arc<Api>) -> Router {
    let max_body = api.max_body;
    let v1 = Router::new()
        .route("/cards", get(state::cards))
        .route("/cards/{iccid}", get(state::card))
        .route("/cards/{iccid}/usage", get(usage::usage))
        .route("/cards/{iccid}/{action}", post(commands::shortcut))
        .route("/pools", get(state::pools))
        .route("/pools/{id}", get(state::pool))
        .route("/plans", get(state::plans))
        .route("/tags", get(state::tags))
        .route("/webhooks", get(state::webhooks))
        .route("/rules", get(state::rules))
        .route("/rules/what-if", post(rules::what_if_draft))
        .route("/rules/{id}/executions", get(rules::executions))
        .route("/rules/{id}/what-if", post(rules::what_if_rule))
        .route("/dead-letters", get(letters::dead_letters))
        .route("/ingestion", get(ingestion::ingestion))
        .route("/summary", get(summary::summary))
        .route("/commands", post(commands::submit))
        .route("/commands/{id}", get(commands::result))
        .route("/events", get(events::events))
        .route(
            "/openapi.json",
            get(|| async {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    doc::document(),
                )
            }),
        )
        .fallback(|| async { Problem::not_found("no such endpoint under /api/v1") })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not take that method",
            )
        })
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(api);
    Router::new().nest("/api/v1", v1).merge(ui::router())
}
