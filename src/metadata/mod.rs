//! Topic metadata: which topics exist, their settings, and which shard owns each partition.
//!
//! Owns: the metadata file (`<data_dir>/metadata.json`), the cluster id (`<data_dir>/cluster_id`),
//! topic name rules, and the partition → shard assignment. Control plane only: written by the
//! controller shard (shard 0) on topic create/delete/grow, read by every shard at start. May
//! depend on `config`; never on storage or IO runtimes (plain std file IO, rare and small).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::{BrokerConfig, DurabilitySetting, SEGMENT_BYTES_MIN, TOPIC_NAME_BYTES_MAX};

const METADATA_FILE: &str = "metadata.json";
const METADATA_VERSION: u32 = 1;

#[derive(Debug, Error)]
pub enum MetadataError {
    #[error("metadata file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("metadata file {path} is not valid: {message}")]
    Corrupt { path: PathBuf, message: String },
}

/// Per-topic overrides of the broker defaults; `None` follows the broker's setting.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicOverrides {
    pub segment_bytes: Option<u64>,
    pub segment_ms: Option<u64>,
    pub retention_bytes: Option<i64>,
    pub retention_ms: Option<i64>,
    pub durability: Option<DurabilitySetting>,
}

/// A topic's settings with the broker defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicSettings {
    pub segment_bytes: u64,
    pub segment_ms: u64,
    /// -1 = unlimited
    pub retention_bytes: i64,
    /// -1 = unlimited
    pub retention_ms: i64,
    pub durability: DurabilitySetting,
}

impl TopicOverrides {
    pub fn resolve(&self, broker: &BrokerConfig) -> TopicSettings {
        TopicSettings {
            segment_bytes: self.segment_bytes.unwrap_or(broker.default_segment_bytes),
            segment_ms: self.segment_ms.unwrap_or(broker.default_segment_ms),
            retention_bytes: self.retention_bytes.unwrap_or(broker.default_retention_bytes),
            retention_ms: self.retention_ms.unwrap_or(broker.default_retention_ms),
            durability: self.durability.unwrap_or(broker.default_durability),
        }
    }

