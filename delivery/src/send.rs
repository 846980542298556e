//! One delivery attempt per channel: a signed webhook POST, an SMS
//! gateway POST, an SMTP submission. Each answers with a [`Verdict`] and
//! what the receiver said; the worker decides about retries.

use std::time::{Duration, SystemTime};

use flowcap_clock::Clock;
use flowcap_engine::command::WebhookSpec;
use flowcap_rules::message::Message;
use flowcap_rules::sign::Signer;

use crate::retry::{classify, Verdict};
use crate::{SmsGateway, SmtpRelay};

/// The result of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Attempt {
    pub(crate) verdict: Verdict,
    /// HTTP status or SMTP reply code.
    pub(crate) status: Option<u16>,
    pub(crate) error: Option<String>,
}

impl Attempt {
    fn retry(error: impl Into<String>) -> Attempt {
        Attempt {
            verdict: Verdict::Retry(None),
            status: None,
            error: Some(error.into()),
        }
    }

    fn refused(error: impl Into<String>) -> Attempt {
        Attempt {
            verdict: Verdict::Refused,
            status: None,
            error: Some(error.into()),
        }
    }
}

/// A registered endpoint, ready to send to.
pub(crate) struct Endpoint {
    pub(crate) spec: WebhookSpec,
    pub(crate) signer: Option<Signer>,
    pub(crate) client: reqwest::Client,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("id", &self.spec.id)
            .field("url", &self.spec.url)
            .finish()
    }
}

/// An HTTP client with flowcap's timeouts, trusting `ca` besides the
/// system's roots.
pub(crate) fn client(
    timeout: Duration,
    ca: Option<reqwest::Certificate>,
) -> Result<reqwest::Client, reqwest::Error> {
    let mut builder = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::limited(3))
        .user_agent(concat!("flowcap/", env!("CARGO_PKG_VERSION")));
    if let Some(cert) = ca {
        builder = builder.add_root_certificate(cert);
    }
    builder.build()
}

impl Endpoint {
    /// An endpoint from its spec; a bad secret or CA certificate is an
    /// error here (every message to it then fails with that reason).
    pub(crate) fn new(spec: WebhookSpec, timeout: Duration) -> Result<Endpoint, String> {
        let signer = match spec.secret.as_deref() {
            Some(s) => Some(Signer::new(s).map_err(|e| e.to_string())?),
            None => None,
        };
        let ca = match spec.ca_cert.as_deref() {
            Some(pem) => Some(
                reqwest::Certificate::from_pem(pem.as_bytes())
                    .map_err(|e| format!("CA certificate: {e}"))?,
            ),
            None => None,
        };
        let has_ca = ca.is_some();
        let client = client(timeout, ca).map_err(|e| match has_ca {
            true => format!("CA certificate or TLS client: {}", error_chain(&e)),
            false => error_chain(&e),
        })?;
        Ok(Endpoint {
            spec,
            signer,
            client,
        })
    }
}

