//! Replicated topics in the controller's log (issue 11, step 3): the commands that create, grow
//! and delete them, where their replicas go, and what each node does when it applies them.
//!
//! Owns: `TopicCommand` and `ReplicatedTopic` (the state every node rebuilds from the log), the
//! placement rule, the waiters of the node that proposed a change, and the applier: one task per
//! node that carries out committed changes in log order — opening this node's replicas of a new
//! topic (or of a grown topic's new partitions) on the hosting shard and showing the topic on
//! every shard, or stopping and removing them. Placement is decided when the command is applied,
//! from the registry as the log holds it at that point, so every node computes the same replica
//! sets without shipping them.
//! May depend on `shard` (views, the gate seam, storage), `replication`, `metadata`, `config`.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::channel::{mpsc, oneshot};
use futures::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};

use crate::metadata::TopicOverrides;
use crate::replication::group::GroupSettings;
use crate::replication::replica_log::CacheLimits;
use crate::replication::wire::GroupKey;
use crate::shard::replica::PartitionReplica;
use crate::shard::replicated::Replication;
use crate::shard::{BrokerError, Shard};
use crate::storage::{self, Partition};

use super::replicas::ReplicaHost;

/// The shard that hosts this node's replicas until each moves to its partition's owner.
pub const REPLICA_SHARD: u32 = 0;

/// A topic change in the controller's log. A new kind is a new variant: entries written before
/// it still read as they were.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopicCommand {
    Create {
        request: u64,
        name: String,
        partitions: u32,
        replication_factor: u16,
        overrides: TopicOverrides,
    },
    Delete {
        request: u64,
        name: String,
    },
    /// Raises the topic's partition count to `partitions` (the new total, as Kafka's
    /// CreatePartitions asks): applied twice, the second finds the count reached and is refused.
    Grow {
        request: u64,
        name: String,
        partitions: u32,
    },
}

impl TopicCommand {
    pub fn request(&self) -> u64 {
        match self {
            TopicCommand::Create { request, .. }
            | TopicCommand::Delete { request, .. }
            | TopicCommand::Grow { request, .. } => *request,
        }
    }
}

/// A replicated topic as the controller's log defines it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicatedTopic {
    pub name: String,
    pub replication: Arc<Replication>,
    pub overrides: TopicOverrides,
}

/// What applying a change did, for the node that waits on it.
pub type Applied = Result<ReplicatedTopic, BrokerError>;

/// A committed change for the applier to carry out on this node.
enum Change {
    Create(ReplicatedTopic),
    Delete(ReplicatedTopic),
    /// The topic as it grew, and how many partitions it had before (open and serving already).
    Grow(ReplicatedTopic, u32),
}

/// Replica sets for `partitions` partitions of `replication_factor` copies over `nodes` (sorted
/// ids): partition `p` starts at node `(first + p) mod n` and takes the next ones, so leaders
/// (the first of each set, the preferred leader) spread over the nodes and a topic's id shifts
/// where its first partition lands.
pub fn place(nodes: &[u64], partitions: u32, replication_factor: u16, first: u64) -> Vec<Vec<u64>> {
    let n = nodes.len();
    (0..partitions as usize)
        .map(|p| (0..usize::from(replication_factor)).map(|k| nodes[(first as usize + p + k) % n]).collect())
        .collect()
}

/// The replicated topics as this node applied them, the proposals it waits on, and the queue of
/// changes its applier carries out.
pub struct Topics {
    me: u64,
    /// Shared with the applier, which opens a created topic only while it is still current.
    by_name: Rc<RefCell<BTreeMap<String, ReplicatedTopic>>>,
    waiting: RefCell<HashMap<u64, oneshot::Sender<Applied>>>,
    changes: mpsc::UnboundedSender<Change>,
    /// The request ids of the latest commands applied: a change handed to a second leader after
    /// the first one proposed it too is in the log twice, and only its first entry counts.
    /// Every node applies the same log, so every node skips the same entries.
    recent: RefCell<RecentRequests>,
}

/// The last `RECENT_REQUESTS` request ids applied, oldest first.
#[derive(Default)]
struct RecentRequests {
    order: VecDeque<u64>,
    seen: HashSet<u64>,
}

