//! Card commands: a card's declaration (`upsert_card`) and its life cycle
//! (activate, suspend, resume, deregister, renew, violations and rebind).
//! Each batch command answers card by card ([`Engine::per_card`]).

use crate::command::{
    CardField, CardResult, CardSpec, CommandError, ErrorCode, MAX_MONTHS_AHEAD, MAX_TAGS_PER_CARD,
};
use crate::domain::{CardState, Carrier, Reason, Reasons};
use crate::ids::Iccid;
use crate::shard::{add_months, Card, CardExtra, MAX_REBINDS_PER_MONTH, NO_POOL};
use crate::time::Timestamp;

use super::commands::{deregistered, err, months_too_far};
use super::{Engine, Loc};

impl Engine {
    pub(super) fn upsert_card(
        &mut self,
        spec: &CardSpec,
        at: Timestamp,
    ) -> Result<(), CommandError> {
        let plan = self.plan_entry(&spec.plan)?;
        if plan.spec.carrier != spec.carrier {
            return Err(err(
                ErrorCode::CarrierMismatch,
                format!(
                    "plan {} is a {} plan; card {} is a {} card",
                    spec.plan, plan.spec.carrier, spec.iccid, spec.carrier
                ),
            ));
        }
        let (plan_index, term) = (plan.index, plan.spec.term_months);
        check_clear(spec)?;
        if spec.tags.len() > MAX_TAGS_PER_CARD {
            return Err(err(
                ErrorCode::TooManyTags,
                format!(
                    "card {} has {} tags; at most {MAX_TAGS_PER_CARD}",
                    spec.iccid,
                    spec.tags.len()
                ),
            ));
        }
        let tags = self.tag_indexes(&spec.tags)?;
        self.check_attribute_names(spec.attributes.keys())?;
        let offset = self.config.calendar.utc_offset_secs;
        // An existing card keeps what the command leaves out.
        let existing = self.directory.get(&spec.iccid).map(|loc| {
            let card = self.card(loc);
            let state =
                if card.lifecycle == CardState::Active && card.reasons.contains(Reason::Manual) {
                    CardState::Suspended
                } else {
                    card.lifecycle
                };
            let silent = self.shards[loc.shard as usize]
                .extra(loc.slot)
                .and_then(|e| e.silent_ends_at);
            (state, card.activated_at, card.expires_at, silent)
        });
        let state = spec
            .state
            .or(existing.map(|e| e.0))
            .unwrap_or(CardState::Activatable);
        let (lifecycle, manual) = match state {
            CardState::Suspended => (CardState::Active, true),
            s => (s, false),
        };
        let kept_activation = existing.map(|e| e.1).filter(|t| *t != Timestamp::MIN);
        let activated_at = match (spec.activated_at.or(kept_activation), lifecycle) {
            (Some(t), _) => t,
            (None, CardState::Active) => at,
            _ => Timestamp::MIN,
        };
        let kept_expiry = existing.map(|e| e.2).filter(|t| *t != Timestamp::MAX);
        let expires_at = match (spec.expires_at.or(kept_expiry), lifecycle) {
            (Some(t), _) => t,
            (None, CardState::Active) => add_months(activated_at, term, offset),
            _ => Timestamp::MAX,
        };
        let silent_ends_at = match (
            spec.silent_ends_at.or(existing.and_then(|e| e.3)),
            lifecycle,
        ) {
            (Some(t), _) => Some(t),
            (None, CardState::Activatable) => {
                Some(add_months(at, self.config.silent_period_months, offset))
            }
            _ => None,
        };

        if let Some(loc) = self.directory.get(&spec.iccid) {
            let card = self.card(loc);
            if card.lifecycle == CardState::Deregistered {
                return Err(deregistered(spec.iccid));
            }
            let shard = &self.shards[loc.shard as usize];
            if card.pool != NO_POOL {
                let mut candidate = card.clone();
                candidate.plan = plan_index;
                candidate.carrier = spec.carrier;
                shard.check_member(card.pool, &candidate)?;
            }
            let shard = &mut self.shards[loc.shard as usize];
            shard.touch(loc.slot);
            let contribution = shard.member_contribution(loc.slot);
            let card = &mut shard.cards[loc.slot as usize];
            card.plan = plan_index;
            card.carrier = spec.carrier;
            card.lifecycle = lifecycle;
            card.activated_at = activated_at;
            card.expires_at = expires_at;
            card.reasons = card.reasons.set(Reason::Manual, manual);
            if lifecycle == CardState::Deregistered {
                card.reasons = Reasons::EMPTY;
                card.separated = false;
            }
            patch_extra(shard.extra_mut(loc.slot), spec, silent_ends_at);
            shard.drop_empty_extra(loc.slot);
            let idents = [
                (&spec.msisdn, CardField::Msisdn),
                (&spec.imsi, CardField::Imsi),
                (&spec.imei, CardField::Imei),
            ];
            for (which, (value, field)) in idents.into_iter().enumerate() {
                if value.is_some() || spec.clear.contains(&field) {
                    shard.set_ident(loc.slot, which, value.clone());
                }
            }
            if !spec.tags.is_empty() || spec.clear.contains(&CardField::Tags) {
                shard.set_tags(loc.slot, &tags);
            }
            shard.adjust_member_allowance(loc.slot, contribution);
            if lifecycle == CardState::Deregistered {
                shard.leave_for_good(loc.slot);
            }
            shard.reschedule(loc.slot);
            self.apply_due_dates(loc, at);
            return Ok(());
        }

        let card = Card {
            iccid: spec.iccid,
            usage: 0,
            activated_at,
            expires_at,
            plan: plan_index,
            carrier: spec.carrier,
            lifecycle,
            reasons: if manual {
                Reasons::EMPTY.with(Reason::Manual)
            } else {
                Reasons::EMPTY
            },
            pool: NO_POOL,
            tagset: 0,
            threshold_mb: -1,
            addon_mb: 0,
            vacant: false,
            separated: false,
        };
        let mut extra = CardExtra::default();
        fill_extra(&mut extra, spec, silent_ends_at);
        let shard_index = self.shard_for_card(spec.iccid);
        let shard = &mut self.shards[shard_index as usize];
        let slot = shard.insert_card(card, Some(extra), &tags);
        let loc = Loc {
            shard: shard_index,
            slot,
        };
        self.directory.insert(spec.iccid, loc);
        self.apply_due_dates(loc, at);
        Ok(())
    }

