//! Metric names and the helpers the pipelines record them with.
//!
//! The names live here, in one place, so the embedded pipeline, the Kafka
//! pipeline and the documentation cannot drift apart (the table in
//! ARCHITECTURE.md is [`CATALOG`]). Recording goes through the `metrics`
//! facade: with no recorder installed (the embedded run without `--http`)
//! every handle is a no-op, so the pipelines record unconditionally. The
//! binary installs the Prometheus recorder and serves it.
//!
//! Cost on the hot path: nothing here is looked up per record. The driver
//! and the writer register their handles once ([`DriverMetrics`],
//! [`OutputMetrics`]); an increment is then one relaxed atomic add on a
//! counter only that thread writes. Gauges the driver samples (queue depth,
//! cards, event clock) are set every [`SAMPLE_EVERY`] inputs, not per
//! input. Rarely recorded metrics (snapshots, Kafka pauses, DLQ) use plain
//! functions that look their series up on each call.
//!
//! Snapshot age is the one value computed at scrape time: a gauge cannot
//! age by itself, so [`snapshot_written`] keeps the wall time of the last
//! snapshot (also exported as [`LAST_SNAPSHOT_TIMESTAMP`]) and
//! [`refresh`], which the HTTP server calls before every render, sets
//! [`SNAPSHOT_AGE`] from it. Before this process has written a snapshot,
//! the age counts from [`pipeline_started`]: it measures the work a crash
//! would replay, and at start that is none.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use ::metrics::{counter, gauge, histogram, Counter, Gauge};
use flowcap_engine::event::{ActionEvent, Output};
use flowcap_engine::Timestamp;
use flowcap_storage::history::compact::CompactionStats;

