//! Prometheus text exposition (format 0.0.4) of the shards' snapshots.
//!
//! Owns: metric names, help texts, labels and the conversion of HDR latency histograms into
//! Prometheus histogram buckets (seconds). Pure: takes snapshots, returns text; unit-tested.
//! Written by hand rather than through a metrics crate because the data are already-gathered
//! snapshots, not live metric objects: registering them in a registry per scrape would only copy
//! them once more.

use std::fmt::Write;

use super::{Latency, ShardSnapshot};

/// Upper bounds of the latency buckets, in microseconds (rendered in seconds).
const BUCKET_BOUNDS_US: [u64; 19] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// Process-wide figures read on the scraping shard.
#[derive(Clone, Debug, Default)]
pub struct ProcessInfo {
    pub resident_bytes: u64,
    pub shards: u32,
    pub uptime_seconds: f64,
    /// Raft traffic sent to each peer node; empty outside a cluster.
    pub peers: Vec<PeerTraffic>,
    /// This node's replicated partitions; `None` outside a cluster.
    pub replication: Option<ReplicationMetrics>,
}

/// A node's replicated partitions: what it leads and how its followers keep up.
#[derive(Debug, Clone, Default)]
pub struct ReplicationMetrics {
    /// Partitions this node leads.
    pub leaders: u64,
    /// Of those, the ones with fewer replicas in sync than replicas (Kafka's
    /// UnderReplicatedPartitions: counted on the leader, so a sum over nodes is the cluster's).
    pub under_replicated: u64,
    /// This node's replicas whose group knows no leader.
    pub leaderless: u64,
    /// Times a replica on this node learned of a new leader.
    pub leader_changes: u64,
    /// This node's replicas whose group is quiet (idle: no ticks, no heartbeats).
    pub quiesced: u64,
    /// This node's replicas stopped on a storage error, waiting to be reopened.
    pub stopped: u64,
    /// Elections this node's replicas run now (at most `raft_elections_max` of their own).
    pub elections_running: u64,
    pub partitions: Vec<LedPartition>,
}

/// A partition this node leads.
#[derive(Debug, Clone, Default)]
pub struct LedPartition {
    pub topic: String,
    pub partition: u32,
    pub replicas: u64,
    pub in_sync: u64,
    /// (follower, offsets of the leader's log it lacks), for followers that answered this leader.
    pub lags: Vec<(u64, i64)>,
}

/// What this node sent one peer node since it started.
#[derive(Debug, Clone, Copy, Default)]
pub struct PeerTraffic {
    pub peer: u64,
    pub frames: u64,
    pub messages: u64,
    pub bytes: u64,
    pub dropped_frames: u64,
}

/// Reads the resident set size from /proc/self/statm (0 when unavailable).
pub fn resident_bytes() -> u64 {
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else { return 0 };
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page.max(0) as u64
}

/// A counter family read from one field of `T`: name, help, getter.
type Family<T> = (&'static str, &'static str, fn(&T) -> u64);

struct Out {
    text: String,
}

impl Out {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"{}\"", escape(v));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], latency: &Latency) {
        let mut cumulative = [0u64; BUCKET_BOUNDS_US.len()];
        for v in latency.histogram_us.iter_recorded() {
            let value = latency.histogram_us.highest_equivalent(v.value_iterated_to());
            let first = BUCKET_BOUNDS_US.partition_point(|&b| b < value);
            for slot in &mut cumulative[first..] {
                *slot += v.count_at_value();
            }
        }
        let bucket = format!("{name}_bucket");
        for (bound, count) in BUCKET_BOUNDS_US.iter().zip(cumulative) {
            let le = format!("{}", *bound as f64 / 1e6);
            let mut l = labels.to_vec();
            l.push(("le", &le));
            self.sample(&bucket, &l, count);
        }
        let mut l = labels.to_vec();
        l.push(("le", "+Inf"));
        self.sample(&bucket, &l, latency.count());
        self.sample(&format!("{name}_sum"), labels, latency.sum_us as f64 / 1e6);
        self.sample(&format!("{name}_count"), labels, latency.count());
    }
}

