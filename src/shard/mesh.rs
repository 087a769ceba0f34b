//! Messages between shards, carried by glommio's channel mesh.
//!
//! Owns: the message types (everything here is `Send`: owned bytes, `Arc<str>` names, oneshot
//! reply senders). One message carries every item a request has for one shard, so a request
//! costs at most one hop per shard it touches. The produce/fetch path has typed messages; the
//! control plane of the layers above sends closures (`Invoke`), so this module never names them.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::channel::oneshot;

pub use super::error::BrokerError;
pub use crate::replication::epochs::EpochEnd;

/// One partition's batches from a produce request.
pub struct AppendItem {
    pub topic: Arc<str>,
    pub partition: u32,
    pub batches: BytesMut,
    /// How long a replicated partition's write may wait for its commit (Kafka produce's
    /// `timeout_ms`); `None`: the broker's `replication_timeout_ms`, which also caps it.
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone, Copy)]
pub struct Appended {
    pub base_offset: i64,
    pub log_start_offset: i64,
}

pub type ProduceOutcome = Result<Appended, BrokerError>;

/// What a Kafka client says it knows of a partition's leader epochs (KIP-320), checked by the
/// partition's owner before it answers; the native protocol says nothing (`default`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientEpochs {
    /// The leader epoch the client's metadata names: an older one is fenced, a newer one unknown.
    pub current_leader: Option<u64>,
    /// Fetch only: the epoch of the last batch the client read, before the fetch offset; the
    /// owner answers a diverging epoch when its log disagrees.
    pub last_fetched: Option<u64>,
}

#[derive(Clone)]
pub struct FetchItem {
    pub topic: Arc<str>,
    pub partition: u32,
    pub offset: i64,
    pub max_bytes: usize,
    pub epochs: ClientEpochs,
}

pub struct Fetched {
    pub chunks: Vec<Bytes>,
    pub high_watermark: i64,
    pub log_start_offset: i64,
    /// Set, with no data, when the client's log diverged from this one (`ClientEpochs::
    /// last_fetched`): the epoch and end offset it must truncate to.
    pub diverging_epoch: Option<(u64, i64)>,
}

impl Fetched {
    pub fn len(&self) -> usize {
        self.chunks.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.iter().all(Bytes::is_empty)
    }
}

pub type FetchOutcome = Result<Fetched, BrokerError>;

pub struct OffsetQuery {
    pub topic: Arc<str>,
    pub partition: u32,
    pub timestamp_ms: i64,
    /// The client's current leader epoch, checked as a fetch's is.
    pub current_leader_epoch: Option<u64>,
}

/// An offset a lookup found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FoundOffset {
    pub offset: i64,
    /// The record's timestamp; -1 for the log's ends.
    pub timestamp: i64,
    /// The leader epoch that wrote the offset (for the log end, the leader's), when known.
    pub leader_epoch: Option<u64>,
}

/// `None` when no record is at or after the timestamp.
pub type OffsetOutcome = Result<Option<FoundOffset>, BrokerError>;

/// Kafka's OffsetForLeaderEpoch question about one partition.
pub struct EpochQuery {
    pub topic: Arc<str>,
    pub partition: u32,
    pub current_leader_epoch: Option<u64>,
    /// The epoch whose end is asked for; `None` (Kafka's -1) has no answer.
    pub leader_epoch: Option<u64>,
}

pub type EpochEndOutcome = Result<EpochEnd, BrokerError>;

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
    /// Work of a layer above the shard (the controller, group coordinators, metrics scrapes) to
    /// run on the receiving shard: see `Shard::invoke_on`. Boxed, so it is for the control plane;
    /// the data plane has the typed messages above.
    Invoke(Invocation),
}

/// A closure that runs on the receiving shard with that shard's `Rc<Shard>`.
pub type Invocation = Box<dyn FnOnce(std::rc::Rc<super::Shard>) + Send>;
