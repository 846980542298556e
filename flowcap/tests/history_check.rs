//! The history check (`flowcap_testkit::history_check`, the benchmark report's)
//! on a real run: an exact run passes with cuts and no overshoot, and the
//! same history checked against another workload's expectation fails.

use flowcap_loadgen::{Workload, WorkloadConfig};

mod common;

fn workload(seed: u64) -> Workload {
    Workload::new(WorkloadConfig {
        seed,
        cards: 1_000,
        duration_hours: 80,
        ..WorkloadConfig::default()
    })
    .unwrap()
}

#[test]
fn an_exact_run_passes_and_a_wrong_expectation_fails() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let summary =
        common::run_generator(&out, &["--cards", "1000", "--hours", "80", "--seed", "11"]);
    assert_eq!(summary["exactness"]["mismatched"], 0, "{summary}");
    let history = out.join("history");

    let check =
        flowcap_testkit::history_check::check_history(&history, &workload(11).expected()).unwrap();
    assert_eq!(check.mismatched, 0, "{check:?}");
    assert!(check.cards_cycles_checked >= 1_000, "{check:?}");
    // The default workload cuts cards for their plan, threshold and the
    // general cap: the overshoot query has cuts to look at.
    assert!(check.cuts > 10, "{check:?}");
    assert_eq!(check.cuts_without_cause, 0, "{check:?}");
    assert_eq!(check.overshoot_records, 0, "{check:?}");
    assert!(check.max_overshoot_bytes > 0, "{check:?}");

    let wrong =
        flowcap_testkit::history_check::check_history(&history, &workload(12).expected()).unwrap();
    assert!(wrong.mismatched > 100, "{wrong:?}");
    assert!(wrong.first_mismatch.is_some());
}
