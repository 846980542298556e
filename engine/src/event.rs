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

use crate::command::{Command, CommandResult, PoolKind};
use crate::cycle::CycleId;
use crate::domain::{CardState, Carrier, Reasons};
use crate::ids::{CommandId, Iccid, PlanId, PoolId};
use crate::record::{Imei, RecordId, Usage};
use crate::rule::{RuleAction, RuleCondition};
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
    /// A local day started (billing time zone): type 1 rules ("days to
    /// expiry <= N") enter for the cards whose expiry is now N days away.
    RuleDay,
    /// The grace period after an expiry without renewal ended: the card is
    /// deregistered (`EngineConfig::expiry_grace_days`).
    ExpiryGraceEnd,
    /// A backward pool's retention ended without the arrears settled: the
    /// pool is abandoned (`EngineConfig::pool_retention_days`).
    RetentionEnd,
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
    /// When the card's separation from its device changed: `true` it is
    /// now in another device and has no network though its state is
    /// unchanged (ctcc, tri), `false` a rebind restored it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub separated: Option<bool>,
    /// The device move that caused it, when a record came from another
    /// device than the card's bound one (SPEC section 2.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceChange>,
    /// What caused it.
    pub cause: Cause,
}

/// A SIM seen in another device than the one its card is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceChange {
    /// The IMEI the card was bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound: Option<Imei>,
    /// The IMEI of the record.
    pub seen: Imei,
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
    /// Backward pool still frozen for arrears, its numbers retained until
    /// the retention ends (`retain_pool`).
    Retained,
    /// Forward pool whose every member was deregistered, or backward pool
    /// whose retention ended: it takes no member and no add-on any more
    /// (a backward one can be re-enabled within a month).
    Abandoned,
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

/// A record of a closed cycle, counted within the allowed lateness,
/// crossed one of that cycle's limits (SPEC section 3): the crossing the
/// closed cycle would have had. It changes no state, so it is not a
/// `card_state` or `pool_state` event: the card or pool stays as its
/// current cycle has it, no carrier call and no rule follow. A consumer
/// that turns events into carrier calls ignores this kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LateCrossingEvent {
    /// Deterministic id.
    pub id: String,
    /// The card whose own limit was crossed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iccid: Option<Iccid>,
    /// The pool whose allowance or threshold was crossed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolId>,
    /// The reasons the closed cycle gained (`over_quota`, `general_cap`,
    /// `over_threshold`; `pool_exhausted`, `backward_pool_threshold`).
    pub reasons: Reasons,
    /// Event time of the cause (the record's end).
    pub event_time: Timestamp,
    /// Set by the sink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processed_at: Option<Timestamp>,
    /// The closed cycle.
    pub cycle: CycleId,
    /// The closed cycle's usage after the record (the pool's, for a pool).
    pub usage_bytes: u64,
    /// The limit crossed.
    pub limit_bytes: u64,
    /// Bytes over `limit_bytes`.
    pub overshoot_bytes: u64,
    /// The record.
    pub cause: Cause,
}

impl LateCrossingEvent {
    /// The subject as text: the ICCID, else the pool id.
    pub fn target(&self) -> String {
        match (&self.iccid, &self.pool) {
            (Some(i), _) => i.to_string(),
            (None, Some(p)) => p.to_string(),
            (None, None) => String::new(),
        }
    }
}

/// What a rule saw when it fired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "metric", rename_all = "snake_case")]
pub enum Observed {
    /// Type 1: whole local days from the firing day to the expiry day
    /// (negative once expired).
    DaysToExpiry {
        /// Days.
        days: i64,
        /// The card's plan expiry.
        expires_at: Timestamp,
    },
    /// Types 2 and 3: cycle usage of the card or pool.
    Usage {
        /// Bytes used in the cycle.
        used_bytes: u64,
        /// The allowance remaining conditions compare against (card: plan
        /// + card add-ons; forward pool: pool allowance), when there is one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        allowance_bytes: Option<u64>,
        /// Allowance minus usage (negative when over), when there is an
        /// allowance.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        remaining_bytes: Option<i64>,
    },
    /// Type 4: the visible state change.
    StateChange {
        /// State before.
        old: CardState,
        /// State after.
        new: CardState,
        /// Suspension reasons after.
        reasons: Reasons,
    },
}

/// A rule fired for one card or pool (SPEC section 5.1 `rule_fired`): the
/// explanation of why notifications go out. One event per rule, target and
/// cause; the actions listed are those whose reminder window allowed them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleFiredEvent {
    /// Deterministic id: xxh3-128 of `rule_fired`, `rule|target` and the
    /// cause.
    pub id: String,
    /// Rule id.
    pub rule: String,
    /// Rule display name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rule_name: String,
    /// Rule type code (1-4).
    pub rule_type: u8,
    /// The card (types 1, 2, 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iccid: Option<Iccid>,
    /// The pool (type 3), or the card's pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolId>,
    /// The pool's display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_name: Option<String>,
    /// The card's plan (the forward pool's plan for pools).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<PlanId>,
    /// The plan's display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_name: Option<String>,
    /// The rule's condition.
    pub condition: RuleCondition,
    /// What was observed.
    pub observed: Observed,
    /// Event time of the cause (start of the day for day starts).
    pub event_time: Timestamp,
    /// Set by the sink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processed_at: Option<Timestamp>,
    /// The target's current cycle.
    pub cycle: CycleId,
    /// The actions to run (channel, endpoint or recipients, merge,
    /// reminder window).
    pub actions: Vec<RuleAction>,
    /// What caused it.
    pub cause: Cause,
}

