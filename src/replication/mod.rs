//! Replication: every partition is a Raft group whose log is the partition log (DESIGN.md,
//! "Cluster and replication"). This layer holds consensus without IO — raft-rs's `RawNode`
//! driven per group (`group`) with which followers are in sync (`in_sync`), the log it needs (`store`), leader
//! epochs and their file (`epochs`), the log over a partition log (`replica_log`: what raft-rs needs
//! beside the partition's batches, with the writes handed to the caller), what a leader's snapshot
//! carries for a follower behind its log start (`snapshot`), the node-to-node protocol with coalesced heartbeats (`wire`),
//! a seeded generator for everything drawn at random (`rng`) and raft-rs's logging (`logging`).
//! Time, the network and the disk reach it only through its callers, so the simulator
//! (`sim/`, `ringlog-sim`) runs the same code on simulated time from a seed.
//!
//! May depend on `record` (stamping batches) and leaves; never on `shard`, `storage` or glommio.
//! The decisions and what is not built yet: docs/replication.md.

pub mod epochs;
pub mod group;
pub mod in_sync;
pub mod logging;
pub mod quiesce;
pub mod replica_log;
pub mod rng;
pub mod snapshot;
pub mod store;
pub mod wire;

#[allow(
    clippy::all,
    clippy::pedantic,
    unused_imports,
    dead_code,
    deprecated,
    non_camel_case_types,
    mismatched_lifetime_syntaxes,
    unsafe_op_in_unsafe_fn
)]
#[rustfmt::skip]
mod replication_generated;
