//! The native protocol (FlatBuffers header + raw record payload): decode one request, call the
//! shard API, encode the response.
//!
//! Owns: the mapping between wire messages and shard, controller and group operations; the
//! consumer-group APIs are in `groups`. `handle` does everything that must happen in arrival
//! order (verification, routing, produce appends and cross-shard sends) before it returns; the
//! reply future it returns only waits and encodes. Never panics on input: every failure becomes
//! an error code in the response. May depend on `server` (the `Protocol` seam), `groups`,
//! `cluster` (topic changes of either kind), `controller`, `shard`, `metadata`, `metrics`,
//! `protocol`, `config`; never on storage.

mod errors;
mod groups;

use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use flatbuffers::{FlatBufferBuilder, WIPOffset};
use futures::future::FutureExt;
use tracing::Instrument;

use crate::config::DurabilitySetting;
use crate::metadata::{TopicOverrides, TopicSettings};
use crate::protocol::frame::{frame_prefix, split_frame, FrameError, RawFrame, FRAME_PREFIX_LEN};
use crate::protocol::wire::{self, ErrorCode, RequestBody, ResponseBody};
use crate::protocol::{self, PROTOCOL_VERSION};
use crate::shard::mesh::{AppendItem, BrokerError, FetchItem, FetchOutcome, OffsetQuery};
use crate::shard::replicated::{LeaderView, Replication};
use crate::shard::rules::{self, FetchBudget};
use crate::shard::Shard;

pub use crate::server::{Boxed, Reply, ResponseFrame};

/// The native protocol (FlatBuffers header + raw record payload), as a connection speaks it.
pub struct Native;

impl crate::server::Protocol for Native {
    const NAME: &'static str = "native";
    type Frame = RawFrame;

    fn split(buf: &mut BytesMut, frame_bytes_max: usize) -> Result<Option<RawFrame>, FrameError> {
        split_frame(buf, frame_bytes_max)
    }

    fn frame_len(frame: &RawFrame) -> usize {
        frame.header.len() + frame.payload.len()
    }

    fn framing_error(error: &FrameError) -> Option<ResponseFrame> {
        let code = match error {
            FrameError::TooLarge { .. } => ErrorCode::BatchTooLarge,
            _ => ErrorCode::InvalidRequest,
        };
        Some(error_response(0, code, &error.to_string()))
    }

    async fn handle(
        shard: &Rc<Shard>,
        frame: RawFrame,
        _peer: Option<std::net::SocketAddr>,
    ) -> (Boxed<Reply>, bool) {
        handle(shard, frame).await
    }
}

/// With `groups::GROUP_APIS`, what the handshake advertises: exactly the request types `handle`
/// answers.
const PARTITION_APIS: &[RequestBody] = &[
    RequestBody::HandshakeRequest,
    RequestBody::MetadataRequest,
    RequestBody::CreateTopicRequest,
    RequestBody::DeleteTopicRequest,
    RequestBody::CreatePartitionsRequest,
    RequestBody::ProduceRequest,
    RequestBody::FetchRequest,
    RequestBody::ListOffsetsRequest,
];

fn ready(reply: Reply) -> Boxed<Reply> {
    futures::future::ready(reply).boxed_local()
}

