//! Which usage partition the driver reads next: the one furthest behind,
//! so that all partitions advance together in time.
//!
//! Why: librdkafka hands a consumer whatever the broker fetched, and a
//! broker serving a backlog serves partitions unevenly: read in fetch
//! order, one partition ran two days ahead of the others over a 20M-record
//! backlog (docs/BENCHMARKS.md §8). The engine's clock follows the slowest
//! partition (`lanes.rs`), so that does not change what counts; but the
//! others' records fell out of the dedupe hot window (so ~98 % of them went
//! to the disk index), and a partition read ahead across a cycle boundary
//! keeps its next-cycle records aside in memory until the others get there.
//!
//! The time of a partition is the newest *message timestamp* taken from
//! it (producer or log-append time), not the records' `end`: message
//! timestamps say in which order the records would have been read live,
//! and a device with a wrong clock (an `end` up to `max_future_ms` ahead
//! is accepted) must not hold its whole partition back.
//!
//! The rules, applied before every batch ([`Alignment::plan`]):
//! - a partition is *live* while it delivered within `idle`; the slowest
//!   live partition sets the floor (a partition that has nothing to read,
//!   or whose broker does not answer, stops holding the others back after
//!   `idle`);
//! - a partition whose time is more than `skew` past the floor is *held*
//!   (not read);
//! - a partition held for `max_hold` is read anyway until it falls within
//!   the skew again, so timestamps that run ahead (a producer's clock)
//!   delay a partition by at most that, never starve it;
//! - the partition read last goes on while it is not held (runs stay long:
//!   the order log takes one entry per run), then the floor, then the
//!   others in turn.
//!
//! Pure (time comes in), so the rules are tested here without a broker.

use std::time::{Duration, Instant};

/// How partitions are kept together (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlignSettings {
    /// How far (message time) a partition may run ahead of the slowest
    /// live one before it is held.
    pub skew: Duration,
    /// A partition that delivered nothing for this long stops holding the
    /// others back.
    pub idle: Duration,
    /// A partition held this long is read anyway.
    pub max_hold: Duration,
}

impl Default for AlignSettings {
    fn default() -> Self {
        AlignSettings {
            skew: Duration::from_secs(60),
            idle: Duration::from_secs(2),
            max_hold: Duration::from_secs(10),
        }
    }
}

/// What [`Alignment::plan`] decided besides the order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Plan {
    /// Sources held back.
    pub(super) held: usize,
    /// The slowest live source (`None`: none is live).
    pub(super) floor: Option<usize>,
    /// The newest timestamp a source may deliver (the floor's time plus
    /// the skew).
    pub(super) limit: i64,
}

/// The state of the rules over a fixed set of sources (indices into the
/// driver's sources; others are never planned).
#[derive(Debug)]
pub(super) struct Alignment {
    skew_ms: i64,
    idle: Duration,
    max_hold: Duration,
    /// The aligned sources.
    members: Vec<usize>,
    /// When each source last delivered (indexed by source).
    last_taken: Vec<Instant>,
    /// Since when each source has been held (`None`: not held).
    held_since: Vec<Option<Instant>>,
    /// Whether each source may be read in the current plan.
    readable: Vec<bool>,
    /// Whether each readable source is read past the limit (held for
    /// `max_hold`).
    released: Vec<bool>,
    /// The source read last.
    current: Option<usize>,
    /// Where the turn of "the others" starts (a position in `members`).
    turn: usize,
    /// Times a source became held (for metrics).
    pub(super) holds: u64,
    /// Times a held source was read anyway after `max_hold`.
    pub(super) releases: u64,
    /// Times the floor went silent (delivered nothing for `idle`) and
    /// stopped holding the others back.
    pub(super) silences: u64,
    /// The floor of the last plan.
    last_floor: Option<usize>,
}

impl Alignment {
    /// Rules over `members` (source indices below `sources`), every one
    /// live as of `now`.
    pub(super) fn new(
        settings: AlignSettings,
        sources: usize,
        members: Vec<usize>,
        now: Instant,
    ) -> Alignment {
        debug_assert!(members.iter().all(|&i| i < sources));
        Alignment {
            skew_ms: i64::try_from(settings.skew.as_millis()).unwrap_or(i64::MAX),
            idle: settings.idle,
            max_hold: settings.max_hold,
            members,
            last_taken: vec![now; sources],
            held_since: vec![None; sources],
            readable: vec![false; sources],
            released: vec![false; sources],
            current: None,
            turn: 0,
            holds: 0,
            releases: 0,
            silences: 0,
            last_floor: None,
        }
    }

