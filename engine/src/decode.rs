//! Usage record decoding: wire bytes (one Kafka message) to [`Usage`].
//!
//! # Why it is shaped this way
//!
//! Every usage record flowcap accounts passes through this module, so it is
//! the hottest code on the ingest path, and the input is untrusted (carriers
//! send what they send). Hence:
//!
//! - **Hand-written, borrowing JSON scanner.** [`decode_json`] walks the bytes
//!   once, never builds a `serde_json::Value` and allocates nothing on the
//!   heap: strings are slices of the input until they are copied into the
//!   inline [`RecordId`] / packed [`Iccid`]. A string containing escapes
//!   (`\"`, `\\`, `\u00e9`, ...) takes a slow path that unescapes it into a
//!   small stack buffer. Field validation reuses [`Iccid::parse_bytes`],
//!   [`Timestamp::parse_rfc3339_bytes`] and [`Carrier::parse`].
//! - **Still a real JSON parser.** Any valid JSON object is accepted:
//!   whitespace anywhere, fields in any order, unknown fields (skipped,
//!   including nested objects and arrays, which are fully syntax-checked),
//!   `null` for optional fields, every string escape including surrogate
//!   pairs. Invalid JSON (bad UTF-8 in strings, lone surrogates, leading
//!   zeros, control characters in strings, ...) is rejected as `not_json`.
//! - **Panic-free by construction.** All reads are bounds-checked (`get`),
//!   integer arithmetic is checked, and nesting of skipped values is capped
//!   at [`MAX_DEPTH`] so hostile input cannot overflow the stack. Proptests
//!   feed arbitrary and mutated bytes to both decoders.
//! - **One error variant per reason, with a stable code.** The code
//!   ([`DecodeError::code`]) is the dead-letter reason and a metrics label,
//!   so it must never change once shipped.
//! - **A compact binary encoding beside JSON** ([`encode_binary`] /
//!   [`decode_binary`]) for internal hops where JSON's cost is not needed;
//!   JSON stays the reference (SPEC section 4).
//!
//! What the decoder does **not** judge: whether the card is known and
//! whether the time is too far in the future. Those depend on engine state
//! and configuration, so the engine decides them.
//!
//! # Accepted values
//!
//! | field | required | JSON type | checks |
//! | --- | --- | --- | --- |
//! | `record_id` | yes | string | 1 to [`MAX_RECORD_ID_LEN`] bytes of UTF-8 (after unescaping) |
//! | `iccid` | yes | string | [`Iccid::parse_bytes`] |
//! | `end` | yes | string | RFC 3339 ([`Timestamp::parse_rfc3339_bytes`]) |
//! | `bytes_up`, `bytes_down` | yes | number | non-negative integer `<=` [`DecodeLimits::max_bytes_per_record`] |
//! | `start` | no | string or `null` | RFC 3339; `end >= start` |
//! | `carrier` | no | string or `null` | `cmcc`, `ctcc`, `cucc` or `tri` |
//! | `imei` | no | string or `null` | kept in [`Usage::imei`] when 1 to 17 digits (device binding), else ignored |
//! | `imsi`, `msisdn`, `apn`, `rat` | no | string or `null` | only the type is checked; not stored in [`Usage`] |
//!
//! Decisions (carriers send plain integers, so anything else is suspect):
//!
//! - Byte counts must be written as JSON integers: `1.5`, `100.0` and `1e3`
//!   are all rejected with `not_an_integer`, even when the value is whole.
//! - Any leading minus sign is `negative_bytes`, including `-0`.
//! - A byte count above the limit, or too large for a `u64`, is
//!   `absurd_bytes`. The limit applies to each field separately.
//! - `null` for a required field is `wrong_type` (found `null`), not
//!   `missing_field`.
//! - Duplicate keys are detected for the fields above (after unescaping the
//!   key). Repeated *unknown* keys are ignored: checking them would need a
//!   per-record set of strings, and they cannot change what is accounted.
//!
//! # Error codes
//!
//! When a message has several problems, the reported one is: invalid JSON
//! (`not_json`, `not_an_object`, `too_deep`, `trailing_data`) first; else the
//! first field-level problem in document order; else the first missing
//! required field (in the order `record_id`, `iccid`, `end`, `bytes_up`,
//! `bytes_down`); else `end_before_start`.
//!
//! | code | meaning |
//! | --- | --- |
//! | `not_json` | not valid JSON (syntax, bad UTF-8 in a string, lone surrogate, truncated) |
//! | `not_an_object` | valid JSON, but not an object |
//! | `too_deep` | an unknown field nests arrays/objects deeper than [`MAX_DEPTH`] |
//! | `trailing_data` | something other than whitespace after the record |
//! | `missing_field` | a required field is absent |
//! | `duplicate_field` | a known field appears twice |
//! | `wrong_type` | a field has the wrong JSON type |
//! | `not_an_integer` | a byte count has a fraction or an exponent |
//! | `negative_bytes` | a byte count is negative |
//! | `absurd_bytes` | a byte count exceeds [`DecodeLimits::max_bytes_per_record`] |
//! | `bad_record_id` | `record_id` is empty or longer than [`MAX_RECORD_ID_LEN`] bytes |
//! | `bad_iccid` | `iccid` is not a valid ICCID |
//! | `bad_timestamp` | `start` or `end` is not RFC 3339 |
//! | `end_before_start` | `end < start` |
//! | `unknown_carrier` | `carrier` is not one of the four |
//! | `binary_truncated` | binary record shorter than its layout |
//! | `binary_version` | binary record of an unsupported format version |
//! | `binary_non_canonical` | binary record with reserved flag bits set or an absent `start` that is not zero |
//! | `binary_bad_iccid` | binary record whose ICCID bits are not a packed ICCID |
//! | `binary_bad_utf8` | binary record whose record id is not UTF-8 |
//! | `binary_bad_carrier` | binary record with an unknown carrier byte |
//!
//! The binary decoder also reports `bad_record_id`, `absurd_bytes`,
//! `end_before_start` and `trailing_data` for the same faults as JSON.

