//! The harness against a real Tansu broker, and the broker facts the Kafka
//! pipeline relies on. Every test starts its own broker on its own port.
//! Run with `--nocapture` to see the measured rates and takeover times.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowcap_testkit::{
    committed_offsets, consume_all, end_offsets, produce, Broker, Msg, Record, Storage,
};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

const IDLE: Duration = Duration::from_secs(10);

fn keyed(n: usize, from: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    (from..from + n)
        .map(|i| {
            let key = format!("card-{:05}", i % 997).into_bytes();
            let value = format!("record {i} {}", "x".repeat(i % 200)).into_bytes();
            (key, value)
        })
        .collect()
}

fn produce_keyed(broker: &Broker, topic: &str, records: &[(Vec<u8>, Vec<u8>)]) -> usize {
    let started = Instant::now();
    let sent = produce(
        broker,
        topic,
        records
            .iter()
            .map(|(k, v)| (Some(k.as_slice()), v.as_slice(), None)),
    )
    .unwrap();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "produced {sent} to {topic} in {secs:.2} s: {:.0} msg/s",
        sent as f64 / secs
    );
    sent
}

fn consume_timed(broker: &Broker, topic: &str, expect: usize) -> Vec<Msg> {
    let started = Instant::now();
    let messages = consume_all(broker, topic, expect, IDLE).unwrap();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "consumed {} from {topic} in {secs:.2} s: {:.0} msg/s",
        messages.len(),
        messages.len() as f64 / secs
    );
    messages
}

/// Exactly `records` came back (as a multiset of key and value), offsets
/// strictly increase within each partition, and the high watermarks add up.
fn check_exact(broker: &Broker, topic: &str, records: &[(Vec<u8>, Vec<u8>)], got: &[Msg]) {
    assert_eq!(got.len(), records.len(), "message count");
    let mut want: Vec<(Option<&[u8]>, &[u8])> = records
        .iter()
        .map(|(k, v)| (Some(k.as_slice()), v.as_slice()))
        .collect();
    let mut have: Vec<(Option<&[u8]>, &[u8])> = got
        .iter()
        .map(|m| (m.key.as_deref(), m.value.as_slice()))
        .collect();
    want.sort();
    have.sort();
    assert!(want == have, "payloads differ");
    let mut by_partition: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for m in got {
        by_partition.entry(m.partition).or_default().push(m.offset);
    }
    for (partition, offsets) in &by_partition {
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "offsets of partition {partition} not increasing"
        );
        let contiguous = offsets.windows(2).all(|w| w[0] + 1 == w[1]);
        println!(
            "{topic}/{partition}: {} messages, offsets {}..={}, contiguous: {contiguous}",
            offsets.len(),
            offsets[0],
            offsets[offsets.len() - 1]
        );
    }
    let ends = end_offsets(broker, topic).unwrap();
    println!("{topic} end offsets: {ends:?}");
    for (partition, offsets) in &by_partition {
        assert_eq!(
            ends[*partition as usize],
            offsets[offsets.len() - 1] + 1,
            "high watermark of partition {partition}"
        );
    }
}

#[test]
fn memory_broker_round_trips_10k_keyed_messages() {
    let broker = Broker::start(Storage::Memory).unwrap();
    broker.create_topic("usage", 4).unwrap();
    let records = keyed(10_000, 0);
    assert_eq!(produce_keyed(&broker, "usage", &records), 10_000);
    let got = consume_timed(&broker, "usage", 10_000);
    check_exact(&broker, "usage", &records, &got);
    assert_eq!(
        got.iter()
            .map(|m| m.partition)
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        4,
        "keys spread over all partitions"
    );
}

#[test]
fn timestamps_headers_and_partitions_round_trip() {
    let broker = Broker::start(Storage::Memory).unwrap();
    broker.create_topic("t", 3).unwrap();
    let headers: &[(&str, &[u8])] = &[("source", b"carrier-a"), ("seq", b"7")];
    let records: Vec<Record<'_>> = (0..30)
        .map(|i| {
            Record::new(b"v")
                .key(b"k")
                .partition(i % 3)
                .timestamp_ms(1_700_000_000_000 + i64::from(i))
                .headers(headers)
        })
        .collect();
    assert_eq!(produce(&broker, "t", records).unwrap(), 30);
    let got = consume_all(&broker, "t", 30, IDLE).unwrap();
    assert_eq!(got.len(), 30);
    for partition in 0..3 {
        let stamps: Vec<i64> = got
            .iter()
            .filter(|m| m.partition == partition)
            .map(|m| m.timestamp_ms.unwrap())
            .collect();
        let want: Vec<i64> = (0..30)
            .filter(|i| i % 3 == partition)
            .map(|i| 1_700_000_000_000 + i64::from(i))
            .collect();
        assert_eq!(stamps, want, "timestamps of partition {partition}");
    }
    let want_headers: Vec<(String, Vec<u8>)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_vec()))
        .collect();
    assert!(got.iter().all(|m| m.headers == want_headers), "headers");
    assert_eq!(end_offsets(&broker, "t").unwrap(), vec![10, 10, 10]);
}

