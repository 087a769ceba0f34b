//! A node's replicas on their partitions' owning shards (issue 11): each replicated partition's
//! replica lives on one shard of the node (`replica_shard`), which runs its Raft group, writes
//! its files through its own io_uring ring and answers its produce requests; every shard has its
//! own `ReplicaHost` and `HostGate` for them.
//!
//! The peer links stay on shard 0 (`CLUSTER_SHARD`, with the controller): what a replica on
//! another shard sends is carried to them over the shard mesh (`ToLinks`), and what arrives for
//! it is carried back (`Forward`), each as one mesh message per shard per pass of the executor.
//! Shard 0 tells the others which peers are down and where nodes listen (`NodeView`), and they
//! mirror their replicas' state to shard 0's host (`run_mirror`), where the node-wide questions
//! are answered (metadata, keepalive reports, metrics).
//!
//! Depends on `replicas`, `gate`, `links` (the outbox shape), `shard` (the mesh, extensions).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::{Rc, Weak};
use std::time::Duration;

use futures::channel::mpsc;
use futures::StreamExt;
use raft::eraftpb::Message;

use super::gate::HostGate;
use super::links::Outbox;
use super::replicas::{Compaction, Outlet, ReplicaHost};
use super::Cluster;
use crate::replication::wire::GroupKey;
use crate::shard::Shard;
use crate::storage::notify::Notify;

/// The shard holding a node's controller group, peer links and node-wide replica view.
pub const CLUSTER_SHARD: u32 = crate::shard::replicated::DIRECTORY_SHARD;

/// The shard of a node with `shards` shards that hosts its replica of `key`: a topic's
/// partitions go round the shards from a place its id picks, so the partitions of many topics
/// spread evenly. Decided by each node for itself (peers address a replica by its group, and the
/// receiving node routes it), so nodes with different shard counts work together, and a node
/// restarted with another count moves its replicas (their files are the node's, not a shard's).
pub fn replica_shard(key: GroupKey, shards: u32) -> u32 {
    let spread = (key.topic_id as u64) ^ ((key.topic_id >> 64) as u64);
    (spread.wrapping_add(u64::from(key.partition)) % u64::from(shards.max(1))) as u32
}

/// Items gathered on this shard for shard `target`, carried there as one mesh message per pass
/// of the executor and handed to a handler in the order they were pushed.
pub struct Forward<T> {
    target: u32,
    pending: RefCell<Vec<T>>,
    wake: Notify,
}

impl<T: Send + 'static> Forward<T> {
    /// Starts carrying to `target`, where `handle` takes each gathering.
    pub fn start(shard: &Rc<Shard>, target: u32, handle: fn(&Rc<Shard>, Vec<T>)) -> Rc<Forward<T>> {
        debug_assert_ne!(shard.id, target, "local work never crosses the mesh");
        let forward = Rc::new(Forward { target, pending: RefCell::default(), wake: Notify::default() });
        glommio::spawn_local(forward.clone().run(Rc::downgrade(shard), handle)).detach();
        forward
    }

    pub fn push(&self, item: T) {
        self.pending.borrow_mut().push(item);
        self.wake.notify_all();
    }

    async fn run(self: Rc<Self>, shard: Weak<Shard>, handle: fn(&Rc<Shard>, Vec<T>)) {
        loop {
            let woken = self.wake.notified();
            if self.pending.borrow().is_empty() {
                woken.await;
                continue;
            }
            // Every task woken in this pass adds its part first.
            futures_lite::future::yield_now().await;
            let items = std::mem::take(&mut *self.pending.borrow_mut());
            let Some(shard) = shard.upgrade() else { return };
            // Only the send is awaited: the mesh keeps one shard's messages in order, and each
            // gathering is handled whole as soon as it arrives, so order holds end to end.
            drop(shard.invoke_on(self.target, move |there| async move { handle(&there, items) }).await);
        }
    }
}

/// The outlet of a host on a shard without the peer links: its messages go to shard 0's links.
pub struct ToLinks(Rc<Forward<Outbox>>);

impl Outlet for ToLinks {
    fn send(&self, outbox: Outbox) {
        self.0.push(outbox);
    }
}

fn to_links(shard: &Rc<Shard>, outboxes: Vec<Outbox>) {
    let Some(cluster) = shard.extension::<Cluster>() else { return };
    for outbox in outboxes {
        cluster.links.send(outbox);
    }
}

/// What shard 0 carries to another shard: peers' messages for the replicas there.
pub type ToShard = Forward<(GroupKey, Message)>;

/// Hands messages that arrived on shard 0's links to this shard's replicas.
pub fn deliver(shard: &Rc<Shard>, messages: Vec<(GroupKey, Message)>) {
    let Some(host) = shard.extension::<ReplicaHost>() else { return };
    for (key, message) in messages {
        if !host.deliver(key, message) {
            tracing::debug!(
                shard = shard.id,
                ?key,
                "cluster: message for a replica this shard does not host"
            );
        }
    }
}

/// What shard 0 tells the node's other shards about the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeView {
    /// Peers not heard within an election timeout.
    pub down: BTreeSet<u64>,
    /// Every known node's native listener, this node's included.
    pub addresses: BTreeMap<u64, String>,
}