use std::fmt::Write as _;

use crate::domain::Carrier;
use crate::ids::{Iccid, IccidError};
use crate::record::{Imei, RecordId, Usage, MAX_RECORD_ID_LEN};
use crate::time::{TimeError, Timestamp};

/// Deepest nesting of arrays and objects accepted (the record object itself
/// counts as level 1). Same as `serde_json`'s default recursion limit.
pub const MAX_DEPTH: u32 = 128;

/// Version byte of the binary encoding written by [`encode_binary`].
pub const BINARY_VERSION: u8 = 1;

/// Size of a binary record before its record id bytes.
pub const BINARY_HEADER_LEN: usize = 52;

/// Limits applied while decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest accepted `bytes_up` and largest accepted `bytes_down` (each
    /// field separately). Default: 1 TiB (`1 << 40`), far above anything
    /// one record can carry, low enough that sums never overflow.
    pub max_bytes_per_record: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_bytes_per_record: 1 << 40,
        }
    }
}

/// Why a message is not a usage record. Every variant is the sender's fault
/// (malformed input): the record goes to the dead-letter topic with
/// [`DecodeError::code`] as its reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not valid JSON.
    #[error("not valid JSON (at byte {offset})")]
    NotJson {
        /// Byte offset where the input stopped making sense.
        offset: usize,
    },
    /// Valid JSON, but not an object.
    #[error("the record must be a JSON object")]
    NotAnObject,
    /// Arrays/objects nested deeper than [`MAX_DEPTH`].
    #[error("JSON nested deeper than {MAX_DEPTH} levels (at byte {offset})")]
    TooDeep {
        /// Byte offset of the opening bracket that went too deep.
        offset: usize,
    },
    /// Non-whitespace bytes after the record.
    #[error("unexpected data after the record (at byte {offset})")]
    TrailingData {
        /// Byte offset of the first unexpected byte.
        offset: usize,
    },
    /// A required field is absent.
    #[error("missing required field `{field}`")]
    MissingField {
        /// The field's name.
        field: &'static str,
    },
    /// A known field appears more than once.
    #[error("field `{field}` appears more than once")]
    DuplicateField {
        /// The field's name.
        field: &'static str,
    },
    /// A field has the wrong JSON type.
    #[error("field `{field}` must be {expected}, found {found}")]
    WrongType {
        /// The field's name.
        field: &'static str,
        /// What the field must be.
        expected: &'static str,
        /// The JSON type found (`string`, `number`, `boolean`, `null`,
        /// `object`, `array`).
        found: &'static str,
    },
    /// A byte count with a fraction or exponent (`1.5`, `100.0`, `1e3`).
    #[error("field `{field}` must be an integer (no fraction or exponent)")]
    NotAnInteger {
        /// The field's name.
        field: &'static str,
    },
    /// A negative byte count.
    #[error("field `{field}` must not be negative")]
    NegativeBytes {
        /// The field's name.
        field: &'static str,
    },
    /// A byte count above the limit.
    #[error("field `{field}` exceeds the limit of {limit} bytes")]
    AbsurdBytes {
        /// The field's name.
        field: &'static str,
        /// The limit in force ([`DecodeLimits::max_bytes_per_record`]).
        limit: u64,
    },
    /// `record_id` empty or too long.
    #[error("record_id must have 1 to {MAX_RECORD_ID_LEN} bytes, has {len}")]
    BadRecordId {
        /// Its length in bytes (after unescaping).
        len: usize,
    },
    /// `iccid` is not a valid ICCID.
    #[error("invalid iccid: {reason}")]
    BadIccid {
        /// What is wrong with it.
        #[source]
        reason: IccidError,
    },
    /// `start` or `end` is not an RFC 3339 timestamp.
    #[error("field `{field}`: {reason}")]
    BadTimestamp {
        /// The field's name.
        field: &'static str,
        /// What is wrong with it.
        #[source]
        reason: TimeError,
    },
    /// `end` is before `start`.
    #[error("`end` is before `start`")]
    EndBeforeStart,
    /// `carrier` is not `cmcc`, `ctcc`, `cucc` or `tri`.
    #[error("unknown carrier (expected cmcc, ctcc, cucc or tri)")]
    UnknownCarrier,
    /// Binary record shorter than its layout says.
    #[error("binary record truncated: needs {needed} bytes, has {len}")]
    BinaryTruncated {
        /// Bytes needed to go on.
        needed: usize,
        /// Bytes present.
        len: usize,
    },
    /// Binary record of an unsupported version.
    #[error("unsupported binary record version {version} (supported: {BINARY_VERSION})")]
    BinaryVersion {
        /// The version byte found.
        version: u8,
    },
    /// Binary record not in canonical form.
    #[error("binary record not canonical: {what}")]
    BinaryNonCanonical {
        /// Which rule is broken.
        what: &'static str,
    },
    /// Binary record whose ICCID bits are not a packed ICCID.
    #[error("binary record has invalid ICCID bits {bits:#x}")]
    BinaryBadIccid {
        /// The bits found.
        bits: u128,
    },
    /// Binary record whose record id is not UTF-8.
    #[error("binary record id is not valid UTF-8")]
    BinaryBadUtf8,
    /// Binary record with an unknown carrier byte.
    #[error("binary record has unknown carrier byte {byte}")]
    BinaryBadCarrier {
        /// The byte found.
        byte: u8,
    },
}

