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

/// A device's IMEI as records carry it: 1 to 17 ASCII digits, packed into
/// a non-zero `u64` the way a card's identities are kept (the digit count
/// in the top 7 bits, the value below), so a record carries it inline and
/// comparing it with the card's bound IMEI is one integer comparison.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Imei(std::num::NonZeroU64);

impl Imei {
    /// `None` unless `text` is 1 to 17 ASCII digits.
    pub fn parse(text: &[u8]) -> Option<Imei> {
        if text.is_empty() || text.len() > 17 || !text.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let value = text
            .iter()
            .fold(0u64, |acc, b| acc * 10 + u64::from(b - b'0'));
        std::num::NonZeroU64::new((text.len() as u64) << 57 | value).map(Imei)
    }

    /// The packed form (never 0).
    pub fn packed(self) -> u64 {
        self.0.get()
    }

    /// Rebuilds from [`Imei::packed`]; `None` for 0 or a value no IMEI
    /// packs to.
    pub fn from_packed(packed: u64) -> Option<Imei> {
        let len = (packed >> 57) as usize;
        let value = packed & ((1 << 57) - 1);
        let fits = (1..=17).contains(&len) && value < 10u64.pow(len as u32);
        fits.then(|| std::num::NonZeroU64::new(packed).map(Imei))
            .flatten()
    }
}

impl fmt::Display for Imei {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let len = (self.packed() >> 57) as usize;
        write!(f, "{:0len$}", self.packed() & ((1 << 57) - 1))
    }
}

impl fmt::Debug for Imei {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Imei({self})")
    }
}

/// The digits in human-readable formats (JSON), the packed `u64` in
/// binary ones (snapshots).
impl Serialize for Imei {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            serializer.serialize_u64(self.packed())
        }
    }
}

impl<'de> Deserialize<'de> for Imei {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
            Imei::parse(text.as_bytes())
                .ok_or_else(|| serde::de::Error::custom("imei must be 1 to 17 digits"))
        } else {
            let packed = u64::deserialize(deserializer)?;
            Imei::from_packed(packed).ok_or_else(|| serde::de::Error::custom("not a packed IMEI"))
        }
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
    /// The device the SIM was in, if the record names one in digits: the
    /// card binds to it at first use and a record from another device is a
    /// move (SPEC section 2.1).
    pub imei: Option<Imei>,
}

impl Usage {
    /// Usage of the record: `bytes_up + bytes_down`.
    pub fn bytes(&self) -> u64 {
        self.bytes_up.saturating_add(self.bytes_down)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imei_packs_digits_only() {
        for text in ["864000000000001", "0", "00012", "99999999999999999"] {
            let imei = Imei::parse(text.as_bytes()).unwrap();
            assert_eq!(imei.to_string(), text);
            assert_eq!(Imei::from_packed(imei.packed()), Some(imei));
            let json = serde_json::to_string(&imei).unwrap();
            assert_eq!(json, format!("\"{text}\""));
            assert_eq!(serde_json::from_str::<Imei>(&json).unwrap(), imei);
        }
        for text in ["", "86400000000000a", "123456789012345678", "+86"] {
            assert_eq!(Imei::parse(text.as_bytes()), None, "{text}");
        }
        assert_eq!(Imei::from_packed(0), None);
        assert_eq!(Imei::from_packed(1 << 57 | 10), None);
    }
}
