//! Owner-side operations: what a shard does for the partitions it owns, whether the request
//! came from one of its own connections or over the mesh, and the handler of mesh messages.
//!
//! Owns: appends (in call order, so offsets follow arrival order), reads, waits for data, offset
//! lookups, and the metrics hooks of the partition traffic. Depends on `storage` through
//! `Partition` and on `metrics`.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures::future::{join_all, select_all, FutureExt};

use super::epochs::Asking;
use super::mesh::*;
use super::{Boxed, Shard};
use crate::storage::{Partition, Visibility};

impl Shard {
    /// Appends now (synchronously, so offsets follow arrival order) and returns a future that
    /// resolves when each append is durable per its topic's policy (at once when `wait` is false).
    pub fn append_local(&self, items: Vec<AppendItem>, wait: bool) -> Boxed<Vec<ProduceOutcome>> {
        let appended: Vec<Result<PendingAppend, BrokerError>> =
            items.into_iter().map(|item| self.append_owned(item)).collect();
        async move {
            let mut outcomes = Vec::with_capacity(appended.len());
            for pending in appended {
                outcomes.push(match pending {
                    Ok(pending) if wait => pending.durable().await,
                    Ok(pending) => Ok(pending.appended),
                    Err(e) => Err(e),
                });
            }
            outcomes
        }
        .boxed_local()
    }

    /// Appends one partition's batches to a partition this shard owns, now. Every write of the
    /// broker goes through here: clients' produce requests and the group coordinator's records.
    /// A replicated partition's batches are proposed to its Raft group instead (through the
    /// gate), also now, so proposals keep arrival order.
    pub fn append_owned(&self, item: AppendItem) -> Result<PendingAppend, BrokerError> {
        let AppendItem { topic, partition: index, batches, timeout } = item;
        let Some(partition) = self.partition(&topic, index) else {
            return Err(self.missing_partition(&topic, index));
        };
        // Committed visibility is what makes a partition a replica's log; checked before the
        // view lookup so a local append pays one field read.
        if partition.config().visibility == Visibility::Committed {
            if let Some(replication) = self.replication_of(&topic) {
                let bytes = batches.len();
                let (committed, records) =
                    self.append_through_gate(topic.clone(), index, &replication, batches, timeout);
                return Ok(PendingAppend {
                    appended: Appended { base_offset: -1, log_start_offset: -1 },
                    waiting: Waiting::Committed { committed, topic, bytes, records },
                });
            }
        }
        let bytes = batches.len();
        match partition.append(batches) {
            Ok(a) => {
                if !a.duplicate {
                    crate::metrics::appended(&topic, bytes, a.last_offset - a.base_offset + 1);
                }
                let appended = Appended { base_offset: a.base_offset, log_start_offset: a.log_start_offset };
                let waiting = Waiting::Durable { partition, last_offset: a.last_offset, topic, index };
                Ok(PendingAppend { appended, waiting })
            }
            Err(e) => {
                crate::metrics::partition_error(crate::metrics::PartitionOp::Produce);
                Err(BrokerError::storage(&topic, index, e))
            }
        }
    }

    /// Why `(topic, index)` has no partition on this shard: not the topic's (unknown), or a
    /// replicated partition this node holds no replica of (its leader is elsewhere).
    pub(super) fn missing_partition(&self, topic: &str, index: u32) -> BrokerError {
        match self.replication_of(topic) {
            Some(replication) if (index as usize) < replication.replicas.len() => {
                let view = self.leader_of(&replication, index).unwrap_or_default();
                BrokerError::not_leader(topic, index, &view)
            }
            _ => BrokerError::unknown_partition(topic, index),
        }
    }

