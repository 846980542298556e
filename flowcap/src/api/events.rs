//! `GET /events`: the action events (`card_state`, `pool_state`,
//! `rule_fired`, `late_crossing`), as pages or as a Server-Sent Events
//! stream that a client resumes with `Last-Event-ID`.
//!
//! They are read from the pipeline's events file, never from the engine:
//! the engine keeps no past events, and the file already holds every one
//! in the order the writer wrote it. Only the part a committed snapshot
//! covers is served ([`flowcap_ingest::requests::DurableEvents`]): that
//! part is never rewritten, whereas after it a crash cuts the file back
//! and the replay may interleave different cards' events in another
//! order. So a position is a byte offset in the file just after an event
//! (0 is the start): stable across restarts and replays, and checked on
//! use (an offset at no line's end is refused). The cost is that the
//! stream runs one commit behind the engine (`snapshot_every` inputs; in
//! Kafka mode at most `snapshot_interval`; a lingering run's commands are
//! committed before they are answered). `flowcap serve` serves the file
//! as far as its snapshot covers it; its stream has no live tail.
//!
//! The file is not indexed: a filter is applied while scanning, and one
//! request scans at most [`SCAN_BYTES`]. A page that stops there may hold
//! fewer items than asked (even none) and still have a `next_cursor`;
//! large questions over the past are the history's (`state_changes` and
//! `rule_executions` through `/sql`). Pages also go newest first
//! (`order=desc`, scanning back from the end), so "the latest cuts" or a
//! card's latest events cost a scan of the file's tail, not of all of it.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use flowcap_engine::{Iccid, Timestamp};
use serde::Serialize;
use utoipa::ToSchema;

use super::access::Scope;
use super::answers::{Position, ProblemDoc};
use super::problem::Problem;
use super::state::MAX_PAGE;
use super::Api;

/// Items on a page unless `limit` says.
const DEFAULT_PAGE: usize = 100;
/// Most bytes of the file one request (or one step of a stream) scans.
const SCAN_BYTES: u64 = 8 << 20;
/// How often a stream at the end looks for newly committed events.
const TAIL_POLL: Duration = Duration::from_millis(200);
/// Bytes read at a time when scanning back.
const BACK_BLOCK: u64 = 1 << 20;
/// The kinds of action events.
const KINDS: [&str; 4] = ["card_state", "pool_state", "rule_fired", "late_crossing"];

/// One action event and its position.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct EventItem {
    /// Just after this event in the events file: give it as `cursor` (or
    /// `Last-Event-ID`) to go on after it. Opaque; stable across restarts.
    pub(crate) position: String,
    /// The event as the actions topic and `events.jsonl` carry it (SPEC
    /// 5.1: `kind` is card_state, pool_state, rule_fired or late_crossing).
    #[schema(value_type = Object)]
    pub(crate) event: serde_json::Value,
}

/// `GET /events`: a page of events in the order they were written (or
/// newest first with `order=desc`).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct EventPage {
    /// The events kept by the filter.
    pub(crate) items: Vec<EventItem>,
    /// Give it as `cursor` (with the same `order`) for the next page; null
    /// once the page reached `end` (with `order=desc`: the first event). A
    /// page that scanned its limit of bytes may hold fewer items than
    /// asked and still have one.
    pub(crate) next_cursor: Option<String>,
    /// The end of the events committed so far: give it as `cursor` later
    /// to get only newer events.
    pub(crate) end: String,
    /// The events of every input up to and including `position.seq` are
    /// committed (null: none yet).
    pub(crate) position: Position,
}

/// What `GET /events` keeps.
#[derive(Debug, Default)]
pub(crate) struct EventFilter {
    iccid: Option<String>,
    pool: Option<String>,
    kind: Option<String>,
    from: Option<Timestamp>,
    to: Option<Timestamp>,
}

