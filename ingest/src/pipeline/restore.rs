//! Where a pipeline starts: the newest usable snapshot of its directory,
//! or nothing. Kept apart from the run because the decision must be made,
//! and the directory left untouched, before anything is written: a driver
//! reads the restored positions before it commits to running.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use flowcap_engine::{DedupeError, Engine, EngineError};
use flowcap_storage::{DiskIdStore, SnapshotStore, SnapshotStoreError};

use super::IngestError;

pub(super) fn prepare_dir(dir: &Path) -> Result<(), IngestError> {
    std::fs::create_dir_all(dir).map_err(|source| IngestError::Directory {
        path: dir.to_owned(),
        source,
    })
}

/// The snapshot directory inside the data directory.
pub(super) const SNAPSHOTS_DIR: &str = "snapshots";

pub(super) fn clear_dir(dir: &Path) -> Result<(), IngestError> {
    for name in [SNAPSHOTS_DIR, "dedupe"] {
        let path = dir.join(name);
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .map_err(|source| IngestError::Directory { path, source })?;
        }
    }
    Ok(())
}

/// Why one snapshot file could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum Unusable {
    /// The bytes are damaged or of another format version.
    #[error("{0}")]
    Snapshot(#[from] flowcap_engine::snapshot::SnapshotError),
    /// The file could not be read (external: disk).
    #[error("I/O error reading it: {0}")]
    Read(std::io::Error),
    /// The dedupe id store could not be brought back to the snapshot
    /// (external: disk).
    #[error("I/O error in the dedupe id store while restoring it: {0}")]
    Dedupe(#[from] flowcap_engine::IdStoreError),
}

/// One snapshot that was tried and not used.
#[derive(Debug)]
pub struct SnapshotFailure {
    /// The file.
    pub path: PathBuf,
    /// Why.
    pub why: Unusable,
}

/// The message of [`IngestError::NoUsableSnapshot`]: one line a file.
pub(super) fn no_usable_snapshot(dir: &Path, failures: &[SnapshotFailure]) -> String {
    let mut text = format!(
        "{} holds outputs but no usable snapshot to resume them from; refusing to start \
         (nothing was changed). The snapshots:",
        dir.display()
    );
    for f in failures {
        let name = f.path.file_name().map_or_else(
            || f.path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        text.push_str(&format!("\n  {name}: {}", f.why));
    }
    text.push_str(
        "\nTo go on: run the flowcap build that wrote them (an upgrade never reads an older \
         snapshot format: finish with the old build, then upgrade), or start over on purpose \
         with `flowcap run --fresh`, which clears the outputs and the history (in Kafka mode \
         the inputs are then read again from the oldest offsets the topics keep).",
    );
    text
}

/// What a pipeline does with the state its directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Start {
    /// Go on from the newest usable snapshot (none: start empty); refuse
    /// to start when snapshots are there and none restores.
    #[default]
    Resume,
    /// Start over (`--fresh`): clear the state, the outputs and the
    /// history (in Kafka mode, read every input again from the oldest
    /// offset the broker keeps).
    Fresh,
}

/// The directory's state before the pipeline starts: the engine restored
/// from the newest usable snapshot, or none.
///
/// Starting over deletes outputs, so it happens only when nothing
/// committed is there to lose or when asked for: with [`Start::Resume`] and at
/// least one snapshot file, some snapshot must restore, else loading
/// fails with [`IngestError::NoUsableSnapshot`] before anything is
/// touched. With no snapshot file at all, whatever the directory holds was
/// written by a first run that never committed a snapshot (a crash):
/// it is written again from the start, as any crash rewinds to its
/// snapshot. With [`Start::Fresh`] everything is cleared.
pub(crate) struct Restored {
    pub(super) dir: PathBuf,
    pub(super) start: Start,
    pub(super) engine: Option<Engine>,
    pub(super) started: Instant,
}

impl Restored {
    /// Finds and restores the newest usable snapshot of `dir` (with
    /// [`Start::Resume`]); an unusable one is skipped for the one before it (they
    /// are kept for that), and if none restores the start is refused.
    pub(crate) fn load(dir: &Path, start: Start) -> Result<Restored, IngestError> {
        let started = Instant::now();
        prepare_dir(dir)?;
        let snapshots_dir = dir.join(SNAPSHOTS_DIR);
        let mut engine = None;
        if start == Start::Resume && snapshots_dir.exists() {
            let store = SnapshotStore::open(&snapshots_dir)?;
            let mut failures = Vec::new();
            for stored in store.newest_first()? {
                let outcome = match stored.bytes {
                    Err(SnapshotStoreError::Io { source, .. }) => Err(Unusable::Read(source)),
                    Ok(bytes) => DiskIdStore::open(dir.join("dedupe"))
                        .map_err(Unusable::Dedupe)
                        .and_then(|ids| {
                            Engine::restore(&bytes, Box::new(ids)).map_err(|e| match e {
                                EngineError::Snapshot(e) => Unusable::Snapshot(e),
                                EngineError::Dedupe(DedupeError::Store(e)) => Unusable::Dedupe(e),
                            })
                        }),
                };
                match outcome {
                    Ok(restored) => {
                        tracing::info!(seq = stored.seq, "resuming from snapshot");
                        engine = Some(restored);
                        break;
                    }
                    Err(why) => {
                        tracing::warn!(
                            snapshot = %stored.path.display(),
                            error = %why,
                            "snapshot unusable, trying an older one"
                        );
                        failures.push(SnapshotFailure {
                            path: stored.path,
                            why,
                        });
                    }
                }
            }
            if engine.is_none() && !failures.is_empty() {
                failures.reverse(); // oldest first, as listed on disk
                return Err(IngestError::NoUsableSnapshot {
                    dir: dir.to_owned(),
                    failures,
                });
            }
        }
        Ok(Restored {
            dir: dir.to_owned(),
            start,
            engine,
            started,
        })
    }

    /// The positions the restored snapshot recorded (none when starting
    /// empty).
    pub(crate) fn positions(&self) -> Option<&BTreeMap<String, i64>> {
        self.engine.as_ref().map(Engine::positions)
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::embedded::{run, EmbeddedOptions, Input};
    use crate::pipeline::{Summary, INPUT_POSITION};
    use flowcap_testkit::files::tree;

    /// A card set up and 11 records for it, a snapshot every 3 inputs.
    fn small_run(options: &EmbeddedOptions) -> Result<(Summary, Engine), IngestError> {
        let iccid = "89860312345678901234";
        let mut inputs = vec![
            Input::Command(br#"{"id":"c1","type":"upsert_plan","at":"2026-11-01T00:00:00+08:00","plan":{"id":"ct-30","carrier":"ctcc","allowance_mb":30,"traffic":"directed"}}"#.to_vec()),
            Input::Command(format!(r#"{{"id":"c2","type":"upsert_card","at":"2026-11-01T00:00:00+08:00","card":{{"iccid":"{iccid}","carrier":"ctcc","plan":"ct-30","state":"active"}}}}"#).into_bytes()),
        ];
        for i in 0..11 {
            inputs.push(Input::Record(format!(
                r#"{{"record_id":"r{i}","iccid":"{iccid}","end":"2026-11-01T0{}:00:00+08:00","bytes_up":1000,"bytes_down":0}}"#,
                i % 9 + 1
            ).into_bytes()));
        }
        run(options, inputs, &mut |_| {})
    }

    fn small_options(dir: &Path) -> EmbeddedOptions {
        EmbeddedOptions {
            snapshot_every: 3,
            notify: None,
            ..EmbeddedOptions::new(dir)
        }
    }

    /// With snapshots present and none usable (one corrupt, one of an
    /// older format version, one unreadable), the start is refused with
    /// each named and why, and no file under the directory changes; only
    /// starting over on purpose ([`Start::Fresh`]) clears it.
    #[test]
    fn no_usable_snapshot_refuses_to_start_and_changes_nothing() {
        use flowcap_engine::snapshot::SnapshotError;
        let dir = tempfile::tempdir().unwrap();
        let options = small_options(dir.path());
        small_run(&options).unwrap();
        let store = SnapshotStore::open(dir.path().join(SNAPSHOTS_DIR)).unwrap();
        let files: Vec<PathBuf> = store.list().unwrap().into_iter().map(|(_, p)| p).collect();
        assert_eq!(files.len(), 3, "{files:?}");
        let mut bytes = std::fs::read(&files[0]).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&files[0], bytes).unwrap();
        let mut bytes = std::fs::read(&files[1]).unwrap();
        bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
        std::fs::write(&files[1], bytes).unwrap();
        std::fs::remove_file(&files[2]).unwrap();
        std::fs::create_dir(&files[2]).unwrap();
        let before = tree(dir.path());

        let err = small_run(&options).map(|_| ()).unwrap_err();
        let IngestError::NoUsableSnapshot { failures, .. } = &err else {
            panic!("{err}");
        };
        let paths: Vec<&PathBuf> = failures.iter().map(|f| &f.path).collect();
        assert_eq!(paths, files.iter().collect::<Vec<_>>());
        assert!(matches!(
            failures[0].why,
            Unusable::Snapshot(SnapshotError::Checksum)
        ));
        assert!(matches!(
            failures[1].why,
            Unusable::Snapshot(SnapshotError::Version {
                found: 1,
                readable: flowcap_engine::snapshot::SNAPSHOT_VERSION
            })
        ));
        assert!(matches!(failures[2].why, Unusable::Read(_)));
        let text = err.to_string();
        assert!(text.contains("--fresh"), "{text}");
        assert!(before == tree(dir.path()), "a file changed");

        let fresh = EmbeddedOptions {
            start: Start::Fresh,
            ..small_options(dir.path())
        };
        std::fs::remove_dir(&files[2]).unwrap();
        let (summary, _) = small_run(&fresh).unwrap();
        assert_eq!(summary.counted, 11);
    }

    /// A snapshot that fails is skipped for an older one (kept for that).
    #[test]
    fn a_corrupt_newest_snapshot_falls_back_to_the_one_before() {
        let dir = tempfile::tempdir().unwrap();
        let options = small_options(dir.path());
        small_run(&options).unwrap();
        let store = SnapshotStore::open(dir.path().join(SNAPSHOTS_DIR)).unwrap();
        let (newest_seq, newest) = store.list().unwrap().pop().unwrap();
        std::fs::write(&newest, b"FLOWCAPS").unwrap();
        let restored = Restored::load(dir.path(), Start::Resume).unwrap();
        let engine = restored.engine.unwrap();
        let seq = engine.positions()[INPUT_POSITION];
        assert!(u64::try_from(seq).unwrap() < newest_seq);
    }
}