/// Decodes and dispatches one frame. Returns the reply future and whether the connection must
/// close after it.
pub async fn handle(shard: &Rc<Shard>, frame: RawFrame) -> (Boxed<Reply>, bool) {
    let started = Instant::now();
    let RawFrame { header, payload } = frame;
    let opts = protocol::verifier_options();
    let request = match flatbuffers::root_with_opts::<wire::Request>(&opts, &header) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(
                shard = shard.id,
                "closing connection: request header is not a valid Request: {e}"
            );
            let msg = format!("request header is not a valid FlatBuffers Request: {e}");
            return (ready(Reply::Close(error_response(0, ErrorCode::InvalidRequest, &msg))), true);
        }
    };
    let cid = request.correlation_id();
    if request.version() != PROTOCOL_VERSION {
        let msg = format!(
            "protocol version {} is not supported; this broker speaks {PROTOCOL_VERSION}",
            request.version()
        );
        return (ready(Reply::Frame(error_response(cid, ErrorCode::UnsupportedVersion, &msg))), false);
    }
    let reply = match request.body_type() {
        RequestBody::HandshakeRequest => ready(Reply::Frame(handshake(shard, cid))),
        RequestBody::MetadataRequest => match request.body_as_metadata_request() {
            Some(r) => metadata(shard, cid, r),
            None => missing_body(cid),
        },
        RequestBody::CreateTopicRequest => match request.body_as_create_topic_request() {
            Some(r) => create_topic(shard, cid, r),
            None => missing_body(cid),
        },
        RequestBody::DeleteTopicRequest => match request.body_as_delete_topic_request() {
            Some(r) => delete_topic(shard, cid, r),
            None => missing_body(cid),
        },
        RequestBody::CreatePartitionsRequest => match request.body_as_create_partitions_request() {
            Some(r) => create_partitions(shard, cid, r),
            None => missing_body(cid),
        },
        RequestBody::ProduceRequest => match request.body_as_produce_request() {
            Some(r) => produce(shard, cid, r, payload).await,
            None => missing_body(cid),
        },
        RequestBody::FetchRequest => match request.body_as_fetch_request() {
            Some(r) => fetch(shard, cid, r),
            None => missing_body(cid),
        },
        RequestBody::ListOffsetsRequest => match request.body_as_list_offsets_request() {
            Some(r) => list_offsets(shard, cid, r).await,
            None => missing_body(cid),
        },
        other if groups::handles(other) => groups::handle(shard, cid, request),
        other => {
            let msg = format!("unknown request type {}", other.0);
            ready(Reply::Frame(error_response(cid, ErrorCode::InvalidRequest, &msg)))
        }
    };
    let api = request.body_type();
    // Off unless the log filter enables TRACE for ringlog (`--log ringlog=trace`): a disabled
    // span costs one level check on the request path.
    let span =
        tracing::trace_span!("request", shard = shard.id, cid, api = api.variant_name().unwrap_or("?"));
    let reply = async move {
        let reply = reply.await;
        let error = match &reply {
            Reply::None => false,
            Reply::Frame(f) => response_is_error(&f.head[FRAME_PREFIX_LEN..]),
            Reply::Close(_) => true,
        };
        let label = crate::metrics::Api {
            family: crate::metrics::Family::Native,
            key: u16::from(api.0),
            name: api_name(api),
        };
        crate::metrics::request_done(label, started, error);
        tracing::trace!(error, elapsed_us = started.elapsed().as_micros() as u64, "replied");
        reply
    };
    (reply.instrument(span).boxed_local(), false)
}

/// The API's name as the metrics label: the request type without its `Request` suffix, in
/// snake case (`ProduceRequest` → `produce`).
fn api_name(api: RequestBody) -> &'static str {
    match api {
        RequestBody::HandshakeRequest => "handshake",
        RequestBody::MetadataRequest => "metadata",
        RequestBody::CreateTopicRequest => "create_topic",
        RequestBody::DeleteTopicRequest => "delete_topic",
        RequestBody::CreatePartitionsRequest => "create_partitions",
        RequestBody::ProduceRequest => "produce",
        RequestBody::FetchRequest => "fetch",
        RequestBody::ListOffsetsRequest => "list_offsets",
        RequestBody::FindCoordinatorRequest => "find_coordinator",
        RequestBody::JoinGroupRequest => "join_group",
        RequestBody::SyncGroupRequest => "sync_group",
        RequestBody::HeartbeatRequest => "heartbeat",
        RequestBody::LeaveGroupRequest => "leave_group",
        RequestBody::OffsetCommitRequest => "offset_commit",
        RequestBody::OffsetFetchRequest => "offset_fetch",
        RequestBody::ListGroupsRequest => "list_groups",
        RequestBody::DescribeGroupRequest => "describe_group",
        RequestBody::DeleteGroupRequest => "delete_group",
        RequestBody::ResetOffsetsRequest => "reset_offsets",
        _ => "unknown",
    }
}
/// Whether an encoded `Response` header carries a request-level error code. Reads the one field
/// through bounds-checked slicing instead of verifying the whole buffer, whose cost grows with
/// the number of partitions in the response.
fn response_is_error(header: &[u8]) -> bool {
    fn u16_at(b: &[u8], at: usize) -> Option<u16> {
        Some(u16::from_le_bytes(b.get(at..at.checked_add(2)?)?.try_into().ok()?))
    }
    fn u32_at(b: &[u8], at: usize) -> Option<u32> {
        Some(u32::from_le_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?))
    }
    let code = (|| {
        let table = u32_at(header, 0)? as usize;
        let vtable = (table as i64).checked_sub(i64::from(u32_at(header, table)? as i32))?;
        let vtable = usize::try_from(vtable).ok()?;
        let field = usize::from(wire::Response::VT_ERROR);
        if usize::from(u16_at(header, vtable)?) <= field {
            return Some(0);
        }
        match u16_at(header, vtable + field)? {
            0 => Some(0),
            offset => u16_at(header, table + usize::from(offset)),
        }
    })();
    code.is_some_and(|c| c != 0)
}

