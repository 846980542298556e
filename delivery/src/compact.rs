//! Outbox compaction (issue #23): without it every destination's log and
//! done file, and the id sets a restart loads from them, grow forever.
//!
//! What may go. A restart restores at worst the oldest snapshot still kept
//! and replays the inputs after its cut; the replay's firings are known
//! again by the execution ids of the lines still in the logs. So a line
//! may go only once no kept snapshot can replay its firing: when a `mark`
//! of its own run (see [`crate::outbox`]) with a cut at or before the
//! oldest kept snapshot's follows it. Of those lines:
//! - a message goes once its outcome is on disk and that outcome is in the
//!   history as of such a cut (its done line's index is below the cut's
//!   `reported` cursor: a restore does not offer it to the history again);
//!   an alert also waits for the outcome of the message it reports (a
//!   crash between the two would otherwise alert again);
//! - a `buf` line needs no mark: it goes once its firing is in a message
//!   line, whose execution ids then stop a replay;
//! - an alert's line needs no mark either (no replay fires an alert);
//! - marks before the last such mark go; `run` lines stay unless their
//!   whole run went.
//!
//! A run's lines after its last mark (a kill's tail, a drain's last merged
//! messages) are never followed by a mark of their own run. When the replay
//! after a restart fires one of their firings again, the outbox writes an
//! `again` line: the marks of the new run after it then speak for the old
//! line too (its input is behind them). A tail message whose firings came
//! before the snapshot the restart restored (a merge buffer flushed after
//! the cut) is never fired again and stays: about one message per merge
//! buffer and kill.
//!
//! A done line goes once its message is gone and its index is below that
//! cursor; a `base` line then gives the index of the next one wherever it
//! does not follow, so indices (the history's cursor) keep their meaning.
//!
//! How: both files are written whole to `.tmp` files and fsynced, then the
//! log is renamed over its old self and the directory fsynced, then the
//! done file likewise. A crash before the log's rename leaves the old
//! files (the `.tmp` files are removed on load); between the two renames,
//! the new log with the old done file, which still has every outcome and
//! its old base. Either way no undelivered message is lost and no
//! delivered one looks undelivered.
//!
//! When: at a snapshot cut (the writer's [`crate::Notifier::mark`], in
//! order with the firings it submitted), once enough may go to pay for
//! reading the files again: the outcomes since the last compaction, and,
//! when the oldest kept snapshot moved, the messages done but kept then
//! (at a start, every message done).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use flowcap_rules::message::Done;

use crate::outbox::{execution_key, io, read_done, Again, Cursor, DoneBase, Entry, Log};
use crate::queue::OutboxThread;
use crate::{DeliveryError, Destination};

/// Outcomes (at least) between two compactions.
const COMPACT_AFTER: u64 = 256;

/// A snapshot cut, as the writer tells it.
#[derive(Debug, Clone)]
pub(crate) struct Cut {
    /// The input sequence the snapshot covers.
    pub(crate) seq: u64,
    /// The oldest snapshot kept on disk (before this one is written).
    pub(crate) oldest_kept: Option<u64>,
    /// Per destination: the done lines the history has at this cut.
    pub(crate) reported: BTreeMap<String, u64>,
}

/// What the last compaction left (or a start found).
#[derive(Debug, Default)]
pub(crate) struct State {
    /// Outcomes reached in this process then.
    outcomes: u64,
    /// Lines kept.
    lines: u64,
    /// Messages done but kept (their snapshots could still replay them).
    kept_done: u64,
    /// The oldest kept snapshot it compacted against.
    oldest: Option<u64>,
}

impl State {
    /// At a start: `done` messages done and `lines` lines in the logs.
    pub(crate) fn new(done: u64, lines: u64) -> State {
        State {
            outcomes: 0,
            lines,
            kept_done: done,
            oldest: None,
        }
    }
}

