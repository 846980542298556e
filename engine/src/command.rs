//! Control commands (SPEC section 5): their wire format and their results.
//!
//! Every change to configuration or operator-driven state is a [`Command`]
//! with an id, an event time (`at`) and an optional operator. Commands are
//! journaled; with the usage records they fully determine engine state.
//! Batch forms carry `iccids` (1 to [`MAX_BATCH`]) and answer per card.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::domain::{CardState, Carrier, TrafficType};
use crate::ids::{CommandId, Iccid, PlanId, PoolId, TagId};
use crate::time::Timestamp;

/// Most cards one batch command may name.
pub const MAX_BATCH: usize = 100_000;
/// Most tags one card may hold.
pub const MAX_TAGS_PER_CARD: usize = 10;
/// Most tags one operator may define.
pub const MAX_TAGS: usize = 10_000;
/// Most custom attribute names per operator.
pub const MAX_ATTRIBUTE_NAMES: usize = 6;
/// How far a plan term or a renewal may reach, in months from the
/// command's `at` (SPEC section 2.1: "total renewal may not reach beyond 6
/// years from now"). It also keeps every month computation from input far
/// inside the date arithmetic's range.
pub const MAX_MONTHS_AHEAD: u32 = 72;

/// One command as it arrives (JSON object, one per Kafka message or line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Unique id; a repeat is answered with the first result.
    pub id: CommandId,
    /// Event time at which the command takes effect.
    pub at: Timestamp,
    /// Who issued it (audit trail).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    /// What it does.
    #[serde(flatten)]
    pub kind: CommandKind,
}

