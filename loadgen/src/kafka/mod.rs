//! `--protocol kafka`: a minimal async client of the Apache Kafka wire protocol, enough to drive
//! a workload against ringlog's Kafka listener, Apache Kafka or Redpanda alike.
//!
//! Layout: `connection` (one TCP connection: ApiVersions negotiation, pipelined requests, a
//! reader task delivering response frames) → `cluster` (Metadata, CreateTopics, DeleteTopics,
//! ListOffsets: the control plane) → `producer` (RecordBatch v2 batching per partition, one
//! Produce request per leader carrying one batch per partition, a bounded number in flight) and
//! `consumer` (Fetch from each partition's leader, records read straight out of the response).
//! Codecs come from the `kafka-protocol` crate; record batches are built and read with
//! `ringlog::record`. Depends on nothing else in loadgen but `stats` and `message`.
//!
//! Deliberately absent: consumer groups (consumers take explicit partition shares, as the native
//! path does), idempotence, transactions, compression, and retries — a failed produce or fetch is
//! counted as an error in the report rather than hidden.

mod cluster;
mod connection;
mod consumer;
mod producer;

use kafka_protocol::messages::ApiKey;
use kafka_protocol::ResponseError;
use thiserror::Error;

pub use cluster::{Cluster, Layout, TopicSpec, DURABILITY_CONFIG, LATEST_TIMESTAMP};
pub use consumer::Consumer;
pub use producer::{Producer, ProducerSettings};

/// `(api, lowest, highest)` version loadgen speaks. Produce and Fetch stop at 12 and Metadata at
/// 12 because later versions name topics by id only; the rest go as far as the codec does.
const SPOKEN: &[(ApiKey, i16, i16)] = &[
    (ApiKey::ApiVersions, 0, 3),
    (ApiKey::Metadata, 1, 12),
    (ApiKey::CreateTopics, 2, 7),
    (ApiKey::DeleteTopics, 1, 6),
    (ApiKey::ListOffsets, 1, 10),
    (ApiKey::Produce, 3, 12),
    (ApiKey::Fetch, 4, 12),
];

#[derive(Debug, Error)]
pub enum KafkaError {
    #[error("connecting to Kafka broker {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("Kafka broker {addr}: {source}")]
    Io { addr: String, source: std::io::Error },
    #[error("Kafka broker {addr} closed the connection")]
    Closed { addr: String },
    /// The broker's bytes could not be understood (or loadgen's request could not be encoded).
    #[error("Kafka broker {addr}, {api:?} v{version}: {message}")]
    Protocol { addr: String, api: ApiKey, version: i16, message: String },
    #[error(
        "Kafka broker {addr} serves {api:?} at versions {broker_min}..={broker_max}, loadgen speaks \
         {min}..={max}"
    )]
    Unsupported { addr: String, api: ApiKey, broker_min: i16, broker_max: i16, min: i16, max: i16 },
    #[error("Kafka broker {addr} does not serve {api:?} at all (ApiVersions)")]
    Missing { addr: String, api: ApiKey },
    /// An error code in a response, with what it was about.
    #[error("{what}: {}", explain(*.code, .message))]
    Broker { what: String, code: i16, message: Option<String> },
    #[error("{what}: no answer within {seconds} s")]
    Timeout { what: String, seconds: u64 },
    #[error("bootstrap {bootstrap:?}: {message}")]
    Bootstrap { bootstrap: String, message: String },
}

/// A Kafka error code by its protocol name, e.g. `UnknownTopicOrPartition (3)`.
pub fn describe(code: i16) -> String {
    match ResponseError::try_from_code(code) {
        None => "no error (0)".to_string(),
        Some(ResponseError::Unknown(c)) => format!("error code {c}"),
        Some(e) => format!("{e} ({code})"),
    }
}

/// An error code and the broker's message about it, if any.
fn explain(code: i16, message: &Option<String>) -> String {
    match message {
        Some(m) => format!("{} ({m})", describe(code)),
        None => describe(code),
    }
}

pub type Result<T, E = KafkaError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spoken_versions_are_known_to_the_codec() {
        for &(api, min, max) in SPOKEN {
            let known = api.valid_versions();
            assert!(min <= max && known.min <= min && max <= known.max, "{api:?} {min}..={max} vs {known}");
        }
    }

    #[test]
    fn error_codes_read_as_names() {
        assert_eq!(describe(3), "UnknownTopicOrPartition (3)");
        assert_eq!(describe(-2), "error code -2");
        let e = KafkaError::Broker { what: "produce to t/0".into(), code: 6, message: Some("moved".into()) };
        assert_eq!(e.to_string(), "produce to t/0: NotLeaderOrFollower (6) (moved)");
    }
}
