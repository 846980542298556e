//! Threads that do a pipeline's deferred work at a lower CPU priority.
//!
//! Some work only has to be done *eventually*, before a snapshot is
//! committed: encoding history chunks, writing dedupe segments and
//! merging them, encoding and writing engine snapshots, compacting
//! history files. On two cores shared with the broker, that work arriving
//! all at once at a snapshot took the CPU from the threads every record
//! passes through (driver, shards, writer), and the actions of records
//! that arrived meanwhile waited: the latency spiked for a second around
//! each snapshot although the inputs were held for only ~0.1 s.
//!
//! So these threads run at nice [`BACKGROUND_NICE`]: the scheduler gives
//! the record path the CPU first, and the deferred work takes whatever is
//! left (on a saturated machine it still progresses: the writer waits for
//! a history chunk when two are outstanding, and a snapshot's commit
//! waits for its files, so the record path makes room by itself). Raising
//! a thread's nice value needs no privilege; where it fails the thread
//! runs at normal priority and a debug line says why.
//!
//! Compaction goes further ([`spawn_when_idle`]): no commit waits for a
//! merge, so it runs under `SCHED_IDLE` and takes only CPU nothing else
//! wants. Under a backlog it waits for the backlog, then catches up.

use std::io;
use std::sync::OnceLock;
use std::thread::JoinHandle;

use thread_priority::{ThreadPriority, ThreadPriorityValue};

/// The nice value deferred work runs at by default (0 is normal, 19 the
/// lowest).
pub const BACKGROUND_NICE: i32 = 10;

/// The environment variable that overrides [`BACKGROUND_NICE`] (0 to 19;
/// 0 runs deferred work at normal priority).
pub const BACKGROUND_NICE_ENV: &str = "FLOWCAP_BACKGROUND_NICE";

/// The nice value in force: [`BACKGROUND_NICE_ENV`] when set to 0..=19,
/// else [`BACKGROUND_NICE`]. Read once per process.
pub fn background_nice() -> i32 {
    static NICE: OnceLock<i32> = OnceLock::new();
    *NICE.get_or_init(|| {
        std::env::var(BACKGROUND_NICE_ENV)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .filter(|n| (0..=19).contains(n))
            .unwrap_or(BACKGROUND_NICE)
    })
}

/// Spawns a named thread that runs `work` at nice [`background_nice`].
pub fn spawn<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> io::Result<JoinHandle<T>> {
    spawn_lowered(name, lower_priority, work)
}

/// Spawns a named thread that runs `work` only on CPU nothing else wants:
/// `SCHED_IDLE` on Linux (elsewhere, or where that fails, nice
/// [`background_nice`]). For work that may wait out a backlog: nothing
/// on the record path or a commit waits for it. With
/// [`BACKGROUND_NICE_ENV`]` = 0` it runs at normal priority like the rest.
pub fn spawn_when_idle<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> io::Result<JoinHandle<T>> {
    let lower = || {
        if background_nice() != 0 && !idle_policy() {
            lower_priority();
        }
    };
    spawn_lowered(name, lower, work)
}

/// A named thread that calls `lower` (its own priority) and then `work`.
fn spawn_lowered<T: Send + 'static>(
    name: &str,
    lower: fn(),
    work: impl FnOnce() -> T + Send + 'static,
) -> io::Result<JoinHandle<T>> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            lower();
            work()
        })
}

/// Puts the calling thread under `SCHED_IDLE`; false where it cannot.
fn idle_policy() -> bool {
    #[cfg(target_os = "linux")]
    {
        use thread_priority::{
            set_thread_priority_and_policy, thread_native_id, NormalThreadSchedulePolicy,
            ThreadSchedulePolicy,
        };
        match set_thread_priority_and_policy(
            thread_native_id(),
            ThreadPriority::Min,
            ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle),
        ) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = ?e, "no SCHED_IDLE: the thread runs at the background nice");
                false
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    false
}

/// Lowers the calling thread's priority to nice [`background_nice`].
fn lower_priority() {
    let nice = background_nice();
    if nice == 0 {
        return;
    }
    // thread-priority maps 0..=99 linearly onto nice 19..=-20.
    let level = (19 - nice) * 99 / 39;
    let priority = ThreadPriorityValue::try_from(level as u8)
        .map(ThreadPriority::Crossplatform)
        .unwrap_or(ThreadPriority::Min);
    if let Err(e) = thread_priority::set_current_thread_priority(priority) {
        tracing::debug!(error = ?e, "background thread keeps normal priority");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Field `field` (1-based, as in proc(5)) of the calling thread's
    /// `/proc/thread-self/stat` (Linux), from field 3 on.
    fn thread_stat<T: std::str::FromStr>(field: usize) -> Option<T> {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
        // Fields 3 on follow the command (which may hold spaces) in
        // parentheses.
        let rest = &stat[stat.rfind(')')? + 2..];
        rest.split(' ').nth(field.checked_sub(3)?)?.parse().ok()
    }

    /// The thread's nice value (field 19).
    fn nice_of_current_thread() -> Option<i32> {
        thread_stat(19)
    }

    /// The thread's scheduling policy (field 41).
    fn policy_of_current_thread() -> Option<u32> {
        thread_stat(41)
    }

    #[test]
    fn work_that_waits_for_idle_cpu_runs_under_sched_idle() {
        let Some(normal) = policy_of_current_thread() else {
            return; // not Linux
        };
        assert_eq!(normal, 0, "the test thread runs under SCHED_OTHER");
        let policy = spawn_when_idle("test-idle", policy_of_current_thread)
            .unwrap()
            .join()
            .unwrap()
            .unwrap();
        const SCHED_IDLE: u32 = 5;
        if background_nice() == 0 {
            assert_eq!(policy, 0, "switched off: normal priority");
        } else {
            assert_eq!(policy, SCHED_IDLE);
        }
        assert_eq!(policy_of_current_thread(), Some(normal));
    }

    #[test]
    fn background_threads_run_at_a_lower_priority() {
        let Some(normal) = nice_of_current_thread() else {
            return; // not Linux
        };
        if background_nice() == 0 {
            return; // switched off in this environment
        }
        let nice = spawn("test-background", nice_of_current_thread)
            .unwrap()
            .join()
            .unwrap()
            .unwrap();
        assert!(nice > normal, "background nice {nice}, normal {normal}");
        let want = background_nice();
        assert!((want - 1..=want + 1).contains(&(nice - normal)) || nice == 19);
        // The spawning thread is untouched.
        assert_eq!(nice_of_current_thread(), Some(normal));
    }
}
