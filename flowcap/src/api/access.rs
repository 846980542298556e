//! Who may call the API: bearer tokens with a scope, kept as SHA-256
//! digests only, and a rate per token.
//!
//! Scopes are ordered: `read` sees state; `write` also sends card
//! commands (suspend, resume, add-on, ...); `admin` also sends the
//! commands that change the registry (plans, pools, rules, webhooks,
//! tags). A token is given its highest scope. Tokens come from `[api]
//! tokens` in the config (name, digest, scopes) and from
//! `FLOWCAP_API_TOKENS` (`name:scope:token`, comma-separated). With none
//! configured the API is open to whoever reaches it, which the server
//! allows only on a loopback address (DECISIONS, *The operator API*).
//!
//! The rate limit is a token bucket per caller (the token's name; one
//! bucket for everyone on an open API): `rate_per_sec` refill, `burst`
//! deep; an empty bucket answers 429 with `Retry-After`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use axum::http::{header, HeaderMap, StatusCode};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::problem::Problem;

/// The environment variable with tokens in clear: `name:scope:token`,
/// comma-separated.
pub(crate) const TOKENS_ENV: &str = "FLOWCAP_API_TOKENS";

/// What a token may do; each scope includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Scope {
    /// Read state.
    Read,
    /// Also card commands.
    Write,
    /// Also registry commands.
    Admin,
}

impl Scope {
    fn parse(text: &str) -> Option<Scope> {
        match text {
            "read" => Some(Scope::Read),
            "write" => Some(Scope::Write),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }
}

/// One `[[api.tokens]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokenConfig {
    /// Who holds it: recorded as the `operator` of its commands.
    pub(crate) name: String,
    /// SHA-256 of the token, 64 hex digits (`printf %s "$TOKEN" | sha256sum`).
    pub(crate) sha256: String,
    /// Its scopes (the highest counts).
    pub(crate) scopes: Vec<Scope>,
}

struct Token {
    name: String,
    digest: [u8; 32],
    scope: Scope,
}

/// Who is calling: the token's name (`None` on an open API).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Caller {
    pub(crate) name: Option<String>,
    scope: Scope,
}

impl Caller {
    /// 403 unless the caller's scope covers `need`.
    pub(crate) fn require(&self, need: Scope) -> Result<(), Problem> {
        if self.scope >= need {
            return Ok(());
        }
        Err(Problem::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "this needs the `{}` scope; the token's is `{}`",
                need.as_str(),
                self.scope.as_str()
            ),
        ))
    }
}

/// The tokens and the rate limiter.
pub(crate) struct Access {
    tokens: Vec<Token>,
    limiter: Limiter,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Access({} tokens)", self.tokens.len())
    }
}

impl Access {
    /// The config's tokens plus those of `env` (see [`TOKENS_ENV`]).
    pub(crate) fn new(
        config: &[TokenConfig],
        env: Option<&str>,
        limiter: Limiter,
    ) -> Result<Access> {
        let mut tokens = Vec::new();
        for (i, t) in config.iter().enumerate() {
            let mut digest = [0u8; 32];
            hex::decode_to_slice(t.sha256.trim(), &mut digest).map_err(|_| {
                anyhow::anyhow!(
                    "[api] tokens #{} ({}): sha256 is not 64 hex digits (the SHA-256 of a token)",
                    i + 1,
                    t.name
                )
            })?;
            let Some(&scope) = t.scopes.iter().max() else {
                bail!("[api] tokens #{} ({}): no scopes", i + 1, t.name);
            };
            tokens.push(Token {
                name: t.name.clone(),
                digest,
                scope,
            });
        }
        for (i, entry) in env
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .enumerate()
        {
            let mut parts = entry.splitn(3, ':');
            let (Some(name), Some(scope), Some(token)) = (parts.next(), parts.next(), parts.next())
            else {
                bail!("{TOKENS_ENV} entry #{}: expected name:scope:token", i + 1);
            };
            let scope = Scope::parse(scope).with_context(|| {
                format!(
                    "{TOKENS_ENV} entry #{} ({name}): scope is read, write or admin",
                    i + 1
                )
            })?;
            if name.is_empty() || token.is_empty() {
                bail!("{TOKENS_ENV} entry #{}: empty name or token", i + 1);
            }
            tokens.push(Token {
                name: name.to_owned(),
                digest: Sha256::digest(token.as_bytes()).into(),
                scope,
            });
        }
        Ok(Access { tokens, limiter })
    }

