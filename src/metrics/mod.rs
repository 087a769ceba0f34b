//! Broker metrics: shard-local recording, per-shard snapshots and their Prometheus exposition.
//!
//! Owns: every counter and latency histogram the broker keeps about itself. Recording is
//! shard-local: each shard thread has its own `Recorder` in a thread-local `RefCell` (a glommio
//! executor is one thread, so the thread *is* the shard), written with plain adds and HDR
//! histogram increments — no atomics, no locks, no allocation after a topic's first record. A
//! scrape (the admin listener in `broker::admin`) asks every shard for a [`ShardSnapshot`], which
//! the shard builds from its gauges ([`ShardGauges`]) and what it recorded here; nothing is shared
//! between shards in between.
//!
//! A leaf: the layers above record into it with one-line hooks and hand it plain numbers and
//! names. The thread-local is deliberate: the storage layer records write and fsync latency
//! without knowing about shards. Depends on nothing in the crate.

pub mod exposition;

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Latencies are kept in microseconds from 1 µs to 10 minutes, 2 significant digits: about 20 KiB
/// per histogram, 1% value resolution, far finer than the exposition's buckets.
const LATENCY_US_MAX: u64 = 600_000_000;
const LATENCY_SIGNIFICANT_DIGITS: u8 = 2;

/// A latency distribution and its exact sum (HDR histograms only approximate the sum).
#[derive(Clone)]
pub struct Latency {
    pub histogram_us: Histogram<u64>,
    pub sum_us: u64,
}

impl Latency {
    fn new() -> Latency {
        // The bounds are constants that hdrhistogram accepts; a failure here is a programming error.
        let histogram_us = Histogram::new_with_bounds(1, LATENCY_US_MAX, LATENCY_SIGNIFICANT_DIGITS)
            .expect("constant histogram bounds are valid");
        Latency { histogram_us, sum_us: 0 }
    }

    fn record(&mut self, elapsed: Duration) {
        let us = (elapsed.as_micros() as u64).clamp(1, LATENCY_US_MAX);
        self.histogram_us.saturating_record(us);
        self.sum_us = self.sum_us.saturating_add(us);
    }

    pub fn count(&self) -> u64 {
        self.histogram_us.len()
    }
}

/// Requests of one API type on one shard (counted on the shard that holds the connection).
#[derive(Clone)]
pub struct ApiStats {
    pub api: &'static str,
    pub requests: u64,
    /// Requests answered with a request-level error or a closed connection.
    pub errors: u64,
    pub latency: Latency,
}

/// Which protocol an API belongs to; each numbers its APIs on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Native,
    Kafka,
}

/// An API as the metrics label it: its protocol, its number there, and its label.
#[derive(Clone, Copy, Debug)]
pub struct Api {
    pub family: Family,
    pub key: u16,
    pub name: &'static str,
}

/// The partition operations whose per-partition failures are counted on the owner shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartitionOp {
    Produce,
    Fetch,
}

impl PartitionOp {
    pub const ALL: [PartitionOp; 2] = [PartitionOp::Produce, PartitionOp::Fetch];

    pub fn label(self) -> &'static str {
        match self {
            PartitionOp::Produce => "produce",
            PartitionOp::Fetch => "fetch",
        }
    }
}

/// Counters of the shard's tail cache (filled in by the storage layer).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub used_bytes: usize,
    pub budget_bytes: usize,
    pub batches: usize,
}

/// Long-lived memory of a shard, by owner: the `component` label of `ringlog_memory_bytes`.
/// Most are computed by their owner when a snapshot is taken; the two connection gauges are
/// kept by plain adds as buffers and requests come and go ([`memory_grew`], [`memory_shrank`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Memory {
    /// Record batches the tail cache holds (what its budget counts).
    TailCache,
    /// The allocations those batches keep alive (at least `TailCache`; see `storage::tail_cache`).
    TailCachePinned,
    /// The tail cache's bookkeeping: its per-batch entries and LRU order.
    TailCacheIndex,
    /// In-memory offset and time indexes of every open segment.
    SegmentIndexes,
    /// Idempotent producers' state (epochs, last batches) of every partition.
    ProducerState,
    /// Bytes staged in aligned chunks for the partitions' flushers, and snapshots to write.
    WriteStaging,
    /// Consumer groups coordinated on this shard: members, assignments, committed offsets.
    GroupState,
    /// Connections' receive buffers.
    ConnectionBuffers,
    /// Requests read and not yet answered (bounded per connection by `bytes_in_flight_per_connection_max`).
    RequestsInFlight,
    /// This recorder: latency histograms and per-topic counters.
    Metrics,
}