/// The command types. Field names follow SPEC section 5.1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CommandKind {
    /// Create or replace a plan.
    UpsertPlan {
        /// The plan.
        plan: PlanSpec,
    },
    /// Remove a plan no card uses.
    RemovePlan {
        /// Its id.
        plan: PlanId,
    },
    /// Create or update one card.
    UpsertCard {
        /// The card.
        card: CardSpec,
    },
    /// Activate cards (from testable, inactive or activatable).
    Activate {
        /// The cards.
        iccids: Vec<Iccid>,
    },
    /// Operator suspend (`manual`).
    Suspend {
        /// The cards.
        iccids: Vec<Iccid>,
    },
    /// Operator resume: lifts `manual` and `violation` (not a cmcc card's
    /// violation for a device move: that takes a rebind).
    Resume {
        /// The cards.
        iccids: Vec<Iccid>,
    },
    /// Terminal deregistration.
    Deregister {
        /// The cards.
        iccids: Vec<Iccid>,
    },
    /// Extend the plan term of activated cards that have not expired and
    /// are in no backward pool (SPEC section 2.1).
    Renew {
        /// The cards.
        iccids: Vec<Iccid>,
        /// Months added to the current expiry.
        months: u32,
    },
    /// Set the cut-off threshold (`-1` none, `0` first byte, `N` MB).
    SetThreshold {
        /// The cards.
        iccids: Vec<Iccid>,
        /// Threshold in MB.
        mb: i64,
    },
    /// Cancel the cut-off threshold. Does not lift an existing cut.
    ClearThreshold {
        /// The cards.
        iccids: Vec<Iccid>,
    },
    /// Buy an add-on pack for one card or one forward pool, valid for the
    /// cycle that contains `at`.
    AddOn {
        /// The card (exactly one of `iccid` and `pool`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        iccid: Option<Iccid>,
        /// The forward pool.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pool: Option<PoolId>,
        /// Size of the pack in MB.
        mb: u64,
    },
    /// Create a forward or backward pool.
    CreatePool {
        /// The pool.
        pool: PoolSpec,
    },
    /// Add members to a pool.
    AddPoolMembers {
        /// The pool.
        pool: PoolId,
        /// The cards.
        iccids: Vec<Iccid>,
    },
    /// Remove members from a pool.
    RemovePoolMembers {
        /// The pool.
        pool: PoolId,
        /// The cards.
        iccids: Vec<Iccid>,
    },
    /// Give a pool a new display name (its id stays).
    RenamePool {
        /// The pool.
        pool: PoolId,
        /// The new name.
        name: String,
    },
    /// Freeze a backward pool for arrears (`pool_frozen` on every member).
    FreezePool {
        /// The backward pool.
        pool: PoolId,
    },
    /// Lift a freeze (and a retention: the arrears are settled).
    UnfreezePool {
        /// The backward pool.
        pool: PoolId,
    },
    /// The arrears of a frozen backward pool are not settled: the pool is
    /// retained until `EngineConfig::pool_retention_days` after `at`, then
    /// abandoned.
    RetainPool {
        /// The frozen backward pool.
        pool: PoolId,
    },
    /// Bring an abandoned backward pool back (arrears settled), within one
    /// month of its abandonment: its members' freeze is lifted.
    ReenablePool {
        /// The abandoned backward pool.
        pool: PoolId,
    },
    /// Carrier-reported violation (e.g. SIM moved to another device).
    ReportViolation {
        /// The cards.
        iccids: Vec<Iccid>,
    },
    /// Bind a card to a (new) device: lifts `violation` and a separation
    /// (not for cucc cards; ctcc and tri at most twice a month).
    Rebind {
        /// The card.
        iccid: Iccid,
        /// The new IMEI; without one the card binds to the device of its
        /// next record.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        imei: Option<String>,
    },
    /// Create or replace an automation rule.
    UpsertRule {
        /// The rule.
        rule: RuleSpec,
    },
    /// Enable a rule.
    EnableRule {
        /// Its id.
        rule: String,
    },
    /// Disable a rule.
    DisableRule {
        /// Its id.
        rule: String,
    },
    /// Remove a rule.
    RemoveRule {
        /// Its id.
        rule: String,
    },
    /// Create or replace a webhook endpoint.
    UpsertWebhook {
        /// The endpoint.
        webhook: WebhookSpec,
    },
    /// Remove a webhook endpoint.
    RemoveWebhook {
        /// Its id.
        webhook: String,
    },
    /// Create a tag.
    UpsertTag {
        /// The tag.
        tag: TagSpec,
    },
    /// Remove a tag (refused while an enabled rule references it).
    RemoveTag {
        /// Its name.
        tag: TagId,
    },
    /// Bind tags to cards.
    BindTags {
        /// The cards.
        iccids: Vec<Iccid>,
        /// The tags.
        tags: Vec<TagId>,
    },
    /// Unbind tags from cards.
    UnbindTags {
        /// The cards.
        iccids: Vec<Iccid>,
        /// The tags.
        tags: Vec<TagId>,
    },
    /// Set custom attribute values on cards: each name given is set, a
    /// `null` value removes it (names must be declared).
    SetAttributes {
        /// The cards.
        iccids: Vec<Iccid>,
        /// Name to value (`null`: remove).
        attributes: BTreeMap<String, Option<String>>,
    },
    /// Set the operator's custom attribute names (at most 6).
    SetAttributeNames {
        /// The names.
        names: Vec<String>,
    },
    /// Enable a declared custom attribute name (names start enabled).
    EnableAttribute {
        /// The name.
        name: String,
    },
    /// Disable a declared custom attribute name: it can no longer be set
    /// or used in a rule filter, and views leave it out (values are kept).
    DisableAttribute {
        /// The name.
        name: String,
    },
}

