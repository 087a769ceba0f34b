//! Kafka Produce (versions 3..=10): record batches stored as the client sent them.
//!
//! Owns: turning a ProduceRequest frame into appends and the appends' outcomes into a
//! ProduceResponse. The batches are never copied: the request is decoded from a non-owning view
//! of the frame only to learn where each partition's records lie, and those byte ranges are then
//! split off the frame itself and handed to storage (which validates and stamps them). Errors are
//! per partition, as Kafka reports them; only a request that cannot be decoded closes the
//! connection. What a client may append is `shard::rules`, shared with the native protocol; only
//! the request-level `transactional_id` is Kafka's own. A replicated partition's write waits for
//! its commit at most the request's `timeout_ms` (capped by the broker's
//! `replication_timeout_ms`), then answers REQUEST_TIMED_OUT; from v10 a partition answered
//! NOT_LEADER_OR_FOLLOWER names its current leader and that leader's endpoint (KIP-951). May
//! depend on `shard` (routing, rules, appends), `server` (replies) and the siblings `admin`
//! (auto-creation, the brokers' endpoints) and `leaders`; never on storage.

use std::ops::Range;
use std::rc::Rc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures::future::FutureExt;
use kafka_protocol::messages::produce_response::{
    LeaderIdAndEpoch, NodeEndpoint, PartitionProduceResponse, TopicProduceResponse,
};
use kafka_protocol::messages::{BrokerId, ProduceRequest, ProduceResponse, TopicName};
use kafka_protocol::protocol::{Decodable, StrBytes};
use kafka_protocol::ResponseError;

use super::codec::{respond, RequestContext};
use super::errors::Failure;
use super::leaders::CurrentLeaders;
use crate::server::{Boxed, Reply, ResponseFrame};
use crate::shard::mesh::{AppendItem, Appended};
use crate::shard::Shard;

const ACKS_NONE: i16 = 0;
const ACKS_LEADER: i16 = 1;
const ACKS_ALL: i16 = -1;

/// What the handler needs from a ProduceRequest, all owned: nothing in it borrows the frame.
#[derive(Debug)]
struct ProduceRanges {
    transactional_id: Option<String>,
    acks: i16,
    timeout_ms: i32,
    topics: Vec<TopicRanges>,
}

#[derive(Debug)]
struct TopicRanges {
    name: String,
    partitions: Vec<PartitionRange>,
}

#[derive(Debug)]
struct PartitionRange {
    index: i32,
    /// Where the partition's records lie in the frame; `None` when null or empty.
    records: Option<Range<usize>>,
}

/// Decodes the request body at `frame[body_offset..]`, keeping each partition's records as a
/// byte range of `frame` instead of a buffer.
fn decode_ranges(frame: &[u8], body_offset: usize, version: i16) -> Result<ProduceRanges, String> {
    let body = frame
        .get(body_offset..)
        .ok_or_else(|| format!("body offset {body_offset} is past the {}-byte frame", frame.len()))?;
    // SAFETY: the crate decodes `records` as slices of the `Bytes` it reads from, and only a
    // `Bytes` view can give slices whose addresses locate the records in the frame without
    // copying it. This view claims 'static but lives only inside this function: `view`, `buf`,
    // `request` and every `Bytes` the decoder derives from them (records, names, tagged fields)
    // are local and dropped before it returns, while `frame` is borrowed (so neither freed nor
    // mutated). Only owned data leaves: names as `String`, indexes, and ranges computed from
    // addresses. A static `Bytes` never frees or writes its memory.
    let view: &'static [u8] = unsafe { std::slice::from_raw_parts(body.as_ptr(), body.len()) };
    let mut buf = Bytes::from_static(view);
    let request =
        ProduceRequest::decode(&mut buf, version).map_err(|e| format!("Produce v{version}: {e}"))?;
    let mut topics = Vec::with_capacity(request.topic_data.len());
    for topic in &request.topic_data {
        let mut partitions = Vec::with_capacity(topic.partition_data.len());
        for p in &topic.partition_data {
            let records = match &p.records {
                Some(r) if !r.is_empty() => Some(range_within(frame, r).ok_or_else(|| {
                    format!("Produce v{version}: partition {} records do not lie in the frame", p.index)
                })?),
                _ => None,
            };
            partitions.push(PartitionRange { index: p.index, records });
        }
        topics.push(TopicRanges { name: topic.name.0.to_string(), partitions });
    }
    Ok(ProduceRanges {
        transactional_id: request.transactional_id.as_ref().map(|t| t.0.to_string()),
        acks: request.acks,
        timeout_ms: request.timeout_ms,
        topics,
    })
}

