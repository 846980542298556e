//! Rule and webhook commands, and how the registry's rules reach the
//! shards: each shard holds the enabled rules with their filters resolved
//! to its own indexes ([`Engine::push_rules`]), and backward pools hold the
//! threshold of the suspend rules that watch them. Webhooks are here
//! because rules are what call them: one in use by an enabled rule stays.

use std::collections::BTreeSet;

use crate::command::{CommandError, ErrorCode, PoolKind, RuleSpec, WebhookSpec};
use crate::domain::MB;
use crate::ids::PoolId;
use crate::rule::Compiled;
use crate::shard::rules::ShardRule;

use super::commands::err;
use super::registry::PoolEntry;
use super::Engine;

impl Engine {
    fn validate_rule(&self, rule: &RuleSpec) -> Result<Compiled, CommandError> {
        let webhooks = &self.registry.webhooks;
        let compiled = crate::rule::compile(rule, &|id| webhooks.contains_key(id))?;
        for plan in &rule.filter.plans {
            self.plan_entry(plan)?;
        }
        self.tag_indexes(&rule.filter.tags)?;
        self.check_attribute_names(rule.filter.attributes.keys())?;
        for (pools, kind) in [
            (&rule.filter.forward_pools, PoolKind::Forward),
            (&rule.filter.backward_pools, PoolKind::Backward),
        ] {
            for pool in pools {
                if self.pool_entry(pool)?.kind != kind {
                    return Err(err(
                        ErrorCode::WrongPoolKind,
                        format!("pool {pool} is not a {kind:?} pool").to_lowercase(),
                    ));
                }
            }
        }
        Ok(compiled)
    }

    pub(super) fn upsert_rule(&mut self, rule: &RuleSpec) -> Result<(), CommandError> {
        if rule.id.is_empty() {
            return Err(err(ErrorCode::InvalidValue, "rule id must not be empty"));
        }
        if rule.id.len() > crate::ids::MAX_NAME_ID_LEN {
            return Err(err(
                ErrorCode::InvalidValue,
                format!(
                    "rule id is {} bytes long; at most {}",
                    rule.id.len(),
                    crate::ids::MAX_NAME_ID_LEN
                ),
            ));
        }
        self.validate_rule(rule)?;
        // Same type, condition and filter: the same rule (its fired state
        // stays); otherwise a new version that starts with none.
        let same = self.registry.rules.get(&rule.id).is_some_and(|old| {
            old.rule_type == rule.rule_type
                && old.condition == rule.condition
                && old.filter == rule.filter
        });
        if !same {
            let key = self.registry.next_rule_key;
            self.registry.next_rule_key = key.wrapping_add(1);
            self.registry.rule_keys.insert(rule.id.clone(), key);
        }
        self.registry.rules.insert(rule.id.clone(), rule.clone());
        self.refresh_backward_rules();
        self.push_rules();
        if rule.enabled {
            self.scan_rule(&rule.id);
        }
        Ok(())
    }

    /// Evaluates a rule on every card or pool at the end of the current
    /// command: a rule added, changed or enabled fires at once for the
    /// targets already inside its condition (unless they fired in the
    /// current window).
    fn scan_rule(&mut self, id: &str) {
        if let Some(&key) = self.registry.rule_keys.get(id) {
            for shard in &mut self.shards {
                shard.scan_rule(key);
            }
        }
    }

    /// Installs the enabled rules in every shard, filters resolved to the
    /// shard's indexes. Called after every rule change and on restore.
    pub(crate) fn push_rules(&mut self) {
        let live: BTreeSet<u32> = self.registry.rule_keys.values().copied().collect();
        let mut per_shard: Vec<Vec<ShardRule>> = vec![Vec::new(); self.shards.len()];
        for (id, spec) in &self.registry.rules {
            if !spec.enabled {
                continue;
            }
            // Validated when upserted or enabled; what it references can
            // only go away through commands that check enabled rules first.
            let Ok(compiled) = crate::rule::compile(spec, &|_| true) else {
                continue;
            };
            let Some(&key) = self.registry.rule_keys.get(id) else {
                continue;
            };
            let plans: Vec<u16> = spec
                .filter
                .plans
                .iter()
                .filter_map(|p| self.registry.plans.get(p).map(|e| e.index))
                .collect();
            let tags: Vec<u32> = spec
                .filter
                .tags
                .iter()
                .filter_map(|t| self.registry.tags.get(t).map(|(i, _)| *i))
                .collect();
            let named: Vec<&PoolEntry> = spec
                .filter
                .forward_pools
                .iter()
                .chain(&spec.filter.backward_pools)
                .filter_map(|p| self.registry.pools.get(p))
                .collect();
            let any_pool =
                spec.filter.forward_pools.is_empty() && spec.filter.backward_pools.is_empty();
            for (s, rules) in per_shard.iter_mut().enumerate() {
                let pools = (!any_pool).then(|| {
                    named
                        .iter()
                        .filter(|e| e.shard as usize == s)
                        .map(|e| e.index)
                        .collect()
                });
                rules.push(ShardRule {
                    key,
                    id: id.clone(),
                    name: spec.name.clone(),
                    rule: compiled.clone(),
                    plans: plans.clone(),
                    tags: tags.clone(),
                    pools,
                    attributes: spec
                        .filter
                        .attributes
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                });
            }
        }
        for (shard, rules) in self.shards.iter_mut().zip(per_shard) {
            shard.set_rules(rules, &live);
        }
    }