impl DecodeError {
    /// Every code [`DecodeError::code`] can return.
    pub const CODES: [&'static str; 21] = [
        "not_json",
        "not_an_object",
        "too_deep",
        "trailing_data",
        "missing_field",
        "duplicate_field",
        "wrong_type",
        "not_an_integer",
        "negative_bytes",
        "absurd_bytes",
        "bad_record_id",
        "bad_iccid",
        "bad_timestamp",
        "end_before_start",
        "unknown_carrier",
        "binary_truncated",
        "binary_version",
        "binary_non_canonical",
        "binary_bad_iccid",
        "binary_bad_utf8",
        "binary_bad_carrier",
    ];

    /// Stable machine code: the dead-letter reason and metrics label. Never
    /// renamed once shipped (see the module docs for the list).
    pub fn code(&self) -> &'static str {
        match self {
            DecodeError::NotJson { .. } => "not_json",
            DecodeError::NotAnObject => "not_an_object",
            DecodeError::TooDeep { .. } => "too_deep",
            DecodeError::TrailingData { .. } => "trailing_data",
            DecodeError::MissingField { .. } => "missing_field",
            DecodeError::DuplicateField { .. } => "duplicate_field",
            DecodeError::WrongType { .. } => "wrong_type",
            DecodeError::NotAnInteger { .. } => "not_an_integer",
            DecodeError::NegativeBytes { .. } => "negative_bytes",
            DecodeError::AbsurdBytes { .. } => "absurd_bytes",
            DecodeError::BadRecordId { .. } => "bad_record_id",
            DecodeError::BadIccid { .. } => "bad_iccid",
            DecodeError::BadTimestamp { .. } => "bad_timestamp",
            DecodeError::EndBeforeStart => "end_before_start",
            DecodeError::UnknownCarrier => "unknown_carrier",
            DecodeError::BinaryTruncated { .. } => "binary_truncated",
            DecodeError::BinaryVersion { .. } => "binary_version",
            DecodeError::BinaryNonCanonical { .. } => "binary_non_canonical",
            DecodeError::BinaryBadIccid { .. } => "binary_bad_iccid",
            DecodeError::BinaryBadUtf8 => "binary_bad_utf8",
            DecodeError::BinaryBadCarrier { .. } => "binary_bad_carrier",
        }
    }

    /// The field the error is about, when there is one.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            DecodeError::MissingField { field }
            | DecodeError::DuplicateField { field }
            | DecodeError::WrongType { field, .. }
            | DecodeError::NotAnInteger { field }
            | DecodeError::NegativeBytes { field }
            | DecodeError::AbsurdBytes { field, .. }
            | DecodeError::BadTimestamp { field, .. } => Some(field),
            DecodeError::BadRecordId { .. } => Some("record_id"),
            DecodeError::BadIccid { .. } | DecodeError::BinaryBadIccid { .. } => Some("iccid"),
            DecodeError::UnknownCarrier | DecodeError::BinaryBadCarrier { .. } => Some("carrier"),
            DecodeError::BinaryBadUtf8 => Some("record_id"),
            DecodeError::EndBeforeStart => Some("end"),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------