    /// Fills `order` with the sources to try, best first, given each
    /// source's time: the timestamp of its next message when it is known,
    /// else of its last one (`i64::MIN` before the first). The slowest
    /// live source is never held, so `order` is empty only without
    /// members. A source in `order` is read while its messages are within
    /// [`Alignment::limit`].
    pub(super) fn plan(
        &mut self,
        now: Instant,
        time: impl Fn(usize) -> i64,
        order: &mut Vec<usize>,
    ) -> Plan {
        order.clear();
        let floor = self
            .members
            .iter()
            .copied()
            .filter(|&i| now.saturating_duration_since(self.last_taken[i]) < self.idle)
            .min_by_key(|&i| time(i));
        if let Some(last) = self.last_floor {
            if now.saturating_duration_since(self.last_taken[last]) >= self.idle {
                self.silences += 1;
            }
        }
        self.last_floor = floor;
        let limit = floor.map_or(i64::MAX, |f| time(f).saturating_add(self.skew_ms));
        let mut held = 0;
        for &i in &self.members {
            self.released[i] = false;
            self.readable[i] = if time(i) <= limit {
                self.held_since[i] = None;
                true
            } else {
                let since = match self.held_since[i] {
                    Some(since) => since,
                    None => {
                        self.holds += 1;
                        *self.held_since[i].insert(now)
                    }
                };
                let released = now.saturating_duration_since(since) >= self.max_hold;
                // Counted when it turns readable (it was held before).
                if released && !self.readable[i] {
                    self.releases += 1;
                }
                held += usize::from(!released);
                self.released[i] = released;
                released
            };
        }
        let current = self.current.filter(|&c| self.readable[c]);
        order.extend(current);
        let second = floor.filter(|&f| Some(f) != current);
        order.extend(second);
        let n = self.members.len();
        for k in 0..n {
            let i = self.members[(self.turn + k) % n];
            if self.readable[i] && Some(i) != current && Some(i) != second {
                order.push(i);
            }
        }
        Plan { held, floor, limit }
    }

    /// The newest message timestamp source `i` may deliver under `plan`.
    pub(super) fn limit(&self, plan: &Plan, i: usize) -> i64 {
        if self.released[i] {
            i64::MAX
        } else {
            plan.limit
        }
    }

    /// Records that `source` delivered at `now`.
    pub(super) fn taken(&mut self, source: usize, now: Instant) {
        self.last_taken[source] = now;
        if self.current != Some(source) {
            self.current = Some(source);
            if let Some(at) = self.members.iter().position(|&i| i == source) {
                self.turn = at + 1;
            }
        }
    }

