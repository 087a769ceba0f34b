//! The controller: topic lifecycle and producer ids, run on shard 0 over the metadata store.
//!
//! Owns: the metadata file (`MetadataStore`) while the broker runs, and the one gate that runs a
//! topic change at a time; creating, deleting and growing topics all or nothing across shards;
//! producer-id blocks (`producer_ids`). Any shard calls the entry points here; they run on shard 0
//! (`Shard::invoke_on`), where `install` registered the controller as a shard extension. Each
//! shard then applies the change to itself (`shard::topics`). This is the piece that becomes the
//! replicated controller: its state is the cluster metadata, its callers need not know where it
//! runs. May depend on `shard`, `metadata`, `config`; never on connections, protocols or groups.
//! Control plane: nothing here is on the produce/fetch path.

mod producer_ids;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use futures::channel::oneshot;

use crate::metadata::{self, MetadataStore, TopicMeta, TopicOverrides};
use crate::shard::{self, now_ms, Boxed, BrokerError, Shard};
use producer_ids::ProducerIdAllocator;

/// The shard that runs the controller.
const CONTROLLER_SHARD: u32 = 0;

/// Shard 0's controller state.
pub struct Controller {
    store: RefCell<MetadataStore>,
    /// One topic change at a time: each reads the store, opens files on every shard, then writes.
    gate: glommio::sync::Semaphore,
    producer_ids: ProducerIdAllocator,
}

/// Makes `shard` (shard 0) the controller, holding the metadata store from now on.
pub fn install(shard: &Shard, store: MetadataStore) {
    debug_assert_eq!(shard.id, CONTROLLER_SHARD);
    shard.set_extension(Rc::new(Controller {
        store: RefCell::new(store),
        gate: glommio::sync::Semaphore::new(1),
        producer_ids: ProducerIdAllocator::new(),
    }));
}

/// Runs `op` with the controller, on the controller's shard. The request is sent before this
/// returns; the returned future waits for the answer.
async fn on_controller<R, W, F>(shard: &Rc<Shard>, op: W) -> Boxed<Result<R, BrokerError>>
where
    R: Send + 'static,
    W: FnOnce(Rc<Shard>, Rc<Controller>) -> F + Send + 'static,
    F: std::future::Future<Output = Result<R, BrokerError>> + 'static,
{
    let answer = shard
        .invoke_on(CONTROLLER_SHARD, move |shard| async move {
            match shard.extension::<Controller>() {
                Some(controller) => op(shard, controller).await,
                None => Err(BrokerError::Internal(format!(
                    "a controller request reached shard {}, which is not the controller",
                    shard.id
                ))),
            }
        })
        .await;
    Box::pin(async move { answer.await? })
}

pub async fn create_topic(
    shard: &Rc<Shard>,
    name: String,
    partitions: u32,
    overrides: TopicOverrides,
) -> Result<TopicMeta, BrokerError> {
    on_controller(shard, move |shard, c| async move { c.create(&shard, name, partitions, overrides).await })
        .await
        .await
}

pub async fn delete_topic(shard: &Rc<Shard>, name: String) -> Result<(), BrokerError> {
    on_controller(shard, move |shard, c| async move { c.delete(&shard, name).await }).await.await
}

/// Raises `name`'s partition count to `partitions`; existing partitions are untouched.
pub async fn create_partitions(
    shard: &Rc<Shard>,
    name: String,
    partitions: u32,
) -> Result<TopicMeta, BrokerError> {
    on_controller(shard, move |shard, c| async move { c.create_partitions(&shard, name, partitions).await })
        .await
        .await
}

/// A producer id for Kafka InitProducerId without a transactional id (see
/// `ProducerIdAllocator::next`). The request is sent before this returns; the returned future
/// waits for the answer.
pub async fn init_producer_id(
    shard: &Rc<Shard>,
    current: Option<(i64, i16)>,
) -> Boxed<Result<(i64, i16), BrokerError>> {
    // In a cluster each node hands out ids of its own: local id `n` is `n * NODE_ID_SPACE +
    // node_id` on the wire, so no two nodes ever hand out the same id. (The controller's log
    // will hold producer-id blocks instead; this keeps ids unique until it does.)
    const NODE_ID_SPACE: i64 = crate::config::NODE_ID_SPACE as i64;
    let node = (!shard.config.seeds.trim().is_empty()).then_some(shard.config.node_id as i64);
    let local = match node {
        Some(node) => {
            current.filter(|(id, _)| id % NODE_ID_SPACE == node).map(|(id, e)| (id / NODE_ID_SPACE, e))
        }
        None => current,
    };
    let answer = on_controller(shard, move |shard, c| async move {
        c.producer_ids.next(&shard.config.data_dir, local).await
    })
    .await;
    Box::pin(async move {
        let (id, epoch) = answer.await?;
        match node {
            Some(node) => id.checked_mul(NODE_ID_SPACE).map(|id| (id + node, epoch)).ok_or_else(|| {
                BrokerError::Internal(format!("producer id {id} exceeds the cluster's id space"))
            }),
            None => Ok((id, epoch)),
        }
    })
}

