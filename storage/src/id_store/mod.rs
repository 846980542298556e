//! The dedupe id store on disk ([`DiskIdStore`]): every accepted
//! `(iccid, record_id)`.
//!
//! The engine's hot window only holds fingerprints, and only for recent
//! event time; this store is what makes dedupe exact (see
//! `flowcap_engine::dedupe`): fingerprint hits and late records are checked
//! here against full keys.
//!
//! Layout: new ids collect in an in-memory buffer and are flushed to
//! immutable *segment* files (`seg-<id>.fcid`), written atomically (temp
//! file, fsync, rename, fsync of the directory). A segment is sorted by
//! `(fingerprint, iccid, record_id)` and cut into 4 KiB blocks, each with a
//! CRC; its footer holds the first fingerprint of every block (the sparse
//! index), the min/max input sequence of its entries, and a bloom filter.
//! All of that is loaded into memory at open, so `contains` costs, per
//! segment, a bloom probe and at most one block read (two when equal
//! fingerprints straddle a block boundary). The bloom filter only skips
//! reads; answers are decided by comparing full keys.
//!
//! Flushes and merges happen on background threads (`flowcap-dedupe`),
//! one flush and one merge at a time: the full buffer is *sealed* (it
//! keeps answering lookups, read-only, behind an `Arc`) and a fresh one
//! takes new ids while the flush sorts the sealed one and writes it as a
//! segment; once there are too many segments, a merge of the smallest
//! ones starts on its own, so a seal never waits for a merge. A
//! snapshot's cut used to do all of that on the driver (up to a million
//! ids sorted, written and fsynced, and now and then a merge of several
//! segments), holding every input for the while; now the cut only seals,
//! and the snapshot's commit waits for the [`Durability`] of the sealed
//! ids.
//!
//! Crash consistency with engine snapshots: every entry carries the input
//! sequence number of its record. Before a snapshot at `S` is published the
//! engine calls [`DiskIdStore::durable_through`]`(S)`; on restore from it,
//! [`DiskIdStore::truncate_after`]`(S)` deletes or rewrites segments so that
//! entries after `S` (records that will be replayed) are gone. Truncation is
//! idempotent, so a crash in the middle of it is repaired by the next
//! restore doing it again.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use flowcap_engine::dedupe::{fingerprint, Durability, IdStore, IdStoreError};
use flowcap_engine::{Iccid, RecordId, Timestamp};

mod buffer;
mod segment;

use buffer::Buffer;
use segment::*;

/// Tuning of a [`DiskIdStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskIdStoreOptions {
    /// Buffered ids that trigger a flush to a new segment.
    pub flush_entries: usize,
    /// Bloom filter bits per id (0 disables the filters).
    pub bloom_bits_per_key: u32,
    /// Segment count above which the smallest segments are merged.
    pub max_segments: usize,
}

impl Default for DiskIdStoreOptions {
    fn default() -> Self {
        DiskIdStoreOptions {
            flush_entries: 1 << 20,
            bloom_bits_per_key: 10,
            max_segments: 16,
        }
    }
}

/// An exact, disk-backed [`IdStore`]. See the module docs.
#[derive(Debug)]
pub struct DiskIdStore {
    dir: PathBuf,
    options: DiskIdStoreOptions,
    buffer: Buffer,
    buffer_min_seq: u64,
    /// The previous buffer while the background flush writes it.
    sealed: Option<Sealed>,
    /// The background merge of the smallest segments, if one runs.
    merging: Option<JoinHandle<Result<Option<Merged>, IdStoreError>>>,
    /// A written buffer's allocation, kept for the next seal.
    spare: Option<Buffer>,
    segments: Vec<Arc<Segment>>,
    next_id: u64,
    block: Box<[u8; BLOCK]>,
    scratch: VecDeque<Entry>,
}

/// A sealed buffer and the background flush writing it.
#[derive(Debug)]
struct Sealed {
    buffer: Arc<Buffer>,
    durable: Durability,
    /// Answers the sealed buffer's segment (none when it held no entry).
    job: JoinHandle<Result<Option<Segment>, IdStoreError>>,
}

