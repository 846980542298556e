//! A real Kafka-compatible broker for integration tests, and blocking helpers
//! to produce into it and read it back.
//!
//! Why: the Kafka pipeline's guarantees (offsets committed with the outputs,
//! recovery after a crash, group membership as a lease) can only be checked
//! against a broker that speaks the real protocol. [Tansu] is a single Rust
//! binary with no JVM that starts in well under a second, so every test
//! starts its own [`Broker`] on its own free port with its own storage in its
//! own temp dir: tests run in parallel without interfering.
//!
//! Why blocking: the helpers use rdkafka's `BaseProducer` and `BaseConsumer`,
//! and a ten-line [`block_on`] for the admin client, so tests need no async
//! runtime. Every wait has a timeout; errors carry the tail of the broker's
//! log.
//!
//! What to know about Tansu 0.6.0 (measured):
//! - [`Storage::Sqlite`] is durable (survives SIGKILL, see [`Broker::kill`] and
//!   [`Broker::restart`]) but slow to produce into (~20k messages/s).
//! - Its fetch looks up the headers of *every* record it returns with a
//!   query that scans the whole `header` table (no index on it): reading
//!   slows down with every header stored in any topic (flowcap's actions and
//!   dead letters carry headers), from ~25k records/s to a few hundred once
//!   tens of thousands of headers exist, until fetches outlast the client's
//!   request timeout and are retried forever. [`Broker::start`] therefore
//!   adds that index to the broker's database ([`HEADER_INDEX`]); it changes
//!   how fast the broker finds headers, not what it stores or returns.
//! - Its fetch also reads every record from the fetch offset to the end of
//!   the partition before it applies the size limit, and returns at most
//!   5 MiB a request whatever the client asks: reading a deep partition from
//!   its start costs the square of its depth, so tests that read a lot use
//!   many shallow partitions.
//! - [`Storage::Memory`] is fast, but a consumer restarting from an offset
//!   inside a batch can skip records: use it for throughput, never recovery.
//!   Its high watermarks (ListOffsets latest, hence [`end_offsets`]) are the
//!   base offset of the newest batch plus one, short of the real end.
//! - Topics are not auto-created: call [`Broker::create_topic`] first.
//! - Consumers crawl unless `fetch.wait.max.ms` is small: build clients from
//!   [`Broker::client_config`].
//! - Do not rely on its transactions or `read_committed`.
//! - Consumer groups: assignment, handover when a member closes, and offset
//!   commits work; but the partitions of a member that *crashes* (no
//!   LeaveGroup) are not reassigned when its session times out (see the
//!   ignored test `takeover_after_the_holder_crashes`).
//!
//! The broker binary is `tansu` on `PATH` (or in `~/.cargo/bin`); install it
//! with `cargo install tansu --locked --version 0.6.0 --features dynostore,libsql`.
//!
//! [Tansu]: https://tansu.io
//!
//! [`receiver`] has the other side of notification delivery: a scripted
//! HTTP receiver and an SMTP sink.
//! [`files`] takes a directory's tree, for tests that check a step
//! changed nothing on disk.
//!
//! With the `history` feature, the oracles that read a run's Parquet
//! history: [`history_check`] (exactness and overshoot, with SQL) and
//! [`duckdb`] (DuckDB's answers to the same SQL). They pull in the query
//! engine, so tests that need only the broker or the receivers go without.

#[cfg(feature = "history")]
pub mod duckdb;
pub mod files;
#[cfg(feature = "history")]
pub mod history_check;
pub mod receiver;

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};
use std::{env, pin, thread};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tempfile::TempDir;

/// The index Tansu 0.6.0's sqlite schema lacks: its fetch looks up each
/// returned record's headers by `(topition, offset_id)`, which without it is
/// a scan of every header in the broker.
pub const HEADER_INDEX: &str =
    "create index if not exists flowcap_testkit_header_record on header (topition, offset_id)";

/// How to install the broker, quoted in [`Error::NotInstalled`].
pub const INSTALL: &str =
    "cargo install tansu --locked --version 0.6.0 --features dynostore,libsql";

/// How long the broker may take to answer metadata after being spawned.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one admin or metadata operation may take.
const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// A produce fails if no delivery report arrives for this long.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of the broker's log an error quotes.
const LOG_TAIL_BYTES: u64 = 4096;

/// Where the broker keeps its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// `memory://`: fast; lost on kill; consumers may skip records when
    /// resuming inside a batch. Throughput tests only.
    Memory,
    /// `sqlite://` in the broker's temp dir: durable across kill and restart.
    Sqlite,
}

