//! Setup commands parse back and respect the carriers' validation rules.

mod common;

use std::collections::{HashMap, HashSet};

use common::quiet;
use flowcap_engine::command::{parse_command, PoolKind, MAX_BATCH, MAX_TAGS_PER_CARD};
use flowcap_engine::{CardState, Carrier, CommandKind, Iccid, PlanId, PoolId, TagId, TrafficType};
use flowcap_loadgen::SETUP_BATCH;
use flowcap_loadgen::{Workload, WorkloadConfig};

#[test]
fn setup_parses_back_and_is_valid() {
    let config = WorkloadConfig {
        forward_pool_share: 0.3,
        backward_pool_share: 0.2,
        threshold_share: 0.5,
        add_on_share: 0.2,
        pool_size: 50,
        ..quiet(5_000, 1)
    };
    let start = config.start;
    let workload = Workload::new(config.clone()).unwrap();
    let mut plans: HashMap<PlanId, Carrier> = HashMap::new();
    let mut tags: HashSet<TagId> = HashSet::new();
    let mut cards: HashMap<Iccid, (Carrier, PlanId)> = HashMap::new();
    let mut pools: HashMap<PoolId, (PoolKind, Option<Carrier>, Option<PlanId>)> = HashMap::new();
    let mut member_of: HashMap<Iccid, PoolId> = HashMap::new();
    let mut thresholds = 0usize;
    let mut eligible = HashSet::new();
    let mut add_ons = 0;
    let mut general_mb: HashMap<PlanId, u64> = HashMap::new();
    for (k, command) in workload.setup_commands().enumerate() {
        let json = serde_json::to_string(&command).unwrap();
        let parsed = parse_command(json.as_bytes()).unwrap();
        assert_eq!(parsed, command);
        assert_eq!(command.id.as_str(), format!("setup-{:06}", k + 1));
        assert_eq!(command.at, start);
        if let Some(batch) = command.kind.batch() {
            assert!(!batch.is_empty() && batch.len() <= MAX_BATCH);
        }
        match command.kind {
            CommandKind::UpsertTag { tag } => {
                tags.insert(tag.name);
            }
            CommandKind::UpsertPlan { plan } => {
                if plan.traffic == TrafficType::General {
                    general_mb.insert(plan.id.clone(), plan.allowance_mb);
                }
                plans.insert(plan.id, plan.carrier);
            }
            CommandKind::UpsertCard { card } => {
                let text = card.iccid.to_string();
                assert_eq!(text.len(), 20);
                assert!(text.bytes().all(|b| b.is_ascii_digit()));
                assert_eq!(
                    plans.get(&card.plan),
                    Some(&card.carrier),
                    "plan defined, same carrier"
                );
                assert!(card.tags.len() <= MAX_TAGS_PER_CARD);
                assert!(card.tags.iter().all(|t| tags.contains(t)));
                assert_eq!(card.state, Some(CardState::Active));
                assert!(card.activated_at.unwrap() < start);
                assert!(card.expires_at.unwrap() > start.plus_millis(30 * 86_400_000));
                assert!(card.msisdn.is_some() && card.imsi.is_some() && card.imei.is_some());
                assert!(
                    cards
                        .insert(card.iccid, (card.carrier, card.plan))
                        .is_none(),
                    "distinct ICCIDs"
                );
            }
            CommandKind::CreatePool { pool } => {
                if pool.kind == PoolKind::Forward {
                    assert!(pool.carrier.is_some() && pool.plan.is_some());
                }
                assert!(pools
                    .insert(pool.id, (pool.kind, pool.carrier, pool.plan))
                    .is_none());
            }
            CommandKind::AddPoolMembers { pool, iccids } => {
                let (kind, carrier, plan) = pools.get(&pool).cloned().expect("pool created first");
                for iccid in iccids {
                    let (c, p) = cards.get(&iccid).cloned().expect("card exists");
                    if kind == PoolKind::Forward {
                        assert_eq!(
                            (Some(c), Some(p)),
                            (carrier, plan.clone()),
                            "forward members share carrier and plan"
                        );
                        eligible.insert(iccid);
                    }
                    assert!(
                        member_of.insert(iccid, pool.clone()).is_none(),
                        "one pool per card"
                    );
                }
            }
            CommandKind::SetThreshold { iccids, mb } => {
                assert!(mb >= 0);
                for iccid in iccids {
                    let (carrier, _) = cards[&iccid];
                    let ok = carrier == Carrier::Ctcc
                        || (matches!(carrier, Carrier::Cmcc | Carrier::Cucc)
                            && eligible.contains(&iccid));
                    assert!(
                        ok,
                        "threshold on {carrier} card {iccid} outside a forward pool"
                    );
                    thresholds += 1;
                }
            }
            CommandKind::AddOn { iccid, pool, mb } => {
                assert_eq!(mb, config.add_on_mb);
                match (iccid, pool) {
                    (Some(iccid), None) => {
                        assert!(cards.contains_key(&iccid));
                        assert!(
                            !eligible.contains(&iccid),
                            "card add-ons only outside forward pools"
                        );
                        // The carriers sell none past the general cap.
                        let plan = &cards[&iccid].1;
                        assert!(
                            general_mb.get(plan).is_none_or(|a| a + mb <= 100),
                            "add-on of {mb} MB on general plan {plan}"
                        );
                    }
                    (None, Some(pool)) => assert_eq!(pools[&pool].0, PoolKind::Forward),
                    _ => panic!("add_on names exactly one target"),
                }
                add_ons += 1;
            }
            other => panic!("unexpected setup command {}", other.type_name()),
        }
    }
    assert_eq!(cards.len(), 5_000);
    assert_eq!(plans.len(), 4 * config.plans.len());
    // Shares within sampling error.
    let forward = eligible.len() as f64 / 5_000.0;
    let backward = (member_of.len() - eligible.len()) as f64 / 5_000.0;
    assert!((forward - 0.3).abs() < 0.03, "forward {forward}");
    assert!((backward - 0.2).abs() < 0.03, "backward {backward}");
    let eligible_cards = cards
        .iter()
        .filter(|(i, (c, _))| *c == Carrier::Ctcc || (*c != Carrier::Tri && eligible.contains(*i)))
        .count();
    let share = thresholds as f64 / eligible_cards as f64;
    assert!((share - 0.5).abs() < 0.04, "threshold share {share}");
    // 20% of the 70% outside forward pools, less the general cards whose
    // plan plus 100 MB would pass the cap (half the catalogue's weight).
    assert!(add_ons > 250, "{add_ons} add-ons");
    assert!(cards.values().any(|(c, _)| *c == Carrier::Tri));
}

