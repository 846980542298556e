//! A partition's messages, taken from librdkafka a batch at a time.
//!
//! # Why
//!
//! rust-rdkafka's `PartitionQueue::poll` hands out one message per call
//! through librdkafka's event API, and each call reads the clock three or
//! four times (rust-rdkafka's own `Instant::now`, and librdkafka's poll
//! bookkeeping for `max.poll.interval.ms`). On this VM a clock read costs
//! enough that they were 8-9 % of the Kafka driver's time over a backlog
//! (docs/BENCHMARKS.md §8). librdkafka's `rd_kafka_consume_batch_queue`
//! takes up to [`BATCH`] messages per call with one clock read, but
//! rdkafka 0.39 does not expose it for a partition queue; this module
//! calls it on a handle of its own to the same queue.
//!
//! # Safety
//!
//! The only unsafe code of the workspace is here, kept small:
//! - [`PartitionFeed`] owns a reference to the partition's fetch queue
//!   (`rd_kafka_queue_get_partition`) and destroys it on drop, after the
//!   messages it still holds. It also keeps rust-rdkafka's split queue
//!   alive, which is what stops librdkafka from forwarding the
//!   partition's messages to the consumer's queue.
//! - A [`Fetched`] message owns its `rd_kafka_message_t` and destroys it on
//!   drop; it borrows its feed, so it cannot outlive it (nor, through the
//!   feed's split queue, the consumer).
//!
//! # Semantics kept
//!
//! What the feed holds is an extension of librdkafka's queue: messages
//! librdkafka already counts as handed to the application (its
//! application position is past them). A pause drops librdkafka's
//! prefetch and resumes after the application position, so the held
//! messages are neither lost nor fetched again, the same as the one
//! message per partition the reading logic parks (`inputs.rs`). An error
//! message (e.g. a fetch error) is logged and ends the call, as an error
//! from `poll` did.

// The workspace denies unsafe code; this module is the one exception.
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::collections::VecDeque;
use std::ffi::CString;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::time::Duration;

use rdkafka::bindings as rdsys;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, Consumer, DefaultConsumerContext};
use rdkafka::error::RDKafkaErrorCode;

/// Messages taken from librdkafka per call.
pub(super) const BATCH: usize = 256;

/// One partition's queue, read a batch at a time (see the module docs).
pub(super) struct PartitionFeed {
    /// Our reference to the partition's fetch queue.
    raw: NonNull<rdsys::rd_kafka_queue_t>,
    /// Messages taken from `raw` and not handed out yet, oldest first.
    held: RefCell<VecDeque<NonNull<rdsys::rd_kafka_message_t>>>,
    /// rust-rdkafka's handle: while it lives, the partition's messages stay
    /// on its own queue (`rd_kafka_queue_forward(.., NULL)`).
    _split: PartitionQueue<DefaultConsumerContext>,
}

impl PartitionFeed {
    /// Splits `topic`/`partition` off `consumer`'s queue; `None` when the
    /// consumer does not know the partition.
    pub(super) fn split(
        consumer: &std::sync::Arc<BaseConsumer>,
        topic: &str,
        partition: i32,
    ) -> Option<PartitionFeed> {
        let split = consumer.split_partition_queue(topic, partition)?;
        let topic = CString::new(topic).ok()?;
        // SAFETY: the client pointer is valid while `consumer` lives (it
        // does for this call); the returned handle is a new reference we
        // own and destroy in `Drop`.
        let raw = unsafe {
            rdsys::rd_kafka_queue_get_partition(
                consumer.client().native_ptr(),
                topic.as_ptr(),
                partition,
            )
        };
        Some(PartitionFeed {
            raw: NonNull::new(raw)?,
            held: RefCell::new(VecDeque::with_capacity(BATCH)),
            _split: split,
        })
    }

