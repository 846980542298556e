//! Bounds on bad input: the largest record and command the pipelines
//! read, and how much of a bad input a dead letter keeps.
//!
//! Without them one input could stop the pipeline for good: a message of
//! about 1 MB whose dead letter embedded it whole passed the producer's
//! `message.max.bytes` (the DLQ send failed, the pipeline stopped, and the
//! replay after a restart stopped on it again), and a multi-gigabyte line
//! was read whole into memory (and over 2 GiB panicked the history
//! encoder). Now:
//!
//! - an input over its limit ([`SizeLimits`]) is never read whole: the file
//!   reader keeps its first [`TOO_LARGE_KEPT`] bytes and skips to the next
//!   line; in Kafka mode the message (whole in librdkafka's buffer,
//!   bounded by the consumer's fetch settings) is not decoded. Either way
//!   it is dead-lettered as `too_large` ([`Oversized`]) and the next input
//!   follows;
//! - every dead letter is bounded: its `raw` keeps at most [`RAW_KEPT`]
//!   bytes of the input and its message [`MESSAGE_KEPT`], marked
//!   `raw_truncated` with the full `raw_len` when cut, and on Kafka the
//!   whole message stays under the producer's `message.max.bytes`
//!   ([`fit`]). The cut depends only on the input and the configuration, so
//!   a replay after a crash writes the same bytes.

use serde::{Deserialize, Serialize};

use crate::embedded::Input;

/// Default largest usage record, in bytes: a record is about 200 bytes of
/// JSON; 64 KiB leaves room for unknown fields and never holds up a batch.
pub const DEFAULT_MAX_RECORD_SIZE: usize = 64 * 1024;

/// Default largest command, in bytes: a batch command may name 100,000
/// ICCIDs (about 2.5 MB as JSON) with per-card values; 64 MiB is 25 times
/// that and still a bounded allocation.
pub const DEFAULT_MAX_COMMAND_SIZE: usize = 64 * 1024 * 1024;

/// What a dead letter keeps of an input over its size limit: the first
/// 4 KiB, enough to see what it was.
pub const TOO_LARGE_KEPT: usize = 4 * 1024;

/// The most of any other bad input a dead letter keeps (a record under the
/// default limit is kept whole; a bad command of megabytes is cut).
pub const RAW_KEPT: usize = 64 * 1024;

/// The most of an error message a dead letter keeps (a parser's message
/// may quote the input).
pub const MESSAGE_KEPT: usize = 1024;

/// Sizes above which an input is not read but dead-lettered as
/// `too_large`. A line of an input file is a record or a command (by the
/// file it is in) and takes that kind's limit; so does a Kafka message (by
/// its topic).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SizeLimits {
    /// Largest usage record in bytes (a records-file line without its line
    /// end, or a usage message). Default 64 KiB.
    pub max_record_size: usize,
    /// Largest command in bytes (a commands-file line without its line
    /// end, or a commands message). Default 64 MiB.
    pub max_command_size: usize,
}

impl Default for SizeLimits {
    fn default() -> Self {
        SizeLimits {
            max_record_size: DEFAULT_MAX_RECORD_SIZE,
            max_command_size: DEFAULT_MAX_COMMAND_SIZE,
        }
    }
}

impl SizeLimits {
    /// `input`, or what is kept of it when it is over its kind's limit
    /// (an input given whole, as by an iterator other than the file
    /// reader, which never reads an oversized line whole).
    pub fn check(&self, input: Input) -> Input {
        let (kind, bytes, limit) = match &input {
            Input::Record(b) | Input::ReceivedRecord(b, _) => {
                (InputKind::Record, b, self.max_record_size)
            }
            Input::Command(b) | Input::ReceivedCommand(b, _) => {
                (InputKind::Command, b, self.max_command_size)
            }
            Input::Oversized(_) => return input,
        };
        if bytes.len() <= limit {
            return input;
        }
        Input::Oversized(Oversized::of(kind, bytes, limit))
    }
}

