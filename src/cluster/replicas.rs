//! The partition replicas one shard hosts (issue 11, step 3). Each replica is a task that owns
//! its `shard::replica::PartitionReplica` and takes its inputs — messages from peers, ticks,
//! proposals — from a queue, so nothing else ever holds it across its IO: it steps what has
//! arrived, drives one round (writes, fdatasync, then the messages that waited on them) and
//! publishes its status — and, on a leader, its followers' progress (in sync or not, lag). One
//! timer ticks every replica that is awake: an idle group goes quiet (`replication::quiesce`) and
//! costs no tick, no heartbeat and no queue entry until a write, a message or a node's death
//! wakes it. Node-level liveness (which peers are down) is set from outside (`set_down`, from the
//! keepalives every node sends), and the quiet replicas are told when a node goes down. What a
//! replica sends leaves through an `Outlet`: the peer links on shard 0, a forwarder to them on
//! the other shards (`cluster::shards`).
//!
//! Every shard of a node hosts the replicas of the partitions it owns (`shards::replica_shard`).
//! The hosts of the other shards mirror their replicas' state to shard 0's (`take_changes`,
//! `mirror`), where the node-wide questions — who leads, who is in sync, what to report to
//! peers, metrics — are answered.
//! Depends on `links` (the outbox shape), `shard::replica`, `replication`.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures::channel::{mpsc, oneshot};
use futures::StreamExt;
use raft::eraftpb::Message;

use super::links::{Outbox, PeerLinks};
use crate::record::BatchHeader;
use crate::replication::epochs::LeaderEpochs;
use crate::replication::group::{FollowerProgress, ProposeError, Proposed, RaftGroup, Role};
use crate::replication::replica_log::ReplicaLog;
use crate::replication::wire::{GroupKey, LeaderReport};
use crate::shard::replica::{PartitionReplica, ProposalRefused};
use crate::storage::notify::Notify;
use crate::storage::{Partition, StorageError};

/// When a replica forgets the oldest entries of its window (8 bytes of memory each).
#[derive(Debug, Clone, Copy)]
pub struct Compaction {
    /// Entries kept behind what may be forgotten: what an in-sync voter that fell this far
    /// behind can still be sent from the log. Further behind, or out of the in-sync replicas,
    /// it is sent a snapshot and restarts its log at the leader's anchor.
    pub keep: u64,
    /// Forgetting waits until this many more entries could go: one state save per that many.
    pub step: u64,
}

impl Default for Compaction {
    fn default() -> Self {
        Compaction { keep: 1_000, step: 4_000 }
    }
}

/// The elections this node's replicas run at once. When a node dies, every group it led has
/// followers here whose election timeouts run out within one timeout of each other (quiet ones
/// are woken together): thousands of campaigns at once, every vote and term change waiting on a
/// state save, and on a loaded machine rounds that outlast the timeout split votes again and
/// again (measured at 10,000 partitions: docs/benchmarks.md). A replica whose election falls due
/// while every slot is taken holds its election clock for a tick and asks again; an election
/// started otherwise (a peer's leadership transfer, a campaign at creation) takes a slot beyond
/// the limit rather than wait.
pub struct Campaigns {
    limit: usize,
    running: Cell<usize>,
}

impl Campaigns {
    /// At most `limit` elections at once; 0: no limit.
    pub fn new(limit: usize) -> Rc<Campaigns> {
        Rc::new(Campaigns { limit: if limit == 0 { usize::MAX } else { limit }, running: Cell::new(0) })
    }

    /// Elections under way on this node.
    pub fn running(&self) -> usize {
        self.running.get()
    }
}

/// One replica's hold on a slot of its node's `Campaigns`, given back when its election ends or
/// the replica's task does.
struct CampaignSlot {
    campaigns: Rc<Campaigns>,
    held: bool,
}

impl CampaignSlot {
    /// Whether an election due now may start: a slot is held or free (and taken).
    fn may_start(&mut self) -> bool {
        if !self.held {
            let running = self.campaigns.running.get();
            if running >= self.campaigns.limit {
                return false;
            }
            self.campaigns.running.set(running + 1);
            self.held = true;
        }
        true
    }

    /// Keeps a slot exactly while the replica campaigns.
    fn settle(&mut self, campaigning: bool) {
        let running = self.campaigns.running.get();
        match (self.held, campaigning) {
            (true, false) => {
                debug_assert!(running > 0);
                self.campaigns.running.set(running.saturating_sub(1));
                self.held = false;
            }
            (false, true) => {
                self.campaigns.running.set(running + 1);
                self.held = true;
            }
            _ => {}
        }
    }
}

impl Drop for CampaignSlot {
    fn drop(&mut self) {
        self.settle(false);
    }
}

/// What a replica task takes from its queue.
enum Input {
    Message(Message),
    Tick,
    /// The set of nodes counted down gained one: a quiet replica may have to wake.
    NodesDown,
    /// Time to check whether leadership should go back to the preferred replica.
    Balance,
    /// Campaign now: this node is the preferred replica of a group that never had a term.
    Campaign,
    Propose(BytesMut, oneshot::Sender<Result<Proposed, HostError>>),
}

/// A replica as its task last published it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaStatus {
    pub role: Role,
    pub serving: bool,
    pub leader: Option<u64>,
    pub term: u64,
    pub high_watermark: i64,
    /// The last entry the replica has forgotten (its saved anchor).
    pub anchor: u64,
    /// Set when the replica stopped on an error (its log could not be written or read).
    pub failed: bool,
}

struct Hosted {
    inputs: mpsc::UnboundedSender<Input>,
    status: Rc<Cell<ReplicaStatus>>,
    /// The replica's leader epochs as its task last published them, with its status.
    epochs: Rc<RefCell<Rc<LeaderEpochs>>>,
    /// On a leader, its followers as last published; empty otherwise.
    followers: Rc<RefCell<Vec<FollowerProgress>>>,
    /// Woken whenever the task publishes a status.
    changed: Rc<Notify>,
    partition: Rc<Partition>,
    /// The replica's group is quiet, as its task last published: the timer skips it.
    quiet: Rc<Cell<bool>>,
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("no replica of {0:?} on this node")]
    Unknown(GroupKey),
    #[error("the replica of {0:?} stopped")]
    Stopped(GroupKey),
    #[error(transparent)]
    Propose(#[from] ProposeError),
    /// An idempotent producer's batch its state refuses (fenced, out of order).
    #[error(transparent)]
    Producer(StorageError),
    /// Kafka's NOT_LEADER_OR_FOLLOWER: the batch may or may not commit under the new leader; an
    /// idempotent producer's retry finds out without a duplicate.
    #[error("leadership moved before the batch committed (term {term} ended; leader now {leader:?})")]
    LeadershipLost { term: u64, leader: Option<u64> },
    /// Kafka's REQUEST_TIMED_OUT: no quorum committed it in time (it may still commit).
    #[error("not committed within {0:?}: too few replicas reachable")]
    TimedOut(Duration),
}

impl From<ProposalRefused> for HostError {
    fn from(refused: ProposalRefused) -> HostError {
        match refused {
            ProposalRefused::Group(e) => HostError::Propose(e),
            ProposalRefused::Producer(e) => HostError::Producer(e),
        }
    }
}

