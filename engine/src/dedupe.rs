//! Exact duplicate detection of usage records.
//!
//! SPEC §4: a `record_id` seen before for the same card is a duplicate and
//! is counted once, ever; SPEC §9: no record is lost or counted twice. Both
//! mistakes are fatal here: a missed duplicate double-counts usage, and a
//! fresh record taken for a duplicate loses usage. So no probabilistic
//! filter may have the last word.
//!
//! The key is `(iccid, record_id)`. A cycle at 10M cards holds ~86 billion
//! of them, far more than memory, so the work is split in two:
//!
//! * **Hot window** ([`Deduper`], in memory): a 64-bit xxh3 fingerprint of
//!   every accepted record whose `end` falls in an event-time bucket not
//!   older than `clock - window`. Fingerprints are truncated to 56 bits and
//!   the low 8 bits carry the bucket (modulo 256), so one `u64` per id and
//!   whole buckets can be evicted in one linear pass when the clock moves.
//!   They live in one *ordered linear-probing* table (slots sorted by value,
//!   home slot = value scaled to the table, no wrap-around): a lookup is one
//!   cache line or two, and the table runs at 82-92 % load, ~9-10 bytes per
//!   id. One global table rather than one per bucket because most records are
//!   fresh: a miss has to be cheap, not 48 probes.
//! * **[`IdStore`]** (full ids; the disk implementation lives in
//!   `flowcap-storage`): every accepted id, ever.
//!
//! The exactness argument:
//!
//! * A fingerprint *miss* is a proof: equal keys have equal fingerprints,
//!   and every accepted record whose bucket is still live has its
//!   fingerprint in the table (invariant kept by [`Deduper::observe`],
//!   broken only by eviction, which removes whole buckets that are then
//!   routed to the store). So a miss means "never accepted with an `end`
//!   in the window": the record is [`Sighting::First`].
//! * A fingerprint *hit* only means "maybe": different keys can share a
//!   fingerprint. Every hit is verified against the [`IdStore`], which
//!   compares full keys; only a verified hit is a [`Sighting::Duplicate`].
//!   A collision therefore costs one store lookup, never a record.
//! * A record whose bucket has already been evicted (late) skips the table
//!   and asks the store directly.
//!
//! Boundary of the argument: the hot window is indexed by the `end` of the
//! *first* sighting. A resend carrying the same `end` (what a carrier resend
//! is) is always caught. A resend whose `end` *differs* from the original's
//! is caught while the original is in the window, or if the resend is itself
//! late; it is not caught if the original has left the window and the
//! resend's `end` lies inside it.
//!
//! Crash consistency: the table is part of engine snapshots (serde). Every
//! store insert carries the engine's input sequence number; before a
//! snapshot taken at sequence `S` is published the store must be durable
//! through `S` ([`IdStore::durable_through`]), and on restore from it the
//! store must forget everything after `S` ([`IdStore::truncate_after`]),
//! because those records are replayed and must be seen as fresh again.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Condvar, Mutex};

use serde::{Deserialize, Serialize};

use crate::ids::Iccid;
use crate::record::RecordId;
use crate::time::{Timestamp, MS_PER_HOUR};

