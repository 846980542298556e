//! A snapshot in two phases (see [`super`]): the *cut* holds the inputs
//! back only while the outputs so far are measured and the engine's state
//! is copied; the *commit* writes the snapshot once everything before the
//! cut is durable, while inputs flow again. Both sides are here: the
//! driver's ([`Pipeline::begin_snapshot`]) and the writer's
//! ([`Writer::begin_commit`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Sender};
use flowcap_engine::snapshot::SnapshotCopy;
use flowcap_engine::PoolView;
use flowcap_engine::{Durability, Timestamp};
use flowcap_storage::history::{CardsDump, StoredTicket};

use crate::metrics;
use crate::requests::DurableEvents;

use super::writer::{WriteError, Writer};
use super::{ms, Control, IngestError, Pipeline, Side, Wait, EVENTS_FILE, INPUT_POSITION};

/// A snapshot waiting for the outputs before its cut to be durable.
pub(crate) struct Commit {
    seq: u64,
    /// The engine's state at the cut, encoded and written by the
    /// snapshot's own thread (the inputs waited only for the copy); shared
    /// with the thread building the cards dump from it.
    state: Arc<SnapshotCopy>,
    /// The dedupe ids through `seq`, written by the id store's own thread.
    dedupe: Durability,
    /// When the cut began (the snapshot's duration is measured from it).
    started: Instant,
    /// Told once the snapshot is written (or why it could not be).
    done: Sender<Result<(), WriteError>>,
}

/// The writer's side of a commit: what it waits for besides the cut's
/// mark, and the word that lets the snapshot's thread write it.
pub(super) struct InFlight {
    pub(super) dedupe: Durability,
    pub(super) go: Sender<()>,
}

/// What a cut closed and its commit waits for.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct CutMark {
    pub(super) history: Option<StoredTicket>,
    pub(super) epoch: Option<u64>,
}

/// What the history needs at a snapshot: the inputs it covers and the
/// engine's state to dump.
pub(crate) struct HistoryCut {
    through: u64,
    clock: Timestamp,
    pools: Vec<PoolView>,
    cards: Option<CardsDump>,
    /// The oldest snapshot kept covers inputs through this: windows up to
    /// it may be compacted.
    compact_through: Option<u64>,
}

impl Writer {
    /// The cut of a snapshot through input `seq` (see the module docs): the
    /// output lengths (and where the side topics are read back from, in
    /// Kafka mode) now; durability comes with the commit.
    pub(super) fn cut(
        &mut self,
        seq: u64,
        cut: Option<Box<HistoryCut>>,
    ) -> Result<BTreeMap<String, u64>, WriteError> {
        self.take_outcomes()?;
        if let Some(n) = &self.notifier {
            // The outbox keeps what the oldest snapshot kept can replay.
            let oldest = self.store.list()?.first().map(|(seq, _)| *seq);
            n.mark(seq, oldest, &self.reported);
        }
        let mut mark = CutMark::default();
        if let (Some(h), Some(cut)) = (&mut self.history, cut) {
            let HistoryCut {
                through,
                clock,
                pools,
                cards,
                compact_through,
            } = *cut;
            mark.history = Some(h.cut(through, clock, pools, cards, compact_through)?);
            if let Some(stats) = h.compaction_stats() {
                metrics::history_compaction(&stats);
            }
        }
        let mut lengths = self.lengths();
        if let Some(k) = &mut self.kafka {
            mark.epoch = Some(k.producer.close_epoch());
            lengths.extend(k.producer.cut_marks(seq));
        }
        self.last_cut = Some(mark);
        Ok(lengths)
    }

