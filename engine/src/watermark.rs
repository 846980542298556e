//! The fleet's event clock: time that no one card can move.
//!
//! Records carry the clocks of devices and network elements, and those
//! are wrong now and then. When the clock was simply the latest `end`
//! seen, one card stamped a day ahead moved time for every card: the
//! others' records of the (still open) cycle were then "late" and
//! uncounted, and their cuts never came (issue #23). So a record moves
//! time only together with others: the clock is the time that a
//! **majority of the `quorum` cards furthest ahead** have all reached.
//!
//! The watermark remembers those cards (at most `quorum` of them, by their
//! latest accepted `end`) and answers the `⌊n/2⌋ + 1`-th latest of the `n`
//! remembered. With the default quorum of 16, nine cards must agree
//! before time moves; a fleet with fewer reporting cards needs a majority
//! of those (one card alone is its own majority). A card's time only ever
//! grows, so a card that left the set can come back only with a time past
//! the set's oldest, and the set is always exactly the `quorum` latest
//! cards (ties broken by ICCID).
//!
//! What a card's own record does with the card itself (a record of the
//! next cycle before the fleet got there) is the shards' business: see
//! [`crate::shard`]'s usage ahead of the clock.
//!
//! # Lanes
//!
//! Inputs may come in several independently ordered streams, *lanes*: the
//! partitions of a Kafka topic, each in its own order, interleaved however
//! the broker serves them. With one watermark over all of them, a lane
//! read ahead moved time for the others: over a backlog, one partition
//! read past a cycle boundary made the others' records of the closing
//! cycle late (issue #23, finding 3), and which records counted depended
//! on how the broker happened to serve the partitions. So each lane has a
//! watermark of its own, and the fleet's time is the **slowest active
//! lane's**: reading one lane ahead never moves time past a record
//! another lane has still to deliver. A lane that has never reported holds
//! time back (its records may be the oldest), until its source declares it
//! *idle* (read to its end and silent: [`Lanes::idle`]); its next record
//! makes it active again. When every lane is idle, everything delivered is
//! in and time is the latest lane's. A file run is one lane.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::ids::Iccid;
use crate::time::Timestamp;

/// The cards furthest ahead in event time and the time they agree on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Watermark {
    /// Up to `quorum` cards with their latest `end`, oldest first (ties:
    /// smaller ICCID first). Records mostly come in time order, so the
    /// usual change is a newest entry in at the back and the oldest out at
    /// the front: no entry moves.
    top: VecDeque<(Timestamp, Iccid)>,
}

/// One of the fleet's input streams (a Kafka partition; the file run is
/// lane 0). See the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lane(pub u32);

/// Every lane's watermark and whether it is idle: the fleet's time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Lanes {
    lanes: Vec<LaneClock>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct LaneClock {
    watermark: Watermark,
    idle: bool,
}

impl Lanes {
    /// Makes sure lanes `0..n` exist; a new lane holds time back until it
    /// reports or is declared idle.
    pub(crate) fn declare(&mut self, n: usize) {
        if self.lanes.len() < n {
            self.lanes.resize_with(n, LaneClock::default);
        }
    }

    /// Number of lanes known.
    pub(crate) fn len(&self) -> usize {
        self.lanes.len()
    }

    /// Takes card `iccid`'s accepted record ending at `end`, read from
    /// `lane`, into account ([`Watermark::observe`]). Returns the fleet's
    /// time when it may have changed (`None`: the lane's agreed time and
    /// its activity are unchanged, so the fleet's is too).
    pub(crate) fn observe(
        &mut self,
        lane: Lane,
        iccid: Iccid,
        end: Timestamp,
        quorum: usize,
    ) -> Option<Timestamp> {
        let i = lane.0 as usize;
        self.declare(i + 1);
        let clock = &mut self.lanes[i];
        let woke = std::mem::replace(&mut clock.idle, false);
        let before = clock.watermark.agreed();
        let after = clock.watermark.observe(iccid, end, quorum);
        (woke || after != before).then(|| self.agreed())
    }

