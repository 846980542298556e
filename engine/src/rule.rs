//! Automation rules (SPEC section 6): the parsed form of a rule, its
//! validation, and the per-target fired state that makes firing exact.
//!
//! The registry keeps every rule as its wire [`RuleSpec`]; [`compile`]
//! checks it (one specific error code per defect) and turns it into a
//! [`Compiled`] rule. Shards hold the enabled rules with their filters
//! resolved to shard-local indexes and evaluate them where the card and pool
//! state is, on the same thread, at the end of every cause (record, command,
//! rollover, deadline, day start), so firings are decided exactly once and
//! snapshotted with the state they depend on.
//!
//! # When a rule fires
//!
//! A rule *fires* for a target (a card, or a pool for type 3) when its
//! condition **enters**: it holds at an evaluation and did not hold at the
//! previous evaluation of the same rule and target (a target never
//! evaluated counts as outside). Each action then runs unless the target
//! already fired for it in the action's current **reminder window**. Some
//! windows also **remind**: while the condition keeps holding, the action
//! fires again at the start of each new window (at a local midnight), so
//! an expiry rule reminds every day until the card is renewed.
//!
//! | [`Reminder`] | fires | default for |
//! | --- | --- | --- |
//! | `every` | at every entry, never while the condition only holds | type 4 |
//! | `day` | at entry, then each local day (billing time zone) while it holds; at most once a day | type 1 |
//! | `every_N_days` | at entry, then every N days while it holds; at most once in N days | |
//! | `cycle` | at entry, then each billing cycle of the target while it holds; at most once a cycle | types 2 and 3 |
//! | `once` | once, ever (until the rule is removed) | |
//!
//! A new cycle starts outside for usage conditions (types 2, 3): a target
//! that is inside at the first evaluation of a cycle fires again, as an
//! entry (its day start does not remind: the old cycle's usage no longer
//! counts). A state change (type 4) is an entry by itself and never holds,
//! so it never reminds.
//!
//! The fired state ([`Mark`]) is part of the shard and thus of every
//! snapshot; each firing's id is `xxh3-128("rule_fired" | rule|target |
//! cause)` like every event id, so a replay repeats the same ids.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::command::{CommandError, ErrorCode, RuleSpec};
use crate::cycle::CycleId;
use crate::domain::{CardState, MB};

/// Largest usage threshold a rule accepts, in MB (1 TiB).
pub const MAX_RULE_MB: u64 = 1 << 20;
/// Largest `days_to_expiry_lte` a rule accepts (ten years).
pub const MAX_RULE_DAYS: u32 = 3660;
/// Most recipients of one email or SMS action.
pub const MAX_RECIPIENTS: usize = 50;

/// The four rule types of SPEC section 6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RuleType {
    /// 1, order management: days to plan expiry.
    PlanExpiry = 1,
    /// 2, usage monitoring: a card's cycle usage.
    CardUsage = 2,
    /// 3, pool monitoring: a forward or backward pool's cycle usage.
    PoolUsage = 3,
    /// 4, status change: a card's visible state changed.
    StateChange = 4,
}

impl RuleType {
    /// From the wire code.
    pub fn from_code(code: u8) -> Option<RuleType> {
        match code {
            1 => Some(RuleType::PlanExpiry),
            2 => Some(RuleType::CardUsage),
            3 => Some(RuleType::PoolUsage),
            4 => Some(RuleType::StateChange),
            _ => None,
        }
    }

    /// The wire code.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The reminder window used when neither the action nor the rule names
    /// one.
    pub fn default_reminder(self) -> Reminder {
        match self {
            RuleType::PlanExpiry => Reminder::Day,
            RuleType::CardUsage | RuleType::PoolUsage => Reminder::Cycle,
            RuleType::StateChange => Reminder::Every,
        }
    }
}

