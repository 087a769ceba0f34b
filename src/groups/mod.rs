//! Consumer groups: the group coordinator of each shard and the `__consumer_offsets` topic.
//!
//! Owns: which shard coordinates a group (Kafka's placement: the owner of partition
//! `abs(java_hashcode(group_id)) % offsets_topic_partitions` of `__consumer_offsets`), the groups
//! that shard coordinates (`Coordinator`, one per shard, a shard extension), their persistence
//! as keyed records in that topic (written through the shard's append API like every other write,
//! replayed by `load` when the shard starts), their timers and offset retention.
//! The state machine is in `state`, assignors in `assignor`, the record layout in `codec`, the
//! request/reply values in `messages`. May depend on `shard` (routing, appends, metadata view),
//! `storage` (reading a partition back at load), `metadata`, `record`, `config`; never on
//! connections or protocols (the wire is `native::groups` and `kafka::groups`).
//! Control plane: nothing here is on the produce/fetch path.

pub mod assignor;
pub mod codec;
pub mod messages;
pub mod state;

use std::cell::{Cell, RefCell};
use std::collections::hash_map::{Entry, RandomState};
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::rc::Rc;
use std::time::Duration;

use bytes::BytesMut;
use futures::future::join_all;

use crate::config::{BrokerConfig, DurabilitySetting};
use crate::metadata::{self, MetadataError, MetadataStore, TopicMeta, TopicOverrides, OFFSETS_TOPIC};
use crate::record::builder::BatchBuilder;
use crate::shard::mesh::{AppendItem, OffsetQuery};
use crate::shard::{now_ms, BrokerError, PendingAppend, Shard};
use crate::storage::Partition;
use codec::{OffsetValue, RecordKey};
use messages::*;
use state::{Group, GroupLimits, SyncWait};

/// Longest group id, member id and client id accepted.
pub const GROUP_ID_BYTES_MAX: usize = 255;
/// Longest metadata string stored with a committed offset (Kafka's `offset.metadata.max.bytes`).
pub const OFFSET_METADATA_BYTES_MAX: usize = 4096;
/// How often each shard checks its groups' deadlines (sessions, join and sync phases).
const TIMER_TICK_MS: u64 = 100;
/// How often offset retention runs (at most; sooner when the retention itself is shorter).
const RETENTION_CHECK_INTERVAL_MS: i64 = 60_000;
/// Segment size of `__consumer_offsets` (Kafka's default for it).
const OFFSETS_SEGMENT_BYTES: u64 = 100 << 20;
/// Bytes read per step while replaying an offsets partition.
const REPLAY_READ_BYTES: usize = 1 << 20;

/// Java's `String.hashCode` over UTF-16 code units, so group placement matches Kafka's.
pub fn java_string_hash(s: &str) -> i32 {
    s.encode_utf16().fold(0i32, |h, unit| h.wrapping_mul(31).wrapping_add(i32::from(unit)))
}

/// Kafka's `Utils.abs(groupId.hashCode) % partitions` (where `abs(i32::MIN)` is 0).
pub fn offsets_partition_for(group_id: &str, partitions: u32) -> u32 {
    debug_assert!(partitions > 0);
    let h = java_string_hash(group_id);
    let abs = if h == i32::MIN { 0 } else { h.unsigned_abs() };
    abs % partitions.max(1)
}

/// Adds `__consumer_offsets` to the metadata if it is missing (at start, before shards open).
/// An existing topic keeps its partition count: changing it would move every group.
pub fn ensure_offsets_topic(
    store: &mut MetadataStore,
    config: &BrokerConfig,
    shards: usize,
) -> Result<(), MetadataError> {
    if let Some(existing) = store.get(OFFSETS_TOPIC) {
        if existing.partition_shards.len() != config.offsets_topic_partitions as usize {
            tracing::warn!(
                existing = existing.partition_shards.len(),
                configured = config.offsets_topic_partitions,
                "{OFFSETS_TOPIC} keeps its existing partition count; offsets_topic_partitions applies to new data directories only"
            );
        }
        return Ok(());
    }
    let loads = store.shard_loads(shards);
    let meta = TopicMeta {
        name: OFFSETS_TOPIC.to_string(),
        partition_shards: metadata::assign_partitions(config.offsets_topic_partitions as usize, &loads),
        overrides: offsets_topic_overrides(config),
        created_ms: now_ms(),
    };
    tracing::info!(partitions = config.offsets_topic_partitions, "creating {OFFSETS_TOPIC}");
    store.insert(meta)
}

/// The settings of `__consumer_offsets`, local or replicated: kept forever (compaction is the
/// groups' own tombstones), fsynced, segments as large as Kafka's.
pub fn offsets_topic_overrides(config: &BrokerConfig) -> TopicOverrides {
    TopicOverrides {
        segment_bytes: Some(OFFSETS_SEGMENT_BYTES.max(config.batch_bytes_max as u64)),
        segment_ms: None,
        retention_bytes: Some(-1),
        retention_ms: Some(-1),
        durability: Some(DurabilitySetting::Fsync),
    }
}

/// The groups one shard coordinates.
#[derive(Default)]
pub struct Coordinator {
    groups: RefCell<HashMap<String, Group>>,
    member_seq: Cell<u64>,
    last_retention_check_ms: Cell<i64>,
    /// A replicated `__consumer_offsets`' partitions whose groups this shard holds: it leads them
    /// and has replayed their logs. Their groups are served; others' are not (another node leads).
    loaded: RefCell<HashSet<u32>>,
    /// Partitions being replayed after this node gained their leadership.
    loading: RefCell<HashSet<u32>>,
}

