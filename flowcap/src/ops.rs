//! The operations HTTP server: `/metrics`, `/livez`, `/readyz`, and the
//! operator API.
//!
//! It runs on its own thread with a current-thread tokio runtime, apart
//! from the pipeline: the pipeline's threads never wait for HTTP, and a slow
//! or stuck scraper costs one idle thread, not throughput. The pipeline and
//! the server share only the metrics recorder (atomics behind the `metrics`
//! facade) and a [`Health`].
//!
//! - `/metrics`: the Prometheus text format, rendered from the global
//!   recorder ([`prometheus`]), after refreshing the gauges computed at
//!   scrape time (snapshot age).
//! - `/livez`: 200 `ok` while the process runs (the server thread answering
//!   is the proof).
//! - `/readyz`: 200 `{"ready":true}` when the [`Health`] says ready, else
//!   503 `{"ready":false,"reason":"..."}`.
//! - `POST /sql` (when given a history, see [`crate::sql::SqlService`]): one
//!   read-only query over the Parquet history; the body is the SQL text (or
//!   `{"sql": "..."}` as JSON); the answer is JSON, CSV or Arrow IPC by the
//!   `Accept` header; behind a bearer token when tokens are configured,
//!   within row, size, time, memory and concurrency limits. The other
//!   endpoints need no token.
//!
//! - `/api/v1/...` (when given an API, see [`crate::api`]): the operator
//!   API, behind its own tokens.
//!
//! The runtime has two worker threads, so a long query never delays a
//! scrape.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::http::HeaderMap;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use flowcap_ingest::metrics as names;
use flowcap_ingest::Health;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// How often histogram samples are folded into their buckets when nobody
/// scrapes (a scrape does it too), so they do not pile up in memory.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);
/// How long a shutdown waits for open connections before it drops them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder as the process's global `metrics`
/// recorder on first call (with the metric descriptions and the snapshot
/// duration buckets) and returns its handle; later calls return the same
/// handle.
pub(crate) fn prometheus() -> Result<PrometheusHandle> {
    // One installation at a time: two servers started at once (tests run
    // in parallel) both found no handle, and the second install failed.
    static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _installing = INSTALLING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(handle) = PROMETHEUS.get() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(names::SNAPSHOT_DURATION.to_owned()),
            names::SNAPSHOT_DURATION_BUCKETS,
        )
        .context("metric buckets")?
        .set_buckets_for_metric(
            Matcher::Full(names::SNAPSHOT_PAUSE.to_owned()),
            names::SNAPSHOT_DURATION_BUCKETS,
        )
        .context("metric buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    names::describe();
    Ok(PROMETHEUS.get_or_init(|| handle).clone())
}

/// The running server; stops (and joins its thread) on drop.
#[derive(Debug)]
pub(crate) struct OpsServer {
    addr: SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl OpsServer {
    /// The address bound (the real port when asked for port 0).
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets open requests finish (up to a short grace)
    /// and joins the server thread.
    pub(crate) fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for OpsServer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Binds `addr` (port 0 picks a free port) and serves the operations
/// endpoints on a new thread. Installs the Prometheus recorder if it is not
/// yet installed. Binding errors are returned here, not on the thread.
pub(crate) fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    sql: Option<Arc<crate::sql::SqlService>>,
    api: Option<Arc<crate::api::Api>>,
) -> Result<OpsServer> {
    let metrics = prometheus()?;
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("binding the operations server to {addr}"))?;
    let addr = listener.local_addr().context("operations server address")?;
    listener
        .set_nonblocking(true)
        .context("operations server socket")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("flowcap-http")
        .enable_all()
        .build()
        .context("operations server runtime")?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut app = router(metrics.clone(), health, sql);
    let mut sampler = None;
    if let Some(api) = api {
        sampler = Some(api.sample_ingestion());
        app = app.merge(crate::api::router(api));
    }
    let thread = std::thread::Builder::new()
        .name("flowcap-ops".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "operations server cannot listen");
                        return;
                    }
                };
                if let Some(sampler) = sampler {
                    tokio::spawn(sampler);
                }
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(UPKEEP_EVERY);
                    loop {
                        tick.tick().await;
                        metrics.run_upkeep();
                    }
                });
                let mut graceful = stopped.clone();
                let server = axum::serve(listener, app).with_graceful_shutdown(async move {
                    let _ = graceful.wait_for(|stop| *stop).await;
                });
                let mut deadline = stopped;
                tokio::select! {
                    result = server => {
                        if let Err(e) = result {
                            tracing::error!(error = %e, "operations server failed");
                        }
                    }
                    _ = async move {
                        let _ = deadline.wait_for(|stop| *stop).await;
                        tokio::time::sleep(SHUTDOWN_GRACE).await;
                    } => {}
                }
            });
        })
        .context("starting the operations server thread")?;
    Ok(OpsServer {
        addr,
        stop,
        thread: Some(thread),
    })
}

