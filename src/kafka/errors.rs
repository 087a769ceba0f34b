//! The broker's errors as Kafka error codes: the one table of this protocol.
//!
//! Owns: [`Failure`], and the mapping from [`BrokerError`] (what shards, storage and the
//! controller report) and [`GroupError`] (what a group coordinator reports) to the Kafka code a
//! Kafka client acts on, chosen so that clients retry, refresh metadata, rebalance or fail
//! exactly as they would against Apache Kafka.

use kafka_protocol::ResponseError as K;

use crate::groups::messages::GroupError;
use crate::shard::{BrokerError, StorageFailure};

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

impl From<BrokerError> for Failure {
    fn from(e: BrokerError) -> Self {
        Failure { code: broker_code(&e), message: e.to_string() }
    }
}

/// The Kafka code for a broker error.
pub fn broker_code(e: &BrokerError) -> i16 {
    let k = match e {
        BrokerError::UnknownTopic { .. } | BrokerError::UnknownPartition { .. } => K::UnknownTopicOrPartition,
        BrokerError::InternalTopic { .. } | BrokerError::InvalidTopicName(_) => K::InvalidTopicException,
        BrokerError::ControlBatch { .. } => K::InvalidRecord,
        // Kafka answers TRANSACTIONAL_ID_AUTHORIZATION_FAILED when it will not let a producer
        // write transactionally; clients treat it as fatal (no retry loop) and surface the
        // message, which is what a producer configured for transactions should see here.
        BrokerError::TransactionalBatch { .. } => K::TransactionalIdAuthorizationFailed,
        BrokerError::InvalidRequest(_) => K::InvalidRequest,
        BrokerError::InvalidPartitions(_) => K::InvalidPartitions,
        BrokerError::InvalidConfig(_) => K::InvalidConfig,
        BrokerError::TopicAlreadyExists { .. } => K::TopicAlreadyExists,
        // Retriable in Kafka clients, which is what a full limit wants.
        BrokerError::TooManyTopics { .. } => K::ThrottlingQuotaExceeded,
        BrokerError::PartitionBudget { .. } => K::ThrottlingQuotaExceeded,
        e @ (BrokerError::OpenFailed { .. } | BrokerError::RolledBack { .. })
            if e.is_out_of_descriptors() =>
        {
            K::ThrottlingQuotaExceeded
        }
        BrokerError::OpenFailed { .. }
        | BrokerError::RolledBack { .. }
        | BrokerError::ControllerFile { .. } => K::KafkaStorageError,
        BrokerError::Storage { failure, .. } => storage_code(*failure),
        // Kafka clients retry NOT_LEADER on another broker or after a metadata refresh: the
        // behaviour a restarting broker wants.
        BrokerError::ShuttingDown | BrokerError::NotLeader { .. } => K::NotLeaderOrFollower,
        BrokerError::FencedLeaderEpoch { .. } => K::FencedLeaderEpoch,
        BrokerError::UnknownLeaderEpoch { .. } => K::UnknownLeaderEpoch,
        BrokerError::OffsetNotAvailable { .. } => K::OffsetNotAvailable,
        BrokerError::ReplicationTimedOut { .. } => K::RequestTimedOut,
        BrokerError::NotController { .. } => K::NotController,
        BrokerError::InvalidReplicationFactor(_) => K::InvalidReplicationFactor,
        // Nodes just started, not registered with the controller yet. Kafka's KRaft controller
        // would answer INVALID_REPLICATION_FACTOR, which clients take as final; a Kafka client
        // seldom meets it, because a Kafka broker opens its listeners only once it has registered,
        // while a ringlog node takes requests before the controller knows it. What happened is a
        // bounded wait that ran out with nothing changed: Kafka answers a CreateTopics its
        // controller could not finish within the request's timeout with REQUEST_TIMED_OUT, which
        // every Kafka client classes as retriable (Java's TimeoutException is a
        // RetriableException; librdkafka and kafkajs mark it retriable), and the message names the
        // missing nodes. Not NOT_CONTROLLER or THROTTLING_QUOTA_EXCEEDED, which some admin clients
        // retry by themselves: the first sends them looking for another controller, the second
        // says they are throttled; neither is what happened.
        BrokerError::ClusterForming { .. } => K::RequestTimedOut,
        BrokerError::Internal(_) => K::UnknownServerError,
    };
    k.code()
}

fn storage_code(failure: StorageFailure) -> K {
    match failure {
        StorageFailure::BatchTooLarge => K::MessageTooLarge,
        StorageFailure::TooManyRecords => K::RecordListTooLarge,
        StorageFailure::CorruptBatch | StorageFailure::CorruptLog => K::CorruptMessage,
        StorageFailure::InvalidBatch => K::InvalidRequest,
        StorageFailure::OffsetOutOfRange => K::OffsetOutOfRange,
        StorageFailure::Closed => K::NotLeaderOrFollower,
        StorageFailure::ProducerFenced => K::InvalidProducerEpoch,
        StorageFailure::OutOfOrderSequence => K::OutOfOrderSequenceNumber,
        StorageFailure::StorageFull | StorageFailure::Io => K::KafkaStorageError,
    }
}

