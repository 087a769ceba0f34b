//! Shards: one per core, each owning a set of partitions, and the routing between them.
//!
//! Owns: the shard's view of topic metadata (`topics`: applying, growing and removing topics on
//! this shard), the partitions it owns (`storage::Partition`), the cross-shard mesh (`mesh`), the
//! owner-side operations (`owner`), the rules both protocols apply to client requests (`rules`),
//! when an idle shard returns freed memory (`idle`), the answers to Kafka clients' leader-epoch
//! questions (`epochs`) and the error type of the broker (`error`). Every request part for a partition is executed on
//! the partition's owner: locally when the connection is on the owner, otherwise one mesh message
//! per shard. Layers above (controller, groups, metrics scrapes) run their work on another shard
//! with `invoke_on` and keep their per-shard state as extensions of the shard, so this module
//! never names them.
//! `replica` joins a partition's consensus to its storage.
//! May depend on `storage`, `replication`, `metadata`, `metrics`, `record`, `config`, `allocator`; never on connections,
//! protocols, the controller or groups. Nothing here is shared between threads except through
//! `ShardMsg`.

mod epochs;
mod error;
mod idle;
pub mod mesh;
mod owner;
pub mod replica;
pub mod replicated;
pub mod rules;
mod topics;

use std::any::{Any, TypeId};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures::channel::oneshot;
use futures::future::{select_all, FutureExt};
use futures::StreamExt;
use glommio::channels::channel_mesh::Senders;

use crate::config::BrokerConfig;
use crate::metadata::{TopicMeta, TopicOverrides, TopicSettings};
use crate::storage::{Partition, ShardStorage};
use idle::IdleRelease;
use mesh::*;

pub use error::{BrokerError, StorageFailure};
pub use owner::PendingAppend;
pub use topics::{check_partition_budget, remove_topic_dir};

/// A topic as every shard sees it.
pub struct TopicView {
    pub name: Arc<str>,
    pub partition_shards: Vec<u32>,
    pub overrides: TopicOverrides,
    pub settings: TopicSettings,
    /// Set for a topic whose partitions are Raft groups across nodes (a cluster's replicated
    /// topic); its produce goes through the hosting shard's `ReplicaGate`.
    pub replication: Option<Arc<replicated::Replication>>,
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
    pub connections: Cell<usize>,
    pub cross_shard_hops: Cell<u64>,
    /// Per-shard state of the layers above (the group coordinator; the controller on shard 0),
    /// one value per type, registered at start-up. Keyed by type so the shard need not name them.
    extensions: RefCell<HashMap<TypeId, Rc<dyn Any>>>,
    /// `(host, port)` Kafka clients are told to reach this broker at; unset when the Kafka
    /// listener is off.
    pub kafka_endpoint: std::cell::OnceCell<(String, u16)>,
    /// Installed by the cluster layer on the shard hosting replicated partitions.
    replica_gate: RefCell<Option<Rc<dyn replicated::ReplicaGate>>>,
    replica_directory: RefCell<Option<Rc<dyn replicated::ReplicaDirectory>>>,
}

pub type Boxed<T> = Pin<Box<dyn Future<Output = T>>>;

/// A topic's partitions on this shard, indexed by partition id; `None` where another shard owns it.
type PartitionSlots = Vec<Option<Rc<Partition>>>;

/// One shard's share of a scattered request: the original item positions and its results.
type ScatterPart<O> = (Vec<usize>, Boxed<Result<Vec<O>, BrokerError>>);

