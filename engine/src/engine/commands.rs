//! The way of a command: a repeat is answered with its first result; a
//! command too far ahead of the clock is refused whole; any other moves
//! the clock to its `at`, is applied by its family's file, and each shard
//! then emits the events of what changed under it. Also the lookups and
//! small changes the families share.

use std::collections::BTreeSet;

use crate::command::{
    CardResult, Command, CommandError, CommandKind, CommandResult, ErrorCode, PoolKind,
    MAX_ATTRIBUTE_NAMES, MAX_BATCH, MAX_MONTHS_AHEAD, MAX_TAGS, MAX_TAGS_PER_CARD,
};
use crate::domain::{CardState, Reason, Reasons, ThresholdMb};
use crate::event::{Cause, JournalEntry, Output};
use crate::ids::Iccid;
use crate::shard::{add_months, Card, NO_POOL};
use crate::time::Timestamp;

use super::pools::touch_pool_members;
use super::{Engine, Loc};

pub(super) fn err(code: ErrorCode, message: impl Into<String>) -> CommandError {
    CommandError::new(code, message)
}

/// `what` (months) above [`MAX_MONTHS_AHEAD`].
pub(super) fn months_too_far(what: &str, months: u32) -> CommandError {
    err(
        ErrorCode::InvalidMonths,
        format!("{what} {months}: at most {MAX_MONTHS_AHEAD} (6 years from the command's at)"),
    )
}

impl Engine {
    /// Processes one command: validates, applies, answers, journals.
    pub fn process_command(&mut self, command: Command, seq: u64, out: &mut Vec<Output>) {
        self.process_command_received(command, None, seq, out);
    }

    /// [`Engine::process_command`] for a command that came with a receive
    /// time (the Kafka message timestamp, the time a file line was read):
    /// a command whose `at` is more than `max_future_ms` ahead of the later
    /// of the event clock and that time is refused as a whole
    /// (`future_at`) and moves nothing, so no command can carry the clock
    /// into the future. An accepted command moves the clock to its `at`
    /// (the operator's time), also when it then fails for another reason.
    /// Without a receive time (tests, the what-if replay) the caller vouches
    /// for `at`: it is not bounded.
    pub fn process_command_received(
        &mut self,
        command: Command,
        received_at: Option<Timestamp>,
        seq: u64,
        out: &mut Vec<Output>,
    ) {
        self.last_seq = Some(seq);
        if let Some(result) = self.registry.results.first_result(&command) {
            out.push(Output::Journal(Box::new(JournalEntry {
                seq,
                command,
                result,
                repeat: true,
            })));
            return;
        }
        let result = if received_at.is_some_and(|received| {
            command.at
                > self
                    .clock
                    .max(received)
                    .plus_millis(self.config.max_future_ms)
        }) {
            CommandResult::rejected(
                command.id.clone(),
                err(
                    ErrorCode::FutureAt,
                    format!(
                        "at {} is more than {} ms ahead of the event clock {} (received {})",
                        command.at,
                        self.config.max_future_ms,
                        self.clock,
                        received_at.map_or_else(|| "-".to_owned(), |t| t.to_string())
                    ),
                ),
            )
        } else {
            self.advance_clock(command.at, out);
            self.apply(&command, out)
        };
        self.registry.results.remember(&command.id, &result);
        out.push(Output::Journal(Box::new(JournalEntry {
            seq,
            command,
            result,
            repeat: false,
        })));
    }

    fn apply(&mut self, command: &Command, out: &mut Vec<Output>) -> CommandResult {
        let id = command.id.clone();
        let at = command.at;
        if let Some(batch) = command.kind.batch() {
            if let Err(e) = check_batch(batch) {
                return CommandResult::rejected(id, e);
            }
        }
        let outcome = self.apply_kind(&command.kind, at);
        let cause = Cause::Command {
            command_id: id.clone(),
        };
        for shard in &mut self.shards {
            shard.finish(&cause, at, out);
        }
        match outcome {
            Err(e) => CommandResult::rejected(id, e),
            Ok(results) => CommandResult {
                command_id: id,
                ok: results.iter().all(|r| r.ok),
                error: None,
                results,
            },
        }
    }

