//! Memory, setup and snapshot figures of the engine at one card count.
//!
//! ```text
//! cargo run --release -p flowcap-benches --bin engine_report -- --cards 1000000
//! cargo run --release -p flowcap-benches --bin engine_report -- --cards 10000000
//! cargo run --release -p flowcap-benches --bin engine_report -- --plot docs/img/memory_per_card.png
//! ```
//!
//! Memory is per process, so run one card count per process. Each run
//! prints a table and appends one JSON line to `target/engine_report.jsonl`
//! (`--out` to change); `--plot` draws the lines found there.
//!
//! Steps (one process):
//! 1. per-command retention: RSS delta of 200,000 repeated `upsert_tag`
//!    commands on an empty engine (the registry keeps every command's
//!    result, so card setup RSS includes one result per command);
//! 2. setup of the loadgen workload (`upsert_card` per card, pools,
//!    thresholds, add-ons) on a 1-shard engine: time, RSS delta,
//!    `accounting_heap_bytes()`;
//! 3. one fresh record per card (uniform, one hour of event time): apply
//!    rate at this card count, dedupe hot window bytes per id;
//! 4. `snapshot()` and `restore()`: bytes, seconds, MB/s;
//! 5. what a snapshot's cut holds the inputs for: `snapshot_copy()`
//!    (twice: the second reuses the first's freed memory), and what the
//!    day's cards dump builds beside them, `card_views()`.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use flowcap_benches::{
    plot, rss_bytes, setup_engine, thread_cpu_ns, workload, CardChoice, CardShape, NullStore,
    UsageGen,
};
use flowcap_engine::command::TagSpec;
use flowcap_engine::{Command, CommandId, CommandKind, Engine, EngineConfig, TagId};

struct Args {
    cards: u64,
    shape: CardShape,
    out: String,
    plot: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        cards: 1_000_000,
        shape: CardShape::Full,
        out: "target/engine_report.jsonl".to_owned(),
        plot: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--cards" => args.cards = value()?.parse().map_err(|e| format!("--cards: {e}"))?,
            "--shape" => {
                args.shape = match value()?.as_str() {
                    "full" => CardShape::Full,
                    "lean" => CardShape::Lean,
                    s => return Err(format!("--shape full|lean, not {s}")),
                }
            }
            "--out" => args.out = value()?,
            "--plot" => args.plot = Some(value()?),
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    Ok(args)
}

fn rss() -> i64 {
    rss_bytes().unwrap_or(0) as i64
}

