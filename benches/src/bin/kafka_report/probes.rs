//! What the report reads from outside the processes it measures: `/proc`
//! (CPU ticks per process and thread, resident memory), flowcap's
//! `/metrics`, and the growth of its order log ([`FileWatch`]).

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use flowcap_testkit::Broker;

/// One observation of a running flowcap from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sample {
    /// Since the spawn.
    pub(crate) at: Duration,
    /// Bytes in the order log (all segments).
    pub(crate) order: u64,
    /// Records accounted so far (counted, duplicates, history only), from
    /// flowcap's `/metrics`.
    pub(crate) usage: u64,
    /// CPU time of the flowcap process and of the broker, clock ticks.
    pub(crate) cpu: u64,
    pub(crate) broker_cpu: u64,
}

/// Polls every 25 ms (a scrape of `/metrics` costs flowcap CPU: every
/// 5 ms took 8 % of its cycles; 25 ms bounds the error of an 8 s window
/// at 0.3 %): the order log in the data directory grows (one
/// `write` per run of messages, before the run is processed) when the
/// driver takes a message; flowcap's Prometheus `/metrics` (`--http`)
/// counts records as their outputs leave the shards (`flowcap_records_*`,
/// `flowcap_duplicates_total`). Together they bracket the processing from
/// outside the process. Each change is kept with the CPU time of flowcap
/// and of the broker at that moment.
pub(crate) struct FileWatch {
    stop: Arc<AtomicBool>,
    changes: Arc<Mutex<Vec<Sample>>>,
    thread: Option<JoinHandle<()>>,
}

impl FileWatch {
    pub(crate) fn start(
        dir: &Path,
        metrics: String,
        spawned: Instant,
        pid: u32,
        broker_pid: Option<u32>,
    ) -> FileWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let changes: Arc<Mutex<Vec<Sample>>> = Arc::default();
        let order = dir.join("order");
        let thread = {
            let (stop, changes) = (stop.clone(), changes.clone());
            thread::spawn(move || {
                let mut segments: Vec<PathBuf> = Vec::new();
                let mut listed = Instant::now() - Duration::from_secs(1);
                let mut last: Option<(u64, u64)> = None;
                while !stop.load(Ordering::SeqCst) {
                    if listed.elapsed() >= Duration::from_millis(50) {
                        segments = fs::read_dir(&order)
                            .into_iter()
                            .flatten()
                            .flatten()
                            .map(|e| e.path())
                            .collect();
                        listed = Instant::now();
                    }
                    let now = (
                        segments
                            .iter()
                            .filter_map(|p| fs::metadata(p).ok())
                            .map(|m| m.len())
                            .sum(),
                        accounted(&metrics).unwrap_or(last.map_or(0, |l| l.1)),
                    );
                    if last != Some(now) {
                        last = Some(now);
                        let sample = Sample {
                            at: spawned.elapsed(),
                            order: now.0,
                            usage: now.1,
                            cpu: cpu_ticks(pid).unwrap_or(0),
                            broker_cpu: broker_pid.and_then(cpu_ticks).unwrap_or(0),
                        };
                        if let Ok(mut c) = changes.lock() {
                            c.push(sample);
                        }
                    }
                    thread::sleep(Duration::from_millis(25));
                }
            })
        };
        FileWatch {
            stop,
            changes,
            thread: Some(thread),
        }
    }

    pub(crate) fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.changes
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default()
    }
}

/// Records accounted so far by the flowcap serving `/metrics` at `addr`
/// (`None` before it listens).
fn accounted(addr: &str) -> Option<u64> {
    let total = metric_sum(
        addr,
        &[
            "flowcap_records_counted_total",
            "flowcap_records_history_only_total",
            "flowcap_duplicates_total",
        ],
    )?;
    Some(total as u64)
}

/// The sum of every sample (all label sets) of the metrics `names` that
/// the flowcap serving `/metrics` at `addr` exports now.
fn metric_sum(addr: &str, names: &[&str]) -> Option<f64> {
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    let mut total = 0.0;
    for line in body.lines() {
        let name = line.split([' ', '{']).next().unwrap_or("");
        if names.contains(&name) {
            total += line.rsplit(' ').next()?.parse::<f64>().ok()?;
        }
    }
    Some(total)
}

/// Snapshots written so far, the seconds they took from cut to durable,
/// and the seconds their cuts held the inputs, from `/metrics`.
pub(crate) fn snapshots_so_far(addr: &str) -> (f64, f64, f64) {
    (
        metric_sum(addr, &["flowcap_snapshots_total"]).unwrap_or(0.0),
        metric_sum(addr, &["flowcap_snapshot_duration_seconds_sum"]).unwrap_or(0.0),
        metric_sum(addr, &["flowcap_snapshot_pause_seconds_sum"]).unwrap_or(0.0),
    )
}

/// The peak resident set (VmHWM) of a live process, KiB.
/// A figure in KiB of a `/proc/<pid>/status` text (`VmHWM:`, `VmRSS:`).
pub(crate) fn status_kb(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Records the CPU ticks so far of every thread of `pid` (by thread id:
/// its name and ticks); a thread that has ended keeps its last reading.
pub(crate) fn thread_ticks(pid: u32, threads: &mut BTreeMap<u32, (String, u64)>) {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        if let Some(reading) = fs::read_to_string(task.path().join("stat"))
            .ok()
            .and_then(|stat| stat_ticks(&stat))
        {
            threads.insert(tid, reading);
        }
    }
}

/// How often a waited-for flowcap's resident memory is sampled.
pub(crate) const RSS_EVERY: Duration = Duration::from_millis(250);

/// User + system CPU time of a process, in clock ticks (1/100 s).
pub(crate) fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat_ticks(&stat)?.1)
}

/// The name and CPU ticks (user + system) of a `/proc/.../stat` text.
fn stat_ticks(stat: &str) -> Option<(String, u64)> {
    // The name is in parentheses (and may contain spaces); fields follow.
    let name = &stat[stat.find('(')? + 1..stat.rfind(')')?];
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some((name.to_owned(), ticks))
}

/// The pid of the `tansu` process listening on this broker's port.
pub(crate) fn broker_pid(broker: &Broker) -> Option<u32> {
    let url = format!("tcp://{}", broker.bootstrap());
    fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = fs::read(e.path().join("cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline);
        (cmdline.contains("tansu") && cmdline.contains(&url)).then_some(pid)
    })
}
