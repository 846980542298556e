//! JSON-lines files as pipeline input, known by identity.
//!
//! Usage records come from one file, commands from another. They are merged
//! into one deterministic sequence: before each record, every command whose
//! `at` is not after the record's `end` is applied (commands in `at` order,
//! file order among equal times); the rest follow the last record. A
//! command whose `at` cannot be read is applied first (it is journaled as
//! malformed there).
//!
//! A data directory remembers every file it read by identity: its
//! (canonical) path, how many bytes of it were read and an xxh3 hash of
//! those bytes, recorded in the snapshot's positions with the sequence
//! number the run over them started at. The next run over the directory
//! ([`run`], the resume rule of docs/DECISIONS.md):
//!
//! - reads a file it never saw from its beginning;
//! - skips a file read to its end already, and says so;
//! - reads only the new bytes of a file that grew (a commands file with
//!   new commands appended applies those only);
//! - refuses a file whose bytes changed under the recorded position;
//! - finishes a run a crash interrupted first (the same bytes of the same
//!   files give the same sequence, so inputs a snapshot covers are skipped
//!   by number), and refuses to start if those files are not given again.
//!
//! A line longer than its kind's size limit ([`crate::limits`]) is never
//! held whole: its first bytes and its length become an
//! [`Input::Oversized`] where the line stands, and the rest is skipped in
//! pieces to the next newline.
//!
//! Sequence numbers continue from the snapshot's: a new run's first input
//! follows the last one the directory has seen, so outputs and history
//! windows, which are named by them, keep increasing across daily runs.
//!
//! Records are stamped with the wall-clock time they are read as their
//! receive time: "far in the future" then means more than `max_future_ms`
//! ahead of the event clock *and* of the real time, which rejects a device
//! clock in 2099 but never historical data, however long the gaps in it or
//! however old the commands before it. (A replay after a crash stamps later
//! times; only a record that was in the future at the first read and no
//! longer is at the replay could be judged differently.)

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use flowcap_clock::SharedClock;
use flowcap_engine::decode::{decode_json, DecodeLimits};
use flowcap_engine::{Engine, Timestamp};
use serde::Serialize;
use xxhash_rust::xxh3::Xxh3;

use crate::embedded::{self, EmbeddedOptions, Input, Progress};
use crate::limits::{InputKind, SizeLimits};
use crate::pipeline::{IngestError, Restored, Summary};

mod lines;
use lines::{lines, Line};

/// What an input file is to the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Usage records (`--input`).
    Records,
    /// Commands (`--commands`).
    Commands,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Records => "records",
            Role::Commands => "commands",
        }
    }
}

/// What a run did with an input file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileStatus {
    /// Never read into this directory: read from its beginning.
    New,
    /// Read before and longer now: read from where the last run stopped.
    Grown,
    /// Part of a run a crash interrupted: that run is finished first
    /// (and what the file gained since, after it).
    Resumed,
    /// Read to its end already: skipped.
    Consumed,
}

/// One input file of a run, for the summary.
#[derive(Debug, Clone, Serialize)]
pub struct InputFile {
    /// The file (canonical path: its identity).
    pub path: PathBuf,
    /// Records or commands.
    pub role: Role,
    /// What the run did with it.
    pub status: FileStatus,
    /// The bytes read before this run.
    pub from: u64,
    /// Its length when this run read it.
    pub to: u64,
}

/// Positions key of the first sequence number of the last run over files.
const RUN_FIRST: &str = "file.run.first_seq";
/// Positions key: 1 when every input of that run is covered, 0 while a
/// crash could interrupt it.
const RUN_DONE: &str = "file.run.done";

/// A file's positions key (one a field: `#from`, `#to`, `#xxh3`, `#run`).
fn key(role: Role, path: &Path) -> String {
    format!("file.{}:{}", role.name(), path.display())
}

/// What a snapshot knows of a file.
#[derive(Debug, Clone, Copy)]
struct Known {
    /// Where the last run over it started reading.
    from: u64,
    /// Where it stopped: the file's length then.
    to: u64,
    /// xxh3 of the bytes up to `to`.
    xxh3: u64,
}

