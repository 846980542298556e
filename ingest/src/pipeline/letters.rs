//! Dead letters and command results: what the pipeline says about an input
//! it could not use. Built by the drivers (which still hold the raw input)
//! and written by the writer; every shape is bounded whatever the input,
//! because a letter must never be too large to write or produce.

use std::borrow::Cow;

use flowcap_engine::command::CommandResult;
use flowcap_engine::redact;
use flowcap_engine::{CommandId, Timestamp};
use flowcap_storage::history::{Quarantined, SourcePosition};
use serde::Serialize;

use crate::limits::{cut_str, fit, text, InputKind, Oversized, MESSAGE_KEPT, RAW_KEPT};

/// `raw` with its secrets redacted ([`redact::raw`]): what a dead letter,
/// the journal and the history keep of an input that is not a command.
pub(super) fn without_secrets(raw: Vec<u8>) -> Vec<u8> {
    let redacted = match redact::raw(&raw) {
        Cow::Owned(r) => Some(r),
        Cow::Borrowed(_) => None,
    };
    redacted.unwrap_or(raw)
}

/// One dead letter: `rejects.jsonl` line and DLQ message value.
#[derive(Serialize)]
pub(crate) struct DeadLetter<'a> {
    pub(super) seq: u64,
    pub(super) code: &'a str,
    pub(super) message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) iccid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) record_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) source: Option<&'a SourcePosition>,
    /// The input as received, when it is UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) raw: Option<&'a str>,
    /// The input as received, hex, when it is not UTF-8 (binary records).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) raw_hex: Option<String>,
    /// `raw` (or `raw_hex`) holds only the input's first bytes
    /// ([`crate::limits`]).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(super) raw_truncated: bool,
    /// The input's full length in bytes, when `raw` is truncated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) raw_len: Option<u64>,
}

/// What a Kafka dead letter's value may use of the producer's
/// `message.max.bytes`: the rest is left to its key, its headers (the
/// message among them, at most [`MESSAGE_KEPT`] bytes) and the record's
/// framing.
const DLQ_HEADROOM: usize = 8 * 1024;

impl<'a> DeadLetter<'a> {
    /// The dead letter of an input, bounded ([`crate::limits`]): of `raw`
    /// (`raw_len` bytes in full) it keeps at most [`RAW_KEPT`] bytes, of
    /// the message [`MESSAGE_KEPT`], and with a `budget` (a Kafka
    /// producer's `message.max.bytes`) fewer raw bytes until the whole
    /// message fits. The letter and the raw bytes it keeps.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn bounded(
        seq: u64,
        code: &'a str,
        message: &'a str,
        iccid: Option<&'a str>,
        record_id: Option<&'a str>,
        source: Option<&'a SourcePosition>,
        raw: &'a [u8],
        raw_len: u64,
        budget: Option<usize>,
    ) -> Result<(DeadLetter<'a>, &'a [u8]), serde_json::Error> {
        let message = cut_str(message, MESSAGE_KEPT);
        let letter = |keep: usize| {
            let kept = &raw[..keep];
            let truncated = (keep as u64) < raw_len;
            let utf8 = text(kept, truncated);
            DeadLetter {
                seq,
                code,
                message,
                iccid,
                record_id,
                source,
                raw: utf8,
                raw_hex: utf8.is_none().then(|| hex(kept)),
                raw_truncated: truncated,
                raw_len: truncated.then_some(raw_len),
            }
        };
        let start = raw.len().min(RAW_KEPT);
        let keep = match budget {
            None => start,
            Some(max) => fit(start, max.saturating_sub(DLQ_HEADROOM), |keep| {
                serde_json::to_vec(&letter(keep)).map(|v| v.len())
            })?,
        };
        Ok((letter(keep), &raw[..keep]))
    }
}

#[derive(Serialize)]
pub(super) struct BadCommand<'a> {
    pub(super) seq: u64,
    pub(super) raw: String,
    /// `raw` holds only the first bytes of a command over its size limit.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(super) raw_truncated: bool,
    /// The command's full length in bytes, when `raw` is truncated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) raw_len: Option<u64>,
    pub(super) result: &'a CommandResult,
}

/// Most card results one results-topic message carries, most bytes of a
/// card's error message it repeats, and most bytes of a bad command's raw
/// text.
pub(super) const RESULT_PAGE_CARDS: usize = 1_000;
const RESULT_CARD_MESSAGE_BYTES: usize = 256;
const RESULT_MESSAGE_RAW_BYTES: usize = 64 * 1024;

