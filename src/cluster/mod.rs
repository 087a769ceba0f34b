//! A node in a cluster (issue 11; docs/replication.md): the peer listener and connections
//! (`transport`, `links`), the controller's Raft group on shard 0 over a log of its own
//! (`controller_log`), and the state that group replicates (`state`, without IO): the node
//! registry (every node's id and addresses, registered by the controller leader when it hears
//! from a node) and the replicated topics (their ids and replica sets), which `topics` carries
//! out on this node; `forming` decides whether a topic change waits for nodes that have not
//! registered yet (a cluster just started). Each node keeps its own view of
//! which peers it hears from (liveness), hosts its partition replicas (`replicas`), learns every
//! partition's in-sync replicas from its leader's keepalives (`in_sync`), and answers the shard's
//! `ReplicaGate` for them (produce proposes and waits for the commit; reads ask who leads;
//! metadata asks who is in sync).
//!
//! Runs only on shard 0 and only when `seeds` is set. May depend on `replication`, `shard` (its
//! extension slot, the gate seam, storage through it), `record`, `metadata`, `config`, `groups`
//! (the settings of `__consumer_offsets`, which the controller creates), `controller` (a single
//! node's local topics, where the `*_any_topic` entry points fall back to it); the broker starts
//! it, the protocols send topic changes through it and the admin listener reads its status.

pub mod controller_log;
pub mod forming;
pub mod gate;
pub mod in_sync;
pub mod links;
pub mod replicas;
pub mod shards;
pub mod state;
pub mod topics;
pub mod transport;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use futures::channel::mpsc;
use futures::StreamExt;
use glommio::net::TcpListener;
use raft::eraftpb::Entry;
use serde::{Deserialize, Serialize};

use crate::config::ClusterSeeds;
use crate::metadata::{self, TopicOverrides, OFFSETS_TOPIC};
use crate::replication::group::{GroupSettings, Persist, ProposeError, RaftGroup};
use crate::replication::wire::{GroupKey, PeerBatch};
use crate::shard::replicated::{LeaderView, ReplicaDirectory};
use crate::shard::{BrokerError, Shard, TopicView};
use controller_log::{ControllerLog, DirFiles, PendingWrites};
use forming::Fit;
use links::{Outbox, PeerLinks};
use replicas::ReplicaHost;
use shards::{Forward, NodeView, ToShard};
use state::{AppliedCommand, ControllerCommand, ControllerState, ReplicatedTopic, TopicChange, TopicCommand};
use topics::Topics;
pub use transport::NodeInfo;
/// Ticks between two keepalives to every peer; a peer unheard for `ALIVE_TICKS` is down.
const KEEPALIVE_TICKS: u64 = 5;
const ALIVE_TICKS: u32 = 30;
/// Ticks between two keepalives that carry the report whole even if it did not change: a whole
/// report lost with a broken link is replaced within this, before what a peer holds of the one
/// before ages out (`ALIVE_TICKS`).
const WHOLE_REPORT_TICKS: u64 = 4 * KEEPALIVE_TICKS;
/// A registration not yet committed is proposed again after this long.
const REPROPOSE_AFTER: Duration = Duration::from_secs(2);

struct PersistJob {
    writes: PendingWrites,
    persist: Persist,
}

/// Shard 0's extension on a node of a cluster.
pub struct Cluster {
    seeds: ClusterSeeds,
    me: NodeInfo,
    tick: Duration,
    group: RefCell<RaftGroup<ControllerLog>>,
    /// Where the controller's log files are (`<data_dir>/controller`).
    log_dir: std::path::PathBuf,
    /// The metadata as the controller's log defines it up to the last entry applied here: the
    /// node registry and the replicated topics (shared with `topics`' applier).
    state: Rc<RefCell<ControllerState>>,
    links: Rc<PeerLinks>,
    /// Shard 0's partition replicas, with the other shards' mirrored.
    replicas: Rc<ReplicaHost>,
    shard: std::rc::Weak<Shard>,
    /// To each other shard (`None` at shard 0's own place): the peers' messages for its replicas.
    to_shards: Vec<Option<Rc<ToShard>>>,
    /// The replicated topics as the controller's log defines them.
    topics: Topics,
    /// Proposal ids of topic changes: this node's id in the high bits, so no two nodes' collide.
    next_request: std::cell::Cell<u64>,
    replication_timeout: Duration,
    persister: mpsc::UnboundedSender<PersistJob>,
    proposed: RefCell<BTreeMap<u64, Instant>>,
    /// When this node last proposed creating `__consumer_offsets`, and what it creates.
    offsets_proposed: std::cell::Cell<Option<Instant>>,
    offsets_partitions: u32,
    offsets_overrides: TopicOverrides,
    /// Set when the controller's log cannot be written: this node stops taking part.
    failure: RefCell<Option<String>>,
    /// What each peer last reported of the partitions it leads with a short in-sync set.
    reports: RefCell<in_sync::Reports>,
}

/// What `/v1/cluster` and `ringlog cluster status` show: this node's view.
#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub node_id: u64,
    pub cluster_id: String,
    pub controller_leader: Option<u64>,
    pub controller_term: u64,
    pub nodes: Vec<NodeStatus>,
    /// Replicated partitions of the whole cluster with a leader and fewer replicas in sync than
    /// replicas, as this node knows them (its own leaders, the others' keepalive reports).
    pub under_replicated_partitions: u64,
    /// Replicated partitions of the whole cluster with no leader this node knows of.
    pub leaderless_partitions: u64,
    /// Replicas on this node whose group is quiet (idle: neither ticked nor heartbeating).
    #[serde(default)]
    pub quiesced_partitions: u64,
    /// Replicas on this node stopped on a storage error, waiting to be reopened (the broker's
    /// log says why: a full disk, a failed write).
    #[serde(default)]
    pub stopped_replicas: u64,
    pub failure: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: u64,
    /// This node hears from it (itself: always).
    pub alive: bool,
    /// In the registry the controller replicates.
    pub registered: bool,
    pub peer: String,
    pub native: Option<String>,
    pub kafka: Option<String>,
    pub admin: Option<String>,
    /// Raft traffic this node sent it (frames, messages, bytes, frames dropped while it was
    /// unreachable); `None` for this node itself.
    pub sent: Option<links::SentCounts>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot open the controller's log in {dir}: {source}")]
    Log { dir: String, source: std::io::Error },
    #[error("cannot start the controller's Raft group: {0}")]
    Group(String),
}

