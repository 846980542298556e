//! The order log: which partition the driver read from, in which order.
//!
//! Kafka orders messages within a partition, never across partitions. The
//! engine is deterministic for a given input *sequence*, so a replay after
//! a crash must interleave the partitions exactly as the first run did, or
//! a pool could cross its limit on a different record and the cut would
//! carry a different event id than the one already on the actions topic.
//!
//! The driver reads a partition in *runs* (consecutive messages of one
//! partition). Before it hands the first message of a run to the engine it
//! appends one 24-byte entry: the global sequence number of that message,
//! the source index and the message's offset. A run ends where the next
//! entry begins, so `next.seq - seq` is its length. Each entry is written
//! with one `write` call before any output the run causes can leave the
//! process, so a `kill -9` (which keeps the page cache) never loses an
//! entry whose effects were seen; the log is fsynced with each snapshot.
//! A machine crash can lose the unsynced tail: the replay of that tail may
//! then interleave differently (totals stay exact; only a pool cut may be
//! re-emitted with a different id).
//!
//! The log is split into segments named by the sequence number after the
//! snapshot that opened them; segments older than the oldest kept snapshot
//! are deleted.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

const ENTRY_LEN: usize = 24;
const KEEP_SEGMENTS: usize = 4;

/// One run's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RunStart {
    /// Global sequence number of the run's first message.
    pub(crate) seq: u64,
    /// Index of the source (topic-partition) in the driver's source table.
    pub(crate) source: u32,
    /// Offset of the run's first message in its partition.
    pub(crate) offset: i64,
}

/// A run to replay: this many messages from this source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReplayRun {
    pub(crate) source: u32,
    /// `None` for the last run: it continues up to wherever the first run
    /// stopped, which the log does not know; the replay reads that source
    /// up to its high watermark before anything else.
    pub(crate) count: Option<u64>,
}

/// An entry as stored: seq, source, offset (little-endian), CRC32 of
/// those 20 bytes.
fn encode(run: RunStart) -> [u8; ENTRY_LEN] {
    let mut buf = [0u8; ENTRY_LEN];
    buf[0..8].copy_from_slice(&run.seq.to_le_bytes());
    buf[8..12].copy_from_slice(&run.source.to_le_bytes());
    buf[12..20].copy_from_slice(&run.offset.to_le_bytes());
    let check = crc32fast::hash(&buf[..20]);
    buf[20..24].copy_from_slice(&check.to_le_bytes());
    buf
}

/// Appends run starts to the current segment.
#[derive(Debug)]
pub(crate) struct OrderLog {
    dir: PathBuf,
    file: File,
    /// [`OrderLog::append_all`]'s buffer (kept for its capacity).
    scratch: Vec<u8>,
}

impl OrderLog {
    /// Opens the log in `dir`, starting a new segment for inputs after `after_seq`.
    pub(crate) fn open(dir: &Path, after_seq: Option<u64>) -> std::io::Result<OrderLog> {
        std::fs::create_dir_all(dir)?;
        let file = Self::segment(dir, after_seq)?;
        Ok(OrderLog {
            dir: dir.to_owned(),
            file,
            scratch: Vec::new(),
        })
    }