#[test]
fn large_pools_are_split_into_batches() {
    let config = WorkloadConfig {
        cards: 250_000,
        carrier_mix: flowcap_loadgen::CarrierMix {
            cmcc: 1.0,
            ctcc: 0.0,
            cucc: 0.0,
            tri: 0.0,
        },
        plans: vec![flowcap_loadgen::PlanTemplate {
            allowance_mb: 30,
            traffic: flowcap_engine::TrafficType::Directed,
            weight: 1.0,
            term_months: 12,
        }],
        forward_pool_share: 1.0,
        backward_pool_share: 0.0,
        pool_size: 240_000,
        threshold_share: 1.0,
        ..quiet(1_000, 1)
    };
    let workload = Workload::new(config).unwrap();
    let mut adds = Vec::new();
    let mut threshold_batches = 0;
    for command in workload.setup_commands() {
        match &command.kind {
            CommandKind::AddPoolMembers { pool, iccids } => adds.push((pool.clone(), iccids.len())),
            CommandKind::SetThreshold { iccids, .. } => {
                assert!(iccids.len() <= SETUP_BATCH);
                threshold_batches += 1;
            }
            _ => {}
        }
        // Every setup command fits a Kafka message of the default 1 MB.
        let json = serde_json::to_vec(&command).unwrap();
        assert!(json.len() < 1_000_000, "{} bytes", json.len());
    }
    let mut expected = vec![(PoolId::from("fp-000001"), SETUP_BATCH); 12];
    expected.push((PoolId::from("fp-000002"), 10_000));
    assert_eq!(adds, expected);
    assert!(threshold_batches >= 10, "{threshold_batches}");
}