/// Label values escape backslash, double quote and newline.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Renders every shard's snapshot (in shard order) and the process figures.
pub fn render(shards: &[ShardSnapshot], process: &ProcessInfo) -> String {
    let mut o = Out { text: String::with_capacity(16 << 10) };
    let ids: Vec<String> = shards.iter().map(|s| s.shard.to_string()).collect();

    o.header("ringlog_up", "gauge", "1 while the broker serves requests.");
    o.sample("ringlog_up", &[], 1);
    o.header("ringlog_shards", "gauge", "Shards (one per core) this broker runs.");
    o.sample("ringlog_shards", &[], process.shards);
    o.header("ringlog_uptime_seconds", "gauge", "Seconds since the broker started serving.");
    o.sample("ringlog_uptime_seconds", &[], format!("{:.3}", process.uptime_seconds));
    o.header("ringlog_process_resident_bytes", "gauge", "Resident memory of the broker process.");
    o.sample("ringlog_process_resident_bytes", &[], process.resident_bytes);

    o.header("ringlog_connections", "gauge", "Open client connections per shard.");
    for (s, id) in shards.iter().zip(&ids) {
        o.sample("ringlog_connections", &[("shard", id)], s.connections);
    }
    o.header(
        "ringlog_cross_shard_hops_total",
        "counter",
        "Messages this shard sent to another shard over the mesh (requests for partitions it does not own).",
    );
    for (s, id) in shards.iter().zip(&ids) {
        o.sample("ringlog_cross_shard_hops_total", &[("shard", id)], s.cross_shard_hops);
    }
    o.header("ringlog_partitions", "gauge", "Partitions per topic owned by each shard.");
    for (s, id) in shards.iter().zip(&ids) {
        for (topic, owned, _) in &s.topics {
            o.sample("ringlog_partitions", &[("shard", id), ("topic", topic)], owned);
        }
    }
    let traffic: [Family<super::TopicTraffic>; 4] = [
        ("ringlog_topic_bytes_in_total", "Record batch bytes appended, per topic and owner shard.", |t| {
            t.bytes_in
        }),
        ("ringlog_topic_records_in_total", "Records appended, per topic and owner shard.", |t| t.records_in),
        (
            "ringlog_topic_bytes_out_total",
            "Record batch bytes read for fetches, per topic and owner shard.",
            |t| t.bytes_out,
        ),
        ("ringlog_topic_records_out_total", "Records read for fetches, per topic and owner shard.", |t| {
            t.records_out
        }),
    ];
    for (name, help, get) in traffic {
        o.header(name, "counter", help);
        for (s, id) in shards.iter().zip(&ids) {
            for (topic, _, t) in &s.topics {
                o.sample(name, &[("shard", id), ("topic", topic)], get(t));
            }
        }
    }

    o.header(
        "ringlog_requests_total",
        "counter",
        "Requests per API, counted on the shard holding the connection.",
    );
    for (s, id) in shards.iter().zip(&ids) {
        for a in &s.apis {
            o.sample("ringlog_requests_total", &[("shard", id), ("api", a.api)], a.requests);
        }
    }
    o.header(
        "ringlog_request_errors_total",
        "counter",
        "Requests answered with a request-level error (or a closed connection), per API.",
    );
    for (s, id) in shards.iter().zip(&ids) {
        for a in &s.apis {
            o.sample("ringlog_request_errors_total", &[("shard", id), ("api", a.api)], a.errors);
        }
    }
    o.header(
        "ringlog_partition_errors_total",
        "counter",
        "Partitions of produce/fetch requests that failed, counted on the partition's owner shard.",
    );
    for (s, id) in shards.iter().zip(&ids) {
        for (api, count) in &s.partition_errors {
            o.sample("ringlog_partition_errors_total", &[("shard", id), ("api", api)], *count);
        }
    }
    o.header(
        "ringlog_request_duration_seconds",
        "histogram",
        "Time from decoding a request to its reply being ready (fetch includes long-poll waits).",
    );
    for (s, id) in shards.iter().zip(&ids) {
        for a in &s.apis {
            o.histogram("ringlog_request_duration_seconds", &[("shard", id), ("api", a.api)], &a.latency);
        }
    }
    o.header(
        "ringlog_segment_write_duration_seconds",
        "histogram",
        "One O_DIRECT write of staged batches to a segment file (the append to disk).",
    );
    for (s, id) in shards.iter().zip(&ids) {
        o.histogram("ringlog_segment_write_duration_seconds", &[("shard", id)], &s.segment_write);
    }
    o.header(
        "ringlog_fsync_duration_seconds",
        "histogram",
        "One sync that makes appends durable: a shard's syncfs round, or an fdatasync of a segment file (fsync_scope).",
    );
    for (s, id) in shards.iter().zip(&ids) {
        o.histogram("ringlog_fsync_duration_seconds", &[("shard", id)], &s.fsync);
    }

    o.header("ringlog_tail_cache_hits_total", "counter", "Fetch reads served from the shard's tail cache.");
    for (s, id) in shards.iter().zip(&ids) {
        o.sample("ringlog_tail_cache_hits_total", &[("shard", id)], s.cache.hits);
    }
    o.header("ringlog_tail_cache_misses_total", "counter", "Fetch reads that went to disk.");
    for (s, id) in shards.iter().zip(&ids) {
        o.sample("ringlog_tail_cache_misses_total", &[("shard", id)], s.cache.misses);
    }
    o.header(
        "ringlog_memory_used_bytes",
        "gauge",
        "Memory held against the shard's budget (tail cache bytes).",
    );
    for (s, id) in shards.iter().zip(&ids) {
        o.sample("ringlog_memory_used_bytes", &[("shard", id)], s.cache.used_bytes);
    }
    o.header("ringlog_memory_budget_bytes", "gauge", "The shard's memory budget (tail_cache_bytes).");
    for (s, id) in shards.iter().zip(&ids) {
        o.sample("ringlog_memory_budget_bytes", &[("shard", id)], s.cache.budget_bytes);
    }
    o.header(
        "ringlog_memory_bytes",
        "gauge",
        "Long-lived memory of the shard by owner. tail_cache_pinned counts the allocations the \
         cached batches keep alive, so tail_cache and tail_cache_pinned overlap: do not add them.",
    );
    for (s, id) in shards.iter().zip(&ids) {
        for (component, bytes) in &s.memory {
            o.sample("ringlog_memory_bytes", &[("shard", id), ("component", component.label())], bytes);
        }
    }

    let io: [Family<super::IoCounters>; 4] = [
        ("ringlog_io_file_reads_total", "File reads submitted through the shard's io_uring rings.", |c| {
            c.file_reads
        }),
        ("ringlog_io_file_read_bytes_total", "Bytes read from files through io_uring.", |c| {
            c.file_bytes_read
        }),
        ("ringlog_io_file_writes_total", "File writes submitted through the shard's io_uring rings.", |c| {
            c.file_writes
        }),
        ("ringlog_io_file_written_bytes_total", "Bytes written to files through io_uring.", |c| {
            c.file_bytes_written
        }),
    ];
    let peers: [Family<PeerTraffic>; 4] = [
        (
            "ringlog_raft_frames_sent_total",
            "Frames sent to a peer node (every group's messages to it, gathered).",
            |p| p.frames,
        ),
        ("ringlog_raft_messages_sent_total", "Raft messages sent to a peer node.", |p| p.messages),
        ("ringlog_raft_bytes_sent_total", "Bytes of frames sent to a peer node.", |p| p.bytes),
        (
            "ringlog_raft_frames_dropped_total",
            "Frames dropped for a peer node whose connection queue was full (down or slow).",
            |p| p.dropped_frames,
        ),
    ];
    for (name, help, get) in peers {
        if process.peers.is_empty() {
            break;
        }
        o.header(name, "counter", help);
        for p in &process.peers {
            o.sample(name, &[("peer", &p.peer.to_string())], get(p));
        }
    }
    for (name, help, get) in io {
        o.header(name, "counter", help);
        for (s, id) in shards.iter().zip(&ids) {
            o.sample(name, &[("shard", id)], get(&s.io));
        }
    }
    if let Some(replication) = &process.replication {
        render_replication(&mut o, replication);
    }
    o.text
}

