//! Every knob produces what it says, within sampling error.

mod common;

use std::collections::{HashMap, HashSet};

use common::{quiet, strict_parse};
use flowcap_loadgen::{Defect, Payload, RecordKind, Workload, WorkloadConfig};

/// 1,000 cards x 100 hours x 1 record = 100,000 records.
fn base() -> WorkloadConfig {
    quiet(1_000, 100)
}

fn shares(workload: &Workload) -> HashMap<RecordKind, f64> {
    let counts = workload.expected().counts();
    let total = counts.total() as f64;
    RecordKind::ALL
        .iter()
        .map(|&k| (k, counts.get(k) as f64 / total))
        .collect()
}

#[test]
fn each_fault_knob_alone_hits_its_rate() {
    type Setter = fn(&mut WorkloadConfig, f64);
    let knobs: [(RecordKind, Setter); 5] = [
        (RecordKind::Duplicate, |c, v| c.duplicate_pct = v),
        (RecordKind::Malformed, |c, v| c.malformed_pct = v),
        (RecordKind::UnknownCard, |c, v| c.unknown_card_pct = v),
        (RecordKind::Late, |c, v| c.late_pct = v),
        (RecordKind::OutOfOrder, |c, v| c.out_of_order_pct = v),
    ];
    for (kind, set) in knobs {
        let mut config = base();
        set(&mut config, 20.0);
        let workload = Workload::new(config).unwrap();
        assert_eq!(workload.total_records(), 100_000);
        let s = shares(&workload);
        assert!((s[&kind] - 0.20).abs() < 0.01, "{kind:?}: {}", s[&kind]);
        assert!(
            (s[&RecordKind::Fresh] - 0.80).abs() < 0.01,
            "{kind:?} fresh: {}",
            s[&RecordKind::Fresh]
        );
    }
}

#[test]
fn knobs_combine() {
    let config = WorkloadConfig {
        duplicate_pct: 20.0,
        malformed_pct: 10.0,
        unknown_card_pct: 5.0,
        late_pct: 5.0,
        out_of_order_pct: 10.0,
        ..base()
    };
    let s = shares(&Workload::new(config).unwrap());
    for (kind, want) in [
        (RecordKind::Duplicate, 0.20),
        (RecordKind::Malformed, 0.10),
        (RecordKind::UnknownCard, 0.05),
        (RecordKind::Late, 0.05),
        (RecordKind::OutOfOrder, 0.10),
        (RecordKind::Fresh, 0.50),
    ] {
        assert!(
            (s[&kind] - want).abs() < 0.01,
            "{kind:?}: {} vs {want}",
            s[&kind]
        );
    }
}

#[test]
fn records_honour_their_kind() {
    let config = WorkloadConfig {
        duplicate_pct: 10.0,
        malformed_pct: 10.0,
        unknown_card_pct: 10.0,
        late_pct: 10.0,
        out_of_order_pct: 10.0,
        ..quiet(1_000, 20)
    };
    let late_by_ms = i64::from(config.late_by_hours) * 3_600_000;
    let window_ms = i64::from(config.out_of_order_window_secs) * 1000;
    let start = config.start;
    let end_of_run = start.plus_millis(i64::from(config.duration_hours) * 3_600_000);
    let workload = Workload::new(config).unwrap();
    let mut seen: HashMap<(String, String), String> = HashMap::new();
    let mut defects = HashSet::new();
    let mut last_arrival = start;
    let mut max_end_so_far = start.plus_millis(-late_by_ms * 3);
    let mut line = String::new();
    for record in workload.records() {
        assert!(
            record.arrival >= last_arrival,
            "arrival order at {}",
            record.seq
        );
        assert!(record.arrival >= start && record.arrival < end_of_run);
        last_arrival = record.arrival;
        line.clear();
        record.to_json_line(&mut line);
        assert!(!line.contains('\n'));
        if let Payload::Malformed { defect, .. } = &record.payload {
            assert_eq!(record.kind, RecordKind::Malformed);
            defects.insert(*defect);
            assert!(
                strict_parse(&line, record.arrival).is_err(),
                "{defect:?} accepted: {line}"
            );
            continue;
        }
        let (id, iccid, end, _) =
            strict_parse(&line, record.arrival).unwrap_or_else(|e| panic!("{e}: {line}"));
        let lag = record.arrival.0 - end.0;
        let key = (iccid.to_string(), id);
        match record.kind {
            RecordKind::Duplicate => {
                assert_eq!(seen.get(&key), Some(&line), "duplicate must resend exactly");
            }
            kind => {
                assert!(seen.insert(key, line.clone()).is_none(), "record id reused");
                match kind {
                    RecordKind::Late => assert!(
                        lag > late_by_ms && lag <= 2 * late_by_ms + 1000,
                        "late lag {lag}"
                    ),
                    RecordKind::OutOfOrder => {
                        assert!(
                            lag >= window_ms / 2 && lag <= window_ms + 1000,
                            "ooo lag {lag}"
                        );
                    }
                    _ => assert!((0..=31_000).contains(&lag), "fresh lag {lag}"),
                }
                if kind == RecordKind::UnknownCard {
                    assert_eq!(workload.card_index(iccid), None);
                    assert!(iccid.to_string().starts_with("898699"));
                } else {
                    assert!(workload.card_index(iccid).is_some());
                }
                if kind == RecordKind::Fresh {
                    max_end_so_far = max_end_so_far.max(end);
                } else if kind == RecordKind::OutOfOrder {
                    assert!(
                        end < max_end_so_far,
                        "out-of-order record is behind earlier ones"
                    );
                }
            }
        }
    }
    assert_eq!(
        defects.len(),
        Defect::ALL.len(),
        "every defect appears: {defects:?}"
    );
}

