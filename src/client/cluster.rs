//! The client's view of the cluster: metadata cache and connection pool.
//!
//! Owns: topic → partitions → owning shard → that shard's direct endpoint, and one pooled
//! connection per endpoint. Refreshed when a caller reports stale ownership or a dead connection.
//! Control plane only: the mutex here is taken per request, never per record.

use std::collections::HashMap;
use std::sync::Arc;

use flatbuffers::{FlatBufferBuilder, UnionWIPOffset, WIPOffset};
use tokio::sync::Mutex;

use super::admin::{
    Durability, ListedOffset, OffsetSpec, PartitionInfo, ReplicaInfo, TopicDescription, TopicSettings,
};
use super::connection::{Connection, ResponseFrame};
use super::error::{ClientError, Result};
use super::ClientConfig;
use crate::protocol::wire;

/// Tries of a topic change while the controller's leader moves, and the pause between them
/// while no leader is known.
const CONTROLLER_ATTEMPTS: u32 = 20;
const CONTROLLER_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(250);
/// The first pause before a topic change refused as `ClusterForming` is sent again, doubling up
/// to the second: the broker answered so only after waiting itself (`replication_timeout_ms`),
/// and the nodes of a cluster just started register within seconds of electing a controller.
const FORMING_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(200);
const FORMING_RETRY_PAUSE_MAX: std::time::Duration = std::time::Duration::from_secs(2);

pub(crate) struct Cluster {
    config: ClientConfig,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    bootstrap: Option<Connection>,
    /// shard → "host:port" of its direct listener.
    endpoints: HashMap<u32, String>,
    topics: HashMap<String, Arc<TopicDescription>>,
    pool: HashMap<String, Connection>,
}

/// What a MetadataResponse says, decoded into owned values.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct MetadataReply {
    pub shards: Vec<(u32, String, u16)>,
    /// The controller leader's native address (a cluster only).
    pub controller: Option<String>,
    pub topics: Vec<std::result::Result<TopicDescription, (String, wire::ErrorCode, String)>>,
}

impl Cluster {
    pub fn new(config: ClientConfig) -> Cluster {
        Cluster { config, state: Mutex::new(State::default()) }
    }

    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// The connection to the bootstrap address, reconnecting if it closed.
    pub async fn bootstrap(&self) -> Result<Connection> {
        let mut state = self.state.lock().await;
        if let Some(conn) = &state.bootstrap {
            if !conn.is_closed() {
                return Ok(conn.clone());
            }
        }
        let conn =
            Connection::connect(&self.config.bootstrap, &self.config.client_id, self.config.request_timeout)
                .await?;
        state.bootstrap = Some(conn.clone());
        Ok(conn)
    }

    /// Asks for metadata of `topics` (every topic if empty) and refreshes the cache with it.
    /// One result per topic, in the broker's order.
    pub async fn metadata(&self, topics: &[&str]) -> Result<Vec<Result<TopicDescription>>> {
        let conn = self.bootstrap().await?;
        let frame = conn.request(|fbb| encode_metadata_request(fbb, topics), Vec::new()).await?;
        let reply = decode_metadata_response(&conn, &frame)?;
        let mut state = self.state.lock().await;
        for (shard, host, port) in &reply.shards {
            let addr = endpoint_addr(&self.config.bootstrap, host, *port);
            state.endpoints.insert(*shard, addr);
        }
        let mut out = Vec::with_capacity(reply.topics.len());
        for topic in reply.topics {
            match topic {
                Ok(description) => {
                    state.topics.insert(description.name.clone(), Arc::new(description.clone()));
                    out.push(Ok(description));
                }
                Err((name, code, message)) => {
                    state.topics.remove(&name);
                    out.push(Err(if code == wire::ErrorCode::UnknownTopicOrPartition {
                        ClientError::UnknownTopic { topic: name }
                    } else {
                        ClientError::broker(format!("metadata for topic {name:?}"), code, Some(&message))
                    }));
                }
            }
        }
        Ok(out)
    }