fn missing_body(cid: u32) -> Boxed<Reply> {
    ready(Reply::Frame(error_response(cid, ErrorCode::InvalidRequest, "request has no body")))
}

fn broker_error_response(cid: u32, e: &BrokerError) -> ResponseFrame {
    error_response(cid, errors::broker_code(e), &e.to_string())
}

pub fn error_response(cid: u32, code: ErrorCode, message: &str) -> ResponseFrame {
    let mut fbb = FlatBufferBuilder::with_capacity(128 + message.len());
    let message = fbb.create_string(message);
    let root = wire::Response::create(
        &mut fbb,
        &wire::ResponseArgs {
            correlation_id: cid,
            error: code,
            message: Some(message),
            ..Default::default()
        },
    );
    finish(fbb, root, Vec::new())
}

fn finish(
    mut fbb: FlatBufferBuilder<'_>,
    root: WIPOffset<wire::Response<'_>>,
    payload: Vec<Bytes>,
) -> ResponseFrame {
    fbb.finish_minimal(root);
    let header = fbb.finished_data();
    let payload_len: usize = payload.iter().map(Bytes::len).sum();
    let mut head = Vec::with_capacity(FRAME_PREFIX_LEN + header.len());
    head.extend_from_slice(&frame_prefix(header.len(), payload_len));
    head.extend_from_slice(header);
    ResponseFrame { head, payload }
}

pub(super) fn respond(
    mut fbb: FlatBufferBuilder<'_>,
    cid: u32,
    body_type: ResponseBody,
    body: WIPOffset<flatbuffers::UnionWIPOffset>,
    payload: Vec<Bytes>,
) -> Reply {
    let root = wire::Response::create(
        &mut fbb,
        &wire::ResponseArgs { correlation_id: cid, body_type, body: Some(body), ..Default::default() },
    );
    Reply::Frame(finish(fbb, root, payload))
}

fn handshake(shard: &Rc<Shard>, cid: u32) -> ResponseFrame {
    let mut fbb = FlatBufferBuilder::with_capacity(256);
    let apis: Vec<_> = PARTITION_APIS
        .iter()
        .chain(groups::GROUP_APIS)
        .map(|b| {
            wire::ApiRange::create(
                &mut fbb,
                &wire::ApiRangeArgs {
                    api: u16::from(b.0),
                    min_version: PROTOCOL_VERSION,
                    max_version: PROTOCOL_VERSION,
                },
            )
        })
        .collect();
    let apis = fbb.create_vector(&apis);
    let broker_version = fbb.create_string(env!("CARGO_PKG_VERSION"));
    let body = wire::HandshakeResponse::create(
        &mut fbb,
        &wire::HandshakeResponseArgs {
            version: PROTOCOL_VERSION,
            broker_version: Some(broker_version),
            shard: shard.id,
            shard_count: shard.count,
            apis: Some(apis),
        },
    );
    let root = wire::Response::create(
        &mut fbb,
        &wire::ResponseArgs {
            correlation_id: cid,
            body_type: ResponseBody::HandshakeResponse,
            body: Some(body.as_union_value()),
            ..Default::default()
        },
    );
    finish(fbb, root, Vec::new())
}

fn topic_config<'a>(fbb: &mut FlatBufferBuilder<'a>, s: &TopicSettings) -> WIPOffset<wire::TopicConfig<'a>> {
    wire::TopicConfig::create(
        fbb,
        &wire::TopicConfigArgs {
            retention_bytes: Some(s.retention_bytes),
            retention_ms: Some(s.retention_ms),
            segment_bytes: Some(s.segment_bytes as i64),
            segment_ms: Some(s.segment_ms as i64),
            durability: Some(match s.durability {
                DurabilitySetting::Written => wire::Durability::Written,
                DurabilitySetting::Fsync => wire::Durability::Fsync,
            }),
        },
    )
}

