//! The knobs of a workload: [`WorkloadConfig`] and its parts.

use flowcap_engine::ids::PlanId;
use flowcap_engine::{Carrier, Timestamp, TrafficType};
use serde::{Deserialize, Serialize};

use crate::error::LoadgenError;

/// Fewest cards a workload may have.
pub const MIN_CARDS: u64 = 1_000;
/// Most cards a workload may have.
pub const MAX_CARDS: u64 = 10_000_000;
/// Longest run, in hours (one leap year).
pub const MAX_DURATION_HOURS: u32 = 24 * 366;
/// Most records one workload may produce.
pub const MAX_TOTAL_RECORDS: u64 = 1_000_000_000_000;
/// Most entries in [`WorkloadConfig::threshold_mb`].
pub const MAX_THRESHOLD_CHOICES: usize = 32;
/// Most plan templates (plans per carrier).
pub const MAX_PLAN_TEMPLATES: usize = 64;
/// A fresh record's event time (`end`) lies at most this long before its
/// arrival (transport delay).
pub const FRESH_MAX_DELAY_MS: i64 = 30_000;

/// Everything that shapes a workload. Every field has a default (see
/// [`WorkloadConfig::default`]), so `{}` is a valid configuration and a JSON
/// file only needs the fields it changes; unknown fields are rejected.
///
/// Shares (`*_share`) are fractions in `0..=1`; knobs (`*_pct`) are
/// percentages of all generated records in `0..=100`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkloadConfig {
    /// Seed of every random choice. Same seed and config, same output.
    pub seed: u64,
    /// Number of cards, [`MIN_CARDS`] to [`MAX_CARDS`].
    pub cards: u64,
    /// Relative weights of the carriers among the cards.
    pub carrier_mix: CarrierMix,
    /// Plan catalogue: each template becomes one plan per carrier (id e.g.
    /// `cmcc-30m-d`); cards pick a template by weight.
    pub plans: Vec<PlanTemplate>,
    /// Share of cards in forward pools (pools group cards of one carrier and
    /// plan).
    pub forward_pool_share: f64,
    /// Share of cards in backward pools (exclusive with forward pools).
    pub backward_pool_share: f64,
    /// Members per pool (the last pool of a group may be smaller).
    pub pool_size: u32,
    /// Share of the *eligible* cards that get a cut-off threshold. Eligible
    /// (SPEC section 5): every `ctcc` card, and `cmcc`/`cucc` cards in a
    /// forward pool. `tri` cards never get one.
    pub threshold_share: f64,
    /// Threshold values in MB; a card with a threshold picks one uniformly.
    pub threshold_mb: Vec<i64>,
    /// Share of cards outside forward pools that buy one card add-on pack,
    /// and share of forward pools that buy one pool add-on pack.
    pub add_on_share: f64,
    /// Size of each add-on pack in MB.
    pub add_on_mb: u64,
    /// Event time of the setup commands and arrival time of the first record.
    pub start: Timestamp,
    /// Length of the run in hours; records arrive evenly spread over it.
    pub duration_hours: u32,
    /// Mean records per card per hour (the total is
    /// `round(cards * records_per_card_per_hour * duration_hours)`; each
    /// record picks its card uniformly).
    pub records_per_card_per_hour: f64,
    /// Mean usage (`bytes_up + bytes_down`) of a record over all cards.
    pub mean_bytes_per_record: u64,
    /// Exponent `s` of the Zipf distribution of per-card intensity: each
    /// card draws a weight `k` in `1..=zipf_max_weight` with P(k) ∝ k^-s; its
    /// records' mean size is proportional to `k`. `0` gives uniform weights.
    pub zipf_exponent: f64,
    /// Largest Zipf weight (`1` turns the skew off).
    pub zipf_max_weight: u64,
    /// Length of a record's usage interval (`end - start`), in seconds.
    pub record_interval_secs: u32,
    /// Percentage of records that resend an earlier record exactly.
    pub duplicate_pct: f64,
    /// Percentage of records that are malformed (dead-letter material).
    pub malformed_pct: f64,
    /// Percentage of records for ICCIDs that are not in the setup.
    pub unknown_card_pct: f64,
    /// Percentage of records that arrive late: `end` is more than
    /// `late_by_hours` (and at most twice that) before arrival.
    pub late_pct: f64,
    /// How late a late record is, at least, in hours (at least 1).
    pub late_by_hours: u32,
    /// Percentage of records delivered out of order: their `end` lies
    /// between half of `out_of_order_window_secs` and all of it before
    /// arrival, behind records that arrived earlier.
    pub out_of_order_pct: f64,
    /// Window of out-of-order delivery, in seconds (at least 60, below
    /// `late_by_hours`).
    pub out_of_order_window_secs: u32,
    /// Duplicates resend one of the last `duplicate_window` valid records.
    pub duplicate_window: u32,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        WorkloadConfig {
            seed: 1,
            cards: 10_000,
            carrier_mix: CarrierMix::default(),
            plans: PlanTemplate::default_catalogue(),
            forward_pool_share: 0.2,
            backward_pool_share: 0.1,
            pool_size: 100,
            threshold_share: 0.3,
            threshold_mb: vec![0, 10, 50, 100, 500],
            add_on_share: 0.05,
            add_on_mb: 100,
            // 2026-11-26T12:00:00+08:00: the default 120 hours cross the
            // cucc boundary (27th) and the calendar month (1 December).
            start: Timestamp(1_795_665_600_000),
            duration_hours: 120,
            records_per_card_per_hour: 1.0,
            mean_bytes_per_record: 256 * 1024,
            zipf_exponent: 1.1,
            zipf_max_weight: 1000,
            record_interval_secs: 300,
            duplicate_pct: 2.0,
            malformed_pct: 0.5,
            unknown_card_pct: 0.5,
            late_pct: 1.0,
            late_by_hours: 3,
            out_of_order_pct: 2.0,
            out_of_order_window_secs: 600,
            duplicate_window: 10_000,
        }
    }
}