impl OutboxThread {
    /// Marks every log with news at the cut, then compacts when due.
    pub(crate) fn cut(&mut self, cut: Cut) -> Result<(), DeliveryError> {
        for (name, log) in &mut self.logs {
            let reported = cut.reported.get(name).copied().unwrap_or(0);
            if log.mark(cut.seq, reported)? {
                self.touched.insert(name.clone());
            }
        }
        let Some(oldest) = cut.oldest_kept else {
            return Ok(());
        };
        let outcomes = self.shared.delivered.load(Ordering::Acquire)
            + self.shared.failed.load(Ordering::Acquire);
        let mut candidates = outcomes.saturating_sub(self.compaction.outcomes);
        if self.compaction.oldest < Some(oldest) {
            candidates += self.compaction.kept_done;
        }
        if candidates < COMPACT_AFTER.max(self.compaction.lines / 4) {
            return Ok(());
        }
        self.compaction.outcomes = outcomes;
        self.compaction.oldest = Some(oldest);
        self.commit()?;
        self.compact(oldest)
    }

    /// A replay fired `execution` again: if an earlier run's tail holds it,
    /// say so in its log (see the module docs).
    pub(crate) fn again(&mut self, execution: &str) -> Result<(), DeliveryError> {
        if let Some(destination) = self.tail.remove(&execution_key(execution)) {
            let again = Entry::Again(Again {
                execution: execution.to_owned(),
            });
            self.append(&destination, &again)?;
        }
        Ok(())
    }

    /// Compacts every destination against the oldest kept snapshot, and
    /// keeps in the seen ids only what the logs (and merge buffers) hold.
    fn compact(&mut self, oldest: u64) -> Result<(), DeliveryError> {
        let destinations: Vec<Arc<Destination>> = self
            .shared
            .destinations
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let finished: HashSet<String> = destinations
            .iter()
            .flat_map(|d| {
                let cursor = d.cursor.lock().unwrap_or_else(|e| e.into_inner());
                cursor.done.iter().cloned().collect::<Vec<_>>()
            })
            .collect();
        let mut seen = HashSet::new();
        let (mut lines, mut kept_done) = (0, 0);
        for d in destinations {
            let Some(log) = self.logs.get_mut(&d.name) else {
                continue;
            };
            let mut cursor = d.cursor.lock().unwrap_or_else(|e| e.into_inner());
            let done = compact_destination(log, &mut cursor, oldest, &finished, usize::MAX)?;
            seen.extend(done.executions);
            lines += done.lines;
            kept_done += done.kept_done;
            if done.dropped_messages > 0 {
                tracing::debug!(destination = %d.name, dropped = done.dropped_messages,
                    kept = done.lines, "outbox compacted");
                d.queued.fetch_sub(done.dropped_messages, Ordering::AcqRel);
                d.completed
                    .fetch_sub(done.dropped_messages, Ordering::AcqRel);
            }
            d.synced.store(done.synced, Ordering::Release);
            d.gauge();
        }
        for buffer in self.merges.values() {
            seen.extend(buffer.firings.iter().map(|(_, e)| execution_key(e)));
        }
        self.tail.retain(|k, _| seen.contains(k));
        self.seen = seen;
        self.compaction.lines = lines;
        self.compaction.kept_done = kept_done;
        Ok(())
    }
}

/// What a compaction left of a destination.
#[derive(Debug, Default)]
pub(crate) struct Compacted {
    /// The executions of the lines kept.
    pub(crate) executions: Vec<u128>,
    /// Lines kept in the log.
    pub(crate) lines: u64,
    /// Message lines dropped.
    pub(crate) dropped_messages: u64,
    /// Message lines kept whose outcome is on disk.
    pub(crate) kept_done: u64,
    /// The log's durable length now.
    pub(crate) synced: u64,
}