    pub(super) fn activate(&mut self, iccids: &[Iccid], at: Timestamp) -> Vec<CardResult> {
        self.per_card(iccids, |e, loc| {
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
        })
    }

    pub(super) fn suspend(&mut self, iccids: &[Iccid]) -> Vec<CardResult> {
        self.per_card(iccids, |e, loc| {
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
        })
    }

    pub(super) fn resume(&mut self, iccids: &[Iccid]) -> Vec<CardResult> {
        self.per_card(iccids, |e, loc| {
            let card = e.card(loc);
            if card.lifecycle == CardState::Deregistered {
                return Err(deregistered(card.iccid));
            }
            let shard = &e.shards[loc.shard as usize];
            if card.carrier == Carrier::Cmcc
                && card.reasons.contains(Reason::Violation)
                && shard.moved(loc.slot)
            {
                return Err(err(
                    ErrorCode::RebindRequired,
                    format!(
                        "cmcc card {}: its SIM moved to another device; only a rebind lifts \
                         the violation",
                        card.iccid
                    ),
                ));
            }
            e.set_reason(loc, Reason::Manual, false);
            e.set_reason(loc, Reason::Violation, false);
            e.shards[loc.shard as usize].clear_moved(loc.slot);
            Ok(())
        })
    }

    pub(super) fn deregister(&mut self, iccids: &[Iccid]) -> Vec<CardResult> {
        self.per_card(iccids, |e, loc| {
            e.live(loc)?;
            e.shards[loc.shard as usize].deregister(loc.slot);
            Ok(())
        })
    }