/// Why an [`IdStore`] operation failed. Every variant is external (the
/// store's medium), never a property of the record: the caller should
/// retry or stop the shard, not dead-letter the record.
#[derive(Debug, thiserror::Error)]
pub enum IdStoreError {
    /// External: an I/O operation of the store failed.
    #[error("id store I/O failed while {context}: {source}")]
    Io {
        /// What the store was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// External: stored data failed validation (bad checksum or format).
    #[error("id store data is corrupt: {0}")]
    Corrupt(String),
    /// External: a write the store did on another thread failed; each
    /// waiter for it (a [`Durability`], the store itself) gets the same
    /// cause, shared.
    #[error("id store background write failed: {0}")]
    Background(Arc<IdStoreError>),
    /// A bug: a thread of the store (which one) stopped before it finished
    /// its work (it panicked, or dropped its promise unsettled).
    #[error("the id store's {0} stopped before it finished")]
    Stopped(&'static str),
}

/// Why [`Deduper::observe`] failed. The record was not accepted and the
/// deduper's memory is unchanged (apart from eviction): it is safe to retry.
#[derive(Debug, thiserror::Error)]
pub enum DedupeError {
    /// External: the [`IdStore`] failed.
    #[error(transparent)]
    Store(#[from] IdStoreError),
}

/// Exact memory of every accepted `(iccid, record_id)`.
///
/// Implementations may do IO; the engine only calls them through this
/// trait, so it stays IO-free.
pub trait IdStore: Send {
    /// Whether `(iccid, record_id)` was inserted at input sequence <= the
    /// store's visible horizon (everything not removed by
    /// [`IdStore::truncate_after`]).
    fn contains(&mut self, iccid: Iccid, record_id: &RecordId) -> Result<bool, IdStoreError>;

    /// Remembers a fresh id; `seq` is the engine's input sequence number of
    /// the record.
    fn insert(
        &mut self,
        iccid: Iccid,
        record_id: &RecordId,
        end: Timestamp,
        seq: u64,
    ) -> Result<(), IdStoreError>;

    /// Makes every entry with sequence <= `seq` durable. Call before
    /// publishing an engine snapshot taken at `seq`.
    fn durable_through(&mut self, seq: u64) -> Result<(), IdStoreError>;

    /// Starts making every entry with sequence <= `seq` durable and returns
    /// at once: the [`Durability`] settles when they are. A snapshot taken
    /// at `seq` may be published only after it settled without error. The
    /// store keeps answering lookups meanwhile. The default waits
    /// ([`IdStore::durable_through`]) and returns a settled one.
    fn durable_through_later(&mut self, seq: u64) -> Result<Durability, IdStoreError> {
        self.durable_through(seq)?;
        Ok(Durability::settled())
    }

    /// Forgets every entry with sequence > `seq`. Call on restore from a
    /// snapshot taken at `seq`, before replaying input after it.
    fn truncate_after(&mut self, seq: u64) -> Result<(), IdStoreError>;

    /// Loads what inserting the id of fingerprint `fp` ([`fingerprint`])
    /// will read, and returns a value made of it (see
    /// [`crate::Engine::prefetch`]). Reads only; the default loads nothing.
    fn prefetch(&self, fp: u64, iccid: Iccid, record_id: &RecordId) -> u64 {
        let _ = (fp, iccid, record_id);
        0
    }
}

/// A promise that an [`IdStore`]'s entries up to some sequence number are
/// (or will be) durable: what a snapshot's commit waits for before the
/// snapshot is published, while the inputs after its cut already flow.
/// Clones share the outcome.
#[derive(Debug, Clone, Default)]
pub struct Durability(Option<Arc<DurabilityCell>>);

#[derive(Debug, Default)]
struct DurabilityCell {
    outcome: Mutex<Option<Result<(), Arc<IdStoreError>>>>,
    settled: Condvar,
}

/// The store's side of a pending [`Durability`]: settled once. Dropped
/// without settling, it settles as a failure (the writing thread died).
#[derive(Debug)]
pub struct DurabilitySettler(Arc<DurabilityCell>);

impl Durability {
    /// Already durable.
    pub fn settled() -> Durability {
        Durability(None)
    }

    /// A promise and the handle that settles it.
    pub fn pending() -> (Durability, DurabilitySettler) {
        let cell = Arc::new(DurabilityCell::default());
        (Durability(Some(cell.clone())), DurabilitySettler(cell))
    }

    /// `Ok(true)` once durable, `Ok(false)` while pending, the failure
    /// once it failed. Never waits.
    pub fn poll(&self) -> Result<bool, IdStoreError> {
        let Some(cell) = &self.0 else {
            return Ok(true);
        };
        let outcome = cell.outcome.lock().unwrap_or_else(|p| p.into_inner());
        match &*outcome {
            None => Ok(false),
            Some(Ok(())) => Ok(true),
            Some(Err(e)) => Err(shared_failure(e)),
        }
    }

    /// Waits until settled.
    pub fn wait(&self) -> Result<(), IdStoreError> {
        let Some(cell) = &self.0 else {
            return Ok(());
        };
        let mut outcome = cell.outcome.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match &*outcome {
                None => {
                    outcome = cell
                        .settled
                        .wait(outcome)
                        .unwrap_or_else(|p| p.into_inner())
                }
                Some(Ok(())) => return Ok(()),
                Some(Err(e)) => return Err(shared_failure(e)),
            }
        }
    }
}

/// A failure shared by every waiter: a thread that stopped is told as
/// such, anything else as the background write's cause.
fn shared_failure(e: &Arc<IdStoreError>) -> IdStoreError {
    match **e {
        IdStoreError::Stopped(which) => IdStoreError::Stopped(which),
        _ => IdStoreError::Background(Arc::clone(e)),
    }
}

impl DurabilitySettler {
    /// Settles the promise: durable, or why not.
    pub fn settle(self, outcome: Result<(), Arc<IdStoreError>>) {
        self.set(outcome);
    }

    fn set(&self, outcome: Result<(), Arc<IdStoreError>>) {
        let mut slot = self.0.outcome.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(outcome);
        }
        self.0.settled.notify_all();
    }
}

impl Drop for DurabilitySettler {
    fn drop(&mut self) {
        self.set(Err(Arc::new(IdStoreError::Stopped("background writer"))));
    }
}

/// An exact, in-memory [`IdStore`] (tests and small embedded runs; it
/// forgets everything when dropped).
#[derive(Debug, Default, Clone)]
pub struct MemIdStore {
    ids: HashMap<(Iccid, RecordId), u64>,
    lookups: u64,
}

impl MemIdStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of remembered ids.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// How many times [`IdStore::contains`] was called.
    pub fn lookups(&self) -> u64 {
        self.lookups
    }
}