impl Coordinator {
    /// `<client_id>-<32 hex digits>`: a per-shard sequence mixed with random keys, unique within
    /// the shard (which holds every member of its groups) and not guessable across restarts.
    fn new_member_id(&self, shard: u32, client_id: &str) -> String {
        let seq = self.member_seq.get() + 1;
        self.member_seq.set(seq);
        let random = RandomState::new().hash_one((shard, seq, now_ms()));
        let prefix = if client_id.is_empty() { "member" } else { client_id };
        format!("{prefix}-{random:016x}{:08x}{seq:08x}", shard)
    }
}

impl Coordinator {
    /// Bytes its groups hold, for `ringlog_memory_bytes{component="group_state"}`.
    fn memory_bytes(&self) -> usize {
        let groups = self.groups.borrow();
        let table = groups.capacity() * (std::mem::size_of::<(String, Group)>() + 1);
        table + groups.iter().map(|(id, g)| id.capacity() + g.memory_bytes()).sum::<usize>()
    }
}

/// This shard's coordinator, registered on first use (`load` does so at start-up), with the
/// measure of its memory.
fn coordinator(shard: &Shard) -> Rc<Coordinator> {
    shard.extension::<Coordinator>().unwrap_or_else(|| {
        let co = Rc::new(Coordinator::default());
        shard.set_extension(co.clone());
        let weak = Rc::downgrade(&co);
        crate::metrics::memory_source(crate::metrics::Memory::GroupState, move || {
            weak.upgrade().map_or(0, |co| co.memory_bytes())
        });
        co
    })
}

/// Runs a group request on its coordinator shard `owner`: locally, or one mesh hop.
async fn request_on(shard: &Rc<Shard>, owner: u32, request: GroupRequest) -> GroupOutcome {
    if owner == shard.id {
        return execute_local(shard, request).await;
    }
    let answer = shard.invoke_on(owner, move |s| async move { execute_local(&s, request).await }).await;
    answer.await.map_err(|_| GroupError::ShuttingDown)?
}

fn limits(config: &BrokerConfig) -> GroupLimits {
    GroupLimits {
        initial_rebalance_delay_ms: config.group_initial_rebalance_delay_ms,
        min_session_timeout_ms: config.group_min_session_timeout_ms,
        max_session_timeout_ms: config.group_max_session_timeout_ms,
        members_max: config.group_members_max,
    }
}

fn partition_counts(shard: &Shard) -> impl Fn(&str) -> Option<u32> + '_ {
    move |topic| shard.topic(topic).map(|v| v.partition_shards.len() as u32)
}

fn validate_group_id(group_id: &str) -> Result<(), GroupError> {
    if group_id.is_empty() {
        return Err(GroupError::InvalidGroupId("the group id is empty".into()));
    }
    if group_id.len() > GROUP_ID_BYTES_MAX {
        return Err(GroupError::InvalidGroupId(format!(
            "the group id is {} bytes; the limit is {GROUP_ID_BYTES_MAX}",
            group_id.len()
        )));
    }
    Ok(())
}

/// `(offsets partition, coordinator shard)` of a group.
pub fn coordinator_of(shard: &Shard, group_id: &str) -> Result<(u32, u32), GroupError> {
    validate_group_id(group_id)?;
    let view = shard.topic(OFFSETS_TOPIC).ok_or_else(|| {
        GroupError::CoordinatorNotAvailable(format!("the {OFFSETS_TOPIC} topic does not exist"))
    })?;
    let partition = offsets_partition_for(group_id, view.partition_shards.len() as u32);
    Ok((partition, view.partition_shards[partition as usize]))
}

/// Runs a group request from any shard: on the group's coordinator (locally or one mesh hop), or,
/// for ListGroups, on every shard.
pub async fn execute(shard: &Rc<Shard>, request: GroupRequest) -> GroupOutcome {
    let Some(group_id) = request.group_id() else {
        let parts = join_all((0..shard.count).map(|s| request_on(shard, s, GroupRequest::ListLocal))).await;
        let mut all = Vec::new();
        for part in parts {
            if let GroupReply::List(groups) = part? {
                all.extend(groups);
            }
        }
        all.sort_by(|a, b| a.group_id.cmp(&b.group_id));
        return Ok(GroupReply::List(all));
    };
    let (_, owner) = coordinator_of(shard, group_id)?;
    request_on(shard, owner, request).await
}

/// In a cluster, `__consumer_offsets` is replicated and a group's coordinator is the node leading
/// its offsets partition, once it has replayed that partition's log (Kafka's rule).
fn check_led_here(shard: &Shard, group_id: &str, partition: u32) -> Result<(), GroupError> {
    let Some(view) = shard.replica_leader(OFFSETS_TOPIC, partition) else { return Ok(()) };
    let loaded = coordinator(shard).loaded.borrow().contains(&partition);
    match (view.serving_here, loaded) {
        (true, true) => Ok(()),
        (true, false) => Err(GroupError::LoadInProgress { group: group_id.to_string(), partition }),
        (false, _) => {
            Err(GroupError::NotCoordinatorNode { group: group_id.to_string(), leader: view.leader })
        }
    }
}