/// Where a host's replicas send their messages.
pub trait Outlet {
    /// Queues `outbox`; it leaves with what else is queued in this pass of the executor.
    fn send(&self, outbox: Outbox);
}

impl Outlet for PeerLinks {
    fn send(&self, outbox: Outbox) {
        PeerLinks::send(self, outbox);
    }
}

/// A replica's state as its host mirrors it to shard 0's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirrored {
    pub status: ReplicaStatus,
    /// On a leader, its followers; empty otherwise.
    pub followers: Vec<FollowerProgress>,
    pub quiet: bool,
}

/// What changed on a host since it last said: each replica whose state changed (`None`: no
/// longer hosted) and the host's counts.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    pub replicas: Vec<(GroupKey, Option<Mirrored>)>,
    pub leader_changes: u64,
    pub elections_running: u64,
}

/// The other shards' replicas as their hosts last mirrored them.
#[derive(Default)]
struct Mirrors {
    replicas: BTreeMap<GroupKey, Mirrored>,
    /// Per shard: (leader changes, elections running).
    counts: BTreeMap<u32, (u64, u64)>,
}

pub struct ReplicaHost {
    /// This node's id.
    me: u64,
    outlet: Rc<dyn Outlet>,
    campaigns: Rc<Campaigns>,
    compaction: Cell<Compaction>,
    balance_ticks: Cell<u64>,
    replicas: RefCell<BTreeMap<GroupKey, Hosted>>,
    /// Times a replica here learned of a new leader (a new term with a leader known).
    leader_changes: Rc<Cell<u64>>,
    /// Peers not heard within an election timeout (node-level liveness), as last set.
    down: Rc<RefCell<BTreeSet<u64>>>,
    /// A node joined `down` since the last tick: the quiet replicas are told at the next.
    newly_down: Cell<bool>,
    /// Where a replica that stops on an error says so, for the layer that reopens it.
    stops: RefCell<Option<mpsc::UnboundedSender<GroupKey>>>,
    tick: Duration,
    /// Replicas whose published state changed since `take_changes` last ran, and a wake-up for
    /// a change that matters at once (a leader, a role, an in-sync set).
    changed: Rc<Changed>,
    /// The counts `take_changes` last gave.
    counts_said: Cell<(u64, u64)>,
    /// On shard 0: the other shards' replicas.
    mirrors: RefCell<Mirrors>,
}

/// The replicas of a host whose state changed, kept for its mirror.
#[derive(Default)]
pub struct Changed {
    keys: RefCell<BTreeSet<GroupKey>>,
    pub urgent: Notify,
}

/// Ticks a new group's preferred replica waits before campaigning (see `ReplicaHost::add`).
const CAMPAIGN_AFTER_TICKS: u32 = 4;

/// A partition this node leads, for `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Led {
    pub key: GroupKey,
    /// Members, the leader included.
    pub replicas: usize,
    pub in_sync: usize,
    pub followers: Vec<FollowerProgress>,
}

impl ReplicaHost {
    /// A host whose replicas are ticked every `tick` and run at most `campaigns_max` elections
    /// at once (0: no limit; see `Campaigns`).
    pub fn start(me: u64, outlet: Rc<dyn Outlet>, tick: Duration, campaigns_max: usize) -> Rc<ReplicaHost> {
        let host = Rc::new(ReplicaHost {
            me,
            outlet,
            campaigns: Campaigns::new(campaigns_max),
            compaction: Cell::new(Compaction::default()),
            balance_ticks: Cell::new(0),
            replicas: RefCell::new(BTreeMap::new()),
            leader_changes: Rc::new(Cell::new(0)),
            down: Rc::new(RefCell::new(BTreeSet::new())),
            newly_down: Cell::new(false),
            stops: RefCell::new(None),
            tick,
            changed: Rc::default(),
            counts_said: Cell::new((0, 0)),
            mirrors: RefCell::default(),
        });
        glommio::spawn_local(run_ticks(Rc::downgrade(&host), tick)).detach();
        host
    }

    /// Replicas hand leadership back to their preferred replica (the first of the replica set)
    /// every `ticks` ticks when it is in sync and has everything; 0: never. The host's timer
    /// asks them, quiet or not, so a quiet leader that should not lead is still moved.
    pub fn set_leader_balance(&self, ticks: u64) {
        self.balance_ticks.set(ticks);
    }

    /// Where the groups whose replica stops on an error from now on are told, one key per stop:
    /// the replica's status says `failed` until whoever takes these replaces it (`remove`, then
    /// `add`).
    pub fn set_stops(&self, stops: mpsc::UnboundedSender<GroupKey>) {
        *self.stops.borrow_mut() = Some(stops);
    }

    /// The peers that are down (not heard within an election timeout). A peer newly down wakes
    /// the quiet replicas at the next tick, so a follower of a dead leader campaigns.
    pub fn set_down(&self, down: BTreeSet<u64>) {
        if down.difference(&self.down.borrow()).next().is_some() {
            self.newly_down.set(true);
        }
        *self.down.borrow_mut() = down;
    }

    /// Replicas added from now on compact by `compaction`.
    pub fn set_compaction(&self, compaction: Compaction) {
        self.compaction.set(compaction);
    }

    /// Hosts `replica` as the member of group `key` on this node; `preferred` is the replica
    /// that should lead the group when it can (Kafka's preferred leader). A group that never had
    /// a term (a partition just created) is led at once by its preferred replica, which
    /// campaigns before any election timeout: thousands of partitions created together
    /// otherwise each wait a random timeout and campaign from whichever member's ran out first,
    /// splitting votes and putting leaders where placement did not.
    pub fn add(&self, key: GroupKey, mut replica: PartitionReplica, preferred: u64) {
        let (inputs, queue) = mpsc::unbounded();
        if preferred == self.me && replica.group().term() == 0 {
            // Every member applies the creation from the controller's log within a heartbeat
            // or two of the others: a vote request reaching a node that has not created the
            // group yet is dropped, so the campaign waits that long.
            let (campaign, after) = (inputs.clone(), self.tick * CAMPAIGN_AFTER_TICKS);
            glommio::spawn_local(async move {
                glommio::timer::sleep(after).await;
                let _ = campaign.unbounded_send(Input::Campaign);
            })
            .detach();
        }
        let status = Rc::new(Cell::new(status_of(&mut replica, false)));
        let epochs = Rc::new(RefCell::new(Rc::new(replica.group().store().epochs().clone())));
        let changed = Rc::new(Notify::default());
        let followers = Rc::new(RefCell::new(Vec::new()));
        let partition = replica.partition().clone();
        let published = Published {
            status: status.clone(),
            epochs: epochs.clone(),
            changed: changed.clone(),
            followers: followers.clone(),
            leader_changes: self.leader_changes.clone(),
            leader: Cell::new(None),
            quiet: Rc::new(Cell::new(false)),
            stops: self.stops.borrow().clone(),
            key,
            host_changed: self.changed.clone(),
            mirrored: Cell::new(None),
        };
        let quiet = published.quiet.clone();
        let balance = Balance { preferred };
        let task = run_replica(
            key,
            replica,
            queue,
            Peers {
                outlet: self.outlet.clone(),
                down: self.down.clone(),
                campaigns: CampaignSlot { campaigns: self.campaigns.clone(), held: false },
            },
            published,
            self.compaction.get(),
            balance,
        );
        glommio::spawn_local(task).detach();
        let hosted = Hosted { inputs, status, epochs, followers, changed, partition, quiet };
        self.replicas.borrow_mut().insert(key, hosted);
        self.changed.mark(key, true);
    }

