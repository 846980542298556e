//! Automation rule firing (SPEC section 6, issue #6): one test per rule type
//! and filter, crossing only once, reminder windows, cycle rollover, rules
//! added mid-cycle, and restart from a snapshot. Every scenario runs on one
//! shard and on three (`scenario`), which must emit the same firings with
//! the same ids.

mod common;

use common::*;
use flowcap_engine::dedupe::MemIdStore;
use flowcap_engine::event::{Cause, DeadlineKind, Observed, RuleFiredEvent};
use flowcap_engine::rule::{Channel, Reminder, RuleCondition};
use flowcap_engine::{ActionEvent, CardState, Engine, Output, Timestamp};
use serde_json::{json, Value};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn firings(out: &[Output]) -> Vec<RuleFiredEvent> {
    out.iter()
        .filter_map(|o| match o {
            Output::Action(ActionEvent::RuleFired(e)) => Some((**e).clone()),
            _ => None,
        })
        .collect()
}

/// (rule, target) of every firing, in order.
fn fired(out: &[Output]) -> Vec<(String, String)> {
    firings(out)
        .into_iter()
        .map(|e| (e.rule.clone(), e.target()))
        .collect()
}

fn pair(rule: &str, n: u32) -> (String, String) {
    (rule.to_owned(), iccid_text(n))
}

fn hook(s: &mut Sim) {
    s.ok(
        "upsert_webhook",
        json!({"webhook": {"id": "hook", "url": "https://example.com/hook", "secret": SECRET}}),
    );
}

fn rule(s: &mut Sim, rule: Value) -> Vec<Output> {
    s.ok("upsert_rule", json!({ "rule": rule }))
}

fn channels(e: &RuleFiredEvent) -> Vec<(Channel, Reminder)> {
    e.actions.iter().map(|a| (a.channel, a.reminder)).collect()
}

// ===== type 2: card cycle usage =================================================

#[test]
fn type2_used_fires_once_on_the_crossing_record() {
    scenario(|s| {
        hook(s);
        s.active(1, "cmcc-50m");
        s.active(2, "cmcc-50m");
        rule(
            s,
            json!({"id": "used20", "name": "20 MB used", "type": 2,
                "condition": {"used_mb_gte": 20},
                "actions": [{"type": "webhook", "endpoint": "hook"}]}),
        );
        assert!(fired(&s.rec(1, "a1", &nov(10, 1, 0), mb(10))).is_empty());
        let out = s.rec(1, "a2", &nov(10, 2, 0), mb(10) - 1);
        assert!(fired(&out).is_empty(), "one byte short");
        let out = s.rec(1, "a3", &nov(10, 3, 0), 1);
        let f = firings(&out);
        assert_eq!(f.len(), 1, "{out:?}");
        let e = &f[0];
        assert_eq!(e.rule, "used20");
        assert_eq!(e.rule_name, "20 MB used");
        assert_eq!(e.rule_type, 2);
        assert_eq!(e.iccid, Some(ic(1)));
        assert_eq!(e.plan.as_ref().map(|p| p.as_str()), Some("cmcc-50m"));
        assert_eq!(e.plan_name.as_deref(), Some("cmcc-50m"));
        assert_eq!(e.condition, RuleCondition::UsedMbGte(20));
        assert_eq!(
            e.observed,
            Observed::Usage {
                used_bytes: mb(20),
                allowance_bytes: Some(mb(50)),
                remaining_bytes: Some(mb(30) as i64),
            }
        );
        assert_eq!(e.cause, record_cause(1, "a3"));
        assert_eq!(e.event_time, ts(&nov(10, 3, 0)));
        assert_eq!(e.cycle.to_string(), "2026-11");
        assert_eq!(channels(e), [(Channel::Webhook, Reminder::Cycle)]);
        assert_eq!(e.actions[0].endpoint.as_deref(), Some("hook"));
        assert_eq!(e.id.len(), 32);
        // Past the condition: no record fires again, nor a duplicate.
        for (i, bytes) in [mb(1), mb(25), 1].into_iter().enumerate() {
            let out = s.rec(1, &format!("b{i}"), &nov(11, i as u32, 0), bytes);
            assert!(fired(&out).is_empty(), "{out:?}");
        }
        assert!(fired(&s.rec(1, "a3", &nov(10, 3, 0), 1)).is_empty());
        // Another card crosses on its own record.
        let out = s.rec(2, "c1", &nov(12, 1, 0), mb(21));
        assert_eq!(fired(&out), [pair("used20", 2)]);
    });
}