impl IdStore for MemIdStore {
    fn contains(&mut self, iccid: Iccid, record_id: &RecordId) -> Result<bool, IdStoreError> {
        self.lookups += 1;
        Ok(self.ids.contains_key(&(iccid, *record_id)))
    }

    fn insert(
        &mut self,
        iccid: Iccid,
        record_id: &RecordId,
        _end: Timestamp,
        seq: u64,
    ) -> Result<(), IdStoreError> {
        self.ids.entry((iccid, *record_id)).or_insert(seq);
        Ok(())
    }

    fn durable_through(&mut self, _seq: u64) -> Result<(), IdStoreError> {
        Ok(())
    }

    fn truncate_after(&mut self, seq: u64) -> Result<(), IdStoreError> {
        self.ids.retain(|_, s| *s <= seq);
        Ok(())
    }
}

/// The 64-bit fingerprint of a key: xxh3 of the ICCID's packed bits (16
/// little-endian bytes) followed by the record id's bytes. Stable across
/// runs and platforms (it is persisted in snapshots and segment files).
pub fn fingerprint(iccid: Iccid, record_id: &RecordId) -> u64 {
    let id = record_id.as_str().as_bytes();
    let mut buf = [0u8; 16 + crate::record::MAX_RECORD_ID_LEN];
    buf[..16].copy_from_slice(&iccid.to_bits().to_le_bytes());
    let n = 16 + id.len().min(crate::record::MAX_RECORD_ID_LEN);
    buf[16..n].copy_from_slice(&id[..n - 16]);
    xxhash_rust::xxh3::xxh3_64(&buf[..n])
}

/// Hot-window parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupeConfig {
    /// How far behind the clock (max event time) a record's `end` may be and
    /// still be checked in memory (at least; buckets are evicted an eighth
    /// of the window at a time, see [`Deduper::advance`]). Default 48 h.
    pub window_ms: i64,
    /// Eviction granularity: records are grouped by `end` into buckets of
    /// this width, dropped whole. Default 1 h.
    pub bucket_ms: i64,
    /// Also ask the [`IdStore`] when the hot window misses. Off by default:
    /// a miss then proves the id was never accepted with an `end` inside the
    /// window, which catches every resend of the same record (same `end`)
    /// and any reuse of the id within the window. On: exact for any reuse
    /// of an id, ever, at the cost of one store lookup per fresh record.
    #[serde(default)]
    pub verify_misses: bool,
}

impl Default for DedupeConfig {
    fn default() -> Self {
        DedupeConfig {
            window_ms: 48 * MS_PER_HOUR,
            bucket_ms: MS_PER_HOUR,
            verify_misses: false,
        }
    }
}

/// The verdict on one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sighting {
    /// Never accepted before: account it.
    First,
    /// Accepted before: ignore it.
    Duplicate,
}

/// Live buckets are tagged modulo 256, so at most 256 may coexist in the
/// table; buckets further ahead of the clock wait in the `far` map.
const TAG_SPAN: i64 = 256;
const MAX_LOAD: f64 = 0.92;
const TARGET_LOAD: f64 = 0.82;
const MIN_LOAD: f64 = 0.5;
const MIN_HOME_SLOTS: usize = 64;

/// Slots after the last home slot (the table does not wrap around).
fn slack(home_slots: usize) -> usize {
    32 + home_slots / 256
}

/// Home slot of an entry: its fingerprint part scaled to the table, so
/// homes are monotone in the entry value (entries sharing a fingerprint
/// share a home).
#[inline]
fn home(entry: u64, home_slots: usize) -> usize {
    (((entry & !0xff) as u128 * home_slots as u128) >> 64) as usize
}

/// The 56-bit in-memory fingerprint (never 0: 0 marks an empty slot).
#[inline]
fn fp56(fp: u64) -> u64 {
    (fp >> 8).max(1)
}

/// The per-shard hot window of fingerprints. See the module docs.
///
/// Serialized through [`DeduperRepr`], built from a reference: serde's
/// `into` would clone the whole table first (tens of MB on the snapshot
/// thread at every snapshot).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "DeduperRepr")]
pub struct Deduper {
    config: DedupeConfig,
    /// Oldest live bucket; `None` before the first clock.
    low: Option<i64>,
    home_slots: usize,
    /// Ordered linear-probing table of `fp56 << 8 | bucket mod 256`.
    table: Vec<u64>,
    entries: usize,
    /// Fingerprints of buckets beyond `low + 255` (end far ahead of the
    /// clock): fp56 -> latest such bucket.
    far: BTreeMap<u64, i64>,
}

