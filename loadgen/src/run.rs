//! One benchmark run over the native protocol: create the topics, start consumers and producers
//! as tokio tasks, report progress once a second, drain, and assemble the report.
//!
//! Owns: task layout and the run's phases. Producers follow their `Schedule`, build messages in
//! slices of one reused buffer, keep their in-flight deliveries per partition in send order, and
//! record each message's publish latency from its intended send time when its batch completes.
//! Consumers read their share of the partitions from the beginning and record end-to-end latency
//! from the send time inside each message. After the producers stop, consumers keep reading until
//! they reach the high watermark of every partition they read (or `drain_timeout_s` passes), so
//! the report can say whether every produced message was consumed.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures::task::{waker_ref, ArcWake, AtomicWaker};
use ringlog::client::{
    key_partition, Admin, ClientConfig, Connection, Consumer, ConsumerConfig, DeliveryFuture, Durability,
    Offset, Partitioner, Producer, ProducerConfig, TopicSettings,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::message::{self, Clock, Rng};
use crate::rate::Schedule;
use crate::report::{round, BrokerInfo, MachineInfo, Percentiles, Point, Report};
use crate::stats::{quantile_us, SharedStats, Tally, Window};
use crate::workload::{Keys, Workload};
use crate::LoadgenError;

/// How long one consumer poll waits for data.
const POLL_WAIT: Duration = Duration::from_millis(100);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Where to run and how to talk about it.
pub struct Target {
    pub bootstrap: String,
    pub broker: BrokerInfo,
    /// Keep the topics after the run (default: delete them).
    pub keep_topics: bool,
    /// Live progress on stderr.
    pub progress: bool,
}

/// The last offset each partition reached once the producers stopped: consumers read up to it.
type DrainTargets = Option<Arc<HashMap<(Arc<str>, u32), i64>>>;

struct ProducerCtx {
    id: u32,
    topic: String,
    partitions: u32,
    rate: f64,
    clock: Clock,
    start: Instant,
    window: Window,
    end: Instant,
    workload: Arc<Workload>,
    stats: SharedStats,
}

pub async fn run(workload: Workload, mut target: Target) -> Result<Report, LoadgenError> {
    let workload = Arc::new(workload);
    let w = &*workload;
    let started_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let machine = MachineInfo::detect();
    let client = ClientConfig {
        bootstrap: target.bootstrap.clone(),
        client_id: "ringlog-loadgen".into(),
        request_timeout: REQUEST_TIMEOUT,
    };
    let handshake = Connection::connect(&client.bootstrap, &client.client_id, REQUEST_TIMEOUT).await?;
    target.broker.shards = handshake.shard_count();
    drop(handshake);

    let admin = Admin::connect(client.clone()).await?;
    let prefix = topic_prefix(&w.name, started_unix_ms);
    let topics: Vec<String> = (0..w.topics).map(|i| format!("{prefix}-{i}")).collect();
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
        if let Err(e) = admin.create_topic(topic, w.partitions, &settings).await {
            for created in &topics[..i] {
                let _ = admin.delete_topic(created).await;
            }
            return Err(e.into());
        }
    }
    let result = run_on_topics(workload.clone(), &client, &topics, &target, machine, started_unix_ms).await;
    if !target.keep_topics {
        for topic in &topics {
            if let Err(e) = admin.delete_topic(topic).await {
                eprintln!("ringlog-loadgen: could not delete topic {topic}: {e}");
            }
        }
    }
    result
}

