//! Errors as RFC 9457 problem details (`application/problem+json`): every
//! refusal of the API, from a missing token to a busy driver, has one
//! shape, a stable `type` per cause and a sentence saying what to do.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// The media type of a problem.
pub(crate) const PROBLEM_JSON: &str = "application/problem+json";

/// One problem: a status, a stable code (the `type` is
/// `urn:flowcap:problem:<code>`) and a detail for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    pub(crate) status: StatusCode,
    pub(crate) code: &'static str,
    pub(crate) detail: String,
    /// Seconds, for 429 and 503 (`Retry-After`).
    pub(crate) retry_after: Option<u64>,
}

impl Problem {
    pub(crate) fn new(
        status: StatusCode,
        code: &'static str,
        detail: impl Into<String>,
    ) -> Problem {
        Problem {
            status,
            code,
            detail: detail.into(),
            retry_after: None,
        }
    }

    pub(crate) fn bad_request(code: &'static str, detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::BAD_REQUEST, code, detail)
    }

    pub(crate) fn not_found(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::NOT_FOUND, "not_found", detail)
    }

    /// The pipeline cannot take the request now; retry after `secs`.
    pub(crate) fn busy(detail: impl Into<String>, secs: u64) -> Problem {
        Problem {
            retry_after: Some(secs),
            ..Problem::new(StatusCode::SERVICE_UNAVAILABLE, "busy", detail)
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = super::answers::ProblemDoc {
            kind: format!("urn:flowcap:problem:{}", self.code),
            title: self.status.canonical_reason().unwrap_or("Error").to_owned(),
            status: self.status.as_u16(),
            detail: self.detail,
        };
        let text = serde_json::to_string(&body).unwrap_or_default();
        let mut response = (self.status, text).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_problem_is_problem_json_with_its_headers() {
        let response = Problem {
            retry_after: Some(3),
            ..Problem::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "slow down")
        }
        .into_response();
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        assert_eq!(response.headers()[header::RETRY_AFTER], "3");
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(doc["type"], "urn:flowcap:problem:rate_limited");
        assert_eq!(doc["status"], 429);
        assert_eq!(doc["title"], "Too Many Requests");
        assert_eq!(doc["detail"], "slow down");
    }
}
