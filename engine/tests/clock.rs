//! SPEC section 3, "time belongs to everyone": no one card's records, and
//! no command, may move time for the rest of the fleet (issue #23, finding
//! 1). Each scenario runs on one shard and on three (`common::scenario`).
//!
//! The fleet here is 20 active cmcc cards on a 30 MB plan, all reporting
//! on 30 November; card 1's device clock runs ahead. Every property is
//! checked the same way: every other card's events and usage equal those
//! of the same run without card 1's skewed records.

mod common;

use common::*;
use flowcap_engine::command::{parse_command, ErrorCode};
use flowcap_engine::cycle::CycleId;
use flowcap_engine::event::Accounted;
use flowcap_engine::{CardView, Lane, Output, Timestamp};
use serde_json::json;

const FLEET: u32 = 20;

fn fleet(s: &mut Sim) {
    for n in 1..=FLEET {
        s.active(n, "cmcc-30m");
    }
    // The operator's last command was this morning.
    s.at = nov(30, 8, 0);
    s.ok("upsert_tag", json!({"tag": {"name": "fleet"}}));
}

/// Every card but card 1 reports 10 MB an hour from 30 Nov 20:00 to 23:00,
/// then 1 MB at 23:59 (which is over the 30 MB allowance: the cut), then
/// 1 MB at 1 Dec 00:30 (the new cycle: back, usage 1 MB). `skewed` runs
/// between the hours, as card 1's.
fn day(s: &mut Sim, skewed: &mut dyn FnMut(&mut Sim, u32)) {
    for (step, (day_of, hour, minute, bytes)) in [
        (30, 20, 0, mb(10)),
        (30, 21, 0, mb(10)),
        (30, 22, 0, mb(10)),
        (30, 23, 59, mb(1)),
    ]
    .into_iter()
    .enumerate()
    {
        for n in 2..=FLEET {
            s.rec(
                n,
                &format!("r{n}-{step}"),
                &nov(day_of, hour, minute),
                bytes,
            );
        }
        skewed(s, step as u32);
    }
    for n in 2..=FLEET {
        s.rec(n, &format!("r{n}-dec"), &dec(1, 0, 30), mb(1));
    }
}

/// Card views and card events of every card but card 1 (each card's in
/// their order; across cards, the order of outputs is not compared).
fn others(s: &Sim) -> (Vec<CardView>, Vec<String>) {
    let views = (2..=FLEET).map(|n| s.view(n)).collect();
    let mut events = card_events(&s.log);
    events.retain(|e| e.iccid != ic(1));
    events.sort_by_key(|e| e.iccid);
    let events = events
        .into_iter()
        .map(|e| serde_json::to_string(&e).expect("events serialize"))
        .collect();
    (views, events)
}

fn baseline() -> (Vec<CardView>, Vec<String>) {
    let mut s = Sim::new(1);
    s.setup();
    fleet(&mut s);
    day(&mut s, &mut |_, _| {});
    others(&s)
}

#[test]
fn one_card_stamped_a_day_ahead_moves_no_one_elses_cycle() {
    let expected = baseline();
    // The cuts on 30 Nov and the restores on 1 Dec are there to be kept.
    assert_eq!(expected.1.len(), 2 * (FLEET as usize - 1));
    scenario(|s| {
        fleet(s);
        let before = s.engine.clock();
        day(s, &mut |s, step| {
            // 23 hours ahead of the fleet: inside the 24 h future bound.
            let out = s.rec(1, &format!("skew-{step}"), &dec(1, 19 + step, 0), mb(1));
            assert!(
                matches!(out[0], Output::Accounted(Accounted { counted: true, .. })),
                "{out:?}"
            );
        });
        assert!(s.engine.clock() > before);
        assert_eq!(others(s), expected);
    });
}

#[test]
fn a_card_whose_records_ratchet_forward_moves_no_one_elses_time() {
    let expected = baseline();
    scenario(|s| {
        fleet(s);
        let mut end = ts(&nov(30, 20, 0));
        day(s, &mut |s, step| {
            // Each record 23 h after its predecessor: each inside the bound
            // of the one before, the third beyond the fleet's clock + 24 h.
            end = end.plus_millis(23 * 3_600_000);
            let out = s.rec(1, &format!("ratchet-{step}"), &end.to_string(), mb(1));
            if step >= 2 {
                assert!(
                    matches!(&out[0], Output::Rejected(r) if r.code == "future_time"),
                    "{out:?}"
                );
            }
        });
        assert_eq!(others(s), expected);
    });
}

