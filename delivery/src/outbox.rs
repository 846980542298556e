//! The durable outbox: what is to be delivered, on disk before it is sent.
//!
//! One append-only JSON-lines log per destination (a webhook endpoint, the
//! SMTP relay, the SMS gateway), `<dir>/<destination>.log`, and beside it
//! `<destination>.done` with one line per message that reached its outcome
//! (delivered or failed). A log line is either a message (`"t":"msg"`) or
//! a firing waiting in a merge buffer (`"t":"buf"`, written at snapshot
//! barriers so a merge buffer survives a crash that the engine's replay
//! would not repeat).
//!
//! Write-ahead: a message is sent only after its line is fsynced, so a
//! message that reached a receiver is always on disk and is sent again
//! after a crash under the same id, never rebuilt under another one. The
//! execution ids of every line make replays idempotent: a firing that the
//! engine repeats after a restart is recognised and not queued twice.
//!
//! A line cut short by a crash is dropped on load (the file is cut back
//! to its last complete line).
//!
//! The log also says what replays can repeat: each process begins its
//! lines with a `run` line, and each snapshot cut writes a `mark` line
//! (`"t":"mark"`, the cut's input sequence and how many done lines the
//! history had then). So the lines of one run before a mark come from
//! inputs the snapshot of that cut covers, and [`crate::compact`] can drop
//! what no kept snapshot can replay (an `again` line carries a firing of an
//! earlier run's unmarked tail into the run whose replay fired it again).
//! Compaction rewrites both files; in the done file, a `base` line gives
//! the index of the next outcome where dropped ones came before it, so an
//! outcome's index (the history's cursor) keeps its meaning.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, Write};
use std::path::{Path, PathBuf};

use flowcap_engine::event::RuleFiredEvent;
use serde::{Deserialize, Serialize};

use flowcap_rules::message::{destination, Done, Message, MessageChannel};

use crate::DeliveryError;

/// What a merge buffer groups by: one message per endpoint, rule and
/// template.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MergeKey {
    /// Endpoint id.
    pub endpoint: String,
    /// Rule id.
    pub rule: String,
    /// Template name.
    pub template: String,
}

/// A firing waiting in a merge buffer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Buffered {
    /// Its merge buffer.
    pub key: MergeKey,
    /// The execution id of the webhook action.
    pub execution: String,
    /// The firing.
    pub firing: RuleFiredEvent,
}

/// A snapshot cut, in a log: the lines of the same run before it come
/// from inputs at or before `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// The input sequence the cut's snapshot covers.
    pub seq: u64,
    /// How many of the destination's done lines the history had at the
    /// cut (the snapshot's `notify.<destination>` cursor).
    #[serde(default)]
    pub reported: u64,
}

/// A log line.
// One value lives at a time (a line being written or read): its size is
// of no consequence.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Entry {
    /// A message to send.
    Msg(Message),
    /// A firing in a merge buffer.
    Buf(Buffered),
    /// A snapshot cut.
    Mark(Mark),
    /// A process began writing here: marks before this line say nothing
    /// about the lines after it, nor later marks about the lines before.
    Run,
    /// The replay of this run fired again a firing that an earlier run
    /// wrote after its last mark (a kill's tail): the marks after this
    /// line speak for that firing's line too.
    Again(Again),
}

/// See [`Entry::Again`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Again {
    /// The execution fired again.
    pub execution: String,
}

/// A line of a compacted done file: the index of the next outcome (the
/// outcomes before it that were dropped still count).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DoneBase {
    t: BaseTag,
    /// The index of the next outcome.
    pub(crate) lines: u64,
}

