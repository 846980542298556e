//! Rule evaluation inside a shard (see [`crate::rule`] for the semantics).
//!
//! Evaluation runs at the end of every cause, in [`Shard::finish`], over
//! what the cause touched: the cards and pools whose state may have changed
//! (usage, allowance, membership, dates), the visible state changes (type
//! 4), plus full scans where a whole population may enter at once (a rule
//! added or enabled: every target; a rollover: every card of the carrier
//! for conditions that can hold at zero usage). Type 1 ("days to expiry <=
//! N") also enters as time passes: when the clock crosses local midnights,
//! the cards whose expiry is now N days away are found by a range query
//! over the shard's expiry-ordered deadline set, not by a scan of all cards.
//! The same day starts remind: a target still inside the condition of a
//! rule whose action reminds (`day`, `every_N_days`, `cycle`) fires that
//! action again when its window has passed; the targets are the ones with
//! a fired state marked inside, not every card.

use std::collections::BTreeSet;

use crate::command::PoolKind;
use crate::cycle::CycleId;
use crate::domain::{CardState, Carrier, Reasons, MB};
use crate::event::{event_id, ActionEvent, Cause, DeadlineKind, Observed, Output, RuleFiredEvent};
use crate::rule::{
    remaining, Channel, Compiled, Mark, RuleAction, RuleCondition, RuleType, Window,
};
use crate::shard::{Shard, NO_POOL};
use crate::time::{Timestamp, MS_PER_DAY};

/// An enabled rule as one shard evaluates it: the filter resolved to this
/// shard's plan, tag and pool indexes.
#[derive(Debug, Clone)]
pub(crate) struct ShardRule {
    /// Key of the rule's fired state (stable while the rule's type,
    /// condition and filter stay the same).
    pub(crate) key: u32,
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) rule: Compiled,
    /// Plan indexes (empty: any plan).
    pub(crate) plans: Vec<u16>,
    /// Tag indexes; a card matches with any of them (empty: any card).
    pub(crate) tags: Vec<u32>,
    /// Local indexes of the pools the filter names; `None` when it names
    /// none (every card, every pool).
    pub(crate) pools: Option<Vec<u32>>,
    /// Attribute values a card must all have (empty: any card).
    pub(crate) attributes: Vec<(String, String)>,
}

impl ShardRule {
    /// Whether an action of this rule fires again while its condition
    /// keeps holding (see [`crate::rule`]): at day starts.
    fn reminds(&self) -> bool {
        if self.rule.rule_type == RuleType::StateChange {
            return false;
        }
        if self.rule.actions.is_empty() {
            return self.rule.reminder.reminds();
        }
        self.rule
            .actions
            .iter()
            .any(|a| a.channel != Channel::Suspend && a.reminder.reminds())
    }
}

/// A visible state change of one card under the current cause.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Change {
    pub(crate) slot: u32,
    pub(crate) old: CardState,
    pub(crate) new: CardState,
    pub(crate) reasons: Reasons,
}

/// Firing context of one cause.
struct Ctx<'a> {
    cause: &'a Cause,
    event_time: Timestamp,
    /// Time the condition is evaluated at (the shard's event clock, or the
    /// cause's own time for time-driven causes).
    now: Timestamp,
    /// A day start evaluated ahead of the rollovers of the same clock move:
    /// the cycle is the one of `now`, not the shard's current one.
    day_start: bool,
}

impl Shard {
    /// The cycle a target is in at `ctx`: the shard's current cycle of the
    /// carrier (a card whose own rollover comes later in the same clock
    /// move is still in its old cycle), or the cycle of a day start.
    fn rule_cycle(&self, carrier: Carrier, ctx: &Ctx<'_>) -> CycleId {
        if ctx.day_start {
            self.config.calendar.cycle_of(carrier, ctx.now)
        } else {
            self.cycle(carrier)
        }
    }
}

