//! Topics on one shard: applying a topic the controller created (opening the partitions this
//! shard owns, recovering them, a bounded number at a time), growing it, removing it; and the
//! descriptor-budget check the controller makes before any of it.
//!
//! Owns: the shard's topic views and owned-partition slots as they change. All or nothing per
//! shard: a failed open closes what did open. Called by the controller through `invoke_on`; never
//! decides anything itself (names, counts and placement come from the controller).

use std::rc::Rc;
use std::sync::Arc;

use futures::channel::oneshot;
use futures::StreamExt;

use super::{BrokerError, Shard, TopicView};
use crate::config::DurabilitySetting;
use crate::metadata::{self, TopicMeta, TopicSettings};
use crate::storage::{self, LogConfig, Partition, RecoverySummary, StorageError};

/// Partitions a shard opens (or closes) at once: enough to keep the device busy, few enough that
/// a topic of 10,000 partitions does not have 10,000 opens, their buffers and wakers in flight.
pub(super) const OPENS_IN_FLIGHT: usize = 32;

/// What opening a set of partitions gave: the opened ones, the first failure and how many more
/// failed or were not tried after it, and what recovery found in those that opened.
struct Opened {
    partitions: Vec<(u32, Rc<Partition>)>,
    failure: Option<(u32, StorageError, usize)>,
    summary: RecoverySummary,
}

/// Closes and removes `partitions`, `OPENS_IN_FLIGHT` at a time, logging failures.
async fn remove_all(topic: &str, partitions: impl IntoIterator<Item = Rc<Partition>>) {
    futures::stream::iter(partitions)
        .for_each_concurrent(OPENS_IN_FLIGHT, |partition| async move {
            if let Err(e) = partition.remove().await {
                tracing::warn!(topic, "removing partition files failed: {e}");
            }
        })
        .await;
}

/// Closes `partitions`, `OPENS_IN_FLIGHT` at a time, logging failures (undoing a failed open).
pub(super) async fn close_all(topic: &str, partitions: impl IntoIterator<Item = Rc<Partition>>) {
    futures::stream::iter(partitions)
        .for_each_concurrent(OPENS_IN_FLIGHT, |partition| async move {
            if let Err(e) = partition.close().await {
                tracing::warn!(topic, "closing a partition: {e}");
            }
        })
        .await;
}

