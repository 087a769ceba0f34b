//! A producer task's Kafka side: batching per partition, Produce requests pipelined to each
//! partition's leader, and the publish latency of every message when its batch is acknowledged.
//!
//! Owns: one open RecordBatch v2 per partition (built with `ringlog::record::builder`,
//! uncompressed), sealed when it reaches `batch_bytes`; requests carrying the first ready batch of
//! every partition a leader has (full, lingered `linger`, or anything when flushing), at most
//! [`IN_FLIGHT_PER_CONNECTION_MAX`] per connection; and backpressure, waiting for
//! acknowledgements once [`BUFFER_BYTES_MAX`] of messages are unacknowledged. The same limits as
//! the native client's defaults, so the two protocols are compared like for like.
//!
//! Everything runs in the producer's task, with no locks: the connections' reader tasks only pass
//! response frames over a channel. Per message nothing is allocated: the value is encoded into its
//! batch, and its intended send time and size join its partition's queue of unacknowledged
//! messages; a partition's batches are acknowledged in order (one connection per leader answers
//! in order), so each acknowledgement settles the oldest messages of its partitions.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::produce_response::PartitionProduceResponse;
use kafka_protocol::messages::{ProduceRequest, TopicName};
use kafka_protocol::protocol::StrBytes;
use ringlog::record::builder::BatchBuilder;
use tokio::sync::mpsc;

use super::cluster::{Layout, REQUEST_TIMEOUT};
use super::connection::{Connection, Response, Responses};
use super::{describe, KafkaError, Result};
use crate::rate::PreciseSleep;
use crate::stats::Recorder;

/// Produce requests awaiting their response, per connection (Kafka's
/// `max.in.flight.requests.per.connection` default, and the native client's).
pub const IN_FLIGHT_PER_CONNECTION_MAX: usize = 5;
/// A request stops taking batches once it carries this many bytes (so it is at most this plus one
/// batch): brokers refuse frames past a limit (ringlog's `frame_bytes_max`, 16 MiB by default).
const REQUEST_BYTES_MAX: usize = 4 << 20;
/// Message bytes accepted and not yet acknowledged; sending waits beyond it (as the native
/// client's `buffer_bytes`).
pub const BUFFER_BYTES_MAX: usize = 64 << 20;
/// Upper bound on a record's framing next to its key and value (as the native client counts it).
const RECORD_OVERHEAD_BYTES_MAX: usize = 32;
/// A batch's first allocation; later ones start at the size the partition's last batch reached.
const BATCH_INITIAL_BYTES: usize = 16 << 10;

const ACKS_NONE: i16 = 0;

#[derive(Debug, Clone, Copy)]
pub struct ProducerSettings {
    /// 0, 1 or -1 (all).
    pub acks: i16,
    pub linger: Duration,
    pub batch_bytes: usize,
}

struct OpenBatch {
    builder: BatchBuilder,
    opened: Instant,
    messages: u32,
    buffer_bytes: usize,
}

struct SealedBatch {
    bytes: Bytes,
    messages: u32,
    buffer_bytes: usize,
}

/// A batch in a request awaiting its response.
#[derive(Debug, Clone, Copy)]
struct BatchInFlight {
    partition: u32,
    /// Its position in the request.
    position: usize,
    messages: u32,
    buffer_bytes: usize,
}

#[derive(Default)]
struct PartitionQueue {
    /// Position of the partition's leader in `Producer::leaders`.
    leader: usize,
    open: Option<OpenBatch>,
    sealed: VecDeque<SealedBatch>,
    /// Intended send time (µs) and value bytes of every message not yet settled, oldest first.
    unsettled: VecDeque<(u64, u32)>,
    /// Listed in its leader's `active`.
    active: bool,
    /// The last sealed batch's size rounded up to a power of two: a busy partition's batches
    /// start big enough never to regrow, a quiet one's stay small.
    next_batch_bytes: usize,
}

