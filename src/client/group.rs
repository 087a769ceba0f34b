//! Consumer-group requests: coordinator lookup, membership (join, sync, heartbeat, leave),
//! committed offsets, and group administration.
//!
//! Owns: encoding and decoding the group messages of `schema/ringlog.fbs` and their public data
//! types. Depends on `connection` and `cluster` (endpoint addresses) only.
//!
//! [`GroupCoordinator`] is one connection to the shard that runs a group's coordinator; it is the
//! membership API the `GroupConsumer` is built on, and the one tools use that need exact control
//! (their own assignment, or a chosen generation). The free functions take any connection: the
//! broker routes group requests to the coordinator shard itself, so admin calls simply use the
//! bootstrap connection.

use std::time::Duration;

use flatbuffers::{FlatBufferBuilder, ForwardsUOffset, Vector, WIPOffset};

use super::cluster::endpoint_addr;
use super::connection::Connection;
use super::error::{ClientError, Result};
use super::ClientConfig;
use crate::protocol::wire;

/// The protocol type every ringlog consumer joins with (Kafka's name for it).
pub const CONSUMER_PROTOCOL_TYPE: &str = "consumer";

/// The internal topic whose partitions' leaders coordinate a cluster's groups (the broker's
/// `metadata::OFFSETS_TOPIC`, which the client builds without).
pub(crate) const OFFSETS_TOPIC: &str = "__consumer_offsets";

/// Some partitions of one topic.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct TopicPartitions {
    pub topic: String,
    pub partitions: Vec<u32>,
}

/// What a member sends in JoinGroup.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    /// Empty on the first join: the coordinator assigns one.
    pub member_id: String,
    pub session_timeout: Duration,
    pub rebalance_timeout: Duration,
    /// The member's subscription.
    pub topics: Vec<String>,
    /// Assignor names with their (opaque) metadata, in order of preference.
    pub protocols: Vec<(String, Vec<u8>)>,
    /// Let the coordinator compute the assignment (otherwise the leader does, Kafka style).
    pub server_assignment: bool,
}

/// A JoinGroup answer: the member's place in the new generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinedGroup {
    pub generation_id: i32,
    pub member_id: String,
    pub leader_id: String,
    /// The assignor the coordinator chose.
    pub protocol: String,
    /// Every member's subscription and metadata; only for the leader with client-side assignment.
    pub members: Vec<JoinedMember>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinedMember {
    pub member_id: String,
    pub client_id: String,
    pub topics: Vec<String>,
    pub metadata: Vec<u8>,
}

/// One member's share, as a leader sends it in SyncGroup with client-side assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberAssignment {
    pub member_id: String,
    pub partitions: Vec<TopicPartitions>,
    pub user_data: Vec<u8>,
}

/// One offset to commit: the next offset the group will consume from the partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetToCommit {
    pub topic: String,
    pub partition: u32,
    pub offset: i64,
    pub metadata: String,
}

/// A partition's committed offset, as OffsetFetch (or a reset) reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedOffset {
    pub topic: String,
    pub partition: u32,
    /// The next offset the group will consume; `None` if nothing is committed.
    pub offset: Option<i64>,
    pub metadata: String,
    /// The partition's high watermark, when the broker knows it.
    pub log_end_offset: Option<i64>,
    /// `log_end_offset - offset`, when both are known.
    pub lag: Option<i64>,
}

/// A group as ListGroups reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupListing {
    pub group_id: String,
    /// Empty, PreparingRebalance, CompletingRebalance, Stable or Dead.
    pub state: String,
    pub protocol_type: String,
    pub members: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMember {
    pub member_id: String,
    pub client_id: String,
    pub assignment: Vec<TopicPartitions>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDescription {
    pub group_id: String,
    pub state: String,
    pub protocol_type: String,
    /// The assignor of the current generation.
    pub protocol: String,
    pub generation_id: i32,
    pub leader_id: String,
    pub members: Vec<GroupMember>,
}

/// Where `reset_offsets` moves a group's committed offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTarget {
    /// Each partition's log start offset.
    Earliest,
    /// Each partition's high watermark.
    Latest,
    /// The first offset whose timestamp is >= this (milliseconds since the epoch); the log end
    /// if there is none.
    Timestamp(i64),
    /// This offset on every partition.
    Offset(i64),
}

/// One connection to the shard running a group's coordinator.
#[derive(Debug, Clone)]
pub struct GroupCoordinator {
    group_id: String,
    client_id: String,
    conn: Connection,
}

