//! Dead letters and command results once per input, across replays.
//!
//! A restart replays the inputs after its snapshot, and the replay produces
//! their outputs again. Actions repeat with the same event ids (consumers
//! dedupe by id), but the dead-letter and command-result topics are
//! counted: a bad input must be there once. So each of their messages
//! carries its input's sequence number ([`SEQ_HEADER`]; the order log makes
//! sequence numbers the same in every replay), and a start reads back what
//! those topics got since the snapshot: a replayed input whose letter or
//! result is already there is not produced again.
//!
//! Where to read back from: each snapshot records, per partition of those
//! topics, an offset below which no output of an input after its cut can
//! be ([`KafkaProducer::cut_marks`]): the offset after the last message
//! acknowledged before the cut (a message sent after the cut is appended
//! after it), lowered to the oldest message read back at start that is
//! still to be replayed. Without a snapshot (a first run that crashed
//! before its first one) the read starts at the topics' ends as the first
//! start found them, kept in [`START_FILE`]; so do `--fresh` starts,
//! which write it again, and outputs of an earlier run in the same topics
//! are never taken for this one's.
//!
//! The topic is the truth, so the count is exact whatever the crash hit:
//! an output the broker acknowledged is found, one it never stored is
//! produced by the replay. The one gap: a message the broker appends after
//! the restart has read the topic's end (a produce request of the killed
//! process still in the broker's hands) is not seen and is produced again.
//!
//! [`KafkaProducer::cut_marks`]: super::KafkaProducer::cut_marks

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::{high_watermarks, partition_count, Cursor, KafkaRunError};
use crate::pipeline::Start;

/// The header holding a side output's input sequence number (decimal).
pub(crate) const SEQ_HEADER: &str = "flowcap.seq";

/// The header holding a result page's number (decimal), on pages after
/// the first; a message without it is page 0.
pub(crate) const PAGE_HEADER: &str = "flowcap.page";

/// One side output: its input's sequence number and, for a command result
/// of several pages, which page. An input has at most one output per
/// side topic and page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct SideOutput {
    /// The input's sequence number.
    pub(crate) seq: u64,
    /// The page, from 0.
    pub(crate) page: u32,
}

impl SideOutput {
    /// The only (first) output of input `seq`.
    pub(crate) fn of(seq: u64) -> SideOutput {
        SideOutput { seq, page: 0 }
    }

    /// Page `page` of input `seq`'s output.
    pub(crate) fn page(seq: u64, page: u32) -> SideOutput {
        SideOutput { seq, page }
    }
}

/// Where the first start (or a `--fresh` one) found the side topics' ends.
const START_FILE: &str = "produced-start.json";

/// The snapshot position of a side topic's partition: where a restart
/// reads it back from.
fn position_key(topic: &str, partition: i32) -> String {
    format!("produced.{topic}.{partition}")
}

/// A partition of a side topic.
pub(crate) type Partition = (String, i32);

/// What the side topics already hold of the inputs still to be replayed,
/// and where their ends were at start.
#[derive(Debug, Default)]
pub(crate) struct Produced {
    /// Per side topic: output (input sequence number and page) ->
    /// (partition, offset) of its message.
    held: BTreeMap<String, HashMap<SideOutput, (i32, i64)>>,
    /// Every partition of the side topics with its end at start: what this
    /// process sends lands at or after it.
    ends: BTreeMap<Partition, i64>,
}

impl Produced {
    /// Nothing held, for `topics` at the ends given.
    pub(crate) fn empty(ends: BTreeMap<Partition, i64>) -> Produced {
        Produced {
            held: BTreeMap::new(),
            ends,
        }
    }

    /// True when `topic` already holds `output` (which is then forgotten:
    /// an input has one output per side topic and page).
    pub(crate) fn take(&mut self, topic: &str, output: SideOutput) -> bool {
        self.held
            .get_mut(topic)
            .is_some_and(|held| held.remove(&output).is_some())
    }

