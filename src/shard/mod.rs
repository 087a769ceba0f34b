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
    /// `(host, port)` Kafka clients are told to reach this broker at; unset when the Kafka
    /// listener is off.
    pub kafka_endpoint: std::cell::OnceCell<(String, u16)>,
}

struct Controller {
    store: RefCell<MetadataStore>,
    gate: glommio::sync::Semaphore,
    producer_ids: ProducerIdAllocator,
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
                producer_ids: ProducerIdAllocator::new(),
            }),
            connections: Cell::new(0),
            cross_shard_hops: Cell::new(0),
            groups: crate::groups::Coordinator::default(),
            kafka_endpoint: std::cell::OnceCell::new(),
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

    /// A fetch with long polling, for both protocols: reads until the items together hold
    /// `min_bytes`, any fails, `answer_now` is set (an error found before routing), or `max_wait`
    /// passes, parking between reads until data past what was read arrives.
    pub async fn fetch_long_poll(
        self: &Rc<Self>,
        items: Vec<(u32, FetchItem)>,
        min_bytes: usize,
        max_wait: Duration,
        answer_now: bool,
    ) -> Vec<FetchOutcome> {
        let deadline = std::time::Instant::now() + max_wait;
        loop {
            let outcomes: Vec<FetchOutcome> = self.fetch(items.clone()).await.await;
            let bytes: usize = outcomes.iter().flatten().map(Fetched::len).sum();
            let failed = answer_now || outcomes.iter().any(Result::is_err);
            let now = std::time::Instant::now();
            if bytes >= min_bytes || failed || now >= deadline || items.is_empty() {
                return outcomes;
            }
            let waits: Vec<(u32, FetchItem)> = items
                .iter()
                .zip(&outcomes)
                .map(|((owner, item), outcome)| {
                    let mut item = item.clone();
                    if let Ok(f) = outcome {
                        item.offset = item.offset.max(f.high_watermark);
                    }
                    (*owner, item)
                })
                .collect();
            self.wait_for_data(waits, (deadline - now).as_millis() as u64).await;
        }
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

    /// Raises `name`'s partition count to `partitions`; existing partitions are untouched.
    pub async fn create_partitions(
        self: &Rc<Self>,
        name: String,
        partitions: u32,
    ) -> Result<TopicMeta, PartitionError> {
        if self.controller.is_some() {
            return self.clone().controller_create_partitions(name, partitions).await;
        }
        let (reply, rx) = oneshot::channel();
        self.send(0, ShardMsg::CreatePartitions { name, partitions, reply }).await?;
        rx.await.map_err(|_| PartitionError::shutting_down())?
    }

    /// Kafka InitProducerId without a transactional id, answered by shard 0 (see
    /// `controller_init_producer_id`). The request is sent before this returns; the returned
    /// future waits for the answer.
    pub async fn init_producer_id(
        self: &Rc<Self>,
        current: Option<(i64, i16)>,
    ) -> Boxed<Result<(i64, i16), PartitionError>> {
        if self.controller.is_some() {
            return self.clone().controller_init_producer_id(current).boxed_local();
        }
        let (reply, rx) = oneshot::channel();
        if let Err(e) = self.send(0, ShardMsg::InitProducerId { current, reply }).await {
            return futures::future::ready(Err(e)).boxed_local();
        }
        async move { rx.await.map_err(|_| PartitionError::shutting_down())? }.boxed_local()
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
                        if !a.duplicate {
                            crate::metrics::appended(&item.topic, bytes, a.last_offset - a.base_offset + 1);
                        }
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
            ShardMsg::CreatePartitions { name, partitions, reply } => {
                let shard = self.clone();
                glommio::spawn_local(async move {
                    let _ = reply.send(shard.controller_create_partitions(name, partitions).await);
                })
                .detach();
            }
            ShardMsg::GrowTopic { topic, opened, commit, done } => {
                glommio::spawn_local(self.clone().grow_topic(topic, opened, commit, done)).detach();
            }
            ShardMsg::InitProducerId { current, reply } => {
                let shard = self.clone();
                glommio::spawn_local(async move {
                    let _ = reply.send(shard.controller_init_producer_id(current).await);
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

    /// Grows a topic all or nothing: every shard first opens the new partitions it owns where
    /// nothing routes to them yet; only when all did is the new layout persisted and every shard
    /// told to swap in the larger topic view. Existing partitions stay open and keep serving
    /// throughout; a failure closes and removes the new ones everywhere.
    async fn controller_create_partitions(
        self: Rc<Self>,
        name: String,
        partitions: u32,
    ) -> Result<TopicMeta, PartitionError> {
        let controller = self.controller.as_ref().ok_or_else(|| {
            PartitionError::new(
                ErrorCode::Internal,
                "partition creation reached a shard that is not the controller",
            )
        })?;
        let _turn = controller.gate.acquire_permit(1).await.map_err(|_| PartitionError::shutting_down())?;
        if crate::groups::is_internal_topic(&name) {
            // A group's coordinator is the owner of partition hash(group) mod the partition count.
            return Err(PartitionError::new(
                ErrorCode::InvalidRequest,
                format!("'{name}' is internal; its partition count is fixed (offsets_topic_partitions)"),
            ));
        }
        let meta = {
            let store = controller.store.borrow();
            let current = store.get(&name).ok_or_else(|| {
                PartitionError::new(ErrorCode::UnknownTopicOrPartition, format!("unknown topic '{name}'"))
            })?;
            let had = current.partition_shards.len();
            if partitions as usize <= had {
                return Err(PartitionError::new(
                    ErrorCode::InvalidPartitions,
                    format!(
                        "topic '{name}' has {had} partitions; the count can only grow, not to {partitions}"
                    ),
                ));
            }
            if partitions > self.config.partitions_per_topic_max {
                return Err(PartitionError::new(
                    ErrorCode::InvalidPartitions,
                    format!(
                        "{partitions} partitions requested; allowed up to {} (partitions_per_topic_max)",
                        self.config.partitions_per_topic_max
                    ),
                ));
            }
            let loads = store.shard_loads(self.count as usize);
            let mut partition_shards = current.partition_shards.clone();
            partition_shards.extend(metadata::assign_partitions(partitions as usize - had, &loads));
            TopicMeta { partition_shards, ..current.clone() }
        };
        let shared = Arc::new(meta.clone());
        let mut failures: Vec<String> = Vec::new();
        let mut opened = Vec::new();
        let mut commits = Vec::new();
        let mut dones = Vec::new();
        for shard in 0..self.count {
            let (opened_tx, opened_rx) = oneshot::channel();
            let (commit_tx, commit_rx) = oneshot::channel();
            let (done_tx, done_rx) = oneshot::channel();
            if shard == self.id {
                // A task of its own: it waits for the commit that this function sends.
                glommio::spawn_local(self.clone().grow_topic(shared.clone(), opened_tx, commit_rx, done_tx))
                    .detach();
            } else {
                let msg = ShardMsg::GrowTopic {
                    topic: shared.clone(),
                    opened: opened_tx,
                    commit: commit_rx,
                    done: done_tx,
                };
                if let Err(e) = self.send(shard, msg).await {
                    failures.push(format!("shard {shard}: {}", e.message));
                    continue;
                }
            }
            opened.push((shard, opened_rx));
            commits.push(commit_tx);
            dones.push(done_rx);
        }
        for (shard, rx) in opened {
            match rx.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failures.push(e),
                Err(_) => failures.push(format!("shard {shard} stopped before opening its partitions")),
            }
        }
        if failures.is_empty() {
            // Replaces the topic's entry; written before any shard routes to the new partitions.
            if let Err(e) = controller.store.borrow_mut().insert(meta.clone()) {
                failures.push(format!("writing the metadata file failed: {e}"));
            }
        }
        let commit = failures.is_empty();
        for tx in commits {
            let _ = tx.send(commit);
        }
        for rx in dones {
            let _ = rx.await;
        }
        if commit {
            tracing::info!(topic = %name, partitions, shards = ?meta.partition_shards, "partitions added");
            return Ok(meta);
        }
        let detail = failures.join("; ");
        tracing::warn!(topic = %name, partitions, "adding partitions failed; rolled back: {detail}");
        let code = if detail.contains("Too many open files") {
            ErrorCode::ResourceExhausted
        } else {
            ErrorCode::StorageError
        };
        Err(PartitionError::new(
            code,
            format!("adding partitions to topic '{name}' failed and was rolled back: {detail}"),
        ))
    }

    /// This shard's part of growing a topic (`ShardMsg::GrowTopic`).
    async fn grow_topic(
        self: Rc<Self>,
        meta: Arc<TopicMeta>,
        opened: oneshot::Sender<Result<(), String>>,
        commit: oneshot::Receiver<bool>,
        done: oneshot::Sender<()>,
    ) {
        let added = match self.open_added_partitions(&meta).await {
            Ok(added) => added,
            Err(e) => {
                let _ = opened.send(Err(e));
                return;
            }
        };
        let _ = opened.send(Ok(()));
        let view = self.topic(&meta.name);
        match (commit.await, view) {
            (Ok(true), Some(view)) => {
                // Readers holding the old view keep a consistent (smaller) layout; new lookups
                // see every partition.
                let grown = TopicView {
                    name: view.name.clone(),
                    partition_shards: meta.partition_shards.clone(),
                    overrides: view.overrides.clone(),
                    settings: view.settings,
                };
                self.topics.borrow_mut().insert(view.name.clone(), Rc::new(grown));
            }
            (_, view) => {
                let had = view.map_or(0, |v| v.partition_shards.len());
                let removed: Vec<Rc<Partition>> = match self.owned.borrow_mut().get_mut(meta.name.as_str()) {
                    Some(slots) if slots.len() > had => slots.drain(had..).flatten().collect(),
                    _ => Vec::new(),
                };
                for partition in removed {
                    if let Err(e) = partition.remove().await {
                        tracing::warn!(topic = %meta.name, "removing a partition after a failed grow: {e}");
                    }
                }
                tracing::debug!(topic = %meta.name, shard = self.id, partitions = ?added, "grow rolled back");
            }
        }
        let _ = done.send(());
    }

    /// Opens the partitions of `meta` beyond the current view that this shard owns and slots
    /// them in. Nothing routes to them until the view grows. All or nothing: on a failure, what
    /// did open is closed and every new directory removed.
    async fn open_added_partitions(&self, meta: &TopicMeta) -> Result<Vec<u32>, String> {
        let view = self
            .topic(&meta.name)
            .ok_or_else(|| format!("topic '{}' is unknown on shard {}", meta.name, self.id))?;
        let had = view.partition_shards.len();
        let wanted = meta.partition_shards.len();
        if wanted <= had || meta.partition_shards[..had] != view.partition_shards[..] {
            return Err(format!(
                "topic '{}' on shard {}: its {had} partitions do not match the new layout {:?}",
                meta.name, self.id, meta.partition_shards
            ));
        }
        let log_config = self.log_config(&view.settings);
        let mine: Vec<u32> =
            (had..wanted).filter(|&p| meta.partition_shards[p] == self.id).map(|p| p as u32).collect();
        let opened = join_all(mine.iter().map(|&p| {
            let dir = metadata::partition_dir(&self.config.data_dir, &meta.name, p);
            Partition::open(dir, log_config.clone(), self.storage.clone())
        }))
        .await;
        let mut partitions = Vec::with_capacity(mine.len());
        let mut failures = Vec::new();
        for (&p, result) in mine.iter().zip(opened) {
            match result {
                Ok((partition, report)) => {
                    tracing::info!(topic = %meta.name, partition = p, shard = self.id, "opened: {report}");
                    partitions.push((p, partition));
                }
                Err(e) => failures.push((p, e)),
            }
        }
        if let Some((p, e)) = failures.first() {
            for (_, partition) in partitions {
                if let Err(e) = partition.remove().await {
                    tracing::warn!(topic = %meta.name, "removing a partition after a failed open: {e}");
                }
            }
            for (p, _) in &failures {
                let dir = metadata::partition_dir(&self.config.data_dir, &meta.name, *p);
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!("could not remove {}: {e}", dir.display());
                    }
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
        let mut owned = self.owned.borrow_mut();
        let slots = owned.entry(view.name.clone()).or_default();
        slots.resize(wanted, None);
        for (p, partition) in partitions {
            slots[p as usize] = Some(partition);
        }
        Ok(mine)
    }

    /// A producer id for Kafka InitProducerId: a new one with epoch 0, or for `current` (an id
    /// this broker handed out, with its epoch: a KIP-360 bump) the same id with the next epoch,
    /// and a new id once that epoch is exhausted. Apache Kafka itself ignores `current` without a
    /// transactional id and always hands out a new id; the bump keeps the id space small and is
    /// equally valid for clients (a higher epoch starting at sequence 0 is accepted everywhere).
    async fn controller_init_producer_id(
        self: Rc<Self>,
        current: Option<(i64, i16)>,
    ) -> Result<(i64, i16), PartitionError> {
        let controller = self.controller.as_ref().ok_or_else(|| {
            PartitionError::new(
                ErrorCode::Internal,
                "a producer id request reached a shard that is not the controller",
            )
        })?;
        let ids = &controller.producer_ids;
        let _turn = ids.gate.acquire_permit(1).await.map_err(|_| PartitionError::shutting_down())?;
        let path = self.config.data_dir.join(PRODUCER_IDS_FILE);
        let failed = |detail: String| {
            tracing::error!(path = %path.display(), "producer ids: {detail}");
            PartitionError::new(
                ErrorCode::StorageError,
                format!("producer ids ({}): {detail}", path.display()),
            )
        };
        let (next, end) = match ids.block.get() {
            Some(block) => block,
            None => {
                let file = path.clone();
                let end = glommio::executor()
                    .spawn_blocking(move || read_producer_id_block_end(&file))
                    .await
                    .map_err(failed)?;
                (end, end)
            }
        };
        ids.block.set(Some((next, end)));
        let end = if producer_id_from_block(next, end, current).is_some() {
            end
        } else {
            let new_end = end
                .checked_add(PRODUCER_ID_BLOCK)
                .ok_or_else(|| failed(format!("the id space is exhausted at {end}")))?;
            let file = path.clone();
            glommio::executor()
                .spawn_blocking(move || write_producer_id_block_end(&file, new_end))
                .await
                .map_err(|e| failed(format!("persisting the next block: {e}")))?;
            tracing::info!(first = end, end = new_end, "reserved a block of producer ids");
            new_end
        };
        let answer = producer_id_from_block(next, end, current)
            .ok_or_else(|| failed(format!("no id in the block {next}..{end} just reserved")))?;
        ids.block.set(Some((next_after(next, answer), end)));
        Ok(answer)
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

/// Ids per block reserved on disk by the producer-id allocator (Kafka's block size).
const PRODUCER_ID_BLOCK: i64 = 1000;
/// `<data_dir>/producer_ids`: the end of the last reserved block (every id below it may have
/// been handed out). Magic, i64 big-endian, crc32c of both.
const PRODUCER_IDS_FILE: &str = "producer_ids";
const PRODUCER_IDS_MAGIC: &[u8; 4] = b"RLPI";
const PRODUCER_IDS_FILE_BYTES: usize = 4 + 8 + 4;

/// Shard 0's producer ids: handed out from blocks whose end is persisted (fsync, rename) before
/// any id of the block is, so no id is handed out twice across shards (all ask shard 0; the
/// request is rare, one per producer start) or restarts (a restart skips the rest of a block).
struct ProducerIdAllocator {
    /// One request at a time: a block is persisted before its ids are used.
    gate: glommio::sync::Semaphore,
    /// `(next id, end of the reserved block)`; `None` until the file is read on first use.
    block: Cell<Option<(i64, i64)>>,
}

impl ProducerIdAllocator {
    fn new() -> ProducerIdAllocator {
        ProducerIdAllocator { gate: glommio::sync::Semaphore::new(1), block: Cell::new(None) }
    }
}

/// The answer from the reserved block `next..end`: for `current` (an id below `next`, so one
/// handed out before, with an epoch Kafka would still bump: below `i16::MAX - 1`) the same id
/// with the next epoch; else the next new id with epoch 0; `None` when the block is used up.
fn producer_id_from_block(next: i64, end: i64, current: Option<(i64, i16)>) -> Option<(i64, i16)> {
    debug_assert!(0 <= next && next <= end);
    if let Some((producer_id, epoch)) = current {
        if (0..next).contains(&producer_id) && (0..i16::MAX - 1).contains(&epoch) {
            return Some((producer_id, epoch + 1));
        }
    }
    (next < end).then_some((next, 0))
}

/// The block's next id once `answer` is handed out.
fn next_after(next: i64, answer: (i64, i16)) -> i64 {
    if answer == (next, 0) {
        next + 1
    } else {
        next
    }
}

/// The reserved end recorded in the producer-ids file; 0 when there is none yet (a new data
/// directory). Blocking.
fn read_producer_id_block_end(path: &Path) -> Result<i64, String> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(format!("reading: {e}")),
    };
    if bytes.len() != PRODUCER_IDS_FILE_BYTES || &bytes[..4] != PRODUCER_IDS_MAGIC {
        return Err(format!("{} bytes without the expected layout; the file is damaged", bytes.len()));
    }
    let (body, crc) = bytes.split_at(PRODUCER_IDS_FILE_BYTES - 4);
    let stored = u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32c::crc32c(body) != stored {
        return Err("crc32c mismatch; the file is damaged".into());
    }
    let mut end = [0u8; 8];
    end.copy_from_slice(&body[4..]);
    match i64::from_be_bytes(end) {
        end if end >= 0 => Ok(end),
        end => Err(format!("negative block end {end}; the file is damaged")),
    }
}

/// Replaces the producer-ids file atomically and durably (temp file, fsync, rename, fsync of
/// the directory). Blocking.
fn write_producer_id_block_end(path: &Path, end: i64) -> std::io::Result<()> {
    use std::io::Write;
    let mut bytes = Vec::with_capacity(PRODUCER_IDS_FILE_BYTES);
    bytes.extend_from_slice(PRODUCER_IDS_MAGIC);
    bytes.extend_from_slice(&end.to_be_bytes());
    bytes.extend_from_slice(&crc32c::crc32c(&bytes).to_be_bytes());
    let temp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&temp)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temp, path)?;
    match path.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
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
        StorageError::ProducerFenced { .. } => ErrorCode::InvalidProducerEpoch,
        StorageError::OutOfOrderSequence { .. } => ErrorCode::OutOfOrderSequenceNumber,
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

#[cfg(test)]
mod producer_id_tests {
    use super::*;

    #[test]
    fn ids_come_from_the_block_and_known_ids_get_the_next_epoch() {
        assert_eq!(producer_id_from_block(0, 0, None), None, "nothing reserved yet");
        assert_eq!(producer_id_from_block(5, 1000, None), Some((5, 0)));
        assert_eq!(next_after(5, (5, 0)), 6);
        // KIP-360 bump of an id handed out before.
        assert_eq!(producer_id_from_block(5, 1000, Some((3, 7))), Some((3, 8)));
        assert_eq!(next_after(5, (3, 8)), 5, "a bump uses no new id");
        assert_eq!(producer_id_from_block(5, 5, Some((3, 7))), Some((3, 8)), "even with the block used up");
        // Exhausted epochs, ids never handed out and negative epochs get a new id.
        assert_eq!(producer_id_from_block(5, 1000, Some((3, i16::MAX - 1))), Some((5, 0)));
        assert_eq!(producer_id_from_block(5, 1000, Some((3, i16::MAX - 2))), Some((3, i16::MAX - 1)));
        assert_eq!(producer_id_from_block(5, 1000, Some((5, 0))), Some((5, 0)));
        assert_eq!(producer_id_from_block(5, 1000, Some((3, -4))), Some((5, 0)));
        assert_eq!(producer_id_from_block(1000, 1000, Some((2000, 1))), None);
    }

    #[test]
    fn the_block_end_survives_in_its_file_and_damage_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(PRODUCER_IDS_FILE);
        assert_eq!(read_producer_id_block_end(&path), Ok(0), "a new data directory starts at 0");
        write_producer_id_block_end(&path, 3000).unwrap();
        assert_eq!(read_producer_id_block_end(&path), Ok(3000));
        write_producer_id_block_end(&path, 4000).unwrap();
        assert_eq!(read_producer_id_block_end(&path), Ok(4000));
        assert!(!path.with_extension("tmp").exists());
        let good = std::fs::read(&path).unwrap();
        for at in 0..good.len() {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            std::fs::write(&path, &bad).unwrap();
            assert!(read_producer_id_block_end(&path).is_err(), "flip at byte {at} accepted");
        }
        std::fs::write(&path, &good[..good.len() - 1]).unwrap();
        assert!(read_producer_id_block_end(&path).is_err());
    }
}
