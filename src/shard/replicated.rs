//! Replicated partitions as the shard sees them (issue 11): which topics are replicated, and the
//! seam through which their writes and leadership questions leave the shard.
//!
//! Owns: `Replication` (a topic view's replica sets and the topic's id), `LeaderView`, and the
//! `ReplicaGate` trait that the cluster layer implements and installs on the shard that hosts the
//! replicas. The shard never names the cluster: an append to a replicated partition goes to the
//! gate (proposed to its Raft group, answered once committed), and reads ask the gate who leads
//! and which leader epochs wrote the log (Kafka clients' epoch questions, `shard::epochs`).
//! Reads themselves stay the shard's: a replica's `Partition` serves what is committed.
//! May depend on `shard::mesh`, `replication::wire` (the group key), `replication::epochs`;
//! nothing above the shard.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;

use super::mesh::{BrokerError, ProduceOutcome};
use super::{Boxed, TopicView};
use crate::metadata::TopicOverrides;
use crate::record::BatchLimits;
use crate::replication::epochs::LeaderEpochs;
use crate::replication::wire::GroupKey;
use crate::storage::Partition;

/// How a topic is replicated, as the controller's log placed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replication {
    /// New at every creation: a topic created again under the same name is another topic.
    pub topic_id: u128,
    /// `replicas[p]`: the nodes holding partition `p`, the preferred leader first.
    pub replicas: Vec<Vec<u64>>,
}

impl Replication {
    pub fn key(&self, partition: u32) -> GroupKey {
        GroupKey { topic_id: self.topic_id, partition }
    }
}

/// A replicated partition's leadership as this node last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeaderView {
    /// The leader's node id, when one is known.
    pub leader: Option<u64>,
    /// Its epoch (the Raft term).
    pub epoch: u64,
    /// The leader's native listener, where clients send this partition's requests.
    pub native: Option<String>,
    /// This node leads the partition and may serve it (it committed an entry of its term).
    pub serving_here: bool,
    /// This node leads the partition, serving or not yet.
    pub leading_here: bool,
    /// The replicas in sync with the leader, in replica-set order (empty with no leader known).
    /// Only metadata answers fill it (`Shard::replicated_leaders`); reads ask for the leader alone.
    pub in_sync: Vec<u64>,
}

/// What the cluster layer offers the shard for the replicated partitions it hosts; installed on
/// every shard of a node in a cluster.
pub trait ReplicaGate {
    /// Proposes `batches` (whole, validated batches) to the partition's group now, so proposals
    /// keep the order of the calls, and resolves once they are committed (`acks=all`): the base
    /// offset of the first. Fails with `NotLeader` when this node does not lead the partition,
    /// and `ReplicationTimedOut` after `timeout`.
    fn produce(
        &self,
        key: GroupKey,
        topic: &Arc<str>,
        batches: BytesMut,
        timeout: Duration,
    ) -> Boxed<ProduceOutcome>;

    /// The partition's leader as this node sees it.
    fn leader(&self, key: GroupKey) -> LeaderView;

    /// The leader epochs of this node's replica of the partition as its task last published
    /// them (`None` without a replica here): Kafka clients' epoch questions are answered from
    /// them.
    fn epochs(&self, key: GroupKey) -> Option<Rc<LeaderEpochs>>;
}

/// The shard where the cluster layer answers for the whole node (`ReplicaDirectory`).
pub const DIRECTORY_SHARD: u32 = 0;

/// What the cluster layer offers metadata answers, on `DIRECTORY_SHARD`: every replicated
/// partition as the node knows it — its replicas on every shard, and what peers report of the
/// partitions they lead.
pub trait ReplicaDirectory {
    /// The partition's leader and in-sync replicas (of `replicas`, its replica set): from its
    /// leader, here or in the leader's last report; no in-sync replicas when no leader is known.
    fn described(&self, key: GroupKey, replicas: &[u64]) -> LeaderView;
}

impl BrokerError {
    /// The error a replicated partition gives a request only its leader may serve.
    pub fn not_leader(topic: &str, partition: u32, view: &LeaderView) -> BrokerError {
        BrokerError::NotLeader {
            topic: topic.to_string(),
            partition,
            leader: view.leader,
            address: view.native.clone(),
        }
    }
}

impl super::Shard {
    /// Makes `gate` answer for the replicated partitions this shard hosts.
    pub fn install_replica_gate(&self, gate: Rc<dyn ReplicaGate>) {
        *self.replica_gate.borrow_mut() = Some(gate);
    }

    /// Makes `directory` answer metadata for the node (on `DIRECTORY_SHARD`).
    pub fn install_replica_directory(&self, directory: Rc<dyn ReplicaDirectory>) {
        debug_assert_eq!(self.id, DIRECTORY_SHARD);
        *self.replica_directory.borrow_mut() = Some(directory);
    }

    /// Records a replicated topic in this shard's view: partition `p` is routed to
    /// `partition_shards[p]` (the shard hosting this node's replica of it); `local` holds, for
    /// the partitions this shard hosts, this node's replica's partition. Replaces an earlier
    /// view of the same name.
    pub fn add_replicated_topic(
        &self,
        name: Arc<str>,
        replication: Arc<Replication>,
        overrides: TopicOverrides,
        partition_shards: Vec<u32>,
        local: Vec<Option<Rc<Partition>>>,
    ) {
        debug_assert_eq!(partition_shards.len(), replication.replicas.len());
        let settings = overrides.resolve(&self.config);
        self.owned.borrow_mut().insert(name.clone(), local);
        let view = TopicView {
            name: name.clone(),
            partition_shards,
            overrides,
            settings,
            replication: Some(replication),
        };
        self.topics.borrow_mut().insert(name, Rc::new(view));
    }