    /// How many outputs are held, not yet met by the replay.
    pub(crate) fn len(&self) -> usize {
        self.held.values().map(HashMap::len).sum()
    }

    /// The side topics' partitions with their ends at start.
    pub(crate) fn ends(&self) -> &BTreeMap<Partition, i64> {
        &self.ends
    }

    /// At a cut through input `last_seq`: forgets what the replay can no
    /// longer meet, and returns per partition the offset of the oldest
    /// output still held (a later restart must read back from there).
    pub(crate) fn cut(&mut self, last_seq: u64) -> BTreeMap<Partition, i64> {
        let mut oldest: BTreeMap<Partition, i64> = BTreeMap::new();
        for (topic, held) in &mut self.held {
            held.retain(|output, _| output.seq > last_seq);
            for (partition, offset) in held.values() {
                let at = oldest.entry((topic.clone(), *partition)).or_insert(*offset);
                *at = (*at).min(*offset);
            }
        }
        oldest
    }

    fn hold(&mut self, topic: &str, output: SideOutput, partition: i32, offset: i64) {
        self.held
            .entry(topic.to_owned())
            .or_default()
            .insert(output, (partition, offset));
    }
}

/// The positions a snapshot records for `marks` (see the module docs).
pub(crate) fn positions(marks: &BTreeMap<Partition, i64>) -> BTreeMap<String, u64> {
    marks
        .iter()
        .map(|((topic, partition), offset)| {
            (
                position_key(topic, *partition),
                u64::try_from(*offset).unwrap_or(0),
            )
        })
        .collect()
}

/// Reads back what `topics` hold of the inputs after the restored snapshot
/// (its positions, `restored`; `None` without one). [`Start::Fresh`]: a
/// start over, which reads nothing and records the current ends as the
/// start. `None` when `stop` is set first: the start must not go on
/// without knowing.
pub(super) fn read_back(
    config: &ClientConfig,
    meta: &BaseConsumer,
    dir: &Path,
    restored: Option<&BTreeMap<String, i64>>,
    topics: &[&str],
    mode: Start,
    stop: &AtomicBool,
) -> Result<Option<Produced>, KafkaRunError> {
    let mut cursors = Vec::new();
    for topic in topics {
        for p in 0..partition_count(meta, topic)? {
            let partition = i32::try_from(p).unwrap_or(i32::MAX);
            cursors.push(Cursor::new(topic, partition, false));
        }
    }
    let ends = loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(None);
        }
        match high_watermarks(meta, &cursors, Duration::from_secs(10)) {
            Ok(highs) => break highs,
            Err(e) => tracing::warn!(error = %e, "side topics' ends unavailable; retrying"),
        }
    };
    let ends: BTreeMap<Partition, i64> = cursors
        .iter()
        .zip(ends)
        .map(|(c, end)| ((c.topic.clone(), c.partition), end))
        .collect();
    let start_file = dir.join(START_FILE);
    let from: BTreeMap<Partition, i64> = match restored {
        Some(restored) => ends
            .iter()
            .map(|(p, end)| {
                // A snapshot of an older build records nothing: read
                // nothing (its replay may repeat outputs, as it did).
                let from = restored.get(&position_key(&p.0, p.1)).copied();
                (p.clone(), from.unwrap_or(*end))
            })
            .collect(),
        None => match read_start(&start_file)? {
            Some(start) if mode == Start::Resume => ends
                .keys()
                .map(|p| {
                    // A partition added since: all of it is this run's.
                    let from = start.get(&position_key(&p.0, p.1)).copied().unwrap_or(0);
                    (p.clone(), i64::try_from(from).unwrap_or(i64::MAX))
                })
                .collect(),
            _ => {
                write_start(&start_file, &positions(&ends))?;
                ends.clone()
            }
        },
    };
    let mut produced = Produced::empty(ends);
    let mut tpl = TopicPartitionList::new();
    let mut left = BTreeMap::new();
    for (p, end) in produced.ends() {
        let from = from.get(p).copied().unwrap_or(*end);
        if from < *end {
            tpl.add_partition_offset(&p.0, p.1, Offset::Offset(from))?;
            left.insert(p.clone(), *end);
        }
    }
    if left.is_empty() {
        return Ok(Some(produced));
    }
    let mut reader = config.clone();
    reader.set("enable.partition.eof", "true");
    // Never joined nor committed: librdkafka wants a group for positions.
    reader.set("group.id", "flowcap-read-back");
    let consumer: BaseConsumer = reader.create()?;
    consumer.assign(&tpl)?;
    let (started, mut reported) = (Instant::now(), Instant::now());
    while !left.is_empty() {
        if stop.load(Ordering::SeqCst) {
            return Ok(None);
        }
        if reported.elapsed() >= Duration::from_secs(5) {
            reported = Instant::now();
            tracing::info!(
                partitions = left.len(),
                held = produced.len(),
                "reading back the side topics"
            );
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(m)) => {
                let header = |name: &str| -> Option<u64> {
                    let h = m.headers()?.iter().find(|h| h.key == name)?;
                    std::str::from_utf8(h.value?).ok()?.parse().ok()
                };
                if let Some(seq) = header(SEQ_HEADER) {
                    let page = header(PAGE_HEADER).unwrap_or(0);
                    let page = u32::try_from(page).unwrap_or(u32::MAX);
                    let output = SideOutput::page(seq, page);
                    produced.hold(m.topic(), output, m.partition(), m.offset());
                }
                let p = (m.topic().to_owned(), m.partition());
                if left.get(&p).is_some_and(|end| m.offset() + 1 >= *end) {
                    left.remove(&p);
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => {
                // The end of a partition (the event names no topic): done
                // are those read to their end, past any offsets without a
                // message (transaction markers, compaction).
                let position = consumer.position()?;
                left.retain(|(topic, p), end| {
                    position
                        .find_partition(topic, *p)
                        .and_then(|e| e.offset().to_raw())
                        .is_none_or(|at| at < *end)
                });
            }
            Some(Err(e)) => tracing::warn!(error = %e, "reading back the side topics"),
        }
    }
    tracing::info!(
        held = produced.len(),
        ms = started.elapsed().as_millis() as u64,
        "side topics read back: their outputs are not produced again"
    );
    Ok(Some(produced))
}

