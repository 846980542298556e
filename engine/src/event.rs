//! What the engine emits.
//!
//! Every input produces outputs: accounted records (for history),
//! rejections (for the dead-letter topic and the quarantine table),
//! duplicates (counted), action events (card and pool state changes) and
//! journal entries (command + result). Action events carry a deterministic
//! id: a hash of what caused them and whom they concern, so that the same
//! input replayed after a crash yields the same ids and consumers can drop
//! repeats.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::command::{Command, CommandResult};
use crate::cycle::CycleId;
use crate::domain::{CardState, Reasons};
use crate::ids::{CommandId, Iccid, PoolId};
use crate::record::{RecordId, Usage};
use crate::time::Timestamp;

/// What caused an event.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Cause {
    /// A usage record (of `iccid`, which may be another pool member).
    Record {
        /// The card the record is for.
        iccid: Iccid,
        /// Its id.
        record_id: RecordId,
    },
    /// A command.
    Command {
        /// Its id.
        command_id: CommandId,
    },
    /// A new billing cycle started.
    Rollover {
        /// The cycle that started.
        cycle: CycleId,
    },
    /// A deadline passed (plan expiry, end of test or silent period).
    Deadline {
        /// Which deadline.
        kind: DeadlineKind,
        /// When it fell due.
        at: Timestamp,
    },
}

/// Time-driven transitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadlineKind {
    /// The plan term ended: `plan_expired`.
    PlanExpiry,
    /// Test period ended: testable -> activatable.
    TestEnd,
    /// Silent period ended: activatable -> active (forced activation).
    SilentEnd,
}

impl Cause {
    fn write_key(&self, out: &mut String) {
        let _ = match self {
            Cause::Record { iccid, record_id } => write!(out, "r|{iccid}|{record_id}"),
            Cause::Command { command_id } => write!(out, "c|{command_id}"),
            Cause::Rollover { cycle } => write!(out, "o|{cycle}"),
            Cause::Deadline { kind, at } => write!(out, "d|{kind:?}|{}", at.0),
        };
    }
}

/// A card's state change (SPEC section 5.1 `card_state`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardStateEvent {
    /// Deterministic id.
    pub id: String,
    /// The card.
    pub iccid: Iccid,
    /// State before.
    pub old: CardState,
    /// State after.
    pub new: CardState,
    /// Suspension reasons after (empty unless `new` is suspended).
    pub reasons: Reasons,
    /// Event time of the cause.
    pub event_time: Timestamp,
    /// Set by the sink when the event leaves the process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processed_at: Option<Timestamp>,
    /// The card's current cycle.
    pub cycle: CycleId,
    /// Usage at the moment of the change (the pool's, for pool reasons).
    pub usage_bytes: u64,
    /// The limit that was crossed, when a usage limit caused a cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_bytes: Option<u64>,
    /// Bytes over `limit_bytes` at the cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overshoot_bytes: Option<u64>,
    /// What caused it.
    pub cause: Cause,
}

/// A pool's visible state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolState {
    /// Usable.
    Available,
    /// Forward pool usage above its allowance.
    Exhausted,
    /// Backward pool cut by a rule's suspend action.
    Suspended,
    /// Backward pool frozen for arrears.
    Frozen,
}

/// A pool's state change (SPEC section 5.1 `pool_state`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStateEvent {
    /// Deterministic id.
    pub id: String,
    /// The pool.
    pub pool: PoolId,
    /// State before.
    pub old: PoolState,
    /// State after.
    pub new: PoolState,
    /// Event time of the cause.
    pub event_time: Timestamp,
    /// Set by the sink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processed_at: Option<Timestamp>,
    /// The pool's current cycle.
    pub cycle: CycleId,
    /// Pool usage at the change.
    pub usage_bytes: u64,
    /// Pool allowance (forward) or the rule threshold (backward), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_bytes: Option<u64>,
    /// Bytes over the limit at the cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overshoot_bytes: Option<u64>,
    /// What caused it.
    pub cause: Cause,
}

/// An action event for the actions topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ActionEvent {
    /// A card's state or reasons changed.
    CardState(CardStateEvent),
    /// A pool's state changed.
    PoolState(PoolStateEvent),
}

impl ActionEvent {
    /// The deterministic id.
    pub fn id(&self) -> &str {
        match self {
            ActionEvent::CardState(e) => &e.id,
            ActionEvent::PoolState(e) => &e.id,
        }
    }

    /// The Kafka key: the ICCID or the pool id.
    pub fn key(&self) -> String {
        match self {
            ActionEvent::CardState(e) => e.iccid.to_string(),
            ActionEvent::PoolState(e) => e.pool.to_string(),
        }
    }
}

/// Deterministic event id: 128-bit xxh3 of kind, subject and cause, hex.
pub(crate) fn event_id(kind: &str, subject: &str, cause: &Cause) -> String {
    let mut key = String::with_capacity(96);
    key.push_str(kind);
    key.push('|');
    key.push_str(subject);
    key.push('|');
    cause.write_key(&mut key);
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(key.as_bytes()))
}

/// A record that passed validation and dedupe, as history stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accounted {
    /// Input sequence number.
    pub seq: u64,
    /// The record.
    pub usage: Usage,
    /// The cycle of its event time for the card's carrier.
    pub cycle: CycleId,
    /// Counted in the card's current cycle state.
    pub counted: bool,
    /// Arrived after its cycle closed (beyond the allowed lateness): kept
    /// in history, never changes state.
    pub late: bool,
}

/// Why a record was not accounted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// Input sequence number.
    pub seq: u64,
    /// Stable reason code (metrics label, dead-letter header).
    pub code: String,
    /// Human-readable detail.
    pub message: String,
    /// The card, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iccid: Option<Iccid>,
    /// The record id, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_id: Option<RecordId>,
}

/// One journal line: a command and its result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// Input sequence number.
    pub seq: u64,
    /// The command as received.
    pub command: Command,
    /// What it did.
    pub result: CommandResult,
    /// True when the id was seen before (answered with the first result,
    /// nothing changed).
    pub repeat: bool,
}

/// Everything the engine emits, in processing order per card.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "output", rename_all = "snake_case")]
pub enum Output {
    /// A record accounted (history).
    Accounted(Accounted),
    /// A duplicate resend (counted once, ever).
    Duplicate {
        /// Input sequence number.
        seq: u64,
        /// The card.
        iccid: Iccid,
        /// The repeated id.
        record_id: RecordId,
    },
    /// A rejected record (dead letter, quarantine).
    Rejected(Rejection),
    /// An action event.
    Action(ActionEvent),
    /// A command's journal entry.
    Journal(Box<JournalEntry>),
}