impl GroupCoordinator {
    /// Finds the group's coordinator through the bootstrap broker and connects to it.
    /// `request_timeout` bounds every request on the connection: JoinGroup parks until the join
    /// phase ends (up to the rebalance timeout), so a member passes more than that.
    pub async fn connect(
        client: &ClientConfig,
        group_id: &str,
        request_timeout: Duration,
    ) -> Result<GroupCoordinator> {
        let bootstrap =
            Connection::connect(&client.bootstrap, &client.client_id, client.request_timeout).await?;
        let addr = find_coordinator(&bootstrap, &client.bootstrap, group_id).await?;
        GroupCoordinator::connect_at(&addr, group_id, &client.client_id, request_timeout).await
    }

    /// Connects to a coordinator whose address is already known (see [`GroupCoordinator::addr`]).
    pub async fn connect_at(
        addr: &str,
        group_id: &str,
        client_id: &str,
        request_timeout: Duration,
    ) -> Result<GroupCoordinator> {
        let conn = Connection::connect(addr, client_id, request_timeout).await?;
        Ok(GroupCoordinator { group_id: group_id.to_owned(), client_id: client_id.to_owned(), conn })
    }

    pub fn addr(&self) -> &str {
        self.conn.addr()
    }

    pub fn group_id(&self) -> &str {
        &self.group_id
    }

    /// True once the connection failed; connect again.
    pub fn is_closed(&self) -> bool {
        self.conn.is_closed()
    }

    /// Joins (or rejoins) the group; returns once the coordinator has formed the new generation.
    pub async fn join(&self, request: &JoinRequest) -> Result<JoinedGroup> {
        let group_id = self.group_id.as_str();
        let frame = self
            .conn
            .request(
                |fbb| {
                    let group = fbb.create_string(group_id);
                    let member = fbb.create_string(&request.member_id);
                    let client = fbb.create_string(&self.client_id);
                    let protocol_type = fbb.create_string(CONSUMER_PROTOCOL_TYPE);
                    let topics = string_vector(fbb, &request.topics);
                    let protocols: Vec<_> = request
                        .protocols
                        .iter()
                        .map(|(name, metadata)| {
                            let name = fbb.create_string(name);
                            let metadata = fbb.create_vector(metadata);
                            wire::GroupProtocol::create(
                                fbb,
                                &wire::GroupProtocolArgs { name: Some(name), metadata: Some(metadata) },
                            )
                        })
                        .collect();
                    let protocols = fbb.create_vector(&protocols);
                    let body = wire::JoinGroupRequest::create(
                        fbb,
                        &wire::JoinGroupRequestArgs {
                            group_id: Some(group),
                            member_id: Some(member),
                            client_id: Some(client),
                            session_timeout_ms: millis_u32(request.session_timeout),
                            rebalance_timeout_ms: millis_u32(request.rebalance_timeout),
                            protocol_type: Some(protocol_type),
                            topics: Some(topics),
                            protocols: Some(protocols),
                            server_assignment: request.server_assignment,
                        },
                    );
                    (wire::RequestBody::JoinGroupRequest, body.as_union_value())
                },
                Vec::new(),
            )
            .await?;
        let context = format!("join group {group_id:?}");
        let response = self.conn.check_response(&frame, &context)?;
        let body = response.body_as_join_group_response().ok_or_else(|| self.wrong_type("join group"))?;
        Ok(JoinedGroup {
            generation_id: body.generation_id(),
            member_id: body.member_id().unwrap_or_default().to_owned(),
            leader_id: body.leader_id().unwrap_or_default().to_owned(),
            protocol: body.protocol().unwrap_or_default().to_owned(),
            members: body
                .members()
                .iter()
                .flat_map(|v| v.iter())
                .map(|m| JoinedMember {
                    member_id: m.member_id().unwrap_or_default().to_owned(),
                    client_id: m.client_id().unwrap_or_default().to_owned(),
                    topics: m.topics().iter().flat_map(|v| v.iter()).map(str::to_owned).collect(),
                    metadata: m.metadata().map(|b| b.bytes().to_vec()).unwrap_or_default(),
                })
                .collect(),
        })
    }

