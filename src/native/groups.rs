//! Consumer-group requests on the wire: decode them into `groups::messages`, run them on the
//! group's coordinator (`groups::execute`), encode the replies.
//!
//! Owns: the mapping between the FlatBuffers group messages and the coordinator's values, and
//! where errors go: a failure of the whole request (unknown member, stale generation, rebalance in
//! progress, group not empty, ...) is the response's `error` with a message; failures of single
//! partitions (OffsetCommit, OffsetFetch, ResetOffsets) are reported per partition.
//! Error codes come from the protocol's one table (`errors`). May depend on `groups`, `shard`
//! (FindCoordinator's endpoint; a cluster's coordinator is the leader of the group's
//! `__consumer_offsets` partition), `metadata`, `cluster` (the shard hosting replicas) and
//! `protocol`; never on storage.

use std::rc::Rc;

use flatbuffers::{FlatBufferBuilder, ForwardsUOffset, Vector, WIPOffset};
use futures::future::FutureExt;

use super::errors::group_code;
use super::{error_response, respond, Boxed, Reply};
use crate::groups::messages::*;
use crate::groups::{self};
use crate::metadata::OFFSETS_TOPIC;
use crate::protocol::wire::{self, ErrorCode, RequestBody, ResponseBody};
use crate::shard::Shard;

/// The group request types this module answers.
pub const GROUP_APIS: &[RequestBody] = &[
    RequestBody::FindCoordinatorRequest,
    RequestBody::JoinGroupRequest,
    RequestBody::SyncGroupRequest,
    RequestBody::HeartbeatRequest,
    RequestBody::LeaveGroupRequest,
    RequestBody::OffsetCommitRequest,
    RequestBody::OffsetFetchRequest,
    RequestBody::ListGroupsRequest,
    RequestBody::DescribeGroupRequest,
    RequestBody::DeleteGroupRequest,
    RequestBody::ResetOffsetsRequest,
];

pub fn handles(body: RequestBody) -> bool {
    GROUP_APIS.contains(&body)
}

fn ready(reply: Reply) -> Boxed<Reply> {
    futures::future::ready(reply).boxed_local()
}

fn fail(cid: u32, e: &GroupError) -> Reply {
    Reply::Frame(error_response(cid, group_code(e), &e.to_string()))
}

fn missing_body(cid: u32) -> Boxed<Reply> {
    ready(Reply::Frame(error_response(cid, ErrorCode::InvalidRequest, "request has no body")))
}

fn strings(v: Option<Vector<'_, ForwardsUOffset<&str>>>) -> Vec<String> {
    v.iter().flatten().map(str::to_string).collect()
}

fn topic_partitions(
    v: Option<Vector<'_, ForwardsUOffset<wire::TopicPartitions<'_>>>>,
) -> Vec<TopicPartitions> {
    v.iter()
        .flatten()
        .map(|tp| (tp.topic().unwrap_or_default().to_string(), tp.partitions().iter().flatten().collect()))
        .collect()
}

/// Decodes and runs one group request; the returned future encodes the reply.
pub fn handle(shard: &Rc<Shard>, cid: u32, request: wire::Request<'_>) -> Boxed<Reply> {
    if request.body_type() == RequestBody::FindCoordinatorRequest {
        let Some(r) = request.body_as_find_coordinator_request() else { return missing_body(cid) };
        let group_id = r.group_id().unwrap_or_default();
        return match groups::coordinator_of(shard, group_id) {
            Err(e) => ready(fail(cid, &e)),
            Ok((partition, owner)) if shard.is_replicated(OFFSETS_TOPIC) => {
                cluster_coordinator(shard.clone(), cid, partition, owner).boxed_local()
            }
            Ok((_, owner)) => ready(find_coordinator(shard, cid, owner)),
        };
    }
    let decoded = match decode(request) {
        Some(r) => r,
        None => return missing_body(cid),
    };
    let asked = request.body_type();
    let shard = shard.clone();
    async move {
        match groups::execute(&shard, decoded).await {
            Ok(reply) => encode(cid, asked, reply),
            Err(e) => fail(cid, &e),
        }
    }
    .boxed_local()
}

