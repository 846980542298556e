//! The single-instance lease, kept in a one-partition topic.
//!
//! Pools must be summed in one place, so exactly one flowcap instance may
//! process at a time (until pools are repartitioned, a later step). A
//! consumer-group assignment would be the obvious lease, but the broker we
//! test against (Tansu 0.6) never reassigns a partition held by a member
//! that was killed, so a `kill -9` would leave every later instance
//! standing by forever. A log is enough: Kafka orders one partition, and
//! that order decides.
//!
//! - The holder appends `heartbeat` messages every `timeout / 5`, and
//!   `release` on a clean stop.
//! - A starting instance reads the topic to its end. It claims at once when
//!   the last message is a `release`, or is from its own previous life
//!   (the instance id is kept in the data directory, so a restart after
//!   `kill -9` resumes without waiting); otherwise it waits until no
//!   heartbeat from anyone else has *arrived* for `timeout` (its own
//!   clock, so no clock skew between machines matters), then appends a
//!   `claim`.
//! - Claims race only through the log: reading on, the first claim after
//!   the last live holder wins. A loser stands by.
//! - A holder that sees someone else's claim after its own has lost the
//!   lease (it was silent for longer than `timeout`) and must stop.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Kind {
    Claim,
    Heartbeat,
    Release,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LeaseMessage {
    instance: String,
    kind: Kind,
}

/// What the lease topic says, as read so far.
#[derive(Debug, Default)]
struct View {
    /// The instance that holds the lease (its last message was a claim or
    /// heartbeat), and when that message arrived here.
    holder: Option<(String, Instant)>,
}

impl View {
    fn apply(&mut self, m: &LeaseMessage) {
        match m.kind {
            Kind::Release => {
                if self.holder.as_ref().is_some_and(|(h, _)| *h == m.instance) {
                    self.holder = None;
                }
            }
            Kind::Claim => match &self.holder {
                // A claim only counts when the lease is free (or already
                // this claimant's): the first claim after a release or an
                // expiry wins.
                Some((h, _)) if *h != m.instance => {}
                _ => self.holder = Some((m.instance.clone(), Instant::now())),
            },
            Kind::Heartbeat => match &self.holder {
                Some((h, _)) if *h != m.instance => {}
                _ => self.holder = Some((m.instance.clone(), Instant::now())),
            },
        }
    }

    /// Forgets a holder whose last message arrived longer than `timeout` ago.
    fn expire(&mut self, timeout: Duration) {
        if self
            .holder
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() > timeout)
        {
            self.holder = None;
        }
    }
}

/// A held lease: heartbeats from its own thread until dropped.
pub(crate) struct Lease {
    lost: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Lease {
    /// True once another instance took the lease over.
    pub(crate) fn lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Releases the lease (a stand-by takes over at once).
    pub(crate) fn release(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// This instance's id: kept in the data directory, so a restart of the
/// same instance (same state) is recognised as itself.
pub(crate) fn instance_id(data_dir: &Path) -> std::io::Result<String> {
    std::fs::create_dir_all(data_dir)?;
    let path = data_dir.join("instance-id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim().to_owned();
        if !id.is_empty() {
            return Ok(id);
        }
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let seed = format!("{nanos}|{}|{}", std::process::id(), data_dir.display());
    let id = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(seed.as_bytes()));
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, &id)?;
    std::fs::rename(&tmp, &path)?;
    Ok(id)
}

/// Acquires the lease, standing by (and calling `standing_by` once) while
/// another live instance holds it. `None` when `stop` is set first.
pub(crate) fn acquire(
    config: &ClientConfig,
    topic: &str,
    instance: &str,
    timeout: Duration,
    stop: &AtomicBool,
    standing_by: &mut dyn FnMut(&str),
) -> Result<Option<Lease>, KafkaError> {
    let mut consumer_config = config.clone();
    consumer_config.set("group.id", format!("flowcap.lease.{instance}"));
    consumer_config.set("enable.auto.commit", "false");
    let consumer: BaseConsumer = consumer_config.create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let producer: ThreadedProducer<DefaultProducerContext> = config.create()?;

    let mut view = View::default();
    // Read what is there now.
    let (_, high) = consumer.fetch_watermarks(topic, 0, Duration::from_secs(30))?;
    let mut next = 0i64;
    let read_started = Instant::now();
    while next < high && read_started.elapsed() < Duration::from_secs(30) {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                next = m.offset() + 1;
                if let Some(lm) = parse(m.payload()) {
                    view.apply(&lm);
                }
            }
            Some(Err(e)) => tracing::warn!(error = %e, "reading the lease topic"),
            None => {}
        }
    }
    // Our own previous life (killed without a release) holds it: ours.
    let mine = view.holder.as_ref().is_some_and(|(h, _)| h == instance);
    if !mine {
        if let Some((holder, _)) = &view.holder {
            let reason = format!(
                "standing by: another flowcap instance ({holder}) holds the lease on {topic:?}; \
                 one instance processes all partitions until pools are repartitioned"
            );
            standing_by(&reason);
        }
    }
    let mut claimed = false;
    loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(None);
        }
        view.expire(timeout);
        match &view.holder {
            Some((h, _)) if h == instance && claimed => break,
            Some((h, _)) if h == instance && mine && !claimed => {
                send(&producer, topic, instance, Kind::Claim)?;
                claimed = true;
            }
            None if !claimed => {
                send(&producer, topic, instance, Kind::Claim)?;
                claimed = true;
            }
            Some((h, _)) if h != instance && claimed => {
                // Lost the race: stand by again.
                claimed = false;
                standing_by(&format!(
                    "standing by: instance {h} claimed the lease on {topic:?} first"
                ));
            }
            _ => {}
        }
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            if let Some(lm) = parse(m.payload()) {
                view.apply(&lm);
            }
        }
    }

    let lost = Arc::new(AtomicBool::new(false));
    let stop_thread = Arc::new(AtomicBool::new(false));
    let thread = {
        let lost = Arc::clone(&lost);
        let stop = Arc::clone(&stop_thread);
        let topic = topic.to_owned();
        let instance = instance.to_owned();
        std::thread::Builder::new()
            .name("flowcap-lease".into())
            .spawn(move || heartbeat(consumer, producer, &topic, &instance, timeout, &lost, &stop))
            .expect("spawning a thread")
    };
    Ok(Some(Lease {
        lost,
        stop: stop_thread,
        thread: Some(thread),
    }))
}

