//! The web console at `/ui`: a single-page app built from `console/`
//! (`npm run build`) into `console/dist/`, whose files are compiled into
//! the binary so that `cargo build` needs no Node and the console needs
//! no network. The build writes fixed file names (no content hashes), so
//! this list of files stays the same and `include_bytes!` sees every
//! change; a test checks that the list is the whole `dist/`.
//!
//! The pages hold no data: they call `/api/v1` with the token the login
//! page keeps for the session, so they need none to be served. Any path
//! under `/ui` that is not a file is the app's own route (a card, a
//! pool): it answers `index.html` and the app reads the path.

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// The app's page.
const INDEX: &[u8] = include_bytes!("../../../console/dist/index.html");

/// Every other file of `console/dist/`: path under `/ui/`, content type,
/// bytes.
const FILES: &[(&str, &str, &[u8])] = &[
    (
        "assets/console.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../../console/dist/assets/console.js"),
    ),
    (
        "assets/console.css",
        "text/css; charset=utf-8",
        include_bytes!("../../../console/dist/assets/console.css"),
    ),
    (
        "favicon.svg",
        "image/svg+xml",
        include_bytes!("../../../console/dist/favicon.svg"),
    ),
];

/// Only this server's own files and API: no CDN can slip in.
const POLICY: &str = "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'";

/// `/ui`, `/ui/` and everything under it.
pub(crate) fn router() -> Router {
    Router::new()
        .route("/ui", get(|| async { index() }))
        .route("/ui/", get(|| async { index() }))
        .route("/ui/{*path}", get(file))
}

fn index() -> Response {
    answer("text/html; charset=utf-8", INDEX)
}

async fn file(Path(path): Path<String>) -> Response {
    match FILES.iter().find(|(name, _, _)| *name == path) {
        Some((_, kind, bytes)) => answer(kind, bytes),
        // A missing asset is missing, not the app (a stale page would
        // otherwise run HTML as script).
        None if path.starts_with("assets/") => StatusCode::NOT_FOUND.into_response(),
        None => index(),
    }
}

fn answer(kind: &'static str, bytes: &'static [u8]) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            // Fixed names: the browser asks again after each upgrade.
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        bytes,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file the build wrote is served (a new one must be listed).
    #[test]
    fn every_built_file_is_embedded() {
        let dist = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../console/dist");
        let mut built = Vec::new();
        let mut dirs = vec![dist.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else {
                    let name = path.strip_prefix(&dist).unwrap();
                    built.push(name.to_string_lossy().replace('\\', "/"));
                }
            }
        }
        built.sort();
        let mut served: Vec<String> = FILES.iter().map(|(n, _, _)| n.to_string()).collect();
        served.push("index.html".into());
        served.sort();
        assert_eq!(built, served);
    }
}