/// A single node: the coordinator shard's own endpoint.
fn find_coordinator(shard: &Rc<Shard>, cid: u32, owner: u32) -> Reply {
    let Some(addr) = shard.endpoints.get(owner as usize) else {
        let e = GroupError::CoordinatorNotAvailable(format!("shard {owner} has no endpoint"));
        return fail(cid, &e);
    };
    coordinator_reply(cid, owner, &addr.ip().to_string(), addr.port())
}

/// A cluster: the native listener of the node leading the group's offsets partition (which
/// routes the group's requests to the shard hosting its replica), and that shard as this node
/// places it (`owner`; the same on a node with as many shards).
async fn cluster_coordinator(shard: Rc<Shard>, cid: u32, partition: u32, owner: u32) -> Reply {
    let leaders = shard.replicated_leaders(OFFSETS_TOPIC.into()).await;
    let address = leaders.get(partition as usize).and_then(|view| view.native.clone());
    let Some((host, port)) = address.as_deref().and_then(|a| a.rsplit_once(':')) else {
        let e = GroupError::CoordinatorNotAvailable(format!(
            "{OFFSETS_TOPIC} partition {partition} has no leader yet"
        ));
        return fail(cid, &e);
    };
    let Ok(port) = port.parse::<u16>() else {
        let e = GroupError::CoordinatorNotAvailable(format!("the leader's address {address:?} has no port"));
        return fail(cid, &e);
    };
    coordinator_reply(cid, owner, host.trim_matches(['[', ']']), port)
}

fn coordinator_reply(cid: u32, shard: u32, host: &str, port: u16) -> Reply {
    let mut fbb = FlatBufferBuilder::with_capacity(128);
    let host = fbb.create_string(host);
    let body = wire::FindCoordinatorResponse::create(
        &mut fbb,
        &wire::FindCoordinatorResponseArgs { shard, host: Some(host), port },
    );
    respond(fbb, cid, ResponseBody::FindCoordinatorResponse, body.as_union_value(), Vec::new())
}

