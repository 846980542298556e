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

use std::collections::{BTreeMap, HashSet};
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

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DeliveryError + '_ {
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

/// A destination as a restart finds it.
#[derive(Debug, Default)]
pub(crate) struct LoadedDestination {
    /// Messages queued.
    pub(crate) queued: u64,
    /// Ids of the messages done.
    pub(crate) done: HashSet<String>,
    /// Lines of the done file.
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
}

pub(crate) fn execution_key(execution: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(execution.as_bytes())
}

/// Loads every destination's log and done file in `dir`; `reported`
/// says, per destination, how many done lines the history already has.
pub(crate) fn load(dir: &Path, reported: &BTreeMap<String, u64>) -> Result<Loaded, DeliveryError> {
    let mut loaded = Loaded::default();
    let entries = std::fs::read_dir(dir).map_err(io(dir))?;
    let mut logs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    for log in logs {
        let lines: Vec<Entry> = read_lines(&log)?;
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
            }
        }
        loaded.buffered.extend(
            bufs.into_iter()
                .filter(|b| !covered.contains(&execution_key(&b.execution))),
        );
        if let Some(d) = destination {
            let done: Vec<Done> = read_lines(&done_path(dir, &d))?;
            let from = reported.get(&d).copied().unwrap_or(0);
            let mut by_id: BTreeMap<&str, &Message> = BTreeMap::new();
            if (done.len() as u64) > from {
                by_id = messages.iter().map(|m| (m.id.as_str(), m)).collect();
            }
            let mut entry = LoadedDestination {
                queued,
                ..LoadedDestination::default()
            };
            for (i, outcome) in done.into_iter().enumerate() {
                let i = i as u64;
                if i >= from {
                    if let Some(m) = by_id.get(outcome.id.as_str()) {
                        entry.unreported.push((i, (*m).clone(), outcome.clone()));
                    }
                }
                entry.done.insert(outcome.id);
                entry.done_lines = i + 1;
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
mod tests {
    use super::*;
    use flowcap_rules::message::Final;

    fn msg(id: &str, exec: &str) -> Entry {
        Entry::Msg(Message {
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
        })
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
