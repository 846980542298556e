//! Engine throughput on 1M cards (records/s): JSON decode + account against
//! a naive `serde_json::Value` + `DashMap<String, u64>` baseline, and the
//! apply of already-decoded records with uniform and Zipf card choice on
//! the sequential engine (1 shard) and on the threaded `ShardedEngine` with
//! 1 and 2 worker shards.
//!
//! Every record is fresh (new id, `end` advancing one hour of event time per
//! million records, as 1M cards each sending one record an hour), so the
//! dedupe hot window, rollovers and deadlines do their real work. Records
//! are generated between timed chunks, never inside them. The dedupe id
//! store is a no-op (`NullStore`): these figures are the engine's own
//! cost.
//!
//! Beside criterion's wall-clock timings, each configuration prints records
//! per CPU-second (the machine is shared: CPU time says what a core does)
//! and how many cores it kept busy.
//!
//! Run: `cargo bench -p flowcap-benches --bench engine`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dashmap::DashMap;
use flowcap_benches::{
    process_cpu_ns, setup_engine, thread_cpu_ns, workload, CardChoice, CardShape, UsageGen,
};
use flowcap_engine::decode::{decode_json, DecodeLimits};
use flowcap_engine::{Engine, Output, ShardedEngine, Usage};
use flowcap_loadgen::Workload;

const CARDS: u64 = 1_000_000;
/// Records per timed chunk (one criterion iteration).
const CHUNK: usize = 1 << 16;
/// Wall seconds of processing behind each printed CPU figure.
const REPORT_SECS: f64 = 3.0;
const ZIPF_S: f64 = 1.1;

type CpuProbe = fn() -> Option<u64>;

#[derive(Default, Clone, Copy)]
struct Probe {
    records: u64,
    wall: Duration,
    cpu_ns: u64,
}

impl std::ops::AddAssign for Probe {
    fn add_assign(&mut self, o: Probe) {
        self.records += o.records;
        self.wall += o.wall;
        self.cpu_ns += o.cpu_ns;
    }
}

/// Fills a chunk (untimed), then processes it (timed by wall clock and by
/// `cpu`), `iters` times.
fn timed<T>(
    iters: u64,
    buf: &mut T,
    mut fill: impl FnMut(&mut T),
    mut process: impl FnMut(&T) -> u64,
    cpu: CpuProbe,
) -> Probe {
    let mut p = Probe::default();
    for _ in 0..iters {
        fill(buf);
        let c0 = cpu().unwrap_or(0);
        let t = Instant::now();
        p.records += process(buf);
        p.wall += t.elapsed();
        p.cpu_ns += cpu().unwrap_or(0).saturating_sub(c0);
    }
    p
}

/// Processes chunks for about [`REPORT_SECS`] of timed wall clock and prints
/// records per CPU-second.
fn report<T>(
    name: &str,
    buf: &mut T,
    mut fill: impl FnMut(&mut T),
    mut process: impl FnMut(&T) -> u64,
    cpu: CpuProbe,
) {
    let mut total = Probe::default();
    while total.wall.as_secs_f64() < REPORT_SECS {
        total += timed(1, buf, &mut fill, &mut process, cpu);
    }
    let cpu_s = total.cpu_ns as f64 / 1e9;
    let wall_s = total.wall.as_secs_f64();
    eprintln!(
        "{name}: {:.2} M records per CPU-second ({:.2} M/s wall, {:.0}% of a core, {} records)",
        total.records as f64 / cpu_s / 1e6,
        total.records as f64 / wall_s / 1e6,
        100.0 * cpu_s / wall_s,
        total.records
    );
}

fn apply_sequential(engine: &mut Engine, chunk: &[(Usage, u64)], out: &mut Vec<Output>) -> u64 {
    for (usage, seq) in chunk {
        if engine.process_usage(usage, *seq, out).is_err() {
            unreachable!("NullStore never fails");
        }
    }
    let n = out.len() as u64;
    out.clear();
    black_box(n);
    chunk.len() as u64
}

/// Feeds a chunk to the threaded engine and waits until the workers have
/// accounted all of it (so the timing covers the shards' work too).
fn apply_sharded(engine: &mut ShardedEngine, chunk: &[(Usage, u64)]) -> u64 {
    for (usage, seq) in chunk {
        if engine.process_usage(usage, *seq).is_err() {
            unreachable!("NullStore never fails");
        }
    }
    engine.flush();
    while engine.queue_depths().iter().any(|d| *d > 0) {
        std::thread::sleep(Duration::from_micros(20));
    }
    chunk.len() as u64
}

/// The obvious way: a `serde_json::Value` per line, usage summed per ICCID
/// string in a `DashMap` (no dedupe, no cycles, no limits).
fn naive_account(line: &str, map: &DashMap<String, u64>) -> bool {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
        return false;
    };
    let (Some(iccid), Some(up), Some(down)) = (
        v.get("iccid").and_then(|i| i.as_str()),
        v.get("bytes_up").and_then(|b| b.as_u64()),
        v.get("bytes_down").and_then(|b| b.as_u64()),
    ) else {
        return false;
    };
    *map.entry(iccid.to_owned()).or_insert(0) += up + down;
    true
}

