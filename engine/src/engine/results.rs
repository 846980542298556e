//! The command-result table: the first result of every command id, so a
//! repeated command is answered as it was the first time and changes
//! nothing.

use serde::{Deserialize, Serialize};

use crate::command::{CardResult, Command, CommandError, CommandResult, ErrorCode};
use crate::ids::CommandId;

/// The first result of every command id, compactly. Most commands succeed
/// with no per-card detail (`upsert_card`, ...), and an all-ok batch is
/// answered again from the repeat's own card list, so each of those costs
/// 16 bytes (the 128-bit xxh3 of the id, whose two low bits say which kind
/// of result it was) plus a 4-byte hash-table slot. Only failed commands
/// keep their full result. A collision between two ids has probability
/// ~n^2/2^127: about 1e-24 for ten million commands.
#[derive(Debug, Clone, Default)]
pub(crate) struct CommandResults {
    table: hashbrown::HashTable<u32>,
    keys: Vec<u128>,
    failures: hashbrown::HashMap<u128, Box<str>>,
}

/// Kinds of remembered result, in the two low bits of a key.
const RESULT_OK: u128 = 0;
const RESULT_ALL_CARDS_OK: u128 = 1;
const RESULT_FAILED: u128 = 2;
const KIND_BITS: u128 = 3;

fn id_key(id: &CommandId) -> u128 {
    xxhash_rust::xxh3::xxh3_128(id.as_str().as_bytes()) & !KIND_BITS
}

fn slot_hash(key: u128) -> u64 {
    (key >> 64) as u64
}

/// The remembered results, as snapshots store them: keys and failures
/// sorted, so that equal results encode equally whatever order they came
/// in. Sorted when serialized, not when copied: a snapshot's cut copies
/// them while the inputs wait, and its own thread encodes the copy
/// (sorting a million keys was a third of the copy at 1M cards).
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct StoredResults {
    keys: Vec<u128>,
    failures: Vec<(u128, String)>,
}

impl Serialize for StoredResults {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        fn sorted<T: Ord + Clone>(items: &[T]) -> std::borrow::Cow<'_, [T]> {
            if items.is_sorted() {
                std::borrow::Cow::Borrowed(items)
            } else {
                let mut items = items.to_vec();
                items.sort_unstable();
                std::borrow::Cow::Owned(items)
            }
        }
        // Field for field what `derive(Serialize)` wrote (a slice encodes
        // as the `Vec` it came from).
        let mut state = serializer.serialize_struct("StoredResults", 2)?;
        state.serialize_field("keys", &*sorted(&self.keys))?;
        state.serialize_field("failures", &*sorted(&self.failures))?;
        state.end()
    }
}

impl CommandResults {
    fn find(&self, key: u128) -> Option<u128> {
        self.table
            .find(slot_hash(key), |&i| {
                self.keys[i as usize] & !KIND_BITS == key
            })
            .map(|&i| self.keys[i as usize])
    }

    /// The first result of this command's id, if it was seen before.
    pub(crate) fn first_result(&self, command: &Command) -> Option<CommandResult> {
        let key = id_key(&command.id);
        let stored = self.find(key)?;
        let ok = |results| CommandResult {
            command_id: command.id.clone(),
            ok: true,
            error: None,
            results,
        };
        Some(match stored & KIND_BITS {
            RESULT_ALL_CARDS_OK => ok(command
                .kind
                .batch()
                .unwrap_or_default()
                .iter()
                .map(|&iccid| CardResult {
                    iccid,
                    ok: true,
                    error: None,
                })
                .collect()),
            RESULT_FAILED => self
                .failures
                .get(&key)
                .and_then(|json| serde_json::from_str(json).ok())
                .unwrap_or_else(|| {
                    CommandResult::rejected(
                        command.id.clone(),
                        CommandError::new(ErrorCode::Malformed, "repeat of a failed command"),
                    )
                }),
            _ => ok(Vec::new()),
        })
    }

    /// Remembers a command's first result.
    pub(crate) fn remember(&mut self, id: &CommandId, result: &CommandResult) {
        let key = id_key(id);
        let kind = if result.ok && result.results.is_empty() {
            RESULT_OK
        } else if result.ok {
            RESULT_ALL_CARDS_OK
        } else {
            let json = serde_json::to_string(result).unwrap_or_default();
            self.failures.insert(key, json.into_boxed_str());
            RESULT_FAILED
        };
        self.insert(key | kind);
    }

    fn insert(&mut self, tagged: u128) {
        let key = tagged & !KIND_BITS;
        if self.find(key).is_some() {
            return;
        }
        let index = self.keys.len() as u32;
        crate::directory::push_compact(&mut self.keys, tagged);
        let keys = &self.keys;
        self.table.insert_unique(slot_hash(key), index, |&i| {
            slot_hash(keys[i as usize] & !KIND_BITS)
        });
    }

    /// A copy as snapshots store it (sorted when serialized).
    pub(crate) fn to_stored(&self) -> StoredResults {
        StoredResults {
            keys: self.keys.clone(),
            failures: self
                .failures
                .iter()
                .map(|(k, v)| (*k, v.to_string()))
                .collect(),
        }
    }

    /// Rebuilds from [`CommandResults::to_stored`].
    pub(crate) fn from_stored(stored: StoredResults) -> CommandResults {
        let mut results = CommandResults {
            table: hashbrown::HashTable::with_capacity(stored.keys.len()),
            keys: Vec::with_capacity(stored.keys.len()),
            failures: stored
                .failures
                .into_iter()
                .map(|(k, v)| (k, v.into_boxed_str()))
                .collect(),
        };
        for key in stored.keys {
            results.insert(key);
        }
        results
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_results_encode_sorted_whatever_order_they_came_in() {
        let key = |n: u128| n << 2;
        let unsorted = StoredResults {
            keys: vec![key(3), key(1) | RESULT_FAILED, key(2)],
            failures: vec![(key(9), "b".into()), (key(1), "a".into())],
        };
        let sorted = StoredResults {
            keys: vec![key(1) | RESULT_FAILED, key(2), key(3)],
            failures: vec![(key(1), "a".into()), (key(9), "b".into())],
        };
        let bytes = bincode::serialize(&unsorted).unwrap();
        assert_eq!(bytes, bincode::serialize(&sorted).unwrap());
        let back: StoredResults = bincode::deserialize(&bytes).unwrap();
        assert_eq!(back.keys, sorted.keys);
        assert_eq!(back.failures, sorted.failures);
    }
}
