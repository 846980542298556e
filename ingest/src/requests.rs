//! Requests from outside the pipeline (the operator API): reads of live
//! state, and in the embedded mode commands.
//!
//! The shards own the cards and nothing reads them concurrently, so a
//! read is not served from another thread: it waits in a bounded channel
//! and the driver answers it between two inputs. When one is waiting, the
//! driver takes every shard home as a command does (each worker finishes
//! its queue), and answers every waiting read from the whole engine: the
//! state after every input up to [`Position::seq`] and none after, the
//! position the answer names. The next record lends the shards out again.
//! Reads that arrive together share one recall; with none waiting, the
//! poll is one atomic load per input. A full channel is the caller's to
//! answer (busy), so the API never queues unbounded work on the driver.
//!
//! A command from the API must be ordered and replayed like one from the
//! inputs. The Kafka mode produces it to the commands topic and never sends
//! it here. The embedded mode numbers inputs by their place in the files
//! (or the generator), so a command cannot be slipped between two of them;
//! it takes API commands once its inputs are read, while it lingers
//! ([`crate::embedded::EmbeddedOptions::linger`]): each is the next input,
//! journaled like any other, and answered once a snapshot covering it is
//! durable, so an answered command survives a crash.
//!
//! The channel also carries, the other way, how much of the events file
//! a committed snapshot covers ([`DurableEvents`]): the API serves past
//! action events from that file up to there and no further, because only
//! that much never changes (a restart cuts the file back to its snapshot's
//! length, and the replay may interleave different cards' events in
//! another order).

use std::sync::{Arc, Mutex};

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use flowcap_engine::{Command, CommandResult, Engine, ShardedEngine};
use serde::Serialize;

/// Where in the input sequence an answer was taken: every input up to and
/// including `seq` applied, none after (`None`: no input yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Position {
    /// The sequence number of the last input applied.
    pub seq: Option<u64>,
}

/// A read: called on the driver's thread with the whole engine.
pub type Read = Box<dyn FnOnce(&Engine, Position) + Send>;

/// The answer to a command sent through [`Request::Command`].
pub type Reply = Box<dyn FnOnce(Result<Applied, String>) + Send>;

/// A command applied: its result (the first one, for a repeated id) and
/// its input sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The result.
    pub result: CommandResult,
    /// The command's place in the input sequence.
    pub seq: u64,
}

/// One request to the driver.
pub enum Request {
    /// Answer from live state.
    Read(Read),
    /// Apply a command (embedded mode, lingering); refused with the
    /// reason otherwise.
    Command {
        /// The command, its operator already set.
        command: Box<Command>,
        /// Called with the outcome.
        reply: Reply,
    },
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Request::Read(_) => f.write_str("Read"),
            Request::Command { command, .. } => write!(f, "Command({})", command.id),
        }
    }
}

/// The events file as far as the newest committed snapshot covers it:
/// bytes before `bytes` are never rewritten, so an offset there is a
/// position a reader can resume from, across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurableEvents {
    /// The file's length the snapshot recorded.
    pub bytes: u64,
    /// The last input the snapshot covers.
    pub seq: u64,
}

/// Where the pipeline publishes [`DurableEvents`] after each commit (and
/// at its start, from the snapshot it restored), for the API to read.
#[derive(Debug, Clone, Default)]
pub struct DurableMark(Arc<Mutex<Option<DurableEvents>>>);

impl DurableMark {
    /// The newest committed extent; `None` before the first snapshot.
    pub fn get(&self) -> Option<DurableEvents> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes `events` (a later snapshot's).
    pub fn set(&self, events: DurableEvents) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(events);
    }
}

/// The driver's end of the channel.
#[derive(Debug, Clone)]
pub struct Requests {
    rx: Receiver<Request>,
    durable: DurableMark,
}

/// The API's end of the channel.
#[derive(Debug, Clone)]
pub struct RequestSender {
    tx: Sender<Request>,
    durable: DurableMark,
}

/// The channel is full (or no driver will read it): the request is given
/// back.
#[derive(Debug)]
pub struct Busy(pub Request);

impl RequestSender {
    /// Queues `request` without waiting.
    pub fn try_send(&self, request: Request) -> Result<(), Busy> {
        self.tx.try_send(request).map_err(|e| match e {
            TrySendError::Full(r) | TrySendError::Disconnected(r) => Busy(r),
        })
    }

