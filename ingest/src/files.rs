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
//! A line longer than its kind's size limit ([`crate::limits`]) is never
//! held whole: its first bytes and its length become an
//! [`Input::Oversized`] where the line stands, and the rest is skipped in
//! pieces to the next newline.
//!
//! Records are stamped with the wall-clock time they are read as their
//! receive time: "far in the future" then means more than `max_future_ms`
//! ahead of the event clock *and* of the real time, which rejects a device
//! clock in 2099 but never historical data, however long the gaps in it or
//! however old the commands before it. (A replay after a crash stamps later
//! times; only a record that was in the future at the first read and no
//! longer is at the replay could be judged differently.)

use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;

use flowcap_engine::decode::{decode_json, DecodeLimits};
use flowcap_engine::Timestamp;

use crate::embedded::{wall_clock, Input};
use crate::limits::{InputKind, SizeLimits};

mod lines;
use lines::{lines, Line};

#[derive(serde::Deserialize)]
struct At {
    at: Timestamp,
}

/// Where a read error is left for the caller to pick up after the run
/// (iterators cannot return errors to the pipeline).
pub type ReadError = Rc<RefCell<Option<std::io::Error>>>;

/// The merged input of a records file and a commands file. A line over
/// its kind's limit in `sizes` is an [`Input::Oversized`] where it stands
/// (an oversized command first, as its `at` cannot be read).
pub fn merged_inputs(
    records: Option<&Path>,
    commands: Option<&Path>,
    sizes: &SizeLimits,
) -> std::io::Result<(impl Iterator<Item = Input>, ReadError)> {
    let mut pending: Vec<(Timestamp, Input)> = Vec::new();
    if let Some(path) = commands {
        for line in lines(path, sizes.max_command_size)? {
            let at = match line? {
                Line::Whole(line) => (
                    serde_json::from_slice::<At>(&line).map_or(Timestamp::MIN, |a| a.at),
                    // Its `at` may be no further ahead of the time it was
                    // read (and of the event clock) than `max_future_ms`.
                    Input::ReceivedCommand(line, wall_clock()),
                ),
                oversized => (
                    Timestamp::MIN,
                    oversized.into_input(
                        InputKind::Command,
                        sizes.max_command_size,
                        Input::Command,
                    ),
                ),
            };
            pending.push(at);
        }
    }
    pending.sort_by_key(|(at, _)| *at);
    let mut pending = std::collections::VecDeque::from(pending);
    let error: ReadError = Rc::new(RefCell::new(None));
    let slot = error.clone();
    let mut record_lines: Box<dyn Iterator<Item = std::io::Result<Line>>> = match records {
        Some(path) => Box::new(lines(path, sizes.max_record_size)?),
        None => Box::new(std::iter::empty()),
    };
    let max_record_size = sizes.max_record_size;
    let limits = DecodeLimits::default();
    let mut held: Option<Line> = None;
    let iter = std::iter::from_fn(move || {
        if held.is_none() {
            match record_lines.next() {
                Some(Ok(line)) => held = Some(line),
                Some(Err(e)) => {
                    *slot.borrow_mut() = Some(e);
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
                Input::ReceivedRecord(bytes, wall_clock())
            })
        })
    });
    Ok((iter, error))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::limits::{Oversized, TOO_LARGE_KEPT};

    #[test]
    fn oversized_lines_stand_where_they_are_an_oversized_command_first() {
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
        let (inputs, err) = merged_inputs(Some(&records), Some(&commands), &sizes).unwrap();
        let inputs: Vec<Input> = inputs.collect();
        assert!(err.borrow().is_none());
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
        assert!(matches!(&inputs[1], Input::Command(c) if c.starts_with(b"{\"id\":\"c\"")));
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
        let (inputs, err) =
            merged_inputs(Some(&records), Some(&commands), &SizeLimits::default()).unwrap();
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
                Input::Oversized(o) => format!("X:{}", o.len),
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