impl CommandKind {
    /// The wire name of the type.
    pub fn type_name(&self) -> &'static str {
        match self {
            CommandKind::UpsertPlan { .. } => "upsert_plan",
            CommandKind::RemovePlan { .. } => "remove_plan",
            CommandKind::UpsertCard { .. } => "upsert_card",
            CommandKind::Activate { .. } => "activate",
            CommandKind::Suspend { .. } => "suspend",
            CommandKind::Resume { .. } => "resume",
            CommandKind::Deregister { .. } => "deregister",
            CommandKind::Renew { .. } => "renew",
            CommandKind::SetThreshold { .. } => "set_threshold",
            CommandKind::ClearThreshold { .. } => "clear_threshold",
            CommandKind::AddOn { .. } => "add_on",
            CommandKind::CreatePool { .. } => "create_pool",
            CommandKind::AddPoolMembers { .. } => "add_pool_members",
            CommandKind::RemovePoolMembers { .. } => "remove_pool_members",
            CommandKind::RenamePool { .. } => "rename_pool",
            CommandKind::FreezePool { .. } => "freeze_pool",
            CommandKind::UnfreezePool { .. } => "unfreeze_pool",
            CommandKind::RetainPool { .. } => "retain_pool",
            CommandKind::ReenablePool { .. } => "reenable_pool",
            CommandKind::ReportViolation { .. } => "report_violation",
            CommandKind::Rebind { .. } => "rebind",
            CommandKind::UpsertRule { .. } => "upsert_rule",
            CommandKind::EnableRule { .. } => "enable_rule",
            CommandKind::DisableRule { .. } => "disable_rule",
            CommandKind::RemoveRule { .. } => "remove_rule",
            CommandKind::UpsertWebhook { .. } => "upsert_webhook",
            CommandKind::RemoveWebhook { .. } => "remove_webhook",
            CommandKind::UpsertTag { .. } => "upsert_tag",
            CommandKind::RemoveTag { .. } => "remove_tag",
            CommandKind::BindTags { .. } => "bind_tags",
            CommandKind::UnbindTags { .. } => "unbind_tags",
            CommandKind::SetAttributes { .. } => "set_attributes",
            CommandKind::SetAttributeNames { .. } => "set_attribute_names",
            CommandKind::EnableAttribute { .. } => "enable_attribute",
            CommandKind::DisableAttribute { .. } => "disable_attribute",
        }
    }

    /// The batch of cards the command names, for batch forms.
    pub fn batch(&self) -> Option<&[Iccid]> {
        match self {
            CommandKind::Activate { iccids }
            | CommandKind::Suspend { iccids }
            | CommandKind::Resume { iccids }
            | CommandKind::Deregister { iccids }
            | CommandKind::Renew { iccids, .. }
            | CommandKind::SetThreshold { iccids, .. }
            | CommandKind::ClearThreshold { iccids }
            | CommandKind::AddPoolMembers { iccids, .. }
            | CommandKind::RemovePoolMembers { iccids, .. }
            | CommandKind::ReportViolation { iccids }
            | CommandKind::SetAttributes { iccids, .. }
            | CommandKind::BindTags { iccids, .. }
            | CommandKind::UnbindTags { iccids, .. } => Some(iccids),
            _ => None,
        }
    }
}

/// A plan: a monthly allowance and a traffic type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanSpec {
    /// Id, e.g. `cmcc-30m`.
    pub id: PlanId,
    /// Display name (used in notifications).
    #[serde(default)]
    pub name: String,
    /// Carrier the plan belongs to.
    pub carrier: Carrier,
    /// Monthly allowance in MB.
    pub allowance_mb: u64,
    /// `general` or `directed`.
    pub traffic: TrafficType,
    /// Purchased term in months (expiry = activation + term).
    #[serde(default = "default_term_months")]
    pub term_months: u32,
}

fn default_term_months() -> u32 {
    12
}

/// One card's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CardSpec {
    /// The ICCID.
    pub iccid: Iccid,
    /// Carrier.
    pub carrier: Carrier,
    /// Plan id (must exist, same carrier).
    pub plan: PlanId,
    /// State. New cards default to `activatable`; for an existing card an
    /// omitted state keeps the current one. `suspended` means active with
    /// the `manual` reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<CardState>,
    /// Activation time (set for active cards; omitted on an existing card:
    /// kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activated_at: Option<Timestamp>,
    /// Plan expiry (omitted on an existing card: kept; on a new active card:
    /// activation + the plan's term).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
    /// End of the test period (testable cards).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_ends_at: Option<Timestamp>,
    /// Test allowance in MB (testable cards; default none = unlimited until
    /// the test period ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_allowance_mb: Option<u64>,
    /// End of the silent period (activatable cards; default issue + 6 months).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub silent_ends_at: Option<Timestamp>,
    /// MSISDN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msisdn: Option<String>,
    /// IMSI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imsi: Option<String>,
    /// IMEI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imei: Option<String>,
    /// Tags (at most 10, each defined). On an existing card a non-empty
    /// list replaces the card's tags; an empty or omitted one keeps them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<TagId>,
    /// Custom attributes (names must be declared). On an existing card the
    /// names given are set and the others kept.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
    /// Fields to empty on an existing card. Every other field the command
    /// leaves out keeps its value (patch semantics); a field may not be
    /// both given and cleared.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clear: Vec<CardField>,
}

