//! When to try a notification again, and how long to wait: pure functions
//! of the attempt number, the message id and the receiver's answer, so
//! they are tested without a clock or a network.
//!
//! - 2xx: delivered.
//! - 408, 429 and 5xx, timeouts and connection errors: retried, with
//!   exponential back-off (`initial * 2^(attempt-1)`, capped at `max`) and
//!   "equal jitter" (a wait between half and all of it). The jitter is
//!   derived from the message id and the attempt instead of a random
//!   generator: retries of different messages still spread out, and a run
//!   is reproducible.
//! - `Retry-After` (seconds or an HTTP date) replaces the back-off when the
//!   receiver sends it, up to `retry_after_max`.
//! - Any other status (other 4xx, 3xx left after redirects): not retried.

use std::time::{Duration, SystemTime};

/// Retry settings of every channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all (the first one included); at least 1.
    pub max_attempts: u32,
    /// Back-off before the second attempt.
    pub initial: Duration,
    /// Longest back-off.
    pub max: Duration,
    /// Longest wait a `Retry-After` may ask for.
    pub retry_after_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            initial: Duration::from_millis(500),
            max: Duration::from_secs(60),
            retry_after_max: Duration::from_secs(300),
        }
    }
}

/// What one attempt's answer means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Accepted.
    Delivered,
    /// Try again (after the receiver's `Retry-After` if it sent one).
    Retry(Option<Duration>),
    /// Do not try again: the receiver refuses the request itself.
    Refused,
}

/// The verdict of an HTTP status (with the `Retry-After` header's value).
pub fn classify(status: u16, retry_after: Option<&str>, now: SystemTime) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        408 | 429 | 500..=599 => {
            Verdict::Retry(retry_after.and_then(|v| parse_retry_after(v, now)))
        }
        _ => Verdict::Refused,
    }
}

/// `Retry-After`: delay-seconds or an HTTP date (RFC 9110 10.2.3). A date
/// in the past is no wait; anything unparsable is ignored.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

impl RetryPolicy {
    /// The wait after failed attempt `attempt` (1-based) of message `id`,
    /// or `None` when no attempt is left.
    pub fn wait(&self, id: &str, attempt: u32, retry_after: Option<Duration>) -> Option<Duration> {
        if attempt >= self.max_attempts.max(1) {
            return None;
        }
        if let Some(after) = retry_after {
            return Some(after.min(self.retry_after_max));
        }
        let exp = self
            .initial
            .saturating_mul(
                1u32.checked_shl(attempt.saturating_sub(1))
                    .unwrap_or(u32::MAX),
            )
            .min(self.max);
        let key = format!("{id}|{attempt}");
        let unit = (xxhash_rust::xxh3::xxh3_64(key.as_bytes()) % 1_000_001) as f64 / 1_000_000.0;
        Some(exp / 2 + exp.mul_f64(unit / 2.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy {
        max_attempts: 5,
        initial: Duration::from_millis(100),
        max: Duration::from_millis(500),
        retry_after_max: Duration::from_secs(10),
    };

    #[test]
    fn statuses_map_to_verdicts() {
        let now = SystemTime::UNIX_EPOCH;
        assert_eq!(classify(200, None, now), Verdict::Delivered);
        assert_eq!(classify(204, None, now), Verdict::Delivered);
        assert_eq!(classify(500, None, now), Verdict::Retry(None));
        assert_eq!(
            classify(503, Some("3"), now),
            Verdict::Retry(Some(Duration::from_secs(3)))
        );
        assert_eq!(classify(408, None, now), Verdict::Retry(None));
        assert_eq!(
            classify(429, Some("1"), now),
            Verdict::Retry(Some(Duration::from_secs(1)))
        );
        for refused in [400, 401, 403, 404, 410, 422, 301] {
            assert_eq!(
                classify(refused, Some("1"), now),
                Verdict::Refused,
                "{refused}"
            );
        }
    }

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        // 21 Oct 2015 07:28:00 GMT is 1445412480.
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    #[test]
    fn back_off_doubles_with_jitter_and_stops_after_the_last_attempt() {
        for attempt in 1..5 {
            let exp = Duration::from_millis(100 * (1 << (attempt - 1))).min(POLICY.max);
            let w = POLICY.wait("msg_a", attempt, None).unwrap();
            assert!(
                w >= exp / 2 && w <= exp,
                "attempt {attempt}: {w:?} vs {exp:?}"
            );
            // Deterministic per message and attempt.
            assert_eq!(POLICY.wait("msg_a", attempt, None), Some(w));
        }
        assert_eq!(POLICY.wait("msg_a", 5, None), None);
        let spread: std::collections::BTreeSet<_> = (0..20)
            .map(|i| POLICY.wait(&format!("msg_{i}"), 3, None).unwrap())
            .collect();
        assert!(spread.len() > 10, "jitter spreads messages: {spread:?}");
    }

    #[test]
    fn retry_after_wins_over_back_off_up_to_its_cap() {
        assert_eq!(
            POLICY.wait("m", 1, Some(Duration::from_secs(2))),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            POLICY.wait("m", 1, Some(Duration::from_secs(99))),
            Some(Duration::from_secs(10))
        );
        assert_eq!(POLICY.wait("m", 5, Some(Duration::from_secs(1))), None);
    }
}