    /// Makes every lane active again (a transport's start: a source idle
    /// at the last stop may have a backlog now).
    pub(crate) fn wake_all(&mut self) {
        for lane in &mut self.lanes {
            lane.idle = false;
        }
    }

    /// The time `lane`'s own cards agree on (`Timestamp::MIN` for a lane
    /// that has not reported).
    pub(crate) fn lane_time(&self, lane: Lane) -> Timestamp {
        self.lanes
            .get(lane.0 as usize)
            .map_or(Timestamp::MIN, |l| l.watermark.agreed())
    }

    /// Declares `lane` idle (its source is read to its end and silent), so
    /// it holds time back no more until it reports again. Returns the
    /// fleet's time.
    pub(crate) fn idle(&mut self, lane: Lane) -> Timestamp {
        let i = lane.0 as usize;
        self.declare(i + 1);
        self.lanes[i].idle = true;
        self.agreed()
    }

    /// The fleet's time: the slowest active lane's agreed time, or the
    /// latest lane's when every lane is idle (`Timestamp::MIN` before any).
    pub(crate) fn agreed(&self) -> Timestamp {
        let active = self.lanes.iter().filter(|l| !l.idle);
        match active.map(|l| l.watermark.agreed()).min() {
            Some(t) => t,
            None => self
                .lanes
                .iter()
                .map(|l| l.watermark.agreed())
                .max()
                .unwrap_or(Timestamp::MIN),
        }
    }
}

impl Watermark {
    /// Takes card `iccid`'s accepted record ending at `end` into account
    /// and returns the time a majority of the remembered cards have
    /// reached. While fewer than `quorum` cards have reported, a new card
    /// can lower it (it joins the majority): the engine's clock keeps the
    /// later of this and its own time.
    pub(crate) fn observe(&mut self, iccid: Iccid, end: Timestamp, quorum: usize) -> Timestamp {
        let quorum = quorum.max(1);
        let key = (end, iccid);
        match self.top.iter().rposition(|&(_, c)| c == iccid) {
            Some(i) if self.top[i].0 >= end => return self.agreed(),
            Some(i) => {
                self.top.remove(i);
            }
            None if self.top.len() >= quorum && self.top.front().is_some_and(|&f| f >= key) => {
                return self.agreed();
            }
            None => {}
        }
        let at = self.top.partition_point(|&t| t < key);
        self.top.insert(at, key);
        while self.top.len() > quorum {
            self.top.pop_front();
        }
        self.agreed()
    }