#[test]
fn type2_remaining_counts_card_add_ons_and_not_backward_members() {
    scenario(|s| {
        s.active(1, "cmcc-50m");
        s.active(2, "cmcc-50m");
        s.backward_pool("bp", "cmcc", &[2]);
        rule(
            s,
            json!({"id": "left10", "type": 2, "condition": {"remaining_mb_lte": 10}}),
        );
        s.ok("add_on", json!({"iccid": iccid_text(1), "mb": 20}));
        // 70 MB allowance: 59 used leaves 11.
        assert!(fired(&s.rec(1, "a1", &nov(10, 1, 0), mb(59))).is_empty());
        let out = s.rec(1, "a2", &nov(10, 2, 0), mb(1));
        let f = firings(&out);
        assert_eq!(fired(&out), [pair("left10", 1)]);
        assert_eq!(
            f[0].observed,
            Observed::Usage {
                used_bytes: mb(60),
                allowance_bytes: Some(mb(70)),
                remaining_bytes: Some(mb(10) as i64),
            }
        );
        assert!(
            f[0].actions.is_empty(),
            "a rule without actions is recorded"
        );
        // Backward members are post-paid: no allowance, never "remaining".
        assert!(fired(&s.rec(2, "b1", &nov(10, 3, 0), mb(100))).is_empty());
    });
}

/// One rule, four actions with four reminder windows: the condition is left
/// (add-on packs) and entered again, the same day, the next day and the
/// next cycle.
#[test]
fn reminder_windows_every_day_cycle_once() {
    scenario(|s| {
        hook(s);
        s.active(1, "cmcc-50m");
        rule(
            s,
            json!({"id": "left10", "type": 2, "condition": {"remaining_mb_lte": 10},
                "actions": [
                    {"type": "webhook", "endpoint": "hook"},
                    {"type": "webhook", "endpoint": "hook", "reminder": "every"},
                    {"type": "email", "to": ["ops@example.com"], "reminder": "day"},
                    {"type": "sms", "to": ["+8613800000000"], "reminder": "once"}]}),
        );
        let windows = |out: &[Output]| -> Vec<Reminder> {
            firings(out)
                .iter()
                .flat_map(|e| e.actions.iter().map(|a| a.reminder))
                .collect()
        };
        // Enter: every action fires.
        let out = s.rec(1, "a1", &nov(10, 1, 0), mb(41));
        assert_eq!(
            windows(&out),
            [
                Reminder::Cycle,
                Reminder::Every,
                Reminder::Day,
                Reminder::Once
            ]
        );
        // Leave (an add-on pack evaluates the card at the command), enter
        // again the same day: only `every`.
        s.at = nov(10, 2, 0);
        assert!(fired(&s.ok("add_on", json!({"iccid": iccid_text(1), "mb": 20}))).is_empty());
        assert!(fired(&s.rec(1, "a2", &nov(10, 3, 0), mb(15))).is_empty());
        let out = s.rec(1, "a3", &nov(10, 4, 0), mb(5));
        assert_eq!(windows(&out), [Reminder::Every]);
        // Staying inside fires nothing.
        assert!(fired(&s.rec(1, "a4", &nov(10, 5, 0), mb(1))).is_empty());
        // Still inside at the next local midnight (the add-on's command
        // carries the clock past it): `day` reminds, at the day start.
        s.at = nov(11, 1, 0);
        let out = s.ok("add_on", json!({"iccid": iccid_text(1), "mb": 20}));
        assert_eq!(windows(&out), [Reminder::Day]);
        assert_eq!(firings(&out)[0].event_time, ts(&nov(11, 0, 0)));
        // Leave and enter again that day: only `every`.
        let out = s.rec(1, "a5", &nov(11, 2, 0), mb(20));
        assert_eq!(windows(&out), [Reminder::Every]);
        // `day` reminds each day to the end of the cycle (Nov 12 to 30);
        // the next cycle starts outside (usage from zero): no reminder.
        assert_eq!(windows(&s.tick(&dec(1, 0, 30))), vec![Reminder::Day; 19]);
        // Entering in the new cycle fires `cycle`, `every` and `day`, never
        // `once` again.
        let out = s.rec(1, "d1", &dec(1, 1, 0), mb(41));
        assert_eq!(
            windows(&out),
            [Reminder::Cycle, Reminder::Every, Reminder::Day]
        );
        assert_eq!(firings(&out)[0].cycle.to_string(), "2026-12");
    });
}

