//! Phase 4, the operator API under ingestion (issue #25): `GET
//! /api/v1/cards/{iccid}` at `--api-cards` cards while flowcap ingests.
//!
//! 1. The workload's setup commands are applied by one run to idle (the
//!    template directory); its records are produced (the backlog).
//! 2. The backlog is drained on a copy of the template without API load,
//!    then on another copy with `--api-clients` closed-loop clients
//!    asking for random cards (one keep-alive connection each): the
//!    ingestion rate with and without the API's load, as a ratio.
//! 3. flowcap runs live on the drained copy while records are paced at
//!    half the unloaded rate for `--latency-secs`, the clients asking
//!    meanwhile: each GET's latency (hdrhistogram, µs, as the client sees
//!    it: write to the last body byte), requests/s, and the paced rate
//!    reached.
//!
//! A read recalls the shards between two inputs (ARCHITECTURE, *How a
//! request reads live state*): reads waiting together share a recall, so
//! the cost to ingestion grows with the request rate, not the card count.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use flowcap_engine::{RecordId, Timestamp, Usage};
use flowcap_loadgen::{Workload, WorkloadConfig};
use flowcap_testkit::Broker;
use hdrhistogram::Histogram;
use serde_json::json;

use crate::broker::{
    produce_commands, produce_workload_records, start_broker, valid_record, Sender, USAGE,
};
use crate::child::{run_to_idle, run_to_idle_with, Finished, Flowcap};
use crate::{copy_dir, secs, wall_ms, xorshift, yes, Args, Report};

/// The API's rate limit out of the way: the clients are the load.
const UNLIMITED: &str = "[api]\nrate_per_sec = 1000000000.0\nburst = 1000000000\n";