// JSON
// ---------------------------------------------------------------------------

/// The fields flowcap knows. The discriminant is the bit in the "seen" mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    RecordId,
    Iccid,
    Start,
    End,
    BytesUp,
    BytesDown,
    Carrier,
    Imsi,
    Msisdn,
    Imei,
    Apn,
    Rat,
}

impl Field {
    /// Dispatches on length and first byte, then confirms with one compare
    /// (a chain of slice compares showed up in profiles).
    #[inline]
    fn from_key(key: &[u8]) -> Option<Field> {
        let candidate = match (key.len(), *key.first()?) {
            (9, b'r') => Field::RecordId,
            (5, b'i') => Field::Iccid,
            (5, b's') => Field::Start,
            (3, b'e') => Field::End,
            (8, b'b') => Field::BytesUp,
            (10, b'b') => Field::BytesDown,
            (7, b'c') => Field::Carrier,
            (4, b'i') if key.get(2) == Some(&b's') => Field::Imsi,
            (4, b'i') => Field::Imei,
            (6, b'm') => Field::Msisdn,
            (3, b'a') => Field::Apn,
            (3, b'r') => Field::Rat,
            _ => return None,
        };
        (key == candidate.name().as_bytes()).then_some(candidate)
    }

    fn name(self) -> &'static str {
        match self {
            Field::RecordId => "record_id",
            Field::Iccid => "iccid",
            Field::Start => "start",
            Field::End => "end",
            Field::BytesUp => "bytes_up",
            Field::BytesDown => "bytes_down",
            Field::Carrier => "carrier",
            Field::Imsi => "imsi",
            Field::Msisdn => "msisdn",
            Field::Imei => "imei",
            Field::Apn => "apn",
            Field::Rat => "rat",
        }
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

/// A JSON string as found in the input: the bytes between the quotes,
/// already checked (escapes well formed, UTF-8 valid).
#[derive(Clone, Copy)]
struct RawStr<'a> {
    raw: &'a [u8],
    escaped: bool,
}

/// Stack buffer for unescaped strings. Large enough for every string whose
/// content matters: record ids (64 bytes), ICCIDs, timestamps, carriers.
const STR_BUF: usize = 80;

impl<'a> RawStr<'a> {
    /// The string's content: borrowed from the input when it has no escapes,
    /// unescaped into `buf` otherwise. `Err(len)` when the unescaped text
    /// (of `len` bytes) does not fit in `buf`.
    fn text<'s>(&self, buf: &'s mut [u8; STR_BUF]) -> Result<&'s [u8], usize>
    where
        'a: 's,
    {
        if !self.escaped {
            return Ok(self.raw);
        }
        let len = unescape(self.raw, buf);
        buf.get(..len).ok_or(len)
    }
}

/// Unescapes a checked JSON string body into `out`, returning the full
/// unescaped length (bytes beyond `out.len()` are counted, not written).
fn unescape(raw: &[u8], out: &mut [u8]) -> usize {
    let mut n = 0;
    let mut push = |bytes: &[u8], n: &mut usize| {
        for &b in bytes {
            if let Some(slot) = out.get_mut(*n) {
                *slot = b;
            }
            *n += 1;
        }
    };
    let mut i = 0;
    while let Some(&c) = raw.get(i) {
        if c != b'\\' {
            push(&[c], &mut n);
            i += 1;
            continue;
        }
        let simple = match raw.get(i + 1) {
            Some(b'"') => b'"',
            Some(b'\\') => b'\\',
            Some(b'/') => b'/',
            Some(b'b') => 0x08,
            Some(b'f') => 0x0c,
            Some(b'n') => b'\n',
            Some(b'r') => b'\r',
            Some(b't') => b'\t',
            Some(b'u') => {
                let hi = hex4(raw, i + 2).unwrap_or(0xfffd);
                let (cp, used) = if (0xd800..0xdc00).contains(&hi) {
                    let lo = hex4(raw, i + 8).unwrap_or(0xdc00);
                    (
                        0x10000 + ((hi - 0xd800) << 10) + (lo.wrapping_sub(0xdc00) & 0x3ff),
                        12,
                    )
                } else {
                    (hi, 6)
                };
                let ch = char::from_u32(cp).unwrap_or('\u{fffd}');
                let mut utf8 = [0u8; 4];
                push(ch.encode_utf8(&mut utf8).as_bytes(), &mut n);
                i += used;
                continue;
            }
            // Unreachable on checked input; stay total anyway.
            _ => b'\\',
        };
        push(&[simple], &mut n);
        i += 2;
    }
    n
}

