//! Plan commands: `upsert_plan` and `remove_plan`. Plans are replicated
//! to every shard, so a change re-evaluates the plan's cards and pools
//! everywhere.

use crate::command::{CommandError, ErrorCode, PlanSpec, MAX_MONTHS_AHEAD};
use crate::domain::MB;
use crate::ids::PlanId;
use crate::shard::PlanInfo;

use super::commands::{err, months_too_far};
use super::registry::PlanEntry;
use super::Engine;

impl Engine {
    pub(super) fn upsert_plan(&mut self, spec: &PlanSpec) -> Result<(), CommandError> {
        if spec.id.as_str().is_empty() {
            return Err(err(ErrorCode::InvalidValue, "plan id must not be empty"));
        }
        if spec.term_months > MAX_MONTHS_AHEAD {
            return Err(months_too_far("plan term_months", spec.term_months));
        }
        let info = PlanInfo {
            id: spec.id.clone(),
            name: spec.name.clone(),
            allowance_bytes: spec.allowance_mb.saturating_mul(MB),
            traffic: spec.traffic,
            term_months: spec.term_months,
        };
        let index = match self.registry.plans.get(&spec.id) {
            Some(existing) => {
                if existing.spec.carrier != spec.carrier && self.plan_in_use(existing.index) {
                    return Err(err(
                        ErrorCode::PlanInUse,
                        format!(
                            "plan {} is used by cards or pools; its carrier cannot change",
                            spec.id
                        ),
                    ));
                }
                existing.index
            }
            None => {
                let index = u16::try_from(self.registry.plan_ids.len())
                    .map_err(|_| err(ErrorCode::InvalidValue, "too many plans (at most 65,535)"))?;
                self.registry.plan_ids.push(Some(spec.id.clone()));
                index
            }
        };
        self.registry.plans.insert(
            spec.id.clone(),
            PlanEntry {
                index,
                spec: spec.clone(),
            },
        );
        for shard in &mut self.shards {
            let i = usize::from(index);
            if shard.plans.len() <= i {
                shard.plans.resize(i + 1, None);
            }
            shard.plans[i] = Some(info.clone());
            // A changed allowance or traffic type re-evaluates the plan's cards and pools.
            let slots: Vec<u32> = shard
                .live_slots()
                .filter(|&s| shard.cards[s as usize].plan == index)
                .collect();
            for s in slots {
                shard.touch(s);
                shard.refresh_card(s);
            }
            for p in 0..shard.pools.len() as u32 {
                if !shard.pools[p as usize].removed {
                    shard.recompute_member_allowance(p);
                }
            }
        }
        Ok(())
    }

    fn plan_in_use(&self, index: u16) -> bool {
        self.shards.iter().any(|s| {
            s.live_slots()
                .any(|slot| s.cards[slot as usize].plan == index)
                || s.pools.iter().any(|p| !p.removed && p.plan == Some(index))
        })
    }

    pub(super) fn remove_plan(&mut self, plan: &PlanId) -> Result<(), CommandError> {
        let index = self.plan_entry(plan)?.index;
        if self.plan_in_use(index) {
            return Err(err(
                ErrorCode::PlanInUse,
                format!("plan {plan} is used by cards or pools"),
            ));
        }
        self.registry.plans.remove(plan);
        self.registry.plan_ids[usize::from(index)] = None;
        for shard in &mut self.shards {
            shard.plans[usize::from(index)] = None;
        }
        Ok(())
    }
}
