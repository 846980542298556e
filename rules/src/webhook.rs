//! Webhook bodies (SPEC section 6), exactly as sent.
//!
//! One card (or pool) per message:
//!
//! ```json
//! {"cid": "89860412345678901234", "ruleType": 2,
//!  "templateName": "api_rule_flow_usage_remain",
//!  "templateParams": [{"key": "cid", "value": "89860412345678901234"}, ...]}
//! ```
//!
//! (pool templates carry `"poolId"` where card templates carry `"cid"`), or
//! merged, at most [`MAX_MERGED`] entries per message:
//!
//! ```json
//! {"ruleType": 2, "templateName": "...",
//!  "templateParamsList": [{"templateParams": [...]}, ...]}
//! ```
//!
//! Every message has a deterministic `webhook-id` derived from the endpoint
//! and the firing ids it carries: a message sent again after a crash has
//! the same id, so receivers can drop repeats.

use flowcap_engine::event::RuleFiredEvent;
use serde::Serialize;

use crate::template::{template, Param, TemplateOptions};
use crate::{Error, Result};

/// Most cards (or pools) in one merged message.
pub const MAX_MERGED: usize = 500;

/// One webhook request body with its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookMessage {
    /// `webhook-id`: `msg_` + 32 hex digits, deterministic.
    pub id: String,
    /// The endpoint id it is for.
    pub endpoint: String,
    /// The JSON body, byte for byte what is signed and sent.
    pub body: String,
    /// Ids of the firings it carries, in order.
    pub firing_ids: Vec<String>,
}

/// What a single body is about: `"cid"` for card templates, `"poolId"`
/// for pool templates.
#[derive(Serialize)]
enum Subject<'a> {
    #[serde(rename = "cid")]
    Card(&'a str),
    #[serde(rename = "poolId")]
    Pool(&'a str),
}

#[derive(Serialize)]
struct SingleBody<'a> {
    #[serde(flatten)]
    subject: Subject<'a>,
    #[serde(rename = "ruleType")]
    rule_type: u8,
    #[serde(rename = "templateName")]
    template_name: &'static str,
    #[serde(rename = "templateParams")]
    template_params: &'a [Param],
}

#[derive(Serialize)]
struct Entry<'a> {
    #[serde(rename = "templateParams")]
    template_params: &'a [Param],
}

#[derive(Serialize)]
struct MergedBody<'a> {
    #[serde(rename = "ruleType")]
    rule_type: u8,
    #[serde(rename = "templateName")]
    template_name: &'static str,
    #[serde(rename = "templateParamsList")]
    template_params_list: Vec<Entry<'a>>,
}

/// `msg_` + 32 hex digits of xxh3-128 over `parts` joined by `|`: the
/// deterministic id of every outbox message (webhooks:
/// `webhook|<endpoint>|<firing id>...`).
pub fn message_id<'a>(parts: impl IntoIterator<Item = &'a str>) -> String {
    let mut key = String::new();
    for (i, part) in parts.into_iter().enumerate() {
        if i > 0 {
            key.push('|');
        }
        key.push_str(part);
    }
    format!("msg_{:032x}", xxhash_rust::xxh3::xxh3_128(key.as_bytes()))
}

fn webhook_id(endpoint: &str, firing_ids: &[&str]) -> String {
    message_id(
        ["webhook", endpoint]
            .into_iter()
            .chain(firing_ids.iter().copied()),
    )
}

fn to_json(value: &impl Serialize) -> String {
    // Plain structs of strings and integers: serializing cannot fail.
    serde_json::to_string(value).unwrap_or_default()
}

/// The body of one firing for one endpoint.
pub fn single_body(
    firing: &RuleFiredEvent,
    endpoint: &str,
    options: TemplateOptions,
) -> WebhookMessage {
    let t = template(firing, options);
    let subject = if t.name.is_pool() {
        Subject::Pool(&t.subject)
    } else {
        Subject::Card(&t.subject)
    };
    let body = to_json(&SingleBody {
        subject,
        rule_type: t.rule_type,
        template_name: t.name.as_str(),
        template_params: &t.params,
    });
    WebhookMessage {
        id: webhook_id(endpoint, &[&firing.id]),
        endpoint: endpoint.to_owned(),
        body,
        firing_ids: vec![firing.id.clone()],
    }
}

/// Merged bodies for firings of one rule (one template) to one endpoint:
/// consecutive chunks of at most [`MAX_MERGED`], in the order given (a
/// firing of 1,201 cards gives 500 + 500 + 201).
pub fn merged_bodies(
    firings: &[&RuleFiredEvent],
    endpoint: &str,
    options: TemplateOptions,
) -> Result<Vec<WebhookMessage>> {
    let templates: Vec<_> = firings.iter().map(|f| template(f, options)).collect();
    let first = templates.first().ok_or(Error::Empty)?;
    if let Some(other) = templates
        .iter()
        .find(|t| t.name != first.name || t.rule_type != first.rule_type)
    {
        return Err(Error::MixedTemplates(
            first.name.as_str().to_owned(),
            other.name.as_str().to_owned(),
        ));
    }
    Ok(templates
        .chunks(MAX_MERGED)
        .zip(firings.chunks(MAX_MERGED))
        .map(|(chunk, fired)| {
            let ids: Vec<&str> = fired.iter().map(|f| f.id.as_str()).collect();
            let body = to_json(&MergedBody {
                rule_type: first.rule_type,
                template_name: first.name.as_str(),
                template_params_list: chunk
                    .iter()
                    .map(|t| Entry {
                        template_params: &t.params,
                    })
                    .collect(),
            });
            WebhookMessage {
                id: webhook_id(endpoint, &ids),
                endpoint: endpoint.to_owned(),
                body,
                firing_ids: ids.into_iter().map(str::to_owned).collect(),
            }
        })
        .collect())
}
