//! Driving flowcap processes in tests: waiting on them, killing them
//! with SIGKILL at pseudo-random points, reading how far their snapshots
//! got. Shared by the Kafka tests and the chaos suite.

use std::path::Path;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// The newest snapshot's sequence number (how far a run has durably come).
pub(crate) fn newest_snapshot(dir: &Path) -> Option<u64> {
    std::fs::read_dir(dir.join("snapshots"))
        .ok()?
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_prefix("snapshot-")?
                .strip_suffix(".bin")?
                .parse()
                .ok()
        })
        .max()
}

pub(crate) fn kill9(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A pseudo-random number in `lo..hi` (xorshift).
pub(crate) fn random(seed: &mut u64, lo: u64, hi: u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    lo + *seed % (hi - lo).max(1)
}

/// A pseudo-random delay in `lo..hi` ms.
pub(crate) fn jitter(seed: &mut u64, lo: u64, hi: u64) -> Duration {
    Duration::from_millis(random(seed, lo, hi))
}

pub(crate) fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Waits until `done` (`None`) or the child exits (`Some(status)`); kills
/// it and panics with its log tail after `limit`.
pub(crate) fn wait_for(
    child: &mut Child,
    log: &Path,
    limit: Duration,
    what: &str,
    done: impl Fn() -> bool,
) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    while !done() {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            kill9(child);
            let log = std::fs::read_to_string(log).unwrap_or_default();
            panic!("no {what} after {limit:?}:\n{}", tail(&log, 6000));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}
