//! The driver: one thread that turns fetched messages into the engine's
//! input sequence. It decodes, stamps each message with the next sequence
//! number, logs the interleaving before processing (`order_log.rs`), feeds
//! the pipeline, and cuts and commits snapshots.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use flowcap_engine::command::parse_command;
use flowcap_engine::decode::{decode_binary, decode_json, DecodeLimits, BINARY_VERSION};
use flowcap_engine::{Lane, Timestamp};
use flowcap_storage::history::SourcePosition;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::feed::Fetched;
use super::lanes::{self, LaneWatch};
use super::order_log::{OrderLog, RunStart};
use super::{Cursor, KafkaOptions, KafkaRunError};
use crate::limits::{InputKind, Oversized, SizeLimits};
use crate::metrics::{self as m, DriverMetrics, Source};
use crate::pipeline::{IngestError, Letter, Pipeline, Wait};

/// Messages decoded and prefetched together ([`Driver::process_batch`]):
/// enough for the cache misses of routing to overlap, few enough that
/// the batch's directory and dedupe lines stay cached until routed.
pub(super) const PREFETCH_BATCH: usize = 64;

/// The driver's state between messages.
pub(super) struct Driver {
    pub(super) pipeline: Pipeline,
    /// Which usage partitions hold time back (`lanes.rs`).
    pub(super) lanes: LaneWatch,
    log: OrderLog,
    /// Source of the run in progress.
    current_run: Option<u32>,
    /// The runs [`Driver::log_runs`] logged for the batch in progress,
    /// and how many of them processing has started.
    staged: Vec<RunStart>,
    staged_at: usize,
    next_seq: u64,
    limits: DecodeLimits,
    sizes: SizeLimits,
    since_snapshot: u64,
    last_snapshot: Instant,
    pub(super) inputs: u64,
    lag_positions: Arc<Vec<AtomicI64>>,
    metrics: DriverMetrics,
    /// The positions of the snapshot being committed, to commit as offsets
    /// once it is written.
    committing: Option<Vec<(String, i32, i64)>>,
    /// [`Driver::process_batch`]'s decoded records (kept for its capacity).
    decoded: Vec<Option<Decoded>>,
}

type Decoded = Result<flowcap_engine::Usage, flowcap_engine::decode::DecodeError>;

impl Driver {
    pub(super) fn new(
        pipeline: Pipeline,
        log: OrderLog,
        lanes: LaneWatch,
        options: &KafkaOptions,
        lag_positions: Arc<Vec<AtomicI64>>,
        shards: usize,
    ) -> Driver {
        Driver {
            lanes,
            next_seq: pipeline.resumed_after.map_or(0, |s| s + 1),
            pipeline,
            log,
            current_run: None,
            staged: Vec::new(),
            staged_at: 0,
            limits: options.limits,
            sizes: options.sizes,
            since_snapshot: 0,
            last_snapshot: Instant::now(),
            inputs: 0,
            lag_positions,
            metrics: DriverMetrics::new(Source::Kafka, shards),
            committing: None,
            decoded: Vec::with_capacity(PREFETCH_BATCH),
        }
    }