    /// Ends the join phase; returns this member's partitions once the assignment exists.
    /// `assignments` is the leader's with client-side assignment, empty otherwise.
    pub async fn sync(
        &self,
        generation_id: i32,
        member_id: &str,
        assignments: &[MemberAssignment],
    ) -> Result<Vec<TopicPartitions>> {
        let group_id = self.group_id.as_str();
        let frame = self
            .conn
            .request(
                |fbb| {
                    let group = fbb.create_string(group_id);
                    let member = fbb.create_string(member_id);
                    let assignments: Vec<_> = assignments
                        .iter()
                        .map(|a| {
                            let member_id = fbb.create_string(&a.member_id);
                            let partitions = topic_partitions_vector(fbb, &a.partitions);
                            let user_data = fbb.create_vector(&a.user_data);
                            wire::MemberAssignment::create(
                                fbb,
                                &wire::MemberAssignmentArgs {
                                    member_id: Some(member_id),
                                    partitions: Some(partitions),
                                    user_data: Some(user_data),
                                },
                            )
                        })
                        .collect();
                    let assignments = fbb.create_vector(&assignments);
                    let body = wire::SyncGroupRequest::create(
                        fbb,
                        &wire::SyncGroupRequestArgs {
                            group_id: Some(group),
                            generation_id,
                            member_id: Some(member),
                            assignments: Some(assignments),
                        },
                    );
                    (wire::RequestBody::SyncGroupRequest, body.as_union_value())
                },
                Vec::new(),
            )
            .await?;
        let context = format!("sync group {group_id:?} generation {generation_id}");
        let response = self.conn.check_response(&frame, &context)?;
        let body = response.body_as_sync_group_response().ok_or_else(|| self.wrong_type("sync group"))?;
        Ok(decode_topic_partitions(body.partitions()))
    }

    /// Tells the coordinator the member is alive. Fails with RebalanceInProgress when the member
    /// must rejoin, IllegalGeneration/UnknownMemberId when it was fenced.
    pub async fn heartbeat(&self, generation_id: i32, member_id: &str) -> Result<()> {
        let group_id = self.group_id.as_str();
        let frame = self
            .conn
            .request(
                |fbb| {
                    let group = fbb.create_string(group_id);
                    let member = fbb.create_string(member_id);
                    let body = wire::HeartbeatRequest::create(
                        fbb,
                        &wire::HeartbeatRequestArgs {
                            group_id: Some(group),
                            generation_id,
                            member_id: Some(member),
                        },
                    );
                    (wire::RequestBody::HeartbeatRequest, body.as_union_value())
                },
                Vec::new(),
            )
            .await?;
        let context = format!("heartbeat to group {group_id:?} generation {generation_id}");
        let response = self.conn.check_response(&frame, &context)?;
        response.body_as_heartbeat_response().ok_or_else(|| self.wrong_type("heartbeat"))?;
        Ok(())
    }

    /// Leaves the group at once, so the others rebalance without waiting for a session timeout.
    pub async fn leave(&self, member_id: &str) -> Result<()> {
        let group_id = self.group_id.as_str();
        let frame = self
            .conn
            .request(
                |fbb| {
                    let group = fbb.create_string(group_id);
                    let member = fbb.create_string(member_id);
                    let body = wire::LeaveGroupRequest::create(
                        fbb,
                        &wire::LeaveGroupRequestArgs { group_id: Some(group), member_id: Some(member) },
                    );
                    (wire::RequestBody::LeaveGroupRequest, body.as_union_value())
                },
                Vec::new(),
            )
            .await?;
        let context = format!("leave group {group_id:?}");
        let response = self.conn.check_response(&frame, &context)?;
        response.body_as_leave_group_response().ok_or_else(|| self.wrong_type("leave group"))?;
        Ok(())
    }

    /// Commits offsets as a member of `generation_id` (or, with -1 and an empty member id,
    /// outside membership, which the coordinator allows only while the group is empty).
    pub async fn commit(
        &self,
        generation_id: i32,
        member_id: &str,
        offsets: &[OffsetToCommit],
    ) -> Result<()> {
        commit_offsets(&self.conn, &self.group_id, generation_id, member_id, offsets).await
    }

    /// The group's committed offsets for `topics` (every committed partition if empty).
    pub async fn fetch_offsets(&self, topics: &[TopicPartitions]) -> Result<Vec<CommittedOffset>> {
        fetch_offsets(&self.conn, &self.group_id, topics).await
    }

    fn wrong_type(&self, what: &str) -> ClientError {
        ClientError::protocol(self.conn.addr(), format!("{what} answered with another response type"))
    }
}

