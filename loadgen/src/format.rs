//! Text rendering: SPEC section 4 JSON lines, card identities, and the
//! malformed variants.

use std::fmt::Write as _;

use flowcap_engine::time::{civil_from_days, MS_PER_DAY};
use flowcap_engine::{Carrier, Iccid, Imei, Timestamp, Usage};

use crate::records::Defect;
use crate::rng::Xoshiro;
use crate::workload::UTC_OFFSET_SECS;

/// Writes `value` as zero-padded decimal digits filling `buf` (high digits
/// beyond the buffer are dropped).
pub(crate) fn write_digits(buf: &mut [u8], mut value: u64) {
    for slot in buf.iter_mut().rev() {
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// The optional identity fields of a card, derived from its number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identities {
    pub(crate) imsi: String,
    pub(crate) msisdn: String,
    pub(crate) imei: String,
}

fn mnc(carrier: Carrier) -> &'static str {
    match carrier {
        Carrier::Cmcc => "04",
        Carrier::Ctcc => "11",
        Carrier::Cucc => "06",
        Carrier::Tri => "20",
    }
}

fn msisdn_prefix(carrier: Carrier) -> &'static str {
    match carrier {
        Carrier::Cmcc => "1440",
        Carrier::Ctcc => "1410",
        Carrier::Cucc => "1460",
        Carrier::Tri => "1480",
    }
}

fn apn(carrier: Carrier) -> &'static str {
    match carrier {
        Carrier::Cmcc => "cmiot",
        Carrier::Ctcc => "ctnb",
        Carrier::Cucc => "scuiot",
        Carrier::Tri => "triot",
    }
}

fn rat(number: u64) -> &'static str {
    match (number / 7) % 10 {
        0..=5 => "4G",
        6..=8 => "NB-IoT",
        _ => "5G",
    }
}

/// IMSI (15 digits), MSISDN (13) and IMEI (15) of card `number`.
pub(crate) fn identities(carrier: Carrier, number: u64) -> Identities {
    Identities {
        imsi: format!("460{}{:010}", mnc(carrier), number % 10_000_000_000),
        msisdn: format!("{}{:09}", msisdn_prefix(carrier), number % 1_000_000_000),
        imei: format!("8640{:011}", number % 100_000_000_000),
    }
}

/// The IMEI of card `number` as records carry it (`identities`' IMEI,
/// packed without formatting it: `8640` and 11 digits).
pub(crate) fn imei_of(number: u64) -> Option<Imei> {
    Imei::from_packed(15 << 57 | (8640 * 100_000_000_000 + number % 100_000_000_000))
}

/// The card number of an ICCID: its last 14 digits.
pub(crate) fn card_number(iccid: Iccid) -> u64 {
    let value = iccid.to_bits() & ((1u128 << 72) - 1);
    (value % 100_000_000_000_000) as u64
}

/// Appends `value` in decimal, zero-padded to `width` digits.
pub(crate) fn push_padded(out: &mut String, value: u64, width: usize) {
    let mut buf = [b'0'; 20];
    let mut v = value;
    let mut i = buf.len();
    while v > 0 && i > 0 {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
    }
    let digits = (buf.len() - i).max(width.min(buf.len()));
    for &b in &buf[buf.len() - digits..] {
        out.push(char::from(b));
    }
}

/// Appends an ICCID's text without going through `u128` formatting (uses
/// the documented, stable layout of [`Iccid::to_bits`]).
pub(crate) fn write_iccid(iccid: Iccid, out: &mut String) {
    let bits = iccid.to_bits();
    let value = bits & ((1u128 << 72) - 1);
    let count = ((bits >> 72) & 0xff) as usize;
    let letter = ((bits >> 80) & 0xff) as u8;
    const SPLIT: u128 = 100_000_000_000_000_000;
    let (high, low) = ((value / SPLIT) as u64, (value % SPLIT) as u64);
    if count > 17 {
        push_padded(out, high, count - 17);
        push_padded(out, low, 17);
    } else {
        push_padded(out, low, count);
    }
    if letter != 0 {
        out.push(char::from(letter));
    }
}

/// RFC 3339 at UTC+8 with second precision (milliseconds only when not
/// zero), e.g. `2026-11-23T04:05:00+08:00`.
pub(crate) fn write_time(t: Timestamp, out: &mut String) {
    let local = t.0 + i64::from(UTC_OFFSET_SECS) * 1000;
    let (y, m, d) = civil_from_days(local.div_euclid(MS_PER_DAY));
    let ms_of_day = local.rem_euclid(MS_PER_DAY) as u64;
    let secs = ms_of_day / 1000;
    let ms = ms_of_day % 1000;
    push_padded(out, y.max(0) as u64, 4);
    out.push('-');
    push_padded(out, u64::from(m), 2);
    out.push('-');
    push_padded(out, u64::from(d), 2);
    out.push('T');
    push_padded(out, secs / 3600, 2);
    out.push(':');
    push_padded(out, (secs / 60) % 60, 2);
    out.push(':');
    push_padded(out, secs % 60, 2);
    if ms != 0 {
        out.push('.');
        push_padded(out, ms, 3);
    }
    out.push_str("+08:00");
}