    /// Starts waiting to write `commit` (for the last cut): its own
    /// thread encodes the state meanwhile and writes the snapshot once
    /// told, so neither holds up the outputs (encoding took 0.3-0.5 s at
    /// 100k cards, BENCHMARKS §8, and takes seconds at 10M; the write
    /// fsyncs it).
    pub(super) fn begin_commit(&mut self, commit: Commit) -> Result<(), WriteError> {
        let mark = self.last_cut.take().unwrap_or_default();
        let Commit {
            seq,
            state,
            dedupe,
            started,
            done,
        } = commit;
        let (go, go_rx) = bounded::<()>(1);
        let store = Arc::clone(&self.store);
        flowcap_storage::background::spawn("flowcap-snapshot", move || {
            let encoding = Instant::now();
            let bytes = state.encode();
            drop(state);
            let encoded = encoding.elapsed();
            if go_rx.recv().is_err() {
                let _ = done.send(Err(WriteError::Stopped));
                return;
            }
            let writing = Instant::now();
            let result = store
                .write(seq, &bytes)
                .map(|_| ())
                .map_err(WriteError::from);
            tracing::debug!(
                seq,
                bytes = bytes.len(),
                encode_ms = ms(encoded),
                write_ms = ms(writing.elapsed()),
                "snapshot written"
            );
            if result.is_ok() {
                metrics::snapshot_written(started.elapsed());
            }
            let _ = done.send(result);
        })
        .map_err(WriteError::Thread)?;
        self.commit = Some((mark, InFlight { dedupe, go }));
        Ok(())
    }

    /// Lets the snapshot in flight be written once everything before its
    /// cut is durable (with [`Wait::Block`], waits for that). True when
    /// none is left.
    pub(super) fn advance_commit(&mut self, wait: Wait) -> Result<bool, WriteError> {
        let Some((mark, _)) = &self.commit else {
            return Ok(true);
        };
        let mark = *mark;
        match self.try_commit(mark, wait) {
            Ok(false) => Ok(false),
            Ok(true) => {
                if let Some((_, in_flight)) = self.commit.take() {
                    // The snapshot's thread writes it and tells the driver.
                    let _ = in_flight.go.send(());
                }
                Ok(true)
            }
            Err(e) => {
                // Dropping `go` tells the snapshot's thread to give up.
                self.commit = None;
                Err(e)
            }
        }
    }

    /// Whether everything before the cut of the commit in flight is
    /// durable (with [`Wait::Block`], waits for it): the sealed dedupe
    /// ids, the window's history files, the broker's acknowledgements;
    /// then the output files and the notification outbox are fsynced.
    fn try_commit(&mut self, mark: CutMark, wait: Wait) -> Result<bool, WriteError> {
        let wait = wait == Wait::Block;
        if let Some((_, in_flight)) = &self.commit {
            if wait {
                in_flight.dedupe.wait()?;
            } else if !in_flight.dedupe.poll()? {
                return Ok(false);
            }
        }
        if let (Some(h), Some(ticket)) = (&mut self.history, mark.history) {
            if wait {
                h.wait_stored(ticket)?;
            } else if !h.is_stored(ticket)? {
                return Ok(false);
            }
        }
        if let (Some(k), Some(epoch)) = (&mut self.kafka, mark.epoch) {
            if wait {
                let give_up = &k.give_up;
                k.producer
                    .settle(&|| give_up.load(std::sync::atomic::Ordering::Relaxed))?;
            } else if !k.producer.settled_through(epoch)? {
                return Ok(false);
            }
        }
        // Every file at least as long as the cut reported (appends since
        // are made durable too: harmless, a restart cuts them off).
        for sink in self.sinks.values_mut() {
            sink.sync()?;
        }
        if let Some(n) = &self.notifier {
            n.sync()?;
        }
        Ok(true)
    }
}

impl Pipeline {
    /// Takes a snapshot covering inputs through `last_seq` and waits until
    /// it is durable (see [`Pipeline::begin_snapshot`]). Returns the wall
    /// time it took.
    pub(crate) fn snapshot(
        &mut self,
        last_seq: Option<u64>,
        positions: &BTreeMap<String, i64>,
    ) -> Result<Duration, IngestError> {
        let started = Instant::now();
        self.begin_snapshot(last_seq, positions)?;
        self.wait_snapshot()?;
        Ok(started.elapsed())
    }

