//! The card directory: ICCID -> (shard, slot), on the router.
//!
//! It holds one entry per card, so its bytes per card count directly
//! against the memory budget. A `HashMap<Iccid, Loc>` costs 32-byte buckets
//! at up to 7/8 load, ~70 bytes a card after a resize. Here an
//! open-addressing table of 8-byte slots (32 bits of the hash and an index,
//! at most 7/8 full) points into two dense vectors (keys and locations),
//! and the vectors grow by an eighth instead of doubling: ~35-40 bytes a
//! card (a `hashbrown` table of 4-byte indexes was ~5 bytes less).
//!
//! The table is our own (linear probing, no deletions: cards are never
//! removed) rather than `hashbrown`'s so the router can prefetch it for a
//! batch of records: load every record's slot first, then every key and
//! location, so the cache misses of a batch overlap instead of being paid
//! one dependent chain per record ([`Directory::prefetch_slot`]; BENCHMARKS
//! §8).

use crate::engine::Loc;
use crate::ids::Iccid;

/// ICCID -> location of the card.
#[derive(Debug, Default, Clone)]
pub(crate) struct Directory {
    /// A power of two long (or empty); a slot is 0 (free) or
    /// `hash >> 32 << 32 | (index + 1)`. At most 7/8 full: linear probing
    /// then scans ~4.5 slots for a card it finds (one or two cache lines;
    /// the hash bits spare a key comparison per slot) and ~30 for one it
    /// does not (an unknown card, rare).
    slots: Vec<u64>,
    keys: Vec<Iccid>,
    locs: Vec<Loc>,
}

/// The directory's hash of a card.
pub(crate) fn hash(iccid: Iccid) -> u64 {
    iccid.stable_hash()
}

/// Appends to a vector that grows by an eighth (at least 1,024 elements)
/// instead of doubling: large vectors of small records would otherwise
/// waste up to half their memory.
pub(crate) fn push_compact<T>(vec: &mut Vec<T>, value: T) {
    if vec.len() == vec.capacity() {
        vec.reserve_exact((vec.len() / 8).max(1024));
    }
    vec.push(value);
}

const MIN_SLOTS: usize = 64;

/// Slots for `n` cards at most 7/8 full.
fn slots_for(n: usize) -> usize {
    (n.saturating_mul(8) / 7 + 1)
        .next_power_of_two()
        .max(MIN_SLOTS)
}

fn tag(h: u64) -> u64 {
    h & !0xffff_ffff
}

impl Directory {
    /// An empty directory with room for `n` cards.
    pub(crate) fn with_capacity(n: usize) -> Directory {
        Directory {
            slots: vec![0; slots_for(n)],
            keys: Vec::with_capacity(n),
            locs: Vec::with_capacity(n),
        }
    }

    /// Where a card lives.
    pub(crate) fn get(&self, iccid: &Iccid) -> Option<Loc> {
        self.find(hash(*iccid), iccid).map(|i| self.locs[i])
    }

    /// Loads the slot a lookup of hash `h` starts at and returns it (the
    /// caller keeps the value so the load is not optimised away).
    pub(crate) fn prefetch_slot(&self, h: u64) -> u64 {
        match self.slots.len() {
            0 => 0,
            n => self.slots[h as usize & (n - 1)],
        }
    }

    /// Index of the card in `keys`.
    fn find(&self, h: u64, iccid: &Iccid) -> Option<usize> {
        let mask = self.slots.len().checked_sub(1)?;
        let mut at = h as usize & mask;
        loop {
            let slot = self.slots[at];
            if slot == 0 {
                return None;
            }
            if tag(slot) == tag(h) {
                let i = (slot as u32 - 1) as usize;
                if self.keys[i] == *iccid {
                    return Some(i);
                }
            }
            at = (at + 1) & mask;
        }
    }

