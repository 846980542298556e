//! The Kafka pipeline: usage and commands in, actions, dead letters and
//! command results out, exactly once in effect across crashes.
//!
//! # Protocol
//!
//! - **Inputs** are the partitions of the usage topic and the single
//!   partition of the commands topic. The data consumer *assigns* them
//!   (no group rebalancing can move them mid-run) at the offsets stored in
//!   the newest snapshot, or at the beginning when there is none. The
//!   broker's committed offsets are never used to decide where to start:
//!   the snapshot is the only truth, so state and positions cannot diverge.
//! - **Sequence**: every message gets the next global sequence number. The
//!   interleaving of partitions is written to the order log (`order_log.rs`)
//!   before the messages are processed, so a replay after a crash feeds
//!   the engine the same sequence and emits the same events with the same
//!   ids.
//! - **Alignment**: each input has a queue of its own, and the usage
//!   partitions are read together in message time, the one furthest
//!   behind first (`align.rs`). Each is a lane of the engine's clock,
//!   which follows the slowest; a partition read to its end and silent is
//!   declared idle by an input of its own (`lanes.rs`).
//! - **Outputs** (actions keyed by ICCID or pool id, dead letters, command
//!   results keyed by command id) go through an idempotent producer; a
//!   message whose delivery fails is sent again, never dropped.
//! - **Snapshots** (every `snapshot_every` inputs, every
//!   `snapshot_interval`, and on shutdown): at the *cut* all shards come
//!   home, the outputs so far are closed into an epoch and the engine with
//!   the input positions is encoded; messages then flow again while the
//!   writer *commits* it: once every output of the epoch is acknowledged
//!   by the broker, the window's history files are stored and every local
//!   file is fsynced, the snapshot is written atomically; only then are
//!   offsets committed to the broker (for lag tools; flowcap itself does
//!   not read them) and old order-log segments dropped.
//! - **Restart**: restore the newest snapshot, seek every partition to its
//!   recorded position, replay the logged order, then go on. Records
//!   replayed after the snapshot are new to the restored dedupe state, so
//!   they count exactly once; their events repeat with the same ids.
//! - **One active instance**: a lease kept in a one-partition topic (see
//!   `lease.rs`): the holder heartbeats; any other instance stands by (not
//!   ready, with the reason) until the holder releases it or falls silent.
//!   Pools must be summed in one place, so until pools are repartitioned
//!   (a later step) a second instance must never process.

mod align;
mod driver;
mod feed;
mod inputs;
mod lanes;
mod lease;
mod order_log;
mod produced;
mod producer;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowcap_clock::{SharedClock, SystemClock};
use flowcap_engine::decode::DecodeLimits;
use flowcap_engine::EngineConfig;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::limits::SizeLimits;
use crate::metrics as m;
use crate::pipeline::{IngestError, KafkaOut, Pipeline, Restored, Start, Summary, Wait};
pub use align::AlignSettings;
use driver::{Driver, PREFETCH_BATCH};
use feed::{Fetched, PartitionFeed};
use inputs::Inputs;
use lanes::LaneWatch;
use order_log::{OrderLog, ReplayRun};
pub(crate) use produced::SideOutput;
pub(crate) use producer::KafkaProducer;

/// Topic names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Topics {
    /// Usage records in (keyed by ICCID).
    pub usage: String,
    /// Commands in (one partition: commands keep one order).
    pub commands: String,
    /// Action events out (keyed by ICCID or pool id).
    pub actions: String,
    /// Dead letters out.
    pub dlq: String,
    /// Command results out (keyed by command id).
    pub results: String,
    /// The single-instance lease (one partition; see `kafka::lease`).
    pub lease: String,
}

impl Default for Topics {
    fn default() -> Topics {
        Topics {
            usage: "flowcap.usage".into(),
            commands: "flowcap.commands".into(),
            actions: "flowcap.actions".into(),
            dlq: "flowcap.dlq".into(),
            results: "flowcap.command-results".into(),
            lease: "flowcap.lease".into(),
        }
    }
}

