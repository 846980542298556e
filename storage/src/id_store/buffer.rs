//! The id store's buffer of ids not yet in a segment.

use flowcap_engine::RecordId;

use super::segment::Entry;

/// Ids not yet in a segment: entries in arrival order, indexed by their
/// fingerprint (the index's hash: it is already xxh3). Both keep their
/// capacity across flushes: the buffer is filled and emptied every
/// `flush_entries` ids, and a `HashMap<(Iccid, RecordId), _>` that grew
/// from empty each time (SipHash over the 65-byte record id, rehash copies,
/// fresh pages zeroed by the kernel) was a fifth of the Kafka driver's
/// time.
///
/// The index is sized for `flush_entries` ids up front (at most
/// [`PRESIZED_INDEX`], ~10 MB): growing it from empty rehashed it ~20
/// times in a run's first buffers, 4 % of the Kafka driver's time. The
/// entries still grow as they come (their pages are what a fresh
/// buffer costs).
#[derive(Debug)]
pub(super) struct Buffer {
    pub(super) entries: Vec<Entry>,
    pub(super) index: hashbrown::HashTable<u32>,
}

/// The most ids a fresh buffer's index has room for.
pub(super) const PRESIZED_INDEX: usize = 1 << 20;

impl Buffer {
    pub(super) fn for_ids(flush_entries: usize) -> Buffer {
        Buffer {
            entries: Vec::new(),
            index: hashbrown::HashTable::with_capacity(flush_entries.min(PRESIZED_INDEX)),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub(super) fn find(&self, fp: u64, iccid: u128, record_id: &RecordId) -> Option<usize> {
        let entries = &self.entries;
        self.index
            .find(fp, |&i| {
                let e = &entries[i as usize];
                e.iccid == iccid && e.record_id == *record_id
            })
            .map(|&i| i as usize)
    }

    /// Adds `entry`; an id already buffered keeps the smaller sequence.
    pub(super) fn insert(&mut self, entry: Entry) {
        match self.find(entry.fp, entry.iccid, &entry.record_id) {
            Some(i) => self.entries[i].seq = self.entries[i].seq.min(entry.seq),
            None => {
                let Buffer { entries, index } = self;
                // `flush_entries` is at most `u32::MAX` (`open_with`).
                let i = entries.len() as u32;
                entries.push(entry);
                index.insert_unique(entry.fp, i, |&j| entries[j as usize].fp);
            }
        }
    }

    pub(super) fn clear(&mut self) {
        self.entries.clear();
        self.index.clear();
    }

    /// Keeps the entries `keep` accepts (the index is rebuilt).
    pub(super) fn retain(&mut self, keep: impl Fn(&Entry) -> bool) {
        self.entries.retain(keep);
        self.index.clear();
        let Buffer { entries, index } = self;
        for (i, e) in entries.iter().enumerate() {
            index.insert_unique(e.fp, i as u32, |&j| entries[j as usize].fp);
        }
    }
}
