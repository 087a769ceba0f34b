//! Kafka consumer-group APIs (FindCoordinator, JoinGroup, SyncGroup, Heartbeat, LeaveGroup,
//! OffsetCommit, OffsetFetch, ListGroups, DescribeGroups, DeleteGroups), mapped onto the group
//! coordinators in `crate::groups`, so Kafka and native consumers share the same groups.
//!
//! Owns: the translation between the Kafka messages and `groups::messages`, and the Kafka-facing
//! choices:
//! - A single node coordinates every group: FindCoordinator answers this node at the advertised
//!   Kafka endpoint, and each request is routed internally to the coordinator shard
//!   (`groups::execute`); a shard that cannot serve (shutting down, `__consumer_offsets`
//!   unwritable) answers COORDINATOR_NOT_AVAILABLE, which clients retry. In a cluster the
//!   coordinator is the node leading the group's `__consumer_offsets` partition: FindCoordinator
//!   names it (COORDINATOR_NOT_AVAILABLE while the partition has no leader or the topic is not
//!   created yet), another node answers NOT_COORDINATOR, and a new leader still replaying the
//!   partition COORDINATOR_LOAD_IN_PROGRESS.
//! - Kafka members assign partitions themselves (`server_assignment = false`): the leader gets
//!   every member's protocol metadata byte for byte, and each member gets back exactly the bytes
//!   the leader sent for it. The consumer-protocol subscription and assignment inside those bytes
//!   are decoded best effort (bounded reader below) only to show topics and partitions to
//!   DescribeGroups, `ringlog group describe` and native members of a mixed group.
//! - KIP-394, as Kafka: from JoinGroup v4, a join with an empty member id (and no group instance
//!   id) is answered MEMBER_ID_REQUIRED with a new member id, which the coordinator keeps pending
//!   for the session timeout; the member joins by coming back with it. Up to v3 the new member
//!   joins at once and gets its id with the join's answer.
//! - Static membership (`group_instance_id`, v5+) is not supported: such members are treated as
//!   dynamic, and a LeaveGroup naming only an instance id answers UNKNOWN_MEMBER_ID.
//! - DescribeGroups shows each member's client host as Kafka does (`/` and the connection's peer
//!   IP); members that joined through the native protocol have none.
//!
//! Decoding and validation happen before the handler returns; the coordinator round trip (which
//! may park for a whole rebalance) runs in the reply future, which the connection polls in
//! request order, so requests on one connection reach their coordinator in arrival order.
//! May depend on `groups`, `shard`, `server` (replies), `config`, `metadata` and `cluster` (where a
//! cluster's coordinator listens); never on storage.

use std::net::SocketAddr;
use std::rc::Rc;

use bytes::{BufMut, Bytes, BytesMut};
use futures::future::FutureExt;
use futures::StreamExt;
use kafka_protocol::messages::consumer_protocol_assignment::TopicPartition as AssignedPartitions;
use kafka_protocol::messages::delete_groups_response::DeletableGroupResult;
use kafka_protocol::messages::describe_groups_response::{DescribedGroup, DescribedGroupMember};
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::list_groups_response::ListedGroup;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponsePartition, OffsetFetchResponseTopic,
};
use kafka_protocol::messages::{
    BrokerId, ConsumerProtocolAssignment, DeleteGroupsRequest, DeleteGroupsResponse, DescribeGroupsRequest,
    DescribeGroupsResponse, FindCoordinatorRequest, FindCoordinatorResponse, GroupId, HeartbeatRequest,
    HeartbeatResponse, JoinGroupRequest, JoinGroupResponse, LeaveGroupRequest, LeaveGroupResponse,
    ListGroupsRequest, ListGroupsResponse, OffsetCommitRequest, OffsetCommitResponse, OffsetFetchRequest,
    OffsetFetchResponse, SyncGroupRequest, SyncGroupResponse, TopicName,
};
use kafka_protocol::protocol::{Encodable, StrBytes};
use kafka_protocol::ResponseError as K;

use super::codec::{respond, RequestContext};
use super::errors::{commit_code, group_code};
use crate::config::TOPIC_NAME_BYTES_MAX;
use crate::groups::messages::OffsetFetchRequest as CoordinatorOffsetFetch;
use crate::groups::messages::*;
use crate::groups::state::GroupState;
use crate::groups::{self, GROUP_ID_BYTES_MAX, OFFSET_METADATA_BYTES_MAX};
use crate::metadata::OFFSETS_TOPIC;
use crate::server::{Boxed, Reply};
use crate::shard::Shard;

/// The protocol type of Kafka consumers (and of the native client's groups).
const CONSUMER_PROTOCOL_TYPE: &str = "consumer";
/// FindCoordinator key types.
const KEY_TYPE_GROUP: i8 = 0;
const KEY_TYPE_TRANSACTION: i8 = 1;
/// The state DescribeGroups reports for a group that does not exist (Kafka's answer up to v5).
const DEAD_STATE: &str = "Dead";