fn overrides_from_wire(config: Option<wire::TopicConfig<'_>>) -> Result<TopicOverrides, String> {
    let Some(c) = config else { return Ok(TopicOverrides::default()) };
    let non_negative = |name: &str, v: Option<i64>| -> Result<Option<u64>, String> {
        match v {
            None => Ok(None),
            Some(v) if v > 0 => Ok(Some(v as u64)),
            Some(v) => Err(format!("{name} {v} must be positive")),
        }
    };
    Ok(TopicOverrides {
        segment_bytes: non_negative("segment_bytes", c.segment_bytes())?,
        segment_ms: non_negative("segment_ms", c.segment_ms())?,
        retention_bytes: c.retention_bytes(),
        retention_ms: c.retention_ms(),
        durability: match c.durability() {
            None => None,
            Some(wire::Durability::Written) => Some(DurabilitySetting::Written),
            Some(wire::Durability::Fsync) => Some(DurabilitySetting::Fsync),
            Some(other) => return Err(format!("unknown durability {}", other.0)),
        },
    })
}

/// Per-partition metadata for `topics`, with log offsets asked from each owner.
async fn partition_metadata(
    shard: &Rc<Shard>,
    topics: &[(Arc<str>, Vec<u32>)],
) -> Vec<Vec<(u32, u32, i64, i64)>> {
    let mut queries = Vec::new();
    for (name, shards) in topics {
        for (p, &owner) in shards.iter().enumerate() {
            queries.push((owner, (name.clone(), p as u32)));
        }
    }
    let mut states = shard.partition_states(queries).await.into_iter();
    topics
        .iter()
        .map(|(_, shards)| {
            shards
                .iter()
                .enumerate()
                .map(|(p, &owner)| {
                    let (start, hw) = states.next().flatten().unwrap_or((-1, -1));
                    (p as u32, owner, start, hw)
                })
                .collect()
        })
        .collect()
}

/// A replicated topic's placement and each partition's leader, for its metadata.
type ReplicaInfo<'r> = Option<(&'r Replication, &'r [LeaderView])>;

fn encode_partitions<'a>(
    fbb: &mut FlatBufferBuilder<'a>,
    parts: &[(u32, u32, i64, i64)],
    replicated: ReplicaInfo<'_>,
) -> WIPOffset<flatbuffers::Vector<'a, flatbuffers::ForwardsUOffset<wire::PartitionMetadata<'a>>>> {
    let parts: Vec<_> = parts
        .iter()
        .map(|&(partition, shard, log_start_offset, high_watermark)| {
            let mut args = wire::PartitionMetadataArgs {
                partition,
                shard,
                log_start_offset,
                high_watermark,
                ..Default::default()
            };
            if let Some((replication, leaders)) = replicated {
                let nodes =
                    replication.replicas.get(partition as usize).map(Vec::as_slice).unwrap_or_default();
                args.replicas = Some(fbb.create_vector(nodes));
                if let Some(view) = leaders.get(partition as usize) {
                    args.leader = view.leader.unwrap_or(0);
                    args.leader_epoch = view.epoch as i64;
                    args.leader_address = view.native.as_deref().map(|a| fbb.create_string(a));
                    args.isr = Some(fbb.create_vector(&view.in_sync));
                }
            }
            wire::PartitionMetadata::create(fbb, &args)
        })
        .collect();
    fbb.create_vector(&parts)
}