fn bench_engine(c: &mut Criterion) {
    let wl: Workload = workload(CARDS);
    let limits = DecodeLimits::default();

    // ----- sequential engine, 1 shard: decode + account, then apply -----
    let (mut engine, stats) = setup_engine(&wl, 1, CardShape::Full);
    eprintln!(
        "setup: {} cards, {} commands in {:.1?} (upsert_card: {:.1?})",
        engine.card_count(),
        stats.commands,
        stats.elapsed,
        stats.cards_elapsed
    );
    let mut next_seq = stats.commands;
    let mut out = Vec::new();
    {
        let mut gen = UsageGen::new(&wl, CardChoice::Uniform, next_seq, 7);
        let mut buf = (Vec::new(), Vec::new());
        let fill = |b: &mut (Vec<String>, Vec<u64>)| gen.fill_json(&mut b.0, &mut b.1, CHUNK);
        let mut fill = fill;
        let map: DashMap<String, u64> = DashMap::new();
        let mut flowcap = |b: &(Vec<String>, Vec<u64>)| {
            let mut n = 0;
            for (line, seq) in b.0.iter().zip(&b.1) {
                if let Ok(u) = decode_json(line.as_bytes(), &limits) {
                    if engine.process_usage(&u, *seq, &mut out).is_ok() {
                        n += 1;
                    }
                }
            }
            out.clear();
            n
        };
        let naive = |b: &(Vec<String>, Vec<u64>)| {
            b.0.iter().filter(|line| naive_account(line, &map)).count() as u64
        };
        report(
            "decode_account/flowcap_json",
            &mut buf,
            &mut fill,
            &mut flowcap,
            thread_cpu_ns,
        );
        report(
            "decode_account/naive_serde_value_dashmap",
            &mut buf,
            &mut fill,
            naive,
            thread_cpu_ns,
        );
        let mut group = c.benchmark_group("engine/decode_account_1M_cards");
        group.throughput(Throughput::Elements(CHUNK as u64));
        group.sample_size(10);
        group.bench_function("flowcap_json", |b| {
            b.iter_custom(|iters| {
                timed(iters, &mut buf, &mut fill, &mut flowcap, thread_cpu_ns).wall
            })
        });
        group.bench_function("naive_serde_value_dashmap", |b| {
            b.iter_custom(|iters| timed(iters, &mut buf, &mut fill, naive, thread_cpu_ns).wall)
        });
        group.finish();
        next_seq = gen.seq;
    }

    let mut group = c.benchmark_group("engine/apply_1M_cards");
    group.throughput(Throughput::Elements(CHUNK as u64));
    group.sample_size(10);
    for choice in [CardChoice::Uniform, CardChoice::Zipf(ZIPF_S)] {
        let name = format!("seq_1shard_{}", choice_name(choice));
        let mut gen = UsageGen::new(&wl, choice, next_seq, 11);
        let mut buf = Vec::with_capacity(CHUNK);
        let mut fill = |b: &mut Vec<(Usage, u64)>| gen.fill(b, CHUNK);
        let mut process = |b: &Vec<(Usage, u64)>| apply_sequential(&mut engine, b, &mut out);
        report(
            &format!("apply/{name}"),
            &mut buf,
            &mut fill,
            &mut process,
            thread_cpu_ns,
        );
        group.bench_function(&name, |b| {
            b.iter_custom(|iters| {
                timed(iters, &mut buf, &mut fill, &mut process, thread_cpu_ns).wall
            })
        });
        next_seq = gen.seq;
    }
    let (held, bytes) = engine.dedupe_stats();
    eprintln!(
        "sequential engine after the runs: dedupe window {held} ids, {:.2} bytes/id",
        bytes as f64 / held.max(1) as f64
    );
    drop(engine);

    // ----- threaded engine, 1 and 2 worker shards -----
    for shards in [1usize, 2] {
        let (engine, stats) = setup_engine(&wl, shards, CardShape::Full);
        let (mut sharded, outputs) = ShardedEngine::start(engine, 64);
        // Outputs must be drained concurrently (bounded channel); this
        // thread's CPU time is part of the process figure.
        let drain = std::thread::spawn(move || outputs.iter().map(|b| b.len() as u64).sum::<u64>());
        let mut next_seq = stats.commands;
        let choices: &[CardChoice] = if shards == 1 {
            &[CardChoice::Uniform]
        } else {
            &[CardChoice::Uniform, CardChoice::Zipf(ZIPF_S)]
        };
        for &choice in choices {
            let name = format!(
                "sharded_{shards}worker{}_{}",
                if shards > 1 { "s" } else { "" },
                choice_name(choice)
            );
            let mut gen = UsageGen::new(&wl, choice, next_seq, 13);
            let mut buf = Vec::with_capacity(CHUNK);
            let mut fill = |b: &mut Vec<(Usage, u64)>| gen.fill(b, CHUNK);
            let mut process = |b: &Vec<(Usage, u64)>| apply_sharded(&mut sharded, b);
            report(
                &format!("apply/{name}"),
                &mut buf,
                &mut fill,
                &mut process,
                process_cpu_ns,
            );
            group.bench_function(&name, |b| {
                b.iter_custom(|iters| {
                    timed(iters, &mut buf, &mut fill, &mut process, process_cpu_ns).wall
                })
            });
            next_seq = gen.seq;
        }
        let engine = sharded.finish();
        let _ = drain.join();
        drop(engine);
    }
    group.finish();
}

fn choice_name(choice: CardChoice) -> String {
    match choice {
        CardChoice::Uniform => "uniform".to_owned(),
        CardChoice::Zipf(s) => format!("zipf{s}"),
    }
}

criterion_group!(benches, bench_engine);
criterion_main!(benches);
