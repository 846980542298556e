//! The webhook templates of SPEC section 6: six names, each with its keys,
//! all values strings. Receivers parse by key, so keys may be added later;
//! none may change meaning.

use flowcap_engine::event::{Observed, RuleFiredEvent};
use flowcap_engine::rule::RuleCondition;
use flowcap_engine::MB;
use serde::{Deserialize, Serialize};

/// A template name of SPEC section 6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TemplateName {
    /// Type 1: `cid, pricePlanName, daysToExpire`.
    #[serde(rename = "api_rule_price_plan_expired")]
    PricePlanExpired,
    /// Type 2, remaining: `cid, pricePlanName, remainFlow`.
    #[serde(rename = "api_rule_flow_usage_remain")]
    FlowUsageRemain,
    /// Type 2, used: `cid, pricePlanName, usageFlow`.
    #[serde(rename = "api_rule_flow_usage")]
    FlowUsage,
    /// Type 4: `cid, modifyTime, oldStatus, newStatus`.
    #[serde(rename = "api_rule_sim_status_modify")]
    SimStatusModify,
    /// Type 3, remaining (forward pools): `poolId, poolName, pricePlanName,
    /// remainFlow`.
    #[serde(rename = "api_sim_pool_rule_flow_usage_remain")]
    PoolFlowUsageRemain,
    /// Type 3, used (backward pools, and forward pools with a used
    /// condition): `poolId, poolName, pricePlanName, usageFlow`.
    #[serde(rename = "api_back_pool_rule_flow_usage")]
    BackPoolFlowUsage,
}

impl TemplateName {
    /// Every template.
    pub const ALL: [TemplateName; 6] = [
        TemplateName::PricePlanExpired,
        TemplateName::FlowUsageRemain,
        TemplateName::FlowUsage,
        TemplateName::SimStatusModify,
        TemplateName::PoolFlowUsageRemain,
        TemplateName::BackPoolFlowUsage,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            TemplateName::PricePlanExpired => "api_rule_price_plan_expired",
            TemplateName::FlowUsageRemain => "api_rule_flow_usage_remain",
            TemplateName::FlowUsage => "api_rule_flow_usage",
            TemplateName::SimStatusModify => "api_rule_sim_status_modify",
            TemplateName::PoolFlowUsageRemain => "api_sim_pool_rule_flow_usage_remain",
            TemplateName::BackPoolFlowUsage => "api_back_pool_rule_flow_usage",
        }
    }

    /// The keys, in the order they are sent.
    pub fn keys(self) -> &'static [&'static str] {
        match self {
            TemplateName::PricePlanExpired => &["cid", "pricePlanName", "daysToExpire"],
            TemplateName::FlowUsageRemain => &["cid", "pricePlanName", "remainFlow"],
            TemplateName::FlowUsage => &["cid", "pricePlanName", "usageFlow"],
            TemplateName::SimStatusModify => &["cid", "modifyTime", "oldStatus", "newStatus"],
            TemplateName::PoolFlowUsageRemain => {
                &["poolId", "poolName", "pricePlanName", "remainFlow"]
            }
            TemplateName::BackPoolFlowUsage => {
                &["poolId", "poolName", "pricePlanName", "usageFlow"]
            }
        }
    }

    /// Whether the template is about a pool (`poolId`) rather than a card
    /// (`cid`).
    pub fn is_pool(self) -> bool {
        matches!(
            self,
            TemplateName::PoolFlowUsageRemain | TemplateName::BackPoolFlowUsage
        )
    }
}

/// One `{"key": ..., "value": ...}` pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Param {
    /// Key.
    pub key: String,
    /// Value, always a string.
    pub value: String,
}

/// A firing's template: name, rule type and parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// Template name.
    pub name: TemplateName,
    /// Rule type code.
    pub rule_type: u8,
    /// The card's ICCID or the pool id.
    pub subject: String,
    /// Parameters, in [`TemplateName::keys`] order.
    pub params: Vec<Param>,
}

impl Template {
    /// The value of a key.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|p| p.key == key)
            .map(|p| p.value.as_str())
    }
}

/// How values are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TemplateOptions {
    /// UTC offset of `modifyTime` (the billing time zone; UTC+8 by default).
    pub utc_offset_secs: i32,
}

impl Default for TemplateOptions {
    fn default() -> Self {
        TemplateOptions {
            utc_offset_secs: 8 * 3600,
        }
    }
}

/// Bytes as MB (1 MB = 1,048,576 bytes) with at most two decimals,
/// truncated, trailing zeros dropped: `"100"`, `"12.5"`, `"0.01"`. Negative
/// amounts (remaining below zero) are written `"0"`.
pub fn format_mb(bytes: i128) -> String {
    if bytes <= 0 {
        return "0".to_owned();
    }
    let hundredths = bytes * 100 / i128::from(MB);
    let (whole, frac) = (hundredths / 100, hundredths % 100);
    match frac {
        0 => whole.to_string(),
        f if f % 10 == 0 => format!("{whole}.{}", f / 10),
        f => format!("{whole}.{f:02}"),
    }
}

/// RFC 3339 at `offset_secs`, milliseconds only when not zero:
/// `2026-11-23T04:05:00+08:00`.
pub fn format_time(t: flowcap_engine::Timestamp, offset_secs: i32) -> String {
    let text = t.to_rfc3339(offset_secs);
    match text.find(".000") {
        Some(i) => format!("{}{}", &text[..i], &text[i + 4..]),
        None => text,
    }
}

fn param(key: &str, value: impl Into<String>) -> Param {
    Param {
        key: key.to_owned(),
        value: value.into(),
    }
}