impl Shard {
    /// Installs the enabled rules; drops the fired state of rules that no
    /// longer exist (`live_keys`: keys of every rule in the registry,
    /// disabled ones included).
    pub(crate) fn set_rules(&mut self, rules: Vec<ShardRule>, live_keys: &BTreeSet<u32>) {
        self.card_marks.retain(|(_, k), _| live_keys.contains(k));
        self.pool_marks.retain(|(_, k), _| live_keys.contains(k));
        self.has_day_rules = rules
            .iter()
            .any(|r| r.rule.rule_type == RuleType::PlanExpiry || r.reminds());
        self.rules = rules;
    }

    /// Asks the end of the current cause to evaluate the rule with `key` on
    /// every target (rule added, changed or enabled).
    pub(crate) fn scan_rule(&mut self, key: u32) {
        if !self.pending.scan_rules.contains(&key) {
            self.pending.scan_rules.push(key);
        }
    }

    /// The fired state of a card leaving this shard.
    pub(crate) fn take_marks(&mut self, slot: u32) -> Vec<(u32, Mark)> {
        let keys: Vec<(u32, u32)> = self
            .card_marks
            .range((slot, 0)..=(slot, u32::MAX))
            .map(|(k, _)| *k)
            .collect();
        keys.into_iter()
            .filter_map(|k| self.card_marks.remove(&k).map(|m| (k.1, m)))
            .collect()
    }

    /// The fired state of a card arriving in this shard.
    pub(crate) fn put_marks(&mut self, slot: u32, marks: Vec<(u32, Mark)>) {
        for (key, mark) in marks {
            self.card_marks.insert((slot, key), mark);
        }
    }

    /// A rollover of `carrier`'s cycle: cards of that carrier whose usage
    /// conditions hold at zero usage enter again (evaluated at the end of
    /// the rollover); fired state of the ended cycle is dropped.
    pub(crate) fn rules_rollover(&mut self, carrier: Carrier) {
        if self.rules.is_empty() {
            return;
        }
        let usage_keys: Vec<u32> = self
            .rules
            .iter()
            .filter(|r| r.rule.rule_type == RuleType::CardUsage)
            .map(|r| r.key)
            .collect();
        let pool_keys: Vec<u32> = self
            .rules
            .iter()
            .filter(|r| r.rule.rule_type == RuleType::PoolUsage)
            .map(|r| r.key)
            .collect();
        let cards = &self.cards;
        self.card_marks.retain(|(slot, key), mark| {
            if usage_keys.contains(key) && cards[*slot as usize].carrier == carrier {
                mark.after_rollover();
            }
            !mark.is_default()
        });
        let pools = &self.pools;
        self.pool_marks.retain(|(p, key), mark| {
            if pool_keys.contains(key) && pools[*p as usize].cycle_carrier() == carrier {
                mark.after_rollover();
            }
            !mark.is_default()
        });
        let at_zero = self.rules.iter().any(|r| {
            r.rule.rule_type == RuleType::CardUsage
                && matches!(r.rule.condition, RuleCondition::RemainingMbLte(_))
        });
        if at_zero && !self.pending.rollovers.contains(&carrier) {
            self.pending.rollovers.push(carrier);
        }
    }

