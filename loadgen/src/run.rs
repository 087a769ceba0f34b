//! One benchmark run: create the topics, start consumers and producers as tokio tasks, report
//! progress once a second, drain, and assemble the report — the same for every protocol.
//!
//! Owns: task layout, the run's phases, and the protocol-neutral interface the tasks go through:
//! [`Broker`] (topics, drain targets, connecting producers and consumers), [`Sink`] (a producer's
//! sends) and [`Source`] (a consumer's polls), each with a native (`native`) and a Kafka
//! (`kafka`) implementation. Producers follow their `Schedule` and build each message in one
//! reused buffer; the sink records its publish latency from the intended send time when its batch
//! is acknowledged. Consumers read their share of the partitions from the beginning (explicit
//! assignment, no consumer-group protocol) and record end-to-end latency from the send time inside
//! each message. After the producers stop, consumers keep reading until they reach the high
//! watermark of every partition they read (or `drain_timeout_s` passes), so the report can say
//! whether every produced message was consumed.

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringlog::client::key_partition;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::kafka;
use crate::message::{self, Clock, Rng};
use crate::native;
use crate::rate::{PreciseSleep, Schedule};
use crate::report::{round, Backlog, BrokerInfo, MachineInfo, Percentiles, Point, Report};
use crate::stats::{quantile_us, Recorder, SharedStats, Tally, Window};
use crate::workload::{Keys, Protocol, Workload};
use crate::LoadgenError;

/// How long one consumer poll waits for data.
const POLL_WAIT: Duration = Duration::from_millis(100);
/// How often a backlog phase checks whether its tasks are done.
const PHASE_END_CHECK: Duration = Duration::from_millis(5);
/// Longest key loadgen writes: `key-` and a u64 in decimal.
pub const KEY_BYTES_MAX: usize = 24;
/// What the report says about how consumers get their partitions.
pub const CONSUMER_ASSIGNMENT: &str =
    "explicit: each consumer reads its share of the partitions from the start (no consumer-group protocol)";

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
    partitions: u32,
    rate: f64,
    clock: Clock,
    start: Instant,
    end: Instant,
    /// Stop after sending this many bytes of message values (the backlog fill).
    bytes_max: u64,
    workload: Arc<Workload>,
    recorder: Recorder,
}

/// The broker as a run uses it, over either protocol.
enum Broker {
    Native(native::Admin),
    Kafka { cluster: kafka::Cluster, layout: kafka::Layout },
}

impl Broker {
    /// Connects and describes the broker in `info`.
    async fn connect(w: &Workload, bootstrap: &str, info: &mut BrokerInfo) -> Result<Broker, LoadgenError> {
        Ok(match w.protocol {
            Protocol::Native => {
                let admin = native::Admin::connect(bootstrap).await?;
                info.shards = Some(admin.shards);
                Broker::Native(admin)
            }
            Protocol::Kafka => {
                let cluster = kafka::Cluster::connect(bootstrap).await?;
                info.brokers = Some(cluster.broker_count() as u32);
                info.kafka_api_versions = Some(cluster.versions().into_iter().collect());
                Broker::Kafka { cluster, layout: kafka::Layout::default() }
            }
        })
    }

    /// Creates every topic, or none.
    async fn create_topics(&mut self, topics: &[String], w: &Workload) -> Result<(), LoadgenError> {
        match self {
            Broker::Native(admin) => admin.create_topics(topics, w).await,
            Broker::Kafka { cluster, layout } => {
                *layout = cluster.create_topics(topics, &kafka_topic_spec(w)).await?;
                Ok(())
            }
        }
    }

    async fn delete_topics(&mut self, topics: &[String]) -> Result<(), String> {
        match self {
            Broker::Native(admin) => admin.delete_topics(topics).await,
            Broker::Kafka { cluster, .. } => cluster.delete_topics(topics).await.map_err(|e| e.to_string()),
        }
    }

