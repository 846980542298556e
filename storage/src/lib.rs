//! # flowcap-storage
//!
//! The durable state of flowcap: what must survive a `kill -9` beside the
//! Kafka offsets, and the history analysts query. The engine crate is pure
//! (no IO); this crate holds the implementations of its storage traits that
//! touch the disk.
//!
//! - [`id_store`]: the dedupe id store on disk, [`DiskIdStore`], an
//!   exact on-disk set of every accepted `(iccid, record_id)` that backs the
//!   engine's in-memory hot window of fingerprints.
//! - [`snapshot_store`]: engine snapshots written atomically and found
//!   again after a crash.
//! - [`jsonl`]: JSON-lines output files that rewind to a snapshot, so every
//!   line exists exactly once after a restart.
//! - [`history`]: the Parquet history tables, written exactly once per
//!   input through crashes, and compacted in the background.
//! - [`location`]: where the history lives: a local directory or an
//!   S3-compatible object store.
//!
//! SQL over the history (the tables, the views, the console's queries) is
//! the `flowcap-sql` crate's: the pipeline writes history and never
//! queries it, so it does not compile the query engine for that.

pub mod background;
pub mod history;
pub mod id_store;
pub mod jsonl;
pub mod location;
pub mod snapshot_store;

pub use history::{HistoryError, HistoryOptions, HistoryWriter};
pub use id_store::{DiskIdStore, DiskIdStoreOptions};
pub use jsonl::{JsonlError, JsonlSink};
pub use location::{HistoryLocation, LocationError};
pub use snapshot_store::{SnapshotStore, SnapshotStoreError, StoredSnapshot};
