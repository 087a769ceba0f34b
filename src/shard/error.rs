//! `BrokerError`: what shards, storage (through them) and the controller report about a request,
//! typed, with the context a user can act on.
//!
//! Owns: the one error type that crosses the mesh and reaches the protocols, and the one place
//! storage's errors are sorted into what clients must tell apart (`StorageFailure`). Each
//! protocol turns a `BrokerError` into its own wire code in one table (`native::errors`,
//! `kafka::errors`) without knowing storage; nothing classifies a failure by its text. `Clone` and `Send`: one failure can answer several partitions of a
//! request and travel between shards, so storage's error rides in an `Arc`.

use std::sync::Arc;

use crate::record::BatchError;
use crate::storage::StorageError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error("unknown topic '{topic}'")]
    UnknownTopic { topic: String },
    #[error("topic '{topic}' has no partition {partition}")]
    UnknownPartition { topic: String, partition: i64 },
    /// A client asked to change an internal topic in a way only the broker may.
    #[error("'{topic}' is internal; {rule}")]
    InternalTopic { topic: String, rule: &'static str },
    /// A control batch (transaction marker) from a client: only brokers write those.
    #[error("the batch at byte {position} is a control batch; only brokers write those")]
    ControlBatch { position: usize },
    /// A transactional batch from a client, while ringlog has no transactions.
    #[error(
        "the batch at byte {position} is transactional; ringlog does not support Kafka transactions; \
         produce without transactional.id"
    )]
    TransactionalBatch { position: usize },
    /// The request is well-formed on the wire but asks for something that makes no sense.
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    InvalidTopicName(String),
    #[error("{0}")]
    InvalidPartitions(String),
    #[error("{0}")]
    InvalidConfig(String),
    #[error("topic '{topic}' already exists")]
    TopicAlreadyExists { topic: String },
    #[error("the broker already holds {topics} topics (topics_max)")]
    TooManyTopics { topics: usize },
    /// Opening a partition's files failed on a shard (creation, growth, start-up).
    #[error("topic '{topic}' partition {partition} on shard {shard}: {source}{}", more_failures(*more))]
    OpenFailed { topic: String, partition: u32, shard: u32, more: usize, source: Arc<StorageError> },
    /// A topic change refused before anything was opened: the broker would hold more partitions
    /// than `partitions_per_shard_max` allows.
    #[error("topic '{topic}': {adding} more partitions do not fit this broker: {detail}")]
    PartitionBudget { topic: String, adding: u64, detail: String },
    /// A topic change that failed on some shard and was undone everywhere.
    #[error("{action} topic '{topic}' failed and was rolled back: {detail}")]
    RolledBack { action: &'static str, topic: String, detail: String, out_of_descriptors: bool },
    /// A partition's log refused or failed the operation; `failure` says how, for the protocols.
    #[error("{topic}/{partition}: {source}")]
    Storage { topic: Arc<str>, partition: u32, failure: StorageFailure, source: Arc<StorageError> },
    /// A file of the controller's own (the metadata file, the producer-id block) could not be
    /// read or written.
    #[error("{file}: {detail}")]
    ControllerFile { file: String, detail: String },
    /// A replicated partition's request reached a node that does not lead it (or no leader is
    /// known yet): Kafka's NOT_LEADER_OR_FOLLOWER, retried after a metadata refresh.
    #[error("{topic}/{partition}: this node does not lead the partition; {}", leader_hint(*leader, address.as_deref()))]
    NotLeader { topic: String, partition: u32, leader: Option<u64>, address: Option<String> },
    /// The client's leader epoch is older than the replica's (KIP-320): Kafka's
    /// FENCED_LEADER_EPOCH; the client refreshes its metadata.
    #[error("{topic}/{partition}: leader epoch {requested} is older than this replica's {current}; refresh metadata")]
    FencedLeaderEpoch { topic: String, partition: u32, requested: u64, current: u64 },
    /// The client's leader epoch is newer than the replica's: this node has not heard of that
    /// election yet. Kafka's UNKNOWN_LEADER_EPOCH, retried.
    #[error("{topic}/{partition}: leader epoch {requested} is newer than this replica's {current}; it has not caught up with that election yet")]
    UnknownLeaderEpoch { topic: String, partition: u32, requested: u64, current: u64 },
    /// A new leader that has not committed an entry of its epoch yet, so its high watermark may
    /// still be below its predecessor's: Kafka's OFFSET_NOT_AVAILABLE (KIP-207), retried.
    #[error(
        "{topic}/{partition}: this node leads epoch {epoch} but has not committed in it yet; retry shortly"
    )]
    OffsetNotAvailable { topic: String, partition: u32, epoch: u64 },
    /// A write to a replicated partition was not committed by a majority in time (it may still
    /// commit): Kafka's REQUEST_TIMED_OUT.
    #[error("{topic}/{partition}: not committed by a majority of its replicas within {after_ms} ms")]
    ReplicationTimedOut { topic: String, partition: u32, after_ms: u64 },
    /// A topic change reached a node that does not lead the controller group.
    #[error("this node does not lead the controller; {}", leader_hint(*leader, address.as_deref()))]
    NotController { leader: Option<u64>, address: Option<String> },
    #[error("{0}")]
    InvalidReplicationFactor(String),
    /// A topic change whose replication factor the cluster's seed list allows but for which too
    /// few nodes have registered with the controller yet (they just started): refused before
    /// anything was proposed, so the client may send it again (`cluster::forming`).
    #[error(
        "replication factor {replication_factor} for topic '{topic}': the cluster is still forming: {} \
         nodes registered with the controller ({registered:?}), seed nodes {missing:?} not yet (waited \
         {waited_ms} ms); retry shortly, and if it lasts, check that those nodes run and reach their peers",
        registered.len()
    )]
    ClusterForming {
        topic: String,
        replication_factor: u16,
        registered: Vec<u64>,
        missing: Vec<u64>,
        waited_ms: u64,
    },
    #[error("the broker is shutting down")]
    ShuttingDown,
    /// A broken invariant between shards; a bug, reported rather than panicking.
    #[error("internal error: {0}")]
    Internal(String),
}