/// How to run against Kafka.
#[derive(Debug, Clone)]
pub struct KafkaOptions {
    /// `bootstrap.servers`.
    pub bootstrap: String,
    /// Consumer group (the lease, committed offsets).
    pub group: String,
    /// Topic names.
    pub topics: Topics,
    /// librdkafka properties for every client (passed through; they win
    /// over flowcap's defaults).
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties for the consumers only.
    pub consumer_properties: BTreeMap<String, String>,
    /// librdkafka properties for the producer only.
    pub producer_properties: BTreeMap<String, String>,
    /// Snapshots, dedupe index, order log and local history.
    pub data_dir: PathBuf,
    /// Engine configuration (ignored when resuming: the snapshot's wins).
    pub engine: EngineConfig,
    /// Snapshot after this many inputs (0: not by count).
    pub snapshot_every: u64,
    /// Snapshot at least this often while inputs arrive.
    pub snapshot_interval: Duration,
    /// Write the Parquet history; `None`: no history.
    pub history: Option<crate::pipeline::HistoryConfig>,
    /// Deliver rule notifications; `None`: nothing is sent.
    pub notify: Option<flowcap_delivery::NotifyConfig>,
    /// Record decoding limits.
    pub limits: DecodeLimits,
    /// Largest record and command read (`crate::limits`): a larger message
    /// is dead-lettered as `too_large`, not decoded.
    pub sizes: SizeLimits,
    /// Messages processed between two looks at the lease, backpressure and
    /// the snapshot schedule.
    pub max_run: usize,
    /// Records queued in the shards above which, sustained for
    /// `pause_after`, the partitions are paused (resumed below half of it).
    pub max_queued_records: usize,
    /// How long the shards must stay above `max_queued_records` before the
    /// partitions are paused. A pause makes librdkafka drop what it has
    /// prefetched (fetched again on resume), so a short stall (a history
    /// chunk, a snapshot) is better absorbed by the bounded queues and
    /// the bounded prefetch (`queued.max.messages.kbytes`) than by a pause.
    pub pause_after: Duration,
    /// How usage partitions are kept together in time (`kafka::align`).
    pub align: AlignSettings,
    /// A holder silent for this long loses the lease to a stand-by.
    pub lease_timeout: Duration,
    /// Stop (snapshot, commit, exit) after no input arrived for this long
    /// and every partition is consumed to its end. For tests and
    /// benchmarks; a service runs until signalled.
    pub exit_when_idle: Option<Duration>,
    /// Resume from the newest snapshot, or start over (`--fresh`:
    /// clear the data directory's state and history and read every input
    /// from the oldest offset the broker keeps). When resuming, a data
    /// directory whose snapshots all fail to restore refuses to start.
    pub start: Start,
    /// Reads of live state from the operator API, answered between
    /// batches ([`crate::requests`]); commands from the API go through
    /// the commands topic instead.
    pub requests: Option<crate::requests::Requests>,
    /// The time of day (the system clock but in tests): processing times,
    /// notification times.
    pub clock: SharedClock,
}

impl KafkaOptions {
    /// Defaults for a broker and a data directory.
    pub fn new(bootstrap: impl Into<String>, data_dir: impl Into<PathBuf>) -> KafkaOptions {
        KafkaOptions {
            bootstrap: bootstrap.into(),
            group: "flowcap".into(),
            topics: Topics::default(),
            properties: BTreeMap::new(),
            consumer_properties: BTreeMap::new(),
            producer_properties: BTreeMap::new(),
            data_dir: data_dir.into(),
            engine: EngineConfig::default(),
            snapshot_every: 1_000_000,
            snapshot_interval: Duration::from_secs(60),
            history: Some(crate::pipeline::HistoryConfig::default()),
            notify: Some(flowcap_delivery::NotifyConfig::default()),
            limits: DecodeLimits::default(),
            sizes: SizeLimits::default(),
            max_run: 4096,
            max_queued_records: 1 << 16,
            pause_after: Duration::from_secs(1),
            align: AlignSettings::default(),
            lease_timeout: Duration::from_secs(10),
            exit_when_idle: None,
            start: Start::Resume,
            requests: None,
            clock: SystemClock::shared(),
        }
    }
}

/// What the pipeline is doing, for readiness and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Connecting and restoring state.
    Starting,
    /// Another instance holds the lease; this one waits.
    StandingBy(String),
    /// Replaying the inputs after the restored snapshot.
    Replaying,
    /// Consuming.
    Running,
    /// Draining, taking the last snapshot.
    Stopping,
}

/// Errors that stop the Kafka pipeline. Bad input never does.
#[derive(Debug, thiserror::Error)]
pub enum KafkaRunError {
    /// A Kafka client call failed.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The engine, a local file or the writer failed.
    #[error(transparent)]
    Ingest(#[from] IngestError),
    /// A topic does not exist (flowcap does not create topics).
    #[error("topic {0:?} does not exist on the broker: create it first")]
    MissingTopic(String),
    /// The commands topic has more than one partition.
    #[error("the commands topic {topic:?} has {partitions} partitions; it must have exactly 1 so that commands keep one order")]
    CommandPartitions {
        /// The topic.
        topic: String,
        /// Its partition count.
        partitions: usize,
    },
    /// The order log could not be read or written.
    #[error("order log: {0}")]
    OrderLog(std::io::Error),
    /// librdkafka would not give a partition a queue of its own.
    #[error("could not split partition {1} of {0:?} into a queue of its own")]
    Split(String, i32),
    /// A message arrived on the consumer's shared queue although every
    /// input has a queue of its own: the driver could no longer keep the
    /// partition's order, so it stops (a restart resumes exactly).
    #[error("message {topic}/{partition}@{offset} arrived on the consumer's shared queue; partition queues are not split as expected")]
    Unsplit {
        /// Its topic.
        topic: String,
        /// Its partition.
        partition: i32,
        /// Its offset.
        offset: i64,
    },
    /// The runs a batch started differ from those logged before it: the
    /// order log would not replay it (a bug; a restart resumes exactly).
    #[error("the order log's entries for a batch differ from the runs it started")]
    RunsDisagree,
    /// The lease was lost while processing: another instance may now be
    /// active, so this one stops without a snapshot.
    #[error("lost the lease on {0:?} to another instance: stopping without processing further")]
    LeaseLost(String),
}

/// One input partition: where the driver is in it.
#[derive(Clone)]
struct Cursor {
    topic: String,
    partition: i32,
    commands: bool,
    /// Offset of the next message to process.
    next: i64,
    /// Whether `next` is known to be the next offset on the topic (a
    /// restored position, or one after a message): a message past it
    /// means offsets were skipped. Not at a start from the beginning,
    /// where retention may have removed the first offsets.
    exact: bool,
    /// Offsets skipped so far (the first gap is a warning, the rest debug).
    skipped: u64,
}

impl Cursor {
    fn new(topic: &str, partition: i32, commands: bool) -> Cursor {
        Cursor {
            topic: topic.to_owned(),
            partition,
            commands,
            next: 0,
            exact: false,
            skipped: 0,
        }
    }