#[test]
fn a_far_future_command_is_refused_as_a_whole_and_moves_nothing() {
    scenario(|s| {
        fleet(s);
        s.rec(2, "r1", &nov(30, 20, 0), mb(10));
        let clock = s.engine.clock();
        // Received this evening, stamped next March.
        let line = json!({"id": "far", "type": "suspend", "at": "2027-03-01T00:00:00+08:00",
            "iccids": [iccid_text(3)]});
        let command = parse_command(line.to_string().as_bytes()).expect("parses");
        let mut out = Vec::new();
        s.engine
            .process_command_received(command, Some(ts(&nov(30, 20, 30))), 9_000, &mut out);
        let Some(Output::Journal(j)) = out.last() else {
            panic!("journaled: {out:?}");
        };
        let e = j.result.error.as_ref().expect("refused as a whole");
        assert_eq!(e.code, ErrorCode::FutureAt);
        assert!(e.message.contains("ahead of the event clock"), "{e:?}");
        assert_eq!(out.len(), 1, "nothing but the journal entry: {out:?}");
        assert_eq!(s.engine.clock(), clock);
        assert_eq!(
            s.state(3).0,
            "active",
            "the refused suspend changed nothing"
        );
        // November is still open for everyone.
        let out = s.rec(2, "r2", &nov(30, 21, 0), mb(25));
        assert_eq!(accounted(&out)[0].cycle, CycleId::new(2026, 11));
        assert_eq!(reasons(&event_of(&out, 2)), ["over_quota"]);
        // Within the bound, a command still moves the clock (the operator's
        // time) and takes effect.
        s.at = dec(1, 0, 0);
        s.ok("suspend", json!({"iccids": [iccid_text(3)]}));
        assert_eq!(s.engine.clock(), ts(&dec(1, 0, 0)));
    });
}

#[test]
fn usage_ahead_of_the_fleet_counts_for_its_own_cycle_when_the_clock_gets_there() {
    scenario(|s| {
        fleet(s);
        for n in 2..=FLEET {
            s.rec(n, &format!("a{n}"), &nov(30, 23, 50), mb(1));
        }
        // Card 1: 29 MB in November, then 31 MB stamped in December before
        // the fleet got there: not November's usage, not a cut in November.
        s.rec(1, "n1", &nov(30, 23, 40), mb(29));
        let out = s.rec(1, "d1", &dec(1, 0, 10), mb(31));
        assert!(
            matches!(out[0], Output::Accounted(Accounted { counted: true, cycle, .. })
            if cycle == CycleId::new(2026, 12))
        );
        assert!(card_events(&out).is_empty(), "{out:?}");
        assert_eq!(s.view(1).usage_bytes, mb(29));
        assert_eq!(s.view(1).cycle, CycleId::new(2026, 11));
        // The fleet reaches December: card 1 starts it with its 31 MB, over
        // the 30 MB allowance: cut at the rollover, overshoot reported.
        let mut rollover = Vec::new();
        for n in 2..=FLEET {
            rollover.extend(s.rec(n, &format!("b{n}"), &dec(1, 0, 20), mb(1)));
        }
        assert_eq!(s.view(1).cycle, CycleId::new(2026, 12));
        assert_eq!(s.view(1).usage_bytes, mb(31));
        let e = event_of(&rollover, 1);
        assert_eq!(reasons(&e), ["over_quota"]);
        assert_eq!(e.overshoot_bytes, Some(mb(1)));
        assert_eq!(s.state(1).0, "suspended");
    });
}

#[test]
fn a_far_future_record_inside_a_replay_of_old_files_moves_nothing() {
    // Old files replayed today: each record's receive time is "now", long
    // after its end.
    let now = ts("2027-06-01T00:00:00+08:00");
    let expected = baseline();
    scenario(|s| {
        fleet(s);
        day(s, &mut |s, step| {
            let (id, end) = match step {
                // Far beyond today: refused.
                0 => ("future", "2099-01-01T00:00:00+08:00".to_owned()),
                // Months ahead of the replayed fleet, but not of today:
                // kept for its own cycle, moving nothing.
                _ => (
                    "months-ahead",
                    format!("2027-0{}-01T00:00:00+08:00", 2 + step),
                ),
            };
            let mut out = Vec::new();
            let usage = usage(1, &format!("{id}-{step}"), &end, mb(1));
            s.engine
                .process_usage_received(&usage, Some(now), 10_000 + u64::from(step), &mut out)
                .expect("in-memory dedupe never fails");
            if step == 0 {
                assert!(
                    matches!(&out[0], Output::Rejected(r) if r.code == "future_time"),
                    "{out:?}"
                );
            }
            s.log.extend(out);
        });
        assert_eq!(others(s), expected);
        assert!(s.engine.clock() < Timestamp::parse_rfc3339(&dec(2, 0, 0)).unwrap());
    });
}

/// `day`'s records of card `n`, in time order.
fn card_day(n: u32) -> Vec<flowcap_engine::Usage> {
    let mut records: Vec<_> = [(20, 0, 10), (21, 0, 10), (22, 0, 10), (23, 59, 1)]
        .into_iter()
        .enumerate()
        .map(|(step, (hour, minute, m))| {
            usage(n, &format!("r{n}-{step}"), &nov(30, hour, minute), mb(m))
        })
        .collect();
    records.push(usage(n, &format!("r{n}-dec"), &dec(1, 0, 30), mb(1)));
    records
}

