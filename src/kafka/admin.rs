//! Kafka admin APIs: Metadata (0..=9), CreateTopics (2..=7), DeleteTopics (1..=5),
//! CreatePartitions (0..=3), DescribeConfigs (1..=4), and automatic topic creation.
//!
//! Owns: the cluster Kafka clients see (a single broker: node 0, leader of every partition at
//! epoch 0, the only replica and the whole ISR; a node of a cluster: every registered node, and
//! each replicated partition's leader and epoch), the mapping between Kafka topic configs
//! (`retention.ms`, ...) and ringlog's `TopicOverrides`, and the broker configs Kafka clients can
//! read. Topic changes go through `cluster::create_any_topic`, `delete_any_topic` and
//! `grow_any_topic` (a cluster's controller log, or this node's `controller`). Each handler
//! finishes its work before returning, so a request that follows on the same connection sees
//! the effect, as with Kafka, which serves one request per connection at a time. May depend on
//! `shard`, `metadata`, `server` (replies), `config` and `cluster` (topic changes; what a node of
//! a cluster reports: nodes, leaders); never on storage.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;

use futures::future::FutureExt;
use kafka_protocol::messages::create_partitions_response::CreatePartitionsTopicResult;
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::create_topics_response::{CreatableTopicConfigs, CreatableTopicResult};
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::describe_configs_request::DescribeConfigsResource;
use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResult, DescribeConfigsSynonym,
};
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::{
    BrokerId, CreatePartitionsRequest, CreatePartitionsResponse, CreateTopicsRequest, CreateTopicsResponse,
    DeleteTopicsRequest, DeleteTopicsResponse, DescribeConfigsRequest, DescribeConfigsResponse,
    MetadataRequest, MetadataResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;

use super::codec::{respond, RequestContext};
use super::errors::Failure;
use crate::cluster::ChangeWait;
use crate::config::{BrokerConfig, DurabilitySetting, SEGMENT_BYTES_MIN};
use crate::metadata::{self, TopicOverrides};
use crate::server::{Boxed, Reply};
use crate::shard::replicated::LeaderView;
use crate::shard::BrokerError;
use crate::shard::{Shard, TopicView};

/// The one broker's node id: leader, only replica and controller of everything.
const NODE_ID: i32 = 0;

/// This broker's Kafka node id: its cluster node id in a cluster, else 0 (a single broker).
pub(super) fn node_id(config: &BrokerConfig) -> i32 {
    if config.seeds.trim().is_empty() {
        NODE_ID
    } else {
        i32::try_from(config.node_id).unwrap_or(i32::MAX)
    }
}

/// Reserved for Kafka's transaction coordinator; ringlog has none yet, and a user topic of that
/// name would be taken for its state by tools that know Kafka.
const TRANSACTION_STATE_TOPIC: &str = "__transaction_state";

/// DescribeConfigs resource types.
const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_BROKER: i8 = 4;

/// DescribeConfigs config sources.
const SOURCE_TOPIC_CONFIG: i8 = 1;
const SOURCE_STATIC_BROKER_CONFIG: i8 = 4;
const SOURCE_DEFAULT_CONFIG: i8 = 5;

/// DescribeConfigs config types (v3+).
const TYPE_BOOLEAN: i8 = 1;
const TYPE_STRING: i8 = 2;
const TYPE_INT: i8 = 3;
const TYPE_LONG: i8 = 5;
const TYPE_LIST: i8 = 7;

fn ready(reply: Reply) -> Boxed<Reply> {
    futures::future::ready(reply).boxed_local()
}

fn str_bytes(s: impl Into<String>) -> StrBytes {
    StrBytes::from_string(s.into())
}

fn topic_name(s: &str) -> TopicName {
    TopicName(str_bytes(s))
}

/// Topics only the broker itself may create, delete or resize.
fn is_internal(name: &str) -> bool {
    crate::metadata::is_internal_topic(name) || name == TRANSACTION_STATE_TOPIC
}

/// How often each name occurs, so a name given twice in one request is refused rather than
/// acted on twice (Kafka answers such names with INVALID_REQUEST).
fn occurrences<'a>(names: impl Iterator<Item = &'a str>) -> HashMap<&'a str, usize> {
    let mut counts = HashMap::new();
    for name in names {
        *counts.entry(name).or_insert(0) += 1;
    }
    counts
}

// ---- Automatic topic creation -------------------------------------------------------------------

/// Creates each of `names` that is missing, valid and not internal, with `default_partitions` and
/// the broker's default settings, when `kafka_auto_create_topics` is on (Kafka's
/// `auto.create.topics.enable`). Losing a race to another creator is success; other failures
/// are logged and the topic stays unknown, which the caller reports.
pub(super) async fn auto_create(shard: &Rc<Shard>, names: Vec<String>) {
    if !shard.config.kafka_auto_create_topics {
        return;
    }
    let mut seen = std::collections::HashSet::new();
    for name in names {
        if !seen.insert(name.clone())
            || shard.topic(&name).is_some()
            || is_internal(&name)
            || metadata::validate_topic_name(&name).is_err()
        {
            continue;
        }
        let partitions = shard.config.default_partitions;
        match crate::cluster::create_any_topic(
            shard,
            name.clone(),
            partitions,
            None,
            TopicOverrides::default(),
            ChangeWait::Default,
        )
        .await
        {
            Ok(_) => tracing::info!(topic = %name, partitions, "kafka: auto-created topic"),
            Err(BrokerError::TopicAlreadyExists { .. }) => {}
            Err(e) => tracing::warn!(topic = %name, "kafka: auto-creating the topic failed: {e}"),
        }
    }
}

// ---- Metadata ---------------------------------------------------------------------------------------

thread_local! {
    /// This shard's copy of the cluster id, worked out once.
    static CLUSTER_ID: RefCell<Option<(PathBuf, StrBytes)>> = const { RefCell::new(None) };
}

