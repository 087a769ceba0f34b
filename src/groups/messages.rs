//! Consumer-group requests and replies as plain owned values, and the errors they can end in.
//!
//! Owns: the shapes that cross shards (a [`GroupRequest`] travels to the coordinator shard and a
//! [`GroupOutcome`] back), decoded from and encoded to the wire by `native::groups` and
//! `kafka::groups`. Everything here is `Send`. Each protocol maps [`GroupError`] to its wire codes
//! in its one error table.

use thiserror::Error;

use crate::shard::BrokerError;

/// (topic, partitions), the unit of assignments and offset requests.
pub type TopicPartitions = (String, Vec<u32>);

#[derive(Debug, Clone, Default)]
pub struct JoinRequest {
    pub group_id: String,
    pub member_id: String,
    pub client_id: String,
    pub session_timeout_ms: u32,
    pub rebalance_timeout_ms: u32,
    pub protocol_type: String,
    pub topics: Vec<String>,
    /// (assignor name, opaque metadata), in the member's order of preference.
    pub protocols: Vec<(String, Vec<u8>)>,
    pub server_assignment: bool,
    pub context: JoinContext,
}

/// What a join carries beyond the native JoinGroup's fields; the default is a native join.
#[derive(Debug, Clone, Default)]
pub struct JoinContext {
    /// The client's address as Kafka reports it (`/127.0.0.1`); empty for native clients.
    pub client_host: String,
    /// KIP-394: a join with an empty member id gets a new id but does not join yet; the member
    /// joins when it comes back with that id (Kafka JoinGroup v4+ without a group instance id).
    pub require_known_member_id: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinMember {
    pub member_id: String,
    pub client_id: String,
    pub topics: Vec<String>,
    pub metadata: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinResponse {
    pub generation: i32,
    pub protocol: String,
    pub leader_id: String,
    pub member_id: String,
    /// Only for the leader, and only when the leader computes the assignment.
    pub members: Vec<JoinMember>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberAssignment {
    pub member_id: String,
    pub partitions: Vec<TopicPartitions>,
    pub user_data: Vec<u8>,
    /// The assignment exactly as a Kafka leader sent it (opaque to the coordinator, which hands
    /// it back byte for byte); `partitions` and `user_data` are then decoded from it, best effort.
    /// `None` from native leaders.
    pub assignment_bytes: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Default)]
pub struct SyncRequest {
    pub group_id: String,
    pub generation: i32,
    pub member_id: String,
    pub assignments: Vec<MemberAssignment>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncResponse {
    pub partitions: Vec<TopicPartitions>,
    pub user_data: Vec<u8>,
    /// The leader's opaque assignment for this member, if a Kafka leader sent one.
    pub assignment_bytes: Option<Vec<u8>>,
}

#[derive(Debug, Clone)]
pub struct MemberRef {
    pub group_id: String,
    pub generation: i32,
    pub member_id: String,
}

#[derive(Debug, Clone)]
pub struct CommitPartition {
    pub topic: String,
    pub partition: u32,
    pub offset: i64,
    pub metadata: String,
}

#[derive(Debug, Clone)]
pub struct CommitRequest {
    /// generation -1 with an empty member id: a commit outside membership (empty groups only).
    pub member: MemberRef,
    pub partitions: Vec<CommitPartition>,
}

/// One partition's result in a commit: `None` when committed.
pub type CommitResult = (String, u32, Option<GroupError>);

#[derive(Debug, Clone)]
pub struct OffsetFetchRequest {
    pub group_id: String,
    /// Empty: every partition the group has committed.
    pub topics: Vec<TopicPartitions>,
}

/// A committed offset as reported to clients, with the partition's log end and the lag.
#[derive(Debug, Clone)]
pub struct PartitionOffset {
    pub topic: String,
    pub partition: u32,
    /// -1: nothing committed.
    pub offset: i64,
    pub metadata: String,
    /// The partition's high watermark; -1 if unknown (topic or partition gone).
    pub log_end_offset: i64,
    /// `log_end_offset - offset` when both are known, else -1.
    pub lag: i64,
    pub error: Option<GroupError>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTarget {
    /// -2 earliest, -1 latest, else milliseconds since the epoch.
    Timestamp(i64),
    Offset(i64),
}

#[derive(Debug, Clone)]
pub struct ResetRequest {
    pub group_id: String,
    pub topic: String,
    /// Empty: every partition of the topic.
    pub partitions: Vec<u32>,
    pub target: ResetTarget,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupListing {
    pub group_id: String,
    pub state: &'static str,
    pub protocol_type: String,
    pub members: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberDescription {
    pub member_id: String,
    pub client_id: String,
    /// As in [`JoinContext::client_host`].
    pub client_host: String,
    pub assignment: Vec<TopicPartitions>,
    /// The member's opaque metadata for the group's protocol (Kafka's DescribeGroups shows it).
    pub metadata: Vec<u8>,
    /// As in [`SyncResponse::assignment_bytes`].
    pub assignment_bytes: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDescription {
    pub group_id: String,
    pub state: &'static str,
    pub protocol_type: String,
    pub protocol: String,
    pub generation: i32,
    pub leader_id: String,
    pub members: Vec<MemberDescription>,
}

#[derive(Debug)]
pub enum GroupRequest {
    Join(JoinRequest),
    Sync(SyncRequest),
    Heartbeat(MemberRef),
    Leave {
        group_id: String,
        member_id: String,
    },
    Commit(CommitRequest),
    FetchOffsets(OffsetFetchRequest),
    Describe {
        group_id: String,
    },
    Delete {
        group_id: String,
    },
    Reset(ResetRequest),
    /// The groups coordinated by one shard (ListGroups asks every shard).
    ListLocal,
}

impl GroupRequest {
    /// The group the request is about; `None` for requests that span every coordinator.
    pub fn group_id(&self) -> Option<&str> {
        Some(match self {
            GroupRequest::Join(r) => &r.group_id,
            GroupRequest::Sync(r) => &r.group_id,
            GroupRequest::Heartbeat(r) => &r.group_id,
            GroupRequest::Commit(r) => &r.member.group_id,
            GroupRequest::FetchOffsets(r) => &r.group_id,
            GroupRequest::Reset(r) => &r.group_id,
            GroupRequest::Leave { group_id, .. }
            | GroupRequest::Describe { group_id }
            | GroupRequest::Delete { group_id } => group_id,
            GroupRequest::ListLocal => return None,
        })
    }
}

#[derive(Debug)]
pub enum GroupReply {
    Join(JoinResponse),
    Sync(SyncResponse),
    Done,
    Commit(Vec<CommitResult>),
    Offsets(Vec<PartitionOffset>),
    Describe(GroupDescription),
    List(Vec<GroupListing>),
}

pub type GroupOutcome = Result<GroupReply, GroupError>;

#[derive(Debug, Clone, Error)]
pub enum GroupError {
    #[error("group '{group}': '{member}' is not a member (it left, its session expired, or the broker restarted); rejoin with an empty member id")]
    UnknownMember { group: String, member: String },
    #[error(
        "group '{group}': generation {generation} is stale, the group is at generation {current}; rejoin"
    )]
    IllegalGeneration { group: String, generation: i32, current: i32 },
    #[error("group '{group}' is rebalancing; rejoin (JoinGroup) before heartbeating or committing")]
    RebalanceInProgress { group: String },
    /// KIP-394: the new member must join again with this id, which the coordinator now expects.
    #[error("group '{group}': rejoin with the member id '{member}' the coordinator assigned")]
    MemberIdRequired { group: String, member: String },
    #[error("group '{group}' has {members} active member(s); this needs an empty group")]
    NotEmpty { group: String, members: usize },
    #[error("group '{group}' does not exist")]
    NotFound { group: String },
    #[error(
        "session_timeout_ms {requested} is outside {min}..={max} \
         (broker options group_min_session_timeout_ms, group_max_session_timeout_ms)"
    )]
    InvalidSessionTimeout { requested: u32, min: u32, max: u32 },
    #[error("group '{group}': {detail}")]
    InconsistentProtocol { group: String, detail: String },
    #[error("unknown topic '{topic}'")]
    UnknownTopic { topic: String },
    #[error("invalid group id: {0}")]
    InvalidGroupId(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error(
        "group '{group}' already has {members} members, counting those yet to rejoin with their \
         assigned id (broker option group_members_max)"
    )]
    TooManyMembers { group: String, members: usize },
    #[error("the group coordinator is not available: {0}")]
    CoordinatorNotAvailable(String),
    #[error("shard {shard} does not coordinate group '{group}'; ask FindCoordinator")]
    NotCoordinator { group: String, shard: u32 },
    /// A cluster: the group's offsets partition is led by another node (`leader`, when known).
    #[error("this node does not coordinate group '{group}' (its offsets partition is led by node {leader:?}); ask FindCoordinator")]
    NotCoordinatorNode { group: String, leader: Option<u64> },
    /// A cluster: this node has just come to lead the group's offsets partition and is replaying it.
    #[error("group '{group}': this node is loading __consumer_offsets partition {partition}; retry shortly")]
    LoadInProgress { group: String, partition: u32 },
    #[error("group '{group}': writing __consumer_offsets failed: {source}")]
    Storage { group: String, source: BrokerError },
    /// The group's record holding a new generation's assignment was not appended or did not
    /// become durable (committed, on a replicated `__consumer_offsets`): that assignment is void,
    /// the group is rebalancing, and every member of that SyncGroup must rejoin.
    #[error(
        "group '{group}': the assignment of generation {generation} was not stored, so the group \
         is rebalancing; rejoin ({source})"
    )]
    AssignmentNotStored { group: String, generation: i32, source: Box<GroupError> },
    /// One partition of a commit, offset fetch or reset (unknown topic or partition, a failed
    /// offset lookup).
    #[error(transparent)]
    Partition(BrokerError),
    #[error("the broker is shutting down")]
    ShuttingDown,
}