fn known(positions: &BTreeMap<String, i64>, key: &str) -> Option<Known> {
    let field = |f: &str| positions.get(&format!("{key}#{f}")).copied();
    Some(Known {
        from: u64::try_from(field("from")?).ok()?,
        to: u64::try_from(field("to")?).ok()?,
        xxh3: field("xxh3")? as u64,
    })
}

/// Bytes `from..to` of a file, as read by one run.
#[derive(Debug, Clone)]
struct Range {
    path: PathBuf,
    role: Role,
    from: u64,
    to: u64,
    /// xxh3 of the file's bytes up to `to`.
    xxh3: u64,
}

/// One run's worth of files: its ranges merged into one sequence.
#[derive(Debug, Clone, Default)]
struct SegmentPlan {
    /// Where it starts (`None`: after whatever precedes it).
    first_seq: Option<u64>,
    ranges: Vec<Range>,
}

impl SegmentPlan {
    fn range(&self, role: Role) -> Option<&Range> {
        self.ranges.iter().find(|r| r.role == role)
    }

    /// What a snapshot inside this segment records.
    fn positions(&self, first_seq: u64, done: bool) -> BTreeMap<String, i64> {
        let mut p = BTreeMap::new();
        for r in &self.ranges {
            let k = key(r.role, &r.path);
            let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            p.insert(format!("{k}#from"), int(r.from));
            p.insert(format!("{k}#to"), int(r.to));
            p.insert(format!("{k}#xxh3"), r.xxh3 as i64);
            p.insert(format!("{k}#run"), int(first_seq));
        }
        p.insert(
            RUN_FIRST.into(),
            i64::try_from(first_seq).unwrap_or(i64::MAX),
        );
        p.insert(RUN_DONE.into(), i64::from(done));
        p
    }
}

/// What [`plan`] decided: the segments to feed, in order, and a line per
/// file for the summary.
#[derive(Debug)]
struct Plan {
    segments: Vec<SegmentPlan>,
    files: Vec<InputFile>,
}

/// A file given to this run, hashed.
struct Given {
    path: PathBuf,
    role: Role,
    size: u64,
    /// xxh3 of all its bytes.
    xxh3: u64,
    known: Option<Known>,
}

fn input_error(path: &Path) -> impl FnOnce(std::io::Error) -> IngestError + '_ {
    move |source| IngestError::Input {
        path: path.to_owned(),
        source,
    }
}