/// Runs a group request on this shard, which must be the group's coordinator.
pub async fn execute_local(shard: &Rc<Shard>, request: GroupRequest) -> GroupOutcome {
    if let Some(group_id) = request.group_id() {
        let (partition, owner) = coordinator_of(shard, group_id)?;
        if owner != shard.id {
            return Err(GroupError::NotCoordinator { group: group_id.to_string(), shard: shard.id });
        }
        check_led_here(shard, group_id, partition)?;
    }
    match request {
        GroupRequest::Join(r) => join(shard, r).await,
        GroupRequest::Sync(r) => sync(shard, r).await,
        GroupRequest::Heartbeat(r) => with_group(shard, &r.group_id, &r.member_id, |g, _, now| {
            g.heartbeat(&r.member_id, r.generation, now)
        })
        .map(|()| GroupReply::Done),
        GroupRequest::Leave { group_id, member_id } => {
            with_group(shard, &group_id, &member_id, |g, pc, now| g.leave(&member_id, pc, now))
                .map(|()| GroupReply::Done)
        }
        GroupRequest::Commit(r) => commit(shard, r).await,
        GroupRequest::FetchOffsets(r) => fetch_offsets(shard, r).await,
        GroupRequest::Describe { group_id } => match coordinator(shard).groups.borrow().get(&group_id) {
            Some(g) => Ok(GroupReply::Describe(g.describe())),
            None => Err(GroupError::NotFound { group: group_id }),
        },
        GroupRequest::Delete { group_id } => delete(shard, group_id).await,
        GroupRequest::Reset(r) => reset(shard, r).await,
        GroupRequest::ListLocal => {
            Ok(GroupReply::List(coordinator(shard).groups.borrow().values().map(Group::listing).collect()))
        }
    }
}

/// Runs `op` on an existing group (a missing group means the member is unknown), then records
/// the group's metadata if the operation changed it.
fn with_group<T>(
    shard: &Shard,
    group_id: &str,
    member_id: &str,
    op: impl FnOnce(&mut Group, &dyn Fn(&str) -> Option<u32>, i64) -> Result<T, GroupError>,
) -> Result<T, GroupError> {
    let now = now_ms();
    let co = coordinator(shard);
    let mut groups = co.groups.borrow_mut();
    let group = groups.get_mut(group_id).ok_or_else(|| GroupError::UnknownMember {
        group: group_id.to_string(),
        member: member_id.to_string(),
    })?;
    let out = op(group, &partition_counts(shard), now);
    persist_if_dirty(shard, group, now);
    out
}

/// Every string a join stores (and records in `__consumer_offsets`) has a bound.
fn check_join(req: &JoinRequest) -> Result<(), GroupError> {
    let ids =
        [("member id", &req.member_id), ("client id", &req.client_id), ("protocol type", &req.protocol_type)];
    let names = req.protocols.iter().map(|(name, _)| ("protocol name", name));
    for (what, id) in ids.into_iter().chain(names) {
        if id.len() > GROUP_ID_BYTES_MAX {
            return Err(GroupError::InvalidRequest(format!(
                "the {what} is {} bytes; the limit is {GROUP_ID_BYTES_MAX}",
                id.len()
            )));
        }
    }
    check_topic_names(req.topics.iter())
}

fn check_topic_names<'a>(mut topics: impl Iterator<Item = &'a String>) -> Result<(), GroupError> {
    match topics.find(|t| t.len() > crate::config::TOPIC_NAME_BYTES_MAX) {
        Some(t) => Err(GroupError::InvalidRequest(format!(
            "a topic name of {} bytes is longer than topic names can be ({})",
            t.len(),
            crate::config::TOPIC_NAME_BYTES_MAX
        ))),
        None => Ok(()),
    }
}

async fn join(shard: &Rc<Shard>, req: JoinRequest) -> GroupOutcome {
    check_join(&req)?;
    let now = now_ms();
    let group_id = req.group_id.clone();
    let parked = {
        let co = coordinator(shard);
        let mut groups = co.groups.borrow_mut();
        let group = groups.entry(group_id.clone()).or_insert_with(|| Group::new(group_id.clone(), now));
        let joined = group.join(
            req,
            |client| co.new_member_id(shard.id, client),
            &limits(&shard.config),
            &partition_counts(shard),
            now,
        );
        persist_if_dirty(shard, group, now);
        if joined.is_err() {
            forget_if_unused(&mut groups, &group_id);
        }
        joined?
    };
    match parked.await {
        Ok(response) => response.map(GroupReply::Join),
        Err(_) => {
            Err(GroupError::CoordinatorNotAvailable(format!("group '{group_id}' was unloaded; rejoin")))
        }
    }
}

async fn sync(shard: &Rc<Shard>, req: SyncRequest) -> GroupOutcome {
    check_topic_names(req.assignments.iter().flat_map(|a| a.partitions.iter().map(|(t, _)| t)))?;
    let group_id = req.group_id.clone();
    let member_id = req.member_id.clone();
    let wait = with_group(shard, &group_id, &member_id, |g, _, now| g.sync(req, now))?;
    match wait {
        SyncWait::Ready(r) => Ok(GroupReply::Sync(r)),
        SyncWait::Parked(rx) => match rx.await {
            Ok(r) => r.map(GroupReply::Sync),
            Err(_) => {
                Err(GroupError::CoordinatorNotAvailable(format!("group '{group_id}' was unloaded; rejoin")))
            }
        },
    }
}

/// Drops a group that holds nothing (a refused first join, a failed commit into a new group).
/// Member ids handed out with MEMBER_ID_REQUIRED keep it: their members are about to join.
fn forget_if_unused(groups: &mut HashMap<String, Group>, group_id: &str) {
    if let Entry::Occupied(e) = groups.entry(group_id.to_string()) {
        let g = e.get();
        if g.is_empty() && !g.has_pending_members() && g.offsets.is_empty() && !g.has_metadata_record {
            e.remove();
        }
    }
}

// ---- Writing __consumer_offsets ------------------------------------------------------------------