    /// Type 1 rules as the clock moves from `from` to `to` across local
    /// midnights: each card whose expiry day is now N days away enters at
    /// the start of that day (cause: the day start).
    pub(crate) fn rule_days(&mut self, from: Timestamp, to: Timestamp, out: &mut Vec<Output>) {
        let cal = self.config.calendar;
        let (d_from, d_to) = (cal.local_day(from), cal.local_day(to));
        if d_to <= d_from || from == Timestamp::MIN {
            return;
        }
        let offset_ms = i64::from(cal.utc_offset_secs) * 1000;
        let day_start = |day: i64| Timestamp(day * MS_PER_DAY - offset_ms);
        let rules = std::mem::take(&mut self.rules);
        let mut entries: Vec<(Timestamp, usize, u32)> = Vec::new();
        for (ri, rule) in rules.iter().enumerate() {
            let RuleCondition::DaysToExpiryLte(n) = rule.rule.condition else {
                continue;
            };
            let n = i64::from(n);
            let lo = day_start(d_from + n + 1).0;
            let hi = day_start(d_to + n + 1).0;
            for &(at, slot, kind) in self
                .deadlines
                .range((lo, 0, DeadlineKind::PlanExpiry)..(hi, 0, DeadlineKind::PlanExpiry))
            {
                // Other kinds may name a pool, not a card (`RetentionEnd`).
                if kind != DeadlineKind::PlanExpiry {
                    continue;
                }
                let card = &self.cards[slot as usize];
                if card.expires_at.0 != at || card.vacant {
                    continue;
                }
                entries.push((day_start(cal.local_day(Timestamp(at)) - n), ri, slot));
            }
        }
        entries.sort_by_key(|&(t, ri, slot)| (t, ri, self.cards[slot as usize].iccid));
        entries.dedup();
        let reminding: Vec<usize> = (0..rules.len()).filter(|&ri| rules[ri].reminds()).collect();
        let mut fired = Vec::new();
        let mut entries = entries.into_iter().peekable();
        for day in d_from + 1..=d_to {
            let t = day_start(day);
            let cause = Cause::Deadline {
                kind: DeadlineKind::RuleDay,
                at: t,
            };
            let ctx = Ctx {
                cause: &cause,
                event_time: t,
                now: t,
                day_start: true,
            };
            while let Some((_, ri, slot)) = entries.next_if(|e| e.0 <= t) {
                self.eval_card(&rules[ri], slot, &ctx, &mut fired);
            }
            // Then the reminders of the targets still inside (one that
            // entered just now has used this window).
            for &ri in &reminding {
                let rule = &rules[ri];
                if rule.rule.rule_type == RuleType::PoolUsage {
                    let mut pools: Vec<u32> = self.inside_targets(&self.pool_marks, rule.key);
                    pools.sort_by(|a, b| {
                        self.pools[*a as usize].id.cmp(&self.pools[*b as usize].id)
                    });
                    for p in pools {
                        self.remind_pool(rule, p, &ctx, &mut fired);
                    }
                } else {
                    let mut slots: Vec<u32> = self.inside_targets(&self.card_marks, rule.key);
                    slots.sort_by_key(|&s| self.cards[s as usize].iccid);
                    for slot in slots {
                        self.remind_card(rule, slot, &ctx, &mut fired);
                    }
                }
            }
        }
        self.rules = rules;
        out.extend(
            fired
                .into_iter()
                .map(|e| Output::Action(ActionEvent::RuleFired(Box::new(e)))),
        );
    }

    /// The targets marked inside the condition of the rule with `key`.
    fn inside_targets(
        &self,
        marks: &std::collections::BTreeMap<(u32, u32), Mark>,
        key: u32,
    ) -> Vec<u32> {
        marks
            .iter()
            .filter(|((_, k), m)| *k == key && m.inside != 0)
            .map(|((target, _), _)| *target)
            .collect()
    }