    /// How much of the events file a committed snapshot covers.
    pub fn durable_events(&self) -> Option<DurableEvents> {
        self.durable.get()
    }
}

/// A channel holding at most `capacity` waiting requests.
pub fn channel(capacity: usize) -> (RequestSender, Requests) {
    let (tx, rx) = bounded(capacity.max(1));
    let durable = DurableMark::default();
    (
        RequestSender {
            tx,
            durable: durable.clone(),
        },
        Requests { rx, durable },
    )
}

/// Why a command is refused while inputs are read.
pub(crate) const NOT_NOW: &str = "this pipeline takes commands from its inputs; \
     through the API only once its inputs are read (embedded mode with --linger)";

impl Requests {
    /// Where the pipeline answering these requests publishes how much of
    /// its events file is durable (`flowcap serve` sets it once, from the
    /// snapshot it serves).
    pub fn durable_mark(&self) -> &DurableMark {
        &self.durable
    }

    /// Answers every waiting request from `sharded` at `at`: reads from the
    /// engine with every shard home, commands refused with `refuse`.
    /// Nothing waiting costs one atomic load.
    pub(crate) fn serve_waiting(&self, sharded: &mut ShardedEngine, at: Position, refuse: &str) {
        if self.rx.is_empty() {
            return;
        }
        let waiting: Vec<Request> = self.rx.try_iter().collect();
        let mut reads = Vec::with_capacity(waiting.len());
        for request in waiting {
            match request {
                Request::Read(read) => reads.push(read),
                Request::Command { reply, .. } => reply(Err(refuse.to_owned())),
            }
        }
        if !reads.is_empty() {
            let engine = &*sharded.engine();
            for read in reads {
                read(engine, at);
            }
        }
    }

    /// Answers every request from `engine` (a snapshot's, read-only) at
    /// `at` until every sender is gone: reads from it, commands refused
    /// with `refuse`.
    pub fn serve_read_only(&self, engine: &Engine, at: Position, refuse: &str) {
        while let Ok(request) = self.rx.recv() {
            match request {
                Request::Read(read) => read(engine, at),
                Request::Command { reply, .. } => reply(Err(refuse.to_owned())),
            }
        }
    }

    /// The next request, waiting at most `timeout`.
    pub(crate) fn next(&self, timeout: std::time::Duration) -> Option<Request> {
        self.rx.recv_timeout(timeout).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowcap_engine::EngineConfig;
    use std::sync::mpsc;

    #[test]
    fn reads_are_answered_at_the_position_and_commands_refused() {
        let (sharded, _outputs) = ShardedEngine::start(Engine::new(EngineConfig::default()), 4);
        let mut sharded = sharded;
        let (tx, requests) = channel(4);
        let (answer_tx, answers) = mpsc::channel();
        let a = answer_tx.clone();
        tx.try_send(Request::Read(Box::new(move |engine, at| {
            a.send(format!("{} cards at {:?}", engine.card_count(), at.seq))
                .unwrap();
        })))
        .unwrap();
        let command = flowcap_engine::command::parse_command(
            br#"{"id":"s1","at":"2026-11-01T00:00:00+08:00","type":"suspend","iccids":["89860000000000000001"]}"#,
        )
        .unwrap();
        tx.try_send(Request::Command {
            command: Box::new(command),
            reply: Box::new(move |r| answer_tx.send(format!("{r:?}")).unwrap()),
        })
        .unwrap();
        requests.serve_waiting(&mut sharded, Position { seq: Some(7) }, NOT_NOW);
        let mut got = [answers.recv().unwrap(), answers.recv().unwrap()];
        got.sort();
        assert_eq!(got[0], "0 cards at Some(7)");
        assert!(got[1].contains("once its inputs are read"), "{got:?}");
        // Nothing waiting: nothing answered, nothing recalled.
        requests.serve_waiting(&mut sharded, Position { seq: Some(8) }, NOT_NOW);
        assert!(answers.try_recv().is_err());
    }

    #[test]
    fn a_full_channel_gives_the_request_back() {
        let (tx, _requests) = channel(1);
        tx.try_send(Request::Read(Box::new(|_, _| {}))).unwrap();
        assert!(matches!(
            tx.try_send(Request::Read(Box::new(|_, _| {}))),
            Err(Busy(Request::Read(_)))
        ));
    }
}
