//! Shards: one per core, each owning a set of partitions, and the routing between them.
//!
//! Owns: the shard's view of topic metadata, the partitions it owns (`storage::Partition`), the
//! cross-shard mesh, and the controller role (shard 0 serializes topic creation and deletion and
//! broadcasts the result). Every request part for a partition is executed on the partition's
//! owner: locally when the connection is on the owner, otherwise one mesh message per shard.
//! May depend on `storage`, `metadata`, `config`, `protocol` error codes; never on connections.
//! Nothing here is shared between threads except through `ShardMsg`.

pub mod mesh;
pub mod runtime;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures::channel::oneshot;
use futures::future::{join_all, select_all, FutureExt};
use glommio::channels::channel_mesh::Senders;

use crate::config::{BrokerConfig, DurabilitySetting};
use crate::metadata::{self, MetadataStore, TopicMeta, TopicOverrides, TopicSettings};
use crate::protocol::wire::ErrorCode;
use crate::record::BatchError;
use crate::storage::{self, LogConfig, Partition, ShardStorage, StorageError};
use mesh::*;

/// A topic as every shard sees it.
pub struct TopicView {
    pub name: Arc<str>,
    pub partition_shards: Vec<u32>,
    pub overrides: TopicOverrides,
    pub settings: TopicSettings,
}

pub struct Shard {
    pub id: u32,
    pub count: u32,
    pub config: Arc<BrokerConfig>,
    /// Direct endpoint of every shard, indexed by shard id.
    pub endpoints: Vec<SocketAddr>,
    pub storage: Rc<ShardStorage>,
    topics: RefCell<HashMap<Arc<str>, Rc<TopicView>>>,
    owned: RefCell<HashMap<Arc<str>, PartitionSlots>>,
    senders: Senders<ShardMsg>,
    /// Mesh peer index of each shard (mesh peers are numbered in join order).
    peer_of_shard: Vec<usize>,
    /// Only on shard 0: the metadata file and a gate that runs one topic change at a time.
    controller: Option<Controller>,
    pub connections: Cell<usize>,
    pub cross_shard_hops: Cell<u64>,
    /// The consumer groups this shard coordinates (those of its `__consumer_offsets` partitions).
    pub groups: crate::groups::Coordinator,
}

struct Controller {
    store: RefCell<MetadataStore>,
    gate: glommio::sync::Semaphore,
}

type Boxed<T> = Pin<Box<dyn Future<Output = T>>>;

/// A topic's partitions on this shard, indexed by partition id; `None` where another shard owns it.
type PartitionSlots = Vec<Option<Rc<Partition>>>;

/// One shard's share of a scattered request: the original item positions and its results.
type ScatterPart<O> = (Vec<usize>, Boxed<Result<Vec<O>, PartitionError>>);

impl Shard {
    /// Builds the shard and opens every partition it owns, in parallel.
    pub(crate) async fn open(
        id: u32,
        config: Arc<BrokerConfig>,
        endpoints: Vec<SocketAddr>,
        topics: &[TopicMeta],
        store: Option<MetadataStore>,
        senders: Senders<ShardMsg>,
        peer_of_shard: Vec<usize>,
    ) -> Result<Rc<Shard>, String> {
        let count = endpoints.len() as u32;
        let storage = ShardStorage::new(
            config.data_dir.clone(),
            config.tail_cache_bytes,
            config.free_space_reserve_bytes,
        );
        let shard = Rc::new(Shard {
            id,
            count,
            config,
            endpoints,
            storage,
            topics: RefCell::new(HashMap::new()),
            owned: RefCell::new(HashMap::new()),
            senders,
            peer_of_shard,
            controller: store.map(|store| Controller {
                store: RefCell::new(store),
                gate: glommio::sync::Semaphore::new(1),
            }),
            connections: Cell::new(0),
            cross_shard_hops: Cell::new(0),
            groups: crate::groups::Coordinator::default(),
        });
        let opened = join_all(topics.iter().map(|t| shard.apply_topic(t))).await;
        for result in opened {
            result?;
        }
        Ok(shard)
    }

