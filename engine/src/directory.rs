//! The card directory: ICCID -> (shard, slot), on the router.
//!
//! It holds one entry per card, so its bytes per card count directly
//! against the memory budget. A `HashMap<Iccid, Loc>` costs 32-byte buckets
//! at up to 7/8 load, ~70 bytes a card after a resize. Here the hash table
//! holds only a 4-byte index into two dense vectors (keys and locations),
//! and the vectors grow by an eighth instead of doubling: ~30 bytes a card.

use hashbrown::HashTable;

use crate::engine::Loc;
use crate::ids::Iccid;

/// ICCID -> location of the card.
#[derive(Debug, Default, Clone)]
pub(crate) struct Directory {
    table: HashTable<u32>,
    keys: Vec<Iccid>,
    locs: Vec<Loc>,
}

fn hash(iccid: Iccid) -> u64 {
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

impl Directory {
    /// An empty directory with room for `n` cards.
    pub(crate) fn with_capacity(n: usize) -> Directory {
        Directory {
            table: HashTable::with_capacity(n),
            keys: Vec::with_capacity(n),
            locs: Vec::with_capacity(n),
        }
    }

    /// Where a card lives.
    pub(crate) fn get(&self, iccid: &Iccid) -> Option<Loc> {
        self.table
            .find(hash(*iccid), |&i| self.keys[i as usize] == *iccid)
            .map(|&i| self.locs[i as usize])
    }

    /// Records (or moves) a card's location.
    pub(crate) fn insert(&mut self, iccid: Iccid, loc: Loc) {
        let h = hash(iccid);
        if let Some(&i) = self.table.find(h, |&i| self.keys[i as usize] == iccid) {
            self.locs[i as usize] = loc;
            return;
        }
        let index = self.keys.len() as u32;
        push_compact(&mut self.keys, iccid);
        push_compact(&mut self.locs, loc);
        let keys = &self.keys;
        self.table
            .insert_unique(h, index, |&i| hash(keys[i as usize]));
    }

    /// Number of cards.
    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    /// Every card and its location, in insertion order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (Iccid, Loc)> + '_ {
        self.keys.iter().copied().zip(self.locs.iter().copied())
    }

    /// Heap bytes.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.table.capacity() * 4 * 8 / 7
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
}
