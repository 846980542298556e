use std::collections::BTreeSet;

use proptest::prelude::*;

use super::*;

const SPEC_EXAMPLE: &str = r#"{
  "record_id": "cmcc-20261123-0000000001",
  "iccid": "89860412345678901234",
  "start": "2026-11-23T04:00:00+08:00",
  "end": "2026-11-23T04:05:00+08:00",
  "bytes_up": 12345,
  "bytes_down": 67890,
  "carrier": "cmcc",
  "imsi": "460041234567890",
  "msisdn": "1440412345678",
  "imei": "864000000000001",
  "apn": "cmiot",
  "rat": "4G"
}"#;

fn limits() -> DecodeLimits {
    DecodeLimits::default()
}

fn json(text: &str) -> Result<Usage, DecodeError> {
    decode_json(text.as_bytes(), &limits())
}

/// A minimal valid record with `extra` spliced in before the closing brace
/// (`extra` starts with a comma when not empty).
fn minimal(extra: &str) -> String {
    format!(
        r#"{{"record_id":"r1","iccid":"89860412345678901234","end":"2026-11-23T04:05:00Z","bytes_up":1,"bytes_down":2{extra}}}"#
    )
}

/// The minimal record with field `name` replaced by `value` (raw JSON), or
/// removed when `value` is `None`.
fn with_field(name: &str, value: Option<&str>) -> String {
    let mut fields = vec![
        ("record_id", r#""r1""#.to_owned()),
        ("iccid", r#""89860412345678901234""#.to_owned()),
        ("end", r#""2026-11-23T04:05:00Z""#.to_owned()),
        ("bytes_up", "1".to_owned()),
        ("bytes_down", "2".to_owned()),
    ];
    let mut found = false;
    fields.retain_mut(|(k, v)| {
        if *k == name {
            found = true;
            match value {
                Some(new) => {
                    *v = new.to_owned();
                    true
                }
                None => false,
            }
        } else {
            true
        }
    });
    if !found {
        if let Some(new) = value {
            fields.push((name_static(name), new.to_owned()));
        }
    }
    let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
    format!("{{{}}}", body.join(","))
}

fn name_static(name: &str) -> &'static str {
    match name {
        "start" => "start",
        "carrier" => "carrier",
        "imsi" => "imsi",
        "msisdn" => "msisdn",
        "imei" => "imei",
        "apn" => "apn",
        "rat" => "rat",
        _ => "other",
    }
}

fn ts(text: &str) -> Timestamp {
    Timestamp::parse_rfc3339(text).unwrap()
}

fn sample_usage() -> Usage {
    json(SPEC_EXAMPLE).unwrap()
}

#[test]
fn field_names_map_both_ways() {
    let all = [
        Field::RecordId,
        Field::Iccid,
        Field::Start,
        Field::End,
        Field::BytesUp,
        Field::BytesDown,
        Field::Carrier,
        Field::Imsi,
        Field::Msisdn,
        Field::Imei,
        Field::Apn,
        Field::Rat,
    ];
    for f in all {
        assert_eq!(Field::from_key(f.name().as_bytes()), Some(f));
    }
    for other in [
        "",
        "x",
        "imsx",
        "rate",
        "bytes_upp",
        "Iccid",
        "ends",
        "recordXid",
    ] {
        assert_eq!(Field::from_key(other.as_bytes()), None, "{other}");
    }
}

#[test]
fn spec_example_decodes() {
    let u = sample_usage();
    assert_eq!(u.record_id.as_str(), "cmcc-20261123-0000000001");
    assert_eq!(u.iccid, Iccid::parse("89860412345678901234").unwrap());
    assert_eq!(u.start, Some(ts("2026-11-22T20:00:00Z")));
    assert_eq!(u.end, ts("2026-11-22T20:05:00Z"));
    assert_eq!(u.bytes_up, 12345);
    assert_eq!(u.bytes_down, 67890);
    assert_eq!(u.bytes(), 80235);
    assert_eq!(u.carrier, Some(Carrier::Cmcc));
    assert_eq!(
        u.imei.map(|i| i.to_string()).as_deref(),
        Some("864000000000001")
    );
}

#[test]
fn an_imei_not_in_digits_binds_no_device_and_is_no_error() {
    for imei in [r#""86400000000000A""#, r#""""#, r#""123456789012345678""#] {
        let u = json(&minimal(&format!(r#","imei":{imei}"#))).unwrap();
        assert_eq!(u.imei, None, "{imei}");
    }
    let e = json(&minimal(r#","imei":864000000000001"#)).unwrap_err();
    assert_eq!(e.code(), "wrong_type");
}

#[test]
fn binary_carries_the_imei_and_reads_records_without_one() {
    let u = sample_usage();
    let mut with = Vec::new();
    encode_binary(&u, &mut with);
    assert_eq!(decode_binary(&with, &limits()).unwrap(), u);
    let bare = Usage { imei: None, ..u };
    let mut without = Vec::new();
    encode_binary(&bare, &mut without);
    assert_eq!(without.len() + 8, with.len());
    assert_eq!(decode_binary(&without, &limits()).unwrap(), bare);
    // A packed value no IMEI has is refused.
    let at = with.len() - 8;
    with[at..].copy_from_slice(&(1u64 << 57 | 10).to_le_bytes());
    let e = decode_binary(&with, &limits()).unwrap_err();
    assert_eq!(e.code(), "binary_non_canonical");
}

#[test]
fn minimal_record_has_no_optionals() {
    let u = json(&minimal("")).unwrap();
    assert_eq!(u.start, None);
    assert_eq!(u.carrier, None);
    assert_eq!(u.imei, None);
    assert_eq!((u.bytes_up, u.bytes_down), (1, 2));
}

#[test]
fn null_optionals_are_absent() {
    let text = minimal(
        r#","start":null,"carrier":null,"imsi":null,"msisdn":null,"imei":null,"apn":null,"rat":null"#,
    );
    let u = json(&text).unwrap();
    assert_eq!(u.start, None);
    assert_eq!(u.carrier, None);
}

#[test]
fn whitespace_everywhere_and_any_order() {
    let text = " \r\n\t{ \"bytes_down\" :\t2 ,\n\"end\"\r:\"2026-11-23T04:05:00Z\" , \"bytes_up\":1,\"iccid\" : \"89860412345678901234\",\"record_id\":\"r1\"\n}\n\t ";
    assert_eq!(json(text).unwrap(), json(&minimal("")).unwrap());
}

#[test]
fn unknown_fields_are_skipped() {
    let text = minimal(
        r#","vendor":{"a":[1,-2.5e-3,true,false,null,{"b":"}\"]"}],"c":{}},"list":[],"n":0,"flag":true,"nothing":null,"s":"x\u00e9\ud83d\ude00""#,
    );
    assert_eq!(json(&text).unwrap(), json(&minimal("")).unwrap());
}

#[test]
fn string_escapes_are_decoded() {
    let text = r#"{"record_id":"a\"b\\c\/d\u00e9\ud83d\ude00\n\t\b\f\r","iccid":"8986041234567890123\u0034","end":"2026-11-23T04:05:00\u005a","bytes_up":1,"bytes_down":2,"carrier":"\u0063ucc"}"#;
    let u = json(text).unwrap();
    assert_eq!(
        u.record_id.as_str(),
        "a\"b\\c/d\u{e9}\u{1f600}\n\t\u{8}\u{c}\r"
    );
    assert_eq!(u.iccid, Iccid::parse("89860412345678901234").unwrap());
    assert_eq!(u.end, ts("2026-11-23T04:05:00Z"));
    assert_eq!(u.carrier, Some(Carrier::Cucc));
}

#[test]
fn escaped_keys_are_matched_after_unescaping() {
    let text = minimal("").replace("\"iccid\"", "\"i\\u0063cid\"");
    assert_eq!(json(&text).unwrap(), json(&minimal("")).unwrap());
    let dup = minimal(r#","\u0069ccid":"89860412345678901234""#);
    assert_eq!(
        json(&dup),
        Err(DecodeError::DuplicateField { field: "iccid" })
    );
}

#[test]
fn record_id_length_bounds_count_unescaped_bytes() {
    let id64 = "x".repeat(64);
    let u = json(&with_field("record_id", Some(&format!("\"{id64}\"")))).unwrap();
    assert_eq!(u.record_id.as_str(), id64);
    // 32 two-byte characters, escaped: 192 bytes of JSON, 64 bytes of id.
    let escaped = "\\u00e9".repeat(32);
    let u = json(&with_field("record_id", Some(&format!("\"{escaped}\"")))).unwrap();
    assert_eq!(u.record_id.as_str(), "\u{e9}".repeat(32));
    let escaped = "\\u00e9".repeat(40);
    assert_eq!(
        json(&with_field("record_id", Some(&format!("\"{escaped}\"")))),
        Err(DecodeError::BadRecordId { len: 80 })
    );
}

#[test]
fn byte_count_boundaries() {
    let limit = 1u64 << 40;
    let at = with_field("bytes_up", Some(&limit.to_string()));
    assert_eq!(json(&at).unwrap().bytes_up, limit);
    let zero = with_field("bytes_down", Some("0"));
    assert_eq!(json(&zero).unwrap().bytes_down, 0);
    let small = DecodeLimits {
        max_bytes_per_record: 10,
    };
    let text = with_field("bytes_up", Some("11"));
    assert_eq!(
        decode_json(text.as_bytes(), &small),
        Err(DecodeError::AbsurdBytes {
            field: "bytes_up",
            limit: 10
        })
    );
}

#[test]
fn end_equal_to_start_is_fine() {
    let text = minimal(r#","start":"2026-11-23T04:05:00Z""#);
    let u = json(&text).unwrap();
    assert_eq!(u.start, Some(u.end));
}

/// Inputs and the code each must produce; also proves every code is
/// reachable.
fn json_cases() -> Vec<(String, DecodeError)> {
    let nj = |offset| DecodeError::NotJson { offset };
    let mut cases = vec![
        (String::new(), nj(0)),
        ("   ".to_owned(), nj(3)),
        ("nope".to_owned(), nj(0)),
        ("{".to_owned(), nj(1)),
        ("{,}".to_owned(), nj(1)),
        (r#"{"record_id":"#.to_owned(), nj(13)),
        (r#"{"a":1,}"#.to_owned(), nj(7)),
        (r#"{"a" 1}"#.to_owned(), nj(5)),
        (r#"{"a":tru}"#.to_owned(), nj(5)),
        (r#"{"a":"\x"}"#.to_owned(), nj(6)),
        (r#"{"a":"\ud800"}"#.to_owned(), nj(6)),
        (r#"{"a":"\udc00"}"#.to_owned(), nj(6)),
        ("{\"a\":\"tab\there\"}".to_owned(), nj(9)),
        (r#"{"a":[1,]}"#.to_owned(), nj(8)),
        (r#"{"a":-}"#.to_owned(), nj(6)),
        (r#"{"a":1.}"#.to_owned(), nj(7)),
        (r#"{"a":1e}"#.to_owned(), nj(7)),
        (with_field("bytes_up", Some("012")), nj(90)),
        (with_field("bytes_up", Some("1 2")), nj(91)),
        ("[1,2]".to_owned(), DecodeError::NotAnObject),
        ("\"text\"".to_owned(), DecodeError::NotAnObject),
        (" 42 ".to_owned(), DecodeError::NotAnObject),
        ("null".to_owned(), DecodeError::NotAnObject),
        ("[1,2".to_owned(), nj(4)),
        ("[1] x".to_owned(), DecodeError::TrailingData { offset: 4 }),
        (
            format!("{} x", minimal("")),
            DecodeError::TrailingData { offset: 107 },
        ),
        (
            format!("{}{{}}", minimal("")),
            DecodeError::TrailingData { offset: 106 },
        ),
        (
            minimal(&format!(",\"deep\":{}{}", "[".repeat(200), "]".repeat(200))),
            DecodeError::TooDeep { offset: 240 },
        ),
    ];
    for field in ["record_id", "iccid", "end", "bytes_up", "bytes_down"] {
        cases.push((with_field(field, None), DecodeError::MissingField { field }));
    }
    let wrong = |field, expected, found| DecodeError::WrongType {
        field,
        expected,
        found,
    };
    cases.extend([
        (
            minimal(r#","bytes_up":3"#),
            DecodeError::DuplicateField { field: "bytes_up" },
        ),
        (
            minimal(r#","start":null,"start":null"#),
            DecodeError::DuplicateField { field: "start" },
        ),
        (
            with_field("bytes_up", Some("\"123\"")),
            wrong("bytes_up", "a non-negative integer", "string"),
        ),
        (
            with_field("bytes_down", Some("null")),
            wrong("bytes_down", "a non-negative integer", "null"),
        ),
        (
            with_field("bytes_down", Some("[1]")),
            wrong("bytes_down", "a non-negative integer", "array"),
        ),
        (
            with_field("iccid", Some("89860412345678901234")),
            wrong("iccid", "a string", "number"),
        ),
        (
            with_field("record_id", Some("null")),
            wrong("record_id", "a string", "null"),
        ),
        (
            with_field("end", Some("{}")),
            wrong("end", "a string", "object"),
        ),
        (
            with_field("start", Some("true")),
            wrong("start", "a string or null", "boolean"),
        ),
        (
            with_field("imsi", Some("460041234567890")),
            wrong("imsi", "a string or null", "number"),
        ),
        (
            with_field("rat", Some("false")),
            wrong("rat", "a string or null", "boolean"),
        ),
        (
            with_field("bytes_up", Some("1.5")),
            DecodeError::NotAnInteger { field: "bytes_up" },
        ),
        (
            with_field("bytes_up", Some("100.0")),
            DecodeError::NotAnInteger { field: "bytes_up" },
        ),
        (
            with_field("bytes_down", Some("1e3")),
            DecodeError::NotAnInteger {
                field: "bytes_down",
            },
        ),
        (
            with_field("bytes_up", Some("-1")),
            DecodeError::NegativeBytes { field: "bytes_up" },
        ),
        (
            with_field("bytes_down", Some("-0")),
            DecodeError::NegativeBytes {
                field: "bytes_down",
            },
        ),
        (
            with_field("bytes_up", Some("-1.5")),
            DecodeError::NegativeBytes { field: "bytes_up" },
        ),
        (
            with_field("bytes_up", Some("1099511627777")),
            DecodeError::AbsurdBytes {
                field: "bytes_up",
                limit: 1 << 40,
            },
        ),
        (
            with_field("bytes_down", Some("123456789012345678901234567890")),
            DecodeError::AbsurdBytes {
                field: "bytes_down",
                limit: 1 << 40,
            },
        ),
        (
            with_field("record_id", Some("\"\"")),
            DecodeError::BadRecordId { len: 0 },
        ),
        (
            with_field("record_id", Some(&format!("\"{}\"", "x".repeat(65)))),
            DecodeError::BadRecordId { len: 65 },
        ),
        (
            with_field("iccid", Some("\"123\"")),
            DecodeError::BadIccid {
                reason: IccidError::Length(3),
            },
        ),
        (
            with_field("iccid", Some("\"8986041234567890X234\"")),
            DecodeError::BadIccid {
                reason: IccidError::Character {
                    found: 'X',
                    position: 16,
                },
            },
        ),
        (
            with_field("end", Some("\"yesterday\"")),
            DecodeError::BadTimestamp {
                field: "end",
                reason: TimeError::Syntax,
            },
        ),
        (
            with_field("start", Some("\"2026-13-01T00:00:00Z\"")),
            DecodeError::BadTimestamp {
                field: "start",
                reason: TimeError::Range("month"),
            },
        ),
        (
            with_field("start", Some("\"2026-11-23T04:05:00.001Z\"")),
            DecodeError::EndBeforeStart,
        ),
        (
            with_field("carrier", Some("\"vodafone\"")),
            DecodeError::UnknownCarrier,
        ),
        (
            with_field("carrier", Some("\"CMCC\"")),
            DecodeError::UnknownCarrier,
        ),
    ]);
    cases
}

#[test]
fn every_json_error_case() {
    let mut wrong = Vec::new();
    for (input, expected) in json_cases() {
        let got = json(&input);
        if got != Err(expected.clone()) {
            wrong.push(format!("{input}\n  got {got:?}\n  expected {expected:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn invalid_utf8_is_not_json() {
    let mut bytes = minimal("").into_bytes();
    // Inside the record_id string "r1".
    bytes[15] = 0xff;
    assert_eq!(
        decode_json(&bytes, &limits()),
        Err(DecodeError::NotJson { offset: 14 })
    );
    let bytes = b"{\"a\":1}\xff";
    assert_eq!(
        decode_json(bytes, &limits()),
        Err(DecodeError::TrailingData { offset: 7 })
    );
}

#[test]
fn syntax_errors_win_over_field_errors() {
    // A negative byte count in a truncated message is still "not JSON".
    let text = r#"{"bytes_up":-1,"iccid":"12""#;
    assert_eq!(json(text).unwrap_err().code(), "not_json");
    // Among field errors, the first in document order wins.
    let text = minimal(r#","carrier":"x","bytes_up":-1"#);
    assert_eq!(json(&text), Err(DecodeError::UnknownCarrier));
    // Field errors win over missing fields.
    let text = r#"{"iccid":"1"}"#;
    assert_eq!(json(text).unwrap_err().code(), "bad_iccid");
}

fn binary_of(u: &Usage) -> Vec<u8> {
    let mut out = Vec::new();
    encode_binary(u, &mut out);
    out
}

fn binary_cases() -> Vec<(Vec<u8>, DecodeError)> {
    let good = binary_of(&sample_usage());
    let patched = |at: usize, bytes: &[u8]| {
        let mut b = good.clone();
        b[at..at + bytes.len()].copy_from_slice(bytes);
        b
    };
    let no_start = {
        let mut u = sample_usage();
        u.start = None;
        binary_of(&u)
    };
    vec![
        (
            Vec::new(),
            DecodeError::BinaryTruncated { needed: 1, len: 0 },
        ),
        (
            good[..30].to_vec(),
            DecodeError::BinaryTruncated {
                needed: BINARY_HEADER_LEN,
                len: 30,
            },
        ),
        (
            good[..good.len() - 1].to_vec(),
            DecodeError::BinaryTruncated {
                needed: good.len(),
                len: good.len() - 1,
            },
        ),
        (patched(0, &[2]), DecodeError::BinaryVersion { version: 2 }),
        (
            patched(1, &[0x81]),
            DecodeError::BinaryNonCanonical {
                what: "reserved flag bits set",
            },
        ),
        (
            {
                let mut b = no_start.clone();
                b[26] = 1;
                b
            },
            DecodeError::BinaryNonCanonical {
                what: "absent start is not zero",
            },
        ),
        (
            patched(2, &[0xff; 16]),
            DecodeError::BinaryBadIccid { bits: u128::MAX },
        ),
        (
            patched(BINARY_HEADER_LEN, &[0xc3, 0x28]),
            DecodeError::BinaryBadUtf8,
        ),
        (patched(50, &[9]), DecodeError::BinaryBadCarrier { byte: 9 }),
        (patched(51, &[0]), DecodeError::BadRecordId { len: 0 }),
        (patched(51, &[65]), DecodeError::BadRecordId { len: 65 }),
        (
            patched(34, &((1u64 << 40) + 1).to_le_bytes()),
            DecodeError::AbsurdBytes {
                field: "bytes_up",
                limit: 1 << 40,
            },
        ),
        (
            patched(42, &u64::MAX.to_le_bytes()),
            DecodeError::AbsurdBytes {
                field: "bytes_down",
                limit: 1 << 40,
            },
        ),
        (
            patched(26, &i64::MAX.to_le_bytes()),
            DecodeError::EndBeforeStart,
        ),
        (
            {
                let mut b = good.clone();
                b.push(0);
                b
            },
            DecodeError::TrailingData { offset: good.len() },
        ),
    ]
}

#[test]
fn every_binary_error_case() {
    for (input, expected) in binary_cases() {
        assert_eq!(
            decode_binary(&input, &limits()),
            Err(expected.clone()),
            "input: {input:?}"
        );
    }
}

#[test]
fn every_code_is_reachable_listed_and_distinct() {
    let listed: BTreeSet<&str> = DecodeError::CODES.into_iter().collect();
    assert_eq!(listed.len(), DecodeError::CODES.len(), "codes are distinct");
    let produced: BTreeSet<&str> = json_cases()
        .iter()
        .map(|(_, e)| e.code())
        .chain(binary_cases().iter().map(|(_, e)| e.code()))
        .collect();
    assert_eq!(produced, listed);
    let docs = include_str!("../decode.rs");
    for code in DecodeError::CODES {
        assert!(
            docs.contains(&format!("//! | `{code}` |")),
            "{code} documented"
        );
    }
}

#[test]
fn messages_are_readable() {
    let e = DecodeError::WrongType {
        field: "bytes_up",
        expected: "a non-negative integer",
        found: "string",
    };
    assert_eq!(
        e.to_string(),
        "field `bytes_up` must be a non-negative integer, found string"
    );
    assert_eq!(e.field(), Some("bytes_up"));
    let e = DecodeError::BadTimestamp {
        field: "end",
        reason: TimeError::Range("month"),
    };
    assert_eq!(
        e.to_string(),
        "field `end`: RFC 3339 timestamp has an out-of-range month"
    );
    assert_eq!(
        DecodeError::MissingField { field: "iccid" }.to_string(),
        "missing required field `iccid`"
    );
}

#[test]
fn binary_round_trip_and_layout() {
    let u = sample_usage();
    let bytes = binary_of(&u);
    // The header, the record id, the packed IMEI.
    assert_eq!(
        bytes.len(),
        BINARY_HEADER_LEN + u.record_id.as_str().len() + 8
    );
    assert_eq!(bytes[0], BINARY_VERSION);
    assert_eq!(decode_binary(&bytes, &limits()), Ok(u));
}

#[test]
fn json_round_trip_of_spec_example() {
    let u = sample_usage();
    let mut text = String::new();
    encode_json(&u, 8 * 3600, &mut text);
    assert_eq!(
        text,
        r#"{"record_id":"cmcc-20261123-0000000001","iccid":"89860412345678901234","start":"2026-11-23T04:00:00.000+08:00","end":"2026-11-23T04:05:00.000+08:00","bytes_up":12345,"bytes_down":67890,"carrier":"cmcc","imei":"864000000000001"}"#
    );
    assert_eq!(json(&text), Ok(u));
}

// ---------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------

/// Years 0001 to 9999 with a day of margin so any UTC offset stays inside.
const MIN_MS: i64 = -62_135_596_800_000 + 86_400_000;
const MAX_MS: i64 = 253_402_300_799_999 - 86_400_000;

fn arb_record_id() -> impl Strategy<Value = RecordId> {
    prop_oneof![
        "[a-z]{4}-[0-9]{8}-[0-9]{10}",
        prop::collection::vec(any::<char>(), 1..=24).prop_map(|cs| cs.into_iter().collect()),
        prop::collection::vec(
            prop::sample::select(vec!['"', '\\', '/', '\n', '\u{1}', 'é']),
            1..=30
        )
        .prop_map(|cs| cs.into_iter().collect()),
    ]
    .prop_map(|s: String| {
        let mut s = s;
        while s.len() > MAX_RECORD_ID_LEN {
            s.pop();
        }
        RecordId::new(&s).unwrap()
    })
}

fn arb_usage() -> impl Strategy<Value = Usage> {
    (
        arb_record_id(),
        "[0-9]{19,20}|[0-9]{18,19}[A-Za-z]",
        MIN_MS..=MAX_MS,
        prop::option::of(0i64..=40 * 86_400_000),
        0u64..=1 << 40,
        prop_oneof![Just(0u64), 0u64..=1 << 40, 0u64..10_000],
        prop::option::of(prop::sample::select(Carrier::ALL.to_vec())),
        prop::option::of("[0-9]{1,17}"),
    )
        .prop_map(
            |(record_id, iccid, end, back, up, down, carrier, imei)| Usage {
                record_id,
                iccid: Iccid::parse(&iccid).unwrap(),
                start: back.map(|b| Timestamp((end - b).max(MIN_MS))),
                end: Timestamp(end),
                bytes_up: up,
                bytes_down: down,
                carrier,
                imei: imei.and_then(|i| Imei::parse(i.as_bytes())),
            },
        )
}

/// A realistic message: the SPEC fields plus unknown ones, in a shape that
/// exercises every part of the scanner.
fn rich_message(u: &Usage) -> String {
    let mut base = String::new();
    encode_json(u, 8 * 3600, &mut base);
    base.pop();
    base.push_str(
        r#", "imsi": "460041234567890", "apn": null, "rat": "4G", "ext": {"a": [1, -2.5e2, true, null], "b": "x\u00e9\n"}}"#,
    );
    base
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    let interesting = prop_oneof![
        any::<u8>(),
        prop::sample::select(b"{}[]\",:\\-.eE0123456789 nutl\x00\x80\xff".to_vec()),
    ];
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(i, m)| Mutation::Flip(i, m)),
        (any::<usize>(), interesting).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Delete),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = bytes.len();
        match *m {
            Mutation::Flip(i, x) if len > 0 => bytes[i % len] ^= x,
            Mutation::Insert(i, b) => bytes.insert(i % (len + 1), b),
            Mutation::Delete(i) if len > 0 => {
                bytes.remove(i % len);
            }
            _ => {}
        }
    }
    bytes
}

/// Checks `decode_json`'s verdict on JSON validity against serde_json's.
fn agrees_with_serde_json(bytes: &[u8]) -> Result<(), TestCaseError> {
    let ours = decode_json(bytes, &limits());
    let theirs = serde_json::from_slice::<serde_json::Value>(bytes);
    let syntax = |e: &DecodeError| {
        matches!(
            e.code(),
            "not_json" | "trailing_data" | "too_deep" | "not_an_object"
        )
    };
    match (&ours, &theirs) {
        (Ok(_), Err(e)) => {
            // serde_json refuses numbers that overflow f64; flowcap reads
            // byte counts as integers and ignores other numbers.
            prop_assert!(e.to_string().contains("out of range"), "serde: {e}");
        }
        (Err(ours), Err(e)) if !e.to_string().contains("out of range") => {
            prop_assert!(syntax(ours), "serde: {e}, ours: {ours}");
        }
        (Err(ours), Ok(v)) => {
            prop_assert!(
                !syntax(ours) || (ours.code() == "not_an_object" && !v.is_object()),
                "serde accepted, ours: {ours}"
            );
        }
        _ => {}
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_json(&bytes, &limits());
        let _ = decode_binary(&bytes, &limits());
        agrees_with_serde_json(&bytes)?;
    }

    #[test]
    fn json_round_trips(u in arb_usage(), offset_min in -14 * 60..=14 * 60i32) {
        let mut text = String::new();
        encode_json(&u, offset_min * 60, &mut text);
        prop_assert_eq!(json(&text), Ok(u));
        // serde_json agrees it is JSON and sees the same strings.
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(v["record_id"].as_str(), Some(u.record_id.as_str()));
        prop_assert_eq!(json(&rich_message(&u)), Ok(u));
    }

    #[test]
    fn special_bytes_finds_the_first_special_byte(
        bytes in prop::collection::vec(
            prop_oneof![any::<u8>(), 0x20u8..0x7f, prop::sample::select(b"\"\\\x1f\x20\x7f\x80".to_vec())],
            8,
        ),
    ) {
        let chunk: [u8; 8] = bytes.clone().try_into().unwrap();
        let first = bytes
            .iter()
            .position(|&b| b == b'"' || b == b'\\' || !(0x20..0x80).contains(&b));
        let mask = special_bytes(u64::from_le_bytes(chunk));
        let found = (mask != 0).then(|| (mask.trailing_zeros() / 8) as usize);
        prop_assert_eq!(found, first);
    }

    #[test]
    fn binary_round_trips(u in arb_usage()) {
        prop_assert_eq!(decode_binary(&binary_of(&u), &limits()), Ok(u));
    }

    #[test]
    fn mutated_json_never_panics_and_stays_honest(
        u in arb_usage(),
        mutations in prop::collection::vec(arb_mutation(), 1..6),
    ) {
        let bytes = mutate(rich_message(&u).into_bytes(), &mutations);
        let _ = decode_json(&bytes, &limits());
        agrees_with_serde_json(&bytes)?;
    }

    #[test]
    fn mutated_binary_never_panics(
        u in arb_usage(),
        mutations in prop::collection::vec(arb_mutation(), 1..6),
    ) {
        let bytes = mutate(binary_of(&u), &mutations);
        if let Ok(back) = decode_binary(&bytes, &limits()) {
            // Whatever decodes is a valid record that re-encodes to itself.
            prop_assert_eq!(binary_of(&back), bytes);
        }
    }
}
