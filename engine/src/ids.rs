//! Identifier newtypes.
//!
//! An [`Iccid`] is packed into a `u128` so that the per-card maps on the hot
//! path hash and compare one machine word pair instead of a string, and so
//! that a card's key costs 16 bytes of memory rather than a heap string.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a string is not an ICCID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IccidError {
    /// ICCIDs have 19 or 20 characters.
    #[error("ICCID must have 19 or 20 characters, got {0}")]
    Length(usize),
    /// Only digits, with at most one trailing ASCII letter.
    #[error("ICCID must be digits with at most a trailing letter, found {found:?} at position {position}")]
    Character {
        /// The offending character.
        found: char,
        /// Its zero-based byte position.
        position: usize,
    },
}

/// A SIM card's ICCID: 19-20 characters, digits with at most a trailing
/// ASCII letter. Stored packed: digit value in the low 67 bits, the digit
/// count in bits 72..80 and the trailing letter (0 = none) in bits 80..88.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Iccid(u128);

const DIGIT_BITS: u32 = 72;
const LETTER_SHIFT: u32 = 80;

impl Iccid {
    /// Parses and validates an ICCID from its text.
    pub fn parse(text: &str) -> Result<Self, IccidError> {
        Self::parse_bytes(text.as_bytes())
    }

    /// Parses and validates an ICCID from ASCII bytes.
    pub fn parse_bytes(bytes: &[u8]) -> Result<Self, IccidError> {
        let len = bytes.len();
        if !(19..=20).contains(&len) {
            return Err(IccidError::Length(len));
        }
        let (digits, letter) = match bytes[len - 1] {
            b if b.is_ascii_alphabetic() => (&bytes[..len - 1], b),
            _ => (bytes, 0u8),
        };
        let mut value: u128 = 0;
        for (position, &b) in digits.iter().enumerate() {
            if !b.is_ascii_digit() {
                return Err(IccidError::Character {
                    found: char::from(b),
                    position,
                });
            }
            value = value * 10 + u128::from(b - b'0');
        }
        let packed =
            value | (digits.len() as u128) << DIGIT_BITS | u128::from(letter) << LETTER_SHIFT;
        Ok(Iccid(packed))
    }

    /// The packed representation (stable: used in snapshots and ids).
    pub fn to_bits(self) -> u128 {
        self.0
    }

    /// Rebuilds an ICCID from [`Iccid::to_bits`]; `None` when the bits are
    /// not a valid packed ICCID.
    ///
    /// Checks the packing directly (no formatting, no allocation): the
    /// binary record decoder calls it once per record.
    pub fn from_bits(bits: u128) -> Option<Self> {
        let candidate = Iccid(bits);
        if bits >> (LETTER_SHIFT + 8) != 0 {
            return None;
        }
        let letter = candidate.letter();
        if letter != 0 && !letter.is_ascii_alphabetic() {
            return None;
        }
        let digits = candidate.digit_count();
        if !(19..=20).contains(&(digits + usize::from(letter != 0))) {
            return None;
        }
        // 10^20 < 2^67, so this also proves the bits between the value and
        // the digit count are zero.
        if candidate.value() >= 10u128.pow(digits as u32) {
            return None;
        }
        Some(candidate)
    }

    /// A 64-bit hash of the ICCID, stable across runs and platforms (used for
    /// shard routing and deterministic ids).
    pub fn stable_hash(self) -> u64 {
        xxhash_rust::xxh3::xxh3_64(&self.0.to_le_bytes())
    }

    fn digit_count(self) -> usize {
        ((self.0 >> DIGIT_BITS) & 0xff) as usize
    }

    fn letter(self) -> u8 {
        ((self.0 >> LETTER_SHIFT) & 0xff) as u8
    }

    fn value(self) -> u128 {
        self.0 & ((1u128 << DIGIT_BITS) - 1)
    }
}

impl fmt::Display for Iccid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:0width$}", self.value(), width = self.digit_count())?;
        match self.letter() {
            0 => Ok(()),
            l => write!(f, "{}", char::from(l)),
        }
    }
}

impl fmt::Debug for Iccid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Iccid({self})")
    }
}

impl FromStr for Iccid {
    type Err = IccidError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Iccid::parse(s)
    }
}