    /// Every partition's high watermark.
    async fn end_offsets(&mut self, topics: &[String]) -> Result<HashMap<(Arc<str>, u32), i64>, String> {
        match self {
            Broker::Native(admin) => admin.end_offsets(topics).await,
            Broker::Kafka { cluster, .. } => {
                cluster.list_offsets(topics, kafka::LATEST_TIMESTAMP).await.map_err(|e| e.to_string())
            }
        }
    }

    async fn producer(&self, w: &Workload, topic: &str) -> Result<Sink, LoadgenError> {
        Ok(match self {
            Broker::Native(admin) => Sink::Native(admin.producer(w, topic).await?),
            Broker::Kafka { layout, .. } => {
                let settings = kafka::ProducerSettings {
                    acks: i16::from(w.acks.to_wire()),
                    linger: Duration::from_millis(w.linger_ms),
                    batch_bytes: w.batch_bytes,
                };
                Sink::Kafka(kafka::Producer::connect(layout, topic, settings).await?)
            }
        })
    }

    async fn consumer(&self, assigned: Vec<(String, u32)>) -> Result<Source, LoadgenError> {
        Ok(match self {
            Broker::Native(admin) => Source::Native(Box::new(admin.consumer(assigned).await?)),
            Broker::Kafka { layout, .. } => {
                Source::Kafka(kafka::Consumer::connect(layout, &assigned, POLL_WAIT).await?)
            }
        })
    }
}

/// The Kafka topic configs for the workload's topic settings.
fn kafka_topic_spec(w: &Workload) -> kafka::TopicSpec {
    let c = &w.topic_config;
    let mut configs = Vec::new();
    for (name, value) in [
        ("retention.bytes", c.retention_bytes),
        ("retention.ms", c.retention_ms),
        ("segment.bytes", c.segment_bytes),
    ] {
        if let Some(v) = value {
            configs.push((name.to_string(), v.to_string()));
        }
    }
    if let Some(d) = &c.durability {
        configs.push((kafka::DURABILITY_CONFIG.to_string(), d.clone()));
    }
    kafka::TopicSpec {
        partitions: w.partitions,
        replication_factor: c.replication_factor.unwrap_or(-1),
        configs,
    }
}

/// Where a producer task's messages go. Each implementation records into `recorder` every
/// message's publish latency (or failure) once its batch is acknowledged.
enum Sink {
    Native(native::Sink),
    Kafka(kafka::Producer),
}

impl Sink {
    /// Queues one message; waits only for the protocol's backpressure.
    async fn send(
        &mut self,
        partition: u32,
        key: Option<&[u8]>,
        value: &[u8],
        intended_us: u64,
        recorder: &Recorder,
    ) {
        match self {
            Sink::Native(s) => s.send(partition, key, value, intended_us, recorder).await,
            Sink::Kafka(s) => s.send(partition, key, value, intended_us, recorder).await,
        }
    }

    /// Settles acknowledgements until `deadline` (a fixed-rate producer between messages).
    async fn idle_until(&mut self, deadline: Instant, sleep: &mut PreciseSleep, recorder: &Recorder) {
        match self {
            Sink::Native(s) => s.idle_until(deadline, sleep, recorder).await,
            Sink::Kafka(s) => s.idle_until(deadline, sleep, recorder).await,
        }
    }

    /// Sends everything queued and settles every outcome.
    async fn finish(self, recorder: &Recorder) {
        match self {
            Sink::Native(s) => s.finish(recorder).await,
            Sink::Kafka(s) => s.finish(recorder).await,
        }
    }
}

/// Where a consumer task's messages come from. Each implementation records into `recorder`
/// every message's end-to-end latency.
enum Source {
    // Boxed: the native consumer is several times the size of the Kafka one.
    Native(Box<native::Source>),
    Kafka(kafka::Consumer),
}

