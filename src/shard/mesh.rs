//! Messages between shards, carried by glommio's channel mesh.
//!
//! Owns: the message types (everything here is `Send`: owned bytes, `Arc<str>` names, oneshot
//! reply senders). One message carries every item a request has for one shard, so a request
//! costs at most one hop per shard it touches. The produce/fetch path has typed messages; the
//! control plane of the layers above sends closures (`Invoke`), so this module never names them.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::channel::oneshot;

pub use super::error::BrokerError;

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

pub type ProduceOutcome = Result<Appended, BrokerError>;

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

pub type FetchOutcome = Result<Fetched, BrokerError>;

pub struct OffsetQuery {
    pub topic: Arc<str>,
    pub partition: u32,
    pub timestamp_ms: i64,
}

/// `(offset, timestamp)`; `None` when no record is at or after the timestamp.
pub type OffsetOutcome = Result<Option<(i64, i64)>, BrokerError>;

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
