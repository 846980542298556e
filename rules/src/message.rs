//! Notification messages and their outcomes, as the delivery stores and
//! sends them and the history records them (`rule_deliveries`).
//!
//! Plain data: the delivery crate (`flowcap-delivery`) writes them to its
//! outbox and sends them; the history writer (`flowcap-storage`) only
//! reads them, and so needs none of the delivery's network clients.

use serde::{Deserialize, Serialize};

/// How a message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageChannel {
    /// HTTP POST to a registered endpoint, signed (Standard Webhooks).
    Webhook,
    /// SMTP.
    Email,
    /// HTTP POST to the SMS gateway.
    Sms,
}

impl MessageChannel {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageChannel::Webhook => "webhook",
            MessageChannel::Email => "email",
            MessageChannel::Sms => "sms",
        }
    }
}

/// One notification as stored and sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Message id: the `webhook-id`, the email's Message-ID, the SMS
    /// gateway's idempotency key. Deterministic.
    pub id: String,
    /// Channel.
    pub channel: MessageChannel,
    /// Webhook endpoint id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Email addresses or phone numbers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<String>,
    /// Email subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// The body: webhook JSON, email text, SMS text.
    pub body: String,
    /// Execution ids this message delivers (`rule_executions`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub executions: Vec<String>,
    /// Firing ids it carries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub firings: Vec<String>,
    /// Rule id (none for alerts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// For a push-failure alert: the id of the message that failed. Alerts
    /// raise no alert of their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert_for: Option<String>,
    /// When it was queued (ms since the epoch, wall clock).
    pub queued_ms: i64,
}

impl Message {
    /// The destination (log) this message belongs to.
    pub fn destination(&self) -> String {
        destination(self.channel, self.endpoint.as_deref())
    }
}

/// The destination name of a channel (and endpoint).
pub fn destination(channel: MessageChannel, endpoint: Option<&str>) -> String {
    match (channel, endpoint) {
        (MessageChannel::Webhook, Some(e)) => format!("webhook:{e}"),
        (c, _) => c.as_str().to_owned(),
    }
}

/// Where a message ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Final {
    /// The receiver accepted it.
    Delivered,
    /// Refused, or retries exhausted.
    Failed,
}

impl Final {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Final::Delivered => "delivered",
            Final::Failed => "failed",
        }
    }
}

/// A `.done` line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    /// Message id.
    pub id: String,
    /// Outcome.
    pub outcome: Final,
    /// Attempts made (in this process; a message resumed after a restart
    /// counts again from 1).
    pub attempts: u32,
    /// Last HTTP status (webhook, SMS) or SMTP code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Last error, for a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When (ms since the epoch).
    pub at_ms: i64,
}

/// One message's outcome, for the history (`rule_deliveries`): the
/// pipeline takes these at snapshot barriers (`Notifier::take_outcomes` in `flowcap-delivery`)
/// and records in its snapshot, per destination, how many done lines the
/// history has (`index + 1`); a restart hands that back to
/// `Notifier::start`, which reports again what came after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRow {
    /// The destination (`webhook:<id>`, `email`, `sms`).
    pub destination: String,
    /// Position of the outcome in the destination's done file (0-based).
    pub index: u64,
    /// The message.
    pub message: Message,
    /// Its outcome.
    pub done: Done,
}