impl Source {
    async fn poll(&mut self, recorder: &Recorder) -> Result<(), String> {
        match self {
            Source::Native(s) => s.poll(POLL_WAIT, recorder).await,
            Source::Kafka(s) => s.poll(recorder).await,
        }
    }

    fn assignment(&self) -> &[(Arc<str>, u32)] {
        match self {
            Source::Native(s) => s.assignment(),
            Source::Kafka(s) => s.assignment(),
        }
    }

    fn position(&self, topic: &str, partition: u32) -> Option<i64> {
        match self {
            Source::Native(s) => s.position(topic, partition),
            Source::Kafka(s) => s.position(topic, partition),
        }
    }
}

pub async fn run(workload: Workload, mut target: Target) -> Result<Report, LoadgenError> {
    let workload = Arc::new(workload);
    let w = &*workload;
    let started_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let machine = MachineInfo::detect();
    let mut broker = Broker::connect(w, &target.bootstrap, &mut target.broker).await?;
    let prefix = topic_prefix(&w.name, started_unix_ms);
    let topics: Vec<String> = (0..w.topics).map(|i| format!("{prefix}-{i}")).collect();
    broker.create_topics(&topics, w).await?;
    let result =
        run_on_topics(workload.clone(), &mut broker, &topics, &target, machine, started_unix_ms).await;
    if !target.keep_topics {
        if let Err(e) = broker.delete_topics(&topics).await {
            eprintln!("ringlog-loadgen: could not delete the run's topics: {e}");
        }
    }
    result
}

async fn run_on_topics(
    workload: Arc<Workload>,
    broker: &mut Broker,
    topics: &[String],
    target: &Target,
    machine: MachineInfo,
    started_unix_ms: u64,
) -> Result<Report, LoadgenError> {
    let w = &*workload;
    if w.backlog_bytes > 0 {
        return run_backlog(workload.clone(), broker, topics, target, machine, started_unix_ms).await;
    }
    let clock = Clock::new();
    let (drain_tx, drain_rx) = watch::channel::<DrainTargets>(None);

    // Consumers first, so they are waiting when the first message arrives.
    let consumer_start = connect_consumers(broker, w, topics).await?;
    let mut producers_ready = Vec::new();
    for topic in topics {
        for _ in 0..w.producers {
            producers_ready.push(broker.producer(w, topic).await?);
        }
    }

    let start = Instant::now();
    let warmup = Duration::from_secs_f64(w.warmup_s);
    let measured = Duration::from_secs_f64(w.duration_s);
    let end = start + warmup + measured;
    let window = Window { start_us: clock.micros(start + warmup), end_us: clock.micros(end) };
    let give_up = end + Duration::from_secs_f64(w.drain_timeout_s);
    let mut consumers: Vec<(SharedStats, JoinHandle<()>)> = Vec::new();
    for source in consumer_start {
        let recorder = Recorder { stats: SharedStats::new(), clock, window };
        consumers.push((
            recorder.stats.clone(),
            tokio::spawn(consume(source, give_up, drain_rx.clone(), recorder)),
        ));
    }
    let total_producers = producers_ready.len() as f64;
    let mut producers: Vec<(SharedStats, JoinHandle<()>)> = Vec::new();
    for (id, sink) in producers_ready.into_iter().enumerate() {
        let recorder = Recorder { stats: SharedStats::new(), clock, window };
        let stats = recorder.stats.clone();
        let ctx = ProducerCtx {
            id: id as u32,
            partitions: w.partitions,
            rate: w.rate / total_producers,
            clock,
            start,
            end,
            bytes_max: u64::MAX,
            workload: workload.clone(),
            recorder,
        };
        producers.push((stats, tokio::spawn(produce(sink, ctx))));
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
            let targets = broker.end_offsets(topics).await.unwrap_or_else(|e| {
                eprintln!(
                    "ringlog-loadgen: cannot read the final offsets ({e}); consumers stop at the drain timeout"
                );
                HashMap::new()
            });
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
        backlog: None,
        workload: (*workload).clone(),
        broker: target.broker.clone(),
        consumer_assignment: CONSUMER_ASSIGNMENT,
        machine,
        timeline,
        loadgen_version: env!("CARGO_PKG_VERSION"),
        started_unix_ms,
    })
}

