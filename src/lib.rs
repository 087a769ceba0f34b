//! ringlog: a thread-per-core event-streaming broker in the Kafka family.
//!
//! Layers, top to bottom; a module depends only on modules below it:
//!
//! - `broker`: process start-up, signals, wiring of listeners and shards, the admin listener.
//! - `native`, `kafka`: the two wire protocols, side by side (decode, call the shard API, encode;
//!   each maps the broker's errors to its own codes in one table).
//! - `server`: listeners, connections, the `Protocol` trait, the copy-free writer.
//! - `groups`: consumer-group coordinators.
//! - `controller`: topic lifecycle and producer ids (shard 0), over the metadata store.
//! - `shard`: routing to the owning core, the mesh, owner-side operations, the rules both
//!   protocols apply, and `BrokerError`.
//! - `storage`: partition logs, segments, indexes.
//! - `replication`: consensus per partition (raft-rs driven sans-IO), leader epochs, the
//!   node-to-node protocol; no IO of its own, so the simulator (`sim/`) runs it on simulated time.
//! - leaves: `metadata` (topics, partition ownership, the metadata file), `metrics`, `config`,
//!   `allocator` (the hook by which idle shards return freed memory), `record` (the Kafka
//!   RecordBatch v2 format, shared with `client`), `protocol` (native wire).
//!
//! Everything but `record`, `protocol`, `client` and `cli` needs the `broker` feature (glommio).

pub mod cli;
pub mod client;
pub mod protocol;
pub mod record;

#[cfg(feature = "broker")]
pub mod allocator;
#[cfg(feature = "broker")]
pub mod broker;
#[cfg(feature = "broker")]
pub mod cluster;
#[cfg(feature = "broker")]
pub mod config;
#[cfg(feature = "broker")]
pub mod controller;
#[cfg(feature = "broker")]
pub mod groups;
#[cfg(feature = "broker")]
pub mod kafka;
#[cfg(feature = "broker")]
pub mod metadata;
#[cfg(feature = "broker")]
pub mod metrics;
#[cfg(feature = "broker")]
pub mod native;
#[cfg(feature = "broker")]
pub mod replication;
#[cfg(feature = "broker")]
pub mod server;
#[cfg(feature = "broker")]
pub mod shard;
#[cfg(feature = "broker")]
pub mod storage;