impl Shard {
    pub fn log_config(&self, settings: &TopicSettings) -> LogConfig {
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
            // Single node: what is durable is visible.
            visibility: storage::Visibility::Durable,
        }
    }

    /// Records a topic in this shard's view and opens (recovering) the partitions it owns;
    /// returns what recovery found in them.
    pub async fn apply_topic(&self, meta: &TopicMeta) -> Result<RecoverySummary, BrokerError> {
        let settings = meta.overrides.resolve(&self.config);
        let name: Arc<str> = Arc::from(meta.name.as_str());
        let log_config = self.log_config(&settings);
        let mine: Vec<u32> = (0..meta.partition_shards.len() as u32)
            .filter(|&p| meta.partition_shards[p as usize] == self.id)
            .collect();
        let opened = self.open_partitions(&meta.name, &mine, &log_config).await;
        if let Some((p, e, more)) = opened.failure {
            // All or nothing: close what did open, releasing its descriptors (a common failure is
            // running out of them). Files stay: on start-up they hold an existing topic's data; a
            // failed creation removes the topic directory (`controller`).
            close_all(&meta.name, opened.partitions.into_iter().map(|(_, partition)| partition)).await;
            return Err(BrokerError::OpenFailed {
                topic: meta.name.clone(),
                partition: p,
                shard: self.id,
                more,
                source: Arc::new(e),
            });
        }
        let mut slots: Vec<Option<Rc<Partition>>> = vec![None; meta.partition_shards.len()];
        for (p, partition) in opened.partitions {
            slots[p as usize] = Some(partition);
        }
        self.owned.borrow_mut().insert(name.clone(), slots);
        self.topics.borrow_mut().insert(
            name.clone(),
            Rc::new(TopicView {
                name,
                partition_shards: meta.partition_shards.clone(),
                overrides: meta.overrides.clone(),
                settings,
                replication: None,
            }),
        );
        Ok(opened.summary)
    }

    /// Opens partitions `ids` of `topic`, `OPENS_IN_FLIGHT` at a time. After the first failure
    /// no further open starts (at start-up they would fail the same way, e.g. out of descriptors).
    async fn open_partitions(&self, topic: &str, ids: &[u32], log_config: &LogConfig) -> Opened {
        let failed = std::cell::Cell::new(false);
        let results: Vec<(u32, Option<Result<_, StorageError>>)> = futures::stream::iter(ids.iter().copied())
            .map(|p| {
                let failed = &failed;
                async move {
                    if failed.get() {
                        return (p, None);
                    }
                    let dir = metadata::partition_dir(&self.config.data_dir, topic, p);
                    let result = Partition::open(dir, log_config.clone(), self.storage.clone()).await;
                    failed.set(failed.get() || result.is_err());
                    (p, Some(result))
                }
            })
            .buffer_unordered(OPENS_IN_FLIGHT)
            .collect()
            .await;
        let mut opened =
            Opened { partitions: Vec::new(), failure: None, summary: RecoverySummary::default() };
        let mut more = 0;
        for (p, result) in results {
            match result {
                Some(Ok((partition, report))) => {
                    tracing::debug!(topic, partition = p, shard = self.id, "opened: {report}");
                    opened.summary.add(&report);
                    opened.partitions.push((p, partition));
                }
                Some(Err(e)) if opened.failure.is_none() => opened.failure = Some((p, e, 0)),
                Some(Err(_)) | None => more += 1,
            }
        }
        if let Some((_, _, rest)) = opened.failure.as_mut() {
            *rest = more;
        }
        opened
    }

    pub async fn remove_topic(&self, name: &str) {
        self.topics.borrow_mut().remove(name);
        let removed = self.owned.borrow_mut().remove(name);
        remove_all(name, removed.into_iter().flatten().flatten()).await;
    }

    /// This shard's part of growing a topic: open the new partitions it owns (not yet routable)
    /// and answer on `opened`; then on `commit` true make them visible, on false (or a dropped
    /// sender) close and remove them. Returns once it acted on the commit.
    pub async fn grow_topic(
        self: Rc<Self>,
        meta: Arc<TopicMeta>,
        opened: oneshot::Sender<Result<(), BrokerError>>,
        commit: oneshot::Receiver<bool>,
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
                    replication: view.replication.clone(),
                };
                self.topics.borrow_mut().insert(view.name.clone(), Rc::new(grown));
            }
            (_, view) => {
                let had = view.map_or(0, |v| v.partition_shards.len());
                let removed: Vec<Rc<Partition>> = match self.owned.borrow_mut().get_mut(meta.name.as_str()) {
                    Some(slots) if slots.len() > had => slots.drain(had..).flatten().collect(),
                    _ => Vec::new(),
                };
                remove_all(&meta.name, removed).await;
                tracing::debug!(topic = %meta.name, shard = self.id, partitions = ?added, "grow rolled back");
            }
        }
    }

    /// Opens the partitions of `meta` beyond the current view that this shard owns and slots
    /// them in. Nothing routes to them until the view grows. All or nothing: on a failure, what
    /// did open is closed and every new directory removed.
    async fn open_added_partitions(&self, meta: &TopicMeta) -> Result<Vec<u32>, BrokerError> {
        let view =
            self.topic(&meta.name).ok_or_else(|| BrokerError::UnknownTopic { topic: meta.name.clone() })?;
        let had = view.partition_shards.len();
        let wanted = meta.partition_shards.len();
        if wanted <= had || meta.partition_shards[..had] != view.partition_shards[..] {
            return Err(BrokerError::Internal(format!(
                "topic '{}' on shard {}: its {had} partitions do not match the new layout {:?}",
                meta.name, self.id, meta.partition_shards
            )));
        }
        let log_config = self.log_config(&view.settings);
        let mine: Vec<u32> =
            (had..wanted).filter(|&p| meta.partition_shards[p] == self.id).map(|p| p as u32).collect();
        let opened = self.open_partitions(&meta.name, &mine, &log_config).await;
        if let Some((p, e, more)) = opened.failure {
            let opened_ids: std::collections::HashSet<u32> =
                opened.partitions.iter().map(|(p, _)| *p).collect();
            remove_all(&meta.name, opened.partitions.into_iter().map(|(_, partition)| partition)).await;
            for p in mine.iter().filter(|p| !opened_ids.contains(p)) {
                let dir = metadata::partition_dir(&self.config.data_dir, &meta.name, *p);
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!("could not remove {}: {e}", dir.display());
                    }
                }
            }
            return Err(BrokerError::OpenFailed {
                topic: meta.name.clone(),
                partition: p,
                shard: self.id,
                more,
                source: Arc::new(e),
            });
        }
        let partitions = opened.partitions;
        let mut owned = self.owned.borrow_mut();
        let slots = owned.entry(view.name.clone()).or_default();
        slots.resize(wanted, None);
        for (p, partition) in partitions {
            slots[p as usize] = Some(partition);
        }
        Ok(mine)
    }
}

/// Refuses a change that would give the broker more partitions (`held` + `adding`, all topics,
/// all shards) than `partitions_per_shard_max` on each of its shards. Descriptors do not bound
/// the count (idle partitions hold none); memory (a few KB per idle partition) and disk do, and
/// this option is how an operator keeps within them.
pub fn check_partition_budget(shard: &Shard, topic: &str, held: u64, adding: u64) -> Result<(), BrokerError> {
    let per_shard = shard.config.partitions_per_shard_max;
    let max = per_shard.saturating_mul(u64::from(shard.count));
    if held + adding <= max {
        return Ok(());
    }
    Err(BrokerError::PartitionBudget {
        topic: topic.to_string(),
        adding,
        detail: format!(
            "it would hold {} partitions and {} shards allow {max} (partitions_per_shard_max {per_shard}); \
             raise partitions_per_shard_max if memory (about 4 KB per idle partition) and disk allow",
            held + adding,
            shard.count
        ),
    })
}

pub fn remove_topic_dir(data_dir: &std::path::Path, name: &str) {
    let dir = metadata::topic_dir(data_dir, name);
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("could not remove {}: {e}", dir.display());
        }
    }
}