    fn position_key(&self) -> String {
        position_key(&self.topic, self.partition)
    }

    /// Starts at a restored position: `next` is exact.
    fn resume_at(&mut self, next: i64) {
        self.next = next;
        self.exact = true;
    }

    /// Notes that the message at `offset` is the next one there is;
    /// counts the offsets skipped before it. On a plain topic (no
    /// transactions, no compaction) a gap is a record lost before flowcap
    /// saw it (by the broker or the client), which exact accounting must
    /// not hide.
    fn advance_to(&mut self, offset: i64) {
        if self.exact && offset > self.next {
            let skipped = u64::try_from(offset - self.next).unwrap_or(0);
            if self.skipped == 0 {
                tracing::warn!(
                    topic = self.topic,
                    partition = self.partition,
                    expected = self.next,
                    got = offset,
                    "offsets skipped in an input partition (transaction markers or compaction, \
                     else records lost before flowcap; counted in flowcap_offset_gaps_total)"
                );
            } else {
                tracing::debug!(
                    topic = self.topic,
                    partition = self.partition,
                    expected = self.next,
                    got = offset,
                    "offsets skipped"
                );
            }
            self.skipped += skipped;
            m::offset_gap(&self.topic, self.partition, skipped);
        }
        self.next = offset + 1;
        self.exact = true;
    }
}

fn position_key(topic: &str, partition: i32) -> String {
    format!("kafka.{topic}.{partition}")
}

fn client_config(
    options: &KafkaOptions,
    defaults: &[(&str, &str)],
    specific: &BTreeMap<String, String>,
) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &options.bootstrap);
    for (k, v) in defaults {
        config.set(*k, *v);
    }
    for (k, v) in options.properties.iter().chain(specific) {
        config.set(k, v);
    }
    config
}

const CONSUMER_DEFAULTS: &[(&str, &str)] = &[
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
    ("auto.offset.reset", "earliest"),
    ("fetch.wait.max.ms", "5"),
    ("fetch.min.bytes", "1"),
    ("fetch.max.bytes", "52428800"),
    ("max.partition.fetch.bytes", "8388608"),
    // Per partition: every input has a queue of its own (`split_queues`),
    // and librdkafka then bounds each one's prefetch by itself, by count
    // (fetching stops above queued.min.messages) and by payload bytes.
    // 25 k messages each is 100 k over 4 partitions, what the one shared
    // queue held before the split (its default, 100 k per partition, cost
    // 150 MB more at 4 partitions: librdkafka's per-message overhead is not
    // in the byte count).
    ("queued.min.messages", "25000"),
    ("queued.max.messages.kbytes", "16384"),
    // When the prefetch queue is full (the engine is slower than the
    // fetcher, i.e. always under a backlog), librdkafka waits this long
    // before fetching that partition again. At its default (1,000 ms) the
    // driver drained the queue and then starved for most of a second: the
    // Kafka pipeline ran at 120 k records/s in bursts with gaps at zero. A
    // consumer spending 4 us per message went from 123 k/s to 224 k/s at
    // 10 ms (docs/BENCHMARKS.md §8).
    ("fetch.queue.backoff.ms", "10"),
    ("session.timeout.ms", "10000"),
    // A request a restarted broker never answers is abandoned (and the
    // connection re-established) after this, not after the default minute.
    // It must stay above the slowest fetch the broker serves: a fetch that
    // always takes longer is abandoned and sent again forever (the broker
    // still works on the abandoned one, so the retry is slower still). That
    // is how Tansu's unindexed header lookups stalled the kill -9 loop
    // (docs/DECISIONS.md, "Tansu's sqlite storage and the kill -9 loop").
    ("socket.timeout.ms", "10000"),
    ("heartbeat.interval.ms", "1000"),
];

