//! Broker configuration: defaults, the TOML file, `RINGLOG_*` environment variables and flags.
//!
//! Owns: every broker option, its default, its documentation (README's config reference mirrors
//! the doc comments here) and its validation. Precedence, lowest first: built-in default, config
//! file, environment, command-line flag. Depends on nothing in ringlog but `storage::Durability`'s
//! wire twin below.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("flag --set {arg}: {message}")]
    Flag { arg: String, message: String },
    #[error("option `{option}`: {message}")]
    Invalid { option: &'static str, message: String },
}

/// When a produce is acknowledged (acks 1 or all), per topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DurabilitySetting {
    /// After the O_DIRECT write of the batch completed on the device.
    Written,
    /// After an fdatasync covering the batch completed (group commit).
    Fsync,
}

/// How a shard makes fsync-durable writes durable (`storage::FsyncScope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncScopeSetting {
    /// One `syncfs` per shard round covers every partition written in it (group commit across
    /// partitions). It also writes back anything else dirty on that filesystem: give the data
    /// directory a filesystem of its own.
    Filesystem,
    /// One `fdatasync` per written segment file per partition round.
    File,
}

/// Every broker option. Field docs are the reference documentation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// Directory holding topic metadata and partition segments.
    pub data_dir: PathBuf,
    /// Native protocol listener: one socket, exclusive to this process, accepted from by every
    /// shard. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// Admin HTTP listener (`GET /metrics`, `GET /health`). Default: 127.0.0.1:9293, or a free
    /// port when another program holds that one (the ready line says which, a warning says
    /// why); an address set here must be free. Port 0 picks a free port.
    pub admin_listen: Option<SocketAddr>,
    /// How long start-up retries (every 50 ms) a listening address that is in use — typically
    /// by a predecessor just killed, whose sockets close a moment after it — before it exits
    /// naming the listener, the address and what holds it. 0 = do not wait.
    pub listen_wait_ms: u64,
    /// Kafka protocol listener (Apache Kafka clients: librdkafka, Java, kafka-python, kafkajs),
    /// one socket shared by every shard, exclusive to this process. `off` disables it; port 0
    /// picks a free port.
    pub kafka_listen: String,
    /// `host:port` put in Kafka Metadata responses as this broker's address; default: the
    /// address `kafka_listen` is bound to.
    pub kafka_advertised_listener: Option<String>,
    /// Create a topic (with `default_partitions`) when a Kafka client produces to it or asks for
    /// its metadata and it does not exist, as Apache Kafka's `auto.create.topics.enable` does.
    pub kafka_auto_create_topics: bool,
    /// Host advertised to clients for the per-shard direct ports; default: the listen address.
    pub advertised_host: Option<String>,
    /// Shard N also listens on `shard_port_base + N`, so shard-aware clients reach the owner core
    /// directly. 0 picks a free port per shard.
    pub shard_port_base: u16,
    /// Number of shards (one thread pinned per core). 0 = one per available core.
    pub shards: usize,
    /// How long an idle shard busy-polls its rings before it sleeps in the kernel. Spinning
    /// saves a wake-up per request on cores the broker has to itself, and takes CPU from
    /// anything else scheduled on them (clients, other processes); see tuning.md.
    pub spin_before_park_us: u64,
    /// How long a shard runs one task queue before it checks for I/O and other queues (glommio's
    /// preemption timer). Shorter gives waiting requests their turn sooner and costs a timer per
    /// loop; see tuning.md.
    pub task_slice_us: u64,
    /// io_uring registered buffer memory per shard. 0 = fit RLIMIT_MEMLOCK (each shard registers it
    /// in three rings); see tuning.md.
    pub io_memory_bytes: usize,
    /// Memory budget per shard for the tail cache of recent batches.
    pub tail_cache_bytes: usize,
    /// Produce is refused with StorageFull while the data directory has less free space than this.
    pub free_space_reserve_bytes: u64,
    /// How often each shard rolls segments by age and applies retention.
    pub housekeeping_interval_ms: u64,
    /// Largest frame a client may send (header + payload).
    pub frame_bytes_max: usize,
    /// Largest record batch accepted on produce.
    pub batch_bytes_max: usize,
    /// Most records one batch may hold.
    pub records_per_batch_max: u32,
    /// Most partitions one topic may have.
    pub partitions_per_topic_max: u32,
    /// Most topics the broker holds.
    pub topics_max: usize,
    /// Most partitions per shard (the broker holds this many times its shards, all topics
    /// together); topic creation and growth beyond it are refused. Idle partitions hold no file
    /// descriptor, so this bounds memory (about 4 KB per idle partition) and disk, not descriptors.
    pub partitions_per_shard_max: u64,
    /// Most open client connections per shard; more are accepted and closed at once, with a log line.
    pub connections_per_shard_max: usize,
    /// Request bytes a connection may have in flight before the broker stops reading from it.
    pub bytes_in_flight_per_connection_max: usize,
    /// Longest a fetch may park waiting for data, whatever the client asks.
    pub fetch_wait_ms_max: u64,
    /// Most record bytes one fetch response holds, whatever the client asks (Kafka's
    /// `fetch.max.bytes`); the first partition with data still goes whole, so consumers progress.
    pub fetch_bytes_max: usize,
    /// How long shutdown waits for in-flight requests before closing connections anyway.
    pub shutdown_grace_ms: u64,
    /// Topic defaults, each overridable per topic at creation.
    pub default_partitions: u32,
    pub default_segment_bytes: u64,
    pub default_segment_ms: u64,
    /// -1 = unlimited.
    pub default_retention_bytes: i64,
    /// -1 = unlimited.
    pub default_retention_ms: i64,
    pub default_durability: DurabilitySetting,
    /// How `fsync` durability is reached: `filesystem` (one syncfs per shard round for all its
    /// partitions; the data directory should have a filesystem of its own) or `file` (one
    /// fdatasync per partition round, the usual way, for a data directory that shares its
    /// filesystem with busy writers). See tuning.md.
    pub fsync_scope: FsyncScopeSetting,
    /// Sparse offset index: one entry per this many bytes of log.
    pub index_interval_bytes: u32,
    /// Partitions of the internal `__consumer_offsets` topic, fixed when the data directory is
    /// first used (a group's coordinator is the owner of partition hash(group id) mod this).
    pub offsets_topic_partitions: u32,
    /// Committed offsets of a group that has had no members this long are deleted. -1 = never.
    pub offsets_retention_ms: i64,
    /// A group's first join phase waits this long for more members, so members starting
    /// together land in one generation instead of one rebalance each.
    pub group_initial_rebalance_delay_ms: u64,
    /// Smallest and largest session timeout a member may ask for.
    pub group_min_session_timeout_ms: u32,
    pub group_max_session_timeout_ms: u32,
    /// Most members in one group; further joins are refused with ResourceExhausted.
    pub group_members_max: usize,
    /// This node's id in a cluster (1 or more), unique among the nodes of `seeds`.
    pub node_id: u64,
    /// The cluster's controller voters as `ID@HOST:PORT,...`: every node's id and replication
    /// (peer) address, the same list on every node. Empty: a single node with no peer listener.
    pub seeds: String,
    /// Replication listener; default: this node's address in `seeds`.
    pub peer_listen: Option<SocketAddr>,
    /// Period of the Raft timer; elections time out after 10 to 20 ticks, leaders send
    /// heartbeats every 2.
    pub raft_tick_ms: u64,
    /// How long a write to a replicated partition waits for a majority of its replicas before
    /// it is answered REQUEST_TIMED_OUT (it may still commit).
    pub replication_timeout_ms: u64,
    /// A follower leaves its partition's in-sync replicas when it has not held everything its
    /// leader held at some moment of the last this-many milliseconds (Kafka's
    /// `replica.lag.time.max.ms`); it joins again once it holds every committed record. Counted
    /// in Raft ticks: at least 5 of them, so a follower heard at every heartbeat never looks behind.
    pub replica_lag_time_max_ms: u64,
    /// How often a partition's leader checks whether its preferred replica (the first of its
    /// replica set) can lead again, and hands leadership back when it is in sync with the whole
    /// log (Kafka's `leader.imbalance.check.interval.seconds`, 300 s). 0: never.
    pub leader_balance_interval_ms: u64,
    /// Raft ticks a replicated partition must be idle (everything committed and held by every
    /// replica) before its leader tells the followers to go quiet and the group stops ticking:
    /// no heartbeats, no election timers, until a write, a message or a node's death wakes it
    /// (docs/replication.md, "Idle groups go quiet"). 0: groups never go quiet.
    pub raft_quiesce_after_ticks: u64,
    /// Elections this node's replicas run at once: when a node dies, the groups it led elect new
    /// leaders this many at a time rather than all within one election timeout, which on a
    /// loaded machine splits votes for minutes (docs/replication.md, "Elections paced per node").
    /// 0: no limit.
    pub raft_elections_max: u64,
    /// Entries a replica keeps behind what it may forget (its Raft anchor, which bounds
    /// retention): an in-sync follower this far behind still catches up from the log; further
    /// behind, or out of the in-sync replicas, it is sent a snapshot (docs/replication.md, stop 18).
    pub raft_compaction_keep_entries: u64,
    /// A replica moves its anchor (one fsync'd state save) once this many more entries could be
    /// forgotten. Retention cannot delete past the anchor, so a small topic with large segments
    /// keeps up to this many entries more than its retention says.
    pub raft_compaction_step_entries: u64,
}

