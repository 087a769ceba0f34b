//! A node in a cluster (issue 11, step 2; docs/replication.md): the peer listener and connections
//! (`transport`), the controller's Raft group on shard 0 over a log of its own
//! (`controller_log`), and the state that group replicates — for now the node registry: every
//! node's id and addresses, registered by the controller leader when it hears from a node. Each
//! node also keeps its own view of which peers it hears from (liveness). Partitions are not
//! replicated yet.
//!
//! Runs only on shard 0 and only when `seeds` is set. May depend on `replication`, `shard` (its
//! extension slot, config), `record`, `config`; the broker starts it and the admin listener reads
//! its status.

pub mod controller_log;
pub mod links;
pub mod replicas;
pub mod transport;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures::channel::mpsc;
use futures::StreamExt;
use glommio::net::TcpListener;
use raft::eraftpb::Entry;
use serde::{Deserialize, Serialize};

use crate::config::ClusterSeeds;
use crate::record::builder::BatchBuilder;
use crate::replication::group::{GroupSettings, Persist, RaftGroup};
use crate::replication::wire::{GroupKey, PeerBatch};
use crate::shard::Shard;
use controller_log::{ControllerLog, PendingWrites};
use links::{Outbox, PeerLinks};
use replicas::ReplicaHost;
pub use transport::NodeInfo;
/// Ticks between two keepalives to every peer; a peer unheard for `ALIVE_TICKS` is down.
const KEEPALIVE_TICKS: u64 = 5;
const ALIVE_TICKS: u32 = 30;
/// A registration not yet committed is proposed again after this long.
const REPROPOSE_AFTER: Duration = Duration::from_secs(2);

/// What the controller's log holds: one command per entry, a JSON record value.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ControllerCommand {
    Register(NodeInfo),
}

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
    /// The node registry as committed in the controller's log.
    registered: RefCell<BTreeMap<u64, NodeInfo>>,
    links: Rc<PeerLinks>,
    /// The partition replicas on this node.
    replicas: Rc<ReplicaHost>,
    persister: mpsc::UnboundedSender<PersistJob>,
    proposed: RefCell<BTreeMap<u64, Instant>>,
    /// Set when the controller's log cannot be written: this node stops taking part.
    failure: RefCell<Option<String>>,
}

/// What `/v1/cluster` and `ringlog cluster status` show: this node's view.
#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub node_id: u64,
    pub cluster_id: String,
    pub controller_leader: Option<u64>,
    pub controller_term: u64,
    pub nodes: Vec<NodeStatus>,
    /// Partitions are not replicated yet: always 0.
    pub under_replicated_partitions: u64,
    pub leaderless_partitions: u64,
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
        Cluster {
            tick,
            seeds,
            me,
            group: RefCell::new(group),
            registered: RefCell::new(BTreeMap::new()),
            replicas: ReplicaHost::start(links.clone(), tick),
            links,
            persister,
            proposed: RefCell::new(BTreeMap::new()),
            failure: RefCell::new(None),
        }
    });
    shard.set_extension(cluster.clone());
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

fn now_nanos() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

impl Cluster {
    /// This node's view of the cluster.
    pub fn status(&self) -> ClusterStatus {
        let group = self.group.borrow();
        let registered = self.registered.borrow();
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
            under_replicated_partitions: 0,
            leaderless_partitions: 0,
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
    fn on_batch(&self, from: u64, batch: PeerBatch) {
        for (key, message) in batch.messages {
            if key == GroupKey::CONTROLLER {
                if let Err(e) = self.group.borrow_mut().step(message) {
                    tracing::warn!(node = from, "cluster: {e}");
                }
            } else if !self.replicas.deliver(key, message) {
                tracing::debug!(node = from, ?key, "cluster: message for a group this node does not have");
            }
        }
        self.drive();
    }

    fn fail(&self, reason: String) {
        tracing::error!("cluster: {reason}; this node stops taking part in the controller group");
        self.failure.borrow_mut().get_or_insert(reason);
    }

    fn apply(&self, committed: &[Entry]) {
        for entry in committed.iter().filter(|e| !e.data.is_empty()) {
            let records = match crate::record::reader::records(&entry.data) {
                Ok(records) => records,
                Err(e) => return self.fail(format!("controller entry {} is not a batch: {e}", entry.index)),
            };
            for record in records {
                let command = record.map_err(|e| e.to_string()).and_then(|r| {
                    serde_json::from_slice::<ControllerCommand>(r.value.unwrap_or_default())
                        .map_err(|e| e.to_string())
                });
                match command {
                    Ok(ControllerCommand::Register(info)) => {
                        tracing::info!(node = info.id, native = %info.native, "cluster: node registered");
                        self.proposed.borrow_mut().remove(&info.id);
                        self.registered.borrow_mut().insert(info.id, info);
                    }
                    Err(e) => {
                        return self.fail(format!("controller entry {} holds no command: {e}", entry.index))
                    }
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
        for info in known {
            if self.registered.borrow().get(&info.id) == Some(&info) {
                continue;
            }
            let recent =
                self.proposed.borrow().get(&info.id).is_some_and(|at| at.elapsed() < REPROPOSE_AFTER);
            if recent {
                continue;
            }
            let value = match serde_json::to_vec(&ControllerCommand::Register(info.clone())) {
                Ok(value) => value,
                Err(e) => return self.fail(format!("cannot encode a registration: {e}")),
            };
            let mut batch = BatchBuilder::new();
            batch.push(now_nanos() as i64 / 1_000_000, None, Some(&value), &[]);
            match self.group.borrow_mut().propose(batch.finish()) {
                Ok(_) => {
                    self.proposed.borrow_mut().insert(info.id, Instant::now());
                }
                Err(e) => tracing::debug!(node = info.id, "cluster: registration not proposed: {e}"),
            }
        }
    }

    async fn run_ticks(self: Rc<Self>) {
        for ticks in 0u64.. {
            glommio::timer::sleep(self.tick).await;
            self.group.borrow_mut().tick();
            self.register_nodes();
            self.drive();
            // Raft followers never write to each other, so every node also says it is alive to
            // every peer: an empty batch every few ticks.
            if ticks % KEEPALIVE_TICKS == 0 {
                self.links.send(self.links.peers().map(|to| (to, Vec::new())).collect());
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
            let written = glommio::executor().spawn_blocking(move || writes.write()).await;
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