    fn segment(dir: &Path, after_seq: Option<u64>) -> std::io::Result<File> {
        let first = after_seq.map_or(0, |s| s + 1);
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("order-{first:020}.log")))
    }

    /// Records the start of a run (one `write` call).
    pub(crate) fn append(&mut self, run: RunStart) -> std::io::Result<()> {
        self.file.write_all(&encode(run))
    }

    /// Records the starts of several runs in one `write` call (a batch's
    /// runs, before any of its messages is processed).
    pub(crate) fn append_all(&mut self, runs: &[RunStart]) -> std::io::Result<()> {
        self.scratch.clear();
        for &run in runs {
            self.scratch.extend_from_slice(&encode(run));
        }
        self.file.write_all(&self.scratch)
    }

    /// Makes the log durable and starts a new segment at the cut of a
    /// snapshot covering inputs through `seq` ([`OrderLog::prune`] once
    /// that snapshot is written). `current` is the run in progress (its
    /// source and the offset of its next message): it is restated at the
    /// head of the new segment, so a run longer than every kept segment is
    /// never lost with them.
    pub(crate) fn rotate(&mut self, seq: u64, current: Option<(u32, i64)>) -> std::io::Result<()> {
        self.file.sync_data()?;
        self.file = Self::segment(&self.dir, Some(seq))?;
        if let Some((source, offset)) = current {
            self.append(RunStart {
                seq: seq + 1,
                source,
                offset,
            })?;
        }
        Ok(())
    }

    /// Drops the segments no kept snapshot needs (call after a snapshot is
    /// written: until then the previous one may be the newest).
    pub(crate) fn prune(&self) -> std::io::Result<()> {
        let mut segments = list_segments(&self.dir)?;
        if segments.len() > KEEP_SEGMENTS {
            segments.truncate(segments.len() - KEEP_SEGMENTS);
            for (_, path) in segments {
                std::fs::remove_file(path)?;
            }
        }
        Ok(())
    }
}