/// What `flowcap.command-results` carries for one command: the answer, not
/// the command again, in pages. A batch of 20k cards echoed with one
/// outcome per card passed librdkafka's 1 MB message limit and stopped the
/// pipeline, and listing only the first 1,000 failures lost the rest; so
/// every card's result is sent, [`RESULT_PAGE_CARDS`] a page, each error
/// message cut at [`RESULT_CARD_MESSAGE_BYTES`] (a page stays far below
/// 1 MB whatever the command). Every page repeats the command's answer and
/// counts and says which page it is of how many (`page` from 0, `pages`),
/// so a client has every card's result once it holds `pages` pages. A bad
/// command's raw text is cut at [`RESULT_MESSAGE_RAW_BYTES`]. The whole
/// command and result are in the journal (`journal.jsonl`,
/// `command_journal`).
#[derive(Serialize)]
pub(super) struct ResultMessage<'a> {
    pub(super) seq: u64,
    pub(super) command_id: &'a CommandId,
    pub(super) ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) error: Option<&'a flowcap_engine::command::CommandError>,
    pub(super) repeat: bool,
    pub(super) cards_ok: usize,
    pub(super) cards_failed: usize,
    /// This page, from 0.
    pub(super) page: u32,
    /// How many pages the result has (at least 1).
    pub(super) pages: u32,
    /// This page's card results, in the command's order.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub(super) cards: Vec<PageCard<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) raw: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(super) raw_truncated: bool,
}

/// One card's result in a page.
#[derive(Serialize)]
pub(super) struct PageCard<'a> {
    pub(super) iccid: &'a flowcap_engine::Iccid,
    pub(super) ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) error: Option<PageError<'a>>,
}

/// A card's error in a page, its message cut.
#[derive(Serialize)]
pub(super) struct PageError<'a> {
    pub(super) code: &'a flowcap_engine::command::ErrorCode,
    pub(super) message: &'a str,
}

impl<'a> ResultMessage<'a> {
    /// The pages of one command's result (at least one).
    pub(super) fn pages(
        seq: u64,
        result: &'a CommandResult,
        repeat: bool,
        raw: Option<&'a str>,
    ) -> Vec<ResultMessage<'a>> {
        let cards_failed = result.results.iter().filter(|r| !r.ok).count();
        let raw_cut = raw.map(|r| cut_str(r, RESULT_MESSAGE_RAW_BYTES));
        let chunks: Vec<&[flowcap_engine::command::CardResult]> = if result.results.is_empty() {
            vec![&[]]
        } else {
            result.results.chunks(RESULT_PAGE_CARDS).collect()
        };
        let pages = u32::try_from(chunks.len()).unwrap_or(u32::MAX);
        chunks
            .into_iter()
            .enumerate()
            .map(|(page, cards)| ResultMessage {
                seq,
                command_id: &result.command_id,
                ok: result.ok,
                error: result.error.as_ref(),
                repeat,
                cards_ok: result.results.len() - cards_failed,
                cards_failed,
                page: u32::try_from(page).unwrap_or(u32::MAX),
                pages,
                cards: cards
                    .iter()
                    .map(|c| PageCard {
                        iccid: &c.iccid,
                        ok: c.ok,
                        error: c.error.as_ref().map(|e| PageError {
                            code: &e.code,
                            message: cut_str(&e.message, RESULT_CARD_MESSAGE_BYTES),
                        }),
                    })
                    .collect(),
                raw_truncated: raw_cut.map(str::len) != raw.map(str::len),
                raw: raw_cut,
            })
            .collect()
    }
}

/// What a driver tells the writer about an input it could not use: the
/// writer turns it into a dead letter (file, DLQ, quarantine table) and,
/// for a command, a failed result.
pub(crate) enum Letter {
    /// A record (or anything that is not a command) the pipeline refused.
    DeadLetter {
        seq: u64,
        code: String,
        message: String,
        iccid: Option<String>,
        record_id: Option<String>,
        source: Option<SourcePosition>,
        /// The input, or its first bytes when it is longer ([`crate::limits`]).
        raw: Vec<u8>,
        /// The input's full length.
        raw_len: u64,
        /// The router's event clock when it was rejected (stamped by
        /// [`super::Pipeline::side`]): names the history partition.
        clock: Timestamp,
    },
    /// A command that does not parse or is too large to read.
    BadCommand {
        seq: u64,
        code: &'static str,
        source: Option<SourcePosition>,
        /// The command, or its first bytes when it is over its size limit.
        raw: Vec<u8>,
        /// The command's full length.
        raw_len: u64,
        result: CommandResult,
        clock: Timestamp,
    },
}

impl Letter {
    /// A dead letter for an input the router refused.
    pub(crate) fn rejected(
        r: flowcap_engine::event::Rejection,
        raw: Vec<u8>,
        source: Option<SourcePosition>,
    ) -> Letter {
        let (raw, raw_len) = kept(raw);
        Letter::DeadLetter {
            seq: r.seq,
            code: r.code,
            message: r.message,
            iccid: r.iccid.map(|i| i.to_string()),
            record_id: r.record_id.map(|id| id.as_str().to_owned()),
            source,
            raw,
            raw_len,
            clock: Timestamp::MIN,
        }
    }