/// Appends keyed records to the group's offsets partition (synchronously, through the shard's
/// append API, so the log order is the order of the state changes) and returns what to wait on
/// for durability.
fn append_records(
    shard: &Shard,
    group_id: &str,
    records: &[(Vec<u8>, Option<Vec<u8>>)],
    now: i64,
) -> Result<PendingAppend, GroupError> {
    let (partition, _) = coordinator_of(shard, group_id)?;
    let batch_bytes_max = shard.config.batch_bytes_max;
    let records_max = shard.config.records_per_batch_max as usize;
    let mut batches = BytesMut::new();
    let mut builder = BatchBuilder::new();
    for (key, value) in records {
        let len = builder.record_encoded_len(now, Some(key), value.as_deref(), &[]);
        if !builder.is_empty()
            && (builder.encoded_len() + len > batch_bytes_max || builder.len() >= records_max)
        {
            batches.extend_from_slice(&std::mem::take(&mut builder).finish());
        }
        builder.push(now, Some(key), value.as_deref(), &[]);
    }
    if !builder.is_empty() {
        batches.extend_from_slice(&builder.finish());
    }
    let item = AppendItem { topic: std::sync::Arc::from(OFFSETS_TOPIC), partition, batches, timeout: None };
    shard.append_owned(item).map_err(|source| GroupError::Storage { group: group_id.to_string(), source })
}

async fn wait_durable(group_id: &str, pending: PendingAppend) -> Result<(), GroupError> {
    match pending.durable().await {
        Ok(_) => Ok(()),
        Err(source) => Err(GroupError::Storage { group: group_id.to_string(), source }),
    }
}

/// Records the group's metadata if a transition flagged it. The record is appended in order now;
/// its durability is awaited in the background. A record lost to a crash before it was durable
/// brings the group back as the record before it left it, an older generation: the members are
/// fenced by their generation and rejoin, so it costs a rebalance, never an offset.
///
/// A record holding a new assignment is different: the group answers SyncGroup with it only once
/// the record is durable (committed, when `__consumer_offsets` is replicated), as Kafka's
/// coordinator does, and voids it (the members rejoin) if it cannot be stored. Otherwise a member
/// could work from an assignment that a restart or a new coordinator never heard of.
fn persist_if_dirty(shard: &Shard, group: &mut Group, now: i64) {
    if !group.take_dirty() {
        return;
    }
    let key = RecordKey::Group { group: group.id.clone() }.encode();
    let value = group.metadata_record(now).encode();
    let appended = append_records(shard, &group.id, &[(key, Some(value))], now);
    if appended.is_ok() {
        group.has_metadata_record = true;
    }
    let group_id = group.id.clone();
    if group.awaits_record() {
        let generation = group.generation();
        let not_stored = move |group_id: String, e: GroupError| GroupError::AssignmentNotStored {
            group: group_id,
            generation,
            source: Box::new(e),
        };
        match appended {
            Ok(pending) => {
                let co = coordinator(shard);
                glommio::spawn_local(async move {
                    let stored = wait_durable(&group_id, pending).await;
                    // The group may have rebalanced meanwhile (the report is then ignored) or been
                    // unloaded with its partition's leadership (its members' parked requests were
                    // answered then).
                    let mut groups = co.groups.borrow_mut();
                    let Some(group) = groups.get_mut(&group_id) else { return };
                    match stored {
                        Ok(()) => group.record_stored(generation),
                        Err(e) => group.record_failed(generation, not_stored(group_id, e), now_ms()),
                    }
                })
                .detach();
            }
            Err(e) => group.record_failed(generation, not_stored(group_id, e), now),
        }
        return;
    }
    match appended {
        Ok(pending) => {
            glommio::spawn_local(async move {
                if let Err(e) = wait_durable(&group_id, pending).await {
                    tracing::error!(group = %group_id, "group metadata record not durable: {e}");
                }
            })
            .detach();
        }
        Err(e) => tracing::error!(group = %group_id, "cannot record group metadata: {e}"),
    }
}

fn offset_record(
    group_id: &str,
    topic: &str,
    partition: u32,
    value: Option<&OffsetValue>,
) -> (Vec<u8>, Option<Vec<u8>>) {
    let key = RecordKey::Offset { group: group_id.to_string(), topic: topic.to_string(), partition };
    (key.encode(), value.map(OffsetValue::encode))
}

// ---- Offsets --------------------------------------------------------------------------------------

fn check_partition(shard: &Shard, topic: &str, partition: u32) -> Result<(), GroupError> {
    shard.route(topic, partition).map(|_| ()).map_err(GroupError::Partition)
}

async fn commit(shard: &Rc<Shard>, req: CommitRequest) -> GroupOutcome {
    let now = now_ms();
    let MemberRef { group_id, generation, member_id } = req.member;
    let mut results: Vec<CommitResult> = Vec::with_capacity(req.partitions.len());
    let mut accepted: Vec<(String, u32, OffsetValue)> = Vec::new();
    for p in req.partitions {
        let verdict = check_partition(shard, &p.topic, p.partition).and_then(|()| {
            if p.offset < 0 {
                Err(GroupError::InvalidRequest(format!("offset {} is negative", p.offset)))
            } else if p.metadata.len() > OFFSET_METADATA_BYTES_MAX {
                Err(GroupError::InvalidRequest(format!(
                    "metadata of {} bytes exceeds {OFFSET_METADATA_BYTES_MAX}",
                    p.metadata.len()
                )))
            } else {
                Ok(())
            }
        });
        if verdict.is_ok() {
            let value = OffsetValue { offset: p.offset, metadata: p.metadata, commit_timestamp_ms: now };
            accepted.push((p.topic.clone(), p.partition, value));
        }
        results.push((p.topic, p.partition, verdict.err()));
    }
    let durable = {
        let co = coordinator(shard);
        let mut groups = co.groups.borrow_mut();
        let outside_membership = generation < 0 && member_id.is_empty();
        let group = match groups.entry(group_id.clone()) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) if outside_membership => e.insert(Group::new(group_id.clone(), now)),
            Entry::Vacant(_) => return Err(GroupError::UnknownMember { group: group_id, member: member_id }),
        };
        if let Err(e) = group.check_commit(&member_id, generation, now) {
            forget_if_unused(&mut groups, &group_id);
            return Err(e);
        }
        if accepted.is_empty() {
            forget_if_unused(&mut groups, &group_id);
            None
        } else {
            let records: Vec<_> =
                accepted.iter().map(|(t, p, v)| offset_record(&group_id, t, *p, Some(v))).collect();
            let appended = append_records(shard, &group_id, &records, now);
            if appended.is_ok() {
                for (topic, partition, value) in accepted {
                    group.offsets.insert((topic, partition), value);
                }
                if outside_membership {
                    group.empty_since_ms = now;
                }
            }
            if appended.is_err() {
                forget_if_unused(&mut groups, &group_id);
            }
            Some(appended)
        }
    };
    let failure = match durable {
        None => None,
        Some(Err(e)) => Some(e),
        Some(Ok(pending)) => wait_durable(&group_id, pending).await.err(),
    };
    if let Some(e) = failure {
        for (_, _, verdict) in results.iter_mut().filter(|(_, _, v)| v.is_none()) {
            *verdict = Some(e.clone());
        }
    }
    Ok(GroupReply::Commit(results))
}