/// Asks any broker where the group's coordinator runs; returns its "host:port".
pub(crate) async fn find_coordinator(conn: &Connection, bootstrap: &str, group_id: &str) -> Result<String> {
    let frame = conn
        .request(
            |fbb| {
                let group = fbb.create_string(group_id);
                let body = wire::FindCoordinatorRequest::create(
                    fbb,
                    &wire::FindCoordinatorRequestArgs { group_id: Some(group) },
                );
                (wire::RequestBody::FindCoordinatorRequest, body.as_union_value())
            },
            Vec::new(),
        )
        .await?;
    let context = format!("find coordinator of group {group_id:?}");
    let response = conn.check_response(&frame, &context)?;
    let body = response.body_as_find_coordinator_response().ok_or_else(|| {
        ClientError::protocol(conn.addr(), "find coordinator answered with another response type")
    })?;
    if body.port() == 0 {
        // The shard has no direct listener: the broker routes group requests internally.
        return Ok(conn.addr().to_owned());
    }
    Ok(endpoint_addr(bootstrap, body.host().unwrap_or_default(), body.port()))
}

pub(crate) async fn commit_offsets(
    conn: &Connection,
    group_id: &str,
    generation_id: i32,
    member_id: &str,
    offsets: &[OffsetToCommit],
) -> Result<()> {
    let mut sorted: Vec<&OffsetToCommit> = offsets.iter().collect();
    sorted.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    let frame = conn
        .request(
            |fbb| {
                let group = fbb.create_string(group_id);
                let member = fbb.create_string(member_id);
                let mut topics = Vec::new();
                for chunk in sorted.chunk_by(|a, b| a.topic == b.topic) {
                    let partitions: Vec<_> = chunk
                        .iter()
                        .map(|o| {
                            let metadata = fbb.create_string(&o.metadata);
                            wire::OffsetCommitPartition::create(
                                fbb,
                                &wire::OffsetCommitPartitionArgs {
                                    partition: o.partition,
                                    offset: o.offset,
                                    metadata: Some(metadata),
                                },
                            )
                        })
                        .collect();
                    let partitions = fbb.create_vector(&partitions);
                    let name = fbb.create_string(&chunk[0].topic);
                    topics.push(wire::OffsetCommitTopic::create(
                        fbb,
                        &wire::OffsetCommitTopicArgs { name: Some(name), partitions: Some(partitions) },
                    ));
                }
                let topics = fbb.create_vector(&topics);
                let body = wire::OffsetCommitRequest::create(
                    fbb,
                    &wire::OffsetCommitRequestArgs {
                        group_id: Some(group),
                        generation_id,
                        member_id: Some(member),
                        topics: Some(topics),
                    },
                );
                (wire::RequestBody::OffsetCommitRequest, body.as_union_value())
            },
            Vec::new(),
        )
        .await?;
    let context = format!("commit offsets of group {group_id:?} generation {generation_id}");
    let response = conn.check_response(&frame, &context)?;
    let body = response.body_as_offset_commit_response().ok_or_else(|| {
        ClientError::protocol(conn.addr(), "offset commit answered with another response type")
    })?;
    for topic in body.topics().iter().flat_map(|v| v.iter()) {
        for p in topic.partitions().iter().flat_map(|v| v.iter()) {
            if p.error() != wire::ErrorCode::None {
                let context = format!(
                    "commit offsets of group {group_id:?} generation {generation_id}: {}/{}",
                    topic.name().unwrap_or_default(),
                    p.partition()
                );
                return Err(ClientError::broker(context, p.error(), p.message()));
            }
        }
    }
    Ok(())
}

pub(crate) async fn fetch_offsets(
    conn: &Connection,
    group_id: &str,
    topics: &[TopicPartitions],
) -> Result<Vec<CommittedOffset>> {
    let frame = conn
        .request(
            |fbb| {
                let group = fbb.create_string(group_id);
                let topics = topic_partitions_vector(fbb, topics);
                let body = wire::OffsetFetchRequest::create(
                    fbb,
                    &wire::OffsetFetchRequestArgs { group_id: Some(group), topics: Some(topics) },
                );
                (wire::RequestBody::OffsetFetchRequest, body.as_union_value())
            },
            Vec::new(),
        )
        .await?;
    let context = format!("fetch committed offsets of group {group_id:?}");
    let response = conn.check_response(&frame, &context)?;
    let body = response.body_as_offset_fetch_response().ok_or_else(|| {
        ClientError::protocol(conn.addr(), "offset fetch answered with another response type")
    })?;
    decode_offset_topics(body.topics(), &context)
}

