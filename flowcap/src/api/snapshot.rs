//! `flowcap serve`'s API: the state of the newest snapshot in a data
//! directory, read-only. The directory may belong to a running pipeline,
//! so nothing in it is written or removed: the snapshot files are read
//! directly (not through the store, which clears leftover temporary
//! files), newest first, and the first that restores is served until the
//! server stops. Answers name the snapshot's input position; commands are
//! refused (409).

use std::path::Path;

use anyhow::{bail, Context, Result};
use flowcap_engine::{Engine, MemIdStore};
use flowcap_ingest::requests::{Position, Requests};

/// Where the pipeline keeps its snapshots in a data directory.
const SNAPSHOTS: &str = "snapshots";

/// The engine of the newest snapshot under `data` that restores, and its
/// input sequence number.
pub(crate) fn newest(data: &Path) -> Result<Option<(Engine, u64)>> {
    let dir = data.join(SNAPSHOTS);
    if !dir.is_dir() {
        return Ok(None);
    }
    let mut found: Vec<(u64, std::path::PathBuf)> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| {
            let path = e.ok()?.path();
            let name = path.file_name()?.to_str()?;
            let seq = name
                .strip_prefix("snapshot-")?
                .strip_suffix(".bin")?
                .parse()
                .ok()?;
            Some((seq, path))
        })
        .collect();
    found.sort_unstable_by_key(|f| std::cmp::Reverse(f.0));
    let mut failures = Vec::new();
    for (seq, path) in found {
        let restored = std::fs::read(&path)
            .map_err(anyhow::Error::from)
            .and_then(|bytes| Ok(Engine::restore(&bytes, Box::new(MemIdStore::new()))?));
        match restored {
            Ok(engine) => return Ok(Some((engine, seq))),
            Err(e) => failures.push(format!("{}: {e}", path.display())),
        }
    }
    if failures.is_empty() {
        return Ok(None);
    }
    bail!("no snapshot restores: {}", failures.join("; "))
}

/// Answers `requests` from `engine` on a thread of its own until the
/// server (every sender) is gone.
pub(crate) fn serve(
    engine: Engine,
    seq: u64,
    requests: Requests,
) -> Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("flowcap-api-snapshot".into())
        .spawn(move || {
            requests.serve_read_only(
                &engine,
                Position { seq: Some(seq) },
                "flowcap serve answers from a snapshot, read-only: send commands to the \
                 running pipeline",
            );
        })
        .context("starting the snapshot API thread")
}