    fn apply_kind(
        &mut self,
        kind: &CommandKind,
        at: Timestamp,
    ) -> Result<Vec<CardResult>, CommandError> {
        match kind {
            CommandKind::UpsertPlan { plan } => self.upsert_plan(plan).map(|()| Vec::new()),
            CommandKind::RemovePlan { plan } => self.remove_plan(plan).map(|()| Vec::new()),
            CommandKind::UpsertCard { card } => self.upsert_card(card, at).map(|()| Vec::new()),
            CommandKind::Activate { iccids } => Ok(self.per_card(iccids, |e, loc| {
                let card = e.card(loc);
                match card.lifecycle {
                    CardState::Deregistered => Err(deregistered(card.iccid)),
                    CardState::Active => Err(err(
                        ErrorCode::InvalidState,
                        format!("card {} is already active", card.iccid),
                    )),
                    _ => {
                        e.shards[loc.shard as usize].activate(loc.slot, at);
                        e.apply_due_dates(loc, at);
                        Ok(())
                    }
                }
            })),
            CommandKind::Suspend { iccids } => Ok(self.per_card(iccids, |e, loc| {
                let card = e.card(loc);
                if card.lifecycle != CardState::Active {
                    return Err(err(
                        ErrorCode::InvalidState,
                        format!(
                            "card {} is {}; only active cards can be suspended",
                            card.iccid, card.lifecycle
                        ),
                    ));
                }
                e.set_reason(loc, Reason::Manual, true);
                Ok(())
            })),
            CommandKind::Resume { iccids } => Ok(self.per_card(iccids, |e, loc| {
                let card = e.card(loc);
                if card.lifecycle == CardState::Deregistered {
                    return Err(deregistered(card.iccid));
                }
                e.set_reason(loc, Reason::Manual, false);
                e.set_reason(loc, Reason::Violation, false);
                Ok(())
            })),
            CommandKind::Deregister { iccids } => Ok(self.per_card(iccids, |e, loc| {
                e.live(loc)?;
                e.deregister(loc);
                Ok(())
            })),
            CommandKind::Renew { iccids, months } => {
                if *months == 0 {
                    return Err(err(ErrorCode::InvalidValue, "renew needs months >= 1"));
                }
                if *months > MAX_MONTHS_AHEAD {
                    return Err(months_too_far("renew months", *months));
                }
                let offset = self.config.calendar.utc_offset_secs;
                let bound = add_months(at, MAX_MONTHS_AHEAD, offset);
                Ok(self.per_card(iccids, |e, loc| {
                    e.live(loc)?;
                    let card = e.card(loc);
                    let base = if card.expires_at == Timestamp::MAX {
                        at
                    } else {
                        card.expires_at.max(at)
                    };
                    // `base` past the bound is refused before any month is
                    // added to it: the sum stays inside the date range.
                    let new_expiry = (base <= bound)
                        .then(|| add_months(base, *months, offset))
                        .filter(|t| *t <= bound)
                        .ok_or_else(|| {
                            err(
                                ErrorCode::InvalidMonths,
                                format!(
                                    "renewing {} by {months} months from {base} reaches beyond \
                                     6 years from {at} ({bound})",
                                    card.iccid
                                ),
                            )
                        })?;
                    let shard = &mut e.shards[loc.shard as usize];
                    shard.touch(loc.slot);
                    shard.cards[loc.slot as usize].expires_at = new_expiry;
                    shard.reschedule(loc.slot);
                    e.apply_due_dates(loc, at);
                    Ok(())
                }))
            }
            CommandKind::SetThreshold { iccids, mb } => {
                if *mb < -1 {
                    return Err(err(
                        ErrorCode::InvalidThreshold,
                        format!("threshold {mb} MB: use -1 for none, 0 or a positive MB value"),
                    ));
                }
                let Ok(mb32) = i32::try_from(*mb) else {
                    return Err(err(
                        ErrorCode::InvalidValue,
                        format!("threshold {mb} MB is too large"),
                    ));
                };
                Ok(self.per_card(iccids, |e, loc| {
                    e.live(loc)?;
                    let card = e.card(loc);
                    if card.carrier.threshold_needs_forward_pool() && !e.in_forward_pool(loc) {
                        return Err(err(
                            ErrorCode::ThresholdNotAllowed,
                            format!(
                                "{} card {} is not in a forward pool",
                                card.carrier, card.iccid
                            ),
                        ));
                    }
                    let shard = &mut e.shards[loc.shard as usize];
                    shard.touch(loc.slot);
                    let card = &mut shard.cards[loc.slot as usize];
                    card.threshold_mb = mb32;
                    let over = ThresholdMb(*mb)
                        .limit_bytes()
                        .is_some_and(|l| card.usage > l);
                    card.reasons = card.reasons.set(Reason::OverThreshold, over);
                    Ok(())
                }))
            }
            CommandKind::ClearThreshold { iccids } => Ok(self.per_card(iccids, |e, loc| {
                e.live(loc)?;
                e.shards[loc.shard as usize].cards[loc.slot as usize].threshold_mb = -1;
                Ok(())
            })),
            CommandKind::AddOn { iccid, pool, mb } => self
                .add_on(iccid.as_ref(), pool.as_ref(), *mb, at)
                .map(|()| Vec::new()),
            CommandKind::CreatePool { pool } => self.create_pool(pool).map(|()| Vec::new()),
            CommandKind::AddPoolMembers { pool, iccids } => {
                let entry = self.pool_entry(pool)?.clone();
                Ok(self.per_card(iccids, |e, loc| e.add_member(&entry, loc)))
            }
            CommandKind::RemovePoolMembers { pool, iccids } => {
                let entry = self.pool_entry(pool)?.clone();
                Ok(self.per_card(iccids, |e, loc| {
                    if loc.shard != entry.shard || e.card(loc).pool != entry.index {
                        return Err(err(
                            ErrorCode::NotInPool,
                            format!("card {} is not a member of pool {pool}", e.card(loc).iccid),
                        ));
                    }
                    e.shards[loc.shard as usize].remove_member(loc.slot);
                    Ok(())
                }))
            }
            CommandKind::FreezePool { pool } | CommandKind::UnfreezePool { pool } => {
                let freeze = matches!(kind, CommandKind::FreezePool { .. });
                let entry = self.pool_entry(pool)?.clone();
                if entry.kind != PoolKind::Backward {
                    return Err(err(
                        ErrorCode::WrongPoolKind,
                        format!("pool {pool} is a forward pool; only backward pools are frozen"),
                    ));
                }
                let shard = &mut self.shards[entry.shard as usize];
                shard.pools[entry.index as usize].frozen = freeze;
                let members = crate::shard::member_slots(&shard.pools[entry.index as usize]);
                touch_pool_members(shard, &members);
                Ok(Vec::new())
            }
            CommandKind::ReportViolation { iccids } => Ok(self.per_card(iccids, |e, loc| {
                e.live(loc)?;
                e.set_reason(loc, Reason::Violation, true);
                Ok(())
            })),
            CommandKind::Rebind { iccid, imei } => {
                let loc = self.locate(*iccid)?;
                self.live(loc)?;
                self.set_reason(loc, Reason::Violation, false);
                if let Some(imei) = imei {
                    self.shards[loc.shard as usize].set_ident(loc.slot, 2, Some(imei.clone()));
                }
                Ok(Vec::new())
            }
            CommandKind::UpsertRule { rule } => self.upsert_rule(rule).map(|()| Vec::new()),
            CommandKind::EnableRule { rule } | CommandKind::DisableRule { rule } => {
                let enable = matches!(kind, CommandKind::EnableRule { .. });
                let Some(spec) = self.registry.rules.get(rule) else {
                    return Err(err(ErrorCode::UnknownRule, format!("no rule {rule:?}")));
                };
                let mut spec = spec.clone();
                let was_enabled = spec.enabled;
                spec.enabled = enable;
                if enable {
                    self.validate_rule(&spec)?;
                }
                self.registry.rules.insert(rule.clone(), spec);
                self.refresh_backward_rules();
                self.push_rules();
                if enable && !was_enabled {
                    self.scan_rule(rule);
                }
                Ok(Vec::new())
            }
            CommandKind::RemoveRule { rule } => {
                if self.registry.rules.remove(rule).is_none() {
                    return Err(err(ErrorCode::UnknownRule, format!("no rule {rule:?}")));
                }
                self.registry.rule_keys.remove(rule);
                self.refresh_backward_rules();
                self.push_rules();
                Ok(Vec::new())
            }
            CommandKind::UpsertWebhook { webhook } => {
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
                Ok(Vec::new())
            }
            CommandKind::RemoveWebhook { webhook } => {
                if let Some(rule) = self.registry.rules.values().find(|r| {
                    r.enabled
                        && r.actions.iter().any(|a| {
                            a.get("endpoint").and_then(|e| e.as_str()) == Some(webhook.as_str())
                        })
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
                Ok(Vec::new())
            }
            CommandKind::UpsertTag { tag } => {
                if !self.registry.tags.contains_key(&tag.name) {
                    if self.registry.tags.len() >= MAX_TAGS {
                        return Err(err(
                            ErrorCode::TagLimitReached,
                            format!("an operator has at most {MAX_TAGS} tags"),
                        ));
                    }
                    let index = self.registry.tag_names.len() as u32;
                    self.registry.tag_names.push(Some(tag.name.clone()));
                    self.registry
                        .tags
                        .insert(tag.name.clone(), (index, tag.clone()));
                } else if let Some(entry) = self.registry.tags.get_mut(&tag.name) {
                    entry.1 = tag.clone();
                }
                Ok(Vec::new())
            }
            CommandKind::RemoveTag { tag } => self.remove_tag(tag).map(|()| Vec::new()),
            CommandKind::BindTags { iccids, tags } | CommandKind::UnbindTags { iccids, tags } => {
                let bind = matches!(kind, CommandKind::BindTags { .. });
                let indexes = self.tag_indexes(tags)?;
                Ok(self.per_card(iccids, |e, loc| {
                    e.live(loc)?;
                    let shard = &mut e.shards[loc.shard as usize];
                    let mut current: BTreeSet<u32> =
                        shard.tags_of(loc.slot).iter().copied().collect();
                    for t in &indexes {
                        if bind {
                            current.insert(*t);
                        } else {
                            current.remove(t);
                        }
                    }
                    if current.len() > MAX_TAGS_PER_CARD {
                        return Err(err(
                            ErrorCode::TooManyTags,
                            format!(
                                "card {} would hold {} tags; at most {MAX_TAGS_PER_CARD}",
                                shard.cards[loc.slot as usize].iccid,
                                current.len()
                            ),
                        ));
                    }
                    shard.set_tags(loc.slot, &current.into_iter().collect::<Vec<_>>());
                    Ok(())
                }))
            }
            CommandKind::SetAttributeNames { names } => {
                if names.len() > MAX_ATTRIBUTE_NAMES {
                    return Err(err(
                        ErrorCode::InvalidAttribute,
                        format!(
                            "{} attribute names; at most {MAX_ATTRIBUTE_NAMES}",
                            names.len()
                        ),
                    ));
                }
                let unique: BTreeSet<&String> = names.iter().collect();
                if unique.len() != names.len() || names.iter().any(String::is_empty) {
                    return Err(err(
                        ErrorCode::InvalidAttribute,
                        "attribute names must be non-empty and distinct",
                    ));
                }
                self.registry.attribute_names = names.clone();
                Ok(Vec::new())
            }
        }
    }

    // ----- helpers ------------------------------------------------------

    pub(super) fn per_card(
        &mut self,
        iccids: &[Iccid],
        mut f: impl FnMut(&mut Engine, Loc) -> Result<(), CommandError>,
    ) -> Vec<CardResult> {
        iccids
            .iter()
            .map(|&iccid| {
                let outcome = self.locate(iccid).and_then(|loc| f(self, loc));
                match outcome {
                    Ok(()) => CardResult {
                        iccid,
                        ok: true,
                        error: None,
                    },
                    Err(e) => CardResult {
                        iccid,
                        ok: false,
                        error: Some(e),
                    },
                }
            })
            .collect()
    }

    pub(super) fn locate(&self, iccid: Iccid) -> Result<Loc, CommandError> {
        self.directory.get(&iccid).ok_or_else(|| {
            err(
                ErrorCode::UnknownCard,
                format!("no card with ICCID {iccid}"),
            )
        })
    }

    pub(crate) fn card(&self, loc: Loc) -> &Card {
        &self.shards[loc.shard as usize].cards[loc.slot as usize]
    }

    pub(super) fn live(&self, loc: Loc) -> Result<(), CommandError> {
        let card = self.card(loc);
        if card.lifecycle == CardState::Deregistered {
            Err(deregistered(card.iccid))
        } else {
            Ok(())
        }
    }

    pub(super) fn in_forward_pool(&self, loc: Loc) -> bool {
        let shard = &self.shards[loc.shard as usize];
        let p = shard.cards[loc.slot as usize].pool;
        p != NO_POOL && shard.pools[p as usize].kind == PoolKind::Forward
    }

    pub(super) fn set_reason(&mut self, loc: Loc, reason: Reason, present: bool) {
        let shard = &mut self.shards[loc.shard as usize];
        shard.touch(loc.slot);
        let card = &mut shard.cards[loc.slot as usize];
        card.reasons = card.reasons.set(reason, present);
    }

    pub(super) fn deregister(&mut self, loc: Loc) {
        let shard = &mut self.shards[loc.shard as usize];
        shard.touch(loc.slot);
        shard.remove_member(loc.slot);
        let card = &mut shard.cards[loc.slot as usize];
        card.lifecycle = CardState::Deregistered;
        card.reasons = Reasons::EMPTY;
    }

    /// Applies dates already past at `at` within the current command:
    /// expiry (`plan_expired` set or lifted), end of test or silent period.
    pub(super) fn apply_due_dates(&mut self, loc: Loc, at: Timestamp) {
        let shard = &mut self.shards[loc.shard as usize];
        shard.touch(loc.slot);
        let card = &shard.cards[loc.slot as usize];
        if card.lifecycle == CardState::Deregistered {
            return;
        }
        let expired = card.expires_at <= at;
        let lifecycle = card.lifecycle;
        let (test_end, silent_end) = shard
            .extra(loc.slot)
            .map_or((None, None), |e| (e.test_ends_at, e.silent_ends_at));
        let card = &mut shard.cards[loc.slot as usize];
        card.reasons = card.reasons.set(Reason::PlanExpired, expired);
        if lifecycle == CardState::Testable && test_end.is_some_and(|t| t <= at) {
            card.lifecycle = CardState::Activatable;
        }
        let lifecycle = card.lifecycle;
        if let Some(silent_end) =
            silent_end.filter(|t| lifecycle == CardState::Activatable && *t <= at)
        {
            // Forced activation dates from the end of the silent period.
            shard.activate(loc.slot, silent_end);
            let card = &mut shard.cards[loc.slot as usize];
            card.reasons = card.reasons.set(Reason::PlanExpired, card.expires_at <= at);
        }
        shard.refresh_card(loc.slot);
    }

    pub(super) fn shard_for_card(&self, iccid: Iccid) -> u32 {
        (iccid.stable_hash() % self.shards.len() as u64) as u32
    }
}

pub(super) fn deregistered(iccid: Iccid) -> CommandError {
    err(
        ErrorCode::Deregistered,
        format!("card {iccid} is deregistered"),
    )
}

fn check_batch(batch: &[Iccid]) -> Result<(), CommandError> {
    if batch.is_empty() {
        return Err(err(ErrorCode::EmptyBatch, "the batch names no card"));
    }
    if batch.len() > MAX_BATCH {
        return Err(err(
            ErrorCode::BatchTooLarge,
            format!("the batch names {} cards; at most {MAX_BATCH}", batch.len()),
        ));
    }
    let mut seen = hashbrown::HashSet::with_capacity(batch.len());
    if let Some(dup) = batch.iter().find(|i| !seen.insert(**i)) {
        return Err(err(
            ErrorCode::DuplicateCard,
            format!("card {dup} appears twice in the batch"),
        ));
    }
    Ok(())
}