pub(crate) async fn list_groups(conn: &Connection) -> Result<Vec<GroupListing>> {
    let frame = conn
        .request(
            |fbb| {
                let body = wire::ListGroupsRequest::create(fbb, &wire::ListGroupsRequestArgs {});
                (wire::RequestBody::ListGroupsRequest, body.as_union_value())
            },
            Vec::new(),
        )
        .await?;
    let response = conn.check_response(&frame, "list groups")?;
    let body = response.body_as_list_groups_response().ok_or_else(|| {
        ClientError::protocol(conn.addr(), "list groups answered with another response type")
    })?;
    let mut groups: Vec<GroupListing> = body
        .groups()
        .iter()
        .flat_map(|v| v.iter())
        .map(|g| GroupListing {
            group_id: g.group_id().unwrap_or_default().to_owned(),
            state: g.state().unwrap_or_default().to_owned(),
            protocol_type: g.protocol_type().unwrap_or_default().to_owned(),
            members: g.members(),
        })
        .collect();
    groups.sort_by(|a, b| a.group_id.cmp(&b.group_id));
    Ok(groups)
}

pub(crate) async fn describe_group(conn: &Connection, group_id: &str) -> Result<GroupDescription> {
    let frame = conn
        .request(
            |fbb| {
                let group = fbb.create_string(group_id);
                let body = wire::DescribeGroupRequest::create(
                    fbb,
                    &wire::DescribeGroupRequestArgs { group_id: Some(group) },
                );
                (wire::RequestBody::DescribeGroupRequest, body.as_union_value())
            },
            Vec::new(),
        )
        .await?;
    let context = format!("describe group {group_id:?}");
    let response = conn.check_response(&frame, &context)?;
    let body = response.body_as_describe_group_response().ok_or_else(|| {
        ClientError::protocol(conn.addr(), "describe group answered with another response type")
    })?;
    let mut members: Vec<GroupMember> = body
        .members()
        .iter()
        .flat_map(|v| v.iter())
        .map(|m| GroupMember {
            member_id: m.member_id().unwrap_or_default().to_owned(),
            client_id: m.client_id().unwrap_or_default().to_owned(),
            assignment: decode_topic_partitions(m.assignment()),
        })
        .collect();
    members.sort_by(|a, b| a.member_id.cmp(&b.member_id));
    Ok(GroupDescription {
        group_id: body.group_id().unwrap_or(group_id).to_owned(),
        state: body.state().unwrap_or_default().to_owned(),
        protocol_type: body.protocol_type().unwrap_or_default().to_owned(),
        protocol: body.protocol().unwrap_or_default().to_owned(),
        generation_id: body.generation_id(),
        leader_id: body.leader_id().unwrap_or_default().to_owned(),
        members,
    })
}

pub(crate) async fn delete_group(conn: &Connection, group_id: &str) -> Result<()> {
    let frame = conn
        .request(
            |fbb| {
                let group = fbb.create_string(group_id);
                let body = wire::DeleteGroupRequest::create(
                    fbb,
                    &wire::DeleteGroupRequestArgs { group_id: Some(group) },
                );
                (wire::RequestBody::DeleteGroupRequest, body.as_union_value())
            },
            Vec::new(),
        )
        .await?;
    let context = format!("delete group {group_id:?}");
    let response = conn.check_response(&frame, &context)?;
    response.body_as_delete_group_response().ok_or_else(|| {
        ClientError::protocol(conn.addr(), "delete group answered with another response type")
    })?;
    Ok(())
}

