//! The producer: batching per partition, one ProduceRequest per owner endpoint, pipelined.
//!
//! Owns: the record accumulator (one open RecordBatch per partition, sealed when it reaches
//! `batch_bytes` or has lingered `linger`), the sender task that turns sealed batches into
//! requests to each partition's owning shard, and per-record delivery results.
//!
//! Why a mutex around the accumulator: `send` encodes the record straight into its partition's
//! batch (no per-record allocation or queueing) and must hand back a future tied to that batch;
//! the sender task must see lingering batches when nobody calls `send`. The lock is held for one
//! record's encoding, as Kafka's Java accumulator does, and never across an await.
//!
//! Compression (`ProducerConfig::compression`) happens once per batch, in the sender task after the
//! batch left the accumulator, so `send` never waits on a codec; a retry resends the compressed
//! bytes.
//!
//! Ordering: batches of one partition are sealed, sent and retried in order. A failed batch is
//! retried only if no later batch of its partition is in flight, so a retry never overtakes it;
//! otherwise its records fail with the error.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::cluster::Cluster;
use super::connection::{Connection, PendingReply, ResponseFrame};
use super::error::{ClientError, ProduceError, Result};
use super::partitioner::Partitioner;
use super::ClientConfig;
use crate::protocol::{wire, ACKS_ALL, ACKS_LEADER, ACKS_NONE};
use crate::record::builder::{compress_batch, BatchBuilder};
use crate::record::compression::Compression;

/// Upper bound on a record's framing next to its key and value: record length (5), attributes
/// (1), timestamp delta (10), offset delta (5), key and value lengths (5 + 5), header count (1).
const RECORD_OVERHEAD_BYTES_MAX: usize = 32;
/// A batch's first allocation; it grows towards `batch_bytes` only if records keep coming.
const BATCH_INITIAL_BYTES: usize = 16 << 10;

#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// 0 (no response), 1 (leader), or -1 (all; durable per the topic's durability).
    pub acks: i8,
    /// How long a batch waits for more records before it is sent. A batch that has lingered also
    /// waits while its partition has a request in flight (at most one round trip): records arriving
    /// meanwhile join it, so a steady stream makes fuller requests instead of one per record.
    pub linger: Duration,
    /// A batch is sent once it reaches this size before compression (a single larger record makes
    /// its own batch).
    pub batch_bytes: usize,
    /// Produce requests awaiting a response, per connection.
    pub max_in_flight_per_connection: usize,
    /// Most bytes of batches one produce request carries (a larger batch goes alone): keep it
    /// below the broker's `frame_bytes_max` (16 MiB by default), which closes the connection on
    /// a larger frame. Kafka's `max.request.size`.
    pub max_request_bytes: usize,
    pub partitioner: Partitioner,
    /// Memory for records not yet acknowledged; `send` waits when it is used up.
    pub buffer_bytes: usize,
    /// How often a batch is sent again after a retriable error (a leader being elected, a
    /// partition moving, a commit timing out).
    pub retries: u32,
    /// The pause before the first retry; it doubles with each retry up to `retry_backoff_max`
    /// (Kafka's `retry.backoff.ms` and `retry.backoff.max.ms`), so the default retries span a
    /// leader election (several seconds), not just a moment.
    pub retry_backoff: Duration,
    pub retry_backoff_max: Duration,
    /// Codec for every batch's records section (Kafka's `compression.type`).
    pub compression: Compression,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            acks: ACKS_LEADER,
            linger: Duration::from_millis(5),
            batch_bytes: 256 << 10,
            max_in_flight_per_connection: 5,
            max_request_bytes: 4 << 20,
            partitioner: Partitioner::KeyHash,
            buffer_bytes: 64 << 20,
            retries: 10,
            retry_backoff: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(1),
            compression: Compression::None,
        }
    }
}

/// Where a record was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordMetadata {
    pub partition: u32,
    /// -1 with acks = 0 (the broker does not answer).
    pub offset: i64,
}

/// The outcome of one batch, shared by the futures of its records.
struct BatchCompletion {
    partition: u32,
    /// The broker's base offset for the batch.
    result: OnceLock<Result<i64, ProduceError>>,
    wakers: Mutex<Vec<Waker>>,
    /// Records the partition's previous batch held: room reserved for wakers once the first
    /// future waits, so a full batch of waiting futures does not regrow the list step by step.
    expected_records: usize,
}

impl BatchCompletion {
    fn new(partition: u32, expected_records: usize) -> Arc<BatchCompletion> {
        Arc::new(BatchCompletion {
            partition,
            result: OnceLock::new(),
            wakers: Mutex::new(Vec::new()),
            expected_records,
        })
    }

    fn complete(&self, result: Result<i64, ProduceError>) {
        if self.result.set(result).is_ok() {
            let wakers = std::mem::take(&mut *lock(&self.wakers));
            wakers.into_iter().for_each(Waker::wake);
        }
    }

    fn is_complete(&self) -> bool {
        self.result.get().is_some()
    }