impl PartitionQueue {
    fn seal(&mut self) -> Option<SealedBatch> {
        let open = self.open.take()?;
        self.next_batch_bytes = open.builder.encoded_len().next_power_of_two();
        Some(SealedBatch {
            bytes: open.builder.finish().freeze(),
            messages: open.messages,
            buffer_bytes: open.buffer_bytes,
        })
    }
}

struct Leader {
    conn: Connection,
    /// The batches of each request awaiting its response, oldest first.
    in_flight: VecDeque<Vec<BatchInFlight>>,
    /// Partitions with an open or sealed batch.
    active: Vec<u32>,
    sealed_batches: usize,
    open_batches: usize,
    /// No later than the earliest linger deadline of its open batches.
    linger_due: Option<Instant>,
    /// Why the connection is unusable; its batches fail at once.
    failed: Option<String>,
}

impl Leader {
    fn note_open(&mut self, due: Instant) {
        self.open_batches += 1;
        self.linger_due = Some(self.linger_due.map_or(due, |d| d.min(due)));
    }
}

pub struct Producer {
    topic: String,
    settings: ProducerSettings,
    partitions: Vec<PartitionQueue>,
    leaders: Vec<Leader>,
    responses: Responses,
    /// Bytes (as `BUFFER_BYTES_MAX` counts them) of messages not yet settled.
    unsettled_bytes: usize,
    /// Reused for every request: the request (one topic) and its batches in encoding order.
    request: ProduceRequest,
    records: Vec<Bytes>,
    spare_batch_lists: Vec<Vec<BatchInFlight>>,
}

impl Producer {
    /// Connects to every broker leading a partition of `topic`.
    pub async fn connect(layout: &Layout, topic: &str, settings: ProducerSettings) -> Result<Producer> {
        let leader_ids = layout.leaders(topic).ok_or_else(|| KafkaError::Broker {
            what: format!("producing to topic {topic}"),
            code: 3,
            message: Some("no leaders known".into()),
        })?;
        let (tx, responses) = mpsc::unbounded_channel();
        let mut nodes: Vec<i32> = Vec::new();
        let mut leaders = Vec::new();
        let mut partitions = Vec::with_capacity(leader_ids.len());
        for &node in leader_ids {
            let position = match nodes.iter().position(|n| *n == node) {
                Some(p) => p,
                None => {
                    let addr = layout.broker(node).ok_or_else(|| KafkaError::Broker {
                        what: format!("producing to topic {topic}"),
                        code: 5,
                        message: Some(format!("leader {node} is not a known broker")),
                    })?;
                    leaders.push(Leader {
                        conn: Connection::connect(addr, leaders.len(), tx.clone()).await?,
                        in_flight: VecDeque::new(),
                        active: Vec::new(),
                        sealed_batches: 0,
                        open_batches: 0,
                        linger_due: None,
                        failed: None,
                    });
                    nodes.push(node);
                    nodes.len() - 1
                }
            };
            partitions.push(PartitionQueue { leader: position, ..PartitionQueue::default() });
        }
        let request = ProduceRequest::default()
            .with_acks(settings.acks)
            .with_timeout_ms(REQUEST_TIMEOUT.as_millis() as i32)
            .with_topic_data(vec![
                TopicProduceData::default().with_name(TopicName(StrBytes::from_string(topic.to_string())))
            ]);
        Ok(Producer {
            topic: topic.to_string(),
            settings,
            partitions,
            leaders,
            responses,
            unsettled_bytes: 0,
            request,
            records: Vec::new(),
            spare_batch_lists: Vec::new(),
        })
    }