impl Memory {
    pub const ALL: [Memory; 10] = [
        Memory::TailCache,
        Memory::TailCachePinned,
        Memory::TailCacheIndex,
        Memory::SegmentIndexes,
        Memory::ProducerState,
        Memory::WriteStaging,
        Memory::GroupState,
        Memory::ConnectionBuffers,
        Memory::RequestsInFlight,
        Memory::Metrics,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Memory::TailCache => "tail_cache",
            Memory::TailCachePinned => "tail_cache_pinned",
            Memory::TailCacheIndex => "tail_cache_index",
            Memory::SegmentIndexes => "segment_indexes",
            Memory::ProducerState => "producer_state",
            Memory::WriteStaging => "write_staging",
            Memory::GroupState => "group_state",
            Memory::ConnectionBuffers => "connection_buffers",
            Memory::RequestsInFlight => "requests_in_flight",
            Memory::Metrics => "metrics",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Sizes one owner's memory at snapshot time (an upper layer registers it with [`memory_source`]).
type MemorySource = Box<dyn Fn() -> usize>;

/// Traffic of one topic's partitions owned by one shard.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct TopicTraffic {
    pub bytes_in: u64,
    pub records_in: u64,
    pub bytes_out: u64,
    pub records_out: u64,
}

/// Cumulative glommio I/O counters of the shard (glommio hands out deltas; we add them up).
#[derive(Clone, Copy, Default, Debug)]
pub struct IoCounters {
    pub file_reads: u64,
    pub file_bytes_read: u64,
    pub file_writes: u64,
    pub file_bytes_written: u64,
}

/// What a shard records as it works. One per shard thread.
struct Recorder {
    /// Native-protocol requests, indexed by API number; `None` until the first of that type.
    apis: Vec<Option<ApiStats>>,
    /// Kafka-protocol requests, indexed by Kafka API key.
    kafka_apis: Vec<Option<ApiStats>>,
    /// Indexed like `PartitionOp::ALL`.
    partition_errors: [u64; 2],
    topics: HashMap<Arc<str>, TopicTraffic>,
    segment_write: Latency,
    fsync: Latency,
    io: IoCounters,
    /// The gauges kept by plain adds, indexed like `Memory::ALL`.
    memory_held: [usize; Memory::ALL.len()],
    memory_sources: Vec<(Memory, MemorySource)>,
}

impl Recorder {
    fn new() -> Recorder {
        Recorder {
            apis: Vec::new(),
            kafka_apis: Vec::new(),
            partition_errors: [0; 2],
            topics: HashMap::new(),
            segment_write: Latency::new(),
            fsync: Latency::new(),
            io: IoCounters::default(),
            memory_held: [0; Memory::ALL.len()],
            memory_sources: Vec::new(),
        }
    }

    /// What the recorder itself holds: the histograms' count arrays and the per-topic counters.
    fn own_bytes(&self) -> usize {
        let histogram = |l: &Latency| l.histogram_us.distinct_values() * std::mem::size_of::<u64>();
        let apis: usize =
            self.apis.iter().chain(&self.kafka_apis).flatten().map(|a| histogram(&a.latency)).sum();
        let tables =
            (self.apis.capacity() + self.kafka_apis.capacity()) * std::mem::size_of::<Option<ApiStats>>();
        // A hash map entry: key, value and one control byte; the key's string is a shared Arc.
        let topics = self.topics.capacity() * (std::mem::size_of::<(Arc<str>, TopicTraffic)>() + 1);
        apis + tables + topics + histogram(&self.segment_write) + histogram(&self.fsync)
    }