    pub(super) async fn fetch_local(self: Rc<Self>, items: Vec<FetchItem>) -> Vec<FetchOutcome> {
        let reads = items.iter().map(|item| {
            // A replicated partition's reads are served by its leader only: Kafka clients fetch
            // from the leader the metadata names, and a follower's high watermark lags its
            // leader's.
            let led = self.led(&item.topic, item.partition, item.epochs.current_leader, Asking::Read);
            async move {
                let led = led?;
                let partition = &led.partition;
                if let Some(last_fetched) = item.epochs.last_fetched {
                    let diverging = led.divergence(&item.topic, item.partition, item.offset, last_fetched)?;
                    if diverging.is_some() {
                        return Ok(Fetched {
                            chunks: Vec::new(),
                            high_watermark: partition.high_watermark(),
                            log_start_offset: partition.log_start_offset(),
                            diverging_epoch: diverging,
                        });
                    }
                }
                let read = partition.read(item.offset, item.max_bytes).await;
                match &read {
                    Ok(r) => {
                        let (bytes, records) = count_records(&r.chunks);
                        crate::metrics::fetched(&item.topic, bytes, records);
                    }
                    Err(_) => crate::metrics::partition_error(crate::metrics::PartitionOp::Fetch),
                }
                match read {
                    Ok(r) => Ok(Fetched {
                        chunks: r.chunks,
                        high_watermark: r.high_watermark,
                        log_start_offset: r.log_start_offset,
                        diverging_epoch: None,
                    }),
                    Err(e) => Err(BrokerError::storage(&item.topic, item.partition, e)),
                }
            }
        });
        join_all(reads).await
    }

    pub(super) async fn wait_local(self: Rc<Self>, items: Vec<FetchItem>, max_wait_ms: u64) {
        let waits: Vec<Boxed<()>> = items
            .iter()
            .filter_map(|item| self.partition(&item.topic, item.partition).map(|p| (p, item.offset)))
            .map(|(p, offset)| async move { p.wait_for_data(offset).await }.boxed_local())
            .collect();
        if waits.is_empty() {
            return;
        }
        let timeout = glommio::timer::sleep(Duration::from_millis(max_wait_ms)).boxed_local();
        futures::future::select(select_all(waits), timeout).await;
    }

    pub(super) async fn list_offsets_local(self: Rc<Self>, items: Vec<OffsetQuery>) -> Vec<OffsetOutcome> {
        let mut out = Vec::with_capacity(items.len());
        for q in items {
            let led = match self.led(&q.topic, q.partition, q.current_leader_epoch, Asking::Offset) {
                Ok(led) => led,
                Err(e) => {
                    out.push(Err(e));
                    continue;
                }
            };
            let p = &led.partition;
            // Kafka semantics: no record at or after the timestamp answers with the log end.
            let found = match p.offset_for_timestamp(q.timestamp_ms).await {
                Ok(found) => found.unwrap_or((p.high_watermark(), -1)),
                Err(e) => {
                    out.push(Err(BrokerError::storage(&q.topic, q.partition, e)));
                    continue;
                }
            };
            let (offset, timestamp) = found;
            // Kafka answers "latest" with the leader's epoch, anything else with the epoch that
            // wrote the offset.
            let leader_epoch = match q.timestamp_ms {
                LATEST_TIMESTAMP => Some(led.leader_epoch),
                _ => led.history().epoch_at(offset),
            };
            out.push(Ok(Some(FoundOffset { offset, timestamp, leader_epoch })));
        }
        out
    }

    pub(super) fn partition_states_local(&self, items: &[(Arc<str>, u32)]) -> Vec<PartitionState> {
        items
            .iter()
            .map(|(t, p)| self.partition(t, *p).map(|p| (p.log_start_offset(), p.high_watermark())))
            .collect()
    }

    /// Handles a message from another shard. Produce appends happen before this returns, so
    /// messages from one shard are appended in the order they were sent.
    pub(crate) fn handle(self: &Rc<Self>, msg: ShardMsg) {
        match msg {
            ShardMsg::Produce { items, wait, reply } => {
                let done = self.append_local(items, wait);
                glommio::spawn_local(async move {
                    let _ = reply.send(done.await);
                })
                .detach();
            }
            ShardMsg::Fetch { items, reply } => {
                let shard = self.clone();
                glommio::spawn_local(async move {
                    let _ = reply.send(shard.fetch_local(items).await);
                })
                .detach();
            }
            ShardMsg::WaitForData { items, max_wait_ms, reply } => {
                let shard = self.clone();
                glommio::spawn_local(async move {
                    shard.wait_local(items, max_wait_ms).await;
                    let _ = reply.send(());
                })
                .detach();
            }
            ShardMsg::ListOffsets { items, reply } => {
                let shard = self.clone();
                glommio::spawn_local(async move {
                    let _ = reply.send(shard.list_offsets_local(items).await);
                })
                .detach();
            }
            ShardMsg::PartitionStates { items, reply } => {
                let _ = reply.send(self.partition_states_local(&items));
            }
            ShardMsg::Invoke(work) => work(self.clone()),
        }
    }
}

