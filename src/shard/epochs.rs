//! Leader epochs as a partition's owner answers Kafka's questions about them (KIP-101, 279, 320):
//! whether a client's leader epoch is current, whether its log diverged from this one, where an
//! epoch ends and which epoch wrote an offset.
//!
//! Owns the order of the checks, Kafka's (`Partition.getLocalLog`): the client's current leader
//! epoch first (fenced or unknown, on any replica), then leadership, then the question. A
//! replicated partition's epochs are its replica's (the Raft terms, published through the
//! `ReplicaGate`); a single node's partition has only ever had one leader, so its history is
//! epoch 0 from its log start, and storage stamps its appends with epoch 0 as a Kafka leader
//! stamps its own. May depend on `replicated` (the gate), `replication::epochs` (the arithmetic)
//! and storage through `Partition`.

use std::borrow::Cow;
use std::rc::Rc;
use std::sync::Arc;

use futures::future::FutureExt;

use super::mesh::{BrokerError, EpochEnd, EpochEndOutcome, EpochQuery, ShardMsg};
use super::{Boxed, Shard};
use crate::replication::epochs::{check_current_epoch, EpochStart, LeaderEpochs, StaleEpoch};
use crate::storage::{Partition, StorageError, Visibility};

/// The leader epoch of a single node's partitions (Kafka Metadata says so too).
const LOCAL_EPOCH: u64 = 0;

/// What a request asks of a partition's leader, which decides what a leader that does not serve
/// yet answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Asking {
    /// Records (Fetch) or where an epoch ends (OffsetForLeaderEpoch): only a serving leader.
    Read,
    /// An offset (ListOffsets): a leader that has not committed in its epoch yet answers
    /// OFFSET_NOT_AVAILABLE, so "latest" never goes below what its predecessor showed.
    Offset,
}

/// A partition whose owner may answer a Kafka client: the checks passed.
pub(super) struct Led {
    pub partition: Rc<Partition>,
    /// The partition's leader epoch: its leader's term, or 0 on a single node.
    pub leader_epoch: u64,
    /// The replica's published epochs; `None` on a single node (see `history`).
    epochs: Option<Rc<LeaderEpochs>>,
}

impl Led {
    /// The epochs that wrote this partition's log.
    pub fn history(&self) -> Cow<'_, LeaderEpochs> {
        match &self.epochs {
            Some(epochs) => Cow::Borrowed(epochs),
            None => {
                let mut single = LeaderEpochs::default();
                let start_offset = self.partition.log_start_offset();
                single.assign(EpochStart { epoch: LOCAL_EPOCH, start_offset, start_index: 0 });
                Cow::Owned(single)
            }
        }
    }

    /// Kafka's divergence check of a fetch at `offset` whose client last read a batch of epoch
    /// `last_fetched`: the epoch and end offset to truncate to when the logs disagree.
    pub fn divergence(
        &self,
        topic: &Arc<str>,
        index: u32,
        offset: i64,
        last_fetched: u64,
    ) -> Result<Option<(u64, i64)>, BrokerError> {
        let out_of_range = || {
            let source = StorageError::OffsetOutOfRange {
                requested: offset,
                log_start: self.partition.log_start_offset(),
                high_watermark: self.partition.high_watermark(),
            };
            BrokerError::storage(topic, index, source)
        };
        // Kafka's order: an epoch this log does not know, then an offset below its start, are
        // out of range before any divergence.
        let diverging = self
            .history()
            .divergence(last_fetched, offset, self.partition.log_end_offset())
            .map_err(|_| out_of_range())?;
        if offset < self.partition.log_start_offset() {
            return Err(out_of_range());
        }
        Ok(diverging)
    }
}

impl Shard {
    /// The partition `(topic, index)` if this node may answer `asking` about it to a client whose
    /// metadata names `current_leader_epoch`, checked in Kafka's order.
    pub(super) fn led(
        &self,
        topic: &str,
        index: u32,
        current_leader_epoch: Option<u64>,
        asking: Asking,
    ) -> Result<Led, BrokerError> {
        let partition = self.partition(topic, index).ok_or_else(|| self.missing_partition(topic, index))?;
        // Committed visibility is what makes a partition a replica's log; checked first so a
        // single node's read pays one field read.
        let replication = match partition.config().visibility {
            Visibility::Committed => self.replication_of(topic),
            Visibility::Durable => None,
        };
        let Some(replication) = replication else {
            fence(topic, index, current_leader_epoch, LOCAL_EPOCH)?;
            return Ok(Led { partition, leader_epoch: LOCAL_EPOCH, epochs: None });
        };
        let view = self.leader_of(&replication, index).unwrap_or_default();
        fence(topic, index, current_leader_epoch, view.epoch)?;
        if !view.serving_here {
            return Err(match asking {
                Asking::Offset if view.leading_here => BrokerError::OffsetNotAvailable {
                    topic: topic.to_string(),
                    partition: index,
                    epoch: view.epoch,
                },
                _ => BrokerError::not_leader(topic, index, &view),
            });
        }
        let epochs = self
            .epochs_of(&replication, index)
            .ok_or_else(|| BrokerError::not_leader(topic, index, &view))?;
        Ok(Led { partition, leader_epoch: view.epoch, epochs: Some(epochs) })
    }

    /// Kafka's OffsetForLeaderEpoch for partitions on any shard: each answered by its owner.
    pub async fn leader_epoch_ends(
        self: &Rc<Self>,
        items: Vec<(u32, EpochQuery)>,
    ) -> Boxed<Vec<EpochEndOutcome>> {
        self.scatter(
            items,
            |shard, group| futures::future::ready(shard.leader_epoch_ends_local(group)).boxed_local(),
            |items, reply| {
                ShardMsg::Invoke(Box::new(move |shard: Rc<Shard>| {
                    let _ = reply.send(shard.leader_epoch_ends_local(items));
                }))
            },
            Err,
        )
        .await
    }

    /// Where each asked epoch ends in the partitions this shard owns (Kafka's
    /// `LeaderEpochFileCache.endOffsetFor`; the latest epoch ends at the log end).
    fn leader_epoch_ends_local(&self, items: Vec<EpochQuery>) -> Vec<EpochEndOutcome> {
        items
            .into_iter()
            .map(|q| {
                let led = self.led(&q.topic, q.partition, q.current_leader_epoch, Asking::Read)?;
                Ok(match q.leader_epoch {
                    Some(epoch) => led.history().end_for(epoch, led.partition.log_end_offset()),
                    None => EpochEnd { epoch: None, end_offset: None },
                })
            })
            .collect()
    }
}

/// Kafka's current-leader-epoch check as the error a client sees.
fn fence(topic: &str, partition: u32, requested: Option<u64>, current: u64) -> Result<(), BrokerError> {
    let (topic, requested_epoch) = (topic.to_string(), requested.unwrap_or_default());
    match check_current_epoch(requested, current) {
        Ok(()) => Ok(()),
        Err(StaleEpoch::Fenced) => {
            Err(BrokerError::FencedLeaderEpoch { topic, partition, requested: requested_epoch, current })
        }
        Err(StaleEpoch::Unknown) => {
            Err(BrokerError::UnknownLeaderEpoch { topic, partition, requested: requested_epoch, current })
        }
    }
}