/// Four hex digits at `at` as a number.
fn hex4(b: &[u8], at: usize) -> Option<u32> {
    let digits = b.get(at..at + 4)?;
    digits.iter().try_fold(0u32, |acc, &c| {
        let v = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => return None,
        };
        Some(acc << 4 | u32::from(v))
    })
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// For eight string bytes (little-endian), a mask whose lowest set bit is
/// the high bit of the first byte that ends a plain-ASCII run: `"`, `\`, a
/// control character (< 0x20) or a non-ASCII byte. Zero when all eight are
/// plain. (Classic "has zero byte" arithmetic: a false positive can only
/// appear above a true one, so the lowest set bit is exact.)
#[inline(always)]
fn special_bytes(x: u64) -> u64 {
    let quote = x ^ (ONES * u64::from(b'"'));
    let backslash = x ^ (ONES * u64::from(b'\\'));
    let has_quote = quote.wrapping_sub(ONES) & !quote;
    let has_backslash = backslash.wrapping_sub(ONES) & !backslash;
    let has_control = x.wrapping_sub(ONES * 0x20) & !x;
    (has_quote | has_backslash | has_control | x) & HIGHS
}

/// A JSON number as scanned: enough to judge a byte count.
struct Number {
    negative: bool,
    integer: bool,
    /// The integer part's value; `None` when it overflows `u64`.
    value: Option<u64>,
}

/// The record's fields as they are found.
#[derive(Default)]
struct Partial {
    record_id: Option<RecordId>,
    iccid: Option<Iccid>,
    start: Option<Timestamp>,
    end: Option<Timestamp>,
    bytes_up: Option<u64>,
    bytes_down: Option<u64>,
    carrier: Option<Carrier>,
    imei: Option<Imei>,
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
    /// First field-level error, reported once the whole input is known to
    /// be valid JSON (so that syntax errors win).
    deferred: Option<DecodeError>,
}

fn json_type_name(first: u8) -> &'static str {
    match first {
        b'"' => "string",
        b'{' => "object",
        b'[' => "array",
        b't' | b'f' => "boolean",
        b'n' => "null",
        _ => "number",
    }
}

impl<'a> Parser<'a> {
    fn syntax(&self) -> DecodeError {
        DecodeError::NotJson { offset: self.i }
    }

    fn defer(&mut self, e: DecodeError) {
        if self.deferred.is_none() {
            self.deferred = Some(e);
        }
    }