/// Adds each partition's log end (high watermark) and lag, asked from the partitions' owners.
async fn with_log_ends(shard: &Rc<Shard>, mut offsets: Vec<PartitionOffset>) -> Vec<PartitionOffset> {
    let mut queries = Vec::new();
    let mut slots = Vec::new();
    for (i, o) in offsets.iter().enumerate() {
        if let Ok((view, owner)) = shard.route(&o.topic, o.partition) {
            queries.push((owner, (view.name.clone(), o.partition)));
            slots.push(i);
        }
    }
    let states = shard.partition_states(queries).await;
    for (i, state) in slots.into_iter().zip(states) {
        if let Some((_, high_watermark)) = state {
            let o = &mut offsets[i];
            o.log_end_offset = high_watermark;
            if o.offset >= 0 {
                o.lag = high_watermark - o.offset;
            }
        }
    }
    offsets
}

fn committed(group: Option<&Group>, topic: &str, partition: u32) -> PartitionOffset {
    let value = group.and_then(|g| g.offsets.get(&(topic.to_string(), partition)));
    PartitionOffset {
        topic: topic.to_string(),
        partition,
        offset: value.map_or(-1, |v| v.offset),
        metadata: value.map(|v| v.metadata.clone()).unwrap_or_default(),
        log_end_offset: -1,
        lag: -1,
        error: None,
    }
}

async fn fetch_offsets(shard: &Rc<Shard>, req: OffsetFetchRequest) -> GroupOutcome {
    let offsets: Vec<PartitionOffset> = {
        let co = coordinator(shard);
        let groups = co.groups.borrow();
        let group = groups.get(&req.group_id);
        if req.topics.is_empty() {
            group
                .map(|g| g.offsets.keys().map(|(t, p)| committed(Some(g), t, *p)).collect())
                .unwrap_or_default()
        } else {
            let mut out = Vec::new();
            for (topic, partitions) in &req.topics {
                let partitions: Vec<u32> = if partitions.is_empty() {
                    // The whole topic: every partition it has, plus any committed beyond (deleted and
                    // recreated smaller).
                    let count = partition_counts(shard)(topic).unwrap_or(0);
                    let mut all: Vec<u32> = (0..count).collect();
                    if let Some(g) = group {
                        all.extend(
                            g.offsets.keys().filter(|(t, p)| t == topic && *p >= count).map(|(_, p)| *p),
                        );
                    }
                    all
                } else {
                    partitions.clone()
                };
                out.extend(partitions.into_iter().map(|p| committed(group, topic, p)));
            }
            out
        }
    };
    Ok(GroupReply::Offsets(with_log_ends(shard, offsets).await))
}

async fn delete(shard: &Rc<Shard>, group_id: String) -> GroupOutcome {
    let now = now_ms();
    let pending = {
        let co = coordinator(shard);
        let mut groups = co.groups.borrow_mut();
        let group = groups.get(&group_id).ok_or_else(|| GroupError::NotFound { group: group_id.clone() })?;
        if !group.is_empty() {
            return Err(GroupError::NotEmpty { group: group_id, members: group.member_count() });
        }
        let mut records: Vec<_> =
            group.offsets.keys().map(|(t, p)| offset_record(&group_id, t, *p, None)).collect();
        records.push((RecordKey::Group { group: group_id.clone() }.encode(), None));
        let appended = append_records(shard, &group_id, &records, now)?;
        groups.remove(&group_id);
        appended
    };
    tracing::info!(group = %group_id, "group deleted");
    wait_durable(&group_id, pending).await?;
    Ok(GroupReply::Done)
}

