//! Kafka Fetch (versions 4..=12) and ListOffsets (versions 1..=6).
//!
//! Owns: answering fetches with storage's buffers by reference (long polling as the native
//! protocol does it: `min_bytes`, `max_wait_ms` capped by `fetch_wait_ms_max`, woken by appends
//! on any shard), sized by the rules shared with the native protocol (`shard::rules`: the
//! response-wide `max_bytes` of KIP-74), and offset lookups by time. Leader epochs (KIP-320)
//! pass through: the client's current leader epoch (Fetch v9+, ListOffsets v4+) and last fetched
//! epoch (Fetch v12+) go to the partition's owner, which checks them (`shard::epochs`); this
//! module encodes its answers — a diverging epoch, the epoch of a listed offset, and (Fetch
//! v12+) the current leader of a partition that moved.
//! Fetch sessions (KIP-227) are not kept: every answer carries session id 0, which tells clients
//! to keep sending full fetch requests. Without transactions the last stable offset is the high
//! watermark and no transaction is ever aborted. May depend on `shard` (routing, reads, rules),
//! `server` (replies) and the siblings `codec`/`errors`; never on storage.

use std::collections::HashSet;
use std::rc::Rc;

use bytes::Bytes;
use futures::future::FutureExt;
use kafka_protocol::messages::fetch_response::{
    EpochEndOffset, FetchableTopicResponse, LeaderIdAndEpoch, PartitionData,
};
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::{
    BrokerId, FetchRequest, FetchResponse, ListOffsetsRequest, ListOffsetsResponse, TopicName,
};
use kafka_protocol::ResponseError;

use super::codec::{respond, respond_zero_copy, RecordSets, RequestContext};
use super::errors::broker_code;
use super::leaders::{requested_epoch, response_epoch, CurrentLeaders};
use crate::server::{Boxed, Reply};
use crate::shard::mesh::{BrokerError, ClientEpochs, FetchItem, FetchOutcome, FoundOffset, OffsetQuery};
use crate::shard::rules::{self, FetchBudget};
use crate::shard::Shard;

/// Where a partition's outcome comes from: an index into the routed items, or an error found
/// before routing.
type Slot = Result<usize, BrokerError>;

/// A Fetch response's shape, in request order: per topic, each partition's index and slot.
type FetchLayout = Vec<(TopicName, Vec<(i32, Slot)>)>;

/// A ListOffsets response's shape: per topic, each partition's index, asked timestamp and slot.
type OffsetsLayout = Vec<(TopicName, Vec<(i32, i64, Slot)>)>;

/// ListOffsets' sentinel timestamps (KIP-79).
const LATEST_TIMESTAMP: i64 = -1;
const EARLIEST_TIMESTAMP: i64 = -2;

fn ready(reply: Reply) -> Boxed<Reply> {
    futures::future::ready(reply).boxed_local()
}

/// Routes `(topic, index)`; a negative index is an unknown partition.
fn route(
    shard: &Shard,
    topic: &str,
    index: i32,
) -> Result<(Rc<crate::shard::TopicView>, u32, u32), BrokerError> {
    let partition = u32::try_from(index).map_err(|_| BrokerError::unknown_partition(topic, index))?;
    let (view, owner) = shard.route(topic, partition)?;
    Ok((view, owner, partition))
}

/// Handles one Fetch request. Nothing here must happen in arrival order, so the work is all in
/// the returned future.
pub(super) async fn fetch(shard: &Rc<Shard>, ctx: RequestContext, request: FetchRequest) -> Boxed<Reply> {
    if request.session_id != 0 {
        // No session is ever created here, so a client naming one is behind (e.g. a broker
        // restart); this code makes it drop the session and send a full fetch.
        let body = FetchResponse::default().with_error_code(ResponseError::FetchSessionIdNotFound.code());
        return ready(respond(&ctx, &body));
    }
    let max_wait = rules::fetch_max_wait(&shard.config, u64::try_from(request.max_wait_ms).unwrap_or(0));
    let min_bytes = usize::try_from(request.min_bytes).unwrap_or(0);
    let budget = FetchBudget::new(&shard.config, i64::from(request.max_bytes));
    let mut items: Vec<(u32, FetchItem)> = Vec::new();
    let mut layout: FetchLayout = Vec::with_capacity(request.topics.len());
    for topic in request.topics {
        let mut parts = Vec::with_capacity(topic.partitions.len());
        for p in &topic.partitions {
            let slot = route(shard, &topic.topic.0, p.partition).map(|(view, owner, partition)| {
                let item = FetchItem {
                    topic: view.name.clone(),
                    partition,
                    offset: p.fetch_offset,
                    max_bytes: budget.partition_max_bytes(i64::from(p.partition_max_bytes)),
                    // Both decode as -1 (none) in versions without them.
                    epochs: ClientEpochs {
                        current_leader: requested_epoch(p.current_leader_epoch),
                        last_fetched: requested_epoch(p.last_fetched_epoch),
                    },
                };
                items.push((owner, item));
                items.len() - 1
            });
            parts.push((p.partition, slot));
        }
        layout.push((topic.topic, parts));
    }
    let routing_failed = layout.iter().flat_map(|(_, parts)| parts).any(|(_, slot)| slot.is_err());
    let shard = shard.clone();
    async move {
        // As Kafka does, an error anywhere answers at once rather than after max_wait.
        let outcomes = shard.fetch_long_poll(items, min_bytes, max_wait, routing_failed).await;
        let leaders = moved_leaders(&shard, ctx.version, &layout, &outcomes).await;
        encode_fetch(&ctx, layout, outcomes, budget, &leaders)
    }
    .boxed_local()
}