    #[inline]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    #[inline]
    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.i += 1;
        }
    }

    #[inline]
    fn expect(&mut self, c: u8) -> Result<(), DecodeError> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.syntax())
        }
    }

    /// Scans a string starting at the opening quote (at `self.i`).
    ///
    /// Runs of plain ASCII are skipped eight bytes at a time; the bytes that
    /// need a look (quote, backslash, control, non-ASCII) go one by one.
    #[inline(always)]
    fn string(&mut self) -> Result<RawStr<'a>, DecodeError> {
        self.expect(b'"')?;
        let start = self.i;
        let mut i = start;
        let mut escaped = false;
        let mut non_ascii = false;
        loop {
            while let Some(chunk) = self
                .b
                .get(i..i + 8)
                .and_then(|c| <[u8; 8]>::try_from(c).ok())
            {
                let special = special_bytes(u64::from_le_bytes(chunk));
                if special != 0 {
                    i += (special.trailing_zeros() / 8) as usize;
                    break;
                }
                i += 8;
            }
            let Some(&c) = self.b.get(i) else {
                self.i = i;
                return Err(self.syntax());
            };
            match c {
                b'"' => break,
                b'\\' => {
                    escaped = true;
                    i = self.escape(i)?;
                }
                0..=0x1f => {
                    self.i = i;
                    return Err(self.syntax());
                }
                0x80.. => {
                    non_ascii = true;
                    i += 1;
                }
                _ => i += 1,
            }
        }
        let raw = self
            .b
            .get(start..i)
            .ok_or(DecodeError::NotJson { offset: start })?;
        if non_ascii && std::str::from_utf8(raw).is_err() {
            return Err(DecodeError::NotJson { offset: start });
        }
        self.i = i + 1;
        Ok(RawStr { raw, escaped })
    }

    /// Checks the escape sequence whose backslash is at `i`; returns the
    /// index just after it.
    #[inline(never)]
    fn escape(&mut self, i: usize) -> Result<usize, DecodeError> {
        let bad = |offset| Err(DecodeError::NotJson { offset });
        match self.b.get(i + 1) {
            Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => Ok(i + 2),
            Some(b'u') => {
                let Some(cp) = hex4(self.b, i + 2) else {
                    return bad(i);
                };
                match cp {
                    0xd800..=0xdbff => {
                        // A high surrogate must be followed by a low one.
                        if self.b.get(i + 6) != Some(&b'\\') || self.b.get(i + 7) != Some(&b'u') {
                            return bad(i);
                        }
                        match hex4(self.b, i + 8) {
                            Some(0xdc00..=0xdfff) => Ok(i + 12),
                            _ => bad(i),
                        }
                    }
                    0xdc00..=0xdfff => bad(i),
                    _ => Ok(i + 6),
                }
            }
            _ => bad(i),
        }
    }

    /// Scans a number (JSON grammar) starting at `self.i`.
    fn number(&mut self) -> Result<Number, DecodeError> {
        let negative = self.peek() == Some(b'-');
        if negative {
            self.i += 1;
        }
        let mut value = Some(0u64);
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                while let Some(c @ b'0'..=b'9') = self.peek() {
                    value = value
                        .and_then(|v| v.checked_mul(10))
                        .and_then(|v| v.checked_add(u64::from(c - b'0')));
                    self.i += 1;
                }
            }
            _ => return Err(self.syntax()),
        }
        let mut integer = true;
        if self.peek() == Some(b'.') {
            self.i += 1;
            integer = false;
            self.digits()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            integer = false;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            self.digits()?;
        }
        Ok(Number {
            negative,
            integer,
            value,
        })
    }

    /// One or more digits.
    fn digits(&mut self) -> Result<(), DecodeError> {
        if !matches!(self.peek(), Some(b'0'..=b'9')) {
            return Err(self.syntax());
        }
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        Ok(())
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), DecodeError> {
        match self.b.get(self.i..self.i + word.len()) {
            Some(found) if found == word => {
                self.i += word.len();
                Ok(())
            }
            _ => Err(self.syntax()),
        }
    }

    /// Skips any JSON value starting at `self.i`, checking its syntax.
    /// `depth` is the nesting level the value would open.
    fn skip_value(&mut self, depth: u32) -> Result<(), DecodeError> {
        match self.peek() {
            Some(b'"') => self.string().map(|_| ()),
            Some(b'-' | b'0'..=b'9') => self.number().map(|_| ()),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(open @ (b'[' | b'{')) => {
                if depth > MAX_DEPTH {
                    return Err(DecodeError::TooDeep { offset: self.i });
                }
                let close = if open == b'[' { b']' } else { b'}' };
                self.i += 1;
                self.skip_ws();
                if self.peek() == Some(close) {
                    self.i += 1;
                    return Ok(());
                }
                loop {
                    if open == b'{' {
                        self.string()?;
                        self.skip_ws();
                        self.expect(b':')?;
                        self.skip_ws();
                    }
                    self.skip_value(depth + 1)?;
                    self.skip_ws();
                    match self.peek() {
                        Some(b',') => {
                            self.i += 1;
                            self.skip_ws();
                        }
                        Some(c) if c == close => {
                            self.i += 1;
                            return Ok(());
                        }
                        _ => return Err(self.syntax()),
                    }
                }
            }
            _ => Err(self.syntax()),
        }
    }

    /// Reads a value that must be a string (or `null` when `nullable`).
    /// `Ok(None)` for `null` or when a type error was deferred.
    #[inline]
    fn string_field(
        &mut self,
        field: Field,
        nullable: bool,
    ) -> Result<Option<RawStr<'a>>, DecodeError> {
        match self.peek() {
            Some(b'"') => self.string().map(Some),
            Some(b'n') if nullable => self.literal(b"null").map(|()| None),
            Some(c) => {
                self.defer(DecodeError::WrongType {
                    field: field.name(),
                    expected: if nullable {
                        "a string or null"
                    } else {
                        "a string"
                    },
                    found: json_type_name(c),
                });
                self.skip_value(2).map(|()| None)
            }
            None => Err(self.syntax()),
        }
    }

    /// Reads a byte count. `None` when an error was deferred.
    #[inline]
    fn bytes_field(&mut self, field: Field, limit: u64) -> Result<Option<u64>, DecodeError> {
        match self.peek() {
            Some(b'-' | b'0'..=b'9') => {
                let n = self.number()?;
                let name = field.name();
                let err = if n.negative {
                    DecodeError::NegativeBytes { field: name }
                } else if !n.integer {
                    DecodeError::NotAnInteger { field: name }
                } else {
                    match n.value {
                        Some(v) if v <= limit => return Ok(Some(v)),
                        _ => DecodeError::AbsurdBytes { field: name, limit },
                    }
                };
                self.defer(err);
                Ok(None)
            }
            Some(c) => {
                self.defer(DecodeError::WrongType {
                    field: field.name(),
                    expected: "a non-negative integer",
                    found: json_type_name(c),
                });
                self.skip_value(2).map(|()| None)
            }
            None => Err(self.syntax()),
        }
    }

    #[inline]
    fn timestamp_field(
        &mut self,
        field: Field,
        nullable: bool,
    ) -> Result<Option<Timestamp>, DecodeError> {
        let Some(s) = self.string_field(field, nullable)? else {
            return Ok(None);
        };
        let mut buf = [0u8; STR_BUF];
        let parsed = match s.text(&mut buf) {
            Ok(text) => Timestamp::parse_rfc3339_bytes(text),
            Err(_) => Err(TimeError::Syntax),
        };
        match parsed {
            Ok(t) => Ok(Some(t)),
            Err(reason) => {
                self.defer(DecodeError::BadTimestamp {
                    field: field.name(),
                    reason,
                });
                Ok(None)
            }
        }
    }

    /// Reads the value of a known field into `rec`.
    #[inline]
    fn field(
        &mut self,
        field: Field,
        rec: &mut Partial,
        limits: &DecodeLimits,
    ) -> Result<(), DecodeError> {
        match field {
            Field::RecordId => {
                let Some(s) = self.string_field(field, false)? else {
                    return Ok(());
                };
                let mut buf = [0u8; STR_BUF];
                match s.text(&mut buf) {
                    Ok(text) => match std::str::from_utf8(text).ok().and_then(RecordId::new) {
                        Some(id) => rec.record_id = Some(id),
                        None => self.defer(DecodeError::BadRecordId { len: text.len() }),
                    },
                    Err(len) => self.defer(DecodeError::BadRecordId { len }),
                }
            }
            Field::Iccid => {
                let Some(s) = self.string_field(field, false)? else {
                    return Ok(());
                };
                let mut buf = [0u8; STR_BUF];
                let parsed = match s.text(&mut buf) {
                    Ok(text) => Iccid::parse_bytes(text),
                    Err(len) => Err(IccidError::Length(len)),
                };
                match parsed {
                    Ok(iccid) => rec.iccid = Some(iccid),
                    Err(reason) => self.defer(DecodeError::BadIccid { reason }),
                }
            }
            Field::End => rec.end = self.timestamp_field(field, false)?,
            Field::Start => rec.start = self.timestamp_field(field, true)?,
            Field::BytesUp => {
                rec.bytes_up = self.bytes_field(field, limits.max_bytes_per_record)?
            }
            Field::BytesDown => {
                rec.bytes_down = self.bytes_field(field, limits.max_bytes_per_record)?
            }
            Field::Carrier => {
                let Some(s) = self.string_field(field, true)? else {
                    return Ok(());
                };
                let mut buf = [0u8; STR_BUF];
                match s.text(&mut buf).ok().and_then(Carrier::parse) {
                    Some(c) => rec.carrier = Some(c),
                    None => self.defer(DecodeError::UnknownCarrier),
                }
            }
            Field::Imei => {
                // An IMEI that is not 1 to 17 digits binds no device (not an
                // error: the record's usage is sound).
                if let Some(s) = self.string_field(field, true)? {
                    let mut buf = [0u8; STR_BUF];
                    rec.imei = s.text(&mut buf).ok().and_then(Imei::parse);
                }
            }
            Field::Imsi | Field::Msisdn | Field::Apn | Field::Rat => {
                self.string_field(field, true)?;
            }
        }
        Ok(())
    }

    /// The first non-whitespace byte is not `{`: tell "valid JSON but not
    /// an object" from "not JSON".
    fn not_an_object(&mut self) -> DecodeError {
        if let Err(e) = self.skip_value(1) {
            return e;
        }
        self.skip_ws();
        if self.i < self.b.len() {
            return DecodeError::TrailingData { offset: self.i };
        }
        DecodeError::NotAnObject
    }

    /// Parses the record object's members (after its `{`) up to and
    /// including its `}`.
    fn members(&mut self, rec: &mut Partial, limits: &DecodeLimits) -> Result<(), DecodeError> {
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(());
        }
        let mut seen = 0u16;
        loop {
            if self.peek() != Some(b'"') {
                return Err(self.syntax());
            }
            let key = self.string()?;
            self.skip_ws();
            self.expect(b':')?;
            self.skip_ws();
            let field = if key.escaped {
                let mut buf = [0u8; STR_BUF];
                key.text(&mut buf).ok().and_then(Field::from_key)
            } else {
                Field::from_key(key.raw)
            };
            match field {
                None => self.skip_value(2)?,
                Some(f) if seen & f.bit() != 0 => {
                    self.defer(DecodeError::DuplicateField { field: f.name() });
                    self.skip_value(2)?;
                }
                Some(f) => {
                    seen |= f.bit();
                    self.field(f, rec, limits)?;
                }
            }
            self.skip_ws();
            match self.peek() {
                Some(b',') => {
                    self.i += 1;
                    self.skip_ws();
                }
                Some(b'}') => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(self.syntax()),
            }
        }
    }
}