/// A card field that `upsert_card` can empty ([`CardSpec::clear`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CardField {
    /// The MSISDN.
    Msisdn,
    /// The IMSI.
    Imsi,
    /// The IMEI (the bound device).
    Imei,
    /// Every tag.
    Tags,
    /// Every custom attribute.
    Attributes,
    /// The end of the test period.
    TestEndsAt,
    /// The test allowance.
    TestAllowanceMb,
}

impl CardField {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            CardField::Msisdn => "msisdn",
            CardField::Imsi => "imsi",
            CardField::Imei => "imei",
            CardField::Tags => "tags",
            CardField::Attributes => "attributes",
            CardField::TestEndsAt => "test_ends_at",
            CardField::TestAllowanceMb => "test_allowance_mb",
        }
    }
}

/// Forward pools share allowance; backward pools sum post-paid usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolKind {
    /// Shared allowance: members of one carrier, traffic type and plan.
    Forward,
    /// Post-paid: usage summed and billed.
    Backward,
}

/// A pool's definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    /// Id.
    pub id: PoolId,
    /// Forward or backward.
    pub kind: PoolKind,
    /// Display name.
    #[serde(default)]
    pub name: String,
    /// Carrier (forward pools: members must match).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carrier: Option<Carrier>,
    /// Plan (forward pools: members must use it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<PlanId>,
}

/// A tag's definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagSpec {
    /// Name (unique).
    pub name: TagId,
    /// Free description.
    #[serde(default)]
    pub description: String,
}

/// A webhook endpoint. Its `Debug` shows the secret redacted
/// ([`crate::redact`]).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSpec {
    /// Id.
    pub id: String,
    /// Target URL (`http` or `https`).
    pub url: String,
    /// Signing secret (Standard Webhooks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// PEM CA certificate for a private TLS receiver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<String>,
}

impl std::fmt::Debug for WebhookSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSpec")
            .field("id", &self.id)
            .field("url", &self.url)
            .field("secret", &self.secret.as_deref().map(crate::redact::secret))
            .field("ca_cert", &self.ca_cert)
            .finish()
    }
}

/// An automation rule's definition (SPEC section 6). The engine keeps the
/// registry, validates it ([`crate::rule::compile`]) and fires it in the
/// shards; payloads and delivery live in `flowcap-rules`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Id.
    pub id: String,
    /// Display name.
    #[serde(default)]
    pub name: String,
    /// Whether it fires.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Type code: 1 order management, 2 usage, 3 pool, 4 status change.
    #[serde(rename = "type")]
    pub rule_type: u8,
    /// Type-specific condition, e.g. `{"remaining_mb_lte": 10}`.
    #[serde(default)]
    pub condition: serde_json::Value,
    /// Which cards or pools the rule watches.
    #[serde(default)]
    pub filter: RuleFilter,
    /// What happens when it fires: `{"type": "webhook", "endpoint": ID,
    /// "merge": BOOL}`, `{"type": "email", "to": [...]}`, `{"type": "sms",
    /// "to": [...]}`, `{"type": "suspend"}`; each may name its own
    /// `"reminder"`.
    #[serde(default)]
    pub actions: Vec<serde_json::Value>,
    /// Default reminder window of the rule's actions (`every`, `day`,
    /// `cycle`, `once`); omitted: per day for type 1, per cycle for types 2
    /// and 3, every transition for type 4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reminder: Option<crate::rule::Reminder>,
}

fn default_true() -> bool {
    true
}

/// Rule filter: all lists optional; empty means every card.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFilter {
    /// Plans.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plans: Vec<PlanId>,
    /// Tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<TagId>,
    /// Forward pools.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forward_pools: Vec<PoolId>,
    /// Backward pools.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backward_pools: Vec<PoolId>,
    /// Custom attribute values a card must all have (names declared).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

/// A specific, stable error code with a human message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandError {
    /// Machine-readable code, e.g. `threshold_not_allowed`.
    pub code: ErrorCode,
    /// What went wrong, for a person.
    pub message: String,
}

impl CommandError {
    /// An error with a code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> CommandError {
        CommandError {
            code,
            message: message.into(),
        }
    }
}

