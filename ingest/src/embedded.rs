//! The embedded pipeline: inputs from an iterator (a JSON-lines file or
//! the load generator), outputs to a directory.
//!
//! A thin driver over [`crate::pipeline`], which owns the engine, the
//! writer and the snapshot protocol: here an input's sequence number is
//! its position in the input, a snapshot is cut every `snapshot_every`
//! inputs and at the end, and on resume the inputs the snapshot covers are
//! read again and skipped (the generator's input is the same sequence every
//! time; files are known by identity instead, see [`crate::files`]).
//!
//! Metrics ([`crate::metrics`]) are recorded as it goes: the driver counts
//! records in, samples shard queue depths; the writer counts what it
//! writes. They cost nothing when no recorder is installed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowcap_clock::{SharedClock, SystemClock};
use flowcap_engine::command::parse_command;
use flowcap_engine::decode::{decode_json, DecodeLimits};
use flowcap_engine::{Engine, EngineConfig, Timestamp};

use flowcap_delivery::NotifyConfig;

use crate::health::Health;
use crate::limits::{InputKind, Oversized, SizeLimits};
use crate::metrics::{self, DriverMetrics, Source};
use crate::pipeline::{HistoryConfig, IngestError, Letter, Pipeline, Restored, Start, Summary};
use crate::requests::{Applied, Position, Request, Requests, NOT_NOW};

/// One input line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A usage record (one JSON object).
    Record(Vec<u8>),
    /// A usage record with the time it was received (part of the input, so
    /// a replay judges "far in the future" the same way).
    ReceivedRecord(Vec<u8>, Timestamp),
    /// A control command (one JSON object).
    Command(Vec<u8>),
    /// A control command with the time it was received: its `at` is
    /// bounded by it (`future_at`), as a record's `end` is.
    ReceivedCommand(Vec<u8>, Timestamp),
    /// A record or command over its size limit, never read whole: it is
    /// dead-lettered as `too_large` ([`crate::limits`]).
    Oversized(Oversized),
}

/// How to run.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// Directory for outputs, snapshots and the dedupe id store.
    pub out_dir: PathBuf,
    /// Engine configuration (ignored when resuming: the snapshot's wins).
    pub engine: EngineConfig,
    /// Take a snapshot every this many inputs (0: only at the end).
    pub snapshot_every: u64,
    /// Write the Parquet history (see [`flowcap_storage::history`]);
    /// `None`: no history.
    pub history: Option<HistoryConfig>,
    /// Resume from the newest snapshot in `out_dir`, or start over.
    pub start: Start,
    /// Limits for record decoding.
    pub limits: DecodeLimits,
    /// Largest record and command read ([`crate::limits`]).
    pub sizes: SizeLimits,
    /// Report progress every this many inputs.
    pub progress_every: u64,
    /// Where the records come from (the `source` label of the records-in metric).
    pub source: Source,
    /// Set ready when the pipeline starts processing, if given.
    pub health: Option<Arc<Health>>,
    /// Deliver rule notifications (webhooks, email, SMS) with these
    /// settings; `None`: firings are recorded but nothing is sent.
    pub notify: Option<NotifyConfig>,
    /// Requests from the operator API, answered between inputs
    /// ([`crate::requests`]); `None`: none.
    pub requests: Option<Requests>,
    /// Once the inputs are read, keep answering `requests` (commands
    /// too) until this is set, then finish; `None`: finish at once.
    pub linger: Option<Arc<AtomicBool>>,
    /// The time of day (the system clock but in tests): the receive stamp
    /// of file inputs, processing times, notification times.
    pub clock: SharedClock,
}

impl EmbeddedOptions {
    /// Defaults for a directory.
    pub fn new(out_dir: impl Into<PathBuf>) -> EmbeddedOptions {
        EmbeddedOptions {
            out_dir: out_dir.into(),
            engine: EngineConfig::default(),
            snapshot_every: 1_000_000,
            history: Some(HistoryConfig::default()),
            start: Start::Resume,
            limits: DecodeLimits::default(),
            sizes: SizeLimits::default(),
            progress_every: 100_000,
            source: Source::File,
            health: None,
            notify: Some(NotifyConfig::default()),
            requests: None,
            linger: None,
            clock: SystemClock::shared(),
        }
    }
}

/// Progress so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// Inputs read (including skipped ones when resuming).
    pub inputs: u64,
    /// Seconds since start.
    pub elapsed_secs: f64,
}

