//! Usage record decoding throughput (records/s): flowcap's hand-written JSON
//! decoder, a naive `serde_json::Value` baseline doing the same extraction
//! and validation, and the binary encoding. All three decode the same
//! 10,000 realistic carrier messages, pre-generated in memory, in one
//! criterion group so the report compares them directly.
//!
//! Run: `cargo bench -p flowcap-benches --bench decode -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use flowcap_engine::decode::{decode_binary, decode_json, encode_binary, DecodeLimits};
use flowcap_engine::{Carrier, Iccid, RecordId, Timestamp, Usage};

const MESSAGES: usize = 10_000;

/// Small deterministic generator (splitmix64): the bench needs varied, not
/// random-quality, data, and no extra dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Messages shaped like SPEC section 4's example: every field present,
/// compact JSON as carriers' gateways emit it, varied ids, cards, times,
/// byte counts (heavy-tailed: mostly small, sometimes megabytes) and
/// carriers.
fn messages() -> Vec<Vec<u8>> {
    let mut rng = Rng(42);
    let carriers = ["cmcc", "ctcc", "cucc", "tri"];
    let apns = ["cmiot", "ctnet", "3gnet", "private.apn.example"];
    let rats = ["4G", "5G", "NB-IoT", "2G"];
    (0..MESSAGES)
        .map(|n| {
            let carrier = carriers[rng.below(4) as usize];
            let card = rng.below(1_000_000_000_000);
            let minute = rng.below(30 * 24 * 60);
            let (day, hour, min) = (1 + minute / 1440, minute / 60 % 24, minute % 60);
            let scale = [100, 10_000, 1_000_000, 50_000_000][rng.below(4) as usize];
            let up = rng.below(scale);
            let down = rng.below(scale * 4);
            format!(
                concat!(
                    r#"{{"record_id":"{c}-202611{d:02}-{n:010}","iccid":"8986{card:016}","#,
                    r#""start":"2026-11-{d:02}T{h:02}:{m:02}:00+08:00","end":"2026-11-{d:02}T{h:02}:{m:02}:59+08:00","#,
                    r#""bytes_up":{up},"bytes_down":{down},"carrier":"{c}","imsi":"46004{imsi:010}","#,
                    r#""msisdn":"1440{msisdn:09}","imei":"86400{imei:010}","apn":"{apn}","rat":"{rat}"}}"#
                ),
                c = carrier,
                d = day,
                n = n,
                card = card,
                h = hour,
                m = min,
                up = up,
                down = down,
                imsi = rng.below(10_000_000_000),
                msisdn = rng.below(1_000_000_000),
                imei = rng.below(10_000_000_000),
                apn = apns[rng.below(4) as usize],
                rat = rats[rng.below(4) as usize],
            )
            .into_bytes()
        })
        .collect()
}

/// The obvious way: parse to a `serde_json::Value`, then pull out and
/// validate the same fields with the same engine parsers.
fn decode_naive(bytes: &[u8], limits: &DecodeLimits) -> Option<Usage> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let obj = v.as_object()?;
    let bytes_field = |name: &str| {
        obj.get(name)?
            .as_u64()
            .filter(|b| *b <= limits.max_bytes_per_record)
    };
    let time_field = |name: &str| Timestamp::parse_rfc3339(obj.get(name)?.as_str()?).ok();
    let start = match obj.get("start") {
        None | Some(serde_json::Value::Null) => None,
        Some(_) => Some(time_field("start")?),
    };
    let carrier = match obj.get("carrier") {
        None | Some(serde_json::Value::Null) => None,
        Some(c) => Some(Carrier::parse(c.as_str()?.as_bytes())?),
    };
    let usage = Usage {
        record_id: RecordId::new(obj.get("record_id")?.as_str()?)?,
        iccid: Iccid::parse(obj.get("iccid")?.as_str()?).ok()?,
        start,
        end: time_field("end")?,
        bytes_up: bytes_field("bytes_up")?,
        bytes_down: bytes_field("bytes_down")?,
        carrier,
        imei: None,
    };
    (start.is_none_or(|s| s <= usage.end)).then_some(usage)
}