impl WorkloadConfig {
    /// Parses a configuration from JSON (missing fields take defaults) and
    /// validates it.
    pub fn from_json(text: &str) -> Result<WorkloadConfig, LoadgenError> {
        let config: WorkloadConfig = serde_json::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Total number of records the workload produces.
    pub fn total_records(&self) -> u64 {
        let total =
            self.cards as f64 * self.records_per_card_per_hour * f64::from(self.duration_hours);
        if total.is_finite() && total > 0.0 {
            total.round() as u64
        } else {
            0
        }
    }

    /// Checks every field's range and the fields' consistency.
    pub fn validate(&self) -> Result<(), LoadgenError> {
        if !(MIN_CARDS..=MAX_CARDS).contains(&self.cards) {
            return invalid(
                "cards",
                format!("must be {MIN_CARDS} to {MAX_CARDS}, got {}", self.cards),
            );
        }
        self.carrier_mix.validate()?;
        if self.plans.is_empty() || self.plans.len() > MAX_PLAN_TEMPLATES {
            return invalid(
                "plans",
                format!("must have 1 to {MAX_PLAN_TEMPLATES} templates"),
            );
        }
        for (i, p) in self.plans.iter().enumerate() {
            if p.allowance_mb == 0 {
                return invalid(
                    "plans",
                    format!("template {i}: allowance_mb must be positive"),
                );
            }
            if !(p.weight.is_finite() && p.weight >= 0.0) {
                return invalid(
                    "plans",
                    format!("template {i}: weight must be finite and >= 0"),
                );
            }
            if p.term_months == 0 || p.term_months > 600 {
                return invalid(
                    "plans",
                    format!("template {i}: term_months must be 1 to 600"),
                );
            }
            if self.plans[..i]
                .iter()
                .any(|q| q.allowance_mb == p.allowance_mb && q.traffic == p.traffic)
            {
                return invalid(
                    "plans",
                    format!("template {i} repeats an allowance and traffic type"),
                );
            }
        }
        if self.plans.iter().map(|p| p.weight).sum::<f64>() <= 0.0 {
            return invalid("plans", "weights must not all be zero".to_owned());
        }
        share("forward_pool_share", self.forward_pool_share)?;
        share("backward_pool_share", self.backward_pool_share)?;
        if self.forward_pool_share + self.backward_pool_share > 1.0 {
            return invalid(
                "backward_pool_share",
                "forward_pool_share + backward_pool_share must not exceed 1".to_owned(),
            );
        }
        if self.pool_size == 0 || self.pool_size > 1_000_000 {
            return invalid(
                "pool_size",
                format!("must be 1 to 1000000, got {}", self.pool_size),
            );
        }
        share("threshold_share", self.threshold_share)?;
        if self.threshold_mb.len() > MAX_THRESHOLD_CHOICES {
            return invalid(
                "threshold_mb",
                format!("at most {MAX_THRESHOLD_CHOICES} values"),
            );
        }
        if self.threshold_share > 0.0 && self.threshold_mb.is_empty() {
            return invalid(
                "threshold_mb",
                "needs a value when threshold_share > 0".to_owned(),
            );
        }
        if self.threshold_mb.iter().any(|&mb| mb < 0) {
            return invalid(
                "threshold_mb",
                "values must be >= 0 (cards without one get none)".to_owned(),
            );
        }
        share("add_on_share", self.add_on_share)?;
        if self.add_on_share > 0.0 && self.add_on_mb == 0 {
            return invalid(
                "add_on_mb",
                "must be positive when add_on_share > 0".to_owned(),
            );
        }
        if self.start.0 < 0
            || self.start.0 > 253_402_300_799_000 - i64::from(MAX_DURATION_HOURS) * 3_600_000
        {
            return invalid("start", "must lie between 1970 and 9998".to_owned());
        }
        if self.duration_hours == 0 || self.duration_hours > MAX_DURATION_HOURS {
            return invalid(
                "duration_hours",
                format!("must be 1 to {MAX_DURATION_HOURS}"),
            );
        }
        let rate = self.records_per_card_per_hour;
        if !(rate.is_finite() && rate > 0.0) {
            return invalid(
                "records_per_card_per_hour",
                "must be finite and positive".to_owned(),
            );
        }
        let total = self.total_records();
        if total == 0 || total > MAX_TOTAL_RECORDS {
            return invalid(
                "records_per_card_per_hour",
                format!("total records must be 1 to {MAX_TOTAL_RECORDS}, got {total}"),
            );
        }
        if self.mean_bytes_per_record == 0 || self.mean_bytes_per_record > 1 << 40 {
            return invalid("mean_bytes_per_record", "must be 1 to 2^40".to_owned());
        }
        if !(self.zipf_exponent.is_finite() && self.zipf_exponent >= 0.0) {
            return invalid("zipf_exponent", "must be finite and >= 0".to_owned());
        }
        if self.zipf_max_weight == 0 || self.zipf_max_weight > 1_000_000_000 {
            return invalid("zipf_max_weight", "must be 1 to 10^9".to_owned());
        }
        if self.record_interval_secs == 0 || self.record_interval_secs > 86_400 {
            return invalid("record_interval_secs", "must be 1 to 86400".to_owned());
        }
        let pcts = [
            ("duplicate_pct", self.duplicate_pct),
            ("malformed_pct", self.malformed_pct),
            ("unknown_card_pct", self.unknown_card_pct),
            ("late_pct", self.late_pct),
            ("out_of_order_pct", self.out_of_order_pct),
        ];
        for (field, pct) in pcts {
            if !(pct.is_finite() && (0.0..=100.0).contains(&pct)) {
                return invalid(field, format!("must be a percentage 0 to 100, got {pct}"));
            }
        }
        if pcts.iter().map(|(_, p)| p).sum::<f64>() > 100.0 {
            return invalid(
                "duplicate_pct",
                "the *_pct knobs must not add up to more than 100".to_owned(),
            );
        }
        if self.late_by_hours == 0 || self.late_by_hours > 24 * 60 {
            return invalid("late_by_hours", "must be 1 to 1440".to_owned());
        }
        if self.out_of_order_window_secs < 60
            || u64::from(self.out_of_order_window_secs) >= u64::from(self.late_by_hours) * 3600
        {
            return invalid(
                "out_of_order_window_secs",
                "must be at least 60 and shorter than late_by_hours".to_owned(),
            );
        }
        if self.duplicate_window == 0 || self.duplicate_window > 10_000_000 {
            return invalid("duplicate_window", "must be 1 to 10^7".to_owned());
        }
        Ok(())
    }
}

fn invalid(field: &'static str, reason: String) -> Result<(), LoadgenError> {
    Err(LoadgenError::InvalidConfig { field, reason })
}

fn share(field: &'static str, value: f64) -> Result<(), LoadgenError> {
    if value.is_finite() && (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        invalid(field, format!("must be a fraction 0 to 1, got {value}"))
    }
}

/// Relative weights of the carriers (they need not add up to 1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CarrierMix {
    /// China Mobile.
    pub cmcc: f64,
    /// China Telecom.
    pub ctcc: f64,
    /// China Unicom (cycle runs 27th to 26th).
    pub cucc: f64,
    /// Tri-network cards.
    pub tri: f64,
}