fn text(s: impl Into<String>) -> StrBytes {
    StrBytes::from_string(s.into())
}

fn ready(reply: Reply) -> Boxed<Reply> {
    futures::future::ready(reply).boxed_local()
}

/// Runs `request` on its group's coordinator and takes the reply `want` expects.
async fn run<T>(
    shard: &Rc<Shard>,
    request: GroupRequest,
    want: impl FnOnce(GroupReply) -> Option<T>,
) -> Result<T, GroupError> {
    let reply = groups::execute(shard, request).await?;
    want(reply).ok_or_else(|| {
        tracing::error!("kafka: the group coordinator answered with another kind of reply than asked");
        GroupError::CoordinatorNotAvailable("the coordinator gave an unexpected reply".into())
    })
}

fn done(reply: GroupReply) -> Option<()> {
    matches!(reply, GroupReply::Done).then_some(())
}

/// The node leading offsets partition `partition` of a cluster, at its Kafka listener.
async fn cluster_coordinator(shard: &Rc<Shard>, partition: u32) -> Result<(i32, String, u16), (i16, String)> {
    let unavailable = |why: String| (K::CoordinatorNotAvailable.code(), why);
    let leaders = shard.replicated_leaders(OFFSETS_TOPIC.into()).await;
    let leader = leaders
        .get(partition as usize)
        .and_then(|view| view.leader)
        .ok_or_else(|| unavailable(format!("{} partition {partition} has no leader yet", OFFSETS_TOPIC)))?;
    let view =
        crate::cluster::kafka_view(shard).await.ok_or_else(|| unavailable("not in a cluster".into()))?;
    let kafka = view.nodes.iter().find(|n| n.id == leader).and_then(|n| n.kafka.clone());
    let (host, port) = kafka
        .and_then(|address| super::parse_host_port(&address).ok())
        .ok_or_else(|| unavailable(format!("node {leader} has no Kafka listener")))?;
    let node = i32::try_from(leader).map_err(|_| unavailable(format!("node id {leader} exceeds Kafka's")))?;
    Ok((node, host, port))
}

/// Kafka has no bound on client ids; the coordinator stores at most `GROUP_ID_BYTES_MAX` bytes.
fn client_id(ctx: &RequestContext) -> String {
    let mut id = ctx.client_id.clone().unwrap_or_default();
    if id.len() > GROUP_ID_BYTES_MAX {
        let mut end = GROUP_ID_BYTES_MAX;
        while !id.is_char_boundary(end) {
            end -= 1;
        }
        id.truncate(end);
    }
    id
}

/// The client's address as Kafka's DescribeGroups shows it: Java's `InetAddress.toString()` of an
/// address without a resolved host name, `/` then the IP.
fn client_host(peer: Option<SocketAddr>) -> String {
    peer.map(|p| format!("/{}", p.ip().to_canonical())).unwrap_or_default()
}

// ---- FindCoordinator -----------------------------------------------------------------------------

pub(super) async fn find_coordinator(
    shard: &Rc<Shard>,
    ctx: RequestContext,
    request: FindCoordinatorRequest,
) -> Boxed<Reply> {
    let found = match request.key_type {
        KEY_TYPE_GROUP => match groups::coordinator_of(shard, &request.key) {
            Err(e) => Err((group_code(&e), e.to_string())),
            Ok((partition, _)) if shard.is_replicated(OFFSETS_TOPIC) => {
                cluster_coordinator(shard, partition).await
            }
            Ok(_) => match shard.kafka_endpoint.get().cloned() {
                Some((host, port)) => Ok((super::admin::node_id(&shard.config), host, port)),
                None => Err((
                    K::CoordinatorNotAvailable.code(),
                    "the Kafka listener has no advertised address".to_string(),
                )),
            },
        },
        // No transactions yet. COORDINATOR_NOT_AVAILABLE would be retried by the client until its
        // own timeout (librdkafka: init_transactions waits it out); this code is fatal in every
        // client, so the application learns at once, with the message.
        KEY_TYPE_TRANSACTION => Err((
            K::TransactionalIdAuthorizationFailed.code(),
            "transactions are not supported by this broker (ringlog has no transaction coordinator yet)"
                .to_string(),
        )),
        other => Err((K::InvalidRequest.code(), format!("unknown coordinator key type {other}"))),
    };
    let response = match found {
        Ok((node, host, port)) => FindCoordinatorResponse::default()
            .with_node_id(BrokerId(node))
            .with_host(text(host))
            .with_port(i32::from(port)),
        Err((code, message)) => FindCoordinatorResponse::default()
            .with_error_code(code)
            .with_error_message(Some(text(message)))
            .with_node_id(BrokerId(-1))
            .with_port(-1),
    };
    ready(respond(&ctx, &response))
}

// ---- JoinGroup / SyncGroup -----------------------------------------------------------------------