async fn reset(shard: &Rc<Shard>, req: ResetRequest) -> GroupOutcome {
    let ensure_empty = || -> Result<(), GroupError> {
        match coordinator(shard).groups.borrow().get(&req.group_id) {
            Some(g) if !g.is_empty() => {
                Err(GroupError::NotEmpty { group: req.group_id.clone(), members: g.member_count() })
            }
            _ => Ok(()),
        }
    };
    ensure_empty()?;
    let view =
        shard.topic(&req.topic).ok_or_else(|| GroupError::UnknownTopic { topic: req.topic.clone() })?;
    let count = view.partition_shards.len() as u32;
    let partitions: Vec<u32> =
        if req.partitions.is_empty() { (0..count).collect() } else { req.partitions.clone() };
    let mut rows: Vec<PartitionOffset> = partitions.iter().map(|&p| committed(None, &req.topic, p)).collect();
    // Where each partition goes: an explicit offset is kept within the log; a timestamp is looked up.
    let mut queries = Vec::new();
    let mut query_rows = Vec::new();
    for (i, row) in rows.iter_mut().enumerate() {
        match shard.route(&req.topic, row.partition) {
            Err(e) => row.error = Some(GroupError::Partition(e)),
            Ok((_, owner)) => {
                let timestamp_ms = match req.target {
                    ResetTarget::Timestamp(ts) => ts,
                    ResetTarget::Offset(_) => -1,
                };
                queries.push((
                    owner,
                    OffsetQuery {
                        topic: view.name.clone(),
                        partition: row.partition,
                        timestamp_ms,
                        current_leader_epoch: None,
                    },
                ));
                query_rows.push(i);
            }
        }
    }
    let found = shard.list_offsets(queries).await.await;
    let states: Vec<_> = {
        let items = query_rows.iter().map(|&i| {
            let p = rows[i].partition;
            (view.partition_shards[p as usize], (view.name.clone(), p))
        });
        shard.partition_states(items.collect()).await
    };
    for ((i, outcome), state) in query_rows.into_iter().zip(found).zip(states) {
        let row = &mut rows[i];
        match (req.target, outcome, state) {
            (_, Err(e), _) => row.error = Some(GroupError::Partition(e)),
            (ResetTarget::Offset(o), Ok(_), Some((start, end))) => row.offset = o.clamp(start, end),
            (ResetTarget::Timestamp(_), Ok(Some(found)), _) => row.offset = found.offset,
            (ResetTarget::Timestamp(_), Ok(None), Some((_, end))) => row.offset = end,
            (_, Ok(_), _) => {
                row.error =
                    Some(GroupError::Partition(BrokerError::unknown_partition(&req.topic, row.partition)))
            }
        }
    }
    let commit_req = CommitRequest {
        member: MemberRef { group_id: req.group_id.clone(), generation: -1, member_id: String::new() },
        partitions: rows
            .iter()
            .filter(|r| r.error.is_none())
            .map(|r| CommitPartition {
                topic: r.topic.clone(),
                partition: r.partition,
                offset: r.offset,
                metadata: String::new(),
            })
            .collect(),
    };
    let GroupReply::Commit(results) = commit(shard, commit_req).await? else {
        return Err(GroupError::InvalidRequest("commit answered with another reply".into()));
    };
    let mut results = results.into_iter();
    for row in rows.iter_mut().filter(|r| r.error.is_none()) {
        if let Some((_, _, Some(e))) = results.next() {
            row.error = Some(e);
        }
    }
    tracing::info!(group = %req.group_id, topic = %req.topic, target = ?req.target, "offsets reset");
    Ok(GroupReply::Offsets(with_log_ends(shard, rows).await))
}

// ---- Start-up and timers --------------------------------------------------------------------------

/// Replays every `__consumer_offsets` partition this shard owns, rebuilding its groups and
/// committed offsets. Runs before the shard serves requests.
pub async fn load(shard: &Rc<Shard>) -> Result<(), String> {
    let Some(view) = shard.topic(OFFSETS_TOPIC) else { return Ok(()) };
    if view.replication.is_some() {
        // Loaded partition by partition as this node gains their leadership (`follow_leaders`).
        return Ok(());
    }
    let now = now_ms();
    let mut groups: HashMap<String, Group> = HashMap::new();
    let mut records = 0usize;
    for (p, _) in view.partition_shards.iter().enumerate().filter(|(_, &owner)| owner == shard.id) {
        let Some(partition) = shard.partition(OFFSETS_TOPIC, p as u32) else { continue };
        records += replay_partition(&partition, p as u32, &mut groups, now)
            .await
            .map_err(|e| format!("{OFFSETS_TOPIC} partition {p}: {e}"))?;
    }
    settle_replayed(&mut groups, now);
    if !groups.is_empty() || records > 0 {
        tracing::info!(shard = shard.id, groups = groups.len(), records, "consumer groups loaded");
    }
    *coordinator(shard).groups.borrow_mut() = groups;
    Ok(())
}

/// Groups rebuilt from a log keep only what the log still holds of them, and count as empty
/// since their last recorded activity (offset retention runs from there).
fn settle_replayed(groups: &mut HashMap<String, Group>, now: i64) {
    groups.retain(|_, g| g.has_metadata_record || !g.offsets.is_empty());
    for g in groups.values_mut() {
        let last_commit = g.offsets.values().map(|v| v.commit_timestamp_ms).max().unwrap_or(i64::MIN);
        let last_activity = g.empty_since_ms.max(last_commit);
        g.empty_since_ms = if last_activity == i64::MIN || last_activity == 0 { now } else { last_activity };
    }
}

/// Follows the leadership of a replicated `__consumer_offsets`' partitions hosted on this shard:
/// a partition this node now leads (and serves) is replayed and its groups served; one it no
/// longer leads has its groups dropped (their members' parked requests fail, and they find the
/// new coordinator). Runs on every timer tick: a leadership change reaches groups within one.
fn follow_leaders(shard: &Rc<Shard>) {
    let Some(view) = shard.topic(OFFSETS_TOPIC) else { return };
    if view.replication.is_none() {
        return;
    }
    let co = coordinator(shard);
    let partitions = view.partition_shards.len() as u32;
    for p in (0..partitions).filter(|&p| view.partition_shards[p as usize] == shard.id) {
        let serving = shard.replica_leader(OFFSETS_TOPIC, p).is_some_and(|v| v.serving_here);
        let loaded = co.loaded.borrow().contains(&p);
        if serving && !loaded && co.loading.borrow_mut().insert(p) {
            glommio::spawn_local(load_led_partition(shard.clone(), p, partitions)).detach();
        } else if !serving && loaded {
            co.loaded.borrow_mut().remove(&p);
            let mut groups = co.groups.borrow_mut();
            let before = groups.len();
            groups.retain(|id, _| offsets_partition_for(id, partitions) != p);
            tracing::info!(
                partition = p,
                groups = before - groups.len(),
                "{OFFSETS_TOPIC} partition led elsewhere now: its groups are unloaded"
            );
        }
    }
}

