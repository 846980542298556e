//! The API's fixed queries over the Parquet history: rule executions,
//! dead letters, a card's usage. They go through the same limited SQL
//! service as `/sql` (rows, size, time, memory), but they are the API's
//! own text, so no `/sql` token applies; every value taken from a request
//! is checked or quoted here.

use axum::http::StatusCode;

use super::problem::Problem;
use super::Api;

/// `text` as a SQL string literal.
pub(crate) fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The rows of `sql`, a query of the API's own, as JSON objects; 404 when
/// the server has no history (yet).
pub(crate) async fn rows(api: &Api, sql: &str) -> Result<Vec<serde_json::Value>, Problem> {
    let Some(history) = api.history.clone() else {
        return Err(Problem::not_found(
            "this server has no history (run without --no-history)",
        ));
    };
    history
        .json_rows(sql)
        .await
        .map_err(|(status, detail)| match status {
            StatusCode::BAD_REQUEST if detail.contains("no history") => Problem::not_found(detail),
            _ => Problem::new(status, "history", detail),
        })
}

/// A page's size from `limit` (1 to `max`, default `default`).
pub(crate) fn page_size(
    limit: Option<&String>,
    default: usize,
    max: usize,
) -> Result<usize, Problem> {
    match limit {
        None => Ok(default),
        Some(text) => match text.parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(Problem::bad_request(
                "bad_limit",
                format!("limit is 1 to {max}"),
            )),
        },
    }
}

/// An opaque cursor over `parts` (hex of the parts joined by a newline).
pub(crate) fn cursor_of(parts: &[&str]) -> String {
    hex::encode(parts.join("\n"))
}

/// The parts of a cursor this API gave, `n` of them.
pub(crate) fn parse_cursor(text: &str, n: usize) -> Result<Vec<String>, Problem> {
    hex::decode(text)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .map(|s| s.split('\n').map(str::to_owned).collect::<Vec<_>>())
        .filter(|parts| parts.len() == n)
        .ok_or_else(|| Problem::bad_request("bad_cursor", "the cursor is not one this API gave"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_escape_and_cursors_round_trip() {
        assert_eq!(quote("a'b"), "'a''b'");
        let c = cursor_of(&["1700000000000", "x'y"]);
        assert_eq!(parse_cursor(&c, 2).unwrap(), vec!["1700000000000", "x'y"]);
        assert_eq!(parse_cursor(&c, 1).unwrap_err().code, "bad_cursor");
        assert_eq!(parse_cursor("zz", 1).unwrap_err().code, "bad_cursor");
    }
}