fn list_segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let first = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("order-"))
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(first) = first {
            out.push((first, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Reads every entry of every segment, in sequence order. A torn last
/// entry (a crash in the middle of a write) is ignored.
pub(crate) fn read_all(dir: &Path) -> std::io::Result<Vec<RunStart>> {
    let mut runs = Vec::new();
    if !dir.exists() {
        return Ok(runs);
    }
    for (_, path) in list_segments(dir)? {
        let mut bytes = Vec::new();
        File::open(&path)?.read_to_end(&mut bytes)?;
        for chunk in bytes.chunks_exact(ENTRY_LEN) {
            let check = u32::from_le_bytes(chunk[20..24].try_into().expect("4 bytes"));
            if crc32fast::hash(&chunk[..20]) != check {
                break;
            }
            runs.push(RunStart {
                seq: u64::from_le_bytes(chunk[0..8].try_into().expect("8 bytes")),
                source: u32::from_le_bytes(chunk[8..12].try_into().expect("4 bytes")),
                offset: i64::from_le_bytes(chunk[12..20].try_into().expect("8 bytes")),
            });
        }
    }
    // Stable sort: for one sequence number the later entry wins. A run
    // restated at a rotation is superseded when the next message came from
    // another partition after all.
    runs.sort_by_key(|r| r.seq);
    let mut out: Vec<RunStart> = Vec::with_capacity(runs.len());
    for run in runs {
        match out.last_mut() {
            Some(last) if last.seq == run.seq => *last = run,
            _ => out.push(run),
        }
    }
    Ok(out)
}

/// The runs to replay after a snapshot that covers inputs through
/// `after_seq` (`None`: no snapshot, replay from the first input).
pub(crate) fn replay_plan(runs: &[RunStart], after_seq: Option<u64>) -> Vec<ReplayRun> {
    let first = after_seq.map_or(0, |s| s + 1);
    let mut plan = Vec::new();
    for (i, run) in runs.iter().enumerate() {
        let end = runs.get(i + 1).map(|next| next.seq);
        match end {
            Some(end) if end <= first => continue,
            Some(end) => plan.push(ReplayRun {
                source: run.source,
                count: Some(end - run.seq.max(first)),
            }),
            // An idle declaration or a wake is one input: as the last
            // entry, it is replayed only if the snapshot does not cover it.
            None if super::lanes::is_pseudo(run.source) && run.seq < first => {}
            None => plan.push(ReplayRun {
                source: run.source,
                count: None,
            }),
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seq: u64, source: u32) -> RunStart {
        RunStart {
            seq,
            source,
            offset: seq as i64 * 10,
        }
    }

    #[test]
    fn entries_round_trip_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = OrderLog::open(dir.path(), None).unwrap();
        log.append(run(0, 1)).unwrap();
        log.append(run(5, 2)).unwrap();
        log.rotate(6, None).unwrap();
        log.append(run(7, 1)).unwrap();
        drop(log);
        let runs = read_all(dir.path()).unwrap();
        assert_eq!(runs, vec![run(0, 1), run(5, 2), run(7, 1)]);
    }

    #[test]
    fn a_restated_run_is_superseded_by_the_run_that_really_came_next() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = OrderLog::open(dir.path(), None).unwrap();
        log.append(run(0, 0)).unwrap();
        // Snapshot through seq 4 while source 0's run was in progress...
        log.rotate(4, Some((0, 50))).unwrap();
        // ...but the next message came from source 2.
        log.append(run(5, 2)).unwrap();
        drop(log);
        assert_eq!(read_all(dir.path()).unwrap(), vec![run(0, 0), run(5, 2)]);
    }

    #[test]
    fn a_torn_entry_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = OrderLog::open(dir.path(), None).unwrap();
        log.append(run(0, 1)).unwrap();
        log.file.write_all(&[1, 2, 3]).unwrap();
        drop(log);
        assert_eq!(read_all(dir.path()).unwrap(), vec![run(0, 1)]);
    }

    #[test]
    fn the_plan_starts_inside_the_run_the_snapshot_cut() {
        let runs = [run(0, 1), run(10, 2), run(15, 1)];
        // Snapshot through seq 12: 2 more from source 2 (13, 14), then source 1 open.
        assert_eq!(
            replay_plan(&runs, Some(12)),
            vec![
                ReplayRun {
                    source: 2,
                    count: Some(2)
                },
                ReplayRun {
                    source: 1,
                    count: None
                }
            ]
        );
        // Snapshot exactly at the end of a run: that run is skipped.
        assert_eq!(
            replay_plan(&runs, Some(9)),
            vec![
                ReplayRun {
                    source: 2,
                    count: Some(5)
                },
                ReplayRun {
                    source: 1,
                    count: None
                }
            ]
        );
        assert_eq!(replay_plan(&[], Some(3)), vec![]);
        assert_eq!(replay_plan(&runs, None).len(), 3);
    }

    #[test]
    fn an_idle_declaration_is_a_run_of_one_input() {
        let idle = super::super::lanes::idle_source(3);
        let runs = [run(0, 1), run(10, idle), run(11, 2)];
        let replay = |after| replay_plan(&runs, after);
        assert_eq!(
            replay(Some(4)),
            vec![
                ReplayRun {
                    source: 1,
                    count: Some(5)
                },
                ReplayRun {
                    source: idle,
                    count: Some(1)
                },
                ReplayRun {
                    source: 2,
                    count: None
                }
            ]
        );
        assert_eq!(replay(Some(10))[0].source, 2, "covered by the snapshot");
        // The last entry: replayed once, unless the snapshot covers it.
        let runs = [run(0, 1), run(10, idle)];
        assert_eq!(
            replay_plan(&runs, Some(9)),
            vec![ReplayRun {
                source: idle,
                count: None
            }]
        );
        assert_eq!(replay_plan(&runs, Some(10)), vec![]);
    }

    #[test]
    fn old_segments_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = OrderLog::open(dir.path(), None).unwrap();
        for s in 0..10u64 {
            log.append(run(s * 10, 0)).unwrap();
            log.rotate(s * 10 + 5, Some((0, 1))).unwrap();
        }
        // Until the snapshot is written nothing goes.
        assert_eq!(list_segments(dir.path()).unwrap().len(), 11);
        log.prune().unwrap();
        assert_eq!(list_segments(dir.path()).unwrap().len(), KEEP_SEGMENTS);
        // The run in progress is restated after every rotation.
        let runs = read_all(dir.path()).unwrap();
        assert_eq!(runs.last().map(|r| r.seq), Some(96));
    }
}
