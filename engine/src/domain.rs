//! Domain vocabulary of SPEC sections 1 and 2: carriers, traffic types,
//! card states and suspension reasons.

use std::fmt;

use serde::{Deserialize, Serialize};

/// 1 MB = 1,048,576 bytes everywhere in flowcap.
pub const MB: u64 = 1_048_576;

/// Policy cap for `general` traffic: 100 MB per cycle, not raised by pools or
/// add-on packs.
pub const GENERAL_CAP_BYTES: u64 = 100 * MB;

/// A mobile network operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Carrier {
    /// China Mobile.
    Cmcc,
    /// China Telecom.
    Ctcc,
    /// China Unicom (cycle runs 27th to 26th).
    Cucc,
    /// Tri-network card hopping between the three.
    Tri,
}

impl Carrier {
    /// Every carrier, in a fixed order.
    pub const ALL: [Carrier; 4] = [Carrier::Cmcc, Carrier::Ctcc, Carrier::Cucc, Carrier::Tri];

    /// The wire name (`cmcc`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Carrier::Cmcc => "cmcc",
            Carrier::Ctcc => "ctcc",
            Carrier::Cucc => "cucc",
            Carrier::Tri => "tri",
        }
    }

    /// Parses the wire name.
    pub fn parse(text: &[u8]) -> Option<Carrier> {
        match text {
            b"cmcc" => Some(Carrier::Cmcc),
            b"ctcc" => Some(Carrier::Ctcc),
            b"cucc" => Some(Carrier::Cucc),
            b"tri" => Some(Carrier::Tri),
            _ => None,
        }
    }

    /// Whether billing cycles run from the 27th to the 26th.
    pub fn cycle_starts_on_27th(self) -> bool {
        matches!(self, Carrier::Cucc)
    }

    /// Whether carriers accept a cut-off threshold for a card of this
    /// carrier that is not in a forward pool (SPEC section 5: only `ctcc`).
    /// Tri-network cards are not named by the SPEC; flowcap treats them like
    /// `ctcc` (threshold always accepted), see docs/DECISIONS.md.
    pub fn threshold_needs_forward_pool(self) -> bool {
        matches!(self, Carrier::Cmcc | Carrier::Cucc)
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Carrier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What destinations a plan's data may reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrafficType {
    /// Any destination; subject to the 100 MB general cap.
    General,
    /// Only whitelisted domains and IPs.
    Directed,
}

/// A card's life-cycle state (SPEC section 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CardState {
    /// In its test period.
    Testable,
    /// Not yet usable (stock); flowcap records usage but does not activate it.
    Inactive,
    /// Silent period: the first usage activates it.
    Activatable,
    /// May use data.
    Active,
    /// Cut off while at least one suspension reason holds.
    Suspended,
    /// Terminal.
    Deregistered,
}

impl CardState {
    /// Every state, in a fixed order.
    pub const ALL: [CardState; 6] = [
        CardState::Testable,
        CardState::Inactive,
        CardState::Activatable,
        CardState::Active,
        CardState::Suspended,
        CardState::Deregistered,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            CardState::Testable => "testable",
            CardState::Inactive => "inactive",
            CardState::Activatable => "activatable",
            CardState::Active => "active",
            CardState::Suspended => "suspended",
            CardState::Deregistered => "deregistered",
        }
    }
}

impl fmt::Display for CardState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a card is suspended (SPEC section 2). A card is suspended while at
/// least one reason holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Cycle usage above plan + card add-ons (cards outside forward pools).
    OverQuota,
    /// Cycle usage above the cut-off threshold.
    OverThreshold,
    /// `general` traffic above 100 MB in the cycle.
    GeneralCap,
    /// Forward pool usage above the pool allowance.
    PoolExhausted,
    /// A backward-pool rule with the suspend action fired.
    BackwardPoolThreshold,
    /// Backward pool frozen for arrears.
    PoolFrozen,
    /// Plan expired without renewal.
    PlanExpired,
    /// Operator suspend.
    Manual,
    /// Carrier-reported violation.
    Violation,
}

impl Reason {
    /// Every reason, in bit order.
    pub const ALL: [Reason; 9] = [
        Reason::OverQuota,
        Reason::OverThreshold,
        Reason::GeneralCap,
        Reason::PoolExhausted,
        Reason::BackwardPoolThreshold,
        Reason::PoolFrozen,
        Reason::PlanExpired,
        Reason::Manual,
        Reason::Violation,
    ];