/// Runs the embedded pipeline over `inputs` (sequence number = position;
/// on resume, inputs up to the snapshot's are skipped: the generator's
/// input is the same sequence every time). Returns the summary and the
/// final engine (for queries and checks). Files are read by
/// [`crate::files::run`], which knows them by identity instead.
pub fn run(
    options: &EmbeddedOptions,
    inputs: impl IntoIterator<Item = Input>,
    progress: &mut dyn FnMut(Progress),
) -> Result<(Summary, Engine), IngestError> {
    let restored = Restored::load(&options.out_dir, options.start)?;
    let segment = Segment {
        first_seq: Some(0),
        inputs: Box::new(inputs.into_iter()),
        positions: Box::new(|_, _| BTreeMap::new()),
    };
    drive(options, restored, vec![segment], progress)
}

/// Where a part of the input goes in the sequence and what a snapshot
/// inside it records.
pub(crate) struct Segment<'a> {
    /// The sequence number of its first input; `None`: right after the
    /// inputs before it (or the snapshot resumed from).
    pub(crate) first_seq: Option<u64>,
    /// Its inputs, in order.
    pub(crate) inputs: Box<dyn Iterator<Item = Input> + 'a>,
    /// The positions a snapshot records while in it, given its first
    /// sequence number and whether every input of it is covered.
    #[allow(clippy::type_complexity)]
    pub(crate) positions: Box<dyn Fn(u64, bool) -> BTreeMap<String, i64> + 'a>,
}

/// Feeds `segments` one after the other through the pipeline started from
/// `restored`: inputs a snapshot covers already are skipped, a snapshot is
/// taken every `snapshot_every` inputs and at the end (when anything was
/// read).
pub(crate) fn drive(
    options: &EmbeddedOptions,
    restored: Restored,
    segments: Vec<Segment<'_>>,
    progress: &mut dyn FnMut(Progress),
) -> Result<(Summary, Engine), IngestError> {
    let started = Instant::now();
    let dir = &options.out_dir;
    let mut pipeline = Pipeline::start_from(
        restored,
        &options.engine,
        options.history.as_ref(),
        options.notify.as_ref(),
        None,
        &options.clock,
    )?;
    if let Some(requests) = &options.requests {
        pipeline.publish_durable_events(requests.durable_mark().clone());
    }
    let resumed_after = pipeline.resumed_after;
    let driver_metrics = DriverMetrics::new(options.source, pipeline.sharded.shard_count());
    let mut since_snapshot = 0u64;
    let mut last_seq: Option<u64> = resumed_after;
    let mut next_seq = resumed_after.map_or(0, |s| s + 1);
    let mut read = 0u64;
    let mut processed = 0u64;
    let mut positions = BTreeMap::new();
    metrics::pipeline_started();
    if let Some(health) = &options.health {
        health.set_ready();
    }
    for segment in segments {
        let first_seq = segment.first_seq.unwrap_or(next_seq);
        let open = (segment.positions)(first_seq, false);
        let mut inputs = segment.inputs.peekable();
        let mut seq = first_seq;
        let mut entered = false;
        while let Some(input) = inputs.next() {
            let this = seq;
            seq += 1;
            read += 1;
            if options.progress_every > 0 && read.is_multiple_of(options.progress_every) {
                progress(Progress {
                    inputs: read,
                    elapsed_secs: started.elapsed().as_secs_f64(),
                });
            }
            if read.is_multiple_of(metrics::SAMPLE_EVERY) {
                let depths = pipeline.sharded.queue_depths();
                driver_metrics.sample(
                    &depths,
                    pipeline.sharded.card_count(),
                    pipeline.sharded.clock(),
                );
            }
            if resumed_after.is_some_and(|s| this <= s) {
                continue;
            }
            feed(&mut pipeline, &driver_metrics, options, this, input)?;
            if let Some(requests) = &options.requests {
                requests.serve_waiting(
                    &mut pipeline.sharded,
                    Position { seq: Some(this) },
                    NOT_NOW,
                );
                // A commit done is published to the API's event stream now,
                // not at the next snapshot's cut.
                pipeline.snapshot_pending()?;
            }
            if !entered {
                entered = true;
                positions.clone_from(&open);
            }
            processed += 1;
            last_seq = Some(this);
            since_snapshot += 1;
            if options.snapshot_every > 0 && since_snapshot >= options.snapshot_every {
                if inputs.peek().is_none() {
                    positions = (segment.positions)(first_seq, true);
                }
                // Committed while the next inputs flow.
                pipeline.begin_snapshot(last_seq, &positions)?;
                since_snapshot = 0;
            }
        }
        if entered {
            positions = (segment.positions)(first_seq, true);
        }
        next_seq = next_seq.max(seq);
    }
    // Recalling the shards brings every one up to the final clock
    // (deadlines, rollovers); their outputs go through the writer.
    pipeline.sharded.engine();
    pipeline.dump_cards = true;
    pipeline.wait_snapshot()?;
    if since_snapshot > 0 {
        // Delivered before the last snapshot, so their outcomes are in it.
        // (A run with no new input takes no snapshot: outcomes it reaches
        // join the history at the next run's first snapshot.)
        pipeline.settle_notifications()?;
        pipeline.snapshot(last_seq, &positions)?;
    }
    if let (Some(requests), Some(stop)) = (&options.requests, &options.linger) {
        let next = last_seq.map_or(next_seq, |s| next_seq.max(s + 1));
        processed += linger(
            &mut pipeline,
            requests,
            stop,
            &options.clock,
            last_seq,
            next,
        )?;
    }
    driver_metrics.sample(
        &pipeline.sharded.queue_depths(),
        pipeline.sharded.card_count(),
        pipeline.sharded.clock(),
    );
    let (mut summary, engine) = pipeline.finish()?;
    summary.inputs = processed;
    summary.inputs_per_sec = summary.inputs as f64 / summary.elapsed_secs.max(1e-9);
    summary.out_dir = dir.clone();
    Ok((summary, engine))
}