/// The cluster id Kafka clients see. In a cluster, the one every node derives from its seeds
/// (`ClusterSeeds::cluster_id`, as `/v1/cluster` shows it): each node answering its own data
/// directory's id made librdkafka warn that it was connected to several clusters at once. On
/// a single node, the data directory's (see `metadata::cluster_id`); `None`, logged, if it
/// cannot be read or created (clients treat a null cluster id as "unknown").
fn cluster_id(shard: &Shard) -> Option<StrBytes> {
    let data_dir = &shard.config.data_dir;
    let cached =
        CLUSTER_ID.with_borrow(|c| c.as_ref().filter(|(dir, _)| dir == data_dir).map(|(_, id)| id.clone()));
    if cached.is_some() {
        return cached;
    }
    let id = match shard.config.cluster().ok().flatten() {
        Some(seeds) => Ok(format!("{:016x}", seeds.cluster_id)),
        None => metadata::cluster_id(data_dir),
    };
    match id {
        Ok(id) => {
            let id = str_bytes(id);
            CLUSTER_ID.set(Some((data_dir.clone(), id.clone())));
            Some(id)
        }
        Err(e) => {
            tracing::error!(shard = shard.id, "kafka: no cluster id for Metadata: {e}");
            None
        }
    }
}

/// The advertised Kafka endpoint (`kafka_advertised_listener`, else the bound listener).
fn broker(shard: &Shard) -> MetadataResponseBroker {
    let (host, port) = match shard.kafka_endpoint.get() {
        Some((host, port)) => (host.clone(), *port),
        // Set before any Kafka connection is served; the listen address is the fallback anyway.
        None => match shard.config.kafka_listen_addr() {
            Ok(Some(addr)) => (addr.ip().to_string(), addr.port()),
            _ => (String::new(), 0),
        },
    };
    MetadataResponseBroker::default()
        .with_node_id(BrokerId(node_id(&shard.config)))
        .with_host(str_bytes(host))
        .with_port(i32::from(port))
        .with_rack(None)
}

/// A cluster's other nodes with a Kafka listener, as the controller's registry has them.
fn peer_brokers(me: i32, nodes: &[crate::cluster::NodeInfo]) -> Vec<MetadataResponseBroker> {
    nodes
        .iter()
        .filter(|n| i64::try_from(n.id).ok() != Some(i64::from(me)))
        .filter_map(|n| {
            let (host, port) = n.kafka.as_deref()?.rsplit_once(':')?;
            Some(
                MetadataResponseBroker::default()
                    .with_node_id(BrokerId(i32::try_from(n.id).ok()?))
                    .with_host(str_bytes(host.trim_start_matches('[').trim_end_matches(']').to_string()))
                    .with_port(port.parse().ok()?)
                    .with_rack(None),
            )
        })
        .collect()
}

/// Every broker a Kafka client can reach, as Metadata lists them: this one and, in a cluster,
/// every registered node with a Kafka listener.
pub(super) async fn brokers(shard: &Rc<Shard>) -> Vec<MetadataResponseBroker> {
    let mut brokers = vec![broker(shard)];
    if let Some(cluster) = crate::cluster::kafka_view(shard).await {
        brokers.extend(peer_brokers(node_id(&shard.config), &cluster.nodes));
    }
    brokers
}

fn topic_metadata(view: &TopicView, me: i32, leaders: &[LeaderView]) -> MetadataResponseTopic {
    let partitions = (0..view.partition_shards.len() as i32)
        .map(|p| {
            let partition = MetadataResponsePartition::default().with_partition_index(p);
            let Some(replication) = &view.replication else {
                return partition
                    .with_leader_id(BrokerId(me))
                    .with_leader_epoch(0)
                    .with_replica_nodes(vec![BrokerId(me)])
                    .with_isr_nodes(vec![BrokerId(me)])
                    .with_offline_replicas(Vec::new());
            };
            let id = |n: &u64| BrokerId(i32::try_from(*n).unwrap_or(-1));
            let replicas: Vec<BrokerId> =
                replication.replicas.get(p as usize).map(|r| r.iter().map(id).collect()).unwrap_or_default();
            let view = leaders.get(p as usize).cloned().unwrap_or_default();
            // No leader known (an election under way): Kafka's LEADER_NOT_AVAILABLE, retried.
            let error = if view.leader.is_none() { ResponseError::LeaderNotAvailable.code() } else { 0 };
            partition
                .with_error_code(error)
                .with_leader_id(view.leader.as_ref().map_or(BrokerId(-1), id))
                .with_leader_epoch(i32::try_from(view.epoch).unwrap_or(i32::MAX))
                .with_isr_nodes(view.in_sync.iter().map(id).collect())
                .with_replica_nodes(replicas)
                .with_offline_replicas(Vec::new())
        })
        .collect();
    MetadataResponseTopic::default()
        .with_name(Some(topic_name(&view.name)))
        .with_is_internal(is_internal(&view.name))
        .with_partitions(partitions)
}

fn missing_topic_metadata(name: &str) -> MetadataResponseTopic {
    let code = match metadata::validate_topic_name(name) {
        Ok(()) => ResponseError::UnknownTopicOrPartition,
        Err(_) => ResponseError::InvalidTopicException,
    };
    MetadataResponseTopic::default().with_name(Some(topic_name(name))).with_error_code(code.code())
}

pub(super) async fn metadata(
    shard: &Rc<Shard>,
    ctx: RequestContext,
    request: MetadataRequest,
) -> Boxed<Reply> {
    let requested: Option<Vec<String>> = match request.topics {
        None => None,
        // Version 0 has no null list: there, an empty list asks for every topic.
        Some(topics) if topics.is_empty() && ctx.version == 0 => None,
        Some(topics) => {
            let mut seen = std::collections::HashSet::new();
            let names = topics.into_iter().map(|t| t.name.map(|n| n.0.to_string()).unwrap_or_default());
            Some(names.filter(|n| seen.insert(n.clone())).collect())
        }
    };
    if let Some(names) = &requested {
        // Versions before 4 cannot say, and decode as allowing it, as Kafka treats them.
        if request.allow_auto_topic_creation {
            let missing: Vec<String> = names.iter().filter(|n| shard.topic(n).is_none()).cloned().collect();
            if !missing.is_empty() {
                auto_create(shard, missing).await;
            }
        }
    }
    let views: Vec<Result<Rc<TopicView>, String>> = match requested {
        // Internal topics are listed only when asked for by name, as the native protocol does.
        None => shard
            .topic_names()
            .iter()
            .filter(|n| !is_internal(n))
            .filter_map(|n| shard.topic(n))
            .map(Ok)
            .collect(),
        Some(names) => names.into_iter().map(|n| shard.topic(&n).ok_or(n)).collect(),
    };
    let me = node_id(&shard.config);
    let mut topics = Vec::with_capacity(views.len());
    for view in &views {
        topics.push(match view {
            Ok(view) if view.replication.is_some() => {
                topic_metadata(view, me, &shard.replicated_leaders(view.name.clone()).await)
            }
            Ok(view) => topic_metadata(view, me, &[]),
            Err(name) => missing_topic_metadata(name),
        });
    }
    let mut brokers = vec![broker(shard)];
    let mut controller = me;
    if let Some(cluster) = crate::cluster::kafka_view(shard).await {
        brokers.extend(peer_brokers(me, &cluster.nodes));
        controller = cluster.controller.and_then(|id| i32::try_from(id).ok()).unwrap_or(-1);
    }
    let body = MetadataResponse::default()
        .with_brokers(brokers)
        .with_cluster_id(cluster_id(shard))
        .with_controller_id(BrokerId(controller))
        .with_topics(topics);
    ready(respond(&ctx, &body))
}