/// Replays offsets partition `p`, which this node has just come to lead, and serves its groups.
/// A leader serves only after committing an entry of its term, so its log up to the high
/// watermark holds every committed change of these groups.
async fn load_led_partition(shard: Rc<Shard>, p: u32, partitions: u32) {
    let co = coordinator(&shard);
    let mut groups = HashMap::new();
    let replayed = match shard.partition(OFFSETS_TOPIC, p) {
        Some(partition) => replay_partition(&partition, p, &mut groups, now_ms()).await,
        None => Err("no replica of it on this node".to_string()),
    };
    co.loading.borrow_mut().remove(&p);
    let records = match replayed {
        Ok(records) => records,
        Err(e) => {
            // Retried at the next tick, while this node still leads it.
            tracing::error!(partition = p, "cannot load the groups of {OFFSETS_TOPIC}: {e}");
            return;
        }
    };
    if !shard.replica_leader(OFFSETS_TOPIC, p).is_some_and(|v| v.serving_here) {
        return;
    }
    settle_replayed(&mut groups, now_ms());
    let count = groups.len();
    {
        let mut held = co.groups.borrow_mut();
        held.retain(|id, _| offsets_partition_for(id, partitions) != p);
        held.extend(groups);
    }
    co.loaded.borrow_mut().insert(p);
    tracing::info!(
        partition = p,
        groups = count,
        records,
        "{OFFSETS_TOPIC} partition led here: groups loaded"
    );
}

/// Applies every record of one offsets partition, from its log start to its high watermark, as
/// of `now_ms` (restored members' sessions run from then). Returns the number of records read.
pub async fn replay_partition(
    partition: &Partition,
    partition_id: u32,
    groups: &mut HashMap<String, Group>,
    now_ms: i64,
) -> Result<usize, String> {
    let mut offset = partition.log_start_offset();
    let end = partition.high_watermark();
    let mut count = 0usize;
    while offset < end {
        let read = partition.read(offset, REPLAY_READ_BYTES).await.map_err(|e| e.to_string())?;
        let mut next = offset;
        for chunk in &read.chunks {
            for batch in crate::record::batches(chunk) {
                let (header, bytes) =
                    batch.map_err(|(pos, e)| format!("batch at byte {pos} of a read at {offset}: {e}"))?;
                next = next.max(header.last_offset() + 1);
                // A replicated partition's leaders each begin their term with a control batch
                // (Kafka's loader skips them too): it holds no group record.
                if header.is_control() {
                    continue;
                }
                let records = crate::record::reader::records(bytes).map_err(|e| e.to_string())?;
                for record in records {
                    let record =
                        record.map_err(|e| format!("batch at offset {}: {e}", header.base_offset))?;
                    if record.offset >= offset {
                        apply_record(partition_id, record.offset, record.key, record.value, groups, now_ms);
                        count += 1;
                    }
                }
            }
        }
        if next <= offset {
            return Err(format!("no progress reading at offset {offset} (high watermark {end})"));
        }
        offset = next;
    }
    Ok(count)
}

fn apply_record(
    partition_id: u32,
    offset: i64,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    groups: &mut HashMap<String, Group>,
    now_ms: i64,
) {
    let skip = |why: String| {
        tracing::warn!(partition = partition_id, offset, "skipping {OFFSETS_TOPIC} record: {why}")
    };
    let Some(key) = key else { return skip("no key".into()) };
    let key = match RecordKey::decode(key) {
        Ok(k) => k,
        Err(e) => return skip(e.to_string()),
    };
    let group_id = key.group().to_string();
    let entry = || Group::new(group_id.clone(), 0);
    match (key, value) {
        (RecordKey::Offset { topic, partition, .. }, Some(v)) => match OffsetValue::decode(v) {
            Ok(v) => {
                groups.entry(group_id.clone()).or_insert_with(entry).offsets.insert((topic, partition), v);
            }
            Err(e) => skip(e.to_string()),
        },
        (RecordKey::Offset { topic, partition, .. }, None) => {
            if let Some(g) = groups.get_mut(&group_id) {
                g.offsets.remove(&(topic, partition));
            }
        }
        (RecordKey::Group { .. }, Some(v)) => match codec::GroupValue::decode(v) {
            Ok(v) => groups.entry(group_id.clone()).or_insert_with(entry).restore(&v, now_ms),
            Err(e) => skip(e.to_string()),
        },
        (RecordKey::Group { .. }, None) => {
            groups.remove(&group_id);
        }
    }
}

/// Drives every group's deadlines and offset retention until the task is dropped (shutdown).
pub async fn run_timers(shard: Rc<Shard>) {
    loop {
        glommio::timer::sleep(Duration::from_millis(TIMER_TICK_MS)).await;
        follow_leaders(&shard);
        let now = now_ms();
        {
            let co = coordinator(&shard);
            let mut groups = co.groups.borrow_mut();
            let counts = partition_counts(&shard);
            for group in groups.values_mut().filter(|g| !g.is_empty()) {
                group.tick(&counts, now);
                persist_if_dirty(&shard, group, now);
            }
        }
        expire_offsets(&shard, now);
    }
}

