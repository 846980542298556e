//! Placeholder exact dedupe (replaced by the hot-window design on merge).

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::ids::Iccid;
use crate::record::RecordId;
use crate::time::Timestamp;

/// Dedupe configuration.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct DedupeConfig {
    /// Hot window.
    pub window_ms: i64,
    /// Bucket width.
    pub bucket_ms: i64,
}

/// Outcome of a sighting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sighting {
    /// Never seen.
    First,
    /// Seen before.
    Duplicate,
}

/// Id store errors.
#[derive(Debug, thiserror::Error)]
pub enum IdStoreError {
    /// IO.
    #[error("id store: {0}")]
    Io(String),
}

/// Dedupe errors.
#[derive(Debug, thiserror::Error)]
pub enum DedupeError {
    /// Store failed.
    #[error(transparent)]
    Store(#[from] IdStoreError),
}

/// Full-id store.
pub trait IdStore: Send {
    /// Whether seen.
    fn contains(&mut self, iccid: Iccid, record_id: &RecordId) -> Result<bool, IdStoreError>;
    /// Remember.
    fn insert(
        &mut self,
        iccid: Iccid,
        record_id: &RecordId,
        end: Timestamp,
        seq: u64,
    ) -> Result<(), IdStoreError>;
}

/// In-memory store.
#[derive(Debug, Default)]
pub struct MemIdStore(HashSet<(Iccid, RecordId)>);

impl IdStore for MemIdStore {
    fn contains(&mut self, iccid: Iccid, record_id: &RecordId) -> Result<bool, IdStoreError> {
        Ok(self.0.contains(&(iccid, *record_id)))
    }
    fn insert(
        &mut self,
        iccid: Iccid,
        record_id: &RecordId,
        _end: Timestamp,
        _seq: u64,
    ) -> Result<(), IdStoreError> {
        self.0.insert((iccid, *record_id));
        Ok(())
    }
}

/// Deduper.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Deduper {
    config: DedupeConfig,
    seen: HashSet<u128>,
}

impl Deduper {
    /// New.
    pub fn new(config: DedupeConfig) -> Self {
        Deduper {
            config,
            seen: HashSet::new(),
        }
    }
    /// Observe.
    pub fn observe(
        &mut self,
        iccid: Iccid,
        record_id: &RecordId,
        end: Timestamp,
        seq: u64,
        _clock: Timestamp,
        store: &mut dyn IdStore,
    ) -> Result<Sighting, DedupeError> {
        let mut key = iccid.to_bits().to_le_bytes().to_vec();
        key.extend_from_slice(record_id.as_str().as_bytes());
        let fp = xxhash_rust::xxh3::xxh3_128(&key);
        if self.seen.contains(&fp) && store.contains(iccid, record_id)? {
            return Ok(Sighting::Duplicate);
        }
        self.seen.insert(fp);
        store.insert(iccid, record_id, end, seq)?;
        Ok(Sighting::First)
    }
    /// Advance.
    pub fn advance(&mut self, _clock: Timestamp) {}
    /// Remembered ids.
    pub fn len(&self) -> usize {
        self.seen.len()
    }
    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
    /// Heap bytes.
    pub fn heap_bytes(&self) -> usize {
        self.seen.capacity() * 17
    }
}