    /// Appends one message to `partition`'s batch and sends whatever is ready. Waits only while
    /// `BUFFER_BYTES_MAX` is used up, or while a request is being written.
    pub async fn send(
        &mut self,
        partition: u32,
        key: Option<&[u8]>,
        value: &[u8],
        intended_us: u64,
        recorder: &Recorder,
    ) {
        debug_assert!((partition as usize) < self.partitions.len());
        while let Ok(response) = self.responses.try_recv() {
            self.settle(response, recorder);
        }
        let record_bytes = key.map_or(0, <[u8]>::len) + value.len() + RECORD_OVERHEAD_BYTES_MAX;
        while self.unsettled_bytes > 0 && self.unsettled_bytes + record_bytes > BUFFER_BYTES_MAX {
            self.pump(Instant::now(), true, recorder).await;
            if !self.wait_for_response(recorder).await {
                break;
            }
        }
        let timestamp_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let now = Instant::now();
        let batch_bytes = self.settings.batch_bytes;
        let p = &mut self.partitions[partition as usize];
        let leader = &mut self.leaders[p.leader];
        if let Some(open) = &p.open {
            // The exact length costs a second pass over the record's framing; only a record that
            // might not fit needs it.
            let fits = |record: usize| open.builder.encoded_len() + record <= batch_bytes;
            if !fits(record_bytes)
                && !fits(open.builder.record_encoded_len(timestamp_ms, key, Some(value), &[]))
            {
                if let Some(sealed) = p.seal() {
                    p.sealed.push_back(sealed);
                    leader.open_batches -= 1;
                    leader.sealed_batches += 1;
                }
            }
        }
        let open = match &mut p.open {
            Some(open) => open,
            None => {
                leader.note_open(now + self.settings.linger);
                if !p.active {
                    p.active = true;
                    leader.active.push(partition);
                }
                let capacity = p.next_batch_bytes.max(BATCH_INITIAL_BYTES).min(batch_bytes);
                p.open.insert(OpenBatch {
                    builder: BatchBuilder::with_capacity(capacity),
                    opened: now,
                    messages: 0,
                    buffer_bytes: 0,
                })
            }
        };
        open.builder.push(timestamp_ms, key, Some(value), &[]);
        open.messages += 1;
        open.buffer_bytes += record_bytes;
        let full = open.builder.encoded_len() >= batch_bytes;
        p.unsettled.push_back((intended_us, value.len() as u32));
        self.unsettled_bytes += record_bytes;
        if full {
            if let Some(sealed) = p.seal() {
                p.sealed.push_back(sealed);
                leader.open_batches -= 1;
                leader.sealed_batches += 1;
            }
        }
        self.pump(now, false, recorder).await;
    }

    /// Settles acknowledgements and sends lingering batches until `deadline` (a fixed-rate
    /// producer between two messages).
    pub async fn idle_until(&mut self, deadline: Instant, sleep: &mut PreciseSleep, recorder: &Recorder) {
        loop {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            // Only a leader with an open batch and a free slot can act on its linger deadline.
            let linger_due = self
                .leaders
                .iter()
                .filter(|l| l.open_batches > 0 && l.in_flight.len() < IN_FLIGHT_PER_CONNECTION_MAX)
                .filter_map(|l| l.linger_due)
                .min();
            let wake = linger_due.map_or(deadline, |d| d.min(deadline));
            if wake <= now {
                self.pump(now, false, recorder).await;
                continue;
            }
            tokio::select! {
                biased;
                response = self.responses.recv() => match response {
                    Some(response) => self.settle(response, recorder),
                    None => {
                        return sleep.until(deadline, recorder).await;
                    }
                },
                _ = sleep.until(wake, recorder) => {}
            }
            self.pump(Instant::now(), false, recorder).await;
        }
    }

    /// Sends every batch and settles every outcome.
    pub async fn finish(mut self, recorder: &Recorder) {
        loop {
            self.pump(Instant::now(), true, recorder).await;
            let queued = self.leaders.iter().any(|l| l.open_batches + l.sealed_batches > 0);
            // With nothing in flight, whatever is still queued goes out in the next round.
            if !self.wait_for_response(recorder).await && !queued {
                break;
            }
        }
        debug_assert_eq!(self.unsettled_bytes, 0, "every message was settled");
    }

    /// Sends requests on every leader that has a free slot and a batch to go: a full one, one
    /// that lingered long enough, or any when `flushing`.
    async fn pump(&mut self, now: Instant, flushing: bool, recorder: &Recorder) {
        for l in 0..self.leaders.len() {
            loop {
                let leader = &self.leaders[l];
                let slot_free = leader.in_flight.len() < IN_FLIGHT_PER_CONNECTION_MAX;
                let due = leader.sealed_batches > 0
                    || (leader.open_batches > 0 && (flushing || leader.linger_due.is_some_and(|d| d <= now)));
                if !slot_free || !due || !self.send_request(l, now, flushing, recorder).await {
                    break;
                }
            }
        }
    }

