//! `POST /commands` (one SPEC 5.1 command, or a JSON array of them),
//! `GET /commands/{id}`, and the per-card shortcuts (`suspend`, `resume`,
//! `add-on`), which build the same commands.
//!
//! `GET /commands/{id}` asks the engine for a command sent through this
//! server (the engine keeps every id's first result, but needs the
//! command to rebuild a batch's per-card results), and the command
//! journal for any other (from the topic, the file, another server, or
//! refused before the engine, e.g. a line that is not a command): the
//! first journal line of that id. The journal is scanned, not indexed:
//! commands are few beside records, and a scan reads ~1 GB/s.
//!
//! A command's id is its idempotency key: the engine answers a repeated
//! id with its first result and changes nothing, whichever way the first
//! came. The caller's token name becomes the command's `operator`, so the
//! journal says who sent it. Card commands need the `write` scope, the
//! registry's (plans, pools, rules, webhooks, tags, attribute names)
//! `admin`. The commands of a batch are sent one after the other, in
//! order; each is validated before any is sent.

use std::collections::{HashMap, VecDeque};
use std::io::BufRead;
use std::path::Path as FilePath;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use flowcap_engine::command::parse_command;
use flowcap_engine::{Command, CommandId, CommandKind, CommandResult, Iccid};

use super::access::{Caller, Scope};
use super::answers::{CommandAnswer, CommandBatchAnswer, Position, ProblemDoc, Shortcut};
use super::live::Outcome;
use super::problem::Problem;
use super::Api;

/// Commands sent through the API remembered for `GET /commands/{id}`.
const REMEMBERED: usize = 100_000;

/// The commands sent through this server, by id, the oldest forgotten
/// first.
#[derive(Debug, Default)]
pub(crate) struct Sent {
    by_id: HashMap<CommandId, Command>,
    order: VecDeque<CommandId>,
}

impl Sent {
    fn remember(&mut self, command: &Command) {
        if self.by_id.contains_key(&command.id) {
            return;
        }
        if self.order.len() >= REMEMBERED {
            if let Some(old) = self.order.pop_front() {
                self.by_id.remove(&old);
            }
        }
        self.order.push_back(command.id.clone());
        self.by_id.insert(command.id.clone(), command.clone());
    }
}

/// The scope a command needs.
fn scope_of(kind: &CommandKind) -> Scope {
    match kind {
        CommandKind::UpsertCard { .. }
        | CommandKind::Activate { .. }
        | CommandKind::Suspend { .. }
        | CommandKind::Resume { .. }
        | CommandKind::Deregister { .. }
        | CommandKind::Renew { .. }
        | CommandKind::SetThreshold { .. }
        | CommandKind::ClearThreshold { .. }
        | CommandKind::AddOn { .. }
        | CommandKind::AddPoolMembers { .. }
        | CommandKind::RemovePoolMembers { .. }
        | CommandKind::ReportViolation { .. }
        | CommandKind::Rebind { .. }
        | CommandKind::BindTags { .. }
        | CommandKind::UnbindTags { .. } => Scope::Write,
        _ => Scope::Admin,
    }
}

pub(crate) fn body_problem(rejection: BytesRejection) -> Problem {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            "the body is over the limit ([api] max_body_kb)",
        )
    } else {
        Problem::bad_request("bad_body", rejection.body_text())
    }
}

/// One SPEC 5.1 command, or a JSON array of them (sent in order).
#[utoipa::path(
    post,
    path = "/commands",
    tag = "commands",
    request_body(content = Object, description = "A command (SPEC 5.1: id, at, type, ...) or an array of them", content_type = "application/json"),
    responses(
        (status = 200, description = "Done: the result (an array answers `items`)", body = CommandAnswer),
        (status = 202, description = "In the commands topic; its result later at `href`", body = CommandAnswer),
        (status = 400, description = "Not a command", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "No accepted token", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "Under the scope", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 409, description = "The embedded pipeline is still reading its inputs", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 413, description = "Body or batch over the limit", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "Over the token's rate", body = ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["write"]))
)]
pub(crate) async fn submit(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    // Who, before reading what: a stranger's body is not parsed.
    let caller = api.access.check(&headers, Scope::Read)?;
    let body = body.map_err(body_problem)?;
    let value: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| Problem::bad_request("not_json", format!("the body is not JSON: {e}")))?;
    let (items, batch) = match value {
        serde_json::Value::Array(items) => (items, true),
        one => (vec![one], false),
    };
    if items.is_empty() || items.len() > api.limits.max_batch {
        return Err(Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            format!(
                "a batch has 1 to {} commands ([api] max_batch); this one has {}",
                api.limits.max_batch,
                items.len()
            ),
        ));
    }
    let mut commands = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let bytes = serde_json::to_vec(item).unwrap_or_default();
        let command = parse_command(&bytes).map_err(|e| {
            let code = serde_json::to_value(e.code)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            Problem::bad_request(
                "bad_command",
                format!("command #{} ({code}): {}", i + 1, e.message),
            )
        })?;
        commands.push(command);
    }
    let need = commands
        .iter()
        .map(|c| scope_of(&c.kind))
        .max()
        .unwrap_or(Scope::Admin);
    caller.require(need)?;
    let mut answers = Vec::with_capacity(commands.len());
    let mut pending = false;
    for command in commands {
        let outcome = send(&api, &caller, command).await?;
        pending |= matches!(outcome.1, Outcome::Pending);
        answers.push(outcome);
    }
    let status = if pending {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    let location = answers
        .iter()
        .find(|(_, o)| matches!(o, Outcome::Pending))
        .map(|(id, _)| format!("/api/v1/commands/{id}"));
    let mut response = if batch {
        let items = answers.iter().map(|(id, o)| answer(id, o)).collect();
        (status, Json(CommandBatchAnswer { items })).into_response()
    } else {
        (status, Json(answer(&answers[0].0, &answers[0].1))).into_response()
    };
    if let Some(location) = location {
        if let Ok(value) = location.parse() {
            response.headers_mut().insert(header::LOCATION, value);
        }
    }
    Ok(response)
}