/// Records read by a pipeline (label `source`: `file`, `generator` or `kafka`).
pub const RECORDS_IN: &str = "flowcap_records_in_total";
/// Records accounted and counted in their card's current cycle.
pub const RECORDS_COUNTED: &str = "flowcap_records_counted_total";
/// Records accounted to history only (an earlier cycle, or a deregistered card).
pub const RECORDS_HISTORY_ONLY: &str = "flowcap_records_history_only_total";
/// History-only records that arrived after their cycle closed (`late`).
pub const RECORDS_LATE: &str = "flowcap_records_late_total";
/// Duplicate resends dropped by dedupe.
pub const DUPLICATES: &str = "flowcap_duplicates_total";
/// Rejected records (label `reason`: the stable error code, e.g. `not_json`, `unknown_card`, `future_time`).
pub const REJECTS: &str = "flowcap_rejects_total";
/// Commands processed (label `outcome`: `ok` or `failed`).
pub const COMMANDS: &str = "flowcap_commands_total";
/// Action events written (label `kind`: `card_state` or `pool_state`).
pub const ACTIONS_OUT: &str = "flowcap_actions_out_total";
/// Records queued for a shard, sampled by the driver (label `shard`).
pub const SHARD_QUEUE_DEPTH: &str = "flowcap_shard_queue_depth";
/// Seconds since the last snapshot (or since the pipeline started, before the first), computed at scrape time.
pub const SNAPSHOT_AGE: &str = "flowcap_snapshot_age_seconds";
/// Unix time in seconds of the last snapshot written by this process.
pub const LAST_SNAPSHOT_TIMESTAMP: &str = "flowcap_last_snapshot_timestamp_seconds";
/// Seconds a snapshot took from its cut until it was durable: recall, cut,
/// encode, then (while inputs flow again) the history files, the producer's
/// acknowledgements, fsync of every output and the atomic write.
pub const SNAPSHOT_DURATION: &str = "flowcap_snapshot_duration_seconds";
/// Seconds a snapshot's cut held the inputs back: the wait for the
/// previous snapshot's commit (when it is still being written), recall of
/// the shards, the writer's cut, the dedupe buffer sealed, the engine
/// copied.
pub const SNAPSHOT_PAUSE: &str = "flowcap_snapshot_pause_seconds";
/// Snapshots written.
pub const SNAPSHOTS: &str = "flowcap_snapshots_total";
/// Messages between a partition's committed position and its high watermark (labels `topic`, `partition`).
pub const CONSUMER_LAG: &str = "flowcap_consumer_lag";
/// 1 while a partition is paused for backpressure, else 0 (labels `topic`, `partition`).
pub const PARTITION_PAUSED: &str = "flowcap_partition_paused";
/// Times the consumer paused partitions because the pipeline fell behind.
pub const BACKPRESSURE_PAUSES: &str = "flowcap_backpressure_pauses_total";
/// Newest message timestamp read from a usage partition, unix seconds
/// (labels `topic`, `partition`): how far apart partitions are in time.
pub const PARTITION_TIME: &str = "flowcap_partition_time_seconds";
/// Times a usage partition was held back for running ahead of the
/// slowest (`kafka::align`).
pub const PARTITION_HOLDS: &str = "flowcap_partition_holds_total";
/// Times a partition held back for `max_hold` was read anyway.
pub const PARTITION_HOLD_RELEASES: &str = "flowcap_partition_hold_releases_total";
/// Times the slowest partition delivered nothing for `partition_idle` and
/// stopped holding the others back.
pub const PARTITION_SILENCES: &str = "flowcap_partition_silences_total";
/// Offsets skipped between consecutive messages of an input partition
/// (labels `topic`, `partition`): transaction markers or compaction, else
/// records the broker or the client lost. 0 on a plain topic.
pub const OFFSET_GAPS: &str = "flowcap_offset_gaps_total";
/// Messages sent to the dead-letter topic (label `reason`).
pub const DLQ: &str = "flowcap_dlq_total";
/// Output deliveries retried after a transient failure.
pub const DELIVERY_RETRIES: &str = "flowcap_delivery_retries_total";
/// Output deliveries that failed for good.
pub const DELIVERY_FAILURES: &str = "flowcap_delivery_failures_total";
/// History compactions: merges of small files into one.
pub const COMPACTIONS: &str = "flowcap_history_compactions_total";
/// History files merged (and deleted) by compaction.
pub const COMPACTED_FILES: &str = "flowcap_history_compacted_files_total";
/// Rows written into merged history files.
pub const COMPACTED_ROWS: &str = "flowcap_history_compacted_rows_total";
/// Milliseconds the compaction thread spent merging.
pub const COMPACTION_MILLISECONDS: &str = "flowcap_history_compaction_milliseconds_total";
/// Merges that failed (the inputs stay and are retried).
pub const COMPACTION_FAILURES: &str = "flowcap_history_compaction_failures_total";
/// Merges of a sorted table whose inputs were out of order (sorted again).
pub const COMPACTION_SORTED_AGAIN: &str = "flowcap_history_compaction_sorted_again_total";
/// Compaction requests (one per snapshot) waiting for the compaction
/// thread, which runs on idle CPU only: how far behind it is.
pub const COMPACTION_REQUESTS_WAITING: &str = "flowcap_history_compaction_requests_waiting";
/// Cards known to the engine.
pub const ENGINE_CARDS: &str = "flowcap_engine_cards";
/// The engine's event clock, in unix seconds.
pub const EVENT_CLOCK: &str = "flowcap_event_clock_seconds";

/// The buckets of [`SNAPSHOT_DURATION`] and [`SNAPSHOT_PAUSE`], in seconds.
pub const SNAPSHOT_DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The driver samples its gauges every this many inputs.
pub const SAMPLE_EVERY: u64 = 4096;

/// What kind of series a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// A current value.
    Gauge,
    /// A distribution (buckets, sum, count).
    Histogram,
}

