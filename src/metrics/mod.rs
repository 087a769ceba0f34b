//! Broker metrics: shard-local recording, snapshots gathered over the mesh, Prometheus exposition
//! and the admin HTTP listener (`GET /metrics`, `GET /health`).
//!
//! Owns: every counter and latency histogram the broker keeps about itself. Recording is
//! shard-local: each shard thread has its own `Recorder` in a thread-local `RefCell` (a glommio
//! executor is one thread, so the thread *is* the shard), written with plain adds and HDR
//! histogram increments — no atomics, no locks, no allocation after a topic's first record. A
//! scrape on shard 0 asks every other shard for a `ShardSnapshot` (one `ShardMsg::Metrics` each)
//! and renders them all; nothing is shared between shards in between.
//!
//! The thread-local is deliberate: the storage layer records write and fsync latency without
//! knowing about shards, and the hooks in `server`, `shard` and `storage` stay one line each.
//! May depend on `shard` (to read its gauges at snapshot time), `storage::CacheStats`, `protocol`
//! enums and glommio; nothing depends on it but those one-line hooks.

pub mod exposition;
pub mod http;

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;

use crate::protocol::wire::{self, RequestBody};
use crate::shard::Shard;
use crate::storage::CacheStats;

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
    /// Partitions of produce or fetch requests that failed on this shard (their owner).
    pub partition_errors: u64,
    pub latency: Latency,
}

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
    /// Indexed by `RequestBody` value; `None` until the first request of that type.
    apis: Vec<Option<ApiStats>>,
    /// Kafka-protocol requests, indexed by Kafka API key.
    kafka_apis: Vec<Option<ApiStats>>,
    topics: HashMap<Arc<str>, TopicTraffic>,
    segment_write: Latency,
    fsync: Latency,
    io: IoCounters,
}

impl Recorder {
    fn new() -> Recorder {
        Recorder {
            apis: Vec::new(),
            kafka_apis: Vec::new(),
            topics: HashMap::new(),
            segment_write: Latency::new(),
            fsync: Latency::new(),
            io: IoCounters::default(),
        }
    }