/// Where `inner` lies within `outer`, if it does.
fn range_within(outer: &[u8], inner: &[u8]) -> Option<Range<usize>> {
    let start = (inner.as_ptr() as usize).checked_sub(outer.as_ptr() as usize)?;
    let end = start.checked_add(inner.len())?;
    (end <= outer.len()).then_some(start..end)
}

/// Splits `range` (of the frame as it was before any split) off the front of `rest`, which has
/// already given up its first `consumed` bytes. Ranges must come in ascending, non-overlapping
/// order; the split shares the frame's memory.
fn split_out(rest: &mut BytesMut, consumed: &mut usize, range: Range<usize>) -> Result<BytesMut, Failure> {
    let available = *consumed + rest.len();
    if range.start < *consumed || range.end > available || range.start > range.end {
        return Err(Failure::new(
            ResponseError::InvalidRequest,
            format!(
                "records at bytes {}..{} of the request overlap another partition's or lie outside it \
                 (partitions' records must follow one another)",
                range.start, range.end
            ),
        ));
    }
    rest.advance(range.start - *consumed);
    *consumed = range.end;
    Ok(rest.split_to(range.end - range.start))
}

/// Kafka answers TRANSACTIONAL_ID_AUTHORIZATION_FAILED when it will not let a producer write
/// transactionally; clients treat it as fatal (no retry loop) and surface the message, which is
/// what a producer configured for transactions should see here. INVALID_REQUEST would read as a
/// client bug.
fn transactions_refused() -> Failure {
    Failure::new(
        ResponseError::TransactionalIdAuthorizationFailed,
        "ringlog does not support Kafka transactions; produce without transactional.id",
    )
}

fn ready(reply: Reply) -> Boxed<Reply> {
    futures::future::ready(reply).boxed_local()
}

fn close() -> Reply {
    Reply::Close(ResponseFrame { head: Vec::new(), payload: Vec::new() })
}

/// Where a partition's outcome comes from: an index into the routed appends, or a failure found
/// before routing.
type Slot = Result<usize, Failure>;