async fn run_on_topics(
    workload: Arc<Workload>,
    client: &ClientConfig,
    topics: &[String],
    target: &Target,
    machine: MachineInfo,
    started_unix_ms: u64,
) -> Result<Report, LoadgenError> {
    let w = &*workload;
    let clock = Clock::new();
    let (drain_tx, drain_rx) = watch::channel::<DrainTargets>(None);

    // Consumers first, so they are waiting when the first message arrives.
    let mut consumers: Vec<(SharedStats, JoinHandle<()>)> = Vec::new();
    let mut consumer_start = Vec::new();
    for topic in topics {
        for _group in 0..w.consumer_groups.max(1) * u32::from(w.consumers > 0) {
            for c in 0..w.consumers {
                let assigned: Vec<(String, u32)> =
                    (0..w.partitions).filter(|p| p % w.consumers == c).map(|p| (topic.clone(), p)).collect();
                if assigned.is_empty() {
                    continue;
                }
                let config =
                    ConsumerConfig { initial_offset: Offset::Beginning, ..ConsumerConfig::default() };
                let mut consumer = Consumer::connect(client.clone(), config).await?;
                consumer.assign(assigned);
                consumer_start.push(consumer);
            }
        }
    }
    let mut producers_ready = Vec::new();
    for topic in topics {
        for _ in 0..w.producers {
            let config = ProducerConfig {
                acks: w.acks.to_wire(),
                linger: Duration::from_millis(w.linger_ms),
                batch_bytes: w.batch_bytes,
                partitioner: Partitioner::KeyHash,
                ..ProducerConfig::default()
            };
            producers_ready.push((topic.clone(), Producer::connect(client.clone(), config).await?));
        }
    }

    let start = Instant::now();
    let warmup = Duration::from_secs_f64(w.warmup_s);
    let measured = Duration::from_secs_f64(w.duration_s);
    let end = start + warmup + measured;
    let window = Window { start_us: clock.micros(start + warmup), end_us: clock.micros(end) };
    let give_up = end + Duration::from_secs_f64(w.drain_timeout_s);
    for consumer in consumer_start {
        let stats = SharedStats::new();
        let task = tokio::spawn(consume(consumer, clock, window, give_up, drain_rx.clone(), stats.clone()));
        consumers.push((stats, task));
    }
    let total_producers = producers_ready.len() as f64;
    let mut producers: Vec<(SharedStats, JoinHandle<()>)> = Vec::new();
    for (id, (topic, producer)) in producers_ready.into_iter().enumerate() {
        let stats = SharedStats::new();
        let ctx = ProducerCtx {
            id: id as u32,
            topic,
            partitions: w.partitions,
            rate: w.rate / total_producers,
            clock,
            start,
            window,
            end,
            workload: workload.clone(),
            stats: stats.clone(),
        };
        producers.push((stats, tokio::spawn(produce(producer, ctx))));
    }

    // Progress once a second until every task is done; the producers' end opens the drain.
    let mut timeline: Vec<Point> = Vec::new();
    let mut ticker = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    let mut last_tick = start;
    let mut drain_opened = false;
    let mut interval = Tally::new();
    loop {
        ticker.tick().await;
        let now = Instant::now();
        interval.reset();
        let (mut acked, mut consumed, mut errors) = (0u64, 0u64, 0u64);
        for (stats, _) in producers.iter().chain(&consumers) {
            let mut s = stats.lock();
            interval.add(&s.interval);
            s.interval.reset();
            acked += s.acked_total;
            consumed += s.consumed_total;
            errors += s.errors;
        }
        let dt = (now - last_tick).as_secs_f64().max(1e-3);
        last_tick = now;
        let groups = if consumers.is_empty() { 0 } else { i64::from(w.consumer_groups) };
        let point = Point {
            t_s: round((now - start).as_secs_f64(), 2),
            produce_msgs_per_s: round(interval.produced_msgs as f64 / dt, 1),
            consume_msgs_per_s: round(interval.consumed_msgs as f64 / dt, 1),
            publish_p99_us: quantile_us(&interval.publish_us, 0.99),
            e2e_p99_us: quantile_us(&interval.e2e_us, 0.99),
            // An ack can be recorded just after its message was consumed: never report below zero.
            backlog_msgs: (acked as i64 * groups - consumed as i64).max(0),
        };
        if target.progress {
            let phase = if now < start + warmup {
                "warm-up"
            } else if now < end {
                "measure"
            } else {
                "drain  "
            };
            eprintln!(
                "[{:>6.1}s {phase}] produce {:>10.0} msgs/s {:>8.2} MB/s p99 {:>9} µs | consume {:>10.0} msgs/s e2e p99 {:>9} µs | backlog {:>9} | errors {errors}",
                point.t_s,
                point.produce_msgs_per_s,
                interval.produced_bytes as f64 / dt / 1e6,
                point.publish_p99_us,
                point.consume_msgs_per_s,
                point.e2e_p99_us,
                point.backlog_msgs,
            );
        }
        timeline.push(point);
        if !drain_opened && producers.iter().all(|(_, t)| t.is_finished()) {
            drain_opened = true;
            let targets = drain_targets(client, topics).await;
            let _ = drain_tx.send(Some(Arc::new(targets)));
        }
        if drain_opened && consumers.iter().all(|(_, t)| t.is_finished()) {
            break;
        }
    }

    let mut measured_tally = Tally::new();
    let (mut produced, mut consumed, mut produce_errors, mut consume_errors) = (0, 0, 0, 0);
    let mut first_error = None;
    for (i, (stats, task)) in producers.into_iter().chain(consumers).enumerate() {
        let is_producer = i < (total_producers as usize);
        task.await.map_err(|e| LoadgenError::Task(e.to_string()))?;
        let s = stats.lock();
        measured_tally.add(&s.measured);
        if is_producer {
            produced += s.acked_total;
            produce_errors += s.errors;
        } else {
            consumed += s.consumed_total;
            consume_errors += s.errors;
        }
        if first_error.is_none() {
            first_error = s.first_error.clone();
        }
    }
    let (produce_msgs_per_s, produce_mb_per_s, consume_msgs_per_s, consume_mb_per_s) =
        Report::rates(&measured_tally, window.seconds());
    Ok(Report {
        produce_msgs_per_s,
        produce_mb_per_s,
        consume_msgs_per_s,
        consume_mb_per_s,
        publish_latency_us: Percentiles::of(&measured_tally.publish_us),
        e2e_latency_us: Percentiles::of(&measured_tally.e2e_us),
        produced_msgs: produced,
        consumed_msgs: consumed,
        expected_consumed_msgs: if w.consumers > 0 { produced * u64::from(w.consumer_groups) } else { 0 },
        produce_errors,
        consume_errors,
        first_error,
        measured_s: round(window.seconds(), 3),
        warmup_s: w.warmup_s,
        workload: (*workload).clone(),
        broker: target.broker.clone(),
        machine,
        timeline,
        loadgen_version: env!("CARGO_PKG_VERSION"),
        started_unix_ms,
    })
}

