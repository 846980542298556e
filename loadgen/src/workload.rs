//! The card population and its setup commands.

use flowcap_engine::command::{CardSpec, PlanSpec, PoolKind, PoolSpec, TagSpec, MAX_BATCH};
use flowcap_engine::ids::{CommandId, PoolId, TagId};
use flowcap_engine::record::RecordId;
use flowcap_engine::time::{days_in_month, MS_PER_DAY};
use flowcap_engine::{
    CardState, Carrier, CommandKind, CycleCalendar, Iccid, Timestamp, TrafficType,
};
use flowcap_engine::{Command, PlanId};
use rand_distr::{Distribution, Zipf};

use crate::config::WorkloadConfig;
use crate::error::LoadgenError;
use crate::expected::Expected;
use crate::format;
use crate::records::Records;
use crate::rng::{mix, Xoshiro, STREAM_POOLS, STREAM_PROFILES};

/// Billing time zone of generated data: UTC+8.
pub const UTC_OFFSET_SECS: i32 = 8 * 3600;

/// Operator named on every setup command.
pub const OPERATOR: &str = "loadgen";

/// Number of fleet tags (`lg-fleet-0` ...); each card carries one.
pub const FLEET_TAGS: u64 = 4;

/// Most cards in one generated batch command (`add_pool_members`,
/// `set_threshold`), below the engine's [`MAX_BATCH`]: 20,000 ICCIDs are
/// ~470 KB of JSON, under Kafka's default 1 MB message limit, so the setup
/// can be produced to the commands topic as it is (a 100,000-card batch
/// is ~2.3 MB and a producer refuses it).
pub const SETUP_BATCH: usize = 20_000;
const _: () = assert!(SETUP_BATCH <= MAX_BATCH);

/// ICCID prefix used for cards that are not in the setup (see
/// [`RecordKind::UnknownCard`](crate::RecordKind::UnknownCard)): no carrier
/// code is `99`.
pub(crate) const UNKNOWN_CARRIER_CODE: &str = "99";

/// The two ICCID digits after `8986` that name a card's carrier.
pub fn carrier_code(carrier: Carrier) -> &'static str {
    match carrier {
        Carrier::Cmcc => "00",
        Carrier::Ctcc => "03",
        Carrier::Cucc => "01",
        Carrier::Tri => "20",
    }
}

const FLAG_FORWARD: u8 = 1;
const FLAG_BACKWARD: u8 = 2;
const FLAG_ADD_ON: u8 = 4;

/// Eight bytes per card: everything the record stream needs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CardProfile {
    /// Mean record size relative to the configured mean (mean over cards 1).
    pub(crate) weight: f32,
    pub(crate) carrier: Carrier,
    /// Index into the templates of the catalogue.
    pub(crate) plan: u8,
    /// 0 none, `k + 1` = `config.threshold_mb[k]`.
    pub(crate) threshold: u8,
    flags: u8,
}

#[derive(Debug, Clone)]
struct PoolPlan {
    spec: PoolSpec,
    members: Vec<u32>,
    add_on: bool,
}

/// A deterministic workload: a card population with plans, pools,
/// thresholds and add-ons, and a stream of usage records over it.
///
/// Building it draws every card's profile (8 bytes per card) and the pool
/// memberships; setup commands, records and the expected outcome are all
/// produced lazily from that and the seed.
#[derive(Debug, Clone)]
pub struct Workload {
    config: WorkloadConfig,
    calendar: CycleCalendar,
    cards: Vec<CardProfile>,
    catalogue: Vec<PlanSpec>,
    pools: Vec<PoolPlan>,
    thresholds: Vec<Vec<u32>>,
    card_add_ons: Vec<u32>,
    pub(crate) fallback_iccid: Iccid,
    pub(crate) fallback_record_id: RecordId,
}