#[test]
fn sqlite_broker_keeps_messages_across_kill_and_restart() {
    let mut broker = Broker::start(Storage::Sqlite).unwrap();
    broker.create_topic("usage", 2).unwrap();
    let first = keyed(5_000, 0);
    produce_keyed(&broker, "usage", &first);
    broker.kill().unwrap();
    let restarted = Instant::now();
    broker.restart().unwrap();
    println!("sqlite broker restarted in {:?}", restarted.elapsed());
    let second = keyed(5_000, 5_000);
    produce_keyed(&broker, "usage", &second);
    let all: Vec<_> = first.into_iter().chain(second).collect();
    let got = consume_timed(&broker, "usage", 10_000);
    check_exact(&broker, "usage", &all, &got);
}

fn group_member(broker: &Broker, group: &str) -> BaseConsumer {
    broker
        .client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .create()
        .unwrap()
}

fn holds(consumer: &BaseConsumer, topic: &str) -> bool {
    let assignment = consumer.assignment().unwrap();
    assignment.elements_for_topic(topic).len() == 1
}

/// Polls every consumer (serving rebalances) until `done` or `timeout`.
fn poll_until(
    consumers: &[&BaseConsumer],
    timeout: Duration,
    mut done: impl FnMut() -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        for consumer in consumers {
            if let Some(Err(error)) = consumer.poll(Duration::from_millis(50)) {
                println!("consumer error: {error}");
            }
        }
        if done() {
            return true;
        }
    }
    false
}

/// Fact 3a: a member of G (holding `lease`) commits offsets of `data`, a
/// topic it is not subscribed to, and they read back.
#[test]
fn group_member_commits_offsets_of_an_unsubscribed_topic() {
    let broker = Broker::start(Storage::Memory).unwrap();
    broker.create_topic("lease", 1).unwrap();
    broker.create_topic("data", 3).unwrap();
    let records: Vec<Record<'_>> = (0..90)
        .map(|i| Record::new(b"d").partition(i % 3))
        .collect();
    produce(&broker, "data", records).unwrap();

    let member = group_member(&broker, "G");
    member.subscribe(&["lease"]).unwrap();
    let started = Instant::now();
    assert!(
        poll_until(&[&member], Duration::from_secs(30), || holds(
            &member, "lease"
        )),
        "the member never got lease/0\n{}",
        broker.log_tail()
    );
    println!("member assigned lease/0 after {:?}", started.elapsed());

    let mut offsets = TopicPartitionList::new();
    for (partition, offset) in [(0, 10), (1, 20), (2, 30)] {
        offsets
            .add_partition_offset("data", partition, Offset::Offset(offset))
            .unwrap();
    }
    member.commit(&offsets, CommitMode::Sync).unwrap();
    assert_eq!(
        committed_offsets(&broker, "G", "data").unwrap(),
        vec![Some(10), Some(20), Some(30)]
    );
    assert_eq!(
        committed_offsets(&broker, "G", "lease").unwrap(),
        vec![None]
    );

    // The commit did not cost the member its lease.
    poll_until(&[&member], Duration::from_secs(3), || false);
    assert!(
        holds(&member, "lease"),
        "member lost lease/0 after committing"
    );

    // A second commit moves them on.
    let mut offsets = TopicPartitionList::new();
    offsets
        .add_partition_offset("data", 1, Offset::Offset(25))
        .unwrap();
    member.commit(&offsets, CommitMode::Sync).unwrap();
    assert_eq!(
        committed_offsets(&broker, "G", "data").unwrap(),
        vec![Some(10), Some(25), Some(30)]
    );
}