impl DiskIdStore {
    /// Opens (creating if needed) the store in `dir` with default options.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, IdStoreError> {
        Self::open_with(dir, DiskIdStoreOptions::default())
    }

    /// Opens (creating if needed) the store in `dir`. Leftover temp files
    /// of interrupted writes are deleted; a damaged segment is an error.
    pub fn open_with(
        dir: impl AsRef<Path>,
        options: DiskIdStoreOptions,
    ) -> Result<Self, IdStoreError> {
        let dir = dir.as_ref().to_owned();
        fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let mut segments = Vec::new();
        let listing = fs::read_dir(&dir).map_err(io(format!("listing {}", dir.display())))?;
        for item in listing {
            let path = item.map_err(io("listing the store"))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with("seg-") && name.ends_with(".tmp") {
                fs::remove_file(&path).map_err(io("removing a temp segment"))?;
            } else if let Some(hex) = name
                .strip_prefix("seg-")
                .and_then(|n| n.strip_suffix(".fcid"))
            {
                let id = u64::from_str_radix(hex, 16)
                    .map_err(|_| corrupt(format!("unexpected file {name}")))?;
                segments.push(Segment::open(&path, id)?);
            }
        }
        segments.sort_by_key(|s| s.id);
        let next_id = segments.last().map_or(0, |s| s.id + 1);
        let flush_entries = options.flush_entries.clamp(1, u32::MAX as usize);
        Ok(DiskIdStore {
            dir,
            options: DiskIdStoreOptions {
                flush_entries,
                max_segments: options.max_segments.max(2),
                ..options
            },
            buffer: Buffer::for_ids(flush_entries),
            buffer_min_seq: u64::MAX,
            sealed: None,
            merging: None,
            spare: None,
            segments: segments.into_iter().map(Arc::new).collect(),
            next_id,
            block: Box::new([0u8; BLOCK]),
            scratch: VecDeque::new(),
        })
    }

    /// Ids held (buffered plus on disk; an id present in two segments is
    /// counted twice).
    pub fn len(&self) -> u64 {
        let sealed = self.sealed.as_ref().map_or(0, |s| s.buffer.len());
        (self.buffer.len() + sealed) as u64 + self.segments.iter().map(|s| s.count).sum::<u64>()
    }

    /// Whether the store holds no id.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of segment files.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Bytes of memory held by the segments' in-memory indexes and blooms.
    pub fn index_bytes(&self) -> usize {
        self.segments
            .iter()
            .map(|s| (s.first_fps.len() + s.bloom.words.len()) * 8)
            .sum()
    }

    /// Writes the buffer to a new segment (durably), then merges segments
    /// if there are too many; waits for both.
    pub fn flush(&mut self) -> Result<(), IdStoreError> {
        self.seal()?;
        self.settle()
    }

    /// Makes every entry with sequence <= `seq` durable (flushes the
    /// buffer if it holds any) and waits for the background job. Call
    /// before publishing an engine snapshot taken at `seq`.
    pub fn durable_through(&mut self, seq: u64) -> Result<(), IdStoreError> {
        self.durable_through_later(seq)?;
        self.settle()
    }

    /// Like [`DiskIdStore::durable_through`], but returns once the buffer
    /// is sealed: the [`Durability`] settles when its segment is on disk.
    pub fn durable_through_later(&mut self, seq: u64) -> Result<Durability, IdStoreError> {
        if self.buffer_min_seq <= seq {
            self.seal()?;
        }
        // A sealed buffer may hold entries <= seq: its job must finish.
        Ok(self
            .sealed
            .as_ref()
            .map_or_else(Durability::settled, |s| s.durable.clone()))
    }

    /// Hands the buffer to a background flush (after the previous flush is
    /// taken in) and starts a fresh one.
    fn seal(&mut self) -> Result<(), IdStoreError> {
        self.settle_flush()?;
        if self.buffer.is_empty() {
            return Ok(());
        }
        let fresh = self
            .spare
            .take()
            .unwrap_or_else(|| Buffer::for_ids(self.options.flush_entries));
        let buffer = Arc::new(std::mem::replace(&mut self.buffer, fresh));
        self.buffer_min_seq = u64::MAX;
        let (durable, settler) = Durability::pending();
        let (dir, id, bits) = (
            self.dir.clone(),
            self.take_id(),
            self.options.bloom_bits_per_key,
        );
        let sealed = Arc::clone(&buffer);
        let job = crate::background::spawn("flowcap-dedupe", move || {
            let written = write_sorted(&dir, id, &sealed, bits).map_err(Arc::new);
            // The store takes the buffer's allocation back once this
            // is gone.
            drop(sealed);
            settler.settle(written.as_ref().map(|_| ()).map_err(Arc::clone));
            written.map_err(IdStoreError::Background)
        })
        .map_err(io("starting the id store's background writer"))?;
        self.sealed = Some(Sealed {
            buffer,
            durable,
            job,
        });
        Ok(())
    }

    /// Takes in whatever background job has finished; never waits.
    fn poll(&mut self) -> Result<(), IdStoreError> {
        if self.sealed.as_ref().is_some_and(|s| s.job.is_finished()) {
            self.settle_flush()?;
        }
        if self.merging.as_ref().is_some_and(|m| m.is_finished()) {
            self.settle_merge()?;
        }
        Ok(())
    }

    /// Waits for every background job and takes them in (taking one in
    /// may start a merge: until none is left).
    fn settle(&mut self) -> Result<(), IdStoreError> {
        while self.sealed.is_some() || self.merging.is_some() {
            self.settle_flush()?;
            self.settle_merge()?;
        }
        Ok(())
    }

    /// Waits for the flush (if any) and takes its segment in; starts a
    /// merge when there are too many segments and none runs.
    fn settle_flush(&mut self) -> Result<(), IdStoreError> {
        let Some(sealed) = self.sealed.take() else {
            return Ok(());
        };
        let flushed = sealed
            .job
            .join()
            .map_err(|_| IdStoreError::Stopped("background writer"))??;
        if let Ok(mut buffer) = Arc::try_unwrap(sealed.buffer) {
            buffer.clear();
            self.spare = Some(buffer);
        }
        self.segments.extend(flushed.map(Arc::new));
        self.segments.sort_by_key(|s| s.id);
        self.maybe_merge()
    }

    /// Starts merging the smallest segments when there are too many and
    /// no merge runs.
    fn maybe_merge(&mut self) -> Result<(), IdStoreError> {
        if self.merging.is_none() && self.segments.len() > self.options.max_segments {
            let (dir, id, bits) = (
                self.dir.clone(),
                self.take_id(),
                self.options.bloom_bits_per_key,
            );
            let segments = self.segments.clone();
            let n = self.options.max_segments / 2 + 1;
            self.merging = Some(
                crate::background::spawn("flowcap-dedupe", move || {
                    merge_smallest(&dir, id, &segments, n, bits)
                })
                .map_err(io("starting the id store's background merge"))?,
            );
        }
        Ok(())
    }

    /// Waits for the merge (if any) and swaps its segments in.
    fn settle_merge(&mut self) -> Result<(), IdStoreError> {
        let Some(job) = self.merging.take() else {
            return Ok(());
        };
        let merged = job
            .join()
            .map_err(|_| IdStoreError::Stopped("background merge"))??;
        self.take_in_merge(merged);
        self.maybe_merge()
    }

    /// Swaps a merge's segment in for the segments it merged away.
    fn take_in_merge(&mut self, merged: Option<Merged>) {
        if let Some((removed, merged)) = merged {
            self.segments.retain(|s| !removed.contains(&s.id));
            self.segments.extend(merged);
            self.segments.sort_by_key(|s| s.id);
        }
    }

    /// Forgets every entry with sequence > `seq`, in memory and on disk
    /// (segments entirely after `seq` are deleted, straddling ones
    /// rewritten). Call on restore from a snapshot taken at `seq`, before
    /// any other call. Idempotent.
    pub fn truncate_after(&mut self, seq: u64) -> Result<(), IdStoreError> {
        self.settle()?;
        self.buffer.retain(|e| e.seq <= seq);
        self.buffer_min_seq = self
            .buffer
            .entries
            .iter()
            .map(|e| e.seq)
            .min()
            .unwrap_or(u64::MAX);
        let mut old = std::mem::take(&mut self.segments).into_iter();
        let mut keep = Vec::new();
        let mut remove = Vec::new();
        while let Some(seg) = old.next() {
            if seg.max_seq <= seq {
                keep.push(seg);
            } else if seg.min_seq > seq {
                remove.push(seg);
            } else {
                let id = self.take_id();
                let mut cursor = Cursor::new(&seg);
                let rewritten = write_segment(
                    &self.dir,
                    id,
                    seg.count,
                    self.options.bloom_bits_per_key,
                    || {
                        while let Some(e) = cursor.next_entry()? {
                            if e.seq <= seq {
                                return Ok(Some(e));
                            }
                        }
                        Ok(None)
                    },
                );
                match rewritten {
                    Ok(new) => {
                        keep.extend(new.map(Arc::new));
                        remove.push(seg);
                    }
                    Err(e) => {
                        // Leave the store as it was: still correct to retry.
                        keep.push(seg);
                        keep.extend(remove);
                        keep.extend(old);
                        self.segments = keep;
                        self.segments.sort_by_key(|s| s.id);
                        return Err(e);
                    }
                }
            }
        }
        keep.sort_by_key(|s| s.id);
        self.segments = keep;
        for seg in remove {
            let path = seg.path.clone();
            drop(seg);
            fs::remove_file(&path).map_err(io(format!("removing {}", path.display())))?;
        }
        sync_dir(&self.dir)
    }

    /// Merges all segments into one.
    pub fn compact(&mut self) -> Result<(), IdStoreError> {
        self.settle()?;
        let id = self.take_id();
        let n = self.segments.len();
        let merged = merge_smallest(
            &self.dir,
            id,
            &self.segments,
            n,
            self.options.bloom_bits_per_key,
        )?;
        self.take_in_merge(merged);
        Ok(())
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn segment_contains(
        &mut self,
        s: usize,
        fp: u64,
        iccid: u128,
        record_id: &RecordId,
    ) -> Result<bool, IdStoreError> {
        let seg = &self.segments[s];
        if !seg.bloom.may_contain(fp) {
            return Ok(false);
        }
        let k = seg.first_fps.partition_point(|&f| f < fp);
        // Block k-1 is the last starting below fp; blocks starting at fp
        // follow it (equal fingerprints may straddle a boundary).
        let mut b = k.saturating_sub(1);
        while b < seg.first_fps.len() && seg.first_fps[b] <= fp {
            seg.read_block(b, &mut self.block)?;
            self.scratch.clear();
            decode_block(&self.block[..BLOCK_BODY], &mut self.scratch)?;
            for e in &self.scratch {
                if e.fp > fp {
                    return Ok(false);
                }
                if e.fp == fp && e.iccid == iccid && e.record_id == *record_id {
                    return Ok(true);
                }
            }
            b += 1;
        }
        Ok(false)
    }
}