/// How long the lingering driver waits for a request before it looks at
/// its stop flag again.
const LINGER_POLL: Duration = Duration::from_millis(100);

/// After the inputs: answers requests until `stop` is set. A command is
/// the next input (`next`, then on), journaled like one read from a file,
/// and answered once a snapshot covering it is durable. Returns how many
/// commands were applied.
fn linger(
    pipeline: &mut Pipeline,
    requests: &Requests,
    stop: &AtomicBool,
    clock: &SharedClock,
    mut last_seq: Option<u64>,
    next: u64,
) -> Result<u64, IngestError> {
    let mut seq = next;
    let no_positions = BTreeMap::new();
    while !stop.load(Ordering::Relaxed) {
        match requests.next(LINGER_POLL) {
            None => {}
            Some(Request::Read(read)) => {
                read(pipeline.sharded.engine(), Position { seq: last_seq })
            }
            Some(Request::Command { command, reply }) => {
                pipeline.sharded.process_command_received(
                    (*command).clone(),
                    Some(Timestamp(clock.now_ms())),
                    seq,
                );
                last_seq = Some(seq);
                seq += 1;
                // The file positions stay what the engine holds.
                pipeline.snapshot(last_seq, &no_positions)?;
                let answer = pipeline
                    .sharded
                    .engine()
                    .command_result(&command)
                    .map(|result| Applied {
                        result,
                        seq: seq - 1,
                    })
                    .ok_or_else(|| format!("command {} left no result", command.id));
                reply(answer);
            }
        }
    }
    Ok(seq - next)
}

/// One input into the pipeline at `seq`.
fn feed(
    pipeline: &mut Pipeline,
    driver_metrics: &DriverMetrics,
    options: &EmbeddedOptions,
    seq: u64,
    input: Input,
) -> Result<(), IngestError> {
    let (bytes, received) = match options.sizes.check(input) {
        Input::Record(bytes) => (bytes, None),
        Input::ReceivedRecord(bytes, received) => (bytes, Some(received)),
        Input::Command(bytes) => return run_command(pipeline, bytes, None, seq),
        Input::ReceivedCommand(bytes, received) => {
            return run_command(pipeline, bytes, Some(received), seq)
        }
        Input::Oversized(input) => {
            if input.kind == InputKind::Record {
                driver_metrics.record_in();
            }
            return pipeline.side(Letter::too_large(seq, input, None));
        }
    };
    driver_metrics.record_in();
    match decode_json(&bytes, &options.limits) {
        Ok(usage) => {
            if let Some(r) = pipeline
                .sharded
                .process_usage_received(&usage, received, seq)?
            {
                pipeline.side(Letter::rejected(r, bytes, None))?;
            }
        }
        Err(e) => pipeline.side(Letter::undecodable(seq, &e, bytes, None))?,
    }
    Ok(())
}

/// Parses and runs one command line: a line that does not parse is
/// answered (journal, dead letter) without reaching the engine.
fn run_command(
    pipeline: &mut Pipeline,
    bytes: Vec<u8>,
    received: Option<Timestamp>,
    seq: u64,
) -> Result<(), IngestError> {
    match parse_command(&bytes) {
        Ok(command) => {
            pipeline
                .sharded
                .process_command_received(command, received, seq);
            Ok(())
        }
        Err(error) => pipeline.side(Letter::bad_command(seq, error, bytes, None)),
    }
}