pub(super) async fn join_group(
    shard: &Rc<Shard>,
    ctx: RequestContext,
    peer: Option<SocketAddr>,
    request: JoinGroupRequest,
) -> Boxed<Reply> {
    let protocol_type = request.protocol_type.to_string();
    let member_id = request.member_id.to_string();
    if let Some(instance) = &request.group_instance_id {
        tracing::debug!(group = %request.group_id.0, instance = %instance, "kafka: static membership is not supported; joining as a dynamic member");
    }
    // Kafka refuses a join without a protocol type or protocols before looking at the group.
    if protocol_type.is_empty() || request.protocols.is_empty() {
        let response = join_error(&ctx, K::InconsistentGroupProtocol.code(), &member_id);
        return ready(respond(&ctx, &response));
    }
    // A negative timeout is never valid: 0 is below any minimum, so the coordinator refuses it.
    let session_timeout_ms = u32::try_from(request.session_timeout_ms).unwrap_or(0);
    // v0 has no rebalance timeout: the session timeout bounds the rebalance, as in Kafka.
    let rebalance_timeout_ms = match ctx.version {
        0 => session_timeout_ms,
        _ => u32::try_from(request.rebalance_timeout_ms).unwrap_or(session_timeout_ms),
    };
    let protocols: Vec<(String, Vec<u8>)> =
        request.protocols.iter().map(|p| (p.name.to_string(), p.metadata.to_vec())).collect();
    let topics = match protocol_type.as_str() {
        CONSUMER_PROTOCOL_TYPE => protocols
            .iter()
            .find_map(|(_, md)| consumer_protocol::subscription_topics(md))
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    let join = JoinRequest {
        group_id: request.group_id.to_string(),
        member_id: member_id.clone(),
        client_id: client_id(&ctx),
        session_timeout_ms,
        rebalance_timeout_ms,
        protocol_type: protocol_type.clone(),
        topics,
        protocols,
        server_assignment: false,
        context: JoinContext {
            client_host: client_host(peer),
            require_known_member_id: ctx.version >= 4 && request.group_instance_id.is_none(),
        },
    };
    let shard = shard.clone();
    async move {
        let joined = run(&shard, GroupRequest::Join(join), |r| match r {
            GroupReply::Join(r) => Some(r),
            _ => None,
        })
        .await;
        let response = match joined {
            Ok(r) => {
                let members = r
                    .members
                    .into_iter()
                    .map(|m| {
                        // A native member sends no consumer-protocol metadata: a Kafka leader
                        // still needs its subscription to assign it partitions.
                        let metadata = if m.metadata.is_empty() && protocol_type == CONSUMER_PROTOCOL_TYPE {
                            consumer_protocol::encode_subscription(&m.topics)
                        } else {
                            m.metadata
                        };
                        JoinGroupResponseMember::default()
                            .with_member_id(text(m.member_id))
                            .with_metadata(Bytes::from(metadata))
                    })
                    .collect();
                JoinGroupResponse::default()
                    .with_generation_id(r.generation)
                    .with_protocol_type(Some(text(protocol_type)))
                    .with_protocol_name(Some(text(r.protocol)))
                    .with_leader(text(r.leader_id))
                    .with_member_id(text(r.member_id))
                    .with_members(members)
            }
            Err(e) => {
                tracing::debug!("kafka: JoinGroup: {e}");
                // KIP-394: MEMBER_ID_REQUIRED carries the id the member must join with.
                let member_id = match &e {
                    GroupError::MemberIdRequired { member, .. } => member,
                    _ => &member_id,
                };
                join_error(&ctx, group_code(&e), member_id)
            }
        };
        respond(&ctx, &response)
    }
    .boxed_local()
}

fn join_error(ctx: &RequestContext, code: i16, member_id: &str) -> JoinGroupResponse {
    // The protocol name is nullable only from v7: older versions get an empty one.
    let protocol_name = (ctx.version < 7).then(StrBytes::default);
    JoinGroupResponse::default()
        .with_error_code(code)
        .with_generation_id(-1)
        .with_protocol_name(protocol_name)
        .with_member_id(text(member_id))
}

pub(super) async fn sync_group(
    shard: &Rc<Shard>,
    ctx: RequestContext,
    request: SyncGroupRequest,
) -> Boxed<Reply> {
    let assignments = request
        .assignments
        .iter()
        .map(|a| {
            let bytes = a.assignment.to_vec();
            let (partitions, user_data) = consumer_protocol::decode_assignment(&bytes).unwrap_or_default();
            MemberAssignment {
                member_id: a.member_id.to_string(),
                partitions,
                user_data,
                assignment_bytes: Some(bytes),
            }
        })
        .collect();
    let sync = SyncRequest {
        group_id: request.group_id.to_string(),
        generation: request.generation_id,
        member_id: request.member_id.to_string(),
        assignments,
    };
    // v5 names the protocol the member joined with; a member of the current generation (the only
    // one a sync succeeds for) joined with the group's, so echoing it back is consistent.
    let (protocol_type, protocol_name) = (request.protocol_type, request.protocol_name);
    let shard = shard.clone();
    async move {
        let synced = run(&shard, GroupRequest::Sync(sync), |r| match r {
            GroupReply::Sync(r) => Some(r),
            _ => None,
        })
        .await;
        let response = match synced {
            Ok(r) => {
                let assignment = match r.assignment_bytes {
                    Some(bytes) => bytes,
                    // The leader left this member out: Kafka answers with no bytes.
                    None if r.partitions.is_empty() && r.user_data.is_empty() => Vec::new(),
                    // Assigned by a native leader: the Kafka consumer needs its protocol's bytes.
                    None => consumer_protocol::encode_assignment(&r.partitions, &r.user_data),
                };
                SyncGroupResponse::default()
                    .with_protocol_type(protocol_type)
                    .with_protocol_name(protocol_name)
                    .with_assignment(Bytes::from(assignment))
            }
            Err(e) => {
                tracing::debug!("kafka: SyncGroup: {e}");
                SyncGroupResponse::default().with_error_code(group_code(&e))
            }
        };
        respond(&ctx, &response)
    }
    .boxed_local()
}

// ---- Heartbeat / LeaveGroup ----------------------------------------------------------------------

pub(super) async fn heartbeat(
    shard: &Rc<Shard>,
    ctx: RequestContext,
    request: HeartbeatRequest,
) -> Boxed<Reply> {
    let member = MemberRef {
        group_id: request.group_id.to_string(),
        generation: request.generation_id,
        member_id: request.member_id.to_string(),
    };
    let shard = shard.clone();
    async move {
        let code = match run(&shard, GroupRequest::Heartbeat(member), done).await {
            Ok(()) => 0,
            Err(e) => group_code(&e),
        };
        respond(&ctx, &HeartbeatResponse::default().with_error_code(code))
    }
    .boxed_local()
}

pub(super) async fn leave_group(
    shard: &Rc<Shard>,
    ctx: RequestContext,
    request: LeaveGroupRequest,
) -> Boxed<Reply> {
    let group_id = request.group_id.to_string();
    let shard = shard.clone();
    if ctx.version < 3 {
        let leave = GroupRequest::Leave { group_id, member_id: request.member_id.to_string() };
        return async move {
            let code = match run(&shard, leave, done).await {
                Ok(()) => 0,
                Err(e) => group_code(&e),
            };
            respond(&ctx, &LeaveGroupResponse::default().with_error_code(code))
        }
        .boxed_local();
    }
    async move {
        let mut members = Vec::with_capacity(request.members.len());
        let mut top_level = 0;
        for m in request.members {
            let code = if m.member_id.is_empty() {
                // Only an instance id: static members are not supported, so it names no member.
                K::UnknownMemberId.code()
            } else {
                let leave =
                    GroupRequest::Leave { group_id: group_id.clone(), member_id: m.member_id.to_string() };
                match run(&shard, leave, done).await {
                    Ok(()) => 0,
                    Err(e @ GroupError::UnknownMember { .. }) => group_code(&e),
                    // Not about this member (invalid group id, coordinator unavailable): the
                    // whole request fails, as in Kafka.
                    Err(e) => {
                        top_level = group_code(&e);
                        break;
                    }
                }
            };
            members.push(
                MemberResponse::default()
                    .with_member_id(m.member_id)
                    .with_group_instance_id(m.group_instance_id)
                    .with_error_code(code),
            );
        }
        let response = match top_level {
            0 => LeaveGroupResponse::default().with_members(members),
            code => LeaveGroupResponse::default().with_error_code(code),
        };
        respond(&ctx, &response)
    }
    .boxed_local()
}

// ---- OffsetCommit / OffsetFetch ------------------------------------------------------------------

/// A topic's partitions in request order, each with its code if it was refused before reaching
/// the coordinator.
type TopicVerdicts = (TopicName, Vec<(i32, Option<i16>)>);

pub(super) async fn offset_commit(
    shard: &Rc<Shard>,
    ctx: RequestContext,
    request: OffsetCommitRequest,
) -> Boxed<Reply> {
    // Per partition: its code if refused here, or None if it goes to the coordinator, whose
    // results come back in the order the partitions were sent.
    let mut slots: Vec<TopicVerdicts> = Vec::with_capacity(request.topics.len());
    let mut partitions = Vec::new();
    for topic in request.topics {
        let mut row = Vec::with_capacity(topic.partitions.len());
        for p in topic.partitions {
            let metadata = p.committed_metadata.map(|m| m.to_string()).unwrap_or_default();
            let verdict = match u32::try_from(p.partition_index) {
                Err(_) => Some(K::UnknownTopicOrPartition.code()),
                Ok(_) if metadata.len() > OFFSET_METADATA_BYTES_MAX => Some(K::OffsetMetadataTooLarge.code()),
                Ok(partition) => {
                    partitions.push(CommitPartition {
                        topic: topic.name.to_string(),
                        partition,
                        offset: p.committed_offset,
                        metadata,
                    });
                    None
                }
            };
            row.push((p.partition_index, verdict));
        }
        slots.push((topic.name, row));
    }
    // Kafka takes a commit without a generation from anyone while the group is empty, whatever
    // member id it names; the coordinator recognizes such commits by an empty member id.
    let generation = request.generation_id_or_member_epoch;
    let member_id = if generation < 0 { String::new() } else { request.member_id.to_string() };
    let commit = CommitRequest {
        member: MemberRef { group_id: request.group_id.to_string(), generation, member_id },
        partitions,
    };
    let shard = shard.clone();
    async move {
        let codes: Vec<i16> = if commit.partitions.is_empty() {
            Vec::new()
        } else {
            let sent = commit.partitions.len();
            let committed = run(&shard, GroupRequest::Commit(commit), |r| match r {
                GroupReply::Commit(results) => Some(results),
                _ => None,
            })
            .await;
            match committed {
                Ok(results) => {
                    results.into_iter().map(|(_, _, e)| e.as_ref().map_or(0, commit_code)).collect()
                }
                Err(e) => {
                    tracing::debug!("kafka: OffsetCommit: {e}");
                    let code = match e {
                        // Kafka: commits without a generation need an empty group; otherwise the
                        // committer is not a member.
                        GroupError::NotEmpty { .. } => K::UnknownMemberId.code(),
                        e => group_code(&e),
                    };
                    vec![code; sent]
                }
            }
        };
        let mut codes = codes.into_iter();
        let topics = slots
            .into_iter()
            .map(|(name, row)| {
                let partitions = row
                    .into_iter()
                    .map(|(index, verdict)| {
                        // The coordinator answers every row it is sent; any it did not is failed
                        // retriably rather than reported as committed.
                        let code = verdict
                            .or_else(|| codes.next())
                            .unwrap_or_else(|| K::CoordinatorNotAvailable.code());
                        OffsetCommitResponsePartition::default()
                            .with_partition_index(index)
                            .with_error_code(code)
                    })
                    .collect();
                OffsetCommitResponseTopic::default().with_name(name).with_partitions(partitions)
            })
            .collect();
        respond(&ctx, &OffsetCommitResponse::default().with_topics(topics))
    }
    .boxed_local()
}

pub(super) async fn offset_fetch(
    shard: &Rc<Shard>,
    ctx: RequestContext,
    request: OffsetFetchRequest,
) -> Boxed<Reply> {
    // `require_stable` (v7) is accepted as is: without transactions no offset is ever pending.
    let group_id = request.group_id.to_string();
    // Partitions named with a negative index cannot exist; they are answered here.
    let mut invalid: Vec<(String, i32)> = Vec::new();
    let asked: Option<Vec<TopicPartitions>> = request.topics.map(|topics| {
        topics
            .into_iter()
            .filter_map(|t| {
                let name = t.name.to_string();
                let mut partitions = Vec::with_capacity(t.partition_indexes.len());
                for p in t.partition_indexes {
                    match u32::try_from(p) {
                        Ok(p) => partitions.push(p),
                        Err(_) => invalid.push((name.clone(), p)),
                    }
                }
                // To the coordinator an empty list means the whole topic; to Kafka, nothing.
                (!partitions.is_empty()).then_some((name, partitions))
            })
            .collect()
    });
    let version = ctx.version;
    let shard = shard.clone();
    async move {
        let rows = match &asked {
            Some(topics) if topics.is_empty() => Ok(Vec::new()),
            _ => {
                let fetch = CoordinatorOffsetFetch { group_id, topics: asked.clone().unwrap_or_default() };
                run(&shard, GroupRequest::FetchOffsets(fetch), |r| match r {
                    GroupReply::Offsets(rows) => Some(rows),
                    _ => None,
                })
                .await
            }
        };
        let partition = |index: i32, offset: i64, metadata: String, code: i16| {
            OffsetFetchResponsePartition::default()
                .with_partition_index(index)
                .with_committed_offset(offset)
                .with_metadata(Some(text(metadata)))
                .with_error_code(code)
        };
        let mut topics: Vec<OffsetFetchResponseTopic> = Vec::new();
        let mut add = |topic: String, p: OffsetFetchResponsePartition| match topics
            .iter_mut()
            .find(|t| *t.name.0 == *topic)
        {
            Some(t) => t.partitions.push(p),
            None => topics.push(
                OffsetFetchResponseTopic::default()
                    .with_name(TopicName(text(topic)))
                    .with_partitions(vec![p]),
            ),
        };
        let mut top_level = 0;
        match rows {
            Ok(rows) => {
                for r in rows {
                    let code = r.error.as_ref().map_or(0, group_code);
                    let index = i32::try_from(r.partition).unwrap_or(i32::MAX);
                    add(r.topic, partition(index, r.offset, r.metadata, code));
                }
            }
            Err(e) if version >= 2 => {
                tracing::debug!("kafka: OffsetFetch: {e}");
                top_level = group_code(&e);
            }
            // v1 has no top-level error: every partition asked for carries it.
            Err(e) => {
                let code = group_code(&e);
                for (topic, partitions) in asked.unwrap_or_default() {
                    for p in partitions {
                        let index = i32::try_from(p).unwrap_or(i32::MAX);
                        add(topic.clone(), partition(index, -1, String::new(), code));
                    }
                }
            }
        }
        if top_level == 0 {
            for (topic, index) in invalid {
                add(topic, partition(index, -1, String::new(), K::UnknownTopicOrPartition.code()));
            }
        }
        respond(&ctx, &OffsetFetchResponse::default().with_topics(topics).with_error_code(top_level))
    }
    .boxed_local()
}

// ---- ListGroups / DescribeGroups / DeleteGroups --------------------------------------------------

pub(super) async fn list_groups(
    shard: &Rc<Shard>,
    ctx: RequestContext,
    request: ListGroupsRequest,
) -> Boxed<Reply> {
    let states: Vec<String> = request.states_filter.iter().map(|s| s.to_lowercase()).collect();
    let shard = shard.clone();
    async move {
        let listed = run(&shard, GroupRequest::ListLocal, |r| match r {
            GroupReply::List(groups) => Some(groups),
            _ => None,
        })
        .await;
        let response = match listed {
            Ok(groups) => {
                let groups = groups
                    .into_iter()
                    .filter(|g| states.is_empty() || states.contains(&g.state.to_lowercase()))
                    .map(|g| {
                        ListedGroup::default()
                            .with_group_id(GroupId(text(g.group_id)))
                            .with_protocol_type(text(g.protocol_type))
                            .with_group_state(text(g.state))
                    })
                    .collect();
                ListGroupsResponse::default().with_groups(groups)
            }
            Err(e) => ListGroupsResponse::default().with_error_code(group_code(&e)),
        };
        respond(&ctx, &response)
    }
    .boxed_local()
}

/// Groups of one DescribeGroups or DeleteGroups request in flight at once: each costs a
/// coordinator round trip's state, so a request naming tens of thousands of groups is worked
/// through in bounded memory instead of all at once.
const GROUPS_IN_FLIGHT_MAX: usize = 64;

/// Most groups one DescribeGroups or DeleteGroups may name (Kafka sets none; real clients name
/// a handful). Past it the answer alone would cost hundreds of bytes per one-byte name, so the
/// request is refused with a log line and the connection closed.
const GROUPS_PER_REQUEST_MAX: usize = 10_000;

/// `Some(close)` when a request names more groups than [`GROUPS_PER_REQUEST_MAX`].
fn too_many_groups(shard: &Shard, ctx: &RequestContext, groups: usize) -> Option<Boxed<Reply>> {
    if groups <= GROUPS_PER_REQUEST_MAX {
        return None;
    }
    tracing::warn!(
        shard = shard.id,
        client = ctx.client_id.as_deref().unwrap_or(""),
        api = ?ctx.api_key,
        groups,
        "kafka: closing connection: request names more than {GROUPS_PER_REQUEST_MAX} groups"
    );
    let close = Reply::Close(crate::server::ResponseFrame { head: Vec::new(), payload: Vec::new() });
    Some(futures::future::ready(close).boxed_local())
}

pub(super) async fn describe_groups(
    shard: &Rc<Shard>,
    ctx: RequestContext,
    request: DescribeGroupsRequest,
) -> Boxed<Reply> {
    if let Some(close) = too_many_groups(shard, &ctx, request.groups.len()) {
        return close;
    }
    let shard = shard.clone();
    async move {
        let described: Vec<_> = futures::stream::iter(request.groups.iter().map(|g| {
            let describe = GroupRequest::Describe { group_id: g.to_string() };
            run(&shard, describe, |r| match r {
                GroupReply::Describe(d) => Some(d),
                _ => None,
            })
        }))
        .buffered(GROUPS_IN_FLIGHT_MAX)
        .collect()
        .await;
        let groups =
            request.groups.into_iter().zip(described).map(|(id, d)| described_group(id, d)).collect();
        respond(&ctx, &DescribeGroupsResponse::default().with_groups(groups))
    }
    .boxed_local()
}

fn described_group(group_id: GroupId, described: Result<GroupDescription, GroupError>) -> DescribedGroup {
    let d = match described {
        Ok(d) => d,
        // Up to v5, Kafka describes a group it does not know as Dead, without an error.
        Err(GroupError::NotFound { .. }) => {
            return DescribedGroup::default().with_group_id(group_id).with_group_state(text(DEAD_STATE))
        }
        Err(e) => return DescribedGroup::default().with_group_id(group_id).with_error_code(group_code(&e)),
    };
    // As Kafka: protocol, metadata and assignments only once a rebalance has completed.
    let stable = d.state == GroupState::Stable.name();
    let consumer = d.protocol_type == CONSUMER_PROTOCOL_TYPE;
    let members = d
        .members
        .into_iter()
        .map(|m| {
            let member = DescribedGroupMember::default()
                .with_member_id(text(m.member_id))
                .with_client_id(text(m.client_id))
                .with_client_host(text(m.client_host));
            if !stable {
                return member;
            }
            let assignment = match m.assignment_bytes {
                Some(bytes) => bytes,
                // A native member's server-side assignment, shown as a Kafka consumer's would be.
                None if consumer => consumer_protocol::encode_assignment(&m.assignment, &[]),
                None => Vec::new(),
            };
            member
                .with_member_metadata(Bytes::from(m.metadata))
                .with_member_assignment(Bytes::from(assignment))
        })
        .collect();
    DescribedGroup::default()
        .with_group_id(group_id)
        .with_group_state(text(d.state))
        .with_protocol_type(text(d.protocol_type))
        .with_protocol_data(text(if stable { d.protocol } else { String::new() }))
        .with_members(members)
}

pub(super) async fn delete_groups(
    shard: &Rc<Shard>,
    ctx: RequestContext,
    request: DeleteGroupsRequest,
) -> Boxed<Reply> {
    if let Some(close) = too_many_groups(shard, &ctx, request.groups_names.len()) {
        return close;
    }
    let shard = shard.clone();
    async move {
        let deleted: Vec<_> = futures::stream::iter(
            request
                .groups_names
                .iter()
                .map(|g| run(&shard, GroupRequest::Delete { group_id: g.to_string() }, done)),
        )
        .buffered(GROUPS_IN_FLIGHT_MAX)
        .collect()
        .await;
        let results = request
            .groups_names
            .into_iter()
            .zip(deleted)
            .map(|(group_id, outcome)| {
                let code = match outcome {
                    Ok(()) => 0,
                    Err(e) => group_code(&e),
                };
                DeletableGroupResult::default().with_group_id(group_id).with_error_code(code)
            })
            .collect();
        respond(&ctx, &DeleteGroupsResponse::default().with_results(results))
    }
    .boxed_local()
}

/// Kafka's consumer protocol (ConsumerProtocolSubscription / ConsumerProtocolAssignment) inside
/// the opaque bytes of JoinGroup and SyncGroup. Decoding is ours, bounded by the bytes present:
/// the codec crate sizes vectors from the counts in the input before reading them, which a
/// member's metadata must not be able to turn into a huge allocation. Every version starts with
/// the fields read here (later versions append), so the version only has to be valid.
mod consumer_protocol {
    use super::*;

    struct Reader<'a>(&'a [u8]);

    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            if self.0.len() < n {
                return None;
            }
            let (head, rest) = self.0.split_at(n);
            self.0 = rest;
            Some(head)
        }

        fn i16(&mut self) -> Option<i16> {
            self.take(2).map(|b| i16::from_be_bytes([b[0], b[1]]))
        }

        fn i32(&mut self) -> Option<i32> {
            self.take(4).map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        }

        /// A non-null string that is a plausible topic name.
        fn topic(&mut self) -> Option<String> {
            let len = usize::try_from(self.i16()?).ok().filter(|&n| n <= TOPIC_NAME_BYTES_MAX)?;
            String::from_utf8(self.take(len)?.to_vec()).ok()
        }

        /// An array's element count, refused if that many elements of at least `element_bytes`
        /// each cannot fit in what is left.
        fn count(&mut self, element_bytes: usize) -> Option<usize> {
            let n = usize::try_from(self.i32()?).ok()?;
            (n <= self.0.len() / element_bytes).then_some(n)
        }

        /// Nullable bytes; null reads as empty.
        fn bytes(&mut self) -> Option<Vec<u8>> {
            match usize::try_from(self.i32()?) {
                Ok(n) => self.take(n).map(<[u8]>::to_vec),
                Err(_) => Some(Vec::new()),
            }
        }

        fn version(&mut self) -> Option<i16> {
            self.i16().filter(|v| *v >= 0)
        }
    }

    /// The topics of a subscription, or `None` if the bytes are not one.
    pub fn subscription_topics(metadata: &[u8]) -> Option<Vec<String>> {
        let mut r = Reader(metadata);
        r.version()?;
        (0..r.count(2)?).map(|_| r.topic()).collect()
    }

    /// The partitions and user data of an assignment, or `None` if the bytes are not one.
    pub fn decode_assignment(assignment: &[u8]) -> Option<(Vec<TopicPartitions>, Vec<u8>)> {
        let mut r = Reader(assignment);
        r.version()?;
        let topics = r.count(6)?;
        let mut partitions = Vec::with_capacity(topics);
        for _ in 0..topics {
            let topic = r.topic()?;
            let ids = (0..r.count(4)?)
                .map(|_| r.i32().and_then(|p| u32::try_from(p).ok()))
                .collect::<Option<_>>()?;
            partitions.push((topic, ids));
        }
        Some((partitions, r.bytes()?))
    }

    fn encode(message: &impl Encodable) -> Vec<u8> {
        let mut buf = BytesMut::with_capacity(64);
        buf.put_i16(0);
        match message.encode(&mut buf, 0) {
            Ok(()) => buf.to_vec(),
            Err(e) => {
                // Only strings longer than i16::MAX could fail, and topic names are far shorter.
                tracing::error!("kafka: cannot encode a consumer-protocol message: {e}");
                Vec::new()
            }
        }
    }

    /// A version-0 subscription to `topics`.
    pub fn encode_subscription(topics: &[String]) -> Vec<u8> {
        let topics = topics.iter().map(|t| text(t.clone())).collect();
        encode(&kafka_protocol::messages::ConsumerProtocolSubscription::default().with_topics(topics))
    }

    /// A version-0 assignment of `partitions`.
    pub fn encode_assignment(partitions: &[TopicPartitions], user_data: &[u8]) -> Vec<u8> {
        let assigned = partitions
            .iter()
            .map(|(topic, ids)| {
                AssignedPartitions::default()
                    .with_topic(TopicName(text(topic.clone())))
                    .with_partitions(ids.iter().filter_map(|&p| i32::try_from(p).ok()).collect())
            })
            .collect();
        let user_data = (!user_data.is_empty()).then(|| Bytes::copy_from_slice(user_data));
        encode(
            &ConsumerProtocolAssignment::default()
                .with_assigned_partitions(assigned)
                .with_user_data(user_data),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::consumer_protocol::*;
    use super::*;
    use kafka_protocol::messages::consumer_protocol_subscription::TopicPartition as OwnedPartitions;
    use kafka_protocol::messages::ConsumerProtocolSubscription;

    fn with_version(version: i16, message: &impl Encodable) -> Vec<u8> {
        let mut buf = BytesMut::new();
        buf.put_i16(version);
        message.encode(&mut buf, version).unwrap();
        buf.to_vec()
    }

    #[test]
    fn subscriptions_of_every_version_yield_their_topics() {
        let owned = OwnedPartitions::default().with_topic(TopicName(text("a"))).with_partitions(vec![0, 2]);
        let subscription = ConsumerProtocolSubscription::default()
            .with_topics(vec![text("a"), text("bé")])
            .with_user_data(Some(Bytes::from_static(b"xy")))
            .with_owned_partitions(vec![owned])
            .with_generation_id(7)
            .with_rack_id(Some(text("r1")));
        for version in 0..=3 {
            let bytes = with_version(version, &subscription);
            assert_eq!(
                subscription_topics(&bytes),
                Some(vec!["a".to_string(), "bé".to_string()]),
                "v{version}"
            );
        }
        // A version from the future keeps the known fields first.
        let mut future = with_version(3, &subscription);
        future[..2].copy_from_slice(&9i16.to_be_bytes());
        future.extend_from_slice(b"later fields");
        assert_eq!(subscription_topics(&future).map(|t| t.len()), Some(2));
        assert_eq!(
            subscription_topics(&encode_subscription(&["t".to_string()])),
            Some(vec!["t".to_string()])
        );
    }

    #[test]
    fn assignments_round_trip_and_bad_bytes_are_refused() {
        let partitions = vec![("t".to_string(), vec![0, 3]), ("u".to_string(), vec![])];
        let bytes = encode_assignment(&partitions, b"ud");
        assert_eq!(decode_assignment(&bytes), Some((partitions.clone(), b"ud".to_vec())));
        let crate_encoded = with_version(
            3,
            &ConsumerProtocolAssignment::default().with_assigned_partitions(vec![
                AssignedPartitions::default().with_topic(TopicName(text("t"))).with_partitions(vec![5]),
            ]),
        );
        assert_eq!(decode_assignment(&crate_encoded), Some((vec![("t".to_string(), vec![5])], vec![])));
        // Truncated anywhere: refused, never a panic.
        for cut in 0..bytes.len() {
            assert_eq!(decode_assignment(&bytes[..cut]), None, "cut at {cut}");
        }
        // Counts larger than the bytes could hold are refused before anything is allocated.
        let huge = [&0i16.to_be_bytes()[..], &i32::MAX.to_be_bytes()[..], b"tail"].concat();
        assert_eq!(decode_assignment(&huge), None);
        assert_eq!(subscription_topics(&huge), None);
        let negative_version = [&(-1i16).to_be_bytes()[..], &0i32.to_be_bytes()[..]].concat();
        assert_eq!(subscription_topics(&negative_version), None);
        let negative_partition = [
            &0i16.to_be_bytes()[..],
            &1i32.to_be_bytes(),
            &1i16.to_be_bytes(),
            b"t",
            &1i32.to_be_bytes(),
            &(-4i32).to_be_bytes(),
            &(-1i32).to_be_bytes(),
        ]
        .concat();
        assert_eq!(decode_assignment(&negative_partition), None);
    }
}