/// Starts this node's part of the cluster on shard 0: the controller group, the peer listener and
/// a connection to every other voter.
pub fn start(
    shard: &Rc<Shard>,
    seeds: ClusterSeeds,
    listener: TcpListener,
    me: NodeInfo,
) -> Result<(), ClusterError> {
    let dir = shard.config.data_dir.join("controller");
    let voters: Vec<u64> = seeds.voters.keys().copied().collect();
    let (log, warning) = ControllerLog::open(&dir, voters)
        .map_err(|source| ClusterError::Log { dir: dir.display().to_string(), source })?;
    if let Some(warning) = warning {
        tracing::warn!("{warning}");
    }
    let seed = seeds.node_id ^ std::process::id() as u64 ^ now_nanos();
    let group = RaftGroup::new(seeds.node_id, "controller".into(), GroupSettings::default(), log, seed)
        .map_err(|e| ClusterError::Group(e.to_string()))?;
    let (persister, jobs) = mpsc::unbounded();
    let tick = Duration::from_millis(shard.config.raft_tick_ms);
    let cluster = Rc::new_cyclic(|weak: &std::rc::Weak<Cluster>| {
        let weak = weak.clone();
        let deliver: links::Deliver = Rc::new(move |from, batch| {
            if let Some(cluster) = weak.upgrade() {
                cluster.on_batch(from, batch);
            }
        });
        let links = PeerLinks::start(me.clone(), seeds.cluster_id, seeds.voters.clone(), listener, deliver);
        let replicas = shards::new_host(shard, seeds.node_id, links.clone());
        shards::install(shard, &replicas);
        let to_shards = (0..shard.count)
            .map(|target| (target != shard.id).then(|| Forward::start(shard, target, shards::deliver)))
            .collect();
        let state = Rc::new(RefCell::new(ControllerState::default()));
        Cluster {
            tick,
            topics: Topics::start(seeds.node_id, Rc::downgrade(shard), &replicas, state.clone()),
            next_request: std::cell::Cell::new((seeds.node_id << 40) | (now_nanos() & 0xff_ffff_ffff)),
            replication_timeout: Duration::from_millis(shard.config.replication_timeout_ms),
            seeds,
            me,
            group: RefCell::new(group),
            log_dir: dir,
            state,
            replicas,
            shard: Rc::downgrade(shard),
            to_shards,
            links,
            persister,
            proposed: RefCell::new(BTreeMap::new()),
            offsets_proposed: std::cell::Cell::new(None),
            offsets_partitions: shard.config.offsets_topic_partitions,
            offsets_overrides: crate::groups::offsets_topic_overrides(&shard.config),
            failure: RefCell::new(None),
            reports: RefCell::new(in_sync::Reports::default()),
        }
    });
    shard.set_extension(cluster.clone());
    shard.install_replica_directory(cluster.clone());
    // Entries committed before a restart are applied again from the log (no snapshots yet).
    cluster.drive();
    glommio::spawn_local(cluster.clone().run_persister(jobs)).detach();
    glommio::spawn_local(cluster.clone().run_ticks()).detach();
    tracing::info!(
        node = cluster.seeds.node_id,
        voters = ?cluster.seeds.voters,
        "cluster: controller group started; peers are dialed"
    );
    Ok(())
}

impl ReplicaDirectory for Cluster {
    fn described(&self, key: GroupKey, replicas: &[u64]) -> LeaderView {
        LeaderView { in_sync: self.in_sync_of(key, replicas).unwrap_or_default(), ..self.leader(key) }
    }
}

impl Cluster {
    /// Partition `key`'s leader as this node knows it: its replica on whichever shard, or the
    /// leader's report.
    fn leader(&self, key: GroupKey) -> LeaderView {
        let status = self.replicas.node_status(key);
        let reports = self.reports.borrow();
        let reported = reports.newest(key, Instant::now(), self.tick * ALIVE_TICKS);
        // A replica stopped on a storage error takes no part in its group: what it last knew of
        // the leader (often itself) is stale, so only the reports can name one.
        let local = status.filter(|s| !s.failed).map(|s| (s.leader, s.term));
        let known = in_sync::Known { replicas: &[], local, led: None, reported };
        let (leader, epoch) = match in_sync::leader(known) {
            Some((leader, term)) => (Some(leader), term),
            None => (None, status.map_or(0, |s| s.term)),
        };
        LeaderView {
            leader,
            epoch,
            native: leader.and_then(|id| self.node_address(id)),
            serving_here: status.is_some_and(|s| s.serving && !s.failed),
            leading_here: status
                .is_some_and(|s| s.role == crate::replication::group::Role::Leader && !s.failed),
            in_sync: Vec::new(),
        }
    }

    /// Partition `key`'s in-sync replicas as this node knows them (`in_sync::in_sync`); `None`
    /// when it knows no leader.
    fn in_sync_of(&self, key: GroupKey, replicas: &[u64]) -> Option<Vec<u64>> {
        let local = self.replicas.node_status(key).filter(|s| !s.failed);
        let led = self.replicas.node_in_sync(key);
        let reports = self.reports.borrow();
        let reported = reports.newest(key, Instant::now(), self.tick * ALIVE_TICKS);
        in_sync::in_sync(in_sync::Known {
            replicas,
            local: local.map(|s| (s.leader, s.term)),
            led: led.as_deref(),
            reported,
        })
    }

