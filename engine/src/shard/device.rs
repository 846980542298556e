//! Device binding (SPEC section 2.1): a card binds to the IMEI of the first
//! device it is used in, and a record from another device means the SIM
//! moved ("machine-card separation"). What a move does is the carrier's
//! rule:
//!
//! - cmcc: `violation`; `resume` does not lift it, only a rebind does.
//! - ctcc (and tri, see docs/DECISIONS.md): the card stays active but loses
//!   network (the `separated` flag); a rebind restores it, at most 2
//!   rebinds per card per calendar month.
//! - cucc: the carrier unbinds, so the card follows the new device; the
//!   3rd device change of a calendar month raises `violation`. No rebind.
//!
//! Every record that counts carries the check, so it is one comparison of
//! the record's packed IMEI with the card's (kept packed beside the cards);
//! anything more happens only when they differ.

use serde::{Deserialize, Serialize};

use crate::domain::{Carrier, Reason};
use crate::event::DeviceChange;
use crate::record::Imei;
use crate::time::Timestamp;

use super::Shard;

/// Most successful rebinds of a ctcc card in one calendar month.
pub(crate) const MAX_REBINDS_PER_MONTH: u8 = 2;
/// Device changes of a cucc card in one calendar month that raise
/// `violation`.
pub(crate) const CUCC_CHANGES_FOR_VIOLATION: u8 = 3;

/// A card's device history, kept (rarely) in its `CardExtra`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Device {
    /// Its `violation` comes from a device move (cmcc: only a rebind
    /// lifts it).
    pub(crate) moved: bool,
    /// The calendar month (`year * 12 + month - 1`, billing time zone) the
    /// counts below are for.
    pub(crate) month: i64,
    /// Device changes in `month` (cucc).
    pub(crate) changes: u8,
    /// Successful rebinds in `month` (ctcc, tri).
    pub(crate) rebinds: u8,
}

impl Device {
    /// The counts for the month of `month`, reset when it is a new one.
    pub(crate) fn in_month(&mut self, month: i64) -> &mut Device {
        if self.month != month {
            self.month = month;
            self.changes = 0;
            self.rebinds = 0;
        }
        self
    }
}

impl Shard {
    /// Checks the device of a record that counts for the card in `slot`.
    #[inline]
    pub(super) fn check_device(&mut self, slot: u32, imei: Imei, at: Timestamp) {
        let bound = self.idents.get(slot as usize).map_or(0, |i| i[2]);
        if bound != imei.packed() {
            self.device_seen(slot, imei, bound, at);
        }
    }

    /// The calendar month of `at` in the billing time zone.
    pub(crate) fn month_of(&self, at: Timestamp) -> i64 {
        let (y, m, _) = at.civil_date(self.config.calendar.utc_offset_secs);
        y * 12 + i64::from(m) - 1
    }

    #[cold]
    fn device_seen(&mut self, slot: u32, imei: Imei, bound: u64, at: Timestamp) {
        if bound == 0 {
            if self.extras.get(&slot).is_some_and(|e| e.imei.is_some()) {
                // Bound to an IMEI that is not in digits: not compared.
                return;
            }
            // First use: the card binds to this device.
            self.set_ident(slot, 2, Some(imei.to_string()));
            return;
        }
        let carrier = self.cards[slot as usize].carrier;
        let month = self.month_of(at);
        self.touch(slot);
        let change = DeviceChange {
            bound: Imei::from_packed(bound),
            seen: imei,
        };
        match carrier {
            Carrier::Cmcc => {
                self.device_mut(slot).moved = true;
                self.raise_violation(slot);
            }
            Carrier::Ctcc | Carrier::Tri => self.cards[slot as usize].separated = true,
            Carrier::Cucc => {
                self.set_ident(slot, 2, Some(imei.to_string()));
                let device = self.device_mut(slot).in_month(month);
                device.changes = device.changes.saturating_add(1);
                if device.changes >= CUCC_CHANGES_FOR_VIOLATION {
                    device.moved = true;
                    self.raise_violation(slot);
                }
            }
        }
        self.pending.devices.push((slot, change));
    }

    fn raise_violation(&mut self, slot: u32) {
        let card = &mut self.cards[slot as usize];
        card.reasons = card.reasons.with(Reason::Violation);
    }

    pub(crate) fn device_mut(&mut self, slot: u32) -> &mut Device {
        self.extra_mut(slot)
            .device
            .get_or_insert_with(Device::default)
    }

    /// The card's `violation`, if any, no longer comes from a device move.
    pub(crate) fn clear_moved(&mut self, slot: u32) {
        let device = self.extras.get_mut(&slot).and_then(|e| e.device.as_mut());
        if let Some(device) = device {
            device.moved = false;
        }
    }

    /// Whether the card's `violation` comes from a device move.
    pub(crate) fn moved(&self, slot: u32) -> bool {
        self.extra(slot)
            .and_then(|e| e.device.as_ref())
            .is_some_and(|d| d.moved)
    }
}