/// What can go wrong. Variants that involve the broker quote its log tail.
/// `Debug` prints the message, so a test's `.unwrap()` shows it readably.
#[derive(thiserror::Error)]
pub enum Error {
    #[error("`tansu` is not on PATH nor in ~/.cargo/bin: install it with `{INSTALL}` (about 20 minutes cold on 2 cores)")]
    NotInstalled,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}: {source}\n--- broker log tail ---\n{log}")]
    Kafka {
        context: String,
        #[source]
        source: Box<KafkaError>,
        log: String,
    },
    #[error("timed out after {after:?} waiting for {what}\n--- broker log tail ---\n{log}")]
    Timeout {
        what: String,
        after: Duration,
        log: String,
    },
    #[error("the broker exited ({status}) while {what}\n--- broker log tail ---\n{log}")]
    Exited {
        what: String,
        status: ExitStatus,
        log: String,
    },
}

impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// A `tansu broker` process on `127.0.0.1:<free port>`, its storage and log in
/// a temp dir that lives as long as this value (across restarts). Dropping it
/// kills the process.
#[derive(Debug)]
pub struct Broker {
    tansu: PathBuf,
    storage: Storage,
    dir: TempDir,
    port: u16,
    child: Option<Child>,
}

impl Broker {
    /// Spawns a broker and waits until it answers a metadata request.
    pub fn start(storage: Storage) -> Result<Broker> {
        let tansu = find_tansu().ok_or(Error::NotInstalled)?;
        let dir = tempfile::Builder::new()
            .prefix("flowcap-tansu-")
            .tempdir()
            .map_err(io("creating the broker's temp dir"))?;
        // Bind port 0 to learn a free port, then release it for the broker.
        // Another process could take it in between; unlikely enough for tests.
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map_err(io("finding a free port"))?
            .port();
        let mut broker = Broker {
            tansu,
            storage,
            dir,
            port,
            child: None,
        };
        broker.spawn()?;
        Ok(broker)
    }