    fn metadata(&self, index: u32) -> Option<Result<RecordMetadata, ProduceError>> {
        let result = self.result.get()?;
        Some(match result {
            Ok(base_offset) if *base_offset < 0 => {
                Ok(RecordMetadata { partition: self.partition, offset: -1 })
            }
            Ok(base_offset) => {
                Ok(RecordMetadata { partition: self.partition, offset: base_offset + i64::from(index) })
            }
            Err(e) => Err(e.clone()),
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks leaves no half-updated invariant worth refusing.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Resolves to where one record was written, or why it was not. Many records share one batch's
/// outcome; the future itself is the batch's `Arc` and the record's index.
pub struct DeliveryFuture {
    batch: Arc<BatchCompletion>,
    index: u32,
    waker_slot: Option<usize>,
}

impl Future for DeliveryFuture {
    type Output = Result<RecordMetadata, ProduceError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let Some(done) = this.batch.metadata(this.index) {
            return Poll::Ready(done);
        }
        let mut wakers = lock(&this.batch.wakers);
        // Checked again under the lock: `complete` sets the result before taking the wakers.
        if let Some(done) = this.batch.metadata(this.index) {
            return Poll::Ready(done);
        }
        match this.waker_slot {
            Some(slot) if slot < wakers.len() => wakers[slot].clone_from(cx.waker()),
            _ => {
                if wakers.capacity() == 0 {
                    wakers.reserve(this.batch.expected_records);
                }
                this.waker_slot = Some(wakers.len());
                wakers.push(cx.waker().clone());
            }
        }
        Poll::Pending
    }
}

struct Shared {
    config: ProducerConfig,
    cluster: Cluster,
    accumulator: Mutex<Accumulator>,
    /// Wakes the sender task: a batch was sealed or opened, a response arrived, or a flush.
    wake_sender: Notify,
    /// Bytes of records accepted and not yet acknowledged.
    buffer: Semaphore,
}

#[derive(Default)]
struct Accumulator {
    /// Never removed, so a position in it stays valid.
    topics: Vec<TopicState>,
    /// Topic name to its position in `topics`.
    topic_positions: HashMap<String, usize>,
    /// Position of the topic last sent to: consecutive sends to one topic compare its name
    /// instead of hashing it.
    recent_topic: usize,
    /// Every batch opened and not yet known to be complete, oldest first (for `flush`).
    unfinished: VecDeque<Arc<BatchCompletion>>,
    closed: bool,
}

impl Accumulator {
    fn topic_position(&mut self, name: &str) -> Option<usize> {
        if self.topics.get(self.recent_topic).is_some_and(|t| &*t.name == name) {
            return Some(self.recent_topic);
        }
        let position = *self.topic_positions.get(name)?;
        self.recent_topic = position;
        Some(position)
    }

    fn add_topic(&mut self, name: &str, partitions: usize) {
        if self.topic_positions.contains_key(name) {
            return;
        }
        self.topic_positions.insert(name.to_owned(), self.topics.len());
        self.topics.push(TopicState {
            name: Arc::from(name),
            partitions: (0..partitions).map(|_| PartitionState::default()).collect(),
            round_robin: 0,
        });
    }

    fn partition_mut(&mut self, topic: &str, partition: u32) -> Option<&mut PartitionState> {
        let position = *self.topic_positions.get(topic)?;
        self.topics.get_mut(position)?.partitions.get_mut(partition as usize)
    }
}

struct TopicState {
    name: Arc<str>,
    partitions: Vec<PartitionState>,
    round_robin: u32,
}

#[derive(Default)]
struct PartitionState {
    open: Option<OpenBatch>,
    sealed: VecDeque<SealedBatch>,
    in_flight: u32,
    /// The last sealed batch's size rounded up to a power of two (0 before the first): the next
    /// batch starts with that much room, so a busy partition's batches never regrow (each step
    /// would copy every record again) while a quiet one's stay small.
    next_batch_bytes: usize,
    /// Records in the last sealed batch.
    next_batch_records: usize,
}

impl PartitionState {
    /// Seals the open batch, if any, and remembers its size for the next one.
    fn seal_open(&mut self) {
        if let Some(open) = self.open.take() {
            self.next_batch_bytes = open.builder.encoded_len().next_power_of_two();
            self.next_batch_records = open.builder.len();
            self.sealed.push_back(open.seal());
        }
    }
}

struct OpenBatch {
    builder: BatchBuilder,
    completion: Arc<BatchCompletion>,
    opened: Instant,
    buffer_bytes: u32,
}

struct SealedBatch {
    bytes: Bytes,
    completion: Arc<BatchCompletion>,
    buffer_bytes: u32,
    attempts: u32,
    not_before: Option<Instant>,
    /// `bytes` went through [`compress_batches`] already (a retry must not compress it again).
    compressed: bool,
}

impl OpenBatch {
    fn seal(self) -> SealedBatch {
        SealedBatch {
            bytes: self.builder.finish().freeze(),
            completion: self.completion,
            buffer_bytes: self.buffer_bytes,
            attempts: 0,
            not_before: None,
            compressed: false,
        }
    }
}

/// A batch taken off its partition's queue to be sent.
struct Outbound {
    topic: Arc<str>,
    partition: u32,
    batch: SealedBatch,
}

/// Sends records to ringlog. Cheap to share behind an `Arc`; `send` takes `&self`.
pub struct Producer {
    shared: Arc<Shared>,
}

impl Producer {
    /// Connects to the bootstrap broker and starts the sender task (on the current tokio runtime).
    pub async fn connect(client: ClientConfig, config: ProducerConfig) -> Result<Producer> {
        if ![ACKS_NONE, ACKS_LEADER, ACKS_ALL].contains(&config.acks) {
            return Err(ClientError::InvalidArgument(format!(
                "acks must be 0, 1 or -1, not {}",
                config.acks
            )));
        }
        if config.buffer_bytes < config.batch_bytes || config.buffer_bytes > Semaphore::MAX_PERMITS {
            return Err(ClientError::InvalidArgument(format!(
                "buffer_bytes {} must be at least batch_bytes {} and at most {}",
                config.buffer_bytes,
                config.batch_bytes,
                Semaphore::MAX_PERMITS
            )));
        }
        let cluster = Cluster::new(client);
        cluster.bootstrap().await?;
        let shared = Arc::new(Shared {
            buffer: Semaphore::new(config.buffer_bytes),
            config,
            cluster,
            accumulator: Mutex::new(Accumulator::default()),
            wake_sender: Notify::new(),
        });
        tokio::spawn(sender_loop(shared.clone()));
        Ok(Producer { shared })
    }

    /// Queues a record for `topic`; the partition comes from the configured partitioner. Waits
    /// only for the topic's metadata (first use) or for buffer space. The returned future
    /// resolves once the broker acknowledged (or refused) the record's batch.
    pub async fn send(&self, topic: &str, key: Option<Bytes>, value: Bytes) -> Result<DeliveryFuture> {
        self.send_record(topic, None, key.as_deref(), Some(&value)).await
    }

    /// As [`send`](Self::send), to an explicit partition.
    pub async fn send_to(
        &self,
        topic: &str,
        partition: u32,
        key: Option<Bytes>,
        value: Bytes,
    ) -> Result<DeliveryFuture> {
        self.send_record(topic, Some(partition), key.as_deref(), Some(&value)).await
    }

    async fn send_record(
        &self,
        topic: &str,
        partition: Option<u32>,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> Result<DeliveryFuture> {
        let shared = &*self.shared;
        let record_bytes =
            key.map_or(0, <[u8]>::len) + value.map_or(0, <[u8]>::len) + RECORD_OVERHEAD_BYTES_MAX;
        if record_bytes > shared.config.buffer_bytes {
            return Err(ClientError::RecordTooLarge {
                record_bytes,
                limit_bytes: shared.config.buffer_bytes,
            });
        }
        let permits = record_bytes as u32;
        shared.buffer.acquire_many(permits).await.map_err(|_| ClientError::ProducerClosed)?.forget();
        match self.append(topic, partition, key, value, permits).await {
            Ok(future) => Ok(future),
            Err(e) => {
                shared.buffer.add_permits(permits as usize);
                Err(e)
            }
        }
    }

    async fn append(
        &self,
        topic: &str,
        partition: Option<u32>,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        buffer_bytes: u32,
    ) -> Result<DeliveryFuture> {
        let shared = &*self.shared;
        let timestamp_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        loop {
            {
                let mut acc = lock(&shared.accumulator);
                if acc.closed {
                    return Err(ClientError::ProducerClosed);
                }
                let acc = &mut *acc;
                if let Some(position) = acc.topic_position(topic) {
                    let state = &mut acc.topics[position];
                    let partitions = state.partitions.len() as u32;
                    let partition = match partition {
                        Some(p) if p >= partitions => {
                            return Err(ClientError::UnknownPartition {
                                topic: topic.to_owned(),
                                partition: p,
                                partitions,
                            })
                        }
                        Some(p) => p,
                        None => shared.config.partitioner.partition(key, partitions, &mut state.round_robin),
                    };
                    let (future, wake) = append_record(
                        &shared.config,
                        &mut state.partitions[partition as usize],
                        &mut acc.unfinished,
                        partition,
                        timestamp_ms,
                        key,
                        value,
                        buffer_bytes,
                    );
                    if wake {
                        shared.wake_sender.notify_one();
                    }
                    return Ok(future);
                }
            }
            // First record for this topic: learn its partitions, then append.
            let description = shared.cluster.topic(topic).await?;
            if description.partitions.is_empty() {
                return Err(ClientError::UnknownTopic { topic: topic.to_owned() });
            }
            lock(&shared.accumulator).add_topic(topic, description.partitions.len());
        }
    }

    /// Sends every record queued so far without waiting for `linger`, and waits until each of
    /// their batches is acknowledged or failed. Records' own futures carry their errors.
    pub async fn flush(&self) {
        let unfinished: Vec<Arc<BatchCompletion>> = {
            let mut acc = lock(&self.shared.accumulator);
            seal_all(&mut acc);
            while acc.unfinished.front().is_some_and(|c| c.is_complete()) {
                acc.unfinished.pop_front();
            }
            acc.unfinished.iter().cloned().collect()
        };
        self.shared.wake_sender.notify_one();
        for batch in unfinished {
            let _ = DeliveryFuture { batch, index: 0, waker_slot: None }.await;
        }
    }

    /// Flushes, then stops the sender task. Later sends fail with `ProducerClosed`.
    pub async fn close(self) {
        self.flush().await;
    }
}

impl Drop for Producer {
    /// The sender task finishes sending what was queued, then exits.
    fn drop(&mut self) {
        lock(&self.shared.accumulator).closed = true;
        self.shared.buffer.close();
        self.shared.wake_sender.notify_one();
    }
}

/// Appends one record to its partition's open batch, sealing the batch first if the record would
/// overflow it. Returns the record's future and whether the sender task must look again.
#[allow(clippy::too_many_arguments)]
fn append_record(
    config: &ProducerConfig,
    state: &mut PartitionState,
    unfinished: &mut VecDeque<Arc<BatchCompletion>>,
    partition: u32,
    timestamp_ms: i64,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    buffer_bytes: u32,
) -> (DeliveryFuture, bool) {
    let mut wake = false;
    let record_bytes_max =
        key.map_or(0, <[u8]>::len) + value.map_or(0, <[u8]>::len) + RECORD_OVERHEAD_BYTES_MAX;
    if let Some(open) = &state.open {
        // The exact length costs a second pass over the record's framing; only a record that
        // might not fit needs it.
        let fits = |record_bytes: usize| open.builder.encoded_len() + record_bytes <= config.batch_bytes;
        if !fits(record_bytes_max)
            && !open.builder.is_empty()
            && !fits(open.builder.record_encoded_len(timestamp_ms, key, value, &[]))
        {
            state.seal_open();
            wake = true;
        }
    }
    let (next_batch_bytes, next_batch_records) = (state.next_batch_bytes, state.next_batch_records);
    let open = state.open.get_or_insert_with(|| {
        // A new batch has a linger deadline the sender task must learn about.
        wake = true;
        while unfinished.front().is_some_and(|c| c.is_complete()) {
            unfinished.pop_front();
        }
        let completion = BatchCompletion::new(partition, next_batch_records);
        unfinished.push_back(completion.clone());
        let capacity_bytes = next_batch_bytes.max(BATCH_INITIAL_BYTES).min(config.batch_bytes);
        OpenBatch {
            builder: BatchBuilder::with_capacity(capacity_bytes),
            completion,
            opened: Instant::now(),
            buffer_bytes: 0,
        }
    });
    let index = open.builder.len() as u32;
    let encoded_before = open.builder.encoded_len();
    open.builder.push(timestamp_ms, key, value, &[]);
    debug_assert!(open.builder.encoded_len() - encoded_before <= record_bytes_max);
    open.buffer_bytes += buffer_bytes;
    let future = DeliveryFuture { batch: open.completion.clone(), index, waker_slot: None };
    if open.builder.encoded_len() >= config.batch_bytes {
        state.seal_open();
        wake = true;
    }
    (future, wake)
}

fn seal_all(acc: &mut Accumulator) {
    for topic in &mut acc.topics {
        topic.partitions.iter_mut().for_each(PartitionState::seal_open);
    }
}

struct Sendable {
    batches: Vec<Outbound>,
    /// The earliest time a batch not taken becomes sendable (linger or retry backoff).
    next: Option<Instant>,
    /// Sealed batches are left behind (only one per partition is taken per round).
    more: bool,
}

/// Takes the first sendable batch of every partition (sealing batches that lingered long enough).
fn take_sendable(acc: &mut Accumulator, linger: Duration, now: Instant) -> Sendable {
    if acc.closed {
        seal_all(acc);
    }
    let mut out = Vec::new();
    let mut more = false;
    let mut next: Option<Instant> = None;
    let mut earliest = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
    for topic in &mut acc.topics {
        for (partition, p) in topic.partitions.iter_mut().enumerate() {
            // A lingered batch waits while its partition has a request in flight: records arriving
            // in the meantime join it, and the response (which wakes this task) sends it. Without
            // this, a short linger at a steady rate makes a request of every record or two.
            if let (Some(open), 0) = (&p.open, p.in_flight) {
                let due = open.opened + linger;
                if due <= now {
                    p.seal_open();
                } else {
                    earliest(due);
                }
            }
            let Some(front) = p.sealed.front() else { continue };
            match front.not_before {
                Some(t) if t > now => earliest(t),
                _ => {
                    if let Some(batch) = p.sealed.pop_front() {
                        p.in_flight += 1;
                        out.push(Outbound { topic: topic.name.clone(), partition: partition as u32, batch });
                    }
                    more |= !p.sealed.is_empty();
                }
            }
        }
    }
    Sendable { batches: out, next, more }
}

/// Puts batches that could not be sent back at the front of their partitions, in order.
fn put_back(acc: &mut Accumulator, batches: Vec<Outbound>) {
    for b in batches.into_iter().rev() {
        if let Some(p) = acc.partition_mut(&b.topic, b.partition) {
            p.in_flight -= 1;
            p.sealed.push_front(b.batch);
        }
    }
}

fn is_idle(acc: &Accumulator) -> bool {
    acc.topics
        .iter()
        .all(|t| t.partitions.iter().all(|p| p.open.is_none() && p.sealed.is_empty() && p.in_flight == 0))
}

async fn sender_loop(shared: Arc<Shared>) {
    let mut permits: HashMap<String, Arc<Semaphore>> = HashMap::new();
    loop {
        let mut sendable = {
            let mut acc = lock(&shared.accumulator);
            if acc.closed && is_idle(&acc) {
                return;
            }
            take_sendable(&mut acc, shared.config.linger, Instant::now())
        };
        compress_batches(shared.config.compression, &mut sendable.batches);
        let taken = sendable.batches.len();
        let blocked = dispatch(&shared, &mut permits, sendable.batches).await;
        // Batches left behind need another round now if this one moved anything off the queues,
        // whether into a request or into a failure: a round whose batches all failed locally
        // (owner unreachable) leaves no response, linger or backoff behind to wake this task.
        // Only when every batch was blocked on in-flight slots does a response wake it.
        if sendable.more && blocked < taken {
            continue;
        }
        match sendable.next {
            Some(deadline) => {
                let _ = tokio::time::timeout_at(deadline.into(), shared.wake_sender.notified()).await;
            }
            None => shared.wake_sender.notified().await,
        }
    }
}

/// Compresses the batches not compressed yet. Called outside the accumulator lock: a codec may
/// take milliseconds over a large batch.
fn compress_batches(compression: Compression, batches: &mut [Outbound]) {
    if compression == Compression::None {
        return;
    }
    for b in batches.iter_mut().filter(|b| !b.batch.compressed) {
        b.batch.compressed = true;
        match compress_batch(&b.batch.bytes, compression) {
            Ok(compressed) => b.batch.bytes = compressed.freeze(),
            // Only a codec bug fails on our own bytes. The batch is valid as it is: sending it
            // uncompressed beats failing the application's records.
            Err(e) => tracing::warn!(
                topic = %b.topic,
                partition = b.partition,
                error = %e,
                "sending a batch uncompressed"
            ),
        }
    }
}

/// Groups batches by owner endpoint and queues one request per endpoint that has an in-flight
/// slot free; the rest go back to their partitions until a response frees a slot. Batches whose
/// owner cannot be reached are finished (failed or queued for a retry). Returns the number of
/// batches put back for want of an in-flight slot.
async fn dispatch(
    shared: &Arc<Shared>,
    permits: &mut HashMap<String, Arc<Semaphore>>,
    outbound: Vec<Outbound>,
) -> usize {
    let mut by_endpoint: Vec<(Connection, Vec<Outbound>)> = Vec::new();
    let mut failed: Vec<(Outbound, ClientError)> = Vec::new();
    for b in outbound {
        match shared.cluster.owner(&b.topic, b.partition).await {
            Ok(conn) => match by_endpoint.iter_mut().find(|(c, _)| c.addr() == conn.addr()) {
                Some((_, group)) => group.push(b),
                None => by_endpoint.push((conn, vec![b])),
            },
            Err(e) => failed.push((b, e)),
        }
    }
    let mut blocked = Vec::new();
    for (conn, mut group) in by_endpoint {
        let slots = permits
            .entry(conn.addr().to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(shared.config.max_in_flight_per_connection)))
            .clone();
        // Group by topic so each topic appears once in a request; stable, so order holds.
        group.sort_by(|a, b| a.topic.cmp(&b.topic));
        for group in split_requests(group, shared.config.max_request_bytes) {
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                blocked.extend(group);
                continue;
            };
            send_request(shared, &conn, permit, group);
        }
    }
    let blocked_count = blocked.len();
    if !blocked.is_empty() {
        put_back(&mut lock(&shared.accumulator), blocked);
    }
    for (b, e) in failed {
        finish_batch(shared, b, Err(e)).await;
    }
    blocked_count
}

/// Cuts one endpoint's batches (at most one per partition, sorted by topic) into requests of at
/// most `max_bytes` of batches each, in order; a batch larger than that goes alone.
fn split_requests(group: Vec<Outbound>, max_bytes: usize) -> Vec<Vec<Outbound>> {
    let mut requests: Vec<Vec<Outbound>> = Vec::new();
    let mut request_bytes = 0;
    for b in group {
        let len = b.batch.bytes.len();
        match requests.last_mut() {
            Some(request) if request_bytes + len <= max_bytes => {
                request_bytes += len;
                request.push(b);
            }
            _ => {
                request_bytes = len;
                requests.push(vec![b]);
            }
        }
    }
    requests
}

/// Sends one produce request and completes its batches from the response, in a task of its own.
fn send_request(shared: &Arc<Shared>, conn: &Connection, permit: OwnedSemaphorePermit, group: Vec<Outbound>) {
    let payload: Vec<Bytes> = group.iter().map(|b| b.batch.bytes.clone()).collect();
    let acks = shared.config.acks;
    let timeout_ms = u32::try_from(shared.cluster.config().request_timeout.as_millis()).unwrap_or(u32::MAX);
    let pending =
        conn.start(|fbb| encode_produce_request(fbb, acks, timeout_ms, &group), payload, acks != ACKS_NONE);
    let shared = shared.clone();
    tokio::spawn(async move {
        let outcome = match pending {
            Ok(pending) => await_produce(pending, acks, &group).await,
            Err(e) => Err(e),
        };
        drop(permit);
        complete_request(&shared, group, outcome).await;
    });
}

fn encode_produce_request(
    fbb: &mut flatbuffers::FlatBufferBuilder<'static>,
    acks: i8,
    timeout_ms: u32,
    group: &[Outbound],
) -> (wire::RequestBody, flatbuffers::WIPOffset<flatbuffers::UnionWIPOffset>) {
    let mut topics = Vec::new();
    let mut payload_offset = 0u32;
    let mut start = 0;
    while start < group.len() {
        let end = start + group[start..].iter().take_while(|b| b.topic == group[start].topic).count();
        let partitions: Vec<_> = group[start..end]
            .iter()
            .map(|b| {
                let payload_len = b.batch.bytes.len() as u32;
                let p = wire::ProducePartition::create(
                    fbb,
                    &wire::ProducePartitionArgs { partition: b.partition, payload_offset, payload_len },
                );
                payload_offset += payload_len;
                p
            })
            .collect();
        let partitions = fbb.create_vector(&partitions);
        let name = fbb.create_string(&group[start].topic);
        topics.push(wire::ProduceTopic::create(
            fbb,
            &wire::ProduceTopicArgs { name: Some(name), partitions: Some(partitions) },
        ));
        start = end;
    }
    let topics = fbb.create_vector(&topics);
    let body = wire::ProduceRequest::create(
        fbb,
        &wire::ProduceRequestArgs { acks, timeout_ms, topics: Some(topics) },
    );
    (wire::RequestBody::ProduceRequest, body.as_union_value())
}

/// Per batch of the request (same order): the base offset or the partition's error.
type ProduceOutcome = Result<Vec<Result<i64, ClientError>>, ClientError>;

async fn await_produce(pending: PendingReply, acks: i8, group: &[Outbound]) -> ProduceOutcome {
    if acks == ACKS_NONE {
        pending.written().await?;
        return Ok(group.iter().map(|_| Ok(-1)).collect());
    }
    let addr = pending.addr().to_owned();
    let frame = pending.response().await?;
    decode_produce_response(&addr, &frame, group)
}

fn decode_produce_response(addr: &str, frame: &ResponseFrame, group: &[Outbound]) -> ProduceOutcome {
    let response = frame
        .response()
        .map_err(|e| ClientError::protocol(addr, format!("undecodable produce response: {e}")))?;
    if response.error() != wire::ErrorCode::None {
        return Err(ClientError::broker(format!("produce to {addr}"), response.error(), response.message()));
    }
    let body = response
        .body_as_produce_response()
        .ok_or_else(|| ClientError::protocol(addr, "produce answered with another response type"))?;
    let mut results: HashMap<(&str, u32), wire::ProducePartitionResult<'_>> = HashMap::new();
    for topic in body.topics().iter().flat_map(|v| v.iter()) {
        let name = topic.name().unwrap_or_default();
        for p in topic.partitions().iter().flat_map(|v| v.iter()) {
            results.insert((name, p.partition()), p);
        }
    }
    Ok(group
        .iter()
        .map(|b| match results.get(&(&*b.topic, b.partition)) {
            None => Err(ClientError::protocol(
                addr,
                format!("produce response lacks {}/{}", b.topic, b.partition),
            )),
            Some(p) if p.error() != wire::ErrorCode::None => Err(ClientError::broker(
                format!("produce to {}/{}", b.topic, b.partition),
                p.error(),
                p.message(),
            )),
            Some(p) => Ok(p.base_offset()),
        })
        .collect())
}

async fn complete_request(shared: &Arc<Shared>, group: Vec<Outbound>, outcome: ProduceOutcome) {
    match outcome {
        Ok(results) => {
            for (b, result) in group.into_iter().zip(results) {
                finish_batch(shared, b, result).await;
            }
        }
        Err(e) => {
            for b in group {
                finish_batch(shared, b, Err(e.clone())).await;
            }
        }
    }
    shared.wake_sender.notify_one();
}

/// Records a batch's outcome: completes it, or puts it back for a retry when that cannot reorder
/// its partition.
async fn finish_batch(shared: &Arc<Shared>, mut b: Outbound, result: Result<i64, ClientError>) {
    if let Err(e) = &result {
        if e.invalidates_metadata() {
            shared.cluster.invalidate(&b.topic).await;
        }
    }
    {
        let mut acc = lock(&shared.accumulator);
        let Some(p) = acc.partition_mut(&b.topic, b.partition) else {
            b.batch.completion.complete(Err(ClientError::ProducerClosed));
            return;
        };
        p.in_flight -= 1;
        let retriable = matches!(&result, Err(e) if e.is_retriable());
        if retriable && p.in_flight == 0 && b.batch.attempts < shared.config.retries {
            b.batch.attempts += 1;
            let backoff = shared.config.retry_backoff.saturating_mul(1 << (b.batch.attempts - 1).min(16));
            b.batch.not_before = Some(Instant::now() + backoff.min(shared.config.retry_backoff_max));
            tracing::debug!(
                topic = %b.topic,
                partition = b.partition,
                attempt = b.batch.attempts,
                error = ?result.as_ref().err(),
                "retrying batch"
            );
            p.sealed.push_front(b.batch);
            drop(acc);
            shared.wake_sender.notify_one();
            return;
        }
    }
    b.batch.completion.complete(result);
    shared.buffer.add_permits(b.batch.buffer_bytes as usize);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::reader::{decode, records};
    use crate::record::{batches, BatchHeader};

    fn config(batch_bytes: usize) -> ProducerConfig {
        ProducerConfig { batch_bytes, ..ProducerConfig::default() }
    }

    fn accumulator_with(topic: &str, partitions: usize) -> Accumulator {
        let mut acc = Accumulator::default();
        acc.add_topic(topic, partitions);
        acc
    }

    fn append(acc: &mut Accumulator, cfg: &ProducerConfig, partition: u32, value: &[u8]) -> DeliveryFuture {
        let p = &mut acc.topics[0].partitions[partition as usize];
        append_record(cfg, p, &mut acc.unfinished, partition, 1000, None, Some(value), 10).0
    }

    #[test]
    fn batches_seal_at_batch_bytes_and_keep_order() {
        let cfg = config(1024);
        let mut acc = accumulator_with("t", 2);
        let futures: Vec<DeliveryFuture> =
            (0..100).map(|i| append(&mut acc, &cfg, 0, &[i as u8; 50])).collect();
        let p = &acc.topics[0].partitions[0];
        assert!(p.sealed.len() >= 4, "100 × ~57 bytes must fill several 1 KiB batches");
        assert!(p.sealed.iter().all(|b| b.bytes.len() <= 1024));
        // Indexes restart in every batch and count up within it.
        let mut expected_index = 0;
        let mut last_batch: Option<*const BatchCompletion> = None;
        for f in &futures {
            let this = Arc::as_ptr(&f.batch);
            if last_batch != Some(this) {
                expected_index = 0;
                last_batch = Some(this);
            }
            assert_eq!(f.index, expected_index);
            expected_index += 1;
        }
        seal_all(&mut acc);
        let values: Vec<u8> = acc.topics[0].partitions[0]
            .sealed
            .iter()
            .flat_map(|b| {
                let (_, bytes) = batches(&b.bytes).next().unwrap().unwrap();
                records(bytes).unwrap().map(|r| r.unwrap().value.unwrap()[0]).collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(values, (0..100).map(|i| i as u8).collect::<Vec<_>>());
    }

    #[test]
    fn topics_resolve_by_name_and_busy_partitions_size_batches_from_the_last() {
        let mut acc = accumulator_with("t", 1);
        acc.add_topic("u", 2);
        acc.add_topic("t", 5);
        assert_eq!(acc.topics.len(), 2);
        assert_eq!(acc.topics[0].partitions.len(), 1, "adding a known topic again changes nothing");
        assert_eq!(acc.topic_position("u"), Some(1));
        assert_eq!(acc.topic_position("u"), Some(1));
        assert_eq!(acc.topic_position("t"), Some(0));
        assert_eq!(acc.topic_position("v"), None);
        assert!(acc.partition_mut("u", 1).is_some());
        assert!(acc.partition_mut("u", 2).is_none());

        let cfg = config(64 << 10);
        for i in 0..200u8 {
            append(&mut acc, &cfg, 0, &[i; 1000]);
        }
        let p = &acc.topics[0].partitions[0];
        assert!(p.sealed.len() >= 2);
        assert!(p.sealed.iter().all(|b| b.bytes.len() <= 64 << 10));
        assert_eq!(p.next_batch_bytes, 64 << 10, "a full batch makes the next one start full size");
        let (_, last) = batches(&p.sealed.back().unwrap().bytes).next().unwrap().unwrap();
        assert_eq!(p.next_batch_records, records(last).unwrap().count());
    }

    #[test]
    fn batches_are_compressed_once_after_they_leave_the_accumulator() {
        let cfg = ProducerConfig { compression: Compression::Zstd, ..config(1 << 20) };
        let mut acc = accumulator_with("t", 1);
        let values: Vec<Vec<u8>> = (0..50u8).map(|i| vec![b'a' + i % 3; 200]).collect();
        for v in &values {
            append(&mut acc, &cfg, 0, v);
        }
        let mut out =
            take_sendable(&mut acc, Duration::ZERO, Instant::now() + Duration::from_millis(1)).batches;
        assert_eq!(out.len(), 1);
        let uncompressed_len = out[0].batch.bytes.len();
        compress_batches(cfg.compression, &mut out);
        let bytes = out[0].batch.bytes.clone();
        assert!(bytes.len() < uncompressed_len / 4, "{} of {uncompressed_len} bytes", bytes.len());
        let (header, batch) = batches(&bytes).next().unwrap().unwrap();
        assert_eq!(header.compression(), Compression::Zstd.id());
        let decoded = decode(batch, 1 << 20).unwrap();
        let read: Vec<Vec<u8>> = decoded.iter().map(|r| r.unwrap().value.unwrap().to_vec()).collect();
        assert_eq!(read, values);

        // Put back for want of an in-flight slot, taken again: not compressed a second time.
        put_back(&mut acc, out);
        let mut again = take_sendable(&mut acc, Duration::ZERO, Instant::now()).batches;
        compress_batches(cfg.compression, &mut again);
        assert_eq!(again[0].batch.bytes, bytes);
    }

    #[test]
    fn take_sendable_takes_one_batch_per_partition_and_respects_linger() {
        let cfg = config(1 << 20);
        let mut acc = accumulator_with("t", 3);
        append(&mut acc, &cfg, 0, b"a");
        append(&mut acc, &cfg, 2, b"b");
        let now = Instant::now();
        let s = take_sendable(&mut acc, Duration::from_secs(60), now);
        assert!(s.batches.is_empty(), "nothing lingered long enough");
        assert!(s.next.is_some());
        let out = take_sendable(&mut acc, Duration::ZERO, now + Duration::from_millis(1)).batches;
        let mut partitions: Vec<u32> = out.iter().map(|b| b.partition).collect();
        partitions.sort();
        assert_eq!(partitions, vec![0, 2]);
        assert_eq!(acc.topics[0].partitions[0].in_flight, 1);
        put_back(&mut acc, out);
        assert_eq!(acc.topics[0].partitions[0].in_flight, 0);
        assert_eq!(acc.topics[0].partitions[0].sealed.len(), 1);
    }

    #[test]
    fn a_lingered_batch_waits_for_its_partitions_request_in_flight() {
        let cfg = config(1 << 20);
        let mut acc = accumulator_with("t", 2);
        append(&mut acc, &cfg, 0, b"a");
        let now = Instant::now();
        let first = take_sendable(&mut acc, Duration::ZERO, now).batches;
        assert_eq!(first.len(), 1, "an idle partition's record goes at once");
        // Records arriving while that request is out join one batch instead of going one by one.
        append(&mut acc, &cfg, 0, b"b");
        append(&mut acc, &cfg, 0, b"c");
        append(&mut acc, &cfg, 1, b"d");
        let s = take_sendable(&mut acc, Duration::ZERO, now + Duration::from_millis(5));
        let partitions: Vec<u32> = s.batches.iter().map(|b| b.partition).collect();
        assert_eq!(partitions, vec![1], "partition 0 waits for its response");
        assert_eq!(s.next, None, "the response, not a timer, wakes the sender");
        // Its response arrived: the waiting batch goes, with both records.
        acc.topics[0].partitions[0].in_flight -= 1;
        let s = take_sendable(&mut acc, Duration::ZERO, now + Duration::from_millis(6));
        assert_eq!(s.batches.len(), 1);
        assert_eq!(s.batches[0].partition, 0);
        assert_eq!(batches(&s.batches[0].batch.bytes).count(), 1);
        assert_eq!(BatchHeader::parse(&s.batches[0].batch.bytes).unwrap().record_count, 2);
    }

    #[tokio::test]
    async fn delivery_future_resolves_with_offset_per_record() {
        let cfg = config(1 << 20);
        let mut acc = accumulator_with("t", 1);
        let first = append(&mut acc, &cfg, 0, b"a");
        let second = append(&mut acc, &cfg, 0, b"b");
        let batch = first.batch.clone();
        let waiter = tokio::spawn(second);
        tokio::task::yield_now().await;
        batch.complete(Ok(41));
        assert_eq!(waiter.await.unwrap().unwrap(), RecordMetadata { partition: 0, offset: 42 });
        assert_eq!(first.await.unwrap(), RecordMetadata { partition: 0, offset: 41 });
        acc.topics[0].partitions[0].open = None;
        let failed = append(&mut acc, &cfg, 0, b"c");
        let cfg_err = ClientError::broker("produce", wire::ErrorCode::StorageFull, Some("disk"));
        acc.topics[0].partitions[0].open.as_ref().unwrap().completion.complete(Err(cfg_err));
        let err = failed.await.unwrap_err();
        assert_eq!(err.code(), Some(wire::ErrorCode::StorageFull));
    }

    #[test]
    fn produce_request_references_payload_in_order() {
        let cfg = config(1 << 20);
        let mut acc = accumulator_with("t", 2);
        append(&mut acc, &cfg, 0, b"first");
        append(&mut acc, &cfg, 1, b"second-longer");
        let group =
            take_sendable(&mut acc, Duration::ZERO, Instant::now() + Duration::from_millis(1)).batches;
        let head = super::super::connection::encode_request(7, 0, |fbb| {
            encode_produce_request(fbb, -1, 1000, &group)
        });
        let mut buf = bytes::BytesMut::from(&head[..]);
        let frame = crate::protocol::frame::split_frame(&mut buf, 1 << 20).unwrap().unwrap();
        let request =
            flatbuffers::root_with_opts::<wire::Request>(&crate::protocol::verifier_options(), &frame.header)
                .unwrap();
        let produce = request.body_as_produce_request().unwrap();
        assert_eq!(produce.acks(), -1);
        assert_eq!(produce.timeout_ms(), 1000);
        let topics = produce.topics().unwrap();
        assert_eq!(topics.len(), 1);
        assert_eq!(topics.get(0).name(), Some("t"));
        let mut offset = 0;
        for (i, p) in topics.get(0).partitions().unwrap().iter().enumerate() {
            assert_eq!(p.partition(), group[i].partition);
            assert_eq!(p.payload_offset(), offset);
            assert_eq!(p.payload_len() as usize, group[i].batch.bytes.len());
            offset += p.payload_len();
        }
    }

    #[test]
    fn produce_response_maps_results_to_batches() {
        let cfg = config(1 << 20);
        let mut acc = accumulator_with("t", 2);
        append(&mut acc, &cfg, 0, b"x");
        append(&mut acc, &cfg, 1, b"y");
        let mut group =
            take_sendable(&mut acc, Duration::ZERO, Instant::now() + Duration::from_millis(1)).batches;
        group.sort_by_key(|b| b.partition);

        let mut fbb = flatbuffers::FlatBufferBuilder::new();
        let message = fbb.create_string("not mine");
        let p0 = wire::ProducePartitionResult::create(
            &mut fbb,
            &wire::ProducePartitionResultArgs { partition: 0, base_offset: 100, ..Default::default() },
        );
        let p1 = wire::ProducePartitionResult::create(
            &mut fbb,
            &wire::ProducePartitionResultArgs {
                partition: 1,
                error: wire::ErrorCode::NotOwner,
                message: Some(message),
                ..Default::default()
            },
        );
        let partitions = fbb.create_vector(&[p1, p0]);
        let name = fbb.create_string("t");
        let topic = wire::ProduceTopicResult::create(
            &mut fbb,
            &wire::ProduceTopicResultArgs { name: Some(name), partitions: Some(partitions) },
        );
        let topics = fbb.create_vector(&[topic]);
        let body =
            wire::ProduceResponse::create(&mut fbb, &wire::ProduceResponseArgs { topics: Some(topics) });
        let response = wire::Response::create(
            &mut fbb,
            &wire::ResponseArgs {
                correlation_id: 3,
                body_type: wire::ResponseBody::ProduceResponse,
                body: Some(body.as_union_value()),
                ..Default::default()
            },
        );
        fbb.finish(response, None);
        let frame =
            ResponseFrame { header: Bytes::copy_from_slice(fbb.finished_data()), payload: Bytes::new() };
        let results = decode_produce_response("test:1", &frame, &group).unwrap();
        assert_eq!(*results[0].as_ref().unwrap(), 100);
        let err = results[1].as_ref().unwrap_err();
        assert_eq!(err.code(), Some(wire::ErrorCode::NotOwner));
        assert!(err.is_retriable());
        assert!(err.to_string().contains("not mine"), "{err}");
    }
}