fn render_replication(o: &mut Out, r: &ReplicationMetrics) {
    let node: [(&str, &str, &str, u64); 7] = [
        ("ringlog_partition_leaders", "gauge", "Replicated partitions this node leads.", r.leaders),
        (
            "ringlog_under_replicated_partitions",
            "gauge",
            "Partitions this node leads with fewer replicas in sync than replicas (summed over nodes: \
             the cluster's).",
            r.under_replicated,
        ),
        (
            "ringlog_leaderless_partitions",
            "gauge",
            "Replicas on this node whose partition has no leader it knows of.",
            r.leaderless,
        ),
        (
            "ringlog_leader_changes_total",
            "counter",
            "Times a replica on this node learned of a new leader (a new term with a leader).",
            r.leader_changes,
        ),
        (
            "ringlog_raft_groups_quiesced",
            "gauge",
            "Replicas on this node whose Raft group is quiet: idle, so neither ticked nor heartbeating.",
            r.quiesced,
        ),
        (
            "ringlog_replicas_stopped",
            "gauge",
            "Replicas on this node stopped on a storage error (full disk, failed write), reopened from their files once they can be.",
            r.stopped,
        ),
        (
            "ringlog_raft_elections_running",
            "gauge",
            "Elections this node's replicas run now; those falling due beyond raft_elections_max wait for a slot.",
            r.elections_running,
        ),
    ];
    for (name, kind, help, value) in node {
        o.header(name, kind, help);
        o.sample(name, &[], value);
    }
    let partition = |p: &LedPartition| (p.topic.clone(), p.partition.to_string());
    o.header("ringlog_partition_replicas", "gauge", "Replicas of each partition this node leads.");
    for p in &r.partitions {
        let (topic, index) = partition(p);
        o.sample("ringlog_partition_replicas", &[("topic", &topic), ("partition", &index)], p.replicas);
    }
    o.header(
        "ringlog_partition_in_sync_replicas",
        "gauge",
        "Replicas in sync with the leader (itself included), for each partition this node leads.",
    );
    for p in &r.partitions {
        let (topic, index) = partition(p);
        o.sample(
            "ringlog_partition_in_sync_replicas",
            &[("topic", &topic), ("partition", &index)],
            p.in_sync,
        );
    }
    o.header(
        "ringlog_follower_lag_offsets",
        "gauge",
        "Offsets of the leader's log a follower lacks, for each partition this node leads.",
    );
    for p in &r.partitions {
        let (topic, index) = partition(p);
        for (follower, lag) in &p.lags {
            let follower = follower.to_string();
            let labels =
                [("topic", topic.as_str()), ("partition", index.as_str()), ("follower", follower.as_str())];
            o.sample("ringlog_follower_lag_offsets", &labels, lag);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::metrics::{ApiStats, CacheStats, IoCounters, Memory, TopicTraffic};

    fn shard(id: u32) -> ShardSnapshot {
        let mut latency = Latency::new();
        for us in [5u64, 80, 80, 900, 3_000_000] {
            latency.record(Duration::from_micros(us));
        }
        ShardSnapshot {
            shard: id,
            connections: 2,
            cross_shard_hops: 7,
            topics: vec![(
                Arc::from("a\"b"),
                3,
                TopicTraffic { bytes_in: 100, records_in: 4, bytes_out: 50, records_out: 2 },
            )],
            apis: vec![ApiStats { api: "produce", requests: 5, errors: 1, latency: latency.clone() }],
            partition_errors: vec![("produce", 0), ("fetch", 3)],
            segment_write: latency.clone(),
            fsync: Latency::new(),
            cache: CacheStats { hits: 1, misses: 2, used_bytes: 10, budget_bytes: 20, batches: 1 },
            io: IoCounters::default(),
            memory: Memory::ALL.iter().map(|&c| (c, 7)).collect(),
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_with_the_count() {
        let text = render(&[shard(0), shard(1)], &ProcessInfo::default());
        let buckets: Vec<u64> = text
            .lines()
            .filter(|l| l.starts_with("ringlog_request_duration_seconds_bucket{shard=\"0\""))
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(buckets.len(), BUCKET_BOUNDS_US.len() + 1);
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
        assert_eq!(buckets[0], 1, "only 5 µs is ≤ 10 µs");
        assert_eq!(*buckets.last().unwrap(), 5);
        assert!(text.contains("ringlog_request_duration_seconds_count{shard=\"1\",api=\"produce\"} 5"));
        assert!(text.contains("ringlog_topic_bytes_in_total{shard=\"0\",topic=\"a\\\"b\"} 100"), "{text}");
    }

    #[test]
    fn every_sample_follows_its_type_line() {
        let text = render(
            &[shard(0)],
            &ProcessInfo {
                resident_bytes: 1,
                shards: 1,
                uptime_seconds: 1.0,
                peers: vec![PeerTraffic { peer: 2, frames: 3, ..PeerTraffic::default() }],
                replication: Some(ReplicationMetrics {
                    leaders: 2,
                    under_replicated: 1,
                    leaderless: 0,
                    leader_changes: 5,
                    quiesced: 1,
                    stopped: 0,
                    elections_running: 4,
                    partitions: vec![LedPartition {
                        topic: "likes".into(),
                        partition: 1,
                        replicas: 3,
                        in_sync: 2,
                        lags: vec![(2, 0), (3, 1200)],
                    }],
                }),
            },
        );
        assert!(text.contains("ringlog_raft_frames_sent_total{peer=\"2\"} 3"), "{text}");
        assert!(text.contains("\nringlog_under_replicated_partitions 1\n"), "{text}");
        assert!(text.contains("\nringlog_leader_changes_total 5\n"), "{text}");
        assert!(text.contains("\nringlog_raft_elections_running 4\n"), "{text}");
        assert!(
            text.contains("ringlog_partition_in_sync_replicas{topic=\"likes\",partition=\"1\"} 2"),
            "{text}"
        );
        assert!(
            text.contains(
                "ringlog_follower_lag_offsets{topic=\"likes\",partition=\"1\",follower=\"3\"} 1200"
            ),
            "{text}"
        );
        let mut typed: Vec<String> = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.push(rest.split(' ').next().unwrap().to_string());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|b| typed.iter().any(|t| t == b)))
                    .unwrap_or(name);
                assert_eq!(typed.last().map(String::as_str), Some(base), "sample {line} outside its family");
            }
        }
    }
}