    /// Evaluates the rules at the end of a cause (called by `finish`).
    /// `cards` are the touched cards (sorted by ICCID), `changes` their
    /// visible state changes, `pools` the touched pools.
    pub(crate) fn fire_rules(
        &mut self,
        cause: &Cause,
        event_time: Timestamp,
        cards: &[u32],
        changes: &[Change],
        pools: &[u32],
        out: &mut Vec<Output>,
    ) {
        let scans = std::mem::take(&mut self.pending.scan_rules);
        let rollovers = std::mem::take(&mut self.pending.rollovers);
        if self.rules.is_empty() {
            return;
        }
        let rules = std::mem::take(&mut self.rules);
        // Time-driven causes are evaluated at their own time, not at the
        // shard's clock: a threaded shard may see a rollover or deadline
        // only at its next record, long after (same firings either way).
        let now = match cause {
            Cause::Rollover { .. } | Cause::Deadline { .. } => event_time,
            Cause::Record { .. } | Cause::Command { .. } => self.clock,
        };
        let ctx = Ctx {
            cause,
            event_time,
            now: now.max(Timestamp(0)),
            day_start: false,
        };
        let mut fired = Vec::new();
        for rule in &rules {
            let scan = scans.contains(&rule.key);
            match rule.rule.rule_type {
                RuleType::PlanExpiry | RuleType::CardUsage => {
                    if scan {
                        let mut all: Vec<u32> = self.live_slots().collect();
                        all.sort_by_key(|&s| self.cards[s as usize].iccid);
                        for slot in all {
                            self.eval_card(rule, slot, &ctx, &mut fired);
                        }
                        continue;
                    }
                    // Only "remaining" can hold at zero usage.
                    if !rollovers.is_empty()
                        && matches!(rule.rule.condition, RuleCondition::RemainingMbLte(_))
                    {
                        let mut all: Vec<u32> = self
                            .live_slots()
                            .filter(|&s| rollovers.contains(&self.cards[s as usize].carrier))
                            .collect();
                        all.sort_by_key(|&s| self.cards[s as usize].iccid);
                        for slot in all {
                            self.eval_card(rule, slot, &ctx, &mut fired);
                        }
                    }
                    for &slot in cards {
                        self.eval_card(rule, slot, &ctx, &mut fired);
                    }
                }
                RuleType::PoolUsage => {
                    let targets: Vec<u32> = if scan {
                        (0..self.pools.len() as u32).collect()
                    } else {
                        pools.to_vec()
                    };
                    for p in targets {
                        self.eval_pool(rule, p, &ctx, &mut fired);
                    }
                }
                RuleType::StateChange => {
                    for change in changes {
                        self.eval_change(rule, change, &ctx, &mut fired);
                    }
                }
            }
        }
        self.rules = rules;
        out.extend(
            fired
                .into_iter()
                .map(|e| Output::Action(ActionEvent::RuleFired(Box::new(e)))),
        );
    }

    fn card_matches(&self, rule: &ShardRule, slot: u32) -> bool {
        let card = &self.cards[slot as usize];
        (rule.plans.is_empty() || rule.plans.contains(&card.plan))
            && (rule.tags.is_empty() || self.tags_of(slot).iter().any(|t| rule.tags.contains(t)))
            && rule
                .pools
                .as_ref()
                .is_none_or(|pools| pools.contains(&card.pool))
            && (rule.attributes.is_empty() || {
                let have = self.extra(slot).map(|e| &e.attributes);
                rule.attributes
                    .iter()
                    .all(|(k, v)| have.and_then(|a| a.get(k)) == Some(v))
            })
    }

    /// Allowance a card's remaining conditions compare against: plan +
    /// card add-ons; none for backward-pool members (post-paid).
    fn card_allowance(&self, slot: u32) -> Option<u64> {
        let card = &self.cards[slot as usize];
        if card.pool != NO_POOL && self.pools[card.pool as usize].kind == PoolKind::Backward {
            return None;
        }
        let plan = self
            .plans
            .get(usize::from(card.plan))
            .and_then(Option::as_ref)?;
        Some(
            plan.allowance_bytes
                .saturating_add(u64::from(card.addon_mb).saturating_mul(MB)),
        )
    }

    fn eval_card(
        &mut self,
        rule: &ShardRule,
        slot: u32,
        ctx: &Ctx<'_>,
        fired: &mut Vec<RuleFiredEvent>,
    ) {
        let Some(card) = self.cards.get(slot as usize) else {
            return;
        };
        let cal = self.config.calendar;
        let cycle = self.rule_cycle(card.carrier, ctx);
        let Some((holds, observed)) = self.card_condition(rule, slot, ctx) else {
            return;
        };
        let stamp = inside_stamp(rule.rule.rule_type, cycle);
        let key = (slot, rule.key);
        let mut mark = self.card_marks.get(&key).copied().unwrap_or_default();
        let Some(actions) = enter(&mut mark, holds, stamp, rule, cycle, &cal, ctx.now, false)
        else {
            store(&mut self.card_marks, key, mark);
            return;
        };
        store(&mut self.card_marks, key, mark);
        let card = &self.cards[slot as usize];
        let event = self.card_event(rule, slot, card.iccid, observed, cycle, actions, ctx);
        fired.push(event);
    }

