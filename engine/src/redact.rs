//! Secrets kept out of everything flowcap writes.
//!
//! A webhook's signing secret arrives in an `upsert_webhook` command. The
//! engine keeps it (its registry, and so its snapshots, which restarts need
//! to sign again), but the command is also written out: the journal
//! (`journal.jsonl`), the history's `command_journal` (readable over
//! `/sql`), the command results and, for a command that does not parse,
//! the dead letters. Those get a redacted copy: the secret replaced by
//! [`secret`]'s `redacted:sha256:<8 hex>`, enough to tell two secrets apart
//! (a rotation shows) and nothing to sign with.
//!
//! A raw input that is not a command ([`raw`]) is redacted when it parses
//! as JSON (every value under a [`SECRET_KEYS`] key, at any depth); when it
//! does not parse (cut, broken), the text after each `"secret":` key is
//! blanked up to its closing quote.

use std::borrow::Cow;

use sha2::{Digest, Sha256};

use crate::command::{Command, CommandKind};

/// What a redacted secret starts with.
pub const REDACTED_PREFIX: &str = "redacted:sha256:";

/// Object keys whose values are secrets in a raw input.
pub const SECRET_KEYS: [&str; 3] = ["secret", "password", "token"];

/// `secret`'s redacted form: `redacted:sha256:` and the first 8 hex digits
/// of its SHA-256. An already redacted text is returned as it is.
pub fn secret(secret: &str) -> String {
    if secret.starts_with(REDACTED_PREFIX) {
        return secret.to_owned();
    }
    let digest = Sha256::digest(secret.as_bytes());
    let mut out = String::with_capacity(REDACTED_PREFIX.len() + 8);
    out.push_str(REDACTED_PREFIX);
    for b in &digest[..4] {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// `command` as it may be written out: a copy with its secret redacted
/// when it carries one, else itself.
pub fn command(command: &Command) -> Cow<'_, Command> {
    match &command.kind {
        CommandKind::UpsertWebhook { webhook } => match &webhook.secret {
            Some(s) if !s.starts_with(REDACTED_PREFIX) => {
                let mut copy = command.clone();
                if let CommandKind::UpsertWebhook { webhook } = &mut copy.kind {
                    webhook.secret = Some(self::secret(s));
                }
                Cow::Owned(copy)
            }
            _ => Cow::Borrowed(command),
        },
        _ => Cow::Borrowed(command),
    }
}

/// A raw input (a command that did not parse, a dead-lettered line) as it
/// may be written out: every secret value redacted, else itself.
pub fn raw(raw: &[u8]) -> Cow<'_, [u8]> {
    // Keys can hide behind `\u` escapes only in JSON that names one.
    let may_hold = SECRET_KEYS.iter().any(|k| contains(raw, k.as_bytes())) || contains(raw, b"\\u");
    if !may_hold {
        return Cow::Borrowed(raw);
    }
    match serde_json::from_slice::<serde_json::Value>(raw) {
        Ok(mut value) => {
            if redact_value(&mut value) {
                Cow::Owned(value.to_string().into_bytes())
            } else {
                Cow::Borrowed(raw)
            }
        }
        Err(_) => redact_text(raw),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Redacts every string under a secret key; true when one was.
fn redact_value(value: &mut serde_json::Value) -> bool {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut changed = false;
            for (key, v) in map.iter_mut() {
                if SECRET_KEYS.contains(&key.as_str()) {
                    if let Value::String(s) = v {
                        if !s.starts_with(REDACTED_PREFIX) {
                            *s = secret(s);
                            changed = true;
                        }
                        continue;
                    }
                    if !v.is_null() {
                        *v = Value::String(format!("{REDACTED_PREFIX}?"));
                        changed = true;
                        continue;
                    }
                }
                changed |= redact_value(v);
            }
            changed
        }
        Value::Array(items) => items
            .iter_mut()
            .fold(false, |changed, v| redact_value(v) | changed),
        _ => false,
    }
}