impl Workload {
    /// Validates the configuration and draws the card population.
    pub fn new(config: WorkloadConfig) -> Result<Workload, LoadgenError> {
        config.validate()?;
        let fallback_iccid = Iccid::parse("89860000000000000000")
            .map_err(|e| LoadgenError::Distribution(e.to_string()))?;
        let fallback_record_id = RecordId::new("loadgen-invalid")
            .ok_or_else(|| LoadgenError::Distribution("record id".to_owned()))?;
        let n = config.cards as usize;
        let templates = config.plans.len();

        // The catalogue: every template for every carrier.
        let mut catalogue = Vec::with_capacity(4 * templates);
        for carrier in Carrier::ALL {
            for t in &config.plans {
                catalogue.push(PlanSpec {
                    id: t.plan_id(carrier),
                    name: t.name(carrier),
                    carrier,
                    allowance_mb: t.allowance_mb,
                    traffic: t.traffic,
                    term_months: t.term_months,
                });
            }
        }

        // Card profiles, one sequential pass over one random stream.
        let zipf = Zipf::new(config.zipf_max_weight, config.zipf_exponent)
            .map_err(|e| LoadgenError::Distribution(e.to_string()))?;
        let carrier_weights = Carrier::ALL.map(|c| config.carrier_mix.weight(c));
        let plan_weights: Vec<f64> = config.plans.iter().map(|p| p.weight).collect();
        let mut rng = Xoshiro::new(config.seed, STREAM_PROFILES);
        let mut cards = Vec::with_capacity(n);
        let mut weight_sum = 0.0f64;
        let fwd = config.forward_pool_share;
        let bwd = fwd + config.backward_pool_share;
        for _ in 0..n {
            let carrier = Carrier::ALL[pick_weighted(&carrier_weights, rng.unit())];
            let plan = pick_weighted(&plan_weights, rng.unit()) as u8;
            let weight: f64 = zipf.sample(&mut rng);
            weight_sum += weight;
            let pool_roll = rng.unit();
            let threshold_roll = rng.unit();
            let threshold_pick = rng.below(config.threshold_mb.len().max(1) as u64) as u8;
            let add_on_roll = rng.unit();
            let mut flags = 0;
            if pool_roll < fwd {
                flags |= FLAG_FORWARD;
            } else if pool_roll < bwd {
                flags |= FLAG_BACKWARD;
            }
            let eligible = match carrier {
                Carrier::Ctcc => true,
                Carrier::Cmcc | Carrier::Cucc => flags & FLAG_FORWARD != 0,
                Carrier::Tri => false,
            };
            let threshold = if eligible && threshold_roll < config.threshold_share {
                threshold_pick + 1
            } else {
                0
            };
            // The carriers sell no pack that takes a general card past the
            // 100 MB general cap (SPEC 2.1).
            let template = &config.plans[usize::from(plan)];
            let capped = template.traffic == TrafficType::General
                && template.allowance_mb.saturating_add(config.add_on_mb) > 100;
            if flags & FLAG_FORWARD == 0 && !capped && add_on_roll < config.add_on_share {
                flags |= FLAG_ADD_ON;
            }
            cards.push(CardProfile {
                weight: weight as f32,
                carrier,
                plan,
                threshold,
                flags,
            });
        }
        let mean_weight = weight_sum / n as f64;
        for card in &mut cards {
            card.weight = (f64::from(card.weight) / mean_weight) as f32;
        }

        // Pools: members grouped in card order; forward pools per
        // (carrier, plan) so that members share carrier, traffic and plan.
        let pool_size = config.pool_size as usize;
        let mut pools = Vec::new();
        let mut open: Vec<Vec<u32>> = vec![Vec::new(); 4 * templates];
        let mut backward: Vec<u32> = Vec::new();
        let mut pool_rng = Xoshiro::new(config.seed, STREAM_POOLS);
        let mut push_pool =
            |pools: &mut Vec<PoolPlan>, kind: PoolKind, group: Option<usize>, members: Vec<u32>| {
                let number = pools.len() + 1;
                let (id, name, carrier, plan) = match (kind, group) {
                    (PoolKind::Forward, Some(g)) => {
                        let spec = &catalogue[g];
                        (
                            format!("fp-{number:06}"),
                            format!("Forward pool {number} ({})", spec.name),
                            Some(spec.carrier),
                            Some(spec.id.clone()),
                        )
                    }
                    _ => (
                        format!("bp-{number:06}"),
                        format!("Backward pool {number}"),
                        None,
                        None,
                    ),
                };
                let add_on = kind == PoolKind::Forward && pool_rng.unit() < config.add_on_share;
                pools.push(PoolPlan {
                    spec: PoolSpec {
                        id: PoolId(id),
                        kind,
                        name,
                        carrier,
                        plan,
                    },
                    members,
                    add_on,
                });
            };
        for (i, card) in cards.iter().enumerate() {
            if card.flags & FLAG_FORWARD != 0 {
                let g = card.carrier as usize * templates + usize::from(card.plan);
                open[g].push(i as u32);
                if open[g].len() == pool_size {
                    let members = std::mem::take(&mut open[g]);
                    push_pool(&mut pools, PoolKind::Forward, Some(g), members);
                }
            } else if card.flags & FLAG_BACKWARD != 0 {
                backward.push(i as u32);
                if backward.len() == pool_size {
                    let members = std::mem::take(&mut backward);
                    push_pool(&mut pools, PoolKind::Backward, None, members);
                }
            }
        }
        for (g, members) in open.into_iter().enumerate() {
            if !members.is_empty() {
                push_pool(&mut pools, PoolKind::Forward, Some(g), members);
            }
        }
        if !backward.is_empty() {
            push_pool(&mut pools, PoolKind::Backward, None, backward);
        }

        let mut thresholds = vec![Vec::new(); config.threshold_mb.len()];
        let mut card_add_ons = Vec::new();
        for (i, card) in cards.iter().enumerate() {
            if card.threshold > 0 {
                thresholds[usize::from(card.threshold - 1)].push(i as u32);
            }
            if card.flags & FLAG_ADD_ON != 0 {
                card_add_ons.push(i as u32);
            }
        }

        Ok(Workload {
            config,
            calendar: CycleCalendar {
                utc_offset_secs: UTC_OFFSET_SECS,
            },
            cards,
            catalogue,
            pools,
            thresholds,
            card_add_ons,
            fallback_iccid,
            fallback_record_id,
        })
    }