/// How a partition's log refused or failed an operation: what the protocols tell clients apart,
/// so they need not know storage's own error type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageFailure {
    BatchTooLarge,
    TooManyRecords,
    /// A batch that fails its crc32c, magic or length checks.
    CorruptBatch,
    /// Any other batch the log refuses (bad offsets, counts, timestamps).
    InvalidBatch,
    OffsetOutOfRange,
    /// The disk is below its free-space reserve.
    StorageFull,
    /// Data at rest is damaged.
    CorruptLog,
    /// The partition is closed (shutting down, or removed).
    Closed,
    ProducerFenced,
    OutOfOrderSequence,
    /// A write, sync or read failed, or the log is in a state that refuses appends for now.
    Io,
}

impl StorageFailure {
    fn of(e: &StorageError) -> StorageFailure {
        match e {
            StorageError::InvalidBatch { source, .. } => match source {
                BatchError::TooLarge { .. } => StorageFailure::BatchTooLarge,
                BatchError::TooManyRecords { .. } => StorageFailure::TooManyRecords,
                BatchError::CrcMismatch { .. }
                | BatchError::BadMagic { .. }
                | BatchError::Truncated { .. } => StorageFailure::CorruptBatch,
                _ => StorageFailure::InvalidBatch,
            },
            StorageError::OffsetOutOfRange { .. } => StorageFailure::OffsetOutOfRange,
            StorageError::StorageFull { .. } => StorageFailure::StorageFull,
            StorageError::Corrupt { .. } => StorageFailure::CorruptLog,
            StorageError::Closed => StorageFailure::Closed,
            StorageError::ProducerFenced { .. } => StorageFailure::ProducerFenced,
            StorageError::OutOfOrderSequence { .. } => StorageFailure::OutOfOrderSequence,
            _ => StorageFailure::Io,
        }
    }
}

fn leader_hint(leader: Option<u64>, address: Option<&str>) -> String {
    match (leader, address) {
        (Some(id), Some(address)) => format!("node {id} at {address} does"),
        (Some(id), None) => format!("node {id} does"),
        (None, _) => "no leader is known yet (an election is under way); retry shortly".to_string(),
    }
}

fn more_failures(more: usize) -> String {
    match more {
        0 => String::new(),
        n => format!(" (and {n} more partitions failed to open)"),
    }
}

impl BrokerError {
    pub fn unknown_partition(topic: &str, partition: impl Into<i64>) -> BrokerError {
        BrokerError::UnknownPartition { topic: topic.to_string(), partition: partition.into() }
    }

    pub fn storage(topic: &Arc<str>, partition: u32, source: StorageError) -> BrokerError {
        let failure = StorageFailure::of(&source);
        BrokerError::Storage { topic: topic.clone(), partition, failure, source: Arc::new(source) }
    }

    /// `(log_start_offset, high_watermark)` when the error is about an offset, so a consumer
    /// can reset without another round trip.
    pub fn log_bounds(&self) -> Option<(i64, i64)> {
        match self {
            BrokerError::Storage { source, .. } => match &**source {
                StorageError::OffsetOutOfRange { log_start, high_watermark, .. } => {
                    Some((*log_start, *high_watermark))
                }
                _ => None,
            },
            _ => None,
        }
    }

    /// The failure came from running out of file descriptors (an operator's limit).
    pub fn is_out_of_descriptors(&self) -> bool {
        match self {
            BrokerError::OpenFailed { source, .. } | BrokerError::Storage { source, .. } => {
                source.is_out_of_descriptors()
            }
            BrokerError::RolledBack { out_of_descriptors, .. } => *out_of_descriptors,
            _ => false,
        }
    }
}