impl NodeView {
    /// Applies the view to this shard's host and gate.
    pub fn apply(&self, shard: &Shard) {
        if let Some(host) = shard.extension::<ReplicaHost>() {
            host.set_down(self.down.clone());
        }
        if let Some(gate) = shard.extension::<HostGate>() {
            gate.set_addresses(self.addresses.clone());
        }
    }

    /// Applies the view on every shard of the node (sent to the others, not awaited there).
    pub async fn publish(&self, shard: &Rc<Shard>) {
        self.apply(shard);
        for target in (0..shard.count).filter(|&t| t != shard.id) {
            let view = self.clone();
            drop(shard.invoke_on(target, move |there| async move { view.apply(&there) }).await);
        }
    }
}

/// A host for this shard's replicas, set up from the broker's settings; `outlet` is where their
/// messages go. The node's limit on elections at once is shared out over its shards.
pub fn new_host(shard: &Shard, me: u64, outlet: Rc<dyn Outlet>) -> Rc<ReplicaHost> {
    let config = &shard.config;
    let tick = Duration::from_millis(config.raft_tick_ms);
    let elections = usize::try_from(config.raft_elections_max).unwrap_or(usize::MAX);
    let host = ReplicaHost::start(me, outlet, tick, elections.div_ceil(shard.count.max(1) as usize));
    host.set_leader_balance(config.leader_balance_interval_ms.div_ceil(config.raft_tick_ms.max(1)));
    host.set_compaction(Compaction {
        keep: config.raft_compaction_keep_entries,
        step: config.raft_compaction_step_entries,
    });
    host
}

/// Makes `host` this shard's: registered for the mesh handlers, and answering the shard's gate.
pub fn install(shard: &Rc<Shard>, host: &Rc<ReplicaHost>) -> Rc<HostGate> {
    let gate = Rc::new(HostGate::new(host.clone()));
    shard.set_extension(host.clone());
    shard.set_extension(gate.clone());
    shard.install_replica_gate(gate.clone());
    gate
}

/// Starts node `me`'s replica host on a shard other than shard 0, before the shard serves its
/// mesh (shard 0's applier opens replicas here through it).
pub fn start_shard(shard: &Rc<Shard>, me: u64) {
    debug_assert_ne!(shard.id, CLUSTER_SHARD);
    let outlet = ToLinks(Forward::start(shard, CLUSTER_SHARD, to_links));
    let host = new_host(shard, me, Rc::new(outlet));
    install(shard, &host);
    let (stops, stopped) = mpsc::unbounded();
    host.set_stops(stops);
    glommio::spawn_local(forward_stops(Rc::downgrade(shard), stopped)).detach();
    let tick = Duration::from_millis(shard.config.raft_tick_ms);
    glommio::spawn_local(run_mirror(Rc::downgrade(shard), host, tick)).detach();
}

/// Tells shard 0's applier of the replicas here that stopped on an error, to reopen them.
async fn forward_stops(shard: Weak<Shard>, mut stopped: mpsc::UnboundedReceiver<GroupKey>) {
    while let Some(key) = stopped.next().await {
        let Some(shard) = shard.upgrade() else { return };
        let told = shard.invoke_on(CLUSTER_SHARD, move |zero| async move {
            if let Some(cluster) = zero.extension::<Cluster>() {
                cluster.topics.replica_stopped(key);
            }
        });
        drop(told.await);
    }
}

/// Mirrors this shard's replicas to shard 0's host: a change of leader, role or in-sync set at
/// once (in the pass it happened), the rest (high watermarks, lags) once a tick.
async fn run_mirror(shard: Weak<Shard>, host: Rc<ReplicaHost>, tick: Duration) {
    loop {
        {
            let urgent = host.changed().urgent.notified();
            let ticked = glommio::timer::sleep(tick);
            futures::pin_mut!(ticked);
            futures::future::select(urgent, ticked).await;
        }
        futures_lite::future::yield_now().await;
        let Some(changes) = host.take_changes() else { continue };
        let Some(shard) = shard.upgrade() else { return };
        let from = shard.id;
        let mirrored = shard.invoke_on(CLUSTER_SHARD, move |zero| async move {
            if let Some(host) = zero.extension::<ReplicaHost>() {
                host.mirror(from, changes);
            }
        });
        drop(mirrored.await);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_topics_partitions_go_round_the_shards_and_topics_start_apart() {
        let shard_of = |topic_id: u128, partition: u32| replica_shard(GroupKey { topic_id, partition }, 4);
        let first: Vec<u32> = (0..8).map(|p| shard_of(9, p)).collect();
        assert_eq!(first, [1, 2, 3, 0, 1, 2, 3, 0]);
        assert_ne!(shard_of(9, 0), shard_of(10, 0), "another topic starts elsewhere");
        assert_eq!(replica_shard(GroupKey { topic_id: u128::MAX, partition: 3 }, 1), 0);
        assert_eq!(replica_shard(GroupKey { topic_id: 5, partition: 3 }, 0), 0, "no shards: shard 0");
    }
}
