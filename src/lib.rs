//! ringlog: a thread-per-core event-streaming broker in the Kafka family.
//!
//! Layout, following a produce request: `protocol` (bytes on the wire) → `server` (connections,
//! native request dispatch; `kafka` decodes and answers the Apache Kafka protocol) → `shard` (routing to the owning core, controller) → `storage` (partition
//! logs, segments, indexes). `metadata` holds topics and partition ownership; `config` every
//! option. `record` is the Kafka RecordBatch v2 format shared by all of them and by `client`.
//! Everything but `record`, `protocol`, `client` and `cli` needs the `broker` feature (glommio).

pub mod cli;
pub mod client;
pub mod protocol;
pub mod record;

#[cfg(feature = "broker")]
pub mod config;
#[cfg(feature = "broker")]
pub mod groups;
#[cfg(feature = "broker")]
pub mod kafka;
#[cfg(feature = "broker")]
pub mod metadata;
#[cfg(feature = "broker")]
pub mod metrics;
#[cfg(feature = "broker")]
pub mod server;
#[cfg(feature = "broker")]
pub mod shard;
#[cfg(feature = "broker")]
pub mod storage;