/// The Kafka code for a failed group request.
pub fn group_code(e: &GroupError) -> i16 {
    let k = match e {
        GroupError::UnknownMember { .. } => K::UnknownMemberId,
        GroupError::IllegalGeneration { .. } => K::IllegalGeneration,
        GroupError::RebalanceInProgress { .. } => K::RebalanceInProgress,
        GroupError::MemberIdRequired { .. } => K::MemberIdRequired,
        GroupError::NotEmpty { .. } => K::NonEmptyGroup,
        GroupError::NotFound { .. } => K::GroupIdNotFound,
        GroupError::InvalidSessionTimeout { .. } => K::InvalidSessionTimeout,
        GroupError::InconsistentProtocol { .. } => K::InconsistentGroupProtocol,
        GroupError::UnknownTopic { .. } => K::UnknownTopicOrPartition,
        GroupError::InvalidGroupId(_) => K::InvalidGroupId,
        GroupError::InvalidRequest(_) => K::InvalidRequest,
        // Kafka's answer when group.max.size is reached.
        GroupError::TooManyMembers { .. } => K::GroupMaxSizeReached,
        // Within one node a shard that cannot serve right now is an unavailable coordinator,
        // which clients retry.
        // A cluster's coordinator is the leader of the group's offsets partition: elsewhere, the
        // client looks it up again; on a leader still replaying it, the client waits and retries.
        GroupError::NotCoordinatorNode { .. } => K::NotCoordinator,
        GroupError::LoadInProgress { .. } => K::CoordinatorLoadInProgress,
        GroupError::CoordinatorNotAvailable(_)
        | GroupError::NotCoordinator { .. }
        | GroupError::ShuttingDown
        | GroupError::Storage { .. }
        // Kafka's answer to a SyncGroup whose group record failed to store: the client finds
        // the coordinator again and rejoins.
        | GroupError::AssignmentNotStored { .. } => K::CoordinatorNotAvailable,
        GroupError::Partition(e) => return broker_code(e),
    };
    k.code()
}

/// The Kafka code for one partition's failed commit: as Kafka does with a failed append to its
/// offsets topic, retriable (COORDINATOR_NOT_AVAILABLE), never fatal.
pub fn commit_code(e: &GroupError) -> i16 {
    match e {
        GroupError::Partition(BrokerError::Storage { .. } | BrokerError::ShuttingDown) => {
            K::CoordinatorNotAvailable.code()
        }
        e => group_code(e),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::storage::StorageError;

    fn group() -> String {
        "g".into()
    }

    #[test]
    fn codes_match_kafka_numbers() {
        let storage = |e: StorageError| BrokerError::storage(&Arc::from("t"), 0, e);
        let out_of_range = StorageError::OffsetOutOfRange { requested: 9, log_start: 0, high_watermark: 1 };
        assert_eq!(broker_code(&storage(out_of_range)), 1);
        assert_eq!(broker_code(&BrokerError::UnknownTopic { topic: group() }), 3);
        assert_eq!(broker_code(&BrokerError::unknown_partition("t", 7)), 3);
        assert_eq!(broker_code(&BrokerError::ControlBatch { position: 0 }), 87);
        assert_eq!(broker_code(&BrokerError::TransactionalBatch { position: 0 }), 53);
        assert_eq!(broker_code(&BrokerError::ShuttingDown), 6);
        let forming = BrokerError::ClusterForming {
            topic: group(),
            replication_factor: 3,
            registered: vec![1],
            missing: vec![2, 3],
            waited_ms: 10,
        };
        assert_eq!(broker_code(&forming), 7, "REQUEST_TIMED_OUT, retriable");
        assert_eq!(broker_code(&storage(StorageError::Closed)), 6);
        assert_eq!(group_code(&GroupError::NotCoordinator { group: group(), shard: 1 }), 15);
        assert_eq!(group_code(&GroupError::ShuttingDown), 15);
        let failed = GroupError::Storage { group: group(), source: BrokerError::ShuttingDown };
        assert_eq!(group_code(&failed), 15);
        let void = GroupError::AssignmentNotStored {
            group: group(),
            generation: 3,
            source: Box::new(failed.clone()),
        };
        assert_eq!(group_code(&void), 15);
        assert_eq!(group_code(&GroupError::TooManyMembers { group: group(), members: 3 }), 81);
        assert_eq!(group_code(&GroupError::UnknownMember { group: group(), member: group() }), 25);
        assert_eq!(
            group_code(&GroupError::IllegalGeneration { group: group(), generation: 1, current: 2 }),
            22
        );
        assert_eq!(group_code(&GroupError::RebalanceInProgress { group: group() }), 27);
        assert_eq!(group_code(&GroupError::MemberIdRequired { group: group(), member: group() }), 79);
        assert_eq!(group_code(&GroupError::NotEmpty { group: group(), members: 1 }), 68);
        assert_eq!(group_code(&GroupError::NotFound { group: group() }), 69);
        assert_eq!(group_code(&GroupError::InvalidGroupId(String::new())), 24);
        assert_eq!(commit_code(&failed), 15);
        assert_eq!(commit_code(&GroupError::Partition(storage(StorageError::Closed))), 15);
        assert_eq!(commit_code(&GroupError::Partition(BrokerError::UnknownTopic { topic: group() })), 3);
    }
}
