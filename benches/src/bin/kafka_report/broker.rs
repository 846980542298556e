//! The broker and what the phases produce to it: a Tansu `memory://`
//! broker with flowcap's topics, a producer that counts acknowledgements,
//! the workload's commands and records, and how a record is encoded.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use flowcap_benches::progress;
use flowcap_engine::Usage;
use flowcap_loadgen::{to_json_line, GeneratedRecord, Payload, RecordKind, Workload};
use flowcap_testkit::{Broker, Storage};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;

use crate::wall_ms;

/// flowcap's consumer settings (`CONSUMER_DEFAULTS` in
/// `ingest/src/kafka/mod.rs`; keep in sync): the raw baseline fetches
/// exactly as flowcap does.
pub(crate) const FLOWCAP_CONSUMER: &[(&str, &str)] = &[
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
    ("auto.offset.reset", "earliest"),
    ("fetch.wait.max.ms", "5"),
    ("fetch.min.bytes", "1"),
    ("fetch.max.bytes", "52428800"),
    ("max.partition.fetch.bytes", "8388608"),
    ("queued.max.messages.kbytes", "65536"),
    ("fetch.queue.backoff.ms", "10"),
    ("session.timeout.ms", "10000"),
    ("heartbeat.interval.ms", "1000"),
];

pub(crate) const USAGE: &str = "flowcap.usage";

const COMMANDS: &str = "flowcap.commands";

pub(crate) const ACTIONS: &str = "flowcap.actions";

pub(crate) const DLQ: &str = "flowcap.dlq";

const RESULTS: &str = "flowcap.command-results";

/// How a usage record is written into the usage topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Encoding {
    Json,
    Binary,
}

impl Encoding {
    /// Replaces `out` with `record` in this encoding (a malformed record:
    /// its raw bytes either way).
    pub(crate) fn write(self, record: &GeneratedRecord, out: &mut Vec<u8>) {
        out.clear();
        match self {
            Encoding::Binary => record.to_binary(out),
            Encoding::Json => {
                // Empty after the clear, so valid UTF-8: the buffer is reused.
                let mut line = String::from_utf8(std::mem::take(out)).unwrap_or_default();
                to_json_line(record, &mut line);
                *out = line.into_bytes();
            }
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Encoding::Json => "json",
            Encoding::Binary => "binary",
        }
    }
}

pub(crate) fn start_broker(partitions: i32) -> Result<Broker> {
    let broker = Broker::start(Storage::Memory)?;
    for (topic, n) in [
        (USAGE, partitions),
        (COMMANDS, 1),
        (ACTIONS, 2),
        (DLQ, 1),
        (RESULTS, 1),
        ("flowcap.lease", 1),
    ] {
        broker.create_topic(topic, n)?;
    }
    eprintln!("broker: tansu memory:// on {}", broker.bootstrap());
    Ok(broker)
}

#[derive(Default)]
pub(crate) struct Acks {
    ok: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
    /// Sum and max of (acknowledged - message timestamp), ms.
    pub(crate) ack_ms_sum: AtomicU64,
    pub(crate) ack_ms_max: AtomicU64,
}

impl ClientContext for Acks {}

impl ProducerContext for Acks {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(m) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                if let Some(ts) = m.timestamp().to_millis() {
                    let ms = (wall_ms() - ts).max(0) as u64;
                    self.ack_ms_sum.fetch_add(ms, Ordering::Relaxed);
                    self.ack_ms_max.fetch_max(ms, Ordering::Relaxed);
                }
            }
            Err((e, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut first) = self.first_error.lock() {
                    first.get_or_insert_with(|| e.to_string());
                }
            }
        }
    }
}

/// A producer to one topic that counts acknowledgements (`acks=all`).
pub(crate) struct Sender {
    pub(crate) producer: BaseProducer<Acks>,
    topic: &'static str,
    sent: u64,
}

impl Sender {
    pub(crate) fn new(broker: &Broker, topic: &'static str, linger_ms: u32) -> Result<Sender> {
        let mut config = broker.client_config();
        let config = config
            .set("acks", "all")
            .set("linger.ms", linger_ms.to_string())
            .set("batch.num.messages", "10000")
            .set("batch.size", "1000000")
            .set("queue.buffering.max.messages", "1000000")
            .set("queue.buffering.max.kbytes", "1048576")
            .set("message.timeout.ms", "60000");
        let producer = config.create_with_context(Acks::default())?;
        Ok(Sender {
            producer,
            topic,
            sent: 0,
        })
    }

