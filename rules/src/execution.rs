//! Execution records: one per firing and action (channel), the explanation
//! of why a notification or a cut happened. The history writer stores them
//! in the `rule_executions` table; delivery updates `attempts` and
//! `outcome` as it goes (a new record per state, same `execution_id`).

use flowcap_engine::event::{Cause, Observed, RuleFiredEvent};
use flowcap_engine::rule::{Channel, RuleAction};
use flowcap_engine::Timestamp;
use serde::{Deserialize, Serialize};

use crate::template::format_mb;

/// Where an execution stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Decided, not yet delivered (every notification starts here).
    Pending,
    /// The receiver accepted it.
    Delivered,
    /// Retries exhausted (a push-failure alert carries the payload).
    Failed,
    /// The engine applied it (suspend: `backward_pool_threshold`).
    Applied,
    /// A rule without actions: the firing is only recorded.
    Recorded,
}

impl Outcome {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pending => "pending",
            Outcome::Delivered => "delivered",
            Outcome::Failed => "failed",
            Outcome::Applied => "applied",
            Outcome::Recorded => "recorded",
        }
    }
}

/// One row of `rule_executions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutionRecord {
    /// Deterministic: xxh3-128 of the firing id and the action's position.
    pub execution_id: String,
    /// The firing (the `rule_fired` action event id).
    pub firing_id: String,
    /// Rule id.
    pub rule: String,
    /// Rule type code (1-4).
    pub rule_type: i32,
    /// The card, for card rules.
    pub iccid: Option<String>,
    /// The pool: the target of a pool rule, or the card's pool.
    pub pool_id: Option<String>,
    /// The rule's condition as JSON, e.g. `{"used_mb_gte":50}`.
    pub condition: String,
    /// What was observed, e.g. `used_mb=50.01`, `days_to_expiry=7`,
    /// `active->suspended`.
    pub observed: String,
    /// Kind of cause: `record`, `command`, `rollover`, `deadline`.
    pub cause: String,
    /// The record id, command id, cycle or deadline that caused it.
    pub cause_id: String,
    /// The card of the causing record (a pool member's record for pools).
    pub cause_iccid: Option<String>,
    /// `webhook`, `email`, `sms`, `suspend`, or `none` (rule without
    /// actions).
    pub channel: String,
    /// Webhook endpoint id, or the recipients (comma-separated).
    pub endpoint: Option<String>,
    /// Reminder window of the action.
    pub reminder: String,
    /// Delivery attempts so far.
    pub attempts: i32,
    /// Outcome so far.
    pub outcome: Outcome,
    /// Event time of the firing.
    pub fired_at: Timestamp,
    /// The target's billing cycle then.
    pub cycle: String,
    /// Last error of a failed attempt.
    pub error: Option<String>,
}

/// The observed value as text.
pub fn observed_text(observed: &Observed) -> String {
    match observed {
        Observed::DaysToExpiry { days, .. } => format!("days_to_expiry={days}"),
        Observed::Usage {
            used_bytes,
            remaining_bytes,
            ..
        } => {
            let mut text = format!("used_mb={}", format_mb(i128::from(*used_bytes)));
            if let Some(r) = remaining_bytes {
                let sign = if *r < 0 { "-" } else { "" };
                text.push_str(&format!(
                    " remaining_mb={sign}{}",
                    format_mb(i128::from(*r).abs())
                ));
            }
            text
        }
        Observed::StateChange { old, new, .. } => format!("{old}->{new}"),
    }
}

/// A cause as (kind, id, card): the same split as `state_changes`.
pub fn cause_parts(cause: &Cause) -> (&'static str, String, Option<String>) {
    match cause {
        Cause::Record { iccid, record_id } => (
            "record",
            record_id.as_str().to_owned(),
            Some(iccid.to_string()),
        ),
        Cause::Command { command_id } => ("command", command_id.as_str().to_owned(), None),
        Cause::Rollover { cycle } => ("rollover", cycle.to_string(), None),
        Cause::Deadline { kind, at } => {
            let kind = serde_json::to_value(kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            ("deadline", format!("{kind}@{}", at.to_rfc3339(0)), None)
        }
    }
}

/// The execution id of action `index` of a firing: xxh3-128 of the firing
/// id and the position, so a replayed firing has the same executions.
pub fn execution_id(firing_id: &str, index: usize) -> String {
    let key = format!("exec|{firing_id}|{index}");
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(key.as_bytes()))
}

fn record(firing: &RuleFiredEvent, index: usize, action: Option<&RuleAction>) -> ExecutionRecord {
    let (cause, cause_id, cause_iccid) = cause_parts(&firing.cause);
    let (channel, endpoint, reminder, outcome) = match action {
        None => ("none".to_owned(), None, String::new(), Outcome::Recorded),
        Some(a) => (
            a.channel.as_str().to_owned(),
            match a.channel {
                Channel::Webhook => a.endpoint.clone(),
                Channel::Email | Channel::Sms => Some(a.to.join(",")),
                Channel::Suspend => None,
            },
            serde_json::to_value(a.reminder)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            if a.channel == Channel::Suspend {
                Outcome::Applied
            } else {
                Outcome::Pending
            },
        ),
    };
    ExecutionRecord {
        execution_id: execution_id(&firing.id, index),
        firing_id: firing.id.clone(),
        rule: firing.rule.clone(),
        rule_type: i32::from(firing.rule_type),
        iccid: firing.iccid.map(|i| i.to_string()),
        pool_id: firing.pool.as_ref().map(|p| p.to_string()),
        condition: firing.condition.to_json(),
        observed: observed_text(&firing.observed),
        cause: cause.to_owned(),
        cause_id,
        cause_iccid,
        channel,
        endpoint,
        reminder,
        attempts: 0,
        outcome,
        fired_at: firing.event_time,
        cycle: firing.cycle.to_string(),
        error: None,
    }
}

/// The execution records of a firing as decided (before delivery): one per
/// action (`pending` notifications, `applied` suspends), or one `recorded`
/// row for a rule without actions.
pub fn records(firing: &RuleFiredEvent) -> Vec<ExecutionRecord> {
    if firing.actions.is_empty() {
        return vec![record(firing, 0, None)];
    }
    firing
        .actions
        .iter()
        .enumerate()
        .map(|(i, a)| record(firing, i, Some(a)))
        .collect()
}