    /// Records (or moves) a card's location.
    pub(crate) fn insert(&mut self, iccid: Iccid, loc: Loc) {
        let h = hash(iccid);
        if let Some(i) = self.find(h, &iccid) {
            self.locs[i] = loc;
            return;
        }
        let index = self.keys.len();
        // Slots hold `index + 1` in 32 bits.
        assert!(index < u32::MAX as usize, "more than 2^32 - 1 cards");
        push_compact(&mut self.keys, iccid);
        push_compact(&mut self.locs, loc);
        if self.slots.len() < slots_for(self.keys.len()) {
            self.rehash(slots_for(self.keys.len()).max(self.slots.len() * 2));
        } else {
            self.place(h, index);
        }
    }

    fn place(&mut self, h: u64, index: usize) {
        let mask = self.slots.len() - 1;
        let mut at = h as usize & mask;
        while self.slots[at] != 0 {
            at = (at + 1) & mask;
        }
        self.slots[at] = tag(h) | (index as u64 + 1);
    }

    fn rehash(&mut self, slots: usize) {
        self.slots = vec![0; slots];
        for index in 0..self.keys.len() {
            self.place(hash(self.keys[index]), index);
        }
    }

    /// Number of cards.
    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    /// Every card and its location, in insertion order.
    #[cfg(test)]
    pub(crate) fn iter(&self) -> impl Iterator<Item = (Iccid, Loc)> + '_ {
        self.keys.iter().copied().zip(self.locs.iter().copied())
    }

    /// Heap bytes.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.slots.capacity() * 8
            + self.keys.capacity() * std::mem::size_of::<Iccid>()
            + self.locs.capacity() * std::mem::size_of::<Loc>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_get_move() {
        let mut d = Directory::default();
        let id = |n: u64| Iccid::parse(&format!("8986{n:016}")).unwrap();
        for n in 0..5000 {
            d.insert(
                id(n),
                Loc {
                    shard: (n % 3) as u32,
                    slot: n as u32,
                },
            );
        }
        d.insert(id(7), Loc { shard: 9, slot: 1 });
        assert_eq!(d.len(), 5000);
        assert_eq!(d.get(&id(7)), Some(Loc { shard: 9, slot: 1 }));
        assert_eq!(
            d.get(&id(4999)),
            Some(Loc {
                shard: 4999 % 3,
                slot: 4999
            })
        );
        assert_eq!(d.get(&id(5000)), None);
        assert_eq!(d.iter().count(), 5000);
    }

    #[test]
    fn empty_directory_finds_nothing() {
        let d = Directory::default();
        let iccid = Iccid::parse("89860000000000000001").unwrap();
        assert_eq!(d.get(&iccid), None);
        assert_eq!(d.prefetch_slot(hash(iccid)), 0);
        assert_eq!(Directory::with_capacity(0).get(&iccid), None);
    }

    proptest::proptest! {
        /// Same answers as a `HashMap`, whatever the inserts and moves
        /// (few distinct cards: many moves; a small table: many rehashes
        /// and long probe runs).
        #[test]
        fn agrees_with_a_hash_map(
            ops in proptest::collection::vec((0u64..3000, 0u32..8), 0..2000),
            capacity in 0usize..100,
        ) {
            let id = |n: u64| Iccid::parse(&format!("8986{n:016}")).unwrap();
            let mut d = Directory::with_capacity(capacity);
            let mut reference = std::collections::HashMap::new();
            for (n, shard) in ops {
                let loc = Loc { shard, slot: n as u32 };
                d.insert(id(n), loc);
                reference.insert(n, loc);
            }
            proptest::prop_assert_eq!(d.len(), reference.len());
            for n in 0..3100 {
                proptest::prop_assert_eq!(d.get(&id(n)), reference.get(&n).copied());
            }
            let listed: std::collections::HashMap<Iccid, Loc> = d.iter().collect();
            proptest::prop_assert_eq!(listed.len(), reference.len());
        }
    }
}