    /// The next message, waiting up to `timeout` when none is held or
    /// queued. `None` when none came, or when librdkafka returned an error
    /// (logged).
    pub(super) fn next(&self, timeout: Duration) -> Option<Fetched<'_>> {
        let mut held = self.held.borrow_mut();
        if held.is_empty() {
            // Take what is queued without waiting; wait only for one
            // message (the batch call waits for a full batch otherwise).
            self.take(&mut held, 0, BATCH);
            if held.is_empty() && !timeout.is_zero() {
                let ms = i32::try_from(timeout.as_millis().max(1)).unwrap_or(i32::MAX);
                self.take(&mut held, ms, 1);
            }
        }
        let message = held.pop_front()?;
        drop(held);
        let fetched = Fetched {
            message,
            _feed: PhantomData,
        };
        // SAFETY: `message` is a valid message we own (see `take`).
        let err = unsafe { message.as_ref().err };
        if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            let code: RDKafkaErrorCode = err.into();
            tracing::warn!(error = %code, offset = fetched.offset(), "consumer error");
            return None;
        }
        Some(fetched)
    }

    /// Appends up to `max` messages from librdkafka to `held`, waiting up
    /// to `timeout_ms` for them.
    fn take(
        &self,
        held: &mut VecDeque<NonNull<rdsys::rd_kafka_message_t>>,
        timeout_ms: i32,
        max: usize,
    ) {
        let mut out: [*mut rdsys::rd_kafka_message_t; BATCH] = [std::ptr::null_mut(); BATCH];
        let max = max.min(BATCH);
        // SAFETY: `raw` is our live queue reference; `out` has room for
        // `max` pointers. librdkafka hands over ownership of each message
        // it returns (we destroy them in `Fetched::drop` or `Drop`).
        let n = unsafe {
            rdsys::rd_kafka_consume_batch_queue(
                self.raw.as_ptr(),
                timeout_ms,
                out.as_mut_ptr(),
                max,
            )
        };
        // -1 is an error (only for an invalid queue): nothing taken.
        let n = usize::try_from(n).unwrap_or(0).min(max);
        held.extend(out[..n].iter().filter_map(|&m| NonNull::new(m)));
    }
}

impl Drop for PartitionFeed {
    fn drop(&mut self) {
        for message in self.held.get_mut().drain(..) {
            // SAFETY: each held message is owned by us and not handed out.
            unsafe { rdsys::rd_kafka_message_destroy(message.as_ptr()) };
        }
        // SAFETY: our own reference, destroyed once; the split queue
        // (dropped after this) and the consumer outlive it.
        unsafe { rdsys::rd_kafka_queue_destroy(self.raw.as_ptr()) };
    }
}

/// One message taken from a [`PartitionFeed`] (destroyed on drop).
pub(super) struct Fetched<'a> {
    message: NonNull<rdsys::rd_kafka_message_t>,
    _feed: PhantomData<&'a PartitionFeed>,
}

impl Fetched<'_> {
    fn raw(&self) -> &rdsys::rd_kafka_message_t {
        // SAFETY: the message is valid until `drop`.
        unsafe { self.message.as_ref() }
    }

    /// The message's offset in its partition.
    pub(super) fn offset(&self) -> i64 {
        self.raw().offset
    }

    /// The message's value (empty for a null value).
    pub(super) fn payload(&self) -> &[u8] {
        let m = self.raw();
        if m.payload.is_null() {
            return &[];
        }
        // SAFETY: librdkafka's payload of `len` bytes, alive with the
        // message (which `self` borrows).
        unsafe { std::slice::from_raw_parts(m.payload.cast::<u8>(), m.len) }
    }

    /// The message's timestamp in milliseconds (create or log-append
    /// time), when it has one.
    pub(super) fn timestamp_ms(&self) -> Option<i64> {
        let mut kind = rdsys::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
        // SAFETY: a valid message; `kind` is a valid out pointer.
        let ms = unsafe { rdsys::rd_kafka_message_timestamp(self.message.as_ptr(), &mut kind) };
        // As rust-rdkafka's `Timestamp::to_millis`: -1 is none too.
        (kind != rdsys::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE && ms != -1)
            .then_some(ms)
    }
}

impl Drop for Fetched<'_> {
    fn drop(&mut self) {
        // SAFETY: we own the message and drop it once.
        unsafe { rdsys::rd_kafka_message_destroy(self.message.as_ptr()) };
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};

    use super::PartitionFeed;

    /// A consumer of a broker that is not there: librdkafka creates the
    /// partition's queue on assignment, and nothing ever arrives.
    fn consumer() -> Arc<BaseConsumer> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:9")
            .set("group.id", "feed-test")
            .set("log_level", "0")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("t", 0, Offset::Beginning).unwrap();
        consumer.assign(&tpl).unwrap();
        Arc::new(consumer)
    }

    /// The handles are taken and given back without a broker (the Kafka
    /// tests in `flowcap/tests/kafka.rs` read real messages through it);
    /// an empty queue answers `None` at once, or after the timeout when
    /// one is given, never sooner.
    #[test]
    fn an_empty_partition_feed_waits_out_its_timeout() {
        let consumer = consumer();
        let feed = PartitionFeed::split(&consumer, "t", 0).expect("an assigned partition");
        assert!(feed.next(Duration::ZERO).is_none());
        let started = Instant::now();
        assert!(feed.next(Duration::from_millis(30)).is_none());
        assert!(started.elapsed() >= Duration::from_millis(25));
        drop(feed);
        // Once given back, the partition can be split again.
        assert!(PartitionFeed::split(&consumer, "t", 0).is_some());
    }
}