    /// Whether the reason is lifted when a new cycle starts.
    pub fn lifts_next_cycle(self) -> bool {
        matches!(
            self,
            Reason::OverQuota
                | Reason::OverThreshold
                | Reason::GeneralCap
                | Reason::PoolExhausted
                | Reason::BackwardPoolThreshold
        )
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::OverQuota => "over_quota",
            Reason::OverThreshold => "over_threshold",
            Reason::GeneralCap => "general_cap",
            Reason::PoolExhausted => "pool_exhausted",
            Reason::BackwardPoolThreshold => "backward_pool_threshold",
            Reason::PoolFrozen => "pool_frozen",
            Reason::PlanExpired => "plan_expired",
            Reason::Manual => "manual",
            Reason::Violation => "violation",
        }
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of suspension reasons, one bit each.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Reasons(u16);

impl Reasons {
    /// No reason.
    pub const EMPTY: Reasons = Reasons(0);

    /// Whether no reason holds.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether `reason` is in the set.
    pub fn contains(self, reason: Reason) -> bool {
        self.0 & reason.bit() != 0
    }

    /// The set with `reason` added.
    #[must_use]
    pub fn with(self, reason: Reason) -> Reasons {
        Reasons(self.0 | reason.bit())
    }

    /// The set with `reason` removed.
    #[must_use]
    pub fn without(self, reason: Reason) -> Reasons {
        Reasons(self.0 & !reason.bit())
    }

    /// The set with `reason` present or absent.
    #[must_use]
    pub fn set(self, reason: Reason, present: bool) -> Reasons {
        if present {
            self.with(reason)
        } else {
            self.without(reason)
        }
    }

    /// The set without every reason that lifts at the next cycle.
    #[must_use]
    pub fn after_rollover(self) -> Reasons {
        Reason::ALL
            .iter()
            .filter(|r| r.lifts_next_cycle())
            .fold(self, |acc, r| acc.without(*r))
    }

    /// The reasons, in bit order.
    pub fn iter(self) -> impl Iterator<Item = Reason> {
        Reason::ALL.into_iter().filter(move |r| self.contains(*r))
    }

    /// The raw bits (stable: used in snapshots).
    pub fn bits(self) -> u16 {
        self.0
    }

    /// Rebuilds from [`Reasons::bits`], dropping unknown bits.
    pub fn from_bits(bits: u16) -> Reasons {
        Reasons(bits & ((1 << Reason::ALL.len()) - 1))
    }
}

impl FromIterator<Reason> for Reasons {
    fn from_iter<T: IntoIterator<Item = Reason>>(iter: T) -> Self {
        iter.into_iter().fold(Reasons::EMPTY, Reasons::with)
    }
}

impl fmt::Debug for Reasons {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

/// A list of names in human-readable formats (JSON), the bits in binary
/// ones (snapshots).
impl Serialize for Reasons {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_seq(self.iter().collect::<Vec<_>>())
        } else {
            serializer.serialize_u16(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Reasons {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            Ok(Vec::<Reason>::deserialize(deserializer)?
                .into_iter()
                .collect())
        } else {
            Ok(Reasons::from_bits(u16::deserialize(deserializer)?))
        }
    }
}

/// A cut-off threshold in MB as the carriers write it: `-1` none, `0` cut
/// at the first byte, `N` cut once cycle usage exceeds N MB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ThresholdMb(pub i64);

impl ThresholdMb {
    /// No threshold.
    pub const NONE: ThresholdMb = ThresholdMb(-1);

    /// The limit in bytes, or `None` for no threshold. Usage strictly above
    /// the limit is cut; `0` cuts at the first byte.
    pub fn limit_bytes(self) -> Option<u64> {
        u64::try_from(self.0).ok().map(|mb| mb.saturating_mul(MB))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_set_algebra() {
        let r = Reasons::EMPTY.with(Reason::Manual).with(Reason::OverQuota);
        assert!(r.contains(Reason::Manual));
        assert_eq!(r.after_rollover(), Reasons::EMPTY.with(Reason::Manual));
        assert_eq!(
            r.iter().collect::<Vec<_>>(),
            vec![Reason::OverQuota, Reason::Manual]
        );
        assert_eq!(Reasons::from_bits(r.bits()), r);
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json, r#"["over_quota","manual"]"#);
    }

    #[test]
    fn next_cycle_reasons_match_spec_table() {
        let lifted: Vec<_> = Reason::ALL
            .iter()
            .filter(|r| r.lifts_next_cycle())
            .collect();
        assert_eq!(
            lifted,
            [
                &Reason::OverQuota,
                &Reason::OverThreshold,
                &Reason::GeneralCap,
                &Reason::PoolExhausted,
                &Reason::BackwardPoolThreshold
            ]
        );
    }

    #[test]
    fn threshold_limits() {
        assert_eq!(ThresholdMb::NONE.limit_bytes(), None);
        assert_eq!(ThresholdMb(0).limit_bytes(), Some(0));
        assert_eq!(ThresholdMb(50).limit_bytes(), Some(50 * MB));
    }
}
