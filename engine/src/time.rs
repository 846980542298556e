//! Event time.
//!
//! flowcap never reads a clock: every instant comes in with a record or a
//! command. [`Timestamp`] is milliseconds since the Unix epoch (UTC), parsed
//! from and printed as RFC 3339. The calendar arithmetic (days <-> civil
//! date) is Howard Hinnant's algorithm, exact over the proleptic Gregorian
//! calendar, so no time-zone database is needed: flowcap only ever uses
//! fixed UTC offsets (UTC+8 by default).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Milliseconds per day.
pub const MS_PER_DAY: i64 = 86_400_000;
/// Milliseconds per hour.
pub const MS_PER_HOUR: i64 = 3_600_000;
/// Milliseconds per minute.
pub const MS_PER_MINUTE: i64 = 60_000;

/// An instant: milliseconds since 1970-01-01T00:00:00Z.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Timestamp(pub i64);

/// Why a string is not an RFC 3339 timestamp.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeError {
    /// The text does not have the `YYYY-MM-DDTHH:MM:SS[.fff][Z|+HH:MM]` shape.
    #[error("not an RFC 3339 timestamp (expected YYYY-MM-DDTHH:MM:SS[.fff](Z|+HH:MM))")]
    Syntax,
    /// A field is out of its range (month 13, day 31 of a 30-day month, ...).
    #[error("RFC 3339 timestamp has an out-of-range {0}")]
    Range(&'static str),
}

impl Timestamp {
    /// The earliest representable instant, used as "never".
    pub const MIN: Timestamp = Timestamp(i64::MIN);
    /// The latest representable instant, used as "no end".
    pub const MAX: Timestamp = Timestamp(i64::MAX);

    /// Milliseconds since the epoch.
    pub fn millis(self) -> i64 {
        self.0
    }

    /// This instant moved by `ms` milliseconds (saturating).
    pub fn plus_millis(self, ms: i64) -> Timestamp {
        Timestamp(self.0.saturating_add(ms))
    }

    /// Parses RFC 3339 (`T` or space separator, optional fraction, `Z` or a
    /// numeric offset). Fractions beyond milliseconds are truncated.
    pub fn parse_rfc3339(text: &str) -> Result<Timestamp, TimeError> {
        Self::parse_rfc3339_bytes(text.as_bytes())
    }

    /// [`Timestamp::parse_rfc3339`] on ASCII bytes.
    pub fn parse_rfc3339_bytes(b: &[u8]) -> Result<Timestamp, TimeError> {
        if b.len() < 20 {
            return Err(TimeError::Syntax);
        }
        let year = digits(b, 0, 4)? as i64;
        expect(b, 4, b'-')?;
        let month = digits(b, 5, 2)?;
        expect(b, 7, b'-')?;
        let day = digits(b, 8, 2)?;
        if !matches!(b[10], b'T' | b't' | b' ') {
            return Err(TimeError::Syntax);
        }
        let hour = digits(b, 11, 2)?;
        expect(b, 13, b':')?;
        let minute = digits(b, 14, 2)?;
        expect(b, 16, b':')?;
        let second = digits(b, 17, 2)?;
        let mut i = 19;
        let mut millis = 0u32;
        if b.get(i) == Some(&b'.') {
            i += 1;
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                if i - start < 3 {
                    millis = millis * 10 + u32::from(b[i] - b'0');
                }
                i += 1;
            }
            let n = i - start;
            if n == 0 {
                return Err(TimeError::Syntax);
            }
            for _ in n..3 {
                millis *= 10;
            }
        }
        let offset_minutes: i64 = match b.get(i) {
            Some(b'Z' | b'z') if i + 1 == b.len() => 0,
            Some(&sign @ (b'+' | b'-')) if i + 6 == b.len() => {
                let oh = digits(b, i + 1, 2)? as i64;
                expect(b, i + 3, b':')?;
                let om = digits(b, i + 4, 2)? as i64;
                if oh > 23 || om > 59 {
                    return Err(TimeError::Range("offset"));
                }
                let total = oh * 60 + om;
                if sign == b'-' {
                    -total
                } else {
                    total
                }
            }
            _ => return Err(TimeError::Syntax),
        };
        if !(1..=12).contains(&month) {
            return Err(TimeError::Range("month"));
        }
        if day == 0 || day > days_in_month(year, month) {
            return Err(TimeError::Range("day"));
        }
        if hour > 23 {
            return Err(TimeError::Range("hour"));
        }
        if minute > 59 {
            return Err(TimeError::Range("minute"));
        }
        // Leap seconds are folded onto :59.
        if second > 60 {
            return Err(TimeError::Range("second"));
        }
        let second = second.min(59);
        let days = days_from_civil(year, month, day);
        let local_ms = days * MS_PER_DAY
            + i64::from(hour) * MS_PER_HOUR
            + i64::from(minute) * MS_PER_MINUTE
            + i64::from(second) * 1000
            + i64::from(millis);
        Ok(Timestamp(local_ms - offset_minutes * MS_PER_MINUTE))
    }

    /// Formats as RFC 3339 with millisecond precision at a fixed UTC offset
    /// (in seconds, e.g. `8 * 3600`).
    pub fn to_rfc3339(self, offset_secs: i32) -> String {
        let mut out = String::with_capacity(29);
        self.write_rfc3339(offset_secs, &mut out)
            .expect("writing to a String cannot fail");
        out
    }

    /// Writes RFC 3339 text into any `fmt::Write`.
    pub fn write_rfc3339(self, offset_secs: i32, out: &mut impl fmt::Write) -> fmt::Result {
        let local = self.0 + i64::from(offset_secs) * 1000;
        let days = local.div_euclid(MS_PER_DAY);
        let ms_of_day = local.rem_euclid(MS_PER_DAY);
        let (y, m, d) = civil_from_days(days);
        let h = ms_of_day / MS_PER_HOUR;
        let mi = (ms_of_day / MS_PER_MINUTE) % 60;
        let s = (ms_of_day / 1000) % 60;
        let ms = ms_of_day % 1000;
        write!(out, "{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ms:03}")?;
        if offset_secs == 0 {
            out.write_char('Z')
        } else {
            let sign = if offset_secs < 0 { '-' } else { '+' };
            let abs = offset_secs.unsigned_abs() / 60;
            write!(out, "{sign}{:02}:{:02}", abs / 60, abs % 60)
        }
    }

    /// The civil date (year, month, day) of this instant at a UTC offset.
    pub fn civil_date(self, offset_secs: i32) -> (i64, u32, u32) {
        let local = self.0 + i64::from(offset_secs) * 1000;
        civil_from_days(local.div_euclid(MS_PER_DAY))
    }

    /// The instant of local midnight starting the given civil date.
    pub fn from_civil(year: i64, month: u32, day: u32, offset_secs: i32) -> Timestamp {
        Timestamp(days_from_civil(year, month, day) * MS_PER_DAY - i64::from(offset_secs) * 1000)
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Timestamp::MIN => f.write_str("Timestamp(MIN)"),
            Timestamp::MAX => f.write_str("Timestamp(MAX)"),
            t => write!(f, "Timestamp({})", t.to_rfc3339(0)),
        }
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_rfc3339(0, f)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            serializer.serialize_i64(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
            Timestamp::parse_rfc3339(&text).map_err(serde::de::Error::custom)
        } else {
            i64::deserialize(deserializer).map(Timestamp)
        }
    }
}