    /// A message from a peer for group `key`; false when this node has no such replica.
    pub fn deliver(&self, key: GroupKey, message: Message) -> bool {
        match self.replicas.borrow().get(&key) {
            Some(hosted) => hosted.inputs.unbounded_send(Input::Message(message)).is_ok(),
            None => false,
        }
    }

    /// Stops hosting group `key`: its task ends once it has finished the round under way.
    /// Returns its partition, for the caller to close or remove.
    pub fn remove(&self, key: GroupKey) -> Option<Rc<Partition>> {
        let removed = self.replicas.borrow_mut().remove(&key).map(|hosted| hosted.partition);
        self.changed.mark(key, true);
        removed
    }

    /// Proposes a producer's batch to group `key` now (queued to its task before this returns,
    /// so proposals keep the order of the calls); the future answers where it went, once the
    /// leader has it in its log.
    pub fn propose(
        &self,
        key: GroupKey,
        batch: BytesMut,
    ) -> impl std::future::Future<Output = Result<Proposed, HostError>> {
        let (reply, answer) = oneshot::channel();
        let queued = match self.replicas.borrow().get(&key) {
            Some(hosted) => match hosted.inputs.unbounded_send(Input::Propose(batch, reply)) {
                Ok(()) => Ok(()),
                Err(_) => Err(HostError::Stopped(key)),
            },
            None => Err(HostError::Unknown(key)),
        };
        async move {
            queued?;
            answer.await.map_err(|_| HostError::Stopped(key))?
        }
    }

    /// Proposes `batch` and waits until it is committed (`acks=all`): see `committed`.
    pub async fn produce(
        &self,
        key: GroupKey,
        batch: BytesMut,
        timeout: Duration,
    ) -> Result<Proposed, HostError> {
        let deadline = Instant::now() + timeout;
        let proposed = self.propose(key, batch).await?;
        self.committed(key, proposed, deadline, timeout).await
    }

