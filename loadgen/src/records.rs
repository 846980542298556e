//! The usage record stream.

use flowcap_engine::{Carrier, Iccid, RecordId, Timestamp, Usage};
use rand_distr::{Distribution, Exp1};
use serde::{Deserialize, Serialize};

use crate::config::FRESH_MAX_DELAY_MS;
use crate::format;
use crate::rng::{Xoshiro, STREAM_RECORDS};
use crate::workload::{pick_weighted, Workload, UNKNOWN_CARRIER_CODE};

/// What a generated record is, from the generator's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    /// A new record of a known card; `end` a few seconds (at most 30) before
    /// arrival.
    Fresh,
    /// An exact resend (same record id, same content) of an earlier Fresh,
    /// Late or OutOfOrder record.
    Duplicate,
    /// A new record of a known card whose `end` is more than
    /// `late_by_hours` (and at most twice that) before its arrival.
    Late,
    /// A new record of a known card delivered behind later ones: its `end`
    /// lies between half of `out_of_order_window_secs` and all of it before
    /// arrival.
    OutOfOrder,
    /// A well-formed record for an ICCID that is not in the setup
    /// (`898699...`).
    UnknownCard,
    /// Bytes a strict reader must reject; see [`Defect`].
    Malformed,
}

impl RecordKind {
    /// Every kind, in a fixed order.
    pub const ALL: [RecordKind; 6] = [
        RecordKind::Fresh,
        RecordKind::Duplicate,
        RecordKind::Late,
        RecordKind::OutOfOrder,
        RecordKind::UnknownCard,
        RecordKind::Malformed,
    ];

    /// Whether records of this kind add usage to a known card: Fresh, Late
    /// and OutOfOrder (each has a record id of its own).
    pub fn counts_usage(self) -> bool {
        matches!(
            self,
            RecordKind::Fresh | RecordKind::Late | RecordKind::OutOfOrder
        )
    }
}

/// How a malformed record is broken (SPEC section 4's dead-letter cases).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Defect {
    /// A JSON object cut short.
    Truncated,
    /// Not JSON at all (a CSV line).
    NotJson,
    /// One of `record_id`, `iccid`, `end`, `bytes_up`, `bytes_down` absent.
    MissingField,
    /// A byte count as a string or `null`.
    MistypedField,
    /// A negative byte count.
    NegativeBytes,
    /// A byte count of 9 * 10^18 (absurd).
    AbsurdBytes,
    /// `end` is not RFC 3339 (out-of-range fields, wrong shape, epoch
    /// seconds, a word).
    BadTimestamp,
    /// An ICCID that is too short, too long, or has a letter inside.
    BadIccid,
    /// `start` one hour after `end`.
    EndBeforeStart,
    /// `end` 30 days to a year after arrival.
    FarFuture,
}

impl Defect {
    /// Every defect; malformed records pick one uniformly.
    pub const ALL: [Defect; 10] = [
        Defect::Truncated,
        Defect::NotJson,
        Defect::MissingField,
        Defect::MistypedField,
        Defect::NegativeBytes,
        Defect::AbsurdBytes,
        Defect::BadTimestamp,
        Defect::BadIccid,
        Defect::EndBeforeStart,
        Defect::FarFuture,
    ];
}

/// The content of a generated record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// A well-formed record (Fresh, Duplicate, Late, OutOfOrder,
    /// UnknownCard).
    Valid(Usage),
    /// Raw bytes (valid UTF-8, one line) that a strict reader must reject.
    Malformed {
        /// The card the carrier meant (the Kafka key a producer would use).
        iccid: Iccid,
        /// How the bytes are broken.
        defect: Defect,
        /// The bytes as sent.
        bytes: Vec<u8>,
    },
}

/// One record of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedRecord {
    /// Position in the stream, from 0.
    pub seq: u64,
    /// When the record reaches flowcap (non-decreasing along the stream).
    pub arrival: Timestamp,
    /// What the record is.
    pub kind: RecordKind,
    /// Its content.
    pub payload: Payload,
}

impl GeneratedRecord {
    /// The ICCID the record is keyed by (for malformed ones, the intended
    /// card).
    pub fn iccid(&self) -> Iccid {
        match &self.payload {
            Payload::Valid(u) => u.iccid,
            Payload::Malformed { iccid, .. } => *iccid,
        }
    }

