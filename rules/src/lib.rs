//! # flowcap-rules
//!
//! What happens to an automation rule firing after the engine decided it
//! (SPEC section 6). The engine evaluates rules inside its shards, where the
//! card and pool state lives, and emits one
//! [`RuleFiredEvent`](flowcap_engine::event::RuleFiredEvent) per rule,
//! target and cause, with a deterministic id and the actions whose reminder
//! window allowed them. This crate turns a firing into what is sent and
//! recorded (pure: no IO, no clock; times come in as arguments). Sending
//! it is the `flowcap-delivery` crate's part (the outbox, retries, the
//! HTTP and SMTP clients), kept apart so that what records firings and
//! deliveries (the history writer) compiles no network client:
//!
//! ```text
//!  RuleFiredEvent --template()--> Template {name, params}
//!        |                          |--> webhook::single_body / merged_bodies (<= 500 cards)
//!        |                          |        --> sign::Signer (Standard Webhooks headers)
//!        |                          `--> text::email / text::sms
//!        `--execution::records()--> ExecutionRecord (rule_executions table)
//! ```
//!
//! - [`template`]: the six SPEC template names and their keys.
//! - [`webhook`]: the exact webhook bodies, per card or merged, with
//!   deterministic `webhook-id`s.
//! - [`sign`]: Standard Webhooks signing and verification.
//! - [`text`]: plain-text email and SMS renderings of the same parameters.
//! - [`execution`]: the execution record of every firing and channel.
//! - [`message`]: a notification message as stored and sent, and its
//!   outcome (`rule_deliveries`).

pub mod execution;
pub mod message;
pub mod sign;
pub mod template;
pub mod text;
pub mod webhook;

pub use execution::{ExecutionRecord, Outcome};
pub use sign::{SignError, Signer};
pub use template::{template, Template, TemplateName, TemplateOptions};
pub use webhook::{merged_bodies, single_body, WebhookMessage, MAX_MERGED};

/// Errors of this crate: all of them are the caller's (bad input), none is
/// external or retryable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A webhook secret that is not `whsec_` + base64.
    #[error(transparent)]
    Sign(#[from] SignError),
    /// Firings merged into one message must share rule type and template.
    #[error("cannot merge firings of different templates ({0} and {1})")]
    MixedTemplates(String, String),
    /// Nothing to merge.
    #[error("no firing to merge")]
    Empty,
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
