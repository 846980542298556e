//! Billing cycles.
//!
//! Usage counts against the cycle of a record's event time (SPEC section 3):
//! the calendar month for `cmcc`, `ctcc` and `tri`; the 27th of the previous
//! month 00:00 to the 26th 24:00 for `cucc`. A cycle is named by the month
//! it ends in. All boundaries are local midnights at a fixed UTC offset
//! (UTC+8 unless configured).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::domain::Carrier;
use crate::time::Timestamp;

/// A billing cycle, named by the month it ends in: `year * 12 + month - 1`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CycleId(pub u32);

/// `"YYYY-MM"` in human-readable formats (JSON), the number in binary ones.
impl Serialize for CycleId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            serializer.serialize_u32(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for CycleId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
            CycleId::parse(&text)
                .ok_or_else(|| serde::de::Error::custom(format!("cycle {text:?} is not YYYY-MM")))
        } else {
            u32::deserialize(deserializer).map(CycleId)
        }
    }
}

impl CycleId {
    /// The cycle ending in `month` (1-12) of `year`.
    pub fn new(year: i64, month: u32) -> CycleId {
        CycleId((year * 12 + i64::from(month) - 1) as u32)
    }

    /// Calendar year of the month the cycle ends in.
    pub fn year(self) -> i64 {
        i64::from(self.0 / 12)
    }

    /// Month (1-12) the cycle ends in.
    pub fn month(self) -> u32 {
        self.0 % 12 + 1
    }

    /// Parses `YYYY-MM`.
    pub fn parse(text: &str) -> Option<CycleId> {
        let (y, m) = text.split_once('-')?;
        if y.len() != 4 || m.len() != 2 {
            return None;
        }
        let (y, m) = (y.parse::<i64>().ok()?, m.parse::<u32>().ok()?);
        (1..=12).contains(&m).then(|| CycleId::new(y, m))
    }

    /// The following cycle.
    pub fn next(self) -> CycleId {
        CycleId(self.0 + 1)
    }

    /// The preceding cycle.
    pub fn prev(self) -> CycleId {
        CycleId(self.0.saturating_sub(1))
    }
}

impl fmt::Display for CycleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year(), self.month())
    }
}

impl fmt::Debug for CycleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CycleId({self})")
    }
}

/// The day of month on which a `cucc` cycle starts.
pub const CUCC_CYCLE_START_DAY: u32 = 27;

/// Maps instants to cycles for each carrier at a fixed UTC offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CycleCalendar {
    /// Offset of the billing time zone from UTC, in seconds (default UTC+8).
    pub utc_offset_secs: i32,
}

impl Default for CycleCalendar {
    fn default() -> Self {
        CycleCalendar {
            utc_offset_secs: 8 * 3600,
        }
    }
}

impl CycleCalendar {
    /// The cycle an instant belongs to for a carrier.
    pub fn cycle_of(&self, carrier: Carrier, t: Timestamp) -> CycleId {
        let (y, m, d) = t.civil_date(self.utc_offset_secs);
        let month = CycleId::new(y, m);
        if carrier.cycle_starts_on_27th() && d >= CUCC_CYCLE_START_DAY {
            month.next()
        } else {
            month
        }
    }

    /// Half-open bounds `[start, end)` of a carrier's cycle.
    pub fn bounds(&self, carrier: Carrier, cycle: CycleId) -> (Timestamp, Timestamp) {
        let off = self.utc_offset_secs;
        if carrier.cycle_starts_on_27th() {
            let prev = cycle.prev();
            (
                Timestamp::from_civil(prev.year(), prev.month(), CUCC_CYCLE_START_DAY, off),
                Timestamp::from_civil(cycle.year(), cycle.month(), CUCC_CYCLE_START_DAY, off),
            )
        } else {
            let next = cycle.next();
            (
                Timestamp::from_civil(cycle.year(), cycle.month(), 1, off),
                Timestamp::from_civil(next.year(), next.month(), 1, off),
            )
        }
    }

    /// The local calendar day (days since 1970-01-01 at this offset) of an
    /// instant: the `date` partition of history.
    pub fn local_day(&self, t: Timestamp) -> i64 {
        (t.0 + i64::from(self.utc_offset_secs) * 1000).div_euclid(crate::time::MS_PER_DAY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        Timestamp::parse_rfc3339(s).unwrap()
    }

    #[test]
    fn calendar_month_carriers() {
        let cal = CycleCalendar::default();
        for carrier in [Carrier::Cmcc, Carrier::Ctcc, Carrier::Tri] {
            assert_eq!(
                cal.cycle_of(carrier, ts("2026-11-30T23:59:59+08:00"))
                    .to_string(),
                "2026-11"
            );
            assert_eq!(
                cal.cycle_of(carrier, ts("2026-12-01T00:00:00+08:00"))
                    .to_string(),
                "2026-12"
            );
            // 2026-11-30T16:00Z is already December 1st in UTC+8.
            assert_eq!(
                cal.cycle_of(carrier, ts("2026-11-30T16:00:00Z"))
                    .to_string(),
                "2026-12"
            );
        }
    }

    #[test]
    fn cucc_cycle_runs_27th_to_26th() {
        let cal = CycleCalendar::default();
        let c = Carrier::Cucc;
        assert_eq!(
            cal.cycle_of(c, ts("2026-11-26T23:59:59+08:00")).to_string(),
            "2026-11"
        );
        assert_eq!(
            cal.cycle_of(c, ts("2026-11-27T00:00:00+08:00")).to_string(),
            "2026-12"
        );
        assert_eq!(
            cal.cycle_of(c, ts("2026-10-27T00:00:00+08:00")).to_string(),
            "2026-11"
        );
        assert_eq!(
            cal.cycle_of(c, ts("2026-12-27T00:00:00+08:00")).to_string(),
            "2027-01"
        );
        let (start, end) = cal.bounds(c, CycleId::new(2026, 11));
        assert_eq!(start, ts("2026-10-27T00:00:00+08:00"));
        assert_eq!(end, ts("2026-11-27T00:00:00+08:00"));
        let (start, end) = cal.bounds(c, CycleId::new(2027, 1));
        assert_eq!(start, ts("2026-12-27T00:00:00+08:00"));
        assert_eq!(end, ts("2027-01-27T00:00:00+08:00"));
    }

    #[test]
    fn bounds_agree_with_cycle_of() {
        let cal = CycleCalendar {
            utc_offset_secs: -5 * 3600,
        };
        for carrier in Carrier::ALL {
            for m in 0..40u32 {
                let cycle = CycleId(2025 * 12 + m);
                let (start, end) = cal.bounds(carrier, cycle);
                assert_eq!(cal.cycle_of(carrier, start), cycle);
                assert_eq!(cal.cycle_of(carrier, end.plus_millis(-1)), cycle);
                assert_eq!(cal.cycle_of(carrier, end), cycle.next());
            }
        }
    }
}