    /// No token configured: the API is open.
    pub(crate) fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Authenticates the request, charges its caller's rate and checks
    /// that its scope covers `need`: 401 without an accepted token, 429
    /// over the rate, 403 under the scope.
    pub(crate) fn check(&self, headers: &HeaderMap, need: Scope) -> Result<Caller, Problem> {
        if self.is_open() {
            self.limiter.take("", Instant::now())?;
            return Ok(Caller {
                name: None,
                scope: Scope::Admin,
            });
        }
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            });
        let Some(presented) = presented else {
            return Err(Problem::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "this API needs an `Authorization: Bearer <token>` header",
            ));
        };
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        // Every digest compared, in constant time: which one matched (or
        // that none did) takes the same time.
        let mut found = None;
        for (i, token) in self.tokens.iter().enumerate() {
            if bool::from(token.digest.as_slice().ct_eq(digest.as_slice())) {
                found = Some(i);
            }
        }
        let Some(token) = found.map(|i| &self.tokens[i]) else {
            return Err(Problem::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "the bearer token is not accepted",
            ));
        };
        self.limiter.take(&token.name, Instant::now())?;
        let caller = Caller {
            name: Some(token.name.clone()),
            scope: token.scope,
        };
        caller.require(need)?;
        Ok(caller)
    }
}

/// A token bucket per caller.
#[derive(Debug)]
pub(crate) struct Limiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl Limiter {
    /// `rate` requests a second on average, `burst` at once.
    pub(crate) fn new(rate: f64, burst: u32) -> Limiter {
        Limiter {
            rate: rate.max(1e-3),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request from `key`'s bucket at `now`, or says when one
    /// will be there (429).
    fn take(&self, key: &str, now: Instant) -> Result<(), Problem> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, at) = buckets.entry(key.to_owned()).or_insert((self.burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * self.rate)
            .min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            return Ok(());
        }
        let wait = ((1.0 - *tokens) / self.rate).ceil().max(1.0) as u64;
        Err(Problem {
            retry_after: Some(wait),
            ..Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "over the rate of {} requests a second (burst {}): retry in {wait} s",
                    self.rate, self.burst
                ),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use std::time::Duration;

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        h
    }

    fn access() -> Access {
        let ops = TokenConfig {
            name: "ops".into(),
            sha256: hex::encode(Sha256::digest(b"ops-secret")),
            scopes: vec![Scope::Read, Scope::Write],
        };
        Access::new(
            &[ops],
            Some("viewer:read:look, root:admin:all"),
            Limiter::new(1000.0, 1000),
        )
        .unwrap()
    }

    #[test]
    fn tokens_authenticate_and_scopes_authorize() {
        let a = access();
        assert!(!a.is_open());
        let status =
            |h: &HeaderMap, s| a.check(h, s).map(|c| c.name).map_err(|p| p.status.as_u16());
        assert_eq!(status(&HeaderMap::new(), Scope::Read), Err(401));
        assert_eq!(status(&bearer("nope"), Scope::Read), Err(401));
        assert_eq!(
            status(&bearer("look"), Scope::Read),
            Ok(Some("viewer".into()))
        );
        assert_eq!(status(&bearer("look"), Scope::Write), Err(403));
        assert_eq!(
            status(&bearer("ops-secret"), Scope::Write),
            Ok(Some("ops".into()))
        );
        assert_eq!(status(&bearer("ops-secret"), Scope::Admin), Err(403));
        assert_eq!(
            status(&bearer("all"), Scope::Admin),
            Ok(Some("root".into()))
        );
    }

    #[test]
    fn bad_configuration_is_refused() {
        let limiter = || Limiter::new(1.0, 1);
        let short = TokenConfig {
            name: "x".into(),
            sha256: "abc".into(),
            scopes: vec![Scope::Read],
        };
        assert!(Access::new(&[short], None, limiter()).is_err());
        assert!(Access::new(&[], Some("a:root:t"), limiter()).is_err());
        assert!(Access::new(&[], Some("a:read"), limiter()).is_err());
        assert!(Access::new(&[], None, limiter()).unwrap().is_open());
    }

    #[test]
    fn the_bucket_refills_at_the_rate() {
        let limiter = Limiter::new(2.0, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.take("a", t0).unwrap();
        }
        let refused = limiter.take("a", t0).unwrap_err();
        assert_eq!(
            (refused.status.as_u16(), refused.retry_after),
            (429, Some(1))
        );
        // Another caller has its own bucket.
        limiter.take("b", t0).unwrap();
        limiter.take("a", t0 + Duration::from_millis(500)).unwrap();
        assert!(limiter.take("a", t0 + Duration::from_millis(500)).is_err());
    }
}