fn metadata(shard: &Rc<Shard>, cid: u32, r: wire::MetadataRequest<'_>) -> Boxed<Reply> {
    let requested: Vec<String> =
        r.topics().map(|t| t.iter().map(str::to_string).collect()).unwrap_or_default();
    let names: Vec<Result<Arc<str>, String>> = if requested.is_empty() {
        // Internal topics are listed only when asked for by name.
        shard.topic_names().into_iter().filter(|n| !crate::metadata::is_internal_topic(n)).map(Ok).collect()
    } else {
        requested.into_iter().map(|n| shard.topic(&n).map(|v| v.name.clone()).ok_or(n)).collect()
    };
    let shard = shard.clone();
    async move {
        let views: Vec<_> =
            names.iter().filter_map(|n| n.as_ref().ok()).filter_map(|n| shard.topic(n)).collect();
        let layout: Vec<(Arc<str>, Vec<u32>)> =
            views.iter().map(|v| (v.name.clone(), v.partition_shards.clone())).collect();
        let mut states = partition_metadata(&shard, &layout).await.into_iter();
        let mut leaders = Vec::with_capacity(views.len());
        for view in &views {
            leaders.push(match view.replication {
                Some(_) => shard.replicated_leaders(view.name.clone()).await,
                None => Vec::new(),
            });
        }
        let mut leaders = leaders.into_iter();
        let mut views = views.into_iter();
        let mut fbb = FlatBufferBuilder::with_capacity(1024);
        let mut topics = Vec::with_capacity(names.len());
        for name in &names {
            let topic = match name {
                Ok(_) => {
                    let (Some(view), Some(parts), Some(leaders)) =
                        (views.next(), states.next(), leaders.next())
                    else {
                        continue;
                    };
                    let name = fbb.create_string(&view.name);
                    let replicated = view.replication.as_deref().map(|r| (r, leaders.as_slice()));
                    let partitions = encode_partitions(&mut fbb, &parts, replicated);
                    let config = topic_config(&mut fbb, &view.settings);
                    wire::TopicMetadata::create(
                        &mut fbb,
                        &wire::TopicMetadataArgs {
                            name: Some(name),
                            partitions: Some(partitions),
                            config: Some(config),
                            ..Default::default()
                        },
                    )
                }
                Err(missing) => {
                    let message = fbb.create_string(&format!("unknown topic '{missing}'"));
                    let name = fbb.create_string(missing);
                    wire::TopicMetadata::create(
                        &mut fbb,
                        &wire::TopicMetadataArgs {
                            name: Some(name),
                            error: ErrorCode::UnknownTopicOrPartition,
                            message: Some(message),
                            ..Default::default()
                        },
                    )
                }
            };
            topics.push(topic);
        }
        let endpoints: Vec<_> = shard
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, addr)| {
                let host = fbb.create_string(&addr.ip().to_string());
                wire::ShardEndpoint::create(
                    &mut fbb,
                    &wire::ShardEndpointArgs { shard: i as u32, host: Some(host), port: addr.port() },
                )
            })
            .collect();
        let shards = fbb.create_vector(&endpoints);
        let topics = fbb.create_vector(&topics);
        let controller = crate::cluster::controller_address(&shard).await;
        let controller_address = controller.as_deref().map(|a| fbb.create_string(a));
        let body = wire::MetadataResponse::create(
            &mut fbb,
            &wire::MetadataResponseArgs { shards: Some(shards), topics: Some(topics), controller_address },
        );
        respond(fbb, cid, ResponseBody::MetadataResponse, body.as_union_value(), Vec::new())
    }
    .boxed_local()
}

fn create_topic(shard: &Rc<Shard>, cid: u32, r: wire::CreateTopicRequest<'_>) -> Boxed<Reply> {
    let name = r.name().unwrap_or_default().to_string();
    let partitions = r.partitions().unwrap_or(shard.config.default_partitions);
    let overrides = match overrides_from_wire(r.config()) {
        Ok(o) => o,
        Err(m) => return ready(Reply::Frame(error_response(cid, ErrorCode::InvalidConfig, &m))),
    };
    let replication_factor = r.replication_factor();
    let shard = shard.clone();
    async move {
        let created = crate::cluster::create_any_topic(
            &shard,
            name,
            partitions,
            replication_factor,
            overrides,
            crate::cluster::ChangeWait::Default,
        )
        .await
        .map(|t| t.name);
        let name = match created {
            Ok(name) => name,
            Err(e) => return Reply::Frame(broker_error_response(cid, &e)),
        };
        let mut fbb = FlatBufferBuilder::with_capacity(512);
        let (name, partitions) = match topic_partitions(&shard, &mut fbb, name).await {
            Ok(encoded) => encoded,
            Err(e) => return Reply::Frame(broker_error_response(cid, &e)),
        };
        let body = wire::CreateTopicResponse::create(
            &mut fbb,
            &wire::CreateTopicResponseArgs { name: Some(name), partitions: Some(partitions) },
        );
        respond(fbb, cid, ResponseBody::CreateTopicResponse, body.as_union_value(), Vec::new())
    }
    .boxed_local()
}

type EncodedPartitions<'a> =
    WIPOffset<flatbuffers::Vector<'a, flatbuffers::ForwardsUOffset<wire::PartitionMetadata<'a>>>>;

/// A topic's name and partitions as this node shows them now, for the answer to a change.
async fn topic_partitions<'a>(
    shard: &Rc<Shard>,
    fbb: &mut FlatBufferBuilder<'a>,
    name: String,
) -> Result<(WIPOffset<&'a str>, EncodedPartitions<'a>), BrokerError> {
    let view = shard.topic(&name).ok_or(BrokerError::UnknownTopic { topic: name })?;
    let layout = vec![(view.name.clone(), view.partition_shards.clone())];
    let parts = partition_metadata(shard, &layout).await;
    let leaders = match view.replication {
        Some(_) => shard.replicated_leaders(view.name.clone()).await,
        None => Vec::new(),
    };
    let name = fbb.create_string(&view.name);
    let replicated = view.replication.as_deref().map(|r| (r, leaders.as_slice()));
    let partitions = encode_partitions(fbb, parts.first().map(Vec::as_slice).unwrap_or_default(), replicated);
    Ok((name, partitions))
}