    /// A command that does not parse: a failed result for its id (if it
    /// has one) and a dead letter.
    pub(crate) fn bad_command(
        seq: u64,
        error: flowcap_engine::command::CommandError,
        raw: Vec<u8>,
        source: Option<SourcePosition>,
    ) -> Letter {
        let code = match error.code {
            flowcap_engine::command::ErrorCode::UnknownType => "unknown_command_type",
            _ => "malformed_command",
        };
        let result = CommandResult::rejected(command_id_of(&raw), error);
        Letter::BadCommand {
            seq,
            code,
            source,
            raw_len: raw.len() as u64,
            raw,
            result,
            clock: Timestamp::MIN,
        }
    }

    /// A dead letter for bytes that do not decode.
    pub(crate) fn undecodable(
        seq: u64,
        error: &flowcap_engine::decode::DecodeError,
        raw: Vec<u8>,
        source: Option<SourcePosition>,
    ) -> Letter {
        let (raw, raw_len) = kept(raw);
        Letter::DeadLetter {
            seq,
            code: error.code().to_owned(),
            message: error.to_string(),
            iccid: None,
            record_id: None,
            source,
            raw,
            raw_len,
            clock: Timestamp::MIN,
        }
    }

    /// An input over its size limit, never read: a `too_large` dead letter
    /// with its first bytes (a command's also a failed result, with no id:
    /// its id was not read).
    pub(crate) fn too_large(seq: u64, input: Oversized, source: Option<SourcePosition>) -> Letter {
        let message = input.message();
        match input.kind {
            InputKind::Record => Letter::DeadLetter {
                seq,
                code: Oversized::CODE.to_owned(),
                message,
                iccid: None,
                record_id: None,
                source,
                raw: input.head,
                raw_len: input.len,
                clock: Timestamp::MIN,
            },
            InputKind::Command => Letter::BadCommand {
                seq,
                code: Oversized::CODE,
                source,
                raw: input.head,
                raw_len: input.len,
                result: CommandResult::rejected(
                    CommandId::from(""),
                    flowcap_engine::command::CommandError::new(
                        flowcap_engine::command::ErrorCode::TooLarge,
                        message,
                    ),
                ),
                clock: Timestamp::MIN,
            },
        }
    }
}

/// What a dead letter can keep of `raw` (its first [`RAW_KEPT`] bytes, see
/// [`DeadLetter::bounded`]), so a letter waiting for the writer holds no
/// more; and its full length.
fn kept(mut raw: Vec<u8>) -> (Vec<u8>, u64) {
    let len = raw.len() as u64;
    if raw.len() > RAW_KEPT {
        raw.truncate(RAW_KEPT);
        raw.shrink_to_fit();
    }
    (raw, len)
}

