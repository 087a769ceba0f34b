//! The Apache Kafka wire protocol: a second listener that lets unchanged Kafka clients
//! (librdkafka and everything on it, the Java client, kafka-python, kafkajs) drive the same
//! shards, partitions, storage and group coordinators as the native protocol.
//!
//! Owns: Kafka framing and request headers (`codec`), the table of supported APIs and versions
//! (`versions`), the mapping of ringlog errors to Kafka error codes (`errors`), and one module per
//! family of APIs: `admin` (Metadata, topics, configs), `produce` (Produce), `producer_ids`
//! (InitProducerId),
//! `fetch` (Fetch, ListOffsets), `leader_epochs` (OffsetForLeaderEpoch), `groups` (the
//! consumer-group APIs), with `leaders` translating leader epochs and current leaders. Codecs come from the
//! `kafka-protocol` crate; record batches are never decoded or re-encoded here: produce hands the
//! client's bytes to storage as sent and fetch returns storage's buffers as they are.
//! Errors become Kafka codes in one table (`errors`); what a client may append and how a fetch is
//! sized are the rules shared with the native protocol (`shard::rules`).
//! May depend on `server` (connections, replies), `shard` (routing, the data path, rules,
//! `BrokerError`), `controller` (topics, producer ids), `groups`, `metadata`, `metrics`,
//! `protocol::frame`, `config`; never on storage.

mod admin;
pub mod codec;
mod errors;
mod fetch;
mod groups;
mod leader_epochs;
mod leaders;
mod produce;
mod producer_ids;
pub mod versions;

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures::future::FutureExt;
use kafka_protocol::messages::ApiKey;
use kafka_protocol::protocol::Decodable;
use tracing::Instrument;

use crate::protocol::frame::FrameError;
use crate::server::{Boxed, Protocol, Reply, ResponseFrame};
use crate::shard::Shard;
use codec::RequestContext;

/// The Kafka protocol as a connection speaks it.
pub struct Kafka;

impl Protocol for Kafka {
    const NAME: &'static str = "kafka";
    type Frame = BytesMut;

    fn split(buf: &mut BytesMut, frame_bytes_max: usize) -> Result<Option<BytesMut>, FrameError> {
        codec::split_request(buf, frame_bytes_max)
    }

    fn frame_len(frame: &BytesMut) -> usize {
        frame.len()
    }

    fn framing_error(_: &FrameError) -> Option<ResponseFrame> {
        // A Kafka response needs the request's correlation id and API; a stream whose framing
        // broke has neither to give. The connection closes after a log line.
        None
    }

    async fn handle(shard: &Rc<Shard>, frame: BytesMut, peer: Option<SocketAddr>) -> (Boxed<Reply>, bool) {
        handle(shard, frame, peer).await
    }
}

/// `host:port` → its parts (for `kafka_advertised_listener`).
pub fn parse_host_port(text: &str) -> Result<(String, u16), String> {
    match text.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() => match port.parse::<u16>() {
            Ok(port) if port > 0 => Ok((host.trim_matches(['[', ']']).to_string(), port)),
            _ => Err(format!("kafka_advertised_listener '{text}': bad port")),
        },
        _ => Err(format!("kafka_advertised_listener '{text}' is not host:port")),
    }
}

fn close() -> (Boxed<Reply>, bool) {
    (futures::future::ready(Reply::None).boxed_local(), true)
}

/// Decodes one request and dispatches it. Everything that must happen in arrival order (produce
/// appends, cross-shard sends) happens before this returns.
async fn handle(shard: &Rc<Shard>, frame: BytesMut, peer: Option<SocketAddr>) -> (Boxed<Reply>, bool) {
    let started = Instant::now();
    let (ctx, body_offset) = match codec::decode_header(&frame) {
        Ok(parsed) => parsed,
        Err(e) => {
            tracing::warn!(shard = shard.id, "kafka: closing connection: {e}");
            return close();
        }
    };
    if let Err(e) = versions::check(ctx.api_key_raw, ctx.version) {
        if ctx.api_key == Some(ApiKey::ApiVersions) {
            // KIP-511: a client newer than the broker sends ApiVersions at a version the broker
            // does not know; the answer is a v0 response with UNSUPPORTED_VERSION and the table.
            return (futures::future::ready(versions::unsupported_api_versions(&ctx)).boxed_local(), false);
        }
        tracing::warn!(
            shard = shard.id,
            client = ctx.client_id.as_deref().unwrap_or(""),
            cid = ctx.correlation_id,
            "kafka: closing connection: {e}"
        );
        return close();
    }
    let Some(api) = ctx.api_key else { return close() };
    let span = tracing::trace_span!("kafka_request", shard = shard.id, cid = ctx.correlation_id, api = ?api, version = ctx.version);
    if api == ApiKey::Produce {
        // Produce slices the client's batches out of the frame itself, without copying them.
        let (reply, close) = produce::produce(shard, ctx, frame, body_offset).await;
        return (finish(api, started, reply).instrument(span).boxed_local(), close);
    }
    let mut body = frame.freeze().slice(body_offset..);
    let reply = match dispatch(shard, ctx, api, &mut body, peer).await {
        Ok(reply) => reply,
        Err(message) => {
            tracing::warn!(shard = shard.id, api = ?api, "kafka: closing connection: malformed request: {message}");
            return close();
        }
    };
    (finish(api, started, reply).instrument(span).boxed_local(), false)
}