/// The current leaders of the partitions a Fetch v12+ answers NOT_LEADER_OR_FOLLOWER or
/// FENCED_LEADER_EPOCH, which Kafka names in the response (`current_leader`); looked up only
/// when there are some.
async fn moved_leaders(
    shard: &Rc<Shard>,
    version: i16,
    layout: &FetchLayout,
    outcomes: &[FetchOutcome],
) -> CurrentLeaders {
    if version < 12 {
        return CurrentLeaders::default();
    }
    let moved =
        |e: &BrokerError| matches!(e, BrokerError::NotLeader { .. } | BrokerError::FencedLeaderEpoch { .. });
    let topics = layout.iter().filter(|(_, parts)| {
        parts.iter().any(|(_, slot)| match slot {
            Ok(i) => outcomes.get(*i).is_some_and(|o| o.as_ref().err().is_some_and(moved)),
            Err(e) => moved(e),
        })
    });
    let names: Vec<String> = topics.map(|(name, _)| name.0.to_string()).collect();
    if names.is_empty() {
        return CurrentLeaders::default();
    }
    CurrentLeaders::of(shard, names).await
}

fn encode_fetch(
    ctx: &RequestContext,
    layout: FetchLayout,
    outcomes: Vec<FetchOutcome>,
    mut budget: FetchBudget,
    leaders: &CurrentLeaders,
) -> Reply {
    let mut outcomes: Vec<Option<FetchOutcome>> = outcomes.into_iter().map(Some).collect();
    let mut sets = RecordSets::default();
    let mut responses = Vec::with_capacity(layout.len());
    for (topic, parts) in layout {
        let mut partitions = Vec::with_capacity(parts.len());
        for (index, slot) in parts {
            let outcome = match slot {
                Ok(i) => outcomes
                    .get_mut(i)
                    .and_then(Option::take)
                    .unwrap_or_else(|| Err(BrokerError::Internal("fetch result missing".into()))),
                Err(e) => Err(e),
            };
            let data = PartitionData::default().with_partition_index(index);
            let data = match outcome {
                Ok(fetched) => {
                    let diverging = fetched.diverging_epoch.map(|(epoch, end_offset)| {
                        EpochEndOffset::default()
                            .with_epoch(response_epoch(Some(epoch)))
                            .with_end_offset(end_offset)
                    });
                    let records =
                        if budget.admit(fetched.len()) { sets.add(fetched.chunks) } else { Bytes::new() };
                    data.with_high_watermark(fetched.high_watermark)
                        .with_last_stable_offset(fetched.high_watermark)
                        .with_log_start_offset(fetched.log_start_offset)
                        // Only a fetch v12+ can name the epoch that diverges.
                        .with_diverging_epoch(diverging.unwrap_or_default())
                        .with_records(Some(records))
                }
                Err(e) => {
                    let (log_start_offset, high_watermark) = e.log_bounds().unwrap_or((-1, -1));
                    let current_leader = leaders.get(&topic.0, index).map(|(leader, epoch)| {
                        LeaderIdAndEpoch::default().with_leader_id(BrokerId(leader)).with_leader_epoch(epoch)
                    });
                    data.with_error_code(broker_code(&e))
                        .with_high_watermark(high_watermark)
                        .with_last_stable_offset(high_watermark)
                        .with_log_start_offset(log_start_offset)
                        .with_current_leader(current_leader.unwrap_or_default())
                }
            };
            partitions.push(data);
        }
        responses.push(FetchableTopicResponse::default().with_topic(topic).with_partitions(partitions));
    }
    let body = FetchResponse::default().with_throttle_time_ms(0).with_session_id(0).with_responses(responses);
    respond_zero_copy(ctx, &body, sets)
}