/// A rule's condition, as written in the rule (`{"used_mb_gte": 50}`) and as
/// reported in firings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleCondition {
    /// Type 1: whole local days from today to the expiry date <= N.
    DaysToExpiryLte(u32),
    /// Types 2 and 3: allowance minus cycle usage <= N MB.
    RemainingMbLte(u64),
    /// Types 2 and 3: cycle usage >= N MB.
    UsedMbGte(u64),
    /// Type 4: the visible state changed from a state in `from` (any when
    /// empty) to one in `to` (any when empty).
    StateChange {
        /// Old states.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        from: Vec<CardState>,
        /// New states.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        to: Vec<CardState>,
    },
}

impl RuleCondition {
    /// The condition as the rule's JSON (`{"remaining_mb_lte": 10}`,
    /// `{"from": [...], "to": [...]}`), for execution records.
    pub fn to_json(&self) -> String {
        let value = match self {
            RuleCondition::DaysToExpiryLte(n) => serde_json::json!({ "days_to_expiry_lte": n }),
            RuleCondition::RemainingMbLte(n) => serde_json::json!({ "remaining_mb_lte": n }),
            RuleCondition::UsedMbGte(n) => serde_json::json!({ "used_mb_gte": n }),
            RuleCondition::StateChange { from, to } => {
                let mut map = serde_json::Map::new();
                if !from.is_empty() {
                    map.insert("from".into(), serde_json::json!(from));
                }
                if !to.is_empty() {
                    map.insert("to".into(), serde_json::json!(to));
                }
                Value::Object(map)
            }
        };
        value.to_string()
    }

    /// Whether usage (`used` bytes against `allowance` bytes, if any)
    /// satisfies a usage condition. `false` for other conditions, and for
    /// remaining conditions on targets without a positive allowance.
    pub fn usage_holds(&self, used: u64, allowance: Option<u64>) -> bool {
        match *self {
            RuleCondition::UsedMbGte(n) => used >= n.saturating_mul(MB),
            RuleCondition::RemainingMbLte(n) => match allowance {
                Some(a) if a > 0 => remaining(used, a) <= i128::from(n.saturating_mul(MB)),
                _ => false,
            },
            _ => false,
        }
    }

    /// Whether a state change from `old` to `new` satisfies a type 4
    /// condition.
    pub fn change_holds(&self, old: CardState, new: CardState) -> bool {
        match self {
            RuleCondition::StateChange { from, to } => {
                old != new
                    && (from.is_empty() || from.contains(&old))
                    && (to.is_empty() || to.contains(&new))
            }
            _ => false,
        }
    }
}

/// Allowance minus usage, signed.
pub(crate) fn remaining(used: u64, allowance: u64) -> i128 {
    i128::from(allowance) - i128::from(used)
}

/// How often one action may fire for one rule and target. On the wire a
/// string: `every`, `day`, `cycle`, `once` or `every_N_days` (N from 1 to
/// [`MAX_REMINDER_DAYS`]; `every_1_days` is `day`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reminder {
    /// Every entry into the condition.
    Every,
    /// At entry, then once each local day (billing time zone) while the
    /// condition holds.
    Day,
    /// At entry, then every N local days while the condition holds.
    EveryDays(u16),
    /// At entry, then once each billing cycle of the target while the
    /// condition holds.
    Cycle,
    /// At most once, ever.
    Once,
}

/// Longest `every_N_days` window.
pub const MAX_REMINDER_DAYS: u16 = 366;

impl Reminder {
    fn parse(value: &Value) -> Option<Reminder> {
        value.as_str().and_then(Reminder::from_name)
    }

    /// The window of a wire name.
    pub fn from_name(name: &str) -> Option<Reminder> {
        Some(match name {
            "every" => Reminder::Every,
            "day" => Reminder::Day,
            "cycle" => Reminder::Cycle,
            "once" => Reminder::Once,
            other => {
                let n: u16 = other
                    .strip_prefix("every_")?
                    .strip_suffix("_days")?
                    .parse()
                    .ok()?;
                match n {
                    1 => Reminder::Day,
                    2..=MAX_REMINDER_DAYS => Reminder::EveryDays(n),
                    _ => return None,
                }
            }
        })
    }

