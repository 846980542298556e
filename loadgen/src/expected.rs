//! The outcome an engine must reach, from the generator's own bookkeeping.

use std::collections::BTreeMap;

use flowcap_engine::{Carrier, CycleCalendar, CycleId, Iccid, Timestamp};
use serde::{Deserialize, Serialize};

use crate::records::{Payload, RecordKind};
use crate::workload::{card_index_of, Workload};

/// How many records of each kind the stream holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindCounts {
    /// [`RecordKind::Fresh`].
    pub fresh: u64,
    /// [`RecordKind::Duplicate`].
    pub duplicate: u64,
    /// [`RecordKind::Late`].
    pub late: u64,
    /// [`RecordKind::OutOfOrder`].
    pub out_of_order: u64,
    /// [`RecordKind::UnknownCard`].
    pub unknown_card: u64,
    /// [`RecordKind::Malformed`].
    pub malformed: u64,
}

impl KindCounts {
    /// The count of one kind.
    pub fn get(&self, kind: RecordKind) -> u64 {
        match kind {
            RecordKind::Fresh => self.fresh,
            RecordKind::Duplicate => self.duplicate,
            RecordKind::Late => self.late,
            RecordKind::OutOfOrder => self.out_of_order,
            RecordKind::UnknownCard => self.unknown_card,
            RecordKind::Malformed => self.malformed,
        }
    }

    /// Adds one record of a kind.
    pub fn add(&mut self, kind: RecordKind) {
        let slot = match kind {
            RecordKind::Fresh => &mut self.fresh,
            RecordKind::Duplicate => &mut self.duplicate,
            RecordKind::Late => &mut self.late,
            RecordKind::OutOfOrder => &mut self.out_of_order,
            RecordKind::UnknownCard => &mut self.unknown_card,
            RecordKind::Malformed => &mut self.malformed,
        };
        *slot += 1;
    }

    /// All records.
    pub fn total(&self) -> u64 {
        RecordKind::ALL.iter().map(|&k| self.get(k)).sum()
    }

    /// Records that add usage (distinct record ids of known cards): fresh,
    /// late and out-of-order.
    pub fn counted(&self) -> u64 {
        self.fresh + self.late + self.out_of_order
    }
}

/// One card's expected usage in one cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardCycleUsage {
    /// The card.
    pub iccid: Iccid,
    /// Its carrier (decides the cycle calendar).
    pub carrier: Carrier,
    /// The cycle of the records' `end` (UTC+8; `cucc` 27th to 26th).
    pub cycle: CycleId,
    /// Bytes of every counted record whose `end` is in the cycle.
    pub bytes: u64,
    /// The part of `bytes` that came from late records.
    pub late_bytes: u64,
}

/// The expected outcome of a workload, computed independently of any
/// engine by running the generator and summing as it goes.
///
/// **What counts.** A record counts when it is Fresh, Late or OutOfOrder:
/// each of those carries a record id of its own for a card of the setup,
/// so counting them is exactly "each (card, record id) once". Duplicates
/// (resends), unknown-card and malformed records never count. A counted
/// record's usage (`bytes_up + bytes_down`) goes to the cycle of its
/// `end`, in the card's carrier's calendar at UTC+8 (so a `cucc` record
/// ending on the 27th counts in the next month's cycle).
///
/// **Late records.** They count in their own cycle's history total
/// ([`CardCycleUsage::bytes`]), and that part is also reported on its own
/// ([`CardCycleUsage::late_bytes`]): an engine whose lateness tolerance
/// kept a late record out of enforcement expects `bytes - late_bytes` in
/// its live counters for a cycle that had already closed, and `bytes` in
/// history.
///
/// Memory: one `u64` per card and cycle the run can touch (usually 2 or
/// 3), one byte per card, and a sparse map for the late bytes.
#[derive(Debug, Clone)]
pub struct Expected {
    counts: KindCounts,
    calendar: CycleCalendar,
    first_cycle: CycleId,
    cycles: usize,
    carriers: Vec<Carrier>,
    bytes: Vec<u64>,
    late: BTreeMap<(u32, CycleId), u64>,
    fallback_iccid: Iccid,
}

