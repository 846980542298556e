//! Snapshot -> restore -> continue equals never stopping.
//!
//! Random input sequences (the generator of `model_equivalence`) are run
//! once straight through, and once with one or two stops: at each stop the
//! engine is snapshotted, dropped and restored from the bytes, then fed the
//! rest of the input. The outputs after every stop (accounted, duplicates,
//! rejections, action events with their ids, journal entries) and the final
//! state must be identical to the uninterrupted run's.
//!
//! The dedupe verifies record ids against its id store, so the restored
//! engine is given the same store the original used (shared here through an
//! `Arc`), as the pipeline does with its on-disk store.

mod model;

use std::sync::{Arc, Mutex};

use flowcap_engine::dedupe::{IdStore, IdStoreError, MemIdStore};
use flowcap_engine::record::RecordId;
use flowcap_engine::{Engine, EngineConfig, Iccid, Output, PoolId, Timestamp};
use model::gen::{concretize, setup, steps, Input, POOLS};
use proptest::prelude::*;

/// One id store shared by an engine and its restored successor.
#[derive(Clone, Default)]
struct SharedIds(Arc<Mutex<MemIdStore>>);

impl IdStore for SharedIds {
    fn contains(&mut self, iccid: Iccid, record_id: &RecordId) -> Result<bool, IdStoreError> {
        self.0.lock().unwrap().contains(iccid, record_id)
    }

    fn insert(
        &mut self,
        iccid: Iccid,
        record_id: &RecordId,
        end: Timestamp,
        seq: u64,
    ) -> Result<(), IdStoreError> {
        self.0.lock().unwrap().insert(iccid, record_id, end, seq)
    }

    fn durable_through(&mut self, seq: u64) -> Result<(), IdStoreError> {
        self.0.lock().unwrap().durable_through(seq)
    }

    fn truncate_after(&mut self, seq: u64) -> Result<(), IdStoreError> {
        self.0.lock().unwrap().truncate_after(seq)
    }
}

fn config(shards: usize) -> EngineConfig {
    EngineConfig {
        shards,
        // The model counts any reuse of an id as a duplicate, ever.
        dedupe_verify_misses: true,
        // Short enough for runs to cross a backward pool's retention end.
        pool_retention_days: 2,
        ..EngineConfig::default()
    }
}

fn feed(e: &mut Engine, inputs: &[Input], first_seq: usize) -> Vec<Output> {
    let mut out = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        let seq = (first_seq + i) as u64;
        match input {
            Input::Usage(u) => e.process_usage(u, seq, &mut out).unwrap(),
            Input::Command(c) => e.process_command(c.clone(), seq, &mut out),
        }
    }
    out
}

/// Everything a query can see.
fn state(e: &Engine) -> String {
    let pools: Vec<_> = POOLS
        .iter()
        .filter_map(|(id, ..)| e.pool_view(&PoolId::from(*id)))
        .collect();
    format!(
        "{:?}\n{:?}\n{:?}\n{:?}",
        e.clock(),
        e.last_seq(),
        e.card_views(),
        pools
    )
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn snapshot_restore_continue_equals_never_stopping(
        setup in setup(),
        steps in steps(50..300),
        stops in prop::collection::vec(any::<prop::sample::Index>(), 1..=2),
        shards in 1..=3usize,
    ) {
        let inputs = concretize(&setup, &steps);
        let mut stops: Vec<usize> = stops.iter().map(|i| i.index(inputs.len() + 1)).collect();
        stops.sort_unstable();

        // Never stopping.
        let mut reference = Engine::with_id_store(config(shards), Box::new(MemIdStore::default()));
        let mut reference_out = Vec::new();
        let mut reference_states = Vec::new();
        let mut done = 0;
        for &stop in &stops {
            reference_out.push(feed(&mut reference, &inputs[done..stop], done));
            reference_states.push(state(&reference));
            done = stop;
        }
        let reference_tail = feed(&mut reference, &inputs[done..], done);

        // Stopping, snapshotting and restoring at each stop.
        let ids = SharedIds::default();
        let mut engine = Engine::with_id_store(config(shards), Box::new(ids.clone()));
        let mut done = 0;
        for (k, &stop) in stops.iter().enumerate() {
            let out = feed(&mut engine, &inputs[done..stop], done);
            prop_assert_eq!(&out, &reference_out[k], "outputs before stop {}", k);
            let before = state(&engine);
            prop_assert_eq!(&before, &reference_states[k]);
            let bytes = engine.snapshot();
            // The copy a snapshot's cut takes encodes to the same bytes.
            let copy = engine.snapshot_copy();
            prop_assert!(copy.encode() == bytes, "copy encodes differently");
            // ... and views every card as the engine does (the cards dump).
            prop_assert_eq!(copy.card_views(), engine.card_views());
            drop(engine);
            engine = Engine::restore(&bytes, Box::new(ids.clone())).unwrap();
            prop_assert_eq!(state(&engine), before, "state right after restore {}", k);
            done = stop;
        }
        let tail = feed(&mut engine, &inputs[done..], done);
        prop_assert_eq!(tail, reference_tail, "outputs after the last stop");
        prop_assert_eq!(state(&engine), state(&reference), "final state");
    }
}