/// Fact 3b: two members of one group on a one-partition topic: exactly one
/// holds it; when the holder closes, the other takes over.
#[test]
fn one_of_two_members_holds_a_single_partition_and_the_other_takes_over() {
    let broker = Broker::start(Storage::Memory).unwrap();
    broker.create_topic("lease", 1).unwrap();
    let a = group_member(&broker, "lease-group");
    let b = group_member(&broker, "lease-group");
    a.subscribe(&["lease"]).unwrap();
    b.subscribe(&["lease"]).unwrap();

    let started = Instant::now();
    let mut both = 0;
    let one = || holds(&a, "lease") as u8 + holds(&b, "lease") as u8;
    assert!(
        poll_until(&[&a, &b], Duration::from_secs(30), || one() == 1),
        "nobody got lease/0\n{}",
        broker.log_tail()
    );
    println!("first assignment after {:?}", started.elapsed());
    // Let both joins and any rebalance settle; never may both hold it.
    poll_until(&[&a, &b], Duration::from_secs(10), || {
        both += (one() == 2) as usize;
        false
    });
    assert_eq!(both, 0, "both members held lease/0 at once");
    assert_eq!(one(), 1, "exactly one member holds lease/0 after settling");
    let (holder, other) = if holds(&a, "lease") { (a, b) } else { (b, a) };

    let closed = Instant::now();
    drop(holder);
    let closing = closed.elapsed();
    let took_over = poll_until(&[&other], Duration::from_secs(60), || {
        holds(&other, "lease")
    });
    assert!(
        took_over,
        "the other member did not take over within 60 s\n{}",
        broker.log_tail()
    );
    println!(
        "takeover after the holder closed: {:?} (closing took {closing:?})",
        closed.elapsed()
    );
}

/// Counts statistics events, which only the main queue's poll serves.
#[derive(Default)]
struct CountStats(AtomicUsize);