/// Node ids of a cluster are below this: each node's producer ids carry its node id, so no two
/// nodes hand out the same one (`controller::init_producer_id`).
pub const NODE_ID_SPACE: u64 = 1 << 16;

/// A node's view of its cluster, from `node_id`, `seeds` and `peer_listen`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSeeds {
    pub node_id: u64,
    /// Every voter's id and peer address, this node's included.
    pub voters: std::collections::BTreeMap<u64, SocketAddr>,
    pub peer_listen: SocketAddr,
    /// Names the cluster at every peer handshake, so nodes configured with another seed list
    /// (another cluster) are refused: FNV-1a of the sorted `id@address` list.
    pub cluster_id: u64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            data_dir: PathBuf::from("./ringlog-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 9292)),
            admin_listen: None,
            listen_wait_ms: 5000,
            kafka_listen: "127.0.0.1:9092".into(),
            kafka_advertised_listener: None,
            kafka_auto_create_topics: true,
            advertised_host: None,
            shard_port_base: 9300,
            shards: 0,
            spin_before_park_us: 50,
            task_slice_us: 100_000,
            io_memory_bytes: 0,
            tail_cache_bytes: 256 << 20,
            free_space_reserve_bytes: 256 << 20,
            housekeeping_interval_ms: 10_000,
            frame_bytes_max: 16 << 20,
            batch_bytes_max: 4 << 20,
            records_per_batch_max: 1_000_000,
            partitions_per_topic_max: 10_000,
            topics_max: 100_000,
            partitions_per_shard_max: 100_000,
            connections_per_shard_max: 10_000,
            bytes_in_flight_per_connection_max: 64 << 20,
            fetch_wait_ms_max: 30_000,
            // Kafka's default `fetch.max.bytes`.
            fetch_bytes_max: 55 << 20,
            shutdown_grace_ms: 10_000,
            default_partitions: 1,
            default_segment_bytes: 1 << 30,
            default_segment_ms: 7 * 24 * 3600 * 1000,
            default_retention_bytes: -1,
            default_retention_ms: 7 * 24 * 3600 * 1000,
            default_durability: DurabilitySetting::Fsync,
            fsync_scope: FsyncScopeSetting::Filesystem,
            index_interval_bytes: 4096,
            offsets_topic_partitions: 8,
            offsets_retention_ms: 7 * 24 * 3600 * 1000,
            group_initial_rebalance_delay_ms: 300,
            group_min_session_timeout_ms: 1000,
            group_max_session_timeout_ms: 300_000,
            group_members_max: 1000,
            node_id: 1,
            seeds: String::new(),
            peer_listen: None,
            raft_tick_ms: 100,
            replication_timeout_ms: 10_000,
            replica_lag_time_max_ms: 30_000,
            leader_balance_interval_ms: 300_000,
            raft_quiesce_after_ticks: 5,
            raft_elections_max: 512,
            raft_compaction_keep_entries: 1_000,
            raft_compaction_step_entries: 4_000,
        }
    }
}

