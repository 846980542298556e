//! `GET /ingestion`: records read, dead letters and consumer lag over the
//! last hour, per minute, for the console's overview.
//!
//! The figures are the process's own Prometheus counters (what `/metrics`
//! shows), read once a minute into a ring of the last hour's readings and
//! once more per request: a minute's records are the difference of two
//! readings. Reading the recorder rather than adding a second count to the
//! pipeline keeps the hot path as it is and makes the panel agree with
//! `/metrics` by construction. The ring lives in the server, so it starts
//! empty with each process: the panel covers the time since the start,
//! at most an hour.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use flowcap_clock::Clock;
use flowcap_ingest::metrics as names;
use serde::Serialize;
use utoipa::ToSchema;

use super::access::Scope;
use super::problem::Problem;
use super::Api;

/// Readings kept: with the one a request takes, an hour of stretches.
const KEPT: usize = 60;
/// Between two readings.
pub(crate) const EVERY: Duration = Duration::from_secs(60);

/// The counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Reading {
    /// Unix ms.
    at_ms: i64,
    records: f64,
    dead_letters: f64,
    /// Kafka consumer lag over every partition (none: no consumer).
    lag: Option<f64>,
}

impl Reading {
    /// The counters in a Prometheus text rendering.
    fn of(text: &str, at_ms: i64) -> Reading {
        let mut reading = Reading {
            at_ms,
            records: 0.0,
            dead_letters: 0.0,
            lag: None,
        };
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            let Some(value) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
                continue;
            };
            match name {
                n if n == names::RECORDS_IN => reading.records += value,
                n if n == names::REJECTS => reading.dead_letters += value,
                n if n == names::CONSUMER_LAG => *reading.lag.get_or_insert(0.0) += value,
                _ => {}
            }
        }
        reading
    }
}

/// The last hour's readings.
#[derive(Debug, Default)]
pub(crate) struct Ingestion {
    readings: Mutex<VecDeque<Reading>>,
}

fn now_ms() -> i64 {
    flowcap_clock::SystemClock.now_ms()
}

fn render() -> Option<String> {
    crate::ops::prometheus().ok().map(|handle| handle.render())
}

impl Ingestion {
    fn keep(&self, reading: Reading) {
        let mut readings = self.readings.lock().unwrap_or_else(|e| e.into_inner());
        readings.push_back(reading);
        while readings.len() > KEPT {
            readings.pop_front();
        }
    }

    /// Takes a reading now (the server calls this every [`EVERY`]).
    pub(crate) fn sample(&self) {
        if let Some(text) = render() {
            self.keep(Reading::of(&text, now_ms()));
        }
    }

    /// The minutes from the kept readings to `now`, oldest first.
    fn minutes(&self, now: Reading) -> Vec<Minute> {
        let readings = self.readings.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<Reading> = readings.iter().copied().collect();
        all.push(now);
        all.windows(2)
            .map(|w| {
                let (a, b) = (w[0], w[1]);
                let secs = ((b.at_ms - a.at_ms) as f64 / 1000.0).max(0.001);
                let records = (b.records - a.records).max(0.0);
                Minute {
                    start: flowcap_engine::Timestamp(a.at_ms).to_rfc3339(0),
                    seconds: secs,
                    records: records as u64,
                    records_per_sec: records / secs,
                    dead_letters: (b.dead_letters - a.dead_letters).max(0.0) as u64,
                    lag: b.lag.map(|l| l as u64),
                }
            })
            .collect()
    }
}

/// One stretch between two readings (a minute, the last one shorter).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub(crate) struct Minute {
    /// RFC 3339, UTC.
    pub(crate) start: String,
    /// Its length.
    pub(crate) seconds: f64,
    /// Records read (`flowcap_records_in_total`).
    pub(crate) records: u64,
    pub(crate) records_per_sec: f64,
    /// Records dead-lettered (`flowcap_rejects_total`).
    pub(crate) dead_letters: u64,
    /// Kafka consumer lag at its end, in messages (null: not reading
    /// Kafka).
    pub(crate) lag: Option<u64>,
}

/// `GET /ingestion`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct IngestionAnswer {
    /// Oldest first; the last ends now. Empty until the first reading.
    pub(crate) minutes: Vec<Minute>,
    /// Over the minutes.
    pub(crate) records: u64,
    pub(crate) dead_letters: u64,
    /// Now (null: not reading Kafka).
    pub(crate) lag: Option<u64>,
}

/// Ingestion over the last hour, per minute.
#[utoipa::path(
    get,
    path = "/ingestion",
    tag = "input",
    responses((status = 200, description = "The last hour, per minute", body = IngestionAnswer)),
    security(("bearer" = ["read"]))
)]
pub(crate) async fn ingestion(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
) -> Result<Json<IngestionAnswer>, Problem> {
    api.access.check(&headers, Scope::Read)?;
    let now = Reading::of(&render().unwrap_or_default(), now_ms());
    let minutes = api.ingestion.minutes(now);
    Ok(Json(IngestionAnswer {
        records: minutes.iter().map(|m| m.records).sum(),
        dead_letters: minutes.iter().map(|m| m.dead_letters).sum(),
        lag: now.lag.map(|l| l as u64),
        minutes,
    }))
}

/// Takes a reading every [`EVERY`] until the server stops (the first one
/// [`EVERY`] from now: the server took one as it started).
pub(crate) async fn sample(ingestion: Arc<Ingestion>) {
    let mut tick = tokio::time::interval(EVERY);
    tick.tick().await;
    loop {
        tick.tick().await;
        ingestion.sample();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# TYPE flowcap_records_in_total counter\n\
        flowcap_records_in_total{source=\"file\"} 100\n\
        flowcap_records_in_total{source=\"kafka\"} 20\n\
        flowcap_rejects_total{reason=\"not_json\"} 3\n\
        flowcap_rejects_total{reason=\"bad_iccid\"} 4\n\
        flowcap_records_in_total_other 9\n";

    #[test]
    fn a_reading_sums_every_series_of_its_counters() {
        let r = Reading::of(TEXT, 5);
        assert_eq!((r.records, r.dead_letters, r.lag), (120.0, 7.0, None));
        let lag = Reading::of("flowcap_consumer_lag{topic=\"u\",partition=\"0\"} 12\n", 0);
        assert_eq!(lag.lag, Some(12.0));
    }

    #[test]
    fn minutes_are_differences_of_readings_and_the_ring_keeps_an_hour() {
        let ingestion = Ingestion::default();
        for m in 0..70 {
            ingestion.keep(Reading {
                at_ms: m * 60_000,
                records: (m * 600) as f64,
                dead_letters: m as f64,
                lag: None,
            });
        }
        let now = Reading {
            at_ms: 70 * 60_000 - 30_000,
            records: 69.0 * 600.0 + 300.0,
            dead_letters: 69.0,
            lag: None,
        };
        let minutes = ingestion.minutes(now);
        assert_eq!(minutes.len(), KEPT);
        assert!(minutes[..KEPT - 1]
            .iter()
            .all(|m| m.records == 600 && m.records_per_sec == 10.0 && m.dead_letters == 1));
        assert_eq!(minutes[KEPT - 1].records, 300);
        assert_eq!(minutes[KEPT - 1].seconds, 30.0);
        assert_eq!(minutes[KEPT - 1].dead_letters, 0);
    }
}