impl Drop for DiskIdStore {
    /// A dropped store leaves no thread writing into its directory (a
    /// store opened on it next must see a settled directory).
    fn drop(&mut self) {
        if let Some(sealed) = self.sealed.take() {
            let _ = sealed.job.join();
        }
        if let Some(merge) = self.merging.take() {
            let _ = merge.join();
        }
    }
}

/// Writes a buffer's entries, sorted, as segment `id` (the buffer is
/// shared with lookups, so an order of indexes is sorted, not the
/// entries).
fn write_sorted(
    dir: &Path,
    id: u64,
    buffer: &Buffer,
    bloom_bits_per_key: u32,
) -> Result<Option<Segment>, IdStoreError> {
    let entries = &buffer.entries;
    // Entries order by fingerprint first: sorting (fingerprint, index)
    // pairs compares in the cache, where sorting indexes alone fetched two
    // ~100-byte entries from all over the buffer for every comparison (a
    // quarter of this thread's time). Equal fingerprints, rare, fall back
    // to the whole entries.
    let mut order: Vec<(u64, u32)> = (0..entries.len() as u32)
        .map(|i| (entries[i as usize].fp, i))
        .collect();
    order.sort_unstable_by(|&(fa, a), &(fb, b)| {
        fa.cmp(&fb)
            .then_with(|| entries[a as usize].cmp(&entries[b as usize]))
    });
    let mut next = order.iter();
    write_segment(dir, id, entries.len() as u64, bloom_bits_per_key, || {
        Ok(next.next().map(|&(_, i)| entries[i as usize]))
    })
}

