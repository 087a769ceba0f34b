//! Leadership as Kafka requests and responses carry it: a request's leader epochs (-1 for
//! none) as the shard takes them, and, for responses that tell a client its partition's leader
//! moved, the current leader and its epoch (KIP-951: Produce v10+, Fetch v12+), so the client
//! goes to the new leader without first asking for metadata.
//!
//! Owns only this translation; who leads is the shard's answer (`Shard::replicated_leaders`,
//! looked up on the error path only). May depend on `shard`.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use crate::shard::replicated::LeaderView;
use crate::shard::Shard;

/// A request's leader epoch: Kafka sends -1 for "none" and treats any negative value so
/// (`RequestUtils.getLeaderEpoch`).
pub(super) fn requested_epoch(raw: i32) -> Option<u64> {
    u64::try_from(raw).ok()
}

/// A leader epoch as Kafka responses carry it; -1 for none.
pub(super) fn response_epoch(epoch: Option<u64>) -> i32 {
    epoch.map_or(-1, |e| i32::try_from(e).unwrap_or(i32::MAX))
}

/// The leaders of some replicated topics' partitions as this node sees them now.
#[derive(Default)]
pub(super) struct CurrentLeaders {
    by_topic: HashMap<String, Vec<LeaderView>>,
}

impl CurrentLeaders {
    /// Looks up every partition's leader of each of `topics` (a single node's topics have none
    /// to report: their leader never moves).
    pub async fn of(shard: &Rc<Shard>, topics: impl IntoIterator<Item = String>) -> CurrentLeaders {
        let mut by_topic = HashMap::new();
        for topic in topics {
            if by_topic.contains_key(&topic) {
                continue;
            }
            let leaders = shard.replicated_leaders(Arc::from(topic.as_str())).await;
            by_topic.insert(topic, leaders);
        }
        CurrentLeaders { by_topic }
    }

    /// `(leader id, leader epoch)` of a partition, when a leader is known.
    pub fn get(&self, topic: &str, partition: i32) -> Option<(i32, i32)> {
        let view = self.by_topic.get(topic)?.get(usize::try_from(partition).ok()?)?;
        let leader = i32::try_from(view.leader?).ok()?;
        Some((leader, response_epoch(Some(view.epoch))))
    }
}