/// Every metric: name, kind, labels, help text (the `# HELP` line).
pub const CATALOG: &[(&str, Kind, &str, &str)] = &[
    (
        RECORDS_IN,
        Kind::Counter,
        "source",
        "Records read by the pipeline.",
    ),
    (
        RECORDS_COUNTED,
        Kind::Counter,
        "",
        "Records counted in their card's current cycle.",
    ),
    (
        RECORDS_HISTORY_ONLY,
        Kind::Counter,
        "",
        "Records accounted to history only (earlier cycle or deregistered card).",
    ),
    (
        RECORDS_LATE,
        Kind::Counter,
        "",
        "History-only records that arrived after their cycle closed.",
    ),
    (DUPLICATES, Kind::Counter, "", "Duplicate resends dropped."),
    (
        REJECTS,
        Kind::Counter,
        "reason",
        "Rejected records by reason code.",
    ),
    (
        COMMANDS,
        Kind::Counter,
        "outcome",
        "Commands processed, by outcome (ok, failed).",
    ),
    (
        ACTIONS_OUT,
        Kind::Counter,
        "kind",
        "Action events written (card_state, pool_state).",
    ),
    (
        SHARD_QUEUE_DEPTH,
        Kind::Gauge,
        "shard",
        "Records queued for a shard.",
    ),
    (
        SNAPSHOT_AGE,
        Kind::Gauge,
        "",
        "Seconds since the last snapshot (or since start, before the first).",
    ),
    (
        LAST_SNAPSHOT_TIMESTAMP,
        Kind::Gauge,
        "",
        "Unix time of the last snapshot written.",
    ),
    (
        SNAPSHOT_DURATION,
        Kind::Histogram,
        "",
        "Seconds a snapshot took.",
    ),
    (
        SNAPSHOT_PAUSE,
        Kind::Histogram,
        "",
        "Seconds a snapshot's cut held the inputs back.",
    ),
    (SNAPSHOTS, Kind::Counter, "", "Snapshots written."),
    (
        CONSUMER_LAG,
        Kind::Gauge,
        "topic, partition",
        "Messages between the committed position and the high watermark.",
    ),
    (
        PARTITION_PAUSED,
        Kind::Gauge,
        "topic, partition",
        "1 while the partition is paused for backpressure.",
    ),
    (
        BACKPRESSURE_PAUSES,
        Kind::Counter,
        "",
        "Times partitions were paused for backpressure.",
    ),
    (
        PARTITION_TIME,
        Kind::Gauge,
        "topic, partition",
        "Newest message timestamp read from the partition (unix seconds).",
    ),
    (
        PARTITION_HOLDS,
        Kind::Counter,
        "",
        "Times a usage partition was held back for running ahead of the slowest.",
    ),
    (
        PARTITION_HOLD_RELEASES,
        Kind::Counter,
        "",
        "Times a partition held back too long was read anyway.",
    ),
    (
        PARTITION_SILENCES,
        Kind::Counter,
        "",
        "Times the slowest partition went silent and stopped holding the others back.",
    ),
    (
        OFFSET_GAPS,
        Kind::Counter,
        "topic, partition",
        "Offsets skipped between consecutive messages of an input partition (transaction markers, compaction, or records lost before flowcap).",
    ),
    (
        DLQ,
        Kind::Counter,
        "reason",
        "Messages sent to the dead-letter topic.",
    ),
    (
        DELIVERY_RETRIES,
        Kind::Counter,
        "",
        "Output deliveries retried.",
    ),
    (
        DELIVERY_FAILURES,
        Kind::Counter,
        "",
        "Output deliveries that failed for good.",
    ),
    (
        flowcap_delivery::METRIC_QUEUED,
        Kind::Counter,
        "channel",
        "Rule notifications queued in the outbox (webhook, email, sms).",
    ),
    (
        flowcap_delivery::METRIC_DONE,
        Kind::Counter,
        "channel, outcome",
        "Rule notifications delivered or failed for good.",
    ),
    (
        flowcap_delivery::METRIC_ATTEMPTS,
        Kind::Counter,
        "channel, result",
        "Notification attempts: delivered, retry, refused.",
    ),
    (
        flowcap_delivery::METRIC_BACKLOG,
        Kind::Gauge,
        "destination",
        "Notifications on disk not yet delivered or failed.",
    ),
    (
        flowcap_delivery::METRIC_PUSH_FAILED,
        Kind::Counter,
        "channel",
        "Push-failure alerts raised (push_failed events).",
    ),
    (
        COMPACTIONS,
        Kind::Counter,
        "",
        "History compactions (runs of small files merged into one).",
    ),
    (
        COMPACTED_FILES,
        Kind::Counter,
        "",
        "History files merged by compaction.",
    ),
    (
        COMPACTED_ROWS,
        Kind::Counter,
        "",
        "Rows written into merged history files.",
    ),
    (
        COMPACTION_MILLISECONDS,
        Kind::Counter,
        "",
        "Milliseconds spent merging history files.",
    ),
    (
        COMPACTION_FAILURES,
        Kind::Counter,
        "",
        "History merges that failed (retried).",
    ),
    (
        COMPACTION_SORTED_AGAIN,
        Kind::Counter,
        "",
        "History merges whose inputs were out of order and were sorted again.",
    ),
    (
        COMPACTION_REQUESTS_WAITING,
        Kind::Gauge,
        "",
        "Compaction requests (one per snapshot) waiting for the compaction thread, which runs on idle CPU only.",
    ),
    (ENGINE_CARDS, Kind::Gauge, "", "Cards known to the engine."),
    (
        EVENT_CLOCK,
        Kind::Gauge,
        "",
        "The event clock, in unix seconds.",
    ),
];

