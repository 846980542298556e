//! Delivery settings: `[notify]` in flowcap's configuration, the SMTP
//! relay and the SMS gateway (their secrets redacted in `Debug`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::RetryPolicy;

/// Delivery settings (`[notify]` in flowcap's configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotifyConfig {
    /// Attempts per message in all, the first included.
    pub max_attempts: u32,
    /// Back-off before the second attempt, in ms (doubles each time).
    pub backoff_initial_ms: u64,
    /// Longest back-off, in ms.
    pub backoff_max_ms: u64,
    /// Longest wait a receiver's `Retry-After` may ask for, in ms.
    pub retry_after_max_ms: u64,
    /// Timeout of one attempt (connect and answer), in ms.
    pub request_timeout_ms: u64,
    /// A merged webhook message is sent when it has 500 firings or its
    /// oldest firing waited this long, in ms.
    pub merge_interval_ms: u64,
    /// How long an embedded run that reached the end of its input waits for
    /// notifications still queued, in ms (what is left is sent by the next
    /// run on the same directory).
    pub drain_timeout_ms: u64,
    /// SMTP relay for email actions.
    pub smtp: Option<SmtpRelay>,
    /// HTTP gateway for SMS actions.
    pub sms: Option<SmsGateway>,
    /// Webhook endpoint (registered by command) that receives push-failure
    /// alerts.
    pub alert_webhook: Option<String>,
    /// Addresses that receive push-failure alerts by email.
    pub alert_email: Vec<String>,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        let r = RetryPolicy::default();
        NotifyConfig {
            max_attempts: r.max_attempts,
            backoff_initial_ms: r.initial.as_millis() as u64,
            backoff_max_ms: r.max.as_millis() as u64,
            retry_after_max_ms: r.retry_after_max.as_millis() as u64,
            request_timeout_ms: 10_000,
            merge_interval_ms: 2_000,
            drain_timeout_ms: 30_000,
            smtp: None,
            sms: None,
            alert_webhook: None,
            alert_email: Vec::new(),
        }
    }
}

impl NotifyConfig {
    /// The retry policy these settings describe.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts.max(1),
            initial: Duration::from_millis(self.backoff_initial_ms),
            max: Duration::from_millis(self.backoff_max_ms),
            retry_after_max: Duration::from_millis(self.retry_after_max_ms),
        }
    }

    pub(crate) fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms.max(1))
    }
}

/// An SMTP relay (plain SMTP, optionally with AUTH; see docs/DECISIONS.md).
/// Its `Debug` shows the password redacted.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpRelay {
    /// Host name or address.
    pub host: String,
    /// Port.
    #[serde(default = "default_smtp_port")]
    pub port: u16,
    /// Sender address.
    pub from: String,
    /// AUTH user name.
    #[serde(default)]
    pub username: Option<String>,
    /// AUTH password.
    #[serde(default)]
    pub password: Option<String>,
}

fn default_smtp_port() -> u16 {
    25
}

/// An SMS gateway: flowcap POSTs `{"id", "to": [...], "text"}` as JSON,
/// with the message id as `Idempotency-Key`. Its `Debug` shows the token
/// redacted.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmsGateway {
    /// URL to POST to.
    pub url: String,
    /// Bearer token, if the gateway wants one.
    #[serde(default)]
    pub token: Option<String>,
}

fn redacted(secret: &Option<String>) -> Option<String> {
    secret.as_deref().map(flowcap_engine::redact::secret)
}

impl std::fmt::Debug for SmtpRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpRelay")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("from", &self.from)
            .field("username", &self.username)
            .field("password", &redacted(&self.password))
            .finish()
    }
}

impl std::fmt::Debug for SmsGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmsGateway")
            .field("url", &self.url)
            .field("token", &redacted(&self.token))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_smtp_and_sms_credentials() {
        let smtp = SmtpRelay {
            host: "mail".into(),
            port: 25,
            from: "a@b".into(),
            username: Some("user".into()),
            password: Some("hunter2-smtp".into()),
        };
        let sms = SmsGateway {
            url: "http://sms".into(),
            token: Some("tok-sms-123".into()),
        };
        let text = format!("{smtp:?} {sms:?}");
        assert!(
            !text.contains("hunter2-smtp") && !text.contains("tok-sms-123"),
            "{text}"
        );
        assert!(
            text.contains("redacted:sha256:") && text.contains("user"),
            "{text}"
        );
    }
}