    /// The record as one line (no newline): SPEC section 4 JSON for valid
    /// records, the raw bytes for malformed ones.
    pub fn to_json_line(&self, out: &mut String) {
        to_json_line(self, out);
    }

    /// Appends the record as one Kafka message value in flowcap's compact
    /// binary encoding ([`flowcap_engine::decode::encode_binary`]) for
    /// valid records, the raw bytes (the same as [`to_json_line`]'s) for
    /// malformed ones.
    pub fn to_binary(&self, out: &mut Vec<u8>) {
        match &self.payload {
            Payload::Valid(u) => flowcap_engine::decode::encode_binary(u, out),
            Payload::Malformed { bytes, .. } => out.extend_from_slice(bytes),
        }
    }
}

/// Appends the record as one line (no newline) to `out`: SPEC section 4
/// JSON with every field and `+08:00` offsets for valid records (`imsi`,
/// `msisdn`, `imei` are those of the card's `upsert_card`), the raw bytes
/// for malformed ones.
pub fn to_json_line(record: &GeneratedRecord, out: &mut String) {
    match &record.payload {
        Payload::Valid(u) => format::write_usage_json(u, out),
        Payload::Malformed { bytes, .. } => out.push_str(&String::from_utf8_lossy(bytes)),
    }
}

/// The record stream of a [`Workload`], in arrival order.
///
/// `total_records` records arrive evenly spread over `duration_hours`:
/// record `k` arrives at `start + (k + u) * duration / total` with `u`
/// uniform in `[0, 1)`. Each record first draws its kind from the `*_pct`
/// knobs, then (for known cards) a card uniformly. Memory is constant
/// apart from the duplicate window (`duplicate_window` recent records).
#[derive(Debug, Clone)]
pub struct Records<'a> {
    workload: &'a Workload,
    rng: Xoshiro,
    next: u64,
    total: u64,
    start_ms: i64,
    end_ms: i64,
    ms_per_record: f64,
    last_arrival: i64,
    /// Cumulative thresholds of the kinds, in percent.
    cuts: [f64; 5],
    recent: Vec<(Usage, u32)>,
    recent_pos: usize,
    window: usize,
    id_buf: String,
}

/// A record and, for kinds that count usage, the index of its card.
pub(crate) type Counted = (GeneratedRecord, Option<u32>);