    /// The wire name.
    pub fn name(self) -> std::borrow::Cow<'static, str> {
        match self {
            Reminder::Every => "every".into(),
            Reminder::Day => "day".into(),
            Reminder::EveryDays(n) => format!("every_{n}_days").into(),
            Reminder::Cycle => "cycle".into(),
            Reminder::Once => "once".into(),
        }
    }

    /// Whether the action fires again while the condition keeps holding
    /// (at the start of its next window).
    pub fn reminds(self) -> bool {
        matches!(
            self,
            Reminder::Day | Reminder::EveryDays(_) | Reminder::Cycle
        )
    }
}

impl Serialize for Reminder {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.name())
    }
}

impl<'de> Deserialize<'de> for Reminder {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        Reminder::from_name(&name).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "reminder {name:?} is not one of every, day, cycle, once, every_N_days (N 1 to {MAX_REMINDER_DAYS})"
            ))
        })
    }
}

/// Delivery channel of an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    /// Push to a registered webhook endpoint.
    Webhook,
    /// Email through SMTP.
    Email,
    /// SMS through the HTTP gateway.
    Sms,
    /// Backward-pool suspend (`backward_pool_threshold` on every member).
    Suspend,
}

impl Channel {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Webhook => "webhook",
            Channel::Email => "email",
            Channel::Sms => "sms",
            Channel::Suspend => "suspend",
        }
    }
}

/// One action of a rule, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleAction {
    /// Channel.
    pub channel: Channel,
    /// Webhook endpoint id (webhook actions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Email addresses or phone numbers (email and SMS actions).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<String>,
    /// Webhook: merge firings of many cards into one message (up to 500).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub merge: bool,
    /// Reminder window of this action.
    pub reminder: Reminder,
}

/// A rule after validation: what shards evaluate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    /// Type.
    pub rule_type: RuleType,
    /// Condition.
    pub condition: RuleCondition,
    /// Actions (may be empty: the firing is then only recorded).
    pub actions: Vec<RuleAction>,
    /// Window of a rule without actions.
    pub reminder: Reminder,
}

fn bad(code: ErrorCode, message: impl Into<String>) -> CommandError {
    CommandError::new(code, message)
}