    /// Waits until `proposed` is committed: the high watermark passes its last offset and the
    /// batch there is the one proposed (same offset, same leader epoch). Fails when this replica
    /// stops leading the term first, or at `deadline` (`timeout` is what the error reports).
    pub async fn committed(
        &self,
        key: GroupKey,
        proposed: Proposed,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Proposed, HostError> {
        let (changed, partition) = match self.replicas.borrow().get(&key) {
            Some(hosted) => (hosted.changed.clone(), hosted.partition.clone()),
            None => return Err(HostError::Unknown(key)),
        };
        loop {
            let notified = changed.notified();
            let status = self.status(key).ok_or(HostError::Unknown(key))?;
            if status.failed {
                return Err(HostError::Stopped(key));
            }
            // A retry names a batch of the leader's log in `term`: committed once the high
            // watermark passes it while that term lasts (nothing of the batch is read back).
            if proposed.retry && status.term != proposed.term {
                return Err(HostError::LeadershipLost { term: proposed.term, leader: status.leader });
            }
            if proposed.retry && status.high_watermark > proposed.last_offset {
                return Ok(proposed);
            }
            if status.high_watermark > proposed.last_offset {
                let read = partition.read(proposed.base_offset, 1).await;
                let stamped =
                    read.ok().and_then(|r| r.chunks.first().and_then(|c| BatchHeader::parse(c).ok()));
                let ours = stamped.is_some_and(|h| {
                    h.base_offset == proposed.base_offset && h.partition_leader_epoch as u64 == proposed.term
                });
                if ours {
                    return Ok(proposed);
                }
                return Err(HostError::LeadershipLost { term: proposed.term, leader: status.leader });
            }
            if status.term != proposed.term || !status.serving {
                return Err(HostError::LeadershipLost { term: proposed.term, leader: status.leader });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(HostError::TimedOut(timeout));
            }
            let expired = glommio::timer::sleep(left);
            futures::pin_mut!(expired);
            futures::future::select(notified, expired).await;
        }
    }

    /// The log start offset of this shard's replica of `key`.
    pub fn log_start_offset(&self, key: GroupKey) -> Option<i64> {
        self.replicas.borrow().get(&key).map(|hosted| hosted.partition.log_start_offset())
    }

    /// This shard's replica of `key` as its task last published it.
    pub fn status(&self, key: GroupKey) -> Option<ReplicaStatus> {
        self.replicas.borrow().get(&key).map(|hosted| hosted.status.get())
    }

    /// The leader epochs of this shard's replica of `key`, as published with its status.
    pub fn epochs(&self, key: GroupKey) -> Option<Rc<LeaderEpochs>> {
        self.replicas.borrow().get(&key).map(|hosted| hosted.epochs.borrow().clone())
    }

    // ---- The node's replicas: this host's and those its node's other shards mirror here ------

    /// Calls `each` with every replica of the node this host knows: its own, then the mirrored.
    fn each_replica(&self, mut each: impl FnMut(GroupKey, ReplicaStatus, &[FollowerProgress], bool)) {
        for (&key, hosted) in self.replicas.borrow().iter() {
            each(key, hosted.status.get(), &hosted.followers.borrow(), hosted.quiet.get());
        }
        for (&key, mirrored) in &self.mirrors.borrow().replicas {
            each(key, mirrored.status, &mirrored.followers, mirrored.quiet);
        }
    }

    /// The node's replica of `key`: this host's, or as its shard last mirrored it.
    pub fn node_status(&self, key: GroupKey) -> Option<ReplicaStatus> {
        self.status(key).or_else(|| self.mirrors.borrow().replicas.get(&key).map(|m| m.status))
    }

    /// When this node leads `key`: the members in sync, itself first.
    pub fn node_in_sync(&self, key: GroupKey) -> Option<Vec<u64>> {
        if let Some(hosted) = self.replicas.borrow().get(&key) {
            return hosted.leads().then(|| members_in_sync(self.me, &hosted.followers.borrow()));
        }
        let mirrors = self.mirrors.borrow();
        let mirrored = mirrors.replicas.get(&key).filter(|m| leads(m.status))?;
        Some(members_in_sync(self.me, &mirrored.followers))
    }

    /// Replicas on this node that know no leader of their group.
    pub fn leaderless(&self) -> u64 {
        let mut count = 0;
        self.each_replica(|_, status, _, _| count += u64::from(status.leader.is_none()));
        count
    }

    /// The partitions this node leads whose in-sync replicas are fewer than their members, or
    /// whose members are fewer than the cluster's `nodes` (the others learn the leader only
    /// from this): what its keepalives report to every peer.
    pub fn leader_reports(&self, nodes: usize) -> Vec<LeaderReport> {
        let mut reports = Vec::new();
        self.each_replica(|key, status, followers, _| {
            if !leads(status) || (followers.iter().all(|f| f.in_sync) && followers.len() + 1 >= nodes) {
                return;
            }
            let in_sync = members_in_sync(self.me, followers);
            reports.push(LeaderReport { group: key, term: status.term, in_sync });
        });
        reports.sort_by_key(|report| report.group);
        reports
    }

    /// Every partition this node leads, with its followers' progress.
    pub fn led(&self) -> Vec<Led> {
        let mut led = Vec::new();
        self.each_replica(|key, status, followers, _| {
            if leads(status) {
                let in_sync = 1 + followers.iter().filter(|f| f.in_sync).count();
                led.push(Led { key, replicas: 1 + followers.len(), in_sync, followers: followers.to_vec() });
            }
        });
        led.sort_by_key(|led| led.key);
        led
    }

    /// Times a replica on this node learned of a new leader since it started.
    pub fn leader_changes(&self) -> u64 {
        self.leader_changes.get() + self.mirrors.borrow().counts.values().map(|c| c.0).sum::<u64>()
    }

    /// Replicas on this node stopped on an error (until they are reopened).
    pub fn stopped(&self) -> u64 {
        let mut count = 0;
        self.each_replica(|_, status, _, _| count += u64::from(status.failed));
        count
    }

    /// Replicas on this node whose group is quiet.
    pub fn quiesced(&self) -> u64 {
        let mut count = 0;
        self.each_replica(|_, _, _, quiet| count += u64::from(quiet));
        count
    }

    /// Elections this node's replicas run now.
    pub fn elections_running(&self) -> u64 {
        self.campaigns.running() as u64 + self.mirrors.borrow().counts.values().map(|c| c.1).sum::<u64>()
    }

    /// What changed here since the last call, for shard 0's host (`mirror`); `None` when nothing
    /// did.
    pub fn take_changes(&self) -> Option<Changes> {
        let keys = std::mem::take(&mut *self.changed.keys.borrow_mut());
        let counts = (self.leader_changes.get(), self.campaigns.running() as u64);
        let said = self.counts_said.replace(counts);
        if keys.is_empty() && counts == said {
            return None;
        }
        let replicas = self.replicas.borrow();
        let changes = keys
            .into_iter()
            .map(|key| {
                let mirrored = replicas.get(&key).map(|hosted| Mirrored {
                    status: hosted.status.get(),
                    followers: hosted.followers.borrow().clone(),
                    quiet: hosted.quiet.get(),
                });
                (key, mirrored)
            })
            .collect();
        Some(Changes { replicas: changes, leader_changes: counts.0, elections_running: counts.1 })
    }

    /// Takes in what the host of this node's shard `shard` says changed (`take_changes`).
    pub fn mirror(&self, shard: u32, changes: Changes) {
        let mut mirrors = self.mirrors.borrow_mut();
        for (key, mirrored) in changes.replicas {
            match mirrored {
                Some(mirrored) => mirrors.replicas.insert(key, mirrored),
                None => mirrors.replicas.remove(&key),
            };
        }
        mirrors.counts.insert(shard, (changes.leader_changes, changes.elections_running));
    }

    /// Where this host says a change that matters at once happened.
    pub fn changed(&self) -> &Rc<Changed> {
        &self.changed
    }
}

impl Changed {
    fn mark(&self, key: GroupKey, urgent: bool) {
        self.keys.borrow_mut().insert(key);
        if urgent {
            self.urgent.notify_all();
        }
    }
}

/// The replica leads its group (and has not stopped on an error).
fn leads(status: ReplicaStatus) -> bool {
    status.role == Role::Leader && !status.failed
}

impl Hosted {
    /// The replica leads its group (and has not stopped on an error).
    fn leads(&self) -> bool {
        leads(self.status.get())
    }
}

/// `me` and the followers in sync.
fn members_in_sync(me: u64, followers: &[FollowerProgress]) -> Vec<u64> {
    std::iter::once(me).chain(followers.iter().filter(|f| f.in_sync).map(|f| f.id)).collect()
}

/// One timer for every replica of the host that is awake; ends with the host. When a node
/// joined the down set since the last tick (`set_down`), the quiet replicas are told, so a
/// follower of a dead leader wakes and campaigns.
async fn run_ticks(host: std::rc::Weak<ReplicaHost>, tick: Duration) {
    for ticks in 1u64.. {
        glommio::timer::sleep(tick).await;
        let Some(host) = host.upgrade() else { return };
        let balance = host.balance_ticks.get();
        // Each group's check falls on its own tick of the interval: checked all at once, the
        // groups of a large node would move thousands of leaders in one tick, an election storm
        // (seen at 10,000 partitions: 6,703 left without a leader, elections failing for minutes).
        let balance_due = |key: &GroupKey| {
            let spread = u64::from(key.partition).wrapping_add(key.topic_id as u64);
            balance > 0 && ticks.wrapping_add(spread) % balance == 0
        };
        let newly_down = host.newly_down.replace(false);
        for (key, hosted) in host.replicas.borrow().iter() {
            let input = match (hosted.quiet.get(), newly_down) {
                (false, _) => Some(Input::Tick),
                (true, true) => Some(Input::NodesDown),
                (true, false) => None,
            };
            for input in input.into_iter().chain(balance_due(key).then_some(Input::Balance)) {
                let _ = hosted.inputs.unbounded_send(input);
            }
        }
    }
}

fn status_of(replica: &mut PartitionReplica, failed: bool) -> ReplicaStatus {
    let group = replica.group();
    ReplicaStatus {
        role: group.role(),
        serving: group.is_serving(),
        leader: group.leader(),
        term: group.term(),
        high_watermark: group.high_watermark(),
        anchor: group.store().anchor().index,
        failed,
    }
}

fn outbox(key: GroupKey, messages: Vec<Message>) -> Outbox {
    let mut outbox = Outbox::new();
    for m in messages {
        outbox.entry(m.to).or_default().push((key, m));
    }
    outbox
}

/// Where a replica's task shows its status.
struct Published {
    status: Rc<Cell<ReplicaStatus>>,
    epochs: Rc<RefCell<Rc<LeaderEpochs>>>,
    changed: Rc<Notify>,
    followers: Rc<RefCell<Vec<FollowerProgress>>>,
    /// The host's count of leader changes, and the last (term, leader) this replica counted.
    leader_changes: Rc<Cell<u64>>,
    leader: Cell<Option<(u64, u64)>>,
    /// Whether the group is quiet, for the host's timer.
    quiet: Rc<Cell<bool>>,
    stops: Option<mpsc::UnboundedSender<GroupKey>>,
    key: GroupKey,
    /// The host's record of changed replicas, for its mirror on shard 0.
    host_changed: Rc<Changed>,
    /// What the mirror was last told of the state that matters at once.
    mirrored: Cell<Option<Urgent>>,
}

/// A replica's state whose change its mirror hears of at once, not at the next tick: its role,
/// leader, term, serving, failed, quiet, and a digest of its followers in sync.
type Urgent = (Role, Option<u64>, u64, bool, bool, bool, u64);

impl Published {
    fn set(&self, status: ReplicaStatus) {
        if let Some(leader) = status.leader {
            if self.leader.replace(Some((status.term, leader))) != Some((status.term, leader)) {
                self.leader_changes.set(self.leader_changes.get() + 1);
            }
        }
        self.status.set(status);
        self.changed.notify_all();
        let in_sync = self
            .followers
            .borrow()
            .iter()
            .filter(|f| f.in_sync)
            .fold(1u64, |digest, f| digest.wrapping_mul(1_000_003).wrapping_add(f.id));
        let now = (
            status.role,
            status.leader,
            status.term,
            status.serving,
            status.failed,
            self.quiet.get(),
            in_sync,
        );
        let urgent = self.mirrored.replace(Some(now)) != Some(now);
        self.host_changed.mark(self.key, urgent);
    }