/// Compacts one destination: `log` (the outbox thread's) and `cursor` (its
/// task's, held locked). `steps` stops the file replacement after that
/// many steps (a crash, for tests; `usize::MAX` otherwise).
pub(crate) fn compact_destination(
    log: &mut Log,
    cursor: &mut Cursor,
    oldest: u64,
    finished: &HashSet<String>,
    steps: usize,
) -> Result<Compacted, DeliveryError> {
    let synced = log.sync()?;
    let path = log.path().to_owned();
    let raw = raw_lines(&path, synced)?;
    let entries: Vec<Option<Entry>> = raw.iter().map(|l| serde_json::from_slice(l).ok()).collect();
    let done_path = cursor.done_path().to_owned();
    let file = read_done(&done_path)?;
    let index: HashMap<&str, u64> = file
        .outcomes
        .iter()
        .map(|(i, d)| (d.id.as_str(), *i))
        .collect();
    let plan = plan(&entries, oldest, &index, finished);
    let kept_ids: HashSet<&str> = entries
        .iter()
        .zip(&plan.keep)
        .filter_map(|(e, keep)| match (e, keep) {
            (Some(Entry::Msg(m)), true) => Some(m.id.as_str()),
            _ => None,
        })
        .collect();
    // An outcome goes with its message, once the history has it.
    let outcomes: Vec<&(u64, Done)> = file
        .outcomes
        .iter()
        .filter(|(i, d)| kept_ids.contains(d.id.as_str()) || *i >= plan.reported)
        .collect();
    let dropped_outcomes = file.outcomes.len() - outcomes.len();
    let mut out = Compacted {
        executions: entries
            .iter()
            .zip(&plan.keep)
            .filter(|(_, keep)| **keep)
            .flat_map(|(e, _)| executions(e.as_ref()))
            .collect(),
        lines: plan.keep.iter().filter(|k| **k).count() as u64,
        dropped_messages: entries
            .iter()
            .zip(&plan.keep)
            .filter(|(e, keep)| !**keep && matches!(e, Some(Entry::Msg(_))))
            .count() as u64,
        kept_done: kept_ids
            .iter()
            .filter(|id| index.contains_key(**id))
            .count() as u64,
        synced,
    };
    if out.lines == raw.len() as u64 && dropped_outcomes == 0 {
        return Ok(out);
    }
    let mut log_bytes = Vec::new();
    let mut position = 0;
    let mut offset = 0;
    for (line, keep) in raw.iter().zip(&plan.keep) {
        if *keep {
            if offset < cursor.position {
                position += line.len() as u64;
            }
            log_bytes.extend_from_slice(line);
        }
        offset += line.len() as u64;
    }
    let done_bytes = (dropped_outcomes > 0)
        .then(|| encode_done(&outcomes, file.next))
        .transpose()?;
    replace(&path, &log_bytes, &done_path, done_bytes.as_deref(), steps)?;
    if steps != usize::MAX {
        return Ok(out);
    }
    log.reopen()?;
    let done: HashSet<String> = outcomes.iter().map(|(_, d)| d.id.clone()).collect();
    cursor.reopen(position, done)?;
    out.synced = log_bytes.len() as u64;
    Ok(out)
}

fn executions(entry: Option<&Entry>) -> Vec<u128> {
    match entry {
        Some(Entry::Msg(m)) => m.executions.iter().map(|e| execution_key(e)).collect(),
        Some(Entry::Buf(b)) => vec![execution_key(&b.execution)],
        _ => Vec::new(),
    }
}

/// The lines of `path` up to `len`, each with its newline.
fn raw_lines(path: &Path, len: u64) -> Result<Vec<Vec<u8>>, DeliveryError> {
    let file = std::fs::File::open(path).map_err(io(path))?;
    let mut reader = std::io::BufReader::new(std::io::Read::take(file, len));
    let mut lines = Vec::new();
    loop {
        let mut line = Vec::new();
        if reader.read_until(b'\n', &mut line).map_err(io(path))? == 0 {
            return Ok(lines);
        }
        lines.push(line);
    }
}