    /// The configuration the workload was built from.
    pub fn config(&self) -> &WorkloadConfig {
        &self.config
    }

    /// The cycle calendar (UTC+8) used for [`Expected`].
    pub fn calendar(&self) -> CycleCalendar {
        self.calendar
    }

    /// Number of cards.
    pub fn card_count(&self) -> u64 {
        self.cards.len() as u64
    }

    /// Number of pools (forward and backward).
    pub fn pool_count(&self) -> usize {
        self.pools.len()
    }

    /// Total number of records [`Workload::records`] yields.
    pub fn total_records(&self) -> u64 {
        self.config.total_records()
    }

    /// Every plan of the catalogue (all carriers).
    pub fn plans(&self) -> &[PlanSpec] {
        &self.catalogue
    }

    /// The ICCID of card `index` (`0..cards`): `8986`, the two-digit carrier
    /// code ([`carrier_code`]) and the index in 14 digits.
    pub fn iccid(&self, index: u64) -> Option<Iccid> {
        let card = self.cards.get(usize::try_from(index).ok()?)?;
        Some(self.iccid_for(card.carrier, index))
    }

    /// The card index of an ICCID of this workload, `None` for any other.
    pub fn card_index(&self, iccid: Iccid) -> Option<u64> {
        card_index_of(iccid, |i| self.cards.get(i).map(|c| c.carrier))
    }

    /// The carrier of card `index`.
    pub fn carrier(&self, index: u64) -> Option<Carrier> {
        self.cards
            .get(usize::try_from(index).ok()?)
            .map(|c| c.carrier)
    }

    /// The plan of card `index`.
    pub fn plan_of(&self, index: u64) -> Option<&PlanSpec> {
        let card = self.cards.get(usize::try_from(index).ok()?)?;
        self.catalogue
            .get(card.carrier as usize * self.config.plans.len() + usize::from(card.plan))
    }

    pub(crate) fn profiles(&self) -> &[CardProfile] {
        &self.cards
    }

    pub(crate) fn iccid_for(&self, carrier: Carrier, index: u64) -> Iccid {
        make_iccid(carrier, index).unwrap_or(self.fallback_iccid)
    }