pub(crate) fn api(args: &Args, bin: &Path, work: &Path, report: &mut Report) -> Result<()> {
    eprintln!(
        "== api: GET /cards/{{iccid}} at {} cards under ingestion",
        args.api_cards
    );
    let broker = start_broker(args.partitions)?;
    let start = Timestamp((wall_ms() - 3 * 3_600_000) / 1000 * 1000);
    let workload = Workload::new(WorkloadConfig {
        cards: args.api_cards,
        start,
        duration_hours: 1,
        records_per_card_per_hour: args.api_per_card_hour,
        ..WorkloadConfig::default()
    })?;
    let config = work.join("api.toml");
    std::fs::write(&config, UNLIMITED)?;
    let config = config.to_string_lossy().into_owned();
    produce_commands(&broker, &workload)?;
    let template = work.join("api-template");
    run_to_idle(bin, &broker, &template, "bench-api", args, "applying setup")?;
    let records = produce_workload_records(&broker, &workload, args.encoding)?;
    let iccids: Arc<Vec<String>> = Arc::new(
        (0..workload.card_count())
            .filter_map(|i| workload.iccid(i).map(|c| c.to_string()))
            .collect(),
    );

    // The backlog drained without, then with, the API's load.
    let quiet = work.join("api-quiet");
    copy_dir(&template, &quiet)?;
    let run = run_to_idle_with(
        bin,
        &broker,
        &quiet,
        "bench-api",
        args,
        "draining, no API load",
        &["--config", &config],
    )?;
    let unloaded = drain_rate(&run, records, args)?;
    let loaded_dir = work.join("api-loaded");
    copy_dir(&template, &loaded_dir)?;
    let idle = args.idle_secs.to_string();
    let mut fc = Flowcap::spawn(
        bin,
        &broker,
        &loaded_dir,
        "bench-api",
        args,
        &["--exit-when-idle", &idle, "--config", &config],
    )?;
    fc.wait_for("consuming", Duration::from_secs(600))?;
    let clients = Clients::start(&fc.metrics, &iccids, args.api_clients)?;
    let run = fc.wait("draining under API load")?;
    let during_drain = clients.stop()?;
    if !run.status.success() {
        bail!("flowcap failed: {}\n{}", run.status, run.log_tail());
    }
    let loaded = drain_rate(&run, records, args)?;
    std::fs::remove_dir_all(&loaded_dir).ok();
    let ratio = loaded / unloaded;
    eprintln!(
        "drain: {unloaded:.0}/s without API load, {loaded:.0}/s with it ({ratio:.3}x; {} requests, {:.0}/s)",
        during_drain.latency.len(),
        during_drain.per_sec()
    );

    // Live: paced at half the unloaded rate, the clients asking meanwhile.
    let rate = unloaded / 2.0;
    let mut fc = Flowcap::spawn(
        bin,
        &broker,
        &quiet,
        "bench-api",
        args,
        &["--config", &config],
    )?;
    fc.wait_for("consuming", Duration::from_secs(600))?;
    let clients = Clients::start(&fc.metrics, &iccids, args.api_clients)?;
    let achieved = pace(&broker, &workload, rate, args.latency_secs)?;
    let live = clients.stop()?;
    fc.terminate()?;
    let fin = fc.wait("stopping (SIGTERM)")?;
    if !fin.status.success() {
        bail!("flowcap failed: {}\n{}", fin.status, fin.log_tail());
    }
    std::fs::remove_dir_all(&quiet).ok();

    let q = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let (p50, p99, p999) = (
        q(&live.latency, 0.5),
        q(&live.latency, 0.99),
        q(&live.latency, 0.999),
    );
    eprintln!(
        "live at {achieved:.0} records/s: {} requests ({:.0}/s, {} refused), p50 {p50:.2} ms, p99 {p99:.2} ms, p99.9 {p999:.2} ms",
        live.latency.len(),
        live.per_sec(),
        live.refused
    );
    report.line(
        "api",
        "summary",
        json!({"cards": args.api_cards, "records": records, "clients": args.api_clients,
               "drain_rate_unloaded": unloaded, "drain_rate_loaded": loaded, "ratio": ratio,
               "drain_requests": during_drain.latency.len(),
               "drain_requests_per_sec": during_drain.per_sec(),
               "paced_rate_target": rate, "paced_rate": achieved,
               "requests": live.latency.len(), "requests_per_sec": live.per_sec(),
               "refused": live.refused,
               "p50_ms": p50, "p99_ms": p99, "p999_ms": p999,
               "max_ms": live.latency.max() as f64 / 1000.0}),
    )?;
    report.row(
        format!(
            "GET /cards/{{iccid}} at {} cards, ingesting {achieved:.0} records/s, {} clients: p50 / p99 / p99.9",
            args.api_cards, args.api_clients
        ),
        format!("{p50:.2} / {p99:.2} / {p999:.2} ms"),
        "p99 <= 5 ms",
        yes(!live.latency.is_empty() && p99 <= 5.0),
    );
    report.row(
        "GET /cards/{iccid} requests/s meanwhile (refused)",
        format!("{:.0} ({})", live.per_sec(), live.refused),
        "",
        "",
    );
    report.row(
        "ingestion with / without that API load (backlog drain)",
        format!("{loaded:.0} / {unloaded:.0} records/s = {ratio:.3}x"),
        ">= 0.95x",
        yes(ratio >= 0.95),
    );
    Ok(())
}

/// Records accounted per second from the first message taken to the last
/// record accounted (as the throughput phase measures).
fn drain_rate(run: &Finished, records: u64, args: &Args) -> Result<f64> {
    let inputs = run.summary["inputs"].as_u64().unwrap_or(0);
    if inputs < records {
        eprintln!("warning: flowcap consumed {inputs} of {records} records");
    }
    let stopping = run
        .at("Stopping")
        .context("flowcap did not log its Stopping status")?;
    let (first, last) = run
        .processing_window(stopping)
        .context("no order log / history growth seen")?;
    let processing = last.at.saturating_sub(first.at);
    if processing < secs(args.idle_secs) {
        eprintln!("warning: the drain took {processing:?}: too short to measure well");
    }
    Ok(inputs as f64 / processing.as_secs_f64().max(1e-3))
}