/// Kafka partitions are ordered each on its own and read in whatever
/// interleaving the broker serves (issue #23, finding 3). Here the even
/// cards' partition is read to its end, across the month end, before the
/// odd cards' partition delivers anything: time follows the slowest lane,
/// so the odd cards' November records still count in November and cut on
/// the crossing record, and every card's events and usage are those of
/// the run in time order. With one clock for both lanes, the odd cards'
/// November records came after the clock had passed midnight: their cuts
/// were missing.
#[test]
fn a_lane_read_ahead_across_the_month_end_moves_no_one_elses_time() {
    let expected = baseline();
    scenario(|s| {
        fleet(s);
        s.engine.declare_lanes(2);
        for lane in [0, 1] {
            // A lane in its own time order.
            let cards: Vec<_> = (2..=FLEET)
                .filter(|n| n % 2 == lane)
                .map(card_day)
                .collect();
            for step in 0..cards[0].len() {
                for records in &cards {
                    s.rec_from(Lane(lane), &records[step]);
                }
            }
        }
        assert_eq!(others(s), expected);
    });
}

/// A lane that never reports holds time back until its source declares it
/// idle; then the others move time on their own, and its next record makes
/// it hold time back again.
#[test]
fn a_silent_lane_holds_time_back_until_declared_idle() {
    scenario(|s| {
        fleet(s);
        s.engine.declare_lanes(2);
        let before = s.engine.clock();
        let cards: Vec<_> = (2..=FLEET).map(card_day).collect();
        for step in 0..cards[0].len() {
            for records in &cards {
                s.rec_from(Lane(0), &records[step]);
            }
        }
        // Lane 1 never reported: November is still open.
        assert_eq!(s.engine.clock(), before);
        assert_eq!(s.view(2).cycle, CycleId::new(2026, 11));
        let out = s.lane_idle(Lane(1));
        assert_eq!(s.engine.clock(), ts(&dec(1, 0, 30)));
        assert_eq!(s.view(2).cycle, CycleId::new(2026, 12));
        assert_eq!(s.view(2).usage_bytes, mb(1));
        // The restores of the cuts of 23:59 come with the idle lane.
        assert_eq!(card_events(&out).len(), FLEET as usize - 1, "{out:?}");
        // Lane 1 reports again, behind lane 0: time stays where it was.
        s.rec_from(Lane(1), &usage(1, "late-lane", &dec(1, 0, 5), mb(1)));
        assert_eq!(s.engine.clock(), ts(&dec(1, 0, 30)));
    });
}

/// A record is judged by its own lane's time: a lane whose cards are three
/// hours into December makes its card's record of 30 November late (past
/// the 2 h lateness) although the other lane, and so the clock, is still
/// in November; read in time order, the record is late too. Its verdict
/// does not depend on how far the other lane has been read.
#[test]
fn a_record_of_the_closing_cycle_is_judged_by_its_own_lanes_time() {
    scenario(|s| {
        fleet(s);
        s.engine.declare_lanes(2);
        for n in 2..=FLEET {
            let lane = Lane(n % 2);
            s.rec_from(lane, &usage(n, &format!("a{n}"), &nov(30, 22, 0), mb(1)));
        }
        for n in (2..=FLEET).filter(|n| n % 2 == 0) {
            s.rec_from(Lane(0), &usage(n, &format!("b{n}"), &dec(1, 3, 0), mb(1)));
        }
        assert!(
            s.engine.clock() < ts(&dec(1, 0, 0)),
            "lane 1 is in November"
        );
        let out = s.rec_from(Lane(0), &usage(2, "old", &nov(30, 23, 0), mb(5)));
        assert!(
            matches!(
                out[0],
                Output::Accounted(Accounted {
                    counted: false,
                    late: true,
                    ..
                })
            ),
            "{out:?}"
        );
        assert_eq!(
            s.view(2).usage_bytes,
            mb(1),
            "card 2: its 22:00 record only"
        );
        // A lane-1 card's record of 23:00 still counts: its lane is in November.
        let out = s.rec_from(Lane(1), &usage(3, "in-time", &nov(30, 23, 0), mb(5)));
        assert!(
            matches!(
                out[0],
                Output::Accounted(Accounted {
                    counted: true,
                    late: false,
                    ..
                })
            ),
            "{out:?}"
        );
    });
}

/// A lane declared idle holds nothing back; after a wake (a transport's
/// start: its source may have a backlog now) it holds time back again
/// until it reports, so its backlog meets the clock it left.
#[test]
fn a_woken_lane_holds_time_back_again() {
    scenario(|s| {
        fleet(s);
        s.engine.declare_lanes(2);
        s.lane_idle(Lane(1));
        for n in 2..=FLEET {
            s.rec_from(Lane(0), &usage(n, &format!("a{n}"), &nov(30, 20, 0), mb(1)));
        }
        let before = s.engine.clock();
        assert_eq!(before, ts(&nov(30, 20, 0)));
        let seq = 9_000;
        s.engine.lanes_awake(seq);
        for n in 2..=FLEET {
            s.rec_from(Lane(0), &usage(n, &format!("b{n}"), &nov(30, 22, 0), mb(1)));
        }
        assert_eq!(s.engine.clock(), before, "lane 1 holds time back again");
        s.rec_from(Lane(1), &usage(2, "c", &nov(30, 21, 0), mb(1)));
        assert_eq!(s.engine.clock(), ts(&nov(30, 21, 0)));
    });
}