    /// After every partition was paused (nothing could deliver), all are
    /// live again and none is held.
    pub(super) fn restart(&mut self, now: Instant) {
        self.last_taken.fill(now);
        self.held_since.fill(None);
        self.last_floor = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    fn settings() -> AlignSettings {
        AlignSettings {
            skew: Duration::from_secs(60),
            idle: Duration::from_millis(200),
            max_hold: Duration::from_secs(10),
        }
    }

    fn plan(a: &mut Alignment, now: Instant, times: &[i64]) -> (Vec<usize>, usize) {
        let mut order = Vec::new();
        let plan = a.plan(now, |i| times[i], &mut order);
        (order, plan.held)
    }

    #[test]
    fn the_slowest_comes_first_and_those_past_the_skew_wait() {
        let t0 = Instant::now();
        // Source 0 is the commands partition: never planned.
        let mut a = Alignment::new(settings(), 4, vec![1, 2, 3], t0);
        let times = [0, 10 * MIN, 5 * MIN, 5 * MIN + MIN / 2];
        let (order, held) = plan(&mut a, t0, &times);
        assert_eq!(order, vec![2, 3]);
        assert_eq!(held, 1);
        assert_eq!(a.holds, 1);
        let p = a.plan(t0, |i| times[i], &mut Vec::new());
        assert_eq!((p.floor, p.limit), (Some(2), 6 * MIN));
        assert_eq!(a.limit(&p, 3), 6 * MIN);
        // Held once, counted once.
        plan(&mut a, t0 + Duration::from_millis(1), &times);
        assert_eq!(a.holds, 1);
    }

    #[test]
    fn before_its_first_timestamp_a_source_holds_every_other_back() {
        let t0 = Instant::now();
        let mut a = Alignment::new(settings(), 3, vec![0, 1, 2], t0);
        let (order, held) = plan(&mut a, t0, &[i64::MIN, 3 * MIN, i64::MIN]);
        assert_eq!(order, vec![0, 2]);
        assert_eq!(held, 1);
    }

    #[test]
    fn the_source_read_last_goes_on_while_within_the_skew() {
        let t0 = Instant::now();
        let mut a = Alignment::new(settings(), 3, vec![0, 1, 2], t0);
        a.taken(2, t0);
        let (order, _) = plan(&mut a, t0, &[MIN, MIN / 2, MIN + MIN / 2]);
        assert_eq!(order, vec![2, 1, 0]);
        // Past the skew it is held, and the slowest leads.
        let (order, held) = plan(&mut a, t0, &[MIN, MIN / 2, 2 * MIN]);
        assert_eq!(order, vec![1, 0]);
        assert_eq!(held, 1);
    }

    #[test]
    fn others_take_turns_after_the_current_and_the_floor() {
        let t0 = Instant::now();
        let mut a = Alignment::new(settings(), 5, vec![0, 1, 2, 3, 4], t0);
        a.taken(1, t0);
        let (order, _) = plan(&mut a, t0, &[5, 5, 5, 5, 0]);
        assert_eq!(order, vec![1, 4, 2, 3, 0]);
        a.taken(2, t0);
        let (order, _) = plan(&mut a, t0, &[5, 5, 5, 5, 0]);
        assert_eq!(order, vec![2, 4, 3, 0, 1]);
    }

    #[test]
    fn a_silent_source_stops_holding_the_others_back_after_idle() {
        let t0 = Instant::now();
        let mut a = Alignment::new(settings(), 2, vec![0, 1], t0);
        let times = [0, 10 * MIN];
        a.taken(1, t0);
        assert_eq!(
            plan(&mut a, t0 + Duration::from_millis(100), &times).0,
            vec![0]
        );
        // Source 1 keeps being live only if it delivers; source 0 stays silent.
        a.taken(1, t0 + Duration::from_millis(150));
        let (order, held) = plan(&mut a, t0 + Duration::from_millis(250), &times);
        assert_eq!(order, vec![1, 0]);
        assert_eq!(held, 0);
        assert_eq!(a.silences, 1);
        plan(&mut a, t0 + Duration::from_millis(260), &times);
        assert_eq!(a.silences, 1, "counted once");
        // Once it delivers again it is live and holds source 1 back.
        a.taken(0, t0 + Duration::from_millis(300));
        let (order, held) = plan(&mut a, t0 + Duration::from_millis(300), &times);
        assert_eq!((order, held), (vec![0], 1));
    }

    #[test]
    fn a_source_held_too_long_is_read_until_it_is_within_the_skew() {
        let t0 = Instant::now();
        let mut a = Alignment::new(settings(), 2, vec![0, 1], t0);
        let ahead = [0, 10 * MIN];
        let mut now = t0;
        // Source 0 stays live (it delivers) and behind.
        for _ in 0..100 {
            a.taken(0, now);
            let (order, held) = plan(&mut a, now, &ahead);
            assert_eq!((order, held), (vec![0], 1), "{now:?}");
            now += Duration::from_millis(99);
        }
        now = t0 + Duration::from_secs(10);
        a.taken(0, now);
        let (order, held) = plan(&mut a, now, &ahead);
        assert_eq!((order, held), (vec![0, 1], 0));
        assert_eq!(a.releases, 1);
        let p = a.plan(now, |i| ahead[i], &mut Vec::new());
        assert_eq!((p.floor, p.limit), (Some(0), MIN));
        assert_eq!((a.limit(&p, 0), a.limit(&p, 1)), (MIN, i64::MAX));
        // Released: read while ahead, without counting again.
        a.taken(1, now);
        assert_eq!(plan(&mut a, now, &ahead).0, vec![1, 0]);
        assert_eq!(a.releases, 1);
        // Back within the skew, the clock starts over.
        plan(&mut a, now, &[0, MIN]);
        let (_, held) = plan(&mut a, now, &ahead);
        assert_eq!(held, 1);
        assert_eq!(a.holds, 2);
    }

    #[test]
    fn a_restart_after_a_pause_makes_every_source_live_and_unheld() {
        let t0 = Instant::now();
        let mut a = Alignment::new(settings(), 2, vec![0, 1], t0);
        let late = t0 + Duration::from_secs(5);
        let (order, held) = plan(&mut a, late, &[0, 10 * MIN]);
        assert_eq!((order, held), (vec![0, 1], 0), "neither is live");
        a.restart(late);
        assert_eq!(plan(&mut a, late, &[0, 10 * MIN]), (vec![0], 1));
    }

    #[test]
    fn without_members_nothing_is_planned() {
        let t0 = Instant::now();
        let mut a = Alignment::new(settings(), 1, vec![], t0);
        assert_eq!(plan(&mut a, t0, &[0]), (vec![], 0));
    }
}