/// Every error code a command can answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not a JSON command object, or a field is missing or mistyped.
    Malformed,
    /// `type` names no known command.
    UnknownType,
    /// Larger than the configured maximum command size: not read.
    TooLarge,
    /// Batch with no card.
    EmptyBatch,
    /// Batch above 100,000 cards.
    BatchTooLarge,
    /// A card named by a batch twice.
    DuplicateCard,
    /// No such card.
    UnknownCard,
    /// No such plan.
    UnknownPlan,
    /// No such pool.
    UnknownPool,
    /// No such tag.
    UnknownTag,
    /// No such rule.
    UnknownRule,
    /// No such webhook.
    UnknownWebhook,
    /// Id already used (e.g. create_pool on an existing pool).
    AlreadyExists,
    /// Plan carrier does not match the card's carrier.
    CarrierMismatch,
    /// Forward pool members must share carrier, traffic type and plan.
    PoolMemberMismatch,
    /// Card already belongs to another pool.
    AlreadyInPool,
    /// Card is not a member of that pool.
    NotInPool,
    /// Wrong pool kind for this command.
    WrongPoolKind,
    /// Threshold not accepted (cmcc/cucc outside a forward pool).
    ThresholdNotAllowed,
    /// Threshold below -1; a rule threshold out of range or not an integer.
    InvalidThreshold,
    /// A rule condition that is malformed or does not fit the rule type.
    InvalidCondition,
    /// A rule action that is malformed (unknown type or field, bad
    /// recipient, suspend on a rule that cannot suspend).
    InvalidAction,
    /// More than 10 tags on a card.
    TooManyTags,
    /// More than 10,000 tags for the operator.
    TagLimitReached,
    /// Tag referenced by an enabled rule.
    TagInUse,
    /// Webhook endpoint referenced by an enabled rule.
    WebhookInUse,
    /// Plan used by cards or pools.
    PlanInUse,
    /// More than 6 custom attribute names, or an undeclared attribute.
    InvalidAttribute,
    /// Card is deregistered (terminal).
    Deregistered,
    /// State transition not allowed (e.g. activate an active card).
    InvalidState,
    /// A field's value is out of range (e.g. add-on of 0 MB, bad URL).
    InvalidValue,
    /// `at` is further ahead of the event clock (and of the receive time)
    /// than `max_future_ms`: refused as a whole, the clock unmoved.
    FutureAt,
    /// A renewal or plan term that reaches beyond 6 years from the
    /// command's `at` ([`MAX_MONTHS_AHEAD`]).
    InvalidMonths,
    /// A card add-on for a card that is neither active nor suspended for
    /// its usage (SPEC section 2.1).
    AddOnNotAllowed,
    /// A card add-on that would take a `general` card's plan plus add-ons
    /// past the 100 MB general cap.
    GeneralCapExceeded,
    /// A renewal of a card that was never activated.
    NotActivated,
    /// A renewal of a card whose plan has expired.
    CardExpired,
    /// A renewal of a backward-pool member (post-paid).
    InBackwardPool,
    /// A rebind of a cucc card: the carrier unbinds, it offers no rebind.
    RebindNotOffered,
    /// A ctcc or tri card rebound twice this calendar month already.
    RebindLimit,
    /// A resume of a cmcc card whose SIM moved: only a rebind lifts it.
    RebindRequired,
    /// A card in its test period named to join a pool.
    TestPeriodCard,
    /// A member, add-on, freeze or retention for an abandoned pool.
    PoolAbandoned,
    /// A retention of a backward pool that is not frozen for arrears.
    PoolNotFrozen,
    /// A re-enable of a pool that is not abandoned.
    PoolNotAbandoned,
    /// A re-enable more than one month after the pool was abandoned.
    ReenableExpired,
    /// A custom attribute name the operator disabled, named to be set or
    /// in a rule filter.
    AttributeDisabled,
    /// A custom attribute name disabled while an enabled rule filters on
    /// it.
    AttributeInUse,
}

/// The outcome for one card of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardResult {
    /// The card.
    pub iccid: Iccid,
    /// Whether it succeeded.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<CommandError>,
}

/// The answer to one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    /// The command answered.
    pub command_id: CommandId,
    /// True when the command (and, for batches, every card) succeeded.
    pub ok: bool,
    /// Whole-command error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<CommandError>,
    /// Per-card outcomes, for batch forms.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<CardResult>,
}