/// One consumer per topic, group and consumer index, each assigned its share of the topic's
/// partitions (`p % consumers == c`); none when the workload has no consumers.
async fn connect_consumers(
    broker: &Broker,
    w: &Workload,
    topics: &[String],
) -> Result<Vec<Source>, LoadgenError> {
    let mut sources = Vec::new();
    for topic in topics {
        for _group in 0..w.consumer_groups.max(1) * u32::from(w.consumers > 0) {
            for c in 0..w.consumers {
                let assigned: Vec<(String, u32)> =
                    (0..w.partitions).filter(|p| p % w.consumers == c).map(|p| (topic.clone(), p)).collect();
                if !assigned.is_empty() {
                    sources.push(broker.consumer(assigned).await?);
                }
            }
        }
    }
    Ok(sources)
}

/// The backlog drain (`Workload::backlog_bytes`): the producers write the backlog while nothing
/// reads, then the consumers read it all from the beginning. The report's produce rate is the
/// fill's, its consume rate the drain's, each over its own phase.
async fn run_backlog(
    workload: Arc<Workload>,
    broker: &mut Broker,
    topics: &[String],
    target: &Target,
    machine: MachineInfo,
    started_unix_ms: u64,
) -> Result<Report, LoadgenError> {
    let w = &*workload;
    let clock = Clock::new();
    // Phases end when their work is done, not at a set time: every event counts.
    let unbounded = Duration::from_secs(7 * 24 * 3600);
    let start = Instant::now();
    let window = Window { start_us: clock.micros(start), end_us: clock.micros(start + unbounded) };
    let mut sinks = Vec::new();
    for topic in topics {
        for _ in 0..w.producers {
            sinks.push(broker.producer(w, topic).await?);
        }
    }
    let producer_count = sinks.len() as u64;
    let mut producers: Vec<(SharedStats, JoinHandle<()>)> = Vec::new();
    for (id, sink) in sinks.into_iter().enumerate() {
        let recorder = Recorder { stats: SharedStats::new(), clock, window };
        let stats = recorder.stats.clone();
        let ctx = ProducerCtx {
            id: id as u32,
            partitions: w.partitions,
            rate: w.rate / producer_count as f64,
            clock,
            start,
            end: start + unbounded,
            bytes_max: w.backlog_bytes.div_ceil(producer_count),
            workload: workload.clone(),
            recorder,
        };
        producers.push((stats, tokio::spawn(produce(sink, ctx))));
    }
    let mut timeline: Vec<Point> = Vec::new();
    watch_phase(&producers, start, "fill   ", target.progress, 0, &mut timeline).await;
    let fill_s = start.elapsed().as_secs_f64();

    let targets = broker.end_offsets(topics).await.map_err(LoadgenError::Broker)?;
    let (_drain_tx, drain_rx) = watch::channel::<DrainTargets>(Some(Arc::new(targets)));
    let sources = connect_consumers(broker, w, topics).await?;
    let acked: u64 = producers.iter().map(|(s, _)| s.lock().acked_total).sum();
    let drain_start = Instant::now();
    let give_up = drain_start + Duration::from_secs_f64(w.drain_timeout_s);
    let mut consumers: Vec<(SharedStats, JoinHandle<()>)> = Vec::new();
    for source in sources {
        let recorder = Recorder { stats: SharedStats::new(), clock, window };
        consumers.push((
            recorder.stats.clone(),
            tokio::spawn(consume(source, give_up, drain_rx.clone(), recorder)),
        ));
    }
    let expected = acked * u64::from(w.consumer_groups);
    watch_phase(&consumers, start, "drain  ", target.progress, expected, &mut timeline).await;
    let drain_s = drain_start.elapsed().as_secs_f64();

    let mut produced_tally = Tally::new();
    let mut consumed_tally = Tally::new();
    let (mut produced, mut consumed, mut produce_errors, mut consume_errors) = (0, 0, 0, 0);
    let mut first_error = None;
    let is_producer = (0..producers.len()).map(|_| true).chain((0..consumers.len()).map(|_| false));
    for ((stats, task), is_producer) in producers.into_iter().chain(consumers).zip(is_producer) {
        task.await.map_err(|e| LoadgenError::Task(e.to_string()))?;
        let s = stats.lock();
        if is_producer {
            produced_tally.add(&s.measured);
            produced += s.acked_total;
            produce_errors += s.errors;
        } else {
            consumed_tally.add(&s.measured);
            consumed += s.consumed_total;
            consume_errors += s.errors;
        }
        if first_error.is_none() {
            first_error = s.first_error.clone();
        }
    }
    let (produce_msgs_per_s, produce_mb_per_s, _, _) = Report::rates(&produced_tally, fill_s);
    let (_, _, consume_msgs_per_s, consume_mb_per_s) = Report::rates(&consumed_tally, drain_s);
    Ok(Report {
        produce_msgs_per_s,
        produce_mb_per_s,
        consume_msgs_per_s,
        consume_mb_per_s,
        publish_latency_us: Percentiles::of(&produced_tally.publish_us),
        e2e_latency_us: Percentiles::of(&consumed_tally.e2e_us),
        produced_msgs: produced,
        consumed_msgs: consumed,
        expected_consumed_msgs: produced * u64::from(w.consumer_groups),
        produce_errors,
        consume_errors,
        first_error,
        measured_s: round(drain_s, 3),
        warmup_s: 0.0,
        backlog: Some(Backlog {
            bytes: produced_tally.produced_bytes,
            fill_s: round(fill_s, 6),
            drain_s: round(drain_s, 6),
        }),
        workload: (*workload).clone(),
        broker: target.broker.clone(),
        consumer_assignment: CONSUMER_ASSIGNMENT,
        machine,
        timeline,
        loadgen_version: env!("CARGO_PKG_VERSION"),
        started_unix_ms,
    })
}