pub(crate) async fn reset_offsets(
    conn: &Connection,
    group_id: &str,
    topic: &str,
    partitions: &[u32],
    target: ResetTarget,
) -> Result<Vec<CommittedOffset>> {
    let (timestamp, offset) = match target {
        ResetTarget::Earliest => (crate::protocol::EARLIEST_TIMESTAMP, None),
        ResetTarget::Latest => (crate::protocol::LATEST_TIMESTAMP, None),
        ResetTarget::Timestamp(ms) => (ms, None),
        ResetTarget::Offset(o) => (crate::protocol::EARLIEST_TIMESTAMP, Some(o)),
    };
    let frame = conn
        .request(
            |fbb| {
                let group = fbb.create_string(group_id);
                let name = fbb.create_string(topic);
                let partitions = fbb.create_vector(partitions);
                let body = wire::ResetOffsetsRequest::create(
                    fbb,
                    &wire::ResetOffsetsRequestArgs {
                        group_id: Some(group),
                        topic: Some(name),
                        partitions: Some(partitions),
                        timestamp,
                        offset,
                    },
                );
                (wire::RequestBody::ResetOffsetsRequest, body.as_union_value())
            },
            Vec::new(),
        )
        .await?;
    let context = format!("reset offsets of group {group_id:?} on topic {topic:?}");
    let response = conn.check_response(&frame, &context)?;
    let body = response.body_as_reset_offsets_response().ok_or_else(|| {
        ClientError::protocol(conn.addr(), "reset offsets answered with another response type")
    })?;
    decode_offset_topics(body.topics(), &context)
}

fn decode_offset_topics(
    topics: Option<Vector<'_, ForwardsUOffset<wire::OffsetFetchTopic<'_>>>>,
    context: &str,
) -> Result<Vec<CommittedOffset>> {
    let mut out = Vec::new();
    for topic in topics.iter().flat_map(|v| v.iter()) {
        let name = topic.name().unwrap_or_default();
        for p in topic.partitions().iter().flat_map(|v| v.iter()) {
            if p.error() != wire::ErrorCode::None {
                let context = format!("{context}: {name}/{}", p.partition());
                return Err(ClientError::broker(context, p.error(), p.message()));
            }
            let known = |v: i64| (v >= 0).then_some(v);
            let offset = known(p.offset());
            let log_end_offset = known(p.log_end_offset());
            out.push(CommittedOffset {
                topic: name.to_owned(),
                partition: p.partition(),
                offset,
                metadata: p.metadata().unwrap_or_default().to_owned(),
                log_end_offset,
                lag: offset.and(log_end_offset).and(known(p.lag())),
            });
        }
    }
    out.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    Ok(out)
}

fn decode_topic_partitions(
    v: Option<Vector<'_, ForwardsUOffset<wire::TopicPartitions<'_>>>>,
) -> Vec<TopicPartitions> {
    let mut out: Vec<TopicPartitions> = v
        .iter()
        .flat_map(|v| v.iter())
        .map(|t| {
            let mut partitions: Vec<u32> = t.partitions().iter().flat_map(|v| v.iter()).collect();
            partitions.sort_unstable();
            TopicPartitions { topic: t.topic().unwrap_or_default().to_owned(), partitions }
        })
        .collect();
    out.sort();
    out
}

fn topic_partitions_vector<'a>(
    fbb: &mut FlatBufferBuilder<'a>,
    topics: &[TopicPartitions],
) -> WIPOffset<Vector<'a, ForwardsUOffset<wire::TopicPartitions<'a>>>> {
    let items: Vec<_> = topics
        .iter()
        .map(|t| {
            let topic = fbb.create_string(&t.topic);
            let partitions = fbb.create_vector(&t.partitions);
            wire::TopicPartitions::create(
                fbb,
                &wire::TopicPartitionsArgs { topic: Some(topic), partitions: Some(partitions) },
            )
        })
        .collect();
    fbb.create_vector(&items)
}

fn string_vector<'a>(
    fbb: &mut FlatBufferBuilder<'a>,
    items: &[String],
) -> WIPOffset<Vector<'a, ForwardsUOffset<&'a str>>> {
    let items: Vec<_> = items.iter().map(|s| fbb.create_string(s)).collect();
    fbb.create_vector(&items)
}

