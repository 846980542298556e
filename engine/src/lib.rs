//! # flowcap-engine
//!
//! The accounting core of flowcap: every card's and pool's usage for the
//! current billing cycle, the decision to cut a card or pool off (or let it
//! back), and the events that say so.
//!
//! The crate is pure and deterministic: no Kafka, no files, no async
//! runtime, no clock. Time comes in with the records and commands, so the
//! same input sequence always yields the same state and the same events
//! (with the same ids). That property is what recovery rests on: restore a
//! snapshot, replay the input after its position, and the engine is where
//! it would have been. (The dedupe id store, every accepted record id, is
//! reached through the [`dedupe::IdStore`] trait; its disk implementation,
//! `DiskIdStore`, lives in `flowcap-storage`.)
//!
//! How a record flows:
//!
//! ```text
//!  bytes --decode--> Usage --router--> shard --> Outputs
//!                     |      | clock, future check, card directory,
//!                     |      | dedupe (hot window + IdStore)
//!                     |      v
//!                     |   Rejected / Duplicate
//!                     v
//!                  Rejected (decode error)
//! ```
//!
//! - [`decode`]: JSON and binary record decoding, one error code per defect.
//! - [`engine::Engine`]: the sequential engine (router + registry + shards);
//!   the reference semantics.
//! - [`sharded::ShardedEngine`]: the same shards on worker threads.
//! - [`command`]: the command wire format and results; [`event`]: outputs.
//! - [`rule`]: automation rules: validation, conditions, reminder windows;
//!   shards fire them ([`event::RuleFiredEvent`]).
//! - [`snapshot`]: versioned, checksummed state.
//! - [`redact`]: secrets (webhook signing keys) out of what is written.

pub mod command;
pub mod config;
pub mod cycle;
pub mod decode;
pub mod dedupe;
mod directory;
pub mod domain;
pub mod engine;
pub mod event;
pub mod ids;
pub mod record;
pub mod redact;
pub mod rule;
mod shard;
pub mod sharded;
pub mod snapshot;
pub mod time;
mod watermark;

pub use command::{Command, CommandKind, CommandResult};
pub use config::EngineConfig;
pub use cycle::{CycleCalendar, CycleId};
pub use dedupe::{
    DedupeConfig, DedupeError, Deduper, Durability, IdStore, IdStoreError, MemIdStore, Sighting,
};
pub use domain::{CardState, Carrier, Reason, Reasons, ThresholdMb, TrafficType, MB};
pub use engine::{CardChange, CardView, Engine, EngineError, PoolView};
pub use event::{ActionEvent, Output};
pub use ids::{CommandId, Iccid, PlanId, PoolId, TagId};
pub use record::{Imei, RecordId, Usage};
pub use sharded::ShardedEngine;
pub use time::Timestamp;
pub use watermark::Lane;