    pub fn topic(&self, name: &str) -> Option<Rc<TopicView>> {
        self.topics.borrow().get(name).cloned()
    }

    pub fn topic_names(&self) -> Vec<Arc<str>> {
        let mut names: Vec<Arc<str>> = self.topics.borrow().keys().cloned().collect();
        names.sort();
        names
    }

    pub(crate) fn partition(&self, topic: &str, partition: u32) -> Option<Rc<Partition>> {
        self.owned.borrow().get(topic)?.get(partition as usize)?.clone()
    }

    fn owned_partitions(&self) -> Vec<Rc<Partition>> {
        self.owned.borrow().values().flatten().flatten().cloned().collect()
    }

    fn log_config(&self, settings: &TopicSettings) -> LogConfig {
        let positive = |v: i64| if v > 0 { Some(v as u64) } else { None };
        LogConfig {
            segment_bytes: settings.segment_bytes,
            segment_ms: settings.segment_ms,
            retention_bytes: positive(settings.retention_bytes),
            retention_ms: positive(settings.retention_ms),
            durability: match settings.durability {
                DurabilitySetting::Written => storage::Durability::Written,
                DurabilitySetting::Fsync => storage::Durability::Fsync,
            },
            index_interval_bytes: self.config.index_interval_bytes,
            batch_bytes_max: self.config.batch_bytes_max,
            records_per_batch_max: self.config.records_per_batch_max,
        }
    }

    /// Records a topic in this shard's view and opens (recovering) the partitions it owns.
    async fn apply_topic(&self, meta: &TopicMeta) -> Result<(), String> {
        let settings = meta.overrides.resolve(&self.config);
        let name: Arc<str> = Arc::from(meta.name.as_str());
        let log_config = self.log_config(&settings);
        let mine: Vec<u32> = (0..meta.partition_shards.len() as u32)
            .filter(|&p| meta.partition_shards[p as usize] == self.id)
            .collect();
        let opened = join_all(mine.iter().map(|&p| {
            let dir = metadata::partition_dir(&self.config.data_dir, &meta.name, p);
            Partition::open(dir, log_config.clone(), self.storage.clone())
        }))
        .await;
        let mut slots: Vec<Option<Rc<Partition>>> = vec![None; meta.partition_shards.len()];
        let mut failures = Vec::new();
        for (&p, result) in mine.iter().zip(opened) {
            match result {
                Ok((partition, report)) => {
                    tracing::info!(topic = %meta.name, partition = p, shard = self.id, "opened: {report}");
                    slots[p as usize] = Some(partition);
                }
                Err(e) => failures.push((p, e)),
            }
        }
        if let Some((p, e)) = failures.first() {
            // All or nothing: close what did open, releasing its descriptors (a common failure is
            // running out of them). Files stay: on start-up they hold an existing topic's data; a
            // failed creation removes the topic directory in `controller_create`.
            for partition in slots.into_iter().flatten() {
                if let Err(e) = partition.close().await {
                    tracing::warn!(topic = %meta.name, "closing a partition after a failed open: {e}");
                }
            }
            return Err(format!(
                "topic '{}' partition {p} on shard {}: {e}{}",
                meta.name,
                self.id,
                match failures.len() {
                    1 => String::new(),
                    n => format!(" (and {} more partitions failed to open)", n - 1),
                }
            ));
        }
        self.owned.borrow_mut().insert(name.clone(), slots);
        self.topics.borrow_mut().insert(
            name.clone(),
            Rc::new(TopicView {
                name,
                partition_shards: meta.partition_shards.clone(),
                overrides: meta.overrides.clone(),
                settings,
            }),
        );
        Ok(())
    }

    async fn remove_topic(&self, name: &str) {
        self.topics.borrow_mut().remove(name);
        let removed = self.owned.borrow_mut().remove(name);
        for partition in removed.into_iter().flatten().flatten() {
            if let Err(e) = partition.remove().await {
                tracing::error!(topic = name, "removing partition files failed: {e}");
            }
        }
    }