fn millis_u32(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::ResponseFrame;

    #[cfg(feature = "broker")]
    #[test]
    fn the_offsets_topic_is_the_brokers() {
        assert_eq!(OFFSETS_TOPIC, crate::metadata::OFFSETS_TOPIC);
    }

    fn response_of(frame: &ResponseFrame) -> wire::Response<'_> {
        frame.response().unwrap()
    }

    fn finish_response(
        fbb: &mut FlatBufferBuilder<'static>,
        body_type: wire::ResponseBody,
        body: WIPOffset<flatbuffers::UnionWIPOffset>,
    ) -> ResponseFrame {
        let response = wire::Response::create(
            fbb,
            &wire::ResponseArgs { correlation_id: 1, body_type, body: Some(body), ..Default::default() },
        );
        fbb.finish(response, None);
        ResponseFrame {
            header: bytes::Bytes::copy_from_slice(fbb.finished_data()),
            payload: bytes::Bytes::new(),
        }
    }

    #[test]
    fn offset_fetch_results_decode_with_unknowns_as_none() {
        let mut fbb = FlatBufferBuilder::new();
        let parts =
            [(1u32, 40i64, 50i64, 10i64), (0, -1, 7, -1)].map(|(partition, offset, log_end_offset, lag)| {
                wire::OffsetFetchPartition::create(
                    &mut fbb,
                    &wire::OffsetFetchPartitionArgs {
                        partition,
                        offset,
                        log_end_offset,
                        lag,
                        ..Default::default()
                    },
                )
            });
        let parts = fbb.create_vector(&parts);
        let name = fbb.create_string("orders");
        let topic = wire::OffsetFetchTopic::create(
            &mut fbb,
            &wire::OffsetFetchTopicArgs { name: Some(name), partitions: Some(parts) },
        );
        let topics = fbb.create_vector(&[topic]);
        let body = wire::OffsetFetchResponse::create(
            &mut fbb,
            &wire::OffsetFetchResponseArgs { topics: Some(topics) },
        );
        let frame = finish_response(&mut fbb, wire::ResponseBody::OffsetFetchResponse, body.as_union_value());
        let response = response_of(&frame);
        let got =
            decode_offset_topics(response.body_as_offset_fetch_response().unwrap().topics(), "t").unwrap();
        assert_eq!(
            got,
            vec![
                CommittedOffset {
                    topic: "orders".into(),
                    partition: 0,
                    offset: None,
                    metadata: String::new(),
                    log_end_offset: Some(7),
                    lag: None,
                },
                CommittedOffset {
                    topic: "orders".into(),
                    partition: 1,
                    offset: Some(40),
                    metadata: String::new(),
                    log_end_offset: Some(50),
                    lag: Some(10),
                },
            ]
        );
    }

    #[test]
    fn partition_errors_in_offset_results_fail_with_the_partition() {
        let mut fbb = FlatBufferBuilder::new();
        let message = fbb.create_string("group is not empty");
        let part = wire::OffsetFetchPartition::create(
            &mut fbb,
            &wire::OffsetFetchPartitionArgs {
                partition: 3,
                error: wire::ErrorCode::GroupNotEmpty,
                message: Some(message),
                ..Default::default()
            },
        );
        let parts = fbb.create_vector(&[part]);
        let name = fbb.create_string("t");
        let topic = wire::OffsetFetchTopic::create(
            &mut fbb,
            &wire::OffsetFetchTopicArgs { name: Some(name), partitions: Some(parts) },
        );
        let topics = fbb.create_vector(&[topic]);
        let body = wire::ResetOffsetsResponse::create(
            &mut fbb,
            &wire::ResetOffsetsResponseArgs { topics: Some(topics) },
        );
        let frame =
            finish_response(&mut fbb, wire::ResponseBody::ResetOffsetsResponse, body.as_union_value());
        let response = response_of(&frame);
        let err = decode_offset_topics(response.body_as_reset_offsets_response().unwrap().topics(), "reset")
            .unwrap_err();
        assert_eq!(err.code(), Some(wire::ErrorCode::GroupNotEmpty));
        assert!(err.to_string().contains("reset: t/3"), "{err}");
    }

    #[test]
    fn topic_partitions_round_trip_sorted() {
        let mut fbb = FlatBufferBuilder::new();
        let input = vec![
            TopicPartitions { topic: "b".into(), partitions: vec![2, 0] },
            TopicPartitions { topic: "a".into(), partitions: vec![1] },
        ];
        let v = topic_partitions_vector(&mut fbb, &input);
        let body = wire::SyncGroupResponse::create(
            &mut fbb,
            &wire::SyncGroupResponseArgs { partitions: Some(v), ..Default::default() },
        );
        let frame = finish_response(&mut fbb, wire::ResponseBody::SyncGroupResponse, body.as_union_value());
        let response = response_of(&frame);
        let got = decode_topic_partitions(response.body_as_sync_group_response().unwrap().partitions());
        assert_eq!(
            got,
            vec![
                TopicPartitions { topic: "a".into(), partitions: vec![1] },
                TopicPartitions { topic: "b".into(), partitions: vec![0, 2] },
            ]
        );
    }
}
