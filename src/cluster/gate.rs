//! The gate of one shard's replicas (issue 11): what the shard layer asks of the replicated
//! partitions this shard hosts (`shard::replicated::ReplicaGate`). A produce proposes each batch
//! to the partition's group at once, in call order, and answers once committed; leadership and
//! leader epochs are this shard's replicas' as their tasks last published them, with leaders'
//! native listeners as shard 0 last told (`shards::NodeView`). What only the node as a whole
//! knows (the in-sync replicas of partitions led elsewhere, peers' reports) answers metadata on
//! shard 0 (`Cluster`'s `ReplicaDirectory`).
//!
//! Depends on `replicas`, `shard` (the seam, the error), `replication`.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;

use super::replicas::{HostError, ReplicaHost};
use crate::replication::epochs::LeaderEpochs;
use crate::replication::group::{ProposeError, Proposed, Role};
use crate::replication::wire::GroupKey;
use crate::shard::mesh::{Appended, ProduceOutcome};
use crate::shard::replicated::{LeaderView, ReplicaGate};
use crate::shard::{Boxed, BrokerError};

pub struct HostGate {
    host: Rc<ReplicaHost>,
    /// Every known node's native listener (this node's included), shared with the answers of
    /// produce requests under way.
    addresses: RefCell<Rc<BTreeMap<u64, String>>>,
}

impl HostGate {
    pub fn new(host: Rc<ReplicaHost>) -> HostGate {
        HostGate { host, addresses: RefCell::default() }
    }

    /// Where nodes listen for clients, as the controller's registry says.
    pub fn set_addresses(&self, addresses: BTreeMap<u64, String>) {
        if **self.addresses.borrow() != addresses {
            *self.addresses.borrow_mut() = Rc::new(addresses);
        }
    }
}

impl ReplicaGate for HostGate {
    fn produce(
        &self,
        key: GroupKey,
        topic: &Arc<str>,
        mut batches: BytesMut,
        timeout: Duration,
    ) -> Boxed<ProduceOutcome> {
        let deadline = Instant::now() + timeout;
        // Each batch is one entry, proposed now, in order; the request's batches were validated.
        let mut proposals = Vec::new();
        while !batches.is_empty() {
            let len = crate::record::BatchHeader::parse(&batches).map_or(batches.len(), |h| h.total_len());
            proposals.push(self.host.propose(key, batches.split_to(len.min(batches.len()))));
        }
        let host = self.host.clone();
        let (topic, partition) = (topic.clone(), key.partition);
        let addresses = self.addresses.borrow().clone();
        Box::pin(async move {
            let broker_error = |e: HostError| host_error(&topic, partition, e, &addresses, timeout);
            let mut first = None;
            let mut last_new: Option<Proposed> = None;
            let mut retries = Vec::new();
            for proposal in proposals {
                let proposed = proposal.await.map_err(broker_error)?;
                first.get_or_insert(proposed);
                if proposed.retry {
                    retries.push(proposed);
                    continue;
                }
                // One leader term for the request's new batches: a later entry of the same term
                // committing means every earlier one of that leader's term did.
                if last_new.is_some_and(|l| l.term != proposed.term) {
                    let leader = host.status(key).and_then(|s| s.leader);
                    return Err(broker_error(HostError::LeadershipLost { term: proposed.term, leader }));
                }
                last_new = Some(proposed);
            }
            let Some(first) = first else {
                return Err(BrokerError::InvalidRequest(format!("{topic}/{partition}: no batch to produce")));
            };
            for proposed in retries.into_iter().chain(last_new) {
                host.committed(key, proposed, deadline, timeout).await.map_err(broker_error)?;
            }
            let log_start_offset = host.log_start_offset(key).unwrap_or(-1);
            Ok(Appended { base_offset: first.base_offset, log_start_offset })
        })
    }

    fn leader(&self, key: GroupKey) -> LeaderView {
        let status = self.host.status(key);
        // A replica stopped on a storage error takes no part in its group: what it last knew of
        // the leader (often itself) is stale. The metadata (shard 0) names the leader from
        // peers' reports then.
        let live = status.filter(|s| !s.failed);
        let leader = live.and_then(|s| s.leader);
        LeaderView {
            leader,
            epoch: status.map_or(0, |s| s.term),
            native: leader.and_then(|id| self.addresses.borrow().get(&id).cloned()),
            serving_here: live.is_some_and(|s| s.serving),
            leading_here: live.is_some_and(|s| s.role == Role::Leader),
            in_sync: Vec::new(),
        }
    }

    fn epochs(&self, key: GroupKey) -> Option<Rc<LeaderEpochs>> {
        self.host.epochs(key)
    }
}

/// A replica host's refusal as the error clients see.
fn host_error(
    topic: &Arc<str>,
    partition: u32,
    e: HostError,
    addresses: &BTreeMap<u64, String>,
    timeout: Duration,
) -> BrokerError {
    let not_leader = |leader: Option<u64>| BrokerError::NotLeader {
        topic: topic.to_string(),
        partition,
        leader,
        address: leader.and_then(|id| addresses.get(&id).cloned()),
    };
    match e {
        HostError::Unknown(_) => not_leader(None),
        HostError::Propose(ProposeError::NotLeader { leader }) | HostError::LeadershipLost { leader, .. } => {
            not_leader(leader)
        }
        HostError::Propose(ProposeError::LeaderNotReady) => not_leader(None),
        HostError::Producer(refused) => BrokerError::storage(topic, partition, refused),
        HostError::Propose(ProposeError::BadBatch(detail)) => {
            BrokerError::InvalidRequest(format!("{topic}/{partition}: {detail}"))
        }
        // Too much is waiting for a majority: as a timeout, which clients retry.
        HostError::Propose(ProposeError::Busy(_)) | HostError::TimedOut(_) => {
            BrokerError::ReplicationTimedOut {
                topic: topic.to_string(),
                partition,
                after_ms: timeout.as_millis() as u64,
            }
        }
        // The replica stopped on a storage error (see the broker's log) and takes no part in its
        // group any more: the others elect a leader among themselves, and a client told
        // NOT_LEADER refreshes its metadata and retries there with the same producer sequence
        // (the unknown server error answered before coincided with duplicates from librdkafka's
        // idempotent producer in the nemesis's disk faults).
        HostError::Stopped(_) => not_leader(None),
    }
}