/// Handles one ListOffsets request: -1 is the high watermark, -2 the log start, anything else the
/// first offset whose record timestamp is at or after it.
pub(super) async fn list_offsets(
    shard: &Rc<Shard>,
    ctx: RequestContext,
    request: ListOffsetsRequest,
) -> Boxed<Reply> {
    let mut seen: HashSet<(TopicName, i32)> = HashSet::new();
    let mut items = Vec::new();
    let mut layout: OffsetsLayout = Vec::with_capacity(request.topics.len());
    for topic in request.topics {
        let mut parts = Vec::with_capacity(topic.partitions.len());
        for p in &topic.partitions {
            let slot = if !seen.insert((topic.name.clone(), p.partition_index)) {
                // Kafka refuses a partition asked for twice rather than pick one of the answers.
                Err(BrokerError::InvalidRequest(format!(
                    "partition {} of '{}' is listed twice",
                    p.partition_index, &*topic.name.0
                )))
            } else {
                route(shard, &topic.name.0, p.partition_index).map(|(view, owner, partition)| {
                    let query = OffsetQuery {
                        topic: view.name.clone(),
                        partition,
                        timestamp_ms: p.timestamp,
                        // -1 (none) before v4.
                        current_leader_epoch: requested_epoch(p.current_leader_epoch),
                    };
                    items.push((owner, query));
                    items.len() - 1
                })
            };
            parts.push((p.partition_index, p.timestamp, slot));
        }
        layout.push((topic.name, parts));
    }
    let outcomes = shard.list_offsets(items).await;
    let version = ctx.version;
    async move {
        let outcomes = outcomes.await;
        let topics = layout
            .into_iter()
            .map(|(name, parts)| {
                let partitions = parts
                    .into_iter()
                    .map(|(index, timestamp, slot)| {
                        let outcome = match slot {
                            Ok(i) => outcomes.get(i).cloned().unwrap_or_else(|| {
                                Err(BrokerError::Internal("offset lookup result missing".into()))
                            }),
                            Err(e) => Err(e),
                        };
                        offsets_partition(index, timestamp, outcome, version)
                    })
                    .collect();
                ListOffsetsTopicResponse::default().with_name(name).with_partitions(partitions)
            })
            .collect();
        respond(&ctx, &ListOffsetsResponse::default().with_throttle_time_ms(0).with_topics(topics))
    }
    .boxed_local()
}