    /// The latest time a majority of the remembered cards have all reached
    /// (`Timestamp::MIN` before any record).
    pub(crate) fn agreed(&self) -> Timestamp {
        match self.top.len() {
            0 => Timestamp::MIN,
            // The (n/2 + 1)-th latest.
            n => self.top[n - 1 - n / 2].0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card(n: u64) -> Iccid {
        Iccid::parse(&format!("8986{n:016}")).unwrap()
    }

    const H: i64 = 3_600_000;

    #[test]
    fn one_card_alone_is_its_own_majority() {
        let mut w = Watermark::default();
        assert_eq!(w.observe(card(1), Timestamp(5 * H), 16), Timestamp(5 * H));
        assert_eq!(w.observe(card(1), Timestamp(7 * H), 16), Timestamp(7 * H));
    }

    #[test]
    fn one_card_ahead_of_many_moves_nothing() {
        let mut w = Watermark::default();
        for n in 0..100 {
            w.observe(card(n), Timestamp(10 * H), 16);
        }
        assert_eq!(w.observe(card(7), Timestamp(38 * H), 16), Timestamp(10 * H));
        // However often it reports, and however far ahead.
        for i in 0..1000 {
            w.observe(card(7), Timestamp(38 * H + i), 16);
        }
        assert_eq!(w.agreed(), Timestamp(10 * H));
        // Eight cards ahead are still a minority of sixteen; the ninth moves it.
        for n in 0..8 {
            w.observe(card(n), Timestamp(40 * H), 16);
        }
        assert_eq!(w.agreed(), Timestamp(10 * H));
        w.observe(card(8), Timestamp(39 * H), 16);
        assert_eq!(w.agreed(), Timestamp(39 * H));
    }

    #[test]
    fn a_card_that_fell_out_of_the_set_comes_back_with_a_later_time() {
        let mut w = Watermark::default();
        for n in 0..4 {
            w.observe(card(n), Timestamp(n as i64 * H), 2);
        }
        // Cards 3 and 2 are remembered; card 0 returns past both.
        assert_eq!(w.observe(card(0), Timestamp(10 * H), 2), Timestamp(3 * H));
        assert_eq!(w.top.len(), 2);
        assert_eq!(w.observe(card(3), Timestamp(11 * H), 2), Timestamp(10 * H));
    }

    /// The obviously correct version: every card's latest time, sorted.
    fn reference(latest: &std::collections::BTreeMap<u64, i64>, quorum: usize) -> Timestamp {
        let mut all: Vec<(i64, Iccid)> = latest.iter().map(|(&n, &t)| (t, card(n))).collect();
        all.sort_by(|a, b| b.cmp(a));
        all.truncate(quorum);
        all.get(all.len() / 2)
            .map_or(Timestamp::MIN, |&(t, _)| Timestamp(t))
    }

    proptest::proptest! {
        #[test]
        fn agrees_with_every_cards_latest_time_sorted(
            quorum in 1usize..6,
            records in proptest::collection::vec((0u64..12, 0i64..50), 0..200),
        ) {
            let mut w = Watermark::default();
            let mut latest = std::collections::BTreeMap::new();
            for (n, t) in records {
                let got = w.observe(card(n), Timestamp(t), quorum);
                let e = latest.entry(n).or_insert(t);
                *e = (*e).max(t);
                proptest::prop_assert_eq!(got, reference(&latest, quorum));
            }
        }
    }

    #[test]
    fn the_fleet_follows_its_slowest_lane() {
        let mut lanes = Lanes::default();
        lanes.declare(2);
        // Lane 1 has not reported: it holds time back.
        assert_eq!(
            lanes.observe(Lane(0), card(1), Timestamp(9 * H), 16),
            Some(Timestamp::MIN)
        );
        assert_eq!(
            lanes.observe(Lane(1), card(2), Timestamp(5 * H), 16),
            Some(Timestamp(5 * H))
        );
        // Lane 0 read far ahead moves nothing past lane 1.
        for n in 10..40 {
            lanes.observe(Lane(0), card(n), Timestamp(30 * H), 16);
        }
        assert_eq!(lanes.agreed(), Timestamp(5 * H));
        assert_eq!(
            lanes.observe(Lane(1), card(2), Timestamp(7 * H), 16),
            Some(Timestamp(7 * H))
        );
        // An unchanged lane reports no change.
        assert_eq!(lanes.observe(Lane(1), card(2), Timestamp(6 * H), 16), None);
    }

    #[test]
    fn an_idle_lane_holds_nothing_back_until_it_reports_again() {
        let mut lanes = Lanes::default();
        lanes.declare(3);
        lanes.observe(Lane(0), card(1), Timestamp(9 * H), 16);
        lanes.observe(Lane(1), card(2), Timestamp(4 * H), 16);
        assert_eq!(lanes.agreed(), Timestamp::MIN, "lane 2 never reported");
        assert_eq!(lanes.idle(Lane(2)), Timestamp(4 * H));
        assert_eq!(lanes.idle(Lane(1)), Timestamp(9 * H));
        // Lane 1 reports again: it is active and the slowest once more.
        assert_eq!(
            lanes.observe(Lane(1), card(2), Timestamp(5 * H), 16),
            Some(Timestamp(5 * H))
        );
        // Every lane idle: the latest lane's time.
        lanes.idle(Lane(0));
        assert_eq!(lanes.idle(Lane(1)), Timestamp(9 * H));
    }
}