// ---- Topic configs ----------------------------------------------------------------------------------

/// The topic configs ringlog understands, by their Kafka names. The first five are settings
/// ringlog keeps per topic; the others describe how ringlog always behaves, so a client may set
/// them only to that behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TopicConfig {
    RetentionMs,
    RetentionBytes,
    SegmentBytes,
    SegmentMs,
    Durability,
    CleanupPolicy,
    MaxMessageBytes,
    MinInsyncReplicas,
    CompressionType,
    TimestampType,
}

const TOPIC_CONFIGS: [TopicConfig; 10] = [
    TopicConfig::RetentionMs,
    TopicConfig::RetentionBytes,
    TopicConfig::SegmentBytes,
    TopicConfig::SegmentMs,
    TopicConfig::Durability,
    TopicConfig::CleanupPolicy,
    TopicConfig::MaxMessageBytes,
    TopicConfig::MinInsyncReplicas,
    TopicConfig::CompressionType,
    TopicConfig::TimestampType,
];

impl TopicConfig {
    fn name(self) -> &'static str {
        match self {
            TopicConfig::RetentionMs => "retention.ms",
            TopicConfig::RetentionBytes => "retention.bytes",
            TopicConfig::SegmentBytes => "segment.bytes",
            TopicConfig::SegmentMs => "segment.ms",
            TopicConfig::Durability => "ringlog.durability",
            TopicConfig::CleanupPolicy => "cleanup.policy",
            TopicConfig::MaxMessageBytes => "max.message.bytes",
            TopicConfig::MinInsyncReplicas => "min.insync.replicas",
            TopicConfig::CompressionType => "compression.type",
            TopicConfig::TimestampType => "message.timestamp.type",
        }
    }

    fn from_name(name: &str) -> Option<TopicConfig> {
        TOPIC_CONFIGS.into_iter().find(|c| c.name() == name)
    }

    /// The broker-wide config this one defaults to, by its Kafka name (ringlog's own option for
    /// durability, which Kafka does not have).
    fn broker_name(self) -> &'static str {
        match self {
            TopicConfig::RetentionMs => "log.retention.ms",
            TopicConfig::RetentionBytes => "log.retention.bytes",
            TopicConfig::SegmentBytes => "log.segment.bytes",
            TopicConfig::SegmentMs => "log.roll.ms",
            TopicConfig::Durability => "default_durability",
            TopicConfig::CleanupPolicy => "log.cleanup.policy",
            TopicConfig::MaxMessageBytes => "message.max.bytes",
            TopicConfig::MinInsyncReplicas => "min.insync.replicas",
            TopicConfig::CompressionType => "compression.type",
            TopicConfig::TimestampType => "log.message.timestamp.type",
        }
    }

    fn config_type(self) -> i8 {
        match self {
            TopicConfig::RetentionMs | TopicConfig::RetentionBytes | TopicConfig::SegmentMs => TYPE_LONG,
            TopicConfig::SegmentBytes | TopicConfig::MaxMessageBytes | TopicConfig::MinInsyncReplicas => {
                TYPE_INT
            }
            TopicConfig::CleanupPolicy => TYPE_LIST,
            TopicConfig::Durability | TopicConfig::CompressionType | TopicConfig::TimestampType => {
                TYPE_STRING
            }
        }
    }
}

fn durability_name(d: DurabilitySetting) -> &'static str {
    match d {
        DurabilitySetting::Written => "written",
        DurabilitySetting::Fsync => "fsync",
    }
}

fn parse_number<T: std::str::FromStr>(config: TopicConfig, value: &str) -> Result<T, String> {
    value.trim().parse().map_err(|_| format!("{} '{value}' is not a whole number in range", config.name()))
}

/// `-1` (unlimited) or positive, as ringlog's retention limits are.
fn parse_limit(config: TopicConfig, value: &str) -> Result<i64, String> {
    let v: i64 = parse_number(config, value)?;
    if v == 0 || v < -1 {
        return Err(format!("{} {v} must be -1 (unlimited) or positive", config.name()));
    }
    Ok(v)
}

/// Applies one Kafka topic config to `overrides`; the error names the config and what ringlog
/// accepts.
fn apply_topic_config(
    config: TopicConfig,
    value: &str,
    broker: &BrokerConfig,
    overrides: &mut TopicOverrides,
) -> Result<(), String> {
    let name = config.name();
    let only = |accepted: &str, why: &str| {
        if value.trim() == accepted {
            Ok(())
        } else {
            Err(format!("{name} '{value}' is not supported: {why}, so only '{accepted}' is accepted"))
        }
    };
    match config {
        TopicConfig::RetentionMs => overrides.retention_ms = Some(parse_limit(config, value)?),
        TopicConfig::RetentionBytes => overrides.retention_bytes = Some(parse_limit(config, value)?),
        TopicConfig::SegmentBytes => {
            let v: u64 = parse_number(config, value)?;
            let min = SEGMENT_BYTES_MIN.max(broker.batch_bytes_max as u64);
            if v < min {
                return Err(format!(
                    "{name} {v} is below the minimum {min} ({SEGMENT_BYTES_MIN}, and at least \
                     batch_bytes_max)"
                ));
            }
            overrides.segment_bytes = Some(v);
        }
        TopicConfig::SegmentMs => {
            let v: u64 = parse_number(config, value)?;
            if v == 0 {
                return Err(format!("{name} must be at least 1"));
            }
            overrides.segment_ms = Some(v);
        }
        TopicConfig::Durability => {
            overrides.durability = Some(match value.trim().to_ascii_lowercase().as_str() {
                "written" => DurabilitySetting::Written,
                "fsync" => DurabilitySetting::Fsync,
                _ => return Err(format!("{name} '{value}' must be 'written' or 'fsync'")),
            })
        }
        TopicConfig::CleanupPolicy => only("delete", "ringlog deletes whole segments and does not compact")?,
        TopicConfig::MinInsyncReplicas => {
            only("1", "a single-node broker has one replica of each partition")?
        }
        TopicConfig::CompressionType => {
            only("producer", "ringlog stores batches compressed as the producer sent them")?
        }
        TopicConfig::TimestampType => {
            only("CreateTime", "ringlog keeps the producer's timestamps (no LogAppendTime)")?
        }
        TopicConfig::MaxMessageBytes => {
            // Only the broker's batch_bytes_max is enforced; a smaller value is accepted (Kafka
            // tools set it routinely) and the describe answer shows the limit that applies.
            let v: i64 = parse_number(config, value)?;
            if !(1..=broker.batch_bytes_max as i64).contains(&v) {
                return Err(format!(
                    "{name} {v} is not supported: batches are limited to the broker's batch_bytes_max ({})",
                    broker.batch_bytes_max
                ));
            }
        }
    }
    Ok(())
}

