//! ringlog: a thread-per-core event-streaming broker in the Kafka family.
//!
//! Layout, following a produce request: `protocol` (bytes on the wire) → `server` (connections)
//! → `shard` (routing to the owning core) → `storage` (partition logs, segments, indexes).
//! `record` is the Kafka RecordBatch v2 format shared by all of them and by `client`.
//! Everything but `record`, `protocol` and `client` needs the `broker` feature (glommio).

pub mod protocol;
pub mod record;