/// Merges the `n` smallest of `segments` into segment `id` (a k-way
/// streaming merge; an id found in several keeps its lowest sequence) and
/// deletes their files. Returns the ids merged away and the new segment,
/// or `None` when there is nothing to merge. Lookups may go on reading
/// the old segments meanwhile: an open file outlives its name.
type Merged = (Vec<u64>, Option<Arc<Segment>>);
fn merge_smallest(
    dir: &Path,
    id: u64,
    segments: &[Arc<Segment>],
    n: usize,
    bloom_bits_per_key: u32,
) -> Result<Option<Merged>, IdStoreError> {
    if n < 2 || segments.len() < 2 {
        return Ok(None);
    }
    let mut chosen: Vec<&Arc<Segment>> = segments.iter().collect();
    chosen.sort_by_key(|s| s.count);
    chosen.truncate(n);
    let merged = {
        let mut cursors: Vec<Cursor<'_>> = chosen.iter().map(|s| Cursor::new(s)).collect();
        let expected = chosen.iter().map(|s| s.count).sum();
        let mut heap = BinaryHeap::new();
        for (k, c) in cursors.iter_mut().enumerate() {
            if let Some(e) = c.next_entry()? {
                heap.push(Reverse((e, k)));
            }
        }
        let mut last: Option<(u64, u128, RecordId)> = None;
        write_segment(dir, id, expected, bloom_bits_per_key, || {
            while let Some(Reverse((e, k))) = heap.pop() {
                if let Some(next) = cursors[k].next_entry()? {
                    heap.push(Reverse((next, k)));
                }
                let key = (e.fp, e.iccid, e.record_id);
                // Entries are ordered by key then seq: the first of a key
                // has the lowest sequence.
                if last != Some(key) {
                    last = Some(key);
                    return Ok(Some(e));
                }
            }
            Ok(None)
        })?
    };
    for seg in &chosen {
        fs::remove_file(&seg.path).map_err(io(format!("removing {}", seg.path.display())))?;
    }
    sync_dir(dir)?;
    Ok(Some((
        chosen.iter().map(|s| s.id).collect(),
        merged.map(Arc::new),
    )))
}