/// Sends records for random cards at `rate` for `length_secs`, their end
/// the time of sending; the rate reached.
fn pace(broker: &Broker, workload: &Workload, rate: f64, length_secs: u64) -> Result<f64> {
    let mut sender = Sender::new(broker, USAGE, 5)?;
    let n = workload.card_count();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut message = Vec::new();
    let began = Instant::now();
    let length = Duration::from_secs(length_secs);
    let mut k = 0u64;
    while began.elapsed() < length {
        let due = (rate * began.elapsed().as_secs_f64()) as u64;
        while k < due {
            rng = xorshift(rng);
            let card = rng % n;
            let now = wall_ms();
            let iccid = workload.iccid(card).context("card index")?;
            let bytes = 1024 + (rng >> 40) % 65_536;
            let usage = Usage {
                record_id: RecordId::new(&format!("api-{k}")).context("record id")?,
                iccid,
                start: Some(Timestamp(now - 300_000)),
                end: Timestamp(now),
                bytes_up: bytes / 8,
                bytes_down: bytes - bytes / 8,
                carrier: workload.carrier(card),
                imei: None,
            };
            crate::broker::Encoding::Json.write(&valid_record(usage, k), &mut message);
            sender.send(Some(iccid.to_string().as_bytes()), &message, Some(now))?;
            k += 1;
        }
        sender.poll();
        thread::sleep(Duration::from_micros(200));
    }
    let paced = began.elapsed().as_secs_f64();
    sender.flush()?;
    Ok(k as f64 / paced)
}

/// What the clients saw.
struct Seen {
    /// Each answered request's latency, µs.
    latency: Histogram<u64>,
    /// Answers other than 200 (e.g. 503 while a snapshot holds the inputs).
    refused: u64,
    secs: f64,
}

impl Seen {
    fn per_sec(&self) -> f64 {
        self.latency.len() as f64 / self.secs.max(1e-3)
    }
}

/// What one client saw.
struct Tally {
    latency: Histogram<u64>,
    refused: u64,
}

/// Closed-loop clients, each on its own keep-alive connection.
struct Clients {
    stop: Arc<AtomicBool>,
    began: Instant,
    threads: Vec<JoinHandle<Result<Tally>>>,
}

impl Clients {
    fn start(addr: &str, iccids: &Arc<Vec<String>>, n: usize) -> Result<Clients> {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n.max(1))
            .map(|i| {
                let (addr, iccids, stop) = (addr.to_owned(), Arc::clone(iccids), Arc::clone(&stop));
                thread::spawn(move || client(&addr, &iccids, &stop, i as u64 + 1))
            })
            .collect();
        Ok(Clients {
            stop,
            began: Instant::now(),
            threads,
        })
    }

    fn stop(self) -> Result<Seen> {
        self.stop.store(true, Ordering::SeqCst);
        let secs = self.began.elapsed().as_secs_f64();
        let mut latency = Histogram::<u64>::new(3)?;
        let mut refused = 0;
        for t in self.threads {
            let tally = t
                .join()
                .map_err(|_| anyhow::anyhow!("a client panicked"))??;
            latency.add(&tally.latency)?;
            refused += tally.refused;
        }
        Ok(Seen {
            latency,
            refused,
            secs,
        })
    }
}

/// Asks for random cards until `stop` (or the server goes away).
fn client(addr: &str, iccids: &[String], stop: &AtomicBool, seed: u64) -> Result<Tally> {
    let mut latency = Histogram::<u64>::new(3)?;
    let mut refused = 0u64;
    let stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut line = String::new();
    let mut body = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        rng = xorshift(rng);
        let iccid = &iccids[(rng % iccids.len() as u64) as usize];
        let sent = Instant::now();
        let asked = write!(
            writer,
            "GET /api/v1/cards/{iccid} HTTP/1.1\r\nHost: {addr}\r\n\r\n"
        );
        // The server stopping ends the client.
        let Ok(status) = asked.and_then(|()| read_answer(&mut reader, &mut line, &mut body)) else {
            break;
        };
        if status == 200 {
            latency.record(sent.elapsed().as_micros() as u64)?;
        } else {
            refused += 1;
        }
    }
    Ok(Tally { latency, refused })
}

/// Reads one answer (status line, headers, `Content-Length` body); its
/// status.
fn read_answer(
    reader: &mut BufReader<TcpStream>,
    line: &mut String,
    body: &mut Vec<u8>,
) -> std::io::Result<u16> {
    let eof = || std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed");
    line.clear();
    if reader.read_line(line)? == 0 {
        return Err(eof());
    }
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut length = 0usize;
    loop {
        line.clear();
        if reader.read_line(line)? == 0 {
            return Err(eof());
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    body.resize(length, 0);
    reader.read_exact(body)?;
    Ok(status)
}
