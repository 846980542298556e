//! Shared helpers for the criterion benches and the report binaries:
//! CPU-time and RSS probes (Linux `/proc`), engine setup from a loadgen
//! workload, a generator of fresh, already-decoded usage records, the
//! [`plot`] (every report's charts) and progress bars. The report
//! binaries' oracles (the history check, the DuckDB side of the SQL
//! comparisons) are the testkit's, shared with the binary's tests, and
//! re-exported here.

pub mod plot;

pub use flowcap_testkit::duckdb::{duckdb, DUCKDB_SCRIPT};
pub use flowcap_testkit::history_check::{batch_rows, check_history, HistoryCheck};

use std::time::{Duration, Instant};

use flowcap_engine::dedupe::{IdStore, IdStoreError};
use flowcap_engine::{
    Command, CommandKind, Engine, EngineConfig, Iccid, RecordId, Timestamp, Usage,
};
use flowcap_loadgen::{GeneratedRecord, Payload, RecordKind, Workload, WorkloadConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};

/// CPU time consumed by the calling thread so far, in nanoseconds.
pub fn thread_cpu_ns() -> Option<u64> {
    first_field(&std::fs::read_to_string("/proc/thread-self/schedstat").ok()?)
}

/// CPU time consumed by every live thread of this process, in nanoseconds
/// (sum of `/proc/self/task/*/schedstat`; threads that exited are not
/// counted, so take both readings while the worker threads are alive).
pub fn process_cpu_ns() -> Option<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let path = task.ok()?.path().join("schedstat");
        if let Ok(text) = std::fs::read_to_string(path) {
            total += first_field(&text).unwrap_or(0);
        }
    }
    Some(total)
}

fn first_field(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// Resident set size of this process (`VmRSS`), in bytes.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// An [`IdStore`] that remembers nothing: the hot window alone decides
/// (no fingerprint hit occurs for fresh records, so it is never asked to
/// verify). Isolates the engine's own cost from the id store's.
#[derive(Debug, Default)]
pub struct NullStore;

impl IdStore for NullStore {
    fn contains(&mut self, _: Iccid, _: &RecordId) -> Result<bool, IdStoreError> {
        Ok(false)
    }
    fn insert(&mut self, _: Iccid, _: &RecordId, _: Timestamp, _: u64) -> Result<(), IdStoreError> {
        Ok(())
    }
    fn durable_through(&mut self, _: u64) -> Result<(), IdStoreError> {
        Ok(())
    }
    fn truncate_after(&mut self, _: u64) -> Result<(), IdStoreError> {
        Ok(())
    }
}

/// The loadgen workload used by every engine bench: `cards` cards with the
/// default plan catalogue, pools (20 % forward, 10 % backward), thresholds
/// and add-ons.
pub fn workload(cards: u64) -> Workload {
    Workload::new(WorkloadConfig {
        cards,
        ..WorkloadConfig::default()
    })
    .unwrap_or_else(|e| panic!("workload of {cards} cards: {e}"))
}

/// How the cards are created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CardShape {
    /// Loadgen's `upsert_card` exactly: MSISDN, IMSI and IMEI strings and
    /// one fleet tag on every card.
    Full,
    /// The same commands without MSISDN/IMSI/IMEI (accounting state only).
    Lean,
}

/// What loading the cards cost.
#[derive(Debug, Clone, Copy)]
pub struct SetupStats {
    /// Commands applied.
    pub commands: u64,
    /// Wall time of the whole setup.
    pub elapsed: Duration,
    /// Wall time of the `upsert_card` commands alone.
    pub cards_elapsed: Duration,
}

/// An engine with `shards` shards holding the workload's setup (cards,
/// pools, thresholds, add-ons), dedupe backed by [`NullStore`].
pub fn setup_engine(wl: &Workload, shards: usize, shape: CardShape) -> (Engine, SetupStats) {
    let mut engine = Engine::with_id_store(
        EngineConfig {
            shards,
            ..EngineConfig::default()
        },
        Box::new(NullStore),
    );
    let mut out = Vec::new();
    let started = Instant::now();
    let mut cards_elapsed = Duration::ZERO;
    let mut commands = 0u64;
    for (seq, mut command) in wl.setup_commands().enumerate() {
        let is_card = matches!(command.kind, CommandKind::UpsertCard { .. });
        if shape == CardShape::Lean {
            strip_identities(&mut command);
        }
        let t = is_card.then(Instant::now);
        engine.process_command(command, seq as u64, &mut out);
        if let Some(t) = t {
            cards_elapsed += t.elapsed();
        }
        out.clear();
        commands += 1;
    }
    (
        engine,
        SetupStats {
            commands,
            elapsed: started.elapsed(),
            cards_elapsed,
        },
    )
}

fn strip_identities(command: &mut Command) {
    if let CommandKind::UpsertCard { card } = &mut command.kind {
        card.msisdn = None;
        card.imsi = None;
        card.imei = None;
    }
}