/// `YYYYMMDD` of an instant at UTC+8.
pub(crate) fn write_yyyymmdd(t: Timestamp, out: &mut String) {
    let (y, m, d) = t.civil_date(UTC_OFFSET_SECS);
    push_padded(out, y.max(0) as u64, 4);
    push_padded(out, u64::from(m), 2);
    push_padded(out, u64::from(d), 2);
}

/// Writes one valid record as SPEC section 4 JSON (no trailing newline).
pub(crate) fn write_usage_json(u: &Usage, out: &mut String) {
    let number = card_number(u.iccid);
    out.push_str("{\"record_id\":\"");
    out.push_str(u.record_id.as_str());
    out.push_str("\",\"iccid\":\"");
    write_iccid(u.iccid, out);
    out.push('"');
    if let Some(start) = u.start {
        out.push_str(",\"start\":\"");
        write_time(start, out);
        out.push('"');
    }
    out.push_str(",\"end\":\"");
    write_time(u.end, out);
    out.push_str("\",\"bytes_up\":");
    push_padded(out, u.bytes_up, 1);
    out.push_str(",\"bytes_down\":");
    push_padded(out, u.bytes_down, 1);
    if let Some(carrier) = u.carrier {
        out.push_str(",\"carrier\":\"");
        out.push_str(carrier.as_str());
        out.push_str("\",\"imsi\":\"460");
        out.push_str(mnc(carrier));
        push_padded(out, number % 10_000_000_000, 10);
        out.push_str("\",\"msisdn\":\"");
        out.push_str(msisdn_prefix(carrier));
        push_padded(out, number % 1_000_000_000, 9);
        out.push_str("\",\"imei\":\"8640");
        push_padded(out, number % 100_000_000_000, 11);
        out.push_str("\",\"apn\":\"");
        out.push_str(apn(carrier));
        out.push_str("\",\"rat\":\"");
        out.push_str(rat(number));
        out.push('"');
    }
    out.push('}');
}

/// The record's fields as (name, raw JSON value) pairs, in wire order.
fn usage_fields(u: &Usage) -> Vec<(&'static str, String)> {
    let quoted_time = |t: Timestamp| {
        let mut s = String::from("\"");
        write_time(t, &mut s);
        s.push('"');
        s
    };
    let mut fields = vec![
        ("record_id", format!("\"{}\"", u.record_id)),
        ("iccid", format!("\"{}\"", u.iccid)),
    ];
    if let Some(start) = u.start {
        fields.push(("start", quoted_time(start)));
    }
    fields.push(("end", quoted_time(u.end)));
    fields.push(("bytes_up", u.bytes_up.to_string()));
    fields.push(("bytes_down", u.bytes_down.to_string()));
    if let Some(carrier) = u.carrier {
        let number = card_number(u.iccid);
        let ids = identities(carrier, number);
        fields.push(("carrier", format!("\"{}\"", carrier.as_str())));
        fields.push(("imsi", format!("\"{}\"", ids.imsi)));
        fields.push(("msisdn", format!("\"{}\"", ids.msisdn)));
        fields.push(("imei", format!("\"{}\"", ids.imei)));
        fields.push(("apn", format!("\"{}\"", apn(carrier))));
        fields.push(("rat", format!("\"{}\"", rat(number))));
    }
    fields
}