impl EventFilter {
    fn of(query: &HashMap<String, String>) -> Result<EventFilter, Problem> {
        for key in query.keys() {
            if !matches!(
                key.as_str(),
                "iccid" | "pool" | "kind" | "from" | "to" | "cursor" | "limit" | "order"
            ) {
                return Err(Problem::bad_request(
                    "bad_filter",
                    format!("unknown parameter `{key}`"),
                ));
            }
        }
        let iccid = match query.get("iccid") {
            Some(text) => Some(
                text.parse::<Iccid>()
                    .map_err(|_| {
                        Problem::bad_request("bad_iccid", format!("`{text}` is not an ICCID"))
                    })?
                    .to_string(),
            ),
            None => None,
        };
        let kind = query.get("kind").cloned();
        if let Some(kind) = kind.as_deref().filter(|k| !KINDS.contains(k)) {
            return Err(Problem::bad_request(
                "bad_filter",
                format!("kind `{kind}` is not one of {}", KINDS.join(", ")),
            ));
        }
        let time = |name: &str| {
            query
                .get(name)
                .map(|t| {
                    Timestamp::parse_rfc3339(t).map_err(|_| {
                        Problem::bad_request(
                            "bad_filter",
                            format!("{name} is an RFC 3339 time, e.g. 2026-11-01T00:00:00+08:00"),
                        )
                    })
                })
                .transpose()
        };
        Ok(EventFilter {
            iccid,
            pool: query.get("pool").cloned(),
            kind,
            from: time("from")?,
            to: time("to")?,
        })
    }

    /// Whether `event` (a line of the file) is kept: its card (a card's
    /// state or a rule firing for it), its pool (the pool's state or a
    /// firing naming it), its kind, its event time in `[from, to)`.
    fn keeps(&self, event: &serde_json::Value) -> bool {
        let is = |want: &Option<String>, field: &str| {
            want.as_deref()
                .is_none_or(|w| event[field].as_str() == Some(w))
        };
        let time = || {
            event["event_time"]
                .as_str()
                .and_then(|t| Timestamp::parse_rfc3339(t).ok())
        };
        is(&self.iccid, "iccid")
            && is(&self.pool, "pool")
            && is(&self.kind, "kind")
            && (self.from.is_none() && self.to.is_none()
                || time().is_some_and(|t| {
                    self.from.is_none_or(|f| t >= f) && self.to.is_none_or(|e| t < e)
                }))
    }
}

/// What one scan found.
#[derive(Debug)]
struct Scan {
    /// Kept events: position after each, and the event.
    items: Vec<(u64, serde_json::Value)>,
    /// Where the scan stopped: the next one starts here.
    stopped: u64,
}

/// Scans `path` from `from` to `end` (a line's end both), keeping at most
/// `limit` events `filter` keeps, reading at most [`SCAN_BYTES`].
fn scan(
    path: &Path,
    from: u64,
    end: u64,
    filter: &EventFilter,
    limit: usize,
) -> std::io::Result<Scan> {
    let mut items = Vec::new();
    let mut at = from;
    if from >= end {
        return Ok(Scan { items, stopped: at });
    }
    let mut file = std::fs::File::open(path)?;
    file.seek(SeekFrom::Start(from))?;
    let mut lines = BufReader::with_capacity(1 << 16, file.take(end - from));
    let mut line = Vec::with_capacity(1024);
    while items.len() < limit && at < end && at - from < SCAN_BYTES {
        line.clear();
        let n = lines.read_until(b'\n', &mut line)?;
        if n == 0 {
            // Shorter than the snapshot recorded: not this pipeline's file.
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the events file is shorter than its snapshot recorded",
            ));
        }
        at += n as u64;
        match serde_json::from_slice::<serde_json::Value>(&line) {
            Ok(event) if filter.keeps(&event) => items.push((at, event)),
            Ok(_) => {}
            Err(e) => tracing::warn!(position = at, error = %e, "an events line is not JSON"),
        }
    }
    Ok(Scan { items, stopped: at })
}

/// Scans `path` back from `from` (a line's end) towards the start,
/// keeping at most `limit` events `filter` keeps, newest first, reading
/// at most [`SCAN_BYTES`]. `stopped` is the start of the last line read:
/// the next scan back starts there.
fn scan_back(path: &Path, from: u64, filter: &EventFilter, limit: usize) -> std::io::Result<Scan> {
    scan_back_by(path, from, filter, limit, BACK_BLOCK)
}