    /// A day start for a card marked inside: its reminding actions whose
    /// window has passed fire again while the condition still holds (for
    /// usage conditions, in the same cycle: a new cycle starts outside).
    fn remind_card(
        &mut self,
        rule: &ShardRule,
        slot: u32,
        ctx: &Ctx<'_>,
        fired: &mut Vec<RuleFiredEvent>,
    ) {
        let key = (slot, rule.key);
        let Some(mut mark) = self.card_marks.get(&key).copied() else {
            return;
        };
        let cal = self.config.calendar;
        let cycle = self.rule_cycle(self.cards[slot as usize].carrier, ctx);
        if mark.inside != inside_stamp(rule.rule.rule_type, cycle) {
            return;
        }
        let Some((holds, observed)) = self.card_condition(rule, slot, ctx) else {
            return;
        };
        if !holds {
            mark.inside = 0;
            store(&mut self.card_marks, key, mark);
            return;
        }
        let Some(actions) = remind(&mut mark, rule, cycle, &cal, ctx.now) else {
            return;
        };
        store(&mut self.card_marks, key, mark);
        let card = &self.cards[slot as usize];
        let event = self.card_event(rule, slot, card.iccid, observed, cycle, actions, ctx);
        fired.push(event);
    }

    /// Whether a card rule's condition holds for the card (alive and
    /// matching the filter), with the observed value; `None` for a state
    /// change rule (no condition that holds).
    fn card_condition(
        &self,
        rule: &ShardRule,
        slot: u32,
        ctx: &Ctx<'_>,
    ) -> Option<(bool, Observed)> {
        let card = &self.cards[slot as usize];
        let cal = self.config.calendar;
        let live = !card.vacant && card.lifecycle != CardState::Deregistered;
        let (holds, observed) = match rule.rule.condition {
            RuleCondition::DaysToExpiryLte(n) => {
                let days = cal.local_day(card.expires_at) - cal.local_day(ctx.now);
                (
                    card.expires_at != Timestamp::MAX && days <= i64::from(n),
                    Observed::DaysToExpiry {
                        days,
                        expires_at: card.expires_at,
                    },
                )
            }
            RuleCondition::RemainingMbLte(_) | RuleCondition::UsedMbGte(_) => {
                let allowance = self.card_allowance(slot);
                (
                    rule.rule.condition.usage_holds(card.usage, allowance),
                    usage_observed(card.usage, allowance),
                )
            }
            RuleCondition::StateChange { .. } => return None,
        };
        Some((holds && live && self.card_matches(rule, slot), observed))
    }

    fn eval_change(
        &mut self,
        rule: &ShardRule,
        change: &Change,
        ctx: &Ctx<'_>,
        fired: &mut Vec<RuleFiredEvent>,
    ) {
        if !rule.rule.condition.change_holds(change.old, change.new)
            || !self.card_matches(rule, change.slot)
        {
            return;
        }
        let card = &self.cards[change.slot as usize];
        let cal = self.config.calendar;
        let cycle = self.rule_cycle(card.carrier, ctx);
        let key = (change.slot, rule.key);
        let mut mark = self.card_marks.get(&key).copied().unwrap_or_default();
        // A state change is an entry by itself: no "inside" state.
        let Some(actions) = enter(&mut mark, true, 0, rule, cycle, &cal, ctx.now, false) else {
            return;
        };
        mark.inside = 0;
        store(&mut self.card_marks, key, mark);
        let observed = Observed::StateChange {
            old: change.old,
            new: change.new,
            reasons: change.reasons,
        };
        let event = self.card_event(rule, change.slot, card.iccid, observed, cycle, actions, ctx);
        fired.push(event);
    }

