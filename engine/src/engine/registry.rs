//! The registry: everything global that commands read and write (plans,
//! pools, tags, rules, webhooks, attribute names, command results). The
//! shards hold the per-card and per-pool state; the registry says where
//! each named thing is and what it was declared as.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::command::{CommandError, ErrorCode, PlanSpec, PoolKind, RuleSpec, TagSpec, WebhookSpec};
use crate::ids::{PlanId, PoolId, TagId};

use super::commands::err;
use super::results::CommandResults;
use super::Engine;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PlanEntry {
    pub(crate) index: u16,
    pub(crate) spec: PlanSpec,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PoolEntry {
    pub(crate) shard: u32,
    pub(crate) index: u32,
    pub(crate) kind: PoolKind,
}

/// Everything global that commands read and write.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Registry {
    pub(crate) plans: BTreeMap<PlanId, PlanEntry>,
    pub(crate) plan_ids: Vec<Option<PlanId>>,
    pub(crate) pools: BTreeMap<PoolId, PoolEntry>,
    pub(crate) tags: BTreeMap<TagId, (u32, TagSpec)>,
    pub(crate) tag_names: Vec<Option<TagId>>,
    pub(crate) rules: BTreeMap<String, RuleSpec>,
    /// Key of each rule's fired state in the shards: kept while the rule's
    /// type, condition and filter stay the same, new otherwise.
    #[serde(default)]
    pub(crate) rule_keys: BTreeMap<String, u32>,
    #[serde(default)]
    pub(crate) next_rule_key: u32,
    pub(crate) webhooks: BTreeMap<String, WebhookSpec>,
    pub(crate) attribute_names: Vec<String>,
    /// Declared attribute names the operator disabled: not settable, not
    /// in views or rule filters; their values are kept.
    #[serde(default)]
    pub(crate) disabled_attributes: BTreeSet<String>,
    /// First results, by command id (kept outside the JSON part of
    /// snapshots: there can be millions).
    #[serde(skip)]
    pub(crate) results: CommandResults,
}

impl Engine {
    pub(super) fn pool_entry(&self, pool: &PoolId) -> Result<&PoolEntry, CommandError> {
        self.registry
            .pools
            .get(pool)
            .ok_or_else(|| err(ErrorCode::UnknownPool, format!("no pool {pool}")))
    }

    pub(super) fn plan_entry(&self, plan: &PlanId) -> Result<&PlanEntry, CommandError> {
        self.registry
            .plans
            .get(plan)
            .ok_or_else(|| err(ErrorCode::UnknownPlan, format!("no plan {plan}")))
    }

    pub(super) fn tag_indexes(&self, tags: &[TagId]) -> Result<Vec<u32>, CommandError> {
        tags.iter()
            .map(|t| {
                self.registry
                    .tags
                    .get(t)
                    .map(|(i, _)| *i)
                    .ok_or_else(|| err(ErrorCode::UnknownTag, format!("no tag {t}")))
            })
            .collect()
    }
}