    /// The topic's metadata, from the cache or the broker.
    pub async fn topic(&self, name: &str) -> Result<Arc<TopicDescription>> {
        if let Some(t) = self.state.lock().await.topics.get(name) {
            return Ok(t.clone());
        }
        self.metadata(&[name])
            .await?
            .into_iter()
            .next()
            .unwrap_or_else(|| Err(ClientError::UnknownTopic { topic: name.to_owned() }))?;
        self.state
            .lock()
            .await
            .topics
            .get(name)
            .cloned()
            .ok_or_else(|| ClientError::UnknownTopic { topic: name.to_owned() })
    }

    /// Sends a topic change (`to_controller`), and sends it again while the broker answers
    /// `ClusterForming`: the cluster's nodes just started and too few have registered with the
    /// controller for the replication factor, and nothing was changed, so a later try succeeds
    /// once they have. Stops once `request_timeout` has passed since the first try and returns
    /// the last answer, whose message names the nodes not registered. Returns the connection that
    /// answered and its response.
    pub async fn controller_request<F>(&self, context: &str, encode: F) -> Result<(Connection, ResponseFrame)>
    where
        F: Fn(&mut FlatBufferBuilder<'static>) -> (wire::RequestBody, WIPOffset<UnionWIPOffset>) + Copy,
    {
        let give_up = tokio::time::Instant::now() + self.config.request_timeout;
        let mut pause = FORMING_RETRY_PAUSE;
        loop {
            let (conn, frame) = self.to_controller(context, encode).await?;
            let forming = frame.response().is_ok_and(|r| r.error() == wire::ErrorCode::ClusterForming);
            if !forming || tokio::time::Instant::now() + pause >= give_up {
                return Ok((conn, frame));
            }
            tracing::debug!(context, "the cluster is still forming; sending the change again in {pause:?}");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(FORMING_RETRY_PAUSE_MAX);
        }
    }

    /// Sends a topic change: to the bootstrap node, and when that node does not lead the
    /// controller, to the node the metadata names as the controller's leader (retrying while an
    /// election settles).
    async fn to_controller<F>(&self, context: &str, encode: F) -> Result<(Connection, ResponseFrame)>
    where
        F: Fn(&mut FlatBufferBuilder<'static>) -> (wire::RequestBody, WIPOffset<UnionWIPOffset>) + Copy,
    {
        let mut conn = self.bootstrap().await?;
        let mut attempt = 1;
        loop {
            let frame = conn.request(encode, Vec::new()).await?;
            let not_controller = frame.response().is_ok_and(|r| r.error() == wire::ErrorCode::NotController);
            if !not_controller || attempt == CONTROLLER_ATTEMPTS {
                return Ok((conn, frame));
            }
            attempt += 1;
            let bootstrap = self.bootstrap().await?;
            let asked = bootstrap.request(|fbb| encode_metadata_request(fbb, &[]), Vec::new()).await?;
            match decode_metadata_response(&bootstrap, &asked)?.controller {
                Some(addr) => {
                    tracing::debug!(context, controller = %addr, "sending to the controller's leader");
                    conn = self.connection_to(&addr).await?;
                }
                None => tokio::time::sleep(CONTROLLER_RETRY_PAUSE).await,
            }
        }
    }

    /// A pooled connection to `addr`.
    async fn connection_to(&self, addr: &str) -> Result<Connection> {
        let mut state = self.state.lock().await;
        if let Some(conn) = state.pool.get(addr) {
            if !conn.is_closed() {
                return Ok(conn.clone());
            }
        }
        let conn = Connection::connect(addr, &self.config.client_id, self.config.request_timeout).await?;
        state.pool.insert(addr.to_owned(), conn.clone());
        Ok(conn)
    }

    /// Forgets the topic's metadata, so the next lookup asks the broker.
    pub async fn invalidate(&self, name: &str) {
        self.state.lock().await.topics.remove(name);
    }

    /// The connection to the direct endpoint of the shard that owns the partition. Falls back to
    /// the bootstrap connection (the broker then routes internally) if the owner's endpoint is
    /// unknown or unreachable.
    pub async fn owner(&self, topic: &str, partition: u32) -> Result<Connection> {
        let description = self.topic(topic).await?;
        let Some(info) = description.partitions.iter().find(|p| p.partition == partition) else {
            return Err(ClientError::UnknownPartition {
                topic: topic.to_owned(),
                partition,
                partitions: description.partitions.len() as u32,
            });
        };
        // A replicated partition is served by its leader's node (which routes to its shard).
        if let Some(replication) = &info.replication {
            let Some(addr) = replication.leader_address.clone() else {
                return Err(ClientError::broker(
                    format!("{topic}/{partition}"),
                    wire::ErrorCode::NotLeader,
                    Some("no leader is known yet"),
                ));
            };
            return self.connection_to(&addr).await;
        }
        let mut state = self.state.lock().await;
        let Some(addr) = state.endpoints.get(&info.shard).cloned() else {
            drop(state);
            return self.bootstrap().await;
        };
        if let Some(conn) = state.pool.get(&addr) {
            if !conn.is_closed() {
                return Ok(conn.clone());
            }
        }
        match Connection::connect(&addr, &self.config.client_id, self.config.request_timeout).await {
            Ok(conn) => {
                state.pool.insert(addr, conn.clone());
                Ok(conn)
            }
            Err(e) => {
                tracing::warn!(shard = info.shard, error = %e, "owner endpoint unreachable; using bootstrap");
                state.endpoints.remove(&info.shard);
                drop(state);
                self.bootstrap().await
            }
        }
    }

    /// Looks up one offset on the partition's owner, refreshing metadata once if it moved.
    pub async fn list_offsets(&self, topic: &str, partition: u32, spec: OffsetSpec) -> Result<ListedOffset> {
        let mut attempt = 0;
        loop {
            let result = self.list_offsets_once(topic, partition, spec).await;
            match result {
                Err(e) if attempt == 0 && e.invalidates_metadata() => {
                    self.invalidate(topic).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn list_offsets_once(&self, topic: &str, partition: u32, spec: OffsetSpec) -> Result<ListedOffset> {
        let conn = self.owner(topic, partition).await?;
        let frame = conn
            .request(
                |fbb| {
                    let partitions = [wire::ListOffsetsPartition::create(
                        fbb,
                        &wire::ListOffsetsPartitionArgs { partition, timestamp: spec.wire_timestamp() },
                    )];
                    let partitions = fbb.create_vector(&partitions);
                    let name = fbb.create_string(topic);
                    let topics = [wire::ListOffsetsTopic::create(
                        fbb,
                        &wire::ListOffsetsTopicArgs { name: Some(name), partitions: Some(partitions) },
                    )];
                    let topics = fbb.create_vector(&topics);
                    let body = wire::ListOffsetsRequest::create(
                        fbb,
                        &wire::ListOffsetsRequestArgs { topics: Some(topics) },
                    );
                    (wire::RequestBody::ListOffsetsRequest, body.as_union_value())
                },
                Vec::new(),
            )
            .await?;
        let context = format!("list offsets of {topic}/{partition}");
        let response = conn.check_response(&frame, &context)?;
        let body = response.body_as_list_offsets_response().ok_or_else(|| {
            ClientError::protocol(conn.addr(), "list offsets answered with another response type")
        })?;
        let result = body
            .topics()
            .iter()
            .flat_map(|v| v.iter())
            .filter(|t| t.name() == Some(topic))
            .flat_map(|t| t.partitions().into_iter().flat_map(|v| v.iter()))
            .find(|p| p.partition() == partition)
            .ok_or_else(|| {
                ClientError::protocol(conn.addr(), format!("{context}: partition missing from response"))
            })?;
        if result.error() != wire::ErrorCode::None {
            return Err(ClientError::broker(context, result.error(), result.message()));
        }
        Ok(ListedOffset { offset: result.offset(), timestamp_ms: result.timestamp() })
    }
}

pub(crate) fn encode_metadata_request(
    fbb: &mut flatbuffers::FlatBufferBuilder<'static>,
    topics: &[&str],
) -> (wire::RequestBody, flatbuffers::WIPOffset<flatbuffers::UnionWIPOffset>) {
    let names: Vec<_> = topics.iter().map(|t| fbb.create_string(t)).collect();
    let names = fbb.create_vector(&names);
    let body = wire::MetadataRequest::create(fbb, &wire::MetadataRequestArgs { topics: Some(names) });
    (wire::RequestBody::MetadataRequest, body.as_union_value())
}

pub(crate) fn decode_metadata_response(conn: &Connection, frame: &ResponseFrame) -> Result<MetadataReply> {
    let response = conn.check_response(frame, "metadata")?;
    let body = response
        .body_as_metadata_response()
        .ok_or_else(|| ClientError::protocol(conn.addr(), "metadata answered with another response type"))?;
    Ok(metadata_reply(body))
}

pub(crate) fn metadata_reply(body: wire::MetadataResponse<'_>) -> MetadataReply {
    let shards = body
        .shards()
        .iter()
        .flat_map(|v| v.iter())
        .map(|s| (s.shard(), s.host().unwrap_or_default().to_owned(), s.port()))
        .collect();
    let topics = body
        .topics()
        .iter()
        .flat_map(|v| v.iter())
        .map(|t| {
            let name = t.name().unwrap_or_default().to_owned();
            if t.error() != wire::ErrorCode::None {
                return Err((name, t.error(), t.message().unwrap_or_default().to_owned()));
            }
            let mut partitions: Vec<PartitionInfo> =
                t.partitions().iter().flat_map(|v| v.iter()).map(partition_info).collect();
            partitions.sort_by_key(|p| p.partition);
            let config = t
                .config()
                .map(|c| TopicSettings {
                    retention_bytes: c.retention_bytes(),
                    retention_ms: c.retention_ms(),
                    segment_bytes: c.segment_bytes(),
                    segment_ms: c.segment_ms(),
                    durability: c.durability().and_then(Durability::from_wire),
                })
                .unwrap_or_default();
            Ok(TopicDescription { name, partitions, config })
        })
        .collect();
    MetadataReply { shards, topics, controller: body.controller_address().map(str::to_owned) }
}

pub(crate) fn partition_info(p: wire::PartitionMetadata<'_>) -> PartitionInfo {
    PartitionInfo {
        partition: p.partition(),
        shard: p.shard(),
        log_start_offset: p.log_start_offset(),
        high_watermark: p.high_watermark(),
        replication: p.replicas().map(|replicas| ReplicaInfo {
            replicas: replicas.iter().collect(),
            leader: Some(p.leader()).filter(|&id| id != 0),
            leader_epoch: p.leader_epoch(),
            leader_address: p.leader_address().map(str::to_owned),
            isr: p.isr().map(|isr| isr.iter().collect()).unwrap_or_default(),
        }),
    }
}

/// "host:port" of a shard's listener. A broker bound to a wildcard address advertises it as is;
/// the host the client reached for bootstrap is then the one to use.
pub(crate) fn endpoint_addr(bootstrap: &str, host: &str, port: u16) -> String {
    let host = match host {
        "" | "0.0.0.0" | "::" | "[::]" => bootstrap_host(bootstrap),
        h => h,
    };
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn bootstrap_host(bootstrap: &str) -> &str {
    let host = bootstrap.rsplit_once(':').map_or(bootstrap, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_addresses() {
        assert_eq!(endpoint_addr("broker1:9292", "10.0.0.5", 9300), "10.0.0.5:9300");
        assert_eq!(endpoint_addr("broker1:9292", "0.0.0.0", 9300), "broker1:9300");
        assert_eq!(endpoint_addr("broker1:9292", "", 9301), "broker1:9301");
        assert_eq!(endpoint_addr("[::1]:9292", "::", 9301), "[::1]:9301");
        assert_eq!(endpoint_addr("b:9292", "fe80::1", 9301), "[fe80::1]:9301");
    }

    #[test]
    fn metadata_response_decodes() {
        let mut fbb = flatbuffers::FlatBufferBuilder::new();
        let host = fbb.create_string("127.0.0.1");
        let shards = [wire::ShardEndpoint::create(
            &mut fbb,
            &wire::ShardEndpointArgs { shard: 1, host: Some(host), port: 9301 },
        )];
        let shards = fbb.create_vector(&shards);
        let parts: Vec<_> = [(1u32, 1u32, 0i64, 10i64), (0, 0, 5, 7)]
            .iter()
            .map(|&(partition, shard, log_start_offset, high_watermark)| {
                wire::PartitionMetadata::create(
                    &mut fbb,
                    &wire::PartitionMetadataArgs {
                        partition,
                        shard,
                        log_start_offset,
                        high_watermark,
                        ..Default::default()
                    },
                )
            })
            .collect();
        let parts = fbb.create_vector(&parts);
        let config = wire::TopicConfig::create(
            &mut fbb,
            &wire::TopicConfigArgs {
                retention_ms: Some(1000),
                durability: Some(wire::Durability::Fsync),
                ..Default::default()
            },
        );
        let name = fbb.create_string("orders");
        let ok = wire::TopicMetadata::create(
            &mut fbb,
            &wire::TopicMetadataArgs {
                name: Some(name),
                partitions: Some(parts),
                config: Some(config),
                ..Default::default()
            },
        );
        let name = fbb.create_string("missing");
        let message = fbb.create_string("no such topic");
        let missing = wire::TopicMetadata::create(
            &mut fbb,
            &wire::TopicMetadataArgs {
                name: Some(name),
                error: wire::ErrorCode::UnknownTopicOrPartition,
                message: Some(message),
                ..Default::default()
            },
        );
        let topics = fbb.create_vector(&[ok, missing]);
        let body = wire::MetadataResponse::create(
            &mut fbb,
            &wire::MetadataResponseArgs { shards: Some(shards), topics: Some(topics), ..Default::default() },
        );
        let response = wire::Response::create(
            &mut fbb,
            &wire::ResponseArgs {
                correlation_id: 9,
                body_type: wire::ResponseBody::MetadataResponse,
                body: Some(body.as_union_value()),
                ..Default::default()
            },
        );
        fbb.finish(response, None);
        let response = flatbuffers::root_with_opts::<wire::Response>(
            &crate::protocol::verifier_options(),
            fbb.finished_data(),
        )
        .unwrap();
        let reply = metadata_reply(response.body_as_metadata_response().unwrap());
        assert_eq!(reply.shards, vec![(1, "127.0.0.1".to_owned(), 9301)]);
        assert_eq!(
            reply.topics[0],
            Ok(TopicDescription {
                name: "orders".into(),
                partitions: vec![
                    PartitionInfo {
                        partition: 0,
                        shard: 0,
                        log_start_offset: 5,
                        high_watermark: 7,
                        replication: None
                    },
                    PartitionInfo {
                        partition: 1,
                        shard: 1,
                        log_start_offset: 0,
                        high_watermark: 10,
                        replication: None
                    },
                ],
                config: TopicSettings {
                    retention_ms: Some(1000),
                    durability: Some(Durability::Fsync),
                    ..Default::default()
                },
            })
        );
        assert_eq!(
            reply.topics[1],
            Err(("missing".into(), wire::ErrorCode::UnknownTopicOrPartition, "no such topic".into()))
        );
    }

    #[test]
    fn metadata_request_round_trips_through_a_frame() {
        let head =
            super::super::connection::encode_request(42, 0, |fbb| encode_metadata_request(fbb, &["a", "b"]));
        let mut buf = bytes::BytesMut::from(&head[..]);
        let frame = crate::protocol::frame::split_frame(&mut buf, 1 << 20).unwrap().unwrap();
        assert!(frame.payload.is_empty());
        let request =
            flatbuffers::root_with_opts::<wire::Request>(&crate::protocol::verifier_options(), &frame.header)
                .unwrap();
        assert_eq!(request.correlation_id(), 42);
        assert_eq!(request.version(), crate::protocol::PROTOCOL_VERSION);
        let topics: Vec<&str> =
            request.body_as_metadata_request().unwrap().topics().unwrap().iter().collect();
        assert_eq!(topics, vec!["a", "b"]);
    }
}
