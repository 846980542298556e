//! What the operator API reads besides card and pool views: the declared
//! plans, tags and rules, and the first result of a command. Read-only
//! borrows of the registry, so a caller holding the engine (the driver,
//! with every shard home) answers without copying the tables.

use crate::command::{Command, CommandResult, PlanSpec, RuleSpec, TagSpec};
use crate::ids::PlanId;

use super::Engine;

impl Engine {
    /// Every plan, ordered by id.
    pub fn plan_specs(&self) -> impl Iterator<Item = &PlanSpec> {
        self.registry.plans.values().map(|entry| &entry.spec)
    }

    /// One plan, if declared.
    pub fn plan_spec(&self, id: &PlanId) -> Option<&PlanSpec> {
        self.registry.plans.get(id).map(|entry| &entry.spec)
    }

    /// Every tag, ordered by name.
    pub fn tag_specs(&self) -> impl Iterator<Item = &TagSpec> {
        self.registry.tags.values().map(|(_, spec)| spec)
    }

    /// Every automation rule, ordered by id.
    pub fn rule_specs(&self) -> impl Iterator<Item = &RuleSpec> {
        self.registry.rules.values()
    }

    /// The result this command's id was first answered with, if the id was
    /// seen: what a repeat of `command` would be answered.
    pub fn command_result(&self, command: &Command) -> Option<CommandResult> {
        self.registry.results.first_result(command)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::parse_command;
    use crate::EngineConfig;

    #[test]
    fn lists_declared_plans_and_answers_a_seen_command() {
        let mut engine = Engine::new(EngineConfig::default());
        let plan = parse_command(
            br#"{"id":"p1","at":"2026-11-01T00:00:00+08:00","type":"upsert_plan","plan":{"id":"cmcc-30m","carrier":"cmcc","allowance_mb":30,"traffic":"general"}}"#,
        )
        .unwrap();
        assert!(engine.command_result(&plan).is_none());
        let mut out = Vec::new();
        engine.process_command(plan.clone(), 0, &mut out);
        let ids: Vec<_> = engine.plan_specs().map(|p| p.id.to_string()).collect();
        assert_eq!(ids, ["cmcc-30m"]);
        assert!(engine.plan_spec(&PlanId::from("cmcc-30m")).is_some());
        let result = engine.command_result(&plan).unwrap();
        assert!(result.ok, "{result:?}");
        assert_eq!(result.command_id, plan.id);
    }
}