    #[allow(clippy::too_many_arguments)]
    fn card_event(
        &self,
        rule: &ShardRule,
        slot: u32,
        iccid: crate::ids::Iccid,
        observed: Observed,
        cycle: CycleId,
        actions: Vec<RuleAction>,
        ctx: &Ctx<'_>,
    ) -> RuleFiredEvent {
        let card = &self.cards[slot as usize];
        let plan = self
            .plans
            .get(usize::from(card.plan))
            .and_then(Option::as_ref);
        let pool = (card.pool != NO_POOL).then(|| &self.pools[card.pool as usize]);
        RuleFiredEvent {
            id: event_id("rule_fired", &format!("{}|{iccid}", rule.id), ctx.cause),
            rule: rule.id.clone(),
            rule_name: rule.name.clone(),
            rule_type: rule.rule.rule_type.code(),
            iccid: Some(iccid),
            pool: pool.map(|p| p.id.clone()),
            pool_name: pool.map(|p| p.name.clone()),
            plan: plan.map(|p| p.id.clone()),
            plan_name: plan.map(|p| p.name.clone()),
            condition: rule.rule.condition.clone(),
            observed,
            event_time: ctx.event_time,
            processed_at: None,
            cycle,
            actions,
            cause: ctx.cause.clone(),
        }
    }

    fn eval_pool(
        &mut self,
        rule: &ShardRule,
        p: u32,
        ctx: &Ctx<'_>,
        fired: &mut Vec<RuleFiredEvent>,
    ) {
        let Some(pool) = self.pools.get(p as usize) else {
            return;
        };
        let (holds, allowance) = self.pool_condition(rule, p);
        let cal = self.config.calendar;
        let cycle = self.rule_cycle(pool.cycle_carrier(), ctx);
        let key = (p, rule.key);
        let mut mark = self.pool_marks.get(&key).copied().unwrap_or_default();
        let stamp = inside_stamp(rule.rule.rule_type, cycle);
        let backward = pool.kind == PoolKind::Backward;
        let Some(actions) = enter(
            &mut mark, holds, stamp, rule, cycle, &cal, ctx.now, !backward,
        ) else {
            store(&mut self.pool_marks, key, mark);
            return;
        };
        store(&mut self.pool_marks, key, mark);
        fired.push(self.pool_event(rule, p, allowance, cycle, actions, ctx));
    }

    /// [`Shard::remind_card`] for a pool.
    fn remind_pool(
        &mut self,
        rule: &ShardRule,
        p: u32,
        ctx: &Ctx<'_>,
        fired: &mut Vec<RuleFiredEvent>,
    ) {
        let key = (p, rule.key);
        let Some(mut mark) = self.pool_marks.get(&key).copied() else {
            return;
        };
        let cal = self.config.calendar;
        let cycle = self.rule_cycle(self.pools[p as usize].cycle_carrier(), ctx);
        if mark.inside != inside_stamp(rule.rule.rule_type, cycle) {
            return;
        }
        let (holds, allowance) = self.pool_condition(rule, p);
        if !holds {
            mark.inside = 0;
            store(&mut self.pool_marks, key, mark);
            return;
        }
        let Some(actions) = remind(&mut mark, rule, cycle, &cal, ctx.now) else {
            return;
        };
        store(&mut self.pool_marks, key, mark);
        fired.push(self.pool_event(rule, p, allowance, cycle, actions, ctx));
    }

    /// Whether a pool rule's condition holds for pool `p`, and the pool's
    /// allowance (forward pools).
    fn pool_condition(&self, rule: &ShardRule, p: u32) -> (bool, Option<u64>) {
        let pool = &self.pools[p as usize];
        let allowance = (pool.kind == PoolKind::Forward).then(|| pool.allowance_bytes());
        let matches = !pool.removed
            && rule.pools.as_ref().is_none_or(|pools| pools.contains(&p))
            && (rule.plans.is_empty() || pool.plan.is_some_and(|i| rule.plans.contains(&i)));
        (
            matches && rule.rule.condition.usage_holds(pool.usage, allowance),
            allowance,
        )
    }