const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("linger.ms", "2"),
    ("batch.num.messages", "10000"),
];

/// Runs until `stop` is set (or, with `exit_when_idle`, until the input is
/// drained), then snapshots, commits and returns.
///
/// In steps: the start-up (clients and topics, the lease, the pipeline
/// restored with its producer), the inputs opened at the snapshot's
/// positions, the catch-up (the logged order replayed, then the commands
/// produced before this start), the main loop, and the last snapshot.
pub fn run(
    options: &KafkaOptions,
    stop: Arc<AtomicBool>,
    status: &mut dyn FnMut(&Status),
) -> Result<Summary, KafkaRunError> {
    status(&Status::Starting);
    let started = Instant::now();
    let clients = Clients::connect(options)?;
    // The lease first: a stand-by instance must not touch the state.
    let Some(lease) = hold_lease(options, &stop, status)? else {
        return Ok(Summary::default());
    };
    let give_up = Arc::new(AtomicBool::new(false));
    let Some(mut pipeline) = start_pipeline(options, &clients, &give_up, &stop)? else {
        return Ok(Summary::default());
    };
    let Clients {
        data,
        meta,
        lag_client,
        usage_partitions,
        ..
    } = clients;

    let (mut cursors, all) = open_cursors(options, usage_partitions, &pipeline)?;
    let order_dir = options.data_dir.join(ORDER_DIR);
    let runs = order_log::read_all(&order_dir).map_err(KafkaRunError::OrderLog)?;
    let plan = order_log::replay_plan(&runs, pipeline.resumed_after);
    let log =
        OrderLog::open(&order_dir, pipeline.resumed_after).map_err(KafkaRunError::OrderLog)?;
    // The open (last) run is replayed up to its partition's high watermark,
    // asked for before fetching starts so the query does not wait behind
    // the fetches of every partition on a slow broker. `None` (stopped
    // while asking) ends the replay there.
    let open_run_end = match plan.last() {
        Some(ReplayRun {
            source,
            count: None,
        }) if (*source as usize) < cursors.len() => {
            high_watermark(&meta, &cursors[*source as usize], &stop)
        }
        _ => None,
    };
    let queues = split_queues(&data, &cursors)?;
    data.assign(&all)?;

    let lag_positions: Arc<Vec<AtomicI64>> =
        Arc::new(cursors.iter().map(|c| AtomicI64::new(c.next)).collect());
    let times: Arc<Vec<AtomicI64>> =
        Arc::new(cursors.iter().map(|_| AtomicI64::new(i64::MIN)).collect());
    let highs: Arc<Vec<AtomicI64>> =
        Arc::new(cursors.iter().map(|_| AtomicI64::new(i64::MAX)).collect());
    let lag_thread = spawn_lag_reporter(
        lag_client,
        cursors.clone(),
        Arc::clone(&lag_positions),
        Arc::clone(&times),
        Arc::clone(&highs),
        Arc::clone(&stop),
    );
    let commands = (0..cursors.len())
        .filter(|&i| cursors[i].commands)
        .collect();
    let mut reader = Reader {
        data: &data,
        meta: &meta,
        inputs: Inputs::new(&queues, commands, options.align, times, Instant::now()),
        stop: &stop,
    };

    let shards = pipeline.sharded.shard_count();
    // One clock lane per usage partition (lane = partition number): time
    // follows the slowest (`lanes.rs`).
    pipeline.sharded.engine().declare_lanes(usage_partitions);
    let mut driver = Driver::new(
        pipeline,
        log,
        LaneWatch::new(cursors.len(), options.align.idle, highs, Instant::now()),
        options,
        lag_positions,
        shards,
    );
    m::pipeline_started();

    catch_up(
        options,
        &mut reader,
        &mut driver,
        &mut cursors,
        plan,
        open_run_end,
        status,
    )?;

    status(&Status::Running);
    tracing::info!(
        partitions = usage_partitions,
        resumed_after = ?driver.pipeline.resumed_after,
        "consuming"
    );
    consume(
        options,
        &mut reader,
        &mut driver,
        &mut cursors,
        &all,
        &lease,
        &give_up,
    )?;

    status(&Status::Stopping);
    let align = &reader.inputs.align;
    tracing::info!(
        holds = align.holds,
        releases = align.releases,
        silences = align.silences,
        "partition alignment"
    );
    driver.pipeline.sharded.engine();
    driver.snapshot(&cursors, &data)?;
    driver.after_commit(&data, Wait::Block)?;
    lease.release();
    stop.store(true, Ordering::SeqCst);
    let _ = lag_thread.join();
    let inputs = driver.inputs;
    let (mut summary, _engine) = driver.pipeline.finish()?;
    summary.inputs = inputs;
    summary.elapsed_secs = started.elapsed().as_secs_f64();
    summary.inputs_per_sec = inputs as f64 / summary.elapsed_secs.max(1e-9);
    summary.out_dir = options.data_dir.clone();
    Ok(summary)
}

