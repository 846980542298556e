//! A card's trail in its live state: the end of its newest record, and
//! its last visible change (when, from which state, what kind of cause,
//! the change's event id), so "why is this card cut?" is answered from
//! the engine at one input position. Each scenario runs on one shard and
//! on three (cards moving to their pool's shard take the trail along),
//! and a snapshot keeps it.

mod common;

use common::*;
use flowcap_engine::event::{CauseKind, DeadlineKind};
use flowcap_engine::{CardState, Engine, MemIdStore};
use serde_json::json;

#[test]
fn a_cut_names_its_record_and_event_and_the_newest_record_is_kept() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        assert_eq!(s.view(1).last_record_at, None);
        s.rec(1, "r1", &nov(10, 2, 0), mb(20));
        // An earlier record arriving later does not move it back.
        s.rec(1, "r0", &nov(10, 1, 0), mb(5));
        assert_eq!(s.view(1).last_record_at, Some(ts(&nov(10, 2, 0))));
        let out = s.rec(1, "r2", &nov(10, 3, 0), mb(6));
        let cut = event_of(&out, 1);
        assert_eq!(states(&cut), ("active".into(), "suspended".into()));
        let view = s.view(1);
        assert_eq!(view.last_record_at, Some(ts(&nov(10, 3, 0))));
        let change = view.last_change.expect("a change");
        assert_eq!(change.at, ts(&nov(10, 3, 0)));
        assert_eq!(change.old, CardState::Active);
        assert_eq!(change.cause, CauseKind::Record);
        assert_eq!(change.event_id, cut.id);
        // A record of the cut card is kept, the change stays.
        s.rec(1, "r3", &nov(10, 4, 0), mb(1));
        let view = s.view(1);
        assert_eq!(view.last_record_at, Some(ts(&nov(10, 4, 0))));
        assert_eq!(view.last_change.expect("a change").event_id, cut.id);
    });
}

#[test]
fn commands_rollovers_and_pool_moves_each_name_their_cause() {
    scenario(|s| {
        s.active(1, "cmcc-30m");
        s.active(2, "cmcc-30m");
        let out = s.ok("suspend", json!({"iccids": [iccid_text(1)]}));
        let manual = event_of(&out, 1);
        let change = s.view(1).last_change.expect("a change");
        assert_eq!(change.cause, CauseKind::Command);
        assert_eq!(change.event_id, manual.id);
        assert_eq!(change.old, CardState::Active);
        // Card 2 is cut by a record, joins a pool (moving to the pool's
        // shard on three shards) and keeps its trail there.
        s.rec(2, "a1", &nov(10, 1, 0), mb(31));
        let before = s.view(2);
        s.forward_pool("p1", "cmcc-30m", &[2]);
        let after = s.view(2);
        assert_eq!(after.last_record_at, before.last_record_at);
        if (after.state, after.reasons) == (before.state, before.reasons) {
            assert_eq!(after.last_change, before.last_change);
        } else {
            let change = after.last_change.expect("a change");
            assert_eq!(change.cause, CauseKind::Command);
            assert_eq!(change.old, before.state);
        }
        // A new cycle lifts the usage cut: a rollover.
        s.tick(&nov(30, 12, 0));
        let out = s.rec(2, "a2", &dec(1, 0, 5), 1);
        if let Some(resumed) = card_events(&out).into_iter().find(|e| e.iccid == ic(2)) {
            let change = s.view(2).last_change.expect("a change");
            assert_eq!(change.event_id, resumed.id);
            assert_eq!(change.at, resumed.event_time);
        }
        // Card 1's manual cut outlives the rollover.
        assert_eq!(s.view(1).last_change.expect("a change").event_id, manual.id);
    });
}

#[test]
fn a_deadline_names_its_kind() {
    scenario(|s| {
        s.card_with(
            1,
            "cmcc-30m",
            "active",
            json!({"expires_at": "2026-11-20T00:00:00+08:00"}),
        );
        let out = s.tick(&nov(21, 0, 0));
        let expired = card_events(&out)
            .into_iter()
            .find(|e| e.iccid == ic(1))
            .expect("the plan expired");
        let change = s.view(1).last_change.expect("a change");
        assert_eq!(change.cause, CauseKind::Deadline(DeadlineKind::PlanExpiry));
        assert_eq!(change.event_id, expired.id);
        assert_eq!(change.at, ts("2026-11-20T00:00:00+08:00"));
    });
}

#[test]
fn a_snapshot_keeps_the_trail() {
    let mut s = Sim::new(3);
    s.setup();
    s.active(1, "cmcc-30m");
    s.rec(1, "r1", &nov(10, 2, 0), mb(31));
    let restored =
        Engine::restore(&s.engine.snapshot(), Box::new(MemIdStore::new())).expect("restores");
    let view = restored.card_view(ic(1)).expect("the card");
    assert_eq!(view, s.view(1));
    assert!(view.last_change.is_some() && view.last_record_at.is_some());
}