/// Registers the help text of every metric with the installed recorder
/// (call once, after installing it).
pub fn describe() {
    for &(name, kind, _, help) in CATALOG {
        match kind {
            Kind::Counter => ::metrics::describe_counter!(name, help),
            Kind::Gauge => ::metrics::describe_gauge!(name, help),
            Kind::Histogram => ::metrics::describe_histogram!(name, help),
        }
    }
}

/// Where a pipeline's records come from (the `source` label of [`RECORDS_IN`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Source {
    /// A JSON-lines file.
    #[default]
    File,
    /// The built-in load generator.
    Generator,
    /// Kafka partitions.
    Kafka,
}

impl Source {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::File => "file",
            Source::Generator => "generator",
            Source::Kafka => "kafka",
        }
    }
}

/// The driver's handles: records in, and the gauges it samples.
#[derive(Debug)]
pub struct DriverMetrics {
    records_in: Counter,
    queue_depth: Vec<Gauge>,
    cards: Gauge,
    clock: Gauge,
}

impl DriverMetrics {
    /// Registers the driver's series for `shards` shards.
    pub fn new(source: Source, shards: usize) -> DriverMetrics {
        DriverMetrics {
            records_in: counter!(RECORDS_IN, "source" => source.as_str()),
            queue_depth: (0..shards)
                .map(|shard| gauge!(SHARD_QUEUE_DEPTH, "shard" => shard.to_string()))
                .collect(),
            cards: gauge!(ENGINE_CARDS),
            clock: gauge!(EVENT_CLOCK),
        }
    }

    /// Counts one record read.
    #[inline]
    pub fn record_in(&self) {
        self.records_in.increment(1);
    }

    /// Sets the sampled gauges: records queued per shard (index = shard),
    /// cards known, the event clock.
    pub fn sample(&self, queue_depths: &[usize], cards: usize, clock: Timestamp) {
        for (gauge, depth) in self.queue_depth.iter().zip(queue_depths) {
            gauge.set(*depth as f64);
        }
        self.cards.set(cards as f64);
        if clock != Timestamp::MIN {
            self.clock.set(clock.0 as f64 / 1000.0);
        }
    }
}

/// The handles for what the engine outputs: used by whoever drains the
/// engine's output channel (the embedded writer, the Kafka producer).
#[derive(Debug)]
pub struct OutputMetrics {
    counted: Counter,
    history_only: Counter,
    late: Counter,
    duplicates: Counter,
    commands_ok: Counter,
    commands_failed: Counter,
    card_actions: Counter,
    pool_actions: Counter,
    rule_actions: Counter,
    late_crossings: Counter,
    /// One series per reason code seen so far (a handful: a linear scan).
    rejects: Vec<(String, Counter)>,
}

impl Default for OutputMetrics {
    fn default() -> Self {
        OutputMetrics::new()
    }
}