/// Decodes one usage record from JSON (one Kafka message).
///
/// Allocation-free on valid input; see the module docs for what is
/// accepted and which error wins when there are several.
pub fn decode_json(bytes: &[u8], limits: &DecodeLimits) -> Result<Usage, DecodeError> {
    let mut p = Parser {
        b: bytes,
        i: 0,
        deferred: None,
    };
    p.skip_ws();
    match p.peek() {
        Some(b'{') => p.i += 1,
        Some(_) => return Err(p.not_an_object()),
        None => return Err(p.syntax()),
    }
    let mut rec = Partial::default();
    p.members(&mut rec, limits)?;
    p.skip_ws();
    if p.i < bytes.len() {
        return Err(DecodeError::TrailingData { offset: p.i });
    }
    if let Some(e) = p.deferred {
        return Err(e);
    }
    let missing = |field: &'static str| DecodeError::MissingField { field };
    let usage = Usage {
        record_id: rec.record_id.ok_or(missing("record_id"))?,
        iccid: rec.iccid.ok_or(missing("iccid"))?,
        end: rec.end.ok_or(missing("end"))?,
        bytes_up: rec.bytes_up.ok_or(missing("bytes_up"))?,
        bytes_down: rec.bytes_down.ok_or(missing("bytes_down"))?,
        start: rec.start,
        carrier: rec.carrier,
        imei: rec.imei,
    };
    check_interval(&usage)?;
    Ok(usage)
}

