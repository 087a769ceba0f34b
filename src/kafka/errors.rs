//! ringlog error codes as Kafka error codes.
//!
//! Owns: [`Failure`], and the one mapping from `wire::ErrorCode` (what shards, storage and the
//! group coordinator report) to the Kafka code a Kafka client acts on, chosen so that clients
//! retry, refresh metadata, rebalance or fail exactly as they would against Apache Kafka.

use kafka_protocol::ResponseError as K;

use crate::protocol::wire::ErrorCode;
use crate::shard::mesh::PartitionError;

/// A per-topic or per-partition failure as the client will see it: a Kafka error code and
/// ringlog's message.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Failure {
    pub code: i16,
    pub message: String,
}

impl Failure {
    pub fn new(code: K, message: impl Into<String>) -> Self {
        Failure { code: code.code(), message: message.into() }
    }
}

impl From<PartitionError> for Failure {
    fn from(e: PartitionError) -> Self {
        Failure { code: kafka_code(e.code), message: e.message }
    }
}

/// The Kafka error code for a ringlog error (0 for none).
pub fn kafka_code(code: ErrorCode) -> i16 {
    let k = match code {
        ErrorCode::None => return 0,
        ErrorCode::UnknownTopicOrPartition => K::UnknownTopicOrPartition,
        // One broker owns every partition; a shard mismatch is routed internally, never seen.
        ErrorCode::NotOwner => K::NotLeaderOrFollower,
        ErrorCode::BatchTooLarge => K::MessageTooLarge,
        ErrorCode::CorruptBatch => K::CorruptMessage,
        ErrorCode::InvalidRequest => K::InvalidRequest,
        ErrorCode::UnsupportedVersion => K::UnsupportedVersion,
        // Retriable in Kafka clients, which is what a full limit wants.
        ErrorCode::ResourceExhausted => K::ThrottlingQuotaExceeded,
        ErrorCode::StorageFull => K::KafkaStorageError,
        ErrorCode::OffsetOutOfRange => K::OffsetOutOfRange,
        ErrorCode::TopicAlreadyExists => K::TopicAlreadyExists,
        ErrorCode::InvalidConfig => K::InvalidConfig,
        ErrorCode::InvalidTopicName => K::InvalidTopicException,
        ErrorCode::InvalidPartitions => K::InvalidPartitions,
        ErrorCode::TooManyRecords => K::RecordListTooLarge,
        ErrorCode::RequestTimedOut => K::RequestTimedOut,
        // Kafka clients retry NOT_LEADER on another broker or after a metadata refresh: the
        // behaviour a restarting broker wants.
        ErrorCode::ShuttingDown => K::NotLeaderOrFollower,
        ErrorCode::StorageError => K::KafkaStorageError,
        ErrorCode::Internal => K::UnknownServerError,
        ErrorCode::CoordinatorNotAvailable => K::CoordinatorNotAvailable,
        ErrorCode::NotCoordinator => K::NotCoordinator,
        ErrorCode::IllegalGeneration => K::IllegalGeneration,
        ErrorCode::UnknownMemberId => K::UnknownMemberId,
        ErrorCode::RebalanceInProgress => K::RebalanceInProgress,
        ErrorCode::GroupNotEmpty => K::NonEmptyGroup,
        ErrorCode::GroupIdNotFound => K::GroupIdNotFound,
        ErrorCode::InvalidSessionTimeout => K::InvalidSessionTimeout,
        ErrorCode::InconsistentGroupProtocol => K::InconsistentGroupProtocol,
        ErrorCode::InvalidGroupId => K::InvalidGroupId,
        ErrorCode::OutOfOrderSequenceNumber => K::OutOfOrderSequenceNumber,
        ErrorCode::InvalidProducerEpoch => K::InvalidProducerEpoch,
        _ => K::UnknownServerError,
    };
    k.code()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_kafka_numbers() {
        assert_eq!(kafka_code(ErrorCode::None), 0);
        assert_eq!(kafka_code(ErrorCode::OffsetOutOfRange), 1);
        assert_eq!(kafka_code(ErrorCode::CorruptBatch), 2);
        assert_eq!(kafka_code(ErrorCode::UnknownTopicOrPartition), 3);
        assert_eq!(kafka_code(ErrorCode::BatchTooLarge), 10);
        assert_eq!(kafka_code(ErrorCode::NotCoordinator), 16);
        assert_eq!(kafka_code(ErrorCode::IllegalGeneration), 22);
        assert_eq!(kafka_code(ErrorCode::UnknownMemberId), 25);
        assert_eq!(kafka_code(ErrorCode::RebalanceInProgress), 27);
        assert_eq!(kafka_code(ErrorCode::OutOfOrderSequenceNumber), 45);
        assert_eq!(kafka_code(ErrorCode::InvalidProducerEpoch), 47);
    }
}