/// How a record picks its card.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CardChoice {
    /// Uniformly.
    Uniform,
    /// Zipf over card ranks with this exponent; ranks are scattered over the
    /// card indices (a bijective multiplicative hash) so hot cards are not
    /// neighbours in memory.
    Zipf(f64),
}

/// Fresh, valid, already-decoded usage records over a workload's cards:
/// every record has a new id (`rec-20261126-<seq>`, 23 bytes, like a
/// carrier's), `end` advances by `1 h / cards` per record (each card sends
/// one record an hour on average, as loadgen's default) starting at the
/// workload's start, and the usage is 0-64 KiB up and 0-256 KiB down.
#[derive(Debug)]
pub struct UsageGen {
    iccids: Vec<Iccid>,
    carriers: Vec<flowcap_engine::Carrier>,
    choice: CardChoice,
    zipf: Option<Zipf<f64>>,
    rng: StdRng,
    start: i64,
    /// Next record's sequence number.
    pub seq: u64,
}

impl UsageGen {
    /// A generator over `wl`'s cards. `first_seq` numbers the first record
    /// (keep it above the setup's command count).
    pub fn new(wl: &Workload, choice: CardChoice, first_seq: u64, seed: u64) -> UsageGen {
        let n = wl.card_count();
        let iccids = (0..n)
            .map(|i| wl.iccid(i).unwrap_or_else(|| unreachable!()))
            .collect();
        let carriers = (0..n)
            .map(|i| wl.carrier(i).unwrap_or_else(|| unreachable!()))
            .collect();
        let zipf = match choice {
            CardChoice::Uniform => None,
            CardChoice::Zipf(s) => Some(Zipf::new(n, s).unwrap_or_else(|e| panic!("zipf: {e}"))),
        };
        UsageGen {
            iccids,
            carriers,
            choice,
            zipf,
            rng: StdRng::seed_from_u64(seed),
            start: wl.config().start.0,
            seq: first_seq,
        }
    }

    /// The card choice.
    pub fn choice(&self) -> CardChoice {
        self.choice
    }

    fn card(&mut self) -> usize {
        let n = self.iccids.len() as u64;
        match &self.zipf {
            None => self.rng.gen_range(0..n) as usize,
            Some(z) => {
                let rank = z.sample(&mut self.rng) as u64 - 1;
                // 2654435761 is prime, so this is a bijection of 0..n unless
                // n is one of its multiples.
                ((rank * 2_654_435_761) % n) as usize
            }
        }
    }

    /// The next record and its sequence number.
    pub fn next_usage(&mut self) -> (Usage, u64) {
        let seq = self.seq;
        self.seq += 1;
        let card = self.card();
        let n = self.iccids.len() as i64;
        let end = Timestamp(self.start + (seq as i64 * 3_600_000) / n);
        let usage = Usage {
            record_id: record_id(seq),
            iccid: self.iccids[card],
            start: Some(Timestamp(end.0 - 300_000)),
            end,
            bytes_up: self.rng.gen_range(0..65_536),
            bytes_down: self.rng.gen_range(0..262_144),
            carrier: Some(self.carriers[card]),
            imei: None,
        };
        (usage, seq)
    }

    /// Fills `chunk` with the next `n` records.
    pub fn fill(&mut self, chunk: &mut Vec<(Usage, u64)>, n: usize) {
        chunk.clear();
        chunk.extend((0..n).map(|_| self.next_usage()));
    }

    /// Fills `lines` with the next `n` records as SPEC JSON lines (loadgen's
    /// serialisation, with `imsi`/`msisdn`/`imei`), `seqs` with their
    /// sequence numbers.
    pub fn fill_json(&mut self, lines: &mut Vec<String>, seqs: &mut Vec<u64>, n: usize) {
        lines.resize_with(n, String::new);
        seqs.clear();
        for line in lines.iter_mut() {
            let (usage, seq) = self.next_usage();
            let record = GeneratedRecord {
                seq,
                arrival: usage.end,
                kind: RecordKind::Fresh,
                payload: Payload::Valid(usage),
            };
            line.clear();
            record.to_json_line(line);
            seqs.push(seq);
        }
    }
}

/// `rec-20261126-<seq, 10 digits>` without going through `format!`.
fn record_id(seq: u64) -> RecordId {
    let mut buf = *b"rec-20261126-0000000000";
    let mut s = seq;
    for b in buf[13..].iter_mut().rev() {
        *b = b'0' + (s % 10) as u8;
        s /= 10;
    }
    RecordId::new(std::str::from_utf8(&buf).unwrap_or("rec")).unwrap_or_else(|| unreachable!())
}

/// The median of `values` (0 for none).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A progress bar of `total` steps, or a spinner when the total is unknown,
/// showing `what`.
pub fn progress(total: Option<u64>, what: &str) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressStyle};
    let bar = match total {
        Some(n) => ProgressBar::new(n).with_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {human_pos}/{human_len} {msg} ({per_sec}, eta {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    };
    bar.set_message(what.to_owned());
    bar
}

/// The CPU model of this machine (`/proc/cpuinfo`), empty when unknown.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_default()
}