/// [`scan_back`], reading `block` bytes at a time.
fn scan_back_by(
    path: &Path,
    from: u64,
    filter: &EventFilter,
    limit: usize,
    block: u64,
) -> std::io::Result<Scan> {
    let mut items = Vec::new();
    let mut file = std::fs::File::open(path)?;
    // The bytes before `read` are not read yet; `pending` holds those
    // from `read` to `stopped`: the end of a line whose start is not.
    let mut read = from;
    let mut stopped = from;
    let mut pending = Vec::new();
    while items.len() < limit && stopped > 0 && from - read < SCAN_BYTES {
        let n = block.min(read);
        read -= n;
        let mut chunk = vec![0u8; n as usize];
        file.seek(SeekFrom::Start(read))?;
        file.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&pending);
        pending = chunk;
        // Whole lines, the last first: each ends at `stopped` and starts
        // after a newline, or at the start of the file.
        while items.len() < limit && stopped > 0 {
            let end = pending.len();
            let body = &pending[..end.saturating_sub(1)];
            let start = match body.iter().rposition(|&b| b == b'\n') {
                Some(i) => i + 1,
                None if read == 0 => 0,
                None => break,
            };
            match serde_json::from_slice::<serde_json::Value>(&pending[start..end]) {
                Ok(event) if filter.keeps(&event) => items.push((stopped, event)),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(position = stopped, error = %e, "an events line is not JSON")
                }
            }
            stopped = read + start as u64;
            pending.truncate(start);
        }
    }
    Ok(Scan { items, stopped })
}

/// Whether `position` is the start of the file or just after a line, at
/// most `end`.
fn is_position(path: &Path, position: u64, end: u64) -> bool {
    if position == 0 {
        return true;
    }
    if position > end {
        return false;
    }
    let mut byte = [0u8; 1];
    std::fs::File::open(path)
        .and_then(|mut f| {
            f.seek(SeekFrom::Start(position - 1))?;
            f.read_exact(&mut byte)
        })
        .is_ok_and(|()| byte[0] == b'\n')
}

fn bad_cursor() -> Problem {
    Problem::bad_request("bad_cursor", "the cursor is not a position this API gave")
}

fn internal(e: impl std::fmt::Display) -> Problem {
    Problem::new(
        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        format!("reading the events: {e}"),
    )
}

/// The position to start from: `Last-Event-ID` (a stream reconnecting),
/// else `cursor`, else `default`; checked against the file.
async fn start_of(
    path: &Arc<PathBuf>,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    end: u64,
    default: u64,
) -> Result<u64, Problem> {
    let given = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .or(query.get("cursor").map(String::as_str));
    let Some(text) = given else {
        return Ok(default);
    };
    let position: u64 = text.trim().parse().map_err(|_| bad_cursor())?;
    let path = Arc::clone(path);
    let valid = tokio::task::spawn_blocking(move || is_position(&path, position, end))
        .await
        .map_err(internal)?;
    if valid {
        Ok(position)
    } else {
        Err(bad_cursor())
    }
}

/// Action events in the order they were written (or newest first),
/// filtered; a page (JSON), or a stream (`Accept: text/event-stream`).
#[utoipa::path(
    get,
    path = "/events",
    tag = "events",
    params(
        ("iccid" = Option<String>, Query, description = "Only this card's events (its card_state, rule firings for it)"),
        ("pool" = Option<String>, Query, description = "Only this pool's events (its pool_state, rule firings naming it)"),
        ("kind" = Option<String>, Query, description = "Only this kind: card_state, pool_state, rule_fired or late_crossing"),
        ("from" = Option<String>, Query, description = "Only events whose event time is at or after this (RFC 3339)"),
        ("to" = Option<String>, Query, description = "Only events whose event time is before this (RFC 3339)"),
        ("cursor" = Option<String>, Query, description = "Start after this position (`next_cursor`, `end` or an item's `position`); default the first event. With `order=desc`: the events before this position (`next_cursor` or `end`), default the last event"),
        ("order" = Option<String>, Query, description = "`asc` (default): in the order they were written; `desc`: newest first, scanning back from `cursor` (pages only)"),
        ("limit" = Option<usize>, Query, description = "Items on a page, 1 to 1000 (default 100); not for streams"),
        ("Last-Event-ID" = Option<String>, Header, description = "A stream reconnecting: the `id` of the last event it received (takes the place of `cursor`)"),
    ),
    responses(
        (status = 200, description = "A page (application/json), or with `Accept: text/event-stream` a stream that does not end: each event's SSE `id` is its position, `event` its kind, `data` the event", content(
            (EventPage = "application/json"),
            (String = "text/event-stream"),
        )),
        (status = 400, description = "A bad filter, cursor or limit", body = ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["read"]))
)]
pub(crate) async fn events(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, Problem> {
    api.access.check(&headers, Scope::Read)?;
    let filter = EventFilter::of(&query)?;
    let back = match query.get("order").map(String::as_str) {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(other) => {
            return Err(Problem::bad_request(
                "bad_filter",
                format!("order `{other}` is not asc or desc"),
            ))
        }
    };
    let durable = api.live.durable_events();
    let end = durable.map_or(0, |d| d.bytes);
    let path = Arc::clone(&api.events);
    let from = start_of(&path, &headers, &query, end, if back { end } else { 0 }).await?;
    let streamed = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if streamed && back {
        return Err(Problem::bad_request(
            "bad_filter",
            "a stream goes forward: order=desc is for pages",
        ));
    }
    if streamed {
        return Ok(stream(api, path, from, filter).into_response());
    }
    let limit = match query.get("limit") {
        None => DEFAULT_PAGE,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| {
                Problem::bad_request("bad_limit", format!("limit is 1 to {MAX_PAGE}"))
            })?,
    };
    let found = tokio::task::spawn_blocking(move || {
        if back {
            scan_back(&path, from, &filter, limit)
        } else {
            scan(&path, from, end, &filter, limit)
        }
    })
    .await
    .map_err(internal)?
    .map_err(internal)?;
    let next = if back {
        (found.stopped > 0).then_some(found.stopped)
    } else {
        (found.stopped < end).then_some(found.stopped)
    };
    Ok(Json(EventPage {
        items: found
            .items
            .into_iter()
            .map(|(at, event)| EventItem {
                position: at.to_string(),
                event,
            })
            .collect(),
        next_cursor: next.map(|at| at.to_string()),
        end: end.to_string(),
        position: Position {
            seq: durable.map(|d| d.seq),
        },
    })
    .into_response())
}