    /// Replicated partitions of the cluster with a leader and a short in-sync set, as this node
    /// knows them.
    fn under_replicated(&self) -> u64 {
        let mut count = 0;
        for topic in self.topics.all() {
            for (p, replicas) in topic.replication.replicas.iter().enumerate() {
                let in_sync = self.in_sync_of(topic.replication.key(p as u32), replicas);
                count += u64::from(in_sync.is_some_and(|set| set.len() < replicas.len()));
            }
        }
        count
    }

    /// Replicated partitions of the cluster with no leader this node knows of (its replica's
    /// view, or the leader's report for a partition it holds no replica of).
    fn leaderless(&self) -> u64 {
        let mut count = 0;
        for topic in self.topics.all() {
            for p in 0..topic.replication.replicas.len() {
                count += u64::from(self.leader(topic.replication.key(p as u32)).leader.is_none());
            }
        }
        count
    }

    /// Replication figures of this node for `/metrics`: what it leads (Kafka counts
    /// under-replicated partitions on their leader, so a sum over nodes is the cluster's).
    pub fn replication_metrics(&self) -> crate::metrics::exposition::ReplicationMetrics {
        use crate::metrics::exposition::{LedPartition, ReplicationMetrics};
        let names: BTreeMap<u128, String> =
            self.topics.all().into_iter().map(|t| (t.replication.topic_id, t.name)).collect();
        let led = self.replicas.led();
        let partitions = led
            .iter()
            .filter_map(|led| {
                Some(LedPartition {
                    topic: names.get(&led.key.topic_id)?.clone(),
                    partition: led.key.partition,
                    replicas: led.replicas as u64,
                    in_sync: led.in_sync as u64,
                    lags: led.followers.iter().filter_map(|f| Some((f.id, f.lag?))).collect(),
                })
            })
            .collect();
        ReplicationMetrics {
            leaders: led.len() as u64,
            under_replicated: led.iter().filter(|l| l.in_sync < l.replicas).count() as u64,
            leaderless: self.replicas.leaderless(),
            leader_changes: self.replicas.leader_changes(),
            quiesced: self.replicas.quiesced(),
            stopped: self.replicas.stopped(),
            elections_running: self.replicas.elections_running(),
            partitions,
        }
    }

    /// Every known node's native address, for errors answered after this borrow ends.
    fn leader_addresses(&self) -> BTreeMap<u64, String> {
        let mut addresses: BTreeMap<u64, String> =
            self.state.borrow().registered().iter().map(|(&id, info)| (id, info.native.clone())).collect();
        addresses.insert(self.me.id, self.me.native.clone());
        addresses
    }
}

fn log_change(node: u64, change: Option<&TopicChange>) {
    match change {
        Some(TopicChange::Create(topic)) => tracing::info!(
            topic = %topic.name,
            topic_id = topic.replication.topic_id,
            node,
            "cluster: replicated topic created with {} partitions",
            topic.replication.replicas.len()
        ),
        Some(TopicChange::Grow(topic, had)) => tracing::info!(
            topic = %topic.name,
            node,
            "cluster: replicated topic grown from {had} to {} partitions",
            topic.replication.replicas.len()
        ),
        Some(TopicChange::Delete(_)) | None => {}
    }
}

/// How long a topic change may wait: first for the cluster to form (enough nodes registered for
/// its copies), then for the controller's log to apply it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeWait {
    /// Each wait up to `replication_timeout_ms` (the native protocol, automatic creation).
    Default,
    /// Both waits end at this instant: a Kafka request's `timeout_ms`, counted from its arrival.
    Until(Instant),
    /// No wait for the cluster to form: a Kafka `timeout_ms` of 0 or less ("start the change and
    /// answer"). The apply is still awaited as by default: only the log says whether the change
    /// is made, and it answers within a few ticks.
    NotForming,
}

impl ChangeWait {
    /// The wait a Kafka admin request's `timeout_ms` asks for, the request having arrived `now`.
    pub fn kafka(timeout_ms: i32, now: Instant) -> ChangeWait {
        match u64::try_from(timeout_ms) {
            Ok(ms) if ms > 0 => ChangeWait::Until(now + Duration::from_millis(ms)),
            _ => ChangeWait::NotForming,
        }
    }

    /// When the wait for the cluster to form, begun at `started`, ends.
    fn forming_deadline(self, started: Instant, default: Duration) -> Instant {
        match self {
            ChangeWait::Default => started + default,
            ChangeWait::Until(deadline) => deadline,
            ChangeWait::NotForming => started,
        }
    }

    /// When the wait for the controller's log to apply the change, begun at `started`, ends.
    fn apply_deadline(self, started: Instant, default: Duration) -> Instant {
        match self {
            ChangeWait::Default | ChangeWait::NotForming => started + default,
            ChangeWait::Until(deadline) => deadline,
        }
    }
}

/// Runs `op` with this node's cluster, on the shard that holds it; `NotController` (no leader
/// known) on a node outside a cluster is never returned: callers check `in_cluster` first.
async fn on_cluster<R, W, F>(shard: &Rc<Shard>, op: W) -> Result<R, BrokerError>
where
    R: Send + 'static,
    W: FnOnce(Rc<Cluster>) -> F + Send + 'static,
    F: std::future::Future<Output = Result<R, BrokerError>> + 'static,
{
    let answer = shard
        .invoke_on(shards::CLUSTER_SHARD, move |shard| async move {
            match shard.extension::<Cluster>() {
                Some(cluster) => op(cluster).await,
                None => Err(BrokerError::InvalidReplicationFactor(
                    "this broker is not part of a cluster (no seeds): it keeps one copy of each partition; \
                     create the topic without a replication factor, or with 1"
                        .into(),
                )),
            }
        })
        .await;
    answer.await?
}