impl OutputMetrics {
    /// Registers the output series.
    pub fn new() -> OutputMetrics {
        OutputMetrics {
            counted: counter!(RECORDS_COUNTED),
            history_only: counter!(RECORDS_HISTORY_ONLY),
            late: counter!(RECORDS_LATE),
            duplicates: counter!(DUPLICATES),
            commands_ok: counter!(COMMANDS, "outcome" => "ok"),
            commands_failed: counter!(COMMANDS, "outcome" => "failed"),
            card_actions: counter!(ACTIONS_OUT, "kind" => "card_state"),
            pool_actions: counter!(ACTIONS_OUT, "kind" => "pool_state"),
            rule_actions: counter!(ACTIONS_OUT, "kind" => "rule_fired"),
            late_crossings: counter!(ACTIONS_OUT, "kind" => "late_crossing"),
            rejects: Vec::new(),
        }
    }

    /// Counts one engine output.
    #[inline]
    pub fn output(&mut self, output: &Output) {
        match output {
            Output::Accounted(a) if a.counted => self.counted.increment(1),
            Output::Accounted(a) => {
                self.history_only.increment(1);
                if a.late {
                    self.late.increment(1);
                }
            }
            Output::Duplicate { .. } => self.duplicates.increment(1),
            // Counted where the dead letter is written (the driver sends it
            // with the raw input; see `pipeline::Letter::rejected`).
            Output::Rejected(_) => {}
            Output::Action(ActionEvent::CardState(_)) => self.card_actions.increment(1),
            Output::Action(ActionEvent::PoolState(_)) => self.pool_actions.increment(1),
            Output::Action(ActionEvent::RuleFired(_)) => self.rule_actions.increment(1),
            Output::Action(ActionEvent::LateCrossing(_)) => self.late_crossings.increment(1),
            Output::Journal(entry) => self.command(entry.result.ok),
            Output::PoolCycle(_) => {}
        }
    }

    /// Counts one rejected record (also those that never reached the
    /// engine: bytes that do not decode).
    pub fn reject(&mut self, reason: &str) {
        if let Some((_, c)) = self.rejects.iter().find(|(r, _)| r == reason) {
            c.increment(1);
            return;
        }
        let c = counter!(REJECTS, "reason" => reason.to_owned());
        c.increment(1);
        self.rejects.push((reason.to_owned(), c));
    }

    /// Counts one command by outcome (also those that did not parse).
    pub fn command(&self, ok: bool) {
        if ok {
            self.commands_ok.increment(1);
        } else {
            self.commands_failed.increment(1);
        }
    }
}

/// Unix ms of the last snapshot (or of the pipeline start); 0: neither yet.
static LAST_DURABLE_MS: AtomicI64 = AtomicI64::new(0);

/// The snapshot age is a process-wide gauge (like every metric here): it
/// reads the system clock itself.
fn unix_ms() -> i64 {
    use flowcap_clock::Clock;
    flowcap_clock::SystemClock.now_ms()
}

/// A pipeline starts processing: until its first snapshot, the snapshot
/// age counts from now.
pub fn pipeline_started() {
    LAST_DURABLE_MS.store(unix_ms(), Ordering::Relaxed);
}

/// A snapshot's cut held the inputs back for `held`.
pub fn snapshot_paused(held: Duration) {
    histogram!(SNAPSHOT_PAUSE).record(held.as_secs_f64());
}

/// A snapshot was written and took `took`.
pub fn snapshot_written(took: Duration) {
    let now = unix_ms();
    LAST_DURABLE_MS.store(now, Ordering::Relaxed);
    gauge!(LAST_SNAPSHOT_TIMESTAMP).set(now as f64 / 1000.0);
    histogram!(SNAPSHOT_DURATION).record(took.as_secs_f64());
    counter!(SNAPSHOTS).increment(1);
}

/// Sets the gauges computed at scrape time ([`SNAPSHOT_AGE`]). The HTTP
/// server calls it before rendering.
pub fn refresh() {
    let last = LAST_DURABLE_MS.load(Ordering::Relaxed);
    if last > 0 {
        let age_ms = unix_ms().saturating_sub(last).max(0);
        gauge!(SNAPSHOT_AGE).set(age_ms as f64 / 1000.0);
    }
}