    /// One request to leader `l` with the first ready batch of each of its partitions. False if
    /// none was ready.
    async fn send_request(&mut self, l: usize, now: Instant, flushing: bool, recorder: &Recorder) -> bool {
        let mut batches = self.spare_batch_lists.pop().unwrap_or_default();
        debug_assert!(batches.is_empty() && self.records.is_empty());
        let linger = self.settings.linger;
        let partition_data = &mut self.request.topic_data[0].partition_data;
        partition_data.clear();
        let leader = &mut self.leaders[l];
        let mut linger_due: Option<Instant> = None;
        let mut request_bytes = 0;
        let mut i = 0;
        while i < leader.active.len() {
            let partition = leader.active[i];
            let p = &mut self.partitions[partition as usize];
            let taken = if request_bytes >= REQUEST_BYTES_MAX {
                // Left for the next request.
                None
            } else if let Some(sealed) = p.sealed.pop_front() {
                leader.sealed_batches -= 1;
                Some(sealed)
            } else if p.open.as_ref().is_some_and(|o| flushing || o.opened + linger <= now) {
                leader.open_batches -= 1;
                p.seal()
            } else {
                None
            };
            if let Some(sealed) = taken {
                request_bytes += sealed.bytes.len();
                partition_data.push(
                    PartitionProduceData::default()
                        .with_index(partition as i32)
                        .with_records(Some(sealed.bytes.clone())),
                );
                self.records.push(sealed.bytes);
                batches.push(BatchInFlight {
                    partition,
                    position: batches.len(),
                    messages: sealed.messages,
                    buffer_bytes: sealed.buffer_bytes,
                });
            }
            if let Some(open) = &p.open {
                let due = open.opened + linger;
                linger_due = Some(linger_due.map_or(due, |d| d.min(due)));
            }
            if p.open.is_none() && p.sealed.is_empty() {
                p.active = false;
                leader.active.swap_remove(i);
            } else {
                i += 1;
            }
        }
        leader.linger_due = linger_due;
        if batches.is_empty() {
            self.spare_batch_lists.push(batches);
            return false;
        }
        let expect_response = self.settings.acks != ACKS_NONE;
        let sent = match &leader.failed {
            Some(reason) => Err(reason.clone()),
            None => leader
                .conn
                .send_with_records(&self.request, &self.records, expect_response)
                .await
                .map_err(|e| e.to_string()),
        };
        // The request is written (or failed): drop its references to the batches.
        self.request.topic_data[0].partition_data.clear();
        self.records.clear();
        match sent {
            Ok(()) if expect_response => self.leaders[l].in_flight.push_back(batches),
            Ok(()) => {
                // acks=0: the broker never answers; a message counts as published once written.
                self.settle_batches(&mut batches, recorder, |_, _| Ok(()));
                self.spare_batch_lists.push(batches);
            }
            Err(reason) => {
                self.leaders[l].failed.get_or_insert_with(|| reason.clone());
                self.settle_batches(&mut batches, recorder, |topic, b| Err(failure(topic, b, &reason)));
                self.spare_batch_lists.push(batches);
            }
        }
        true
    }

    /// Waits for one response and settles it. False if nothing is in flight.
    async fn wait_for_response(&mut self, recorder: &Recorder) -> bool {
        if self.leaders.iter().all(|l| l.in_flight.is_empty()) {
            return false;
        }
        match tokio::time::timeout(REQUEST_TIMEOUT, self.responses.recv()).await {
            Ok(Some(response)) => self.settle(response, recorder),
            // Every reader task ended, or none answered in time: nothing in flight will complete.
            outcome => {
                let reason = match outcome {
                    Err(_) => format!("no Produce response within {} s", REQUEST_TIMEOUT.as_secs()),
                    _ => "every connection closed".to_string(),
                };
                for l in 0..self.leaders.len() {
                    self.fail_leader(l, reason.clone(), recorder);
                }
            }
        }
        true
    }

