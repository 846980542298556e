//! Engine configuration: everything that changes what the engine decides.
//! It is part of every snapshot, because a restore under a different
//! configuration would not reproduce the same decisions.

use serde::{Deserialize, Serialize};

use crate::cycle::CycleCalendar;
use crate::time::{Timestamp, MS_PER_DAY, MS_PER_HOUR};

/// Engine configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Billing time zone (fixed UTC offset; UTC+8 by default).
    pub calendar: CycleCalendar,
    /// How long after a cycle ends a record of it still counts for that
    /// cycle (its usage, its limits: `late_crossing`) instead of being
    /// reported late, history only, in ms.
    pub allowed_lateness_ms: i64,
    /// Records whose end is further than this ahead of the event clock are
    /// rejected as "time far in the future", in ms.
    pub max_future_ms: i64,
    /// How many of the cards furthest ahead in event time the clock
    /// listens to: it is the time a majority of them have all reached
    /// (`engine::watermark`), so fewer than `clock_quorum / 2 + 1` cards
    /// can never move time for the rest. 1 makes the clock the latest
    /// `end` seen (one card moves time for all).
    pub clock_quorum: usize,
    /// Number of shards (0 = one per available core).
    pub shards: usize,
    /// Hot window of the dedupe: records whose end is within this of the
    /// event clock are checked in memory first, in ms.
    pub dedupe_window_ms: i64,
    /// Check the dedupe id store on every hot-window miss too: exact for
    /// any reuse of a record id, ever, even with a different `end` long
    /// after the original (one index lookup per fresh record). Off by
    /// default: resends carry the same `end` and are always caught.
    pub dedupe_verify_misses: bool,
    /// Silent period of an activatable card without an explicit
    /// `silent_ends_at`, in months from the command that created it.
    pub silent_period_months: u32,
    /// Days after an expiry without renewal until the card is deregistered
    /// for good (SPEC section 2.1); `None`: it stays suspended
    /// `plan_expired`.
    pub expiry_grace_days: Option<u32>,
    /// Days a backward pool is retained (`retain_pool`) before it is
    /// abandoned (SPEC section 2.1).
    pub pool_retention_days: u32,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            calendar: CycleCalendar::default(),
            allowed_lateness_ms: 2 * MS_PER_HOUR,
            max_future_ms: MS_PER_DAY,
            clock_quorum: 16,
            shards: 0,
            dedupe_window_ms: 48 * MS_PER_HOUR,
            dedupe_verify_misses: false,
            silent_period_months: 6,
            expiry_grace_days: None,
            pool_retention_days: 90,
        }
    }
}

impl EngineConfig {
    /// When a card that expired at `expires_at` without renewal is
    /// deregistered, if ever.
    pub fn grace_end(&self, expires_at: Timestamp) -> Option<Timestamp> {
        let days = self.expiry_grace_days?;
        (expires_at != Timestamp::MAX).then(|| expires_at.plus_millis(i64::from(days) * MS_PER_DAY))
    }

    /// The shard count to use: `shards`, or the number of cores when 0.
    pub fn effective_shards(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}