    /// The replica stopped on `error`: shown as failed, and told to whoever reopens replicas.
    fn stopped(&self, key: GroupKey, replica: &mut PartitionReplica, error: impl std::fmt::Display) {
        tracing::error!("replication: {error}; this replica stops");
        self.set(status_of(replica, true));
        if let Some(stops) = &self.stops {
            let _ = stops.unbounded_send(key);
        }
    }

    /// Publishes the replica's epochs with its status, copied only when they changed (once per
    /// term or truncation; a handful of entries).
    fn set_epochs(&self, replica: &mut PartitionReplica) {
        let epochs = replica.group().store().epochs();
        if **self.epochs.borrow() != *epochs {
            *self.epochs.borrow_mut() = Rc::new(epochs.clone());
        }
    }

    /// The leader's view of its followers (none on a follower), in place: no allocation per round.
    fn set_followers(&self, group: &RaftGroup<ReplicaLog>) {
        let mut followers = self.followers.borrow_mut();
        followers.clear();
        followers.extend(group.followers());
    }
}

/// Forgets the oldest entries of the replica's window once enough are applied, which also lets
/// retention delete the segments below them. A leader keeps everything an in-sync voter still
/// lacks, but not what a voter out of the in-sync replicas lacks: a dead or long-lagging follower
/// must not stop retention (Kafka and Redpanda do not let it); it is brought forward with a
/// snapshot when it returns. A follower keeps `compaction.keep` behind what it applied, for the
/// day it leads.
async fn compact_if_due(
    replica: &mut PartitionReplica,
    compaction: Compaction,
) -> Result<(), crate::shard::replica::ReplicaError> {
    let group = replica.group();
    let applied = group.commit_index();
    let limit = match group.lowest_match_in_sync() {
        Some(lowest) => lowest.min(applied),
        None => applied,
    };
    let to = limit.saturating_sub(compaction.keep);
    if to < group.store().anchor().index + compaction.step {
        return Ok(());
    }
    // `to` is at most `applied`: keep the difference.
    replica.compact(applied - to).await
}

/// Leadership goes back to the preferred replica (Kafka's `auto.leader.rebalance.enable`), so
/// leaders stay spread over the nodes as placement spread them after a node returns: otherwise
/// the survivors of a failure keep every leadership they took over for good.
#[derive(Debug, Clone, Copy)]
struct Balance {
    preferred: u64,
}

impl Balance {
    /// On a serving leader other than the preferred replica: hands leadership over when the
    /// preferred one is in sync and holds the whole log, so the transfer costs one election and
    /// no catching up (raft-rs stops taking proposals until it completes; writers retry).
    fn hand_back(&self, group: &mut RaftGroup<ReplicaLog>) {
        if !group.is_serving() || group.id() == self.preferred {
            return;
        }
        let ready = group.followers().any(|f| f.id == self.preferred && f.in_sync && f.lag == Some(0));
        if ready {
            tracing::info!(
                group = group.name(),
                to = self.preferred,
                "replication: leadership back to the preferred replica"
            );
            group.transfer_leader(self.preferred);
        }
    }
}

/// What a replica's task sends through, and which of those peers are down.
struct Peers {
    outlet: Rc<dyn Outlet>,
    /// Peers not heard within an election timeout, as the host's timer last saw them.
    down: Rc<RefCell<BTreeSet<u64>>>,
    campaigns: CampaignSlot,
}

/// The replica's task: takes everything queued, then drives rounds until raft-rs has nothing
/// more ready, then waits for the next input.
async fn run_replica(
    key: GroupKey,
    mut replica: PartitionReplica,
    mut queue: mpsc::UnboundedReceiver<Input>,
    peers: Peers,
    status: Published,
    compaction: Compaction,
    balance: Balance,
) {
    let Peers { outlet, down, campaigns: mut slot } = peers;
    while let Some(first) = queue.next().await {
        let mut next = Some(first);
        while let Some(input) = next.take().or_else(|| queue.try_recv().ok()) {
            let group = replica.group();
            match input {
                Input::Message(message) => {
                    if let Err(e) = group.step(message) {
                        tracing::warn!(group = group.name(), "replication: {e}");
                    }
                }
                // An election falling due without a free slot waits: the tick is not counted.
                Input::Tick if group.election_due() && !slot.may_start() => {}
                Input::Tick => {
                    let down = down.borrow();
                    group.tick_with(|id| !down.contains(&id));
                }
                Input::Balance => balance.hand_back(group),
                // An election is under way or over (a timeout ran out first; the balance brings
                // leadership back to the preferred replica later).
                Input::Campaign if group.leader().is_some() || group.role() != Role::Follower => {}
                Input::Campaign => {
                    if let Err(e) = group.campaign() {
                        tracing::warn!(group = group.name(), "replication: campaign at creation: {e}");
                    }
                }
                Input::NodesDown => {
                    let down = down.borrow();
                    if group.on_nodes_down(|id| down.contains(&id)) {
                        tracing::debug!(group = group.name(), "replication: a node is down; woken");
                    }
                }
                Input::Propose(batch, reply) => {
                    let _ = reply.send(replica.propose(batch).map_err(HostError::from));
                }
            }
        }
        slot.settle(replica.group().campaigning());
        loop {
            let sent = replica.drive(|messages| outlet.send(outbox(key, messages))).await;
            match sent {
                Ok(messages) => outlet.send(outbox(key, messages)),
                Err(e) => return status.stopped(key, &mut replica, e),
            }
            if !replica.group().has_ready() {
                break;
            }
        }
        if let Err(e) = compact_if_due(&mut replica, compaction).await {
            return status.stopped(key, &mut replica, e);
        }
        status.set_epochs(&mut replica);
        status.set_followers(replica.group());
        status.quiet.set(replica.group().is_quiet());
        status.set(status_of(&mut replica, false));
    }
}

#[cfg(test)]
mod tests {
    //! Three nodes, each a glommio executor on its own thread with its own peer listener on
    //! loopback, its own directory and one replica of one partition: real sockets, real frames,
    //! real O_DIRECT files and fdatasync.

    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
    use std::sync::{mpsc as std_mpsc, Arc};
    use std::time::Instant;

    use bytes::Bytes;
    use glommio::net::TcpListener;
    use glommio::{LocalExecutorBuilder, Placement};

    use super::*;
    use crate::cluster::NodeInfo;
    use crate::record::builder::BatchBuilder;
    use crate::record::BatchHeader;
    use crate::replication::group::GroupSettings;
    use crate::replication::replica_log::CacheLimits;
    use crate::storage::{Durability, LogConfig, Partition, ShardStorage, Visibility};

    const KEY: GroupKey = GroupKey { topic_id: 7, partition: 0 };
    const RECORDS: usize = 50;