/// A done file of `outcomes` (with their indices) whose next outcome has
/// index `next`: a `base` line wherever an index does not follow from the
/// line before.
fn encode_done(outcomes: &[&(u64, Done)], next: u64) -> Result<Vec<u8>, DeliveryError> {
    let encode = |e: serde_json::Error| DeliveryError::Encode(e.to_string());
    let mut bytes = Vec::new();
    let mut expected = 0;
    let base = |bytes: &mut Vec<u8>, index: u64| -> Result<(), DeliveryError> {
        serde_json::to_writer(&mut *bytes, &DoneBase::new(index)).map_err(encode)?;
        bytes.push(b'\n');
        Ok(())
    };
    for (index, d) in outcomes {
        if *index != expected {
            base(&mut bytes, *index)?;
        }
        serde_json::to_writer(&mut bytes, d).map_err(encode)?;
        bytes.push(b'\n');
        expected = index + 1;
    }
    if next != expected {
        base(&mut bytes, next)?;
    }
    Ok(bytes)
}

/// Which lines of a log stay.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Per line.
    pub(crate) keep: Vec<bool>,
    /// The history's cursor at the latest mark at or before the oldest
    /// kept snapshot: outcomes below it are in every kept snapshot's
    /// history.
    pub(crate) reported: u64,
}