fn decode(request: wire::Request<'_>) -> Option<GroupRequest> {
    let text = |s: Option<&str>| s.unwrap_or_default().to_string();
    Some(match request.body_type() {
        RequestBody::JoinGroupRequest => {
            let r = request.body_as_join_group_request()?;
            GroupRequest::Join(JoinRequest {
                group_id: text(r.group_id()),
                member_id: text(r.member_id()),
                client_id: text(r.client_id()),
                session_timeout_ms: r.session_timeout_ms(),
                rebalance_timeout_ms: r.rebalance_timeout_ms(),
                protocol_type: text(r.protocol_type()),
                topics: strings(r.topics()),
                protocols: r
                    .protocols()
                    .iter()
                    .flatten()
                    .map(|p| (text(p.name()), p.metadata().map(|m| m.bytes().to_vec()).unwrap_or_default()))
                    .collect(),
                server_assignment: r.server_assignment(),
                context: Default::default(),
            })
        }
        RequestBody::SyncGroupRequest => {
            let r = request.body_as_sync_group_request()?;
            GroupRequest::Sync(SyncRequest {
                group_id: text(r.group_id()),
                generation: r.generation_id(),
                member_id: text(r.member_id()),
                assignments: r
                    .assignments()
                    .iter()
                    .flatten()
                    .map(|a| MemberAssignment {
                        member_id: text(a.member_id()),
                        partitions: topic_partitions(a.partitions()),
                        user_data: a.user_data().map(|u| u.bytes().to_vec()).unwrap_or_default(),
                        assignment_bytes: None,
                    })
                    .collect(),
            })
        }
        RequestBody::HeartbeatRequest => {
            let r = request.body_as_heartbeat_request()?;
            GroupRequest::Heartbeat(MemberRef {
                group_id: text(r.group_id()),
                generation: r.generation_id(),
                member_id: text(r.member_id()),
            })
        }
        RequestBody::LeaveGroupRequest => {
            let r = request.body_as_leave_group_request()?;
            GroupRequest::Leave { group_id: text(r.group_id()), member_id: text(r.member_id()) }
        }
        RequestBody::OffsetCommitRequest => {
            let r = request.body_as_offset_commit_request()?;
            let mut partitions = Vec::new();
            for t in r.topics().iter().flatten() {
                for p in t.partitions().iter().flatten() {
                    partitions.push(CommitPartition {
                        topic: text(t.name()),
                        partition: p.partition(),
                        offset: p.offset(),
                        metadata: text(p.metadata()),
                    });
                }
            }
            GroupRequest::Commit(CommitRequest {
                member: MemberRef {
                    group_id: text(r.group_id()),
                    generation: r.generation_id(),
                    member_id: text(r.member_id()),
                },
                partitions,
            })
        }
        RequestBody::OffsetFetchRequest => {
            let r = request.body_as_offset_fetch_request()?;
            GroupRequest::FetchOffsets(OffsetFetchRequest {
                group_id: text(r.group_id()),
                topics: topic_partitions(r.topics()),
            })
        }
        RequestBody::ListGroupsRequest => {
            request.body_as_list_groups_request()?;
            GroupRequest::ListLocal
        }
        RequestBody::DescribeGroupRequest => {
            GroupRequest::Describe { group_id: text(request.body_as_describe_group_request()?.group_id()) }
        }
        RequestBody::DeleteGroupRequest => {
            GroupRequest::Delete { group_id: text(request.body_as_delete_group_request()?.group_id()) }
        }
        RequestBody::ResetOffsetsRequest => {
            let r = request.body_as_reset_offsets_request()?;
            GroupRequest::Reset(ResetRequest {
                group_id: text(r.group_id()),
                topic: text(r.topic()),
                partitions: r.partitions().iter().flatten().collect(),
                target: match r.offset() {
                    Some(o) => ResetTarget::Offset(o),
                    None => ResetTarget::Timestamp(r.timestamp()),
                },
            })
        }
        _ => return None,
    })
}

fn encode_topic_partitions<'a>(
    fbb: &mut FlatBufferBuilder<'a>,
    list: &[TopicPartitions],
) -> WIPOffset<Vector<'a, ForwardsUOffset<wire::TopicPartitions<'a>>>> {
    let items: Vec<_> = list
        .iter()
        .map(|(topic, partitions)| {
            let topic = fbb.create_string(topic);
            let partitions = fbb.create_vector(partitions);
            wire::TopicPartitions::create(
                fbb,
                &wire::TopicPartitionsArgs { topic: Some(topic), partitions: Some(partitions) },
            )
        })
        .collect();
    fbb.create_vector(&items)
}

/// Rows grouped by topic, keeping the order in which topics first appear.
fn by_topic<T>(rows: Vec<T>, topic: impl Fn(&T) -> &str) -> Vec<(String, Vec<T>)> {
    let mut out: Vec<(String, Vec<T>)> = Vec::new();
    for row in rows {
        let name = topic(&row).to_string();
        match out.iter_mut().find(|(t, _)| *t == name) {
            Some((_, list)) => list.push(row),
            None => out.push((name, vec![row])),
        }
    }
    out
}

