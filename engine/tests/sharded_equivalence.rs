//! The threaded engine must produce the same state and the same events as
//! the sequential engine over the same input (only the interleaving of
//! different cards' outputs may differ).

use std::collections::BTreeSet;

use flowcap_engine::command::parse_command;
use flowcap_engine::event::{ActionEvent, Output};
use flowcap_engine::{Engine, EngineConfig, Iccid, RecordId, ShardedEngine, Timestamp, Usage};

enum Input {
    Usage(Usage),
    Command(flowcap_engine::Command),
}

fn iccid(i: u64) -> Iccid {
    Iccid::parse(&format!("8986{:016}", i)).unwrap()
}

/// A deterministic scenario: plans, cards, a forward and a backward pool,
/// thresholds, then records crossing limits and a cycle boundary, with
/// commands interleaved.
fn scenario() -> Vec<Input> {
    let mut inputs = Vec::new();
    let mut cmd =
        |json: String| inputs.push(Input::Command(parse_command(json.as_bytes()).unwrap()));
    let at = "2026-11-01T00:00:00+08:00";
    cmd(format!(
        r#"{{"id":"p1","type":"upsert_plan","at":"{at}","plan":{{"id":"cm-30","carrier":"cmcc","allowance_mb":30,"traffic":"directed"}}}}"#
    ));
    cmd(format!(
        r#"{{"id":"p2","type":"upsert_plan","at":"{at}","plan":{{"id":"ct-100","carrier":"ctcc","allowance_mb":100,"traffic":"general"}}}}"#
    ));
    for i in 0..40u64 {
        let (carrier, plan) = if i % 2 == 0 {
            ("cmcc", "cm-30")
        } else {
            ("ctcc", "ct-100")
        };
        cmd(format!(
            r#"{{"id":"card{i}","type":"upsert_card","at":"{at}","card":{{"iccid":"{}","carrier":"{carrier}","plan":"{plan}","state":"active"}}}}"#,
            iccid(i)
        ));
    }
    cmd(format!(
        r#"{{"id":"fp","type":"create_pool","at":"{at}","pool":{{"id":"fwd","kind":"forward","carrier":"cmcc","plan":"cm-30"}}}}"#
    ));
    cmd(format!(
        r#"{{"id":"bp","type":"create_pool","at":"{at}","pool":{{"id":"bwd","kind":"backward"}}}}"#
    ));
    let fwd: Vec<String> = (0..10).map(|i| format!("\"{}\"", iccid(i * 2))).collect();
    let bwd: Vec<String> = (0..5)
        .map(|i| format!("\"{}\"", iccid(i * 2 + 21)))
        .collect();
    cmd(format!(
        r#"{{"id":"fm","type":"add_pool_members","at":"{at}","pool":"fwd","iccids":[{}]}}"#,
        fwd.join(",")
    ));
    cmd(format!(
        r#"{{"id":"bm","type":"add_pool_members","at":"{at}","pool":"bwd","iccids":[{}]}}"#,
        bwd.join(",")
    ));
    cmd(format!(
        r#"{{"id":"r1","type":"upsert_rule","at":"{at}","rule":{{"id":"r1","type":3,"condition":{{"used_mb_gte":150}},"actions":[{{"type":"suspend"}}]}}}}"#
    ));
    let odd: Vec<String> = (0..10)
        .map(|i| format!("\"{}\"", iccid(i * 2 + 1)))
        .collect();
    cmd(format!(
        r#"{{"id":"th","type":"set_threshold","at":"{at}","iccids":[{}],"mb":20}}"#,
        odd.join(",")
    ));

    let start = Timestamp::parse_rfc3339("2026-11-20T00:00:00+08:00").unwrap();
    let mut state = 12345u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for n in 0..6000u64 {
        let card = next() % 41; // 40 is unknown
        let minutes = n * 3; // crosses into December
        let end = start.plus_millis((minutes * 60_000) as i64);
        let resend = n > 10 && next() % 10 == 0;
        let id = if resend {
            format!("r-{}", n - 7)
        } else {
            format!("r-{n}")
        };
        inputs.push(Input::Usage(Usage {
            record_id: RecordId::new(&id).unwrap(),
            iccid: iccid(card),
            start: None,
            end,
            bytes_up: next() % 400_000,
            bytes_down: next() % 900_000,
            carrier: None,
            imei: None,
        }));
        if n % 1500 == 700 {
            let c = iccid(next() % 40);
            inputs.push(Input::Command(
                parse_command(
                    format!(
                        r#"{{"id":"s{n}","type":"suspend","at":"{}","iccids":["{c}"]}}"#,
                        end.to_rfc3339(0)
                    )
                    .as_bytes(),
                )
                .unwrap(),
            ));
        }
    }
    inputs
}