/// A threshold: a non-negative integer within `max`.
fn threshold(key: &str, value: &Value, min: u64, max: u64) -> Result<u64, CommandError> {
    match value.as_u64() {
        Some(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(bad(
            ErrorCode::InvalidThreshold,
            format!("{key} must be an integer from {min} to {max}, got {value}"),
        )),
    }
}

fn states(key: &str, value: &Value) -> Result<Vec<CardState>, CommandError> {
    let Some(items) = value.as_array() else {
        return Err(bad(
            ErrorCode::InvalidCondition,
            format!("{key} must be a list of card states, got {value}"),
        ));
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let state: CardState = serde_json::from_value(item.clone()).map_err(|_| {
            bad(
                ErrorCode::InvalidCondition,
                format!(
                    "{key}: {item} is not a card state (testable, inactive, activatable, active, suspended, deregistered)"
                ),
            )
        })?;
        if !out.contains(&state) {
            out.push(state);
        }
    }
    Ok(out)
}

/// Parses and checks a rule's condition for its type.
pub fn parse_condition(
    rule_type: RuleType,
    condition: &Value,
) -> Result<RuleCondition, CommandError> {
    let Some(map) = condition.as_object() else {
        return Err(bad(
            ErrorCode::InvalidCondition,
            format!("the condition must be an object, got {condition}"),
        ));
    };
    let allowed: &[&str] = match rule_type {
        RuleType::PlanExpiry => &["days_to_expiry_lte"],
        RuleType::CardUsage | RuleType::PoolUsage => &["remaining_mb_lte", "used_mb_gte"],
        RuleType::StateChange => &["from", "to"],
    };
    if let Some(key) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(bad(
            ErrorCode::InvalidCondition,
            format!(
                "condition key {key:?} does not apply to a type {} rule (expected {})",
                rule_type.code(),
                allowed.join(" or ")
            ),
        ));
    }
    match rule_type {
        RuleType::PlanExpiry => match map.get("days_to_expiry_lte") {
            Some(v) => Ok(RuleCondition::DaysToExpiryLte(threshold(
                "days_to_expiry_lte",
                v,
                0,
                u64::from(MAX_RULE_DAYS),
            )? as u32)),
            None => Err(bad(
                ErrorCode::InvalidCondition,
                "a type 1 rule needs {\"days_to_expiry_lte\": N}",
            )),
        },
        RuleType::CardUsage | RuleType::PoolUsage => {
            match (map.get("remaining_mb_lte"), map.get("used_mb_gte")) {
                (Some(v), None) => Ok(RuleCondition::RemainingMbLte(threshold(
                    "remaining_mb_lte",
                    v,
                    0,
                    MAX_RULE_MB,
                )?)),
                // used >= 0 would hold for every target at once.
                (None, Some(v)) => Ok(RuleCondition::UsedMbGte(threshold(
                    "used_mb_gte",
                    v,
                    1,
                    MAX_RULE_MB,
                )?)),
                (Some(_), Some(_)) => Err(bad(
                    ErrorCode::InvalidCondition,
                    "give one of remaining_mb_lte and used_mb_gte, not both",
                )),
                (None, None) => Err(bad(
                    ErrorCode::InvalidCondition,
                    format!(
                        "a type {} rule needs {{\"remaining_mb_lte\": N}} or {{\"used_mb_gte\": N}}",
                        rule_type.code()
                    ),
                )),
            }
        }
        RuleType::StateChange => {
            let from = map
                .get("from")
                .map(|v| states("from", v))
                .transpose()?
                .unwrap_or_default();
            let to = map
                .get("to")
                .map(|v| states("to", v))
                .transpose()?
                .unwrap_or_default();
            if from.is_empty() && to.is_empty() {
                return Err(bad(
                    ErrorCode::InvalidCondition,
                    "a type 4 rule needs a non-empty \"from\" or \"to\" list of card states",
                ));
            }
            Ok(RuleCondition::StateChange { from, to })
        }
    }
}

fn recipients(channel: Channel, value: Option<&Value>) -> Result<Vec<String>, CommandError> {
    let list: Vec<String> = match value {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    if list.is_empty() || list.len() > MAX_RECIPIENTS {
        return Err(bad(
            ErrorCode::InvalidAction,
            format!(
                "a {} action needs \"to\": 1 to {MAX_RECIPIENTS} recipients",
                channel.as_str()
            ),
        ));
    }
    for r in &list {
        let ok = match channel {
            Channel::Email => {
                let mut parts = r.split('@');
                matches!((parts.next(), parts.next(), parts.next()),
                    (Some(user), Some(domain), None) if !user.is_empty() && domain.contains('.') && !r.chars().any(char::is_whitespace))
            }
            _ => {
                let digits = r.strip_prefix('+').unwrap_or(r);
                (5..=20).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit())
            }
        };
        if !ok {
            return Err(bad(
                ErrorCode::InvalidAction,
                format!(
                    "{r:?} is not a valid {} recipient",
                    if channel == Channel::Email {
                        "email"
                    } else {
                        "SMS (digits, optional leading +)"
                    }
                ),
            ));
        }
    }
    Ok(list)
}