impl Default for CarrierMix {
    fn default() -> Self {
        CarrierMix {
            cmcc: 0.4,
            ctcc: 0.25,
            cucc: 0.25,
            tri: 0.1,
        }
    }
}

impl CarrierMix {
    /// The weight of one carrier.
    pub fn weight(&self, carrier: Carrier) -> f64 {
        match carrier {
            Carrier::Cmcc => self.cmcc,
            Carrier::Ctcc => self.ctcc,
            Carrier::Cucc => self.cucc,
            Carrier::Tri => self.tri,
        }
    }

    fn validate(&self) -> Result<(), LoadgenError> {
        let weights = Carrier::ALL.map(|c| self.weight(c));
        if weights.iter().any(|w| !(w.is_finite() && *w >= 0.0))
            || weights.iter().sum::<f64>() <= 0.0
        {
            return invalid(
                "carrier_mix",
                "weights must be finite, >= 0 and not all zero".to_owned(),
            );
        }
        Ok(())
    }
}

/// One entry of the plan catalogue, instantiated for every carrier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanTemplate {
    /// Monthly allowance in MB.
    pub allowance_mb: u64,
    /// `general` or `directed`.
    pub traffic: TrafficType,
    /// Relative share of cards on this plan (default 1).
    #[serde(default = "default_weight")]
    pub weight: f64,
    /// Purchased term in months (default 12).
    #[serde(default = "default_term_months")]
    pub term_months: u32,
}