impl<'a> Records<'a> {
    pub(crate) fn new(workload: &'a Workload) -> Records<'a> {
        let c = workload.config();
        let total = c.total_records();
        let duration_ms = i64::from(c.duration_hours) * 3_600_000;
        let mut cuts = [0.0; 5];
        let mut acc = 0.0;
        for (slot, pct) in cuts.iter_mut().zip([
            c.duplicate_pct,
            c.malformed_pct,
            c.unknown_card_pct,
            c.late_pct,
            c.out_of_order_pct,
        ]) {
            acc += pct;
            *slot = acc;
        }
        Records {
            workload,
            rng: Xoshiro::new(c.seed, STREAM_RECORDS),
            next: 0,
            total,
            start_ms: c.start.0,
            end_ms: c.start.0 + duration_ms,
            ms_per_record: duration_ms as f64 / total.max(1) as f64,
            last_arrival: c.start.0,
            cuts,
            recent: Vec::new(),
            recent_pos: 0,
            window: c.duplicate_window as usize,
            id_buf: String::with_capacity(48),
        }
    }

    /// The next record with its card index (for Fresh, Late, OutOfOrder and
    /// Duplicate records).
    pub(crate) fn next_counted(&mut self) -> Option<Counted> {
        if self.next >= self.total {
            return None;
        }
        let seq = self.next;
        self.next += 1;
        let offset = ((seq as f64 + self.rng.unit()) * self.ms_per_record) as i64;
        let arrival_ms = (self.start_ms + offset).clamp(self.last_arrival, self.end_ms - 1);
        self.last_arrival = arrival_ms;
        let arrival = Timestamp(arrival_ms);

        let roll = self.rng.unit() * 100.0;
        let mut kind = match self.cuts.iter().position(|&cut| roll < cut) {
            Some(0) => RecordKind::Duplicate,
            Some(1) => RecordKind::Malformed,
            Some(2) => RecordKind::UnknownCard,
            Some(3) => RecordKind::Late,
            Some(4) => RecordKind::OutOfOrder,
            _ => RecordKind::Fresh,
        };
        if kind == RecordKind::Duplicate {
            if self.recent.is_empty() {
                // Nothing to resend yet: the record is fresh instead.
                kind = RecordKind::Fresh;
            } else {
                let pick = self.rng.below(self.recent.len() as u64) as usize;
                let (usage, card) = self.recent[pick];
                return Some((
                    GeneratedRecord {
                        seq,
                        arrival,
                        kind,
                        payload: Payload::Valid(usage),
                    },
                    Some(card),
                ));
            }
        }

        let config = self.workload.config();
        let delay_ms = match kind {
            RecordKind::Late => {
                let late_ms = i64::from(config.late_by_hours) * 3_600_000;
                late_ms + self.rng.between(1_000, late_ms)
            }
            RecordKind::OutOfOrder => {
                let window_ms = i64::from(config.out_of_order_window_secs) * 1000;
                self.rng.between(window_ms / 2, window_ms)
            }
            _ => self.rng.between(0, FRESH_MAX_DELAY_MS),
        };
        let end_ms = arrival_ms - delay_ms;
        let end = Timestamp(end_ms - end_ms.rem_euclid(1000));

        let (iccid, carrier, weight, card) = if kind == RecordKind::UnknownCard {
            let carrier = Carrier::ALL[pick_weighted(&[1.0; 4], self.rng.unit())];
            let mut buf = *b"89860000000000000000";
            buf[4..6].copy_from_slice(UNKNOWN_CARRIER_CODE.as_bytes());
            format::write_digits(&mut buf[6..], self.rng.below(100_000_000_000_000));
            let iccid = Iccid::parse_bytes(&buf).unwrap_or(self.workload.fallback_iccid);
            (iccid, carrier, 1.0, None)
        } else {
            let index = self.rng.below(self.workload.card_count()) as u32;
            let profile = self.workload.profiles()[index as usize];
            let iccid = self.workload.iccid_for(profile.carrier, u64::from(index));
            (
                iccid,
                profile.carrier,
                f64::from(profile.weight),
                Some(index),
            )
        };

        let noise: f64 = Exp1.sample(&mut self.rng);
        let bytes = (config.mean_bytes_per_record as f64 * weight * noise).round();
        let bytes = if bytes.is_finite() {
            (bytes as u64).clamp(1, 1 << 50)
        } else {
            1
        };
        let up_share = 0.05 + 0.45 * self.rng.unit();
        let bytes_up = ((bytes as f64 * up_share) as u64).min(bytes);

        self.id_buf.clear();
        self.id_buf.push_str(carrier.as_str());
        self.id_buf.push('-');
        format::write_yyyymmdd(end, &mut self.id_buf);
        self.id_buf.push('-');
        format::push_padded(&mut self.id_buf, seq, 10);
        let record_id = RecordId::new(&self.id_buf).unwrap_or(self.workload.fallback_record_id);

        let usage = Usage {
            record_id,
            iccid,
            start: Some(end.plus_millis(-i64::from(config.record_interval_secs) * 1000)),
            end,
            bytes_up,
            bytes_down: bytes - bytes_up,
            carrier: Some(carrier),
            imei: format::imei_of(format::card_number(iccid)),
        };

        let payload = if kind == RecordKind::Malformed {
            let defect = Defect::ALL[self.rng.below(Defect::ALL.len() as u64) as usize];
            let text = format::malformed(&usage, defect, arrival, &mut self.rng);
            Payload::Malformed {
                iccid,
                defect,
                bytes: text.into_bytes(),
            }
        } else {
            Payload::Valid(usage)
        };
        let counted = if kind.counts_usage() { card } else { None };
        if let Some(index) = counted {
            if self.recent.len() < self.window {
                self.recent.push((usage, index));
            } else {
                self.recent[self.recent_pos] = (usage, index);
                self.recent_pos = (self.recent_pos + 1) % self.window;
            }
        }
        Some((
            GeneratedRecord {
                seq,
                arrival,
                kind,
                payload,
            },
            counted,
        ))
    }
}

impl Iterator for Records<'_> {
    type Item = GeneratedRecord;

    fn next(&mut self) -> Option<GeneratedRecord> {
        self.next_counted().map(|(record, _)| record)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = usize::try_from(self.total - self.next).unwrap_or(usize::MAX);
        (left, Some(left))
    }
}