    /// The cut of a snapshot covering inputs through `last_seq` (see the
    /// module docs): every shard home, every output so far handed to the
    /// writer and its length recorded, then the engine with `positions`
    /// and those lengths encoded and handed to the writer, which writes it
    /// once everything before the cut is durable. Waits for the previous
    /// snapshot's commit first. Returns how long inputs were held.
    pub(crate) fn begin_snapshot(
        &mut self,
        last_seq: Option<u64>,
        positions: &BTreeMap<String, i64>,
    ) -> Result<Duration, IngestError> {
        // Letters of the inputs before the cut go before it.
        self.flush_side()?;
        let Some(seq) = last_seq else {
            return Ok(Duration::ZERO);
        };
        // The inputs are held from here: waiting for the previous commit
        // (when snapshots come faster than the writer commits them) is part
        // of the pause.
        let waiting = Instant::now();
        self.wait_snapshot()?;
        let started = Instant::now();
        let waited = started - waiting;
        // Whichever snapshot a restart falls back to keeps every history
        // file up to the oldest one kept: those may be merged.
        let compact_through = if self.history {
            self.store.list()?.first().map(|(seq, _)| *seq)
        } else {
            None
        };
        let engine = self.sharded.engine();
        let recalled = started.elapsed();
        // The cards dump (once per event day) is built from the state's
        // copy on a thread of its own: built here, it held the inputs
        // ~0.6 µs a card (80 ms at 100k cards, seconds at 10M).
        let mut views_to = None;
        let cut = self.history.then(|| {
            let clock = engine.clock();
            let day = engine.config().calendar.local_day(clock);
            let cards = (self.dump_cards || self.cards_day != Some(day)).then(|| {
                self.cards_day = Some(day);
                let (views, dump) = CardsDump::later(engine.attribute_names().to_vec());
                views_to = Some(views);
                dump
            });
            Box::new(HistoryCut {
                through: seq,
                clock,
                pools: engine.pool_views(),
                cards,
                compact_through,
            })
        });
        let viewed = started.elapsed();
        let (reply_tx, reply_rx) = bounded(1);
        self.side
            .send(Side::Control(Control::Cut(reply_tx, seq, cut)))
            .map_err(|_| IngestError::WriterGone("writer is gone"))?;
        let lengths = reply_rx
            .recv()
            .map_err(|_| IngestError::WriterGone("writer did not answer the snapshot cut"))??;
        self.committing_events = lengths.get(&format!("out.{EVENTS_FILE}")).copied();
        for (name, len) in lengths {
            engine.set_position(name, i64::try_from(len).unwrap_or(i64::MAX));
        }
        for (name, position) in positions {
            engine.set_position(name.clone(), *position);
        }
        engine.set_position(INPUT_POSITION, i64::try_from(seq).unwrap_or(i64::MAX));
        let writer_done = started.elapsed();
        let (state, dedupe) = engine.snapshot_durable_later()?;
        let state = Arc::new(state);
        if let Some(views_to) = views_to {
            let copy = Arc::clone(&state);
            // At normal priority, as when the inputs waited for it: the
            // history's encoder waits for these views and the writer for
            // the encoder (at nice 10, a 2M-record backlog ran ~8 % slower,
            // BENCHMARKS §8). A failed spawn drops the sender: the dump,
            // and so this snapshot's commit, fails.
            let spawned = std::thread::Builder::new()
                .name("flowcap-cards".into())
                .spawn(move || {
                    let building = Instant::now();
                    let views = copy.card_views();
                    tracing::debug!(
                        seq,
                        cards = views.len(),
                        build_ms = ms(building.elapsed()),
                        since_cut_ms = ms(started.elapsed()),
                        "cards dump built"
                    );
                    let _ = views_to.send(views);
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "could not start the cards dump's thread");
            }
        }
        let (done, done_rx) = bounded(1);
        self.side
            .send(Side::Control(Control::Commit(Commit {
                seq,
                state,
                dedupe,
                started,
                done,
            })))
            .map_err(|_| IngestError::WriterGone("writer is gone"))?;
        self.committing = Some((seq, done_rx));
        let held = waiting.elapsed();
        tracing::debug!(
            seq,
            wait_ms = ms(waited),
            recall_ms = ms(recalled),
            views_ms = ms(viewed - recalled),
            writer_ms = ms(writer_done - viewed),
            copy_ms = ms(held - waited - writer_done),
            "snapshot cut"
        );
        metrics::snapshot_paused(held);
        Ok(held)
    }

    /// True while a snapshot is being committed; never waits.
    pub(crate) fn snapshot_pending(&mut self) -> Result<bool, IngestError> {
        let Some((_, done)) = &self.committing else {
            return Ok(false);
        };
        match done.try_recv() {
            Ok(result) => {
                self.finish_commit(result)?;
                Ok(false)
            }
            Err(crossbeam_channel::TryRecvError::Empty) => Ok(true),
            Err(crossbeam_channel::TryRecvError::Disconnected) => Err(IngestError::WriterGone(
                "writer stopped before writing the snapshot",
            )),
        }
    }