/// Removes groups that have been empty for `offsets_retention_ms`, writing tombstones for their
/// offsets and metadata.
fn expire_offsets(shard: &Shard, now: i64) {
    let retention_ms = shard.config.offsets_retention_ms;
    let co = coordinator(shard);
    if retention_ms < 0
        || now - co.last_retention_check_ms.get() < RETENTION_CHECK_INTERVAL_MS.min(retention_ms)
    {
        return;
    }
    co.last_retention_check_ms.set(now);
    let mut groups = co.groups.borrow_mut();
    let expired: Vec<String> = groups
        .values()
        .filter(|g| g.is_empty() && now - g.empty_since_ms >= retention_ms)
        .map(|g| g.id.clone())
        .collect();
    for group_id in expired {
        let Some(group) = groups.get(&group_id) else { continue };
        let mut records: Vec<_> =
            group.offsets.keys().map(|(t, p)| offset_record(&group_id, t, *p, None)).collect();
        records.push((RecordKey::Group { group: group_id.clone() }.encode(), None));
        match append_records(shard, &group_id, &records, now) {
            Ok(_) => {
                tracing::info!(group = %group_id, offsets = records.len() - 1, "offsets expired (offsets_retention_ms)");
                groups.remove(&group_id);
            }
            Err(e) => tracing::error!(group = %group_id, "cannot expire offsets: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{Durability, LogConfig, ShardStorage};
    use glommio::{LocalExecutorBuilder, Placement};

    #[test]
    fn placement_matches_kafka() {
        // Values of Java's "...".hashCode().
        assert_eq!(java_string_hash(""), 0);
        assert_eq!(java_string_hash("a"), 97);
        assert_eq!(java_string_hash("my-group"), -1_906_497_762);
        assert_eq!(java_string_hash("polygenelubricants"), i32::MIN);
        assert_eq!(java_string_hash("é"), 0xe9);
        // Kafka: Utils.abs(hash) % partitions, with abs(Integer.MIN_VALUE) = 0.
        assert_eq!(offsets_partition_for("my-group", 50), 1_906_497_762 % 50);
        assert_eq!(offsets_partition_for("polygenelubricants", 50), 0);
        assert_eq!(offsets_partition_for("consumer-group-with-a-long-name", 8), 1_157_546_098 % 8);
    }

    #[test]
    fn member_ids_are_unique_and_carry_the_client_id() {
        let co = Coordinator::default();
        let a = co.new_member_id(1, "app");
        let b = co.new_member_id(1, "app");
        assert_ne!(a, b);
        assert!(a.starts_with("app-") && a.len() == "app-".len() + 32, "{a}");
        assert!(co.new_member_id(0, "").starts_with("member-"));
    }

    fn log_config() -> LogConfig {
        LogConfig {
            segment_bytes: 1 << 20,
            segment_ms: 3_600_000,
            retention_bytes: None,
            retention_ms: None,
            durability: Durability::Fsync,
            index_interval_bytes: 4096,
            batch_bytes_max: 1 << 20,
            records_per_batch_max: 10_000,
            visibility: crate::storage::Visibility::Durable,
        }
    }

    fn record(key: RecordKey, value: Option<Vec<u8>>) -> BytesMut {
        let mut b = BatchBuilder::new();
        b.push(now_ms(), Some(&key.encode()), value.as_deref(), &[]);
        b.finish()
    }

    fn offset(o: i64, md: &str) -> Option<Vec<u8>> {
        Some(OffsetValue { offset: o, metadata: md.into(), commit_timestamp_ms: 5 }.encode())
    }

    fn off_key(group: &str, topic: &str, partition: u32) -> RecordKey {
        RecordKey::Offset { group: group.into(), topic: topic.into(), partition }
    }

    #[test]
    fn replay_rebuilds_groups_from_a_real_partition() {
        LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(1 << 20)
            .spawn(|| async move {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("0");
                let storage = ShardStorage::new(dir.path().to_path_buf(), 1 << 20, 0);
                let (p, _) = Partition::open(path.clone(), log_config(), storage.clone()).await.unwrap();
                let mut stable = Group::new("g1".into(), 0);
                stable.restore(
                    &codec::GroupValue { generation: 4, protocol: "sticky".into(), ..Default::default() },
                    0,
                );
                let appends = [
                    // What a replicated partition's leader writes first: skipped, not warned of.
                    crate::record::builder::leader_change_batch(0, 1),
                    record(off_key("g1", "t", 0), offset(10, "a")),
                    record(off_key("g1", "t", 1), offset(20, "")),
                    record(off_key("g1", "t", 0), offset(15, "b")),
                    record(
                        RecordKey::Group { group: "g1".into() },
                        Some(stable.metadata_record(1234).encode()),
                    ),
                    record(off_key("gone", "t", 0), offset(1, "")),
                    record(off_key("gone", "t", 0), None),
                    record(RecordKey::Group { group: "gone".into() }, None),
                    record(off_key("g2", "u", 3), offset(7, "")),
                    record(off_key("g2", "u", 4), offset(8, "")),
                    record(off_key("g2", "u", 4), None),
                ];
                let mut last = 0;
                for batch in appends {
                    last = p.append(batch).unwrap().last_offset;
                }
                p.wait_durable(last).await.unwrap();
                p.close().await.unwrap();
                drop(p);
                // A fresh open recovers the log; the replay rebuilds the same state.
                let (p, _) = Partition::open(path, log_config(), storage).await.unwrap();
                let mut groups = HashMap::new();
                let n = replay_partition(&p, 0, &mut groups, 5000).await.unwrap();
                assert_eq!(n, 10);
                groups.retain(|_, g| g.has_metadata_record || !g.offsets.is_empty());
                let mut names: Vec<&String> = groups.keys().collect();
                names.sort();
                assert_eq!(names, ["g1", "g2"]);
                let g1 = &groups["g1"];
                assert_eq!(g1.offsets[&("t".to_string(), 0)].offset, 15);
                assert_eq!(g1.offsets[&("t".to_string(), 0)].metadata, "b");
                assert_eq!(g1.offsets[&("t".to_string(), 1)].offset, 20);
                assert_eq!(g1.generation(), 4);
                assert_eq!(g1.state(), state::GroupState::Empty);
                assert_eq!(g1.empty_since_ms, 1234);
                let g2 = &groups["g2"];
                assert_eq!(g2.offsets.len(), 1);
                assert_eq!(g2.offsets[&("u".to_string(), 3)].offset, 7);
                p.close().await.unwrap();
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