    /// Where `(topic, partition)` lives: its topic view and owning shard.
    pub fn route(&self, topic: &str, partition: u32) -> Result<(Rc<TopicView>, u32), PartitionError> {
        let view = self.topic(topic).ok_or_else(|| {
            PartitionError::new(ErrorCode::UnknownTopicOrPartition, format!("unknown topic '{topic}'"))
        })?;
        let owner = *view
            .partition_shards
            .get(partition as usize)
            .ok_or_else(|| PartitionError::unknown_partition(topic, partition))?;
        Ok((view, owner))
    }

    /// Sends one message to another shard. Fails only when the peer has gone (shutdown).
    pub(crate) async fn send(&self, shard: u32, msg: ShardMsg) -> Result<(), PartitionError> {
        debug_assert_ne!(shard, self.id, "local work never crosses the mesh");
        self.cross_shard_hops.set(self.cross_shard_hops.get() + 1);
        let peer = self.peer_of_shard[shard as usize];
        self.senders.send_to(peer, msg).await.map_err(|_| PartitionError::shutting_down())
    }

    /// Runs `items` on their owner shards: the local part directly, each remote shard's part as
    /// one mesh message. The sends happen before this returns (so call order is delivery order on
    /// every owner); the returned future gathers the results in the original item order.
    async fn scatter<I, O: 'static>(
        self: &Rc<Self>,
        items: Vec<(u32, I)>,
        local: impl FnOnce(&Rc<Shard>, Vec<I>) -> Boxed<Vec<O>>,
        remote: impl Fn(Vec<I>, oneshot::Sender<Vec<O>>) -> ShardMsg,
        failed: impl Fn(PartitionError) -> O + 'static,
    ) -> Boxed<Vec<O>> {
        let n = items.len();
        let mut per_shard: Vec<(Vec<usize>, Vec<I>)> =
            (0..self.count).map(|_| (Vec::new(), Vec::new())).collect();
        for (index, (shard, item)) in items.into_iter().enumerate() {
            per_shard[shard as usize].0.push(index);
            per_shard[shard as usize].1.push(item);
        }
        let mut parts: Vec<ScatterPart<O>> = Vec::new();
        let mut local = Some(local);
        for (shard, (indexes, group)) in per_shard.into_iter().enumerate() {
            if indexes.is_empty() {
                continue;
            }
            if shard as u32 == self.id {
                if let Some(run) = local.take() {
                    parts.push((indexes, run(self, group).map(Ok).boxed_local()));
                }
                continue;
            }
            let (tx, rx) = oneshot::channel();
            let sent = self.send(shard as u32, remote(group, tx)).await;
            let fut: Boxed<Result<Vec<O>, PartitionError>> = match sent {
                Ok(()) => rx.map(|r| r.map_err(|_| PartitionError::shutting_down())).boxed_local(),
                Err(e) => futures::future::ready(Err(e)).boxed_local(),
            };
            parts.push((indexes, fut));
        }
        async move {
            let mut slots: Vec<Option<O>> = (0..n).map(|_| None).collect();
            for (indexes, fut) in parts {
                match fut.await {
                    Ok(outs) if outs.len() == indexes.len() => {
                        for (i, o) in indexes.into_iter().zip(outs) {
                            slots[i] = Some(o);
                        }
                    }
                    Ok(_) => {
                        for i in indexes {
                            slots[i] = Some(failed(PartitionError::new(
                                ErrorCode::Internal,
                                "shard reply size mismatch",
                            )));
                        }
                    }
                    Err(e) => {
                        for i in indexes {
                            slots[i] = Some(failed(e.clone()));
                        }
                    }
                }
            }
            slots
                .into_iter()
                .map(|o| {
                    o.unwrap_or_else(|| failed(PartitionError::new(ErrorCode::Internal, "missing result")))
                })
                .collect()
        }
        .boxed_local()
    }

    // ---- Entry points used by connections (any shard) -------------------------------------------

    pub async fn produce(
        self: &Rc<Self>,
        items: Vec<(u32, AppendItem)>,
        wait: bool,
    ) -> Boxed<Vec<ProduceOutcome>> {
        self.scatter(
            items,
            |shard, group| shard.append_local(group, wait),
            move |items, reply| ShardMsg::Produce { items, wait, reply },
            Err,
        )
        .await
    }

    pub async fn fetch(self: &Rc<Self>, items: Vec<(u32, FetchItem)>) -> Boxed<Vec<FetchOutcome>> {
        self.scatter(
            items,
            |shard, group| shard.clone().fetch_local(group).boxed_local(),
            |items, reply| ShardMsg::Fetch { items, reply },
            Err,
        )
        .await
    }

    /// Parks until any of the partitions has data at its offset, or `max_wait_ms` passes.
    pub async fn wait_for_data(self: &Rc<Self>, items: Vec<(u32, FetchItem)>, max_wait_ms: u64) {
        let mut per_shard: HashMap<u32, Vec<FetchItem>> = HashMap::new();
        for (shard, item) in items {
            per_shard.entry(shard).or_default().push(item);
        }
        let mut waits: Vec<Boxed<()>> = Vec::new();
        for (shard, group) in per_shard {
            if shard == self.id {
                waits.push(self.clone().wait_local(group, max_wait_ms).boxed_local());
            } else {
                let (tx, rx) = oneshot::channel();
                if self
                    .send(shard, ShardMsg::WaitForData { items: group, max_wait_ms, reply: tx })
                    .await
                    .is_ok()
                {
                    waits.push(rx.map(|_| ()).boxed_local());
                }
            }
        }
        if waits.is_empty() {
            return;
        }
        let timeout = glommio::timer::sleep(Duration::from_millis(max_wait_ms)).boxed_local();
        futures::future::select(select_all(waits), timeout).await;
    }

    pub async fn list_offsets(self: &Rc<Self>, items: Vec<(u32, OffsetQuery)>) -> Boxed<Vec<OffsetOutcome>> {
        self.scatter(
            items,
            |shard, group| shard.clone().list_offsets_local(group).boxed_local(),
            |items, reply| ShardMsg::ListOffsets { items, reply },
            Err,
        )
        .await
    }

    pub async fn partition_states(
        self: &Rc<Self>,
        items: Vec<(u32, (Arc<str>, u32))>,
    ) -> Vec<PartitionState> {
        self.scatter(
            items,
            |shard, group| {
                let states = shard.partition_states_local(&group);
                futures::future::ready(states).boxed_local()
            },
            |items, reply| ShardMsg::PartitionStates { items, reply },
            |_| None,
        )
        .await
        .await
    }

    pub async fn create_topic(
        self: &Rc<Self>,
        name: String,
        partitions: u32,
        overrides: TopicOverrides,
    ) -> Result<TopicMeta, PartitionError> {
        if self.controller.is_some() {
            return self.clone().controller_create(name, partitions, overrides).await;
        }
        let (reply, rx) = oneshot::channel();
        self.send(0, ShardMsg::CreateTopic { name, partitions, overrides, reply }).await?;
        rx.await.map_err(|_| PartitionError::shutting_down())?
    }

    /// Runs a consumer-group request on its coordinator shard `owner`: locally, or one mesh hop.
    pub async fn group_request(
        self: &Rc<Self>,
        owner: u32,
        request: crate::groups::messages::GroupRequest,
    ) -> crate::groups::messages::GroupOutcome {
        use crate::groups::messages::GroupError;
        if owner == self.id {
            return crate::groups::execute_local(self, request).await;
        }
        let (reply, rx) = oneshot::channel();
        let request = Box::new(request);
        self.send(owner, ShardMsg::Group { request, reply }).await.map_err(|_| GroupError::ShuttingDown)?;
        rx.await.map_err(|_| GroupError::ShuttingDown)?
    }

    pub async fn delete_topic(self: &Rc<Self>, name: String) -> Result<(), PartitionError> {
        if self.controller.is_some() {
            return self.clone().controller_delete(name).await;
        }
        let (reply, rx) = oneshot::channel();
        self.send(0, ShardMsg::DeleteTopic { name, reply }).await?;
        rx.await.map_err(|_| PartitionError::shutting_down())?
    }

    // ---- Owner-side work ----------------------------------------------------------------------

    /// Appends now (synchronously, so offsets follow arrival order) and returns a future that
    /// resolves when each append is durable per its topic's policy.
    fn append_local(&self, items: Vec<AppendItem>, wait: bool) -> Boxed<Vec<ProduceOutcome>> {
        let appended: Vec<(Option<Rc<Partition>>, ProduceOutcome, i64)> = items
            .into_iter()
            .map(|item| {
                let Some(partition) = self.partition(&item.topic, item.partition) else {
                    return (None, Err(PartitionError::unknown_partition(&item.topic, item.partition)), -1);
                };
                let bytes = item.batches.len();
                match partition.append(item.batches) {
                    Ok(a) => {
                        crate::metrics::appended(&item.topic, bytes, a.last_offset - a.base_offset + 1);
                        let out =
                            Appended { base_offset: a.base_offset, log_start_offset: a.log_start_offset };
                        (Some(partition), Ok(out), a.last_offset)
                    }
                    Err(e) => {
                        crate::metrics::partition_error(crate::protocol::wire::RequestBody::ProduceRequest);
                        (None, Err(storage_error(&item.topic, item.partition, e)), -1)
                    }
                }
            })
            .collect();
        async move {
            let mut outcomes = Vec::with_capacity(appended.len());
            for (partition, outcome, last_offset) in appended {
                let outcome = match (partition, outcome) {
                    (Some(p), Ok(a)) if wait => match p.wait_durable(last_offset).await {
                        Ok(()) => Ok(a),
                        Err(e) => Err(PartitionError::new(ErrorCode::StorageError, e.to_string())),
                    },
                    (_, outcome) => outcome,
                };
                outcomes.push(outcome);
            }
            outcomes
        }
        .boxed_local()
    }

    async fn fetch_local(self: Rc<Self>, items: Vec<FetchItem>) -> Vec<FetchOutcome> {
        let reads = items.iter().map(|item| {
            let partition = self.partition(&item.topic, item.partition);
            async move {
                let Some(partition) = partition else {
                    return Err(PartitionError::unknown_partition(&item.topic, item.partition));
                };
                let read = partition.read(item.offset, item.max_bytes).await;
                crate::metrics::fetch_done(&item.topic, read.as_ref().map(|r| &r.chunks[..]));
                match read {
                    Ok(r) => Ok(Fetched {
                        chunks: r.chunks,
                        high_watermark: r.high_watermark,
                        log_start_offset: r.log_start_offset,
                    }),
                    Err(e) => Err(storage_error(&item.topic, item.partition, e)),
                }
            }
        });
        join_all(reads).await
    }

    async fn wait_local(self: Rc<Self>, items: Vec<FetchItem>, max_wait_ms: u64) {
        let waits: Vec<Boxed<()>> = items
            .iter()
            .filter_map(|item| self.partition(&item.topic, item.partition).map(|p| (p, item.offset)))
            .map(|(p, offset)| async move { p.wait_for_data(offset).await }.boxed_local())
            .collect();
        if waits.is_empty() {
            return;
        }
        let timeout = glommio::timer::sleep(Duration::from_millis(max_wait_ms)).boxed_local();
        futures::future::select(select_all(waits), timeout).await;
    }

    async fn list_offsets_local(self: Rc<Self>, items: Vec<OffsetQuery>) -> Vec<OffsetOutcome> {
        let mut out = Vec::with_capacity(items.len());
        for q in items {
            let Some(p) = self.partition(&q.topic, q.partition) else {
                out.push(Err(PartitionError::unknown_partition(&q.topic, q.partition)));
                continue;
            };
            // Kafka semantics: no record at or after the timestamp answers with the log end.
            let found =
                p.offset_for_timestamp(q.timestamp_ms).await.map(|f| f.or(Some((p.high_watermark(), -1))));
            out.push(found.map_err(|e| storage_error(&q.topic, q.partition, e)));
        }
        out
    }

    fn partition_states_local(&self, items: &[(Arc<str>, u32)]) -> Vec<PartitionState> {
        items
            .iter()
            .map(|(t, p)| self.partition(t, *p).map(|p| (p.log_start_offset(), p.high_watermark())))
            .collect()
    }

    /// Handles a message from another shard. Produce appends happen before this returns, so
    /// messages from one shard are appended in the order they were sent.
    pub(crate) fn handle(self: &Rc<Self>, msg: ShardMsg) {
        match msg {
            ShardMsg::Produce { items, wait, reply } => {
                let done = self.append_local(items, wait);
                glommio::spawn_local(async move {
                    let _ = reply.send(done.await);
                })
                .detach();
            }
            ShardMsg::Fetch { items, reply } => {
                let shard = self.clone();
                glommio::spawn_local(async move {
                    let _ = reply.send(shard.fetch_local(items).await);
                })
                .detach();
            }
            ShardMsg::WaitForData { items, max_wait_ms, reply } => {
                let shard = self.clone();
                glommio::spawn_local(async move {
                    shard.wait_local(items, max_wait_ms).await;
                    let _ = reply.send(());
                })
                .detach();
            }
            ShardMsg::ListOffsets { items, reply } => {
                let shard = self.clone();
                glommio::spawn_local(async move {
                    let _ = reply.send(shard.list_offsets_local(items).await);
                })
                .detach();
            }
            ShardMsg::PartitionStates { items, reply } => {
                let _ = reply.send(self.partition_states_local(&items));
            }
            ShardMsg::CreateTopic { name, partitions, overrides, reply } => {
                let shard = self.clone();
                glommio::spawn_local(async move {
                    let _ = reply.send(shard.controller_create(name, partitions, overrides).await);
                })
                .detach();
            }
            ShardMsg::DeleteTopic { name, reply } => {
                let shard = self.clone();
                glommio::spawn_local(async move {
                    let _ = reply.send(shard.controller_delete(name).await);
                })
                .detach();
            }
            ShardMsg::ApplyTopic { topic, reply } => {
                let shard = self.clone();
                glommio::spawn_local(async move {
                    let _ = reply.send(shard.apply_topic(&topic).await);
                })
                .detach();
            }
            ShardMsg::RemoveTopic { name, reply } => {
                let shard = self.clone();
                glommio::spawn_local(async move {
                    shard.remove_topic(&name).await;
                    let _ = reply.send(());
                })
                .detach();
            }
            ShardMsg::Metrics { reply } => {
                let _ = reply.send(crate::metrics::snapshot(self));
            }
            ShardMsg::Group { request, reply } => {
                let shard = self.clone();
                glommio::spawn_local(async move {
                    let _ = reply.send(crate::groups::execute_local(&shard, *request).await);
                })
                .detach();
            }
        }
    }

    // ---- Controller (shard 0) ----------------------------------------------------------------

    async fn controller_create(
        self: Rc<Self>,
        name: String,
        partitions: u32,
        overrides: TopicOverrides,
    ) -> Result<TopicMeta, PartitionError> {
        let controller = self.controller.as_ref().ok_or_else(|| {
            PartitionError::new(
                ErrorCode::Internal,
                "topic creation reached a shard that is not the controller",
            )
        })?;
        let _turn = controller.gate.acquire_permit(1).await.map_err(|_| PartitionError::shutting_down())?;
        metadata::validate_topic_name(&name)
            .map_err(|m| PartitionError::new(ErrorCode::InvalidTopicName, m))?;
        if partitions == 0 || partitions > self.config.partitions_per_topic_max {
            return Err(PartitionError::new(
                ErrorCode::InvalidPartitions,
                format!(
                    "{partitions} partitions requested; allowed 1..={}",
                    self.config.partitions_per_topic_max
                ),
            ));
        }
        overrides.validate(&self.config).map_err(|m| PartitionError::new(ErrorCode::InvalidConfig, m))?;
        let meta = {
            let mut store = controller.store.borrow_mut();
            if store.get(&name).is_some() {
                return Err(PartitionError::new(
                    ErrorCode::TopicAlreadyExists,
                    format!("topic '{name}' already exists"),
                ));
            }
            // Internal topics (__consumer_offsets) do not count against the users' limit.
            let user_topics = store.topics().filter(|t| !crate::groups::is_internal_topic(&t.name)).count();
            if user_topics >= self.config.topics_max {
                return Err(PartitionError::new(
                    ErrorCode::ResourceExhausted,
                    format!("the broker already holds {user_topics} topics (topics_max)"),
                ));
            }
            let loads = store.shard_loads(self.count as usize);
            let meta = TopicMeta {
                name: name.clone(),
                partition_shards: metadata::assign_partitions(partitions as usize, &loads),
                overrides,
                created_ms: now_ms(),
            };
            store
                .insert(meta.clone())
                .map_err(|e| PartitionError::new(ErrorCode::StorageError, e.to_string()))?;
            meta
        };
        let shared = Arc::new(meta.clone());
        let mut failures: Vec<String> = Vec::new();
        let mut acks = Vec::new();
        for shard in 0..self.count {
            if shard == self.id {
                continue;
            }
            let (reply, rx) = oneshot::channel();
            match self.send(shard, ShardMsg::ApplyTopic { topic: shared.clone(), reply }).await {
                Ok(()) => acks.push(rx),
                Err(e) => failures.push(format!("shard {shard}: {}", e.message)),
            }
        }
        if let Err(e) = self.apply_topic(&meta).await {
            failures.push(e);
        }
        for rx in acks {
            match rx.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failures.push(e),
                Err(_) => failures.push("a shard stopped before opening its partitions".into()),
            }
        }
        if failures.is_empty() {
            tracing::info!(topic = %name, partitions, shards = ?meta.partition_shards, "topic created");
            return Ok(meta);
        }
        // All or nothing: forget the topic everywhere and remove what was created on disk.
        let detail = failures.join("; ");
        tracing::warn!(topic = %name, partitions, "creating the topic failed; rolling back: {detail}");
        if let Err(e) = controller.store.borrow_mut().remove(&name) {
            tracing::error!(topic = %name, "rolling back: removing the topic from the metadata store failed: {e}");
            failures.push(format!("removing the topic from the metadata store failed too: {e}"));
        }
        let shared: Arc<str> = Arc::from(name.as_str());
        let mut removals = Vec::new();
        for shard in 0..self.count {
            if shard == self.id {
                continue;
            }
            let (reply, rx) = oneshot::channel();
            if self.send(shard, ShardMsg::RemoveTopic { name: shared.clone(), reply }).await.is_ok() {
                removals.push(rx);
            }
        }
        self.remove_topic(&name).await;
        for rx in removals {
            let _ = rx.await;
        }
        remove_topic_dir(&self.config.data_dir, &name);
        let code = if failures.iter().any(|f| f.contains("Too many open files")) {
            ErrorCode::ResourceExhausted
        } else {
            ErrorCode::StorageError
        };
        Err(PartitionError::new(
            code,
            format!("creating topic '{name}' failed and was rolled back: {}", failures.join("; ")),
        ))
    }

    async fn controller_delete(self: Rc<Self>, name: String) -> Result<(), PartitionError> {
        let controller = self.controller.as_ref().ok_or_else(|| {
            PartitionError::new(
                ErrorCode::Internal,
                "topic deletion reached a shard that is not the controller",
            )
        })?;
        let _turn = controller.gate.acquire_permit(1).await.map_err(|_| PartitionError::shutting_down())?;
        let removed = controller
            .store
            .borrow_mut()
            .remove(&name)
            .map_err(|e| PartitionError::new(ErrorCode::StorageError, e.to_string()))?;
        if removed.is_none() {
            return Err(PartitionError::new(
                ErrorCode::UnknownTopicOrPartition,
                format!("unknown topic '{name}'"),
            ));
        }
        let shared: Arc<str> = Arc::from(name.as_str());
        let mut acks = Vec::new();
        for shard in 0..self.count {
            if shard == self.id {
                continue;
            }
            let (reply, rx) = oneshot::channel();
            self.send(shard, ShardMsg::RemoveTopic { name: shared.clone(), reply }).await?;
            acks.push(rx);
        }
        self.remove_topic(&name).await;
        for rx in acks {
            let _ = rx.await;
        }
        remove_topic_dir(&self.config.data_dir, &name);
        tracing::info!(topic = %name, "topic deleted");
        Ok(())
    }

    // ---- Background work ----------------------------------------------------------------------

    /// Periodic disk-space refresh, segment roll by age and retention, until `stop` resolves.
    pub(crate) async fn housekeeping(self: Rc<Self>) {
        let interval = Duration::from_millis(self.config.housekeeping_interval_ms);
        let disk_interval = Duration::from_millis(500).min(interval);
        let mut since_housekeeping = Duration::ZERO;
        loop {
            glommio::timer::sleep(disk_interval).await;
            self.storage.refresh_disk_space();
            since_housekeeping += disk_interval;
            if since_housekeeping < interval {
                continue;
            }
            since_housekeeping = Duration::ZERO;
            let now = now_ms();
            for partition in self.owned_partitions() {
                match partition.housekeep(now).await {
                    Ok(report) => {
                        if report.rolled_segment.is_some() || !report.segments_deleted.is_empty() {
                            tracing::info!(shard = self.id, "housekeeping: {report}");
                        }
                    }
                    Err(e) => tracing::error!(shard = self.id, "housekeeping failed: {e}"),
                }
            }
        }
    }

    /// Flushes and closes every partition this shard owns.
    pub(crate) async fn close_partitions(&self) {
        let partitions = self.owned_partitions();
        for result in join_all(partitions.iter().map(|p| p.close())).await {
            if let Err(e) = result {
                tracing::error!(shard = self.id, "closing a partition failed: {e}");
            }
        }
    }
}