fn offsets_partition(
    index: i32,
    timestamp: i64,
    outcome: Result<Option<FoundOffset>, BrokerError>,
    version: i16,
) -> ListOffsetsPartitionResponse {
    let response = ListOffsetsPartitionResponse::default().with_partition_index(index);
    let found = match outcome {
        // KIP-207 added OFFSET_NOT_AVAILABLE in v5; Kafka answers older clients
        // LEADER_NOT_AVAILABLE, which they also retry.
        Err(BrokerError::OffsetNotAvailable { .. }) if version < 5 => {
            return response.with_error_code(ResponseError::LeaderNotAvailable.code())
        }
        Err(e) => return response.with_error_code(broker_code(&e)),
        Ok(found) => found,
    };
    let found = match found {
        // The shard answers a time past the last record with the log end (and no timestamp);
        // Kafka answers "none" (-1), which clients report as no offset for that time.
        Some(f) if f.timestamp == -1 && !matches!(timestamp, LATEST_TIMESTAMP | EARLIEST_TIMESTAMP) => None,
        found => found,
    };
    match found {
        None => response,
        Some(found) => {
            let response = response.with_offset(found.offset).with_timestamp(found.timestamp);
            // The field exists from v4; the encoder refuses it earlier.
            if version >= 4 {
                response.with_leader_epoch(response_epoch(found.leader_epoch))
            } else {
                response
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::ResponseHeader;
    use kafka_protocol::protocol::Decodable;

    fn found(
        offset: i64,
        timestamp: i64,
        leader_epoch: Option<u64>,
    ) -> Result<Option<FoundOffset>, BrokerError> {
        Ok(Some(FoundOffset { offset, timestamp, leader_epoch }))
    }

    #[test]
    fn offsets_follow_kafka_for_sentinels_and_misses() {
        let latest = offsets_partition(0, LATEST_TIMESTAMP, found(42, -1, Some(3)), 6);
        assert_eq!((latest.error_code, latest.offset, latest.timestamp, latest.leader_epoch), (0, 42, -1, 3));
        let earliest = offsets_partition(1, EARLIEST_TIMESTAMP, found(3, -1, Some(1)), 3);
        assert_eq!((earliest.offset, earliest.leader_epoch), (3, -1), "no leader epoch before v4");
        let hit = offsets_partition(2, 1_000, found(7, 1_005, Some(2)), 6);
        assert_eq!((hit.offset, hit.timestamp, hit.leader_epoch), (7, 1_005, 2));
        let unknown_epoch = offsets_partition(2, 1_000, found(7, 1_005, None), 6);
        assert_eq!(unknown_epoch.leader_epoch, -1);
        let miss = offsets_partition(3, 1_000, found(42, -1, Some(3)), 6);
        assert_eq!((miss.error_code, miss.offset, miss.timestamp, miss.leader_epoch), (0, -1, -1, -1));
        let not_yet = || Err(BrokerError::OffsetNotAvailable { topic: "t".into(), partition: 0, epoch: 2 });
        assert_eq!(offsets_partition(0, LATEST_TIMESTAMP, not_yet(), 5).error_code, 78);
        assert_eq!(
            offsets_partition(0, LATEST_TIMESTAMP, not_yet(), 4).error_code,
            5,
            "LEADER_NOT_AVAILABLE"
        );
        let unknown = BrokerError::unknown_partition("gone", 4);
        let failed = offsets_partition(4, -1, Err(unknown), 6);
        assert_eq!((failed.error_code, failed.offset), (3, -1));
    }

    #[test]
    fn fetch_response_holds_records_by_reference_within_max_bytes() {
        let ctx = RequestContext {
            api_key: Some(kafka_protocol::messages::ApiKey::Fetch),
            api_key_raw: 1,
            version: 12,
            correlation_id: 9,
            client_id: None,
        };
        let fetched = |chunks: Vec<Bytes>, hw| {
            Ok(crate::shard::mesh::Fetched {
                chunks,
                high_watermark: hw,
                log_start_offset: 0,
                diverging_epoch: (hw == 0).then_some((2, 7)),
            })
        };
        let (big, small) = (Bytes::from(vec![1u8; 300]), Bytes::from(vec![2u8; 50]));
        let name = TopicName(kafka_protocol::protocol::StrBytes::from_static_str("t"));
        let layout = vec![(
            name,
            vec![(0, Ok(0)), (1, Ok(1)), (2, Ok(2)), (3, Err(BrokerError::unknown_partition("t", 3)))],
        )];
        let outcomes =
            vec![fetched(vec![big.clone()], 10), fetched(vec![small.clone()], 4), fetched(vec![], 0)];
        // 300 bytes exceed max_bytes but go as the first data; the next 50 would pass the limit.
        let Reply::Frame(frame) = encode_fetch(
            &ctx,
            layout,
            outcomes,
            FetchBudget::new(&crate::config::BrokerConfig::default(), 100),
            &CurrentLeaders::default(),
        ) else {
            panic!("not a frame")
        };
        assert_eq!(frame.payload.len(), 2, "one referenced record set and the bytes after it");
        assert_eq!(frame.payload[0].as_ptr(), big.as_ptr(), "record bytes were copied");
        let size = i32::from_be_bytes(frame.head[..4].try_into().unwrap()) as usize;
        let total = frame.head.len() + frame.payload.iter().map(Bytes::len).sum::<usize>();
        assert_eq!(size + 4, total);
        let mut body = Vec::new();
        body.extend_from_slice(&frame.head);
        for part in &frame.payload {
            body.extend_from_slice(part);
        }
        let mut bytes = Bytes::from(body).slice(4..);
        let _ = ResponseHeader::decode(&mut bytes, 1).unwrap();
        let response = FetchResponse::decode(&mut bytes, 12).unwrap();
        let parts = &response.responses[0].partitions;
        assert_eq!(parts[0].records.as_ref().map(Bytes::len), Some(300));
        assert_eq!(parts[1].records.as_ref().map(Bytes::len), Some(0));
        assert_eq!((parts[1].high_watermark, parts[1].last_stable_offset), (4, 4));
        assert_eq!(parts[3].error_code, 3);
        assert_eq!(response.session_id, 0);
        // A diverged log is named with its epoch's end; the others carry none.
        assert_eq!((parts[2].diverging_epoch.epoch, parts[2].diverging_epoch.end_offset), (2, 7));
        assert_eq!((parts[0].diverging_epoch.epoch, parts[0].diverging_epoch.end_offset), (-1, -1));
    }
}