fn unix_secs(now: SystemTime) -> i64 {
    now.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// What an answer means; `now` reads a `Retry-After` date.
async fn answer(response: Result<reqwest::Response, reqwest::Error>, now: SystemTime) -> Attempt {
    match response {
        Ok(r) => {
            let status = r.status().as_u16();
            let retry_after = r
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let verdict = classify(status, retry_after.as_deref(), now);
            let error = match verdict {
                Verdict::Delivered => None,
                _ => {
                    let text = r.text().await.unwrap_or_default();
                    let text: String = text.chars().take(200).collect();
                    Some(format!(
                        "HTTP {status}{}{text}",
                        if text.is_empty() { "" } else { ": " }
                    ))
                }
            };
            Attempt {
                verdict,
                status: Some(status),
                error,
            }
        }
        Err(e) if e.is_timeout() => Attempt::retry(format!("timed out: {e}")),
        Err(e) if e.is_builder() => Attempt::refused(e.to_string()),
        Err(e) => Attempt::retry(error_chain(&e)),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// POSTs a webhook message, signed when the endpoint has a secret.
pub(crate) async fn webhook(endpoint: &Endpoint, message: &Message, clock: &dyn Clock) -> Attempt {
    let mut request = endpoint
        .client
        .post(&endpoint.spec.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json");
    let timestamp = unix_secs(clock.now());
    match &endpoint.signer {
        Some(signer) => {
            for (name, value) in signer.headers(&message.id, timestamp, message.body.as_bytes()) {
                request = request.header(name, value);
            }
        }
        None => {
            request = request
                .header("webhook-id", &message.id)
                .header("webhook-timestamp", timestamp.to_string());
        }
    }
    answer(request.body(message.body.clone()).send().await, clock.now()).await
}

/// POSTs an SMS to the gateway: `{"id", "to", "text"}` with the message id
/// as `Idempotency-Key`.
pub(crate) async fn sms(
    gateway: &SmsGateway,
    client: &reqwest::Client,
    message: &Message,
    clock: &dyn Clock,
) -> Attempt {
    let body = serde_json::json!({"id": message.id, "to": message.to, "text": message.body});
    let mut request = client
        .post(&gateway.url)
        .header("idempotency-key", &message.id)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_string());
    if let Some(token) = &gateway.token {
        request = request.bearer_auth(token);
    }
    answer(request.send().await, clock.now()).await
}

/// Submits an email to the SMTP relay (blocking client on tokio's
/// blocking pool). The Message-ID is derived from the message id, so a
/// resend after a crash can be recognised downstream.
pub(crate) async fn email(relay: &SmtpRelay, message: &Message, timeout: Duration) -> Attempt {
    let relay = relay.clone();
    let message = message.clone();
    tokio::task::spawn_blocking(move || send_email(&relay, &message, timeout))
        .await
        .unwrap_or_else(|e| Attempt::retry(format!("email task: {e}")))
}

fn send_email(relay: &SmtpRelay, message: &Message, timeout: Duration) -> Attempt {
    use lettre::Transport;
    let from = match relay.from.parse() {
        Ok(f) => f,
        Err(e) => return Attempt::refused(format!("sender {:?}: {e}", relay.from)),
    };
    let mut builder = lettre::Message::builder()
        .from(from)
        .subject(message.subject.clone().unwrap_or_default())
        .message_id(Some(format!("<{}@flowcap>", message.id)))
        .header(lettre::message::header::ContentType::TEXT_PLAIN);
    for to in &message.to {
        match to.parse() {
            Ok(addr) => builder = builder.to(addr),
            Err(e) => return Attempt::refused(format!("recipient {to:?}: {e}")),
        }
    }
    let mail = match builder.body(message.body.clone()) {
        Ok(m) => m,
        Err(e) => return Attempt::refused(format!("building the email: {e}")),
    };
    let mut transport = lettre::SmtpTransport::builder_dangerous(relay.host.as_str())
        .port(relay.port)
        .timeout(Some(timeout));
    if let (Some(user), Some(password)) = (&relay.username, &relay.password) {
        transport =
            transport.credentials(lettre::transport::smtp::authentication::Credentials::new(
                user.clone(),
                password.clone(),
            ));
    }
    match transport.build().send(&mail) {
        Ok(response) => Attempt {
            verdict: Verdict::Delivered,
            status: Some(u16::from(response.code())),
            error: None,
        },
        Err(e) => Attempt {
            verdict: if e.is_permanent() {
                Verdict::Refused
            } else {
                Verdict::Retry(None)
            },
            status: e.status().map(u16::from),
            error: Some(error_chain(&e)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(secret: Option<&str>, ca: Option<&str>) -> WebhookSpec {
        WebhookSpec {
            id: "hook".into(),
            url: "https://127.0.0.1:1/hook".into(),
            secret: secret.map(str::to_owned),
            ca_cert: ca.map(str::to_owned),
        }
    }

    #[test]
    fn an_endpoint_with_a_bad_secret_or_ca_certificate_is_refused_with_the_reason() {
        let t = Duration::from_secs(1);
        assert!(Endpoint::new(spec(None, None), t).is_ok());
        let e = Endpoint::new(spec(Some("not base64!"), None), t).unwrap_err();
        assert!(!e.is_empty());
        let e = Endpoint::new(
            spec(
                None,
                Some("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n"),
            ),
            t,
        )
        .unwrap_err();
        assert!(e.contains("CA certificate"), "{e}");
    }
}