    fn api(&mut self, api: RequestBody) -> &mut ApiStats {
        let index = api.0 as usize;
        if self.apis.len() <= index {
            self.apis.resize_with(index + 1, || None);
        }
        self.apis[index].get_or_insert_with(|| ApiStats {
            api: api_name(api),
            requests: 0,
            errors: 0,
            partition_errors: 0,
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

/// The API's name as the metrics label: the request type without its `Request` suffix, in
/// snake case (`ProduceRequest` → `produce`).
pub fn api_name(api: RequestBody) -> &'static str {
    match api {
        RequestBody::HandshakeRequest => "handshake",
        RequestBody::MetadataRequest => "metadata",
        RequestBody::CreateTopicRequest => "create_topic",
        RequestBody::DeleteTopicRequest => "delete_topic",
        RequestBody::ProduceRequest => "produce",
        RequestBody::FetchRequest => "fetch",
        RequestBody::ListOffsetsRequest => "list_offsets",
        RequestBody::FindCoordinatorRequest => "find_coordinator",
        RequestBody::JoinGroupRequest => "join_group",
        RequestBody::SyncGroupRequest => "sync_group",
        RequestBody::HeartbeatRequest => "heartbeat",
        RequestBody::LeaveGroupRequest => "leave_group",
        RequestBody::OffsetCommitRequest => "offset_commit",
        RequestBody::OffsetFetchRequest => "offset_fetch",
        RequestBody::ListGroupsRequest => "list_groups",
        RequestBody::DescribeGroupRequest => "describe_group",
        RequestBody::DeleteGroupRequest => "delete_group",
        RequestBody::ResetOffsetsRequest => "reset_offsets",
        _ => "unknown",
    }
}

// ---- Recording hooks (one call per site) --------------------------------------------------------

/// A request answered: its API, the time from decode to the reply being ready, and whether the
/// reply was a request-level error.
pub fn request_done(api: RequestBody, started: Instant, error: bool) {
    let elapsed = started.elapsed();
    with(|r| {
        let stats = r.api(api);
        stats.requests += 1;
        stats.errors += u64::from(error);
        stats.latency.record(elapsed);
    });
}

/// A Kafka-protocol request answered, labelled `name` (`kafka_produce`, ...): as
/// [`request_done`]; `error` when the connection was closed instead of answered.
pub fn kafka_request_done(api_key: i16, name: &'static str, started: Instant, error: bool) {
    let elapsed = started.elapsed();
    let Ok(index) = usize::try_from(api_key) else { return };
    with(|r| {
        if r.kafka_apis.len() <= index {
            r.kafka_apis.resize_with(index + 1, || None);
        }
        let stats = r.kafka_apis[index].get_or_insert_with(|| ApiStats {
            api: name,
            requests: 0,
            errors: 0,
            partition_errors: 0,
            latency: Latency::new(),
        });
        stats.requests += 1;
        stats.errors += u64::from(error);
        stats.latency.record(elapsed);
    });
}

/// Whether an encoded `Response` header carries a request-level error code. Reads the one field
/// through bounds-checked slicing instead of verifying the whole buffer, whose cost grows with
/// the number of partitions in the response.
pub fn response_is_error(header: &[u8]) -> bool {
    fn u16_at(b: &[u8], at: usize) -> Option<u16> {
        Some(u16::from_le_bytes(b.get(at..at.checked_add(2)?)?.try_into().ok()?))
    }
    fn u32_at(b: &[u8], at: usize) -> Option<u32> {
        Some(u32::from_le_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?))
    }
    let code = (|| {
        let table = u32_at(header, 0)? as usize;
        let vtable = (table as i64).checked_sub(i64::from(u32_at(header, table)? as i32))?;
        let vtable = usize::try_from(vtable).ok()?;
        let field = usize::from(wire::Response::VT_ERROR);
        if usize::from(u16_at(header, vtable)?) <= field {
            return Some(0);
        }
        match u16_at(header, vtable + field)? {
            0 => Some(0),
            offset => u16_at(header, table + usize::from(offset)),
        }
    })();
    code.is_some_and(|c| c != 0)
}

/// One partition of a produce or fetch failed on its owner shard.
pub fn partition_error(api: RequestBody) {
    with(|r| r.api(api).partition_errors += 1);
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

/// A fetch read from a partition of `topic` owned by this shard: the whole batches it returned,
/// or its failure.
pub fn fetch_done<E>(topic: &Arc<str>, read: Result<&[Bytes], E>) {
    let Ok(chunks) = read else {
        partition_error(RequestBody::FetchRequest);
        return;
    };
    let mut bytes = 0u64;
    let mut records = 0u64;
    for chunk in chunks {
        bytes += chunk.len() as u64;
        for (header, _) in crate::record::batches(chunk).flatten() {
            records += (i64::from(header.last_offset_delta) + 1) as u64;
        }
    }
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

/// Runs one fdatasync of a segment file, timing it.
pub async fn timed_fsync<F: Future>(sync: F) -> F::Output {
    let started = Instant::now();
    let out = sync.await;
    with(|r| r.fsync.record(started.elapsed()));
    out
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
    pub segment_write: Latency,
    pub fsync: Latency,
    pub cache: CacheStats,
    pub io: IoCounters,
}

/// This shard's snapshot. Runs on the shard's own thread (directly or from `ShardMsg::Metrics`).
pub fn snapshot(shard: &Shard) -> ShardSnapshot {
    let io_delta = glommio::executor().io_stats();
    let topics_owned: Vec<(Arc<str>, usize)> = shard
        .topic_names()
        .into_iter()
        .filter_map(|name| {
            let view = shard.topic(&name)?;
            let owned = view.partition_shards.iter().filter(|&&s| s == shard.id).count();
            Some((name, owned))
        })
        .collect();
    with(|r| {
        // glommio resets its counters when read, so they are accumulated here.
        for ring in [io_delta.main_ring, io_delta.latency_ring, io_delta.poll_ring] {
            let (reads, bytes_read) = ring.file_reads();
            let (writes, bytes_written) = ring.file_writes();
            r.io.file_reads += reads;
            r.io.file_bytes_read += bytes_read;
            r.io.file_writes += writes;
            r.io.file_bytes_written += bytes_written;
        }
        // Forget deleted topics, so topic churn does not grow the recorder.
        let known: std::collections::HashSet<&str> = topics_owned.iter().map(|(name, _)| &**name).collect();
        r.topics.retain(|name, _| known.contains(&**name));
        let topics = topics_owned
            .into_iter()
            .map(|(name, owned)| {
                let traffic = r.topics.get(&*name).copied().unwrap_or_default();
                (name, owned, traffic)
            })
            .collect();
        ShardSnapshot {
            shard: shard.id,
            connections: shard.connections.get(),
            cross_shard_hops: shard.cross_shard_hops.get(),
            topics,
            apis: r.apis.iter().chain(&r.kafka_apis).flatten().cloned().collect(),
            segment_write: r.segment_write.clone(),
            fsync: r.fsync.clone(),
            cache: shard.storage.cache_stats(),
            io: r.io,
        }
    })
}
