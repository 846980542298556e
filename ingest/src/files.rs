//! JSON-lines files as pipeline input.
//!
//! Usage records come from one file, commands from another. They are merged
//! into one deterministic sequence: before each record, every command whose
//! `at` is not after the record's `end` is applied (commands in `at` order,
//! file order among equal times); the rest follow the last record. A
//! command whose `at` cannot be read is applied first (it is journaled as
//! malformed there). The same files always give the same sequence, so the
//! sequence number of an input is a stable position to resume from.
//!
//! Records are stamped with the wall-clock time they are read as their
//! receive time: "far in the future" then means more than `max_future_ms`
//! ahead of the event clock *and* of the real time, which rejects a device
//! clock in 2099 but never historical data, however long the gaps in it or
//! however old the commands before it. (A replay after a crash stamps later
//! times; only a record that was in the future at the first read and no
//! longer is at the replay could be judged differently.)

use std::cell::RefCell;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::rc::Rc;

use flowcap_engine::decode::{decode_json, DecodeLimits};
use flowcap_engine::Timestamp;

use crate::embedded::{wall_clock, Input};

/// Reads non-empty lines of a JSON-lines file as bytes.
fn lines(path: &Path) -> std::io::Result<impl Iterator<Item = std::io::Result<Vec<u8>>>> {
    let reader = BufReader::with_capacity(1 << 20, File::open(path)?);
    Ok(reader.split(b'\n').filter_map(|line| match line {
        Ok(mut l) => {
            if l.last() == Some(&b'\r') {
                l.pop();
            }
            (!l.iter().all(u8::is_ascii_whitespace)).then_some(Ok(l))
        }
        Err(e) => Some(Err(e)),
    }))
}

#[derive(serde::Deserialize)]
struct At {
    at: Timestamp,
}

/// Where a read error is left for the caller to pick up after the run
/// (iterators cannot return errors to the pipeline).
pub type ReadError = Rc<RefCell<Option<std::io::Error>>>;

/// The merged input of a records file and a commands file.
pub fn merged_inputs(
    records: Option<&Path>,
    commands: Option<&Path>,
) -> std::io::Result<(impl Iterator<Item = Input>, ReadError)> {
    let mut pending: Vec<(Timestamp, Vec<u8>)> = Vec::new();
    if let Some(path) = commands {
        for line in lines(path)? {
            let line = line?;
            let at = serde_json::from_slice::<At>(&line).map_or(Timestamp::MIN, |a| a.at);
            pending.push((at, line));
        }
    }
    pending.sort_by_key(|(at, _)| *at);
    let mut pending = std::collections::VecDeque::from(pending);
    let error: ReadError = Rc::new(RefCell::new(None));
    let slot = error.clone();
    let mut record_lines: Box<dyn Iterator<Item = std::io::Result<Vec<u8>>>> = match records {
        Some(path) => Box::new(lines(path)?),
        None => Box::new(std::iter::empty()),
    };
    let limits = DecodeLimits::default();
    let mut held: Option<Vec<u8>> = None;
    let iter = std::iter::from_fn(move || {
        if held.is_none() {
            match record_lines.next() {
                Some(Ok(line)) => held = Some(line),
                Some(Err(e)) => {
                    *slot.borrow_mut() = Some(e);
                    return None;
                }
                None => return pending.pop_front().map(|(_, c)| received_command(c)),
            }
        }
        let record = held.as_ref()?;
        let end = decode_json(record, &limits).map_or(Timestamp::MIN, |u| u.end);
        if pending.front().is_some_and(|(at, _)| *at <= end) {
            return pending.pop_front().map(|(_, c)| received_command(c));
        }
        held.take()
            .map(|bytes| Input::ReceivedRecord(bytes, wall_clock()))
    });
    Ok((iter, error))
}

/// A command line with the time it was read: its `at` may be no further
/// ahead of that (and of the event clock) than `max_future_ms`.
fn received_command(line: Vec<u8>) -> Input {
    Input::ReceivedCommand(line, wall_clock())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let (inputs, err) = merged_inputs(Some(&records), Some(&commands)).unwrap();
        let order: Vec<String> = inputs
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
            })
            .collect();
        assert!(err.borrow().is_none());
        assert_eq!(order.len(), 7);
        assert_eq!(order[0], "C:not json");
        assert!(order[1].contains("first"));
        assert!(order[2].starts_with("R:{\"record_id\":\"a"));
        assert_eq!(order[3], "R:garbage");
        assert!(order[4].contains("late"));
        assert!(order[5].starts_with("R:{\"record_id\":\"b"));
        assert!(order[6].contains("end"));
    }
}
