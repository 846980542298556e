//! JSON-lines output files that can be rewound to a snapshot.
//!
//! Until the Parquet history lands, the embedded pipeline writes its outputs
//! (action events, rejects, the command journal, accounted records) as JSON
//! lines. Each snapshot records every file's byte length; on restart the
//! file is cut back to that length before the input after the snapshot is
//! replayed, so each output line exists exactly once even after `kill -9`.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

/// Errors of a JSON-lines sink (external: the disk).
#[derive(Debug, thiserror::Error)]
pub enum JsonlError {
    /// A file system operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is shorter than the snapshot says it was: it was changed
    /// outside flowcap, and replaying would lose lines.
    #[error("{path} has {actual} bytes but the snapshot covers {expected}: refusing to resume")]
    Shorter {
        /// The file.
        path: PathBuf,
        /// Length in the snapshot.
        expected: u64,
        /// Length on disk.
        actual: u64,
    },
}

/// An append-only JSON-lines file with a known byte length.
#[derive(Debug)]
pub struct JsonlSink {
    path: PathBuf,
    out: BufWriter<File>,
    len: u64,
    line: Vec<u8>,
}

impl JsonlSink {
    /// Opens `path` for appending; with `rewind_to`, first truncates it to
    /// that many bytes (the length recorded in the snapshot resumed from),
    /// otherwise truncates it to empty.
    pub fn open(path: impl AsRef<Path>, rewind_to: Option<u64>) -> Result<JsonlSink, JsonlError> {
        let path = path.as_ref().to_owned();
        let io = |source| JsonlError::Io {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let actual = file.metadata().map_err(io)?.len();
        let len = rewind_to.unwrap_or(0);
        if actual < len {
            return Err(JsonlError::Shorter {
                path,
                expected: len,
                actual,
            });
        }
        file.set_len(len).map_err(io)?;
        let mut file = file;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(len)).map_err(io)?;
        Ok(JsonlSink {
            path,
            out: BufWriter::with_capacity(1 << 16, file),
            len,
            line: Vec::with_capacity(512),
        })
    }

    /// Appends one value as a line.
    pub fn write<T: Serialize>(&mut self, value: &T) -> Result<(), JsonlError> {
        self.line.clear();
        // Serializing our own output types to JSON cannot fail (no maps with
        // non-string keys, no failing Serialize impls).
        serde_json::to_writer(&mut self.line, value).map_err(|e| JsonlError::Io {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        self.line.push(b'\n');
        self.out
            .write_all(&self.line)
            .map_err(|source| JsonlError::Io {
                path: self.path.clone(),
                source,
            })?;
        self.len += self.line.len() as u64;
        Ok(())
    }

    /// Bytes written so far (including buffered ones).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Flushes and fsyncs: everything up to [`JsonlSink::len`] is durable.
    pub fn sync(&mut self) -> Result<(), JsonlError> {
        let io = |source| JsonlError::Io {
            path: self.path.clone(),
            source,
        };
        self.out.flush().map_err(io)?;
        self.out
            .get_ref()
            .sync_data()
            .map_err(|source| JsonlError::Io {
                path: self.path.clone(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewinds_to_snapshot_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let mut sink = JsonlSink::open(&path, None).unwrap();
        sink.write(&1).unwrap();
        let mark = sink.len();
        sink.write(&2).unwrap();
        sink.sync().unwrap();
        drop(sink);
        let mut sink = JsonlSink::open(&path, Some(mark)).unwrap();
        sink.write(&3).unwrap();
        sink.sync().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1\n3\n");
        assert!(matches!(
            JsonlSink::open(&path, Some(1000)),
            Err(JsonlError::Shorter { .. })
        ));
    }
}