    /// Waits until the snapshot being committed (if any) is written.
    pub(crate) fn wait_snapshot(&mut self) -> Result<(), IngestError> {
        let Some((_, done)) = &self.committing else {
            return Ok(());
        };
        let result = done
            .recv()
            .map_err(|_| IngestError::WriterGone("writer stopped before writing the snapshot"))?;
        self.finish_commit(result)
    }

    fn finish_commit(&mut self, result: Result<(), WriteError>) -> Result<(), IngestError> {
        let seq = self.committing.take().map(|(seq, _)| seq);
        let events = self.committing_events.take();
        result?;
        if let (Some(mark), Some(seq), Some(bytes)) = (&self.durable, seq, events) {
            mark.set(DurableEvents { bytes, seq });
        }
        self.snapshots += 1;
        tracing::debug!(seq, "snapshot committed");
        Ok(())
    }
}

#[cfg(test)]
mod tests {

    use flowcap_engine::dedupe::DurabilitySettler;

    use crossbeam_channel::Receiver;
    use flowcap_engine::{Engine, EngineConfig};
    use flowcap_storage::SnapshotStore;

    use super::*;
    use crate::metrics::OutputMetrics;
    use crate::pipeline::Summary;

    /// A writer with no outputs, history, broker or notifier (only a
    /// snapshot store in a temporary directory), committing an empty
    /// engine's state at `seq` whose dedupe ids are durable once the
    /// returned settler says so; and the commit's `done` channel.
    fn pending_commit(
        seq: u64,
    ) -> (
        tempfile::TempDir,
        Writer,
        DurabilitySettler,
        Receiver<Result<(), WriteError>>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = Writer {
            sinks: BTreeMap::new(),
            history: None,
            summary: Summary::default(),
            kafka: None,
            metrics: OutputMetrics::new(),
            notifier: None,
            reported: BTreeMap::new(),
            store: Arc::new(SnapshotStore::open(dir.path()).unwrap()),
            last_cut: None,
            commit: None,
            clock: flowcap_clock::SystemClock::shared(),
        };
        let (dedupe, settler) = Durability::pending();
        let (state, _) = Engine::new(EngineConfig::default())
            .snapshot_durable_later()
            .unwrap();
        let (done, done_rx) = bounded(1);
        writer
            .begin_commit(Commit {
                seq,
                state: Arc::new(state),
                dedupe,
                started: Instant::now(),
                done,
            })
            .unwrap();
        (dir, writer, settler, done_rx)
    }

    /// The snapshot of a cut is written only once the dedupe ids before
    /// the cut are durable: a snapshot published before them would, after
    /// a crash, skip inputs whose ids the id store never stored, so a
    /// resend of them would count twice.
    #[test]
    fn a_commit_waits_for_the_dedupe_ids_of_its_cut() {
        let (_dir, mut writer, settler, done) = pending_commit(5);
        for _ in 0..3 {
            assert!(!writer.advance_commit(Wait::Poll).unwrap());
            std::thread::sleep(Duration::from_millis(30));
        }
        assert!(
            done.try_recv().is_err(),
            "written before the ids were durable"
        );
        assert!(writer.store.list().unwrap().is_empty());

        settler.settle(Ok(()));
        assert!(writer.advance_commit(Wait::Poll).unwrap());
        done.recv_timeout(Duration::from_secs(30)).unwrap().unwrap();
        let written: Vec<u64> = writer
            .store
            .list()
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(written, [5]);
    }

    /// Ids that could not be made durable fail the commit: no snapshot.
    /// The writer gets the cause, the driver waiting for the snapshot
    /// learns that it was not written, each as a typed error.
    #[test]
    fn a_commit_whose_dedupe_ids_failed_writes_no_snapshot() {
        let (_dir, mut writer, settler, done) = pending_commit(9);
        settler.settle(Err(Arc::new(flowcap_engine::IdStoreError::Corrupt(
            "disk full".into(),
        ))));
        let err = writer.advance_commit(Wait::Block).unwrap_err();
        assert!(matches!(err, WriteError::Dedupe(_)), "{err:?}");
        let answer = done.recv_timeout(Duration::from_secs(30)).unwrap();
        assert!(matches!(answer, Err(WriteError::Stopped)), "{answer:?}");
        assert!(writer.store.list().unwrap().is_empty());
    }
}