/// Publishes the history compactor's counters (they live in the
/// compactor; the writer copies them at each snapshot).
pub fn history_compaction(stats: &CompactionStats) {
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    counter!(COMPACTIONS).absolute(get(&stats.merges));
    counter!(COMPACTED_FILES).absolute(get(&stats.files_merged));
    counter!(COMPACTED_ROWS).absolute(get(&stats.rows_written));
    counter!(COMPACTION_MILLISECONDS).absolute(get(&stats.busy_nanos) / 1_000_000);
    counter!(COMPACTION_FAILURES).absolute(get(&stats.failures));
    counter!(COMPACTION_SORTED_AGAIN).absolute(get(&stats.sorted_again));
    gauge!(COMPACTION_REQUESTS_WAITING).set(get(&stats.requests_waiting) as f64);
}

/// Sets a partition's consumer lag (messages behind the high watermark).
pub fn consumer_lag(topic: &str, partition: i32, lag: i64) {
    gauge!(CONSUMER_LAG, "topic" => topic.to_owned(), "partition" => partition.to_string())
        .set(lag.max(0) as f64);
}

/// Marks a partition paused (or resumed) for backpressure.
pub fn partition_paused(topic: &str, partition: i32, paused: bool) {
    gauge!(PARTITION_PAUSED, "topic" => topic.to_owned(), "partition" => partition.to_string())
        .set(if paused { 1.0 } else { 0.0 });
}

/// Counts `skipped` offsets missing between two messages of a partition.
pub fn offset_gap(topic: &str, partition: i32, skipped: u64) {
    counter!(OFFSET_GAPS, "topic" => topic.to_owned(), "partition" => partition.to_string())
        .increment(skipped);
}

/// Sets a partition's newest message timestamp (ms since the epoch).
pub fn partition_time(topic: &str, partition: i32, millis: i64) {
    gauge!(PARTITION_TIME, "topic" => topic.to_owned(), "partition" => partition.to_string())
        .set(millis as f64 / 1000.0);
}

/// Counts one backpressure pause (of one or more partitions).
pub fn backpressure_pause() {
    counter!(BACKPRESSURE_PAUSES).increment(1);
}

/// Counts one message sent to the dead-letter topic.
pub fn dlq(reason: &str) {
    counter!(DLQ, "reason" => reason.to_owned()).increment(1);
}

/// Counts one delivery retry.
pub fn delivery_retry() {
    counter!(DELIVERY_RETRIES).increment(1);
}

/// Counts one delivery that failed for good.
pub fn delivery_failure() {
    counter!(DELIVERY_FAILURES).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_prometheus_names_and_listed_once() {
        let mut seen = std::collections::BTreeSet::new();
        for &(name, kind, _, help) in CATALOG {
            assert!(name.starts_with("flowcap_"), "{name}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{name}"
            );
            assert_eq!(
                kind == Kind::Counter,
                name.ends_with("_total"),
                "{name}: counters and only counters end in _total"
            );
            assert!(!help.is_empty());
            assert!(seen.insert(name), "{name} listed twice");
        }
        assert_eq!(seen.len(), 39);
    }

    #[test]
    fn recording_without_a_recorder_is_a_no_op() {
        let driver = DriverMetrics::new(Source::Generator, 2);
        driver.record_in();
        driver.sample(&[1, 2], 3, Timestamp::MIN);
        let mut outputs = OutputMetrics::new();
        outputs.reject("not_json");
        outputs.reject("not_json");
        assert_eq!(outputs.rejects.len(), 1);
        outputs.command(true);
        snapshot_written(Duration::from_millis(5));
        refresh();
        consumer_lag("usage", 0, 10);
        partition_paused("usage", 0, true);
        backpressure_pause();
        dlq("not_json");
        delivery_retry();
        delivery_failure();
        history_compaction(&CompactionStats::default());
    }
}