    /// The setup, as commands in the order they must be applied, all at
    /// `config.start`, ids `setup-000001`, `setup-000002`, ...:
    ///
    /// 1. `upsert_tag` for the fleet tags `lg-fleet-0` .. `lg-fleet-3`;
    /// 2. `upsert_plan` for every plan of the catalogue;
    /// 3. `upsert_card` for every card: `active`, activated 1 to 180 days
    ///    before start at local midnight, expiring after the plan's term,
    ///    with MSISDN, IMSI, IMEI and one fleet tag;
    /// 4. per pool, `create_pool` then `add_pool_members` in batches of at
    ///    most [`SETUP_BATCH`] (forward pools: one carrier and plan);
    /// 5. `set_threshold` in batches of at most [`SETUP_BATCH`], one value per batch (only `ctcc` cards
    ///    and `cmcc`/`cucc` cards in forward pools);
    /// 6. `add_on` for cards outside forward pools, then for forward pools.
    ///
    /// Lazy: nothing proportional to the card count is built up front.
    pub fn setup_commands(&self) -> impl Iterator<Item = Command> + '_ {
        let at = self.config.start;
        let tags = (0..FLEET_TAGS).map(|t| CommandKind::UpsertTag {
            tag: TagSpec {
                name: TagId(format!("lg-fleet-{t}")),
                description: format!("loadgen fleet {t}"),
            },
        });
        let plans = self
            .catalogue
            .iter()
            .map(|plan| CommandKind::UpsertPlan { plan: plan.clone() });
        let cards = (0..self.cards.len() as u64).map(move |i| CommandKind::UpsertCard {
            card: self.card_spec(i),
        });
        let pools = self.pools.iter().flat_map(move |pool| {
            let create = CommandKind::CreatePool {
                pool: pool.spec.clone(),
            };
            let adds =
                pool.members
                    .chunks(SETUP_BATCH)
                    .map(move |chunk| CommandKind::AddPoolMembers {
                        pool: pool.spec.id.clone(),
                        iccids: self.iccids_of(chunk),
                    });
            std::iter::once(create).chain(adds)
        });
        let thresholds = self
            .thresholds
            .iter()
            .zip(&self.config.threshold_mb)
            .flat_map(move |(members, &mb)| {
                members
                    .chunks(SETUP_BATCH)
                    .map(move |chunk| CommandKind::SetThreshold {
                        iccids: self.iccids_of(chunk),
                        mb,
                    })
            });
        let card_add_ons = self.card_add_ons.iter().map(move |&i| CommandKind::AddOn {
            iccid: Some(self.iccid_for(self.cards[i as usize].carrier, u64::from(i))),
            pool: None,
            mb: self.config.add_on_mb,
        });
        let pool_add_ons =
            self.pools
                .iter()
                .filter(|p| p.add_on)
                .map(move |p| CommandKind::AddOn {
                    iccid: None,
                    pool: Some(p.spec.id.clone()),
                    mb: self.config.add_on_mb,
                });
        tags.chain(plans)
            .chain(cards)
            .chain(pools)
            .chain(thresholds)
            .chain(card_add_ons)
            .chain(pool_add_ons)
            .enumerate()
            .map(move |(k, kind)| Command {
                id: CommandId(format!("setup-{:06}", k + 1)),
                at,
                operator: Some(OPERATOR.to_owned()),
                kind,
            })
    }

    fn iccids_of(&self, indices: &[u32]) -> Vec<Iccid> {
        indices
            .iter()
            .map(|&i| self.iccid_for(self.cards[i as usize].carrier, u64::from(i)))
            .collect()
    }

    fn card_spec(&self, index: u64) -> CardSpec {
        let card = self.cards[index as usize];
        let plan = self.plan_of(index);
        let term = plan.map_or(12, |p| p.term_months);
        let h = mix(self.config.seed, STREAM_PROFILES, index);
        let days_back = 1 + (h % 180) as i64;
        let (y, m, d) = self.config.start.civil_date(UTC_OFFSET_SECS);
        let activated_at =
            Timestamp(Timestamp::from_civil(y, m, d, UTC_OFFSET_SECS).0 - days_back * MS_PER_DAY);
        let expires_at = add_months(activated_at, term);
        let ids = format::identities(card.carrier, index);
        CardSpec {
            iccid: self.iccid_for(card.carrier, index),
            carrier: card.carrier,
            plan: plan.map_or_else(|| PlanId(String::new()), |p| p.id.clone()),
            state: Some(CardState::Active),
            activated_at: Some(activated_at),
            expires_at: Some(expires_at),
            test_ends_at: None,
            test_allowance_mb: None,
            silent_ends_at: None,
            msisdn: Some(ids.msisdn),
            imsi: Some(ids.imsi),
            imei: Some(ids.imei),
            tags: vec![TagId(format!("lg-fleet-{}", (h >> 32) % FLEET_TAGS))],
            attributes: Default::default(),
            clear: Vec::new(),
        }
    }

    /// The usage records, in arrival order. See [`Records`].
    pub fn records(&self) -> Records<'_> {
        Records::new(self)
    }

    /// The outcome an engine must reach, computed from the generator alone
    /// (it runs the record stream once and keeps per card and cycle sums).
    /// See [`Expected`] for exactly which records count.
    pub fn expected(&self) -> Expected {
        Expected::compute(self)
    }
}