    fn settle(&mut self, response: Response, recorder: &Recorder) {
        let l = response.connection;
        let frame = match response.frame {
            Ok(frame) => frame,
            Err(e) => return self.fail_leader(l, e.to_string(), recorder),
        };
        let Some(mut batches) = self.leaders[l].in_flight.pop_front() else {
            let reason = "a Produce response arrived with no request in flight".to_string();
            return self.fail_leader(l, reason, recorder);
        };
        match self.leaders[l].conn.decode::<ProduceRequest>(frame) {
            Ok(body) => {
                let answers = body.responses.iter().find(|t| t.name.0.as_str() == self.topic);
                let answers = answers.map_or(&[][..], |t| &t.partition_responses[..]);
                self.settle_batches(&mut batches, recorder, |topic, b| partition_outcome(answers, topic, b));
            }
            Err(e) => {
                let reason = e.to_string();
                self.settle_batches(&mut batches, recorder, |topic, b| Err(failure(topic, b, &reason)));
                self.leaders[l].failed.get_or_insert(reason);
            }
        }
        self.spare_batch_lists.push(batches);
    }

    /// Fails every request in flight on leader `l`; later batches for it fail at once.
    fn fail_leader(&mut self, l: usize, reason: String, recorder: &Recorder) {
        while let Some(mut batches) = self.leaders[l].in_flight.pop_front() {
            self.settle_batches(&mut batches, recorder, |topic, b| Err(failure(topic, b, &reason)));
            self.spare_batch_lists.push(batches);
        }
        self.leaders[l].failed.get_or_insert(reason);
    }

    /// Records every message of `batches` as published now, or failed as `outcome(topic, batch)`
    /// says, and empties the list.
    fn settle_batches(
        &mut self,
        batches: &mut Vec<BatchInFlight>,
        recorder: &Recorder,
        outcome: impl Fn(&str, &BatchInFlight) -> std::result::Result<(), String>,
    ) {
        let done_us = recorder.clock.now_micros();
        let mut stats = recorder.stats.lock();
        for b in batches.drain(..) {
            let p = &mut self.partitions[b.partition as usize];
            debug_assert!(p.unsettled.len() >= b.messages as usize, "a batch settles only its own messages");
            debug_assert!(self.unsettled_bytes >= b.buffer_bytes);
            self.unsettled_bytes -= b.buffer_bytes;
            let count = (b.messages as usize).min(p.unsettled.len());
            match outcome(&self.topic, &b) {
                Ok(()) => {
                    for (intended_us, bytes) in p.unsettled.drain(..count) {
                        stats.published(intended_us, done_us, bytes as usize, &recorder.window);
                    }
                }
                Err(reason) => {
                    p.unsettled.drain(..count);
                    stats.errors(count as u64, || reason);
                }
            }
        }
    }
}

fn failure(topic: &str, batch: &BatchInFlight, reason: &str) -> String {
    format!("produce to {topic}/{}: {reason}", batch.partition)
}

/// The outcome for `batch` among a topic's partition answers. Partitions are answered in request
/// order as a rule, so the answer is looked for where the batch was first; missing is an error.
fn partition_outcome(
    answers: &[PartitionProduceResponse],
    topic: &str,
    batch: &BatchInFlight,
) -> std::result::Result<(), String> {
    let partition = batch.partition as i32;
    let answer = answers
        .get(batch.position)
        .filter(|p| p.index == partition)
        .or_else(|| answers.iter().find(|p| p.index == partition));
    match answer {
        Some(p) if p.error_code == 0 => Ok(()),
        Some(p) => {
            let message = p.error_message.as_ref().map(|m| format!(" ({})", m.as_str())).unwrap_or_default();
            Err(failure(topic, batch, &format!("{}{message}", describe(p.error_code))))
        }
        None => Err(failure(topic, batch, "the response does not answer for the partition")),
    }
}