impl DoneBase {
    pub(crate) fn new(lines: u64) -> DoneBase {
        DoneBase {
            t: BaseTag::Base,
            lines,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum BaseTag {
    #[serde(rename = "base")]
    Base,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum DoneLine {
    Base(DoneBase),
    Outcome(Done),
}

/// A done file as read.
#[derive(Debug, Default)]
pub(crate) struct DoneFile {
    /// Each outcome with its index: the outcomes before it, dropped ones
    /// included (a `base` line gives the index of the next outcome).
    pub(crate) outcomes: Vec<(u64, Done)>,
    /// The index of the next outcome appended.
    pub(crate) next: u64,
}

/// Reads a done file.
pub(crate) fn read_done(path: &Path) -> Result<DoneFile, DeliveryError> {
    let mut file = DoneFile::default();
    for line in read_lines::<DoneLine>(path)? {
        match line {
            DoneLine::Base(b) => file.next = file.next.max(b.lines),
            DoneLine::Outcome(d) => {
                file.outcomes.push((file.next, d));
                file.next += 1;
            }
        }
    }
    Ok(file)
}

/// A destination's file name: readable, and unique through a hash suffix.
pub(crate) fn file_stem(destination: &str) -> String {
    let readable: String = destination
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(48)
        .collect();
    let hash = xxhash_rust::xxh3::xxh3_64(destination.as_bytes());
    format!("{readable}-{hash:016x}")
}

pub(crate) fn log_path(dir: &Path, destination: &str) -> PathBuf {
    dir.join(format!("{}.log", file_stem(destination)))
}

pub(crate) fn done_path(dir: &Path, destination: &str) -> PathBuf {
    dir.join(format!("{}.done", file_stem(destination)))
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DeliveryError + '_ {
    move |source| DeliveryError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Reads a JSON-lines file, cutting off a torn last line. Lines that do
/// not parse are skipped with a warning (a newer format, a hand edit).
pub(crate) fn read_lines<T: for<'de> Deserialize<'de>>(
    path: &Path,
) -> Result<Vec<T>, DeliveryError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(path)(e)),
    };
    let mut reader = BufReader::new(file);
    let mut out = Vec::new();
    let mut good = 0u64;
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).map_err(io(path))?;
        if n == 0 {
            break;
        }
        if !line.ends_with('\n') {
            tracing::warn!(path = %path.display(), "dropping a torn last line");
            let f = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(io(path))?;
            f.set_len(good).map_err(io(path))?;
            f.sync_all().map_err(io(path))?;
            break;
        }
        good += n as u64;
        match serde_json::from_str(&line) {
            Ok(v) => out.push(v),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "skipping an unreadable outbox line")
            }
        }
    }
    Ok(out)
}

/// An append-only log with its durable length.
pub(crate) struct Appender {
    path: PathBuf,
    file: std::io::BufWriter<File>,
    len: u64,
    dirty: bool,
}

impl Appender {
    pub(crate) fn open(path: PathBuf) -> Result<Appender, DeliveryError> {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        let len = file.seek(std::io::SeekFrom::End(0)).map_err(io(&path))?;
        Ok(Appender {
            path,
            file: std::io::BufWriter::new(file),
            len,
            dirty: false,
        })
    }

    pub(crate) fn append(&mut self, value: &impl Serialize) -> Result<(), DeliveryError> {
        let mut line =
            serde_json::to_vec(value).map_err(|e| DeliveryError::Encode(e.to_string()))?;
        line.push(b'\n');
        self.file.write_all(&line).map_err(io(&self.path))?;
        self.len += line.len() as u64;
        self.dirty = true;
        Ok(())
    }

    /// Flushes and fsyncs; returns the durable length.
    pub(crate) fn sync(&mut self) -> Result<u64, DeliveryError> {
        if self.dirty {
            self.file.flush().map_err(io(&self.path))?;
            self.file.get_ref().sync_data().map_err(io(&self.path))?;
            self.dirty = false;
        }
        Ok(self.len)
    }

    /// Flushes to the OS (no fsync): enough for a process crash.
    pub(crate) fn flush(&mut self) -> Result<(), DeliveryError> {
        self.file.flush().map_err(io(&self.path))
    }
}

/// A destination's log as the outbox thread writes it: its first line in
/// this process is a `run` line, and a snapshot cut marks it when it has
/// news (lines, or outcomes the history took) since its last mark.
pub(crate) struct Log {
    appender: Appender,
    begun: bool,
    unmarked: bool,
    reported: Option<u64>,
}