/// Opens, measures and hashes a given file, checking that the bytes a
/// snapshot recorded for it are still the same.
fn given(
    role: Role,
    path: &Path,
    positions: Option<&BTreeMap<String, i64>>,
) -> Result<Given, IngestError> {
    let canonical = std::fs::canonicalize(path).map_err(input_error(path))?;
    let path = canonical.as_path();
    let mut file = File::open(path).map_err(input_error(path))?;
    let size = file.metadata().map_err(input_error(path))?.len();
    let known = positions.and_then(|p| known(p, &key(role, path)));
    let changed = |why: String| IngestError::InputChanged {
        path: path.to_owned(),
        why,
    };
    if let Some(k) = known {
        if size < k.to {
            return Err(changed(format!(
                "it has {size} bytes, {} were read from it before",
                k.to
            )));
        }
    }
    let mut hasher = Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    let mut check = known.map(|k| (k.to, k.xxh3));
    loop {
        if let Some((to, want)) = check {
            if at == to {
                if hasher.digest() != want {
                    return Err(changed(format!(
                        "its first {to} bytes differ from those read before"
                    )));
                }
                check = None;
            }
        }
        if at == size {
            break;
        }
        let limit = match check {
            Some((to, _)) => to - at,
            None => size - at,
        }
        .min(buf.len() as u64) as usize;
        let n = file.read(&mut buf[..limit]).map_err(input_error(path))?;
        if n == 0 {
            return Err(changed(format!(
                "it was cut to {at} bytes while being read ({size} before)"
            )));
        }
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    Ok(Given {
        path: canonical,
        role,
        size,
        xxh3: hasher.digest(),
        known,
    })
}

/// Decides what this run reads (the module docs' rule).
fn plan(
    positions: Option<&BTreeMap<String, i64>>,
    records: Option<&Path>,
    commands: Option<&Path>,
) -> Result<Plan, IngestError> {
    let mut files = Vec::new();
    for (role, path) in [(Role::Records, records), (Role::Commands, commands)] {
        if let Some(path) = path {
            files.push(given(role, path, positions)?);
        }
    }
    let empty = BTreeMap::new();
    let positions = positions.unwrap_or(&empty);
    // A run over files that a crash interrupted: its files again, the same
    // bytes from the same first sequence number.
    let mut resumed = None;
    if let (Some(&first), Some(0)) = (positions.get(RUN_FIRST), positions.get(RUN_DONE)) {
        let first = u64::try_from(first).unwrap_or(0);
        let mut segment = SegmentPlan {
            first_seq: Some(first),
            ranges: Vec::new(),
        };
        for (k, run) in positions {
            let Some(file) = k.strip_prefix("file.").and_then(|k| k.strip_suffix("#run")) else {
                continue;
            };
            if u64::try_from(*run).ok() != Some(first) {
                continue;
            }
            let (role, path) = match file.split_once(':') {
                Some(("records", p)) => (Role::Records, Path::new(p)),
                Some(("commands", p)) => (Role::Commands, Path::new(p)),
                _ => continue,
            };
            let Some(g) = files.iter().find(|g| g.role == role && g.path == path) else {
                return Err(IngestError::InputMissing {
                    path: path.to_owned(),
                    role,
                });
            };
            // `given` checked its bytes up to `to`.
            let k = g.known.unwrap_or(Known {
                from: 0,
                to: 0,
                xxh3: 0,
            });
            segment.ranges.push(Range {
                path: g.path.clone(),
                role,
                from: k.from,
                to: k.to,
                xxh3: k.xxh3,
            });
        }
        resumed = Some(segment);
    }
    let mut next = SegmentPlan::default();
    let mut report = Vec::new();
    for g in &files {
        let in_resumed = resumed
            .as_ref()
            .and_then(|s| s.range(g.role))
            .is_some_and(|r| r.path == g.path);
        let from = g.known.map_or(0, |k| k.to);
        let status = if in_resumed {
            FileStatus::Resumed
        } else if from == g.size {
            if g.known.is_some() {
                FileStatus::Consumed
            } else {
                FileStatus::New
            }
        } else if from == 0 {
            FileStatus::New
        } else {
            FileStatus::Grown
        };
        if status == FileStatus::Consumed {
            tracing::warn!(
                file = %g.path.display(),
                role = g.role.name(),
                bytes = g.size,
                "input file already consumed by this directory, skipped"
            );
        }
        if from < g.size {
            next.ranges.push(Range {
                path: g.path.clone(),
                role: g.role,
                from,
                to: g.size,
                xxh3: g.xxh3,
            });
        }
        report.push(InputFile {
            path: g.path.clone(),
            role: g.role,
            status,
            from: if in_resumed {
                g.known.map_or(0, |k| k.from)
            } else {
                from
            },
            to: g.size,
        });
    }
    let mut segments: Vec<SegmentPlan> = resumed.into_iter().collect();
    if !next.ranges.is_empty() {
        segments.push(next);
    }
    Ok(Plan {
        segments,
        files: report,
    })
}

/// Runs the embedded pipeline over a records file and a commands file
/// (either may be absent), resuming by file identity (module docs).
/// Returns the summary (with a line per file) and the final engine.
pub fn run(
    options: &EmbeddedOptions,
    records: Option<&Path>,
    commands: Option<&Path>,
    progress: &mut dyn FnMut(Progress),
) -> Result<(Summary, Engine), IngestError> {
    // A wrong path is told before the data directory is touched.
    for path in [records, commands].into_iter().flatten() {
        File::open(path).map_err(input_error(path))?;
    }
    let restored = Restored::load(&options.out_dir, options.start)?;
    let plan = plan(restored.positions(), records, commands)?;
    let error: ReadError = Rc::new(RefCell::new(None));
    let mut segments = Vec::new();
    for segment in plan.segments {
        let inputs = merged(
            segment.range(Role::Records),
            segment.range(Role::Commands),
            &error,
            &options.sizes,
            &options.clock,
        )?;
        let slot = error.clone();
        segments.push(embedded::Segment {
            first_seq: segment.first_seq,
            inputs: Box::new(inputs),
            positions: Box::new(move |first, done| {
                segment.positions(first, done && slot.borrow().is_none())
            }),
        });
    }
    let (mut summary, engine) = embedded::drive(options, restored, segments, progress)?;
    if let Some((path, source)) = error.borrow_mut().take() {
        return Err(IngestError::Input { path, source });
    }
    summary.files = plan.files;
    Ok((summary, engine))
}

#[derive(serde::Deserialize)]
struct At {
    at: Timestamp,
}

/// Where a read error is left for [`run`] to pick up after the run
/// (iterators cannot return errors to the pipeline): the file and the
/// error.
type ReadError = Rc<RefCell<Option<(PathBuf, std::io::Error)>>>;

/// The merged input of a records range and a commands range. A line over
/// its kind's limit in `sizes` is an [`Input::Oversized`] where it stands
/// (an oversized command first, as its `at` cannot be read). Each input
/// is stamped with the time `clock` shows when it is read.
fn merged<'a>(
    records: Option<&Range>,
    commands: Option<&Range>,
    error: &ReadError,
    sizes: &SizeLimits,
    clock: &SharedClock,
) -> Result<impl Iterator<Item = Input> + 'a, IngestError> {
    let mut pending: Vec<(Timestamp, Input)> = Vec::new();
    if let Some(r) = commands {
        let limit = sizes.max_command_size;
        for line in lines(&r.path, r.from, r.to, limit).map_err(input_error(&r.path))? {
            pending.push(match line.map_err(input_error(&r.path))? {
                Line::Whole(line) => (
                    serde_json::from_slice::<At>(&line).map_or(Timestamp::MIN, |a| a.at),
                    // Its `at` may be no further ahead of the time it was
                    // read (and of the event clock) than `max_future_ms`.
                    Input::ReceivedCommand(line, Timestamp(clock.now_ms())),
                ),
                oversized => (
                    Timestamp::MIN,
                    oversized.into_input(InputKind::Command, limit, Input::Command),
                ),
            });
        }
    }
    pending.sort_by_key(|(at, _)| *at);
    let mut pending = VecDeque::from(pending);
    let slot = error.clone();
    let records_path = records.map(|r| r.path.clone()).unwrap_or_default();
    let max_record_size = sizes.max_record_size;
    let mut record_lines: Box<dyn Iterator<Item = std::io::Result<Line>>> = match records {
        Some(r) => {
            Box::new(lines(&r.path, r.from, r.to, max_record_size).map_err(input_error(&r.path))?)
        }
        None => Box::new(std::iter::empty()),
    };
    let limits = DecodeLimits::default();
    let clock = clock.clone();
    let mut held: Option<Line> = None;
    Ok(std::iter::from_fn(move || {
        if held.is_none() {
            match record_lines.next() {
                Some(Ok(line)) => held = Some(line),
                Some(Err(e)) => {
                    *slot.borrow_mut() = Some((records_path.clone(), e));
                    return None;
                }
                None => return pending.pop_front().map(|(_, c)| c),
            }
        }
        let end = match held.as_ref()? {
            Line::Whole(record) => decode_json(record, &limits).map_or(Timestamp::MIN, |u| u.end),
            Line::Oversized { .. } => Timestamp::MIN,
        };
        if pending.front().is_some_and(|(at, _)| *at <= end) {
            return pending.pop_front().map(|(_, c)| c);
        }
        held.take().map(|line| {
            line.into_input(InputKind::Record, max_record_size, |bytes| {
                Input::ReceivedRecord(bytes, Timestamp(clock.now_ms()))
            })
        })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowcap_clock::{ManualClock, SystemClock};

    /// Every input of the whole of both files, merged (no read error left
    /// behind).
    fn merge_files(records: &Path, commands: &Path, sizes: &SizeLimits) -> Vec<Input> {
        let range = |path: &Path, role| Range {
            path: path.to_owned(),
            role,
            from: 0,
            to: std::fs::metadata(path).unwrap().len(),
            xxh3: 0,
        };
        let err: ReadError = Rc::new(RefCell::new(None));
        let inputs = merged(
            Some(&range(records, Role::Records)),
            Some(&range(commands, Role::Commands)),
            &err,
            sizes,
            &SystemClock::shared(),
        )
        .unwrap()
        .collect();
        assert!(err.borrow().is_none());
        inputs
    }

    #[test]
    fn oversized_lines_stand_where_they_are_an_oversized_command_first() {
        use crate::limits::{Oversized, TOO_LARGE_KEPT};
        let dir = tempfile::tempdir().unwrap();
        let rec = |id: &str| {
            format!(
                r#"{{"record_id":"{id}","iccid":"89860412345678901234","end":"2026-11-01T01:00:00Z","bytes_up":1,"bytes_down":2}}"#
            )
        };
        let records = dir.path().join("r.jsonl");
        let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(300));
        std::fs::write(&records, [rec("a"), big.clone(), rec("b")].join("\n")).unwrap();
        let commands = dir.path().join("c.jsonl");
        std::fs::write(
            &commands,
            format!("{{\"id\":\"c\",\"at\":\"2026-11-01T00:00:00Z\"}}\n{big}{big}\n"),
        )
        .unwrap();
        let sizes = SizeLimits {
            max_record_size: 200,
            max_command_size: 400,
        };
        let inputs = merge_files(&records, &commands, &sizes);
        let oversized = |kind, len: usize, limit| {
            Input::Oversized(Oversized {
                kind,
                head: format!("{big}{big}").as_bytes()[..len.min(TOO_LARGE_KEPT)].to_vec(),
                len: len as u64,
                limit,
            })
        };
        assert_eq!(inputs.len(), 5);
        assert_eq!(inputs[0], oversized(InputKind::Command, 2 * big.len(), 400));
        assert!(
            matches!(&inputs[1], Input::ReceivedCommand(c, _) if c.starts_with(b"{\"id\":\"c\""))
        );
        assert!(matches!(&inputs[2], Input::ReceivedRecord(r, _) if r == rec("a").as_bytes()));
        assert_eq!(inputs[3], oversized(InputKind::Record, big.len(), 200));
        assert!(matches!(&inputs[4], Input::ReceivedRecord(r, _) if r == rec("b").as_bytes()));
    }

    #[test]
    fn commands_go_before_the_first_record_after_them() {
        let dir = tempfile::tempdir().unwrap();
        let rec = |id: &str, end: &str| {
            format!(
                r#"{{"record_id":"{id}","iccid":"89860412345678901234","end":"{end}","bytes_up":1,"bytes_down":2}}"#
            )
        };
        let records = dir.path().join("r.jsonl");
        std::fs::write(
            &records,
            [
                rec("a", "2026-11-01T01:00:00Z"),
                "garbage".into(),
                rec("b", "2026-11-01T03:00:00Z"),
            ]
            .join("\n"),
        )
        .unwrap();
        let commands = dir.path().join("c.jsonl");
        std::fs::write(
            &commands,
            "{\"id\":\"late\",\"at\":\"2026-11-01T02:00:00Z\"}\n\n{\"id\":\"first\",\"at\":\"2026-11-01T00:00:00Z\"}\n{\"id\":\"end\",\"at\":\"2026-11-02T00:00:00Z\"}\nnot json\n",
        )
        .unwrap();
        let inputs = merge_files(&records, &commands, &SizeLimits::default());
        let order: Vec<String> = inputs
            .into_iter()
            .map(|i| match i {
                Input::Record(b) | Input::ReceivedRecord(b, _) => format!(
                    "R:{}",
                    String::from_utf8_lossy(&b)
                        .chars()
                        .take(16)
                        .collect::<String>()
                ),
                Input::Command(b) | Input::ReceivedCommand(b, _) => {
                    format!("C:{}", String::from_utf8_lossy(&b))
                }
                Input::Oversized(o) => format!("X:{}", o.len),
            })
            .collect();
        assert_eq!(order.len(), 7);
        assert_eq!(order[0], "C:not json");
        assert!(order[1].contains("first"));
        assert!(order[2].starts_with("R:{\"record_id\":\"a"));
        assert_eq!(order[3], "R:garbage");
        assert!(order[4].contains("late"));
        assert!(order[5].starts_with("R:{\"record_id\":\"b"));
        assert!(order[6].contains("end"));
    }

    /// A record is stamped with the time it is read, and one ending more
    /// than `max_future_ms` after that is rejected as `future_time`: the
    /// same file, read at two times of day, gives two answers.
    #[test]
    fn a_record_ahead_of_the_time_it_was_read_is_rejected_as_future() {
        let run_at = |now: &str| {
            let dir = tempfile::tempdir().unwrap();
            let records = dir.path().join("r.jsonl");
            std::fs::write(
                &records,
                r#"{"record_id":"a","iccid":"89860412345678901234","end":"2026-11-02T12:00:00Z","bytes_up":1,"bytes_down":2}"#,
            )
            .unwrap();
            let clock = ManualClock::at(Timestamp::parse_rfc3339(now).unwrap().millis());
            let options = EmbeddedOptions {
                history: None,
                notify: None,
                clock,
                ..EmbeddedOptions::new(dir.path().join("out"))
            };
            run(&options, Some(&records), None, &mut |_| {})
                .unwrap()
                .0
                .rejected
        };
        // The default allows a day ahead.
        let early = run_at("2026-11-01T00:00:00Z");
        assert_eq!(early.get("future_time"), Some(&1), "{early:?}");
        let later = run_at("2026-11-02T00:00:00Z");
        assert_eq!(later.get("future_time"), None, "{later:?}");
        // Read in time, it reaches the card lookup (no card registered).
        assert_eq!(later.get("unknown_card"), Some(&1), "{later:?}");
    }
}

#[cfg(test)]
mod identity_tests {
    use super::*;

    fn statuses(plan: &Plan) -> Vec<FileStatus> {
        plan.files.iter().map(|f| f.status).collect()
    }

    fn ranges(plan: &Plan) -> Vec<(Option<u64>, u64, u64)> {
        plan.segments
            .iter()
            .flat_map(|s| s.ranges.iter().map(|r| (s.first_seq, r.from, r.to)))
            .collect()
    }

    /// New, consumed, grown, interrupted, missing and changed files, as
    /// the module docs say.
    #[test]
    fn files_are_planned_by_identity() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.jsonl");
        std::fs::write(&a, "l1\nl2\n").unwrap();
        let new = plan(None, Some(&a), None).unwrap();
        assert_eq!(statuses(&new), [FileStatus::New]);
        assert_eq!(ranges(&new), [(None, 0, 6)]);
        let done = new.segments[0].positions(0, true);
        let interrupted = new.segments[0].positions(0, false);

        let again = plan(Some(&done), Some(&a), None).unwrap();
        assert_eq!(statuses(&again), [FileStatus::Consumed]);
        assert!(again.segments.is_empty());

        std::fs::write(&a, "l1\nl2\nl3\n").unwrap();
        let grown = plan(Some(&done), Some(&a), None).unwrap();
        assert_eq!(statuses(&grown), [FileStatus::Grown]);
        assert_eq!(ranges(&grown), [(None, 6, 9)]);

        // A crash in the first run: it is run again first (from its
        // first sequence number), then what the file gained.
        let resumed = plan(Some(&interrupted), Some(&a), None).unwrap();
        assert_eq!(statuses(&resumed), [FileStatus::Resumed]);
        assert_eq!(ranges(&resumed), [(Some(0), 0, 6), (None, 6, 9)]);
        let b = dir.path().join("b.jsonl");
        std::fs::write(&b, "x\n").unwrap();
        match plan(Some(&interrupted), Some(&b), None) {
            Err(IngestError::InputMissing { path, role }) => {
                assert_eq!(path, std::fs::canonicalize(&a).unwrap());
                assert_eq!(role, Role::Records);
            }
            other => panic!("{other:?}"),
        }
        // The same path as commands is another input.
        let other_role = plan(Some(&done), None, Some(&a)).unwrap();
        assert_eq!(statuses(&other_role), [FileStatus::New]);

        std::fs::write(&a, "L1\nl2\nl3\n").unwrap();
        match plan(Some(&done), Some(&a), None) {
            Err(IngestError::InputChanged { path, .. }) => {
                assert_eq!(path, std::fs::canonicalize(&a).unwrap())
            }
            other => panic!("{other:?}"),
        }
        std::fs::write(&a, "l1\n").unwrap();
        assert!(matches!(
            plan(Some(&done), Some(&a), None),
            Err(IngestError::InputChanged { .. })
        ));
    }
}