    /// Checks the values a client asked for; the message names the setting.
    pub fn validate(&self, broker: &BrokerConfig) -> Result<(), String> {
        if let Some(b) = self.segment_bytes {
            if b < SEGMENT_BYTES_MIN || b < broker.batch_bytes_max as u64 {
                return Err(format!(
                    "segment_bytes {b} is below the minimum ({SEGMENT_BYTES_MIN} and batch_bytes_max {})",
                    broker.batch_bytes_max
                ));
            }
        }
        if self.segment_ms == Some(0) {
            return Err("segment_ms must be at least 1".into());
        }
        for (name, v) in [("retention_bytes", self.retention_bytes), ("retention_ms", self.retention_ms)] {
            if let Some(v) = v {
                if v == 0 || v < -1 {
                    return Err(format!("{name} {v} must be -1 (unlimited) or positive"));
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicMeta {
    pub name: String,
    /// `partition_shards[p]` is the shard that owns partition `p`.
    pub partition_shards: Vec<u32>,
    pub overrides: TopicOverrides,
    pub created_ms: i64,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct MetadataFile {
    version: u32,
    topics: BTreeMap<String, TopicMeta>,
}

/// The persisted set of topics. Only the controller shard mutates it.
#[derive(Debug)]
pub struct MetadataStore {
    path: PathBuf,
    topics: BTreeMap<String, TopicMeta>,
}

impl MetadataStore {
    /// Loads the metadata file (an absent file is an empty broker) and moves partitions of shards
    /// that no longer exist (the broker restarted with fewer shards) onto existing ones.
    pub fn open(data_dir: &Path, shard_count: usize) -> Result<MetadataStore, MetadataError> {
        let path = data_dir.join(METADATA_FILE);
        let topics = match std::fs::read(&path) {
            Ok(bytes) => {
                let file: MetadataFile = serde_json::from_slice(&bytes)
                    .map_err(|e| MetadataError::Corrupt { path: path.clone(), message: e.to_string() })?;
                if file.version != METADATA_VERSION {
                    return Err(MetadataError::Corrupt {
                        path,
                        message: format!(
                            "version {} is not supported (expected {METADATA_VERSION})",
                            file.version
                        ),
                    });
                }
                file.topics
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(MetadataError::Io { path, source }),
        };
        let mut store = MetadataStore { path, topics };
        let mut moved = false;
        let names: Vec<String> = store.topics.keys().cloned().collect();
        for name in names {
            let loads = store.shard_loads(shard_count);
            if let Some(topic) = store.topics.get_mut(&name) {
                if topic.partition_shards.iter().any(|&s| s as usize >= shard_count) {
                    let fresh = assign_partitions(topic.partition_shards.len(), &loads);
                    tracing::warn!(
                        topic = %name,
                        "partitions were owned by shards beyond the {shard_count} now running; reassigned"
                    );
                    topic.partition_shards = fresh;
                    moved = true;
                }
            }
        }
        if moved {
            store.persist()?;
        }
        Ok(store)
    }

    pub fn topics(&self) -> impl Iterator<Item = &TopicMeta> {
        self.topics.values()
    }

    pub fn get(&self, name: &str) -> Option<&TopicMeta> {
        self.topics.get(name)
    }

    pub fn len(&self) -> usize {
        self.topics.len()
    }

    pub fn is_empty(&self) -> bool {
        self.topics.is_empty()
    }

    /// Partitions owned by each shard, across all topics.
    pub fn shard_loads(&self, shard_count: usize) -> Vec<usize> {
        let mut loads = vec![0usize; shard_count];
        for topic in self.topics.values() {
            for &s in &topic.partition_shards {
                if let Some(l) = loads.get_mut(s as usize) {
                    *l += 1;
                }
            }
        }
        loads
    }

    /// Adds a topic and writes the file before returning, so a created topic survives a crash.
    pub fn insert(&mut self, topic: TopicMeta) -> Result<(), MetadataError> {
        self.topics.insert(topic.name.clone(), topic);
        self.persist()
    }

    pub fn remove(&mut self, name: &str) -> Result<Option<TopicMeta>, MetadataError> {
        let removed = self.topics.remove(name);
        if removed.is_some() {
            self.persist()?;
        }
        Ok(removed)
    }

    /// Atomic replace: write a temporary file, fsync it, rename over the old one, fsync the dir.
    fn persist(&self) -> Result<(), MetadataError> {
        let io = |source| MetadataError::Io { path: self.path.clone(), source };
        let file = MetadataFile { version: METADATA_VERSION, topics: self.topics.clone() };
        let bytes = serde_json::to_vec_pretty(&file)
            .map_err(|e| MetadataError::Corrupt { path: self.path.clone(), message: e.to_string() })?;
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        Ok(())
    }
}

/// Chooses an owning shard for each of `partitions` new partitions. Shards are taken least loaded
/// first and then in turn, so one topic's partitions spread evenly over the cores (no shard gets
/// more than one more than another) and the leftover ones go to the emptiest shards.
pub fn assign_partitions(partitions: usize, loads: &[usize]) -> Vec<u32> {
    assert!(!loads.is_empty(), "a broker has at least one shard");
    let mut order: Vec<usize> = (0..loads.len()).collect();
    order.sort_by_key(|&s| (loads[s], s));
    (0..partitions).map(|p| order[p % order.len()] as u32).collect()
}

/// The internal topic holding committed offsets and group metadata (written by the group
/// coordinators only).
pub const OFFSETS_TOPIC: &str = "__consumer_offsets";

/// Whether clients see `name` as internal: listed only when asked for by name, never written,
/// deleted or grown by them.
pub fn is_internal_topic(name: &str) -> bool {
    name == OFFSETS_TOPIC
}

/// Kafka's topic name rules: 1..=249 of `[a-zA-Z0-9._-]`, not `.` or `..`.
pub fn validate_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("topic name is empty".into());
    }
    if name.len() > TOPIC_NAME_BYTES_MAX {
        return Err(format!("topic name is {} bytes, limit is {TOPIC_NAME_BYTES_MAX}", name.len()));
    }
    if name == "." || name == ".." {
        return Err("topic name cannot be '.' or '..'".into());
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!(
            "topic name contains {c:?}; allowed are ASCII letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// The data directory's cluster id: Kafka's form (22 characters, base64url without padding, of a
/// random version-4 UUID), created on first use and kept in `<data_dir>/cluster_id`, so every
/// shard, and the broker after a restart, tells Kafka clients the same id.
pub fn cluster_id(data_dir: &Path) -> Result<String, MetadataError> {
    let path = data_dir.join(CLUSTER_ID_FILE);
    match read_cluster_id(&path) {
        Err(MetadataError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
        other => return other,
    }
    let id =
        random_cluster_id().map_err(|source| MetadataError::Io { path: "/dev/urandom".into(), source })?;
    // Shards may get here at the same time: each writes its own temporary file and links it into
    // place. A link never replaces an existing file, so the first id to land is the one every
    // shard reads back.
    let tmp = data_dir.join(format!("{CLUSTER_ID_FILE}.{id}.tmp"));
    let io = |source| MetadataError::Io { path: path.clone(), source };
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(id.as_bytes())?;
        f.sync_all()?;
        match std::fs::hard_link(&tmp, &path) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        std::fs::File::open(data_dir)?.sync_all()
    })();
    let _ = std::fs::remove_file(&tmp);
    written.map_err(io)?;
    read_cluster_id(&path)
}

const CLUSTER_ID_FILE: &str = "cluster_id";
const CLUSTER_ID_CHARS: usize = 22;

fn read_cluster_id(path: &Path) -> Result<String, MetadataError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| MetadataError::Io { path: path.to_path_buf(), source })?;
    let id = text.trim();
    let base64url = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if id.len() != CLUSTER_ID_CHARS || !id.chars().all(base64url) {
        return Err(MetadataError::Corrupt {
            path: path.to_path_buf(),
            message: format!("'{id}' is not a cluster id ({CLUSTER_ID_CHARS} base64url characters)"),
        });
    }
    Ok(id.to_string())
}

/// A random UUID (version 4) in base64url without padding, as Kafka's `Uuid.randomUuid()`
/// prints it; like Kafka, never one starting with '-', which command-line tools would take for
/// an option.
fn random_cluster_id() -> std::io::Result<String> {
    use std::io::Read;
    let mut urandom = std::fs::File::open("/dev/urandom")?;
    loop {
        let mut uuid = [0u8; 16];
        urandom.read_exact(&mut uuid)?;
        uuid[6] = (uuid[6] & 0x0f) | 0x40;
        uuid[8] = (uuid[8] & 0x3f) | 0x80;
        let id = base64url(&uuid);
        debug_assert_eq!(id.len(), CLUSTER_ID_CHARS);
        if !id.starts_with('-') {
            return Ok(id);
        }
    }
}

/// Base64url (RFC 4648 §5) without padding.
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | ((b as u32) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 0x3f) as usize] as char);
        }
    }
    out
}