/// ListOffsets' timestamp for the high watermark (KIP-79).
const LATEST_TIMESTAMP: i64 = -1;

/// An append that is in the log (offsets assigned, readable once durable) and may not be durable
/// yet; or a replicated partition's proposal, not committed yet.
pub struct PendingAppend {
    /// What is known at once: a local append's offsets; -1 for a proposal (known at commit).
    pub appended: Appended,
    waiting: Waiting,
}

enum Waiting {
    Durable { partition: Rc<Partition>, last_offset: i64, topic: Arc<str>, index: u32 },
    Committed { committed: Boxed<ProduceOutcome>, topic: Arc<str>, bytes: usize, records: i64 },
}

impl PendingAppend {
    /// Resolves once the append is durable per its topic's policy; a replicated partition's
    /// once a majority of its replicas hold it durably (committed).
    pub async fn durable(self) -> ProduceOutcome {
        match self.waiting {
            Waiting::Durable { partition, last_offset, topic, index } => {
                match partition.wait_durable(last_offset).await {
                    Ok(()) => Ok(self.appended),
                    Err(e) => Err(BrokerError::storage(&topic, index, e)),
                }
            }
            Waiting::Committed { committed, topic, bytes, records } => {
                let outcome = committed.await;
                match &outcome {
                    Ok(_) => crate::metrics::appended(&topic, bytes, records),
                    Err(_) => crate::metrics::partition_error(crate::metrics::PartitionOp::Produce),
                }
                outcome
            }
        }
    }
}

/// Bytes and records in whole batches read from a partition, for the traffic metrics.
///
/// Reads the batch headers only. Storage serves batches it has validated (crc32c when appended,
/// and again when read back from disk), so checking them here as well, only to count records,
/// was a second crc32c pass over every fetched byte: about half of the crc32c time, and 5-8 % of
/// the owner shard's CPU, in a backlog drain's profile (docs/benchmarks.md, issue 14).
fn count_records(chunks: &[bytes::Bytes]) -> (u64, u64) {
    let mut bytes = 0u64;
    let mut records = 0u64;
    for chunk in chunks {
        bytes += chunk.len() as u64;
        let mut rest: &[u8] = chunk;
        // A header's length covers at least the header, so every step moves forward.
        while let Ok(header) = crate::record::BatchHeader::parse(rest) {
            let Some(next) = rest.get(header.total_len()..) else { break };
            records += (i64::from(header.last_offset_delta) + 1) as u64;
            rest = next;
        }
    }
    (bytes, records)
}

#[cfg(test)]
mod tests {
    use bytes::{Bytes, BytesMut};

    use super::count_records;
    use crate::record::builder::BatchBuilder;

    fn batch(records: usize) -> BytesMut {
        let mut b = BatchBuilder::new();
        for i in 0..records {
            b.push(i as i64, None, Some(b"value".as_slice()), &[]);
        }
        b.finish()
    }

    #[test]
    fn counts_every_whole_batch_of_a_chunk_and_no_partial_one() {
        let (one, two) = (batch(3), batch(5));
        let mut joined = BytesMut::new();
        joined.extend_from_slice(&one);
        joined.extend_from_slice(&two);
        let joined = joined.freeze();
        let cut = joined.slice(..joined.len() - 1);
        let chunks = [Bytes::from(one.clone()), joined.clone(), cut.clone()];
        let bytes = (one.len() + joined.len() + cut.len()) as u64;
        // 3 alone, 3 + 5 joined, and only the first batch of the cut chunk.
        assert_eq!(count_records(&chunks), (bytes, 3 + 8 + 3));
    }
}