impl Log {
    pub(crate) fn open(path: PathBuf) -> Result<Log, DeliveryError> {
        Ok(Log {
            appender: Appender::open(path)?,
            begun: false,
            unmarked: false,
            reported: None,
        })
    }

    pub(crate) fn append(&mut self, entry: &Entry) -> Result<(), DeliveryError> {
        if !self.begun {
            self.appender.append(&Entry::Run)?;
            self.begun = true;
        }
        self.unmarked = true;
        self.appender.append(entry)
    }

    /// Writes the mark of the cut through input `seq` when there is news
    /// since the last; true when it did.
    pub(crate) fn mark(&mut self, seq: u64, reported: u64) -> Result<bool, DeliveryError> {
        if !self.unmarked && self.reported == Some(reported) {
            return Ok(false);
        }
        self.append(&Entry::Mark(Mark { seq, reported }))?;
        self.unmarked = false;
        self.reported = Some(reported);
        Ok(true)
    }

    /// Flushes and fsyncs; returns the durable length.
    pub(crate) fn sync(&mut self) -> Result<u64, DeliveryError> {
        self.appender.sync()
    }

    /// Appends to the file now at its path (after a compaction replaced
    /// it); this process's run goes on in it.
    pub(crate) fn reopen(&mut self) -> Result<(), DeliveryError> {
        self.appender = Appender::open(self.appender.path.clone())?;
        Ok(())
    }

    pub(crate) fn path(&self) -> &Path {
        &self.appender.path
    }
}

/// What a destination's task reads next.
pub(crate) enum Next {
    /// Nothing durable past the position: wait for a wake-up.
    Wait,
    /// The durable length is not visible through the reader yet.
    Retry,
    /// A message not done yet.
    Message(Box<Message>),
    /// A line with nothing to send (done, not a message, unreadable).
    Skip,
}

/// A destination task's place in its log and its done file. Shared with
/// the outbox thread, which moves it into the files a compaction writes.
pub(crate) struct Cursor {
    log: PathBuf,
    reader: BufReader<File>,
    /// Byte position of the next line of the log (always at a line start).
    pub(crate) position: u64,
    done_path: PathBuf,
    done_log: Appender,
    /// Index of the next done line (dropped lines included).
    pub(crate) done_lines: u64,
    /// Ids of the messages whose done lines the done file holds.
    pub(crate) done: HashSet<String>,
}

impl Cursor {
    /// At the start of `log`, appending to `done_path`.
    pub(crate) fn open(
        log: PathBuf,
        done_path: PathBuf,
        done: HashSet<String>,
        done_lines: u64,
    ) -> Result<Cursor, DeliveryError> {
        let reader = BufReader::new(File::open(&log).map_err(io(&log))?);
        let done_log = Appender::open(done_path.clone())?;
        Ok(Cursor {
            log,
            reader,
            position: 0,
            done_path,
            done_log,
            done_lines,
            done,
        })
    }

    pub(crate) fn done_path(&self) -> &Path {
        &self.done_path
    }

    /// Reads the next line if it is within the durable length `synced`.
    pub(crate) fn next(&mut self, synced: u64) -> Result<Next, DeliveryError> {
        if self.position >= synced {
            return Ok(Next::Wait);
        }
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).map_err(io(&self.log))?;
        if n == 0 {
            return Ok(Next::Retry);
        }
        self.position += n as u64;
        Ok(match serde_json::from_str::<Entry>(&line) {
            Ok(Entry::Msg(m)) if !self.done.contains(&m.id) => Next::Message(Box::new(m)),
            Ok(_) => Next::Skip,
            Err(e) => {
                tracing::warn!(path = %self.log.display(), error = %e, "skipping an unreadable outbox line");
                Next::Skip
            }
        })
    }

    /// Appends a message's outcome; returns its done line's index.
    pub(crate) fn record(&mut self, done: &Done) -> Result<u64, DeliveryError> {
        self.done_log.append(done)?;
        self.done_log.flush()?;
        self.done.insert(done.id.clone());
        self.done_lines += 1;
        Ok(self.done_lines - 1)
    }

    /// Moves to the files a compaction just put in place: `position` in
    /// the new log, `done` the ids its done file holds.
    pub(crate) fn reopen(
        &mut self,
        position: u64,
        done: HashSet<String>,
    ) -> Result<(), DeliveryError> {
        let mut file = File::open(&self.log).map_err(io(&self.log))?;
        file.seek(std::io::SeekFrom::Start(position))
            .map_err(io(&self.log))?;
        self.reader = BufReader::new(file);
        self.position = position;
        self.done_log = Appender::open(self.done_path.clone())?;
        self.done = done;
        Ok(())
    }
}