async fn finish(api: ApiKey, started: Instant, reply: Boxed<Reply>) -> Reply {
    let reply = reply.await;
    let closed = matches!(reply, Reply::Close(_));
    let label = crate::metrics::Api {
        family: crate::metrics::Family::Kafka,
        key: api as u16,
        name: metrics_label(api),
    };
    crate::metrics::request_done(label, started, closed);
    tracing::trace!(?api, elapsed_us = started.elapsed().as_micros() as u64, "replied");
    reply
}

/// The `api` label of a Kafka request in the metrics.
fn metrics_label(api: ApiKey) -> &'static str {
    match api {
        ApiKey::Produce => "kafka_produce",
        ApiKey::Fetch => "kafka_fetch",
        ApiKey::ListOffsets => "kafka_list_offsets",
        ApiKey::Metadata => "kafka_metadata",
        ApiKey::OffsetCommit => "kafka_offset_commit",
        ApiKey::OffsetFetch => "kafka_offset_fetch",
        ApiKey::FindCoordinator => "kafka_find_coordinator",
        ApiKey::JoinGroup => "kafka_join_group",
        ApiKey::Heartbeat => "kafka_heartbeat",
        ApiKey::LeaveGroup => "kafka_leave_group",
        ApiKey::SyncGroup => "kafka_sync_group",
        ApiKey::DescribeGroups => "kafka_describe_groups",
        ApiKey::ListGroups => "kafka_list_groups",
        ApiKey::ApiVersions => "kafka_api_versions",
        ApiKey::CreateTopics => "kafka_create_topics",
        ApiKey::DeleteTopics => "kafka_delete_topics",
        ApiKey::InitProducerId => "kafka_init_producer_id",
        ApiKey::DescribeConfigs => "kafka_describe_configs",
        ApiKey::CreatePartitions => "kafka_create_partitions",
        ApiKey::DeleteGroups => "kafka_delete_groups",
        ApiKey::OffsetForLeaderEpoch => "kafka_offset_for_leader_epoch",
        _ => "kafka_other",
    }
}

fn decode<T: Decodable>(body: &mut Bytes, ctx: &RequestContext) -> Result<T, String> {
    T::decode(body, ctx.version).map_err(|e| format!("API {} v{}: {e}", ctx.api_key_raw, ctx.version))
}

async fn dispatch(
    shard: &Rc<Shard>,
    ctx: RequestContext,
    api: ApiKey,
    body: &mut Bytes,
    peer: Option<SocketAddr>,
) -> Result<Boxed<Reply>, String> {
    Ok(match api {
        ApiKey::ApiVersions => {
            let _: kafka_protocol::messages::ApiVersionsRequest = decode(body, &ctx)?;
            futures::future::ready(versions::api_versions(&ctx)).boxed_local()
        }
        ApiKey::Metadata => admin::metadata(shard, ctx.clone(), decode(body, &ctx)?).await,
        ApiKey::CreateTopics => admin::create_topics(shard, ctx.clone(), decode(body, &ctx)?).await,
        ApiKey::DeleteTopics => admin::delete_topics(shard, ctx.clone(), decode(body, &ctx)?).await,
        ApiKey::CreatePartitions => admin::create_partitions(shard, ctx.clone(), decode(body, &ctx)?).await,
        ApiKey::DescribeConfigs => admin::describe_configs(shard, ctx.clone(), decode(body, &ctx)?).await,
        ApiKey::Fetch => fetch::fetch(shard, ctx.clone(), decode(body, &ctx)?).await,
        ApiKey::ListOffsets => fetch::list_offsets(shard, ctx.clone(), decode(body, &ctx)?).await,
        ApiKey::OffsetForLeaderEpoch => {
            leader_epochs::offset_for_leader_epoch(shard, ctx.clone(), decode(body, &ctx)?).await
        }
        ApiKey::InitProducerId => {
            producer_ids::init_producer_id(shard, ctx.clone(), decode(body, &ctx)?).await
        }
        ApiKey::FindCoordinator => groups::find_coordinator(shard, ctx.clone(), decode(body, &ctx)?).await,
        ApiKey::JoinGroup => groups::join_group(shard, ctx.clone(), peer, decode(body, &ctx)?).await,
        ApiKey::SyncGroup => groups::sync_group(shard, ctx.clone(), decode(body, &ctx)?).await,
        ApiKey::Heartbeat => groups::heartbeat(shard, ctx.clone(), decode(body, &ctx)?).await,
        ApiKey::LeaveGroup => groups::leave_group(shard, ctx.clone(), decode(body, &ctx)?).await,
        ApiKey::OffsetCommit => groups::offset_commit(shard, ctx.clone(), decode(body, &ctx)?).await,
        ApiKey::OffsetFetch => groups::offset_fetch(shard, ctx.clone(), decode(body, &ctx)?).await,
        ApiKey::ListGroups => groups::list_groups(shard, ctx.clone(), decode(body, &ctx)?).await,
        ApiKey::DescribeGroups => groups::describe_groups(shard, ctx.clone(), decode(body, &ctx)?).await,
        ApiKey::DeleteGroups => groups::delete_groups(shard, ctx.clone(), decode(body, &ctx)?).await,
        other => return Err(format!("{other:?} is not served (versions::check lets it through)")),
    })
}