impl Deduper {
    /// An empty hot window. Nonsensical widths are clamped to >= 1 ms.
    pub fn new(config: DedupeConfig) -> Self {
        let config = DedupeConfig {
            window_ms: config.window_ms.max(0),
            bucket_ms: config.bucket_ms.max(1),
            verify_misses: config.verify_misses,
        };
        Deduper {
            config,
            low: None,
            home_slots: MIN_HOME_SLOTS,
            table: vec![0; MIN_HOME_SLOTS + slack(MIN_HOME_SLOTS)],
            entries: 0,
            far: BTreeMap::new(),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> DedupeConfig {
        self.config
    }

    /// Checks and records one record. `clock` = engine's max event time so
    /// far; `seq` is the record's input sequence number (stored with the id
    /// for crash consistency). Advances the window to `clock` first.
    ///
    /// On error nothing was recorded for this record (retry is safe).
    pub fn observe(
        &mut self,
        iccid: Iccid,
        record_id: &RecordId,
        end: Timestamp,
        seq: u64,
        clock: Timestamp,
        store: &mut dyn IdStore,
    ) -> Result<Sighting, DedupeError> {
        let fp = fingerprint(iccid, record_id);
        self.observe_fp(fp, iccid, record_id, end, seq, clock, store)
    }

    /// [`Deduper::observe`] with the fingerprint supplied (tests force
    /// collisions through it).
    #[allow(clippy::too_many_arguments)]
    fn observe_fp(
        &mut self,
        fp: u64,
        iccid: Iccid,
        record_id: &RecordId,
        end: Timestamp,
        seq: u64,
        clock: Timestamp,
        store: &mut dyn IdStore,
    ) -> Result<Sighting, DedupeError> {
        self.advance(clock);
        let bucket = self.bucket_of(end);
        let low = self.low.unwrap_or(i64::MIN);
        let fp = fp56(fp);
        if bucket < low {
            // Late: its bucket has left memory; the store decides alone.
            if store.contains(iccid, record_id)? {
                return Ok(Sighting::Duplicate);
            }
            store.insert(iccid, record_id, end, seq)?;
            return Ok(Sighting::First);
        }
        if (self.config.verify_misses || self.hot_contains(fp))
            && store.contains(iccid, record_id)?
        {
            return Ok(Sighting::Duplicate);
        }
        store.insert(iccid, record_id, end, seq)?;
        self.hot_insert(fp, bucket, low);
        Ok(Sighting::First)
    }

    /// Drops buckets older than `clock - window` (whole buckets only: a
    /// bucket goes once its entire span is older), a few at a time: only
    /// once [`Deduper::evict_step`] buckets are due, so the window holds
    /// between `window` and `window` plus that step. A clock older than a
    /// previous one is ignored.
    ///
    /// Why in steps: eviction is a pass over the whole table, and a backlog
    /// replayed at full speed moves the clock by hours a second. Evicting
    /// bucket by bucket, every id was passed over once per bucket of the
    /// window (48 times by default), 7-8 % of the Kafka driver's time over
    /// a 200-hour backlog (docs/BENCHMARKS.md §8); in steps of an eighth
    /// of the window, 8 times, for at most an eighth more ids in memory.
    /// Exactness does not depend on when buckets go: the table holds every
    /// id of the buckets from `low` on, whatever `low` is.
    pub fn advance(&mut self, clock: Timestamp) {
        let new_low = self.bucket_of(Timestamp(clock.0.saturating_sub(self.config.window_ms)));
        let old_low = match self.low {
            None => {
                self.low = Some(new_low);
                return;
            }
            Some(l) if new_low < l.saturating_add(self.evict_step()) => return,
            Some(l) => l,
        };
        self.low = Some(new_low);
        // Evict: keep entries whose bucket (decoded against the old low) is
        // still live.
        let keep = |e: u64| {
            let tag = (e & 0xff) as i64;
            let bucket = old_low + (tag - old_low).rem_euclid(TAG_SPAN);
            bucket >= new_low
        };
        self.relayout_in_place(keep);
        if self.entries < (self.home_slots as f64 * MIN_LOAD) as usize
            && self.home_slots > MIN_HOME_SLOTS
        {
            self.resize_for(self.entries);
        }
        // Far buckets that came within the tag span move into the table.
        if !self.far.is_empty() {
            let limit = new_low.saturating_add(TAG_SPAN - 1);
            let moving: Vec<(u64, i64)> = self
                .far
                .iter()
                .filter(|(_, b)| **b <= limit)
                .map(|(f, b)| (*f, *b))
                .collect();
            for (f, b) in moving {
                self.far.remove(&f);
                if b >= new_low {
                    self.hot_insert(f, b, new_low);
                }
            }
        }
    }

    /// Remembered ids in memory.
    pub fn len(&self) -> usize {
        self.entries + self.far.len()
    }

    /// Whether nothing is remembered in memory.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Memory used by the hot window, in bytes (table plus an estimate of
    /// the far map's nodes).
    pub fn heap_bytes(&self) -> usize {
        self.table.capacity() * 8 + self.far.len() * 48
    }

    /// Buckets evicted together: an eighth of the window's (at least one).
    fn evict_step(&self) -> i64 {
        (self.config.window_ms / self.config.bucket_ms / 8).max(1)
    }

    fn bucket_of(&self, t: Timestamp) -> i64 {
        t.0.div_euclid(self.config.bucket_ms)
    }

    /// Loads the slot a lookup of fingerprint `fp` ([`fingerprint`])
    /// starts at and returns it, for [`crate::Engine::prefetch`].
    pub(crate) fn prefetch_slot(&self, fp: u64) -> u64 {
        let at = home(fp56(fp) << 8, self.home_slots);
        self.table.get(at).copied().unwrap_or(0)
    }

    fn hot_contains(&self, fp: u64) -> bool {
        let probe = fp << 8;
        let mut i = home(probe, self.home_slots);
        while let Some(&e) = self.table.get(i) {
            if e == 0 || (e >> 8) > fp {
                break;
            }
            if (e >> 8) == fp {
                return true;
            }
            i += 1;
        }
        !self.far.is_empty() && self.far.contains_key(&fp)
    }

    fn hot_insert(&mut self, fp: u64, bucket: i64, low: i64) {
        if bucket > low.saturating_add(TAG_SPAN - 1) {
            let slot = self.far.entry(fp).or_insert(bucket);
            *slot = (*slot).max(bucket);
            return;
        }
        let entry = fp << 8 | (bucket.rem_euclid(TAG_SPAN) as u64);
        if (self.entries + 1) as f64 > self.home_slots as f64 * MAX_LOAD {
            self.resize_for(self.entries + 1);
        }
        loop {
            match self.try_insert(entry) {
                Some(()) => return,
                None => {
                    // The run reached the end of the slack: grow.
                    let bigger = self.home_slots + self.home_slots / 8 + MIN_HOME_SLOTS;
                    self.rebuild(bigger);
                }
            }
        }
    }

    /// `None` when the entry does not fit before the end of the table.
    fn try_insert(&mut self, entry: u64) -> Option<()> {
        let mut i = home(entry, self.home_slots);
        loop {
            let e = *self.table.get(i)?;
            if e == entry {
                return Some(());
            }
            if e == 0 || e > entry {
                break;
            }
            i += 1;
        }
        let hole = i + self.table[i..].iter().position(|&e| e == 0)?;
        self.table.copy_within(i..hole, i + 1);
        self.table[i] = entry;
        self.entries += 1;
        Some(())
    }

    /// Rebuilds so that `n` entries sit at the target load.
    fn resize_for(&mut self, n: usize) {
        let slots = ((n as f64 / TARGET_LOAD).ceil() as usize).max(MIN_HOME_SLOTS);
        self.rebuild(slots);
    }

    /// Re-lays the table out with `home_slots` home slots (grows further if
    /// the canonical layout would overflow the slack).
    fn rebuild(&mut self, mut home_slots: usize) {
        loop {
            let mut table = vec![0u64; home_slots + slack(home_slots)];
            if place_sorted(
                &mut table,
                home_slots,
                self.table.iter().copied().filter(|&e| e != 0),
            )
            .is_some()
            {
                self.table = table;
                self.home_slots = home_slots;
                return;
            }
            home_slots += home_slots / 8 + MIN_HOME_SLOTS;
        }
    }

    /// Removes entries not kept and compacts the runs, in one forward pass:
    /// a kept entry only ever moves left, so this is done in place.
    fn relayout_in_place(&mut self, keep: impl Fn(u64) -> bool) {
        let mut write = 0usize;
        let mut kept = 0usize;
        for read in 0..self.table.len() {
            let e = self.table[read];
            if e == 0 {
                continue;
            }
            self.table[read] = 0;
            if keep(e) {
                let pos = home(e, self.home_slots).max(write);
                self.table[pos] = e;
                write = pos + 1;
                kept += 1;
            }
        }
        self.entries = kept;
    }
}

/// Places sorted entries at their canonical positions; `None` on overflow.
fn place_sorted(
    table: &mut [u64],
    home_slots: usize,
    sorted: impl Iterator<Item = u64>,
) -> Option<usize> {
    let mut write = 0usize;
    let mut n = 0usize;
    for e in sorted {
        let pos = home(e, home_slots).max(write);
        *table.get_mut(pos)? = e;
        write = pos + 1;
        n += 1;
    }
    Some(n)
}

/// Serialized form of a [`Deduper`]: compact (one flat list of 56-bit
/// fingerprints per bucket) and layout-independent; the table is rebuilt
/// with the same size, which gives the identical layout (an ordered table's
/// layout depends only on its contents and size).
#[derive(Serialize, Deserialize)]
struct DeduperRepr {
    config: DedupeConfig,
    low: Option<i64>,
    home_slots: u64,
    buckets: Vec<BucketRepr>,
    far: Vec<(u64, i64)>,
}

#[derive(Serialize, Deserialize)]
struct BucketRepr {
    bucket: i64,
    fingerprints: Vec<u64>,
}

impl Serialize for Deduper {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        DeduperRepr::from(self).serialize(serializer)
    }
}

impl From<&Deduper> for DeduperRepr {
    fn from(d: &Deduper) -> Self {
        // Indexed by bucket - low (a bucket's tag fixes it), so in bucket
        // order: a BTreeMap lookup per entry was a third of the snapshot
        // thread's time with the window full (docs/BENCHMARKS.md §8).
        let mut by_offset: Vec<Vec<u64>> = vec![Vec::new(); TAG_SPAN as usize];
        let low = d.low.unwrap_or(0);
        for &e in d.table.iter().filter(|&&e| e != 0) {
            let tag = (e & 0xff) as i64;
            by_offset[(tag - low).rem_euclid(TAG_SPAN) as usize].push(e >> 8);
        }
        DeduperRepr {
            config: d.config,
            low: d.low,
            home_slots: d.home_slots as u64,
            buckets: by_offset
                .into_iter()
                .zip(low..)
                .filter(|(fingerprints, _)| !fingerprints.is_empty())
                .map(|(fingerprints, bucket)| BucketRepr {
                    bucket,
                    fingerprints,
                })
                .collect(),
            far: d.far.iter().map(|(&fp, &bucket)| (fp, bucket)).collect(),
        }
    }
}

impl TryFrom<DeduperRepr> for Deduper {
    type Error = String;