/// A repeat lands within a few leader changes of its first entry; far more than that apart
/// would take thousands of topic changes in between.
const RECENT_REQUESTS: usize = 4096;

impl RecentRequests {
    /// Records `request`; false when it was applied already.
    fn first_time(&mut self, request: u64) -> bool {
        if !self.seen.insert(request) {
            return false;
        }
        self.order.push_back(request);
        if self.order.len() > RECENT_REQUESTS {
            if let Some(oldest) = self.order.pop_front() {
                self.seen.remove(&oldest);
            }
        }
        true
    }
}

impl Topics {
    /// Starts the applier for node `me` on `shard` (the replica-hosting shard).
    pub fn start(me: u64, shard: std::rc::Weak<Shard>, host: Rc<ReplicaHost>) -> Topics {
        let (changes, queue) = mpsc::unbounded();
        let by_name = Rc::new(RefCell::new(BTreeMap::new()));
        let stops = host.stops();
        glommio::spawn_local(run_applier(me, shard, host, by_name.clone(), queue, stops)).detach();
        Topics { me, by_name, waiting: RefCell::new(HashMap::new()), changes, recent: RefCell::default() }
    }

    /// Waits for the outcome of proposal `request` (answered when this node applies it).
    pub fn wait_for(&self, request: u64) -> oneshot::Receiver<Applied> {
        let (tx, rx) = oneshot::channel();
        self.waiting.borrow_mut().insert(request, tx);
        rx
    }

    /// Whether a replicated topic of this name exists (as applied here).
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.borrow().contains_key(name)
    }

    /// Every replicated topic as this node applied them.
    pub fn all(&self) -> Vec<ReplicatedTopic> {
        self.by_name.borrow().values().cloned().collect()
    }

    /// Gives up waiting on `request` (it was not proposed, or its caller left).
    pub fn forget(&self, request: u64) {
        self.waiting.borrow_mut().remove(&request);
    }

    /// Applies a committed command at log index `index`, given the registered nodes there.
    pub fn apply(&self, index: u64, command: TopicCommand, registered: &[u64]) {
        let request = command.request();
        if !self.recent.borrow_mut().first_time(request) {
            return tracing::debug!(index, request, "cluster: a topic change applied already; skipped");
        }
        let outcome = match command {
            TopicCommand::Create { name, partitions, replication_factor, overrides, .. } => {
                self.create(index, name, partitions, replication_factor, overrides, registered)
            }
            TopicCommand::Delete { name, .. } => match self.by_name.borrow_mut().remove(&name) {
                Some(topic) => {
                    let _ = self.changes.unbounded_send(Change::Delete(topic.clone()));
                    Ok(topic)
                }
                None => Err(BrokerError::UnknownTopic { topic: name }),
            },
            TopicCommand::Grow { name, partitions, .. } => self.grow(name, partitions, registered),
        };
        if let Some(waiter) = self.waiting.borrow_mut().remove(&request) {
            let _ = waiter.send(outcome);
        }
    }

    fn create(
        &self,
        index: u64,
        name: String,
        partitions: u32,
        replication_factor: u16,
        overrides: TopicOverrides,
        registered: &[u64],
    ) -> Applied {
        if self.by_name.borrow().contains_key(&name) {
            return Err(BrokerError::TopicAlreadyExists { topic: name });
        }
        if replication_factor == 0 || usize::from(replication_factor) > registered.len() {
            return Err(BrokerError::InvalidReplicationFactor(format!(
                "replication factor {replication_factor} for topic '{name}': the cluster has {} registered \
                 nodes ({registered:?}); choose 1 to {}",
                registered.len(),
                registered.len()
            )));
        }
        // The entry's index is new at every creation and the same on every node.
        let topic_id = u128::from(index);
        let replicas = place(registered, partitions, replication_factor, index);
        let topic = ReplicatedTopic {
            name: name.clone(),
            replication: Arc::new(Replication { topic_id, replicas }),
            overrides,
        };
        self.by_name.borrow_mut().insert(name, topic.clone());
        let _ = self.changes.unbounded_send(Change::Create(topic.clone()));
        tracing::info!(
            topic = %topic.name,
            topic_id,
            node = self.me,
            "cluster: replicated topic created with {} partitions",
            topic.replication.replicas.len()
        );
        Ok(topic)
    }

    /// Adds partitions to a topic, placed as `place` would have placed them had the topic been
    /// created with `partitions` over the nodes registered now: with the same nodes, the spread
    /// of preferred leaders carries on where the topic's first partitions left it.
    fn grow(&self, name: String, partitions: u32, registered: &[u64]) -> Applied {
        let Some(topic) = self.by_name.borrow().get(&name).cloned() else {
            return Err(BrokerError::UnknownTopic { topic: name });
        };
        let had = topic.replication.replicas.len();
        if partitions as usize <= had {
            return Err(BrokerError::InvalidPartitions(format!(
                "topic '{name}' has {had} partitions; the count can only grow, not to {partitions}"
            )));
        }
        // Every partition of a topic has the replication factor it was created with.
        let replication_factor = topic.replication.replicas.first().map_or(0, Vec::len);
        if replication_factor == 0 || replication_factor > registered.len() {
            return Err(BrokerError::InvalidReplicationFactor(format!(
                "topic '{name}' keeps {replication_factor} copies of each partition but the cluster has {} \
                 registered nodes ({registered:?})",
                registered.len()
            )));
        }
        let first = topic.replication.topic_id as u64;
        let mut replicas = topic.replication.replicas.clone();
        replicas
            .extend(place(registered, partitions, replication_factor as u16, first).into_iter().skip(had));
        let grown = ReplicatedTopic {
            replication: Arc::new(Replication { topic_id: topic.replication.topic_id, replicas }),
            ..topic
        };
        self.by_name.borrow_mut().insert(name, grown.clone());
        let _ = self.changes.unbounded_send(Change::Grow(grown.clone(), had as u32));
        tracing::info!(
            topic = %grown.name,
            node = self.me,
            "cluster: replicated topic grown from {had} to {partitions} partitions"
        );
        Ok(grown)
    }
}