/// Whether this broker runs as a node of a cluster.
pub fn in_cluster(shard: &Shard) -> bool {
    shard.config.cluster().ok().flatten().is_some()
}

/// Creates a replicated topic through the controller's log (see `Cluster::create_topic`); waits
/// until the calling shard shows it, so the client's next request finds it here.
pub async fn create_topic(
    shard: &Rc<Shard>,
    name: String,
    partitions: u32,
    replication_factor: u16,
    overrides: TopicOverrides,
    wait: ChangeWait,
) -> Result<ReplicatedTopic, BrokerError> {
    metadata::validate_topic_name(&name).map_err(BrokerError::InvalidTopicName)?;
    if metadata::is_internal_topic(&name) {
        return Err(BrokerError::InternalTopic { topic: name, rule: "it is created by the broker" });
    }
    if partitions == 0 || partitions > shard.config.partitions_per_topic_max {
        return Err(BrokerError::InvalidPartitions(format!(
            "{partitions} partitions requested; allowed 1..={}",
            shard.config.partitions_per_topic_max
        )));
    }
    overrides.validate(&shard.config).map_err(BrokerError::InvalidConfig)?;
    // A local topic of this node holds the name too (the log checks only replicated ones).
    if shard.topic(&name).is_some_and(|v| v.replication.is_none()) {
        return Err(BrokerError::TopicAlreadyExists { topic: name });
    }
    let topic = on_cluster(shard, move |cluster| async move {
        cluster.create_topic(name, partitions, replication_factor, overrides, wait).await
    })
    .await?;
    shown(shard, &topic).await;
    Ok(topic)
}

