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
pub mod transport;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures::channel::mpsc;
use futures::{AsyncWriteExt, StreamExt};
use glommio::net::{TcpListener, TcpStream};
use raft::eraftpb::{Entry, Message};
use serde::{Deserialize, Serialize};

use crate::config::ClusterSeeds;
use crate::record::builder::BatchBuilder;
use crate::replication::group::{GroupSettings, Persist, RaftGroup};
use crate::replication::wire::{self, GroupKey, PeerBatch};
use crate::shard::Shard;
use controller_log::{ControllerLog, PendingWrites};
pub use transport::NodeInfo;

/// Frames queued for one peer while its connection is down; more are dropped (Raft resends).
const QUEUED_FRAMES_MAX: usize = 256;
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
    /// Peers that dialed us: when we last had a frame from each, and what they said they are.
    heard: RefCell<BTreeMap<u64, (Instant, NodeInfo)>>,
    senders: BTreeMap<u64, mpsc::Sender<Vec<u8>>>,
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
    let mut senders = BTreeMap::new();
    let mut receivers = Vec::new();
    for (&id, &addr) in &seeds.voters {
        if id != seeds.node_id {
            let (tx, rx) = mpsc::channel(QUEUED_FRAMES_MAX);
            senders.insert(id, tx);
            receivers.push((id, addr, rx));
        }
    }
    let cluster = Rc::new(Cluster {
        tick: Duration::from_millis(shard.config.raft_tick_ms),
        seeds,
        me,
        group: RefCell::new(group),
        registered: RefCell::new(BTreeMap::new()),
        heard: RefCell::new(BTreeMap::new()),
        senders,
        persister,
        proposed: RefCell::new(BTreeMap::new()),
        failure: RefCell::new(None),
    });
    shard.set_extension(cluster.clone());
    // Entries committed before a restart are applied again from the log (no snapshots yet).
    cluster.drive();
    glommio::spawn_local(cluster.clone().run_persister(jobs)).detach();
    glommio::spawn_local(cluster.clone().run_ticks()).detach();
    glommio::spawn_local(cluster.clone().run_acceptor(listener)).detach();
    for (id, addr, rx) in receivers {
        glommio::spawn_local(cluster.clone().run_dialer(id, addr, rx)).detach();
    }
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
        let heard = self.heard.borrow();
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
        let mut outbox: BTreeMap<u64, Vec<(GroupKey, Message)>> = BTreeMap::new();
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
        self.send(outbox);
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

    fn send(&self, outbox: BTreeMap<u64, Vec<(GroupKey, Message)>>) {
        for (to, messages) in outbox {
            let Some(sender) = self.senders.get(&to) else { continue };
            let frame = wire::encode(&PeerBatch { from_node: self.me.id, to_node: to, messages });
            // A full queue means the peer is unreachable: Raft sends again what matters.
            let _ = sender.clone().try_send(frame.to_vec());
        }
    }

    /// The leader registers every node it hears from (and itself) whose entry is missing or stale.
    fn register_nodes(&self) {
        if !self.group.borrow().is_serving() {
            return;
        }
        let mut known: Vec<NodeInfo> = vec![self.me.clone()];
        known.extend(self.heard.borrow().values().map(|(_, info)| info.clone()));
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
                self.send(self.senders.keys().map(|&to| (to, Vec::new())).collect());
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
            let mut outbox: BTreeMap<u64, Vec<(GroupKey, Message)>> = BTreeMap::new();
            for persist in waiting {
                self.group.borrow_mut().persisted(persist.number);
                for m in persist.then_send {
                    outbox.entry(m.to).or_default().push((GroupKey::CONTROLLER, m));
                }
            }
            self.send(outbox);
            self.drive();
        }
    }

    async fn run_acceptor(self: Rc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok(stream) => {
                    glommio::spawn_local(self.clone().run_reader(stream)).detach();
                }
                Err(e) => {
                    tracing::warn!("cluster: peer listener: accept failed: {e}");
                    glommio::timer::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn run_reader(self: Rc<Self>, mut stream: TcpStream) {
        let (cluster_id, me) = (self.seeds.cluster_id, self.me.id);
        let voters = self.seeds.voters.clone();
        let check = |hello: &transport::Hello| {
            if hello.cluster_id != cluster_id {
                return Err(format!(
                    "cluster id {:016x} is not ours ({cluster_id:016x}): the nodes were given different seeds",
                    hello.cluster_id
                ));
            }
            if hello.to != me {
                return Err(format!("this is node {me}, not node {}", hello.to));
            }
            if hello.from == me || !voters.contains_key(&hello.from) || hello.info.id != hello.from {
                return Err(format!("node {} is not another node of this cluster", hello.from));
            }
            Ok(())
        };
        let hello = {
            let welcome = Box::pin(transport::welcome(&mut stream, check));
            let timeout = Box::pin(glommio::timer::sleep(transport::HANDSHAKE_TIMEOUT));
            match futures::future::select(welcome, timeout).await {
                futures::future::Either::Left((Ok(hello), _)) => Some(hello),
                futures::future::Either::Left((Err(e), _)) => {
                    tracing::warn!("cluster: peer connection: {e}");
                    None
                }
                futures::future::Either::Right(_) => None,
            }
        };
        let Some(hello) = hello else { return };
        let from = hello.from;
        tracing::info!(node = from, "cluster: peer connected");
        self.heard.borrow_mut().insert(from, (Instant::now(), hello.info));
        loop {
            let frame = match transport::read_frame(&mut stream).await {
                Ok(frame) => frame,
                Err(e) => {
                    tracing::info!(node = from, "cluster: peer connection closed: {e}");
                    return;
                }
            };
            let batch = match wire::decode(frame) {
                Ok(batch) if batch.from_node == from && batch.to_node == me => batch,
                Ok(batch) => {
                    tracing::warn!(
                        node = from,
                        "cluster: frame from {} to {} on this connection; closing it",
                        batch.from_node,
                        batch.to_node
                    );
                    return;
                }
                Err(e) => {
                    tracing::warn!(node = from, "cluster: bad frame, closing the connection: {e}");
                    return;
                }
            };
            if let Some((at, _)) = self.heard.borrow_mut().get_mut(&from) {
                *at = Instant::now();
            }
            for (key, message) in batch.messages {
                if key != GroupKey::CONTROLLER {
                    tracing::debug!(
                        node = from,
                        ?key,
                        "cluster: message for a group this node does not have"
                    );
                    continue;
                }
                if let Err(e) = self.group.borrow_mut().step(message) {
                    tracing::warn!(node = from, "cluster: {e}");
                }
            }
            self.drive();
        }
    }

    async fn run_dialer(
        self: Rc<Self>,
        to: u64,
        addr: std::net::SocketAddr,
        mut frames: mpsc::Receiver<Vec<u8>>,
    ) {
        let mut backoff = Duration::from_millis(100);
        let mut failures = 0u64;
        loop {
            let hello = transport::Hello {
                cluster_id: self.seeds.cluster_id,
                from: self.me.id,
                to,
                info: self.me.clone(),
            };
            let connected = async {
                let mut stream = TcpStream::connect_timeout(addr, transport::HANDSHAKE_TIMEOUT)
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                stream.set_nodelay(true)?;
                transport::greet(&mut stream, &hello).await?;
                Ok::<_, std::io::Error>(stream)
            }
            .await;
            match connected {
                Ok(mut stream) => {
                    tracing::info!(node = to, %addr, "cluster: connected to peer");
                    failures = 0;
                    backoff = Duration::from_millis(100);
                    while let Some(frame) = frames.next().await {
                        if let Err(e) = stream.write_all(&frame).await {
                            tracing::info!(node = to, "cluster: connection to peer lost: {e}");
                            break;
                        }
                    }
                }
                Err(e) => {
                    // Said once, then every 50th try, so a node that stays down does not flood
                    // the log.
                    if failures % 50 == 0 {
                        tracing::warn!(node = to, %addr, "cluster: cannot reach peer: {e}; retrying");
                    }
                    failures += 1;
                }
            }
            glommio::timer::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}