/// Handles one Produce request: appends are issued before this returns (arrival order); the
/// returned future waits for them per `acks` and encodes the response. The flag says the
/// connection must close now (a malformed request: nothing after it can be trusted).
pub(super) async fn produce(
    shard: &Rc<Shard>,
    ctx: RequestContext,
    frame: BytesMut,
    body_offset: usize,
) -> (Boxed<Reply>, bool) {
    let request = match decode_ranges(&frame, body_offset, ctx.version) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(
                shard = shard.id,
                client = ctx.client_id.as_deref().unwrap_or(""),
                "kafka: closing connection: malformed request: {e}"
            );
            return (ready(close()), true);
        }
    };
    let acks = request.acks;
    // As Kafka does, a negative timeout expires at once.
    let timeout = Duration::from_millis(u64::try_from(request.timeout_ms).unwrap_or(0));
    let refused = if !matches!(acks, ACKS_NONE | ACKS_LEADER | ACKS_ALL) {
        Some(Failure::new(ResponseError::InvalidRequiredAcks, format!("acks must be 0, 1 or -1, not {acks}")))
    } else if let Some(id) = &request.transactional_id {
        tracing::warn!(
            shard = shard.id,
            client = ctx.client_id.as_deref().unwrap_or(""),
            transactional_id = %id,
            "kafka: refusing a transactional produce (transactions are not supported)"
        );
        Some(transactions_refused())
    } else {
        None
    };
    if refused.is_none() {
        // Created (if the setting allows) before routing, so this request's batches land there.
        let missing: Vec<String> =
            request.topics.iter().map(|t| &t.name).filter(|n| shard.topic(n).is_none()).cloned().collect();
        if !missing.is_empty() {
            super::admin::auto_create(shard, missing).await;
        }
    }

    let mut rest = frame;
    let mut consumed = 0usize;
    let mut items = Vec::new();
    let mut layout: Vec<(String, Vec<(i32, Slot)>)> = Vec::with_capacity(request.topics.len());
    let mut transactional_batches = false;
    for topic in request.topics {
        let mut parts = Vec::with_capacity(topic.partitions.len());
        for p in topic.partitions {
            let slot = match &refused {
                Some(failure) => Err(failure.clone()),
                None => {
                    route_partition(shard, &topic.name, &p, timeout, &mut rest, &mut consumed).map(|item| {
                        items.push(item);
                        items.len() - 1
                    })
                }
            };
            if let Err(f) = &slot {
                transactional_batches |= f.code == ResponseError::TransactionalIdAuthorizationFailed.code();
            }
            parts.push((p.index, slot));
        }
        layout.push((topic.name, parts));
    }
    if transactional_batches && request.transactional_id.is_none() {
        tracing::warn!(
            shard = shard.id,
            client = ctx.client_id.as_deref().unwrap_or(""),
            "kafka: refusing transactional batches (transactions are not supported)"
        );
    }
    let outcomes = shard.produce(items, acks != ACKS_NONE).await;
    if acks == ACKS_NONE {
        let client = ctx.client_id;
        let reply = async move {
            let outcomes = outcomes.await;
            // No response is expected, so, as Kafka does, a failure closes the connection: the
            // client notices, refreshes its metadata and reconnects.
            let failed = layout.iter().flat_map(|(_, parts)| parts).any(|(_, slot)| match slot {
                Ok(i) => outcomes.get(*i).is_none_or(Result::is_err),
                Err(_) => true,
            });
            if failed {
                tracing::debug!(
                    client = client.as_deref().unwrap_or(""),
                    "kafka: acks=0 produce failed; closing"
                );
                return close();
            }
            Reply::None
        }
        .boxed_local();
        return (reply, false);
    }
    let version = ctx.version;
    let shard = shard.clone();
    let reply = async move {
        let outcomes = outcomes.await;
        let mut responses: Vec<TopicProduceResponse> = layout
            .into_iter()
            .map(|(name, parts)| {
                let partition_responses = parts
                    .into_iter()
                    .map(|(index, slot)| {
                        let outcome: Result<Appended, Failure> = match slot {
                            Ok(i) => match outcomes.get(i) {
                                Some(Ok(a)) => Ok(*a),
                                Some(Err(e)) => Err(e.clone().into()),
                                None => Err(Failure::new(
                                    ResponseError::UnknownServerError,
                                    "append result missing",
                                )),
                            },
                            Err(f) => Err(f),
                        };
                        partition_response(index, outcome, version)
                    })
                    .collect();
                TopicProduceResponse::default()
                    .with_name(TopicName(StrBytes::from_string(name)))
                    .with_partition_responses(partition_responses)
            })
            .collect();
        let node_endpoints =
            if version >= 10 { name_current_leaders(&shard, &mut responses).await } else { Vec::new() };
        let body = ProduceResponse::default()
            .with_responses(responses)
            .with_throttle_time_ms(0)
            .with_node_endpoints(node_endpoints);
        respond(&ctx, &body)
    }
    .boxed_local();
    (reply, false)
}

/// KIP-951 (Produce v10+): each partition answered NOT_LEADER_OR_FOLLOWER names its current
/// leader and epoch, and the response the endpoints of those leaders, so the client retries there
/// without a metadata round trip. Looked up only when some partition moved.
async fn name_current_leaders(
    shard: &Rc<Shard>,
    responses: &mut [TopicProduceResponse],
) -> Vec<NodeEndpoint> {
    let not_leader = ResponseError::NotLeaderOrFollower.code();
    let moved: Vec<String> = responses
        .iter()
        .filter(|t| t.partition_responses.iter().any(|p| p.error_code == not_leader))
        .map(|t| t.name.0.to_string())
        .collect();
    if moved.is_empty() {
        return Vec::new();
    }
    let leaders = CurrentLeaders::of(shard, moved).await;
    let mut named = Vec::new();
    for topic in responses.iter_mut() {
        for p in topic.partition_responses.iter_mut().filter(|p| p.error_code == not_leader) {
            if let Some((leader, epoch)) = leaders.get(&topic.name.0, p.index) {
                p.current_leader =
                    LeaderIdAndEpoch::default().with_leader_id(BrokerId(leader)).with_leader_epoch(epoch);
                named.push(leader);
            }
        }
    }
    if named.is_empty() {
        return Vec::new();
    }
    super::admin::brokers(shard)
        .await
        .into_iter()
        .filter(|b| named.contains(&b.node_id.0))
        .map(|b| {
            NodeEndpoint::default()
                .with_node_id(b.node_id)
                .with_host(b.host)
                .with_port(b.port)
                .with_rack(b.rack)
        })
        .collect()
}