fn read_start(path: &Path) -> Result<Option<BTreeMap<String, u64>>, KafkaRunError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            KafkaRunError::OrderLog(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(KafkaRunError::OrderLog(e)),
    }
}

/// Written atomically (tmp, fsync, rename, fsync the directory) before
/// anything is produced.
fn write_start(path: &Path, start: &BTreeMap<String, u64>) -> Result<(), KafkaRunError> {
    let write = || -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&serde_json::to_vec(start).map_err(std::io::Error::other)?)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(KafkaRunError::OrderLog)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_output_is_taken_once_and_a_cut_keeps_the_oldest_still_to_meet() {
        let mut produced = Produced::empty(BTreeMap::new());
        produced.hold("dlq", SideOutput::of(10), 0, 100);
        produced.hold("dlq", SideOutput::of(12), 0, 90);
        produced.hold("dlq", SideOutput::of(15), 1, 7);
        produced.hold("results", SideOutput::of(12), 0, 3);
        assert!(produced.take("dlq", SideOutput::of(12)));
        assert!(!produced.take("dlq", SideOutput::of(12)), "taken twice");
        assert!(
            !produced.take("results", SideOutput::of(10)),
            "another topic's"
        );
        assert!(produced.take("results", SideOutput::of(12)));
        // Input 10 is covered by the cut: the replay will not meet it.
        let oldest = produced.cut(11);
        assert_eq!(
            oldest,
            BTreeMap::from([(("dlq".to_owned(), 1), 7)]),
            "only input 15 is still to meet"
        );
        assert_eq!(produced.len(), 1);
        assert_eq!(
            positions(&oldest),
            BTreeMap::from([("produced.dlq.1".to_owned(), 7)])
        );
    }
}