/// The overrides a CreateTopics request's configs ask for. Unknown configs and values ringlog
/// cannot honour are refused, naming the config, rather than silently ignored.
fn overrides_from_configs<'a>(
    configs: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
    broker: &BrokerConfig,
) -> Result<TopicOverrides, String> {
    let mut overrides = TopicOverrides::default();
    let mut seen: Vec<&str> = Vec::new();
    for (name, value) in configs {
        if seen.contains(&name) {
            return Err(format!("config '{name}' is given more than once"));
        }
        seen.push(name);
        let Some(config) = TopicConfig::from_name(name) else {
            let known: Vec<&str> = TOPIC_CONFIGS.iter().map(|c| c.name()).collect();
            return Err(format!(
                "config '{name}' is not supported by ringlog; supported: {}",
                known.join(", ")
            ));
        };
        let Some(value) = value else {
            return Err(format!("config '{name}' has a null value; topic configs need one"));
        };
        apply_topic_config(config, value, broker, &mut overrides)?;
    }
    overrides.validate(broker)?;
    Ok(overrides)
}

/// One config as DescribeConfigs and CreateTopics (v5+) report it.
#[derive(Debug, Clone, PartialEq)]
struct ConfigEntry {
    name: &'static str,
    value: String,
    source: i8,
    read_only: bool,
    config_type: i8,
    /// In precedence order, starting with the source of the value in effect.
    synonyms: Vec<(&'static str, String, i8)>,
}

fn broker_source(differs_from_default: bool) -> i8 {
    if differs_from_default {
        SOURCE_STATIC_BROKER_CONFIG
    } else {
        SOURCE_DEFAULT_CONFIG
    }
}

/// Every topic config of a topic with `overrides`, with the value in effect.
fn topic_config_entries(overrides: &TopicOverrides, broker: &BrokerConfig) -> Vec<ConfigEntry> {
    let settings = overrides.resolve(broker);
    let defaults = BrokerConfig::default();
    TOPIC_CONFIGS
        .into_iter()
        .map(|config| {
            // (value in effect, overridden for this topic, broker default, broker non-default)
            let (value, overridden, broker_value, broker_set) = match config {
                TopicConfig::RetentionMs => (
                    settings.retention_ms.to_string(),
                    overrides.retention_ms.is_some(),
                    broker.default_retention_ms.to_string(),
                    broker.default_retention_ms != defaults.default_retention_ms,
                ),
                TopicConfig::RetentionBytes => (
                    settings.retention_bytes.to_string(),
                    overrides.retention_bytes.is_some(),
                    broker.default_retention_bytes.to_string(),
                    broker.default_retention_bytes != defaults.default_retention_bytes,
                ),
                TopicConfig::SegmentBytes => (
                    settings.segment_bytes.to_string(),
                    overrides.segment_bytes.is_some(),
                    broker.default_segment_bytes.to_string(),
                    broker.default_segment_bytes != defaults.default_segment_bytes,
                ),
                TopicConfig::SegmentMs => (
                    settings.segment_ms.to_string(),
                    overrides.segment_ms.is_some(),
                    broker.default_segment_ms.to_string(),
                    broker.default_segment_ms != defaults.default_segment_ms,
                ),
                TopicConfig::Durability => (
                    durability_name(settings.durability).to_string(),
                    overrides.durability.is_some(),
                    durability_name(broker.default_durability).to_string(),
                    broker.default_durability != defaults.default_durability,
                ),
                TopicConfig::MaxMessageBytes => {
                    let limit = broker.batch_bytes_max.to_string();
                    (limit.clone(), false, limit, broker.batch_bytes_max != defaults.batch_bytes_max)
                }
                TopicConfig::CleanupPolicy => ("delete".into(), false, "delete".into(), false),
                TopicConfig::MinInsyncReplicas => ("1".into(), false, "1".into(), false),
                TopicConfig::CompressionType => ("producer".into(), false, "producer".into(), false),
                TopicConfig::TimestampType => ("CreateTime".into(), false, "CreateTime".into(), false),
            };
            let mut synonyms = Vec::with_capacity(2);
            if overridden {
                synonyms.push((config.name(), value.clone(), SOURCE_TOPIC_CONFIG));
            }
            synonyms.push((config.broker_name(), broker_value, broker_source(broker_set)));
            ConfigEntry {
                name: config.name(),
                value,
                source: if overridden { SOURCE_TOPIC_CONFIG } else { SOURCE_DEFAULT_CONFIG },
                read_only: false,
                config_type: config.config_type(),
                synonyms,
            }
        })
        .collect()
}

/// The broker configs Kafka clients can read; none can be changed at run time.
fn broker_config_entries(broker: &BrokerConfig) -> Vec<ConfigEntry> {
    let d = BrokerConfig::default();
    let entries: [(&'static str, String, bool, i8); 11] = [
        ("broker.id", node_id(broker).to_string(), false, TYPE_INT),
        (
            "num.partitions",
            broker.default_partitions.to_string(),
            broker.default_partitions != d.default_partitions,
            TYPE_INT,
        ),
        (
            "auto.create.topics.enable",
            broker.kafka_auto_create_topics.to_string(),
            broker.kafka_auto_create_topics != d.kafka_auto_create_topics,
            TYPE_BOOLEAN,
        ),
        (
            "message.max.bytes",
            broker.batch_bytes_max.to_string(),
            broker.batch_bytes_max != d.batch_bytes_max,
            TYPE_INT,
        ),
        (
            "log.segment.bytes",
            broker.default_segment_bytes.to_string(),
            broker.default_segment_bytes != d.default_segment_bytes,
            TYPE_INT,
        ),
        (
            "log.roll.ms",
            broker.default_segment_ms.to_string(),
            broker.default_segment_ms != d.default_segment_ms,
            TYPE_LONG,
        ),
        (
            "log.retention.ms",
            broker.default_retention_ms.to_string(),
            broker.default_retention_ms != d.default_retention_ms,
            TYPE_LONG,
        ),
        (
            "log.retention.bytes",
            broker.default_retention_bytes.to_string(),
            broker.default_retention_bytes != d.default_retention_bytes,
            TYPE_LONG,
        ),
        (
            "offsets.topic.num.partitions",
            broker.offsets_topic_partitions.to_string(),
            broker.offsets_topic_partitions != d.offsets_topic_partitions,
            TYPE_INT,
        ),
        (
            "group.min.session.timeout.ms",
            broker.group_min_session_timeout_ms.to_string(),
            broker.group_min_session_timeout_ms != d.group_min_session_timeout_ms,
            TYPE_INT,
        ),
        (
            "group.max.session.timeout.ms",
            broker.group_max_session_timeout_ms.to_string(),
            broker.group_max_session_timeout_ms != d.group_max_session_timeout_ms,
            TYPE_INT,
        ),
    ];
    entries
        .into_iter()
        .map(|(name, value, set, config_type)| {
            let source = broker_source(set);
            ConfigEntry {
                name,
                synonyms: vec![(name, value.clone(), source)],
                value,
                source,
                read_only: true,
                config_type,
            }
        })
        .collect()
}

// ---- CreateTopics -------------------------------------------------------------------------------

/// What a valid CreateTopics entry asks for.
struct TopicRequest {
    partitions: u32,
    /// `None`: the broker's default (a cluster's min(3, nodes); 1 on a single node).
    replication_factor: Option<u16>,
    overrides: TopicOverrides,
}

fn check_create(topic: &CreatableTopic, broker: &BrokerConfig) -> Result<TopicRequest, Failure> {
    let name = topic.name.0.as_str();
    metadata::validate_topic_name(name).map_err(|m| Failure::new(ResponseError::InvalidTopicException, m))?;
    if is_internal(name) {
        return Err(Failure::new(
            ResponseError::InvalidRequest,
            format!("'{name}' is an internal topic name; only the broker creates it"),
        ));
    }
    if !topic.assignments.is_empty() {
        return Err(Failure::new(
            ResponseError::InvalidRequest,
            "manual replica assignments are not supported: ringlog places partitions on its cores \
             itself; leave assignments empty and set num_partitions",
        ));
    }
    let max = broker.partitions_per_topic_max;
    let partitions = match topic.num_partitions {
        -1 => broker.default_partitions,
        n if n >= 1 && n as u32 <= max => n as u32,
        n => {
            return Err(Failure::new(
                ResponseError::InvalidPartitions,
                format!("num_partitions {n} is outside 1..={max} (or -1 for the broker default)"),
            ))
        }
    };
    let in_cluster = broker.cluster().ok().flatten().is_some();
    let replication_factor = match topic.replication_factor {
        -1 => None,
        1 => Some(1),
        n if n > 1 && in_cluster => Some(n as u16),
        n if n > 1 => {
            return Err(Failure::new(
                ResponseError::InvalidReplicationFactor,
                format!(
                    "replication factor {n} is larger than the number of brokers: ringlog runs as a \
                     single node (1 broker), so use 1 or -1"
                ),
            ))
        }
        n => {
            return Err(Failure::new(
                ResponseError::InvalidReplicationFactor,
                format!("replication factor {n} must be at least 1 (or -1 for the broker default)"),
            ))
        }
    };
    let configs = topic.configs.iter().map(|c| (c.name.as_str(), c.value.as_ref().map(|v| v.as_str())));
    let overrides =
        overrides_from_configs(configs, broker).map_err(|m| Failure::new(ResponseError::InvalidConfig, m))?;
    Ok(TopicRequest { partitions, replication_factor, overrides })
}

/// Validates one topic and, unless `validate_only`, creates it.
async fn create_one(
    shard: &Rc<Shard>,
    topic: &CreatableTopic,
    validate_only: bool,
    wait: ChangeWait,
) -> Result<TopicRequest, Failure> {
    let request = check_create(topic, &shard.config)?;
    let name = topic.name.0.as_str();
    if validate_only {
        if shard.topic(name).is_some() {
            return Err(Failure::new(
                ResponseError::TopicAlreadyExists,
                format!("topic '{name}' already exists"),
            ));
        }
        return Ok(request);
    }
    let replication_factor =
        request.replication_factor.or_else(|| crate::cluster::default_replication_factor(shard));
    let created = crate::cluster::create_any_topic(
        shard,
        name.to_string(),
        request.partitions,
        replication_factor,
        request.overrides,
        wait,
    )
    .await?;
    Ok(TopicRequest { partitions: created.partitions, replication_factor, overrides: created.overrides })
}

fn creatable_topic_result(
    version: i16,
    name: &str,
    outcome: Result<TopicRequest, Failure>,
    broker: &BrokerConfig,
) -> CreatableTopicResult {
    let result = CreatableTopicResult::default().with_name(topic_name(name));
    match outcome {
        Ok(created) => {
            let configs = (version >= 5).then(|| {
                topic_config_entries(&created.overrides, broker)
                    .into_iter()
                    .map(|e| {
                        CreatableTopicConfigs::default()
                            .with_name(str_bytes(e.name))
                            .with_value(Some(str_bytes(e.value)))
                            .with_read_only(e.read_only)
                            .with_config_source(e.source)
                            .with_is_sensitive(false)
                    })
                    .collect()
            });
            result
                .with_error_message(None)
                .with_num_partitions(created.partitions as i32)
                .with_replication_factor(created.replication_factor.map_or(1, |rf| rf as i16))
                .with_configs(configs)
        }
        Err(f) => result
            .with_error_code(f.code)
            .with_error_message(Some(str_bytes(f.message)))
            .with_num_partitions(-1)
            .with_replication_factor(-1)
            .with_configs(None),
    }
}

pub(super) async fn create_topics(
    shard: &Rc<Shard>,
    ctx: RequestContext,
    request: CreateTopicsRequest,
) -> Boxed<Reply> {
    // The request's timeout_ms bounds its changes together, from its arrival.
    let wait = ChangeWait::kafka(request.timeout_ms, std::time::Instant::now());
    let counts = occurrences(request.topics.iter().map(|t| t.name.0.as_str()));
    let mut answered = std::collections::HashSet::new();
    let mut results = Vec::with_capacity(request.topics.len());
    for topic in &request.topics {
        let name = topic.name.0.as_str();
        if !answered.insert(name) {
            continue;
        }
        let outcome = if counts.get(name).copied().unwrap_or(0) > 1 {
            Err(Failure::new(
                ResponseError::InvalidRequest,
                format!("topic '{name}' is listed more than once"),
            ))
        } else {
            create_one(shard, topic, request.validate_only, wait).await
        };
        results.push(creatable_topic_result(ctx.version, name, outcome, &shard.config));
    }
    ready(respond(&ctx, &CreateTopicsResponse::default().with_topics(results)))
}

// ---- DeleteTopics -------------------------------------------------------------------------------

async fn delete_one(shard: &Rc<Shard>, name: &str, wait: ChangeWait) -> Result<(), Failure> {
    if is_internal(name) {
        return Err(Failure::new(
            ResponseError::InvalidRequest,
            format!("'{name}' is an internal topic; only the broker manages it, so it cannot be deleted"),
        ));
    }
    if shard.topic(name).is_none() {
        return Err(Failure::new(ResponseError::UnknownTopicOrPartition, format!("unknown topic '{name}'")));
    }
    crate::cluster::delete_any_topic(shard, name.to_string(), wait).await.map_err(Failure::from)
}

pub(super) async fn delete_topics(
    shard: &Rc<Shard>,
    ctx: RequestContext,
    request: DeleteTopicsRequest,
) -> Boxed<Reply> {
    // The request's timeout_ms bounds its changes together, from its arrival.
    let wait = ChangeWait::kafka(request.timeout_ms, std::time::Instant::now());
    let counts = occurrences(request.topic_names.iter().map(|n| n.0.as_str()));
    let mut answered = std::collections::HashSet::new();
    let mut results = Vec::with_capacity(request.topic_names.len());
    for name in &request.topic_names {
        let name = name.0.as_str();
        if !answered.insert(name) {
            continue;
        }
        let outcome = if counts.get(name).copied().unwrap_or(0) > 1 {
            Err(Failure::new(
                ResponseError::InvalidRequest,
                format!("topic '{name}' is listed more than once"),
            ))
        } else {
            delete_one(shard, name, wait).await
        };
        let result = DeletableTopicResult::default().with_name(Some(topic_name(name)));
        results.push(match outcome {
            Ok(()) => result,
            Err(f) => result.with_error_code(f.code).with_error_message(Some(str_bytes(f.message))),
        });
    }
    ready(respond(&ctx, &DeleteTopicsResponse::default().with_responses(results)))
}

// ---- CreatePartitions ---------------------------------------------------------------------------

async fn grow_one(
    shard: &Rc<Shard>,
    name: &str,
    count: i32,
    manual: bool,
    validate_only: bool,
    wait: ChangeWait,
) -> Result<(), Failure> {
    if manual {
        return Err(Failure::new(
            ResponseError::InvalidRequest,
            "manual replica assignments are not supported: ringlog places new partitions itself (on its \
             cores; a replicated topic's replicas continue its spread over the nodes); leave assignments \
             null and set count",
        ));
    }
    if is_internal(name) {
        return Err(Failure::new(
            ResponseError::InvalidRequest,
            format!("'{name}' is internal; its partition count is fixed"),
        ));
    }
    let partitions = u32::try_from(count).map_err(|_| {
        Failure::new(
            ResponseError::InvalidPartitions,
            format!("count {count} for topic '{name}' is negative"),
        )
    })?;
    crate::cluster::check_grow(shard, name, partitions)?;
    if validate_only {
        return Ok(());
    }
    crate::cluster::grow_any_topic(shard, name.to_string(), partitions, wait).await?;
    Ok(())
}

pub(super) async fn create_partitions(
    shard: &Rc<Shard>,
    ctx: RequestContext,
    request: CreatePartitionsRequest,
) -> Boxed<Reply> {
    // The request's timeout_ms bounds its changes together, from its arrival.
    let wait = ChangeWait::kafka(request.timeout_ms, std::time::Instant::now());
    let counts = occurrences(request.topics.iter().map(|t| t.name.0.as_str()));
    let mut answered = std::collections::HashSet::new();
    let mut results = Vec::with_capacity(request.topics.len());
    for topic in &request.topics {
        let name = topic.name.0.as_str();
        if !answered.insert(name) {
            continue;
        }
        let outcome = if counts.get(name).copied().unwrap_or(0) > 1 {
            Err(Failure::new(
                ResponseError::InvalidRequest,
                format!("topic '{name}' is listed more than once"),
            ))
        } else {
            let manual = topic.assignments.as_ref().is_some_and(|a| !a.is_empty());
            grow_one(shard, name, topic.count, manual, request.validate_only, wait).await
        };
        let result = CreatePartitionsTopicResult::default().with_name(topic_name(name));
        results.push(match outcome {
            Ok(()) => result,
            Err(f) => result.with_error_code(f.code).with_error_message(Some(str_bytes(f.message))),
        });
    }
    ready(respond(&ctx, &CreatePartitionsResponse::default().with_results(results)))
}

// ---- DescribeConfigs ----------------------------------------------------------------------------

fn describe_resource(shard: &Shard, resource: &DescribeConfigsResource) -> Result<Vec<ConfigEntry>, Failure> {
    let name = resource.resource_name.as_str();
    match resource.resource_type {
        RESOURCE_TOPIC => {
            if let Err(m) = metadata::validate_topic_name(name) {
                return Err(Failure::new(ResponseError::InvalidTopicException, m));
            }
            let view = shard.topic(name).ok_or_else(|| {
                Failure::new(ResponseError::UnknownTopicOrPartition, format!("unknown topic '{name}'"))
            })?;
            Ok(topic_config_entries(&view.overrides, &shard.config))
        }
        RESOURCE_BROKER => match name {
            "" | "0" => Ok(broker_config_entries(&shard.config)),
            other => Err(Failure::new(
                ResponseError::InvalidRequest,
                format!(
                    "broker '{other}' is unknown: this single broker is node {NODE_ID} (or use an \
                     empty name)"
                ),
            )),
        },
        other => Err(Failure::new(
            ResponseError::InvalidRequest,
            format!(
                "resource type {other} is not supported; ringlog describes topics ({RESOURCE_TOPIC}) and the \
                 broker ({RESOURCE_BROKER})"
            ),
        )),
    }
}

/// Keeps the configs a resource's `configuration_keys` asks for: a null or empty list means all,
/// as in Kafka.
fn filter_keys(entries: Vec<ConfigEntry>, keys: Option<&[StrBytes]>) -> Vec<ConfigEntry> {
    match keys {
        Some(keys) if !keys.is_empty() => {
            entries.into_iter().filter(|e| keys.iter().any(|k| k.as_str() == e.name)).collect()
        }
        _ => entries,
    }
}

fn describe_result(entry: ConfigEntry, include_synonyms: bool) -> DescribeConfigsResourceResult {
    let synonyms = match include_synonyms {
        true => entry
            .synonyms
            .into_iter()
            .map(|(name, value, source)| {
                DescribeConfigsSynonym::default()
                    .with_name(str_bytes(name))
                    .with_value(Some(str_bytes(value)))
                    .with_source(source)
            })
            .collect(),
        false => Vec::new(),
    };
    DescribeConfigsResourceResult::default()
        .with_name(str_bytes(entry.name))
        .with_value(Some(str_bytes(entry.value)))
        .with_read_only(entry.read_only)
        .with_config_source(entry.source)
        .with_is_sensitive(false)
        .with_synonyms(synonyms)
        .with_config_type(entry.config_type)
        .with_documentation(None)
}

/// Resources one DescribeConfigs answers: each answer is ~100 times the bytes that asked for it,
/// so the rest of an oversized request is refused per resource instead of multiplied into
/// hundreds of megabytes.
const DESCRIBED_RESOURCES_MAX: usize = 1000;

pub(super) async fn describe_configs(
    shard: &Rc<Shard>,
    ctx: RequestContext,
    request: DescribeConfigsRequest,
) -> Boxed<Reply> {
    let results = request
        .resources
        .iter()
        .enumerate()
        .map(|(i, resource)| {
            let result = DescribeConfigsResult::default()
                .with_resource_type(resource.resource_type)
                .with_resource_name(resource.resource_name.clone());
            if i >= DESCRIBED_RESOURCES_MAX {
                return result.with_error_code(ResponseError::InvalidRequest.code()).with_error_message(None);
            }
            match describe_resource(shard, resource) {
                Ok(entries) => {
                    let configs = filter_keys(entries, resource.configuration_keys.as_deref())
                        .into_iter()
                        .map(|e| describe_result(e, request.include_synonyms))
                        .collect();
                    result.with_error_message(None).with_configs(configs)
                }
                Err(f) => result.with_error_code(f.code).with_error_message(Some(str_bytes(f.message))),
            }
        })
        .collect();
    ready(respond(&ctx, &DescribeConfigsResponse::default().with_results(results)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configs(pairs: &[(&'static str, Option<&'static str>)]) -> Vec<(&'static str, Option<&'static str>)> {
        pairs.to_vec()
    }

    #[test]
    fn kafka_configs_map_to_overrides() {
        let broker = BrokerConfig::default();
        let o = overrides_from_configs(
            configs(&[
                ("retention.ms", Some("3600000")),
                ("retention.bytes", Some("-1")),
                ("segment.bytes", Some("8388608")),
                ("segment.ms", Some("60000")),
                ("ringlog.durability", Some("written")),
            ]),
            &broker,
        )
        .unwrap();
        assert_eq!(
            o,
            TopicOverrides {
                segment_bytes: Some(8 << 20),
                segment_ms: Some(60_000),
                retention_bytes: Some(-1),
                retention_ms: Some(3_600_000),
                durability: Some(DurabilitySetting::Written),
            }
        );
        assert_eq!(overrides_from_configs(configs(&[]), &broker).unwrap(), TopicOverrides::default());
    }

    #[test]
    fn harmless_kafka_configs_are_accepted_and_change_nothing() {
        let broker = BrokerConfig::default();
        let o = overrides_from_configs(
            configs(&[
                ("cleanup.policy", Some("delete")),
                ("min.insync.replicas", Some("1")),
                ("compression.type", Some("producer")),
                ("message.timestamp.type", Some("CreateTime")),
                ("max.message.bytes", Some("1048588")),
            ]),
            &broker,
        )
        .unwrap();
        assert_eq!(o, TopicOverrides::default());
    }

    #[test]
    fn refused_configs_name_the_key() {
        let broker = BrokerConfig::default();
        let refused = [
            ("cleanup.policy", Some("compact")),
            ("min.insync.replicas", Some("2")),
            ("compression.type", Some("zstd")),
            ("message.timestamp.type", Some("LogAppendTime")),
            ("max.message.bytes", Some("999999999")),
            ("retention.ms", Some("0")),
            ("retention.bytes", Some("-2")),
            ("retention.ms", Some("soon")),
            ("segment.bytes", Some("1024")),
            ("segment.ms", Some("0")),
            ("ringlog.durability", Some("maybe")),
            ("unclean.leader.election.enable", Some("true")),
            ("retention.ms", None),
        ];
        for (key, value) in refused {
            let err = overrides_from_configs(configs(&[(key, value)]), &broker).unwrap_err();
            assert!(err.contains(key), "{key}={value:?}: {err}");
        }
        let err = overrides_from_configs(
            configs(&[("retention.ms", Some("1000")), ("retention.ms", Some("2000"))]),
            &broker,
        )
        .unwrap_err();
        assert!(err.contains("more than once"), "{err}");
    }

    #[test]
    fn segment_bytes_respects_batch_bytes_max() {
        let broker = BrokerConfig { batch_bytes_max: 1 << 20, ..BrokerConfig::default() };
        assert!(overrides_from_configs(configs(&[("segment.bytes", Some("524288"))]), &broker).is_err());
        assert!(overrides_from_configs(configs(&[("segment.bytes", Some("1048576"))]), &broker).is_ok());
        assert!(overrides_from_configs(configs(&[("max.message.bytes", Some("1048577"))]), &broker).is_err());
    }

    #[test]
    fn topic_configs_describe_values_in_effect_and_their_source() {
        let broker = BrokerConfig { default_retention_bytes: 1 << 30, ..BrokerConfig::default() };
        let overrides = TopicOverrides { retention_ms: Some(5000), ..TopicOverrides::default() };
        let entries = topic_config_entries(&overrides, &broker);
        assert_eq!(entries.len(), TOPIC_CONFIGS.len());
        let get = |name: &str| entries.iter().find(|e| e.name == name).unwrap().clone();
        let retention = get("retention.ms");
        assert_eq!((retention.value.as_str(), retention.source), ("5000", SOURCE_TOPIC_CONFIG));
        assert_eq!(retention.synonyms[0], ("retention.ms", "5000".to_string(), SOURCE_TOPIC_CONFIG));
        assert_eq!(retention.synonyms[1].0, "log.retention.ms");
        assert_eq!(retention.synonyms[1].2, SOURCE_DEFAULT_CONFIG);
        let bytes = get("retention.bytes");
        assert_eq!((bytes.value.as_str(), bytes.source), ("1073741824", SOURCE_DEFAULT_CONFIG));
        assert_eq!(
            bytes.synonyms,
            vec![("log.retention.bytes", "1073741824".to_string(), SOURCE_STATIC_BROKER_CONFIG)]
        );
        assert_eq!(get("ringlog.durability").value, "fsync");
        assert_eq!(get("max.message.bytes").value, broker.batch_bytes_max.to_string());
        assert_eq!(get("cleanup.policy").value, "delete");
        assert!(entries.iter().all(|e| !e.read_only));
    }

    #[test]
    fn described_topic_configs_are_accepted_back() {
        // What DescribeConfigs reports can be fed to CreateTopics to make an identical topic.
        let broker = BrokerConfig::default();
        let overrides = TopicOverrides {
            segment_bytes: Some(1 << 24),
            durability: Some(DurabilitySetting::Written),
            ..TopicOverrides::default()
        };
        let entries = topic_config_entries(&overrides, &broker);
        let pairs: Vec<(&str, Option<&str>)> =
            entries.iter().map(|e| (e.name, Some(e.value.as_str()))).collect();
        let again = overrides_from_configs(pairs, &broker).unwrap();
        assert_eq!(again.resolve(&broker), overrides.resolve(&broker));
    }

    #[test]
    fn broker_configs_show_settings_and_whether_they_were_set() {
        let broker = BrokerConfig { default_partitions: 3, ..BrokerConfig::default() };
        let entries = broker_config_entries(&broker);
        let get = |name: &str| entries.iter().find(|e| e.name == name).unwrap().clone();
        assert_eq!(
            (get("num.partitions").value.as_str(), get("num.partitions").source),
            ("3", SOURCE_STATIC_BROKER_CONFIG)
        );
        assert_eq!(get("broker.id").value, "0");
        assert_eq!(get("auto.create.topics.enable").value, "true");
        assert_eq!(get("auto.create.topics.enable").source, SOURCE_DEFAULT_CONFIG);
        assert_eq!(get("message.max.bytes").value, broker.batch_bytes_max.to_string());
        assert!(entries.iter().all(|e| e.read_only));
    }

    #[test]
    fn configuration_keys_filter_like_kafka() {
        let entries = broker_config_entries(&BrokerConfig::default());
        let all = entries.len();
        assert_eq!(filter_keys(entries.clone(), None).len(), all);
        assert_eq!(filter_keys(entries.clone(), Some(&[])).len(), all);
        let keys = [StrBytes::from_static_str("broker.id"), StrBytes::from_static_str("no.such.key")];
        let kept = filter_keys(entries, Some(&keys));
        assert_eq!(kept.iter().map(|e| e.name).collect::<Vec<_>>(), vec!["broker.id"]);
    }

    /// Every response this module builds encodes at every version it serves (the codec refuses
    /// fields a version lacks, which would close the client's connection).
    #[test]
    fn responses_encode_at_every_served_version() {
        use kafka_protocol::protocol::Encodable;
        let broker = BrokerConfig::default();
        let encode = |body: &dyn Fn(i16) -> Result<usize, String>,
                      versions: std::ops::RangeInclusive<i16>| {
            for v in versions {
                assert!(body(v).unwrap() > 0, "v{v}");
            }
        };
        let failure = || Err(Failure::new(ResponseError::InvalidConfig, "no"));
        let created = || {
            Ok(TopicRequest { partitions: 3, replication_factor: None, overrides: TopicOverrides::default() })
        };
        encode(
            &|v| {
                let topics = vec![
                    creatable_topic_result(v, "a", created(), &broker),
                    creatable_topic_result(v, "b", failure(), &broker),
                ];
                let mut buf = bytes::BytesMut::new();
                CreateTopicsResponse::default()
                    .with_topics(topics)
                    .encode(&mut buf, v)
                    .map_err(|e| e.to_string())?;
                Ok(buf.len())
            },
            2..=7,
        );
        encode(
            &|v| {
                let entries = topic_config_entries(&TopicOverrides::default(), &broker)
                    .into_iter()
                    .chain(broker_config_entries(&broker))
                    .map(|e| describe_result(e, true))
                    .collect();
                let results = vec![
                    DescribeConfigsResult::default().with_error_message(None).with_configs(entries),
                    DescribeConfigsResult::default()
                        .with_error_code(42)
                        .with_error_message(Some(str_bytes("x"))),
                ];
                let mut buf = bytes::BytesMut::new();
                DescribeConfigsResponse::default()
                    .with_results(results)
                    .encode(&mut buf, v)
                    .map_err(|e| e.to_string())?;
                Ok(buf.len())
            },
            1..=4,
        );
        encode(
            &|v| {
                let view = TopicView {
                    name: "t".into(),
                    partition_shards: vec![0, 1],
                    overrides: TopicOverrides::default(),
                    settings: TopicOverrides::default().resolve(&broker),
                    replication: None,
                };
                let body = MetadataResponse::default()
                    .with_brokers(vec![MetadataResponseBroker::default()
                        .with_host(str_bytes("h"))
                        .with_port(9092)])
                    .with_cluster_id(Some(str_bytes("AAAAAAAAAAAAAAAAAAAAAA")))
                    .with_controller_id(BrokerId(NODE_ID))
                    .with_topics(vec![topic_metadata(&view, NODE_ID, &[]), missing_topic_metadata("x/y")]);
                let mut buf = bytes::BytesMut::new();
                body.encode(&mut buf, v).map_err(|e| e.to_string())?;
                Ok(buf.len())
            },
            0..=9,
        );
    }

    #[test]
    fn internal_names_are_reserved() {
        assert!(is_internal("__consumer_offsets"));
        assert!(is_internal("__transaction_state"));
        assert!(!is_internal("__mine"));
    }
}
