//! The client's error type.
//!
//! Owns: `ClientError`, shared by admin, producer and consumer. It is `Clone` because one
//! produce failure is reported to every record of the failed batch.

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::protocol::wire::ErrorCode;
use crate::record::reader::DecodeError;

/// Everything a client call can fail with. Broker errors carry the broker's code and message;
/// network errors carry the address they happened on.
#[derive(Debug, Clone, Error)]
pub enum ClientError {
    #[error("{context}: broker returned {code:?}{}", message_suffix(.message))]
    Broker { context: String, code: ErrorCode, message: String },
    #[error("{topic}/{partition}: offset {offset} is out of range (log start {log_start_offset}, high watermark {high_watermark})")]
    OffsetOutOfRange {
        topic: String,
        partition: u32,
        offset: i64,
        log_start_offset: i64,
        high_watermark: i64,
    },
    #[error("topic {topic:?} does not exist")]
    UnknownTopic { topic: String },
    #[error("topic {topic:?} has no partition {partition} (it has {partitions})")]
    UnknownPartition { topic: String, partition: u32, partitions: u32 },
    #[error("{addr}: {source}")]
    Io { addr: String, source: Arc<std::io::Error> },
    /// The connection closed before the request was written: it is safe to send it again.
    #[error("{addr}: connection closed before the request was sent")]
    NotSent { addr: String },
    #[error("{addr}: no response within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("{addr}: protocol error: {reason}")]
    Protocol { addr: String, reason: String },
    #[error("{topic}/{partition}: damaged batch at payload byte {position}: {source}")]
    CorruptBatch { topic: String, partition: u32, position: usize, source: DecodeError },
    #[error("record of {record_bytes} bytes exceeds the producer's buffer of {limit_bytes} bytes")]
    RecordTooLarge { record_bytes: usize, limit_bytes: usize },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("the producer is closed")]
    ProducerClosed,
    /// A group operation that needs membership (commit) before the member joined, or while it
    /// rejoins: poll first.
    #[error("not a member of group {group_id:?} (poll to join it)")]
    NotGroupMember { group_id: String },
}

fn message_suffix(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

/// What a record's delivery fails with.
pub type ProduceError = ClientError;

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

impl ClientError {
    pub(crate) fn io(addr: &str, source: std::io::Error) -> Self {
        ClientError::Io { addr: addr.to_owned(), source: Arc::new(source) }
    }

    pub(crate) fn protocol(addr: &str, reason: impl Into<String>) -> Self {
        ClientError::Protocol { addr: addr.to_owned(), reason: reason.into() }
    }

    pub(crate) fn broker(context: impl Into<String>, code: ErrorCode, message: Option<&str>) -> Self {
        ClientError::Broker { context: context.into(), code, message: message.unwrap_or_default().to_owned() }
    }

    /// The broker's error code, if the broker reported this error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Broker { code, .. } => Some(*code),
            ClientError::OffsetOutOfRange { .. } => Some(ErrorCode::OffsetOutOfRange),
            ClientError::UnknownTopic { .. } | ClientError::UnknownPartition { .. } => {
                Some(ErrorCode::UnknownTopicOrPartition)
            }
            _ => None,
        }
    }

    /// Whether sending the same request again may succeed and cannot duplicate data: the broker
    /// refused it before appending anything, or it never left this process.
    pub fn is_retriable(&self) -> bool {
        match self {
            ClientError::NotSent { .. } => true,
            // NotLeader and RequestTimedOut (a replicated partition without a leader, or without a
            // quorum in time) are retried as Kafka producers retry them: without idempotence a
            // batch whose commit was cut short by a leader change may then be written twice.
            // ClusterForming: a topic change refused before it was proposed, nodes just started.
            ClientError::Broker { code, .. } => matches!(
                *code,
                ErrorCode::NotOwner
                    | ErrorCode::UnknownTopicOrPartition
                    | ErrorCode::ResourceExhausted
                    | ErrorCode::NotLeader
                    | ErrorCode::RequestTimedOut
                    | ErrorCode::ClusterForming
            ),
            _ => false,
        }
    }

    /// Whether a group member must join the group again: a rebalance started, or the member was
    /// fenced (its generation is over, or the coordinator no longer knows it).
    pub fn needs_rejoin(&self) -> bool {
        matches!(
            self.code(),
            Some(ErrorCode::RebalanceInProgress | ErrorCode::IllegalGeneration | ErrorCode::UnknownMemberId)
        )
    }

    /// Whether the group coordinator may have moved or be unreachable: look it up again.
    pub(crate) fn invalidates_coordinator(&self) -> bool {
        match self {
            ClientError::Broker { code, .. } => matches!(
                *code,
                ErrorCode::NotCoordinator | ErrorCode::CoordinatorNotAvailable | ErrorCode::ShuttingDown
            ),
            ClientError::Io { .. } | ClientError::NotSent { .. } | ClientError::Timeout { .. } => true,
            _ => false,
        }
    }

    /// Whether the client's view of which shard owns what may be stale.
    pub(crate) fn invalidates_metadata(&self) -> bool {
        match self {
            ClientError::Broker { code, .. } => {
                matches!(
                    *code,
                    ErrorCode::NotOwner | ErrorCode::UnknownTopicOrPartition | ErrorCode::NotLeader
                )
            }
            ClientError::Io { .. } | ClientError::NotSent { .. } | ClientError::Timeout { .. } => true,
            _ => false,
        }
    }
}