/// Directory of one partition's segments.
pub fn partition_dir(data_dir: &Path, topic: &str, partition: u32) -> PathBuf {
    data_dir.join("topics").join(topic).join(partition.to_string())
}

pub fn topic_dir(data_dir: &Path, topic: &str) -> PathBuf {
    data_dir.join("topics").join(topic)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_follow_kafka_rules() {
        assert!(validate_topic_name("post-likes.v1_x").is_ok());
        assert!(validate_topic_name("").is_err());
        assert!(validate_topic_name("..").is_err());
        assert!(validate_topic_name("a/b").is_err());
        assert!(validate_topic_name(&"x".repeat(250)).is_err());
    }

    proptest! {
        #[test]
        fn one_topic_spreads_evenly(partitions in 0usize..200, loads in proptest::collection::vec(0usize..50, 1..8)) {
            let assigned = assign_partitions(partitions, &loads);
            let mut per_shard = vec![0usize; loads.len()];
            for s in assigned { per_shard[s as usize] += 1; }
            let max = per_shard.iter().max().copied().unwrap_or(0);
            let min = per_shard.iter().min().copied().unwrap_or(0);
            prop_assert!(max - min <= 1);
        }
    }

    #[test]
    fn leftovers_go_to_least_loaded() {
        assert_eq!(assign_partitions(1, &[5, 1]), vec![1]);
        assert_eq!(assign_partitions(3, &[5, 1]), vec![1, 0, 1]);
    }

    #[test]
    fn base64url_matches_rfc4648() {
        assert_eq!(base64url(b""), "");
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b"fo"), "Zm8");
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(b"foob"), "Zm9vYg");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
        assert_eq!(base64url(&[0u8; 16]), "AAAAAAAAAAAAAAAAAAAAAA");
    }

    #[test]
    fn cluster_id_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let id = cluster_id(dir.path()).unwrap();
        assert_eq!(id.len(), CLUSTER_ID_CHARS);
        assert!(!id.starts_with('-'));
        assert_eq!(cluster_id(dir.path()).unwrap(), id);
        let leftovers: Vec<_> =
            std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from(CLUSTER_ID_FILE)]);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(cluster_id(other.path()).unwrap(), id);
        std::fs::write(dir.path().join(CLUSTER_ID_FILE), "not an id").unwrap();
        assert!(matches!(cluster_id(dir.path()), Err(MetadataError::Corrupt { .. })));
    }

    #[test]
    fn persists_and_reassigns_missing_shards() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = MetadataStore::open(dir.path(), 4).unwrap();
        store
            .insert(TopicMeta {
                name: "t".into(),
                partition_shards: vec![0, 1, 2, 3],
                overrides: TopicOverrides { retention_ms: Some(5), ..Default::default() },
                created_ms: 1,
            })
            .unwrap();
        let store = MetadataStore::open(dir.path(), 2).unwrap();
        let t = store.get("t").unwrap();
        assert_eq!(t.overrides.retention_ms, Some(5));
        assert!(t.partition_shards.iter().all(|&s| s < 2));
        let again = MetadataStore::open(dir.path(), 2).unwrap();
        assert_eq!(again.get("t"), Some(t));
    }
}
