//! Same seed, same bytes; different seed, different bytes.

mod common;

use common::{all_lines, quiet, setup_lines};
use flowcap_loadgen::{Workload, WorkloadConfig};

fn config(seed: u64) -> WorkloadConfig {
    WorkloadConfig {
        seed,
        cards: 2_000,
        duration_hours: 10,
        duplicate_pct: 5.0,
        malformed_pct: 5.0,
        unknown_card_pct: 5.0,
        late_pct: 5.0,
        out_of_order_pct: 5.0,
        ..WorkloadConfig::default()
    }
}

#[test]
fn same_seed_gives_identical_output() {
    let a = Workload::new(config(42)).unwrap();
    let b = Workload::new(config(42)).unwrap();
    assert_eq!(setup_lines(&a), setup_lines(&b));
    assert_eq!(all_lines(&a), all_lines(&b));
    let (ea, eb) = (a.expected(), b.expected());
    assert_eq!(ea.counts(), eb.counts());
    assert_eq!(
        ea.entries().collect::<Vec<_>>(),
        eb.entries().collect::<Vec<_>>()
    );
}

#[test]
fn output_does_not_depend_on_how_it_is_consumed() {
    let w = Workload::new(config(7)).unwrap();
    let whole = all_lines(&w);
    // Interleave two iterators and an expected() run; take in pieces.
    let mut first = w.records();
    let mut second = w.records();
    let mut pieces = String::new();
    let mut other = String::new();
    for record in first.by_ref().take(1_000) {
        record.to_json_line(&mut pieces);
        pieces.push('\n');
    }
    let expected = w.expected();
    for record in second.by_ref().take(5_000) {
        record.to_json_line(&mut other);
        other.push('\n');
    }
    for record in first {
        record.to_json_line(&mut pieces);
        pieces.push('\n');
    }
    assert_eq!(pieces, whole);
    assert!(whole.starts_with(&other));
    assert_eq!(expected.counts(), w.expected().counts());
    assert_eq!(setup_lines(&w), setup_lines(&w));
}

#[test]
fn different_seed_gives_different_output() {
    let a = Workload::new(config(1)).unwrap();
    let b = Workload::new(config(2)).unwrap();
    assert_ne!(setup_lines(&a), setup_lines(&b));
    assert_ne!(all_lines(&a), all_lines(&b));
    let qa = Workload::new(WorkloadConfig {
        seed: 3,
        ..quiet(1_000, 2)
    })
    .unwrap();
    let qb = Workload::new(WorkloadConfig {
        seed: 4,
        ..quiet(1_000, 2)
    })
    .unwrap();
    assert_ne!(all_lines(&qa), all_lines(&qb));
}

#[test]
fn binary_messages_decode_to_the_records_and_malformed_ones_stay_raw() {
    use flowcap_engine::decode::{decode_binary, DecodeLimits};
    use flowcap_loadgen::Payload;
    let w = Workload::new(config(9)).unwrap();
    let (mut valid, mut malformed) = (0, 0);
    for record in w.records() {
        let mut message = Vec::new();
        record.to_binary(&mut message);
        let mut line = String::new();
        record.to_json_line(&mut line);
        match &record.payload {
            Payload::Valid(u) => {
                assert_eq!(
                    decode_binary(&message, &DecodeLimits::default()).as_ref(),
                    Ok(u)
                );
                valid += 1;
            }
            Payload::Malformed { .. } => {
                assert_eq!(message, line.into_bytes(), "raw bytes in either encoding");
                malformed += 1;
            }
        }
    }
    assert!(
        valid > 0 && malformed > 0,
        "{valid} valid, {malformed} malformed"
    );
}