fn router(
    metrics: PrometheusHandle,
    health: Arc<Health>,
    sql: Option<Arc<crate::sql::SqlService>>,
) -> Router {
    let router = Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    names::refresh();
                    metrics.run_upkeep();
                    (
                        [(
                            header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        metrics.render(),
                    )
                }
            }),
        )
        .route("/livez", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let health = health.clone();
                async move {
                    match health.status() {
                        Ok(()) => (StatusCode::OK, Json(serde_json::json!({ "ready": true })))
                            .into_response(),
                        Err(reason) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            Json(serde_json::json!({ "ready": false, "reason": reason })),
                        )
                            .into_response(),
                    }
                }
            }),
        );
    match sql {
        Some(service) => router.route(
            "/sql",
            post(move |headers: HeaderMap, body: String| {
                let service = service.clone();
                async move { service.answer(&headers, body).await }
            }),
        ),
        None => router,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A plain HTTP/1.1 GET: (status, body).
    pub(crate) fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let status = response
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    #[test]
    fn serves_metrics_liveness_and_readiness() {
        let health = Arc::new(Health::new());
        let server = serve("127.0.0.1:0".parse().unwrap(), health.clone(), None, None).unwrap();
        let addr = server.local_addr();
        assert_ne!(addr.port(), 0);

        let (status, body) = get(addr, "/livez");
        assert_eq!((status, body.as_str()), (200, "ok\n"));

        let (status, body) = get(addr, "/readyz");
        assert_eq!(status, 503);
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(doc["ready"], false);
        assert_eq!(doc["reason"], "starting");
        health.set_not_ready("standing by: another instance holds the lease");
        let (_, body) = get(addr, "/readyz");
        assert!(body.contains("another instance holds the lease"), "{body}");
        health.set_ready();
        let (status, body) = get(addr, "/readyz");
        assert_eq!((status, body.as_str()), (200, r#"{"ready":true}"#));

        let driver = names::DriverMetrics::new(names::Source::Generator, 2);
        driver.record_in();
        driver.record_in();
        driver.sample(&[3, 0], 7, flowcap_engine::Timestamp(1_700_000_000_000));
        let mut outputs = names::OutputMetrics::new();
        outputs.reject("not_json");
        outputs.reject("unknown_card");
        outputs.reject("not_json");
        names::snapshot_written(Duration::from_millis(20));
        names::snapshot_paused(Duration::from_millis(3));
        names::consumer_lag("usage", 3, 42);

        let (status, text) = get(addr, "/metrics");
        assert_eq!(status, 200);
        for line in [
            r#"flowcap_records_in_total{source="generator"} 2"#,
            r#"flowcap_rejects_total{reason="not_json"} 2"#,
            r#"flowcap_rejects_total{reason="unknown_card"} 1"#,
            r#"flowcap_shard_queue_depth{shard="0"} 3"#,
            "flowcap_engine_cards 7",
            "flowcap_event_clock_seconds 1700000000",
            r#"flowcap_consumer_lag{topic="usage",partition="3"} 42"#,
            "flowcap_snapshots_total 1",
            r#"flowcap_snapshot_duration_seconds_bucket{le="0.025"} 1"#,
            r#"flowcap_snapshot_pause_seconds_bucket{le="0.005"} 1"#,
            "# HELP flowcap_records_in_total",
            "# TYPE flowcap_snapshot_duration_seconds histogram",
        ] {
            assert!(
                text.lines().any(|l| l == line || l.starts_with(line)),
                "no `{line}` in\n{text}"
            );
        }
        assert!(text.contains("flowcap_snapshot_age_seconds "), "{text}");

        let (status, _) = get(addr, "/nothing");
        assert_eq!(status, 404);
        server.shutdown();
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "still listening after shutdown"
        );
    }
}
