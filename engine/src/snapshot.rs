//! Snapshots of the complete engine state.
//!
//! A snapshot is the engine's state at one input position: cards, pools,
//! registries, command results, the dedupe hot window, the event clock and
//! the input positions it covers. Restoring it and replaying the input
//! after those positions reproduces the engine exactly (same state, same
//! events, same ids), which is the whole recovery story.
//!
//! Layout (all integers little-endian):
//!
//! | bytes | content |
//! | --- | --- |
//! | 8 | magic `FLOWCAPS` |
//! | 4 | format version ([`SNAPSHOT_VERSION`]) |
//! | 8 | payload length |
//! | 4 | CRC-32 of the payload |
//! | n | payload: `bincode` of the state |
//!
//! Writing the bytes atomically (temporary file, fsync, rename) is the
//! storage crate's job; this module only encodes, checks and decodes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::EngineConfig;
use crate::dedupe::{Deduper, Durability, IdStore};
use crate::engine::{card_views, CardView, Engine, EngineError, Loc, Registry};
use crate::ids::{PlanId, TagId};
use crate::shard::Shard;
use crate::time::Timestamp;
use crate::watermark::Lanes;

/// Magic bytes opening every snapshot.
pub const SNAPSHOT_MAGIC: &[u8; 8] = b"FLOWCAPS";
/// Current snapshot format version. Bump on any change of the state layout.
pub const SNAPSHOT_VERSION: u32 = 9;
const HEADER_LEN: usize = 8 + 4 + 8 + 4;

#[derive(Serialize)]
struct StateRef<'a> {
    config: &'a EngineConfig,
    shards: &'a [Shard],
    deduper: &'a Deduper,
    /// JSON: the registry holds wire types (optional fields, free-form rule
    /// conditions) that a non-self-describing format cannot round-trip.
    registry_json: String,
    results: crate::engine::StoredResults,
    clock: Timestamp,
    lanes: &'a Lanes,
    last_seq: Option<u64>,
    positions: &'a BTreeMap<String, i64>,
}

/// The engine's state copied at one input position, to be encoded on
/// another thread: copying is a few memory copies (cards are plain
/// 64-byte records), encoding walks every field. A snapshot's cut takes
/// the copy and its commit encodes it, so the inputs wait only for the
/// copy. Field for field what [`StateRef`] borrows, so
/// [`SnapshotCopy::encode`] gives exactly [`Engine::snapshot`]'s bytes;
/// also what a snapshot decodes into.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotCopy {
    config: EngineConfig,
    shards: Vec<Shard>,
    deduper: Deduper,
    registry_json: String,
    results: crate::engine::StoredResults,
    clock: Timestamp,
    lanes: Lanes,
    last_seq: Option<u64>,
    positions: BTreeMap<String, i64>,
    /// The registry's names of plans and tags, and the disabled
    /// attribute names, for
    /// [`SnapshotCopy::card_views`]. Not encoded (the registry's JSON
    /// holds them): a decoded copy has none.
    #[serde(skip)]
    plan_ids: Vec<Option<PlanId>>,
    #[serde(skip)]
    tag_names: Vec<Option<TagId>>,
    #[serde(skip)]
    hidden_attributes: std::collections::BTreeSet<String>,
}

/// What a snapshot header says, without decoding the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// Format version.
    pub version: u32,
    /// Payload length in bytes.
    pub payload_len: u64,
    /// CRC-32 of the payload.
    pub crc32: u32,
}

/// Why snapshot bytes cannot be restored. Every variant is about the
/// bytes given (a damaged file or one of another build), none a bug.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// The bytes do not start with [`SNAPSHOT_MAGIC`] and a full header.
    #[error("not a flowcap snapshot (bad magic or short header)")]
    BadMagic,
    /// The payload is shorter or longer than its header says.
    #[error("truncated: payload has {actual} bytes, header says {expected}")]
    Truncated {
        /// Length the header gives.
        expected: u64,
        /// Length found.
        actual: u64,
    },
    /// The payload's CRC-32 does not match the header's.
    #[error("checksum mismatch (corrupt file)")]
    Checksum,
    /// Written in a format version this build does not read (no migration
    /// exists: the layout is `bincode` of the state, see docs/DECISIONS.md,
    /// "The resume rule").
    #[error(
        "format version {found}, this build reads version {readable} only ({})",
        if *found < *readable { "written by an older flowcap" } else { "written by a newer flowcap" }
    )]
    Version {
        /// The file's version.
        found: u32,
        /// [`SNAPSHOT_VERSION`].
        readable: u32,
    },
    /// The checksum holds but the state does not decode (a bug of the
    /// build that wrote it, or the same version number reused for two
    /// layouts).
    #[error("payload does not decode: {0}")]
    Payload(String),
}

/// Reads and checks a snapshot's header and checksum.
pub fn check(bytes: &[u8]) -> Result<SnapshotHeader, SnapshotError> {
    if bytes.len() < HEADER_LEN || &bytes[..8] != SNAPSHOT_MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    let word = |at: usize| -> [u8; 4] { [bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]] };
    let version = u32::from_le_bytes(word(8));
    let payload_len = u64::from_le_bytes({
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[12..20]);
        b
    });
    let crc32 = u32::from_le_bytes(word(20));
    if version != SNAPSHOT_VERSION {
        return Err(SnapshotError::Version {
            found: version,
            readable: SNAPSHOT_VERSION,
        });
    }
    let payload = &bytes[HEADER_LEN..];
    if payload.len() as u64 != payload_len {
        return Err(SnapshotError::Truncated {
            expected: payload_len,
            actual: payload.len() as u64,
        });
    }
    if crc32fast::hash(payload) != crc32 {
        return Err(SnapshotError::Checksum);
    }
    Ok(SnapshotHeader {
        version,
        payload_len,
        crc32,
    })
}