/// The history row of a dead letter: the raw bytes its letter kept, and
/// when they are not the whole input the message says so.
pub(super) fn quarantined(
    seq: u64,
    code: &str,
    message: &str,
    kept: &[u8],
    raw_len: u64,
    clock: Timestamp,
) -> Quarantined {
    let message = if kept.len() as u64 == raw_len {
        message.to_owned()
    } else {
        format!(
            "{message} (raw: the first {} of {raw_len} bytes)",
            kept.len()
        )
    };
    Quarantined {
        seq,
        reason: code.to_owned(),
        message,
        iccid: None,
        record_id: None,
        source: None,
        raw: kept.to_vec(),
        clock,
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// The `id` of a command that did not parse, if it has one.
fn command_id_of(bytes: &[u8]) -> CommandId {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| v.get("id").and_then(|id| id.as_str()).map(CommandId::from))
        .unwrap_or_else(|| CommandId::from(""))
}

#[cfg(test)]
mod tests {
    use flowcap_engine::command::{CardResult, CommandError, ErrorCode};

    use flowcap_engine::Iccid;

    use super::*;

    /// A dead letter is bounded whatever the input: its raw keeps at most
    /// `RAW_KEPT` bytes, marked truncated with the full length; under a
    /// producer limit the whole envelope fits it, even when every byte
    /// takes six as JSON; the same input gives the same bytes.
    #[test]
    fn dead_letters_are_bounded_and_fit_the_producer_limit() {
        let source = SourcePosition {
            topic: "flowcap.usage".into(),
            partition: 3,
            offset: 42,
            timestamp_ms: Some(1),
        };
        let raw = vec![1u8; 1_200_000];
        let long_message = "m".repeat(10_000);
        let letter = |budget| {
            let (letter, kept) = DeadLetter::bounded(
                7,
                "not_json",
                &long_message,
                None,
                None,
                Some(&source),
                &raw,
                raw.len() as u64,
                budget,
            )
            .unwrap();
            (serde_json::to_vec(&letter).unwrap(), kept.len())
        };
        let (file, kept) = letter(None);
        assert_eq!(kept, RAW_KEPT);
        let v: serde_json::Value = serde_json::from_slice(&file).unwrap();
        assert_eq!(v["raw_truncated"], true);
        assert_eq!(v["raw_len"], 1_200_000);
        assert_eq!(v["message"].as_str().unwrap().len(), MESSAGE_KEPT);
        assert_eq!(v["raw"].as_str().unwrap().len(), RAW_KEPT);

        let (kafka, kept) = letter(Some(100_000));
        assert!(kafka.len() <= 100_000 - DLQ_HEADROOM, "{}", kafka.len());
        assert!(kept > 0 && kept < RAW_KEPT, "{kept}");
        assert_eq!(letter(Some(100_000)).0, kafka, "not the same bytes");

        // A small input is kept whole and not marked.
        let (small, _) = DeadLetter::bounded(
            1,
            "not_json",
            "bad",
            None,
            None,
            None,
            b"\xff\x00",
            2,
            Some(1_000_000),
        )
        .unwrap();
        let v = serde_json::to_value(&small).unwrap();
        assert_eq!(v["raw_hex"], "ff00");
        assert!(v.get("raw_truncated").is_none() && v.get("raw_len").is_none());
    }

    /// A batch of 100,000 cards with 3,000 failures: 100 pages of 1,000
    /// cards, each far under librdkafka's 1 MB message limit even with long
    /// error messages, numbered, with the counts; together every card's
    /// result in order. A bad command's raw text is cut at 64 KiB on a
    /// character boundary.
    #[test]
    fn result_messages_are_paged_and_small_whatever_the_batch() {
        let long = "x".repeat(5_000);
        let results: Vec<CardResult> = (0..100_000u64)
            .map(|k| CardResult {
                iccid: Iccid::parse(&format!("8986010000{k:010}")).unwrap(),
                ok: k % 100 >= 3,
                error: (k % 100 < 3).then(|| CommandError::new(ErrorCode::UnknownCard, &long)),
            })
            .collect();
        let result = CommandResult {
            command_id: CommandId("batch-1".into()),
            ok: false,
            error: None,
            results,
        };
        let pages = ResultMessage::pages(7, &result, false, None);
        assert_eq!(pages.len(), 100);
        let mut rebuilt = Vec::new();
        for (k, page) in pages.iter().enumerate() {
            assert_eq!((page.page as usize, page.pages), (k, 100));
            assert_eq!((page.cards_ok, page.cards_failed), (97_000, 3_000));
            let bytes = serde_json::to_vec(page).unwrap();
            assert!(bytes.len() < 200_000, "{} bytes", bytes.len());
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            for card in v["cards"].as_array().unwrap() {
                rebuilt.push((
                    card["iccid"].as_str().unwrap().to_owned(),
                    card["ok"].as_bool().unwrap(),
                ));
                if let Some(e) = card.get("error") {
                    assert_eq!(e["code"], "unknown_card");
                    assert_eq!(
                        e["message"].as_str().unwrap().len(),
                        RESULT_CARD_MESSAGE_BYTES
                    );
                }
            }
        }
        let expected: Vec<(String, bool)> = result
            .results
            .iter()
            .map(|r| (r.iccid.to_string(), r.ok))
            .collect();
        assert_eq!(rebuilt, expected);
        assert!(serde_json::to_vec(&result).unwrap().len() > 1_000_000);
        // A command without card results is one page.
        let single = CommandResult {
            command_id: CommandId("one".into()),
            ok: true,
            error: None,
            results: Vec::new(),
        };
        let pages = ResultMessage::pages(8, &single, false, None);
        assert_eq!((pages.len(), pages[0].page, pages[0].pages), (1, 0, 1));

        let raw = "é".repeat(40_000); // 80,000 bytes, 2 bytes a character
        let bad = CommandResult::rejected(
            CommandId("bad".into()),
            CommandError::new(ErrorCode::Malformed, "not JSON"),
        );
        let message = ResultMessage::pages(8, &bad, false, Some(&raw)).remove(0);
        let cut = message.raw.unwrap();
        assert!(message.raw_truncated);
        assert_eq!(cut.len(), RESULT_MESSAGE_RAW_BYTES);
        assert!(raw.starts_with(cut));
        let small = ResultMessage::pages(9, &bad, true, Some("{}")).remove(0);
        assert!(!small.raw_truncated && small.repeat);
    }
}
