//! The broker's errors as native wire codes: the one table of this protocol.
//!
//! Owns: the mapping from [`BrokerError`] (what shards, storage and the controller report) and
//! [`GroupError`] (what a group coordinator reports) to `wire::ErrorCode`, whose meanings the
//! schema documents (`schema/ringlog.fbs`). The message sent with a code is the error's text.

use crate::groups::messages::GroupError;
use crate::protocol::wire::ErrorCode;
use crate::shard::{BrokerError, StorageFailure};

pub fn broker_code(e: &BrokerError) -> ErrorCode {
    match e {
        BrokerError::UnknownTopic { .. } | BrokerError::UnknownPartition { .. } => {
            ErrorCode::UnknownTopicOrPartition
        }
        BrokerError::InternalTopic { .. }
        | BrokerError::ControlBatch { .. }
        | BrokerError::TransactionalBatch { .. }
        | BrokerError::InvalidRequest(_) => ErrorCode::InvalidRequest,
        BrokerError::InvalidTopicName(_) => ErrorCode::InvalidTopicName,
        BrokerError::InvalidPartitions(_) => ErrorCode::InvalidPartitions,
        BrokerError::InvalidConfig(_) => ErrorCode::InvalidConfig,
        BrokerError::TopicAlreadyExists { .. } => ErrorCode::TopicAlreadyExists,
        BrokerError::TooManyTopics { .. } => ErrorCode::ResourceExhausted,
        BrokerError::PartitionBudget { .. } => ErrorCode::ResourceExhausted,
        e @ (BrokerError::OpenFailed { .. } | BrokerError::RolledBack { .. })
            if e.is_out_of_descriptors() =>
        {
            ErrorCode::ResourceExhausted
        }
        BrokerError::OpenFailed { .. }
        | BrokerError::RolledBack { .. }
        | BrokerError::ControllerFile { .. } => ErrorCode::StorageError,
        BrokerError::Storage { failure, .. } => storage_code(*failure),
        BrokerError::ShuttingDown => ErrorCode::ShuttingDown,
        // Native clients send no leader epochs, and retry a leader not ready yet as one that
        // moved: after a metadata refresh.
        BrokerError::NotLeader { .. }
        | BrokerError::FencedLeaderEpoch { .. }
        | BrokerError::UnknownLeaderEpoch { .. }
        | BrokerError::OffsetNotAvailable { .. } => ErrorCode::NotLeader,
        BrokerError::ReplicationTimedOut { .. } => ErrorCode::RequestTimedOut,
        BrokerError::NotController { .. } => ErrorCode::NotController,
        BrokerError::InvalidReplicationFactor(_) => ErrorCode::InvalidReplicationFactor,
        BrokerError::ClusterForming { .. } => ErrorCode::ClusterForming,
        BrokerError::Internal(_) => ErrorCode::Internal,
    }
}

fn storage_code(failure: StorageFailure) -> ErrorCode {
    match failure {
        StorageFailure::BatchTooLarge => ErrorCode::BatchTooLarge,
        StorageFailure::TooManyRecords => ErrorCode::TooManyRecords,
        StorageFailure::CorruptBatch | StorageFailure::CorruptLog => ErrorCode::CorruptBatch,
        StorageFailure::InvalidBatch => ErrorCode::InvalidRequest,
        StorageFailure::OffsetOutOfRange => ErrorCode::OffsetOutOfRange,
        StorageFailure::StorageFull => ErrorCode::StorageFull,
        StorageFailure::Closed => ErrorCode::ShuttingDown,
        StorageFailure::ProducerFenced => ErrorCode::InvalidProducerEpoch,
        StorageFailure::OutOfOrderSequence => ErrorCode::OutOfOrderSequenceNumber,
        StorageFailure::Io => ErrorCode::StorageError,
    }
}

pub fn group_code(e: &GroupError) -> ErrorCode {
    match e {
        GroupError::UnknownMember { .. } => ErrorCode::UnknownMemberId,
        GroupError::IllegalGeneration { .. } => ErrorCode::IllegalGeneration,
        GroupError::RebalanceInProgress { .. } => ErrorCode::RebalanceInProgress,
        // Only joins with `require_known_member_id` end here, and native joins never set it.
        GroupError::MemberIdRequired { .. } => ErrorCode::InvalidRequest,
        GroupError::NotEmpty { .. } => ErrorCode::GroupNotEmpty,
        GroupError::NotFound { .. } => ErrorCode::GroupIdNotFound,
        GroupError::InvalidSessionTimeout { .. } => ErrorCode::InvalidSessionTimeout,
        GroupError::InconsistentProtocol { .. } => ErrorCode::InconsistentGroupProtocol,
        GroupError::UnknownTopic { .. } => ErrorCode::UnknownTopicOrPartition,
        GroupError::InvalidGroupId(_) => ErrorCode::InvalidGroupId,
        GroupError::InvalidRequest(_) => ErrorCode::InvalidRequest,
        GroupError::TooManyMembers { .. } => ErrorCode::ResourceExhausted,
        GroupError::CoordinatorNotAvailable(_) => ErrorCode::CoordinatorNotAvailable,
        GroupError::NotCoordinator { .. } | GroupError::NotCoordinatorNode { .. } => {
            ErrorCode::NotCoordinator
        }
        // The native client looks the coordinator up again and retries.
        GroupError::LoadInProgress { .. } => ErrorCode::CoordinatorNotAvailable,
        // As Kafka: the client finds the coordinator again and rejoins.
        GroupError::AssignmentNotStored { .. } => ErrorCode::CoordinatorNotAvailable,
        GroupError::Storage { .. } => ErrorCode::StorageError,
        GroupError::ShuttingDown => ErrorCode::ShuttingDown,
        GroupError::Partition(e) => broker_code(e),
    }
}
