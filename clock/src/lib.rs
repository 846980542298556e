//! The wall clock, in one place.
//!
//! flowcap reads the time of day for a few things only: the receive time
//! stamped on an input (it bounds how far ahead of now a record's end may
//! be), the processing time on an action event, the day a history row
//! goes to when no event time is known yet, and in notification delivery
//! the queue time of a message, a webhook's signing timestamp and a
//! `Retry-After` date. Each of those reads a [`Clock`] handed to it, so a
//! test can set the time with a [`ManualClock`] instead of waiting for it.
//!
//! The engine reads no clock at all: it gets time only from its inputs
//! (the receive stamp is part of an input), which is what makes a replay
//! produce the same outputs. Durations (timeouts, rates, elapsed seconds)
//! are measured with `std::time::Instant`, not with this.
//!
//! Passed as a parameter, not a process-wide setting: tests run in
//! parallel threads of one process and each may want its own time
//! (docs/DECISIONS.md, *Clocks*).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The time of day.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Milliseconds since the Unix epoch (UTC).
    fn now_ms(&self) -> i64;

    /// The same instant as a [`SystemTime`] (for HTTP dates).
    fn now(&self) -> SystemTime {
        match u64::try_from(self.now_ms()) {
            Ok(ms) => UNIX_EPOCH + Duration::from_millis(ms),
            Err(_) => UNIX_EPOCH - Duration::from_millis(self.now_ms().unsigned_abs()),
        }
    }
}

/// A clock to share between threads.
pub type SharedClock = Arc<dyn Clock>;

/// The operating system's clock: what a running process uses.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl SystemClock {
    /// The system clock, shared.
    pub fn shared() -> SharedClock {
        Arc::new(SystemClock)
    }
}

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            // Before 1970: only a badly set clock.
            Err(e) => i64::try_from(e.duration().as_millis()).map_or(i64::MIN, |ms| -ms),
        }
    }
}

/// A clock that stands still until told: for tests whose behaviour depends
/// on the time of day.
#[derive(Debug, Default)]
pub struct ManualClock {
    ms: AtomicI64,
}

impl ManualClock {
    /// A clock showing `ms` (Unix milliseconds), shared.
    pub fn at(ms: i64) -> Arc<ManualClock> {
        Arc::new(ManualClock {
            ms: AtomicI64::new(ms),
        })
    }

    /// Sets the time.
    pub fn set(&self, ms: i64) {
        self.ms.store(ms, Ordering::SeqCst);
    }

    /// Moves the time on by `d`.
    pub fn advance(&self, d: Duration) {
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        self.ms.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.ms.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_shows_what_it_was_set_to() {
        let clock = ManualClock::at(1_000);
        assert_eq!(clock.now_ms(), 1_000);
        clock.advance(Duration::from_millis(250));
        assert_eq!(clock.now_ms(), 1_250);
        clock.set(-5);
        assert_eq!(clock.now_ms(), -5);
        assert_eq!(clock.now(), UNIX_EPOCH - Duration::from_millis(5));
        clock.set(1_445_412_480_000);
        assert_eq!(clock.now(), UNIX_EPOCH + Duration::from_secs(1_445_412_480));
    }

    #[test]
    fn the_system_clock_agrees_with_system_time() {
        let before = SystemTime::now();
        let now = SystemClock.now();
        let after = SystemTime::now();
        // Milliseconds: `now` may be up to 1 ms before `before`.
        assert!(now + Duration::from_millis(1) >= before && now <= after);
    }
}