#[test]
fn rollover_resets_cycle_windows_and_conditions_true_at_zero_fire_at_the_rollover() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        s.active(2, "cucc-30m");
        s.tick(&nov(20, 0, 0));
        // 40 MB left or less: true for a 30 MB plan at zero usage. Added
        // mid-cycle, it fires at once for both (cause: the command).
        let out = rule(
            s,
            json!({"id": "low", "type": 2, "condition": {"remaining_mb_lte": 40}}),
        );
        let f = firings(&out);
        assert_eq!(fired(&out), [pair("low", 1), pair("low", 2)]);
        assert!(matches!(f[0].cause, Cause::Command { .. }));
        // The cucc cycle rolls over on the 27th, the cmcc one on the 1st:
        // each card fires again at its own rollover.
        let out = s.tick(&nov(27, 0, 10));
        assert_eq!(fired(&out), [pair("low", 2)]);
        assert!(matches!(firings(&out)[0].cause, Cause::Rollover { .. }));
        assert_eq!(firings(&out)[0].event_time, ts(&nov(27, 0, 0)));
        assert_eq!(firings(&out)[0].cycle.to_string(), "2026-12");
        assert!(fired(&s.rec(2, "b1", &nov(28, 0, 0), mb(1))).is_empty());
        let out = s.tick(&dec(1, 0, 10));
        assert_eq!(fired(&out), [pair("low", 1)]);
    });
}

// ===== type 1: plan expiry ======================================================

#[test]
fn type1_fires_at_the_local_midnight_n_days_before_expiry() {
    scenario(|s| {
        s.card_with(
            1,
            "cmcc-30m",
            "active",
            json!({"expires_at": "2026-11-20T10:00:00+08:00"}),
        );
        s.card_with(
            2,
            "cmcc-30m",
            "active",
            json!({"expires_at": "2026-11-15T23:00:00+08:00"}),
        );
        s.active(3, "cmcc-30m"); // expires 2027-01-05
        rule(
            s,
            json!({"id": "exp3", "type": 1, "condition": {"days_to_expiry_lte": 3},
                "actions": [{"type": "email", "to": "ops@example.com"}]}),
        );
        // Nov 11: card 2 is 4 days from its expiry day.
        assert!(fired(&s.tick(&nov(11, 23, 0))).is_empty());
        // A record of card 3 carries the clock past midnight: card 2 enters
        // at 00:00 on the 12th (3 days), not at the record's time.
        let out = s.rec(3, "c1", &nov(12, 0, 5), 1);
        let f = firings(&out);
        assert_eq!(fired(&out), [pair("exp3", 2)]);
        let at = ts(&nov(12, 0, 0));
        assert_eq!(
            f[0].cause,
            Cause::Deadline {
                kind: DeadlineKind::RuleDay,
                at
            }
        );
        assert_eq!(f[0].event_time, at);
        assert_eq!(
            f[0].observed,
            Observed::DaysToExpiry {
                days: 3,
                expires_at: ts("2026-11-15T23:00:00+08:00")
            }
        );
        assert_eq!(channels(&f[0]), [(Channel::Email, Reminder::Day)]);
        // Later days: card 2 is still inside and reminded each day (the
        // default window of type 1 is `day`); card 1 enters on the 17th,
        // found across a jump of several days with its own day start, and
        // is reminded from the next day.
        let out = s.tick(&nov(19, 12, 0));
        let f = firings(&out);
        let (c1, c2) = (pair("exp3", 1), pair("exp3", 2));
        assert_eq!(
            fired(&out),
            [&c2, &c2, &c2, &c2, &c1, &c2, &c1, &c2, &c1, &c2].map(Clone::clone)
        );
        let times: Vec<Timestamp> = f.iter().map(|e| e.event_time).collect();
        assert_eq!(times[0], ts(&nov(13, 0, 0)));
        assert_eq!(times[4], ts(&nov(17, 0, 0)));
        assert_eq!(times[9], ts(&nov(19, 0, 0)));
        // Renewal takes card 1 out: no reminder until its new expiry comes
        // near; card 2, never renewed, is reminded every day meanwhile.
        s.at = nov(19, 13, 0);
        let out = s.ok("renew", json!({"iccids": iccids(&[1]), "months": 1}));
        assert!(fired(&out).is_empty());
        let out = s.tick(&dec(16, 12, 0));
        assert_eq!(fired(&out), vec![c2.clone(); 27], "Nov 20 to Dec 16");
        let out = s.tick(&dec(17, 0, 1));
        assert_eq!(fired(&out), [c1, c2]);
        assert_eq!(firings(&out)[0].event_time, ts(&dec(17, 0, 0)));
    });
}

