//! The flowcap under test as a supervised child process: spawned with the
//! phase's arguments, its stderr lines timestamped on arrival, watched
//! from outside ([`FileWatch`]), waited for with its resident memory and
//! each thread's CPU sampled, stopped with SIGTERM or `kill -9`, and never
//! left running when a report fails half-way.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use flowcap_benches::progress;
use flowcap_testkit::Broker;
use serde_json::{json, Value};

use crate::probes::{broker_pid, status_kb, thread_ticks, FileWatch, Sample, RSS_EVERY};
use crate::Args;

/// A running `flowcap run --kafka`, its stderr lines timestamped on arrival
/// (relative to the spawn).
pub(crate) struct Flowcap {
    child: Child,
    spawned: Instant,
    lines: Arc<Mutex<Vec<(Duration, String)>>>,
    stderr: Option<JoinHandle<()>>,
    stdout: Option<JoinHandle<String>>,
    watch: Option<FileWatch>,
    /// Where its `/metrics` is served.
    pub(crate) metrics: String,
}

pub(crate) struct Finished {
    pub(crate) status: ExitStatus,
    pub(crate) summary: Value,
    pub(crate) total: Duration,
    /// Peak resident memory of the process (VmHWM), KiB.
    pub(crate) peak_rss_kb: u64,
    /// Resident memory (VmRSS) every [`RSS_EVERY`]: (since the spawn, KiB).
    pub(crate) rss: Vec<(Duration, u64)>,
    /// CPU-seconds by thread name (threads of one name summed), as last
    /// read, at most [`RSS_EVERY`] before the exit.
    pub(crate) thread_cpu: BTreeMap<String, f64>,
    pub(crate) lines: Vec<(Duration, String)>,
    /// Changes of the order log and of the accounted count, with CPU times.
    files: Vec<Sample>,
}

impl Finished {
    /// Records accounted per second over `from..to`, in half-second steps:
    /// the accounted count, scaled by `records` over its growth in the
    /// window (rejects are not in it). `[[seconds since from, records/s], ...]`.
    pub(crate) fn timeline(&self, from: Duration, to: Duration, records: u64) -> Value {
        let in_window: Vec<&Sample> = self
            .files
            .iter()
            .filter(|s| s.at >= from && s.at <= to)
            .collect();
        let (Some(a), Some(b)) = (in_window.first(), in_window.last()) else {
            return json!([]);
        };
        let per_byte = records as f64 / (b.usage.saturating_sub(a.usage)).max(1) as f64;
        let step = Duration::from_millis(500);
        let mut out = Vec::new();
        let mut t = from;
        let mut prev = a.usage;
        while t < to {
            let next = t + step;
            let usage = in_window
                .iter()
                .rev()
                .find(|s| s.at <= next)
                .map_or(prev, |s| s.usage);
            let rate = (usage.saturating_sub(prev)) as f64 * per_byte / step.as_secs_f64();
            out.push(json!([(t - from).as_secs_f64(), rate.round()]));
            prev = usage;
            t = next;
        }
        json!(out)
    }

    /// From the first message the driver took (first order log growth
    /// after `after`) to the last accounted record written before
    /// `before` (last growth of the accounted count): the processing window.
    pub(crate) fn processing_window(&self, before: Duration) -> Option<(Sample, Sample)> {
        let base = self.files.first()?;
        let first = *self.files.iter().find(|s| s.order > base.order)?;
        let last = *self
            .files
            .iter()
            .filter(|s| s.at < before && s.usage > base.usage)
            .max_by_key(|s| s.at)?;
        Some((first, last))
    }

    pub(crate) fn at(&self, needle: &str) -> Option<Duration> {
        self.lines
            .iter()
            .find(|(_, l)| l.contains(needle))
            .map(|(t, _)| *t)
    }

