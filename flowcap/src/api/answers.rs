//! The shapes the API answers with: what is serialized is what the
//! OpenAPI document describes (`ToSchema` on the same types), so the two
//! cannot drift apart.

use flowcap_engine::command::{PlanSpec, TagSpec, WebhookSpec};
use flowcap_engine::{CardView, PoolView};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where in the input sequence an answer was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub(crate) struct Position {
    /// Every input up to and including this sequence number is applied,
    /// none after (null: no input yet).
    pub(crate) seq: Option<u64>,
}

impl From<flowcap_ingest::requests::Position> for Position {
    fn from(p: flowcap_ingest::requests::Position) -> Position {
        Position { seq: p.seq }
    }
}

/// Text of a value that serializes as a JSON string (ids, timestamps,
/// cycles, enums).
fn text<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}

/// A card's live state.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub(crate) struct Card {
    /// ICCID.
    pub(crate) iccid: String,
    /// Carrier: cmcc, cucc, ctcc, tri.
    pub(crate) carrier: String,
    /// Plan id.
    pub(crate) plan: Option<String>,
    /// The plan's traffic type: general or directed.
    pub(crate) traffic: Option<String>,
    /// testable, inactive, activatable, active, suspended, deregistered.
    pub(crate) state: String,
    /// Why it is suspended (e.g. over_threshold, manual).
    pub(crate) reasons: Vec<String>,
    /// The current billing cycle, YYYY-MM.
    pub(crate) cycle: String,
    /// Usage counted in the current cycle.
    pub(crate) usage_bytes: u64,
    /// The card's own allowance this cycle (plan plus add-ons, the 100 MB
    /// general cap applied); null in a forward pool (the pool's counts)
    /// or without a plan.
    pub(crate) limit_bytes: Option<u64>,
    /// `limit_bytes` minus the usage, at least 0.
    pub(crate) remaining_bytes: Option<u64>,
    /// Usage as a percentage of `limit_bytes` (null without a limit, or
    /// with a limit of 0).
    pub(crate) usage_pct: Option<f64>,
    /// Cut-off threshold in MB (-1 none, 0 the first byte).
    pub(crate) threshold_mb: i64,
    /// Add-ons bought for the current cycle, MB.
    pub(crate) addon_mb: u64,
    /// Pool id.
    pub(crate) pool: Option<String>,
    /// Tags.
    pub(crate) tags: Vec<String>,
    /// Activation time (RFC 3339).
    pub(crate) activated_at: Option<String>,
    /// Plan expiry (RFC 3339).
    pub(crate) expires_at: Option<String>,
    /// MSISDN.
    pub(crate) msisdn: Option<String>,
    /// IMSI.
    pub(crate) imsi: Option<String>,
    /// IMEI of the device the card is bound to.
    pub(crate) imei: Option<String>,
    /// The operator's custom attributes.
    pub(crate) attributes: std::collections::BTreeMap<String, String>,
    /// The latest end of the card's records (RFC 3339; null: none yet).
    pub(crate) last_record_at: Option<String>,
    /// Its last visible state change, which led to `state` and `reasons`:
    /// why the card is as it is (null: none yet).
    pub(crate) last_change: Option<LastChange>,
}

/// A card's last visible state change.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub(crate) struct LastChange {
    /// Event time of its cause (RFC 3339).
    pub(crate) at: String,
    /// The state before (the state after is the card's `state`).
    pub(crate) old: String,
    /// record, command, rollover or deadline.
    pub(crate) cause: String,
    /// For a deadline: plan_expiry, test_end, silent_end, rule_day or
    /// expiry_grace_end.
    pub(crate) deadline: Option<String>,
    /// The `card_state` event of the change, with the cause's details
    /// (record or command id, cycle): in `/events?iccid=...` and the
    /// history's `state_changes`.
    pub(crate) event_id: String,
}

impl LastChange {
    fn new(change: flowcap_engine::CardChange) -> LastChange {
        use flowcap_engine::event::CauseKind;
        let (cause, deadline) = match change.cause {
            CauseKind::Record => ("record", None),
            CauseKind::Command => ("command", None),
            CauseKind::Rollover => ("rollover", None),
            CauseKind::Deadline(kind) => ("deadline", Some(text(&kind))),
        };
        LastChange {
            at: text(&change.at),
            old: change.old.as_str().to_owned(),
            cause: cause.to_owned(),
            deadline,
            event_id: change.event_id,
        }
    }
}

