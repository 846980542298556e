//! What the fleet clock costs a record (issue #23): the sequential engine
//! applying fresh records of 100,000 active cards (uniform card choice,
//! `end` advancing one hour per 100,000 records, so every record is the
//! newest and enters the watermark's set) with the default quorum of 16
//! against quorum 1, the old rule (the latest `end` seen), and with the
//! records spread over 32 input lanes (Kafka partitions: a watermark each,
//! time the slowest's) against one, in the same run.
//!
//! Run: `cargo bench -p flowcap-engine --bench clock`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use flowcap_engine::command::parse_command;
use flowcap_engine::record::RecordId;
use flowcap_engine::{Engine, EngineConfig, Iccid, Lane, Timestamp, Usage};

const CARDS: u64 = 100_000;

/// An engine with `CARDS` active cards on a 1 GB plan.
fn engine(clock_quorum: usize) -> (Engine, Vec<Iccid>) {
    let mut e = Engine::new(EngineConfig {
        shards: 1,
        clock_quorum,
        ..EngineConfig::default()
    });
    let mut out = Vec::new();
    let plan = r#"{"id":"p","type":"upsert_plan","at":"2026-11-01T00:00:00+08:00","plan":{"id":"cmcc-1g","name":"n","carrier":"cmcc","allowance_mb":1024,"traffic":"directed","term_months":12}}"#;
    e.process_command(parse_command(plan.as_bytes()).expect("plan"), 0, &mut out);
    for i in 0..CARDS {
        let line = format!(
            r#"{{"id":"c{i}","type":"upsert_card","at":"2026-11-01T00:00:00+08:00","card":{{"iccid":"8986{i:016}","carrier":"cmcc","plan":"cmcc-1g","state":"active","activated_at":"2026-01-01T00:00:00+08:00","expires_at":"2027-06-01T00:00:00+08:00"}}}}"#
        );
        e.process_command(
            parse_command(line.as_bytes()).expect("card"),
            i + 1,
            &mut out,
        );
        out.clear();
    }
    let iccids = (0..CARDS)
        .map(|i| Iccid::parse(&format!("8986{i:016}")).expect("iccid"))
        .collect();
    (e, iccids)
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("clock");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(5));
    for (quorum, lanes) in [(1usize, 1u64), (16, 1), (16, 32)] {
        let (mut e, iccids) = engine(quorum);
        e.declare_lanes(lanes as usize);
        let start = Timestamp::parse_rfc3339("2026-11-02T00:00:00+08:00").expect("time");
        let mut n: u64 = 0;
        let mut x: u64 = 88_172_645_463_325_252;
        let mut out = Vec::new();
        group.bench_function(
            format!("record, clock_quorum {quorum}, {lanes} lanes"),
            |b| {
                b.iter_custom(|iters| {
                    let mut spent = Duration::ZERO;
                    for _ in 0..iters {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let card = x % CARDS;
                        let usage = Usage {
                            record_id: RecordId::new(&format!("r{n}")).expect("id"),
                            iccid: iccids[card as usize],
                            start: None,
                            end: start.plus_millis((n * 36) as i64),
                            bytes_up: 100,
                            bytes_down: 200,
                            carrier: None,
                            imei: None,
                        };
                        n += 1;
                        let t = Instant::now();
                        e.process_usage_from(
                            Lane((card % lanes) as u32),
                            &usage,
                            None,
                            CARDS + n,
                            &mut out,
                        )
                        .expect("in-memory dedupe");
                        spent += t.elapsed();
                        black_box(&out);
                        out.clear();
                    }
                    spent
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