    pub(super) fn renew(
        &mut self,
        iccids: &[Iccid],
        months: u32,
        at: Timestamp,
    ) -> Result<Vec<CardResult>, CommandError> {
        if months == 0 {
            return Err(err(ErrorCode::InvalidValue, "renew needs months >= 1"));
        }
        if months > MAX_MONTHS_AHEAD {
            return Err(months_too_far("renew months", months));
        }
        let offset = self.config.calendar.utc_offset_secs;
        let bound = add_months(at, MAX_MONTHS_AHEAD, offset);
        Ok(self.per_card(iccids, |e, loc| {
            e.live(loc)?;
            e.check_renewable(loc, at)?;
            let card = e.card(loc);
            // Not expired: the new term follows the current one.
            let base = if card.expires_at == Timestamp::MAX {
                at
            } else {
                card.expires_at
            };
            // `base` past the bound is refused before any month is
            // added to it: the sum stays inside the date range.
            let new_expiry = (base <= bound)
                .then(|| add_months(base, months, offset))
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

    /// The carriers' renewal rules (SPEC section 2.1): an activated card
    /// (suspended or not), not expired, not in a backward pool.
    fn check_renewable(&self, loc: Loc, at: Timestamp) -> Result<(), CommandError> {
        let card = self.card(loc);
        if card.lifecycle != CardState::Active {
            return Err(err(
                ErrorCode::NotActivated,
                format!(
                    "card {} is {}: only activated cards are renewed",
                    card.iccid, card.lifecycle
                ),
            ));
        }
        if card.expires_at <= at {
            return Err(err(
                ErrorCode::CardExpired,
                format!(
                    "card {} expired at {}: an expired card is not renewed",
                    card.iccid, card.expires_at
                ),
            ));
        }
        if self.in_backward_pool(loc) {
            return Err(err(
                ErrorCode::InBackwardPool,
                format!(
                    "card {} is in a backward pool: its plan is not renewed",
                    card.iccid
                ),
            ));
        }
        Ok(())
    }

    pub(super) fn report_violation(&mut self, iccids: &[Iccid]) -> Vec<CardResult> {
        self.per_card(iccids, |e, loc| {
            e.live(loc)?;
            e.set_reason(loc, Reason::Violation, true);
            Ok(())
        })
    }

    /// Binds a card anew (SPEC section 2.1): to `imei`, or, without one,
    /// to the device of its next record. Lifts `violation` and the
    /// separation. Not for cucc cards (the carrier unbinds); at most
    /// [`MAX_REBINDS_PER_MONTH`] a calendar month for ctcc and tri cards.
    pub(super) fn rebind(
        &mut self,
        iccid: Iccid,
        imei: Option<&str>,
        at: Timestamp,
    ) -> Result<(), CommandError> {
        let loc = self.locate(iccid)?;
        self.live(loc)?;
        let shard = &mut self.shards[loc.shard as usize];
        let carrier = shard.cards[loc.slot as usize].carrier;
        let month = shard.month_of(at);
        match carrier {
            Carrier::Cucc => {
                return Err(err(
                    ErrorCode::RebindNotOffered,
                    format!("cucc card {iccid}: the carrier unbinds, rebind is not offered"),
                ));
            }
            Carrier::Ctcc | Carrier::Tri => {
                let device = shard.device_mut(loc.slot).in_month(month);
                if device.rebinds >= MAX_REBINDS_PER_MONTH {
                    return Err(err(
                        ErrorCode::RebindLimit,
                        format!(
                            "{carrier} card {iccid} was rebound {MAX_REBINDS_PER_MONTH} times \
                             this month already"
                        ),
                    ));
                }
                device.rebinds += 1;
            }
            Carrier::Cmcc => {}
        }
        shard.touch(loc.slot);
        shard.clear_moved(loc.slot);
        let card = &mut shard.cards[loc.slot as usize];
        card.separated = false;
        card.reasons = card.reasons.without(Reason::Violation);
        shard.set_ident(loc.slot, 2, imei.map(str::to_owned));
        Ok(())
    }
}

/// An existing card's `upsert_card`: what the command gives is set, what it
/// clears is emptied, the rest is kept. (Identities and tags are the
/// shard's, set by the caller.)
fn patch_extra(extra: &mut CardExtra, spec: &CardSpec, silent_ends_at: Option<Timestamp>) {
    let cleared = |field| spec.clear.contains(&field);
    if cleared(CardField::Attributes) {
        extra.attributes.clear();
    }
    for (name, value) in &spec.attributes {
        extra.attributes.insert(name.clone(), value.clone());
    }
    if spec.test_ends_at.is_some() || cleared(CardField::TestEndsAt) {
        extra.test_ends_at = spec.test_ends_at;
    }
    if spec.test_allowance_mb.is_some() || cleared(CardField::TestAllowanceMb) {
        extra.test_allowance_mb = spec.test_allowance_mb;
    }
    extra.silent_ends_at = silent_ends_at;
}

/// A field both given and cleared by one `upsert_card`.
fn check_clear(spec: &CardSpec) -> Result<(), CommandError> {
    let given = |field| match field {
        CardField::Msisdn => spec.msisdn.is_some(),
        CardField::Imsi => spec.imsi.is_some(),
        CardField::Imei => spec.imei.is_some(),
        CardField::Tags => !spec.tags.is_empty(),
        CardField::Attributes => !spec.attributes.is_empty(),
        CardField::TestEndsAt => spec.test_ends_at.is_some(),
        CardField::TestAllowanceMb => spec.test_allowance_mb.is_some(),
    };
    match spec.clear.iter().find(|f| given(**f)) {
        Some(field) => Err(err(
            ErrorCode::InvalidValue,
            format!(
                "card {}: {} is both given and cleared",
                spec.iccid,
                field.as_str()
            ),
        )),
        None => Ok(()),
    }
}

fn fill_extra(extra: &mut CardExtra, spec: &CardSpec, silent_ends_at: Option<Timestamp>) {
    extra.msisdn.clone_from(&spec.msisdn);
    extra.imsi.clone_from(&spec.imsi);
    extra.imei.clone_from(&spec.imei);
    extra.attributes.clone_from(&spec.attributes);
    extra.test_ends_at = spec.test_ends_at;
    extra.test_allowance_mb = spec.test_allowance_mb;
    extra.silent_ends_at = silent_ends_at;
}