    fn try_from(r: DeduperRepr) -> Result<Self, Self::Error> {
        if r.config.bucket_ms < 1 || r.config.window_ms < 0 {
            return Err("dedupe config out of range".into());
        }
        let home_slots = usize::try_from(r.home_slots)
            .ok()
            .filter(|&h| h >= MIN_HOME_SLOTS)
            .ok_or("dedupe table size out of range")?;
        let mut entries = Vec::new();
        if !r.buckets.is_empty() {
            let low = r.low.ok_or("dedupe buckets without a clock")?;
            for b in &r.buckets {
                if b.bucket < low || b.bucket > low.saturating_add(TAG_SPAN - 1) {
                    return Err(format!("dedupe bucket {} outside the live span", b.bucket));
                }
                let tag = b.bucket.rem_euclid(TAG_SPAN) as u64;
                for &f in &b.fingerprints {
                    if f == 0 || f >> 56 != 0 {
                        return Err("dedupe fingerprint out of range".into());
                    }
                    entries.push(f << 8 | tag);
                }
            }
        }
        entries.sort_unstable();
        entries.dedup();
        if entries.len() > home_slots {
            return Err("dedupe table too small for its entries".into());
        }
        let mut table = vec![0u64; home_slots + slack(home_slots)];
        let n = place_sorted(&mut table, home_slots, entries.into_iter())
            .ok_or("dedupe table layout overflows")?;
        Ok(Deduper {
            config: r.config,
            low: r.low,
            home_slots,
            table,
            entries: n,
            far: r.far.into_iter().collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn durability_settles_once_and_reports_a_lost_writer() {
        let settled = Durability::settled();
        assert!(settled.poll().unwrap());
        settled.wait().unwrap();

        let (d, settler) = Durability::pending();
        let other = d.clone();
        assert!(!d.poll().unwrap());
        let waiter = std::thread::spawn(move || other.wait());
        settler.settle(Ok(()));
        waiter.join().unwrap().unwrap();
        assert!(d.poll().unwrap());

        let (d, settler) = Durability::pending();
        settler.settle(Err(Arc::new(IdStoreError::Corrupt("disk full".into()))));
        assert!(matches!(d.poll(), Err(IdStoreError::Background(e))
            if matches!(&*e, IdStoreError::Corrupt(m) if m == "disk full")));

        let (d, settler) = Durability::pending();
        drop(settler);
        assert!(matches!(d.wait(), Err(IdStoreError::Stopped(_))));
    }

    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    const H: i64 = MS_PER_HOUR;

    fn card(n: u32) -> Iccid {
        Iccid::parse(&format!("8986{n:016}")).unwrap()
    }

    fn rid(n: u32) -> RecordId {
        RecordId::new(&format!("cmcc-{n:010}")).unwrap()
    }

    fn cfg() -> DedupeConfig {
        DedupeConfig {
            window_ms: 10 * H,
            bucket_ms: H,
            verify_misses: false,
        }
    }

    #[test]
    fn first_then_duplicate() {
        let mut d = Deduper::new(DedupeConfig::default());
        let mut s = MemIdStore::new();
        let t = Timestamp(100 * H);
        let a = d.observe(card(1), &rid(1), t, 1, t, &mut s).unwrap();
        let b = d.observe(card(1), &rid(1), t, 2, t, &mut s).unwrap();
        let c = d.observe(card(2), &rid(1), t, 3, t, &mut s).unwrap();
        assert_eq!(
            (a, b, c),
            (Sighting::First, Sighting::Duplicate, Sighting::First)
        );
        assert_eq!(d.len(), 2);
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn forced_collisions_stay_exact() {
        let mut d = Deduper::new(cfg());
        let mut s = MemIdStore::new();
        let t = Timestamp(100 * H);
        // Every key gets the same fingerprint.
        for i in 0..50 {
            let r = d.observe_fp(42, card(i % 3), &rid(i), t, u64::from(i), t, &mut s);
            assert_eq!(r.unwrap(), Sighting::First, "id {i}");
        }
        for i in 0..50 {
            let r = d.observe_fp(42, card(i % 3), &rid(i), t, 100, t, &mut s);
            assert_eq!(r.unwrap(), Sighting::Duplicate, "id {i}");
        }
        // All 49 collisions after the first were verified in the store.
        assert!(s.lookups() >= 49 + 50);
    }

    #[test]
    fn misses_do_not_touch_the_store() {
        let mut d = Deduper::new(cfg());
        let mut s = MemIdStore::new();
        let t = Timestamp(100 * H);
        for i in 0..10_000 {
            d.observe(card(i % 7), &rid(i), t, u64::from(i), t, &mut s)
                .unwrap();
        }
        // 56-bit fingerprints: a false hit among 10k ids is ~1e-9 likely.
        assert_eq!(s.lookups(), 0);
        assert_eq!(d.len(), 10_000);
    }

    #[test]
    fn eviction_drops_whole_buckets_and_late_path_uses_store() {
        let mut d = Deduper::new(cfg());
        let mut s = MemIdStore::new();
        for h in 0..20 {
            let t = Timestamp(1000 * H + h * H + 5);
            for i in 0..100 {
                let id = (h as u32) * 1000 + i;
                assert_eq!(
                    d.observe(card(i), &rid(id), t, id.into(), t, &mut s)
                        .unwrap(),
                    Sighting::First
                );
            }
        }
        // clock = 1019h+5; window 10h -> buckets >= 1009 live: 11 buckets.
        assert_eq!(d.len(), 11 * 100);
        let before = s.lookups();
        // A late resend (bucket 1000) is answered by the store.
        let late = Timestamp(1000 * H + 5);
        let clock = Timestamp(1019 * H + 5);
        assert_eq!(
            d.observe(card(0), &rid(0), late, 9, clock, &mut s).unwrap(),
            Sighting::Duplicate
        );
        assert_eq!(s.lookups(), before + 1);
        // A late fresh one is accepted, stored, and not kept in memory.
        assert_eq!(
            d.observe(card(0), &rid(999_999), late, 10, clock, &mut s)
                .unwrap(),
            Sighting::First
        );
        assert_eq!(d.len(), 11 * 100);
        assert_eq!(
            d.observe(card(0), &rid(999_999), late, 11, clock, &mut s)
                .unwrap(),
            Sighting::Duplicate
        );
        // Advancing far beyond empties memory and shrinks the table.
        d.advance(Timestamp(5000 * H));
        assert_eq!(d.len(), 0);
        assert!(d.heap_bytes() < 10_000);
        // Older clocks are ignored.
        d.advance(Timestamp(0));
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn eviction_goes_in_steps_of_an_eighth_of_the_window() {
        // 48 one-hour buckets: evicted six at a time.
        let mut d = Deduper::new(DedupeConfig::default());
        let mut s = MemIdStore::new();
        let per_hour = 10u32;
        let mut evictions = 0;
        let mut before = 0;
        for h in 0..200u32 {
            let t = Timestamp(1000 * H + i64::from(h) * H + 5);
            for i in 0..per_hour {
                let id = h * 1000 + i;
                d.observe(card(i), &rid(id), t, id.into(), t, &mut s)
                    .unwrap();
            }
            let buckets = d.len() / per_hour as usize;
            if h >= 48 {
                // The window's 49 buckets (48 h behind the current one),
                // and at most five more waiting for the next step.
                assert!((49..=54).contains(&buckets), "hour {h}: {buckets}");
            }
            if d.len() < before {
                evictions += 1;
            }
            before = d.len();
        }
        // The low bucket moves every sixth hour (952, 958, ...); it first
        // drops ids at hour 54 (low 1006 > the first bucket, 1000), then
        // every sixth hour to hour 198.
        assert_eq!(evictions, 25);
        // Every id of the buckets still held is caught without the store.
        let lookups = s.lookups();
        let clock = Timestamp(1199 * H + 5);
        for h in 200 - 49..200u32 {
            let t = Timestamp(1000 * H + i64::from(h) * H + 5);
            let id = h * 1000;
            assert_eq!(
                d.observe(card(0), &rid(id), t, 0, clock, &mut s).unwrap(),
                Sighting::Duplicate
            );
        }
        assert_eq!(s.lookups(), lookups + 49, "one verification per hit");
    }

    #[test]
    fn far_future_records_wait_outside_the_table() {
        let mut d = Deduper::new(cfg());
        let mut s = MemIdStore::new();
        let clock = Timestamp(100 * H);
        let future = Timestamp(1000 * H);
        assert_eq!(
            d.observe(card(1), &rid(1), future, 1, clock, &mut s)
                .unwrap(),
            Sighting::First
        );
        assert_eq!(d.len(), 1);
        let before = s.lookups();
        assert_eq!(
            d.observe(card(1), &rid(1), future, 2, clock, &mut s)
                .unwrap(),
            Sighting::Duplicate
        );
        assert_eq!(s.lookups(), before + 1);
        // Once the clock nears, it moves into the table and is still known.
        d.advance(Timestamp(900 * H));
        assert_eq!(d.len(), 1);
        assert_eq!(
            d.observe(card(1), &rid(1), future, 3, Timestamp(900 * H), &mut s)
                .unwrap(),
            Sighting::Duplicate
        );
        d.advance(Timestamp(1011 * H));
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn serde_round_trip_is_identical() {
        let mut d = Deduper::new(cfg());
        let mut s = MemIdStore::new();
        for i in 0..5_000u32 {
            let t = Timestamp(100 * H + i64::from(i) * 60_000);
            d.observe(card(i % 11), &rid(i), t, i.into(), t, &mut s)
                .unwrap();
        }
        d.observe(
            card(1),
            &rid(1),
            Timestamp(10_000 * H),
            1,
            Timestamp(100 * H),
            &mut s,
        )
        .unwrap();
        let json = serde_json::to_string(&d).unwrap();
        let back: Deduper = serde_json::from_str(&json).unwrap();
        assert_eq!(back, d);
        assert_eq!(back.len(), d.len());
        // Buckets are stored in ascending order, each once.
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        let buckets: Vec<i64> = value["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["bucket"].as_i64().unwrap())
            .collect();
        assert!(buckets.len() > 1, "{buckets:?}");
        assert!(buckets.windows(2).all(|w| w[0] < w[1]), "{buckets:?}");
        let empty = Deduper::new(cfg());
        let back: Deduper = serde_json::from_str(&serde_json::to_string(&empty).unwrap()).unwrap();
        assert_eq!(back, empty);
    }

    #[test]
    fn stays_under_ten_bytes_per_id() {
        let mut d = Deduper::new(DedupeConfig::default());
        let mut s = NullStore;
        let t = Timestamp(100 * H);
        for i in 0..200_000u32 {
            d.observe(card(i % 1000), &rid(i), t, i.into(), t, &mut s)
                .unwrap();
            if i > 20_000 && i % 997 == 0 {
                let per = d.heap_bytes() as f64 / d.len() as f64;
                assert!(per < 10.0, "{per} bytes per id at {i}");
            }
        }
    }

    /// Accepts everything and knows nothing (only for memory tests: with
    /// it a fingerprint hit would be taken as a collision).
    struct NullStore;
    impl IdStore for NullStore {
        fn contains(&mut self, _: Iccid, _: &RecordId) -> Result<bool, IdStoreError> {
            Ok(false)
        }
        fn insert(
            &mut self,
            _: Iccid,
            _: &RecordId,
            _: Timestamp,
            _: u64,
        ) -> Result<(), IdStoreError> {
            Ok(())
        }
        fn durable_through(&mut self, _: u64) -> Result<(), IdStoreError> {
            Ok(())
        }
        fn truncate_after(&mut self, _: u64) -> Result<(), IdStoreError> {
            Ok(())
        }
    }

    /// One input: card, record, and whether to round-trip the deduper
    /// through serde before it.
    fn ops() -> impl Strategy<Value = Vec<(u32, u32, bool)>> {
        prop::collection::vec((0u32..4, 0u32..60, prop::bool::weighted(0.03)), 1..300)
    }

    /// A record's `end` is a function of its key (a resend repeats it),
    /// spread over 60 h so that with a 10 h window many arrive late.
    fn end_of(c: u32, r: u32) -> Timestamp {
        let spread = (u64::from(c) * 61 + u64::from(r)) * 2_654_435_761 % (60 * 60);
        Timestamp(1_000 * H + spread as i64 * 60_000)
    }

    proptest! {
        #[test]
        fn matches_a_set_model(ops in ops(), collide in any::<bool>()) {
            let mut d = Deduper::new(cfg());
            let mut s = MemIdStore::new();
            let mut model: HashSet<(Iccid, String)> = HashSet::new();
            let mut clock = Timestamp(0);
            for (seq, (c, r, roundtrip)) in ops.into_iter().enumerate() {
                if roundtrip {
                    d = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
                }
                let (iccid, id, end) = (card(c), rid(r), end_of(c, r));
                clock = clock.max(end);
                let fp = if collide { u64::from(r % 3) << 8 } else { fingerprint(iccid, &id) };
                let got = d.observe_fp(fp, iccid, &id, end, seq as u64, clock, &mut s).unwrap();
                let want = if model.insert((iccid, id.as_str().to_owned())) {
                    Sighting::First
                } else {
                    Sighting::Duplicate
                };
                prop_assert_eq!(got, want);
            }
        }
    }
}