/// Parses and checks one action. `webhook_exists` answers whether an
/// endpoint id is registered.
pub fn parse_action(
    rule_type: RuleType,
    condition: &RuleCondition,
    rule_reminder: Reminder,
    action: &Value,
    webhook_exists: &dyn Fn(&str) -> bool,
) -> Result<RuleAction, CommandError> {
    let Some(map) = action.as_object() else {
        return Err(bad(
            ErrorCode::InvalidAction,
            format!("an action must be an object, got {action}"),
        ));
    };
    let channel = match map.get("type").and_then(Value::as_str) {
        Some("webhook") => Channel::Webhook,
        Some("email") => Channel::Email,
        Some("sms") => Channel::Sms,
        Some("suspend") => Channel::Suspend,
        other => {
            return Err(bad(
                ErrorCode::InvalidAction,
                format!("unknown rule action type {other:?} (webhook, email, sms, suspend)"),
            ));
        }
    };
    let allowed: &[&str] = match channel {
        Channel::Webhook => &["type", "endpoint", "merge", "reminder"],
        Channel::Email | Channel::Sms => &["type", "to", "reminder"],
        Channel::Suspend => &["type"],
    };
    if let Some(key) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(bad(
            ErrorCode::InvalidAction,
            format!(
                "{key:?} is not a field of a {} action ({})",
                channel.as_str(),
                allowed.join(", ")
            ),
        ));
    }
    let reminder = match map.get("reminder") {
        None => rule_reminder,
        Some(v) => Reminder::parse(v).ok_or_else(|| {
            bad(
                ErrorCode::InvalidAction,
                format!(
                    "reminder {v} is not one of every, day, cycle, once, every_N_days (N 1 to {MAX_REMINDER_DAYS})"
                ),
            )
        })?,
    };
    let mut parsed = RuleAction {
        channel,
        endpoint: None,
        to: Vec::new(),
        merge: false,
        reminder,
    };
    match channel {
        Channel::Webhook => {
            let endpoint = map
                .get("endpoint")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if !webhook_exists(endpoint) {
                return Err(bad(
                    ErrorCode::UnknownWebhook,
                    format!("no webhook {endpoint:?}"),
                ));
            }
            parsed.endpoint = Some(endpoint.to_owned());
            parsed.merge = match map.get("merge") {
                None => false,
                Some(Value::Bool(b)) => *b,
                Some(v) => {
                    return Err(bad(
                        ErrorCode::InvalidAction,
                        format!("merge must be true or false, got {v}"),
                    ))
                }
            };
            if parsed.merge && rule_type == RuleType::PoolUsage {
                return Err(bad(
                    ErrorCode::InvalidAction,
                    "pool rules are not merged (SPEC section 6): a pool rule's webhook \
                     sends one message per pool",
                ));
            }
        }
        Channel::Email | Channel::Sms => parsed.to = recipients(channel, map.get("to"))?,
        Channel::Suspend => {
            if rule_type != RuleType::PoolUsage || !matches!(condition, RuleCondition::UsedMbGte(_))
            {
                return Err(bad(
                    ErrorCode::InvalidAction,
                    "the suspend action needs a type 3 rule on backward pools with condition {\"used_mb_gte\": N}",
                ));
            }
            // The cut lasts until the next cycle: one per cycle.
            parsed.reminder = Reminder::Cycle;
        }
    }
    Ok(parsed)
}

/// Checks a rule's type, condition and actions (the filter's references are
/// checked by the engine, which knows plans, tags and pools).
pub fn compile(
    spec: &RuleSpec,
    webhook_exists: &dyn Fn(&str) -> bool,
) -> Result<Compiled, CommandError> {
    let Some(rule_type) = RuleType::from_code(spec.rule_type) else {
        return Err(bad(
            ErrorCode::InvalidValue,
            format!("rule type {} is not one of 1, 2, 3, 4", spec.rule_type),
        ));
    };
    let condition = parse_condition(rule_type, &spec.condition)?;
    let reminder = spec
        .reminder
        .unwrap_or_else(|| rule_type.default_reminder());
    let actions = spec
        .actions
        .iter()
        .map(|a| parse_action(rule_type, &condition, reminder, a, webhook_exists))
        .collect::<Result<Vec<_>, _>>()?;
    if rule_type == RuleType::PoolUsage {
        if !spec.filter.tags.is_empty() {
            return Err(bad(
                ErrorCode::InvalidValue,
                "a type 3 rule watches pools: filter by plans, forward_pools or backward_pools, not tags",
            ));
        }
        if matches!(condition, RuleCondition::RemainingMbLte(_))
            && !spec.filter.backward_pools.is_empty()
        {
            return Err(bad(
                ErrorCode::InvalidCondition,
                "backward pools have no allowance: use used_mb_gte for them, not remaining_mb_lte",
            ));
        }
        if actions.iter().any(|a| a.channel == Channel::Suspend)
            && !(spec.filter.forward_pools.is_empty() && spec.filter.plans.is_empty())
        {
            return Err(bad(
                ErrorCode::InvalidAction,
                "the suspend action applies to backward pools: filter it by backward_pools only",
            ));
        }
    }
    Ok(Compiled {
        rule_type,
        condition,
        actions,
        reminder,
    })
}