#[test]
fn type1_fires_at_once_for_cards_already_inside() {
    scenario(|s| {
        rule(
            s,
            json!({"id": "exp7", "type": 1, "condition": {"days_to_expiry_lte": 7}}),
        );
        // A card created inside the window enters at its creation.
        let card = json!({"card": {"iccid": iccid_text(1), "carrier": "cmcc", "plan": "cmcc-30m",
            "state": "active", "activated_at": "2025-11-12T00:00:00+08:00",
            "expires_at": "2026-11-12T00:00:00+08:00"}});
        let out = s.ok("upsert_card", card);
        let f = firings(&out);
        assert_eq!(fired(&out), [pair("exp7", 1)]);
        assert_eq!(
            f[0].observed,
            Observed::DaysToExpiry {
                days: 2,
                expires_at: ts(&nov(12, 0, 0))
            }
        );
        // Expiry itself is no new entry; the rule (no actions: its own
        // window, `day`) reminds at each local midnight while inside.
        let out = s.tick(&nov(12, 1, 0));
        assert_eq!(fired(&out), [pair("exp7", 1), pair("exp7", 1)]);
        assert_eq!(firings(&out)[1].event_time, ts(&nov(12, 0, 0)));
        assert_eq!(
            s.state(1),
            ("suspended".into(), vec!["plan_expired".into()])
        );
        // A second rule added now fires at once, with negative days.
        let out = rule(
            s,
            json!({"id": "exp0", "type": 1, "condition": {"days_to_expiry_lte": 0}}),
        );
        let f = firings(&out);
        assert_eq!(fired(&out), [pair("exp0", 1)]);
        assert!(matches!(
            f[0].observed,
            Observed::DaysToExpiry { days: 0, .. }
        ));
    });
}

// ===== type 3: pools ===========================================================

#[test]
fn type3_forward_pool_remaining_fires_once_for_the_pool() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        s.active(2, "cmcc-30m");
        s.forward_pool("p1", "cmcc-30m", &[1, 2]);
        rule(
            s,
            json!({"id": "pool-low", "type": 3, "condition": {"remaining_mb_lte": 10},
                "filter": {"forward_pools": ["p1"]}}),
        );
        assert!(fired(&s.rec(1, "a1", &nov(10, 1, 0), mb(30))).is_empty());
        let out = s.rec(2, "b1", &nov(10, 2, 0), mb(21));
        let f = firings(&out);
        assert_eq!(f.len(), 1, "{out:?}");
        assert_eq!(f[0].pool.as_ref().map(|p| p.as_str()), Some("p1"));
        assert_eq!(f[0].pool_name.as_deref(), Some("p1"));
        assert_eq!(f[0].iccid, None);
        assert_eq!(f[0].target(), "p1");
        assert_eq!(f[0].plan_name.as_deref(), Some("cmcc-30m"));
        assert_eq!(f[0].cause, record_cause(2, "b1"));
        assert_eq!(
            f[0].observed,
            Observed::Usage {
                used_bytes: mb(51),
                allowance_bytes: Some(mb(60)),
                remaining_bytes: Some(mb(9) as i64),
            }
        );
        assert!(fired(&s.rec(1, "a2", &nov(10, 3, 0), mb(5))).is_empty());
        assert!(fired(&s.rec(2, "b2", &nov(10, 4, 0), mb(50))).is_empty());
    });
}

