//! Topics on one shard: applying a topic the controller created (opening the partitions this
//! shard owns, recovering them), growing it, removing it.
//!
//! Owns: the shard's topic views and owned-partition slots as they change. All or nothing per
//! shard: a failed open closes what did open. Called by the controller through `invoke_on`; never
//! decides anything itself (names, counts and placement come from the controller).

use std::rc::Rc;
use std::sync::Arc;

use futures::channel::oneshot;
use futures::future::join_all;

use super::{BrokerError, Shard, TopicView};
use crate::config::DurabilitySetting;
use crate::metadata::{self, TopicMeta, TopicSettings};
use crate::storage::{self, LogConfig, Partition};

impl Shard {
    pub(super) fn log_config(&self, settings: &TopicSettings) -> LogConfig {
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
    pub async fn apply_topic(&self, meta: &TopicMeta) -> Result<(), BrokerError> {
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
        let more = failures.len().saturating_sub(1);
        if let Some((p, e)) = failures.into_iter().next() {
            // All or nothing: close what did open, releasing its descriptors (a common failure is
            // running out of them). Files stay: on start-up they hold an existing topic's data; a
            // failed creation removes the topic directory (`controller`).
            for partition in slots.into_iter().flatten() {
                if let Err(e) = partition.close().await {
                    tracing::warn!(topic = %meta.name, "closing a partition after a failed open: {e}");
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

    pub async fn remove_topic(&self, name: &str) {
        self.topics.borrow_mut().remove(name);
        let removed = self.owned.borrow_mut().remove(name);
        for partition in removed.into_iter().flatten().flatten() {
            if let Err(e) = partition.remove().await {
                tracing::error!(topic = name, "removing partition files failed: {e}");
            }
        }
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
        let more = failures.len().saturating_sub(1);
        let failed: Vec<u32> = failures.iter().map(|(p, _)| *p).collect();
        if let Some((p, e)) = failures.into_iter().next() {
            for (_, partition) in partitions {
                if let Err(e) = partition.remove().await {
                    tracing::warn!(topic = %meta.name, "removing a partition after a failed open: {e}");
                }
            }
            for p in failed {
                let dir = metadata::partition_dir(&self.config.data_dir, &meta.name, p);
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
        let mut owned = self.owned.borrow_mut();
        let slots = owned.entry(view.name.clone()).or_default();
        slots.resize(wanted, None);
        for (p, partition) in partitions {
            slots[p as usize] = Some(partition);
        }
        Ok(mine)
    }
}

pub fn remove_topic_dir(data_dir: &std::path::Path, name: &str) {
    let dir = metadata::topic_dir(data_dir, name);
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("could not remove {}: {e}", dir.display());
        }
    }
}
