//! Snapshot files: written atomically, found again after a crash.
//!
//! A snapshot is published by writing `snapshot-<seq>.bin.tmp`, fsyncing
//! it, renaming it to `snapshot-<seq>.bin` and fsyncing the directory. A
//! reader therefore sees either the whole file or nothing; a crash leaves at
//! most a `.tmp` file, removed on the next open. The newest snapshots are
//! kept (default 3) so that a snapshot found corrupt falls back to the one
//! before it.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Errors of the snapshot store (all external: the disk).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotStoreError {
    /// A file system operation failed.
    #[error("snapshot store {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotStoreError + '_ {
    move |source| SnapshotStoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A directory of snapshot files.
#[derive(Debug)]
pub struct SnapshotStore {
    dir: PathBuf,
    keep: usize,
}

impl SnapshotStore {
    /// Opens (creating) the directory and removes leftover temporary files.
    pub fn open(dir: impl AsRef<Path>) -> Result<SnapshotStore, SnapshotStoreError> {
        let dir = dir.as_ref().to_owned();
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        for entry in fs::read_dir(&dir).map_err(io(&dir))? {
            let path = entry.map_err(io(&dir))?.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                fs::remove_file(&path).map_err(io(&path))?;
            }
        }
        Ok(SnapshotStore { dir, keep: 3 })
    }

    /// Writes a snapshot taken after input `seq`, atomically, and prunes old
    /// ones. Returns its path.
    pub fn write(&self, seq: u64, bytes: &[u8]) -> Result<PathBuf, SnapshotStoreError> {
        let path = self.dir.join(format!("snapshot-{seq:020}.bin"));
        let tmp = path.with_extension("bin.tmp");
        let mut file = File::create(&tmp).map_err(io(&tmp))?;
        file.write_all(bytes).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
        drop(file);
        fs::rename(&tmp, &path).map_err(io(&path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        let all = self.list()?;
        for (_, old) in all.iter().rev().skip(self.keep) {
            fs::remove_file(old).map_err(io(old))?;
        }
        Ok(path)
    }

    /// Snapshot files, oldest first, with the input sequence they cover.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>, SnapshotStoreError> {
        let mut found = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let path = entry.map_err(io(&self.dir))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if let Some(seq) = name
                .strip_prefix("snapshot-")
                .and_then(|r| r.strip_suffix(".bin"))
                .and_then(|n| n.parse::<u64>().ok())
            {
                found.push((seq, path));
            }
        }
        found.sort();
        Ok(found)
    }

    /// The snapshots, newest first, each read only when the iterator
    /// reaches it (callers try them in order and take the first that
    /// restores; a file that cannot be read is an error of its own, not
    /// of the store, so an older one can still be tried).
    pub fn newest_first(&self) -> Result<impl Iterator<Item = StoredSnapshot>, SnapshotStoreError> {
        Ok(self.list()?.into_iter().rev().map(|(seq, path)| {
            let bytes = fs::read(&path).map_err(io(&path));
            StoredSnapshot { seq, path, bytes }
        }))
    }
}

/// One snapshot file as read by [`SnapshotStore::newest_first`].
#[derive(Debug)]
pub struct StoredSnapshot {
    /// The input sequence it covers.
    pub seq: u64,
    /// The file.
    pub path: PathBuf,
    /// Its bytes, or why they could not be read.
    pub bytes: Result<Vec<u8>, SnapshotStoreError>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot that cannot be read (here a directory where the file
    /// should be) is reported by name; the older ones are still offered.
    #[test]
    fn an_unreadable_snapshot_is_reported_and_older_ones_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(dir.path()).unwrap();
        store.write(1, b"one").unwrap();
        let newest = store.write(2, b"two").unwrap();
        fs::remove_file(&newest).unwrap();
        fs::create_dir(&newest).unwrap();
        let found: Vec<StoredSnapshot> = store.newest_first().unwrap().collect();
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].path, newest);
        match &found[0].bytes {
            Err(SnapshotStoreError::Io { path, .. }) => assert_eq!(path, &newest),
            other => panic!("{other:?}"),
        }
        assert_eq!(found[1].bytes.as_deref().unwrap(), b"one");
    }

    #[test]
    fn writes_atomically_and_prunes() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(dir.path()).unwrap();
        for seq in [5, 10, 20, 40] {
            store.write(seq, format!("state {seq}").as_bytes()).unwrap();
        }
        std::fs::write(
            dir.path().join("snapshot-00000000000000000099.bin.tmp"),
            b"half",
        )
        .unwrap();
        let store = SnapshotStore::open(dir.path()).unwrap();
        let seqs: Vec<u64> = store.list().unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(seqs, vec![10, 20, 40]);
        let newest = store.newest_first().unwrap().next().unwrap();
        assert_eq!(newest.seq, 40);
        assert_eq!(newest.bytes.unwrap(), b"state 40");
        assert!(!dir
            .path()
            .join("snapshot-00000000000000000099.bin.tmp")
            .exists());
    }
}
