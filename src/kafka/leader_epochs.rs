//! Kafka OffsetForLeaderEpoch (versions 2..=4, KIP-101/279/320): where a leader epoch ends in a
//! partition's log, which a consumer asks after a leader change to learn whether the log it read
//! was truncated under it.
//!
//! Owns the request's shape and the response's encoding; the answer is the partition owner's
//! (`Shard::leader_epoch_ends`: the client's current epoch checked, then the leader's epoch
//! history). Only a partition's serving leader answers, whatever `replica_id` says: ringlog's
//! replicas do not fetch over the Kafka protocol, and a follower's history may lag its leader's.
//! May depend on `shard` (routing, the answers), `server` (replies) and the siblings.

use std::rc::Rc;

use futures::future::FutureExt;
use kafka_protocol::messages::offset_for_leader_epoch_response::{
    EpochEndOffset, OffsetForLeaderTopicResult,
};
use kafka_protocol::messages::{OffsetForLeaderEpochRequest, OffsetForLeaderEpochResponse};

use super::codec::{respond, RequestContext};
use super::errors::broker_code;
use super::leaders::{requested_epoch, response_epoch};
use crate::server::{Boxed, Reply};
use crate::shard::mesh::{BrokerError, EpochEndOutcome, EpochQuery};
use crate::shard::Shard;

/// Where a partition's answer comes from: an index into the routed queries, or an error found
/// before routing.
type Slot = Result<usize, BrokerError>;

pub(super) async fn offset_for_leader_epoch(
    shard: &Rc<Shard>,
    ctx: RequestContext,
    request: OffsetForLeaderEpochRequest,
) -> Boxed<Reply> {
    let mut queries = Vec::new();
    let mut layout = Vec::with_capacity(request.topics.len());
    for topic in request.topics {
        let mut parts: Vec<(i32, Slot)> = Vec::with_capacity(topic.partitions.len());
        for p in &topic.partitions {
            let routed = u32::try_from(p.partition)
                .map_err(|_| BrokerError::unknown_partition(&topic.topic.0, p.partition))
                .and_then(|partition| {
                    let (view, owner) = shard.route(&topic.topic.0, partition)?;
                    Ok((owner, partition, view.name.clone()))
                });
            let slot = routed.map(|(owner, partition, name)| {
                let query = EpochQuery {
                    topic: name,
                    partition,
                    current_leader_epoch: requested_epoch(p.current_leader_epoch),
                    leader_epoch: requested_epoch(p.leader_epoch),
                };
                queries.push((owner, query));
                queries.len() - 1
            });
            parts.push((p.partition, slot));
        }
        layout.push((topic.topic, parts));
    }
    let answers = shard.leader_epoch_ends(queries).await;
    async move {
        let answers = answers.await;
        let topics = layout
            .into_iter()
            .map(|(topic, parts)| {
                let partitions = parts
                    .into_iter()
                    .map(|(index, slot)| {
                        let answer = match slot {
                            Ok(i) => answers.get(i).cloned().unwrap_or_else(|| {
                                Err(BrokerError::Internal("leader epoch answer missing".into()))
                            }),
                            Err(e) => Err(e),
                        };
                        epoch_end(index, answer)
                    })
                    .collect();
                OffsetForLeaderTopicResult::default().with_topic(topic).with_partitions(partitions)
            })
            .collect();
        respond(&ctx, &OffsetForLeaderEpochResponse::default().with_throttle_time_ms(0).with_topics(topics))
    }
    .boxed_local()
}

/// One partition's answer: an error, or the epoch and its end offset (-1 each when this log has
/// no epoch at or below the one asked, which clients take as "truncated, no known end").
fn epoch_end(partition: i32, answer: EpochEndOutcome) -> EpochEndOffset {
    let response =
        EpochEndOffset::default().with_partition(partition).with_leader_epoch(-1).with_end_offset(-1);
    match answer {
        Ok(end) => response
            .with_leader_epoch(response_epoch(end.epoch))
            .with_end_offset(end.end_offset.unwrap_or(-1)),
        Err(e) => response.with_error_code(broker_code(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::mesh::EpochEnd;

    #[test]
    fn answers_and_errors_are_encoded_as_kafka_does() {
        let found = epoch_end(0, Ok(EpochEnd { epoch: Some(3), end_offset: Some(250) }));
        assert_eq!((found.error_code, found.partition, found.leader_epoch, found.end_offset), (0, 0, 3, 250));
        let undefined = epoch_end(1, Ok(EpochEnd { epoch: None, end_offset: None }));
        assert_eq!((undefined.error_code, undefined.leader_epoch, undefined.end_offset), (0, -1, -1));
        let fenced =
            BrokerError::FencedLeaderEpoch { topic: "t".into(), partition: 2, requested: 1, current: 4 };
        let refused = epoch_end(2, Err(fenced));
        assert_eq!((refused.error_code, refused.leader_epoch, refused.end_offset), (74, -1, -1));
        let unknown =
            BrokerError::UnknownLeaderEpoch { topic: "t".into(), partition: 3, requested: 9, current: 4 };
        assert_eq!(epoch_end(3, Err(unknown)).error_code, 75);
    }
}