/// The stream from `from`: every committed event `filter` keeps, then
/// each one as it is committed, until the client goes.
fn stream(
    api: Arc<Api>,
    path: Arc<PathBuf>,
    from: u64,
    filter: EventFilter,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    struct Tail {
        api: Arc<Api>,
        path: Arc<PathBuf>,
        filter: Arc<EventFilter>,
        at: u64,
        ready: VecDeque<Event>,
    }
    let tail = Tail {
        api,
        path,
        filter: Arc::new(filter),
        at: from,
        ready: VecDeque::new(),
    };
    let events = futures::stream::unfold(tail, |mut tail| async move {
        loop {
            if let Some(event) = tail.ready.pop_front() {
                return Some((Ok(event), tail));
            }
            let end = tail.api.live.durable_events().map_or(0, |d| d.bytes);
            if end <= tail.at {
                tokio::time::sleep(TAIL_POLL).await;
                continue;
            }
            let (path, filter, at) = (Arc::clone(&tail.path), Arc::clone(&tail.filter), tail.at);
            let found =
                tokio::task::spawn_blocking(move || scan(&path, at, end, &filter, MAX_PAGE)).await;
            let found = match found {
                Ok(Ok(found)) => found,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "an events stream stopped");
                    return None;
                }
                Err(_) => return None,
            };
            tail.at = found.stopped;
            tail.ready
                .extend(found.items.into_iter().map(|(at, event)| {
                    Event::default()
                        .id(at.to_string())
                        .event(event["kind"].as_str().unwrap_or("event"))
                        .data(event.to_string())
                }));
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINES: [&str; 4] = [
        r#"{"kind":"card_state","iccid":"89860000000000000001","event_time":"2026-11-01T10:00:00+08:00"}"#,
        r#"{"kind":"pool_state","pool":"p1","event_time":"2026-11-02T10:00:00+08:00"}"#,
        r#"{"kind":"rule_fired","iccid":"89860000000000000001","pool":"p1","event_time":"2026-11-03T10:00:00+08:00"}"#,
        r#"{"kind":"late_crossing","iccid":"89860000000000000002","event_time":"2026-11-04T10:00:00+08:00"}"#,
    ];

    fn file() -> (tempfile::TempDir, PathBuf, Vec<u64>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let mut text = String::new();
        let mut ends = Vec::new();
        for line in LINES {
            text.push_str(line);
            text.push('\n');
            ends.push(text.len() as u64);
        }
        std::fs::write(&path, text).unwrap();
        (dir, path, ends)
    }

    fn filter(pairs: &[(&str, &str)]) -> EventFilter {
        let query = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        EventFilter::of(&query).unwrap()
    }

    fn kinds(found: &Scan) -> Vec<&str> {
        found
            .items
            .iter()
            .map(|(_, e)| e["kind"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn a_scan_resumes_exactly_after_the_position_it_gave() {
        let (_dir, path, ends) = file();
        let end = ends[2];
        let all = EventFilter::default();
        let first = scan(&path, 0, end, &all, 2).unwrap();
        assert_eq!(kinds(&first), ["card_state", "pool_state"]);
        assert_eq!(first.items[1].0, ends[1]);
        assert_eq!(first.stopped, ends[1]);
        let rest = scan(&path, first.stopped, end, &all, 2).unwrap();
        assert_eq!(kinds(&rest), ["rule_fired"]);
        assert_eq!(rest.stopped, end);
        // Only what the snapshot covers: the last line is not served.
        let covered = scan(&path, 0, ends[1], &all, 10).unwrap();
        assert_eq!(kinds(&covered), ["card_state", "pool_state"]);
    }

    #[test]
    fn filters_keep_the_card_the_pool_the_kind_and_the_time() {
        let (_dir, path, ends) = file();
        let kept = |pairs: &[(&str, &str)]| {
            let found = scan(&path, 0, ends[2], &filter(pairs), 10).unwrap();
            kinds(&found)
                .into_iter()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            kept(&[("iccid", "89860000000000000001")]),
            ["card_state", "rule_fired"]
        );
        assert_eq!(kept(&[("pool", "p1")]), ["pool_state", "rule_fired"]);
        assert_eq!(kept(&[("kind", "pool_state")]), ["pool_state"]);
        assert_eq!(
            kept(&[
                ("from", "2026-11-02T10:00:00+08:00"),
                ("to", "2026-11-03T10:00:00+08:00")
            ]),
            ["pool_state"]
        );
        for bad in [
            ("kind", "nothing"),
            ("from", "yesterday"),
            ("colour", "red"),
        ] {
            let query = [(bad.0.to_owned(), bad.1.to_owned())].into_iter().collect();
            assert!(EventFilter::of(&query).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn late_crossings_are_a_kind() {
        let (_dir, path, ends) = file();
        let found = scan(&path, 0, ends[3], &filter(&[("kind", "late_crossing")]), 10).unwrap();
        assert_eq!(kinds(&found), ["late_crossing"]);
        assert_eq!(found.items[0].0, ends[3]);
    }

    #[test]
    fn a_scan_back_gives_the_newest_first_and_resumes_before_them() {
        let (_dir, path, ends) = file();
        let all = EventFilter::default();
        // Every block size: lines cut by a block's start are read whole.
        for block in 1..=ends[3] {
            let first = scan_back_by(&path, ends[3], &all, 2, block).unwrap();
            assert_eq!(kinds(&first), ["late_crossing", "rule_fired"], "{block}");
            assert_eq!(first.items[0].0, ends[3]);
            assert_eq!(first.items[1].0, ends[2]);
            assert_eq!(first.stopped, ends[1], "{block}");
            let rest = scan_back_by(&path, first.stopped, &all, 10, block).unwrap();
            assert_eq!(kinds(&rest), ["pool_state", "card_state"], "{block}");
            assert_eq!(rest.stopped, 0);
            let card = filter(&[("iccid", "89860000000000000001")]);
            let of_card = scan_back_by(&path, ends[3], &card, 10, block).unwrap();
            assert_eq!(kinds(&of_card), ["rule_fired", "card_state"], "{block}");
            assert_eq!(of_card.items[1].0, ends[0]);
        }
        // From the part a snapshot covers, and from the start: nothing.
        let covered = scan_back(&path, ends[1], &all, 10).unwrap();
        assert_eq!(kinds(&covered), ["pool_state", "card_state"]);
        let none = scan_back(&path, 0, &all, 10).unwrap();
        assert!(none.items.is_empty());
        assert_eq!(none.stopped, 0);
    }

    #[test]
    fn a_position_is_a_line_end_the_snapshot_covers() {
        let (_dir, path, ends) = file();
        assert!(is_position(&path, 0, ends[1]));
        assert!(is_position(&path, ends[0], ends[1]));
        assert!(is_position(&path, ends[1], ends[1]));
        assert!(!is_position(&path, ends[0] + 3, ends[1]));
        assert!(!is_position(&path, ends[2], ends[1]));
    }
}