#[test]
fn type3_backward_pool_used_with_suspend_cuts_and_fires() {
    scenario(|s| {
        hook(s);
        for n in [1, 2, 3] {
            s.active(n, "cmcc-30m");
        }
        s.backward_pool("bp", "cmcc", &[1, 2]);
        s.forward_pool("fp", "cmcc-30m", &[3]);
        rule(
            s,
            json!({"id": "bp-cut", "type": 3, "condition": {"used_mb_gte": 50},
                "actions": [{"type": "suspend"}, {"type": "webhook", "endpoint": "hook"}]}),
        );
        assert!(fired(&s.rec(1, "a1", &nov(10, 1, 0), mb(49))).is_empty());
        let out = s.rec(2, "b1", &nov(10, 2, 0), mb(1));
        assert_eq!(
            fired(&out),
            [("bp-cut".to_owned(), "bp".to_owned())],
            "{out:?}"
        );
        let e = &firings(&out)[0];
        assert_eq!(
            channels(e),
            [
                (Channel::Suspend, Reminder::Cycle),
                (Channel::Webhook, Reminder::Cycle)
            ]
        );
        assert!(!e.actions[1].merge, "pool rules are not merged");
        assert_eq!(pool_events(&out).len(), 1);
        assert_eq!(
            s.state(1),
            (
                "suspended".into(),
                vec!["backward_pool_threshold".to_string()]
            )
        );
        // A forward pool past the threshold fires the notification only:
        // suspend applies to backward pools.
        let out = s.rec(3, "c1", &nov(10, 3, 0), mb(55));
        let f = firings(&out);
        assert_eq!(fired(&out), [("bp-cut".to_owned(), "fp".to_owned())]);
        assert_eq!(channels(&f[0]), [(Channel::Webhook, Reminder::Cycle)]);
        // Lifted at the next cycle.
        s.tick(&dec(1, 0, 5));
        for n in [1, 2] {
            assert_eq!(
                s.state(n),
                ("active".into(), Vec::<String>::new()),
                "card {n}"
            );
        }
    });
}

// ===== type 4: state change =====================================================

#[test]
fn type4_fires_on_every_matching_transition() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        s.active(2, "cmcc-30m");
        rule(
            s,
            json!({"id": "cut", "type": 4, "condition": {"from": ["active"], "to": ["suspended"]}}),
        );
        let out = s.rec(1, "a1", &nov(10, 1, 0), mb(31));
        let f = firings(&out);
        assert_eq!(fired(&out), [pair("cut", 1)]);
        match &f[0].observed {
            Observed::StateChange { old, new, reasons } => {
                assert_eq!((*old, *new), (CardState::Active, CardState::Suspended));
                assert_eq!(
                    reasons.iter().next().map(|r| r.as_str()),
                    Some("over_quota")
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(channels(&f[0]), []);
        // A reason change while suspended is no state change.
        s.at = nov(10, 2, 0);
        assert!(fired(&s.ok("suspend", json!({"iccids": iccids(&[1])}))).is_empty());
        // suspended -> active does not match; active -> suspended again does
        // (every transition).
        s.at = nov(10, 3, 0);
        s.ok("resume", json!({"iccids": iccids(&[1])}));
        assert!(fired(&s.tick(&dec(1, 0, 10))).is_empty(), "rollover resume");
        s.at = dec(1, 1, 0);
        let out = s.ok("suspend", json!({"iccids": iccids(&[1, 2])}));
        assert_eq!(fired(&out), [pair("cut", 1), pair("cut", 2)]);
        assert!(matches!(firings(&out)[0].cause, Cause::Command { .. }));
    });
}