fn check_interval(u: &Usage) -> Result<(), DecodeError> {
    match u.start {
        Some(start) if u.end < start => Err(DecodeError::EndBeforeStart),
        _ => Ok(()),
    }
}

/// Writes `u` as a SPEC section 4 JSON object (compact, fields in SPEC
/// order, `start`/`carrier`/`imei` omitted when absent), timestamps at UTC
/// offset `offset_secs` with millisecond precision. Appends to `out`.
///
/// [`decode_json`] reads the output back to `u` as long as the timestamps,
/// shifted by the offset, fall in years 0000 to 9999 (what RFC 3339 can
/// express) and `offset_secs` is a whole number of minutes.
pub fn encode_json(u: &Usage, offset_secs: i32, out: &mut String) {
    out.push_str("{\"record_id\":");
    push_json_str(u.record_id.as_str(), out);
    out.push_str(",\"iccid\":\"");
    // Writing to a String cannot fail.
    let _ = write!(out, "{}", u.iccid);
    if let Some(start) = u.start {
        out.push_str("\",\"start\":\"");
        let _ = start.write_rfc3339(offset_secs, out);
    }
    out.push_str("\",\"end\":\"");
    let _ = u.end.write_rfc3339(offset_secs, out);
    let _ = write!(
        out,
        "\",\"bytes_up\":{},\"bytes_down\":{}",
        u.bytes_up, u.bytes_down
    );
    if let Some(carrier) = u.carrier {
        out.push_str(",\"carrier\":\"");
        out.push_str(carrier.as_str());
        out.push('"');
    }
    if let Some(imei) = u.imei {
        let _ = write!(out, ",\"imei\":\"{imei}\"");
    }
    out.push('}');
}

/// Writes `s` as a JSON string literal.
fn push_json_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

mod binary;
pub use binary::{decode_binary, encode_binary};

#[cfg(test)]
mod tests;