fn mib(b: f64) -> f64 {
    b / (1024.0 * 1024.0)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("engine_report: {e}");
            std::process::exit(2);
        }
    };
    if let Some(path) = &args.plot {
        if let Err(e) = plot::engine::draw(Path::new(&args.out), Path::new(path)) {
            eprintln!("engine_report: plot: {e}");
            std::process::exit(1);
        }
        return;
    }
    let n = args.cards;
    let shape = match args.shape {
        CardShape::Full => "full",
        CardShape::Lean => "lean",
    };

    // 1. What one retained command result costs.
    let retained = 200_000u64;
    let per_command = {
        let mut e = Engine::with_id_store(
            EngineConfig {
                shards: 1,
                ..EngineConfig::default()
            },
            Box::new(NullStore),
        );
        let mut out = Vec::new();
        let r0 = rss();
        for k in 0..retained {
            e.process_command(
                Command {
                    id: CommandId(format!("setup-{k:06}")),
                    at: flowcap_engine::Timestamp(1_795_665_600_000),
                    operator: Some("loadgen".to_owned()),
                    kind: CommandKind::UpsertTag {
                        tag: TagSpec {
                            name: TagId("t".to_owned()),
                            description: String::new(),
                        },
                    },
                },
                k,
                &mut out,
            );
            out.clear();
        }
        (rss() - r0) as f64 / retained as f64
    };

    // 2. Cards.
    let wl = workload(n);
    let rss_before = rss();
    let (mut engine, stats) = setup_engine(&wl, 1, args.shape);
    let rss_after = rss();
    let cards = engine.card_count() as f64;
    let rss_delta = (rss_after - rss_before) as f64;
    let results_estimate = per_command * stats.commands as f64;
    let heap = engine.accounting_heap_bytes() as f64;

    // 3. One record per card.
    let mut gen = UsageGen::new(&wl, CardChoice::Uniform, stats.commands, 5);
    let mut chunk = Vec::with_capacity(1 << 16);
    let mut out = Vec::new();
    let (mut apply_wall, mut apply_cpu) = (0f64, 0u64);
    let mut left = n as usize;
    let rss_before_records = rss();
    while left > 0 {
        let k = left.min(1 << 16);
        gen.fill(&mut chunk, k);
        let c0 = thread_cpu_ns().unwrap_or(0);
        let t = Instant::now();
        for (u, seq) in &chunk {
            if engine.process_usage(u, *seq, &mut out).is_err() {
                unreachable!("NullStore never fails");
            }
        }
        out.clear();
        apply_wall += t.elapsed().as_secs_f64();
        apply_cpu += thread_cpu_ns().unwrap_or(0).saturating_sub(c0);
        left -= k;
    }
    drop(chunk);
    let rss_records = (rss() - rss_before_records) as f64;
    let (ids, dedupe_bytes) = engine.dedupe_stats();

    // 4. Snapshot and restore.
    let t = Instant::now();
    let snapshot = engine.snapshot();
    let snap_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let restored = match Engine::restore(&snapshot, Box::new(NullStore)) {
        Ok(e) => e,
        Err(e) => panic!("restore failed: {e}"),
    };
    let restore_s = t.elapsed().as_secs_f64();
    assert_eq!(restored.card_count(), engine.card_count());
    let snap_bytes = snapshot.len() as f64;

    // 5. The cut's copy, and the cards dump's views.
    let t = Instant::now();
    let copy = engine.snapshot_copy();
    let copy_s = t.elapsed().as_secs_f64();
    drop(copy);
    let t = Instant::now();
    let copy = engine.snapshot_copy();
    let copy_again_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let views = copy.card_views();
    let views_s = t.elapsed().as_secs_f64();
    assert_eq!(views.len(), engine.card_count());
    drop((views, copy));

    let setup_s = stats.elapsed.as_secs_f64();
    let cards_s = stats.cards_elapsed.as_secs_f64();
    println!("engine_report: {n} cards ({shape} card specs), 1 shard, NullStore dedupe");
    println!("| measure | value |");
    println!("| --- | --- |");
    println!(
        "| setup | {} commands in {setup_s:.1} s; upsert_card {:.0} k/s ({cards_s:.1} s) |",
        stats.commands,
        cards / cards_s / 1e3
    );
    println!(
        "| RSS delta of setup | {:.0} MiB, {:.1} bytes/card |",
        mib(rss_delta),
        rss_delta / cards
    );
    println!(
        "| of which retained command results (est.) | {per_command:.0} bytes/command, {:.1} bytes/card |",
        results_estimate / cards
    );
    println!(
        "| RSS delta less command results | {:.1} bytes/card |",
        (rss_delta - results_estimate) / cards
    );
    println!(
        "| accounting_heap_bytes | {:.0} MiB, {:.1} bytes/card |",
        mib(heap),
        heap / cards
    );
    println!(
        "| apply, 1 record per card | {:.2} M/s per CPU-second ({:.2} M/s wall) |",
        n as f64 / (apply_cpu as f64 / 1e9) / 1e6,
        n as f64 / apply_wall / 1e6
    );
    println!(
        "| dedupe hot window | {ids} ids, {:.0} MiB, {:.2} bytes/id (RSS delta {:.2} bytes/id) |",
        mib(dedupe_bytes as f64),
        dedupe_bytes as f64 / ids.max(1) as f64,
        rss_records / ids.max(1) as f64
    );
    println!(
        "| snapshot write | {:.0} MiB in {snap_s:.2} s, {:.0} MB/s |",
        mib(snap_bytes),
        snap_bytes / snap_s / 1e6
    );
    println!(
        "| snapshot restore | {restore_s:.2} s, {:.0} MB/s |",
        snap_bytes / restore_s / 1e6
    );
    println!(
        "| state copy at a cut (first / again) | {:.0} ms / {:.0} ms |",
        copy_s * 1e3,
        copy_again_s * 1e3
    );
    println!(
        "| every card's view (the cards dump) | {:.0} ms, {:.2} µs/card |",
        views_s * 1e3,
        views_s * 1e6 / cards
    );

    let line = format!(
        concat!(
            "{{\"cards\":{},\"shape\":\"{}\",\"commands\":{},\"setup_s\":{:.3},\"cards_s\":{:.3},",
            "\"rss_delta\":{},\"per_command\":{:.1},\"heap\":{},\"apply_cpu_ns\":{},\"apply_wall_s\":{:.4},",
            "\"dedupe_ids\":{},\"dedupe_bytes\":{},\"snapshot_bytes\":{},\"snapshot_s\":{:.4},\"restore_s\":{:.4},",
            "\"copy_s\":{:.4},\"copy_again_s\":{:.4},\"card_views_s\":{:.4}}}"
        ),
        n,
        shape,
        stats.commands,
        setup_s,
        cards_s,
        rss_delta,
        per_command,
        heap,
        apply_cpu,
        apply_wall,
        ids,
        dedupe_bytes,
        snapshot.len(),
        snap_s,
        restore_s,
        copy_s,
        copy_again_s,
        views_s
    );
    match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.out)
    {
        Ok(mut f) => {
            let _ = writeln!(f, "{line}");
        }
        Err(e) => eprintln!("engine_report: cannot append to {}: {e}", args.out),
    }
    drop(restored);
}