/// Joins the failures of a topic change into one rolled-back error.
fn rolled_back(action: &'static str, topic: &str, failures: &[BrokerError]) -> BrokerError {
    let detail = failures.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
    BrokerError::RolledBack {
        action,
        topic: topic.to_string(),
        detail,
        out_of_descriptors: failures.iter().any(BrokerError::is_out_of_descriptors),
    }
}

/// Partitions of every topic in the store, internal ones included: each holds descriptors.
fn store_partitions(store: &MetadataStore) -> u64 {
    store.topics().map(|t| t.partition_shards.len() as u64).sum()
}

fn store_failed(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::ControllerFile { file: "the metadata file".into(), detail: e.to_string() }
}

impl Controller {
    async fn create(
        &self,
        shard: &Rc<Shard>,
        name: String,
        partitions: u32,
        overrides: TopicOverrides,
    ) -> Result<TopicMeta, BrokerError> {
        let _turn = self.gate.acquire_permit(1).await.map_err(|_| BrokerError::ShuttingDown)?;
        metadata::validate_topic_name(&name).map_err(BrokerError::InvalidTopicName)?;
        if partitions == 0 || partitions > shard.config.partitions_per_topic_max {
            return Err(BrokerError::InvalidPartitions(format!(
                "{partitions} partitions requested; allowed 1..={}",
                shard.config.partitions_per_topic_max
            )));
        }
        overrides.validate(&shard.config).map_err(BrokerError::InvalidConfig)?;
        let meta = {
            let mut store = self.store.borrow_mut();
            // A replicated topic is in the cluster's log, not this store, but holds its name.
            if store.get(&name).is_some() || shard.topic(&name).is_some() {
                return Err(BrokerError::TopicAlreadyExists { topic: name });
            }
            // Internal topics (__consumer_offsets) do not count against the users' limit.
            let user_topics = store.topics().filter(|t| !metadata::is_internal_topic(&t.name)).count();
            if user_topics >= shard.config.topics_max {
                return Err(BrokerError::TooManyTopics { topics: user_topics });
            }
            shard::check_partition_budget(shard, &name, store_partitions(&store), u64::from(partitions))?;
            let loads = store.shard_loads(shard.count as usize);
            let meta = TopicMeta {
                name: name.clone(),
                partition_shards: metadata::assign_partitions(partitions as usize, &loads),
                overrides,
                created_ms: now_ms(),
            };
            store.insert(meta.clone()).map_err(store_failed)?;
            meta
        };
        let shared = Arc::new(meta.clone());
        let mut failures: Vec<BrokerError> = Vec::new();
        let mut acks = Vec::new();
        for target in (0..shard.count).filter(|&s| s != shard.id) {
            let topic = shared.clone();
            acks.push(shard.invoke_on(target, move |s| async move { s.apply_topic(&topic).await }).await);
        }
        if let Err(e) = shard.apply_topic(&meta).await {
            failures.push(e);
        }
        for ack in acks {
            if let Err(e) = ack.await.and_then(|applied| applied) {
                failures.push(e);
            }
        }
        if failures.is_empty() {
            tracing::info!(topic = %name, partitions, shards = ?meta.partition_shards, "topic created");
            return Ok(meta);
        }
        // All or nothing: forget the topic everywhere and remove what was created on disk.
        let error = rolled_back("creating", &name, &failures);
        tracing::warn!(topic = %name, partitions, "creating the topic failed; rolling back: {error}");
        if let Err(e) = self.store.borrow_mut().remove(&name) {
            tracing::error!(topic = %name, "rolling back: removing the topic from the metadata store failed: {e}");
        }
        remove_everywhere(shard, &name).await;
        Err(error)
    }