fn create_partitions(shard: &Rc<Shard>, cid: u32, r: wire::CreatePartitionsRequest<'_>) -> Boxed<Reply> {
    let name = r.name().unwrap_or_default().to_string();
    let (partitions, validate_only) = (r.partitions(), r.validate_only());
    let shard = shard.clone();
    async move {
        let grown = if validate_only {
            crate::cluster::check_grow(&shard, &name, partitions).map(|_| ())
        } else {
            crate::cluster::grow_any_topic(
                &shard,
                name.clone(),
                partitions,
                crate::cluster::ChangeWait::Default,
            )
            .await
            .map(|_| ())
        };
        if let Err(e) = grown {
            return Reply::Frame(broker_error_response(cid, &e));
        }
        let mut fbb = FlatBufferBuilder::with_capacity(512);
        let (name, partitions) = match topic_partitions(&shard, &mut fbb, name).await {
            Ok(encoded) => encoded,
            Err(e) => return Reply::Frame(broker_error_response(cid, &e)),
        };
        let body = wire::CreatePartitionsResponse::create(
            &mut fbb,
            &wire::CreatePartitionsResponseArgs { name: Some(name), partitions: Some(partitions) },
        );
        respond(fbb, cid, ResponseBody::CreatePartitionsResponse, body.as_union_value(), Vec::new())
    }
    .boxed_local()
}

fn delete_topic(shard: &Rc<Shard>, cid: u32, r: wire::DeleteTopicRequest<'_>) -> Boxed<Reply> {
    let name = r.name().unwrap_or_default().to_string();
    let shard = shard.clone();
    async move {
        let deleted =
            crate::cluster::delete_any_topic(&shard, name.clone(), crate::cluster::ChangeWait::Default).await;
        if let Err(e) = deleted {
            return Reply::Frame(broker_error_response(cid, &e));
        }
        let mut fbb = FlatBufferBuilder::with_capacity(128);
        let name = fbb.create_string(&name);
        let body =
            wire::DeleteTopicResponse::create(&mut fbb, &wire::DeleteTopicResponseArgs { name: Some(name) });
        respond(fbb, cid, ResponseBody::DeleteTopicResponse, body.as_union_value(), Vec::new())
    }
    .boxed_local()
}

/// Where each partition of a response comes from: an index into the routed items, or an error
/// found before routing.
type Slot = Result<usize, BrokerError>;

/// A partition's outcome: its routed item's result, or the error found before routing.
fn resolve<O: Clone>(slot: &Slot, outcomes: &[Result<O, BrokerError>]) -> Result<O, BrokerError> {
    match slot {
        Ok(i) => outcomes[*i].clone(),
        Err(e) => Err(e.clone()),
    }
}

