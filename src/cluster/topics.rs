//! Replicated topics on this node (issue 11, step 3): what a node does once the controller's
//! state (`state`) has applied a committed topic change.
//!
//! Owns: the waiters of the node that proposed a change, and the applier: one task per node that
//! carries out committed changes in log order — opening this node's replicas of a new topic (or
//! of a grown topic's new partitions) on the hosting shard and showing the topic on every shard,
//! or stopping and removing them. What a change is (its outcome, the topic's id and replica
//! sets) is decided by `state::ControllerState` alone, without IO, so the simulator runs the
//! same decisions.
//! May depend on `state`, `shard` (views, the gate seam, storage), `replication`, `metadata`,
//! `config`.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::replication::group::GroupSettings;
use crate::replication::replica_log::CacheLimits;
use crate::replication::wire::GroupKey;
use crate::shard::replica::PartitionReplica;
use crate::shard::Shard;
use crate::storage::{self, Partition};
use futures::channel::{mpsc, oneshot};
use futures::{FutureExt, StreamExt};

use super::replicas::ReplicaHost;
use super::shards::replica_shard;
use super::state::{Applied, ControllerState, ReplicatedTopic, TopicChange};

/// The replicated topics as this node applied them (read from the controller's state), the
/// proposals it waits on, and the queue of changes its applier carries out.
pub struct Topics {
    /// Shared with the cluster, which applies entries to it, and with the applier, which opens a
    /// created topic only while it is still current.
    state: Rc<RefCell<ControllerState>>,
    waiting: RefCell<HashMap<u64, oneshot::Sender<Applied>>>,
    changes: mpsc::UnboundedSender<TopicChange>,
    /// Replicas of this node that stopped on an error, on whichever shard, for the applier.
    stops: mpsc::UnboundedSender<GroupKey>,
}

impl Topics {
    /// Starts the applier for node `me` on `shard` (shard 0, whose replicas are `host`'s; the
    /// other shards' hosts are reached through the mesh).
    pub fn start(
        me: u64,
        shard: std::rc::Weak<Shard>,
        host: &Rc<ReplicaHost>,
        state: Rc<RefCell<ControllerState>>,
    ) -> Topics {
        let (changes, queue) = mpsc::unbounded();
        let (stops, stopped) = mpsc::unbounded();
        host.set_stops(stops.clone());
        glommio::spawn_local(run_applier(me, shard, state.clone(), queue, stopped)).detach();
        Topics { state, waiting: RefCell::new(HashMap::new()), changes, stops }
    }

    /// This node's replica of `key` stopped on an error: the applier reopens it in a while.
    pub fn replica_stopped(&self, key: GroupKey) {
        let _ = self.stops.unbounded_send(key);
    }

    /// Waits for the outcome of proposal `request` (answered when this node applies it).
    pub fn wait_for(&self, request: u64) -> oneshot::Receiver<Applied> {
        let (tx, rx) = oneshot::channel();
        self.waiting.borrow_mut().insert(request, tx);
        rx
    }

    /// Whether a replicated topic of this name exists (as applied here).
    pub fn contains(&self, name: &str) -> bool {
        self.state.borrow().topics().contains_key(name)
    }

    /// How many copies of each partition `name` keeps, as this node applied it (`None`: no such
    /// replicated topic here).
    pub fn replication_factor(&self, name: &str) -> Option<u16> {
        let state = self.state.borrow();
        let copies = state.topics().get(name)?.replication.replicas.first()?.len();
        Some(u16::try_from(copies).unwrap_or(u16::MAX))
    }

    /// Every replicated topic as this node applied them.
    pub fn all(&self) -> Vec<ReplicatedTopic> {
        self.state.borrow().topics().values().cloned().collect()
    }

    /// Gives up waiting on `request` (it was not proposed, or its caller left).
    pub fn forget(&self, request: u64) {
        self.waiting.borrow_mut().remove(&request);
    }