fn encode_offsets<'a>(
    fbb: &mut FlatBufferBuilder<'a>,
    rows: Vec<PartitionOffset>,
) -> WIPOffset<Vector<'a, ForwardsUOffset<wire::OffsetFetchTopic<'a>>>> {
    let topics: Vec<_> = by_topic(rows, |r| &r.topic)
        .into_iter()
        .map(|(name, rows)| {
            let parts: Vec<_> = rows
                .iter()
                .map(|r| {
                    let metadata = fbb.create_string(&r.metadata);
                    let (error, message) = match &r.error {
                        Some(e) => (group_code(e), Some(fbb.create_string(&e.to_string()))),
                        None => (ErrorCode::None, None),
                    };
                    wire::OffsetFetchPartition::create(
                        fbb,
                        &wire::OffsetFetchPartitionArgs {
                            partition: r.partition,
                            offset: r.offset,
                            metadata: Some(metadata),
                            log_end_offset: r.log_end_offset,
                            lag: r.lag,
                            error,
                            message,
                        },
                    )
                })
                .collect();
            let partitions = fbb.create_vector(&parts);
            let name = fbb.create_string(&name);
            wire::OffsetFetchTopic::create(
                fbb,
                &wire::OffsetFetchTopicArgs { name: Some(name), partitions: Some(partitions) },
            )
        })
        .collect();
    fbb.create_vector(&topics)
}