impl Card {
    /// `view` with what follows from its plan: `limit` is the card's own
    /// allowance in bytes, if any.
    pub(crate) fn new(view: CardView, traffic: Option<String>, limit: Option<u64>) -> Card {
        Card {
            iccid: view.iccid.to_string(),
            carrier: view.carrier.as_str().to_owned(),
            plan: view.plan.as_ref().map(|p| p.to_string()),
            traffic,
            state: view.state.as_str().to_owned(),
            reasons: view.reasons.iter().map(|r| r.as_str().to_owned()).collect(),
            cycle: text(&view.cycle),
            usage_bytes: view.usage_bytes,
            limit_bytes: limit,
            remaining_bytes: limit.map(|l| l.saturating_sub(view.usage_bytes)),
            usage_pct: limit
                .filter(|&l| l > 0)
                .map(|l| view.usage_bytes as f64 * 100.0 / l as f64),
            threshold_mb: view.threshold_mb,
            addon_mb: view.addon_mb,
            pool: view.pool.as_ref().map(|p| p.to_string()),
            tags: view.tags.iter().map(|t| t.to_string()).collect(),
            activated_at: view.activated_at.as_ref().map(text),
            expires_at: view.expires_at.as_ref().map(text),
            msisdn: view.msisdn,
            imsi: view.imsi,
            imei: view.imei,
            attributes: view.attributes,
            last_record_at: view.last_record_at.as_ref().map(text),
            last_change: view.last_change.map(LastChange::new),
        }
    }
}

/// `GET /cards/{iccid}`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CardAnswer {
    #[serde(flatten)]
    pub(crate) card: Card,
    pub(crate) position: Position,
}

/// `GET /cards`: a page.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CardPage {
    pub(crate) items: Vec<Card>,
    /// Give it as `cursor` for the next page; null on the last.
    pub(crate) next_cursor: Option<String>,
    pub(crate) position: Position,
}

/// A pool.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct Pool {
    pub(crate) id: String,
    pub(crate) name: String,
    /// forward or backward.
    pub(crate) kind: String,
    /// The pool's state (e.g. available, exhausted, frozen).
    pub(crate) state: String,
    pub(crate) carrier: Option<String>,
    /// The pool's current cycle, YYYY-MM.
    pub(crate) cycle: String,
    /// Members' usage summed over the cycle.
    pub(crate) used_bytes: u64,
    /// Shared allowance (forward pools).
    pub(crate) allowance_bytes: Option<u64>,
    /// Allowance minus usage, at least 0 (forward pools).
    pub(crate) remaining_bytes: Option<u64>,
    pub(crate) member_count: u64,
    /// A retained backward pool (in arrears): when it will be abandoned
    /// (RFC 3339).
    pub(crate) retained_until: Option<String>,
    /// An abandoned pool: when (RFC 3339); a backward one can be
    /// re-enabled for a month after.
    pub(crate) abandoned_at: Option<String>,
}

impl Pool {
    pub(crate) fn new(pool: &PoolView) -> Pool {
        let forward = pool.kind == flowcap_engine::command::PoolKind::Forward;
        Pool {
            id: pool.id.to_string(),
            name: pool.name.clone(),
            kind: text(&pool.kind),
            state: text(&pool.state),
            carrier: pool.carrier.map(|c| c.as_str().to_owned()),
            cycle: text(&pool.cycle),
            used_bytes: pool.usage_bytes,
            allowance_bytes: forward.then_some(pool.allowance_bytes),
            remaining_bytes: forward.then(|| pool.allowance_bytes.saturating_sub(pool.usage_bytes)),
            member_count: pool.members.len() as u64,
            retained_until: pool.retained_until.as_ref().map(text),
            abandoned_at: pool.abandoned_at.as_ref().map(text),
        }
    }
}

/// `GET /pools`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PoolList {
    pub(crate) items: Vec<Pool>,
    pub(crate) position: Position,
}

/// A page of a pool's members, by ICCID.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct MemberPage {
    pub(crate) items: Vec<String>,
    pub(crate) next_cursor: Option<String>,
}

/// A member and its usage this cycle.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Consumer {
    pub(crate) iccid: String,
    pub(crate) used_bytes: u64,
}

/// `GET /pools/{id}`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PoolAnswer {
    #[serde(flatten)]
    pub(crate) pool: Pool,
    pub(crate) members: MemberPage,
    /// The ten members that used most this cycle, most first.
    pub(crate) top_consumers: Vec<Consumer>,
    pub(crate) position: Position,
}

/// A plan.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Plan {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) carrier: String,
    pub(crate) allowance_mb: u64,
    /// general or directed.
    pub(crate) traffic: String,
    pub(crate) term_months: u32,
}