/// The order log's directory inside the data directory.
const ORDER_DIR: &str = "order";

/// The Kafka clients of a run, and the usage topic's partition count.
struct Clients {
    consumer_config: ClientConfig,
    /// Reads the inputs: it assigns partitions and never joins a group;
    /// its group id names the committed offsets (informational, for lag
    /// tools).
    data: Arc<BaseConsumer>,
    /// Watermark queries get clients of their own: on the data consumer's
    /// connection they queue behind long-polling fetch requests. The lag
    /// reporter has its own, so the replay's and the idle exit's queries
    /// never wait behind its backlog on a slow broker.
    meta: BaseConsumer,
    lag_client: BaseConsumer,
    usage_partitions: usize,
}

impl Clients {
    /// Connects, and checks that the topics exist (flowcap never creates
    /// them) and that the commands topic has one partition.
    fn connect(options: &KafkaOptions) -> Result<Clients, KafkaRunError> {
        let consumer_config =
            client_config(options, CONSUMER_DEFAULTS, &options.consumer_properties);
        let mut data_config = consumer_config.clone();
        data_config.set("group.id", &options.group);
        let data: Arc<BaseConsumer> = Arc::new(data_config.create()?);
        let meta: BaseConsumer = consumer_config.create()?;
        let lag_client: BaseConsumer = consumer_config.create()?;

        let usage_partitions = partition_count(&data, &options.topics.usage)?;
        let command_partitions = partition_count(&data, &options.topics.commands)?;
        if command_partitions != 1 {
            return Err(KafkaRunError::CommandPartitions {
                topic: options.topics.commands.clone(),
                partitions: command_partitions,
            });
        }
        for topic in [
            &options.topics.actions,
            &options.topics.dlq,
            &options.topics.results,
            &options.topics.lease,
        ] {
            partition_count(&data, topic)?;
        }
        Ok(Clients {
            consumer_config,
            data,
            meta,
            lag_client,
            usage_partitions,
        })
    }
}

/// Waits for the single-instance lease (`lease.rs`), standing by while
/// another instance holds it; `None` when stopped first.
fn hold_lease(
    options: &KafkaOptions,
    stop: &AtomicBool,
    status: &mut dyn FnMut(&Status),
) -> Result<Option<lease::Lease>, KafkaRunError> {
    let instance = lease::instance_id(&options.data_dir).map_err(KafkaRunError::OrderLog)?;
    let mut lease_config = ClientConfig::new();
    lease_config.set("bootstrap.servers", &options.bootstrap);
    for (k, v) in &options.properties {
        lease_config.set(k, v);
    }
    lease_config.set("fetch.wait.max.ms", "10");
    let lease = lease::acquire(
        &lease_config,
        &options.topics.lease,
        &instance,
        options.lease_timeout,
        stop,
        &mut |reason| {
            tracing::warn!("{reason}");
            status(&Status::StandingBy(reason.to_owned()));
        },
    )?;
    if lease.is_some() {
        tracing::info!(instance, "lease acquired");
    }
    Ok(lease)
}

/// The pipeline restored from the data directory's snapshot (or started
/// over), producing to the output topics; the side topics are read back
/// first so a replay does not produce their messages twice
/// (`produced.rs`). `None` when stopped first.
fn start_pipeline(
    options: &KafkaOptions,
    clients: &Clients,
    give_up: &Arc<AtomicBool>,
    stop: &AtomicBool,
) -> Result<Option<Pipeline>, KafkaRunError> {
    let restored = Restored::load(&options.data_dir, options.start)?;
    let Some(produced) = produced::read_back(
        &clients.consumer_config,
        &clients.meta,
        &options.data_dir,
        restored.positions(),
        &[&options.topics.dlq, &options.topics.results],
        options.start,
        stop,
    )?
    else {
        return Ok(None);
    };
    let order_dir = options.data_dir.join(ORDER_DIR);
    if options.start == Start::Fresh && order_dir.exists() {
        std::fs::remove_dir_all(&order_dir).map_err(KafkaRunError::OrderLog)?;
    }
    let producer_config = client_config(options, PRODUCER_DEFAULTS, &options.producer_properties);
    let out = KafkaOut {
        producer: KafkaProducer::new(&producer_config, produced)?,
        actions: options.topics.actions.clone(),
        dlq: options.topics.dlq.clone(),
        results: options.topics.results.clone(),
        producer_config: producer_config.clone(),
        give_up: Arc::clone(give_up),
    };
    let mut pipeline = Pipeline::start_from(
        restored,
        &options.engine,
        options.history.as_ref(),
        options.notify.as_ref(),
        Some(out),
        &options.clock,
    )?;
    if let Some(requests) = &options.requests {
        pipeline.publish_durable_events(requests.durable_mark().clone());
    }
    Ok(Some(pipeline))
}