    pub(crate) fn send(
        &mut self,
        key: Option<&[u8]>,
        value: &[u8],
        timestamp_ms: Option<i64>,
    ) -> Result<()> {
        let mut record = BaseRecord::<[u8], [u8]>::to(self.topic).payload(value);
        record.key = key;
        record.timestamp = timestamp_ms;
        loop {
            match self.producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    self.producer.poll(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e).context(format!("producing to {}", self.topic)),
            }
        }
        self.sent += 1;
        if self.sent.is_multiple_of(1024) {
            self.poll();
            if self.producer.context().failed.load(Ordering::Relaxed) > 0 {
                return Err(self.failure());
            }
        }
        Ok(())
    }

    pub(crate) fn poll(&self) {
        self.producer.poll(Duration::ZERO);
    }

    fn failure(&self) -> anyhow::Error {
        let first = self
            .producer
            .context()
            .first_error
            .lock()
            .ok()
            .and_then(|e| e.clone());
        anyhow!("delivery to {} failed: {first:?}", self.topic)
    }

    /// Waits until every message is acknowledged (fails on any failure or
    /// on 60 s without progress).
    pub(crate) fn flush(&mut self) -> Result<u64> {
        let acks = self.producer.context().clone();
        let mut progress = (u64::MAX, Instant::now());
        loop {
            if acks.failed.load(Ordering::Relaxed) > 0 {
                return Err(self.failure());
            }
            let ok = acks.ok.load(Ordering::Relaxed);
            if ok == self.sent {
                return Ok(ok);
            }
            if ok != progress.0 {
                progress = (ok, Instant::now());
            } else if progress.1.elapsed() > Duration::from_secs(60) {
                bail!(
                    "{} of {} messages to {} acknowledged after 60 s",
                    ok,
                    self.sent,
                    self.topic
                );
            }
            self.producer.poll(Duration::from_millis(20));
        }
    }
}

pub(crate) fn produce_commands(broker: &Broker, workload: &Workload) -> Result<u64> {
    let total = workload.setup_commands().count() as u64;
    let bar = progress(Some(total), "setup commands produced");
    let mut sender = Sender::new(broker, COMMANDS, 5)?;
    let mut buf = Vec::new();
    for (i, command) in workload.setup_commands().enumerate() {
        buf.clear();
        serde_json::to_writer(&mut buf, &command)?;
        sender.send(None, &buf, None)?;
        if i % 4096 == 0 {
            bar.set_position(i as u64);
        }
    }
    sender.flush()?;
    bar.finish_and_clear();
    Ok(total)
}

/// Produces the workload's records keyed by ICCID with their arrival as the
/// message timestamp (as `flowcap/tests/kafka.rs` does); returns how many.
pub(crate) fn produce_workload_records(
    broker: &Broker,
    workload: &Workload,
    encoding: Encoding,
) -> Result<u64> {
    let total = workload.total_records();
    let bar = progress(Some(total), "records produced");
    let mut sender = Sender::new(broker, USAGE, 5)?;
    let mut message = Vec::new();
    let mut key = String::new();
    let began = Instant::now();
    for (i, r) in workload.records().enumerate() {
        encoding.write(&r, &mut message);
        key.clear();
        let _ = write!(key, "{}", r.iccid());
        sender.send(Some(key.as_bytes()), &message, Some(r.arrival.millis()))?;
        if i % 4096 == 0 {
            bar.set_position(i as u64);
        }
    }
    let n = sender.flush()?;
    bar.finish_and_clear();
    eprintln!(
        "produced {n} records in {:.1} s ({:.0}/s)",
        began.elapsed().as_secs_f64(),
        n as f64 / began.elapsed().as_secs_f64()
    );
    Ok(n)
}

pub(crate) fn average_record_len(workload: &Workload, encoding: Encoding) -> f64 {
    let mut message = Vec::new();
    let (mut n, mut len) = (0usize, 0usize);
    for r in workload.records().take(10_000) {
        encoding.write(&r, &mut message);
        n += 1;
        len += message.len();
    }
    len as f64 / n.max(1) as f64
}

/// A valid usage record as the generator would make it, to encode.
pub(crate) fn valid_record(usage: Usage, seq: u64) -> GeneratedRecord {
    GeneratedRecord {
        seq,
        arrival: usage.end,
        kind: RecordKind::Fresh,
        payload: Payload::Valid(usage),
    }
}