async fn produce(
    shard: &Rc<Shard>,
    cid: u32,
    r: wire::ProduceRequest<'_>,
    payload: BytesMut,
) -> Boxed<Reply> {
    let acks = r.acks();
    if !matches!(acks, protocol::ACKS_NONE | protocol::ACKS_LEADER | protocol::ACKS_ALL) {
        let msg = format!("acks must be 0, 1 or -1 (all), not {acks}");
        return ready(Reply::Frame(error_response(cid, ErrorCode::InvalidRequest, &msg)));
    }
    let payload_len = payload.len();
    let mut rest = payload;
    let mut consumed = 0usize;
    let mut items = Vec::new();
    let mut layout: Vec<(String, Vec<(u32, Slot)>)> = Vec::new();
    for topic in r.topics().iter().flatten() {
        let name = topic.name().unwrap_or_default();
        let mut parts = Vec::new();
        for p in topic.partitions().iter().flatten() {
            let partition = p.partition();
            let (start, len) = (p.payload_offset() as usize, p.payload_len() as usize);
            let slot = match shard.route(name, partition) {
                Err(e) => Err(e),
                Ok(_) if start < consumed || start.saturating_add(len) > payload_len => {
                    Err(BrokerError::InvalidRequest(format!(
                        "payload range {start}+{len} is outside the {payload_len}-byte payload or overlaps an \
                         earlier partition's (ranges must be in ascending order)"
                    )))
                }
                Ok(_) if len == 0 => Err(BrokerError::InvalidRequest("empty record batch".into())),
                Ok((view, owner)) => {
                    rest.advance(start - consumed);
                    let batches = rest.split_to(len);
                    consumed = start + len;
                    match rules::check_client_append(name, &batches) {
                        Ok(()) => {
                            items.push((owner, AppendItem { topic: view.name.clone(), partition, batches, timeout: None }));
                            Ok(items.len() - 1)
                        }
                        Err(e) => Err(e),
                    }
                }
            };
            parts.push((partition, slot));
        }
        layout.push((name.to_string(), parts));
    }
    let outcomes = shard.produce(items, acks != protocol::ACKS_NONE).await;
    if acks == protocol::ACKS_NONE {
        return ready(Reply::None);
    }
    async move {
        let outcomes = outcomes.await;
        let mut fbb = FlatBufferBuilder::with_capacity(256);
        let mut topics = Vec::with_capacity(layout.len());
        for (name, parts) in &layout {
            let results: Vec<_> = parts
                .iter()
                .map(|(partition, slot)| {
                    let outcome = resolve(slot, &outcomes);
                    let args = match outcome {
                        Ok(a) => wire::ProducePartitionResultArgs {
                            partition: *partition,
                            base_offset: a.base_offset,
                            log_start_offset: a.log_start_offset,
                            ..Default::default()
                        },
                        Err(e) => wire::ProducePartitionResultArgs {
                            partition: *partition,
                            error: errors::broker_code(&e),
                            message: Some(fbb.create_string(&e.to_string())),
                            ..Default::default()
                        },
                    };
                    wire::ProducePartitionResult::create(&mut fbb, &args)
                })
                .collect();
            let partitions = fbb.create_vector(&results);
            let name = fbb.create_string(name);
            topics.push(wire::ProduceTopicResult::create(
                &mut fbb,
                &wire::ProduceTopicResultArgs { name: Some(name), partitions: Some(partitions) },
            ));
        }
        let topics = fbb.create_vector(&topics);
        let body =
            wire::ProduceResponse::create(&mut fbb, &wire::ProduceResponseArgs { topics: Some(topics) });
        respond(fbb, cid, ResponseBody::ProduceResponse, body.as_union_value(), Vec::new())
    }
    .boxed_local()
}

fn fetch(shard: &Rc<Shard>, cid: u32, r: wire::FetchRequest<'_>) -> Boxed<Reply> {
    let max_wait = rules::fetch_max_wait(&shard.config, u64::from(r.max_wait_ms()));
    let min_bytes = r.min_bytes() as usize;
    let budget = FetchBudget::new(&shard.config, i64::from(r.max_bytes()));
    let mut items: Vec<(u32, FetchItem)> = Vec::new();
    let mut layout: Vec<(String, Vec<(u32, Slot)>)> = Vec::new();
    for topic in r.topics().iter().flatten() {
        let name = topic.name().unwrap_or_default();
        let mut parts = Vec::new();
        for p in topic.partitions().iter().flatten() {
            let slot = shard.route(name, p.partition()).map(|(view, owner)| {
                let item = FetchItem {
                    topic: view.name.clone(),
                    partition: p.partition(),
                    offset: p.offset(),
                    max_bytes: budget.partition_max_bytes(i64::from(p.max_bytes())),
                    epochs: Default::default(),
                };
                items.push((owner, item));
                items.len() - 1
            });
            parts.push((p.partition(), slot));
        }
        layout.push((name.to_string(), parts));
    }
    let shard = shard.clone();
    async move {
        let outcomes = shard.fetch_long_poll(items, min_bytes, max_wait, false).await;
        encode_fetch(cid, &layout, outcomes, budget)
    }
    .boxed_local()
}