    fn pool_event(
        &self,
        rule: &ShardRule,
        p: u32,
        allowance: Option<u64>,
        cycle: CycleId,
        actions: Vec<RuleAction>,
        ctx: &Ctx<'_>,
    ) -> RuleFiredEvent {
        let pool = &self.pools[p as usize];
        let plan = pool
            .plan
            .and_then(|i| self.plans.get(usize::from(i)).and_then(Option::as_ref));
        RuleFiredEvent {
            id: event_id("rule_fired", &format!("{}|{}", rule.id, pool.id), ctx.cause),
            rule: rule.id.clone(),
            rule_name: rule.name.clone(),
            rule_type: rule.rule.rule_type.code(),
            iccid: None,
            pool: Some(pool.id.clone()),
            pool_name: Some(pool.name.clone()),
            plan: plan.map(|p| p.id.clone()),
            plan_name: plan.map(|p| p.name.clone()),
            condition: rule.rule.condition.clone(),
            observed: usage_observed(pool.usage, allowance),
            event_time: ctx.event_time,
            processed_at: None,
            cycle,
            actions,
            cause: ctx.cause.clone(),
        }
    }
}

fn usage_observed(used: u64, allowance: Option<u64>) -> Observed {
    Observed::Usage {
        used_bytes: used,
        allowance_bytes: allowance,
        remaining_bytes: allowance.map(|a| i64::try_from(remaining(used, a)).unwrap_or(i64::MIN)),
    }
}

/// What `Mark::inside` holds while a condition holds: for usage conditions
/// the cycle it held in (a new cycle starts outside), else 1.
fn inside_stamp(rule_type: RuleType, cycle: CycleId) -> u32 {
    match rule_type {
        RuleType::CardUsage | RuleType::PoolUsage => cycle.0.saturating_add(1),
        _ => 1,
    }
}

fn store(marks: &mut std::collections::BTreeMap<(u32, u32), Mark>, key: (u32, u32), mark: Mark) {
    if mark.is_default() {
        marks.remove(&key);
    } else {
        marks.insert(key, mark);
    }
}

/// The entry logic: updates `mark` for a condition that holds (or not) and
/// returns the actions that fire, or `None` when nothing fires (no entry,
/// or every action's window already used). `no_suspend` leaves out suspend
/// actions (targets other than backward pools).
#[allow(clippy::too_many_arguments)]
fn enter(
    mark: &mut Mark,
    holds: bool,
    stamp: u32,
    rule: &ShardRule,
    cycle: CycleId,
    cal: &crate::cycle::CycleCalendar,
    now: Timestamp,
    no_suspend: bool,
) -> Option<Vec<RuleAction>> {
    if !holds {
        mark.inside = 0;
        return None;
    }
    if stamp != 0 {
        if mark.inside == stamp {
            return None;
        }
        mark.inside = stamp;
    }
    let window = Window {
        cycle,
        day: cal.local_day(now),
    };
    if rule.rule.actions.is_empty() {
        // A rule without actions records its firings under its own window.
        if !mark.allows(rule.rule.reminder, window) {
            return None;
        }
        mark.record(rule.rule.reminder, window);
        return Some(Vec::new());
    }
    let actions: Vec<RuleAction> = rule
        .rule
        .actions
        .iter()
        .filter(|a| !(no_suspend && a.channel == Channel::Suspend))
        .filter(|a| mark.allows(a.reminder, window))
        .cloned()
        .collect();
    if actions.is_empty() {
        return None;
    }
    for a in &actions {
        mark.record(a.reminder, window);
    }
    Some(actions)
}

/// The reminder of a target still inside: the actions that remind (never
/// a suspend) and whose window has passed, recorded in `mark`; `None`
/// when none.
fn remind(
    mark: &mut Mark,
    rule: &ShardRule,
    cycle: CycleId,
    cal: &crate::cycle::CycleCalendar,
    now: Timestamp,
) -> Option<Vec<RuleAction>> {
    let window = Window {
        cycle,
        day: cal.local_day(now),
    };
    if rule.rule.actions.is_empty() {
        let reminder = rule.rule.reminder;
        if !reminder.reminds() || !mark.allows(reminder, window) {
            return None;
        }
        mark.record(reminder, window);
        return Some(Vec::new());
    }
    let actions: Vec<RuleAction> = rule
        .rule
        .actions
        .iter()
        .filter(|a| a.channel != Channel::Suspend && a.reminder.reminds())
        .filter(|a| mark.allows(a.reminder, window))
        .cloned()
        .collect();
    if actions.is_empty() {
        return None;
    }
    for a in &actions {
        mark.record(a.reminder, window);
    }
    Some(actions)
}