    /// `127.0.0.1:PORT`, for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn storage(&self) -> Storage {
        self.storage
    }

    /// The broker's temp dir: its log (`broker.log`) and sqlite file.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last few KiB of the broker's stdout and stderr.
    pub fn log_tail(&self) -> String {
        let read = || -> std::io::Result<String> {
            let mut file = File::open(self.log_path())?;
            let len = file.metadata()?.len();
            file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))?;
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes)?;
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        };
        read().unwrap_or_else(|e| format!("(no log: {e})"))
    }

    /// Client settings for this broker that keep Tansu fast: bootstrap, short
    /// fetch waits, large fetches. Add `group.id` etc. as needed.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", self.bootstrap())
            .set("broker.address.family", "v4")
            // Measured (200k x 200 B, 4 partitions): fetch.wait.max.ms 500
            // (the default) reads memory storage 4x slower, 10 MiB partition
            // fetches (default 1 MiB) read sqlite storage 1.7x faster.
            .set("fetch.wait.max.ms", "5")
            .set("fetch.max.bytes", "52428800")
            .set("max.partition.fetch.bytes", "10485760")
            .set("socket.nagle.disable", "true");
        config
    }

    /// Creates `name` with `partitions` partitions (replication 1) and waits
    /// until metadata shows all of them.
    pub fn create_topic(&self, name: &str, partitions: i32) -> Result<()> {
        let admin: AdminClient<DefaultClientContext> = self
            .client_config()
            .create()
            .map_err(self.kafka("creating an admin client"))?;
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let options = AdminOptions::new()
            .request_timeout(Some(OP_TIMEOUT))
            .operation_timeout(Some(OP_TIMEOUT));
        let what = format!("creating topic {name}");
        let results = block_on(admin.create_topics([&topic], &options), OP_TIMEOUT * 2)
            .ok_or_else(|| self.timeout(&what, OP_TIMEOUT * 2))?
            .map_err(self.kafka(&what))?;
        for result in results {
            result.map_err(|(_, code)| self.kafka(&what)(KafkaError::AdminOp(code)))?;
        }
        let what = format!("metadata to show {partitions} partitions of {name}");
        self.wait_until(&what, OP_TIMEOUT, || {
            Ok(self.partitions(name)? == partitions)
        })
    }

    /// How many partitions `topic` has (0 if it does not exist).
    pub fn partitions(&self, topic: &str) -> Result<i32> {
        let consumer: BaseConsumer = self
            .client_config()
            .create()
            .map_err(self.kafka("creating a metadata client"))?;
        let metadata = consumer
            .fetch_metadata(Some(topic), OP_TIMEOUT)
            .map_err(self.kafka(format!("fetching metadata of {topic}")))?;
        Ok(metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map_or(0, |t| t.partitions().len() as i32))
    }

    /// SIGKILLs the broker and waits for it to exit. Nothing is flushed: with
    /// [`Storage::Sqlite`] this is the crash of the "broker restart" tests.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // Fails only if the process already exited; wait() reaps it anyway.
            let _ = child.kill();
            child.wait().map_err(io("waiting for the killed broker"))?;
        }
        Ok(())
    }

    /// Kills the broker if it runs, then starts it again on the same port with
    /// the same storage (a [`Storage::Memory`] broker comes back empty).
    pub fn restart(&mut self) -> Result<()> {
        self.kill()?;
        self.spawn()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("broker.log")
    }

    fn spawn(&mut self) -> Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(io("opening the broker log"))?;
        let log2 = log.try_clone().map_err(io("opening the broker log"))?;
        let url = format!("tcp://{}", self.bootstrap());
        let storage = match self.storage {
            Storage::Memory => "memory://tansu/",
            // Relative to the working directory: the temp dir.
            Storage::Sqlite => "sqlite://tansu.db",
        };
        let child = Command::new(&self.tansu)
            .arg("broker")
            .args(["--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .args(["--storage-engine", storage])
            .current_dir(self.dir.path())
            // Tansu filters its log with RUST_LOG: do not inherit the test's.
            .env(
                "RUST_LOG",
                env::var("FLOWCAP_TANSU_LOG").unwrap_or("warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(io(format!("spawning {}", self.tansu.display())))?;
        self.child = Some(child);
        self.wait_ready()?;
        if self.storage == Storage::Sqlite {
            self.index_headers()?;
        }
        Ok(())
    }

    /// Adds [`HEADER_INDEX`] to the broker's sqlite database (it exists once
    /// the broker answers; the broker runs on while the index is built).
    fn index_headers(&self) -> Result<()> {
        let path = self.dir.path().join("tansu.db");
        let context = || format!("indexing the headers in {}", path.display());
        let db = rusqlite::Connection::open(&path)
            .map_err(|e| io(context())(std::io::Error::other(e)))?;
        db.busy_timeout(OP_TIMEOUT)
            .and_then(|()| db.execute_batch(HEADER_INDEX))
            .map_err(|e| io(context())(std::io::Error::other(e)))
    }

    /// Waits for the port to accept (so librdkafka does not retry with
    /// backoff), then for a metadata answer; fails early if the broker exits.
    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            let child = self.child.as_mut().expect("spawned");
            if let Some(status) = child.try_wait().map_err(io("checking the broker"))? {
                self.child = None;
                return Err(Error::Exited {
                    what: "starting".to_string(),
                    status,
                    log: self.log_tail(),
                });
            }
            if Instant::now() >= deadline {
                return Err(self.timeout("the broker to accept connections", START_TIMEOUT));
            }
            thread::sleep(Duration::from_millis(20));
        }
        let consumer: BaseConsumer = self
            .client_config()
            .create()
            .map_err(self.kafka("creating a metadata client"))?;
        consumer
            .fetch_metadata(None, deadline.saturating_duration_since(Instant::now()))
            .map_err(self.kafka("waiting for the broker to answer metadata"))?;
        Ok(())
    }

    /// Polls `done` every 50 ms until it says yes or the timeout passes.
    fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !done()? {
            if Instant::now() >= deadline {
                return Err(self.timeout(what, timeout));
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn kafka(&self, context: impl Into<String>) -> impl FnOnce(KafkaError) -> Error + '_ {
        let context = context.into();
        move |source| Error::Kafka {
            context,
            source: Box::new(source),
            log: self.log_tail(),
        }
    }

    fn timeout(&self, what: &str, after: Duration) -> Error {
        Error::Timeout {
            what: what.to_string(),
            after,
            log: self.log_tail(),
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// `tansu` on `PATH`, else `~/.cargo/bin/tansu` (where `cargo install` puts it).
fn find_tansu() -> Option<PathBuf> {
    let on_path = env::var_os("PATH")
        .into_iter()
        .flat_map(|path| env::split_paths(&path).collect::<Vec<_>>());
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")));
    on_path
        .chain(cargo_home.map(|home| home.join("bin")))
        .map(|dir| dir.join("tansu"))
        .find(|tansu| tansu.is_file())
}

/// One record to produce. Build it from `(key, value, partition)` or with
/// [`Record::new`] and the setters.
#[derive(Debug, Clone, Copy, Default)]
pub struct Record<'a> {
    pub key: Option<&'a [u8]>,
    pub value: &'a [u8],
    /// `None`: librdkafka's partitioner (by key hash, random without a key).
    pub partition: Option<i32>,
    /// `None`: the producer's clock.
    pub timestamp_ms: Option<i64>,
    pub headers: &'a [(&'a str, &'a [u8])],
}

impl<'a> Record<'a> {
    pub fn new(value: &'a [u8]) -> Record<'a> {
        Record {
            value,
            ..Record::default()
        }
    }

    pub fn key(self, key: &'a [u8]) -> Record<'a> {
        Record {
            key: Some(key),
            ..self
        }
    }

    pub fn partition(self, partition: i32) -> Record<'a> {
        Record {
            partition: Some(partition),
            ..self
        }
    }

    pub fn timestamp_ms(self, timestamp_ms: i64) -> Record<'a> {
        Record {
            timestamp_ms: Some(timestamp_ms),
            ..self
        }
    }

    pub fn headers(self, headers: &'a [(&'a str, &'a [u8])]) -> Record<'a> {
        Record { headers, ..self }
    }
}

impl<'a> From<(Option<&'a [u8]>, &'a [u8], Option<i32>)> for Record<'a> {
    fn from((key, value, partition): (Option<&'a [u8]>, &'a [u8], Option<i32>)) -> Self {
        Record {
            key,
            value,
            partition,
            ..Record::default()
        }
    }
}

/// Counts delivery reports; keeps the first failure.
#[derive(Default)]
struct Deliveries {
    ok: AtomicUsize,
    failed: Mutex<Option<(i32, KafkaError)>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err((error, message)) => {
                let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
                failed.get_or_insert_with(|| (message.partition(), error.clone()));
            }
        }
    }
}

/// Produces `records` to `topic` and blocks until every one is acknowledged
/// (`acks=all`); returns how many. Batches (`linger.ms=5`, 10,000 a batch).
/// Fails on the first delivery failure, or if no delivery report arrives for
/// 30 s.
pub fn produce<'a, R: Into<Record<'a>>>(
    broker: &Broker,
    topic: &str,
    records: impl IntoIterator<Item = R>,
) -> Result<usize> {
    let producer: BaseProducer<Deliveries> = broker
        .client_config()
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .set("message.timeout.ms", "300000")
        // Tests of oversized input send messages of megabytes.
        .set("message.max.bytes", "16777216")
        .create_with_context(Deliveries::default())
        .map_err(broker.kafka("creating a producer"))?;
    let deliveries = producer.context().clone();
    let failure = || {
        let failed = deliveries.failed.lock().unwrap_or_else(|e| e.into_inner());
        failed.as_ref().map(|(partition, error)| Error::Kafka {
            context: format!("delivering to {topic}/{partition}"),
            source: Box::new(error.clone()),
            log: broker.log_tail(),
        })
    };
    let mut sent = 0;
    for record in records {
        let record: Record<'_> = record.into();
        let mut base = BaseRecord::<[u8], [u8]>::to(topic).payload(record.value);
        base.key = record.key;
        base.partition = record.partition;
        base.timestamp = record.timestamp_ms;
        if !record.headers.is_empty() {
            base.headers = Some(record.headers.iter().fold(
                OwnedHeaders::new_with_capacity(record.headers.len()),
                |headers, (key, value)| {
                    headers.insert(Header {
                        key,
                        value: Some(*value),
                    })
                },
            ));
        }
        loop {
            match producer.send(base) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    base = back;
                    producer.poll(Duration::from_millis(10));
                }
                Err((error, _)) => {
                    return Err(broker
                        .kafka(format!("enqueueing record {sent} for {topic}"))(
                        error
                    ))
                }
            }
        }
        sent += 1;
        if sent % 1024 == 0 {
            producer.poll(Duration::ZERO);
            if let Some(error) = failure() {
                return Err(error);
            }
        }
    }
    let mut progress = (usize::MAX, Instant::now());
    loop {
        if let Some(error) = failure() {
            return Err(error);
        }
        let done = deliveries.ok.load(Ordering::Relaxed);
        if done == sent {
            return Ok(sent);
        }
        if done != progress.0 {
            progress = (done, Instant::now());
        } else if progress.1.elapsed() > STALL_TIMEOUT {
            let what = format!("delivery reports for {topic} ({done} of {sent} delivered)");
            return Err(broker.timeout(&what, STALL_TIMEOUT));
        }
        producer.poll(Duration::from_millis(20));
    }
}

