//! Topic and group administration: create, grow, delete, list, describe, list offsets; list, describe,
//! delete groups, and read or reset their committed offsets.
//!
//! Owns: the control-plane API and its public data types (the group types live in `group`).
//! Depends on `cluster` for connections and metadata, `group` for the group messages. Rare
//! calls, kept simple: one request at a time; a group's requests go to its coordinator, and a
//! listing of groups to every node that coordinates some.

use std::collections::BTreeSet;

use super::cluster::Cluster;
use super::connection::Connection;
use super::error::{ClientError, Result};
use super::group::{self, CommittedOffset, GroupDescription, GroupListing, ResetTarget, TopicPartitions};
use super::ClientConfig;
use crate::protocol::wire;

/// When the broker acknowledges a produce, per topic (see `schema/ringlog.fbs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Once the batch reached the device (O_DIRECT write done), before fdatasync.
    Written,
    /// Once an fdatasync covering the batch completed.
    Fsync,
}

impl Durability {
    pub(crate) fn to_wire(self) -> wire::Durability {
        match self {
            Durability::Written => wire::Durability::Written,
            Durability::Fsync => wire::Durability::Fsync,
        }
    }

    pub(crate) fn from_wire(d: wire::Durability) -> Option<Durability> {
        match d {
            wire::Durability::Written => Some(Durability::Written),
            wire::Durability::Fsync => Some(Durability::Fsync),
            _ => None,
        }
    }
}

/// Topic settings; `None` takes the broker's default. In a description, the effective values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicSettings {
    /// Per partition; -1 = unlimited.
    pub retention_bytes: Option<i64>,
    /// -1 = unlimited.
    pub retention_ms: Option<i64>,
    pub segment_bytes: Option<i64>,
    pub segment_ms: Option<i64>,
    pub durability: Option<Durability>,
}

/// One partition as the broker reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    pub partition: u32,
    /// The shard (core) that owns the partition.
    pub shard: u32,
    pub log_start_offset: i64,
    pub high_watermark: i64,
    /// Set for a replicated partition (a cluster's topic created with a replication factor).
    pub replication: Option<ReplicaInfo>,
}

/// Where a replicated partition's copies are and who leads it, as the answering node saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaInfo {
    /// Node ids holding a replica, the preferred leader first.
    pub replicas: Vec<u64>,
    pub leader: Option<u64>,
    /// The leader's epoch (its Raft term).
    pub leader_epoch: i64,
    /// The leader's native listener: requests for this partition go there.
    pub leader_address: Option<String>,
    /// The replicas in sync with the leader (empty while the answering node knows no leader).
    pub isr: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicDescription {
    pub name: String,
    /// Sorted by partition number.
    pub partitions: Vec<PartitionInfo>,
    pub config: TopicSettings,
}

/// Which offset `list_offsets` looks up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetSpec {
    /// The log start offset.
    Earliest,
    /// The high watermark: the offset the next record will get.
    Latest,
    /// The first offset whose timestamp is >= this one (milliseconds since the epoch); the log
    /// end if there is none.
    Timestamp(i64),
}