fn default_weight() -> f64 {
    1.0
}

fn default_term_months() -> u32 {
    12
}

impl PlanTemplate {
    /// The default catalogue: 30 MB, 100 MB, 1 GB and 2 GB, each general and
    /// directed, small plans more common.
    pub fn default_catalogue() -> Vec<PlanTemplate> {
        let t = |allowance_mb, traffic, weight| PlanTemplate {
            allowance_mb,
            traffic,
            weight,
            term_months: 12,
        };
        vec![
            t(30, TrafficType::General, 2.0),
            t(30, TrafficType::Directed, 2.0),
            t(100, TrafficType::General, 2.0),
            t(100, TrafficType::Directed, 1.0),
            t(1024, TrafficType::General, 0.5),
            t(1024, TrafficType::Directed, 1.0),
            t(2048, TrafficType::General, 0.5),
            t(2048, TrafficType::Directed, 1.0),
        ]
    }

    /// The plan id for a carrier, e.g. `cmcc-30m-d`, `cucc-1g-g`.
    pub fn plan_id(&self, carrier: Carrier) -> PlanId {
        PlanId(format!(
            "{}-{}-{}",
            carrier.as_str(),
            self.size_label(),
            self.traffic_letter()
        ))
    }

    /// A display name, e.g. `CMCC 30MB directed`.
    pub fn name(&self, carrier: Carrier) -> String {
        let traffic = match self.traffic {
            TrafficType::General => "general",
            TrafficType::Directed => "directed",
        };
        format!(
            "{} {} {traffic}",
            carrier.as_str().to_ascii_uppercase(),
            self.size_label()
                .to_ascii_uppercase()
                .replace('M', "MB")
                .replace('G', "GB")
        )
    }

    fn size_label(&self) -> String {
        if self.allowance_mb.is_multiple_of(1024) {
            format!("{}g", self.allowance_mb / 1024)
        } else {
            format!("{}m", self.allowance_mb)
        }
    }

    fn traffic_letter(&self) -> char {
        match self.traffic {
            TrafficType::General => 'g',
            TrafficType::Directed => 'd',
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_round_trips() {
        let config = WorkloadConfig::default();
        config.validate().unwrap();
        assert_eq!(
            config.start,
            Timestamp::parse_rfc3339("2026-11-26T12:00:00+08:00").unwrap()
        );
        let json = serde_json::to_string(&config).unwrap();
        assert_eq!(WorkloadConfig::from_json(&json).unwrap(), config);
        assert_eq!(WorkloadConfig::from_json("{}").unwrap(), config);
    }

    #[test]
    fn rejects_unknown_fields_and_bad_values() {
        assert!(matches!(
            WorkloadConfig::from_json(r#"{"cardz": 5}"#),
            Err(LoadgenError::ConfigJson(_))
        ));
        for (json, field) in [
            (r#"{"cards": 5}"#, "cards"),
            (r#"{"duplicate_pct": 60, "late_pct": 50}"#, "duplicate_pct"),
            (r#"{"forward_pool_share": 1.5}"#, "forward_pool_share"),
            (r#"{"plans": []}"#, "plans"),
            (
                r#"{"out_of_order_window_secs": 20000}"#,
                "out_of_order_window_secs",
            ),
            (r#"{"zipf_exponent": -1}"#, "zipf_exponent"),
        ] {
            match WorkloadConfig::from_json(json) {
                Err(LoadgenError::InvalidConfig { field: f, .. }) => assert_eq!(f, field, "{json}"),
                other => panic!("{json}: {other:?}"),
            }
        }
    }

    #[test]
    fn plan_ids_and_names() {
        let cat = PlanTemplate::default_catalogue();
        assert_eq!(cat[1].plan_id(Carrier::Cmcc).as_str(), "cmcc-30m-d");
        assert_eq!(cat[4].plan_id(Carrier::Cucc).as_str(), "cucc-1g-g");
        assert_eq!(cat[1].name(Carrier::Cmcc), "CMCC 30MB directed");
        assert_eq!(cat[6].name(Carrier::Tri), "TRI 2GB general");
    }
}