    pub(crate) fn log_tail(&self) -> String {
        let n = self.lines.len();
        self.lines[n.saturating_sub(30)..]
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Flowcap {
    pub(crate) fn spawn(
        bin: &Path,
        broker: &Broker,
        dir: &Path,
        group: &str,
        args: &Args,
        extra: &[&str],
    ) -> Result<Flowcap> {
        let mut cmd = Command::new(bin);
        let bootstrap = broker.bootstrap();
        let metrics = free_addr()?;
        cmd.args([
            "run", "--kafka", &bootstrap, "--group", group, "-q", "--json", "--http", &metrics,
            "--out",
        ])
        .arg(dir)
        .args(extra)
        .env("FLOWCAP_LOG", "info")
        .env("NO_COLOR", "1")
        // An error's message, not its backtrace, ends the log tail.
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LIB_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        if let Some(shards) = args.shards {
            cmd.args(["--shards", &shards.to_string()]);
        }
        for property in &args.flowcap_x {
            cmd.args(["-X", property]);
        }
        cmd.args(&args.flowcap_arg);
        let spawned = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let watch = FileWatch::start(
            dir,
            metrics.clone(),
            spawned,
            child.id(),
            broker_pid(broker),
        );
        let lines: Arc<Mutex<Vec<(Duration, String)>>> = Arc::default();
        let stderr = child.stderr.take().context("stderr")?;
        let stderr = {
            let lines = lines.clone();
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let at = spawned.elapsed();
                    if let Ok(mut l) = lines.lock() {
                        l.push((at, line));
                    }
                }
            })
        };
        let mut stdout = child.stdout.take().context("stdout")?;
        let stdout = thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        Ok(Flowcap {
            child,
            spawned,
            lines,
            stderr: Some(stderr),
            stdout: Some(stdout),
            watch: Some(watch),
            metrics,
        })
    }

    pub(crate) fn at(&self, needle: &str) -> Option<Duration> {
        self.lines
            .lock()
            .ok()?
            .iter()
            .find(|(_, l)| l.contains(needle))
            .map(|(t, _)| *t)
    }

    pub(crate) fn log_tail(&self) -> String {
        self.lines.lock().map_or_else(
            |_| String::new(),
            |l| {
                l[l.len().saturating_sub(30)..]
                    .iter()
                    .map(|(_, l)| l.as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            },
        )
    }

    pub(crate) fn lines_with_times(&self) -> Vec<String> {
        self.lines.lock().map_or_else(
            |_| Vec::new(),
            |l| {
                l.iter()
                    .map(|(t, l)| format!("{:.3} {l}", t.as_secs_f64()))
                    .collect()
            },
        )
    }

    pub(crate) fn exited(&mut self) -> Result<bool> {
        Ok(self.child.try_wait()?.is_some())
    }

    /// Waits for a stderr line containing `needle`; its time since spawn.
    pub(crate) fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<Duration> {
        let bar = progress(None, &format!("flowcap: waiting for `{needle}`"));
        loop {
            if let Some(t) = self.at(needle) {
                bar.finish_and_clear();
                return Ok(t);
            }
            if self.exited()? {
                bail!("flowcap exited before `{needle}`:\n{}", self.log_tail());
            }
            if self.spawned.elapsed() > timeout {
                bail!(
                    "no `{needle}` from flowcap after {timeout:?}:\n{}",
                    self.log_tail()
                );
            }
            bar.tick();
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub(crate) fn kill9(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_none() {
            self.child.kill()?;
        }
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM: flowcap snapshots and exits.
    pub(crate) fn terminate(&self) -> Result<()> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -TERM {} failed", self.child.id());
        }
        Ok(())
    }

    pub(crate) fn wait(mut self, what: &str) -> Result<Finished> {
        let bar = progress(None, &format!("flowcap: {what}"));
        let mut peak_rss_kb = 0;
        let mut rss = Vec::new();
        let mut threads = BTreeMap::new();
        let pid = self.child.id();
        let status = loop {
            let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            // The kernel's high-water mark, read until the process is gone.
            peak_rss_kb = peak_rss_kb.max(status_kb(&status, "VmHWM:").unwrap_or(0));
            let at = self.spawned.elapsed();
            if rss.last().is_none_or(|(last, _)| at >= *last + RSS_EVERY) {
                if let Some(kb) = status_kb(&status, "VmRSS:") {
                    rss.push((at, kb));
                }
                thread_ticks(pid, &mut threads);
            }
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            bar.tick();
            thread::sleep(Duration::from_millis(10));
        };
        let total = self.spawned.elapsed();
        bar.finish_and_clear();
        let files = self.watch.take().map(FileWatch::finish).unwrap_or_default();
        if let Some(t) = self.stderr.take() {
            let _ = t.join();
        }
        let stdout = self
            .stdout
            .take()
            .map(|t| t.join().unwrap_or_default())
            .unwrap_or_default();
        let lines = std::mem::take(&mut *self.lines.lock().map_err(|_| anyhow!("poisoned"))?);
        let summary = serde_json::from_str::<Value>(&stdout)
            .map(|v| v["summary"].clone())
            .unwrap_or(Value::Null);
        let mut thread_cpu: BTreeMap<String, f64> = BTreeMap::new();
        for (name, ticks) in threads.into_values() {
            *thread_cpu.entry(name).or_default() += ticks as f64 / 100.0;
        }
        Ok(Finished {
            status,
            summary,
            total,
            peak_rss_kb,
            rss,
            thread_cpu,
            lines,
            files,
        })
    }
}

impl Drop for Flowcap {
    /// A report that fails half-way must not leave a flowcap running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `flowcap run ... --exit-when-idle SECS` to completion; fails unless it
/// succeeds.
pub(crate) fn run_to_idle(
    bin: &Path,
    broker: &Broker,
    dir: &Path,
    group: &str,
    args: &Args,
    what: &str,
) -> Result<Finished> {
    run_to_idle_with(bin, broker, dir, group, args, what, &[])
}

pub(crate) fn run_to_idle_with(
    bin: &Path,
    broker: &Broker,
    dir: &Path,
    group: &str,
    args: &Args,
    what: &str,
    extra: &[&str],
) -> Result<Finished> {
    let idle = args.idle_secs.to_string();
    let mut all = vec!["--exit-when-idle", idle.as_str()];
    all.extend_from_slice(extra);
    let fc = Flowcap::spawn(bin, broker, dir, group, args, &all)?;
    let fin = fc.wait(what)?;
    if !fin.status.success() {
        bail!("flowcap failed ({}):\n{}", fin.status, fin.log_tail());
    }
    if fin.summary["commands_failed"].as_u64().unwrap_or(0) > 0 {
        eprintln!(
            "warning: {} commands failed",
            fin.summary["commands_failed"]
        );
    }
    Ok(fin)
}

/// A free port on loopback (bound, then released for the child to take).
fn free_addr() -> Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.to_string())
}