/// One consumed message, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub timestamp_ms: Option<i64>,
}

impl Msg {
    /// Copies a message out of rdkafka (e.g. one from a split partition queue).
    pub fn from_message(message: &impl Message) -> Msg {
        let headers = message.headers().map_or_else(Vec::new, |headers| {
            headers
                .iter()
                .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                .collect()
        });
        Msg {
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            value: message.payload().unwrap_or_default().to_vec(),
            headers,
            timestamp_ms: message.timestamp().to_millis(),
        }
    }
}

/// A consumer assigned every partition of `topic` from the beginning; no group
/// membership (the `group.id` is a throwaway: librdkafka's `assign` needs one),
/// nothing committed.
fn reader(broker: &Broker, topic: &str) -> Result<BaseConsumer> {
    let consumer: BaseConsumer = broker
        .client_config()
        .set("group.id", "flowcap-testkit-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .map_err(broker.kafka("creating a consumer"))?;
    let mut assignment = TopicPartitionList::new();
    for partition in 0..broker.partitions(topic)? {
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .map_err(broker.kafka("building an assignment"))?;
    }
    consumer
        .assign(&assignment)
        .map_err(broker.kafka(format!("assigning {topic}")))?;
    Ok(consumer)
}

/// Reads every partition of `topic` from the beginning until `expect` messages
/// arrived or none arrived for `idle_timeout`; returns what it read (in arrival
/// order, so offsets increase within a partition). Stops at `expect`: compare
/// with [`end_offsets`] to rule out extra messages.
pub fn consume_all(
    broker: &Broker,
    topic: &str,
    expect: usize,
    idle_timeout: Duration,
) -> Result<Vec<Msg>> {
    let consumer = reader(broker, topic)?;
    let mut messages = Vec::with_capacity(expect);
    let mut last = Instant::now();
    while messages.len() < expect && last.elapsed() < idle_timeout {
        match consumer.poll(Duration::from_millis(50)) {
            None => {}
            Some(Ok(message)) => {
                messages.push(Msg::from_message(&message));
                last = Instant::now();
            }
            Some(Err(error)) => return Err(broker.kafka(format!("consuming {topic}"))(error)),
        }
    }
    Ok(messages)
}

/// The high watermark (next offset) of every partition of `topic`. Exact with
/// [`Storage::Sqlite`]; short of the end with [`Storage::Memory`] (a Tansu
/// defect, see the crate docs).
pub fn end_offsets(broker: &Broker, topic: &str) -> Result<Vec<i64>> {
    let consumer: BaseConsumer = broker
        .client_config()
        .create()
        .map_err(broker.kafka("creating a consumer"))?;
    (0..broker.partitions(topic)?)
        .map(|partition| {
            consumer
                .fetch_watermarks(topic, partition, OP_TIMEOUT)
                .map(|(_low, high)| high)
                .map_err(broker.kafka(format!("fetching watermarks of {topic}/{partition}")))
        })
        .collect()
}

/// The offsets `group` committed for every partition of `topic` (`None`: none
/// committed). Does not join the group.
pub fn committed_offsets(broker: &Broker, group: &str, topic: &str) -> Result<Vec<Option<i64>>> {
    let consumer: BaseConsumer = broker
        .client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(broker.kafka("creating a consumer"))?;
    let mut partitions = TopicPartitionList::new();
    for partition in 0..broker.partitions(topic)? {
        partitions.add_partition(topic, partition);
    }
    let committed = consumer
        .committed_offsets(partitions, OP_TIMEOUT)
        .map_err(broker.kafka(format!("fetching {group}'s offsets of {topic}")))?;
    Ok(committed
        .elements()
        .iter()
        .map(|element| match element.offset() {
            Offset::Offset(offset) => Some(offset),
            _ => None,
        })
        .collect())
}

/// Runs a future to completion on this thread, or gives up after `timeout`.
/// Enough for rdkafka's admin futures, which a background thread completes.
pub fn block_on<F: Future>(future: F, timeout: Duration) -> Option<F::Output> {
    struct Unpark(thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    let mut context = Context::from_waker(&waker);
    let mut future = pin::pin!(future);
    let deadline = Instant::now() + timeout;
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return Some(output);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        thread::park_timeout(left);
    }
}