/// A destination as a restart finds it.
#[derive(Debug, Default)]
pub(crate) struct LoadedDestination {
    /// Messages queued.
    pub(crate) queued: u64,
    /// Ids of the messages done.
    pub(crate) done: HashSet<String>,
    /// Index of the next done line (lines dropped by compactions
    /// included).
    pub(crate) done_lines: u64,
    /// Outcomes past the `reported` cursor, with their messages, in order:
    /// (done line index, message, outcome).
    pub(crate) unreported: Vec<(u64, Message, Done)>,
}

/// What a restart finds in the outbox.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    /// Every execution already queued (messages and merge buffers).
    pub(crate) seen: HashSet<u128>,
    /// Per destination.
    pub(crate) destinations: BTreeMap<String, LoadedDestination>,
    /// Firings of merge buffers not yet in a message.
    pub(crate) buffered: Vec<Buffered>,
    /// Lines of the logs.
    pub(crate) lines: u64,
    /// The executions of the lines each log has after the last mark of its
    /// last run (a kill's tail, a drain's last messages), with their
    /// destination: a replay that fires one again says so with an
    /// [`Entry::Again`] line.
    pub(crate) tail: HashMap<u128, String>,
}

pub(crate) fn execution_key(execution: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(execution.as_bytes())
}

/// Loads every destination's log and done file in `dir`; `reported`
/// says, per destination, how many done lines the history already has.
pub(crate) fn load(dir: &Path, reported: &BTreeMap<String, u64>) -> Result<Loaded, DeliveryError> {
    let mut loaded = Loaded::default();
    let entries = std::fs::read_dir(dir).map_err(io(dir))?;
    let files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    // A compaction cut short: the files it replaces are still whole.
    for tmp in files
        .iter()
        .filter(|p| p.extension().is_some_and(|x| x == "tmp"))
    {
        std::fs::remove_file(tmp).map_err(io(tmp))?;
    }
    let mut logs: Vec<PathBuf> = files
        .into_iter()
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    for log in logs {
        let lines: Vec<Entry> = read_lines(&log)?;
        loaded.lines += lines.len() as u64;
        // Each run's lines after its last mark (an `again` line there is a
        // tail too: no mark of its run followed it either).
        let mut tail = Vec::new();
        let mut unmarked = Vec::new();
        for entry in &lines {
            match entry {
                Entry::Run => tail.append(&mut unmarked),
                Entry::Mark(_) => unmarked.clear(),
                Entry::Msg(m) => unmarked.extend(m.executions.iter().map(|x| execution_key(x))),
                Entry::Buf(b) => unmarked.push(execution_key(&b.execution)),
                Entry::Again(a) => unmarked.push(execution_key(&a.execution)),
            }
        }
        tail.append(&mut unmarked);
        let mut covered = HashSet::new();
        let mut bufs = Vec::new();
        let mut destination = None;
        let mut queued = 0u64;
        let mut messages = Vec::new();
        for entry in lines {
            match entry {
                Entry::Msg(m) => {
                    destination.get_or_insert_with(|| m.destination());
                    queued += 1;
                    for e in &m.executions {
                        let k = execution_key(e);
                        covered.insert(k);
                        loaded.seen.insert(k);
                    }
                    messages.push(m);
                }
                Entry::Buf(b) => {
                    destination.get_or_insert_with(|| destination_of_key(&b.key));
                    loaded.seen.insert(execution_key(&b.execution));
                    bufs.push(b);
                }
                Entry::Mark(_) | Entry::Run | Entry::Again(_) => {}
            }
        }
        loaded.buffered.extend(
            bufs.into_iter()
                .filter(|b| !covered.contains(&execution_key(&b.execution))),
        );
        if let Some(d) = destination {
            loaded.tail.extend(tail.into_iter().map(|k| (k, d.clone())));
            let done = read_done(&done_path(dir, &d))?;
            let from = reported.get(&d).copied().unwrap_or(0);
            let mut by_id: BTreeMap<&str, &Message> = BTreeMap::new();
            if done.next > from {
                by_id = messages.iter().map(|m| (m.id.as_str(), m)).collect();
            }
            let mut entry = LoadedDestination {
                queued,
                done_lines: done.next,
                ..LoadedDestination::default()
            };
            for (i, outcome) in done.outcomes {
                if i >= from {
                    if let Some(m) = by_id.get(outcome.id.as_str()) {
                        entry.unreported.push((i, (*m).clone(), outcome.clone()));
                    }
                }
                entry.done.insert(outcome.id);
            }
            loaded.destinations.insert(d, entry);
        }
    }
    // A buffered firing written twice (two barriers) is one firing.
    let mut once = HashSet::new();
    loaded.buffered.retain(|b| once.insert(b.execution.clone()));
    Ok(loaded)
}