impl Shard {
    /// Builds the shard and opens every partition it owns: one topic after another, a bounded
    /// number of partitions at a time (`topics::OPENS_IN_FLIGHT`). Logs one summary line.
    pub async fn open(
        id: u32,
        config: Arc<BrokerConfig>,
        endpoints: Vec<SocketAddr>,
        topics: &[TopicMeta],
        senders: Senders<ShardMsg>,
        peer_of_shard: Vec<usize>,
    ) -> Result<Rc<Shard>, BrokerError> {
        let count = endpoints.len() as u32;
        let storage = ShardStorage::new(
            config.data_dir.clone(),
            config.tail_cache_bytes,
            config.free_space_reserve_bytes,
        );
        storage.set_fsync_scope(match config.fsync_scope {
            crate::config::FsyncScopeSetting::Filesystem => crate::storage::FsyncScope::Filesystem,
            crate::config::FsyncScopeSetting::File => crate::storage::FsyncScope::File,
        });
        if let Some(budget) = crate::storage::descriptors::DescriptorBudget::current() {
            storage.set_active_files_max(budget.active_files_per_shard(count as usize));
        }
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
            connections: Cell::new(0),
            cross_shard_hops: Cell::new(0),
            extensions: RefCell::new(HashMap::new()),
            kafka_endpoint: std::cell::OnceCell::new(),
            replica_gate: RefCell::new(None),
            replica_directory: RefCell::new(None),
        });
        let started = std::time::Instant::now();
        let mut summary = crate::storage::RecoverySummary::default();
        for topic in topics {
            match shard.apply_topic(topic).await {
                Ok(found) => summary.merge(&found),
                Err(e) => {
                    // Release what earlier topics opened before reporting.
                    shard.close_partitions().await;
                    return Err(e);
                }
            }
        }
        tracing::info!(
            shard = id,
            partitions = summary.partitions,
            segments_scanned = summary.segments_scanned,
            damaged_tails = summary.truncated,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "shard {id} opened {} topics in {:.3} s: {summary}",
            topics.len(),
            started.elapsed().as_secs_f64()
        );
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

    /// Where `(topic, partition)` lives: its topic view and owning shard.
    pub fn route(&self, topic: &str, partition: u32) -> Result<(Rc<TopicView>, u32), BrokerError> {
        let view = self.topic(topic).ok_or_else(|| BrokerError::UnknownTopic { topic: topic.to_string() })?;
        let owner = *view
            .partition_shards
            .get(partition as usize)
            .ok_or_else(|| BrokerError::unknown_partition(topic, partition))?;
        Ok((view, owner))
    }

    /// Sends one message to another shard. Fails only when the peer has gone (shutdown).
    pub(crate) async fn send(&self, shard: u32, msg: ShardMsg) -> Result<(), BrokerError> {
        debug_assert_ne!(shard, self.id, "local work never crosses the mesh");
        self.cross_shard_hops.set(self.cross_shard_hops.get() + 1);
        let peer = self.peer_of_shard[shard as usize];
        self.senders.send_to(peer, msg).await.map_err(|_| BrokerError::ShuttingDown)
    }

    /// Runs `work` on shard `target` with that shard's `Rc<Shard>`: on this shard as a task of its
    /// own, elsewhere as one mesh message. The work is under way once the outer future is done
    /// (so call order is start order on every target), whether or not the returned future is
    /// awaited; that future answers with the work's output. For the control plane: each call
    /// costs a boxed closure.
    pub async fn invoke_on<R, W, F>(self: &Rc<Self>, target: u32, work: W) -> Boxed<Result<R, BrokerError>>
    where
        R: Send + 'static,
        W: FnOnce(Rc<Shard>) -> F + Send + 'static,
        F: Future<Output = R> + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let run = move |shard: Rc<Shard>| {
            glommio::spawn_local(async move {
                let _ = reply.send(work(shard).await);
            })
            .detach();
        };
        if target == self.id {
            run(self.clone());
        } else if let Err(e) = self.send(target, ShardMsg::Invoke(Box::new(run))).await {
            return futures::future::ready(Err(e)).boxed_local();
        }
        answer.map(|r| r.map_err(|_| BrokerError::ShuttingDown)).boxed_local()
    }

    /// Registers this shard's instance of `T` (at start-up, by the layer that owns `T`).
    pub fn set_extension<T: 'static>(&self, value: Rc<T>) {
        self.extensions.borrow_mut().insert(TypeId::of::<T>(), value);
    }

    /// This shard's instance of `T`, if one was registered.
    pub fn extension<T: 'static>(&self) -> Option<Rc<T>> {
        let any = self.extensions.borrow().get(&TypeId::of::<T>())?.clone();
        any.downcast::<T>().ok()
    }

    /// Runs `items` on their owner shards: the local part directly, each remote shard's part as
    /// one mesh message. The sends happen before this returns (so call order is delivery order on
    /// every owner); the returned future gathers the results in the original item order.
    async fn scatter<I, O: 'static>(
        self: &Rc<Self>,
        items: Vec<(u32, I)>,
        local: impl FnOnce(&Rc<Shard>, Vec<I>) -> Boxed<Vec<O>>,
        remote: impl Fn(Vec<I>, oneshot::Sender<Vec<O>>) -> ShardMsg,
        failed: impl Fn(BrokerError) -> O + 'static,
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
            let fut: Boxed<Result<Vec<O>, BrokerError>> = match sent {
                Ok(()) => rx.map(|r| r.map_err(|_| BrokerError::ShuttingDown)).boxed_local(),
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
                            slots[i] =
                                Some(failed(BrokerError::Internal("shard reply size mismatch".into())));
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
                .map(|o| o.unwrap_or_else(|| failed(BrokerError::Internal("missing result".into()))))
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
            // A diverged log is answered at once too: the client must truncate before reading.
            let failed = answer_now
                || outcomes.iter().any(|o| o.as_ref().map_or(true, |f| f.diverging_epoch.is_some()));
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

    // ---- Background work ----------------------------------------------------------------------
    /// Periodic disk-space refresh, segment roll by age and retention, and giving freed memory
    /// back once the shard is idle, until `stop` resolves.
    pub(crate) async fn housekeeping(self: Rc<Self>) {
        let interval = Duration::from_millis(self.config.housekeeping_interval_ms);
        let disk_interval = Duration::from_millis(500).min(interval);
        let mut since_housekeeping = Duration::ZERO;
        let mut idle = IdleRelease::default();
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
            if idle.should_release(self.storage.activity()) {
                // Timed because it runs on the shard: a request arriving meanwhile waits for it.
                let started = std::time::Instant::now();
                crate::allocator::release_free_memory();
                tracing::debug!(
                    shard = self.id,
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "idle: freed memory released"
                );
            }
        }
    }

    /// This shard's metrics snapshot. Runs on the shard's own thread.
    pub fn metrics_snapshot(&self) -> crate::metrics::ShardSnapshot {
        let io = glommio::executor().io_stats();
        let mut io_delta = crate::metrics::IoCounters::default();
        for ring in [io.main_ring, io.latency_ring, io.poll_ring] {
            let (reads, bytes_read) = ring.file_reads();
            let (writes, bytes_written) = ring.file_writes();
            io_delta.file_reads += reads;
            io_delta.file_bytes_read += bytes_read;
            io_delta.file_writes += writes;
            io_delta.file_bytes_written += bytes_written;
        }
        let topics_owned = self
            .topics
            .borrow()
            .values()
            .map(|view| (view.name.clone(), view.partition_shards.iter().filter(|&&s| s == self.id).count()))
            .collect();
        let mut memory = self.storage.cache_memory().to_vec();
        for partition in self.owned_partitions() {
            memory.extend(partition.memory());
        }
        crate::metrics::snapshot(crate::metrics::ShardGauges {
            shard: self.id,
            connections: self.connections.get(),
            cross_shard_hops: self.cross_shard_hops.get(),
            topics_owned,
            cache: self.storage.cache_stats(),
            io_delta,
            memory,
        })
    }

    /// Flushes and closes every partition this shard owns, a bounded number at a time.
    pub(crate) async fn close_partitions(&self) {
        let partitions = self.owned_partitions();
        let id = self.id;
        futures::stream::iter(partitions)
            .for_each_concurrent(topics::OPENS_IN_FLIGHT, |partition| async move {
                if let Err(e) = partition.close().await {
                    tracing::error!(shard = id, "closing a partition failed: {e}");
                }
            })
            .await;
        // Makes the clean-shutdown markers durable; without this a restart after a power loss
        // recovers as after a crash, which is slower, not wrong.
        if let Err(e) = self.storage.sync_filesystem().await {
            tracing::warn!(shard = id, "{e}");
        }
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
