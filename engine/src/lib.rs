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
//! snapshot, replay the input after its positions, and the engine is where
//! it would have been.

pub mod command;
pub mod cycle;
pub mod decode;
pub mod domain;
pub mod ids;
pub mod record;
pub mod time;

pub use command::{Command, CommandKind, CommandResult};
pub use cycle::{CycleCalendar, CycleId};
pub use domain::{CardState, Carrier, Reason, Reasons, ThresholdMb, TrafficType, MB};
pub use ids::{CommandId, Iccid, PlanId, PoolId, TagId};
pub use record::{RecordId, Usage};
pub use time::Timestamp;
pub mod config;
pub mod dedupe;
pub mod engine;
pub mod event;
mod shard;

pub use config::EngineConfig;
pub use engine::{CardView, Engine, EngineError, PoolView};
pub use event::{ActionEvent, Output};