/// Sends one command under the caller's name.
async fn send(
    api: &Api,
    caller: &Caller,
    mut command: Command,
) -> Result<(CommandId, Outcome), Problem> {
    if let Some(name) = &caller.name {
        command.operator = Some(name.clone());
    }
    api.sent
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remember(&command);
    let id = command.id.clone();
    let outcome = api.live.command(command).await?;
    Ok((id, outcome))
}

fn answer(id: &CommandId, outcome: &Outcome) -> CommandAnswer {
    match outcome {
        Outcome::Done { result, seq } => CommandAnswer {
            id: id.to_string(),
            status: "done".into(),
            result: serde_json::to_value(result).ok(),
            position: Some(Position { seq: *seq }),
            href: None,
        },
        Outcome::Pending => CommandAnswer {
            id: id.to_string(),
            status: "pending".into(),
            result: None,
            position: None,
            href: Some(format!("/api/v1/commands/{id}")),
        },
    }
}

/// The first journal line of command `id` in `journal`: its input
/// sequence number and result. `None` when it has none (or no journal).
fn journaled(journal: &FilePath, id: &CommandId) -> std::io::Result<Option<(u64, CommandResult)>> {
    #[derive(serde::Deserialize)]
    struct Line {
        seq: u64,
        result: CommandResult,
    }
    let file = match std::fs::File::open(journal) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    // A line of this id has its result's id, as JSON writes it.
    let needle = format!(
        "\"command_id\":{}",
        serde_json::to_string(id.as_str()).unwrap_or_default()
    );
    let mut lines = std::io::BufReader::with_capacity(1 << 16, file);
    let mut line = String::new();
    while lines.read_line(&mut line)? > 0 {
        if line.contains(&needle) {
            if let Ok(found) = serde_json::from_str::<Line>(&line) {
                if found.result.command_id == *id {
                    return Ok(Some((found.seq, found.result)));
                }
            }
        }
        line.clear();
    }
    Ok(None)
}

/// The journal's answer for `id`, if it has one.
async fn from_journal(api: &Api, id: &CommandId) -> Result<Option<Outcome>, Problem> {
    let (journal, wanted) = (api.journal.clone(), id.clone());
    let found = tokio::task::spawn_blocking(move || journaled(&journal, &wanted))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
        .map_err(|e| {
            Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("reading the journal: {e}"),
            )
        })?;
    Ok(found.map(|(seq, result)| Outcome::Done {
        result,
        seq: Some(seq),
    }))
}

