//! # flowcap-loadgen
//!
//! A deterministic carrier workload for flowcap's tests and benchmarks: a
//! card population with its setup commands (plans, cards, pools,
//! thresholds, add-on packs), a stream of usage records in SPEC section 4
//! JSON with realistic faults (duplicates, late and out-of-order records,
//! unknown cards, malformed input), and the outcome an engine must reach,
//! computed from the generator's own bookkeeping.
//!
//! ```
//! use flowcap_loadgen::{Workload, WorkloadConfig};
//!
//! let workload = Workload::new(WorkloadConfig {
//!     cards: 1_000,
//!     duration_hours: 2,
//!     ..WorkloadConfig::default()
//! })?;
//! let setup: Vec<_> = workload.setup_commands().collect();
//! let mut line = String::new();
//! for record in workload.records().take(3) {
//!     line.clear();
//!     record.to_json_line(&mut line);
//!     assert!(line.starts_with('{') || record.kind == flowcap_loadgen::RecordKind::Malformed);
//! }
//! let expected = workload.expected();
//! assert_eq!(expected.counts().total(), workload.total_records());
//! # assert!(!setup.is_empty());
//! # Ok::<(), flowcap_loadgen::LoadgenError>(())
//! ```
//!
//! ## Determinism
//!
//! The same [`WorkloadConfig`] (seed included) yields byte-identical setup
//! commands, records and [`Expected`], however and however often the output
//! is consumed:
//!
//! - every random choice comes from a xoshiro256++ generator implemented in
//!   this crate and seeded from `seed` through SplitMix64, one independent
//!   stream per purpose (card profiles, pools, records), so no dependency
//!   can change the bit stream; per-card values that are needed out of
//!   order (activation dates, tags) are a hash of `(seed, card index)`;
//! - nothing reads a clock, the environment, thread ids or hash-map
//!   iteration order; collections that are iterated are `Vec`s or
//!   `BTreeMap`s;
//! - [`Workload::setup_commands`], [`Workload::records`] and
//!   [`Workload::expected`] each start from the immutable [`Workload`]
//!   state, so the record stream is a pure function of the config and
//!   [`Workload::expected`] simply replays it;
//! - identifiers are derived, not random: ICCIDs encode the card index
//!   (`8986` + carrier code + 14 digits), record ids the stream position
//!   (`cmcc-YYYYMMDD-<seq>`), command ids the setup position
//!   (`setup-000001`).
//!
//! The floating-point steps (Zipf and exponential sampling) use `powf`,
//! `ln` and `exp`, whose last bit may in principle differ between
//! platforms' math libraries; on one platform and toolchain the output is
//! exact.
//!
//! ## Scale
//!
//! A workload keeps 8 bytes per card plus pool memberships; records are
//! produced one at a time with a bounded window of recent records for
//! duplicates, so 10 million cards and any number of records stream in
//! constant extra memory. [`Expected`] keeps one `u64` per card and cycle.

mod config;
mod error;
mod expected;
mod format;
mod records;
mod rng;
mod workload;

pub use config::{
    CarrierMix, PlanTemplate, WorkloadConfig, FRESH_MAX_DELAY_MS, MAX_CARDS, MAX_DURATION_HOURS,
    MAX_PLAN_TEMPLATES, MAX_THRESHOLD_CHOICES, MAX_TOTAL_RECORDS, MIN_CARDS,
};
pub use error::LoadgenError;
pub use expected::{CardCycleUsage, Expected, KindCounts};
pub use records::{to_json_line, Defect, GeneratedRecord, Payload, RecordKind, Records};
pub use workload::{carrier_code, Workload, FLEET_TAGS, OPERATOR, SETUP_BATCH, UTC_OFFSET_SECS};
