//! Messages between shards, carried by glommio's channel mesh.
//!
//! Owns: the message types (everything here is `Send`: owned bytes, `Arc<str>` names, oneshot
//! reply senders). One message carries every item a request has for one shard, so a request
//! costs at most one hop per shard it touches.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::channel::oneshot;

use crate::metadata::{TopicMeta, TopicOverrides};
use crate::protocol::wire::ErrorCode;

/// A per-partition (or per-operation) failure, as it will be reported to the client.
#[derive(Debug, Clone)]
pub struct PartitionError {
    pub code: ErrorCode,
    pub message: String,
    /// `(log_start_offset, high_watermark)` when the error is about an offset, so a consumer
    /// can reset without another round trip.
    pub log_bounds: Option<(i64, i64)>,
}

impl PartitionError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        PartitionError { code, message: message.into(), log_bounds: None }
    }

    pub fn unknown_partition(topic: &str, partition: u32) -> Self {
        PartitionError::new(
            ErrorCode::UnknownTopicOrPartition,
            format!("topic '{topic}' has no partition {partition}"),
        )
    }

    pub fn shutting_down() -> Self {
        PartitionError::new(ErrorCode::ShuttingDown, "the broker is shutting down")
    }
}

/// One partition's batches from a produce request.
pub struct AppendItem {
    pub topic: Arc<str>,
    pub partition: u32,
    pub batches: BytesMut,
}

#[derive(Debug, Clone, Copy)]
pub struct Appended {
    pub base_offset: i64,
    pub log_start_offset: i64,
}

pub type ProduceOutcome = Result<Appended, PartitionError>;

#[derive(Clone)]
pub struct FetchItem {
    pub topic: Arc<str>,
    pub partition: u32,
    pub offset: i64,
    pub max_bytes: usize,
}

pub struct Fetched {
    pub chunks: Vec<Bytes>,
    pub high_watermark: i64,
    pub log_start_offset: i64,
}

impl Fetched {
    pub fn len(&self) -> usize {
        self.chunks.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.iter().all(Bytes::is_empty)
    }
}

pub type FetchOutcome = Result<Fetched, PartitionError>;

pub struct OffsetQuery {
    pub topic: Arc<str>,
    pub partition: u32,
    pub timestamp_ms: i64,
}

/// `(offset, timestamp)`; `None` when no record is at or after the timestamp.
pub type OffsetOutcome = Result<Option<(i64, i64)>, PartitionError>;

/// `(log_start_offset, high_watermark)`.
pub type PartitionState = Option<(i64, i64)>;

pub enum ShardMsg {
    Produce {
        items: Vec<AppendItem>,
        wait: bool,
        reply: oneshot::Sender<Vec<ProduceOutcome>>,
    },
    Fetch {
        items: Vec<FetchItem>,
        reply: oneshot::Sender<Vec<FetchOutcome>>,
    },
    /// Answer once any of the partitions has data at its offset, or after `max_wait_ms`.
    WaitForData {
        items: Vec<FetchItem>,
        max_wait_ms: u64,
        reply: oneshot::Sender<()>,
    },
    ListOffsets {
        items: Vec<OffsetQuery>,
        reply: oneshot::Sender<Vec<OffsetOutcome>>,
    },
    PartitionStates {
        items: Vec<(Arc<str>, u32)>,
        reply: oneshot::Sender<Vec<PartitionState>>,
    },
    /// Controller requests, handled by shard 0 only.
    CreateTopic {
        name: String,
        partitions: u32,
        overrides: TopicOverrides,
        reply: oneshot::Sender<Result<TopicMeta, PartitionError>>,
    },
    DeleteTopic {
        name: String,
        reply: oneshot::Sender<Result<(), PartitionError>>,
    },
    /// From the controller to every shard: a topic now exists; open the partitions you own.
    ApplyTopic {
        topic: Arc<TopicMeta>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Controller request, handled by shard 0 only: raise a topic's partition count.
    CreatePartitions {
        name: String,
        partitions: u32,
        reply: oneshot::Sender<Result<TopicMeta, PartitionError>>,
    },
    /// From the controller to every shard: the topic grows to `topic`'s partitions. Open the new
    /// ones you own (not yet routable) and answer on `opened`; then on `commit` true make them
    /// visible, on false (or a dropped sender) close and remove them; answer on `done`.
    GrowTopic {
        topic: Arc<TopicMeta>,
        opened: oneshot::Sender<Result<(), String>>,
        commit: oneshot::Receiver<bool>,
        done: oneshot::Sender<()>,
    },
    /// Controller request, handled by shard 0 only: a producer id and epoch for Kafka
    /// InitProducerId; `current` is the id and epoch to bump (KIP-360), if the client sent one.
    InitProducerId {
        current: Option<(i64, i16)>,
        reply: oneshot::Sender<Result<(i64, i16), PartitionError>>,
    },
    /// From the controller to every shard: forget the topic; close and remove your partitions.
    RemoveTopic {
        name: Arc<str>,
        reply: oneshot::Sender<()>,
    },
    /// A consumer-group request for the group's coordinator on the receiving shard (for
    /// ListGroups: that shard's share).
    Group {
        request: Box<crate::groups::messages::GroupRequest>,
        reply: oneshot::Sender<crate::groups::messages::GroupOutcome>,
    },
    /// The receiving shard's metrics, for a scrape of the admin listener.
    Metrics {
        reply: oneshot::Sender<crate::metrics::ShardSnapshot>,
    },
}