    async fn delete(&self, shard: &Rc<Shard>, name: String) -> Result<(), BrokerError> {
        let _turn = self.gate.acquire_permit(1).await.map_err(|_| BrokerError::ShuttingDown)?;
        if metadata::is_internal_topic(&name) {
            return Err(BrokerError::InternalTopic {
                topic: name,
                rule: "it holds consumer group offsets and cannot be deleted",
            });
        }
        let removed = self.store.borrow_mut().remove(&name).map_err(store_failed)?;
        if removed.is_none() {
            return Err(BrokerError::UnknownTopic { topic: name });
        }
        remove_everywhere(shard, &name).await;
        tracing::info!(topic = %name, "topic deleted");
        Ok(())
    }

    /// Grows a topic all or nothing: every shard first opens the new partitions it owns where
    /// nothing routes to them yet; only when all did is the new layout persisted and every shard
    /// told to swap in the larger topic view. Existing partitions stay open and keep serving
    /// throughout; a failure closes and removes the new ones everywhere.
    async fn create_partitions(
        &self,
        shard: &Rc<Shard>,
        name: String,
        partitions: u32,
    ) -> Result<TopicMeta, BrokerError> {
        let _turn = self.gate.acquire_permit(1).await.map_err(|_| BrokerError::ShuttingDown)?;
        if metadata::is_internal_topic(&name) {
            // A group's coordinator is the owner of partition hash(group) mod the partition count.
            return Err(BrokerError::InternalTopic {
                topic: name,
                rule: "its partition count is fixed (offsets_topic_partitions)",
            });
        }
        let meta = {
            let store = self.store.borrow();
            let current =
                store.get(&name).ok_or_else(|| BrokerError::UnknownTopic { topic: name.clone() })?;
            let had = current.partition_shards.len();
            if partitions as usize <= had {
                return Err(BrokerError::InvalidPartitions(format!(
                    "topic '{name}' has {had} partitions; the count can only grow, not to {partitions}"
                )));
            }
            if partitions > shard.config.partitions_per_topic_max {
                return Err(BrokerError::InvalidPartitions(format!(
                    "{partitions} partitions requested; allowed up to {} (partitions_per_topic_max)",
                    shard.config.partitions_per_topic_max
                )));
            }
            shard::check_partition_budget(
                shard,
                &name,
                store_partitions(&store),
                (partitions as usize - had) as u64,
            )?;
            let loads = store.shard_loads(shard.count as usize);
            let mut partition_shards = current.partition_shards.clone();
            partition_shards.extend(metadata::assign_partitions(partitions as usize - had, &loads));
            TopicMeta { partition_shards, ..current.clone() }
        };
        let shared = Arc::new(meta.clone());
        let mut failures: Vec<BrokerError> = Vec::new();
        let mut opened = Vec::new();
        let mut commits = Vec::new();
        let mut dones = Vec::new();
        for target in 0..shard.count {
            let (opened_tx, opened_rx) = oneshot::channel();
            let (commit_tx, commit_rx) = oneshot::channel();
            let topic = shared.clone();
            // A task of its own on every shard, this one included: it waits for the commit that
            // this function sends, and answers `done` once it acted on it.
            let done = shard
                .invoke_on(target, move |s| async move { s.grow_topic(topic, opened_tx, commit_rx).await })
                .await;
            opened.push((target, opened_rx));
            commits.push(commit_tx);
            dones.push(done);
        }
        for (target, rx) in opened {
            match rx.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failures.push(e),
                Err(_) => failures.push(BrokerError::Internal(format!(
                    "shard {target} stopped before opening its partitions"
                ))),
            }
        }
        if failures.is_empty() {
            // Replaces the topic's entry; written before any shard routes to the new partitions.
            if let Err(e) = self.store.borrow_mut().insert(meta.clone()) {
                failures.push(store_failed(e));
            }
        }
        let commit = failures.is_empty();
        for tx in commits {
            let _ = tx.send(commit);
        }
        for done in dones {
            let _ = done.await;
        }
        if commit {
            tracing::info!(topic = %name, partitions, shards = ?meta.partition_shards, "partitions added");
            return Ok(meta);
        }
        let error = rolled_back("adding partitions to", &name, &failures);
        tracing::warn!(topic = %name, partitions, "{error}");
        Err(error)
    }
}

/// Every shard forgets the topic and closes and removes its partitions; then its directory goes.
async fn remove_everywhere(shard: &Rc<Shard>, name: &str) {
    let shared: Arc<str> = Arc::from(name);
    let mut acks = Vec::new();
    for target in (0..shard.count).filter(|&s| s != shard.id) {
        let name = shared.clone();
        acks.push(shard.invoke_on(target, move |s| async move { s.remove_topic(&name).await }).await);
    }
    shard.remove_topic(name).await;
    for ack in acks {
        let _ = ack.await;
    }
    shard::remove_topic_dir(&shard.config.data_dir, name);
}