    /// Recomputes every backward pool's suspend threshold from the enabled
    /// suspend rules; a pool already past a new threshold is cut at once.
    pub(super) fn refresh_backward_rules(&mut self) {
        let rules: Vec<(u64, Vec<PoolId>)> = self
            .registry
            .rules
            .values()
            .filter(|r| r.enabled && r.rule_type == 3)
            .filter(|r| {
                r.actions
                    .iter()
                    .any(|a| a.get("type").and_then(|t| t.as_str()) == Some("suspend"))
            })
            .filter_map(|r| {
                backward_suspend_threshold(r).map(|t| (t, r.filter.backward_pools.clone()))
            })
            .collect();
        for shard in &mut self.shards {
            for p in 0..shard.pools.len() as u32 {
                let pool = &shard.pools[p as usize];
                if pool.kind != PoolKind::Backward || pool.removed {
                    continue;
                }
                let at = rules
                    .iter()
                    .filter(|(_, pools)| pools.is_empty() || pools.contains(&pool.id))
                    .map(|(t, _)| *t)
                    .min();
                shard.pools[p as usize].suspend_at = at;
                shard.refresh_pool(p);
            }
        }
    }

    /// Enables or disables a rule. A rule enabled again is
    /// validated again (what it names may have gone) and fires at once for
    /// the targets inside its condition.
    pub(super) fn set_rule_enabled(
        &mut self,
        rule: &str,
        enable: bool,
    ) -> Result<(), CommandError> {
        let Some(spec) = self.registry.rules.get(rule) else {
            return Err(err(ErrorCode::UnknownRule, format!("no rule {rule:?}")));
        };
        let mut spec = spec.clone();
        let was_enabled = spec.enabled;
        spec.enabled = enable;
        if enable {
            self.validate_rule(&spec)?;
        }
        self.registry.rules.insert(rule.to_owned(), spec);
        self.refresh_backward_rules();
        self.push_rules();
        if enable && !was_enabled {
            self.scan_rule(rule);
        }
        Ok(())
    }

    pub(super) fn remove_rule(&mut self, rule: &str) -> Result<(), CommandError> {
        if self.registry.rules.remove(rule).is_none() {
            return Err(err(ErrorCode::UnknownRule, format!("no rule {rule:?}")));
        }
        self.registry.rule_keys.remove(rule);
        self.refresh_backward_rules();
        self.push_rules();
        Ok(())
    }

    pub(super) fn upsert_webhook(&mut self, webhook: &WebhookSpec) -> Result<(), CommandError> {
        if !(webhook.url.starts_with("http://") || webhook.url.starts_with("https://")) {
            return Err(err(
                ErrorCode::InvalidValue,
                format!(
                    "webhook URL {:?} must start with http:// or https://",
                    webhook.url
                ),
            ));
        }
        self.registry
            .webhooks
            .insert(webhook.id.clone(), webhook.clone());
        Ok(())
    }

    pub(super) fn remove_webhook(&mut self, webhook: &str) -> Result<(), CommandError> {
        if let Some(rule) = self.registry.rules.values().find(|r| {
            r.enabled
                && r.actions
                    .iter()
                    .any(|a| a.get("endpoint").and_then(|e| e.as_str()) == Some(webhook))
        }) {
            return Err(err(
                ErrorCode::WebhookInUse,
                format!("webhook {webhook:?} is used by enabled rule {:?}", rule.id),
            ));
        }
        if self.registry.webhooks.remove(webhook).is_none() {
            return Err(err(
                ErrorCode::UnknownWebhook,
                format!("no webhook {webhook:?}"),
            ));
        }
        Ok(())
    }
}

/// `used_mb_gte` of a backward suspend rule, in bytes.
fn backward_suspend_threshold(rule: &RuleSpec) -> Option<u64> {
    rule.condition
        .get("used_mb_gte")
        .and_then(serde_json::Value::as_u64)
        .map(|mb| mb.saturating_mul(MB))
}