/// A command's result: the engine's for one sent through this server (a
/// repeated id shows the first result), else the command journal's.
#[utoipa::path(
    get,
    path = "/commands/{id}",
    tag = "commands",
    params(("id" = String, Path, description = "The command id")),
    responses(
        (status = 200, description = "Its result, or pending", body = CommandAnswer),
        (status = 404, description = "Neither sent through this server nor in the journal", body = ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["read"]))
)]
pub(crate) async fn result(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<CommandAnswer>, Problem> {
    api.access.check(&headers, Scope::Read)?;
    let id = CommandId::from(id.as_str());
    let sent = api
        .sent
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .by_id
        .get(&id)
        .cloned();
    let outcome = match sent {
        Some(command) => {
            match api.live.result(command, std::time::Duration::ZERO).await? {
                // Refused before the engine (the driver's parse): journaled.
                Outcome::Pending => from_journal(&api, &id).await?.unwrap_or(Outcome::Pending),
                done => done,
            }
        }
        None => from_journal(&api, &id)
            .await?
            .ok_or_else(|| Problem::not_found(format!("no command {id} in the journal")))?,
    };
    Ok(Json(answer(&id, &outcome)))
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn new_id() -> CommandId {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    CommandId::from(format!("api-{nanos:x}-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed)).as_str())
}

/// `suspend`, `resume` or `add-on` (body `{"mb": N}`) for one card, each
/// with an optional `id` and `at`.
#[utoipa::path(
    post,
    path = "/cards/{iccid}/{action}",
    tag = "commands",
    params(
        ("iccid" = String, Path, description = "The card's ICCID"),
        ("action" = String, Path, description = "suspend, resume or add-on"),
    ),
    request_body(content = Option<Shortcut>, content_type = "application/json"),
    responses(
        (status = 200, description = "Done", body = CommandAnswer),
        (status = 202, description = "In the commands topic", body = CommandAnswer),
        (status = 403, description = "Under the scope", body = ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["write"]))
)]
pub(crate) async fn shortcut(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path((iccid, action)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let caller = api.access.check(&headers, Scope::Write)?;
    let body = body.map_err(body_problem)?;
    let iccid: Iccid = iccid
        .parse()
        .map_err(|_| Problem::bad_request("bad_iccid", format!("`{iccid}` is not an ICCID")))?;
    let args: Shortcut = if body.iter().all(u8::is_ascii_whitespace) {
        Shortcut::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| Problem::bad_request("bad_body", format!("{e}")))?
    };
    let kind = match (action.as_str(), args.mb) {
        ("suspend", None) => CommandKind::Suspend {
            iccids: vec![iccid],
        },
        ("resume", None) => CommandKind::Resume {
            iccids: vec![iccid],
        },
        ("add-on", Some(mb)) => CommandKind::AddOn {
            iccid: Some(iccid),
            pool: None,
            mb,
        },
        ("add-on", None) => return Err(Problem::bad_request("bad_body", "an add-on needs `mb`")),
        ("suspend" | "resume", Some(_)) => {
            return Err(Problem::bad_request("bad_body", "`mb` is for add-ons"))
        }
        _ => {
            return Err(Problem::not_found(format!(
                "no action `{action}` (suspend, resume, add-on)"
            )))
        }
    };
    let at = match args.at {
        Some(at) => at,
        None => api.live.read(|engine| engine.clock()).await?.0,
    };
    let command = Command {
        id: args
            .id
            .map_or_else(new_id, |id| CommandId::from(id.as_str())),
        at,
        operator: None,
        kind,
    };
    let (id, outcome) = send(&api, &caller, command).await?;
    let status = match outcome {
        Outcome::Pending => StatusCode::ACCEPTED,
        Outcome::Done { .. } => StatusCode::OK,
    };
    Ok((status, Json(answer(&id, &outcome))).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_journal_answers_the_first_line_of_an_id() {
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("journal.jsonl");
        let ok = |id: &str| serde_json::json!({"command_id": id, "ok": true, "results": []});
        let failed = serde_json::json!({"command_id": "c\"2", "ok": false, "error": {"code": "malformed", "message": "no"}, "results": []});
        let lines = [
            serde_json::json!({"seq": 3, "command": {}, "result": ok("c1"), "repeat": false}),
            serde_json::json!({"seq": 5, "raw": "{", "raw_truncated": false, "result": failed}),
            serde_json::json!({"seq": 9, "command": {}, "result": ok("c1"), "repeat": true}),
        ];
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(&journal, text).unwrap();
        let (seq, result) = journaled(&journal, &CommandId::from("c1"))
            .unwrap()
            .unwrap();
        assert_eq!((seq, result.ok), (3, true));
        let (seq, result) = journaled(&journal, &CommandId::from("c\"2"))
            .unwrap()
            .unwrap();
        assert_eq!((seq, result.ok), (5, false));
        assert!(journaled(&journal, &CommandId::from("c"))
            .unwrap()
            .is_none());
        let missing = dir.path().join("none.jsonl");
        assert!(journaled(&missing, &CommandId::from("c1"))
            .unwrap()
            .is_none());
    }

    #[test]
    fn registry_commands_need_admin() {
        let parse = |s: &str| parse_command(s.as_bytes()).unwrap().kind;
        let at = r#""at":"2026-11-01T00:00:00+08:00""#;
        let suspend = parse(&format!(
            r#"{{"id":"a",{at},"type":"suspend","iccids":["89860000000000000001"]}}"#
        ));
        assert_eq!(scope_of(&suspend), Scope::Write);
        let tag = parse(&format!(
            r#"{{"id":"b",{at},"type":"upsert_tag","tag":{{"name":"x"}}}}"#
        ));
        assert_eq!(scope_of(&tag), Scope::Admin);
        for body in [
            r#""type":"disable_attribute","name":"site""#,
            r#""type":"enable_attribute","name":"site""#,
            r#""type":"retain_pool","pool":"bp""#,
            r#""type":"reenable_pool","pool":"bp""#,
        ] {
            let kind = parse(&format!(r#"{{"id":"c",{at},{body}}}"#));
            assert_eq!(scope_of(&kind), Scope::Admin, "{body}");
        }
    }
}
