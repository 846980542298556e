//! # flowcap-ingest
//!
//! Moves data in and out of the engine. Transport is kept apart from
//! format: decoding is the engine's pure [`flowcap_engine::decode`]; this
//! crate reads inputs, routes them through the sharded engine, writes the
//! outputs and owns the recovery protocol.
//!
//! - [`pipeline`]: what every mode shares: the engine on its shards, the
//!   writer thread, the snapshot protocol and the restore decision.
//! - [`embedded`]: the pipeline with no Kafka: inputs from an iterator
//!   (a JSON-lines file or the load generator), outputs as JSON lines in a
//!   local directory, snapshots beside them, exact resume after a crash.
//! - [`files`]: records and commands from JSON-lines files, merged into one
//!   deterministic input sequence.
//! - `notify`: starts rule notification delivery (`flowcap_delivery`)
//!   on the data directory's outbox; the writer feeds it firings and
//!   syncs it at every snapshot barrier.
//! - [`limits`]: the largest record and command read, and how much of a
//!   bad input a dead letter keeps (an oversized input is dead-lettered
//!   as `too_large`, never read whole).
//! - [`metrics`]: the metric names and the handles the pipelines record
//!   them with; [`health`]: readiness the pipelines flip and `/readyz`
//!   reports.
//!
//! - [`kafka`]: the same pipeline with Kafka partitions as inputs and
//!   topics as sinks.
//! - [`requests`]: reads of live state (and embedded commands) from the
//!   operator API, answered by the driver between inputs.

pub mod embedded;
pub mod files;
pub mod health;
pub mod kafka;
pub mod limits;
pub mod metrics;
mod notify;
pub mod pipeline;
pub mod requests;

pub use embedded::{run, EmbeddedOptions, Input, Progress};
pub use health::Health;
pub use kafka::{KafkaOptions, KafkaRunError};
pub use limits::SizeLimits;
pub use pipeline::{HistoryConfig, IngestError, Summary};