#[test]
fn type4_to_deregistered_and_day_window() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        rule(
            s,
            json!({"id": "any-cut", "type": 4, "condition": {"to": ["suspended", "deregistered"]},
                "reminder": "day"}),
        );
        s.at = nov(10, 1, 0);
        assert_eq!(
            fired(&s.ok("suspend", json!({"iccids": iccids(&[1])}))),
            [pair("any-cut", 1)]
        );
        s.at = nov(10, 2, 0);
        s.ok("resume", json!({"iccids": iccids(&[1])}));
        s.at = nov(10, 3, 0);
        assert!(
            fired(&s.ok("suspend", json!({"iccids": iccids(&[1])}))).is_empty(),
            "same day"
        );
        s.at = nov(11, 3, 0);
        assert_eq!(
            fired(&s.ok("deregister", json!({"iccids": iccids(&[1])}))),
            [pair("any-cut", 1)]
        );
    });
}

// ===== filters ==================================================================

#[test]
fn filters_by_plan_tag_forward_pool_and_backward_pool() {
    scenario(|s| {
        s.ok("upsert_tag", json!({"tag": {"name": "fleet"}}));
        for n in 1..=6 {
            s.active(n, if n == 2 { "cmcc-50m" } else { "cmcc-30m" });
        }
        s.ok(
            "bind_tags",
            json!({"iccids": iccids(&[3]), "tags": ["fleet"]}),
        );
        s.forward_pool("fp", "cmcc-30m", &[4]);
        s.backward_pool("bp", "cmcc", &[5]);
        for (id, filter) in [
            ("all", json!({})),
            ("plan", json!({"plans": ["cmcc-50m"]})),
            ("tag", json!({"tags": ["fleet"]})),
            ("fwd", json!({"forward_pools": ["fp"]})),
            ("bwd", json!({"backward_pools": ["bp"]})),
            (
                "both",
                json!({"plans": ["cmcc-30m"], "forward_pools": ["fp"], "backward_pools": ["bp"]}),
            ),
        ] {
            rule(
                s,
                json!({"id": id, "type": 2, "condition": {"used_mb_gte": 5}, "filter": filter}),
            );
        }
        let mut seen = Vec::new();
        for n in 1..=6 {
            let out = s.rec(n, &format!("r{n}"), &nov(10, n, 0), mb(6));
            let mut rules: Vec<String> = fired(&out).into_iter().map(|(r, _)| r).collect();
            rules.sort();
            seen.push((n, rules));
        }
        let want = |n: u32, rules: &[&str]| (n, rules.iter().map(|r| r.to_string()).collect());
        assert_eq!(
            seen,
            [
                want(1, &["all"]),
                want(2, &["all", "plan"]),
                want(3, &["all", "tag"]),
                want(4, &["all", "both", "fwd"]),
                want(5, &["all", "both", "bwd"]),
                want(6, &["all"]),
            ]
        );
    });
}

#[test]
fn rule_validation_gives_specific_codes() {
    use flowcap_engine::command::ErrorCode;
    scenario(|s| {
        s.backward_pool("bp", "cmcc", &[]);
        for (rule, code) in [
            (
                json!({"id": "r", "type": 2, "condition": {"used_mb_gte": -5}}),
                ErrorCode::InvalidThreshold,
            ),
            (
                json!({"id": "r", "type": 2, "condition": {"days_to_expiry_lte": 5}}),
                ErrorCode::InvalidCondition,
            ),
            (
                json!({"id": "r", "type": 3, "condition": {"remaining_mb_lte": 5},
                    "filter": {"backward_pools": ["bp"]}}),
                ErrorCode::InvalidCondition,
            ),
            (
                json!({"id": "r", "type": 2, "condition": {"used_mb_gte": 5},
                    "filter": {"tags": ["nope"]}}),
                ErrorCode::UnknownTag,
            ),
            (
                json!({"id": "r", "type": 2, "condition": {"used_mb_gte": 5},
                    "filter": {"forward_pools": ["bp"]}}),
                ErrorCode::WrongPoolKind,
            ),
            (
                json!({"id": "r", "type": 2, "condition": {"used_mb_gte": 5},
                    "actions": [{"type": "pager"}]}),
                ErrorCode::InvalidAction,
            ),
        ] {
            s.fails("upsert_rule", json!({ "rule": rule }), code);
        }
        hook(s);
        rule(
            s,
            json!({"id": "r", "type": 2, "condition": {"used_mb_gte": 5},
                "actions": [{"type": "webhook", "endpoint": "hook"}]}),
        );
        s.fails(
            "remove_webhook",
            json!({"webhook": "hook"}),
            ErrorCode::WebhookInUse,
        );
        s.ok("disable_rule", json!({"rule": "r"}));
        s.ok("remove_webhook", json!({"webhook": "hook"}));
        s.fails(
            "enable_rule",
            json!({"rule": "r"}),
            ErrorCode::UnknownWebhook,
        );
    });
}