pub(crate) fn destination_of_key(key: &MergeKey) -> String {
    destination(MessageChannel::Webhook, Some(&key.endpoint))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use flowcap_rules::message::Final;

    /// A webhook message of rule `r` to endpoint `hook` (also for the
    /// compaction's tests).
    pub(crate) fn message(id: &str, exec: &str) -> Message {
        Message {
            id: id.into(),
            channel: MessageChannel::Webhook,
            endpoint: Some("hook".into()),
            to: vec![],
            subject: None,
            body: "{}".into(),
            executions: vec![exec.into()],
            firings: vec![],
            rule: Some("r".into()),
            alert_for: None,
            queued_ms: 0,
        }
    }

    fn msg(id: &str, exec: &str) -> Entry {
        Entry::Msg(message(id, exec))
    }

    #[test]
    fn load_counts_queued_and_done_and_cuts_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let d = "webhook:hook";
        let mut log = Appender::open(log_path(dir.path(), d)).unwrap();
        log.append(&msg("m1", "e1")).unwrap();
        log.append(&msg("m2", "e2")).unwrap();
        log.sync().unwrap();
        let mut done = Appender::open(done_path(dir.path(), d)).unwrap();
        done.append(&Done {
            id: "m1".into(),
            outcome: Final::Delivered,
            attempts: 1,
            status: Some(200),
            error: None,
            at_ms: 0,
        })
        .unwrap();
        done.sync().unwrap();
        // A crash in the middle of a third line.
        std::fs::OpenOptions::new()
            .append(true)
            .open(log_path(dir.path(), d))
            .unwrap()
            .write_all(b"{\"t\":\"msg\",\"id\":\"m3")
            .unwrap();
        let loaded = load(dir.path(), &BTreeMap::new()).unwrap();
        let dest = &loaded.destinations[d];
        assert_eq!(dest.queued, 2);
        assert!(dest.done.contains("m1") && !dest.done.contains("m2"));
        assert_eq!(
            dest.unreported.len(),
            1,
            "m1's outcome is not in the history yet"
        );
        let reported = BTreeMap::from([(d.to_owned(), 1)]);
        assert!(load(dir.path(), &reported).unwrap().destinations[d]
            .unreported
            .is_empty());
        assert!(loaded.seen.contains(&execution_key("e2")));
        let text = std::fs::read_to_string(log_path(dir.path(), d)).unwrap();
        assert!(text.ends_with("}\n"), "torn line cut off: {text}");
    }

    #[test]
    fn file_names_are_safe_and_distinct() {
        assert_ne!(file_stem("webhook:a/b"), file_stem("webhook:a_b"));
        assert!(file_stem("webhook:../../etc")
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
    }
}
