//! `--protocol native`: the run's topics, producers and consumers through the ringlog client
//! (shard-aware: each partition's traffic goes straight to its owning shard).
//!
//! Owns: the native side of `run`'s protocol-neutral interface — topic creation and deletion,
//! the drain targets, a producer task's sends (the client batches; loadgen tracks deliveries per
//! partition queue) and a consumer task's polls. Depends on `ringlog::client`, `stats`, `message`.

use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures::task::{waker_ref, ArcWake, AtomicWaker};
use ringlog::client::{
    ClientConfig, Connection, Consumer, ConsumerConfig, DeliveryFuture, Durability, Offset, Partitioner,
    Producer, ProducerConfig, TopicSettings,
};

use crate::message;
use crate::rate::PreciseSleep;
use crate::stats::Recorder;
use crate::workload::Workload;
use crate::LoadgenError;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The control plane: topics and offsets.
pub struct Admin {
    client: ClientConfig,
    admin: ringlog::client::Admin,
    /// Shards the broker reported in the handshake.
    pub shards: u32,
}

impl Admin {
    pub async fn connect(bootstrap: &str) -> Result<Admin, LoadgenError> {
        let client = ClientConfig {
            bootstrap: bootstrap.to_string(),
            client_id: "ringlog-loadgen".into(),
            request_timeout: REQUEST_TIMEOUT,
        };
        let handshake = Connection::connect(&client.bootstrap, &client.client_id, REQUEST_TIMEOUT).await?;
        let shards = handshake.shard_count();
        drop(handshake);
        let admin = ringlog::client::Admin::connect(client.clone()).await?;
        Ok(Admin { client, admin, shards })
    }

    /// Creates every topic, or none: the ones created before a failure are deleted again.
    pub async fn create_topics(&self, topics: &[String], w: &Workload) -> Result<(), LoadgenError> {
        let settings = TopicSettings {
            retention_bytes: w.topic_config.retention_bytes,
            retention_ms: w.topic_config.retention_ms,
            segment_bytes: w.topic_config.segment_bytes,
            segment_ms: None,
            durability: match w.topic_config.durability.as_deref() {
                Some("written") => Some(Durability::Written),
                Some("fsync") => Some(Durability::Fsync),
                _ => None,
            },
        };
        for (i, topic) in topics.iter().enumerate() {
            if let Err(e) = self.admin.create_topic(topic, w.partitions, &settings).await {
                for created in &topics[..i] {
                    let _ = self.admin.delete_topic(created).await;
                }
                return Err(e.into());
            }
        }
        Ok(())
    }

    pub async fn delete_topics(&self, topics: &[String]) -> Result<(), String> {
        for topic in topics {
            self.admin.delete_topic(topic).await.map_err(|e| format!("{topic}: {e}"))?;
        }
        Ok(())
    }

    /// Every partition's high watermark.
    pub async fn end_offsets(&self, topics: &[String]) -> Result<HashMap<(Arc<str>, u32), i64>, String> {
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        let described = self.admin.describe_topics(&names).await.map_err(|e| e.to_string())?;
        let mut targets = HashMap::new();
        for t in described {
            let name: Arc<str> = Arc::from(t.name.as_str());
            for p in t.partitions {
                targets.insert((name.clone(), p.partition), p.high_watermark);
            }
        }
        Ok(targets)
    }

    pub async fn producer(&self, w: &Workload, topic: &str) -> Result<Sink, LoadgenError> {
        let config = ProducerConfig {
            acks: w.acks.to_wire(),
            linger: Duration::from_millis(w.linger_ms),
            batch_bytes: w.batch_bytes,
            partitioner: Partitioner::KeyHash,
            ..ProducerConfig::default()
        };
        let producer = Producer::connect(self.client.clone(), config).await?;
        let (_, size_max) = w.size_range();
        let arena_bytes = ARENA_BYTES_MIN.max(16 * (size_max + crate::run::KEY_BYTES_MAX));
        Ok(Sink {
            producer,
            topic: topic.to_string(),
            arena: BytesMut::with_capacity(arena_bytes),
            arena_bytes,
            deliveries: Deliveries::new(w.partitions),
        })
    }

    pub async fn consumer(&self, assigned: Vec<(String, u32)>) -> Result<Source, LoadgenError> {
        let config = ConsumerConfig { initial_offset: Offset::Beginning, ..ConsumerConfig::default() };
        let mut consumer = Consumer::connect(self.client.clone(), config).await?;
        consumer.assign(assigned);
        let assignment = consumer.assignment();
        Ok(Source { consumer, assignment })
    }
}

/// Messages are copied into slices of one buffer of at least this many bytes. The producer copies
/// a value into its batch and drops it before the next send, so when the buffer is used up its
/// space is reclaimed in place instead of allocated again.
const ARENA_BYTES_MIN: usize = 1 << 20;

/// One send awaiting its acknowledgement.
struct Pending {
    intended_us: u64,
    value_bytes: usize,
    delivery: DeliveryFuture,
}

/// Wakes the producer task and notes that some partition's oldest send may have completed, so
/// the task looks at the partitions only after a batch completed, not before every send.
struct DeliveryWake {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl ArcWake for DeliveryWake {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        arc_self.woken.store(true, Ordering::Release);
        arc_self.task.wake();
    }
}