/// Where this node keeps its replica of `topic`'s partition `p`: outside `topics/` (local
/// topics), under a name that carries the topic id so a re-created name never meets old files.
fn replica_dir(data_dir: &std::path::Path, topic: &ReplicatedTopic, partition: u32) -> PathBuf {
    data_dir
        .join("replicated")
        .join(format!("{}.{:x}", topic.name, topic.replication.topic_id))
        .join(partition.to_string())
}

/// Carries out committed changes one after another, in log order. A creation or growth whose
/// topic a later entry has already deleted (at start, the replayed log holds every topic ever
/// deleted) opens nothing and shows nothing: its deletion, queued behind it, removes any files
/// left. Each change carries the topic as its entry left it, so a replayed creation opens the
/// first partitions and the growths after it the rest. Between changes it reopens the replicas
/// that stopped on an error (`Reopening`), so a reopen never races the creation, growth or
/// deletion of its topic.
async fn run_applier(
    me: u64,
    shard: std::rc::Weak<Shard>,
    host: Rc<ReplicaHost>,
    current: Rc<RefCell<BTreeMap<String, ReplicatedTopic>>>,
    mut queue: mpsc::UnboundedReceiver<Change>,
    mut stops: mpsc::UnboundedReceiver<GroupKey>,
) {
    let mut reopening = Reopening::default();
    loop {
        let due = reopening.next_due().map(|at| at.saturating_duration_since(Instant::now()));
        let event = futures::select! {
            change = queue.next() => match change {
                Some(change) => Event::Change(change),
                None => return,
            },
            key = stops.select_next_some() => Event::Stopped(key),
            _ = sleep_or_never(due).fuse() => Event::ReopenDue,
        };
        let Some(shard) = shard.upgrade() else { return };
        match event {
            Event::Change(Change::Create(topic) | Change::Grow(topic, _)) if !is_live(&current, &topic) => {}
            Event::Change(Change::Create(topic)) => open_topic(me, &shard, &host, &topic, 0).await,
            Event::Change(Change::Grow(topic, had)) => open_topic(me, &shard, &host, &topic, had).await,
            Event::Change(Change::Delete(topic)) => {
                reopening.forget_topic(topic.replication.topic_id);
                remove_topic(&shard, &host, &topic).await
            }
            Event::Stopped(key) => {
                let delay = reopening.stopped(key, Instant::now());
                tracing::warn!(
                    group = ?key,
                    "cluster: this node's replica stopped on an error; reopening it from its files in {delay:?}"
                );
            }
            Event::ReopenDue => {
                for key in reopening.take_due(Instant::now()) {
                    let topic =
                        current.borrow().values().find(|t| t.replication.topic_id == key.topic_id).cloned();
                    // Deleted meanwhile, or already replaced.
                    let Some(topic) = topic else { continue };
                    if host.status(key).is_some_and(|status| !status.failed) {
                        continue;
                    }
                    // Cheap to check again (a statvfs), and the reopen would only stop again.
                    shard.storage.refresh_disk_space();
                    if shard.storage.check_disk_space().is_err() {
                        reopening.wait(key, Instant::now() + REOPEN_FIRST);
                        continue;
                    }
                    match reopen_replica(me, &shard, &host, &topic, key.partition).await {
                        Ok(()) => {
                            reopening.reopened(key, Instant::now());
                            tracing::info!(topic = %topic.name, partition = key.partition, "cluster: replica reopened");
                        }
                        Err(e) => {
                            let delay = reopening.stopped(key, Instant::now());
                            tracing::warn!(
                                topic = %topic.name,
                                partition = key.partition,
                                "cluster: {e}; trying again in {delay:?}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Whether `topic` is still the topic of its name: a later entry may have deleted it (and a
/// creation of the name made another).
fn is_live(current: &RefCell<BTreeMap<String, ReplicatedTopic>>, topic: &ReplicatedTopic) -> bool {
    current.borrow().get(&topic.name).is_some_and(|t| t.replication.topic_id == topic.replication.topic_id)
}

/// What the applier waits for.
enum Event {
    Change(Change),
    /// The host reported a replica stopped on an error.
    Stopped(GroupKey),
    /// A stopped replica's wait is over.
    ReopenDue,
}

async fn sleep_or_never(after: Option<Duration>) {
    match after {
        Some(after) => glommio::timer::sleep(after).await,
        None => futures::future::pending().await,
    }
}

/// A replica stopped by a storage error (a full disk, a failed write or fdatasync) is reopened
/// from its files, as a restart of the process would: its Raft state and log as they are on
/// disk, then catching up from the leader. Never at once: the first wait is `REOPEN_FIRST`,
/// doubling up to `REOPEN_MAX` while it keeps stopping within `REOPEN_STABLE` of a reopen, so a
/// replica that cannot stay open costs a reopen every half minute, not a loop. While the disk is
/// below its free-space reserve, a stopped replica waits without reopening (checked each second).
#[derive(Default)]
struct Reopening {
    /// Stopped replicas and when to try each.
    due: BTreeMap<GroupKey, Instant>,
    /// Per replica: consecutive failures, and when it was last reopened.
    history: HashMap<GroupKey, (u32, Option<Instant>)>,
}

const REOPEN_FIRST: Duration = Duration::from_secs(1);
const REOPEN_MAX: Duration = Duration::from_secs(30);
const REOPEN_STABLE: Duration = Duration::from_secs(60);

impl Reopening {
    /// Records a stop (or a failed reopen) of `key` at `now`; returns the wait before the next try.
    fn stopped(&mut self, key: GroupKey, now: Instant) -> Duration {
        let (failures, reopened) = self.history.entry(key).or_insert((0, None));
        if reopened.is_some_and(|at| now.saturating_duration_since(at) >= REOPEN_STABLE) {
            *failures = 0;
        }
        let delay = REOPEN_FIRST.saturating_mul(1 << (*failures).min(5)).min(REOPEN_MAX);
        *failures += 1;
        self.due.insert(key, now + delay);
        delay
    }

    /// Tries `key` again at `at`, without counting a failure (the disk is still full).
    fn wait(&mut self, key: GroupKey, at: Instant) {
        self.due.insert(key, at);
    }

    fn reopened(&mut self, key: GroupKey, now: Instant) {
        if let Some((_, reopened)) = self.history.get_mut(&key) {
            *reopened = Some(now);
        }
    }

    fn forget_topic(&mut self, topic_id: u128) {
        self.due.retain(|key, _| key.topic_id != topic_id);
        self.history.retain(|key, _| key.topic_id != topic_id);
    }

    fn next_due(&self) -> Option<Instant> {
        self.due.values().min().copied()
    }

    /// The replicas whose wait is over, removed from the waiting.
    fn take_due(&mut self, now: Instant) -> Vec<GroupKey> {
        let due: Vec<GroupKey> = self.due.iter().filter(|(_, &at)| at <= now).map(|(&key, _)| key).collect();
        for key in &due {
            self.due.remove(key);
        }
        due
    }
}

/// Replaces this node's stopped replica of `topic`'s partition `p` with one opened afresh from
/// its files. The old partition is closed first (what it wrote stays; what failed was rolled
/// back); meanwhile the partition answers NOT_LEADER here, as it did while stopped.
async fn reopen_replica(
    me: u64,
    shard: &Rc<Shard>,
    host: &Rc<ReplicaHost>,
    topic: &ReplicatedTopic,
    p: u32,
) -> Result<(), String> {
    let key = topic.replication.key(p);
    let Some(members) = topic.replication.replicas.get(p as usize).filter(|m| m.contains(&me)) else {
        return Ok(());
    };
    if let Some(old) = host.remove(key) {
        shard.set_replica_partition(&topic.name, p, None);
        if let Err(e) = old.close().await {
            tracing::warn!(topic = %topic.name, partition = p, "closing a stopped replica: {e}");
        }
    }
    let (partition, replica) = open_replica(me, shard, topic, p).await?;
    host.add(key, replica, members[0]);
    shard.set_replica_partition(&topic.name, p, Some(partition));
    Ok(())
}

/// Opens this node's replicas of `topic`'s partitions from `from` on and shows the topic on
/// every shard. The partitions below `from` (a grown topic's first ones) are open and serving
/// already: their replicas and files are kept as they are. A replica that cannot open is logged
/// and left out (its partition answers NOT_LEADER here); the others serve.
async fn open_topic(me: u64, shard: &Rc<Shard>, host: &Rc<ReplicaHost>, topic: &ReplicatedTopic, from: u32) {
    let mut local: Vec<Option<Rc<Partition>>> = vec![None; topic.replication.replicas.len()];
    for (p, members) in topic.replication.replicas.iter().enumerate().skip(from as usize) {
        if !members.contains(&me) {
            continue;
        }
        match open_replica(me, shard, topic, p as u32).await {
            Ok((partition, replica)) => {
                host.add(topic.replication.key(p as u32), replica, members[0]);
                local[p] = Some(partition);
            }
            Err(e) => tracing::error!(topic = %topic.name, partition = p, "cluster: {e}"),
        }
    }
    // Read last, after every await: what serves the first partitions now.
    for (p, slot) in local.iter_mut().enumerate().take(from as usize) {
        *slot = shard.partition(&topic.name, p as u32);
    }
    let name: Arc<str> = Arc::from(topic.name.as_str());
    for target in 0..shard.count {
        let (name, replication, overrides) =
            (name.clone(), topic.replication.clone(), topic.overrides.clone());
        let local = if target == REPLICA_SHARD { std::mem::take(&mut local) } else { Vec::new() };
        // Partitions are `Rc`s of the hosting shard: they never cross; other shards get routes.
        let shown = if target == shard.id {
            shard.add_replicated_topic(name, replication, overrides, REPLICA_SHARD, local);
            Ok(())
        } else {
            shard
                .invoke_on(target, move |other| async move {
                    other.add_replicated_topic(name, replication, overrides, REPLICA_SHARD, Vec::new());
                })
                .await
                .await
        };
        if let Err(e) = shown {
            tracing::warn!(topic = %topic.name, shard = target, "cluster: topic not shown on a shard: {e}");
        }
    }
}

/// Opens this node's replica of `topic`'s partition `p` from its files: the partition, then its
/// Raft state over it.
async fn open_replica(
    me: u64,
    shard: &Rc<Shard>,
    topic: &ReplicatedTopic,
    p: u32,
) -> Result<(Rc<Partition>, PartitionReplica), String> {
    let settings = topic.overrides.resolve(&shard.config);
    let mut config = shard.log_config(&settings);
    // A replica's log shows readers only what its group committed, and every entry is fdatasynced
    // before its acknowledgement leaves (the Raft rule), whatever the topic asked for.
    config.visibility = storage::Visibility::Committed;
    config.durability = storage::Durability::Fsync;
    let dir = replica_dir(&shard.config.data_dir, topic, p);
    let (partition, _) = Partition::open(dir, config, shard.storage.clone())
        .await
        .map_err(|e| format!("cannot open this node's replica: {e}"))?;
    let members = topic.replication.replicas.get(p as usize).cloned().unwrap_or_default();
    let name = format!("{}/{p}", topic.name);
    let seed = me ^ (topic.replication.topic_id as u64).rotate_left(17) ^ u64::from(p) ^ super::now_nanos();
    let group = GroupSettings {
        in_sync_lag_ticks: shard.config.replica_lag_ticks(),
        quiesce_after_ticks: shard.config.raft_quiesce_after_ticks,
        ..GroupSettings::default()
    };
    let opened =
        PartitionReplica::open(name, me, members, partition.clone(), group, CacheLimits::default(), seed)
            .await;
    match opened {
        Ok(replica) => Ok((partition, replica)),
        Err(e) => {
            if let Err(e) = partition.close().await {
                tracing::warn!(topic = %topic.name, partition = p, "closing a replica that did not start: {e}");
            }
            Err(format!("cannot start this node's replica: {e}"))
        }
    }
}

/// Stops this node's replicas of `topic`, forgets it on every shard and removes its files.
async fn remove_topic(shard: &Rc<Shard>, host: &Rc<ReplicaHost>, topic: &ReplicatedTopic) {
    let name: Arc<str> = Arc::from(topic.name.as_str());
    let mut partitions = Vec::new();
    for p in 0..topic.replication.replicas.len() as u32 {
        partitions.extend(host.remove(topic.replication.key(p)));
    }
    for target in 0..shard.count {
        let name = name.clone();
        if target == shard.id {
            shard.forget_replicated_topic(&name);
        } else {
            let forgotten = shard
                .invoke_on(target, move |other| async move {
                    other.forget_replicated_topic(&name);
                })
                .await
                .await;
            if let Err(e) = forgotten {
                tracing::warn!(topic = %topic.name, shard = target, "cluster: topic not forgotten on a shard: {e}");
            }
        }
    }
    for partition in partitions {
        if let Err(e) = partition.remove().await {
            tracing::warn!(topic = %topic.name, "cluster: removing a replica's files: {e}");
        }
    }
    if let Some(dir) = replica_dir(&shard.config.data_dir, topic, 0).parent().map(PathBuf::from) {
        let removed = storage::blocking::run(move || match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(format!("{}: {e}", dir.display())),
            _ => Ok(()),
        })
        .await;
        if let Err(e) | Ok(Err(e)) = removed {
            tracing::warn!(topic = %topic.name, "cluster: removing the topic's directory: {e}");
        }
    }
    tracing::info!(topic = %topic.name, "cluster: replicated topic deleted");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_spreads_leaders_and_never_repeats_a_node_in_a_set() {
        let sets = place(&[1, 2, 3], 6, 3, 0);
        let leaders: Vec<u64> = sets.iter().map(|s| s[0]).collect();
        assert_eq!(leaders, vec![1, 2, 3, 1, 2, 3]);
        for set in &sets {
            let mut sorted = set.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), 3, "{set:?}");
        }
        assert_eq!(place(&[1, 2, 3, 4], 2, 2, 5), vec![vec![2, 3], vec![3, 4]]);
        assert_eq!(place(&[7], 2, 1, 9), vec![vec![7], vec![7]]);
    }

    /// Topics whose applier is a queue the test reads (no executor needed).
    fn topics_without_applier() -> (Topics, mpsc::UnboundedReceiver<Change>) {
        let (changes, queue) = mpsc::unbounded();
        let topics = Topics {
            me: 1,
            by_name: Rc::default(),
            waiting: RefCell::default(),
            changes,
            recent: RefCell::default(),
        };
        (topics, queue)
    }

    fn grow(request: u64, name: &str, partitions: u32) -> TopicCommand {
        TopicCommand::Grow { request, name: name.into(), partitions }
    }

    /// Applies `command` at `index` and returns what its proposer would have been answered.
    fn outcome(topics: &Topics, index: u64, command: TopicCommand, nodes: &[u64]) -> Option<Applied> {
        let mut answer = topics.wait_for(command.request());
        topics.apply(index, command, nodes);
        answer.try_recv().ok().flatten()
    }

    #[test]
    fn a_grown_topic_keeps_its_partitions_and_places_new_ones_as_a_creation_of_that_count_would() {
        let (topics, mut queue) = topics_without_applier();
        let nodes = [1, 2, 3];
        let create = TopicCommand::Create {
            request: 1,
            name: "likes".into(),
            partitions: 2,
            replication_factor: 2,
            overrides: TopicOverrides::default(),
        };
        let created = outcome(&topics, 7, create, &nodes).and_then(Result::ok).map(|t| t.replication);
        let grown =
            outcome(&topics, 9, grow(2, "likes", 5), &nodes).and_then(Result::ok).map(|t| t.replication);
        let (Some(created), Some(grown)) = (created, grown) else {
            panic!("create, then grow, both applied")
        };
        assert_eq!(grown.topic_id, created.topic_id, "the same topic");
        assert_eq!(grown.replicas[..2], created.replicas[..], "existing partitions untouched");
        assert_eq!(grown.replicas, place(&nodes, 5, 2, 7), "the spread carries on");
        assert_eq!(topics.all()[0].replication, grown);
        assert!(matches!(queue.try_recv(), Ok(Change::Create(t)) if t.replication == created));
        assert!(matches!(queue.try_recv(), Ok(Change::Grow(t, 2)) if t.replication == grown));

        // Refused when applied, changing nothing: the same count or fewer, an unknown name.
        for (request, name, partitions) in [(3, "likes", 5), (4, "likes", 3), (5, "nobody", 9)] {
            let refused = outcome(&topics, 10 + request, grow(request, name, partitions), &nodes);
            match (name, refused) {
                ("nobody", Some(Err(BrokerError::UnknownTopic { topic }))) => assert_eq!(topic, "nobody"),
                (_, Some(Err(BrokerError::InvalidPartitions(message)))) => {
                    assert!(message.contains("has 5 partitions"), "{message}")
                }
                (_, other) => panic!("grow {name} to {partitions}: {other:?}"),
            }
        }
        // A grow handed to two leaders is in the log twice; the second entry is skipped.
        assert!(outcome(&topics, 20, grow(2, "likes", 6), &nodes).is_none());
        assert_eq!(topics.all()[0].replication, grown);
        assert!(queue.try_recv().is_err(), "nothing more for the applier");
    }

    #[test]
    fn a_grow_is_written_to_the_log_as_a_variant_of_its_own() {
        let encoded = serde_json::to_string(&grow(5, "likes", 4)).ok();
        assert_eq!(encoded.as_deref(), Some(r#"{"grow":{"request":5,"name":"likes","partitions":4}}"#));
        // Entries written before it read as they did.
        let old = r#"{"delete":{"request":6,"name":"likes"}}"#;
        assert!(matches!(serde_json::from_str(old), Ok(TopicCommand::Delete { request: 6, .. })));
    }

    #[test]
    fn a_request_id_counts_once_among_the_recent_ones() {
        let mut recent = RecentRequests::default();
        assert!(recent.first_time(7));
        assert!(!recent.first_time(7), "a repeat is skipped");
        for request in 100..100 + RECENT_REQUESTS as u64 {
            assert!(recent.first_time(request));
        }
        assert_eq!(recent.order.len(), RECENT_REQUESTS);
        assert!(recent.first_time(7), "forgotten once it is old");
    }
}