// ===== rules added, changed, disabled mid-cycle ================================

#[test]
fn rule_added_mid_cycle_fires_at_once_for_targets_already_inside() {
    scenario(|s| {
        s.active(1, "cmcc-50m");
        s.active(2, "cmcc-50m");
        s.rec(1, "a1", &nov(10, 1, 0), mb(25));
        s.rec(2, "b1", &nov(10, 1, 30), mb(5));
        s.at = nov(10, 2, 0);
        let r = json!({"id": "r20", "name": "v1", "type": 2, "condition": {"used_mb_gte": 20}});
        let out = rule(s, r.clone());
        assert_eq!(fired(&out), [pair("r20", 1)]);
        let f = firings(&out);
        assert!(matches!(&f[0].cause, Cause::Command { .. }));
        assert_eq!(f[0].event_time, ts(&nov(10, 2, 0)));
        // The same rule again (another name): same fired state, no repeat.
        let mut renamed = r.clone();
        renamed["name"] = json!("v2");
        assert!(fired(&rule(s, renamed)).is_empty());
        // Card 2 crosses on its record.
        assert_eq!(
            fired(&s.rec(2, "b2", &nov(10, 3, 0), mb(15))),
            [pair("r20", 2)]
        );
        // A changed condition is a new version: it starts afresh.
        s.at = nov(10, 4, 0);
        let mut changed = r.clone();
        changed["condition"] = json!({"used_mb_gte": 22});
        assert_eq!(
            fired(&rule(s, changed)),
            [pair("r20", 1)],
            "card 1 has 25 MB, card 2 20 MB"
        );
        // Disabled: card 2 crosses 22 MB unnoticed; enabling fires for it.
        s.ok("disable_rule", json!({"rule": "r20"}));
        assert!(fired(&s.rec(2, "b3", &nov(10, 5, 0), mb(5))).is_empty());
        s.at = nov(10, 6, 0);
        assert_eq!(
            fired(&s.ok("enable_rule", json!({"rule": "r20"}))),
            [pair("r20", 2)]
        );
        assert!(fired(&s.ok("disable_rule", json!({"rule": "r20"}))).is_empty());
        assert!(
            fired(&s.ok("enable_rule", json!({"rule": "r20"}))).is_empty(),
            "already fired in this cycle"
        );
        // Removed and added again: a new rule.
        s.ok("remove_rule", json!({"rule": "r20"}));
        assert_eq!(fired(&rule(s, r)), [pair("r20", 1), pair("r20", 2)]);
    });
}

#[test]
fn card_moving_to_its_pools_shard_keeps_its_fired_state() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        rule(
            s,
            json!({"id": "r5", "type": 2, "condition": {"used_mb_gte": 5}}),
        );
        assert_eq!(
            fired(&s.rec(1, "a1", &nov(10, 1, 0), mb(6))),
            [pair("r5", 1)]
        );
        // Joining a pool moves the card to the pool's shard (3 shards).
        s.forward_pool("fp", "cmcc-30m", &[1]);
        assert!(fired(&s.rec(1, "a2", &nov(10, 2, 0), mb(1))).is_empty());
    });
}

// ===== restart from a snapshot ==================================================