/// Topic names: `loadgen-<workload name>-<start time>`, limited to the characters topics allow.
fn topic_prefix(name: &str, unix_ms: u64) -> String {
    let clean: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' })
        .take(64)
        .collect();
    format!("loadgen-{clean}-{unix_ms:x}")
}

/// Every partition's high watermark once the producers are done.
async fn drain_targets(client: &ClientConfig, topics: &[String]) -> HashMap<(Arc<str>, u32), i64> {
    let mut targets = HashMap::new();
    let admin = match Admin::connect(client.clone()).await {
        Ok(a) => a,
        Err(e) => {
            eprintln!(
                "ringlog-loadgen: cannot read the final offsets ({e}); consumers stop at the drain timeout"
            );
            return targets;
        }
    };
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    match admin.describe_topics(&names).await {
        Ok(described) => {
            for t in described {
                let name: Arc<str> = Arc::from(t.name.as_str());
                for p in t.partitions {
                    targets.insert((name.clone(), p.partition), p.high_watermark);
                }
            }
        }
        Err(e) => eprintln!(
            "ringlog-loadgen: cannot read the final offsets ({e}); consumers stop at the drain timeout"
        ),
    }
    targets
}

/// Messages are built in slices of one buffer of at least this many bytes. The producer copies a
/// value into its batch and drops it before the next send, so when the buffer is used up its
/// space is reclaimed in place instead of allocated again.
const ARENA_BYTES_MIN: usize = 1 << 20;
/// Longest key loadgen writes: `key-` and a u64 in decimal.
const KEY_BYTES_MAX: usize = 24;

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
    fn poll_settle(&mut self, cx: &mut Context<'_>, ctx: &ProducerCtx) -> Poll<()> {
        self.wake.task.register(cx.waker());
        if !self.wake.woken.swap(false, Ordering::Acquire) {
            return Poll::Pending;
        }
        let waker = waker_ref(&self.wake);
        let mut delivery_cx = Context::from_waker(&waker);
        let done_us = ctx.clock.now_micros();
        let mut settled = 0;
        let mut stats = ctx.stats.lock();
        for queue in &mut self.partitions {
            while let Some(front) = queue.front_mut() {
                let Poll::Ready(result) = Pin::new(&mut front.delivery).poll(&mut delivery_cx) else {
                    break;
                };
                match result {
                    Ok(_) => stats.published(front.intended_us, done_us, front.value_bytes, &ctx.window),
                    Err(e) => stats.error(format!("produce to {}: {e}", ctx.topic)),
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

async fn produce(producer: Producer, ctx: ProducerCtx) {
    let w = &*ctx.workload;
    let (size_min, size_max) = w.size_range();
    let mut rng = Rng::new(0x5eed_0000 + u64::from(ctx.id));
    let mut filler = vec![0u8; size_max];
    for b in filler.iter_mut() {
        *b = (rng.next_u64() & 0xff) as u8;
    }
    let arena_bytes = ARENA_BYTES_MIN.max(16 * (size_max + KEY_BYTES_MAX));
    let mut arena = BytesMut::with_capacity(arena_bytes);
    // Keyless messages stick to one partition for a batch's worth, then move on (as Kafka's sticky
    // partitioner does), so batches fill up however many partitions there are.
    let sticky_run = (w.batch_bytes / size_min.max(1)).max(1) as u64;
    let mut sent = 0u64;
    let mut schedule = Schedule::new(ctx.start, ctx.rate);
    let mut deliveries = Deliveries::new(ctx.partitions);
    loop {
        let intended = schedule.next(Instant::now());
        if intended >= ctx.end {
            break;
        }
        while schedule.is_fixed_rate() && Instant::now() < intended {
            tokio::select! {
                biased;
                _ = poll_fn(|cx| deliveries.poll_settle(cx, &ctx)), if !deliveries.is_empty() => {}
                _ = tokio::time::sleep_until(intended.into()) => {}
            }
        }
        let intended_us = ctx.clock.micros(intended);
        let size = if size_min == size_max { size_min } else { rng.between(size_min, size_max) };
        if arena.capacity() < size + KEY_BYTES_MAX {
            arena.reserve(arena_bytes);
        }
        message::write_header(&mut filler, intended_us, ctx.id);
        arena.extend_from_slice(&filler[..size]);
        let value = arena.split().freeze();
        // `BytesMut` grows as `fmt::Write` and never fails.
        let key = match w.keys {
            Keys::None => None,
            Keys::Random => {
                let _ = write!(arena, "{:016x}", rng.next_u64());
                Some(arena.split().freeze())
            }
            Keys::Space(n) => {
                let _ = write!(arena, "key-{}", rng.next_u64() % n);
                Some(arena.split().freeze())
            }
        };
        // Keyed messages go where the client's key-hash partitioner would put them; naming the
        // partition here tells which partition's queue of deliveries the send joins.
        let partition = match &key {
            None => ((sent / sticky_run + u64::from(ctx.id)) % u64::from(ctx.partitions)) as u32,
            Some(key) => key_partition(key, ctx.partitions),
        };
        let send = producer.send_to(&ctx.topic, partition, key, value);
        tokio::pin!(send);
        let queued = loop {
            tokio::select! {
                biased;
                _ = poll_fn(|cx| deliveries.poll_settle(cx, &ctx)), if !deliveries.is_empty() => {}
                queued = &mut send => break queued,
            }
        };
        sent += 1;
        match queued {
            Ok(delivery) => deliveries.push(partition, Pending { intended_us, value_bytes: size, delivery }),
            Err(e) => {
                ctx.stats.lock().error(format!("produce to {}: {e}", ctx.topic));
                // A refused send (closed producer, unknown topic) will not get better by spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    producer.flush().await;
    while !deliveries.is_empty() {
        poll_fn(|cx| deliveries.poll_settle(cx, &ctx)).await;
    }
    producer.close().await;
}

async fn consume(
    mut consumer: Consumer,
    clock: Clock,
    window: Window,
    give_up: Instant,
    mut drain: watch::Receiver<DrainTargets>,
    stats: SharedStats,
) {
    let assigned = consumer.assignment();
    loop {
        match consumer.poll(POLL_WAIT).await {
            Ok(records) => {
                let now_us = clock.now_micros();
                let mut s = stats.lock();
                for r in &records {
                    let value = r.value.as_deref().unwrap_or_default();
                    s.consumed(message::read_header(value), now_us, value.len(), &window);
                }
            }
            Err(e) => {
                stats.lock().error(format!("consume: {e}"));
                tokio::time::sleep(POLL_WAIT).await;
            }
        }
        let targets = drain.borrow_and_update().clone();
        if let Some(targets) = targets {
            let caught_up = assigned.iter().all(|(topic, p)| {
                let target = targets.get(&(topic.clone(), *p)).copied().unwrap_or(0);
                consumer.position(topic, *p).is_some_and(|pos| pos >= target)
            });
            if caught_up {
                return;
            }
            if Instant::now() >= give_up {
                stats
                    .lock()
                    .error("consumer gave up: drain_timeout_s passed before it read everything".into());
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_use_allowed_characters() {
        assert_eq!(topic_prefix("fixed rate/100p", 255), "loadgen-fixed-rate-100p-ff");
    }
}
