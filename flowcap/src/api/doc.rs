//! The OpenAPI 3.1 document of the API, generated from the handlers'
//! annotations and the answer types ([`super::answers`]), served at
//! `/api/v1/openapi.json` and committed as `docs/openapi.json`; a test
//! keeps the two equal (`FLOWCAP_WRITE_OPENAPI=1` rewrites the file).

use std::sync::OnceLock;

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{commands, state};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "flowcap operator API",
        version = "1",
        description = "Live card and pool state and commands. Every answer of live state \
            names the input position it is consistent at (`position.seq`). Errors are RFC 9457 \
            problem details (`application/problem+json`). Bearer tokens carry a scope: read, \
            write (card commands) or admin (registry commands); each token has a rate (429 with \
            Retry-After).",
        license(name = "Apache-2.0")
    ),
    servers((url = "/api/v1")),
    paths(
        state::card,
        state::cards,
        super::usage::usage,
        state::pools,
        state::pool,
        state::plans,
        state::tags,
        state::webhooks,
        super::summary::summary,
        state::rules,
        super::rules::executions,
        super::rules::what_if_draft,
        super::rules::what_if_rule,
        super::letters::dead_letters,
        super::ingestion::ingestion,
        commands::submit,
        commands::result,
        commands::shortcut,
        super::events::events,
    ),
    components(schemas(super::answers::CommandBatchAnswer)),
    modifiers(&Bearer),
    tags(
        (name = "cards", description = "Cards' live state"),
        (name = "pools", description = "Pools' live state"),
        (name = "registry", description = "Plans, tags, webhooks, rules"),
        (name = "commands", description = "SPEC 5.1 commands"),
        (name = "input", description = "Ingestion and dead letters"),
        (name = "events", description = "Action events, as pages or a resumable stream"),
    )
)]
struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document, pretty-printed JSON with a final newline.
pub(crate) fn document() -> &'static str {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    DOCUMENT.get_or_init(|| {
        let mut text = ApiDoc::openapi()
            .to_pretty_json()
            .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
        text.push('\n');
        text
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");

    #[test]
    fn the_committed_document_is_the_generated_one() {
        if std::env::var_os("FLOWCAP_WRITE_OPENAPI").is_some() {
            std::fs::write(COMMITTED, document()).unwrap();
        }
        let committed = std::fs::read_to_string(COMMITTED).unwrap_or_default();
        assert!(
            committed == document(),
            "docs/openapi.json is not the generated document: run \
             FLOWCAP_WRITE_OPENAPI=1 cargo test --workspace --locked --bin flowcap the_committed_document"
        );
        let doc: serde_json::Value = serde_json::from_str(document()).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
        assert!(doc["paths"]["/cards/{iccid}"]["get"].is_object());
        assert!(doc["components"]["schemas"]["Card"].is_object());
    }
}
