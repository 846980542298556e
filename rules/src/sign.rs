//! Standard Webhooks signing (<https://www.standardwebhooks.com>).
//!
//! Every request carries three headers: `webhook-id` (the message id, the
//! same on every retry), `webhook-timestamp` (Unix seconds of the attempt)
//! and `webhook-signature`: `v1,` + base64 of HMAC-SHA256 over
//! `{id}.{timestamp}.{body}`, keyed with the base64-decoded part of the
//! endpoint secret (`whsec_` + base64). Times are arguments: nothing here
//! reads a clock.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Secret prefix of the Standard Webhooks format.
pub const SECRET_PREFIX: &str = "whsec_";
/// Shortest key accepted, in bytes (the standard recommends 24 to 64).
pub const MIN_KEY_BYTES: usize = 16;
/// Longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 64;
/// Header names.
pub const HEADER_ID: &str = "webhook-id";
/// Header with the Unix timestamp in seconds.
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
/// Header with the signatures.
pub const HEADER_SIGNATURE: &str = "webhook-signature";

/// Why a secret or a signature is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    /// The secret is not (`whsec_` +) base64 of 16 to 64 bytes.
    #[error("webhook secret must be \"whsec_\" followed by base64 of 16 to 64 bytes")]
    BadSecret,
    /// No signature in the header matches.
    #[error("no webhook signature matches")]
    Mismatch,
    /// The timestamp is too far from now.
    #[error("webhook timestamp {timestamp} is more than {tolerance_secs} s from now ({now})")]
    Stale {
        /// The header's timestamp.
        timestamp: i64,
        /// Now, as given.
        now: i64,
        /// Tolerance in seconds.
        tolerance_secs: i64,
    },
}

/// A signing key decoded from an endpoint secret.
#[derive(Clone)]
pub struct Signer {
    key: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(..)")
    }
}

impl Signer {
    /// Decodes `whsec_<base64>` (the prefix is optional, as in the
    /// reference implementations).
    pub fn new(secret: &str) -> Result<Signer, SignError> {
        let encoded = secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret);
        let key = STANDARD.decode(encoded).map_err(|_| SignError::BadSecret)?;
        if !(MIN_KEY_BYTES..=MAX_KEY_BYTES).contains(&key.len()) {
            return Err(SignError::BadSecret);
        }
        Ok(Signer { key })
    }

    fn mac(&self, id: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
        // HMAC takes keys of any length.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// The `webhook-signature` value: `v1,<base64>`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let tag = self.mac(id, timestamp, body).finalize().into_bytes();
        format!("v1,{}", STANDARD.encode(tag))
    }

    /// The three headers of one attempt.
    pub fn headers(&self, id: &str, timestamp: i64, body: &[u8]) -> [(&'static str, String); 3] {
        [
            (HEADER_ID, id.to_owned()),
            (HEADER_TIMESTAMP, timestamp.to_string()),
            (HEADER_SIGNATURE, self.sign(id, timestamp, body)),
        ]
    }

    /// Verifies a `webhook-signature` header (space-separated `v1,...`
    /// signatures, any of which may match; compared in constant time) and
    /// that `timestamp` is within `tolerance_secs` of `now` (what a
    /// receiver does).
    pub fn verify(
        &self,
        id: &str,
        timestamp: i64,
        body: &[u8],
        header: &str,
        now: i64,
        tolerance_secs: i64,
    ) -> Result<(), SignError> {
        if (now - timestamp).abs() > tolerance_secs {
            return Err(SignError::Stale {
                timestamp,
                now,
                tolerance_secs,
            });
        }
        for candidate in header.split(' ') {
            let Some(encoded) = candidate.strip_prefix("v1,") else {
                continue;
            };
            let Ok(tag) = STANDARD.decode(encoded) else {
                continue;
            };
            if self.mac(id, timestamp, body).verify_slice(&tag).is_ok() {
                return Ok(());
            }
        }
        Err(SignError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The published Standard Webhooks test vector (the reference
    /// libraries' `sign` tests).
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TS: i64 = 1_614_265_330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn reproduces_the_reference_vector() {
        let signer = Signer::new(SECRET).unwrap();
        assert_eq!(signer.sign(ID, TS, BODY), SIGNATURE);
        let unprefixed = Signer::new(SECRET.trim_start_matches(SECRET_PREFIX)).unwrap();
        assert_eq!(unprefixed.sign(ID, TS, BODY), SIGNATURE);
    }

    #[test]
    fn verifies_like_a_receiver() {
        let signer = Signer::new(SECRET).unwrap();
        signer
            .verify(ID, TS, BODY, SIGNATURE, TS + 10, 300)
            .unwrap();
        let several = format!("v1,bm9wZQ== {SIGNATURE}");
        signer.verify(ID, TS, BODY, &several, TS, 300).unwrap();
        assert_eq!(
            signer.verify(ID, TS, b"{\"test\": 1}", SIGNATURE, TS, 300),
            Err(SignError::Mismatch)
        );
        assert_eq!(
            signer.verify("msg_other", TS, BODY, SIGNATURE, TS, 300),
            Err(SignError::Mismatch)
        );
        assert!(matches!(
            signer.verify(ID, TS, BODY, SIGNATURE, TS + 301, 300),
            Err(SignError::Stale { .. })
        ));
        let headers = signer.headers(ID, TS, BODY);
        assert_eq!(headers[0], (HEADER_ID, ID.to_owned()));
        assert_eq!(headers[1], (HEADER_TIMESTAMP, TS.to_string()));
        assert_eq!(headers[2], (HEADER_SIGNATURE, SIGNATURE.to_owned()));
    }

    #[test]
    fn refuses_bad_secrets() {
        for secret in ["whsec_", "whsec_not base64!", "whsec_c2hvcnQ=", ""] {
            assert_eq!(
                Signer::new(secret).unwrap_err(),
                SignError::BadSecret,
                "{secret}"
            );
        }
    }
}