/// A cursor for every input (the commands partition, then the usage
/// partitions; indices name sources in the order log, so they are
/// stable) at the restored snapshot's positions, and the assignment that
/// starts there.
fn open_cursors(
    options: &KafkaOptions,
    usage_partitions: usize,
    pipeline: &Pipeline,
) -> Result<(Vec<Cursor>, TopicPartitionList), KafkaRunError> {
    let mut cursors = vec![Cursor::new(&options.topics.commands, 0, true)];
    for p in 0..usage_partitions {
        let partition = i32::try_from(p).unwrap_or(i32::MAX);
        cursors.push(Cursor::new(&options.topics.usage, partition, false));
    }
    let mut tpl = TopicPartitionList::new();
    for c in &mut cursors {
        let offset = match pipeline.restored_positions.get(&c.position_key()) {
            Some(&next) => {
                c.resume_at(next);
                Offset::Offset(next)
            }
            None => Offset::Beginning,
        };
        tpl.add_partition_offset(&c.topic, c.partition, offset)?;
    }
    Ok((cursors, tpl))
}

/// What reading needs besides the driver: the data consumer (its own
/// queue served between reads), the metadata client, every input's queue,
/// and the stop flag.
struct Reader<'a> {
    data: &'a BaseConsumer,
    meta: &'a BaseConsumer,
    inputs: Inputs<'a, PartitionFeed>,
    stop: &'a AtomicBool,
}

impl Reader<'_> {
    /// Reads source `i` alone until `until`, each message processed as it
    /// comes (logging progress every 5 s: a slow broker shows here), or
    /// until a stop; with `silence`, also until the source delivered
    /// nothing for that long.
    fn read_alone(
        &mut self,
        driver: &mut Driver,
        cursors: &mut [Cursor],
        i: usize,
        until: Until,
        silence: Option<Duration>,
        what: &str,
    ) -> Result<(), KafkaRunError> {
        let (mut taken, mut last_report, mut last_message) = (0u64, Instant::now(), Instant::now());
        while !until.reached(taken, cursors[i].next)
            && silence.is_none_or(|s| last_message.elapsed() < s)
            && !self.stop.load(Ordering::SeqCst)
        {
            if last_report.elapsed() >= Duration::from_secs(5) {
                last_report = Instant::now();
                tracing::info!(
                    source = i,
                    taken,
                    next = cursors[i].next,
                    "{what} in progress"
                );
            }
            serve(self.data)?;
            if let Some(message) =
                self.inputs
                    .next_of(i, Duration::from_millis(100), Instant::now())
            {
                last_message = Instant::now();
                taken += u64::from(driver.process(i as u32, &mut cursors[i], &message)?);
            }
        }
        Ok(())
    }
}

/// Before the main loop: replays the logged order (the inputs after the
/// restored snapshot, in the order they were processed), then reads the
/// commands produced before this start.
fn catch_up(
    options: &KafkaOptions,
    reader: &mut Reader<'_>,
    driver: &mut Driver,
    cursors: &mut [Cursor],
    plan: Vec<ReplayRun>,
    open_run_end: Option<i64>,
    status: &mut dyn FnMut(&Status),
) -> Result<(), KafkaRunError> {
    if !plan.is_empty() {
        status(&Status::Replaying);
        tracing::info!(runs = plan.len(), "replaying the logged input order");
    }
    for ReplayRun { source, count } in plan {
        tracing::debug!(source, ?count, "replay run");
        if source == lanes::WAKE_SOURCE {
            driver.wake_lanes()?;
            continue;
        }
        if let Some(lane) = lanes::idle_lane(source) {
            driver.declare_idle(lane)?;
            continue;
        }
        let i = source as usize;
        if i >= cursors.len() {
            tracing::warn!(
                source,
                "order log names an unknown source; replay ends here"
            );
            break;
        };
        let until = match (count, open_run_end) {
            (Some(n), _) => Until::Count(n),
            (None, Some(high)) => Until::Offset(high),
            (None, None) => break,
        };
        reader.read_alone(driver, cursors, i, until, None, "replay")?;
        driver.maybe_snapshot(options, cursors, reader.data)?;
    }
    // Every partition holds time back again until it is read or declared
    // idle anew: one idle when the last run stopped may have a backlog now.
    driver.wake_lanes()?;

    // Commands produced before this start are applied before any usage
    // read now, so a card's first records never meet a commands topic that
    // was simply fetched later (they would be dead-lettered as unknown).
    // Offsets past the last message (a transaction marker) are never
    // delivered: a partition silent for 10 s is read to its end.
    if let Some(i) = cursors.iter().position(|c| c.commands) {
        if let Some(high) = high_watermark(reader.meta, &cursors[i], reader.stop) {
            let silence = Some(Duration::from_secs(10));
            let until = Until::Offset(high);
            reader.read_alone(
                driver,
                cursors,
                i,
                until,
                silence,
                "reading the commands first",
            )?;
        }
    }
    Ok(())
}