fn encode(cid: u32, asked: RequestBody, reply: GroupReply) -> Reply {
    let mut fbb = FlatBufferBuilder::with_capacity(512);
    let (body_type, body) = match reply {
        GroupReply::Join(r) => {
            let members: Vec<_> = r
                .members
                .iter()
                .map(|m| {
                    let member_id = fbb.create_string(&m.member_id);
                    let client_id = fbb.create_string(&m.client_id);
                    let topics: Vec<_> = m.topics.iter().map(|t| fbb.create_string(t)).collect();
                    let topics = fbb.create_vector(&topics);
                    let metadata = fbb.create_vector(&m.metadata);
                    wire::JoinGroupMember::create(
                        &mut fbb,
                        &wire::JoinGroupMemberArgs {
                            member_id: Some(member_id),
                            client_id: Some(client_id),
                            topics: Some(topics),
                            metadata: Some(metadata),
                        },
                    )
                })
                .collect();
            let members = fbb.create_vector(&members);
            let protocol = fbb.create_string(&r.protocol);
            let leader_id = fbb.create_string(&r.leader_id);
            let member_id = fbb.create_string(&r.member_id);
            let body = wire::JoinGroupResponse::create(
                &mut fbb,
                &wire::JoinGroupResponseArgs {
                    generation_id: r.generation,
                    protocol: Some(protocol),
                    leader_id: Some(leader_id),
                    member_id: Some(member_id),
                    members: Some(members),
                },
            );
            (ResponseBody::JoinGroupResponse, body.as_union_value())
        }
        GroupReply::Sync(r) => {
            let partitions = encode_topic_partitions(&mut fbb, &r.partitions);
            let user_data = fbb.create_vector(&r.user_data);
            let body = wire::SyncGroupResponse::create(
                &mut fbb,
                &wire::SyncGroupResponseArgs { partitions: Some(partitions), user_data: Some(user_data) },
            );
            (ResponseBody::SyncGroupResponse, body.as_union_value())
        }
        // Heartbeat, LeaveGroup and DeleteGroup: an empty body of the request's own type.
        GroupReply::Done => match asked {
            RequestBody::HeartbeatRequest => {
                let body = wire::HeartbeatResponse::create(&mut fbb, &wire::HeartbeatResponseArgs {});
                (ResponseBody::HeartbeatResponse, body.as_union_value())
            }
            RequestBody::LeaveGroupRequest => {
                let body = wire::LeaveGroupResponse::create(&mut fbb, &wire::LeaveGroupResponseArgs {});
                (ResponseBody::LeaveGroupResponse, body.as_union_value())
            }
            _ => {
                let body = wire::DeleteGroupResponse::create(&mut fbb, &wire::DeleteGroupResponseArgs {});
                (ResponseBody::DeleteGroupResponse, body.as_union_value())
            }
        },
        GroupReply::Commit(results) => {
            let topics: Vec<_> = by_topic(results, |r| &r.0)
                .into_iter()
                .map(|(name, rows)| {
                    let parts: Vec<_> = rows
                        .iter()
                        .map(|(_, partition, verdict)| {
                            let (error, message) = match verdict {
                                Some(e) => (group_code(e), Some(fbb.create_string(&e.to_string()))),
                                None => (ErrorCode::None, None),
                            };
                            wire::PartitionResult::create(
                                &mut fbb,
                                &wire::PartitionResultArgs { partition: *partition, error, message },
                            )
                        })
                        .collect();
                    let partitions = fbb.create_vector(&parts);
                    let name = fbb.create_string(&name);
                    wire::TopicResult::create(
                        &mut fbb,
                        &wire::TopicResultArgs { name: Some(name), partitions: Some(partitions) },
                    )
                })
                .collect();
            let topics = fbb.create_vector(&topics);
            let body = wire::OffsetCommitResponse::create(
                &mut fbb,
                &wire::OffsetCommitResponseArgs { topics: Some(topics) },
            );
            (ResponseBody::OffsetCommitResponse, body.as_union_value())
        }
        GroupReply::Offsets(rows) if asked == RequestBody::ResetOffsetsRequest => {
            let topics = encode_offsets(&mut fbb, rows);
            let body = wire::ResetOffsetsResponse::create(
                &mut fbb,
                &wire::ResetOffsetsResponseArgs { topics: Some(topics) },
            );
            (ResponseBody::ResetOffsetsResponse, body.as_union_value())
        }
        GroupReply::Offsets(rows) => {
            let topics = encode_offsets(&mut fbb, rows);
            let body = wire::OffsetFetchResponse::create(
                &mut fbb,
                &wire::OffsetFetchResponseArgs { topics: Some(topics) },
            );
            (ResponseBody::OffsetFetchResponse, body.as_union_value())
        }
        GroupReply::Describe(d) => {
            let members: Vec<_> = d
                .members
                .iter()
                .map(|m| {
                    let member_id = fbb.create_string(&m.member_id);
                    let client_id = fbb.create_string(&m.client_id);
                    let assignment = encode_topic_partitions(&mut fbb, &m.assignment);
                    wire::GroupMemberDescription::create(
                        &mut fbb,
                        &wire::GroupMemberDescriptionArgs {
                            member_id: Some(member_id),
                            client_id: Some(client_id),
                            assignment: Some(assignment),
                        },
                    )
                })
                .collect();
            let members = fbb.create_vector(&members);
            let group_id = fbb.create_string(&d.group_id);
            let state = fbb.create_string(d.state);
            let protocol_type = fbb.create_string(&d.protocol_type);
            let protocol = fbb.create_string(&d.protocol);
            let leader_id = fbb.create_string(&d.leader_id);
            let body = wire::DescribeGroupResponse::create(
                &mut fbb,
                &wire::DescribeGroupResponseArgs {
                    group_id: Some(group_id),
                    state: Some(state),
                    protocol_type: Some(protocol_type),
                    protocol: Some(protocol),
                    generation_id: d.generation,
                    leader_id: Some(leader_id),
                    members: Some(members),
                },
            );
            (ResponseBody::DescribeGroupResponse, body.as_union_value())
        }
        GroupReply::List(groups) => {
            let listings: Vec<_> = groups
                .iter()
                .map(|g| {
                    let group_id = fbb.create_string(&g.group_id);
                    let state = fbb.create_string(g.state);
                    let protocol_type = fbb.create_string(&g.protocol_type);
                    wire::GroupListing::create(
                        &mut fbb,
                        &wire::GroupListingArgs {
                            group_id: Some(group_id),
                            state: Some(state),
                            protocol_type: Some(protocol_type),
                            members: g.members,
                        },
                    )
                })
                .collect();
            let groups = fbb.create_vector(&listings);
            let body = wire::ListGroupsResponse::create(
                &mut fbb,
                &wire::ListGroupsResponseArgs { groups: Some(groups) },
            );
            (ResponseBody::ListGroupsResponse, body.as_union_value())
        }
    };
    respond(fbb, cid, body_type, body, Vec::new())
}
