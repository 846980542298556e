//! The way of a command: a repeat is answered with its first result; a
//! command too far ahead of the clock is refused whole; any other moves
//! the clock to its `at`, is applied by its family's file, and each shard
//! then emits the events of what changed under it. Also the lookups and
//! small changes the families share.

use crate::command::{
    CardResult, Command, CommandError, CommandKind, CommandResult, ErrorCode, PoolKind, MAX_BATCH,
    MAX_MONTHS_AHEAD,
};
use crate::domain::{CardState, Reason};
use crate::event::{Cause, JournalEntry, Output};
use crate::ids::Iccid;
use crate::shard::{Card, NO_POOL};
use crate::time::Timestamp;

use super::{Engine, Loc};

pub(super) fn err(code: ErrorCode, message: impl Into<String>) -> CommandError {
    CommandError::new(code, message)
}

/// What a command that changes no card in particular answers with.
fn no_cards((): ()) -> Vec<CardResult> {
    Vec::new()
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

    /// One command's change, by family: each arm hands the command to the
    /// file of its family.
    fn apply_kind(
        &mut self,
        kind: &CommandKind,
        at: Timestamp,
    ) -> Result<Vec<CardResult>, CommandError> {
        match kind {
            CommandKind::UpsertPlan { plan } => self.upsert_plan(plan).map(no_cards),
            CommandKind::RemovePlan { plan } => self.remove_plan(plan).map(no_cards),
            CommandKind::UpsertCard { card } => self.upsert_card(card, at).map(no_cards),
            CommandKind::Activate { iccids } => Ok(self.activate(iccids, at)),
            CommandKind::Suspend { iccids } => Ok(self.suspend(iccids)),
            CommandKind::Resume { iccids } => Ok(self.resume(iccids)),
            CommandKind::Deregister { iccids } => Ok(self.deregister(iccids)),
            CommandKind::Renew { iccids, months } => self.renew(iccids, *months, at),
            CommandKind::ReportViolation { iccids } => Ok(self.report_violation(iccids)),
            CommandKind::Rebind { iccid, imei } => {
                self.rebind(*iccid, imei.as_deref(), at).map(no_cards)
            }
            CommandKind::SetThreshold { iccids, mb } => self.set_threshold(iccids, *mb),
            CommandKind::ClearThreshold { iccids } => Ok(self.clear_threshold(iccids)),
            CommandKind::AddOn { iccid, pool, mb } => self
                .add_on(iccid.as_ref(), pool.as_ref(), *mb, at)
                .map(no_cards),
            CommandKind::CreatePool { pool } => self.create_pool(pool).map(no_cards),
            CommandKind::AddPoolMembers { pool, iccids } => self.add_pool_members(pool, iccids),
            CommandKind::RemovePoolMembers { pool, iccids } => {
                self.remove_pool_members(pool, iccids)
            }
            CommandKind::RenamePool { pool, name } => self.rename_pool(pool, name).map(no_cards),
            CommandKind::FreezePool { pool } => self.set_pool_frozen(pool, true).map(no_cards),
            CommandKind::UnfreezePool { pool } => self.set_pool_frozen(pool, false).map(no_cards),
            CommandKind::RetainPool { pool } => self.retain_pool(pool, at).map(no_cards),
            CommandKind::ReenablePool { pool } => self.reenable_pool(pool, at).map(no_cards),
            CommandKind::UpsertRule { rule } => self.upsert_rule(rule).map(no_cards),
            CommandKind::EnableRule { rule } => self.set_rule_enabled(rule, true).map(no_cards),
            CommandKind::DisableRule { rule } => self.set_rule_enabled(rule, false).map(no_cards),
            CommandKind::RemoveRule { rule } => self.remove_rule(rule).map(no_cards),
            CommandKind::UpsertWebhook { webhook } => self.upsert_webhook(webhook).map(no_cards),
            CommandKind::RemoveWebhook { webhook } => self.remove_webhook(webhook).map(no_cards),
            CommandKind::UpsertTag { tag } => self.upsert_tag(tag).map(no_cards),
            CommandKind::RemoveTag { tag } => self.remove_tag(tag).map(no_cards),
            CommandKind::BindTags { iccids, tags } => self.set_tags_bound(iccids, tags, true),
            CommandKind::UnbindTags { iccids, tags } => self.set_tags_bound(iccids, tags, false),
            CommandKind::SetAttributes { iccids, attributes } => {
                self.set_attributes(iccids, attributes)
            }
            CommandKind::SetAttributeNames { names } => {
                self.set_attribute_names(names).map(no_cards)
            }
            CommandKind::EnableAttribute { name } => {
                self.set_attribute_enabled(name, true).map(no_cards)
            }
            CommandKind::DisableAttribute { name } => {
                self.set_attribute_enabled(name, false).map(no_cards)
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

    pub(super) fn in_backward_pool(&self, loc: Loc) -> bool {
        let shard = &self.shards[loc.shard as usize];
        let p = shard.cards[loc.slot as usize].pool;
        p != NO_POOL && shard.pools[p as usize].kind == PoolKind::Backward
    }

    pub(super) fn set_reason(&mut self, loc: Loc, reason: Reason, present: bool) {
        let shard = &mut self.shards[loc.shard as usize];
        shard.touch(loc.slot);
        let card = &mut shard.cards[loc.slot as usize];
        card.reasons = card.reasons.set(reason, present);
    }

    /// Applies dates already past at `at` within the current command:
    /// expiry (`plan_expired` set or lifted), end of its grace
    /// (deregistered), end of test or silent period.
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
        let card = &shard.cards[loc.slot as usize];
        if card.reasons.contains(Reason::PlanExpired)
            && shard
                .config
                .grace_end(card.expires_at)
                .is_some_and(|t| t <= at)
        {
            // Expired longer ago than the grace period: closed at once.
            shard.deregister(loc.slot);
            return;
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