fn join_fields(fields: &[(&'static str, String)]) -> String {
    let mut out = String::from("{");
    for (i, (name, value)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "\"{name}\":{value}");
    }
    out.push('}');
    out
}

fn set_field(fields: &mut [(&'static str, String)], name: &str, value: String) {
    if let Some(slot) = fields.iter_mut().find(|(n, _)| *n == name) {
        slot.1 = value;
    }
}

/// Renders `u` broken in the way `defect` says. The result is one line of
/// valid UTF-8 that a strict reader must reject.
pub(crate) fn malformed(
    u: &Usage,
    defect: Defect,
    arrival: Timestamp,
    rng: &mut Xoshiro,
) -> String {
    let mut fields = usage_fields(u);
    match defect {
        Defect::Truncated => {
            let full = join_fields(&fields);
            // Any proper prefix of a JSON object is invalid; keep at least
            // the opening brace and cut before the closing one.
            let cut = 1 + rng.below(full.len() as u64 - 2) as usize;
            return full[..cut].to_owned();
        }
        Defect::NotJson => {
            let mut s = String::new();
            let _ = write!(s, "{},{},", u.record_id, u.iccid);
            write_time(u.end, &mut s);
            let _ = write!(s, ",{},{}", u.bytes_up, u.bytes_down);
            return s;
        }
        Defect::MissingField => {
            let required = ["record_id", "iccid", "end", "bytes_up", "bytes_down"];
            let drop = required[rng.below(required.len() as u64) as usize];
            fields.retain(|(n, _)| *n != drop);
        }
        Defect::MistypedField => {
            if rng.below(2) == 0 {
                set_field(&mut fields, "bytes_up", format!("\"{}\"", u.bytes_up));
            } else {
                set_field(&mut fields, "bytes_down", "null".to_owned());
            }
        }
        Defect::NegativeBytes => {
            let field = if rng.below(2) == 0 {
                "bytes_up"
            } else {
                "bytes_down"
            };
            let value = if field == "bytes_up" {
                u.bytes_up
            } else {
                u.bytes_down
            };
            set_field(&mut fields, field, format!("-{}", value.max(1)));
        }
        Defect::AbsurdBytes => {
            set_field(&mut fields, "bytes_down", "9000000000000000000".to_owned());
        }
        Defect::BadTimestamp => {
            let mut date = String::new();
            write_time(u.end, &mut date);
            let bad = match rng.below(4) {
                0 => format!("{}T25:61:00+08:00", &date[..10]),
                1 => date[..19].replace('T', " ").replace('-', "/"),
                2 => (u.end.0 / 1000).to_string(),
                _ => "yesterday".to_owned(),
            };
            set_field(&mut fields, "end", format!("\"{bad}\""));
        }
        Defect::BadIccid => {
            let text = u.iccid.to_string();
            let bad = match rng.below(3) {
                0 => text[..12].to_owned(),
                1 => format!("{}X{}", &text[..10], &text[11..]),
                _ => format!("{text}00"),
            };
            set_field(&mut fields, "iccid", format!("\"{bad}\""));
        }
        Defect::EndBeforeStart => {
            let start = u.start.unwrap_or(u.end);
            let mut s = String::from("\"");
            write_time(start.plus_millis(3_600_000), &mut s);
            s.push('"');
            if fields.iter().any(|(n, _)| *n == "start") {
                set_field(&mut fields, "start", s);
            } else {
                fields.insert(2, ("start", s));
            }
        }
        Defect::FarFuture => {
            let days = 30 + rng.below(335) as i64;
            let end =
                Timestamp(arrival.0 - arrival.0.rem_euclid(1000)).plus_millis(days * MS_PER_DAY);
            let mut e = String::from("\"");
            write_time(end, &mut e);
            e.push('"');
            let mut s = String::from("\"");
            write_time(end.plus_millis(-300_000), &mut s);
            s.push('"');
            set_field(&mut fields, "start", s);
            set_field(&mut fields, "end", e);
        }
    }
    join_fields(&fields)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowcap_engine::RecordId;

    fn sample() -> Usage {
        Usage {
            record_id: RecordId::new("cmcc-20261123-0000000001").unwrap(),
            iccid: Iccid::parse("89860000000000001234").unwrap(),
            start: Some(Timestamp::parse_rfc3339("2026-11-23T04:00:00+08:00").unwrap()),
            end: Timestamp::parse_rfc3339("2026-11-23T04:05:00+08:00").unwrap(),
            bytes_up: 12345,
            bytes_down: 67890,
            carrier: Some(Carrier::Cmcc),
            imei: None,
        }
    }

    #[test]
    fn json_matches_spec_shape() {
        let mut out = String::new();
        write_usage_json(&sample(), &mut out);
        assert_eq!(
            out,
            r#"{"record_id":"cmcc-20261123-0000000001","iccid":"89860000000000001234","start":"2026-11-23T04:00:00+08:00","end":"2026-11-23T04:05:00+08:00","bytes_up":12345,"bytes_down":67890,"carrier":"cmcc","imsi":"460040000001234","msisdn":"1440000001234","imei":"864000000001234","apn":"cmiot","rat":"NB-IoT"}"#
        );
        assert_eq!(join_fields(&usage_fields(&sample())), out);
    }

    #[test]
    fn time_keeps_milliseconds_only_when_present() {
        let mut out = String::new();
        write_time(
            Timestamp::parse_rfc3339("2026-11-30T16:00:00.250Z").unwrap(),
            &mut out,
        );
        assert_eq!(out, "2026-12-01T00:00:00.250+08:00");
    }

    #[test]
    fn records_carry_the_cards_imei() {
        let ids = identities(Carrier::Cmcc, 1234);
        assert_eq!(imei_of(1234).map(|i| i.to_string()), Some(ids.imei));
    }

    #[test]
    fn card_number_is_the_last_fourteen_digits() {
        assert_eq!(
            card_number(Iccid::parse("89860312345678901234").unwrap()),
            12_345_678_901_234
        );
    }

    #[test]
    fn iccid_text_matches_display() {
        for text in [
            "89860312345678901234",
            "00000000000000000001",
            "8986031234567890123",
            "8986031234567890123F",
            "0898603123456789012",
            "99999999999999999999",
        ] {
            let iccid = Iccid::parse(text).unwrap();
            let mut out = String::new();
            write_iccid(iccid, &mut out);
            assert_eq!(out, text);
        }
    }
}
