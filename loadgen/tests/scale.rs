//! A million records for 100,000 cards stream quickly and in order.

use flowcap_loadgen::{Workload, WorkloadConfig};

#[test]
fn one_million_records_for_100k_cards() {
    let workload = Workload::new(WorkloadConfig {
        cards: 100_000,
        duration_hours: 10,
        ..WorkloadConfig::default()
    })
    .unwrap();
    assert_eq!(workload.total_records(), 1_000_000);
    assert!(workload.setup_commands().count() as u64 > workload.card_count());
    let mut line = String::with_capacity(512);
    let mut bytes = 0usize;
    let mut n = 0u64;
    let mut last = workload.config().start;
    for record in workload.records() {
        assert!(record.arrival >= last);
        last = record.arrival;
        line.clear();
        record.to_json_line(&mut line);
        bytes += line.len();
        n += 1;
    }
    assert_eq!(n, 1_000_000);
    assert!(bytes > 200 * 1_000_000);
}