/// The ICCID of card `index` of a carrier: `8986`, the carrier code and
/// the index in 14 digits.
pub(crate) fn make_iccid(carrier: Carrier, index: u64) -> Option<Iccid> {
    let mut buf = *b"89860000000000000000";
    buf[4..6].copy_from_slice(carrier_code(carrier).as_bytes());
    format::write_digits(&mut buf[6..], index);
    Iccid::parse_bytes(&buf).ok()
}

/// The card index encoded in an ICCID of the `8986` + carrier code + 14
/// digits scheme, checked against the card's carrier.
pub(crate) fn card_index_of(
    iccid: Iccid,
    carrier_of: impl Fn(usize) -> Option<Carrier>,
) -> Option<u64> {
    let text = iccid.to_string();
    let bytes = text.as_bytes();
    if bytes.len() != 20 || !text.starts_with("8986") {
        return None;
    }
    let index: u64 = text.get(6..)?.parse().ok()?;
    let carrier = carrier_of(usize::try_from(index).ok()?)?;
    (text.get(4..6)? == carrier_code(carrier)).then_some(index)
}

/// `t` moved by whole calendar months at UTC+8, the day clamped to the
/// length of the target month.
pub(crate) fn add_months(t: Timestamp, months: u32) -> Timestamp {
    let (y, m, d) = t.civil_date(UTC_OFFSET_SECS);
    let local = t.0 + i64::from(UTC_OFFSET_SECS) * 1000;
    let ms_of_day = local.rem_euclid(MS_PER_DAY);
    let total = y * 12 + i64::from(m) - 1 + i64::from(months);
    let (ny, nm) = (total.div_euclid(12), (total.rem_euclid(12) + 1) as u32);
    let nd = d.min(days_in_month(ny, nm));
    Timestamp(Timestamp::from_civil(ny, nm, nd, UTC_OFFSET_SECS).0 + ms_of_day)
}

/// Index of the weighted choice for a uniform `u` in `[0, 1)`.
pub(crate) fn pick_weighted(weights: &[f64], u: f64) -> usize {
    let total: f64 = weights.iter().sum();
    let mut target = u * total;
    let mut last = 0;
    for (i, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            last = i;
            if target < w {
                return i;
            }
            target -= w;
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        Timestamp::parse_rfc3339(s).unwrap()
    }

    #[test]
    fn months_are_added_on_the_calendar() {
        assert_eq!(
            add_months(ts("2026-01-31T10:00:00+08:00"), 1),
            ts("2026-02-28T10:00:00+08:00")
        );
        assert_eq!(
            add_months(ts("2026-11-05T00:00:00+08:00"), 12),
            ts("2027-11-05T00:00:00+08:00")
        );
    }

    #[test]
    fn weighted_pick_skips_zero_weights() {
        let w = [0.0, 1.0, 0.0, 3.0];
        assert_eq!(pick_weighted(&w, 0.0), 1);
        assert_eq!(pick_weighted(&w, 0.24), 1);
        assert_eq!(pick_weighted(&w, 0.26), 3);
        assert_eq!(pick_weighted(&w, 0.999_999), 3);
    }

    #[test]
    fn iccids_round_trip_to_indices() {
        let w = Workload::new(WorkloadConfig::default()).unwrap();
        for i in [0, 1, 4_321, 9_999] {
            let iccid = w.iccid(i).unwrap();
            assert_eq!(iccid.to_string().len(), 20);
            assert!(iccid.to_string().starts_with("8986"));
            assert_eq!(w.card_index(iccid), Some(i));
        }
        assert_eq!(w.iccid(10_000), None);
        assert_eq!(
            w.card_index(Iccid::parse("89869900000000000001").unwrap()),
            None
        );
        assert_eq!(
            w.card_index(Iccid::parse("89860000000000010000").unwrap()),
            None
        );
    }
}
