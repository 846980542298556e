//! Identifier newtypes.
//!
//! An [`Iccid`] is packed into a `u128` so that the per-card maps on the hot
//! path hash and compare one machine word pair instead of a string, and so
//! that a card's key costs 16 bytes of memory rather than a heap string.
//! It still *orders* as its text does: the history's files are sorted by
//! card with this order and merged, and read by SQL, by the text's.

use std::fmt::{self, Write as _};
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
///
/// Ordered as the texts are (byte by byte, as SQL's `ORDER BY iccid`):
/// `"0898…"` before `"8986…"`, a 19-digit ICCID before the 20-digit ones it
/// is a prefix of.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Iccid(u128);

/// The longest ICCID text.
const MAX_TEXT: usize = 20;

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

    /// The text, rendered into a stack buffer: the first `len` bytes.
    fn text(self) -> ([u8; MAX_TEXT], usize) {
        let mut out = [b'0'; MAX_TEXT];
        let digits = self.digit_count().min(MAX_TEXT);
        // value < 10^20: two halves of ten digits, each fits a u64, so
        // one u128 division and then cheap 64-bit ones.
        let value = self.value();
        let halves = [
            (value / 10_000_000_000) as u64,
            (value % 10_000_000_000) as u64,
        ];
        let mut at = MAX_TEXT;
        for mut half in halves.into_iter().rev() {
            for _ in 0..10 {
                at -= 1;
                out[at] = b'0' + (half % 10) as u8;
                half /= 10;
            }
        }
        // The 20-digit rendering ends in the value's digits: keep the last
        // `digits` of them.
        out.copy_within(MAX_TEXT - digits.., 0);
        let mut len = digits;
        if self.letter() != 0 && len < MAX_TEXT {
            out[len] = self.letter();
            len += 1;
        }
        (out, len)
    }

    /// Digit count and letter: ICCIDs of one class have texts of one
    /// length and shape, ordered as their values.
    fn class(self) -> u128 {
        self.0 >> DIGIT_BITS
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

impl Ord for Iccid {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        if self.class() == other.class() {
            // Same length and letter: the values order as the texts.
            return self.0.cmp(&other.0);
        }
        let (a, a_len) = self.text();
        let (b, b_len) = other.text();
        a[..a_len].cmp(&b[..b_len]).then(self.0.cmp(&other.0))
    }
}

impl PartialOrd for Iccid {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Iccid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (text, _) = self.text();
        let digits = self.digit_count().min(MAX_TEXT);
        // ASCII digits: always UTF-8.
        f.write_str(std::str::from_utf8(&text[..digits]).map_err(|_| fmt::Error)?)?;
        match self.letter() {
            0 => Ok(()),
            l => f.write_char(char::from(l)),
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

    use proptest::strategy::Strategy;

    fn iccid_text() -> impl Strategy<Value = String> {
        // Mixed lengths, leading zeros, letters and (from few digits) long
        // shared prefixes: where the packed order and the text order part.
        proptest::string::string_regex("[089]?[01]{17,18}[019Fa]?")
            .expect("regex")
            .prop_filter("19 or 20 characters", |s| (19..=20).contains(&s.len()))
    }

    proptest::proptest! {
        #[test]
        fn orders_as_the_text(a in iccid_text(), b in iccid_text()) {
            let (x, y) = (Iccid::parse(&a).unwrap(), Iccid::parse(&b).unwrap());
            proptest::prop_assert_eq!(x.cmp(&y), a.cmp(&b), "{} vs {}", a, b);
            proptest::prop_assert_eq!(x.to_string(), a);
        }
    }

    #[test]
    fn a_prefix_orders_first_and_leading_zeros_count() {
        let texts = [
            "0898604123456789012",
            "8986041234567890123",
            "89860412345678901230",
            "89860412345678901231",
            "8986041234567890123F",
            "8986041234567890124",
        ];
        let mut iccids: Vec<Iccid> = texts.iter().map(|t| Iccid::parse(t).unwrap()).collect();
        iccids.reverse();
        iccids.sort();
        let back: Vec<String> = iccids.iter().map(Iccid::to_string).collect();
        assert_eq!(back, texts);
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