/// The template of a firing (SPEC section 6):
///
/// | rule | condition | template |
/// | --- | --- | --- |
/// | type 1 | `days_to_expiry_lte` | `api_rule_price_plan_expired` |
/// | type 2 | `remaining_mb_lte` | `api_rule_flow_usage_remain` |
/// | type 2 | `used_mb_gte` | `api_rule_flow_usage` |
/// | type 3 | `remaining_mb_lte` (forward pools) | `api_sim_pool_rule_flow_usage_remain` |
/// | type 3 | `used_mb_gte` (any pool) | `api_back_pool_rule_flow_usage` |
/// | type 4 | `from`/`to` | `api_rule_sim_status_modify` |
///
/// Flow values are MB ([`format_mb`]); `daysToExpire` is whole local days
/// (negative once expired); `modifyTime` is RFC 3339 in the billing time
/// zone; statuses are the wire names (`active`, `suspended`, ...); a
/// missing plan or pool name is an empty string.
pub fn template(firing: &RuleFiredEvent, options: TemplateOptions) -> Template {
    let cid = firing.iccid.map(|i| i.to_string()).unwrap_or_default();
    let plan_name = firing.plan_name.clone().unwrap_or_default();
    let pool_id = firing
        .pool
        .as_ref()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let pool_name = firing.pool_name.clone().unwrap_or_default();
    let pool_rule = firing.rule_type == 3;
    let (used, remaining) = match &firing.observed {
        Observed::Usage {
            used_bytes,
            remaining_bytes,
            ..
        } => (
            i128::from(*used_bytes),
            remaining_bytes.map_or(0, i128::from),
        ),
        _ => (0, 0),
    };
    let (name, params) = match (&firing.condition, &firing.observed) {
        (RuleCondition::DaysToExpiryLte(_), observed) => {
            let days = match observed {
                Observed::DaysToExpiry { days, .. } => *days,
                _ => 0,
            };
            (
                TemplateName::PricePlanExpired,
                vec![
                    param("cid", &cid),
                    param("pricePlanName", &plan_name),
                    param("daysToExpire", days.to_string()),
                ],
            )
        }
        (RuleCondition::StateChange { .. }, observed) => {
            let (old, new) = match observed {
                Observed::StateChange { old, new, .. } => (old.as_str(), new.as_str()),
                _ => ("", ""),
            };
            (
                TemplateName::SimStatusModify,
                vec![
                    param("cid", &cid),
                    param(
                        "modifyTime",
                        format_time(firing.event_time, options.utc_offset_secs),
                    ),
                    param("oldStatus", old),
                    param("newStatus", new),
                ],
            )
        }
        (RuleCondition::RemainingMbLte(_), _) if pool_rule => (
            TemplateName::PoolFlowUsageRemain,
            vec![
                param("poolId", &pool_id),
                param("poolName", &pool_name),
                param("pricePlanName", &plan_name),
                param("remainFlow", format_mb(remaining)),
            ],
        ),
        (RuleCondition::UsedMbGte(_), _) if pool_rule => (
            TemplateName::BackPoolFlowUsage,
            vec![
                param("poolId", &pool_id),
                param("poolName", &pool_name),
                param("pricePlanName", &plan_name),
                param("usageFlow", format_mb(used)),
            ],
        ),
        (RuleCondition::RemainingMbLte(_), _) => (
            TemplateName::FlowUsageRemain,
            vec![
                param("cid", &cid),
                param("pricePlanName", &plan_name),
                param("remainFlow", format_mb(remaining)),
            ],
        ),
        (RuleCondition::UsedMbGte(_), _) => (
            TemplateName::FlowUsage,
            vec![
                param("cid", &cid),
                param("pricePlanName", &plan_name),
                param("usageFlow", format_mb(used)),
            ],
        ),
    };
    Template {
        name,
        rule_type: firing.rule_type,
        subject: if name.is_pool() { pool_id } else { cid },
        params,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mb_formatting() {
        let mb = i128::from(MB);
        assert_eq!(format_mb(100 * mb), "100");
        assert_eq!(format_mb(12 * mb + mb / 2), "12.5");
        assert_eq!(format_mb((mb + 99) / 100), "0.01");
        assert_eq!(format_mb((mb + 99) / 100 - 1), "0");
        assert_eq!(format_mb(mb + mb / 4), "1.25");
        assert_eq!(format_mb(mb + mb / 4 - 1), "1.24");
        assert_eq!(format_mb(-5), "0");
    }

    #[test]
    fn names_and_keys_match_the_spec() {
        let spec = [
            (
                "api_rule_price_plan_expired",
                "cid, pricePlanName, daysToExpire",
            ),
            (
                "api_rule_flow_usage_remain",
                "cid, pricePlanName, remainFlow",
            ),
            ("api_rule_flow_usage", "cid, pricePlanName, usageFlow"),
            (
                "api_rule_sim_status_modify",
                "cid, modifyTime, oldStatus, newStatus",
            ),
            (
                "api_sim_pool_rule_flow_usage_remain",
                "poolId, poolName, pricePlanName, remainFlow",
            ),
            (
                "api_back_pool_rule_flow_usage",
                "poolId, poolName, pricePlanName, usageFlow",
            ),
        ];
        for (t, (name, keys)) in TemplateName::ALL.iter().zip(spec) {
            assert_eq!(t.as_str(), name);
            assert_eq!(serde_json::to_value(t).unwrap(), name);
            assert_eq!(t.keys().join(", "), keys);
        }
    }
}