/// Waits (up to `replication_timeout_ms`) until the calling shard shows `topic` as applied, so
/// the client's next request finds it here.
async fn shown(shard: &Shard, topic: &ReplicatedTopic) {
    let deadline = Instant::now() + Duration::from_millis(shard.config.replication_timeout_ms);
    while shard.topic(&topic.name).and_then(|v| v.replication.clone()) != Some(topic.replication.clone()) {
        if Instant::now() > deadline {
            break;
        }
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
}

/// Checks a request to raise `name`'s partition count to `partitions` (the new total), as both
/// protocols ask it; returns the topic as this node shows it. The controller's log checks the
/// count again when it applies a replicated topic's growth (another change may come first).
pub fn check_grow(shard: &Shard, name: &str, partitions: u32) -> Result<Rc<TopicView>, BrokerError> {
    if metadata::is_internal_topic(name) {
        // A group's coordinator is the owner of partition hash(group) mod the partition count.
        return Err(BrokerError::InternalTopic {
            topic: name.to_string(),
            rule: "its partition count is fixed (offsets_topic_partitions)",
        });
    }
    let view = shard.topic(name).ok_or_else(|| BrokerError::UnknownTopic { topic: name.to_string() })?;
    let had = view.partition_shards.len();
    let max = shard.config.partitions_per_topic_max;
    match (partitions as usize).cmp(&had) {
        std::cmp::Ordering::Equal => Err(BrokerError::InvalidPartitions(format!(
            "topic '{name}' already has {had} partitions; ask for more to grow it"
        ))),
        std::cmp::Ordering::Less => Err(BrokerError::InvalidPartitions(format!(
            "topic '{name}' has {had} partitions, more than the requested {partitions}; partitions cannot be \
             removed"
        ))),
        std::cmp::Ordering::Greater if partitions > max => Err(BrokerError::InvalidPartitions(format!(
            "{partitions} partitions requested for topic '{name}'; allowed up to {max} (partitions_per_topic_max)"
        ))),
        std::cmp::Ordering::Greater => Ok(view),
    }
}

/// Raises a topic's partition count to `partitions`, whichever kind it is: a replicated topic
/// through the controller's log (every node opens its replicas of the new partitions), a local
/// one through this node's metadata. Existing partitions keep serving meanwhile. Returns the
/// topic's partition count once the calling shard shows it.
pub async fn grow_any_topic(
    shard: &Rc<Shard>,
    name: String,
    partitions: u32,
    wait: ChangeWait,
) -> Result<u32, BrokerError> {
    let view = check_grow(shard, &name, partitions)?;
    if view.replication.is_none() {
        let grown = crate::controller::create_partitions(shard, name, partitions).await?;
        return Ok(grown.partition_shards.len() as u32);
    }
    let topic =
        on_cluster(shard, move |cluster| async move { cluster.grow_topic(name, partitions, wait).await })
            .await?;
    shown(shard, &topic).await;
    Ok(topic.replication.replicas.len() as u32)
}

/// A topic as a create request left it, whichever kind it is.
pub struct CreatedTopic {
    pub name: String,
    pub partitions: u32,
    pub overrides: TopicOverrides,
}

/// The replication factor of a cluster's topic created without one: min(3, nodes), as the
/// controller's `__consumer_offsets`; `None` on a single node.
pub fn default_replication_factor(shard: &Shard) -> Option<u16> {
    let seeds = shard.config.cluster().ok().flatten()?;
    Some(seeds.voters.len().min(3) as u16)
}

/// Creates a topic the way this broker keeps them: in a cluster every new topic goes through the
/// controller's log, replicated `replication_factor` times (default
/// `default_replication_factor`), so every node knows it; a single node keeps it local, and a
/// replication factor above 1 is refused there.
pub async fn create_any_topic(
    shard: &Rc<Shard>,
    name: String,
    partitions: u32,
    replication_factor: Option<u16>,
    overrides: TopicOverrides,
    wait: ChangeWait,
) -> Result<CreatedTopic, BrokerError> {
    let replication_factor = replication_factor.or_else(|| default_replication_factor(shard));
    match replication_factor.filter(|&rf| rf != 1 || in_cluster(shard)) {
        Some(rf) => create_topic(shard, name, partitions, rf, overrides, wait).await.map(|t| CreatedTopic {
            name: t.name,
            partitions: t.replication.replicas.len() as u32,
            overrides: t.overrides,
        }),
        None => crate::controller::create_topic(shard, name, partitions, overrides).await.map(|m| {
            CreatedTopic { name: m.name, partitions: m.partition_shards.len() as u32, overrides: m.overrides }
        }),
    }
}

/// Deletes a topic of either kind: a replicated one through the controller's log, a local one
/// through this node's metadata.
pub async fn delete_any_topic(shard: &Rc<Shard>, name: String, wait: ChangeWait) -> Result<(), BrokerError> {
    if shard.is_replicated(&name) {
        delete_topic(shard, name, wait).await
    } else {
        crate::controller::delete_topic(shard, name).await
    }
}

pub async fn delete_topic(shard: &Rc<Shard>, name: String, wait: ChangeWait) -> Result<(), BrokerError> {
    if metadata::is_internal_topic(&name) {
        return Err(BrokerError::InternalTopic { topic: name, rule: "the broker keeps it" });
    }
    on_cluster(shard, move |cluster| async move { cluster.delete_topic(name, wait).await }).await
}

/// What Kafka's Metadata needs of the cluster: every registered node and the controller leader.
pub struct KafkaView {
    pub nodes: Vec<NodeInfo>,
    pub controller: Option<u64>,
}

/// The cluster as Kafka clients see it, when this broker is a node of a cluster.
pub async fn kafka_view(shard: &Rc<Shard>) -> Option<KafkaView> {
    if !in_cluster(shard) {
        return None;
    }
    on_cluster(shard, move |cluster| async move {
        let mut nodes: Vec<NodeInfo> = cluster.state.borrow().registered().values().cloned().collect();
        if !nodes.iter().any(|n| n.id == cluster.me.id) {
            nodes.push(cluster.me.clone());
        }
        Ok(KafkaView { nodes, controller: cluster.group.borrow().leader() })
    })
    .await
    .ok()
}

/// The controller leader's native address, when this broker is a node of a cluster.
pub async fn controller_address(shard: &Rc<Shard>) -> Option<String> {
    if !in_cluster(shard) {
        return None;
    }
    on_cluster(shard, move |cluster| async move { Ok(cluster.controller_address()) }).await.ok().flatten()
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

impl Cluster {
    /// This node's view of the cluster.
    pub fn status(&self) -> ClusterStatus {
        let group = self.group.borrow();
        let state = self.state.borrow();
        let registered = state.registered();
        let heard = self.links.heard();
        let sent = self.links.sent();
        let alive_within = self.tick * ALIVE_TICKS;
        let nodes = self
            .seeds
            .voters
            .iter()
            .map(|(&id, peer)| {
                let info = registered.get(&id).or_else(|| heard.get(&id).map(|(_, info)| info));
                let info = if id == self.me.id { Some(&self.me) } else { info };
                NodeStatus {
                    id,
                    alive: id == self.me.id
                        || heard.get(&id).is_some_and(|(at, _)| at.elapsed() < alive_within),
                    registered: registered.contains_key(&id),
                    peer: peer.to_string(),
                    native: info.map(|i| i.native.clone()),
                    kafka: info.and_then(|i| i.kafka.clone()),
                    admin: info.map(|i| i.admin.clone()),
                    sent: (id != self.me.id).then(|| sent.get(&id).copied().unwrap_or_default()),
                }
            })
            .collect();
        ClusterStatus {
            node_id: self.me.id,
            cluster_id: format!("{:016x}", self.seeds.cluster_id),
            controller_leader: group.leader(),
            controller_term: group.term(),
            nodes,
            under_replicated_partitions: self.under_replicated(),
            leaderless_partitions: self.leaderless(),
            quiesced_partitions: self.replicas.quiesced(),
            stopped_replicas: self.replicas.stopped(),
            failure: self.failure.borrow().clone(),
        }
    }

    /// Polls the controller group until it has nothing more: sends, queues writes, applies.
    fn drive(&self) {
        if self.failure.borrow().is_some() {
            return;
        }
        let mut outbox = Outbox::new();
        loop {
            let mut group = self.group.borrow_mut();
            let output = match group.poll() {
                Ok(output) => output,
                Err(e) => return self.fail(format!("controller group: {e}")),
            };
            if output.send.is_empty() && output.persist.is_none() && output.committed.is_empty() {
                break;
            }
            for m in output.send {
                outbox.entry(m.to).or_default().push((GroupKey::CONTROLLER, m));
            }
            if let Some(persist) = output.persist {
                let writes = group.store_mut().take_writes();
                let _ = self.persister.unbounded_send(PersistJob { writes, persist });
            }
            drop(group);
            self.apply(&output.committed);
        }
        self.links.send(outbox);
    }

    /// Raft traffic sent to each peer, for `/metrics`.
    pub fn peer_traffic(&self) -> Vec<crate::metrics::exposition::PeerTraffic> {
        self.links
            .sent()
            .into_iter()
            .map(|(peer, c)| crate::metrics::exposition::PeerTraffic {
                peer,
                frames: c.frames,
                messages: c.messages,
                bytes: c.bytes,
                dropped_frames: c.dropped_frames,
            })
            .collect()
    }

    /// The partition replicas this node hosts.
    pub fn replicas(&self) -> &Rc<ReplicaHost> {
        &self.replicas
    }

    /// A batch from peer `from`: the controller's messages step its group, the others go to
    /// the partition replicas.
    fn on_batch(&self, from: u64, mut batch: PeerBatch) {
        if let Some(report) = batch.leader_reports.take() {
            self.reports.borrow_mut().record(from, Instant::now(), batch.report_digest, report);
        } else if batch.report_digest != 0 {
            self.reports.borrow_mut().confirm(from, Instant::now(), batch.report_digest);
        }
        for request in std::mem::take(&mut batch.controller_requests) {
            self.on_controller_request(from, &request);
        }
        for (key, message) in batch.messages {
            if key == GroupKey::CONTROLLER {
                if let Err(e) = self.group.borrow_mut().step(message) {
                    tracing::warn!(node = from, "cluster: {e}");
                }
                continue;
            }
            let target = shards::replica_shard(key, self.to_shards.len() as u32);
            match self.to_shards.get(target as usize).and_then(Option::as_ref) {
                Some(forward) => forward.push((key, message)),
                None => {
                    if !self.replicas.deliver(key, message) {
                        tracing::debug!(
                            node = from,
                            ?key,
                            "cluster: message for a group this node does not have"
                        );
                    }
                }
            }
        }
        self.drive();
    }

    fn fail(&self, reason: String) {
        tracing::error!("cluster: {reason}; this node stops taking part in the controller group");
        self.failure.borrow_mut().get_or_insert(reason);
    }

    /// Applies committed entries to the controller's state, then carries out what each command
    /// did: a registration ends its re-proposals; a topic change goes to the applier and answers
    /// this node's proposal of it.
    fn apply(&self, committed: &[Entry]) {
        for entry in committed {
            let applied = self.state.borrow_mut().apply(entry.index, &entry.data);
            let commands = match applied {
                Ok(commands) => commands,
                Err(e) => return self.fail(e.to_string()),
            };
            for command in commands {
                match command {
                    AppliedCommand::Registered(info) => {
                        tracing::info!(node = info.id, native = %info.native, "cluster: node registered");
                        self.proposed.borrow_mut().remove(&info.id);
                    }
                    AppliedCommand::Topic { request, outcome, change } => {
                        log_change(self.me.id, change.as_ref());
                        self.topics.applied(request, outcome, change);
                    }
                    AppliedCommand::Repeated { request } => tracing::debug!(
                        index = entry.index,
                        request,
                        "cluster: a topic change applied already; skipped"
                    ),
                }
            }
        }
    }

    /// The leader registers every node it hears from (and itself) whose entry is missing or stale.
    fn register_nodes(&self) {
        if !self.group.borrow().is_serving() {
            return;
        }
        let mut known: Vec<NodeInfo> = vec![self.me.clone()];
        known.extend(self.links.heard().values().map(|(_, info)| info.clone()));
        let stale: Vec<NodeInfo> =
            self.state.borrow().stale_registrations(&known).into_iter().cloned().collect();
        for info in stale {
            let recent =
                self.proposed.borrow().get(&info.id).is_some_and(|at| at.elapsed() < REPROPOSE_AFTER);
            if recent {
                continue;
            }
            match self.propose(&ControllerCommand::Register(info.clone())) {
                Ok(()) => {
                    self.proposed.borrow_mut().insert(info.id, Instant::now());
                }
                Err(e) => tracing::debug!(node = info.id, "cluster: registration not proposed: {e}"),
            }
        }
    }

    /// The controller's leader creates the replicated `__consumer_offsets` once as many nodes
    /// have registered as its replication factor, min(3, voters) (Kafka's
    /// `offsets.topic.replication.factor`): created earlier, it would keep fewer copies for good.
    fn ensure_offsets_topic(&self) {
        if !self.group.borrow().is_serving() {
            return;
        }
        let Some(replication_factor) = self.state.borrow().offsets_topic_due(self.seeds.voters.len()) else {
            return;
        };
        if self.offsets_proposed.get().is_some_and(|at| at.elapsed() < REPROPOSE_AFTER) {
            return;
        }
        // Refused when it applies if another proposal created it first: one entry lost.
        let command = TopicCommand::Create {
            request: self.request_id(),
            name: OFFSETS_TOPIC.to_string(),
            partitions: self.offsets_partitions,
            replication_factor,
            overrides: self.offsets_overrides.clone(),
        };
        match self.propose(&ControllerCommand::Topic(command)) {
            Ok(()) => {
                tracing::info!(replication_factor, "cluster: creating {OFFSETS_TOPIC}");
                self.offsets_proposed.set(Some(Instant::now()));
            }
            Err(e) => tracing::debug!("cluster: {OFFSETS_TOPIC} not proposed: {e}"),
        }
    }

    /// Appends `command` to the controller's log (this node must lead it).
    fn propose(&self, command: &ControllerCommand) -> Result<(), BrokerError> {
        let batch = state::encode_command(command, now_nanos() as i64 / 1_000_000)
            .map_err(|e| BrokerError::Internal(format!("cannot encode {command:?}: {e}")))?;
        let proposed = self.group.borrow_mut().propose(batch);
        match proposed {
            Ok(_) => Ok(()),
            Err(ProposeError::NotLeader { .. } | ProposeError::LeaderNotReady) => Err(self.not_controller()),
            Err(e) => Err(BrokerError::Internal(format!("the controller's log refused a change: {e}"))),
        }
    }

    /// The controller leader's id and native address, for a request this node cannot serve.
    fn not_controller(&self) -> BrokerError {
        let leader = self.group.borrow().leader();
        let address = leader.and_then(|id| self.node_address(id));
        BrokerError::NotController { leader, address }
    }

    /// Node `id`'s native listener, from the registry (or, for this node, its own).
    fn node_address(&self, id: u64) -> Option<String> {
        if id == self.me.id {
            return Some(self.me.native.clone());
        }
        self.state.borrow().registered().get(&id).map(|info| info.native.clone())
    }

    /// The controller leader's native address, for clients that must send topic changes there.
    pub fn controller_address(&self) -> Option<String> {
        self.group.borrow().leader().and_then(|id| self.node_address(id))
    }

    /// Runs a topic change through the controller's log, answered once this node has applied
    /// it: proposed here when this node leads the controller, else handed to the leader over
    /// the peer links (as Kafka's brokers forward to their controller), and handed again to a
    /// new leader should leadership move meanwhile (the log applies a request id once).
    async fn change_topic(
        &self,
        command: TopicCommand,
        wait: ChangeWait,
    ) -> Result<ReplicatedTopic, BrokerError> {
        self.taking_part()?;
        let request = command.request();
        let command = ControllerCommand::Topic(command);
        let first_leader = self.group.borrow().leader();
        let applied = self.topics.wait_for(request);
        if let Err(e) = self.hand_to(first_leader, &command) {
            self.topics.forget(request);
            return Err(e);
        }
        let mut handed_to = first_leader;
        let started = Instant::now();
        let deadline = wait.apply_deadline(started, self.replication_timeout);
        futures::pin_mut!(applied);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.topics.forget(request);
                return Err(BrokerError::ReplicationTimedOut {
                    topic: "the controller's log".into(),
                    partition: 0,
                    after_ms: started.elapsed().as_millis() as u64,
                });
            }
            let recheck = glommio::timer::sleep(left.min(self.tick * KEEPALIVE_TICKS as u32));
            match futures::future::select(applied.as_mut(), std::pin::pin!(recheck)).await {
                futures::future::Either::Left((Ok(outcome), _)) => return outcome,
                futures::future::Either::Left((Err(_), _)) => return Err(BrokerError::ShuttingDown),
                futures::future::Either::Right(_) => {}
            }
            if let Err(e) = self.taking_part() {
                self.topics.forget(request);
                return Err(e);
            }
            let leader = self.group.borrow().leader();
            if leader.is_some() && leader != handed_to && self.hand_to(leader, &command).is_ok() {
                handed_to = leader;
            }
        }
    }

    /// Refuses a topic change once this node's controller group has failed (`fail`): the node
    /// applies nothing more, so a wait for registrations or for the change to apply would end in
    /// a misleading `ClusterForming` or timeout.
    fn taking_part(&self) -> Result<(), BrokerError> {
        match self.failure.borrow().as_ref() {
            None => Ok(()),
            Some(reason) => Err(BrokerError::ControllerFile {
                file: format!("node {}'s controller group", self.me.id),
                detail: format!(
                    "{reason}; this node no longer takes part in it: send topic changes to another node, \
                     and restart this one once the cause is fixed"
                ),
            }),
        }
    }

    /// Proposes `command` when this node serves as the controller's `leader`, or sends it to the
    /// leader; `NotController` when no leader is known or this one cannot take changes yet.
    fn hand_to(&self, leader: Option<u64>, command: &ControllerCommand) -> Result<(), BrokerError> {
        match leader {
            Some(id) if id == self.me.id => {
                if !self.group.borrow().is_serving() {
                    return Err(self.not_controller());
                }
                self.propose(command)?;
                self.drive();
                Ok(())
            }
            Some(id) => {
                let encoded = serde_json::to_vec(command)
                    .map_err(|e| BrokerError::Internal(format!("cannot encode {command:?}: {e}")))?;
                self.links.send_controller_request(id, Bytes::from(encoded));
                Ok(())
            }
            None => Err(self.not_controller()),
        }
    }

    /// A topic change another node took from a client: proposed when this node serves as the
    /// controller's leader, dropped otherwise (the asking node hands it to the leader it learns
    /// of next, or times out). Only topic changes are taken: registrations are the leader's own.
    fn on_controller_request(&self, from: u64, request: &[u8]) {
        let command = match serde_json::from_slice::<ControllerCommand>(request) {
            Ok(command @ ControllerCommand::Topic(_)) => command,
            Ok(ControllerCommand::Register(_)) => {
                return tracing::warn!(
                    node = from,
                    "cluster: a peer asked to propose a registration; ignored"
                )
            }
            Err(e) => {
                return tracing::warn!(
                    node = from,
                    "cluster: a peer's controller request is not a command: {e}"
                )
            }
        };
        if !self.group.borrow().is_serving() {
            return tracing::debug!(
                node = from,
                "cluster: a controller request reached a node that cannot propose it"
            );
        }
        if let Err(e) = self.propose(&command) {
            tracing::debug!(node = from, "cluster: a peer's controller request not proposed: {e}");
        }
    }

    fn request_id(&self) -> u64 {
        let id = self.next_request.get();
        self.next_request.set(id.wrapping_add(1));
        id
    }

    /// Creates a replicated topic: its partitions' replica sets are placed over the registered
    /// nodes when the controller's log applies the command.
    pub async fn create_topic(
        &self,
        name: String,
        partitions: u32,
        replication_factor: u16,
        overrides: TopicOverrides,
        wait: ChangeWait,
    ) -> Result<ReplicatedTopic, BrokerError> {
        self.await_registrations(&name, replication_factor, wait).await?;
        let request = self.request_id();
        let command = TopicCommand::Create { request, name, partitions, replication_factor, overrides };
        self.change_topic(command, wait).await
    }

    pub async fn delete_topic(&self, name: String, wait: ChangeWait) -> Result<(), BrokerError> {
        let request = self.request_id();
        self.change_topic(TopicCommand::Delete { request, name }, wait).await.map(|_| ())
    }

    /// Raises a replicated topic's partition count to `partitions`; the new partitions' replica
    /// sets are placed when the controller's log applies the command.
    pub async fn grow_topic(
        &self,
        name: String,
        partitions: u32,
        wait: ChangeWait,
    ) -> Result<ReplicatedTopic, BrokerError> {
        // Every partition keeps the factor the topic was created with; a topic this node does not
        // know yet is the log's to refuse.
        let replication_factor = self.topics.replication_factor(&name);
        if let Some(replication_factor) = replication_factor {
            self.await_registrations(&name, replication_factor, wait).await?;
        }
        let request = self.request_id();
        self.change_topic(TopicCommand::Grow { request, name, partitions }, wait).await
    }

    /// Waits until as many nodes have registered, as this node applied the controller's log, as
    /// `replication_factor` copies of `topic` need (`forming::fit`), checking every tick for as
    /// long as `wait` allows (by default `replication_timeout_ms`): a cluster just started registers its nodes within a few
    /// ticks of electing its controller, and proposing earlier would have the log refuse the
    /// change for good. A factor beyond the seeds and the registered nodes together is refused at
    /// once (InvalidReplicationFactor); one still short after the wait is refused as
    /// `ClusterForming`, which clients retry.
    async fn await_registrations(
        &self,
        topic: &str,
        replication_factor: u16,
        wait: ChangeWait,
    ) -> Result<(), BrokerError> {
        let seeds: Vec<u64> = self.seeds.voters.keys().copied().collect();
        let started = Instant::now();
        let deadline = wait.forming_deadline(started, self.replication_timeout);
        let mut logged = false;
        loop {
            self.taking_part()?;
            let registered: Vec<u64> = self.state.borrow().registered().keys().copied().collect();
            let missing = match forming::fit(topic, replication_factor, &seeds, &registered) {
                Fit::Now => return Ok(()),
                Fit::Never(reason) => return Err(BrokerError::InvalidReplicationFactor(reason)),
                Fit::Forming { missing } => missing,
            };
            let now = Instant::now();
            let waited = now.saturating_duration_since(started);
            if now >= deadline {
                return Err(BrokerError::ClusterForming {
                    topic: topic.to_string(),
                    replication_factor,
                    registered,
                    missing,
                    waited_ms: waited.as_millis() as u64,
                });
            }
            if !logged {
                logged = true;
                tracing::info!(
                    topic,
                    replication_factor,
                    ?registered,
                    ?missing,
                    "cluster: the cluster is still forming; the topic change waits for nodes to register"
                );
            }
            glommio::timer::sleep(self.tick.min(deadline - now)).await;
        }
    }

    async fn run_ticks(self: Rc<Self>) {
        let mut last_digest = 0;
        let mut told = None;
        let down_after = self.tick * GroupSettings::default().election_ticks as u32;
        for ticks in 0u64.. {
            glommio::timer::sleep(self.tick).await;
            self.group.borrow_mut().tick();
            self.register_nodes();
            self.ensure_offsets_topic();
            self.drive();
            // Every shard's replicas learn which peers are down and where nodes listen.
            let view = NodeView { down: self.links.down(down_after), addresses: self.leader_addresses() };
            if told.as_ref() != Some(&view) {
                let Some(shard) = self.shard.upgrade() else { return };
                view.publish(&shard).await;
                told = Some(view);
            }
            // Raft followers never write to each other, so every node also says it is alive to
            // every peer every few ticks, with the partitions it leads whose in-sync set is short.
            // The report goes whole when it changed and every `WHOLE_REPORT_TICKS`; in between, its
            // digest says it is unchanged (a node leading thousands of single-copy partitions
            // reports each of them).
            if ticks % KEEPALIVE_TICKS == 0 {
                let report = self.replicas.leader_reports(self.seeds.voters.len());
                let digest = crate::replication::wire::report_digest(&report);
                let whole = digest != last_digest || ticks % WHOLE_REPORT_TICKS == 0;
                last_digest = digest;
                self.links.send_keepalive(links::Keepalive { report, digest, whole });
            }
        }
    }

    /// Writes the controller's log in order, one blocking job at a time, each covering every
    /// write queued while the previous one ran; then releases what waited on them.
    async fn run_persister(self: Rc<Self>, mut jobs: mpsc::UnboundedReceiver<PersistJob>) {
        while let Some(first) = jobs.next().await {
            let mut writes = first.writes;
            let mut waiting = vec![first.persist];
            while let Ok(job) = jobs.try_recv() {
                writes.merge(job.writes);
                waiting.push(job.persist);
            }
            let dir = self.log_dir.clone();
            let written =
                glommio::executor().spawn_blocking(move || writes.write_to(&mut DirFiles::new(dir))).await;
            if let Err(e) = written {
                return self.fail(format!("cannot write the controller's log: {e}"));
            }
            let mut outbox = Outbox::new();
            for persist in waiting {
                self.group.borrow_mut().persisted(persist.number);
                for m in persist.then_send {
                    outbox.entry(m.to).or_default().push((GroupKey::CONTROLLER, m));
                }
            }
            self.links.send(outbox);
            self.drive();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kafka_timeout_bounds_both_waits_and_none_skips_the_forming_wait() {
        let (now, default) = (Instant::now(), Duration::from_secs(10));
        let later = now + Duration::from_millis(1);
        let asked = ChangeWait::kafka(2_500, now);
        assert_eq!(asked, ChangeWait::Until(now + Duration::from_millis(2_500)));
        assert_eq!(asked.forming_deadline(later, default), now + Duration::from_millis(2_500));
        assert_eq!(asked.apply_deadline(later, default), now + Duration::from_millis(2_500));
        for none in [0, -1] {
            let wait = ChangeWait::kafka(none, now);
            assert_eq!(wait, ChangeWait::NotForming);
            assert_eq!(wait.forming_deadline(later, default), later);
            assert_eq!(wait.apply_deadline(later, default), later + default);
        }
        assert_eq!(ChangeWait::Default.forming_deadline(later, default), later + default);
    }
}