impl IdStore for DiskIdStore {
    fn contains(&mut self, iccid: Iccid, record_id: &RecordId) -> Result<bool, IdStoreError> {
        let fp = fingerprint(iccid, record_id);
        self.poll()?;
        if self.buffer.find(fp, iccid.to_bits(), record_id).is_some() {
            return Ok(true);
        }
        if let Some(sealed) = &self.sealed {
            if sealed.buffer.find(fp, iccid.to_bits(), record_id).is_some() {
                return Ok(true);
            }
        }
        for s in (0..self.segments.len()).rev() {
            if self.segment_contains(s, fp, iccid.to_bits(), record_id)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn insert(
        &mut self,
        iccid: Iccid,
        record_id: &RecordId,
        end: Timestamp,
        seq: u64,
    ) -> Result<(), IdStoreError> {
        self.buffer.insert(Entry {
            fp: fingerprint(iccid, record_id),
            iccid: iccid.to_bits(),
            record_id: *record_id,
            seq,
            end: end.0,
        });
        self.buffer_min_seq = self.buffer_min_seq.min(seq);
        if self.buffer.len() >= self.options.flush_entries {
            self.seal()?;
        } else if self.sealed.is_some() {
            self.poll()?;
        }
        Ok(())
    }

    fn durable_through(&mut self, seq: u64) -> Result<(), IdStoreError> {
        DiskIdStore::durable_through(self, seq)
    }

    fn durable_through_later(&mut self, seq: u64) -> Result<Durability, IdStoreError> {
        DiskIdStore::durable_through_later(self, seq)
    }

    fn truncate_after(&mut self, seq: u64) -> Result<(), IdStoreError> {
        DiskIdStore::truncate_after(self, seq)
    }

    /// The buffer's index group of the id (a fresh id's insert probes
    /// it: one cache miss per record, and the largest left on the
    /// Kafka driver once the directory and hot window were prefetched).
    fn prefetch(&self, fp: u64, iccid: Iccid, record_id: &RecordId) -> u64 {
        self.buffer
            .find(fp, iccid.to_bits(), record_id)
            .map_or(1, |i| i as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowcap_engine::dedupe::MemIdStore;

    fn card(n: u32) -> Iccid {
        Iccid::parse(&format!("8986{n:016}")).unwrap()
    }

    fn rid(n: u32) -> RecordId {
        RecordId::new(&format!("cmcc-20261123-{n:010}")).unwrap()
    }

    fn small() -> DiskIdStoreOptions {
        DiskIdStoreOptions {
            flush_entries: 100,
            bloom_bits_per_key: 10,
            max_segments: 4,
        }
    }

    #[test]
    fn insert_flush_reopen_contains() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = DiskIdStore::open_with(dir.path(), small()).unwrap();
            for i in 0..1000 {
                s.insert(card(i % 13), &rid(i), Timestamp(0), i.into())
                    .unwrap();
            }
            assert!(s.contains(card(5), &rid(5)).unwrap());
            s.durable_through(999).unwrap();
            assert!(s.segment_count() <= 4, "{}", s.segment_count());
        }
        let mut s = DiskIdStore::open_with(dir.path(), small()).unwrap();
        assert_eq!(s.len(), 1000);
        for i in 0..1000 {
            assert!(s.contains(card(i % 13), &rid(i)).unwrap(), "{i}");
            assert!(!s.contains(card(i % 13 + 1), &rid(i)).unwrap(), "{i}");
        }
        assert!(!s.contains(card(1), &rid(5000)).unwrap());
        s.compact().unwrap();
        assert_eq!(s.segment_count(), 1);
        assert_eq!(s.len(), 1000);
        assert!(s.contains(card(999 % 13), &rid(999)).unwrap());
    }

    #[test]
    fn truncate_after_forgets_later_entries_durably() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = DiskIdStore::open_with(dir.path(), small()).unwrap();
        for i in 0..450 {
            s.insert(card(1), &rid(i), Timestamp(0), i.into()).unwrap();
        }
        // 400 on disk (4 flushes, maybe merged), 50 buffered.
        s.truncate_after(250).unwrap();
        for i in 0..450 {
            assert_eq!(s.contains(card(1), &rid(i)).unwrap(), i <= 250, "{i}");
        }
        drop(s);
        let mut s = DiskIdStore::open_with(dir.path(), small()).unwrap();
        for i in 0..450 {
            assert_eq!(s.contains(card(1), &rid(i)).unwrap(), i <= 250, "{i}");
        }
        // Idempotent; replay re-inserts.
        s.truncate_after(250).unwrap();
        s.insert(card(1), &rid(300), Timestamp(0), 300).unwrap();
        assert!(s.contains(card(1), &rid(300)).unwrap());
    }

    #[test]
    fn leftover_temp_files_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("seg-0000000000000007.tmp"), b"half a write").unwrap();
        let s = DiskIdStore::open(dir.path()).unwrap();
        assert!(s.is_empty());
        assert!(!dir.path().join("seg-0000000000000007.tmp").exists());
    }

    #[test]
    fn corrupt_blocks_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = DiskIdStore::open_with(dir.path(), small()).unwrap();
        s.insert(card(1), &rid(1), Timestamp(0), 1).unwrap();
        s.flush().unwrap();
        let path = s.segments[0].path.clone();
        drop(s);
        let mut bytes = fs::read(&path).unwrap();
        bytes[10] ^= 0xff;
        fs::write(&path, bytes).unwrap();
        let mut s = DiskIdStore::open_with(dir.path(), small()).unwrap();
        assert!(matches!(
            s.contains(card(1), &rid(1)),
            Err(IdStoreError::Corrupt(_))
        ));
    }

    /// A tiny deterministic generator (no extra dependency).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    #[test]
    fn randomized_against_mem_store() {
        for seed in 0..6u64 {
            let dir = tempfile::tempdir().unwrap();
            let mut disk = DiskIdStore::open_with(dir.path(), small()).unwrap();
            let mut mem = MemIdStore::new();
            let mut rng = Lcg(seed);
            let mut seq = 0u64;
            let mut pending = Vec::new();
            for _ in 0..3000 {
                let (c, r) = (card(rng.next(5) as u32), rid(rng.next(400) as u32));
                match rng.next(100) {
                    0..=54 => {
                        // The engine's use: insert only what is not there.
                        if !mem.contains(c, &r).unwrap() {
                            seq += 1;
                            mem.insert(c, &r, Timestamp(0), seq).unwrap();
                            disk.insert(c, &r, Timestamp(0), seq).unwrap();
                        }
                    }
                    55..=92 => {
                        assert_eq!(disk.contains(c, &r).unwrap(), mem.contains(c, &r).unwrap());
                    }
                    93..=94 => {
                        // A snapshot's cut: sealed, written meanwhile.
                        pending.push(disk.durable_through_later(seq).unwrap());
                    }
                    95..=96 => {
                        let to = seq.saturating_sub(rng.next(60));
                        disk.durable_through(seq).unwrap();
                        mem.truncate_after(to).unwrap();
                        disk.truncate_after(to).unwrap();
                        seq = to;
                    }
                    97 => {
                        disk.durable_through(seq).unwrap();
                        drop(disk);
                        disk = DiskIdStore::open_with(dir.path(), small()).unwrap();
                    }
                    _ => disk.compact().unwrap(),
                }
            }
            for c in 0..5 {
                for r in 0..400 {
                    let (c, r) = (card(c), rid(r));
                    assert_eq!(disk.contains(c, &r).unwrap(), mem.contains(c, &r).unwrap());
                }
            }
            for d in pending {
                d.wait().unwrap();
            }
        }
    }

    #[test]
    fn a_sealed_buffer_answers_lookups_and_becomes_durable() {
        let dir = tempfile::tempdir().unwrap();
        let options = DiskIdStoreOptions {
            flush_entries: 1 << 20,
            bloom_bits_per_key: 10,
            max_segments: 4,
        };
        let mut s = DiskIdStore::open_with(dir.path(), options).unwrap();
        for i in 0..20_000u32 {
            s.insert(card(i % 97), &rid(i), Timestamp(0), i.into())
                .unwrap();
        }
        let durable = s.durable_through_later(19_999).unwrap();
        // Sealed, not necessarily written: lookups see it either way, and
        // new ids go to a fresh buffer.
        for i in (0..20_000u32).step_by(7) {
            assert!(s.contains(card(i % 97), &rid(i)).unwrap(), "{i}");
        }
        for i in 20_000..20_100u32 {
            s.insert(card(i % 97), &rid(i), Timestamp(0), i.into())
                .unwrap();
        }
        // Nothing new to seal: the promise is the sealed buffer's.
        durable.wait().unwrap();
        s.durable_through_later(20_099).unwrap().wait().unwrap();
        assert_eq!(s.len(), 20_100);
        drop(s);
        let mut s = DiskIdStore::open_with(dir.path(), options).unwrap();
        assert_eq!(s.len(), 20_100);
        assert!(s.contains(card(0), &rid(0)).unwrap());
        assert!(s.contains(card(20_099 % 97), &rid(20_099)).unwrap());
        assert!(!s.contains(card(1), &rid(0)).unwrap());
    }

    #[test]
    fn background_merges_keep_every_id() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = DiskIdStore::open_with(dir.path(), small()).unwrap();
        // 30 seals of 100 ids: merges run in the background again and again.
        for i in 0..3000u32 {
            s.insert(card(i % 7), &rid(i), Timestamp(0), i.into())
                .unwrap();
            if i % 250 == 0 {
                assert!(s.contains(card(i % 7), &rid(i)).unwrap());
            }
        }
        s.durable_through(2999).unwrap();
        assert!(s.segment_count() <= 4, "{}", s.segment_count());
        for i in 0..3000u32 {
            assert!(s.contains(card(i % 7), &rid(i)).unwrap(), "{i}");
        }
        let files = fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, s.segment_count(), "merged-away files are deleted");
    }
}