/// Which kind of input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// A usage record.
    Record,
    /// A control command.
    Command,
}

impl InputKind {
    fn name(self) -> &'static str {
        match self {
            InputKind::Record => "record",
            InputKind::Command => "command",
        }
    }
}

/// An input over its size limit: what is kept of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Oversized {
    /// A record or a command.
    pub kind: InputKind,
    /// Its first [`TOO_LARGE_KEPT`] bytes.
    pub head: Vec<u8>,
    /// Its full length in bytes.
    pub len: u64,
    /// The limit it exceeds.
    pub limit: u64,
}

impl Oversized {
    /// The reason code of its dead letter.
    pub const CODE: &'static str = "too_large";

    /// `bytes`, known to exceed `limit`: its head is copied.
    pub fn of(kind: InputKind, bytes: &[u8], limit: usize) -> Oversized {
        Oversized {
            kind,
            head: bytes[..bytes.len().min(TOO_LARGE_KEPT)].to_vec(),
            len: bytes.len() as u64,
            limit: limit as u64,
        }
    }

    /// The dead letter's message.
    pub fn message(&self) -> String {
        format!(
            "{} of {} bytes exceeds the limit of {} bytes",
            self.kind.name(),
            self.len,
            self.limit
        )
    }
}

/// `s` cut to at most `max` bytes, on a character boundary.
pub(crate) fn cut_str(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The kept bytes as text when they are UTF-8 (a cut that split the last
/// character drops it), `None` when they are not.
pub(crate) fn text(kept: &[u8], truncated: bool) -> Option<&str> {
    match std::str::from_utf8(kept) {
        Ok(s) => Some(s),
        Err(e) if truncated && e.error_len().is_none() => {
            std::str::from_utf8(&kept[..e.valid_up_to()]).ok()
        }
        Err(_) => None,
    }
}

/// The largest `keep <= start` (halving from `start`) for which
/// `size(keep)` is at most `budget`, or 0: how much of a bad input's raw
/// bytes a dead letter keeps so that the whole message fits. Only a
/// producer limit far below the default 1,000,000 bytes ever cuts below
/// [`RAW_KEPT`] (a 64 KiB raw is at most 384 KiB as JSON).
pub(crate) fn fit<E>(
    start: usize,
    budget: usize,
    mut size: impl FnMut(usize) -> Result<usize, E>,
) -> Result<usize, E> {
    let mut keep = start;
    while keep > 0 && size(keep)? > budget {
        keep /= 2;
    }
    Ok(keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_oversized_input_keeps_its_head_and_length() {
        let big = vec![b'x'; 100_000];
        let o = Oversized::of(InputKind::Command, &big, 65_536);
        assert_eq!(
            (o.head.len(), o.len, o.limit),
            (TOO_LARGE_KEPT, 100_000, 65_536)
        );
        assert_eq!(
            o.message(),
            "command of 100000 bytes exceeds the limit of 65536 bytes"
        );
    }

    #[test]
    fn text_drops_a_character_split_by_the_cut_only() {
        let s = "é".repeat(10);
        assert_eq!(text(&s.as_bytes()[..5], true), Some("éé"));
        assert_eq!(text(&s.as_bytes()[..5], false), None);
        assert_eq!(text(b"\xff\xfeabc", true), None);
        assert_eq!(cut_str(&s, 5), "éé");
    }

    #[test]
    fn fit_halves_until_the_message_fits() {
        let keep = fit(65_536, 10_000, |k| Ok::<_, ()>(k * 6 + 200)).unwrap();
        assert!(keep * 6 + 200 <= 10_000 && keep > 0, "{keep}");
        assert_eq!(fit(65_536, 10, |_| Ok::<_, ()>(11)).unwrap(), 0);
        assert_eq!(fit(100, 10_000, Ok::<_, ()>).unwrap(), 100);
    }
}