fn expect(b: &[u8], i: usize, c: u8) -> Result<(), TimeError> {
    if b.get(i) == Some(&c) {
        Ok(())
    } else {
        Err(TimeError::Syntax)
    }
}

fn digits(b: &[u8], start: usize, n: usize) -> Result<u32, TimeError> {
    let slice = b.get(start..start + n).ok_or(TimeError::Syntax)?;
    slice.iter().try_fold(0u32, |acc, &c| {
        if c.is_ascii_digit() {
            Ok(acc * 10 + u32::from(c - b'0'))
        } else {
            Err(TimeError::Syntax)
        }
    })
}

/// True for Gregorian leap years.
pub fn is_leap_year(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

/// Days in a month (1-12) of a year.
pub fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap_year(year) => 29,
        2 => 28,
        _ => 0,
    }
}

/// Days since 1970-01-01 of a civil date.
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Civil date of a count of days since 1970-01-01.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_offsets_and_fractions() {
        let a = Timestamp::parse_rfc3339("2026-11-23T04:05:00+08:00").unwrap();
        let b = Timestamp::parse_rfc3339("2026-11-22T20:05:00Z").unwrap();
        assert_eq!(a, b);
        let c = Timestamp::parse_rfc3339("2026-11-22T20:05:00.123456Z").unwrap();
        assert_eq!(c.0 - b.0, 123);
        let d = Timestamp::parse_rfc3339("2026-11-22T20:05:00.5Z").unwrap();
        assert_eq!(d.0 - b.0, 500);
        assert_eq!(
            Timestamp::parse_rfc3339("1970-01-01T00:00:00Z").unwrap(),
            Timestamp(0)
        );
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "2026-11-23",
            "2026-11-23T04:05:00",
            "2026-13-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-11-23T24:00:00Z",
            "2026-11-23T04:05:00+8:00",
            "2026-11-23T04:05:00.Z",
            "2026-11-23T04:05:00Zjunk",
            "２026-11-23T04:05:00Z",
        ] {
            assert!(Timestamp::parse_rfc3339(bad).is_err(), "{bad}");
        }
        assert!(Timestamp::parse_rfc3339("2024-02-29T00:00:00Z").is_ok());
    }

    #[test]
    fn formats_round_trip() {
        let t = Timestamp::parse_rfc3339("2026-11-23T04:05:00.012+08:00").unwrap();
        assert_eq!(t.to_rfc3339(8 * 3600), "2026-11-23T04:05:00.012+08:00");
        assert_eq!(t.to_rfc3339(0), "2026-11-22T20:05:00.012Z");
        assert_eq!(
            Timestamp::parse_rfc3339(&t.to_rfc3339(-5 * 3600)).unwrap(),
            t
        );
    }

    #[test]
    fn civil_round_trip_over_centuries() {
        for days in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}