/// A producer's sends awaiting acknowledgement, per partition in send order. The client completes
/// a partition's batches in order, so only each partition's oldest send needs a waker, and one
/// wake per completed batch settles all the sends it held: no future object per send.
struct Deliveries {
    partitions: Vec<VecDeque<Pending>>,
    wake: Arc<DeliveryWake>,
    pending: usize,
}

impl Deliveries {
    fn new(partitions: u32) -> Deliveries {
        Deliveries {
            partitions: (0..partitions).map(|_| VecDeque::new()).collect(),
            wake: Arc::new(DeliveryWake { woken: AtomicBool::new(false), task: AtomicWaker::new() }),
            pending: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.pending == 0
    }

    fn push(&mut self, partition: u32, pending: Pending) {
        let queue = &mut self.partitions[partition as usize];
        if queue.is_empty() {
            // A partition's new oldest send has no waker yet: the next settle must poll it.
            self.wake.woken.store(true, Ordering::Relaxed);
        }
        queue.push_back(pending);
        self.pending += 1;
    }

    /// Records the publish latency of every send whose batch completed, from its intended send
    /// time to now. Ready once at least one settled.
    fn poll_settle(&mut self, cx: &mut Context<'_>, topic: &str, recorder: &Recorder) -> Poll<()> {
        self.wake.task.register(cx.waker());
        if !self.wake.woken.swap(false, Ordering::Acquire) {
            return Poll::Pending;
        }
        let waker = waker_ref(&self.wake);
        let mut delivery_cx = Context::from_waker(&waker);
        let done_us = recorder.clock.now_micros();
        let mut settled = 0;
        let mut stats = recorder.stats.lock();
        for queue in &mut self.partitions {
            while let Some(front) = queue.front_mut() {
                let Poll::Ready(result) = Pin::new(&mut front.delivery).poll(&mut delivery_cx) else {
                    break;
                };
                match result {
                    Ok(_) => stats.published(front.intended_us, done_us, front.value_bytes, &recorder.window),
                    Err(e) => stats.error(format!("produce to {topic}: {e}")),
                }
                queue.pop_front();
                settled += 1;
            }
        }
        debug_assert!(settled <= self.pending);
        self.pending -= settled;
        if settled > 0 {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// A producer task's native side.
pub struct Sink {
    producer: Producer,
    topic: String,
    arena: BytesMut,
    arena_bytes: usize,
    deliveries: Deliveries,
}

impl Sink {
    /// Hands one message to the client, settling completed deliveries while it waits.
    pub async fn send(
        &mut self,
        partition: u32,
        key: Option<&[u8]>,
        value: &[u8],
        intended_us: u64,
        recorder: &Recorder,
    ) {
        let needed = value.len() + key.map_or(0, <[u8]>::len);
        if self.arena.capacity() < needed {
            self.arena.reserve(self.arena_bytes.max(needed));
        }
        self.arena.extend_from_slice(value);
        let value_bytes = self.arena.split().freeze();
        let key_bytes = key.map(|k| {
            self.arena.extend_from_slice(k);
            self.arena.split().freeze()
        });
        let (deliveries, topic) = (&mut self.deliveries, &self.topic);
        let send = self.producer.send_to(topic, partition, key_bytes, value_bytes);
        tokio::pin!(send);
        let queued = loop {
            tokio::select! {
                biased;
                _ = poll_fn(|cx| deliveries.poll_settle(cx, topic, recorder)), if !deliveries.is_empty() => {}
                queued = &mut send => break queued,
            }
        };
        match queued {
            Ok(delivery) => {
                deliveries.push(partition, Pending { intended_us, value_bytes: value.len(), delivery })
            }
            Err(e) => {
                recorder.stats.lock().error(format!("produce to {topic}: {e}"));
                // A refused send (closed producer, unknown topic) will not get better by spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    /// Settles deliveries until `deadline`.
    pub async fn idle_until(&mut self, deadline: Instant, sleep: &mut PreciseSleep, recorder: &Recorder) {
        let (deliveries, topic) = (&mut self.deliveries, &self.topic);
        while Instant::now() < deadline {
            tokio::select! {
                biased;
                _ = poll_fn(|cx| deliveries.poll_settle(cx, topic, recorder)), if !deliveries.is_empty() => {}
                _ = sleep.until(deadline, recorder) => {}
            }
        }
    }

    /// Flushes the client and settles every delivery.
    pub async fn finish(mut self, recorder: &Recorder) {
        self.producer.flush().await;
        while !self.deliveries.is_empty() {
            poll_fn(|cx| self.deliveries.poll_settle(cx, &self.topic, recorder)).await;
        }
        self.producer.close().await;
    }
}

/// A consumer task's native side.
pub struct Source {
    consumer: Consumer,
    assignment: Vec<(Arc<str>, u32)>,
}

impl Source {
    pub fn assignment(&self) -> &[(Arc<str>, u32)] {
        &self.assignment
    }

    pub fn position(&self, topic: &str, partition: u32) -> Option<i64> {
        self.consumer.position(topic, partition)
    }

    /// One poll of at most `max_wait`; records every message it returned.
    pub async fn poll(&mut self, max_wait: Duration, recorder: &Recorder) -> Result<(), String> {
        let records = self.consumer.poll(max_wait).await.map_err(|e| e.to_string())?;
        let now_us = recorder.clock.now_micros();
        let mut stats = recorder.stats.lock();
        for r in &records {
            let value = r.value.as_deref().unwrap_or_default();
            stats.consumed(message::read_header(value), now_us, value.len(), &recorder.window);
        }
        Ok(())
    }
}