    fn config() -> LogConfig {
        LogConfig {
            segment_bytes: 1 << 20,
            segment_ms: 3_600_000,
            retention_bytes: None,
            retention_ms: None,
            durability: Durability::Fsync,
            index_interval_bytes: 4096,
            batch_bytes_max: 1 << 20,
            records_per_batch_max: 1000,
            visibility: Visibility::Committed,
        }
    }

    fn info(id: u64, peer: SocketAddr) -> NodeInfo {
        NodeInfo { id, peer: peer.to_string(), native: String::new(), kafka: None, admin: String::new() }
    }

    /// Everything the node's committed log holds, batch by batch.
    async fn committed(partition: &Partition, end: i64) -> Vec<Bytes> {
        let mut out = Vec::new();
        let mut offset = 0;
        while offset < end {
            let read = partition.read(offset, 1 << 20).await.unwrap();
            for chunk in read.chunks {
                let mut position = 0;
                while position < chunk.len() {
                    let header = BatchHeader::parse(&chunk[position..]).unwrap();
                    out.push(chunk.slice(position..position + header.total_len()));
                    position += header.total_len();
                    offset = header.last_offset() + 1;
                }
            }
        }
        out.into_iter().filter(|b| BatchHeader::parse(b).unwrap().base_offset < end).collect()
    }

    /// One node of a test cluster.
    struct Node {
        id: u64,
        host: Rc<ReplicaHost>,
        links: Rc<PeerLinks>,
        /// Partition `p` of the topic is group `key(p)`; partition 0 is `KEY`.
        partitions: Vec<Rc<Partition>>,
    }

    fn key(partition: u32) -> GroupKey {
        GroupKey { partition, ..KEY }
    }

    /// Starts three nodes, each on its own executor thread with a listener on loopback, links to
    /// the others, a host and a replica of each of `groups` partitions (going quiet after
    /// `quiesce_after_ticks` idle ticks; 0: never), and keepalives as `Cluster` sends them; then
    /// runs `work(node)` on each and joins them.
    fn three_nodes<F, W>(root: &std::path::Path, groups: u32, quiesce_after_ticks: u64, work: W)
    where
        W: Fn(Node) -> F + Send + Sync + Clone + 'static,
        F: std::future::Future<Output = ()> + 'static,
    {
        let (addr_tx, addr_rx) = std_mpsc::channel();
        let mut voters_tx = Vec::new();
        let mut threads = Vec::new();
        for id in 1..=3u64 {
            let (tx, voters_rx) = std_mpsc::channel::<BTreeMap<u64, SocketAddr>>();
            voters_tx.push(tx);
            let addr_tx = addr_tx.clone();
            let dir = root.join(format!("node{id}"));
            let work = work.clone();
            let thread = LocalExecutorBuilder::new(Placement::Unbound)
                .io_memory(1 << 20)
                .spawn(move || async move {
                    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                    addr_tx.send((id, listener.local_addr().unwrap())).unwrap();
                    let voters = voters_rx.recv().unwrap();
                    let deliver_to: Rc<RefCell<Option<Rc<ReplicaHost>>>> = Rc::new(RefCell::new(None));
                    let route = deliver_to.clone();
                    let deliver: super::super::links::Deliver = Rc::new(move |_from, batch| {
                        if let Some(host) = route.borrow().as_ref() {
                            for (key, message) in batch.messages {
                                host.deliver(key, message);
                            }
                        }
                    });
                    let links =
                        PeerLinks::start(info(id, voters[&id]), 42, voters.clone(), listener, deliver);
                    let tick = Duration::from_millis(50);
                    let host = ReplicaHost::start(id, links.clone(), tick, 0);
                    let (keepalives, liveness) = (links.clone(), host.clone());
                    glommio::spawn_local(async move {
                        let down_after = tick * GroupSettings::default().election_ticks as u32;
                        for ticks in 0u64.. {
                            glommio::timer::sleep(tick).await;
                            liveness.set_down(keepalives.down(down_after));
                            if ticks % 5 == 0 {
                                let digest = crate::replication::wire::report_digest(&[]);
                                let whole = crate::cluster::links::Keepalive {
                                    report: Vec::new(),
                                    digest,
                                    whole: true,
                                };
                                keepalives.send_keepalive(whole);
                            }
                        }
                    })
                    .detach();
                    // Small enough that the tests' few dozen entries move the anchor.
                    host.set_compaction(Compaction { keep: 5, step: 10 });
                    *deliver_to.borrow_mut() = Some(host.clone());

                    let shard = ShardStorage::new(dir.clone(), 1 << 20, 0);
                    let mut partitions = Vec::new();
                    for p in 0..groups {
                        let (partition, _) =
                            Partition::open(dir.join(format!("t/{p}")), config(), shard.clone())
                                .await
                                .unwrap();
                        let members = voters.keys().copied().collect();
                        let settings = GroupSettings { quiesce_after_ticks, ..GroupSettings::default() };
                        let name = format!("t-{p}@{id}");
                        let seed = id * 1000 + u64::from(p);
                        let replica = PartitionReplica::open(
                            name,
                            id,
                            members,
                            partition.clone(),
                            settings,
                            CacheLimits::default(),
                            seed,
                        )
                        .await
                        .unwrap();
                        host.add(key(p), replica, 1);
                        partitions.push(partition);
                    }
                    work(Node { id, host, links, partitions }).await;
                })
                .unwrap();
            threads.push(thread);
        }
        let voters: BTreeMap<u64, SocketAddr> = (0..3).map(|_| addr_rx.recv().unwrap()).collect();
        for tx in &voters_tx {
            tx.send(voters.clone()).unwrap();
        }
        for thread in threads {
            thread.join().unwrap();
        }
    }

    fn record(value: &str) -> BytesMut {
        let mut builder = BatchBuilder::new();
        builder.push(1_700_000_000_000, None, Some(value.as_bytes()), &[]);
        builder.finish()
    }

    #[test]
    fn elections_beyond_the_limit_wait_for_a_slot_and_slots_come_back() {
        let campaigns = Campaigns::new(2);
        let slot = || CampaignSlot { campaigns: campaigns.clone(), held: false };
        let (mut a, mut b, mut c) = (slot(), slot(), slot());
        assert!(a.may_start() && a.may_start(), "a slot held is kept");
        assert!(b.may_start());
        assert!(!c.may_start(), "both slots are taken");
        assert_eq!(campaigns.running(), 2);
        // a's election ended: its slot is c's.
        a.settle(false);
        assert!(c.may_start());
        // An election started otherwise (a transfer) is counted beyond the limit.
        a.settle(true);
        assert_eq!(campaigns.running(), 3);
        drop((a, b));
        assert_eq!(campaigns.running(), 1, "a replica's task ending gives its slot back");
        c.settle(false);
        assert_eq!(campaigns.running(), 0);
        let unlimited = Campaigns::new(0);
        let mut slots: Vec<CampaignSlot> =
            (0..1000).map(|_| CampaignSlot { campaigns: unlimited.clone(), held: false }).collect();
        assert!(slots.iter_mut().all(CampaignSlot::may_start));
    }