fn events(outputs: &[Output]) -> BTreeSet<String> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Action(ActionEvent::CardState(e)) => Some(format!(
                "{}|{}|{:?}|{:?}|{:?}",
                e.id, e.iccid, e.old, e.new, e.reasons
            )),
            Output::Action(ActionEvent::PoolState(e)) => {
                Some(format!("{}|{}|{:?}|{:?}", e.id, e.pool, e.old, e.new))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn threaded_engine_equals_sequential_engine() {
    let inputs = scenario();
    let mut sequential = Engine::new(EngineConfig {
        shards: 1,
        ..Default::default()
    });
    let mut seq_out = Vec::new();
    for (seq, input) in inputs.iter().enumerate() {
        match input {
            Input::Usage(u) => sequential
                .process_usage(u, seq as u64, &mut seq_out)
                .unwrap(),
            Input::Command(c) => sequential.process_command(c.clone(), seq as u64, &mut seq_out),
        }
    }

    let engine = Engine::new(EngineConfig {
        shards: 3,
        ..Default::default()
    });
    let (mut threaded, rx) = ShardedEngine::start(engine, 16);
    let collector = std::thread::spawn(move || rx.iter().flatten().collect::<Vec<Output>>());
    for (seq, input) in inputs.iter().enumerate() {
        match input {
            Input::Usage(u) => threaded.process_usage(u, seq as u64).unwrap(),
            Input::Command(c) => threaded.process_command(c.clone(), seq as u64),
        }
    }
    let threaded = threaded.finish();
    let thr_out = collector.join().unwrap();

    assert!(
        events(&seq_out).len() > 20,
        "scenario must produce state changes"
    );
    assert_eq!(events(&seq_out), events(&thr_out));
    assert_eq!(sequential.card_views(), threaded.card_views());
    let count = |outs: &[Output], f: fn(&Output) -> bool| outs.iter().filter(|o| f(o)).count();
    for f in [
        (|o: &Output| matches!(o, Output::Accounted(_))) as fn(&Output) -> bool,
        |o| matches!(o, Output::Duplicate { .. }),
        |o| matches!(o, Output::Rejected(_)),
        |o| matches!(o, Output::Journal(_)),
    ] {
        assert_eq!(count(&seq_out, f), count(&thr_out, f));
    }
}

#[test]
fn snapshot_restore_continue_equals_never_stopping() {
    let inputs = scenario();
    let run = |engine: &mut Engine, range: std::ops::Range<usize>, out: &mut Vec<Output>| {
        for seq in range {
            match &inputs[seq] {
                Input::Usage(u) => engine.process_usage(u, seq as u64, out).unwrap(),
                Input::Command(c) => engine.process_command(c.clone(), seq as u64, out),
            }
        }
    };
    let config = EngineConfig {
        shards: 2,
        ..Default::default()
    };
    let mut straight = Engine::new(config.clone());
    let mut straight_out = Vec::new();
    run(&mut straight, 0..inputs.len(), &mut straight_out);

    // Stop in the middle, snapshot, restore, continue. The dedupe store is
    // in memory here, so restore a store holding exactly the ids accounted
    // before the snapshot.
    let cut = inputs.len() / 2;
    let mut first = Engine::new(config);
    let mut out = Vec::new();
    run(&mut first, 0..cut, &mut out);
    let bytes = first.snapshot();
    let mut store = flowcap_engine::dedupe::MemIdStore::default();
    for o in &out {
        if let Output::Accounted(a) = o {
            flowcap_engine::dedupe::IdStore::insert(
                &mut store,
                a.usage.iccid,
                &a.usage.record_id,
                a.usage.end,
                a.seq,
            )
            .unwrap();
        }
    }
    let mut restored = Engine::restore(&bytes, Box::new(store)).unwrap();
    run(&mut restored, cut..inputs.len(), &mut out);

    assert_eq!(straight.card_views(), restored.card_views());
    assert_eq!(events(&straight_out), events(&out));
    assert_eq!(
        straight.pool_view(&"fwd".into()),
        restored.pool_view(&"fwd".into())
    );
    assert_eq!(
        straight.pool_view(&"bwd".into()),
        restored.pool_view(&"bwd".into())
    );
}

#[test]
fn corrupt_snapshot_is_refused_with_a_clear_error() {
    let engine = Engine::new(EngineConfig {
        shards: 1,
        ..Default::default()
    });
    let mut bytes = engine.snapshot();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    let e = Engine::restore(
        &bytes,
        Box::new(flowcap_engine::dedupe::MemIdStore::default()),
    )
    .unwrap_err();
    assert!(e.to_string().contains("checksum"), "{e}");
    let e = Engine::restore(
        b"nope",
        Box::new(flowcap_engine::dedupe::MemIdStore::default()),
    )
    .unwrap_err();
    assert!(e.to_string().contains("magic"), "{e}");
}

#[test]
fn a_repeated_command_is_answered_with_its_first_result_even_after_restore() {
    let mut engine = Engine::new(EngineConfig {
        shards: 2,
        ..Default::default()
    });
    let mut out = Vec::new();
    let at = "2026-11-01T00:00:00+08:00";
    let known = iccid(1);
    let unknown = iccid(2);
    let lines = [
        format!(
            r#"{{"id":"p","type":"upsert_plan","at":"{at}","plan":{{"id":"pl","carrier":"ctcc","allowance_mb":10,"traffic":"directed"}}}}"#
        ),
        format!(
            r#"{{"id":"c","type":"upsert_card","at":"{at}","card":{{"iccid":"{known}","carrier":"ctcc","plan":"pl","state":"active"}}}}"#
        ),
        format!(
            r#"{{"id":"mixed","type":"suspend","at":"{at}","iccids":["{known}","{unknown}"]}}"#
        ),
        format!(r#"{{"id":"allok","type":"resume","at":"{at}","iccids":["{known}"]}}"#),
    ];
    for (seq, line) in lines.iter().enumerate() {
        engine.process_command(
            parse_command(line.as_bytes()).unwrap(),
            seq as u64,
            &mut out,
        );
    }
    let first: Vec<_> = out
        .iter()
        .filter_map(|o| match o {
            Output::Journal(j) => Some(j.result.clone()),
            _ => None,
        })
        .collect();
    let bytes = engine.snapshot();
    let mut restored = Engine::restore(
        &bytes,
        Box::new(flowcap_engine::dedupe::MemIdStore::default()),
    )
    .unwrap();
    let mut again = Vec::new();
    for (seq, line) in lines.iter().enumerate().skip(2) {
        restored.process_command(
            parse_command(line.as_bytes()).unwrap(),
            10 + seq as u64,
            &mut again,
        );
    }
    let repeats: Vec<_> = again
        .iter()
        .filter_map(|o| match o {
            Output::Journal(j) => {
                assert!(j.repeat);
                Some(j.result.clone())
            }
            _ => None,
        })
        .collect();
    assert!(!first[2].ok && first[2].results.len() == 2);
    assert_eq!(repeats, first[2..].to_vec());
    // Nothing changed: the card is still active (the repeat of `mixed` did
    // not suspend it again, the repeat of `allok` did nothing either).
    assert_eq!(
        restored.card_view(known).unwrap().state,
        flowcap_engine::CardState::Active
    );
    assert!(again.iter().all(|o| matches!(o, Output::Journal(_))));
}

#[test]
fn identities_survive_moving_to_the_pool_shard_and_rebind() {
    let mut engine = Engine::new(EngineConfig {
        shards: 3,
        ..Default::default()
    });
    let mut out = Vec::new();
    let at = "2026-11-01T00:00:00+08:00";
    let mut lines = vec![
        format!(
            r#"{{"id":"p","type":"upsert_plan","at":"{at}","plan":{{"id":"pl","carrier":"cmcc","allowance_mb":10,"traffic":"directed"}}}}"#
        ),
        format!(
            r#"{{"id":"pool","type":"create_pool","at":"{at}","pool":{{"id":"f","kind":"forward","carrier":"cmcc","plan":"pl"}}}}"#
        ),
    ];
    for n in 0..12u64 {
        // Odd cards carry an IMEI that is not all digits (kept as text).
        let imei = if n % 2 == 0 {
            format!("8640000000000{n:02}")
        } else {
            format!("35-2099-{n}")
        };
        lines.push(format!(
            r#"{{"id":"c{n}","type":"upsert_card","at":"{at}","card":{{"iccid":"{}","carrier":"cmcc","plan":"pl","state":"active","msisdn":"14400000{n:05}","imsi":"4600000000{n:05}","imei":"{imei}"}}}}"#,
            iccid(n)
        ));
    }
    let all: Vec<String> = (0..12).map(|n| format!("\"{}\"", iccid(n))).collect();
    lines.push(format!(
        r#"{{"id":"join","type":"add_pool_members","at":"{at}","pool":"f","iccids":[{}]}}"#,
        all.join(",")
    ));
    lines.push(format!(
        r#"{{"id":"rb","type":"rebind","at":"{at}","iccid":"{}","imei":"999"}}"#,
        iccid(3)
    ));
    for (seq, line) in lines.iter().enumerate() {
        engine.process_command(
            parse_command(line.as_bytes()).unwrap(),
            seq as u64,
            &mut out,
        );
    }
    for n in 0..12u64 {
        let view = engine.card_view(iccid(n)).unwrap();
        assert_eq!(view.pool.as_ref().map(|p| p.as_str()), Some("f"));
        assert_eq!(
            view.msisdn.as_deref(),
            Some(format!("14400000{n:05}").as_str())
        );
        assert_eq!(
            view.imsi.as_deref(),
            Some(format!("4600000000{n:05}").as_str())
        );
        let imei = match n {
            3 => "999".to_owned(),
            n if n % 2 == 0 => format!("8640000000000{n:02}"),
            n => format!("35-2099-{n}"),
        };
        assert_eq!(view.imei.as_deref(), Some(imei.as_str()), "card {n}");
    }
    let restored = Engine::restore(
        &engine.snapshot(),
        Box::new(flowcap_engine::dedupe::MemIdStore::default()),
    )
    .unwrap();
    assert_eq!(restored.card_views(), engine.card_views());
}

#[test]
fn a_receive_time_keeps_a_long_silence_from_freezing_the_clock() {
    let mut engine = Engine::new(EngineConfig {
        shards: 1,
        ..Default::default()
    });
    let mut out = Vec::new();
    let at = "2026-11-01T00:00:00+08:00";
    for line in [
        format!(
            r#"{{"id":"p","type":"upsert_plan","at":"{at}","plan":{{"id":"pl","carrier":"ctcc","allowance_mb":10,"traffic":"directed"}}}}"#
        ),
        format!(
            r#"{{"id":"c","type":"upsert_card","at":"{at}","card":{{"iccid":"{}","carrier":"ctcc","plan":"pl","state":"active"}}}}"#,
            iccid(1)
        ),
    ] {
        engine.process_command(parse_command(line.as_bytes()).unwrap(), 0, &mut out);
    }
    // Two days of silence: the next record is 48 h ahead of the clock.
    let end = Timestamp::parse_rfc3339("2026-11-03T00:00:00+08:00").unwrap();
    let usage = |id: &str| Usage {
        record_id: RecordId::new(id).unwrap(),
        iccid: iccid(1),
        start: None,
        end,
        bytes_up: 1,
        bytes_down: 1,
        carrier: None,
        imei: None,
    };
    let mut first = Vec::new();
    engine.process_usage(&usage("a"), 1, &mut first).unwrap();
    assert!(matches!(&first[..], [Output::Rejected(r)] if r.code == "future_time"));
    let mut second = Vec::new();
    engine
        .process_usage_received(&usage("b"), Some(end.plus_millis(1000)), 2, &mut second)
        .unwrap();
    assert!(
        matches!(&second[..], [Output::Accounted(a)] if a.counted),
        "{second:?}"
    );
    // A record far ahead of both the clock and its receive time is still refused.
    let mut third = Vec::new();
    let far = Usage {
        end: end.plus_millis(3 * 86_400_000),
        ..usage("c")
    };
    engine
        .process_usage_received(&far, Some(end), 3, &mut third)
        .unwrap();
    assert!(matches!(&third[..], [Output::Rejected(r)] if r.code == "future_time"));
}

/// A full batch (100,000 cards) joins and leaves one pool: the pool's
/// allowance follows each member incrementally (a recompute over all members
/// per card would make this quadratic).
#[test]
fn a_full_batch_joins_and_leaves_one_pool() {
    let mut engine = Engine::new(EngineConfig {
        shards: 2,
        ..Default::default()
    });
    let mut out = Vec::new();
    let at = "2026-11-01T00:00:00+08:00";
    let mut seq = 0u64;
    let mut run = |engine: &mut Engine, line: String, out: &mut Vec<Output>| {
        engine.process_command(parse_command(line.as_bytes()).unwrap(), seq, out);
        seq += 1;
    };
    run(
        &mut engine,
        format!(
            r#"{{"id":"p","type":"upsert_plan","at":"{at}","plan":{{"id":"pl","carrier":"cmcc","allowance_mb":30,"traffic":"directed"}}}}"#
        ),
        &mut out,
    );
    run(
        &mut engine,
        format!(
            r#"{{"id":"pool","type":"create_pool","at":"{at}","pool":{{"id":"f","kind":"forward","carrier":"cmcc","plan":"pl"}}}}"#
        ),
        &mut out,
    );
    let n = 100_000u64;
    for i in 0..n {
        // Every tenth card is not yet activated: it joins without allowance.
        let state = if i % 10 == 0 { "activatable" } else { "active" };
        run(
            &mut engine,
            format!(
                r#"{{"id":"c{i}","type":"upsert_card","at":"{at}","card":{{"iccid":"{}","carrier":"cmcc","plan":"pl","state":"{state}"}}}}"#,
                iccid(i)
            ),
            &mut out,
        );
    }
    let all: Vec<String> = (0..n).map(|i| format!("\"{}\"", iccid(i))).collect();
    out.clear();
    run(
        &mut engine,
        format!(
            r#"{{"id":"join","type":"add_pool_members","at":"{at}","pool":"f","iccids":[{}]}}"#,
            all.join(",")
        ),
        &mut out,
    );
    assert!(
        matches!(&out[..], [Output::Journal(j)] if j.result.ok && j.result.results.len() == n as usize)
    );
    let pool = engine.pool_view(&"f".into()).unwrap();
    assert_eq!(pool.members.len(), n as usize);
    assert_eq!(pool.allowance_bytes, 90_000 * 30 * flowcap_engine::MB);
    // Activating one more member raises the allowance by its plan.
    run(
        &mut engine,
        format!(
            r#"{{"id":"act","type":"activate","at":"{at}","iccids":["{}"]}}"#,
            iccid(0)
        ),
        &mut out,
    );
    assert_eq!(
        engine.pool_view(&"f".into()).unwrap().allowance_bytes,
        90_001 * 30 * flowcap_engine::MB
    );
    run(
        &mut engine,
        format!(
            r#"{{"id":"leave","type":"remove_pool_members","at":"{at}","pool":"f","iccids":[{}]}}"#,
            all.join(",")
        ),
        &mut out,
    );
    let pool = engine.pool_view(&"f".into()).unwrap();
    assert_eq!(
        (pool.members.len(), pool.allowance_bytes, pool.usage_bytes),
        (0, 0, 0)
    );
}