impl OffsetSpec {
    pub(crate) fn wire_timestamp(self) -> i64 {
        match self {
            OffsetSpec::Earliest => crate::protocol::EARLIEST_TIMESTAMP,
            OffsetSpec::Latest => crate::protocol::LATEST_TIMESTAMP,
            OffsetSpec::Timestamp(ts) => ts,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListedOffset {
    pub offset: i64,
    /// The timestamp of the record found, -1 if none (earliest/latest, or past the end).
    pub timestamp_ms: i64,
}

/// Topic administration over the native protocol.
pub struct Admin {
    cluster: Cluster,
}

impl Admin {
    /// Connects to the bootstrap broker (to fail early on a wrong address).
    pub async fn connect(config: ClientConfig) -> Result<Admin> {
        let cluster = Cluster::new(config);
        cluster.bootstrap().await?;
        Ok(Admin { cluster })
    }

    /// Creates a topic; returns its partitions and their owning shards.
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        settings: &TopicSettings,
    ) -> Result<Vec<PartitionInfo>> {
        self.create(name, partitions, None, settings).await
    }

    /// Creates a topic whose partitions are copied to `replication_factor` nodes of the cluster
    /// (sent to the node leading the controller); returns its partitions and replica sets.
    pub async fn create_replicated_topic(
        &self,
        name: &str,
        partitions: u32,
        replication_factor: u16,
        settings: &TopicSettings,
    ) -> Result<Vec<PartitionInfo>> {
        self.create(name, partitions, Some(replication_factor), settings).await
    }

    async fn create(
        &self,
        name: &str,
        partitions: u32,
        replication_factor: Option<u16>,
        settings: &TopicSettings,
    ) -> Result<Vec<PartitionInfo>> {
        let context = format!("create topic {name:?}");
        let encode = |fbb: &mut flatbuffers::FlatBufferBuilder<'static>| {
            let name = fbb.create_string(name);
            let config = wire::TopicConfig::create(
                fbb,
                &wire::TopicConfigArgs {
                    retention_bytes: settings.retention_bytes,
                    retention_ms: settings.retention_ms,
                    segment_bytes: settings.segment_bytes,
                    segment_ms: settings.segment_ms,
                    durability: settings.durability.map(Durability::to_wire),
                },
            );
            let body = wire::CreateTopicRequest::create(
                fbb,
                &wire::CreateTopicRequestArgs {
                    name: Some(name),
                    partitions: Some(partitions),
                    config: Some(config),
                    replication_factor,
                },
            );
            (wire::RequestBody::CreateTopicRequest, body.as_union_value())
        };
        let (conn, frame) = self.cluster.controller_request(&context, encode).await?;
        let response = conn.check_response(&frame, &context)?;
        let body = response.body_as_create_topic_response().ok_or_else(|| {
            ClientError::protocol(conn.addr(), "create topic answered with another response type")
        })?;
        self.cluster.invalidate(name).await;
        Ok(sorted_partitions(body.partitions()))
    }

    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        let context = format!("delete topic {name:?}");
        let encode = |fbb: &mut flatbuffers::FlatBufferBuilder<'static>| {
            let name = fbb.create_string(name);
            let body =
                wire::DeleteTopicRequest::create(fbb, &wire::DeleteTopicRequestArgs { name: Some(name) });
            (wire::RequestBody::DeleteTopicRequest, body.as_union_value())
        };
        let (conn, frame) = self.cluster.controller_request(&context, encode).await?;
        let response = conn.check_response(&frame, &context)?;
        response.body_as_delete_topic_response().ok_or_else(|| {
            ClientError::protocol(conn.addr(), "delete topic answered with another response type")
        })?;
        self.cluster.invalidate(name).await;
        Ok(())
    }

    /// Raises `name`'s partition count to `partitions`, the new total (the count only grows;
    /// existing partitions are untouched). With `validate_only` the broker checks the request
    /// and changes nothing. Returns every partition of the topic as the broker then shows it.
    pub async fn create_partitions(
        &self,
        name: &str,
        partitions: u32,
        validate_only: bool,
    ) -> Result<Vec<PartitionInfo>> {
        let context = format!("grow topic {name:?} to {partitions} partitions");
        let encode = |fbb: &mut flatbuffers::FlatBufferBuilder<'static>| {
            let name = fbb.create_string(name);
            let body = wire::CreatePartitionsRequest::create(
                fbb,
                &wire::CreatePartitionsRequestArgs { name: Some(name), partitions, validate_only },
            );
            (wire::RequestBody::CreatePartitionsRequest, body.as_union_value())
        };
        let (conn, frame) = self.cluster.controller_request(&context, encode).await?;
        let response = conn.check_response(&frame, &context)?;
        let body = response.body_as_create_partitions_response().ok_or_else(|| {
            ClientError::protocol(conn.addr(), "create partitions answered with another response type")
        })?;
        self.cluster.invalidate(name).await;
        Ok(sorted_partitions(body.partitions()))
    }

    /// Names of every topic, sorted.
    pub async fn list_topics(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> =
            self.cluster.metadata(&[]).await?.into_iter().filter_map(|t| t.ok()).map(|t| t.name).collect();
        names.sort();
        Ok(names)
    }

    pub async fn describe_topic(&self, name: &str) -> Result<TopicDescription> {
        let mut description = self
            .cluster
            .metadata(&[name])
            .await?
            .into_iter()
            .next()
            .unwrap_or_else(|| Err(ClientError::UnknownTopic { topic: name.to_owned() }))?;
        self.offsets_from_leaders(&mut description).await;
        Ok(description)
    }

    /// Describes the named topics (all topics if `names` is empty); fails on the first one that
    /// does not exist.
    pub async fn describe_topics(&self, names: &[&str]) -> Result<Vec<TopicDescription>> {
        let mut descriptions: Vec<TopicDescription> =
            self.cluster.metadata(names).await?.into_iter().collect::<Result<_>>()?;
        for description in &mut descriptions {
            self.offsets_from_leaders(description).await;
        }
        Ok(descriptions)
    }

    /// A node with no replica of a replicated partition (a topic on fewer nodes than the
    /// cluster) does not know its offsets and answers -1: they are asked of the partition's
    /// leader. Left at -1 when no leader is known or it does not answer.
    async fn offsets_from_leaders(&self, description: &mut TopicDescription) {
        let unknown = |p: &PartitionInfo| {
            p.high_watermark < 0 && p.replication.as_ref().is_some_and(|r| r.leader.is_some())
        };
        for p in description.partitions.iter_mut().filter(|p| unknown(p)) {
            let first = self.cluster.list_offsets(&description.name, p.partition, OffsetSpec::Earliest).await;
            let end = self.cluster.list_offsets(&description.name, p.partition, OffsetSpec::Latest).await;
            if let (Ok(first), Ok(end)) = (first, end) {
                (p.log_start_offset, p.high_watermark) = (first.offset, end.offset);
            }
        }
    }

    /// Looks up an offset of one partition on its owning shard.
    pub async fn list_offsets(&self, topic: &str, partition: u32, spec: OffsetSpec) -> Result<ListedOffset> {
        self.cluster.list_offsets(topic, partition, spec).await
    }

    /// Every group, sorted by id. A node lists the groups it coordinates, so on a cluster each
    /// node leading a partition of `__consumer_offsets` is asked and the answers merged (Kafka's
    /// admin client asks every broker). Fails if a partition has no leader or its leader does not
    /// answer: a list without that partition's groups would look complete.
    pub async fn list_groups(&self) -> Result<Vec<GroupListing>> {
        let bootstrap = self.cluster.bootstrap().await?;
        let mut groups = group::list_groups(&bootstrap).await?;
        let config = self.cluster.config();
        for addr in self.offsets_leaders().await? {
            if addr == bootstrap.addr() {
                continue;
            }
            let conn = Connection::connect(&addr, &config.client_id, config.request_timeout).await?;
            groups.extend(group::list_groups(&conn).await?);
        }
        groups.sort_by(|a, b| a.group_id.cmp(&b.group_id));
        // A group whose coordinator moved between two answers may be in both.
        groups.dedup_by(|a, b| a.group_id == b.group_id);
        Ok(groups)
    }

    /// The native listeners of the nodes leading `__consumer_offsets`' partitions: none on a
    /// single node (its topic is not replicated) or before the cluster has created the topic.
    async fn offsets_leaders(&self) -> Result<BTreeSet<String>> {
        let described = self.cluster.metadata(&[group::OFFSETS_TOPIC]).await?.into_iter().next();
        let offsets = match described {
            Some(Ok(offsets)) => offsets,
            Some(Err(ClientError::UnknownTopic { .. })) | None => return Ok(BTreeSet::new()),
            Some(Err(e)) => return Err(e),
        };
        let mut leaders = BTreeSet::new();
        for p in &offsets.partitions {
            let Some(replication) = &p.replication else { continue };
            let Some(addr) = &replication.leader_address else {
                return Err(ClientError::broker(
                    format!("list groups: {} partition {}", group::OFFSETS_TOPIC, p.partition),
                    wire::ErrorCode::CoordinatorNotAvailable,
                    Some("no leader is known yet, so its groups cannot be listed; try again once one is elected"),
                ));
            };
            leaders.insert(addr.clone());
        }
        Ok(leaders)
    }

    /// A connection to the group's coordinator: the bootstrap broker on a single node; in a
    /// cluster, the node leading the group's `__consumer_offsets` partition.
    async fn coordinator(&self, group_id: &str) -> Result<Connection> {
        let bootstrap = self.cluster.bootstrap().await?;
        let config = self.cluster.config();
        let addr = group::find_coordinator(&bootstrap, &config.bootstrap, group_id).await?;
        if addr == bootstrap.addr() {
            return Ok(bootstrap);
        }
        Connection::connect(&addr, &config.client_id, config.request_timeout).await
    }

    /// A group's state, generation and members with their assignments.
    pub async fn describe_group(&self, group_id: &str) -> Result<GroupDescription> {
        group::describe_group(&self.coordinator(group_id).await?, group_id).await
    }

    /// The group's committed offsets with each partition's log end and lag, for `topics`
    /// (every partition the group has committed if empty).
    pub async fn group_offsets(
        &self,
        group_id: &str,
        topics: &[TopicPartitions],
    ) -> Result<Vec<CommittedOffset>> {
        group::fetch_offsets(&self.coordinator(group_id).await?, group_id, topics).await
    }

    /// Deletes a group and its committed offsets; fails with GroupNotEmpty while it has members.
    pub async fn delete_group(&self, group_id: &str) -> Result<()> {
        group::delete_group(&self.coordinator(group_id).await?, group_id).await
    }

    /// Moves the group's committed offsets on `partitions` of `topic` (all partitions if empty);
    /// fails with GroupNotEmpty while it has members. Returns the new committed offsets.
    pub async fn reset_group_offsets(
        &self,
        group_id: &str,
        topic: &str,
        partitions: &[u32],
        target: ResetTarget,
    ) -> Result<Vec<CommittedOffset>> {
        group::reset_offsets(&self.coordinator(group_id).await?, group_id, topic, partitions, target).await
    }
}

/// A topic's partitions as a create or grow answer lists them, in partition order.
fn sorted_partitions<'a>(
    listed: Option<flatbuffers::Vector<'a, flatbuffers::ForwardsUOffset<wire::PartitionMetadata<'a>>>>,
) -> Vec<PartitionInfo> {
    let mut partitions: Vec<PartitionInfo> =
        listed.iter().flat_map(|v| v.iter()).map(super::cluster::partition_info).collect();
    partitions.sort_by_key(|p| p.partition);
    partitions
}