/// The fired state of one rule for one target. Stored only while not
/// default (most targets never fire).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Mark {
    /// The condition held at the last evaluation: for usage conditions the
    /// `CycleId + 1` it held in (an older cycle counts as outside), else 1;
    /// 0 when outside.
    pub(crate) inside: u32,
    /// Fired for a `once` action.
    pub(crate) once: bool,
    /// `CycleId + 1` of the last firing of a `cycle` action (0: none).
    pub(crate) cycle: u32,
    /// `local day + 1` of the last firing of a `day` action (0: none).
    pub(crate) day: u32,
    /// `local day + 1` of the last firing of an `every_N_days` action (0:
    /// none). The rule's `every_N_days` actions share it.
    pub(crate) days: u32,
}

/// The windows a firing falls into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    pub(crate) cycle: CycleId,
    pub(crate) day: i64,
}

impl Mark {
    pub(crate) fn is_default(&self) -> bool {
        *self == Mark::default()
    }

    /// Whether an action with this reminder may fire in `window`.
    pub(crate) fn allows(&self, reminder: Reminder, window: Window) -> bool {
        match reminder {
            Reminder::Every => true,
            Reminder::Once => !self.once,
            Reminder::Cycle => self.cycle != window.cycle.0.saturating_add(1),
            Reminder::Day => i64::from(self.day) != window.day + 1,
            Reminder::EveryDays(n) => {
                self.days == 0 || window.day + 1 - i64::from(self.days) >= i64::from(n)
            }
        }
    }

    /// Records a firing of an action with this reminder in `window`.
    pub(crate) fn record(&mut self, reminder: Reminder, window: Window) {
        let day = u32::try_from(window.day + 1).unwrap_or(0);
        match reminder {
            Reminder::Every => {}
            Reminder::Once => self.once = true,
            Reminder::Cycle => self.cycle = window.cycle.0.saturating_add(1),
            Reminder::Day => self.day = day,
            Reminder::EveryDays(_) => self.days = day,
        }
    }