impl ClientContext for CountStats {
    fn stats_raw(&self, _: &[u8]) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

impl ConsumerContext for CountStats {}

fn split_consumer(broker: &Broker) -> Arc<BaseConsumer<CountStats>> {
    Arc::new(
        broker
            .client_config()
            .set("group.id", "split")
            .set("enable.auto.commit", "false")
            .set("statistics.interval.ms", "100")
            .create_with_context(CountStats::default())
            .unwrap(),
    )
}

fn assign_both(consumer: &BaseConsumer<CountStats>) {
    let mut assignment = TopicPartitionList::new();
    for partition in 0..2 {
        assignment
            .add_partition_offset("split", partition, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
}

fn split_broker() -> Broker {
    let broker = Broker::start(Storage::Memory).unwrap();
    broker.create_topic("split", 2).unwrap();
    let records: Vec<Record<'_>> = (0..200)
        .map(|i| Record::new(b"s").partition(i % 2))
        .collect();
    produce(&broker, "split", records).unwrap();
    broker
}

/// Drains a queue until `idle` passes without a message; returns partitions.
fn drain(
    mut poll: impl FnMut() -> Option<rdkafka::error::KafkaResult<Msg>>,
    idle: Duration,
) -> Vec<i32> {
    let mut partitions = Vec::new();
    let mut last = Instant::now();
    while last.elapsed() < idle {
        if let Some(message) = poll() {
            partitions.push(message.unwrap().partition);
            last = Instant::now();
        }
    }
    partitions
}

/// Fact 3c: a partition split off an `assign()`ed consumer receives that
/// partition's messages on its own queue, without polling the main queue;
/// events (here: statistics) are served only by the main queue's poll.
#[test]
fn split_partition_queue_after_assign() {
    let broker = split_broker();
    let consumer = split_consumer(&broker);
    assign_both(&consumer);
    let queue = consumer.split_partition_queue("split", 0).unwrap();

    // Only the split queue is polled.
    let split = drain(
        || {
            queue
                .poll(Duration::from_millis(50))
                .map(|m| m.map(|m| Msg::from_message(&m)))
        },
        Duration::from_secs(3),
    );
    let stats_unpolled = consumer.context().0.load(Ordering::Relaxed);
    println!(
        "split queue without polling main: {} messages of partitions {:?}; stats events served: {stats_unpolled}",
        split.len(),
        split.iter().collect::<std::collections::BTreeSet<_>>()
    );
    assert_eq!(
        split.len(),
        100,
        "partition 0's messages on the split queue"
    );
    assert!(split.iter().all(|&p| p == 0));

    let main = drain(
        || {
            consumer
                .poll(Duration::from_millis(50))
                .map(|m| m.map(|m| Msg::from_message(&m)))
        },
        Duration::from_secs(3),
    );
    let stats_polled = consumer.context().0.load(Ordering::Relaxed);
    println!(
        "main queue: {} messages of partitions {:?}; stats events served: {stats_polled}",
        main.len(),
        main.iter().collect::<std::collections::BTreeSet<_>>()
    );
    assert_eq!(main.len(), 100, "partition 1's messages on the main queue");
    assert!(main.iter().all(|&p| p == 1));
    assert_eq!(stats_unpolled, 0, "events served without polling main");
    assert!(stats_polled > 0, "polling main serves events");
}

/// Fact 3c, the other order: splitting before `assign()`.
#[test]
fn split_partition_queue_before_assign() {
    let broker = split_broker();
    let consumer = split_consumer(&broker);
    let queue = consumer.split_partition_queue("split", 0).unwrap();
    assign_both(&consumer);

    let split = drain(
        || {
            queue
                .poll(Duration::from_millis(50))
                .map(|m| m.map(|m| Msg::from_message(&m)))
        },
        Duration::from_secs(3),
    );
    let main = drain(
        || {
            consumer
                .poll(Duration::from_millis(50))
                .map(|m| m.map(|m| Msg::from_message(&m)))
        },
        Duration::from_secs(3),
    );
    let count = |v: &[i32], p| v.iter().filter(|&&x| x == p).count();
    println!(
        "split before assign: split queue got p0 {} p1 {}; main got p0 {} p1 {}",
        count(&split, 0),
        count(&split, 1),
        count(&main, 0),
        count(&main, 1)
    );
    assert_eq!(
        (count(&split, 0), count(&main, 0), count(&main, 1)),
        (100, 0, 100),
        "split before assign: partition 0 on its queue, partition 1 on main"
    );
}

const HOLDER_BOOTSTRAP: &str = "FLOWCAP_TESTKIT_HOLDER_BOOTSTRAP";

fn sticky_member(bootstrap: &str, group: &str) -> BaseConsumer {
    let mut config = rdkafka::ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        // The member that holds the partition keeps it when another joins.
        .set("partition.assignment.strategy", "cooperative-sticky");
    config.create().unwrap()
}

/// The lease holder of `takeover_after_the_holder_is_killed`, run as a child
/// process (the test binary again) so that it can be SIGKILLed: prints
/// `holds 1` / `holds 0` whenever its assignment changes.
#[test]
#[ignore = "helper process of takeover_after_the_holder_is_killed"]
fn lease_holder_process() {
    let Ok(bootstrap) = std::env::var(HOLDER_BOOTSTRAP) else {
        return;
    };
    let consumer = sticky_member(&bootstrap, "crash-group");
    consumer.subscribe(&["lease"]).unwrap();
    let mut held = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let _ = consumer.poll(Duration::from_millis(50));
        let now = holds(&consumer, "lease");
        if held != Some(now) {
            held = Some(now);
            println!("holds {}", now as u8);
        }
    }
}

/// Fact 3b for a crash: the holder is SIGKILLed (no LeaveGroup), so the
/// other member can take over only once the broker expires its session.
#[test]
fn takeover_after_the_holder_is_killed() {
    use std::io::BufRead;
    let broker = Broker::start(Storage::Memory).unwrap();
    broker.create_topic("lease", 1).unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "lease_holder_process",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(HOLDER_BOOTSTRAP, broker.bootstrap())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(state) = line.strip_prefix("holds ") {
                let _ = tx.send(state == "1");
            }
        }
    });
    let child_holds = |timeout| loop {
        match rx.recv_timeout(timeout) {
            Ok(true) => break true,
            Ok(false) => {}
            Err(_) => break false,
        }
    };
    assert!(
        child_holds(Duration::from_secs(30)),
        "the holder process never got lease/0\n{}",
        broker.log_tail()
    );

    let other = sticky_member(&broker.bootstrap(), "crash-group");
    other.subscribe(&["lease"]).unwrap();
    poll_until(&[&other], Duration::from_secs(10), || false);
    let mut child_state = true;
    while let Ok(state) = rx.try_recv() {
        child_state = state;
    }
    assert!(
        child_state && !holds(&other, "lease"),
        "after the second member joined, the holder process should still hold lease/0 \
         (child holds: {child_state}, other holds: {})",
        holds(&other, "lease")
    );

    child.kill().unwrap();
    child.wait().unwrap();
    let killed = Instant::now();
    let took_over = poll_until(&[&other], Duration::from_secs(60), || {
        holds(&other, "lease")
    });
    assert!(
        took_over,
        "the other member did not take over within 60 s of the holder's SIGKILL\n{}",
        broker.log_tail()
    );
    println!(
        "takeover after the holder was SIGKILLed (session.timeout.ms 6000): {:?}",
        killed.elapsed()
    );
}