#[test]
fn records_per_card_per_hour_and_spread() {
    let config = WorkloadConfig {
        records_per_card_per_hour: 2.5,
        ..quiet(2_000, 8)
    };
    let start = config.start;
    let workload = Workload::new(config).unwrap();
    assert_eq!(workload.total_records(), 40_000);
    let mut per_hour = [0u32; 8];
    let mut per_quarter = [0u32; 32];
    let mut n = 0;
    for record in workload.records() {
        let ms = record.arrival.0 - start.0;
        per_hour[(ms / 3_600_000) as usize] += 1;
        per_quarter[(ms / 900_000) as usize] += 1;
        n += 1;
    }
    assert_eq!(n, 40_000);
    for h in per_hour {
        assert!((4_990..=5_010).contains(&h), "{per_hour:?}");
    }
    for q in per_quarter {
        assert!((1_240..=1_260).contains(&q), "{per_quarter:?}");
    }
}

fn usage_by_card(workload: &Workload) -> (Vec<u64>, u64, u64) {
    let mut per_card = vec![0u64; workload.card_count() as usize];
    let (mut total, mut n) = (0u64, 0u64);
    for record in workload.records() {
        if let Payload::Valid(u) = record.payload {
            if let Some(i) = workload.card_index(u.iccid) {
                per_card[i as usize] += u.bytes();
                total += u.bytes();
                n += 1;
            }
        }
    }
    (per_card, total, n)
}

fn top_decile_share(mut per_card: Vec<u64>) -> f64 {
    let total: u64 = per_card.iter().sum();
    per_card.sort_unstable_by(|a, b| b.cmp(a));
    let top: u64 = per_card[..per_card.len() / 10].iter().sum();
    top as f64 / total as f64
}

#[test]
fn mean_bytes_and_zipf_skew() {
    let skewed = Workload::new(WorkloadConfig {
        mean_bytes_per_record: 100_000,
        ..quiet(2_000, 50)
    })
    .unwrap();
    let (per_card, total, n) = usage_by_card(&skewed);
    let mean = total as f64 / n as f64;
    assert!((mean / 100_000.0 - 1.0).abs() < 0.05, "mean {mean}");
    let skew = top_decile_share(per_card);

    let flat = Workload::new(WorkloadConfig {
        mean_bytes_per_record: 100_000,
        zipf_max_weight: 1,
        ..quiet(2_000, 50)
    })
    .unwrap();
    let (per_card, total, n) = usage_by_card(&flat);
    let mean = total as f64 / n as f64;
    assert!((mean / 100_000.0 - 1.0).abs() < 0.05, "flat mean {mean}");
    let even = top_decile_share(per_card);
    assert!(skew > 0.45, "top 10% of cards carry {skew}");
    assert!(even < 0.2, "without skew top 10% carry {even}");

    let steeper = Workload::new(WorkloadConfig {
        zipf_exponent: 2.0,
        ..quiet(2_000, 50)
    })
    .unwrap();
    let steep = top_decile_share(usage_by_card(&steeper).0);
    assert!(steep > skew, "s=2 {steep} vs s=1.1 {skew}");
}