impl SnapshotCopy {
    /// Serializes the copy (versioned, checksummed), as
    /// [`Engine::snapshot`] would have at the copy's position.
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    /// Every card's view at the copy's position, ordered by ICCID: what
    /// [`Engine::card_views`] gave then. Building them takes about as long
    /// as the copy itself (~0.6 µs a card), so a snapshot's cut builds
    /// them here, off the inputs' path. A copy decoded from a snapshot has
    /// no plan or tag names.
    pub fn card_views(&self) -> Vec<CardView> {
        card_views(
            &self.shards,
            &self.plan_ids,
            &self.tag_names,
            &self.hidden_attributes,
        )
    }
}

/// Frames the state: magic, version, length, CRC-32, bincode payload.
fn encode(state: &impl Serialize) -> Vec<u8> {
    // Serializing plain in-memory data into a Vec cannot fail; an error
    // here would be a bug in a Serialize impl, reported as an empty payload
    // that `restore` then rejects.
    let payload = bincode::serialize(state).unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(SNAPSHOT_MAGIC);
    out.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

impl Engine {
    /// Serializes the complete state (versioned, checksummed).
    pub fn snapshot(&self) -> Vec<u8> {
        encode(&StateRef {
            config: &self.config,
            shards: &self.shards,
            deduper: &self.deduper,
            registry_json: serde_json::to_string(&self.registry).unwrap_or_default(),
            results: self.registry.results.to_stored(),
            clock: self.clock,
            lanes: &self.lanes,
            last_seq: self.last_seq,
            positions: &self.positions,
        })
    }

    /// Copies the complete state for [`SnapshotCopy::encode`] elsewhere.
    pub fn snapshot_copy(&self) -> SnapshotCopy {
        SnapshotCopy {
            config: self.config.clone(),
            shards: self.shards.clone(),
            deduper: self.deduper.clone(),
            registry_json: serde_json::to_string(&self.registry).unwrap_or_default(),
            results: self.registry.results.to_stored(),
            clock: self.clock,
            lanes: self.lanes.clone(),
            last_seq: self.last_seq,
            positions: self.positions.clone(),
            plan_ids: self.registry.plan_ids.clone(),
            tag_names: self.registry.tag_names.clone(),
            hidden_attributes: self.registry.disabled_attributes.clone(),
        }
    }

    /// Copies the state ([`Engine::snapshot_copy`]) and starts making the
    /// dedupe id store durable through the last input processed, without
    /// waiting for it: publish the copy's bytes only once the returned
    /// [`Durability`] has settled without error. The engine may go on
    /// processing meanwhile (a snapshot's commit then overlaps the next
    /// inputs).
    pub fn snapshot_durable_later(&mut self) -> Result<(SnapshotCopy, Durability), EngineError> {
        let durability = match self.last_seq {
            Some(seq) => self
                .id_store
                .durable_through_later(seq)
                .map_err(crate::dedupe::DedupeError::from)?,
            None => Durability::settled(),
        };
        Ok((self.snapshot_copy(), durability))
    }

    /// Rebuilds an engine from [`Engine::snapshot`] bytes. `id_store` must be
    /// the dedupe store the original used; entries it holds after the
    /// snapshot's last input are made invisible here, because those records
    /// will be replayed and must not look like duplicates.
    pub fn restore(bytes: &[u8], mut id_store: Box<dyn IdStore>) -> Result<Engine, EngineError> {
        check(bytes)?;
        let state: SnapshotCopy = bincode::deserialize(&bytes[HEADER_LEN..])
            .map_err(|e| SnapshotError::Payload(e.to_string()))?;
        let mut registry: Registry = serde_json::from_str(&state.registry_json)
            .map_err(|e| SnapshotError::Payload(format!("registry: {e}")))?;
        if let Some(seq) = state.last_seq {
            id_store
                .truncate_after(seq)
                .map_err(crate::dedupe::DedupeError::from)?;
        }
        registry.results = crate::engine::CommandResults::from_stored(state.results);
        let mut shards = state.shards;
        let cards: usize = shards.iter().map(|s| s.cards.len()).sum();
        let mut directory = crate::directory::Directory::with_capacity(cards);
        for (s, shard) in shards.iter_mut().enumerate() {
            shard.rebuild_indexes();
            for slot in shard.live_slots() {
                let iccid = shard.cards[slot as usize].iccid;
                directory.insert(
                    iccid,
                    Loc {
                        shard: s as u32,
                        slot,
                    },
                );
            }
        }
        let mut engine = Engine {
            config: state.config,
            shards,
            directory,
            deduper: state.deduper,
            id_store,
            registry,
            clock: state.clock,
            lanes: state.lanes,
            last_seq: state.last_seq,
            positions: state.positions,
        };
        engine.push_rules();
        Ok(engine)
    }
}