    /// Sets the partition this shard serves reads of `name`'s partition `p` from (this node's
    /// replica, reopened after it stopped; `None` while it is closed).
    pub fn set_replica_partition(&self, name: &str, p: u32, partition: Option<Rc<Partition>>) {
        if let Some(slot) = self.owned.borrow_mut().get_mut(name).and_then(|local| local.get_mut(p as usize))
        {
            *slot = partition;
        }
    }

    /// Forgets a replicated topic: its view, and the partitions this shard held for it (returned
    /// for the caller to close or remove once their replicas have stopped).
    pub fn forget_replicated_topic(&self, name: &str) -> Vec<Rc<Partition>> {
        self.topics.borrow_mut().remove(name);
        self.owned.borrow_mut().remove(name).into_iter().flatten().flatten().collect()
    }

    /// Whether `topic` is a replicated topic of a cluster.
    pub fn is_replicated(&self, topic: &str) -> bool {
        self.replication_of(topic).is_some()
    }

    /// The replication of `topic`, when it is a replicated topic.
    pub(super) fn replication_of(&self, topic: &str) -> Option<Arc<Replication>> {
        self.topics.borrow().get(topic)?.replication.clone()
    }

    /// Hands a replicated partition's batches to the gate: proposed now, answered once committed;
    /// with the number of records they hold.
    pub(super) fn append_through_gate(
        &self,
        topic: Arc<str>,
        partition: u32,
        replication: &Replication,
        batches: BytesMut,
        timeout: Option<Duration>,
    ) -> (Boxed<ProduceOutcome>, i64) {
        let gate = self.replica_gate.borrow().clone();
        let Some(gate) = gate else {
            let error = BrokerError::Internal(format!(
                "{topic}/{partition} is replicated but shard {} hosts no replicas",
                self.id
            ));
            return (Box::pin(futures::future::ready(Err(error))), 0);
        };
        let limits = BatchLimits {
            batch_bytes_max: self.config.batch_bytes_max,
            records_per_batch_max: self.config.records_per_batch_max,
        };
        // A batch enters the Raft log only whole and sound: every replica appends what the
        // leader proposed, so the checks a local append makes come first.
        let mut at = 0;
        let mut index = 0;
        let mut records = 0;
        while at < batches.len() {
            match crate::record::validate_for_append(&batches[at..], &limits) {
                Ok(header) => {
                    at += header.total_len();
                    index += 1;
                    records += i64::from(header.record_count);
                }
                Err(source) => {
                    let error = BrokerError::storage(
                        &topic,
                        partition,
                        crate::storage::StorageError::InvalidBatch { index, position: at, source },
                    );
                    return (Box::pin(futures::future::ready(Err(error))), 0);
                }
            }
        }
        // The broker's limit caps what a request asks: a client's own timeout is usually longer
        // (librdkafka and Java send their 30 s request timeout), and the answer should reach it
        // before it gives up on the connection.
        let limit = Duration::from_millis(self.config.replication_timeout_ms);
        let timeout = timeout.map_or(limit, |asked| asked.min(limit));
        (gate.produce(replication.key(partition), &topic, batches, timeout), records)
    }

    /// The leader of `partition` of replicated topic `topic` as this shard's gate sees it; `None`
    /// when the topic is not replicated or this shard hosts no replicas.
    pub fn replica_leader(&self, topic: &str, partition: u32) -> Option<LeaderView> {
        let replication = self.replication_of(topic)?;
        self.leader_of(&replication, partition)
    }

    /// The leader of a replicated partition as this node sees it (`None` without a gate here).
    pub(super) fn leader_of(&self, replication: &Replication, partition: u32) -> Option<LeaderView> {
        let gate = self.replica_gate.borrow().clone()?;
        Some(gate.leader(replication.key(partition)))
    }

    /// This node's replica's leader epochs of a replicated partition (`None` without one here).
    pub(super) fn epochs_of(&self, replication: &Replication, partition: u32) -> Option<Rc<LeaderEpochs>> {
        let gate = self.replica_gate.borrow().clone()?;
        gate.epochs(replication.key(partition))
    }

    /// The leader and in-sync replicas of a replicated partition, for metadata (on
    /// `DIRECTORY_SHARD`).
    fn described(&self, replication: &Replication, partition: u32) -> LeaderView {
        let Some(directory) = self.replica_directory.borrow().clone() else { return LeaderView::default() };
        let replicas = replication.replicas.get(partition as usize).map(Vec::as_slice).unwrap_or_default();
        directory.described(replication.key(partition), replicas)
    }
}

impl super::Shard {
    /// Every partition's leader and in-sync replicas of replicated topic `name` as this node sees
    /// them, asked of the node's directory (control plane: metadata requests).
    pub async fn replicated_leaders(self: &Rc<Self>, name: Arc<str>) -> Vec<LeaderView> {
        let Some(replication) = self.topic(&name).and_then(|view| view.replication.clone()) else {
            return Vec::new();
        };
        let partitions = replication.replicas.len() as u32;
        let answer = self
            .invoke_on(DIRECTORY_SHARD, move |shard| async move {
                (0..partitions).map(|p| shard.described(&replication, p)).collect()
            })
            .await;
        answer.await.unwrap_or_default()
    }
}
