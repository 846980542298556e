//! The pipeline's side of rule notifications: it starts the delivery
//! service of `flowcap-delivery` on the data directory's outbox, with the
//! webhook endpoints the engine has registered, and says where delivery
//! reports go: push-failure alerts (`push_failed` action events) are
//! appended to `alerts.jsonl` as they happen (and, in Kafka mode, produced
//! to the actions topic), and every outcome is counted in metrics and
//! logged.
//!
//! Alerts are not part of the engine's replayable output (they depend on
//! receivers and the wall clock), so `alerts.jsonl` is never rewound; its
//! events have deterministic ids for the rare repeat after a crash.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use flowcap_clock::SharedClock;
use flowcap_delivery::{Notifier, NotifyConfig, PushFailedEvent, Reports};
use flowcap_engine::Engine;
use flowcap_rules::message::{Done, Final, Message};
use flowcap_rules::TemplateOptions;

use crate::pipeline::{IngestError, ALERTS_FILE, OUTBOX_DIR};

/// Where `push_failed` events go in Kafka mode: the actions topic, keyed
/// by endpoint (or recipients), with the same headers as the engine's
/// action events.
pub(crate) struct AlertTopic {
    pub(crate) config: rdkafka::ClientConfig,
    pub(crate) topic: String,
}

struct PipelineReports {
    alerts: Mutex<std::fs::File>,
    kafka: Option<(
        rdkafka::producer::ThreadedProducer<rdkafka::producer::DefaultProducerContext>,
        String,
    )>,
}

impl Drop for PipelineReports {
    fn drop(&mut self) {
        if let Some((producer, _)) = &self.kafka {
            use rdkafka::producer::Producer;
            if let Err(e) = producer.flush(std::time::Duration::from_secs(10)) {
                tracing::error!(error = %e, "push_failed events not acknowledged by the broker");
            }
        }
    }
}

impl Reports for PipelineReports {
    fn outcome(&self, message: &Message, done: &Done) {
        match done.outcome {
            Final::Delivered => tracing::debug!(
                id = %message.id, destination = %message.destination(), attempts = done.attempts,
                "notification delivered"
            ),
            Final::Failed => tracing::warn!(
                id = %message.id, destination = %message.destination(), attempts = done.attempts,
                error = done.error.as_deref().unwrap_or(""), "notification failed"
            ),
        }
    }

    fn push_failed(&self, event: &PushFailedEvent) {
        let Ok(mut line) = serde_json::to_vec(event) else {
            return;
        };
        line.push(b'\n');
        let mut file = self.alerts.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = file.write_all(&line).and_then(|()| file.sync_data()) {
            tracing::error!(error = %e, "writing {ALERTS_FILE}");
        }
        if let Some((producer, topic)) = &self.kafka {
            use rdkafka::message::{Header, OwnedHeaders};
            let key = event.endpoint.clone().unwrap_or_else(|| event.to.join(","));
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "flowcap.event-id",
                    value: Some(event.id.as_bytes()),
                })
                .insert(Header {
                    key: "flowcap.kind",
                    value: Some(b"push_failed".as_slice()),
                });
            let record = rdkafka::producer::BaseRecord::to(topic)
                .key(key.as_bytes())
                .payload(&line[..line.len() - 1])
                .headers(headers);
            if let Err((e, _)) = producer.send(record) {
                tracing::error!(error = %e, id = %event.id, "producing a push_failed event");
            }
        }
    }
}

/// Snapshot position prefix: `notify.<destination>` = how many of that
/// destination's outcomes the history has.
pub(crate) const REPORTED_PREFIX: &str = "notify.";

/// The reported cursors recorded in a snapshot's positions.
pub(crate) fn reported(positions: &BTreeMap<String, i64>) -> BTreeMap<String, u64> {
    positions
        .iter()
        .filter_map(|(k, v)| {
            Some((
                k.strip_prefix(REPORTED_PREFIX)?.to_owned(),
                u64::try_from(*v).ok()?,
            ))
        })
        .collect()
}

/// Starts delivery for the pipeline in `dir`, resuming what its outbox
/// still holds; outcomes past `reported` are offered to the history again.
pub(crate) fn start(
    dir: &Path,
    config: &NotifyConfig,
    engine: &Engine,
    reported: &BTreeMap<String, u64>,
    kafka: Option<AlertTopic>,
    clock: SharedClock,
) -> Result<Arc<Notifier>, IngestError> {
    let kafka = match kafka {
        Some(a) => Some((
            a.config.create().map_err(IngestError::AlertProducer)?,
            a.topic,
        )),
        None => None,
    };
    let path = dir.join(ALERTS_FILE);
    let alerts = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|source| IngestError::Directory { path, source })?;
    let options = TemplateOptions {
        utc_offset_secs: engine.config().calendar.utc_offset_secs,
    };
    let notifier = Notifier::start(
        &dir.join(OUTBOX_DIR),
        config.clone(),
        engine.webhooks().cloned(),
        options,
        Arc::new(PipelineReports {
            alerts: Mutex::new(alerts),
            kafka,
        }),
        reported,
        clock,
    )?;
    Ok(Arc::new(notifier))
}