    #[test]
    fn three_nodes_replicate_a_partition_over_real_sockets() {
        let tmp = tempfile::tempdir().unwrap();
        let (log_tx, log_rx) = std_mpsc::channel();
        let target = Arc::new(AtomicI64::new(-1));
        let reported = Arc::new(AtomicUsize::new(0));
        three_nodes(tmp.path(), 1, 0, move |node| {
            let (log_tx, target, reported) = (log_tx.clone(), target.clone(), reported.clone());
            async move {
                let (id, host, partition) = (node.id, node.host, node.partitions[0].clone());
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut next = 0;
                loop {
                    assert!(Instant::now() < deadline, "node {id}: no progress: {:?}", host.status(KEY));
                    let status = host.status(KEY).unwrap();
                    assert!(!status.failed);
                    if status.serving && next < RECORDS {
                        match host.produce(KEY, record(&format!("v{next}")), Duration::from_secs(10)).await {
                            Ok(proposed) => {
                                assert!(partition.high_watermark() > proposed.last_offset);
                                next += 1;
                            }
                            // Retried as a client would (no producer ids here: a retry may
                            // duplicate, which the check below allows).
                            Err(e) => tracing::debug!("node {id}: {e}"),
                        }
                        if next == RECORDS {
                            target.store(partition.high_watermark(), Ordering::SeqCst);
                        }
                        continue;
                    }
                    let end = target.load(Ordering::SeqCst);
                    if end >= 0 && partition.high_watermark() >= end {
                        log_tx.send((id, committed(&partition, end).await)).unwrap();
                        reported.fetch_add(1, Ordering::SeqCst);
                        // Stay up (heartbeats, catch-up) until every node has its log.
                        while reported.load(Ordering::SeqCst) < 3 {
                            assert!(Instant::now() < deadline, "node {id}: the others did not catch up");
                            glommio::timer::sleep(Duration::from_millis(10)).await;
                        }
                        // Every replica forgot its oldest entries in passing (keep 5, step 10)
                        // and still served the whole log above from its files.
                        let status = host.status(KEY).unwrap();
                        assert!(status.anchor >= 10 && !status.failed, "node {id}: {status:?}");
                        return;
                    }
                    glommio::timer::sleep(Duration::from_millis(5)).await;
                }
            }
        });
        let mut logs: Vec<(u64, Vec<Bytes>)> = (0..3).map(|_| log_rx.recv().unwrap()).collect();
        logs.sort_by_key(|(id, _)| *id);
        assert_eq!(logs[0].1, logs[1].1, "nodes 1 and 2 differ");
        assert_eq!(logs[0].1, logs[2].1, "nodes 1 and 3 differ");
        // In log order, first appearances: v0, v1, ... (a proposal whose term ended before its
        // commit is proposed again, and the first may still commit: no producer ids here).
        let mut values: Vec<String> = Vec::new();
        for batch in logs[0].1.iter().filter(|b| !BatchHeader::parse(b).unwrap().is_control()) {
            for record in crate::record::reader::records(batch).unwrap() {
                let value = String::from_utf8(record.unwrap().value.unwrap().to_vec()).unwrap();
                if !values.contains(&value) {
                    values.push(value);
                }
            }
        }
        let expected: Vec<String> = (0..RECORDS).map(|i| format!("v{i}")).collect();
        assert_eq!(values, expected);
    }

