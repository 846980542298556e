//! # flowcap-storage
//!
//! The durable state of flowcap: what must survive a `kill -9` beside the
//! Kafka offsets. The engine crate is pure (no IO); this crate holds the
//! implementations of its storage traits that touch the disk.
//!
//! - [`cold_index`]: the dedupe cold index, [`cold_index::DiskIdStore`], an
//!   exact on-disk set of every accepted `(iccid, record_id)` that backs the
//!   engine's in-memory hot window of fingerprints.
//! - [`snapshot_store`]: engine snapshots written atomically and found
//!   again after a crash.
//! - [`jsonl`]: JSON-lines output files that rewind to a snapshot, so every
//!   line exists exactly once after a restart.

pub mod cold_index;
pub mod jsonl;
pub mod snapshot_store;

pub use cold_index::{DiskIdStore, DiskIdStoreOptions};
pub use jsonl::{JsonlError, JsonlSink};
pub use snapshot_store::{SnapshotStore, SnapshotStoreError};
