//! The compact binary encoding of a usage record, beside JSON for internal
//! hops where JSON's cost is not needed (JSON stays the reference, SPEC
//! section 4).

use super::{check_interval, DecodeError, DecodeLimits, BINARY_HEADER_LEN, BINARY_VERSION};
use crate::domain::Carrier;
use crate::ids::Iccid;
use crate::record::{Imei, RecordId, Usage, MAX_RECORD_ID_LEN};
use crate::time::Timestamp;

// Layout, version 1, all integers little-endian:
//
// | offset | size | content |
// | --- | --- | --- |
// | 0 | 1 | version = 1 |
// | 1 | 1 | flags: bit 0 = `start` present, bit 1 = `imei` present; other bits 0 |
// | 2 | 16 | ICCID, `Iccid::to_bits` |
// | 18 | 8 | `end`, i64 ms since the epoch |
// | 26 | 8 | `start`, i64 ms (0 when absent) |
// | 34 | 8 | `bytes_up`, u64 |
// | 42 | 8 | `bytes_down`, u64 |
// | 50 | 1 | carrier: 0 none, 1 cmcc, 2 ctcc, 3 cucc, 4 tri |
// | 51 | 1 | record id length n (1..=64) |
// | 52 | n | record id, UTF-8 |
// | 52 + n | 8 | `imei`, packed (`Imei::packed`), only when flag bit 1 is set |
//
// A record without an IMEI is laid out as before the IMEI was added.

const FLAG_START: u8 = 1;
const FLAG_IMEI: u8 = 2;

fn carrier_byte(c: Option<Carrier>) -> u8 {
    match c {
        None => 0,
        Some(Carrier::Cmcc) => 1,
        Some(Carrier::Ctcc) => 2,
        Some(Carrier::Cucc) => 3,
        Some(Carrier::Tri) => 4,
    }
}

/// Appends `u` to `out` in the binary encoding, version [`BINARY_VERSION`]:
/// a fixed [`BINARY_HEADER_LEN`]-byte little-endian header followed by the
/// record id (layout in the source, next to this function).
pub fn encode_binary(u: &Usage, out: &mut Vec<u8>) {
    let id = u.record_id.as_str().as_bytes();
    out.reserve(BINARY_HEADER_LEN + id.len());
    out.push(BINARY_VERSION);
    let start = if u.start.is_some() { FLAG_START } else { 0 };
    let imei = if u.imei.is_some() { FLAG_IMEI } else { 0 };
    out.push(start | imei);
    out.extend_from_slice(&u.iccid.to_bits().to_le_bytes());
    out.extend_from_slice(&u.end.millis().to_le_bytes());
    out.extend_from_slice(&u.start.map_or(0, Timestamp::millis).to_le_bytes());
    out.extend_from_slice(&u.bytes_up.to_le_bytes());
    out.extend_from_slice(&u.bytes_down.to_le_bytes());
    out.push(carrier_byte(u.carrier));
    // RecordId holds 1..=64 bytes, so this always fits a u8.
    out.push(id.len() as u8);
    out.extend_from_slice(id);
    if let Some(imei) = u.imei {
        out.extend_from_slice(&imei.packed().to_le_bytes());
    }
}

/// `N` bytes at `at`, or `BinaryTruncated`.
fn take<const N: usize>(b: &[u8], at: usize) -> Result<[u8; N], DecodeError> {
    b.get(at..at + N)
        .and_then(|s| <[u8; N]>::try_from(s).ok())
        .ok_or(DecodeError::BinaryTruncated {
            needed: at + N,
            len: b.len(),
        })
}

/// Decodes one record written by [`encode_binary`]. Checks everything the
/// JSON decoder checks (ICCID, record id, byte limits, `end >= start`) plus
/// the layout itself; the input must be exactly one record.
pub fn decode_binary(bytes: &[u8], limits: &DecodeLimits) -> Result<Usage, DecodeError> {
    let [version] = take::<1>(bytes, 0)?;
    if version != BINARY_VERSION {
        return Err(DecodeError::BinaryVersion { version });
    }
    let header = take::<BINARY_HEADER_LEN>(bytes, 0)?;
    let field = |at: usize| -> [u8; 8] {
        let mut a = [0u8; 8];
        if let Some(s) = header.get(at..at + 8) {
            a.copy_from_slice(s);
        }
        a
    };
    let flags = header[1];
    if flags & !(FLAG_START | FLAG_IMEI) != 0 {
        return Err(DecodeError::BinaryNonCanonical {
            what: "reserved flag bits set",
        });
    }
    let bits = u128::from_le_bytes(take::<16>(&header, 2)?);
    let end = Timestamp(i64::from_le_bytes(field(18)));
    let start_ms = i64::from_le_bytes(field(26));
    let bytes_up = u64::from_le_bytes(field(34));
    let bytes_down = u64::from_le_bytes(field(42));
    let carrier_b = header[50];
    let id_len = usize::from(header[51]);

    let iccid = Iccid::from_bits(bits).ok_or(DecodeError::BinaryBadIccid { bits })?;
    let start = if flags & FLAG_START != 0 {
        Some(Timestamp(start_ms))
    } else if start_ms != 0 {
        return Err(DecodeError::BinaryNonCanonical {
            what: "absent start is not zero",
        });
    } else {
        None
    };
    for (field, value) in [("bytes_up", bytes_up), ("bytes_down", bytes_down)] {
        if value > limits.max_bytes_per_record {
            return Err(DecodeError::AbsurdBytes {
                field,
                limit: limits.max_bytes_per_record,
            });
        }
    }
    let carrier = match carrier_b {
        0 => None,
        1 => Some(Carrier::Cmcc),
        2 => Some(Carrier::Ctcc),
        3 => Some(Carrier::Cucc),
        4 => Some(Carrier::Tri),
        byte => return Err(DecodeError::BinaryBadCarrier { byte }),
    };
    if id_len == 0 || id_len > MAX_RECORD_ID_LEN {
        return Err(DecodeError::BadRecordId { len: id_len });
    }
    let id_end = BINARY_HEADER_LEN + id_len;
    let id_bytes = bytes
        .get(BINARY_HEADER_LEN..id_end)
        .ok_or(DecodeError::BinaryTruncated {
            needed: id_end,
            len: bytes.len(),
        })?;
    let end_of_record = if flags & FLAG_IMEI != 0 {
        id_end + 8
    } else {
        id_end
    };
    let imei = if flags & FLAG_IMEI != 0 {
        let packed = u64::from_le_bytes(take::<8>(bytes, id_end)?);
        Some(
            Imei::from_packed(packed).ok_or(DecodeError::BinaryNonCanonical {
                what: "imei is not a packed IMEI",
            })?,
        )
    } else {
        None
    };
    if bytes.len() > end_of_record {
        return Err(DecodeError::TrailingData {
            offset: end_of_record,
        });
    }
    let id_text = std::str::from_utf8(id_bytes).map_err(|_| DecodeError::BinaryBadUtf8)?;
    let record_id = RecordId::new(id_text).ok_or(DecodeError::BadRecordId { len: id_len })?;
    let usage = Usage {
        record_id,
        iccid,
        start,
        end,
        bytes_up,
        bytes_down,
        carrier,
        imei,
    };
    check_interval(&usage)?;
    Ok(usage)
}