    /// Carries out a topic change the controller's state applied: queues it for the applier
    /// and answers this node's proposal of it, if any.
    pub fn applied(&self, request: u64, outcome: Applied, change: Option<TopicChange>) {
        if let Some(change) = change {
            let _ = self.changes.unbounded_send(change);
        }
        if let Some(waiter) = self.waiting.borrow_mut().remove(&request) {
            let _ = waiter.send(outcome);
        }
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
    current: Rc<RefCell<ControllerState>>,
    mut queue: mpsc::UnboundedReceiver<TopicChange>,
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
            Event::Change(TopicChange::Create(topic) | TopicChange::Grow(topic, _))
                if !is_live(&current, &topic) => {}
            Event::Change(TopicChange::Create(topic)) => {
                let failed = open_topic(me, &shard, &topic, 0).await;
                reopening.not_opened(&topic, failed, Instant::now());
            }
            Event::Change(TopicChange::Grow(topic, had)) => {
                let failed = open_topic(me, &shard, &topic, had).await;
                reopening.not_opened(&topic, failed, Instant::now());
            }
            Event::Change(TopicChange::Delete(topic)) => {
                reopening.forget_topic(topic.replication.topic_id);
                remove_topic(&shard, &topic).await
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
                    let topic = current
                        .borrow()
                        .topics()
                        .values()
                        .find(|t| t.replication.topic_id == key.topic_id)
                        .cloned();
                    // Deleted meanwhile, or already replaced.
                    let Some(topic) = topic else { continue };
                    let (target, name) = (replica_shard(key, shard.count), topic.name.clone());
                    let reopened = shard
                        .invoke_on(target, move |here| async move {
                            reopen_replica(me, &here, &topic, key.partition).await
                        })
                        .await
                        .await
                        .unwrap_or_else(|e| Reopened::Failed(format!("shard {target} did not answer: {e}")));
                    match reopened {
                        Reopened::AlreadyOpen => {}
                        Reopened::DiskFull => reopening.wait(key, Instant::now() + REOPEN_FIRST),
                        Reopened::Now => {
                            reopening.reopened(key, Instant::now());
                            tracing::info!(topic = %name, partition = key.partition, "cluster: replica reopened");
                        }
                        Reopened::Failed(e) => {
                            let delay = reopening.stopped(key, Instant::now());
                            tracing::warn!(
                                topic = %name,
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
fn is_live(current: &RefCell<ControllerState>, topic: &ReplicatedTopic) -> bool {
    current
        .borrow()
        .topics()
        .get(&topic.name)
        .is_some_and(|t| t.replication.topic_id == topic.replication.topic_id)
}

/// What the applier waits for.
enum Event {
    Change(TopicChange),
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

    /// Records replicas of `topic` that could not open at its creation, its growth or the
    /// node's start: tried again as a stopped replica is, so a node whose files were out of
    /// reach for a while takes part again by itself.
    fn not_opened(&mut self, topic: &ReplicatedTopic, failed: Vec<(u32, String)>, now: Instant) {
        for (partition, error) in failed {
            let delay = self.stopped(topic.replication.key(partition), now);
            tracing::warn!(topic = %topic.name, partition, "cluster: {error}; trying again in {delay:?}");
        }
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

/// What became of a stopped replica's reopening.
enum Reopened {
    /// It is open and has not stopped (it was reopened already).
    AlreadyOpen,
    /// The disk is below its free-space reserve: not tried.
    DiskFull,
    Now,
    Failed(String),
}

/// Replaces this node's stopped replica of `topic`'s partition `p`, hosted on `shard`, with one
/// opened afresh from its files. The old partition is closed first (what it wrote stays; what
/// failed was rolled back); meanwhile the partition answers NOT_LEADER here, as it did while
/// stopped.
async fn reopen_replica(me: u64, shard: &Rc<Shard>, topic: &ReplicatedTopic, p: u32) -> Reopened {
    let key = topic.replication.key(p);
    let Some(members) = topic.replication.replicas.get(p as usize).filter(|m| m.contains(&me)) else {
        return Reopened::AlreadyOpen;
    };
    let Some(host) = shard.extension::<ReplicaHost>() else {
        return Reopened::Failed(format!("shard {} hosts no replicas", shard.id));
    };
    if host.status(key).is_some_and(|status| !status.failed) {
        return Reopened::AlreadyOpen;
    }
    // Cheap to check again (a statvfs), and the reopen would only stop again.
    shard.storage.refresh_disk_space();
    if shard.storage.check_disk_space().is_err() {
        return Reopened::DiskFull;
    }
    if let Some(old) = host.remove(key) {
        shard.set_replica_partition(&topic.name, p, None);
        if let Err(e) = old.close().await {
            tracing::warn!(topic = %topic.name, partition = p, "closing a stopped replica: {e}");
        }
    }
    match open_replica(me, shard, topic, p).await {
        Ok((partition, replica)) => {
            host.add(key, replica, members[0]);
            shard.set_replica_partition(&topic.name, p, Some(partition));
            Reopened::Now
        }
        Err(e) => Reopened::Failed(e),
    }
}

/// Opens this node's replicas of `topic`'s partitions from `from` on, each on the shard that
/// hosts it, and shows the topic on every shard. The partitions below `from` (a grown topic's
/// first ones) are open and serving already: their replicas and files are kept as they are. A
/// replica that cannot open is left out (its partition answers NOT_LEADER here) and returned
/// with the reason, for the applier to try again; the others serve.
async fn open_topic(me: u64, shard: &Rc<Shard>, topic: &ReplicatedTopic, from: u32) -> Vec<(u32, String)> {
    let partition_shards: Vec<u32> = (0..topic.replication.replicas.len() as u32)
        .map(|p| replica_shard(topic.replication.key(p), shard.count))
        .collect();
    // Every shard opens its part at once; each answers what it could not open.
    let mut answers = Vec::new();
    for target in 0..shard.count {
        let (topic, partition_shards) = (topic.clone(), partition_shards.clone());
        let answer = shard
            .invoke_on(target, move |here| async move {
                open_here(me, &here, &topic, from, partition_shards).await
            })
            .await;
        answers.push((target, answer));
    }
    let mut failed = Vec::new();
    for (target, answer) in answers {
        match answer.await {
            Ok(not_opened) => failed.extend(not_opened),
            Err(e) => {
                tracing::warn!(topic = %topic.name, shard = target, "cluster: topic not shown on a shard: {e}")
            }
        }
    }
    failed
}

/// `open_topic`'s part on one shard: opens the replicas it hosts, then shows the topic.
async fn open_here(
    me: u64,
    shard: &Rc<Shard>,
    topic: &ReplicatedTopic,
    from: u32,
    partition_shards: Vec<u32>,
) -> Vec<(u32, String)> {
    let host = shard.extension::<ReplicaHost>();
    let mut failed = Vec::new();
    let mut local: Vec<Option<Rc<Partition>>> = vec![None; topic.replication.replicas.len()];
    for (p, members) in topic.replication.replicas.iter().enumerate() {
        let p = p as u32;
        if partition_shards.get(p as usize) != Some(&shard.id) || !members.contains(&me) {
            continue;
        }
        if p < from {
            local[p as usize] = shard.partition(&topic.name, p);
            continue;
        }
        let Some(host) = &host else {
            failed.push((p, format!("shard {} hosts no replicas", shard.id)));
            continue;
        };
        match open_replica(me, shard, topic, p).await {
            Ok((partition, replica)) => {
                host.add(topic.replication.key(p), replica, members[0]);
                local[p as usize] = Some(partition);
            }
            Err(e) => failed.push((p, e)),
        }
    }
    let name: Arc<str> = Arc::from(topic.name.as_str());
    shard.add_replicated_topic(
        name,
        topic.replication.clone(),
        topic.overrides.clone(),
        partition_shards,
        local,
    );
    failed
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
async fn remove_topic(shard: &Rc<Shard>, topic: &ReplicatedTopic) {
    let mut answers = Vec::new();
    for target in 0..shard.count {
        let topic = topic.clone();
        answers.push((
            target,
            shard.invoke_on(target, move |here| async move { remove_here(&here, &topic).await }).await,
        ));
    }
    for (target, answer) in answers {
        if let Err(e) = answer.await {
            tracing::warn!(topic = %topic.name, shard = target, "cluster: topic not forgotten on a shard: {e}");
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

/// `remove_topic`'s part on one shard: stops the replicas it hosts, forgets the topic and removes
/// their files.
async fn remove_here(shard: &Rc<Shard>, topic: &ReplicatedTopic) {
    let mut partitions = Vec::new();
    if let Some(host) = shard.extension::<ReplicaHost>() {
        for p in 0..topic.replication.replicas.len() as u32 {
            partitions.extend(host.remove(topic.replication.key(p)));
        }
    }
    shard.forget_replicated_topic(&topic.name);
    for partition in partitions {
        if let Err(e) = partition.remove().await {
            tracing::warn!(topic = %topic.name, "cluster: removing a replica's files: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::replicated::Replication;
    use crate::shard::BrokerError;

    /// Topics whose applier is a queue the test reads (no executor needed).
    fn topics_without_applier() -> (Topics, mpsc::UnboundedReceiver<TopicChange>) {
        let (changes, queue) = mpsc::unbounded();
        let topics =
            Topics { state: Rc::default(), waiting: RefCell::default(), changes, stops: mpsc::unbounded().0 };
        (topics, queue)
    }

    #[test]
    fn an_applied_change_goes_to_the_applier_and_answers_only_its_proposer() {
        let (topics, mut queue) = topics_without_applier();
        let topic = ReplicatedTopic {
            name: "likes".into(),
            replication: Arc::new(Replication { topic_id: 7, replicas: vec![vec![1, 2]] }),
            overrides: Default::default(),
        };
        let mut answer = topics.wait_for(1);
        topics.applied(1, Ok(topic.clone()), Some(TopicChange::Create(topic.clone())));
        assert!(matches!(answer.try_recv(), Ok(Some(Ok(t))) if t == topic));
        assert!(matches!(queue.try_recv(), Ok(TopicChange::Create(t)) if t == topic));
        // A refusal carries nothing out; a change nobody here proposed answers no one.
        topics.applied(2, Err(BrokerError::UnknownTopic { topic: "x".into() }), None);
        topics.applied(3, Ok(topic.clone()), Some(TopicChange::Delete(topic)));
        assert!(matches!(queue.try_recv(), Ok(TopicChange::Delete(_))));
        assert!(queue.try_recv().is_err(), "nothing more for the applier");
        assert!(topics.waiting.borrow().is_empty());
    }
}