/// CPU time consumed by this thread so far (Linux), in nanoseconds.
fn thread_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Criterion measures wall time, which on a shared machine counts time the
/// thread spent waiting for a core. This prints records per second of the
/// thread's own CPU time, the figure that says what one core can do.
fn report_cpu_throughput(name: &str, messages: &[Vec<u8>], decode: impl Fn(&[u8]) -> u64) {
    let (Some(cpu0), wall0) = (thread_cpu_ns(), std::time::Instant::now()) else {
        return;
    };
    let mut passes = 0u64;
    let mut total = 0u64;
    while wall0.elapsed().as_secs_f64() < 2.0 {
        for m in messages {
            total = total.wrapping_add(decode(black_box(m)));
        }
        passes += 1;
    }
    black_box(total);
    let Some(cpu1) = thread_cpu_ns() else {
        return;
    };
    let records = (passes * messages.len() as u64) as f64;
    let cpu_s = (cpu1 - cpu0) as f64 / 1e9;
    let wall_s = wall0.elapsed().as_secs_f64();
    eprintln!(
        "{name}: {:.2} M records per CPU-second ({:.2} M/s wall, {:.0}% of a core)",
        records / cpu_s / 1e6,
        records / wall_s / 1e6,
        100.0 * cpu_s / wall_s
    );
}

fn bench_decode(c: &mut Criterion) {
    let limits = DecodeLimits::default();
    let json = messages();
    let usages: Vec<Usage> = json
        .iter()
        .map(|m| decode_json(m, &limits).expect("generated messages are valid"))
        .collect();
    for (m, u) in json.iter().zip(&usages) {
        assert_eq!(
            decode_naive(m, &limits).as_ref(),
            Some(u),
            "baseline agrees"
        );
    }
    let binary: Vec<Vec<u8>> = usages
        .iter()
        .map(|u| {
            let mut out = Vec::new();
            encode_binary(u, &mut out);
            out
        })
        .collect();
    let json_bytes: usize = json.iter().map(Vec::len).sum();
    let binary_bytes: usize = binary.iter().map(Vec::len).sum();
    eprintln!(
        "decode bench: {MESSAGES} messages, mean JSON {} bytes, mean binary {} bytes",
        json_bytes / MESSAGES,
        binary_bytes / MESSAGES
    );

    report_cpu_throughput("json_flowcap", &json, |m| {
        decode_json(m, &limits).map_or(0, |u| u.bytes())
    });
    report_cpu_throughput("json_serde_value_naive", &json, |m| {
        decode_naive(m, &limits).map_or(0, |u| u.bytes())
    });
    report_cpu_throughput("binary_flowcap", &binary, |m| {
        decode_binary(m, &limits).map_or(0, |u| u.bytes())
    });

    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(MESSAGES as u64));
    group.bench_function("json_flowcap", |b| {
        b.iter(|| {
            let mut total = 0u64;
            for m in &json {
                if let Ok(u) = decode_json(black_box(m), &limits) {
                    total = total.wrapping_add(u.bytes());
                }
            }
            black_box(total)
        })
    });
    group.bench_function("json_serde_value_naive", |b| {
        b.iter(|| {
            let mut total = 0u64;
            for m in &json {
                if let Some(u) = decode_naive(black_box(m), &limits) {
                    total = total.wrapping_add(u.bytes());
                }
            }
            black_box(total)
        })
    });
    group.bench_function("binary_flowcap", |b| {
        b.iter(|| {
            let mut total = 0u64;
            for m in &binary {
                if let Ok(u) = decode_binary(black_box(m), &limits) {
                    total = total.wrapping_add(u.bytes());
                }
            }
            black_box(total)
        })
    });
    group.finish();
}

criterion_group!(benches, bench_decode);
criterion_main!(benches);
