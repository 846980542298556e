//! The usage record as the engine sees it.
//!
//! Decoding (JSON or the binary encoding, see [`crate::decode`]) turns wire
//! bytes into a [`Usage`]: a fixed-size, `Copy` value with the record id
//! stored inline, so that batches move from the router to the shards with no
//! per-record heap allocation.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::domain::Carrier;
use crate::ids::Iccid;
use crate::time::Timestamp;

/// Longest accepted `record_id`, in bytes. Longer ids are rejected as
/// malformed (carriers' ids are ~24 characters; a UUID is 36).
pub const MAX_RECORD_ID_LEN: usize = 64;

/// A carrier's record id, stored inline (at most [`MAX_RECORD_ID_LEN`]
/// bytes of UTF-8).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordId {
    len: u8,
    bytes: [u8; MAX_RECORD_ID_LEN],
}

impl RecordId {
    /// `None` when empty or longer than [`MAX_RECORD_ID_LEN`].
    pub fn new(text: &str) -> Option<RecordId> {
        let src = text.as_bytes();
        if src.is_empty() || src.len() > MAX_RECORD_ID_LEN {
            return None;
        }
        let mut bytes = [0u8; MAX_RECORD_ID_LEN];
        bytes[..src.len()].copy_from_slice(src);
        Some(RecordId {
            len: src.len() as u8,
            bytes,
        })
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        // Constructed only from &str, so always valid UTF-8; the fallback
        // keeps this total without a panic path.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("")
    }
}

impl fmt::Debug for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecordId({:?})", self.as_str())
    }
}

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for RecordId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for RecordId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        RecordId::new(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "record_id must have 1 to {MAX_RECORD_ID_LEN} bytes"
            ))
        })
    }
}

/// One decoded usage record: what the engine accounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// The carrier's id for this record; a repeat for the same card is a
    /// duplicate.
    pub record_id: RecordId,
    /// The card.
    pub iccid: Iccid,
    /// Start of the usage interval, if reported.
    pub start: Option<Timestamp>,
    /// End of the usage interval: the record's event time.
    pub end: Timestamp,
    /// Uplink bytes.
    pub bytes_up: u64,
    /// Downlink bytes.
    pub bytes_down: u64,
    /// Carrier named by the record, if any (informational: the card's
    /// configured carrier decides its cycle).
    pub carrier: Option<Carrier>,
}

impl Usage {
    /// Usage of the record: `bytes_up + bytes_down`.
    pub fn bytes(&self) -> u64 {
        self.bytes_up.saturating_add(self.bytes_down)
    }
}