    /// Processes messages in order, as [`Driver::process`] does one by
    /// one; the usage records among them are decoded first and the
    /// engine prefetched for all of them ([`ShardedEngine::prefetch`]), which
    /// changes nothing but the time routing takes.
    ///
    /// [`ShardedEngine::prefetch`]: flowcap_engine::sharded::ShardedEngine::prefetch
    pub(super) fn process_batch(
        &mut self,
        cursors: &mut [Cursor],
        batch: &[(usize, Fetched<'_>)],
    ) -> Result<(), KafkaRunError> {
        self.log_runs(
            batch
                .iter()
                .map(|(i, m)| (*i, m.offset(), cursors[*i].next)),
        )?;
        let mut decoded = std::mem::take(&mut self.decoded);
        decoded.clear();
        decoded.extend(batch.iter().map(|(i, m)| {
            let usage = !cursors[*i].commands
                && m.offset() >= cursors[*i].next
                && m.payload().len() <= self.sizes.max_record_size;
            usage.then(|| decode(m.payload(), &self.limits))
        }));
        self.pipeline
            .sharded
            .prefetch(decoded.iter().filter_map(|d| d.as_ref()?.as_ref().ok()));
        let done = batch
            .iter()
            .zip(decoded.iter_mut())
            .try_for_each(|((i, m), d)| {
                self.process_decoded(*i as u32, &mut cursors[*i], m, d.take())
                    .map(|_| ())
            });
        self.decoded = decoded;
        done?;
        self.pipeline.flush_side()?;
        self.runs_done()
    }

    /// Answers the operator API's waiting reads at the last input
    /// processed ([`crate::requests`]).
    pub(super) fn serve_requests(&mut self, requests: &crate::requests::Requests) {
        let at = crate::requests::Position {
            seq: self.next_seq.checked_sub(1),
        };
        requests.serve_waiting(&mut self.pipeline.sharded, at, crate::requests::NOT_NOW);
    }

    /// Writes the order-log entries of the runs the messages about to be
    /// processed start, given as (source, offset, the source's cursor), in
    /// one `write`, before any of them is processed (an output must never
    /// leave before the entry that replays its input). Runs are short when
    /// partitions are read together in time, so one write per run would be
    /// one per few messages. [`Driver::process_decoded`] checks each run
    /// it starts against these, [`Driver::runs_done`] that all started.
    fn log_runs(
        &mut self,
        messages: impl Iterator<Item = (usize, i64, i64)>,
    ) -> Result<(), KafkaRunError> {
        let mut seq = self.next_seq;
        let mut run = self.current_run;
        for (i, offset, next) in messages {
            // As in `process_decoded`: offsets rise within a partition,
            // so the cursor before the first message decides.
            if offset < next {
                continue;
            }
            let source = i as u32;
            if run != Some(source) {
                self.staged.push(RunStart {
                    seq,
                    source,
                    offset,
                });
                run = Some(source);
            }
            seq += 1;
        }
        if !self.staged.is_empty() {
            self.log
                .append_all(&self.staged)
                .map_err(KafkaRunError::OrderLog)?;
        }
        Ok(())
    }

    /// After the messages of [`Driver::log_runs`]: every run logged must
    /// have started.
    fn runs_done(&mut self) -> Result<(), KafkaRunError> {
        let unmatched = self.staged.len() - self.staged_at;
        self.staged.clear();
        self.staged_at = 0;
        if unmatched > 0 {
            return Err(KafkaRunError::RunsDisagree);
        }
        Ok(())
    }

    /// Processes one message; false when it was already covered (a
    /// message before the cursor, which a seek can deliver again).
    pub(super) fn process(
        &mut self,
        source: u32,
        cursor: &mut Cursor,
        message: &Fetched<'_>,
    ) -> Result<bool, KafkaRunError> {
        self.log_runs(std::iter::once((
            source as usize,
            message.offset(),
            cursor.next,
        )))?;
        let processed = self.process_decoded(source, cursor, message, None)?;
        self.pipeline.flush_side()?;
        self.runs_done()?;
        Ok(processed)
    }

    /// [`Driver::process`] with a usage message's payload already decoded
    /// (`None`: decoded here, if it is one).
    fn process_decoded(
        &mut self,
        source: u32,
        cursor: &mut Cursor,
        message: &Fetched<'_>,
        decoded: Option<Decoded>,
    ) -> Result<bool, KafkaRunError> {
        let offset = message.offset();
        if offset < cursor.next {
            return Ok(false);
        }
        if self.current_run != Some(source) {
            let run = RunStart {
                seq: self.next_seq,
                source,
                offset,
            };
            if self.staged.get(self.staged_at) != Some(&run) {
                return Err(KafkaRunError::RunsDisagree);
            }
            self.staged_at += 1;
            self.current_run = Some(source);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        cursor.advance_to(offset);
        self.lag_positions[source as usize].store(cursor.next, Ordering::Relaxed);
        self.inputs += 1;
        self.since_snapshot += 1;
        let payload = message.payload();
        let received = message.timestamp_ms();
        let position = || SourcePosition {
            topic: cursor.topic.clone(),
            partition: cursor.partition,
            offset,
            timestamp_ms: received,
        };
        if cursor.commands {
            if payload.len() > self.sizes.max_command_size {
                let input = Oversized::of(InputKind::Command, payload, self.sizes.max_command_size);
                let letter = Letter::too_large(seq, input, Some(position()));
                self.pipeline.side_later(letter);
                return Ok(true);
            }
            match parse_command(payload) {
                Ok(command) => self.pipeline.sharded.process_command_received(
                    command,
                    received.map(Timestamp),
                    seq,
                ),
                Err(error) => self.pipeline.side_later(Letter::bad_command(
                    seq,
                    error,
                    payload.to_vec(),
                    Some(position()),
                )),
            }
            return Ok(true);
        }
        self.metrics.record_in();
        if self.inputs.is_multiple_of(m::SAMPLE_EVERY) {
            let sharded = &self.pipeline.sharded;
            self.metrics.sample(
                &sharded.queue_depths(),
                sharded.card_count(),
                sharded.clock(),
            );
        }
        if payload.len() > self.sizes.max_record_size {
            let input = Oversized::of(InputKind::Record, payload, self.sizes.max_record_size);
            let letter = Letter::too_large(seq, input, Some(position()));
            self.pipeline.side_later(letter);
            return Ok(true);
        }
        self.lanes.delivered(source as usize, Instant::now());
        match decoded.unwrap_or_else(|| decode(payload, &self.limits)) {
            Ok(usage) => {
                let received = received.map(Timestamp);
                let lane = Lane(u32::try_from(cursor.partition).unwrap_or(u32::MAX));
                if let Some(r) = self
                    .pipeline
                    .sharded
                    .process_usage_from(lane, &usage, received, seq)
                    .map_err(IngestError::from)?
                {
                    self.pipeline.side_later(Letter::rejected(
                        r,
                        payload.to_vec(),
                        Some(position()),
                    ));
                }
            }
            Err(e) => {
                self.pipeline.side_later(Letter::undecodable(
                    seq,
                    &e,
                    payload.to_vec(),
                    Some(position()),
                ));
            }
        }
        Ok(true)
    }

    /// Input: usage partition `lane` is read to its end and silent, so it
    /// holds time back no more (`lanes.rs`). Logged as a run of its own
    /// before the engine sees it; also how a replay repeats it.
    pub(super) fn declare_idle(&mut self, lane: u32) -> Result<(), KafkaRunError> {
        let seq = self.log_pseudo(lanes::idle_source(lane))?;
        tracing::debug!(lane, seq, "partition idle");
        self.pipeline.sharded.lane_idle(Lane(lane), seq);
        self.pipeline.flush_side()?;
        Ok(())
    }

    /// Input: every usage partition holds time back again (`lanes.rs`);
    /// at every start, after the replay. Logged like an idle declaration.
    pub(super) fn wake_lanes(&mut self) -> Result<(), KafkaRunError> {
        let seq = self.log_pseudo(lanes::WAKE_SOURCE)?;
        self.pipeline.sharded.lanes_awake(seq);
        Ok(())
    }

    /// Logs an input of a pseudo-source (`lanes.rs`) as a run of its own
    /// and returns its sequence number.
    fn log_pseudo(&mut self, source: u32) -> Result<u64, KafkaRunError> {
        let seq = self.next_seq;
        self.log
            .append(RunStart {
                seq,
                source,
                offset: 0,
            })
            .map_err(KafkaRunError::OrderLog)?;
        self.next_seq += 1;
        // The next message starts a run of its own, whatever its source.
        self.current_run = None;
        self.since_snapshot += 1;
        Ok(seq)
    }

    pub(super) fn maybe_snapshot(
        &mut self,
        options: &KafkaOptions,
        cursors: &[Cursor],
        consumer: &BaseConsumer,
    ) -> Result<(), KafkaRunError> {
        self.after_commit(consumer, Wait::Poll)?;
        let by_count = options.snapshot_every > 0 && self.since_snapshot >= options.snapshot_every;
        let by_time =
            self.since_snapshot > 0 && self.last_snapshot.elapsed() >= options.snapshot_interval;
        if by_count || by_time {
            self.snapshot(cursors, consumer)?;
        }
        Ok(())
    }

    /// The cut of a snapshot and a new order-log segment; the pipeline
    /// commits it while messages flow ([`Driver::after_commit`]).
    pub(super) fn snapshot(
        &mut self,
        cursors: &[Cursor],
        consumer: &BaseConsumer,
    ) -> Result<(), KafkaRunError> {
        // One commit at a time: the previous one finishes first.
        self.after_commit(consumer, Wait::Block)?;
        let last_seq = self.next_seq.checked_sub(1);
        let positions: BTreeMap<String, i64> =
            cursors.iter().map(|c| (c.position_key(), c.next)).collect();
        self.pipeline.begin_snapshot(last_seq, &positions)?;
        if let Some(seq) = last_seq {
            let current = self.current_run.map(|s| (s, cursors[s as usize].next));
            self.log
                .rotate(seq, current)
                .map_err(KafkaRunError::OrderLog)?;
            self.committing = Some(
                cursors
                    .iter()
                    .map(|c| (c.topic.clone(), c.partition, c.next))
                    .collect(),
            );
        }
        self.since_snapshot = 0;
        self.last_snapshot = Instant::now();
        Ok(())
    }

    /// Once the snapshot in flight is written (with [`Wait::Block`],
    /// waits for it): drops the order-log segments no kept snapshot needs
    /// and commits its positions as the group's offsets.
    pub(super) fn after_commit(
        &mut self,
        consumer: &BaseConsumer,
        wait: Wait,
    ) -> Result<(), KafkaRunError> {
        if self.committing.is_none() {
            return Ok(());
        }
        match wait {
            Wait::Block => self.pipeline.wait_snapshot()?,
            Wait::Poll => {
                if self.pipeline.snapshot_pending()? {
                    return Ok(());
                }
            }
        }
        let Some(offsets) = self.committing.take() else {
            return Ok(());
        };
        self.log.prune().map_err(KafkaRunError::OrderLog)?;
        // Informational: lag tools read committed offsets; flowcap restarts
        // from its snapshot, so a failed commit loses nothing.
        let mut tpl = TopicPartitionList::new();
        for (topic, partition, next) in &offsets {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*next))?;
        }
        if let Err(e) = consumer.commit(&tpl, rdkafka::consumer::CommitMode::Async) {
            tracing::warn!(error = %e, "committing offsets failed (informational only)");
        }
        Ok(())
    }
}

/// JSON is the reference; a message whose first byte is the binary
/// encoding's version (never valid JSON) is decoded as binary.
fn decode(
    payload: &[u8],
    limits: &DecodeLimits,
) -> Result<flowcap_engine::Usage, flowcap_engine::decode::DecodeError> {
    if payload.first() == Some(&BINARY_VERSION) {
        decode_binary(payload, limits)
    } else {
        decode_json(payload, limits)
    }
}