impl RuleFiredEvent {
    /// The target as text: the ICCID, else the pool id.
    pub fn target(&self) -> String {
        match (&self.iccid, &self.pool) {
            (Some(i), _) => i.to_string(),
            (None, Some(p)) => p.to_string(),
            (None, None) => String::new(),
        }
    }
}

/// An action event for the actions topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ActionEvent {
    /// A card's state or reasons changed.
    CardState(CardStateEvent),
    /// A pool's state changed.
    PoolState(PoolStateEvent),
    /// An automation rule fired (boxed: the largest event, and the rarest).
    RuleFired(Box<RuleFiredEvent>),
    /// A closed cycle's limit crossed by a record within the lateness: a
    /// record of what that cycle would have decided, not an action.
    LateCrossing(LateCrossingEvent),
}

impl ActionEvent {
    /// The deterministic id.
    pub fn id(&self) -> &str {
        match self {
            ActionEvent::CardState(e) => &e.id,
            ActionEvent::PoolState(e) => &e.id,
            ActionEvent::RuleFired(e) => &e.id,
            ActionEvent::LateCrossing(e) => &e.id,
        }
    }

    /// The Kafka key: the ICCID or the pool id.
    pub fn key(&self) -> String {
        match self {
            ActionEvent::CardState(e) => e.iccid.to_string(),
            ActionEvent::PoolState(e) => e.pool.to_string(),
            ActionEvent::RuleFired(e) => e.target(),
            ActionEvent::LateCrossing(e) => e.target(),
        }
    }

    /// Event time of the cause.
    pub fn event_time(&self) -> Timestamp {
        match self {
            ActionEvent::CardState(e) => e.event_time,
            ActionEvent::PoolState(e) => e.event_time,
            ActionEvent::RuleFired(e) => e.event_time,
            ActionEvent::LateCrossing(e) => e.event_time,
        }
    }

    /// What caused it.
    pub fn cause(&self) -> &Cause {
        match self {
            ActionEvent::CardState(e) => &e.cause,
            ActionEvent::PoolState(e) => &e.cause,
            ActionEvent::RuleFired(e) => &e.cause,
            ActionEvent::LateCrossing(e) => &e.cause,
        }
    }

    /// The wire name of `kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            ActionEvent::CardState(_) => "card_state",
            ActionEvent::PoolState(_) => "pool_state",
            ActionEvent::RuleFired(_) => "rule_fired",
            ActionEvent::LateCrossing(_) => "late_crossing",
        }
    }
}

/// Deterministic event id: 128-bit xxh3 of kind, subject and cause, hex.
pub(crate) fn event_id(kind: &str, subject: &str, cause: &Cause) -> String {
    format!("{:032x}", event_hash(kind, subject, cause))
}

/// The number [`event_id`] writes in hex.
pub(crate) fn event_hash(kind: &str, subject: &str, cause: &Cause) -> u128 {
    let mut key = String::with_capacity(96);
    key.push_str(kind);
    key.push('|');
    key.push_str(subject);
    key.push('|');
    cause.write_key(&mut key);
    xxhash_rust::xxh3::xxh3_128(key.as_bytes())
}

/// What kind of cause a change had, without its details (those are in
/// its event): small enough to keep beside every card.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CauseKind {
    /// A usage record (the card's, or a pool member's).
    Record,
    /// A command.
    Command,
    /// A new billing cycle.
    Rollover,
    /// A deadline passed.
    Deadline(DeadlineKind),
}

impl From<&Cause> for CauseKind {
    fn from(cause: &Cause) -> CauseKind {
        match cause {
            Cause::Record { .. } => CauseKind::Record,
            Cause::Command { .. } => CauseKind::Command,
            Cause::Rollover { .. } => CauseKind::Rollover,
            Cause::Deadline { kind, .. } => CauseKind::Deadline(*kind),
        }
    }
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
    /// Counted in its cycle's engine usage: the card's current cycle, or
    /// its closed cycle when it came within the allowed lateness.
    pub counted: bool,
    /// Arrived after its cycle closed (beyond the allowed lateness): kept
    /// in history, never changes state.
    pub late: bool,
}

/// A pool's total for a closed cycle: written at the rollover, and again,
/// final, once the allowed lateness has passed and no record can add to
/// it any more (the figure a post-paid backward pool is billed on).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolCycleTotal {
    /// The pool.
    pub pool: PoolId,
    /// Display name.
    pub name: String,
    /// Kind.
    pub kind: PoolKind,
    /// The carrier whose cycle the pool follows, if any.
    pub carrier: Option<Carrier>,
    /// The closed cycle.
    pub cycle: CycleId,
    /// Its state at the end of the cycle.
    pub state: PoolState,
    /// Members at the end of the cycle.
    pub members: u64,
    /// The members' usage counted for the cycle.
    pub usage_bytes: u64,
    /// Allowance at the end of the cycle (forward pools).
    pub allowance_bytes: u64,
    /// When: the cycle's end, or the end of its lateness when final.
    pub at: Timestamp,
    /// No record can add to it any more.
    #[serde(rename = "final")]
    pub final_total: bool,
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
    /// A pool's closed-cycle total (history).
    PoolCycle(Box<PoolCycleTotal>),
}
