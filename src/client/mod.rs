//! The native ringlog client for ordinary tokio applications: admin, producer, consumer, group
//! consumer.
//!
//! Owns: everything a client process needs to talk to brokers over the native protocol.
//! May depend on `protocol` and `record` only; never on glommio, `storage`, `shard` or `server`
//! (it builds with `--no-default-features`).
//!
//! Layout: `connection` (one pipelined TCP connection) → `cluster` (metadata cache: partition →
//! owning shard → that shard's direct endpoint, and a connection pool) → `admin`, `producer`,
//! `consumer`. Producers and consumers send each partition's traffic straight to the shard that
//! owns it, so the broker never has to hop between cores for them. `group` speaks the consumer-
//! group protocol to a group's coordinator shard; `group_consumer` is a `Consumer` whose
//! partitions come from a group, with heartbeats and committed offsets.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ringlog::client::ClientError> {
//! use ringlog::client::*;
//! let config = ClientConfig::new("127.0.0.1:9292");
//! let producer = Producer::connect(config.clone(), ProducerConfig::default()).await?;
//! let delivery = producer.send("events", None, bytes::Bytes::from_static(b"hello")).await?;
//! producer.flush().await;
//! let written = delivery.await?;
//! let mut consumer = Consumer::connect(config, ConsumerConfig::default()).await?;
//! consumer.assign(vec![("events".into(), written.partition)]);
//! consumer.seek("events", written.partition, Offset::At(written.offset))?;
//! let records = consumer.poll(std::time::Duration::from_secs(1)).await?;
//! # Ok(()) }
//! ```

mod admin;
mod cluster;
mod connection;
mod consumer;
mod error;
mod group;
mod group_consumer;
mod partitioner;
mod producer;

use std::time::Duration;

pub use admin::{
    Admin, Durability, ListedOffset, OffsetSpec, PartitionInfo, ReplicaInfo, TopicDescription, TopicSettings,
};
pub use connection::{Connection, ResponseFrame, RESPONSE_FRAME_BYTES_MAX};
pub use consumer::{Consumer, ConsumerConfig, ConsumerRecord, Offset};
pub use error::{ClientError, ProduceError, Result};
pub use group::{
    CommittedOffset, GroupCoordinator, GroupDescription, GroupListing, GroupMember, JoinRequest, JoinedGroup,
    JoinedMember, MemberAssignment, OffsetToCommit, ResetTarget, TopicPartitions, CONSUMER_PROTOCOL_TYPE,
};
pub use group_consumer::{
    Assignor, GroupConsumer, GroupConsumerConfig, OffsetReset, RebalanceListener, RevokeCommit,
};
pub use partitioner::{key_partition, murmur2, Partitioner};
pub use producer::{DeliveryFuture, Producer, ProducerConfig, RecordMetadata};

/// The default broker address, as `ringlog serve` listens by default.
pub const DEFAULT_BOOTSTRAP: &str = "127.0.0.1:9292";

/// How to reach the cluster.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// "host:port" of any broker listener; the rest is learned from metadata.
    pub bootstrap: String,
    /// Sent in the handshake; shows up in the broker's logs.
    pub client_id: String,
    /// How long to wait for a connection or a response (a fetch's `max_wait` is capped to half).
    pub request_timeout: Duration,
}

impl ClientConfig {
    pub fn new(bootstrap: impl Into<String>) -> ClientConfig {
        ClientConfig { bootstrap: bootstrap.into(), ..ClientConfig::default() }
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            bootstrap: DEFAULT_BOOTSTRAP.to_owned(),
            client_id: "ringlog-client".to_owned(),
            request_timeout: Duration::from_secs(30),
        }
    }
}