/// Smallest io_memory glommio accepts.
const IO_MEMORY_MIN_BYTES: usize = 512 << 10;
const IO_MEMORY_MAX_BYTES: usize = 10 << 20;
/// A supervisor should see a broker that cannot get its ports fail, not hang.
const LISTEN_WAIT_MS_MAX: u64 = 600_000;
pub const TOPIC_NAME_BYTES_MAX: usize = 249;
pub const SEGMENT_BYTES_MIN: u64 = 64 << 10;

impl BrokerConfig {
    /// Builds the configuration from an optional TOML file, the environment (`RINGLOG_<OPTION>`,
    /// upper case) and `key=value` overrides from flags, in that order of precedence.
    pub fn load(
        file: Option<&Path>,
        env: impl Iterator<Item = (String, String)>,
        overrides: &[(String, String)],
    ) -> Result<BrokerConfig, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })?
            }
            None => toml::Table::new(),
        };
        if let Some(path) = file {
            // Catch typos and bad types in the file itself, with the file named in the error.
            table
                .clone()
                .try_into::<BrokerConfig>()
                .map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })?;
        }
        let keys = option_names();
        for (var, value) in env {
            let Some(key) = var.strip_prefix("RINGLOG_").map(str::to_ascii_lowercase) else { continue };
            if key == "bootstrap" || key == "log" {
                continue; // client-side and logging variables, not broker options
            }
            if !keys.contains(&key) {
                return Err(ConfigError::Env { var, message: "no such broker option".into() });
            }
            let parsed = parse_value(&value);
            table.insert(key.clone(), parsed);
            table.clone().try_into::<BrokerConfig>().map_err(|e| ConfigError::Env {
                var: var.clone(),
                message: e.to_string().trim().to_string(),
            })?;
        }
        for (key, value) in overrides {
            let arg = format!("{key}={value}");
            if !keys.contains(key) {
                return Err(ConfigError::Flag { arg, message: "no such broker option".into() });
            }
            table.insert(key.clone(), parse_value(value));
            table
                .clone()
                .try_into::<BrokerConfig>()
                .map_err(|e| ConfigError::Flag { arg, message: e.to_string().trim().to_string() })?;
        }
        let config: BrokerConfig = table.try_into().map_err(|e| ConfigError::Invalid {
            option: "config",
            message: e.to_string().trim().to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(option: &'static str, message: impl Into<String>) -> Result<(), ConfigError> {
            Err(ConfigError::Invalid { option, message: message.into() })
        }
        if self.data_dir.as_os_str().is_empty() {
            return invalid("data_dir", "must not be empty");
        }
        if self.io_memory_bytes != 0 && !(IO_MEMORY_MIN_BYTES..=1 << 30).contains(&self.io_memory_bytes) {
            return invalid("io_memory_bytes", format!("must be 0 (auto) or at least {IO_MEMORY_MIN_BYTES}"));
        }
        if let Err(e) = self.kafka_listen_addr() {
            return invalid("kafka_listen", e);
        }
        if let Some(a) = &self.kafka_advertised_listener {
            match a.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {}
                _ => return invalid("kafka_advertised_listener", format!("'{a}' is not host:port")),
            }
        }
        if self.listen_wait_ms > LISTEN_WAIT_MS_MAX {
            return invalid("listen_wait_ms", format!("must be at most {LISTEN_WAIT_MS_MAX} (ten minutes)"));
        }
        if self.frame_bytes_max < 1024 {
            return invalid("frame_bytes_max", "must be at least 1024");
        }
        if self.batch_bytes_max < 128 || self.batch_bytes_max > self.frame_bytes_max {
            return invalid("batch_bytes_max", "must be between 128 and frame_bytes_max");
        }
        if self.bytes_in_flight_per_connection_max < self.frame_bytes_max {
            return invalid("bytes_in_flight_per_connection_max", "must be at least frame_bytes_max");
        }
        if self.fetch_bytes_max == 0 {
            return invalid("fetch_bytes_max", "must be at least 1");
        }
        if self.records_per_batch_max == 0 {
            return invalid("records_per_batch_max", "must be at least 1");
        }
        if self.partitions_per_topic_max == 0 {
            return invalid("partitions_per_topic_max", "must be at least 1");
        }
        if self.partitions_per_shard_max == 0 {
            return invalid("partitions_per_shard_max", "must be at least 1");
        }
        if self.connections_per_shard_max == 0 {
            return invalid("connections_per_shard_max", "must be at least 1");
        }
        if self.default_partitions == 0 || self.default_partitions > self.partitions_per_topic_max {
            return invalid("default_partitions", "must be between 1 and partitions_per_topic_max");
        }
        if self.default_segment_bytes < SEGMENT_BYTES_MIN {
            return invalid("default_segment_bytes", format!("must be at least {SEGMENT_BYTES_MIN}"));
        }
        if (self.default_segment_bytes as u128) < self.batch_bytes_max as u128 {
            return invalid("default_segment_bytes", "must be at least batch_bytes_max");
        }
        if self.default_segment_ms == 0 {
            return invalid("default_segment_ms", "must be at least 1");
        }
        if self.default_retention_bytes < -1 || self.default_retention_bytes == 0 {
            return invalid("default_retention_bytes", "must be -1 (unlimited) or positive");
        }
        if self.default_retention_ms < -1 || self.default_retention_ms == 0 {
            return invalid("default_retention_ms", "must be -1 (unlimited) or positive");
        }
        if self.index_interval_bytes < 512 {
            return invalid("index_interval_bytes", "must be at least 512");
        }
        if self.housekeeping_interval_ms == 0 {
            return invalid("housekeeping_interval_ms", "must be at least 1");
        }
        if self.spin_before_park_us > 1_000_000 {
            return invalid("spin_before_park_us", "must be at most 1000000 (one second)");
        }
        if self.task_slice_us == 0 || self.task_slice_us > 1_000_000 {
            return invalid("task_slice_us", "must be between 1 and 1000000 (one second)");
        }
        if self.offsets_topic_partitions == 0 || self.offsets_topic_partitions > 1000 {
            return invalid("offsets_topic_partitions", "must be between 1 and 1000");
        }
        if self.offsets_retention_ms < -1 || self.offsets_retention_ms == 0 {
            return invalid("offsets_retention_ms", "must be -1 (never) or positive");
        }
        if self.group_min_session_timeout_ms == 0
            || self.group_min_session_timeout_ms > self.group_max_session_timeout_ms
        {
            return invalid(
                "group_min_session_timeout_ms",
                "must be at least 1 and at most group_max_session_timeout_ms",
            );
        }
        if self.group_members_max == 0 {
            return invalid("group_members_max", "must be at least 1");
        }
        if self.node_id == 0 {
            return invalid("node_id", "must be at least 1");
        }
        if self.raft_tick_ms == 0 || self.raft_tick_ms > 10_000 {
            return invalid("raft_tick_ms", "must be between 1 and 10000");
        }
        if self.replication_timeout_ms == 0 || self.replication_timeout_ms > 600_000 {
            return invalid("replication_timeout_ms", "must be between 1 and 600000");
        }
        if self.replica_lag_time_max_ms < 5 * self.raft_tick_ms || self.replica_lag_time_max_ms > 3_600_000 {
            return invalid(
                "replica_lag_time_max_ms",
                format!("must be between 5 Raft ticks ({} ms) and 3600000", 5 * self.raft_tick_ms),
            );
        }
        if self.raft_compaction_step_entries == 0 || self.raft_compaction_step_entries > 100_000_000 {
            return invalid("raft_compaction_step_entries", "must be between 1 and 100000000");
        }
        if self.raft_compaction_keep_entries > 100_000_000 {
            return invalid("raft_compaction_keep_entries", "must be at most 100000000");
        }
        if self.raft_elections_max > 1_000_000 {
            return invalid("raft_elections_max", "must be at most 1000000 (0: no limit)");
        }
        if self.raft_quiesce_after_ticks > 1_000_000 {
            return invalid("raft_quiesce_after_ticks", "must be at most 1000000 (0 keeps groups awake)");
        }
        if self.leader_balance_interval_ms > 86_400_000 {
            return invalid("leader_balance_interval_ms", "must be at most 86400000 (0 turns balancing off)");
        }
        if !self.seeds.trim().is_empty() && self.node_id >= NODE_ID_SPACE {
            return invalid(
                "node_id",
                format!("must be below {NODE_ID_SPACE} in a cluster (it is part of every producer id)"),
            );
        }
        if let Err(message) = self.cluster() {
            return invalid("seeds", message);
        }
        Ok(())
    }

    /// `replica_lag_time_max_ms` in Raft ticks, rounded up.
    pub fn replica_lag_ticks(&self) -> u64 {
        self.replica_lag_time_max_ms.div_ceil(self.raft_tick_ms.max(1))
    }

    /// The cluster this node belongs to, `None` for a single node (no `seeds`).
    pub fn cluster(&self) -> Result<Option<ClusterSeeds>, String> {
        if self.seeds.trim().is_empty() {
            if self.peer_listen.is_some() {
                return Err("peer_listen is set but seeds is empty: list every node as ID@HOST:PORT".into());
            }
            return Ok(None);
        }
        let mut voters = std::collections::BTreeMap::new();
        for seed in self.seeds.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (id, addr) = seed
                .split_once('@')
                .ok_or_else(|| format!("'{seed}' is not ID@HOST:PORT (e.g. 1@10.0.0.1:9400)"))?;
            let id: u64 = id
                .trim()
                .parse()
                .ok()
                .filter(|&id| id > 0)
                .ok_or_else(|| format!("'{seed}': the node id must be a number of at least 1"))?;
            let addr: SocketAddr = addr
                .trim()
                .parse()
                .map_err(|e| format!("'{seed}': '{addr}' is not an address like 10.0.0.1:9400: {e}"))?;
            if voters.insert(id, addr).is_some() {
                return Err(format!("node {id} is listed twice"));
            }
        }
        let own = voters.get(&self.node_id).copied().ok_or_else(|| {
            format!(
                "this node's id {} is not among the seeds; every node lists every voter, itself included",
                self.node_id
            )
        })?;
        let mut cluster_id = 0xcbf2_9ce4_8422_2325u64;
        for (id, addr) in &voters {
            for byte in format!("{id}@{addr},").bytes() {
                cluster_id = (cluster_id ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3);
            }
        }
        Ok(Some(ClusterSeeds {
            node_id: self.node_id,
            peer_listen: self.peer_listen.unwrap_or(own),
            voters,
            cluster_id,
        }))
    }

    /// The Kafka listener address, `None` when disabled.
    pub fn kafka_listen_addr(&self) -> Result<Option<SocketAddr>, String> {
        match self.kafka_listen.trim() {
            "" | "off" | "none" | "disabled" => Ok(None),
            addr => addr
                .parse()
                .map(Some)
                .map_err(|e| format!("'{addr}' is not an address like 127.0.0.1:9092 or `off`: {e}")),
        }
    }

    /// The shard count to run: the configured one, or one per available core.
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            return self.shards;
        }
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    }

    /// io_uring registered memory per shard: the configured value, or the largest that lets every
    /// shard's three rings register within RLIMIT_MEMLOCK (glommio silently falls back to slower
    /// unregistered buffers when registration fails).
    pub fn io_memory_for(&self, shards: usize) -> usize {
        if self.io_memory_bytes > 0 {
            return self.io_memory_bytes;
        }
        let memlock = memlock_limit_bytes();
        let fitting = (memlock / (3 * shards.max(1) as u64)) as usize;
        // Leave headroom for the rings themselves, which are also charged to the limit.
        let fitting = fitting / 4 * 3 / 4096 * 4096;
        fitting.clamp(IO_MEMORY_MIN_BYTES, IO_MEMORY_MAX_BYTES)
    }
}