/// Checks one partition's part of the request and, if it may be appended, splits its records
/// off the frame.
fn route_partition(
    shard: &Rc<Shard>,
    topic: &str,
    p: &PartitionRange,
    timeout: Duration,
    rest: &mut BytesMut,
    consumed: &mut usize,
) -> Result<(u32, AppendItem), Failure> {
    let partition = u32::try_from(p.index).map_err(|_| {
        Failure::new(
            ResponseError::UnknownTopicOrPartition,
            format!("topic '{topic}' has no partition {}", p.index),
        )
    })?;
    let (view, owner) = shard.route(topic, partition)?;
    let Some(range) = p.records.clone() else {
        return Err(Failure::new(
            ResponseError::InvalidRecord,
            format!("{topic}/{partition}: no record batch"),
        ));
    };
    let batches = split_out(rest, consumed, range)?;
    crate::shard::rules::check_client_append(topic, &batches)?;
    Ok((owner, AppendItem { topic: view.name.clone(), partition, batches, timeout: Some(timeout) }))
}

fn partition_response(
    index: i32,
    outcome: Result<Appended, Failure>,
    version: i16,
) -> PartitionProduceResponse {
    let response = PartitionProduceResponse::default().with_index(index).with_log_append_time_ms(-1);
    match outcome {
        Ok(a) => response.with_base_offset(a.base_offset).with_log_start_offset(a.log_start_offset),
        Err(f) => {
            let response = response.with_error_code(f.code).with_base_offset(-1).with_log_start_offset(-1);
            // The message field exists from v8; older clients see the code only.
            if version >= 8 {
                response.with_error_message(Some(StrBytes::from_string(f.message)))
            } else {
                response
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
    use kafka_protocol::messages::{RequestHeader, TransactionalId};
    use kafka_protocol::protocol::Encodable;

    /// A batch-shaped byte string (only its header fields matter here).
    fn batch(attributes: i16, fill: u8, len: usize) -> Vec<u8> {
        let mut b = vec![fill; len];
        b[8..12].copy_from_slice(&((len - 12) as i32).to_be_bytes());
        b[16] = 2;
        b[21..23].copy_from_slice(&attributes.to_be_bytes());
        b
    }

    /// A request frame (no size prefix) as `codec::split_request` hands it over.
    fn frame(version: i16, request: &ProduceRequest) -> (BytesMut, usize) {
        let mut buf = BytesMut::new();
        let header = RequestHeader::default()
            .with_request_api_key(0)
            .with_request_api_version(version)
            .with_correlation_id(7)
            .with_client_id(Some(StrBytes::from_static_str("test")));
        header.encode(&mut buf, if version >= 9 { 2 } else { 1 }).unwrap();
        let body_offset = buf.len();
        request.encode(&mut buf, version).unwrap();
        (buf, body_offset)
    }

    fn request(parts: &[(&str, i32, Option<Vec<u8>>)]) -> ProduceRequest {
        let mut topics: Vec<TopicProduceData> = Vec::new();
        for (name, index, records) in parts {
            let data = PartitionProduceData::default()
                .with_index(*index)
                .with_records(records.clone().map(Bytes::from));
            match topics.iter_mut().find(|t| t.name.0.as_str() == *name) {
                Some(t) => t.partition_data.push(data),
                None => topics.push(
                    TopicProduceData::default()
                        .with_name(TopicName(StrBytes::from_string(name.to_string())))
                        .with_partition_data(vec![data]),
                ),
            }
        }
        ProduceRequest::default().with_acks(-1).with_timeout_ms(1000).with_topic_data(topics)
    }

    #[test]
    fn ranges_locate_every_partitions_records_in_the_frame() {
        let (a, b, c) = (batch(0, 1, 100), batch(0, 2, 70), batch(0, 3, 61));
        let req =
            request(&[("t1", 0, Some(a.clone())), ("t1", 3, Some(b.clone())), ("t2", 1, Some(c.clone()))]);
        for version in 3..=10 {
            let (frame, body_offset) = frame(version, &req);
            let ranges = decode_ranges(&frame, body_offset, version).unwrap();
            assert_eq!((ranges.acks, ranges.timeout_ms), (-1, 1000));
            assert_eq!(ranges.transactional_id, None);
            let names: Vec<_> = ranges.topics.iter().map(|t| t.name.as_str()).collect();
            assert_eq!(names, ["t1", "t2"]);
            let found: Vec<(i32, &[u8])> = ranges
                .topics
                .iter()
                .flat_map(|t| &t.partitions)
                .map(|p| (p.index, &frame[p.records.clone().unwrap()]))
                .collect();
            assert_eq!(found, [(0, &a[..]), (3, &b[..]), (1, &c[..])], "v{version}");
        }
    }

    #[test]
    fn null_and_empty_records_have_no_range_and_garbage_is_an_error() {
        let req = request(&[("t", 0, None), ("t", 1, Some(Vec::new()))])
            .with_transactional_id(Some(TransactionalId(StrBytes::from_static_str("tx"))));
        let (frame, body_offset) = frame(9, &req);
        let ranges = decode_ranges(&frame, body_offset, 9).unwrap();
        assert_eq!(ranges.transactional_id.as_deref(), Some("tx"));
        assert!(ranges.topics[0].partitions.iter().all(|p| p.records.is_none()));
        let truncated = &frame[..frame.len() - 3];
        assert!(decode_ranges(truncated, body_offset, 9).is_err());
        assert!(decode_ranges(&frame, frame.len() + 1, 9).is_err());
    }

    #[test]
    fn split_out_shares_the_frame_and_refuses_overlaps() {
        let (a, b) = (batch(0, 1, 100), batch(0, 2, 80));
        let req = request(&[("t", 0, Some(a.clone())), ("t", 1, Some(b.clone()))]);
        let (frame, body_offset) = frame(9, &req);
        let base = frame.as_ptr() as usize;
        let ranges = decode_ranges(&frame, body_offset, 9).unwrap();
        let (ra, rb) = (
            ranges.topics[0].partitions[0].records.clone().unwrap(),
            ranges.topics[0].partitions[1].records.clone().unwrap(),
        );
        let mut rest = frame;
        let mut consumed = 0;
        let first = split_out(&mut rest, &mut consumed, ra.clone()).unwrap();
        assert_eq!(first.as_ptr() as usize, base + ra.start, "records were copied");
        assert_eq!(&first[..], &a[..]);
        // Going back over the first partition's bytes is refused, and changes nothing.
        assert!(split_out(&mut rest, &mut consumed, ra.clone()).is_err());
        let second = split_out(&mut rest, &mut consumed, rb.clone()).unwrap();
        assert_eq!(second.as_ptr() as usize, base + rb.start);
        assert_eq!(&second[..], &b[..]);
        let (from, past) = (consumed, consumed + rest.len() + 1);
        assert!(split_out(&mut rest, &mut consumed, from..past).is_err());
    }

    #[test]
    fn error_message_only_from_v8() {
        let failure = || Err(Failure::new(ResponseError::InvalidRecord, "bad"));
        let old = partition_response(2, failure(), 7);
        assert_eq!((old.index, old.error_code, old.base_offset, old.error_message), (2, 87, -1, None));
        let new = partition_response(2, failure(), 8);
        assert_eq!(new.error_message.as_ref().map(|m| m.as_str()), Some("bad"));
        let ok = partition_response(0, Ok(Appended { base_offset: 5, log_start_offset: 1 }), 9);
        assert_eq!(
            (ok.error_code, ok.base_offset, ok.log_start_offset, ok.log_append_time_ms),
            (0, 5, 1, -1)
        );
    }
}
