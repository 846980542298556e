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
}
