//! Workloads: what a run does, from defaults, a TOML file (`--workload FILE`) and flags, in that
//! order of precedence. The resolved workload is echoed in the JSON report.
//!
//! Owns: every workload option, its default, its validation. Pure; no I/O but reading the file.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::LoadgenError;

/// The smallest message: the 16-byte header carrying the send time (see `message`).
pub const MESSAGE_BYTES_MIN: usize = crate::message::HEADER_BYTES;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// ringlog's native protocol, shard-aware through the ringlog client.
    Native,
    /// The Apache Kafka wire protocol: ringlog's Kafka listener, Apache Kafka or Redpanda.
    Kafka,
}

/// Acknowledgement level of produce requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Acks {
    #[serde(rename = "0")]
    None,
    #[serde(rename = "1")]
    Leader,
    #[serde(rename = "all")]
    All,
}

impl Acks {
    pub fn to_wire(self) -> i8 {
        match self {
            Acks::None => ringlog::protocol::ACKS_NONE,
            Acks::Leader => ringlog::protocol::ACKS_LEADER,
            Acks::All => ringlog::protocol::ACKS_ALL,
        }
    }
}

impl std::str::FromStr for Acks {
    type Err = String;
    fn from_str(s: &str) -> Result<Acks, String> {
        match s {
            "0" => Ok(Acks::None),
            "1" => Ok(Acks::Leader),
            "all" | "-1" => Ok(Acks::All),
            other => Err(format!("acks must be 0, 1 or all, not {other:?}")),
        }
    }
}

/// Record keys: none, a fresh random key per message, or keys drawn from a space of N keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "KeysRepr", into = "KeysRepr")]
pub enum Keys {
    None,
    Random,
    Space(u64),
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum KeysRepr {
    Name(String),
    Space(u64),
}

impl TryFrom<KeysRepr> for Keys {
    type Error = String;
    fn try_from(r: KeysRepr) -> Result<Keys, String> {
        match r {
            KeysRepr::Name(s) => s.parse(),
            KeysRepr::Space(0) => Err("a key space needs at least 1 key".into()),
            KeysRepr::Space(n) => Ok(Keys::Space(n)),
        }
    }
}

impl From<Keys> for KeysRepr {
    fn from(k: Keys) -> KeysRepr {
        match k {
            Keys::None => KeysRepr::Name("none".into()),
            Keys::Random => KeysRepr::Name("random".into()),
            Keys::Space(n) => KeysRepr::Space(n),
        }
    }
}

impl std::str::FromStr for Keys {
    type Err = String;
    fn from_str(s: &str) -> Result<Keys, String> {
        match s {
            "none" => Ok(Keys::None),
            "random" => Ok(Keys::Random),
            n => match n.parse::<u64>() {
                Ok(0) | Err(_) => {
                    Err(format!("keys must be none, random or a key-space size ≥ 1, not {n:?}"))
                }
                Ok(n) => Ok(Keys::Space(n)),
            },
        }
    }
}

/// Per-topic settings for the topics the run creates; unset means the broker's default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopicConfig {
    /// `fsync` or `written` (ringlog's durability policy).
    pub durability: Option<String>,
    pub segment_bytes: Option<i64>,
    pub retention_bytes: Option<i64>,
    pub retention_ms: Option<i64>,
    /// Kafka protocol only: the CreateTopics replication factor; unset = -1, the broker's
    /// default. ringlog keeps one replica (its native protocol has no such setting).
    pub replication_factor: Option<i16>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Workload {
    /// A label for reports and topic names.
    pub name: String,
    pub protocol: Protocol,
    pub topics: u32,
    /// Partitions per topic.
    pub partitions: u32,
    /// Message value size in bytes; with `message_size_max`, the smallest of a uniform range.
    pub message_size: usize,
    pub message_size_max: Option<usize>,
    pub keys: Keys,
    /// Producers per topic, each its own client (connections and batching).
    pub producers: u32,
    /// Consumers per topic and consumer group; a group's consumers split the topic's partitions.
    pub consumers: u32,
    /// Independent consumer groups, each reading every message once.
    pub consumer_groups: u32,
    /// Target produce rate over all producers, messages per second; 0 = as fast as possible.
    pub rate: f64,
    /// Measured time after the warm-up, seconds.
    pub duration_s: f64,
    /// Time before measuring starts (traffic flows, nothing is recorded), seconds.
    pub warmup_s: f64,
    pub acks: Acks,
    /// Producer batch size and linger (client batching).
    pub batch_bytes: usize,
    pub linger_ms: u64,
    /// How long consumers may take after the producers stop to read everything that was produced.
    pub drain_timeout_s: f64,
    /// Backlog drain (OpenMessaging Benchmark's backlog test) when above 0: the producers write
    /// this many bytes of message values first while no consumer reads, then the consumers start
    /// from the beginning and read it all; the report's consume rate is the drain rate.
    /// `duration_s` and `warmup_s` do not apply.
    pub backlog_bytes: u64,
    pub topic_config: TopicConfig,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            name: "adhoc".into(),
            protocol: Protocol::Native,
            topics: 1,
            partitions: 1,
            message_size: 1024,
            message_size_max: None,
            keys: Keys::None,
            producers: 1,
            consumers: 1,
            consumer_groups: 1,
            rate: 0.0,
            duration_s: 10.0,
            warmup_s: 2.0,
            acks: Acks::Leader,
            batch_bytes: 256 << 10,
            linger_ms: 1,
            drain_timeout_s: 30.0,
            backlog_bytes: 0,
            topic_config: TopicConfig::default(),
        }
    }
}