/// Every rule type, a snapshot in the middle: the restored engine emits
/// exactly what the uninterrupted one does after that point (no firing
/// repeated, none lost, same ids), including when the inputs after the
/// snapshot are replayed.
#[test]
fn restart_from_a_snapshot_neither_refires_nor_loses_firings() {
    type Step = Box<dyn Fn(&mut Sim)>;
    let steps: Vec<Step> = vec![
        Box::new(|s| {
            s.setup();
            hook(s);
            s.card_with(
                1,
                "cmcc-30m",
                "active",
                json!({"expires_at": "2026-11-20T10:00:00+08:00"}),
            );
            s.active(2, "cmcc-30m");
            s.active(3, "cmcc-30m");
            s.backward_pool("bp", "cmcc", &[3]);
            for r in [
                json!({"id": "t1", "type": 1, "condition": {"days_to_expiry_lte": 5}}),
                json!({"id": "t2", "type": 2, "condition": {"remaining_mb_lte": 10},
                    "actions": [{"type": "webhook", "endpoint": "hook", "merge": true}]}),
                json!({"id": "t3", "type": 3, "condition": {"used_mb_gte": 20},
                    "actions": [{"type": "suspend"}]}),
                json!({"id": "t4", "type": 4, "condition": {"to": ["suspended"]}}),
            ] {
                rule(s, r);
            }
        }),
        Box::new(|s| {
            s.rec(2, "b1", &nov(10, 1, 0), mb(21));
            s.rec(3, "c1", &nov(10, 2, 0), mb(25));
        }),
        Box::new(|s| {
            // Still inside: nothing may fire again after a restart.
            s.rec(2, "b2", &nov(10, 3, 0), mb(1));
            s.rec(3, "c2", &nov(10, 4, 0), mb(1));
            s.tick(&nov(15, 12, 0));
            s.rec(2, "b3", &nov(16, 1, 0), mb(10));
            s.tick(&nov(21, 0, 0));
            s.tick(&dec(1, 0, 5));
            s.rec(2, "d1", &dec(1, 1, 0), mb(25));
        }),
    ];
    let run = |stop: Option<usize>, replay: bool| -> Vec<Output> {
        let mut sim = Sim::new(3);
        for (i, step) in steps.iter().enumerate() {
            if Some(i) == stop {
                let bytes = sim.engine.snapshot();
                let before = sim.log.len();
                if replay {
                    // Run the rest once, then restore and run it again: the
                    // replay must repeat it exactly.
                    for step in &steps[i..] {
                        step(&mut sim);
                    }
                    let first: Vec<Output> = sim.log.drain(before..).collect();
                    sim.engine = Engine::restore(&bytes, Box::new(MemIdStore::default())).unwrap();
                    for step in &steps[i..] {
                        step(&mut sim);
                    }
                    // (Sequence numbers go on in the test harness; a real
                    // replay repeats them.)
                    let actions = |log: &[Output]| -> Vec<Output> {
                        log.iter()
                            .filter(|o| matches!(o, Output::Action(_)))
                            .cloned()
                            .collect()
                    };
                    assert_eq!(
                        actions(&sim.log[before..]),
                        actions(&first),
                        "replay differs"
                    );
                    return sim.log;
                }
                sim.engine = Engine::restore(&bytes, Box::new(MemIdStore::default())).unwrap();
            }
            step(&mut sim);
        }
        sim.log
    };
    let straight = run(None, false);
    let f = firings(&straight);
    let ids: std::collections::BTreeSet<&str> = f.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), f.len(), "firing ids are unique");
    // Card 2 leaves 10 MB (t2) and again next cycle; the backward pool
    // reaches 20 MB (t3) and cuts card 3 (t4); card 1 comes within 5 days
    // of expiry on the 15th (t1); card 2 goes over quota (t4); t1 reminds
    // each day from the 16th (`day`, the default of type 1); card 1 is
    // cut when it expires (t4). Card 3 is post-paid (no "remaining"); the
    // usage rules do not repeat while inside (`cycle`).
    let mut expected = vec![
        pair("t2", 2),
        ("t3".into(), "bp".into()),
        pair("t4", 3),
        pair("t1", 1),
        pair("t4", 2),
    ];
    expected.extend(vec![pair("t1", 1); 6]); // Nov 16 to 21
    expected.push(pair("t4", 1));
    expected.extend(vec![pair("t1", 1); 10]); // Nov 22 to Dec 1
    expected.push(pair("t2", 2));
    assert_eq!(fired(&straight), expected);
    for stop in [1, 2] {
        assert_eq!(run(Some(stop), false), straight, "restored at step {stop}");
        let replayed = run(Some(stop), true);
        assert_eq!(
            firings(&replayed),
            firings(&straight),
            "replayed at step {stop}"
        );
    }
}
