//! The API's side of [`flowcap_ingest::requests`]: a read or a command is
//! queued for the driver and awaited, within a time limit; a full queue
//! or a driver that does not answer is 503 with `Retry-After`.
//!
//! Commands go where the mode orders its commands: the embedded driver
//! applies them itself (once its inputs are read); in Kafka mode they are
//! produced to the commands topic, and the answer is the engine's result
//! for the command once the driver has processed it (read back as any
//! state is), or 202 when that takes longer than the wait. A command the
//! topic did not take (its delivery report says so, which a flush alone
//! does not) is refused with 503 at once: waiting for its result would
//! never end.

use std::time::{Duration, Instant};

use flowcap_engine::{Command, CommandResult, Engine};
use flowcap_ingest::requests::{DurableEvents, Position, Request, RequestSender};
use std::sync::Arc;

use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};

use super::problem::Problem;

/// How often a Kafka command's result is looked for.
const RESULT_POLL: Duration = Duration::from_millis(20);

/// The API's producer: each command carries the channel its delivery
/// report is sent on.
pub(crate) type CommandProducer = BaseProducer<Reports>;

/// Delivery reports of [`CommandProducer`], to the command's sender.
pub(crate) struct Reports;

impl rdkafka::ClientContext for Reports {}

impl ProducerContext for Reports {
    type DeliveryOpaque = Box<std::sync::mpsc::Sender<Result<(), String>>>;

    fn delivery(&self, result: &DeliveryResult<'_>, report: Self::DeliveryOpaque) {
        let _ = report.send(result.as_ref().map(drop).map_err(|(e, _)| e.to_string()));
    }
}

/// Where commands go.
pub(crate) enum Submit {
    /// To the embedded driver.
    Embedded,
    /// To the commands topic.
    Kafka {
        producer: Arc<CommandProducer>,
        topic: String,
    },
}

/// A command's outcome as the API answers it.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    /// Applied (or answered as a repeat) at this input.
    Done {
        result: CommandResult,
        seq: Option<u64>,
    },
    /// Accepted into the commands topic; its result is not known yet.
    Pending,
}

/// The channel to the driver and how long to wait for it.
pub(crate) struct Live {
    tx: RequestSender,
    wait: Duration,
    submit: Submit,
}

impl Live {
    pub(crate) fn new(tx: RequestSender, wait: Duration, submit: Submit) -> Live {
        Live { tx, wait, submit }
    }

    /// `read` run on the driver's thread with the whole engine, and the
    /// position it saw.
    pub(crate) async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Engine) -> T + Send + 'static,
    ) -> Result<(T, Position), Problem> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Request::Read(Box::new(move |engine, at| {
            let _ = tx.send((read(engine), at));
        })))?;
        self.answer(rx).await
    }

    /// Orders `command` as the mode orders commands, and waits for its
    /// result.
    pub(crate) async fn command(&self, command: Command) -> Result<Outcome, Problem> {
        match &self.submit {
            Submit::Embedded => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                self.send(Request::Command {
                    command: Box::new(command),
                    reply: Box::new(move |r| {
                        let _ = tx.send(r);
                    }),
                })?;
                match self.answer(rx).await? {
                    Ok(applied) => Ok(Outcome::Done {
                        result: applied.result,
                        seq: Some(applied.seq),
                    }),
                    Err(why) => Err(Problem::new(
                        axum::http::StatusCode::CONFLICT,
                        "not_now",
                        why,
                    )),
                }
            }
            Submit::Kafka { producer, topic } => {
                let payload = serde_json::to_vec(&command).map_err(|e| {
                    Problem::new(
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        "internal",
                        format!("encoding the command: {e}"),
                    )
                })?;
                let (producer, topic, wait) = (Arc::clone(producer), topic.clone(), self.wait);
                let key = command.id.to_string();
                let sent = tokio::task::spawn_blocking(move || {
                    let (report, delivered) = std::sync::mpsc::channel();
                    producer
                        .send(
                            BaseRecord::with_opaque_to(&topic, Box::new(report))
                                .key(&key)
                                .payload(&payload),
                        )
                        .map_err(|(e, _)| e.to_string())?;
                    producer.flush(wait).map_err(|e| e.to_string())?;
                    // Flushed: the report has been called, with an error
                    // too (a flush succeeds once nothing is queued).
                    delivered
                        .try_recv()
                        .map_err(|_| "no delivery report".to_owned())
                        .and_then(|r| r)
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r);
                if let Err(e) = sent {
                    return Err(Problem::busy(
                        format!("the commands topic did not take it: {e}"),
                        1,
                    ));
                }
                self.result(command, self.wait).await
            }
        }
    }

    /// The engine's result for `command` (a command sent before), looked
    /// for until `wait` has passed.
    pub(crate) async fn result(
        &self,
        command: Command,
        wait: Duration,
    ) -> Result<Outcome, Problem> {
        let deadline = Instant::now() + wait;
        loop {
            let probe = command.clone();
            let (result, at) = self
                .read(move |engine| engine.command_result(&probe))
                .await?;
            if let Some(result) = result {
                return Ok(Outcome::Done {
                    result,
                    seq: at.seq,
                });
            }
            if Instant::now() >= deadline {
                return Ok(Outcome::Pending);
            }
            tokio::time::sleep(RESULT_POLL).await;
        }
    }

    /// How much of the events file a committed snapshot covers.
    pub(crate) fn durable_events(&self) -> Option<DurableEvents> {
        self.tx.durable_events()
    }

    fn send(&self, request: Request) -> Result<(), Problem> {
        self.tx
            .try_send(request)
            .map_err(|_| Problem::busy("the pipeline has as many requests waiting as it takes", 1))
    }

    async fn answer<T>(&self, rx: tokio::sync::oneshot::Receiver<T>) -> Result<T, Problem> {
        match tokio::time::timeout(self.wait, rx).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(Problem::busy("the pipeline stopped before answering", 1)),
            Err(_) => Err(Problem::busy(
                format!(
                    "the pipeline did not answer within {} s (starting, or a snapshot)",
                    self.wait.as_secs()
                ),
                1,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowcap_engine::command::parse_command;
    use flowcap_engine::EngineConfig;
    use rdkafka::ClientConfig;

    /// A producer whose messages cannot be delivered: nothing listens at
    /// its bootstrap address and it gives up on a message at once.
    fn undeliverable() -> Arc<CommandProducer> {
        let producer: CommandProducer = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:9")
            .set("message.timeout.ms", "1")
            .create_with_context(Reports)
            .unwrap();
        Arc::new(producer)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_command_the_topic_did_not_take_is_refused_not_left_pending() {
        let (tx, requests) = flowcap_ingest::requests::channel(16);
        // The pipeline: answers every read, never sees the command.
        std::thread::spawn(move || {
            let engine = Engine::new(EngineConfig::default());
            requests.serve_read_only(&engine, Position { seq: Some(1) }, "read-only");
        });
        let live = Live::new(
            tx,
            Duration::from_secs(3),
            Submit::Kafka {
                producer: undeliverable(),
                topic: "flowcap.commands".into(),
            },
        );
        let command = parse_command(
            br#"{"id":"lost-1","at":"2026-11-01T00:00:00+08:00","type":"suspend","iccids":["89860000000000000001"]}"#,
        )
        .unwrap();
        match live.command(command).await {
            Err(problem) => assert_eq!(problem.code, "busy", "{problem:?}"),
            Ok(outcome) => panic!("answered {outcome:?} for a command never delivered"),
        }
    }
}