    #[test]
    fn produce_is_refused_by_a_follower_and_never_acknowledged_without_a_quorum() {
        let tmp = tempfile::tempdir().unwrap();
        let followers_gone = Arc::new(AtomicUsize::new(0));
        let committed_with_quorum = Arc::new(std::sync::atomic::AtomicBool::new(false));
        three_nodes(tmp.path(), 1, 0, move |node| {
            let (followers_gone, committed_with_quorum) =
                (followers_gone.clone(), committed_with_quorum.clone());
            async move {
                let (id, host, partition) = (node.id, node.host, node.partitions[0].clone());
                let deadline = Instant::now() + Duration::from_secs(60);
                // Until a leader is elected and this node knows it (and, if it is the leader, serves).
                let leader = loop {
                    assert!(Instant::now() < deadline, "node {id}: no leader: {:?}", host.status(KEY));
                    let status = host.status(KEY).unwrap();
                    match status.leader {
                        Some(leader) if leader != id || status.serving => break leader,
                        _ => glommio::timer::sleep(Duration::from_millis(10)).await,
                    }
                };
                if leader != id {
                    let refused = host.produce(KEY, record("to a follower"), Duration::from_secs(5)).await;
                    assert!(
                        matches!(
                            refused,
                            Err(HostError::Propose(ProposeError::NotLeader { leader: Some(l) })) if l == leader
                        ),
                        "node {id}: {refused:?}"
                    );
                    // Once the leader has committed with it, this node goes away: its executor
                    // ends, its connections close.
                    while !committed_with_quorum.load(Ordering::SeqCst) {
                        assert!(Instant::now() < deadline, "node {id}: the leader did not commit");
                        glommio::timer::sleep(Duration::from_millis(10)).await;
                    }
                    followers_gone.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                host.produce(KEY, record("with a quorum"), Duration::from_secs(10)).await.unwrap();
                committed_with_quorum.store(true, Ordering::SeqCst);
                while followers_gone.load(Ordering::SeqCst) < 2 {
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                }
                glommio::timer::sleep(Duration::from_millis(100)).await;
                let high_watermark = partition.high_watermark();
                let alone = host.produce(KEY, record("alone"), Duration::from_millis(300)).await;
                assert!(
                    matches!(
                        alone,
                        Err(HostError::TimedOut(_))
                            | Err(HostError::LeadershipLost { .. })
                            | Err(HostError::Propose(ProposeError::NotLeader { .. }))
                    ),
                    "acknowledged without a quorum: {alone:?}"
                );
                assert_eq!(partition.high_watermark(), high_watermark, "committed without a quorum");
            }
        });
    }

    #[test]
    fn the_heartbeats_of_many_partitions_travel_together() {
        const GROUPS: u32 = 24;
        let tmp = tempfile::tempdir().unwrap();
        let (counts_tx, counts_rx) = std_mpsc::channel();
        let done = Arc::new(AtomicUsize::new(0));
        three_nodes(tmp.path(), GROUPS, 0, move |node| {
            let (counts_tx, done) = (counts_tx.clone(), done.clone());
            async move {
                let deadline = Instant::now() + Duration::from_secs(60);
                // Every group has a leader this node knows, and the elections' writes are over.
                while (0..GROUPS).any(|p| node.host.status(key(p)).is_none_or(|s| s.leader.is_none())) {
                    assert!(Instant::now() < deadline, "node {}: groups without a leader", node.id);
                    glommio::timer::sleep(Duration::from_millis(20)).await;
                }
                glommio::timer::sleep(Duration::from_millis(500)).await;
                let before = node.links.sent();
                glommio::timer::sleep(Duration::from_secs(2)).await;
                let after = node.links.sent();
                let (mut frames, mut messages) = (0, 0);
                for (peer, counts) in &after {
                    let earlier = before.get(peer).copied().unwrap_or_default();
                    frames += counts.frames - earlier.frames;
                    messages += counts.messages - earlier.messages;
                }
                counts_tx.send((node.id, frames, messages)).unwrap();
                done.fetch_add(1, Ordering::SeqCst);
                while done.load(Ordering::SeqCst) < 3 {
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                }
            }
        });
        for _ in 0..3 {
            let (id, frames, messages) = counts_rx.recv().unwrap();
            // Idle for 2 s at a 50 ms tick: each leader heartbeats every other tick, each follower
            // answers. Gathered, a node sends each peer about one frame per tick for what its
            // leaders start and one for its answers, whatever the number of groups (about 580
            // messages in 156 frames here); sent per group, each would be a frame of its own.
            assert!(messages > 0, "node {id} sent nothing");
            assert!(
                messages >= 2 * frames,
                "node {id}: {messages} raft messages in {frames} frames: heartbeats are not coalesced"
            );
        }
    }

    /// Idle groups go quiet: once written to and idle, every replica of every group stops
    /// ticking and no Raft message leaves any node (keepalives still do); then the node leading
    /// partition 0 dies, and the others, woken by its node's silence, elect a new leader that
    /// holds every acknowledged record and takes new ones.
    #[test]
    fn idle_groups_go_quiet_and_a_quiet_leaders_death_still_elects_another() {
        const GROUPS: u32 = 4;
        let tmp = tempfile::tempdir().unwrap();
        let old_leader = Arc::new(AtomicI64::new(-1));
        let quiet = Arc::new(AtomicUsize::new(0));
        let measured = Arc::new(AtomicUsize::new(0));
        let died_at: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
        let new_end = Arc::new(AtomicI64::new(-1));
        let (report_tx, report_rx) = std_mpsc::channel();
        three_nodes(tmp.path(), GROUPS, 3, move |node| {
            let (old_leader, quiet, measured, died_at, new_end, report_tx) = (
                old_leader.clone(),
                quiet.clone(),
                measured.clone(),
                died_at.clone(),
                new_end.clone(),
                report_tx.clone(),
            );
            async move {
                let (id, host, partition) = (node.id, node.host.clone(), node.partitions[0].clone());
                let deadline = Instant::now() + Duration::from_secs(60);
                let pause = || glommio::timer::sleep(Duration::from_millis(10));
                // Every group has a leader, and partition 0's leader serves and takes 10 records.
                loop {
                    assert!(Instant::now() < deadline, "node {id}: no leaders");
                    let statuses: Vec<_> = (0..GROUPS).map(|p| host.status(key(p)).unwrap()).collect();
                    if statuses.iter().all(|s| s.leader.is_some()) && statuses[0].leader != Some(id) {
                        break;
                    }
                    if statuses[0].serving {
                        // Leadership can still move between the status and the proposal (a
                        // loaded machine delays heartbeats): nothing was proposed, so wait for the
                        // new leader to take the records instead. One batch, one proposal: it
                        // failed once in CI with leadership moving between two of ten proposals.
                        let mut batch = BatchBuilder::new();
                        for i in 0..10 {
                            batch.push(1_700_000_000_000, None, Some(format!("a{i}").as_bytes()), &[]);
                        }
                        let proposed = host.produce(KEY, batch.finish(), Duration::from_secs(10)).await;
                        if matches!(proposed, Err(HostError::Propose(ProposeError::NotLeader { .. }))) {
                            pause().await;
                            continue;
                        }
                        proposed.unwrap();
                        old_leader.store(id as i64, Ordering::SeqCst);
                        break;
                    }
                    pause().await;
                }
                while old_leader.load(Ordering::SeqCst) < 0 {
                    assert!(Instant::now() < deadline, "node {id}: partition 0 took no records");
                    pause().await;
                }
                // Idle: every replica here goes quiet.
                while host.quiesced() < u64::from(GROUPS) {
                    assert!(Instant::now() < deadline, "node {id}: {} of {GROUPS} quiet", host.quiesced());
                    pause().await;
                }
                quiet.fetch_add(1, Ordering::SeqCst);
                while quiet.load(Ordering::SeqCst) < 3 {
                    assert!(Instant::now() < deadline, "node {id}: the others did not go quiet");
                    pause().await;
                }
                let total = |links: &PeerLinks| {
                    links.sent().values().fold((0, 0), |(f, m), c| (f + c.frames, m + c.messages))
                };
                let before = total(&node.links);
                glommio::timer::sleep(Duration::from_secs(1)).await;
                let after = total(&node.links);
                report_tx.send((id, after.0 - before.0, after.1 - before.1, host.quiesced())).unwrap();
                measured.fetch_add(1, Ordering::SeqCst);
                while measured.load(Ordering::SeqCst) < 3 {
                    assert!(Instant::now() < deadline, "node {id}: the others did not measure");
                    pause().await;
                }
                let old = old_leader.load(Ordering::SeqCst) as u64;
                if id == old {
                    // This node dies: its executor ends and its connections close.
                    *died_at.lock().unwrap() = Some(Instant::now());
                    return;
                }
                // The survivors elect another leader: woken by the old leader's silence.
                let leader = loop {
                    assert!(Instant::now() < deadline, "node {id}: no new leader: {:?}", host.status(KEY));
                    let status = host.status(KEY).unwrap();
                    match status.leader {
                        Some(leader) if leader != old && (leader != id || status.serving) => break leader,
                        _ => pause().await,
                    }
                };
                let died = died_at.lock().unwrap().unwrap();
                let failover = died.elapsed();
                // Detection (an election timeout without a keepalive: 0.5 s) plus at most one
                // more election timeout; generous for a loaded machine.
                assert!(failover < Duration::from_secs(5), "node {id}: new leader after {failover:?}");
                if leader == id {
                    host.produce(KEY, record("b0"), Duration::from_secs(10)).await.unwrap();
                    new_end.store(partition.high_watermark(), Ordering::SeqCst);
                }
                loop {
                    let end = new_end.load(Ordering::SeqCst);
                    if end >= 0 && partition.high_watermark() >= end {
                        break;
                    }
                    assert!(Instant::now() < deadline, "node {id}: the new leader's record did not arrive");
                    pause().await;
                }
                let end = new_end.load(Ordering::SeqCst);
                let mut values = Vec::new();
                for batch in committed(&partition, end).await {
                    if BatchHeader::parse(&batch).unwrap().is_control() {
                        continue;
                    }
                    for record in crate::record::reader::records(&batch).unwrap() {
                        values.push(String::from_utf8(record.unwrap().value.unwrap().to_vec()).unwrap());
                    }
                }
                let expected: Vec<String> =
                    (0..10).map(|i| format!("a{i}")).chain(std::iter::once("b0".to_string())).collect();
                assert_eq!(values, expected, "node {id}");
                // Stay up until the other survivor has checked too (it needs this node's vote).
                measured.fetch_add(1, Ordering::SeqCst);
                while measured.load(Ordering::SeqCst) < 5 {
                    assert!(Instant::now() < deadline, "node {id}: the other survivor did not finish");
                    pause().await;
                }
            }
        });
        for _ in 0..3 {
            let (id, frames, messages, quiesced) = report_rx.recv().unwrap();
            // Quiet: keepalives only (4 a second to each of 2 peers), no Raft message at all.
            assert_eq!(messages, 0, "node {id}: {messages} raft messages in {frames} frames while quiet");
            assert!(frames > 0 && frames <= 12, "node {id}: {frames} frames in a quiet second");
            assert_eq!(quiesced, u64::from(GROUPS), "node {id}");
        }
    }
}