/// Decides which lines stay (see the module docs). `done`: the index of
/// each outcome on disk, by message id; `finished`: every message id with
/// an outcome on disk, in any destination.
pub(crate) fn plan(
    entries: &[Option<Entry>],
    oldest: u64,
    done: &HashMap<&str, u64>,
    finished: &HashSet<String>,
) -> Plan {
    let covering = |e: &Option<Entry>| matches!(e, Some(Entry::Mark(m)) if m.seq <= oldest);
    let reported = entries
        .iter()
        .filter_map(|e| match e {
            Some(Entry::Mark(m)) if m.seq <= oldest => Some(m.reported),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    // Runs [start, end) and their last covering mark; the lines before it
    // are behind the oldest kept snapshot's cut.
    let n = entries.len();
    let mut behind = vec![false; n];
    let mut runs = Vec::new();
    let mut start = 0;
    while start < n {
        let end = (start + 1..n)
            .find(|&i| matches!(entries[i], Some(Entry::Run)))
            .unwrap_or(n);
        let cut = (start..end).rev().find(|&i| covering(&entries[i]));
        if let Some(cut) = cut {
            behind[start..cut].iter_mut().for_each(|b| *b = true);
        }
        runs.push((start, end, cut));
        start = end;
    }
    // Firings of earlier runs' tails that a later run fired again, behind
    // that run's cut.
    let again: HashSet<&str> = entries
        .iter()
        .zip(&behind)
        .filter_map(|(e, behind)| match e {
            Some(Entry::Again(a)) if *behind => Some(a.execution.as_str()),
            _ => None,
        })
        .collect();
    let in_messages: HashSet<&str> = entries
        .iter()
        .filter_map(|e| match e {
            Some(Entry::Msg(m)) => Some(m.executions.iter().map(String::as_str)),
            _ => None,
        })
        .flatten()
        .collect();
    let mut keep: Vec<bool> = entries
        .iter()
        .zip(&behind)
        .map(|(e, &behind)| match e {
            Some(Entry::Msg(m)) => {
                let fired_again = !m.executions.is_empty()
                    && m.executions.iter().all(|x| again.contains(x.as_str()));
                let replayable = m.alert_for.is_none() && !behind && !fired_again;
                let reported = done.get(m.id.as_str()).is_some_and(|&d| d < reported);
                replayable
                    || !reported
                    || m.alert_for.as_ref().is_some_and(|f| !finished.contains(f))
            }
            // Its message's execution ids stop a replay from then on.
            Some(Entry::Buf(b)) => !in_messages.contains(b.execution.as_str()),
            Some(Entry::Mark(_)) => !behind,
            Some(Entry::Run | Entry::Again(_)) | None => true,
        })
        .collect();
    // An `again` line goes with the line it speaks for.
    let kept: HashSet<&str> = entries
        .iter()
        .zip(&keep)
        .filter(|(_, keep)| **keep)
        .flat_map(|(e, _)| match e {
            Some(Entry::Msg(m)) => m.executions.iter().map(String::as_str).collect(),
            Some(Entry::Buf(b)) => vec![b.execution.as_str()],
            _ => Vec::new(),
        })
        .collect();
    for (i, e) in entries.iter().enumerate() {
        if let Some(Entry::Again(a)) = e {
            keep[i] = !behind[i] || kept.contains(a.execution.as_str());
        }
    }
    // A run with nothing left but its run line and its cut goes whole,
    // unless it is the last (this process may write on).
    for (start, end, cut) in runs {
        let empty = (start..end)
            .all(|i| !keep[i] || Some(i) == cut || matches!(entries[i], Some(Entry::Run)));
        if empty && end < n {
            keep[start..end].iter_mut().for_each(|k| *k = false);
        }
    }
    Plan { keep, reported }
}

/// Puts the new files in place (see the module docs for the order), doing
/// at most `steps` steps.
fn replace(
    log: &Path,
    log_bytes: &[u8],
    done: &Path,
    done_bytes: Option<&[u8]>,
    steps: usize,
) -> Result<(), DeliveryError> {
    let dir = log.parent().unwrap_or(Path::new("."));
    let tmp = |p: &Path| -> PathBuf {
        let mut name = p.as_os_str().to_owned();
        name.push(".tmp");
        PathBuf::from(name)
    };
    let (log_tmp, done_tmp) = (tmp(log), tmp(done));
    let write = |path: &Path, bytes: &[u8]| -> Result<(), DeliveryError> {
        let mut f = std::fs::File::create(path).map_err(io(path))?;
        f.write_all(bytes).map_err(io(path))?;
        f.sync_all().map_err(io(path))
    };
    let sync_dir = || {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))
    };
    type Step<'a> = Box<dyn FnOnce() -> Result<(), DeliveryError> + 'a>;
    let mut todo: Vec<Step<'_>> = vec![
        Box::new(|| write(&log_tmp, log_bytes)),
        Box::new(|| std::fs::rename(&log_tmp, log).map_err(io(log))),
        Box::new(sync_dir),
    ];
    if let Some(bytes) = done_bytes {
        todo.insert(1, Box::new(|| write(&done_tmp, bytes)));
        todo.push(Box::new(|| {
            std::fs::rename(&done_tmp, done).map_err(io(done))
        }));
        todo.push(Box::new(sync_dir));
    }
    for step in todo.into_iter().take(steps) {
        step()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{self, Again, Appender, Buffered, Mark, MergeKey, Next};
    use flowcap_rules::message::Final;

    const DEST: &str = "webhook:hook";

    use crate::outbox::tests::message as msg;

    fn done(id: &str) -> Done {
        Done {
            id: id.into(),
            outcome: Final::Delivered,
            attempts: 1,
            status: Some(200),
            error: None,
            at_ms: 0,
        }
    }

    fn mark(seq: u64, reported: u64) -> Entry {
        Entry::Mark(Mark { seq, reported })
    }

    fn buf(exec: &str) -> Entry {
        use flowcap_engine::event::{Cause, Observed, RuleFiredEvent};
        let firing = RuleFiredEvent {
            id: "f".into(),
            rule: "r".into(),
            rule_name: String::new(),
            rule_type: 2,
            iccid: None,
            pool: None,
            pool_name: None,
            plan: None,
            plan_name: None,
            condition: flowcap_engine::rule::RuleCondition::UsedMbGte(1),
            observed: Observed::Usage {
                used_bytes: 1,
                allowance_bytes: None,
                remaining_bytes: None,
            },
            event_time: flowcap_engine::Timestamp(0),
            processed_at: None,
            cycle: flowcap_engine::CycleId(0),
            actions: vec![],
            cause: Cause::Rollover {
                cycle: flowcap_engine::CycleId(0),
            },
        };
        Entry::Buf(Buffered {
            key: MergeKey {
                endpoint: "hook".into(),
                rule: "r".into(),
                template: "t".into(),
            },
            execution: exec.into(),
            firing,
        })
    }

    /// One run: m1 and m2 (merged from a `buf` line) delivered and
    /// reported before the cut at 10, m3 not delivered, m4 delivered after
    /// the cut at 10; a cut at 20. Done: m1, m2, m4 (indices 0-2).
    fn outbox(dir: &Path) {
        let mut log = Appender::open(outbox::log_path(dir, DEST)).unwrap();
        for e in [
            Entry::Run,
            Entry::Msg(msg("m1", "e1")),
            buf("e2"),
            Entry::Msg(msg("m2", "e2")),
            Entry::Msg(msg("m3", "e3")),
            mark(10, 2),
            Entry::Msg(msg("m4", "e4")),
            mark(20, 3),
        ] {
            log.append(&e).unwrap();
        }
        log.sync().unwrap();
        let mut done_log = Appender::open(outbox::done_path(dir, DEST)).unwrap();
        for id in ["m1", "m2", "m4"] {
            done_log.append(&done(id)).unwrap();
        }
        done_log.sync().unwrap();
    }

    fn open(dir: &Path) -> (Log, Cursor) {
        let loaded = outbox::load(dir, &BTreeMap::new()).unwrap();
        let d = &loaded.destinations[DEST];
        let log = Log::open(outbox::log_path(dir, DEST)).unwrap();
        let cursor = Cursor::open(
            outbox::log_path(dir, DEST),
            outbox::done_path(dir, DEST),
            d.done.clone(),
            d.done_lines,
        )
        .unwrap();
        (log, cursor)
    }

    fn messages(dir: &Path) -> Vec<String> {
        outbox::read_lines::<Entry>(&outbox::log_path(dir, DEST))
            .unwrap()
            .into_iter()
            .filter_map(|e| match e {
                Entry::Msg(m) => Some(m.id),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn compaction_keeps_undelivered_and_recent_lines_and_drops_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        outbox(dir.path());
        let (mut log, mut cursor) = open(dir.path());
        let out =
            compact_destination(&mut log, &mut cursor, 10, &HashSet::new(), usize::MAX).unwrap();
        assert_eq!(out.dropped_messages, 2);
        assert_eq!(messages(dir.path()), ["m3", "m4"]);
        let mut executions = out.executions.clone();
        executions.sort();
        let mut expected = vec![execution_key("e3"), execution_key("e4")];
        expected.sort();
        assert_eq!(executions, expected, "the seen ids: what the log holds");
        let lines: Vec<Entry> = outbox::read_lines(&outbox::log_path(dir.path(), DEST)).unwrap();
        assert_eq!(lines.len() as u64, out.lines);
        assert_eq!(lines[0], Entry::Run);
        assert!(lines.contains(&mark(10, 2)) && lines.contains(&mark(20, 3)));

        // The done file starts at index 2: m4's outcome keeps its index.
        let file = read_done(&outbox::done_path(dir.path(), DEST)).unwrap();
        let indices: Vec<u64> = file.outcomes.iter().map(|(i, _)| *i).collect();
        assert_eq!((indices, file.next), (vec![2], 3));
        let loaded = outbox::load(dir.path(), &BTreeMap::from([(DEST.to_owned(), 2)])).unwrap();
        let d = &loaded.destinations[DEST];
        assert_eq!(d.done_lines, 3);
        let unreported: Vec<(u64, &str)> = d
            .unreported
            .iter()
            .map(|(i, m, _)| (*i, m.id.as_str()))
            .collect();
        assert_eq!(unreported, [(2, "m4")]);
        assert!(loaded.seen.contains(&execution_key("e3")));
        assert!(!loaded.seen.contains(&execution_key("e1")));

        // Against an older snapshot (the cut at 10 not kept by all), all stays.
        let dir = tempfile::tempdir().unwrap();
        outbox(dir.path());
        let (mut log, mut cursor) = open(dir.path());
        let out =
            compact_destination(&mut log, &mut cursor, 9, &HashSet::new(), usize::MAX).unwrap();
        assert_eq!(out.dropped_messages, 0);
        assert_eq!(messages(dir.path()), ["m1", "m2", "m3", "m4"]);
    }

    /// A crash after any step of the replacement: a restart finds every
    /// message not delivered still to send, every delivered one still done
    /// under the same index, and no `.tmp` file.
    #[test]
    fn a_crash_at_any_step_loses_nothing_and_sends_nothing_twice() {
        for steps in 0..=6 {
            let dir = tempfile::tempdir().unwrap();
            outbox(dir.path());
            let (mut log, mut cursor) = open(dir.path());
            compact_destination(&mut log, &mut cursor, 10, &HashSet::new(), steps).unwrap();
            drop((log, cursor));
            let reported = BTreeMap::from([(DEST.to_owned(), 2)]);
            let loaded = outbox::load(dir.path(), &reported).unwrap();
            let d = &loaded.destinations[DEST];
            let left = messages(dir.path());
            assert!(left.contains(&"m3".to_owned()), "step {steps}: {left:?}");
            assert!(!d.done.contains("m3"), "step {steps}");
            for id in left.iter().filter(|m| *m != "m3") {
                assert!(
                    d.done.contains(id),
                    "step {steps}: {id} would be sent again"
                );
            }
            assert_eq!(d.done_lines, 3, "step {steps}");
            assert_eq!(d.unreported.len(), 1, "step {steps}");
            assert!(loaded.seen.contains(&execution_key("e4")), "step {steps}");
            let tmp = std::fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .path()
                        .extension()
                        .is_some_and(|x| x == "tmp")
                })
                .count();
            assert_eq!(tmp, 0, "step {steps}");
        }
    }

    /// The task's cursor moves into the new files: what it read is not
    /// read again, the outcome of its message in flight lands in the new
    /// done file, and a line appended later is read.
    #[test]
    fn the_cursor_follows_a_compaction() {
        let dir = tempfile::tempdir().unwrap();
        outbox(dir.path());
        let (mut log, mut cursor) = open(dir.path());
        let synced = log.sync().unwrap();
        let in_flight = loop {
            match cursor.next(synced).unwrap() {
                Next::Message(m) => break m,
                Next::Skip => continue,
                _ => panic!("m3 not found"),
            }
        };
        assert_eq!(in_flight.id, "m3");
        let out =
            compact_destination(&mut log, &mut cursor, 10, &HashSet::new(), usize::MAX).unwrap();
        assert_eq!(cursor.record(&done("m3")).unwrap(), 3);
        log.append(&Entry::Msg(msg("m5", "e5"))).unwrap();
        let synced = log.sync().unwrap();
        assert!(synced > out.synced);
        let mut read = Vec::new();
        loop {
            match cursor.next(synced).unwrap() {
                Next::Message(m) => read.push(m.id),
                Next::Skip => {}
                Next::Wait => break,
                Next::Retry => panic!("the synced length is visible"),
            }
        }
        assert_eq!(read, ["m5"]);
        let loaded = outbox::load(dir.path(), &BTreeMap::new()).unwrap();
        let d = &loaded.destinations[DEST];
        assert!(d.done.contains("m3") && !d.done.contains("m5"));
        assert_eq!(d.done_lines, 4);
    }

    /// Outcomes kept around dropped ones (a message that stays, between
    /// ones that went) keep their indices, and so does the next one.
    #[test]
    fn kept_outcomes_keep_their_indices_across_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.done");
        let outcomes = [(1u64, done("m2")), (4, done("m5"))];
        let kept: Vec<&(u64, Done)> = outcomes.iter().collect();
        std::fs::write(&path, encode_done(&kept, 7).unwrap()).unwrap();
        let file = read_done(&path).unwrap();
        assert_eq!(file.outcomes, outcomes);
        assert_eq!(file.next, 7);
    }

    fn entries(list: Vec<Entry>) -> Vec<Option<Entry>> {
        list.into_iter().map(Some).collect()
    }

    /// A mark speaks for the lines of its own run only: a crashed run's
    /// message after its last mark stays, whatever later runs mark; its
    /// `buf` line goes once the firing is in a message.
    #[test]
    fn a_crashed_runs_tail_stays() {
        let lines = entries(vec![
            Entry::Run,
            Entry::Msg(msg("m1", "e1")),
            mark(5, 9),
            Entry::Msg(msg("m2", "e2")),
            buf("e9"),
            Entry::Run,
            Entry::Msg(msg("m3", "e3")),
            Entry::Msg(msg("m9", "e9")),
            mark(8, 9),
        ]);
        let done = HashMap::from([("m1", 0), ("m2", 1), ("m3", 2), ("m9", 3)]);
        let plan = plan(&lines, 8, &done, &HashSet::new());
        assert_eq!(plan.reported, 9);
        assert_eq!(
            plan.keep,
            [true, false, true, true, false, true, false, false, true]
        );
    }

    /// Once the replay of a later run fired a tail's firing again (its
    /// `again` line behind that run's cut), the tail line goes, and with it
    /// the `again` line and the emptied run.
    #[test]
    fn a_crashed_runs_tail_goes_once_a_replay_fired_it_again() {
        let lines = entries(vec![
            Entry::Run,
            Entry::Msg(msg("m1", "e1")),
            mark(5, 9),
            Entry::Msg(msg("m2", "e2")),
            Entry::Run,
            Entry::Again(Again {
                execution: "e2".into(),
            }),
            Entry::Msg(msg("m3", "e3")),
            mark(8, 9),
        ]);
        let done = HashMap::from([("m1", 0), ("m2", 1), ("m3", 2)]);
        let plan = plan(&lines, 8, &done, &HashSet::new());
        assert_eq!(
            plan.keep,
            [false, false, false, false, true, false, false, true]
        );
        // The replay's `again` line not yet behind a cut: all stays.
        let early = super::plan(&lines, 7, &done, &HashSet::new());
        assert!(early.keep[3]);
    }

    /// A start finds the tails: the lines after the last mark of each run
    /// of each log.
    #[test]
    fn load_finds_the_tail_after_the_last_mark() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Appender::open(outbox::log_path(dir.path(), DEST)).unwrap();
        for e in [
            Entry::Run,
            Entry::Msg(msg("m1", "e1")),
            mark(5, 0),
            Entry::Msg(msg("m2", "e2")),
            Entry::Run,
            Entry::Msg(msg("m4", "e4")),
            mark(7, 0),
            buf("e3"),
        ] {
            log.append(&e).unwrap();
        }
        log.sync().unwrap();
        let loaded = outbox::load(dir.path(), &BTreeMap::new()).unwrap();
        let mut tail: Vec<u128> = loaded.tail.keys().copied().collect();
        tail.sort();
        let mut expected = vec![execution_key("e2"), execution_key("e3")];
        expected.sort();
        assert_eq!(tail, expected);
        assert!(loaded.tail.values().all(|d| d == DEST));
    }

    /// An alert goes only once the message it reports has its outcome on
    /// disk (else a crash before that outcome would alert again), and needs
    /// no mark (no replay fires an alert); a run with nothing left goes
    /// whole unless it is the last.
    #[test]
    fn an_alert_waits_for_its_message_and_empty_runs_go() {
        let mut alert = msg("a1", "alert|x");
        alert.alert_for = Some("x".into());
        let lines = entries(vec![
            Entry::Run,
            Entry::Msg(msg("m1", "e1")),
            mark(3, 5),
            Entry::Run,
            mark(4, 5),
            Entry::Msg(alert),
        ]);
        let done = HashMap::from([("m1", 0), ("a1", 1)]);
        let waiting = plan(&lines, 4, &done, &HashSet::new());
        assert_eq!(waiting.keep, [false, false, false, true, true, true]);
        let finished = HashSet::from(["x".to_owned()]);
        let gone = plan(&lines, 4, &done, &finished);
        assert_eq!(gone.keep, [false, false, false, true, true, false]);
    }
}