/// Not JSON: blanks the string after each `"<secret key>"` `:` up to its
/// closing quote (or the end of the text).
fn redact_text(raw: &[u8]) -> Cow<'_, [u8]> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    let mut changed = false;
    while i < raw.len() {
        let key = SECRET_KEYS.iter().find_map(|k| {
            let quoted_len = k.len() + 2;
            let at = raw.get(i..i + quoted_len)?;
            (at[0] == b'"' && &at[1..=k.len()] == k.as_bytes() && at[k.len() + 1] == b'"')
                .then_some(quoted_len)
        });
        let Some(len) = key else {
            out.push(raw[i]);
            i += 1;
            continue;
        };
        let mut j = i + len;
        while raw.get(j).is_some_and(u8::is_ascii_whitespace) {
            j += 1;
        }
        if raw.get(j) != Some(&b':') {
            out.extend_from_slice(&raw[i..j]);
            i = j;
            continue;
        }
        j += 1;
        while raw.get(j).is_some_and(u8::is_ascii_whitespace) {
            j += 1;
        }
        if raw.get(j) != Some(&b'"') {
            out.extend_from_slice(&raw[i..j]);
            i = j;
            continue;
        }
        // The value's text, up to an unescaped quote.
        let start = j + 1;
        let mut end = start;
        while end < raw.len() && raw[end] != b'"' {
            end += if raw[end] == b'\\' { 2 } else { 1 };
        }
        let end = end.min(raw.len());
        out.extend_from_slice(&raw[i..start]);
        let value = String::from_utf8_lossy(&raw[start..end]);
        out.extend_from_slice(secret(&value).as_bytes());
        changed = true;
        i = end;
    }
    if changed {
        Cow::Owned(out)
    } else {
        Cow::Borrowed(raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::parse_command;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    #[test]
    fn a_secret_is_replaced_by_a_short_digest() {
        let r = secret(SECRET);
        assert!(r.starts_with(REDACTED_PREFIX), "{r}");
        assert_eq!(r.len(), REDACTED_PREFIX.len() + 8);
        assert_ne!(r, secret("whsec_other"));
        assert_eq!(secret(&r), r, "redacting twice changes nothing");
    }

    #[test]
    fn an_upsert_webhook_is_written_without_its_secret() {
        let line = format!(
            r#"{{"id": "w", "type": "upsert_webhook", "at": "2026-11-01T00:00:00Z",
                "webhook": {{"id": "h", "url": "http://x", "secret": "{SECRET}"}}}}"#
        );
        let c = parse_command(line.as_bytes()).unwrap();
        let r = command(&c);
        let text = serde_json::to_string(&*r).unwrap();
        assert!(!text.contains(SECRET), "{text}");
        assert!(text.contains(&secret(SECRET)), "{text}");
        assert!(matches!(command(&r), Cow::Borrowed(_)));
        // The original keeps it: the engine signs with it.
        assert!(serde_json::to_string(&c).unwrap().contains(SECRET));
        assert!(!format!("{c:?}").contains(SECRET), "Debug shows the secret");
    }

    #[test]
    fn raw_inputs_lose_their_secrets_json_or_not() {
        let json = format!(
            r#"{{"type": "upsert_webhook", "webhook": {{"secret": "{SECRET}", "url": 5}}}}"#
        );
        let cut = &json[..json.len() - 12];
        let escaped = json.replace("secret", "\\u0073ecret");
        for input in [json.as_str(), cut, &escaped, &format!("junk {json}")] {
            let out = raw(input.as_bytes());
            let text = String::from_utf8_lossy(&out);
            assert!(!text.contains("MfKQ9r8"), "{input} -> {text}");
            assert!(text.contains(REDACTED_PREFIX), "{input} -> {text}");
        }
        let plain = br#"{"iccid": "8986", "bytes": 5}"#;
        assert!(matches!(raw(plain), Cow::Borrowed(_)));
    }
}