/// Text in human-readable formats (JSON), the packed bits in binary ones
/// (snapshots).
impl Serialize for Iccid {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            serializer.serialize_u128(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Iccid {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
            Iccid::parse(&text).map_err(serde::de::Error::custom)
        } else {
            let bits = u128::deserialize(deserializer)?;
            Iccid::from_bits(bits).ok_or_else(|| serde::de::Error::custom("invalid packed ICCID"))
        }
    }
}

/// Maximum length of the string ids (plans, pools, rules, tags, ...).
pub const MAX_NAME_ID_LEN: usize = 128;

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name(s.to_owned())
            }
        }
    };
}

string_id!(
    /// A plan's id, e.g. `cmcc-30m`.
    PlanId
);
string_id!(
    /// A forward or backward pool's id.
    PoolId
);
string_id!(
    /// An operator tag's name.
    TagId
);
string_id!(
    /// A command's id (unique; repeats are answered with the first result).
    CommandId
);

impl PoolId {
    /// Stable 64-bit hash used to route a pool (and its members) to a shard.
    pub fn stable_hash(&self) -> u64 {
        xxhash_rust::xxh3::xxh3_64(self.0.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_twenty_digits_and_trailing_letter() {
        for text in [
            "89860412345678901234",
            "8986041234567890123",
            "8986041234567890123F",
            "898604123456789012f",
            "00000000000000000001",
            "99999999999999999999",
        ] {
            let iccid = Iccid::parse(text).unwrap();
            assert_eq!(iccid.to_string(), text);
            assert_eq!(Iccid::from_bits(iccid.to_bits()), Some(iccid));
        }
    }

    #[test]
    fn leading_zeros_distinguish_cards() {
        let a = Iccid::parse("0898604123456789012").unwrap();
        let b = Iccid::parse("89860412345678901200").unwrap();
        assert_ne!(a, b);
        assert_eq!(a.to_string(), "0898604123456789012");
    }

    #[test]
    fn rejects_bad_length_and_characters() {
        assert_eq!(Iccid::parse("123"), Err(IccidError::Length(3)));
        assert_eq!(
            Iccid::parse("898604123456789012345"),
            Err(IccidError::Length(21))
        );
        assert!(matches!(
            Iccid::parse("8986041234567890X234"),
            Err(IccidError::Character {
                found: 'X',
                position: 16
            })
        ));
        assert!(matches!(
            Iccid::parse("898604123456789012AB"),
            Err(IccidError::Character { found: 'A', .. })
        ));
    }

    /// The packing check agrees with "format, re-parse, compare".
    #[test]
    fn from_bits_matches_text_round_trip() {
        let reference = |bits: u128| {
            let candidate = Iccid(bits);
            Iccid::parse(&candidate.to_string())
                .ok()
                .filter(|parsed| *parsed == candidate)
        };
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..200_000 {
            let r = next();
            let value = match r % 4 {
                0 => u128::from(next()) * 100_000 + u128::from(next() % 100_000),
                1 => 10u128.pow(19 + (r as u32 >> 8) % 2) - 1 + u128::from(next() % 3),
                _ => (u128::from(next()) << 64 | u128::from(next())) % (1u128 << 72),
            };
            let digits = u128::from(17 + next() % 5);
            let letter = match next() % 4 {
                0 => 0,
                1 => u128::from(b'A' + (next() % 26) as u8),
                _ => u128::from(next() as u8),
            };
            let high = if next() % 16 == 0 {
                u128::from(next() % 4) << 88
            } else {
                0
            };
            let bits = value | digits << DIGIT_BITS | letter << LETTER_SHIFT | high;
            assert_eq!(Iccid::from_bits(bits), reference(bits), "{bits:#x}");
        }
    }

    #[test]
    fn serde_uses_text() {
        let iccid = Iccid::parse("89860412345678901234").unwrap();
        let json = serde_json::to_string(&iccid).unwrap();
        assert_eq!(json, "\"89860412345678901234\"");
        let back: Iccid = serde_json::from_str(&json).unwrap();
        assert_eq!(back, iccid);
        assert!(serde_json::from_str::<Iccid>("\"12\"").is_err());
    }
}