/// The main loop, until a stop (or, with `exit_when_idle`, until every
/// input is read to its end): batches of what is fetched and due, with
/// backpressure, idle partitions declared and snapshots on schedule.
fn consume(
    options: &KafkaOptions,
    reader: &mut Reader<'_>,
    driver: &mut Driver,
    cursors: &mut [Cursor],
    all: &TopicPartitionList,
    lease: &lease::Lease,
    give_up: &AtomicBool,
) -> Result<(), KafkaRunError> {
    let data = reader.data;
    let mut last_input = Instant::now();
    let mut paused = false;
    let mut over_since: Option<Instant> = None;
    let mut wait = Duration::ZERO;
    let mut batch = Vec::with_capacity(PREFETCH_BATCH);
    while !reader.stop.load(Ordering::SeqCst) {
        if lease.lost() {
            give_up.store(true, Ordering::SeqCst);
            return Err(KafkaRunError::LeaseLost(options.topics.lease.clone()));
        }
        let mut got = 0usize;
        while got < options.max_run {
            // What is already fetched and due, up to a prefetch batch; never
            // waits for more than the first message.
            batch.clear();
            let max = PREFETCH_BATCH.min(options.max_run - got);
            serve(data)?;
            reader.inputs.fill(&mut batch, max, wait, Instant::now());
            if batch.is_empty() {
                break;
            }
            wait = Duration::ZERO;
            got += batch.len();
            driver.process_batch(cursors, &batch)?;
            if let Some(requests) = &options.requests {
                driver.serve_requests(requests);
            }
        }
        if got == 0 {
            if let Some(requests) = &options.requests {
                driver.serve_requests(requests);
            }
            // Nothing waiting: push partial batches so quiet periods do not
            // hold records back, then wait briefly.
            driver.pipeline.sharded.flush();
            if let Some(idle) = options.exit_when_idle {
                // Input waiting for its turn (a parked message, a partition
                // held back) is not idleness.
                if last_input.elapsed() >= idle && !paused && !reader.inputs.holding() {
                    // Fetching stops while the watermarks are asked for: a
                    // broker busy answering empty fetches (Tansu's durable
                    // storage) can starve those queries.
                    data.pause(all)?;
                    if caught_up(reader.meta, cursors) {
                        return Ok(());
                    }
                    data.resume(all)?;
                    last_input = Instant::now();
                }
            }
            // Block in the next poll briefly instead of spinning.
            wait = Duration::from_millis(1);
        } else {
            last_input = Instant::now();
        }
        // Backpressure: pause fetching while the shards stay far behind.
        let queued = driver.pipeline.sharded.queued_records();
        if queued > options.max_queued_records {
            over_since.get_or_insert_with(Instant::now);
        } else if queued <= options.max_queued_records / 2 {
            over_since = None;
        }
        let sustained = over_since.is_some_and(|t| t.elapsed() >= options.pause_after);
        if !paused && sustained {
            data.pause(all)?;
            paused = true;
            m::backpressure_pause();
            for c in cursors.iter() {
                m::partition_paused(&c.topic, c.partition, true);
            }
        } else if paused && queued <= options.max_queued_records / 2 {
            data.resume(all)?;
            reader.inputs.restart(Instant::now());
            paused = false;
            for c in cursors.iter() {
                m::partition_paused(&c.topic, c.partition, false);
            }
        }
        if let Some(i) = driver.lanes.due(cursors, Instant::now()) {
            driver.declare_idle(cursors[i].partition as u32)?;
            driver.lanes.declared_idle(i);
        }
        driver.maybe_snapshot(options, cursors, data)?;
    }
    Ok(())
}

/// Gives every input its own queue ([`BaseConsumer::split_partition_queue`]),
/// before the assignment starts fetching: the driver then chooses which
/// partition to read ([`Inputs::fill`], [`Inputs::next_of`]) instead of
/// taking the broker's fetch order, and librdkafka bounds each partition's
/// prefetch on its own (`queued.min.messages`, `queued.max.messages.kbytes`
/// apply per partition to split queues). librdkafka marks a split queue as
/// forwarded by the application, so the assignment's fetch start does not
/// forward it back to the consumer's queue.
fn split_queues(
    data: &Arc<BaseConsumer>,
    cursors: &[Cursor],
) -> Result<Vec<PartitionFeed>, KafkaRunError> {
    cursors
        .iter()
        .map(|c| {
            PartitionFeed::split(data, &c.topic, c.partition)
                .ok_or_else(|| KafkaRunError::Split(c.topic.clone(), c.partition))
        })
        .collect()
}

impl<'a> inputs::Feed<'a> for PartitionFeed {
    type Message = Fetched<'a>;
    fn next(&'a self, timeout: Duration) -> Option<Fetched<'a>> {
        PartitionFeed::next(self, timeout)
    }
}

impl inputs::Stamped for Fetched<'_> {
    fn timestamp_ms(&self) -> Option<i64> {
        Fetched::timestamp_ms(self)
    }
}