impl CommandResult {
    /// A whole-command failure that changed nothing.
    pub fn rejected(command_id: CommandId, error: CommandError) -> CommandResult {
        CommandResult {
            command_id,
            ok: false,
            error: Some(error),
            results: Vec::new(),
        }
    }
}

/// Parses one command from JSON, with a specific error.
pub fn parse_command(bytes: &[u8]) -> Result<Command, CommandError> {
    match serde_json::from_slice::<Command>(bytes) {
        Ok(command) => Ok(command),
        Err(e) => {
            let message = e.to_string();
            // Only an unknown `type` is `unknown_type`; an unknown enum value
            // inside a known command (e.g. a carrier) is malformed.
            let type_name = serde_json::from_slice::<serde_json::Value>(bytes)
                .ok()
                .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_owned));
            let code = match type_name {
                Some(t) if message.contains(&format!("unknown variant `{t}`")) => {
                    ErrorCode::UnknownType
                }
                _ => ErrorCode::Malformed,
            };
            Err(CommandError::new(code, message))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_spec_examples() {
        let lines = [
            r#"{"id": "c1", "type": "upsert_plan", "at": "2026-11-01T00:00:00+08:00",
 "plan": {"id": "cmcc-30m", "name": "CMCC 30MB monthly", "carrier": "cmcc",
          "allowance_mb": 30, "traffic": "directed", "term_months": 12}}"#,
            r#"{"id": "c2", "type": "upsert_card", "at": "2026-11-01T00:00:00+08:00",
 "card": {"iccid": "89860412345678901234", "carrier": "cmcc",
          "plan": "cmcc-30m", "state": "active",
          "activated_at": "2026-01-05T00:00:00+08:00",
          "expires_at": "2027-01-05T00:00:00+08:00",
          "msisdn": "1440412345678", "imsi": "460041234567890",
          "imei": "864000000000001", "tags": ["fleet-a"],
          "attributes": {"customer": "acme"}}}"#,
            r#"{"id": "c3", "type": "create_pool", "at": "2026-11-01T00:00:00+08:00",
 "pool": {"id": "p1", "kind": "forward", "name": "Fleet A", "carrier": "cmcc", "plan": "cmcc-30m"}}"#,
            r#"{"id": "c4", "type": "add_pool_members", "at": "2026-11-01T00:00:00+08:00", "pool": "p1", "iccids": ["89860412345678901234"]}"#,
            r#"{"id": "c5", "type": "set_threshold", "at": "2026-11-01T00:00:00+08:00", "iccids": ["89860412345678901234"], "mb": 50}"#,
            r#"{"id": "c6", "type": "add_on", "at": "2026-11-01T00:00:00+08:00", "iccid": "89860412345678901234", "mb": 100}"#,
        ];
        let types: Vec<_> = lines
            .iter()
            .map(|l| parse_command(l.as_bytes()).unwrap().kind.type_name())
            .collect();
        assert_eq!(
            types,
            [
                "upsert_plan",
                "upsert_card",
                "create_pool",
                "add_pool_members",
                "set_threshold",
                "add_on"
            ]
        );
    }

    #[test]
    fn unknown_type_and_malformed_are_distinguished() {
        let e = parse_command(br#"{"id":"x","type":"explode","at":"2026-11-01T00:00:00Z"}"#)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownType);
        let e = parse_command(b"not json").unwrap_err();
        assert_eq!(e.code, ErrorCode::Malformed);
        let e = parse_command(
            br#"{"id":"x","type":"suspend","at":"2026-11-01T00:00:00Z","iccids":["12"]}"#,
        )
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::Malformed);
        assert!(e.message.contains("ICCID"), "{}", e.message);
    }

    #[test]
    fn round_trips_through_json() {
        let line = r#"{"id":"c5","type":"set_threshold","at":"2026-11-01T00:00:00+08:00","iccids":["89860412345678901234"],"mb":-1}"#;
        let cmd = parse_command(line.as_bytes()).unwrap();
        let again = parse_command(serde_json::to_string(&cmd).unwrap().as_bytes()).unwrap();
        assert_eq!(cmd, again);
    }
}
