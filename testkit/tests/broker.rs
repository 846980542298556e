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
    if broker.storage() == Storage::Memory {
        return; // Tansu's memory storage reports wrong high watermarks.
    }
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
    // Sqlite: the memory storage's high watermarks are wrong (see below).
    let broker = Broker::start(Storage::Sqlite).unwrap();
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

/// Tansu's sqlite fetch looks up every returned record's headers; without
/// the harness's index (`HEADER_INDEX`) that is a scan of every header in
/// the broker, and this read took minutes instead of about a second.
#[test]
fn sqlite_reads_stay_fast_with_many_headers_stored() {
    let broker = Broker::start(Storage::Sqlite).unwrap();
    broker.create_topic("dead-letters", 1).unwrap();
    broker.create_topic("usage", 1).unwrap();
    let headers: &[(&str, &[u8])] = &[
        ("flowcap.reason", b"unknown_card"),
        ("flowcap.message", b"no such card"),
        ("flowcap.source.topic", b"usage"),
        ("flowcap.source.partition", b"0"),
        ("flowcap.source.offset", b"42"),
    ];
    let letters = (0..10_000).map(|_| Record::new(b"letter").headers(headers));
    assert_eq!(produce(&broker, "dead-letters", letters).unwrap(), 10_000);
    let usage = keyed(20_000, 0);
    produce_keyed(&broker, "usage", &usage);
    let started = Instant::now();
    let got = consume_all(&broker, "usage", usage.len(), IDLE).unwrap();
    let took = started.elapsed();
    println!("20k records read with 50k headers stored in {took:?}");
    assert_eq!(
        got.len(),
        usage.len(),
        "read {} of {} records in {took:?} (nothing for {IDLE:?}: header lookups unindexed?)",
        got.len(),
        usage.len()
    );
    assert!(took < Duration::from_secs(30), "{took:?}");
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
const CRASH_GROUP: &str = "crash-group";

/// A member of `CRASH_GROUP` on `lease`. Range assignment gives the single
/// partition to the smallest member id, and Tansu makes member ids
/// `<client.id>-<uuid>`: so `a-...` beats `b-...`, whoever joined first.
fn lease_member(bootstrap: &str, client_id: &str) -> BaseConsumer {
    let mut config = rdkafka::ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("client.id", client_id)
        .set("group.id", CRASH_GROUP)
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .set("partition.assignment.strategy", "range");
    let consumer: BaseConsumer = config.create().unwrap();
    consumer.subscribe(&["lease"]).unwrap();
    consumer
}

/// The lease holder of the crash tests, run as a child process (this test
/// binary again) so that it can be SIGKILLed: prints `holds 1` / `holds 0`
/// whenever its assignment changes.
#[test]
#[ignore = "helper process of the crash tests"]
fn lease_holder_process() {
    let Ok(bootstrap) = std::env::var(HOLDER_BOOTSTRAP) else {
        return;
    };
    let consumer = lease_member(&bootstrap, "a-holder");
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

/// The holder process and the latest of its `holds` reports.
struct Holder {
    child: std::process::Child,
    reports: std::sync::mpsc::Receiver<bool>,
    holds: bool,
}

impl Holder {
    fn spawn(broker: &Broker) -> Holder {
        use std::io::BufRead;
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
        let stdout = child.stdout.take().unwrap();
        let (tx, reports) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(state) = line.strip_prefix("holds ") {
                    let _ = tx.send(state == "1");
                }
            }
        });
        Holder {
            child,
            reports,
            holds: false,
        }
    }

    fn holds(&mut self) -> bool {
        while let Ok(holds) = self.reports.try_recv() {
            self.holds = holds;
        }
        self.holds
    }

    /// SIGKILL: no LeaveGroup, the broker must expire the session.
    fn kill(self) {
        drop(self);
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The holder process holding `lease/0` (it joined first: Tansu made it the
/// group leader) and a standby member that joined second.
fn holder_and_standby(broker: &Broker) -> (Holder, BaseConsumer) {
    broker.create_topic("lease", 1).unwrap();
    let mut holder = Holder::spawn(broker);
    let started = Instant::now();
    while !holder.holds() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the holder process never got lease/0\n{}",
            broker.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let standby = lease_member(&broker.bootstrap(), "b-standby");
    poll_until(&[&standby], Duration::from_secs(5), || false);
    assert!(
        holder.holds() && !holds(&standby, "lease"),
        "the holder keeps lease/0 when the standby joins (range by member id)"
    );
    (holder, standby)
}

/// Fact 3b for a crash: FAILS on Tansu 0.6.0, whether the holder is the
/// group leader (as here) or a follower. After the holder's SIGKILL the broker
/// drops it once its session times out and answers the standby's heartbeat
/// with REBALANCE_IN_PROGRESS; but the standby's rejoin (same metadata) takes
/// the formed group's "existing member" path (same generation, no new
/// assignment), and a formed group's SyncGroup ignores the leader's new
/// assignments and returns the stored ones. So lease/0 stays with the dead
/// member. A member joining afresh after that sometimes re-forms the group
/// (a new consumer 1, 8 or 12 s after the SIGKILL got lease/0 about 7, 9 and
/// 12 s after it; one created after 4 s never did; the standby leaving and
/// subscribing again worked 12 s after the SIGKILL, not 8 s after): nothing a
/// failover can rely on.
#[test]
#[ignore = "Tansu 0.6.0 never reassigns a crashed member's partitions by session timeout"]
fn takeover_after_the_holder_crashes() {
    let broker = Broker::start(Storage::Memory).unwrap();
    let (holder, standby) = holder_and_standby(&broker);
    holder.kill();
    let killed = Instant::now();
    let took_over = poll_until(&[&standby], Duration::from_secs(60), || {
        holds(&standby, "lease")
    });
    assert!(
        took_over,
        "the standby did not take over within 60 s of the holder's SIGKILL\n{}",
        broker.log_tail()
    );
    println!(
        "takeover after the holder's SIGKILL: {:?}",
        killed.elapsed()
    );
}

/// Throughput probe, not a check: `RATES_N=200000 RATES_STORAGE=sqlite cargo
/// test -p flowcap-testkit --test broker -- --ignored rates --nocapture`.
#[test]
#[ignore = "measurement"]
fn rates() {
    let n: usize = std::env::var("RATES_N").map_or(200_000, |n| n.parse().unwrap());
    let storage = match std::env::var("RATES_STORAGE").as_deref() {
        Ok("sqlite") => Storage::Sqlite,
        _ => Storage::Memory,
    };
    let broker = Broker::start(storage).unwrap();
    broker.create_topic("usage", 4).unwrap();
    let value = [b'x'; 200];
    let started = Instant::now();
    let keys: Vec<[u8; 8]> = (0..n as u64).map(u64::to_be_bytes).collect();
    produce(
        &broker,
        "usage",
        keys.iter().map(|k| (Some(&k[..]), &value[..], None)),
    )
    .unwrap();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{storage:?}: produced {n} x 200 B in {secs:.2} s: {:.0} msg/s",
        n as f64 / secs
    );
    let started = Instant::now();
    let got = consume_all(&broker, "usage", n, IDLE).unwrap();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{storage:?}: consumed {} in {secs:.2} s: {:.0} msg/s",
        got.len(),
        got.len() as f64 / secs
    );
    assert_eq!(got.len(), n);
}

/// Pins a Tansu 0.6.0 defect that `end_offsets` inherits: with memory
/// storage, ListOffsets(latest) answers the base offset of the newest batch
/// plus one, not the offset after its last record. Fetching is not affected.
#[test]
fn memory_storage_high_watermark_falls_short() {
    let broker = Broker::start(Storage::Memory).unwrap();
    broker.create_topic("t", 1).unwrap();
    let records: Vec<Record<'_>> = (0..10).map(|_| Record::new(b"v")).collect();
    produce(&broker, "t", records).unwrap();
    assert_eq!(consume_all(&broker, "t", 10, IDLE).unwrap().len(), 10);
    let ends = end_offsets(&broker, "t").unwrap();
    println!("memory storage: 10 records in one batch, end offset {ends:?}");
    assert_eq!(
        ends,
        vec![1],
        "if this fails Tansu fixed its watermark: update the docs"
    );
}
