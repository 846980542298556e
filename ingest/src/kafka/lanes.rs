//! Idle partitions: when a usage partition stops holding time back.
//!
//! The engine's clock follows the slowest *lane* (each usage partition is
//! one: `flowcap_engine::Lane`), so a partition read ahead of the others
//! never moves time past records they have still to deliver. A partition
//! that delivers nothing (an empty one, or a quiet producer's) would then
//! hold time back forever; the driver declares it **idle** once it is read
//! to its high watermark and has delivered nothing for the alignment's
//! `idle` time. Its next record makes it active again (the engine sees
//! that record).
//!
//! Being idle depends on wall time and on what the broker had, so the
//! declaration is an input like any other: it takes the next sequence
//! number and is written to the order log as a run of its own, of the
//! pseudo-source [`idle_source`] of the lane, before the engine sees it.
//! A replay after a crash declares the same lane idle at the same place.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Cursor;

/// Order-log sources at or above this are idle declarations of the lane in
/// the low bits, not partitions.
const IDLE_FLAG: u32 = 1 << 31;

/// The order-log source of "every lane is awake again", logged at every
/// start after the replay: a partition idle when the last run stopped may
/// have a backlog now, and must hold time back until it is read (or
/// declared idle again).
pub(super) const WAKE_SOURCE: u32 = u32::MAX;

/// Whether an order-log source is one of these inputs (an idle
/// declaration or the wake), not a partition: one input each.
pub(super) fn is_pseudo(source: u32) -> bool {
    source & IDLE_FLAG != 0
}

/// The order-log source of "lane `lane` goes idle".
pub(super) fn idle_source(lane: u32) -> u32 {
    IDLE_FLAG | lane
}

/// The lane an order-log source declares idle, if it is such a source.
pub(super) fn idle_lane(source: u32) -> Option<u32> {
    (source != WAKE_SOURCE && is_pseudo(source)).then_some(source & !IDLE_FLAG)
}

/// Which usage partitions are active and when each last delivered.
#[derive(Debug)]
pub(super) struct LaneWatch {
    idle: Duration,
    /// Per source (indexed like the driver's cursors): whether the engine
    /// takes it as active (declared idle: no).
    active: Vec<bool>,
    last_delivered: Vec<Instant>,
    /// Per source: the high watermark the lag reporter last saw
    /// (`i64::MAX` before it knows).
    highs: Arc<Vec<AtomicI64>>,
}

impl LaneWatch {
    /// Every source active as of `now`; `highs` is filled by the lag
    /// reporter.
    pub(super) fn new(
        sources: usize,
        idle: Duration,
        highs: Arc<Vec<AtomicI64>>,
        now: Instant,
    ) -> LaneWatch {
        LaneWatch {
            idle,
            active: vec![true; sources],
            last_delivered: vec![now; sources],
            highs,
        }
    }

    /// Source `i` delivered a usage record at `now` (the engine makes its
    /// lane active again).
    pub(super) fn delivered(&mut self, i: usize, now: Instant) {
        self.active[i] = true;
        self.last_delivered[i] = now;
    }

    /// Source `i`'s lane was declared idle.
    pub(super) fn declared_idle(&mut self, i: usize) {
        self.active[i] = false;
    }

    /// A usage source to declare idle now: active, read to the high
    /// watermark last seen, and silent for the idle time.
    pub(super) fn due(&self, cursors: &[Cursor], now: Instant) -> Option<usize> {
        (0..cursors.len()).find(|&i| {
            !cursors[i].commands
                && self.active[i]
                && now.saturating_duration_since(self.last_delivered[i]) >= self.idle
                && cursors[i].next >= self.highs[i].load(Ordering::Relaxed)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_sources_round_trip_and_partitions_are_not_idle_sources() {
        assert_eq!(idle_lane(idle_source(0)), Some(0));
        assert_eq!(idle_lane(idle_source(31)), Some(31));
        assert_eq!(idle_lane(0), None);
        assert_eq!(idle_lane(32), None);
        assert_eq!(idle_lane(WAKE_SOURCE), None);
        assert!(is_pseudo(WAKE_SOURCE) && is_pseudo(idle_source(2)) && !is_pseudo(5));
    }

    #[test]
    fn a_source_is_due_only_when_read_to_its_end_and_silent() {
        let t0 = Instant::now();
        let highs = Arc::new(vec![AtomicI64::new(i64::MAX), AtomicI64::new(i64::MAX)]);
        let mut cursors = vec![
            Cursor::new("commands", 0, true),
            Cursor::new("usage", 0, false),
        ];
        let mut w = LaneWatch::new(2, Duration::from_secs(2), Arc::clone(&highs), t0);
        let later = t0 + Duration::from_secs(3);
        // The high watermark is not known yet.
        assert_eq!(w.due(&cursors, later), None);
        highs[1].store(10, Ordering::Relaxed);
        highs[0].store(0, Ordering::Relaxed);
        // Messages left to read.
        assert_eq!(w.due(&cursors, later), None);
        cursors[1].advance_to(9);
        assert_eq!(w.due(&cursors, t0), None, "not silent long enough");
        assert_eq!(
            w.due(&cursors, later),
            Some(1),
            "never the commands partition"
        );
        w.declared_idle(1);
        assert_eq!(w.due(&cursors, later), None, "declared once");
        w.delivered(1, later);
        assert_eq!(w.due(&cursors, later + Duration::from_secs(2)), Some(1));
    }
}