fn remove_topic_dir(data_dir: &Path, name: &str) {
    let dir = metadata::topic_dir(data_dir, name);
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("could not remove {}: {e}", dir.display());
        }
    }
}

/// Maps a storage failure to what the client is told.
fn storage_error(topic: &str, partition: u32, e: StorageError) -> PartitionError {
    let code = match &e {
        StorageError::InvalidBatch { source, .. } => match source {
            BatchError::TooLarge { .. } => ErrorCode::BatchTooLarge,
            BatchError::TooManyRecords { .. } => ErrorCode::TooManyRecords,
            BatchError::CrcMismatch { .. } | BatchError::BadMagic { .. } | BatchError::Truncated { .. } => {
                ErrorCode::CorruptBatch
            }
            _ => ErrorCode::InvalidRequest,
        },
        StorageError::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
        StorageError::StorageFull { .. } => ErrorCode::StorageFull,
        StorageError::Corrupt { .. } => ErrorCode::CorruptBatch,
        StorageError::Closed => ErrorCode::ShuttingDown,
        _ => ErrorCode::StorageError,
    };
    let log_bounds = match &e {
        StorageError::OffsetOutOfRange { log_start, high_watermark, .. } => {
            Some((*log_start, *high_watermark))
        }
        _ => None,
    };
    PartitionError { log_bounds, ..PartitionError::new(code, format!("{topic}/{partition}: {e}")) }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