/// Serves the consumer's own queue (errors, commit results). No message
/// can arrive there: every input has a queue of its own.
fn serve(data: &BaseConsumer) -> Result<(), KafkaRunError> {
    match data.poll(Duration::ZERO) {
        Some(Ok(m)) => Err(KafkaRunError::Unsplit {
            topic: m.topic().to_owned(),
            partition: m.partition(),
            offset: m.offset(),
        }),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "consumer error");
            Ok(())
        }
        None => Ok(()),
    }
}

enum Until {
    Count(u64),
    Offset(i64),
}

impl Until {
    fn reached(&self, taken: u64, next: i64) -> bool {
        match *self {
            Until::Count(n) => taken >= n,
            Until::Offset(o) => next >= o,
        }
    }
}

fn partition_count(consumer: &BaseConsumer, topic: &str) -> Result<usize, KafkaRunError> {
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(30))?;
    match metadata.topics().iter().find(|t| t.name() == topic) {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(t.partitions().len()),
        _ => Err(KafkaRunError::MissingTopic(topic.to_owned())),
    }
}

/// The high watermark of every partition in `cursors`, in one ListOffsets
/// request (timestamp "latest"): one round trip however many partitions,
/// where a query per partition queues dozens of requests behind a slow
/// broker.
fn high_watermarks(
    consumer: &BaseConsumer,
    cursors: &[Cursor],
    timeout: Duration,
) -> Result<Vec<i64>, KafkaError> {
    let mut tpl = TopicPartitionList::new();
    for c in cursors {
        tpl.add_partition_offset(&c.topic, c.partition, Offset::End)?;
    }
    let answer = consumer.offsets_for_times(tpl, timeout)?;
    cursors
        .iter()
        .map(|c| {
            let e =
                answer
                    .find_partition(&c.topic, c.partition)
                    .ok_or(KafkaError::MetadataFetch(
                        RDKafkaErrorCode::UnknownPartition,
                    ))?;
            e.error()?;
            match e.offset() {
                Offset::Offset(high) => Ok(high),
                _ => Err(KafkaError::MetadataFetch(
                    RDKafkaErrorCode::OffsetNotAvailable,
                )),
            }
        })
        .collect()
}

/// True when every partition is consumed to its high watermark. An
/// unreachable broker answers "no" (the run goes on and retries), never an
/// error: a broker restart must not stop the pipeline.
fn caught_up(consumer: &BaseConsumer, cursors: &[Cursor]) -> bool {
    match high_watermarks(consumer, cursors, Duration::from_secs(10)) {
        Ok(highs) => cursors.iter().zip(highs).all(|(c, high)| c.next >= high),
        Err(e) => {
            tracing::warn!(error = %e, "watermarks unavailable");
            false
        }
    }
}

/// The high watermark of a partition, retried while the broker is away.
fn high_watermark(consumer: &BaseConsumer, c: &Cursor, stop: &AtomicBool) -> Option<i64> {
    while !stop.load(Ordering::SeqCst) {
        match high_watermarks(consumer, std::slice::from_ref(c), Duration::from_secs(10)) {
            Ok(highs) => return highs.first().copied(),
            Err(e) => tracing::warn!(error = %e, "watermarks unavailable; retrying"),
        }
    }
    None
}

/// Reports per-partition lag every second from its own thread and client,
/// so a slow metadata call never stalls the driver and never delays the
/// driver's own watermark queries.
fn spawn_lag_reporter(
    consumer: BaseConsumer,
    cursors: Vec<Cursor>,
    positions: Arc<Vec<AtomicI64>>,
    times: Arc<Vec<AtomicI64>>,
    highs: Arc<Vec<AtomicI64>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("flowcap-lag".into())
        .spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if let Ok(answer) = high_watermarks(&consumer, &cursors, Duration::from_secs(5)) {
                    for (i, (c, high)) in cursors.iter().zip(answer).enumerate() {
                        let next = positions[i].load(Ordering::Relaxed);
                        m::consumer_lag(&c.topic, c.partition, high - next);
                        highs[i].store(high, Ordering::Relaxed);
                    }
                }
                for (c, time) in cursors.iter().zip(times.iter()) {
                    let time = time.load(Ordering::Relaxed);
                    if time != i64::MIN && !c.commands {
                        m::partition_time(&c.topic, c.partition, time);
                    }
                }
                for _ in 0..10 {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        })
        .expect("spawning a thread")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_counts_skipped_offsets_only_where_it_knows_the_next_one() {
        // From the beginning: the first offset may be anything (retention).
        let mut c = Cursor::new("usage", 0, false);
        c.advance_to(40);
        assert_eq!((c.next, c.skipped), (41, 0));
        c.advance_to(41);
        c.advance_to(44);
        assert_eq!((c.next, c.skipped), (45, 2));
        // A restored position is exact: a first message past it is a gap.
        let mut restored = Cursor::new("usage", 1, false);
        restored.resume_at(10);
        restored.advance_to(12);
        assert_eq!((restored.next, restored.skipped), (13, 2));
    }
}