    fn api(&mut self, api: Api) -> &mut ApiStats {
        let table = match api.family {
            Family::Native => &mut self.apis,
            Family::Kafka => &mut self.kafka_apis,
        };
        let index = usize::from(api.key);
        if table.len() <= index {
            table.resize_with(index + 1, || None);
        }
        table[index].get_or_insert_with(|| ApiStats {
            api: api.name,
            requests: 0,
            errors: 0,
            latency: Latency::new(),
        })
    }

    fn topic(&mut self, topic: &Arc<str>, add: impl FnOnce(&mut TopicTraffic)) {
        // Looked up by &str: the Arc may belong to the connection's shard, and cloning it in the
        // steady state would bounce its reference count between cores.
        match self.topics.get_mut(&**topic) {
            Some(traffic) => add(traffic),
            None => {
                let mut traffic = TopicTraffic::default();
                add(&mut traffic);
                self.topics.insert(topic.clone(), traffic);
            }
        }
    }
}

thread_local! {
    static RECORDER: RefCell<Recorder> = RefCell::new(Recorder::new());
}

fn with<R>(f: impl FnOnce(&mut Recorder) -> R) -> R {
    RECORDER.with(|r| f(&mut r.borrow_mut()))
}

// ---- Recording hooks (one call per site) --------------------------------------------------------

/// A request answered: its API, the time from decode to the reply being ready, and whether the
/// reply was a request-level error (or the connection was closed instead of answered).
pub fn request_done(api: Api, started: Instant, error: bool) {
    let elapsed = started.elapsed();
    with(|r| {
        let stats = r.api(api);
        stats.requests += 1;
        stats.errors += u64::from(error);
        stats.latency.record(elapsed);
    });
}

/// One partition of a produce or fetch failed on its owner shard.
pub fn partition_error(op: PartitionOp) {
    let index = PartitionOp::ALL.iter().position(|&o| o == op).unwrap_or(0);
    with(|r| r.partition_errors[index] += 1);
}

/// Batches appended to a partition of `topic` owned by this shard.
pub fn appended(topic: &Arc<str>, bytes: usize, records: i64) {
    debug_assert!(records > 0, "an append holds at least one record");
    with(|r| {
        r.topic(topic, |t| {
            t.bytes_in += bytes as u64;
            t.records_in += records as u64;
        })
    });
}

/// A fetch read `bytes` holding `records` records from a partition of `topic` owned by this shard.
pub fn fetched(topic: &Arc<str>, bytes: u64, records: u64) {
    if bytes == 0 {
        return;
    }
    with(|r| {
        r.topic(topic, |t| {
            t.bytes_out += bytes;
            t.records_out += records;
        })
    });
}

/// Runs one O_DIRECT write of a staged chunk to a segment file, timing it.
pub async fn timed_segment_write<F: Future>(write: F) -> F::Output {
    let started = Instant::now();
    let out = write.await;
    with(|r| r.segment_write.record(started.elapsed()));
    out
}

/// Runs one sync that makes appends durable (a shard's syncfs round, a segment's fdatasync),
/// timing it.
pub async fn timed_fsync<F: Future>(sync: F) -> F::Output {
    let started = Instant::now();
    let out = sync.await;
    with(|r| r.fsync.record(started.elapsed()));
    out
}

/// `bytes` more of `component` are held on this shard (one of the gauges kept by plain adds).
pub fn memory_grew(component: Memory, bytes: usize) {
    with(|r| r.memory_held[component.index()] += bytes);
}

/// `bytes` of `component` were released on this shard.
pub fn memory_shrank(component: Memory, bytes: usize) {
    with(|r| {
        let held = &mut r.memory_held[component.index()];
        debug_assert!(*held >= bytes, "{} released more than it held", component.label());
        *held = held.saturating_sub(bytes);
    });
}

/// Registers `size` as this shard's measure of `component`, called at each snapshot. For state an
/// upper layer owns (group coordinators); `size` should hold a `Weak` to it, not keep it alive.
pub fn memory_source(component: Memory, size: impl Fn() -> usize + 'static) {
    with(|r| r.memory_sources.push((component, Box::new(size))));
}

// ---- Snapshots --------------------------------------------------------------------------------

/// Everything one shard reports, owned and `Send` so it can cross the mesh to the scraping shard.
#[derive(Clone)]
pub struct ShardSnapshot {
    pub shard: u32,
    pub connections: usize,
    pub cross_shard_hops: u64,
    /// Topic → partitions of it this shard owns, and their traffic.
    pub topics: Vec<(Arc<str>, usize, TopicTraffic)>,
    pub apis: Vec<ApiStats>,
    /// Per-partition failures of produce and fetch on this shard (their owner), by operation.
    pub partition_errors: Vec<(&'static str, u64)>,
    pub segment_write: Latency,
    pub fsync: Latency,
    pub cache: CacheStats,
    pub io: IoCounters,
    /// Bytes per component, in `Memory::ALL` order.
    pub memory: Vec<(Memory, usize)>,
}

/// What the shard knows about itself at snapshot time; the rest comes from its recorder.
pub struct ShardGauges {
    pub shard: u32,
    pub connections: usize,
    pub cross_shard_hops: u64,
    /// Topic → partitions of it this shard owns. Topics not listed are forgotten, so topic churn
    /// does not grow the recorder.
    pub topics_owned: Vec<(Arc<str>, usize)>,
    pub cache: CacheStats,
    /// I/O since the previous snapshot (glommio resets its counters when read).
    pub io_delta: IoCounters,
    /// Memory the shard's own structures hold (storage), sized now.
    pub memory: Vec<(Memory, usize)>,
}

/// This shard's snapshot. Runs on the shard's own thread.
pub fn snapshot(gauges: ShardGauges) -> ShardSnapshot {
    // Sources run outside the recorder's borrow: one may record a metric itself.
    let sources = with(|r| std::mem::take(&mut r.memory_sources));
    let mut memory: Vec<(Memory, usize)> = Memory::ALL.iter().map(|&c| (c, 0)).collect();
    for (component, size) in &sources {
        memory[component.index()].1 += size();
    }
    for (component, bytes) in &gauges.memory {
        memory[component.index()].1 += bytes;
    }
    with(|r| {
        let registered_meanwhile = std::mem::replace(&mut r.memory_sources, sources);
        r.memory_sources.extend(registered_meanwhile);
        for (held, (_, bytes)) in r.memory_held.iter().zip(memory.iter_mut()) {
            *bytes += held;
        }
        memory[Memory::Metrics.index()].1 += r.own_bytes();
        r.io.file_reads += gauges.io_delta.file_reads;
        r.io.file_bytes_read += gauges.io_delta.file_bytes_read;
        r.io.file_writes += gauges.io_delta.file_writes;
        r.io.file_bytes_written += gauges.io_delta.file_bytes_written;
        let known: std::collections::HashSet<&str> =
            gauges.topics_owned.iter().map(|(name, _)| &**name).collect();
        r.topics.retain(|name, _| known.contains(&**name));
        let topics = gauges
            .topics_owned
            .iter()
            .map(|(name, owned)| {
                let traffic = r.topics.get(&**name).copied().unwrap_or_default();
                (name.clone(), *owned, traffic)
            })
            .collect();
        ShardSnapshot {
            shard: gauges.shard,
            connections: gauges.connections,
            cross_shard_hops: gauges.cross_shard_hops,
            topics,
            apis: r.apis.iter().chain(&r.kafka_apis).flatten().cloned().collect(),
            partition_errors: PartitionOp::ALL
                .iter()
                .zip(r.partition_errors)
                .map(|(op, count)| (op.label(), count))
                .collect(),
            segment_write: r.segment_write.clone(),
            fsync: r.fsync.clone(),
            cache: gauges.cache,
            io: r.io,
            memory,
        }
    })
}