    /// After a rollover of the target's cycle: usage conditions start
    /// outside; cycle and day windows of the old cycle are over (cycles
    /// end at a local midnight), and so is an `every_N_days` one (a new
    /// cycle starts afresh).
    pub(crate) fn after_rollover(&mut self) {
        self.inside = 0;
        self.cycle = 0;
        self.day = 0;
        self.days = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(rule_type: u8, condition: Value, actions: Value) -> RuleSpec {
        serde_json::from_value(json!({
            "id": "r", "type": rule_type, "condition": condition, "actions": actions
        }))
        .unwrap()
    }

    fn code(spec: &RuleSpec) -> ErrorCode {
        compile(spec, &|e| e == "hook").unwrap_err().code
    }

    #[test]
    fn conditions_parse_per_type() {
        let c = compile(
            &spec(1, json!({"days_to_expiry_lte": 7}), json!([])),
            &|_| false,
        )
        .unwrap();
        assert_eq!(c.condition, RuleCondition::DaysToExpiryLte(7));
        assert_eq!(c.reminder, Reminder::Day);
        let c = compile(&spec(2, json!({"remaining_mb_lte": 0}), json!([])), &|_| {
            false
        })
        .unwrap();
        assert_eq!(c.condition, RuleCondition::RemainingMbLte(0));
        assert_eq!(c.reminder, Reminder::Cycle);
        let c = compile(
            &spec(4, json!({"to": ["suspended", "suspended"]}), json!([])),
            &|_| false,
        )
        .unwrap();
        assert_eq!(
            c.condition,
            RuleCondition::StateChange {
                from: vec![],
                to: vec![CardState::Suspended]
            }
        );
        assert_eq!(c.reminder, Reminder::Every);
        assert_eq!(c.condition.to_json(), r#"{"to":["suspended"]}"#);
    }

    #[test]
    fn bad_conditions_have_specific_codes() {
        let a = json!([]);
        for (t, cond, want) in [
            (2, json!({"used_mb_gte": -1}), ErrorCode::InvalidThreshold),
            (2, json!({"used_mb_gte": 0}), ErrorCode::InvalidThreshold),
            (2, json!({"used_mb_gte": 1.5}), ErrorCode::InvalidThreshold),
            (2, json!({"used_mb_gte": "10"}), ErrorCode::InvalidThreshold),
            (
                3,
                json!({"remaining_mb_lte": 2_000_000}),
                ErrorCode::InvalidThreshold,
            ),
            (
                1,
                json!({"days_to_expiry_lte": -3}),
                ErrorCode::InvalidThreshold,
            ),
            (2, json!({}), ErrorCode::InvalidCondition),
            (2, json!(null), ErrorCode::InvalidCondition),
            (
                2,
                json!({"used_mb_gte": 1, "remaining_mb_lte": 1}),
                ErrorCode::InvalidCondition,
            ),
            (
                2,
                json!({"days_to_expiry_lte": 1}),
                ErrorCode::InvalidCondition,
            ),
            (1, json!({"used_mb_gte": 1}), ErrorCode::InvalidCondition),
            (4, json!({"from": ["flying"]}), ErrorCode::InvalidCondition),
            (
                4,
                json!({"from": [], "to": []}),
                ErrorCode::InvalidCondition,
            ),
            (4, json!({"to": "active"}), ErrorCode::InvalidCondition),
            (5, json!({}), ErrorCode::InvalidValue),
        ] {
            assert_eq!(code(&spec(t, cond.clone(), a.clone())), want, "{t} {cond}");
        }
    }

    #[test]
    fn bad_actions_have_specific_codes() {
        let used = json!({"used_mb_gte": 5});
        for (t, actions, want) in [
            (2, json!([{"type": "fax"}]), ErrorCode::InvalidAction),
            (
                2,
                json!([{"type": "webhook", "endpoint": "nope"}]),
                ErrorCode::UnknownWebhook,
            ),
            (
                2,
                json!([{"type": "webhook", "endpoint": "hook", "merge": "yes"}]),
                ErrorCode::InvalidAction,
            ),
            (
                2,
                json!([{"type": "webhook", "endpoint": "hook", "to": ["x"]}]),
                ErrorCode::InvalidAction,
            ),
            (2, json!([{"type": "email"}]), ErrorCode::InvalidAction),
            (
                2,
                json!([{"type": "email", "to": "not-an-address"}]),
                ErrorCode::InvalidAction,
            ),
            (
                2,
                json!([{"type": "sms", "to": ["12ab5678"]}]),
                ErrorCode::InvalidAction,
            ),
            (
                2,
                json!([{"type": "sms", "to": ["+8613800000000"], "reminder": "hourly"}]),
                ErrorCode::InvalidAction,
            ),
            (2, json!([{"type": "suspend"}]), ErrorCode::InvalidAction),
            (2, json!(["webhook"]), ErrorCode::InvalidAction),
        ] {
            assert_eq!(
                code(&spec(t, used.clone(), actions.clone())),
                want,
                "{actions}"
            );
        }
        let ok = compile(
            &spec(
                2,
                used,
                json!([{"type": "webhook", "endpoint": "hook", "merge": true},
                       {"type": "email", "to": "ops@example.com", "reminder": "day"},
                       {"type": "sms", "to": ["+8613800000000"], "reminder": "once"}]),
            ),
            &|e| e == "hook",
        )
        .unwrap();
        let reminders: Vec<_> = ok.actions.iter().map(|a| a.reminder).collect();
        assert_eq!(reminders, [Reminder::Cycle, Reminder::Day, Reminder::Once]);
        assert!(ok.actions[0].merge);
    }

    #[test]
    fn usage_conditions() {
        let used = RuleCondition::UsedMbGte(10);
        assert!(!used.usage_holds(10 * MB - 1, None));
        assert!(used.usage_holds(10 * MB, None));
        let rem = RuleCondition::RemainingMbLte(10);
        assert!(!rem.usage_holds(19 * MB, Some(30 * MB)));
        assert!(rem.usage_holds(20 * MB, Some(30 * MB)));
        assert!(
            rem.usage_holds(40 * MB, Some(30 * MB)),
            "over the allowance"
        );
        assert!(!rem.usage_holds(0, None), "no allowance: never");
        assert!(!rem.usage_holds(0, Some(0)), "zero allowance: never");
    }

    #[test]
    fn marks_limit_each_window() {
        let w = |cycle: u32, day: i64| Window {
            cycle: CycleId(cycle),
            day,
        };
        let mut m = Mark::default();
        assert!(m.allows(Reminder::Cycle, w(5, 100)));
        m.record(Reminder::Cycle, w(5, 100));
        assert!(!m.allows(Reminder::Cycle, w(5, 101)));
        assert!(m.allows(Reminder::Cycle, w(6, 130)));
        m.record(Reminder::Day, w(5, 100));
        assert!(!m.allows(Reminder::Day, w(5, 100)));
        assert!(m.allows(Reminder::Day, w(5, 101)));
        m.record(Reminder::Once, w(5, 100));
        assert!(!m.allows(Reminder::Once, w(9, 999)));
        assert!(m.allows(Reminder::Every, w(5, 100)));
        m.after_rollover();
        assert!(m.allows(Reminder::Cycle, w(5, 100)) && !m.allows(Reminder::Once, w(5, 100)));
    }

    #[test]
    fn every_n_days_allows_one_firing_in_n_days_and_names_round_trip() {
        let w = |day: i64| Window {
            cycle: CycleId(5),
            day,
        };
        let three = Reminder::EveryDays(3);
        let mut m = Mark::default();
        assert!(m.allows(three, w(100)));
        m.record(three, w(100));
        assert!(!m.allows(three, w(101)) && !m.allows(three, w(102)));
        assert!(m.allows(three, w(103)));
        assert!(m.allows(Reminder::Day, w(101)), "day keeps its own mark");
        for (name, r) in [
            ("every", Reminder::Every),
            ("day", Reminder::Day),
            ("every_1_days", Reminder::Day),
            ("every_7_days", Reminder::EveryDays(7)),
            ("cycle", Reminder::Cycle),
            ("once", Reminder::Once),
        ] {
            assert_eq!(Reminder::from_name(name), Some(r), "{name}");
            let back: Reminder = serde_json::from_value(serde_json::to_value(r).unwrap()).unwrap();
            assert_eq!(back, r);
        }
        for bad in [
            "every_0_days",
            "every_367_days",
            "every_x_days",
            "weekly",
            "Day",
        ] {
            assert_eq!(Reminder::from_name(bad), None, "{bad}");
        }
        assert_eq!(
            serde_json::to_value(Reminder::EveryDays(3)).unwrap(),
            "every_3_days"
        );
        assert!(Reminder::Day.reminds() && Reminder::Cycle.reminds() && three.reminds());
        assert!(!Reminder::Every.reminds() && !Reminder::Once.reminds());
    }
}