impl Workload {
    pub fn from_file(path: &Path) -> Result<Workload, LoadgenError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadgenError::Io {
            what: format!("reading workload {}", path.display()),
            source,
        })?;
        toml::from_str(&text)
            .map_err(|e| LoadgenError::Workload(format!("{}: {}", path.display(), e.to_string().trim())))
    }

    pub fn validate(&self) -> Result<(), LoadgenError> {
        let bad = |m: String| Err(LoadgenError::Workload(m));
        if self.topics == 0 || self.partitions == 0 {
            return bad("topics and partitions must be at least 1".into());
        }
        if self.backlog_bytes > 0 && (self.consumers == 0 || self.producers == 0) {
            return bad(
                "a backlog drain (backlog_bytes) needs producers to write it and consumers to read it".into(),
            );
        }
        if self.message_size < MESSAGE_BYTES_MIN {
            return bad(format!(
                "message_size {} is below {MESSAGE_BYTES_MIN} bytes (each message carries a 16-byte send-time header)",
                self.message_size
            ));
        }
        if let Some(max) = self.message_size_max {
            if max < self.message_size {
                return bad(format!("message_size_max {max} is below message_size {}", self.message_size));
            }
        }
        if self.producers == 0 {
            return bad("producers must be at least 1".into());
        }
        if self.consumers > 0 && self.consumer_groups == 0 {
            return bad("consumer_groups must be at least 1 when there are consumers".into());
        }
        if !(self.rate >= 0.0 && self.rate.is_finite()) {
            return bad(format!(
                "rate must be 0 (max) or a positive number of messages/s, not {}",
                self.rate
            ));
        }
        if !(self.duration_s > 0.0 && self.duration_s.is_finite()) {
            return bad("duration must be positive".into());
        }
        if !(self.warmup_s >= 0.0 && self.warmup_s.is_finite()) {
            return bad("warmup must not be negative".into());
        }
        match (self.protocol, self.topic_config.replication_factor) {
            (_, None) | (Protocol::Kafka, Some(-1)) => {}
            (Protocol::Native, Some(r)) => {
                return bad(format!(
                    "topic_config.replication_factor {r}: only --protocol kafka creates topics with a \
                     replication factor (ringlog's native protocol creates single-replica topics)"
                ))
            }
            (Protocol::Kafka, Some(r)) if r < 1 => {
                return bad(format!(
                    "topic_config.replication_factor must be -1 (broker default) or ≥ 1, not {r}"
                ))
            }
            (Protocol::Kafka, Some(_)) => {}
        }
        if let Some(d) = &self.topic_config.durability {
            if d != "fsync" && d != "written" {
                return bad(format!("topic_config.durability must be fsync or written, not {d:?}"));
            }
        }
        Ok(())
    }

    pub fn size_range(&self) -> (usize, usize) {
        (self.message_size, self.message_size_max.unwrap_or(self.message_size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_workloads_parse_and_validate() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let w = Workload::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            w.validate().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
        assert!(seen >= 7, "the standard workloads ship");
    }

    #[test]
    fn keys_and_acks_parse_in_every_form() {
        let w: Workload = toml::from_str("keys = 1000\nacks = \"all\"").unwrap();
        assert_eq!((w.keys, w.acks), (Keys::Space(1000), Acks::All));
        let w: Workload = toml::from_str("keys = \"random\"\nacks = \"0\"").unwrap();
        assert_eq!((w.keys, w.acks), (Keys::Random, Acks::None));
        assert!(toml::from_str::<Workload>("keys = 0").is_err());
        assert!(toml::from_str::<Workload>("partition = 3").is_err(), "typos are refused");
        assert_eq!("none".parse::<Keys>(), Ok(Keys::None));
        assert!("x".parse::<Acks>().is_err());
    }

    #[test]
    fn replication_factor_is_a_kafka_setting() {
        let mut w: Workload =
            toml::from_str("protocol = \"kafka\"\n[topic_config]\nreplication_factor = 3").unwrap();
        w.validate().unwrap();
        w.topic_config.replication_factor = Some(0);
        assert!(w.validate().unwrap_err().to_string().contains("-1"));
        w.protocol = Protocol::Native;
        w.topic_config.replication_factor = Some(3);
        assert!(w.validate().unwrap_err().to_string().contains("--protocol kafka"));
    }

    #[test]
    fn too_small_messages_are_refused() {
        let w = Workload { message_size: 8, ..Workload::default() };
        assert!(w.validate().unwrap_err().to_string().contains("16-byte"));
    }
}