fn encode_fetch(
    cid: u32,
    layout: &[(String, Vec<(u32, Slot)>)],
    outcomes: Vec<FetchOutcome>,
    mut budget: FetchBudget,
) -> Reply {
    let mut outcomes: Vec<Option<FetchOutcome>> = outcomes.into_iter().map(Some).collect();
    let mut fbb = FlatBufferBuilder::with_capacity(512);
    let mut payload: Vec<Bytes> = Vec::new();
    let mut topics = Vec::with_capacity(layout.len());
    for (name, parts) in layout {
        let mut results = Vec::with_capacity(parts.len());
        for (partition, slot) in parts {
            let outcome = match slot {
                Ok(i) => outcomes[*i].take().unwrap_or_else(|| {
                    Err(BrokerError::Internal("partition listed twice in one fetch".into()))
                }),
                Err(e) => Err(e.clone()),
            };
            let args = match outcome {
                Ok(fetched) => {
                    let start = budget.included_bytes();
                    let len = fetched.len();
                    let include = budget.admit(len);
                    if include {
                        payload.extend(fetched.chunks);
                    }
                    wire::FetchPartitionResultArgs {
                        partition: *partition,
                        high_watermark: fetched.high_watermark,
                        log_start_offset: fetched.log_start_offset,
                        payload_offset: start as u32,
                        payload_len: if include { len as u32 } else { 0 },
                        ..Default::default()
                    }
                }
                Err(e) => {
                    let (log_start_offset, high_watermark) = e.log_bounds().unwrap_or((-1, -1));
                    wire::FetchPartitionResultArgs {
                        partition: *partition,
                        error: errors::broker_code(&e),
                        message: Some(fbb.create_string(&e.to_string())),
                        log_start_offset,
                        high_watermark,
                        ..Default::default()
                    }
                }
            };
            results.push(wire::FetchPartitionResult::create(&mut fbb, &args));
        }
        let partitions = fbb.create_vector(&results);
        let name = fbb.create_string(name);
        topics.push(wire::FetchTopicResult::create(
            &mut fbb,
            &wire::FetchTopicResultArgs { name: Some(name), partitions: Some(partitions) },
        ));
    }
    let topics = fbb.create_vector(&topics);
    let body = wire::FetchResponse::create(&mut fbb, &wire::FetchResponseArgs { topics: Some(topics) });
    respond(fbb, cid, ResponseBody::FetchResponse, body.as_union_value(), payload)
}

async fn list_offsets(shard: &Rc<Shard>, cid: u32, r: wire::ListOffsetsRequest<'_>) -> Boxed<Reply> {
    let mut items = Vec::new();
    let mut layout: Vec<(String, Vec<(u32, Slot)>)> = Vec::new();
    for topic in r.topics().iter().flatten() {
        let name = topic.name().unwrap_or_default();
        let mut parts = Vec::new();
        for p in topic.partitions().iter().flatten() {
            let slot = shard.route(name, p.partition()).map(|(view, owner)| {
                let q = OffsetQuery {
                    topic: view.name.clone(),
                    partition: p.partition(),
                    timestamp_ms: p.timestamp(),
                    current_leader_epoch: None,
                };
                items.push((owner, q));
                items.len() - 1
            });
            parts.push((p.partition(), slot));
        }
        layout.push((name.to_string(), parts));
    }
    let outcomes = shard.list_offsets(items).await;
    async move {
        let outcomes = outcomes.await;
        let mut fbb = FlatBufferBuilder::with_capacity(256);
        let mut topics = Vec::with_capacity(layout.len());
        for (name, parts) in &layout {
            let results: Vec<_> = parts
                .iter()
                .map(|(partition, slot)| {
                    let outcome = resolve(slot, &outcomes);
                    let args = match outcome {
                        Ok(found) => {
                            let (offset, timestamp) = found.map_or((-1, -1), |f| (f.offset, f.timestamp));
                            wire::ListOffsetsPartitionResultArgs {
                                partition: *partition,
                                offset,
                                timestamp,
                                ..Default::default()
                            }
                        }
                        Err(e) => wire::ListOffsetsPartitionResultArgs {
                            partition: *partition,
                            error: errors::broker_code(&e),
                            message: Some(fbb.create_string(&e.to_string())),
                            ..Default::default()
                        },
                    };
                    wire::ListOffsetsPartitionResult::create(&mut fbb, &args)
                })
                .collect();
            let partitions = fbb.create_vector(&results);
            let name = fbb.create_string(name);
            topics.push(wire::ListOffsetsTopicResult::create(
                &mut fbb,
                &wire::ListOffsetsTopicResultArgs { name: Some(name), partitions: Some(partitions) },
            ));
        }
        let topics = fbb.create_vector(&topics);
        let body = wire::ListOffsetsResponse::create(
            &mut fbb,
            &wire::ListOffsetsResponseArgs { topics: Some(topics) },
        );
        respond(fbb, cid, ResponseBody::ListOffsetsResponse, body.as_union_value(), Vec::new())
    }
    .boxed_local()
}