impl Expected {
    pub(crate) fn compute(workload: &Workload) -> Expected {
        let config = workload.config();
        let calendar = workload.calendar();
        // Every counted `end` lies in [start - 2 * late_by - a day, start +
        // duration]; a day of margin on both sides.
        let earliest = config
            .start
            .plus_millis(-(2 * i64::from(config.late_by_hours) + 24) * 3_600_000);
        let latest = config
            .start
            .plus_millis((i64::from(config.duration_hours) + 24) * 3_600_000);
        let first_cycle = Carrier::ALL
            .iter()
            .map(|&c| calendar.cycle_of(c, earliest))
            .min()
            .unwrap_or(CycleId(0));
        let last_cycle = Carrier::ALL
            .iter()
            .map(|&c| calendar.cycle_of(c, latest))
            .max()
            .unwrap_or(first_cycle);
        let cycles = (last_cycle.0 - first_cycle.0 + 1) as usize;
        let carriers: Vec<Carrier> = (0..workload.card_count())
            .map(|i| workload.carrier(i).unwrap_or(Carrier::Cmcc))
            .collect();
        let mut expected = Expected {
            counts: KindCounts::default(),
            calendar,
            first_cycle,
            cycles,
            bytes: vec![0; carriers.len() * cycles],
            carriers,
            late: BTreeMap::new(),
            fallback_iccid: workload.fallback_iccid,
        };
        let mut records = workload.records();
        while let Some((record, card)) = records.next_counted() {
            expected.counts.add(record.kind);
            if !record.kind.counts_usage() {
                continue;
            }
            let (Some(card), Payload::Valid(usage)) = (card, &record.payload) else {
                continue;
            };
            expected.add(
                card,
                usage.end,
                usage.bytes(),
                record.kind == RecordKind::Late,
            );
        }
        expected
    }

    fn add(&mut self, card: u32, end: Timestamp, bytes: u64, late: bool) {
        let Some(&carrier) = self.carriers.get(card as usize) else {
            return;
        };
        let cycle = self.calendar.cycle_of(carrier, end);
        if let Some(slot) = self.slot(card as usize, cycle) {
            self.bytes[slot] += bytes;
        }
        if late {
            *self.late.entry((card, cycle)).or_default() += bytes;
        }
    }

    fn slot(&self, card: usize, cycle: CycleId) -> Option<usize> {
        let offset = cycle.0.checked_sub(self.first_cycle.0)? as usize;
        (offset < self.cycles).then_some(card * self.cycles + offset)
    }

    fn index(&self, iccid: Iccid) -> Option<usize> {
        card_index_of(iccid, |i| self.carriers.get(i).copied()).map(|i| i as usize)
    }

    /// Records per kind.
    pub fn counts(&self) -> KindCounts {
        self.counts
    }

    /// The cycles the run can touch, oldest first (a superset of those with
    /// usage).
    pub fn cycles(&self) -> Vec<CycleId> {
        (0..self.cycles as u32)
            .map(|k| CycleId(self.first_cycle.0 + k))
            .collect()
    }

    /// Expected history total of one card in one cycle (0 for cards not in
    /// the setup).
    pub fn card_cycle_bytes(&self, iccid: Iccid, cycle: CycleId) -> u64 {
        self.index(iccid)
            .and_then(|i| self.slot(i, cycle))
            .map_or(0, |slot| self.bytes[slot])
    }

    /// The part of [`Expected::card_cycle_bytes`] from late records.
    pub fn card_cycle_late_bytes(&self, iccid: Iccid, cycle: CycleId) -> u64 {
        self.index(iccid)
            .and_then(|i| self.late.get(&(i as u32, cycle)).copied())
            .unwrap_or(0)
    }

    /// Every (card, cycle) with usage, by card index then cycle.
    pub fn entries(&self) -> impl Iterator<Item = CardCycleUsage> + '_ {
        self.bytes
            .iter()
            .enumerate()
            .filter(|(_, &b)| b > 0)
            .map(move |(slot, &bytes)| {
                let card = slot / self.cycles;
                let cycle = CycleId(self.first_cycle.0 + (slot % self.cycles) as u32);
                let carrier = self.carriers[card];
                CardCycleUsage {
                    iccid: crate::workload::make_iccid(carrier, card as u64)
                        .unwrap_or(self.fallback_iccid),
                    carrier,
                    cycle,
                    bytes,
                    late_bytes: self.late.get(&(card as u32, cycle)).copied().unwrap_or(0),
                }
            })
    }

    /// Total counted bytes per (carrier, cycle).
    pub fn cycle_totals(&self) -> BTreeMap<(Carrier, CycleId), u64> {
        let mut totals = BTreeMap::new();
        for (slot, &bytes) in self.bytes.iter().enumerate() {
            if bytes > 0 {
                let carrier = self.carriers[slot / self.cycles];
                let cycle = CycleId(self.first_cycle.0 + (slot % self.cycles) as u32);
                *totals.entry((carrier, cycle)).or_default() += bytes;
            }
        }
        totals
    }

    /// Total counted bytes of the whole run.
    pub fn total_bytes(&self) -> u64 {
        self.bytes.iter().sum()
    }

    /// Total bytes of late records.
    pub fn total_late_bytes(&self) -> u64 {
        self.late.values().sum()
    }
}