fn memlock_limit_bytes() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own and has no other effect.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) };
    if rc != 0 {
        return 8 << 20;
    }
    limit.rlim_cur
}

/// Names of every option, as used in the file, in `--set` and (upper-cased) in `RINGLOG_*`.
pub fn option_names() -> Vec<String> {
    match toml::Table::try_from(BrokerConfig::default()) {
        Ok(table) => {
            let mut keys: Vec<String> = table.keys().cloned().collect();
            // Options whose default is None are not serialized; list them explicitly.
            keys.push("advertised_host".into());
            keys.push("admin_listen".into());
            keys.push("kafka_advertised_listener".into());
            keys.push("peer_listen".into());
            keys
        }
        Err(_) => Vec::new(),
    }
}

/// Environment and flag values are TOML literals when they parse as one (numbers, booleans), and
/// strings otherwise, so `RINGLOG_DATA_DIR=/var/lib/ringlog` needs no quoting.
fn parse_value(text: &str) -> toml::Value {
    match format!("v = {text}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(text.to_string())),
        Err(_) => toml::Value::String(text.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        BrokerConfig::default().validate().unwrap();
    }

    #[test]
    fn precedence_is_file_then_env_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ringlog.toml");
        std::fs::write(&file, "shards = 3\nlisten = \"127.0.0.1:1000\"\nframe_bytes_max = 20000000\n")
            .unwrap();
        let env = vec![("RINGLOG_SHARDS".to_string(), "2".to_string()), ("PATH".into(), "/bin".into())];
        let flags = vec![("listen".to_string(), "127.0.0.1:2000".to_string())];
        let c = BrokerConfig::load(Some(&file), env.into_iter(), &flags).unwrap();
        assert_eq!(c.shards, 2);
        assert_eq!(c.listen.port(), 2000);
        assert_eq!(c.frame_bytes_max, 20_000_000);
    }

    #[test]
    fn errors_name_the_option() {
        let env = vec![("RINGLOG_SHARDZ".to_string(), "2".to_string())];
        let err = BrokerConfig::load(None, env.into_iter(), &[]).unwrap_err().to_string();
        assert!(err.contains("RINGLOG_SHARDZ"), "{err}");
        let flags = vec![("frame_bytes_max".to_string(), "lots".to_string())];
        let err = BrokerConfig::load(None, std::iter::empty(), &flags).unwrap_err().to_string();
        assert!(err.contains("frame_bytes_max"), "{err}");
        let flags = vec![("batch_bytes_max".to_string(), "10".to_string())];
        let err = BrokerConfig::load(None, std::iter::empty(), &flags).unwrap_err().to_string();
        assert!(err.contains("batch_bytes_max"), "{err}");
        let flags = vec![("listen_wait_ms".to_string(), "600001".to_string())];
        let err = BrokerConfig::load(None, std::iter::empty(), &flags).unwrap_err().to_string();
        assert!(err.contains("listen_wait_ms"), "{err}");
        let flags = vec![("spin_before_park_us".to_string(), "2000000".to_string())];
        let err = BrokerConfig::load(None, std::iter::empty(), &flags).unwrap_err().to_string();
        assert!(err.contains("spin_before_park_us"), "{err}");
        for slice in ["0", "1000001"] {
            let flags = vec![("task_slice_us".to_string(), slice.to_string())];
            let err = BrokerConfig::load(None, std::iter::empty(), &flags).unwrap_err().to_string();
            assert!(err.contains("task_slice_us"), "{err}");
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "listen_addr = \"x\"\n").unwrap();
        let err = BrokerConfig::load(Some(&file), std::iter::empty(), &[]).unwrap_err().to_string();
        assert!(err.contains("listen_addr"), "{err}");
    }

    #[test]
    fn the_replica_lag_is_whole_ticks_and_at_least_five() {
        let flags = |lag: &str| {
            vec![
                ("raft_tick_ms".to_string(), "50".to_string()),
                ("replica_lag_time_max_ms".to_string(), lag.to_string()),
            ]
        };
        let c = BrokerConfig::load(None, std::iter::empty(), &flags("2001")).unwrap();
        assert_eq!(c.replica_lag_ticks(), 41);
        assert_eq!(BrokerConfig::default().replica_lag_ticks(), 300);
        let err = BrokerConfig::load(None, std::iter::empty(), &flags("200")).unwrap_err().to_string();
        assert!(err.contains("replica_lag_time_max_ms") && err.contains("250 ms"), "{err}");
    }

    #[test]
    fn io_memory_fits_memlock() {
        let c = BrokerConfig::default();
        let per_shard = c.io_memory_for(2);
        assert!((IO_MEMORY_MIN_BYTES..=IO_MEMORY_MAX_BYTES).contains(&per_shard));
    }
}