fn parse(payload: Option<&[u8]>) -> Option<LeaseMessage> {
    payload.and_then(|p| serde_json::from_slice(p).ok())
}

fn send(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    instance: &str,
    kind: Kind,
) -> Result<(), KafkaError> {
    let payload = serde_json::to_vec(&LeaseMessage {
        instance: instance.to_owned(),
        kind,
    })
    .unwrap_or_default();
    producer
        .send(BaseRecord::<[u8], [u8]>::to(topic).payload(&payload))
        .map_err(|(e, _)| e)?;
    producer.flush(Duration::from_secs(10))
}

fn heartbeat(
    consumer: BaseConsumer,
    producer: ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    instance: &str,
    timeout: Duration,
    lost: &AtomicBool,
    stop: &AtomicBool,
) {
    let every = timeout / 5;
    let mut last = Instant::now() - every;
    while !stop.load(Ordering::SeqCst) {
        if last.elapsed() >= every {
            if let Err(e) = send(&producer, topic, instance, Kind::Heartbeat) {
                tracing::warn!(error = %e, "lease heartbeat failed; retrying");
            }
            last = Instant::now();
        }
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            if let Some(lm) = parse(m.payload()) {
                if lm.instance != instance && lm.kind == Kind::Claim {
                    tracing::error!(other = lm.instance, "another instance claimed the lease");
                    lost.store(true, Ordering::SeqCst);
                }
            }
        }
    }
    if !lost.load(Ordering::SeqCst) {
        let _ = send(&producer, topic, instance, Kind::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(instance: &str, kind: Kind) -> LeaseMessage {
        LeaseMessage {
            instance: instance.into(),
            kind,
        }
    }

    fn holder(v: &View) -> Option<&str> {
        v.holder.as_ref().map(|(h, _)| h.as_str())
    }

    #[test]
    fn the_first_claim_on_a_free_lease_wins() {
        let mut v = View::default();
        v.apply(&msg("a", Kind::Claim));
        v.apply(&msg("b", Kind::Claim));
        v.apply(&msg("b", Kind::Heartbeat));
        assert_eq!(holder(&v), Some("a"));
    }

    #[test]
    fn a_release_frees_the_lease_for_the_next_claim() {
        let mut v = View::default();
        v.apply(&msg("a", Kind::Claim));
        v.apply(&msg("b", Kind::Release));
        assert_eq!(holder(&v), Some("a"), "only the holder releases");
        v.apply(&msg("a", Kind::Release));
        assert_eq!(holder(&v), None);
        v.apply(&msg("b", Kind::Claim));
        assert_eq!(holder(&v), Some("b"));
    }

    #[test]
    fn a_silent_holder_expires() {
        let mut v = View::default();
        v.apply(&msg("a", Kind::Heartbeat));
        v.expire(Duration::from_secs(60));
        assert_eq!(holder(&v), Some("a"));
        v.expire(Duration::ZERO);
        std::thread::sleep(Duration::from_millis(2));
        v.expire(Duration::ZERO);
        assert_eq!(holder(&v), None);
    }

    #[test]
    fn the_instance_id_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let a = instance_id(dir.path()).unwrap();
        assert_eq!(instance_id(dir.path()).unwrap(), a);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(instance_id(other.path()).unwrap(), a);
    }
}
