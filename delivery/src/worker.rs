//! A destination's task on the delivery runtime: one message in flight,
//! sent, retried with back-off or as `Retry-After` says, and its outcome
//! written to the destination's done file.

use std::collections::HashSet;
use std::io::BufRead;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use flowcap_engine::Timestamp;
use flowcap_rules::message::{DeliveryRow, Done, Final, Message, MessageChannel};

use crate::outbox::{Appender, Entry};
use crate::retry::Verdict;
use crate::{
    send, DeliveryError, Destination, PushFailedEvent, Request, Shared, METRIC_ATTEMPTS,
    METRIC_DONE,
};

/// One destination's task: reads its log from disk up to the durable
/// length and delivers each message not yet done, one at a time.
pub(crate) async fn worker(
    dest: Arc<Destination>,
    done_path: PathBuf,
    already_done: HashSet<String>,
    done_lines: u64,
    shared: Arc<Shared>,
) {
    let name = dest.name.clone();
    if let Err(e) = run_worker(&dest, done_path, already_done, done_lines, &shared).await {
        tracing::error!(destination = %name, error = %e, "notification delivery stopped for this destination");
    }
}

pub(crate) async fn run_worker(
    dest: &Destination,
    done_path: PathBuf,
    already_done: HashSet<String>,
    mut done_lines: u64,
    shared: &Shared,
) -> Result<(), DeliveryError> {
    let io = |source| DeliveryError::Io {
        path: dest.log.clone(),
        source,
    };
    let mut reader = std::io::BufReader::new(std::fs::File::open(&dest.log).map_err(io)?);
    let mut done_log = Appender::open(done_path)?;
    let mut position = 0u64;
    let mut line = String::new();
    loop {
        if shared.stopping.load(Ordering::Acquire) {
            return Ok(());
        }
        if position >= dest.synced.load(Ordering::Acquire) {
            dest.wake.notified().await;
            continue;
        }
        line.clear();
        let n = reader.read_line(&mut line).map_err(io)?;
        if n == 0 {
            // Synced length not visible through this handle yet.
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        position += n as u64;
        let message = match serde_json::from_str::<Entry>(&line) {
            Ok(Entry::Msg(m)) if !already_done.contains(&m.id) => m,
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(destination = %dest.name, error = %e, "skipping an unreadable outbox line");
                continue;
            }
        };
        let done = deliver(shared, &message).await;
        if done.outcome == Final::Failed && message.alert_for.is_none() {
            let event = push_failed(&message, &done);
            let (tx, rx) = tokio::sync::oneshot::channel();
            if shared
                .requests
                .send(Request::Alert(Box::new(event), tx))
                .is_ok()
            {
                let _ = rx.await;
            }
        }
        done_log.append(&done)?;
        done_log.flush()?;
        match done.outcome {
            Final::Delivered => shared.delivered.fetch_add(1, Ordering::AcqRel),
            Final::Failed => shared.failed.fetch_add(1, Ordering::AcqRel),
        };
        metrics::counter!(METRIC_DONE,
            "channel" => message.channel.as_str(), "outcome" => done.outcome.as_str())
        .increment(1);
        dest.completed.fetch_add(1, Ordering::AcqRel);
        dest.gauge();
        shared.reports.outcome(&message, &done);
        shared
            .outcomes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(DeliveryRow {
                destination: dest.name.clone(),
                index: done_lines,
                message,
                done,
            });
        done_lines += 1;
    }
}

/// Attempts a message until it is delivered, refused, or out of attempts.
pub(crate) async fn deliver(shared: &Shared, message: &Message) -> Done {
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let attempt = match message.channel {
            MessageChannel::Webhook => {
                match shared.endpoint(message.endpoint.as_deref().unwrap_or_default()) {
                    Ok(endpoint) => send::webhook(&endpoint, message, shared.clock.as_ref()).await,
                    Err(e) => refused(e),
                }
            }
            MessageChannel::Sms => match &shared.config.sms {
                Some(gateway) => {
                    send::sms(gateway, &shared.http, message, shared.clock.as_ref()).await
                }
                None => refused("no SMS gateway is configured ([notify.sms])".into()),
            },
            MessageChannel::Email => match &shared.config.smtp {
                Some(relay) => send::email(relay, message, shared.config.request_timeout()).await,
                None => refused("no SMTP relay is configured ([notify.smtp])".into()),
            },
        };
        let result = match attempt.verdict {
            Verdict::Delivered => "delivered",
            Verdict::Retry(_) => "retry",
            Verdict::Refused => "refused",
        };
        metrics::counter!(METRIC_ATTEMPTS,
            "channel" => message.channel.as_str(), "result" => result)
        .increment(1);
        let done = |outcome| Done {
            id: message.id.clone(),
            outcome,
            attempts,
            status: attempt.status,
            error: attempt.error.clone(),
            at_ms: shared.clock.now_ms(),
        };
        match attempt.verdict {
            Verdict::Delivered => return done(Final::Delivered),
            Verdict::Refused => return done(Final::Failed),
            Verdict::Retry(after) => match shared.policy.wait(&message.id, attempts, after) {
                None => return done(Final::Failed),
                Some(wait) => {
                    tracing::debug!(id = %message.id, attempts, ?wait, error = ?attempt.error, "notification attempt failed; retrying");
                    shared.retries.fetch_add(1, Ordering::AcqRel);
                    tokio::time::sleep(wait).await;
                    if shared.stopping.load(Ordering::Acquire) {
                        // Left for the next start (still not done on disk).
                        std::future::pending::<()>().await;
                    }
                }
            },
        }
    }
}

pub(crate) fn refused(error: String) -> send::Attempt {
    send::Attempt {
        verdict: Verdict::Refused,
        status: None,
        error: Some(error),
    }
}

pub(crate) fn push_failed(message: &Message, done: &Done) -> PushFailedEvent {
    let key = format!("push_failed|{}", message.id);
    PushFailedEvent {
        id: format!("{:032x}", xxhash_rust::xxh3::xxh3_128(key.as_bytes())),
        kind: "push_failed".into(),
        channel: message.channel,
        endpoint: message.endpoint.clone(),
        to: message.to.clone(),
        message_id: message.id.clone(),
        rule: message.rule.clone(),
        firings: message.firings.clone(),
        executions: message.executions.clone(),
        attempts: done.attempts,
        status: done.status,
        error: done.error.clone().unwrap_or_default(),
        payload: serde_json::from_str(&message.body)
            .unwrap_or_else(|_| serde_json::Value::String(message.body.clone())),
        failed_at: Timestamp(done.at_ms),
    }
}
