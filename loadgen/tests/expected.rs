//! `Expected` agrees with an independent reading of the output.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};

use common::{quiet, strict_parse, ts};
use flowcap_engine::{Carrier, CommandKind, CycleCalendar, CycleId, Iccid};
use flowcap_loadgen::{RecordKind, Workload, WorkloadConfig};

#[test]
fn expected_matches_a_recount_of_the_json_lines() {
    let config = WorkloadConfig {
        duplicate_pct: 10.0,
        malformed_pct: 5.0,
        unknown_card_pct: 5.0,
        late_pct: 5.0,
        out_of_order_pct: 5.0,
        ..quiet(1_000, 30)
    };
    let workload = Workload::new(config).unwrap();
    // Carriers from the setup commands, as an engine would learn them.
    let carriers: HashMap<Iccid, Carrier> = workload
        .setup_commands()
        .filter_map(|c| match c.kind {
            CommandKind::UpsertCard { card } => Some((card.iccid, card.carrier)),
            _ => None,
        })
        .collect();
    let calendar = CycleCalendar::default();
    let mut seen = HashSet::new();
    let mut recount: BTreeMap<(Iccid, CycleId), u64> = BTreeMap::new();
    let mut line = String::new();
    for record in workload.records() {
        line.clear();
        record.to_json_line(&mut line);
        let Ok((id, iccid, end, bytes)) = strict_parse(&line, record.arrival) else {
            continue;
        };
        let Some(&carrier) = carriers.get(&iccid) else {
            continue;
        };
        if seen.insert((iccid, id)) {
            *recount
                .entry((iccid, calendar.cycle_of(carrier, end)))
                .or_default() += bytes;
        }
    }
    let expected = workload.expected();
    let entries: BTreeMap<(Iccid, CycleId), u64> = expected
        .entries()
        .map(|e| ((e.iccid, e.cycle), e.bytes))
        .collect();
    assert_eq!(entries, recount);
    for ((iccid, cycle), bytes) in &recount {
        assert_eq!(expected.card_cycle_bytes(*iccid, *cycle), *bytes);
    }
    assert_eq!(expected.total_bytes(), recount.values().sum::<u64>());
    assert_eq!(expected.counts().total(), workload.total_records());
    assert_eq!(seen.len() as u64, expected.counts().counted());
}

#[test]
fn late_bytes_are_reported_apart_and_inside_the_totals() {
    let config = WorkloadConfig {
        late_pct: 20.0,
        ..quiet(1_000, 12)
    };
    let workload = Workload::new(config).unwrap();
    let expected = workload.expected();
    let mut late_total = 0;
    let mut late_by_cell: BTreeMap<(Iccid, CycleId), u64> = BTreeMap::new();
    for record in workload.records() {
        if record.kind == RecordKind::Late {
            if let flowcap_loadgen::Payload::Valid(u) = record.payload {
                late_total += u.bytes();
                let carrier = workload
                    .carrier(workload.card_index(u.iccid).unwrap())
                    .unwrap();
                *late_by_cell
                    .entry((u.iccid, CycleCalendar::default().cycle_of(carrier, u.end)))
                    .or_default() += u.bytes();
            }
        }
    }
    assert!(late_total > 0);
    assert_eq!(expected.total_late_bytes(), late_total);
    for ((iccid, cycle), bytes) in late_by_cell {
        assert_eq!(expected.card_cycle_late_bytes(iccid, cycle), bytes);
        assert!(expected.card_cycle_bytes(iccid, cycle) >= bytes);
    }
}

#[test]
fn cucc_usage_on_the_27th_lands_in_the_next_cycle() {
    // 26 Nov 12:00 to 28 Nov 00:00 (UTC+8): crosses the cucc boundary only.
    let config = WorkloadConfig {
        start: ts("2026-11-26T12:00:00+08:00"),
        ..quiet(1_000, 36)
    };
    let boundary = ts("2026-11-27T00:00:00+08:00");
    let workload = Workload::new(config).unwrap();
    let expected = workload.expected();
    let (nov, dec) = (CycleId::new(2026, 11), CycleId::new(2026, 12));
    let mut per_cell: BTreeMap<(Iccid, CycleId), u64> = BTreeMap::new();
    let mut cucc_after = 0;
    for record in workload.records() {
        let flowcap_loadgen::Payload::Valid(u) = record.payload else {
            continue;
        };
        let carrier = workload
            .carrier(workload.card_index(u.iccid).unwrap())
            .unwrap();
        let cycle = match (carrier, u.end >= boundary) {
            (Carrier::Cucc, true) => {
                cucc_after += 1;
                dec
            }
            _ => nov,
        };
        *per_cell.entry((u.iccid, cycle)).or_default() += u.bytes();
    }
    assert!(cucc_after > 1_000);
    for ((iccid, cycle), bytes) in &per_cell {
        assert_eq!(
            expected.card_cycle_bytes(*iccid, *cycle),
            *bytes,
            "{iccid} {cycle}"
        );
    }
    let totals = expected.cycle_totals();
    assert!(totals[&(Carrier::Cucc, dec)] > 0);
    assert!(totals[&(Carrier::Cucc, nov)] > 0);
    assert!(!totals.contains_key(&(Carrier::Cmcc, dec)));
    assert!(!totals.contains_key(&(Carrier::Ctcc, dec)));
    assert!(expected.cycles().contains(&dec));
}

#[test]
fn calendar_month_boundary_for_the_others() {
    let config = WorkloadConfig {
        start: ts("2026-11-30T20:00:00+08:00"),
        ..quiet(1_000, 8)
    };
    let workload = Workload::new(config).unwrap();
    let totals = workload.expected().cycle_totals();
    for carrier in Carrier::ALL {
        assert!(totals[&(carrier, CycleId::new(2026, 12))] > 0, "{carrier}");
    }
    for carrier in [Carrier::Cmcc, Carrier::Ctcc, Carrier::Tri] {
        assert!(totals[&(carrier, CycleId::new(2026, 11))] > 0, "{carrier}");
    }
    assert!(!totals.contains_key(&(Carrier::Cucc, CycleId::new(2026, 11))));
}