impl From<&PlanSpec> for Plan {
    fn from(p: &PlanSpec) -> Plan {
        Plan {
            id: p.id.to_string(),
            name: p.name.clone(),
            carrier: p.carrier.as_str().to_owned(),
            allowance_mb: p.allowance_mb,
            traffic: text(&p.traffic),
            term_months: p.term_months,
        }
    }
}

/// `GET /plans`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PlanList {
    pub(crate) items: Vec<Plan>,
    pub(crate) position: Position,
}

/// A tag.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Tag {
    pub(crate) name: String,
    pub(crate) description: String,
}

impl From<&TagSpec> for Tag {
    fn from(t: &TagSpec) -> Tag {
        Tag {
            name: t.name.to_string(),
            description: t.description.clone(),
        }
    }
}

/// `GET /tags`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct TagList {
    pub(crate) items: Vec<Tag>,
    pub(crate) position: Position,
}

/// A webhook endpoint, never with its secret.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Webhook {
    pub(crate) id: String,
    /// The URL without user information, credential parameters redacted.
    pub(crate) url: String,
    /// Whether bodies are signed (a secret is set).
    pub(crate) signed: bool,
    /// Whether a private CA certificate is set.
    pub(crate) private_ca: bool,
}

impl From<&WebhookSpec> for Webhook {
    fn from(w: &WebhookSpec) -> Webhook {
        Webhook {
            id: w.id.clone(),
            url: without_userinfo(&w.url),
            signed: w.secret.is_some(),
            private_ca: w.ca_cert.is_some(),
        }
    }
}

/// `url` without `user:password@` (a credential some receivers take) and
/// with the values of query parameters that name a credential (`token`,
/// `secret`, `password`, `key`, `sig`, in any case) replaced by `redacted`.
pub(crate) fn without_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let rest = match rest[..end].rfind('@') {
        Some(at) => &rest[at + 1..],
        None => rest,
    };
    let (before, fragment) = match rest.split_once('#') {
        Some((b, f)) => (b, Some(f)),
        None => (rest, None),
    };
    let mut out = format!("{scheme}://");
    match before.split_once('?') {
        None => out.push_str(before),
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            let params: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((name, _)) if names_a_credential(name) => format!("{name}=redacted"),
                    _ => pair.to_owned(),
                })
                .collect();
            out.push_str(&params.join("&"));
        }
    }
    if let Some(fragment) = fragment {
        out.push('#');
        out.push_str(fragment);
    }
    out
}

fn names_a_credential(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["token", "secret", "password", "key", "sig"]
        .iter()
        .any(|word| name.contains(word))
}

/// `GET /webhooks`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct WebhookList {
    pub(crate) items: Vec<Webhook>,
    pub(crate) position: Position,
}

/// `GET /rules`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RuleList {
    /// The automation rules as declared (SPEC 6: id, name, enabled,
    /// type, condition, filter, actions).
    #[schema(value_type = Vec<Object>)]
    pub(crate) items: Vec<serde_json::Value>,
    pub(crate) position: Position,
}

/// A command's answer.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CommandAnswer {
    /// The command id.
    pub(crate) id: String,
    /// done, or pending (in the commands topic; see `href`).
    pub(crate) status: String,
    /// The result (SPEC 5.1): `command_id`, `ok`, `error`, per-card
    /// `results`; the first result for a repeated id.
    #[schema(value_type = Option<Object>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) result: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) position: Option<Position>,
    /// Where the result will be (pending).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) href: Option<String>,
}

/// The answer to a batch.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CommandBatchAnswer {
    pub(crate) items: Vec<CommandAnswer>,
}

/// The optional body of a card shortcut.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Shortcut {
    /// The command id (idempotency key); default a new one.
    pub(crate) id: Option<String>,
    /// When it takes effect (RFC 3339); default the event clock.
    #[schema(value_type = Option<String>)]
    pub(crate) at: Option<flowcap_engine::Timestamp>,
    /// The add-on's size in MB (add-on only).
    pub(crate) mb: Option<u64>,
}

/// An error (RFC 9457 problem details).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ProblemDoc {
    /// `urn:flowcap:problem:<code>`.
    #[serde(rename = "type")]
    pub(crate) kind: String,
    pub(crate) title: String,
    pub(crate) status: u16,
    pub(crate) detail: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_credentials_only() {
        assert_eq!(
            without_userinfo("https://u:p@hooks.example/x?a=b@c"),
            "https://hooks.example/x?a=b@c"
        );
        assert_eq!(
            without_userinfo("https://h.example/x?api_key=k1&n=2&Token=t#frag"),
            "https://h.example/x?api_key=redacted&n=2&Token=redacted#frag"
        );
        assert_eq!(without_userinfo("http://h:8080/p"), "http://h:8080/p");
    }
}