/// Reports progress once a second until every task of a phase is done. `expected` is the number
/// of messages the phase's consumers must read (0 for a phase of producers).
async fn watch_phase(
    tasks: &[(SharedStats, JoinHandle<()>)],
    start: Instant,
    phase: &str,
    progress: bool,
    expected: u64,
    timeline: &mut Vec<Point>,
) {
    let mut ticker = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    let mut last_tick = Instant::now();
    let mut interval = Tally::new();
    loop {
        // The phase's end is noticed within a few milliseconds; progress comes once a second.
        tokio::select! {
            _ = ticker.tick() => {}
            _ = tokio::time::sleep(PHASE_END_CHECK) => {
                if tasks.iter().all(|(_, t)| t.is_finished()) {
                    return;
                }
                continue;
            }
        }
        let now = Instant::now();
        interval.reset();
        let (mut acked, mut consumed) = (0u64, 0u64);
        for (stats, _) in tasks {
            let mut s = stats.lock();
            interval.add(&s.interval);
            s.interval.reset();
            acked += s.acked_total;
            consumed += s.consumed_total;
        }
        let dt = (now - last_tick).as_secs_f64().max(1e-3);
        last_tick = now;
        let point = Point {
            t_s: round((now - start).as_secs_f64(), 2),
            produce_msgs_per_s: round(interval.produced_msgs as f64 / dt, 1),
            consume_msgs_per_s: round(interval.consumed_msgs as f64 / dt, 1),
            publish_p99_us: quantile_us(&interval.publish_us, 0.99),
            e2e_p99_us: quantile_us(&interval.e2e_us, 0.99),
            backlog_msgs: if expected > 0 { expected.saturating_sub(consumed) as i64 } else { acked as i64 },
        };
        if progress {
            eprintln!(
                "[{:>6.1}s {phase}] produce {:>8.2} MB/s | consume {:>8.2} MB/s | backlog {:>10} msgs",
                point.t_s,
                interval.produced_bytes as f64 / dt / 1e6,
                interval.consumed_bytes as f64 / dt / 1e6,
                point.backlog_msgs,
            );
        }
        timeline.push(point);
    }
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

async fn produce(mut sink: Sink, ctx: ProducerCtx) {
    let w = &*ctx.workload;
    let (size_min, size_max) = w.size_range();
    let mut rng = Rng::new(0x5eed_0000 + u64::from(ctx.id));
    let mut filler = vec![0u8; size_max];
    for b in filler.iter_mut() {
        *b = (rng.next_u64() & 0xff) as u8;
    }
    let mut key = Vec::with_capacity(KEY_BYTES_MAX);
    // Keyless messages stick to one partition for a batch's worth, then move on (as Kafka's sticky
    // partitioner does), so batches fill up however many partitions there are.
    let sticky_run = (w.batch_bytes / size_min.max(1)).max(1) as u64;
    let mut sent = 0u64;
    let mut sent_bytes = 0u64;
    let mut schedule = Schedule::new(ctx.start, ctx.rate);
    let mut sleep = match PreciseSleep::new() {
        Ok(sleep) => sleep,
        Err(e) => {
            ctx.recorder.stats.lock().error(format!("producer {}: creating its timer: {e}", ctx.id));
            return;
        }
    };
    loop {
        let intended = schedule.next(Instant::now());
        if intended >= ctx.end {
            break;
        }
        if schedule.is_fixed_rate() && Instant::now() < intended {
            sink.idle_until(intended, &mut sleep, &ctx.recorder).await;
        }
        let intended_us = ctx.clock.micros(intended);
        let size = if size_min == size_max { size_min } else { rng.between(size_min, size_max) };
        message::write_header(&mut filler, intended_us, ctx.id);
        // Writing to a Vec never fails.
        key.clear();
        let key = match w.keys {
            Keys::None => None,
            Keys::Random => {
                let _ = write!(key, "{:016x}", rng.next_u64());
                Some(&key[..])
            }
            Keys::Space(n) => {
                let _ = write!(key, "key-{}", rng.next_u64() % n);
                Some(&key[..])
            }
        };
        debug_assert!(key.map_or(0, <[u8]>::len) <= KEY_BYTES_MAX);
        // Keyed messages go where Kafka's key-hash partitioner would put them.
        let partition = match key {
            None => ((sent / sticky_run + u64::from(ctx.id)) % u64::from(ctx.partitions)) as u32,
            Some(key) => key_partition(key, ctx.partitions),
        };
        sink.send(partition, key, &filler[..size], intended_us, &ctx.recorder).await;
        sent += 1;
        sent_bytes += size as u64;
        if sent_bytes >= ctx.bytes_max {
            break;
        }
    }
    sink.finish(&ctx.recorder).await;
}

async fn consume(
    mut source: Source,
    give_up: Instant,
    mut drain: watch::Receiver<DrainTargets>,
    recorder: Recorder,
) {
    let stats = &recorder.stats;
    loop {
        if let Err(e) = source.poll(&recorder).await {
            stats.lock().error(format!("consume: {e}"));
            tokio::time::sleep(POLL_WAIT).await;
        }
        let targets = drain.borrow_and_update().clone();
        if let Some(targets) = targets {
            let caught_up = source.assignment().iter().all(|(topic, p)| {
                let target = targets.get(&(topic.clone(), *p)).copied().unwrap_or(0);
                source.position(topic, *p).is_some_and(|pos| pos >= target)
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
