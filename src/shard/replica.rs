//! One partition replica on its owning shard: consensus (`replication::RaftGroup` over a
//! `ReplicaLog`) joined to the partition's storage. The group decides; this carries out what its
//! log asks — truncations, appends of the leader's stamped batches, saves of `raft.state` and
//! `leader-epochs` — makes them durable before the messages that depend on them leave, reads back
//! entries a follower lacks, and moves the partition's high watermark to what is committed.
//!
//! Owns the order of a replica's IO (writes, then fdatasync, then `persisted`, then the messages).
//! Depends on `replication` and `storage`; the transport between nodes is the caller's.

use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use raft::eraftpb::Message;
use thiserror::Error;

use crate::record;
use crate::replication::epochs::{EpochsError, LeaderEpochs};
use crate::replication::group::{GroupError, GroupSettings, ProposeError, Proposed, RaftGroup};
use crate::replication::replica_log::{
    CacheLimits, LogWrite, OpenError, ProducersAsOf, ReplicaLog, ReplicaState, ScannedBatch, StateFileError,
};
use crate::storage::{
    blocking, Durability, Partition, ProducerStates, RequestVerdict, StorageError, Visibility,
};

/// Bytes read per step of the open scan and of a follower's catch-up read.
const READ_STEP_BYTES: usize = 1 << 20;

#[derive(Debug, Error)]
pub enum ReplicaError {
    #[error(
        "replica {name}: its partition log must be opened with committed visibility and fsync durability"
    )]
    Misconfigured { name: String },
    #[error("replica {name}: {source}")]
    Storage { name: String, source: StorageError },
    #[error("replica {name}: {source}")]
    StateFile { name: String, source: StateFileError },
    #[error("replica {name}: {source}")]
    Epochs { name: String, source: EpochsError },
    #[error("replica {name}: the log after its saved anchor does not read back: {source}")]
    Open { name: String, source: OpenError },
    #[error("replica {name}: a batch of its log is damaged at offset {offset}: {source}")]
    DamagedBatch { name: String, offset: i64, source: record::BatchError },
    #[error("replica {name}: {source}")]
    Group { name: String, source: GroupError },
    #[error("replica {name}: the blocking pool failed: {detail}")]
    Blocking { name: String, detail: String },
}

/// Why a proposal was not taken.
#[derive(Debug, Error)]
pub enum ProposalRefused {
    #[error(transparent)]
    Group(#[from] ProposeError),
    /// The producer state refuses the batch (a fenced epoch, a sequence out of order).
    #[error(transparent)]
    Producer(StorageError),
}

pub struct PartitionReplica {
    name: String,
    group: RaftGroup<ReplicaLog>,
    partition: Rc<Partition>,
}

impl PartitionReplica {
    /// Opens replica `id` of the group `name` over `partition` (already opened, with committed
    /// visibility and fsync durability), whose members are `voters` unless its saved state says;
    /// `cache` bounds the entry data it keeps in memory.
    pub async fn open(
        name: String,
        id: u64,
        voters: Vec<u64>,
        partition: Rc<Partition>,
        settings: GroupSettings,
        cache: CacheLimits,
        seed: u64,
    ) -> Result<PartitionReplica, ReplicaError> {
        let config = partition.config();
        if config.visibility != Visibility::Committed || config.durability != Durability::Fsync {
            return Err(ReplicaError::Misconfigured { name });
        }
        let dir = partition.dir().to_path_buf();
        let loaded = blocking::run(move || {
            let state = ReplicaState::load(&dir).map_err(Files::State)?;
            let epochs = LeaderEpochs::load(&dir).map_err(Files::Epochs)?;
            Ok::<_, Files>((state, epochs))
        })
        .await;
        let (state, epochs) = match loaded {
            Ok(Ok(files)) => files,
            Ok(Err(Files::State(source))) => return Err(ReplicaError::StateFile { name, source }),
            Ok(Err(Files::Epochs(source))) => return Err(ReplicaError::Epochs { name, source }),
            Err(detail) => return Err(ReplicaError::Blocking { name, detail }),
        };
        let mut state = state.unwrap_or_else(|| ReplicaState::new(voters, partition.log_start_offset()));
        if state.restart_pending {
            // A crash interrupted the restart from a leader's snapshot: finish it before anything
            // reads the log (the scan below starts at the anchor's end offset).
            tracing::info!(
                replica = name,
                offset = state.anchor.end_offset,
                "replication: finishing a log restart from a snapshot"
            );
            // The leader's producers came with the snapshot and were staged before the flag.
            // Without a staged file (a restart flagged by a version before stop 21), a log
            // that starts at the offset was restarted whole, so what it recovered is that
            // state; otherwise the producers below the new start are forgotten.
            let offset = state.anchor.end_offset;
            let recovered = || match partition.log_start_offset() == offset {
                true => partition.producers_as_of(offset),
                false => ProducerStates::default(),
            };
            let producers = match partition.staged_restart(offset).await {
                Ok(Some(staged)) => staged,
                Ok(None) => recovered(),
                // An unreadable copy costs only duplicate detection for batches below the new
                // start; refusing to open would cost the replica.
                Err(error) => {
                    tracing::warn!(
                        replica = name,
                        %error,
                        "replication: the producers staged for the log restart are unreadable; \
                         retries of batches below the new log start will not be recognised"
                    );
                    recovered()
                }
            };
            partition
                .restart_at(offset, producers)
                .await
                .map_err(|source| ReplicaError::Storage { name: name.clone(), source })?;
            state.restart_pending = false;
            let dir = partition.dir().to_path_buf();
            let saved = state.clone();
            match blocking::run(move || saved.store(&dir)).await {
                Ok(Ok(())) => {}
                Ok(Err(source)) => return Err(ReplicaError::StateFile { name, source }),
                Err(detail) => return Err(ReplicaError::Blocking { name, detail }),
            }
        }
        let tail = scan(&name, &partition, state.anchor.end_offset).await?;
        let mut log = ReplicaLog::open(state, epochs, tail, cache)
            .map_err(|source| ReplicaError::Open { name: name.clone(), source })?;
        let source = partition.clone();
        log.set_producers_as_of(ProducersAsOf(Box::new(move |offset| source.producers_as_of(offset))));
        let group = RaftGroup::new(id, name.clone(), settings, log, seed)
            .map_err(|source| ReplicaError::Group { name: name.clone(), source })?;
        partition.commit_to(group.high_watermark());
        partition.keep_from(group.store().anchor().end_offset);
        Ok(PartitionReplica { name, group, partition })
    }

    pub fn group(&mut self) -> &mut RaftGroup<ReplicaLog> {
        &mut self.group
    }

    pub fn partition(&self) -> &Rc<Partition> {
        &self.partition
    }

    /// Proposes a producer's batch (validated by the caller). An idempotent producer's batch is
    /// first checked against the producer state of this log and of what was proposed after its
    /// end (Kafka's leader checks before it appends): a retry of a batch either holds is answered
    /// with the original's offsets and not proposed again, so it is written once whichever leader
    /// took the first attempt; a fenced or out-of-order batch is refused as a local append would.
    pub fn propose(&mut self, batch: BytesMut) -> Result<Proposed, ProposalRefused> {
        let partition = &self.partition;
        propose_checked(&mut self.group, batch, partition.log_end_offset(), |header, pending| {
            partition.check_proposal(header, pending)
        })
    }

    /// One round: polls the group, hands `send_now` the messages that need nothing persisted (a
    /// leader's appends go out while its own write is under way, as Raft allows), carries out
    /// the log's writes, waits until they are durable, reports them, serves the reads raft-rs
    /// asked for and shows readers what is committed. Returns the messages that waited for the
    /// writes, safe to send now.
    pub async fn drive(
        &mut self,
        mut send_now: impl FnMut(Vec<Message>),
    ) -> Result<Vec<Message>, ReplicaError> {
        let output = self.group.poll().map_err(|source| self.group_error(source))?;
        if !output.send.is_empty() {
            send_now(output.send);
        }
        let mut send = Vec::new();
        let writes = self.group.store_mut().take_writes();
        self.carry_out(writes).await?;
        if let Some(persist) = output.persist {
            self.group.persisted(persist.number);
            send.extend(persist.then_send);
        }
        for fetch in self.group.store_mut().take_fetches() {
            // Two followers lagging alike ask for the same entries: read once.
            if !self.group.store().holds(fetch.first_index) {
                let batches = self.read_batches(fetch.base_offset, fetch.end_offset, fetch.max_bytes).await?;
                self.group.store_mut().fetched(fetch.first_index, batches);
            }
            self.group.on_entries_fetched(fetch.context);
        }
        // What the group commits is durable here: raft-rs applies only persisted entries.
        self.partition.commit_to(self.group.high_watermark());
        Ok(send)
    }

    /// Compacts the replica's window up to what is applied, keeping `keep` entries before it
    /// for followers that lag, and saves the new anchor.
    pub async fn compact(&mut self, keep: u64) -> Result<(), ReplicaError> {
        let applied = self.group.commit_index();
        let to = applied.saturating_sub(keep);
        self.group
            .store_mut()
            .compact_to(to, applied)
            .map_err(|source| self.group_error(GroupError::Store { group: self.name.clone(), source }))?;
        let writes = self.group.store_mut().take_writes();
        self.carry_out(writes).await
    }

    async fn carry_out(&mut self, writes: Vec<LogWrite>) -> Result<(), ReplicaError> {
        let mut durable_through = None;
        for write in writes {
            match write {
                LogWrite::TruncateTo { offset, .. } => {
                    self.partition.truncate_to(offset).await.map_err(|source| self.storage(source))?;
                }
                LogWrite::Append { mut batches, end_offset, .. } => {
                    // One batch goes to the storage as it is; several are joined into one
                    // request (a copy), so the append stays all or nothing.
                    let request = match batches.len() {
                        1 => batches.pop().unwrap_or_default(),
                        _ => {
                            let mut joined = BytesMut::with_capacity(batches.iter().map(Bytes::len).sum());
                            for batch in &batches {
                                joined.extend_from_slice(batch);
                            }
                            joined.freeze()
                        }
                    };
                    self.partition.append_replicated(request).map_err(|source| self.storage(source))?;
                    durable_through = Some(end_offset - 1);
                }
                LogWrite::SaveState { state, epochs } => {
                    let anchor_end = state.anchor.end_offset;
                    self.save(Some(epochs), state).await?;
                    self.partition.keep_from(anchor_end);
                }
                LogWrite::RestartAt { state, epochs, producers } => {
                    // The flagged save is the point of no return: from there a crash finishes
                    // the restart on open. Before it, the old log and state stand (a newer
                    // epochs file is cut back to the old anchor on open).
                    let offset = state.anchor.end_offset;
                    tracing::info!(
                        replica = self.name,
                        offset,
                        index = state.anchor.index,
                        "replication: log restarted from the leader's snapshot"
                    );
                    self.partition
                        .stage_restart(offset, &producers)
                        .await
                        .map_err(|source| self.storage(source))?;
                    let flagged = ReplicaState { restart_pending: true, ..state.clone() };
                    self.save(Some(epochs), flagged).await?;
                    self.partition
                        .restart_at(offset, producers)
                        .await
                        .map_err(|source| self.storage(source))?;
                    self.save(None, state).await?;
                    // Durable (the directory was synced): what depends on it may be acknowledged.
                    durable_through = None;
                }
            }
        }
        if let Some(last_offset) = durable_through {
            self.partition.wait_durable(last_offset).await.map_err(|source| self.storage(source))?;
        }
        Ok(())
    }

    /// Saves `epochs` (when given), then `state`, each atomically and durably.
    async fn save(&self, epochs: Option<LeaderEpochs>, state: ReplicaState) -> Result<(), ReplicaError> {
        let dir = self.partition.dir().to_path_buf();
        let saved = blocking::run(move || {
            if let Some(epochs) = epochs {
                epochs.store(&dir).map_err(Files::Epochs)?;
            }
            state.store(&dir).map_err(Files::State)
        })
        .await;
        let name = self.name.clone();
        match saved {
            Ok(Ok(())) => Ok(()),
            Ok(Err(Files::State(source))) => Err(ReplicaError::StateFile { name, source }),
            Ok(Err(Files::Epochs(source))) => Err(ReplicaError::Epochs { name, source }),
            Err(detail) => Err(ReplicaError::Blocking { name, detail }),
        }
    }

    /// Whole batches `[from, end)` of the log, at most about `max_bytes` (at least one).
    async fn read_batches(&self, from: i64, end: i64, max_bytes: u64) -> Result<Vec<Bytes>, ReplicaError> {
        let mut batches = Vec::new();
        let mut bytes = 0u64;
        visit_batches(&self.name, &self.partition, from, end, |batch, _| {
            bytes += batch.len() as u64;
            batches.push(batch);
            bytes < max_bytes
        })
        .await?;
        Ok(batches)
    }

    fn storage(&self, source: StorageError) -> ReplicaError {
        ReplicaError::Storage { name: self.name.clone(), source }
    }

    fn group_error(&self, source: GroupError) -> ReplicaError {
        ReplicaError::Group { name: self.name.clone(), source }
    }
}

/// `PartitionReplica::propose` without the partition (no IO), so the simulator runs the same
/// decision: `log_end` is the partition's log end and `check` its producer check
/// (`Partition::check_proposal`), given the batch and what this leader proposed past `log_end`.
pub fn propose_checked(
    group: &mut RaftGroup<ReplicaLog>,
    batch: BytesMut,
    log_end: i64,
    check: impl FnOnce(
        &record::BatchHeader,
        &mut dyn Iterator<Item = record::BatchHeader>,
    ) -> Result<RequestVerdict, StorageError>,
) -> Result<Proposed, ProposalRefused> {
    let header = record::BatchHeader::parse(&batch).map_err(|e| ProposeError::BadBatch(e.to_string()))?;
    if header.producer_id >= 0 {
        group.may_propose()?;
        let verdict = {
            let mut pending = group
                .unstable_batches()
                .filter_map(|data| record::BatchHeader::parse(data).ok())
                .filter(|h| h.base_offset >= log_end);
            check(&header, &mut pending).map_err(ProposalRefused::Producer)?
        };
        if let RequestVerdict::Duplicate { base_offset, last_offset } = verdict {
            let term = group.term();
            return Ok(Proposed { index: 0, term, base_offset, last_offset, retry: true });
        }
    }
    Ok(group.propose(batch)?)
}

/// The two files a replica keeps beside its segments, for errors from the blocking pool.
enum Files {
    State(StateFileError),
    Epochs(EpochsError),
}

/// Every batch from `from` to the log's durable end, as the open scan of `ReplicaLog` needs it.
async fn scan(name: &str, partition: &Partition, from: i64) -> Result<Vec<ScannedBatch>, ReplicaError> {
    let mut tail = Vec::new();
    visit_batches(name, partition, from, partition.durable_end_offset(), |_, header| {
        tail.push(ScannedBatch {
            base_offset: header.base_offset,
            last_offset: header.last_offset(),
            epoch: u64::try_from(header.partition_leader_epoch).unwrap_or(0),
        });
        true
    })
    .await?;
    Ok(tail)
}

/// Hands `visit` each whole, validated batch of `[from, end)` of a replica's own log, in order,
/// until it answers false or the range is read.
async fn visit_batches(
    name: &str,
    partition: &Partition,
    from: i64,
    end: i64,
    mut visit: impl FnMut(Bytes, record::BatchHeader) -> bool,
) -> Result<(), ReplicaError> {
    let storage = |source| ReplicaError::Storage { name: name.to_string(), source };
    let mut offset = from;
    while offset < end {
        let read = partition.read_replica(offset, end, READ_STEP_BYTES).await.map_err(storage)?;
        let before = offset;
        for chunk in read.chunks {
            for batch in split_batches(name, &chunk, offset)? {
                let Ok(header) = record::BatchHeader::parse(&batch) else { return Ok(()) };
                offset = header.last_offset() + 1;
                if !visit(batch, header) {
                    return Ok(());
                }
            }
        }
        if offset == before {
            break;
        }
    }
    Ok(())
}

/// The whole batches of one read chunk, each validated (a replica hands them to peers).
fn split_batches(name: &str, chunk: &Bytes, at: i64) -> Result<Vec<Bytes>, ReplicaError> {
    let mut out = Vec::new();
    let mut position = 0usize;
    while position < chunk.len() {
        let header = record::validate(&chunk[position..]).map_err(|source| ReplicaError::DamagedBatch {
            name: name.to_string(),
            offset: at,
            source,
        })?;
        let len = header.total_len();
        out.push(chunk.slice(position..position + len));
        position += len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    //! Three replicas of one partition, each on its own directory and shard storage, in one
    //! executor: real O_DIRECT segment files, real fdatasync, messages handed over in memory.

    use std::collections::HashSet;
    use std::path::Path;

    use glommio::{LocalExecutorBuilder, Placement};

    use super::*;
    use crate::record::builder::BatchBuilder;
    use crate::record::BatchHeader;
    use crate::replication::group::Role;
    use crate::storage::{LogConfig, ShardStorage};

    fn run<F: std::future::Future<Output = ()> + 'static>(f: impl FnOnce() -> F + Send + 'static) {
        LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(1 << 20)
            .spawn(move || async move { f().await })
            .unwrap()
            .join()
            .unwrap();
    }

    fn config() -> LogConfig {
        LogConfig {
            segment_bytes: 8192,
            segment_ms: 3_600_000,
            // Size retention keeps almost nothing: only the saved anchor holds segments back.
            retention_bytes: Some(1),
            retention_ms: None,
            durability: Durability::Fsync,
            index_interval_bytes: 256,
            batch_bytes_max: 1 << 20,
            records_per_batch_max: 1000,
            visibility: Visibility::Committed,
        }
    }

    const VOTERS: [u64; 3] = [1, 2, 3];

    struct Cluster {
        root: std::path::PathBuf,
        replicas: Vec<Option<PartitionReplica>>,
        cut: HashSet<u64>,
        cache: CacheLimits,
    }

    async fn open_replica(root: &Path, id: u64, cache: CacheLimits) -> PartitionReplica {
        let node = root.join(format!("node{id}"));
        let shard = ShardStorage::new(node.clone(), 1 << 20, 0);
        let (partition, _) = Partition::open(node.join("t/0"), config(), shard).await.unwrap();
        let name = format!("t-0@{id}");
        PartitionReplica::open(name, id, VOTERS.to_vec(), partition, GroupSettings::default(), cache, id)
            .await
            .unwrap()
    }

    impl Cluster {
        async fn new(root: &Path) -> Cluster {
            Cluster::with_cache(root, CacheLimits::default()).await
        }

        async fn with_cache(root: &Path, cache: CacheLimits) -> Cluster {
            let mut replicas = Vec::new();
            for id in VOTERS {
                replicas.push(Some(open_replica(root, id, cache).await));
            }
            Cluster { root: root.to_path_buf(), replicas, cut: HashSet::new(), cache }
        }

        fn replica(&mut self, id: u64) -> &mut PartitionReplica {
            self.replicas[(id - 1) as usize].as_mut().unwrap()
        }

        async fn settle(&mut self) {
            for _ in 0..200 {
                let mut mail = Vec::new();
                for replica in self.replicas.iter_mut().flatten() {
                    let mut early = Vec::new();
                    let after = replica.drive(|messages| early.extend(messages)).await.unwrap();
                    mail.extend(early);
                    mail.extend(after);
                }
                mail.retain(|m| !self.cut.contains(&m.from) && !self.cut.contains(&m.to));
                if mail.is_empty() {
                    return;
                }
                for m in mail {
                    if let Some(replica) = self.replicas[(m.to - 1) as usize].as_mut() {
                        replica.group().step(m).unwrap();
                    }
                }
            }
            panic!("the replicas did not settle");
        }

        /// Ticks replica `id` `times` times, settling after each.
        async fn tick(&mut self, id: u64, times: usize) {
            for _ in 0..times {
                self.replica(id).group().tick();
                self.settle().await;
            }
        }

        async fn elect(&mut self, id: u64) {
            self.replica(id).group().campaign().unwrap();
            self.settle().await;
            assert_eq!(self.replica(id).group().role(), Role::Leader);
            assert!(self.replica(id).group().is_serving());
        }

        /// Stops replica `id` as a crash would (no clean close) and opens it again.
        async fn crash_and_restart(&mut self, id: u64) {
            self.replicas[(id - 1) as usize] = None;
            self.replicas[(id - 1) as usize] = Some(open_replica(&self.root, id, self.cache).await);
        }

        /// The committed log of replica `id`, read as consumers read it.
        async fn committed(&mut self, id: u64) -> Vec<Bytes> {
            let partition = self.replica(id).partition().clone();
            let mut out = Vec::new();
            let mut offset = partition.log_start_offset();
            while offset < partition.high_watermark() {
                let read = partition.read(offset, 1 << 20).await.unwrap();
                for chunk in read.chunks {
                    for batch in split_batches("test", &chunk, offset).unwrap() {
                        offset = BatchHeader::parse(&batch).unwrap().last_offset() + 1;
                        out.push(batch);
                    }
                }
            }
            out
        }
    }

    fn batch(records: usize, tag: &str) -> BytesMut {
        let mut builder = BatchBuilder::new();
        for i in 0..records {
            let value = format!("{tag}-{i}-{}", "x".repeat(200));
            builder.push(1_700_000_000_000, Some(b"k"), Some(value.as_bytes()), &[]);
        }
        builder.finish()
    }

    /// `batch(records, tag)` from producer `producer_id` at `epoch`, starting at `sequence`.
    fn idempotent(tag: &str, producer_id: i64, epoch: i16, sequence: i32, records: usize) -> BytesMut {
        let mut b = batch(records, tag);
        b[43..51].copy_from_slice(&producer_id.to_be_bytes());
        b[51..53].copy_from_slice(&epoch.to_be_bytes());
        b[53..57].copy_from_slice(&sequence.to_be_bytes());
        let crc = crc32c::crc32c(&b[21..]);
        b[17..21].copy_from_slice(&crc.to_be_bytes());
        b
    }

    #[test]
    fn an_idempotent_retry_is_written_once_whichever_leader_takes_it() {
        run(|| async {
            let tmp = tempfile::tempdir().unwrap();
            let mut cluster = Cluster::new(tmp.path()).await;
            cluster.elect(1).await;
            let first = cluster.replica(1).propose(idempotent("p0", 7, 0, 0, 3)).unwrap();
            assert!(!first.retry);
            // Retried while the first is only in raft-rs's log, then once the partition has it.
            let offsets = |p: Proposed| (p.base_offset, p.last_offset);
            let pending = cluster.replica(1).propose(idempotent("p0", 7, 0, 0, 3)).unwrap();
            assert!(pending.retry);
            assert_eq!(offsets(pending), offsets(first));
            cluster.settle().await;
            let appended = cluster.replica(1).propose(idempotent("p0", 7, 0, 0, 3)).unwrap();
            assert!(appended.retry);
            assert_eq!(offsets(appended), offsets(first));

            let second = cluster.replica(1).propose(idempotent("p1", 7, 0, 3, 2)).unwrap();
            assert_eq!(second.base_offset, first.last_offset + 1);
            match cluster.replica(1).propose(idempotent("gap", 7, 0, 9, 1)) {
                Err(ProposalRefused::Producer(StorageError::OutOfOrderSequence { .. })) => {}
                other => panic!("a sequence gap was not refused: {other:?}"),
            }
            cluster.replica(1).propose(idempotent("q0", 8, 1, 0, 1)).unwrap();
            match cluster.replica(1).propose(idempotent("q-old", 8, 0, 1, 1)) {
                Err(ProposalRefused::Producer(StorageError::ProducerFenced { current_epoch: 1, .. })) => {}
                other => panic!("an older producer epoch was not fenced: {other:?}"),
            }
            // A follower neither proposes nor answers retries.
            assert!(matches!(
                cluster.replica(2).propose(idempotent("p0", 7, 0, 0, 3)),
                Err(ProposalRefused::Group(ProposeError::NotLeader { leader: Some(1) }))
            ));
            cluster.settle().await;

            // The leader dies; the new one knows the producers from the replicated log.
            cluster.replicas[0] = None;
            cluster.tick(3, 2 * GroupSettings::default().election_ticks).await;
            cluster.elect(2).await;
            let again = cluster.replica(2).propose(idempotent("p1", 7, 0, 3, 2)).unwrap();
            assert!(again.retry);
            assert_eq!(offsets(again), offsets(second));
            cluster.replica(2).propose(idempotent("p2", 7, 0, 5, 1)).unwrap();
            cluster.settle().await;
            let log = cluster.committed(2).await;
            for tag in [&b"p0-0-"[..], b"p1-0-", b"p2-0-", b"q0-0-"] {
                let copies = log.iter().filter(|b| b.windows(tag.len()).any(|w| w == tag)).count();
                assert_eq!(copies, 1, "{}", String::from_utf8_lossy(tag));
            }
            assert!(!log.iter().any(|b| b.windows(4).any(|w| w == b"gap-" || w == b"q-ol")));
        });
    }

    #[test]
    fn replicas_on_real_files_hold_the_same_committed_log_through_restarts() {
        run(|| async {
            let tmp = tempfile::tempdir().unwrap();
            let mut cluster = Cluster::new(tmp.path()).await;
            cluster.elect(1).await;
            for i in 0..30 {
                cluster.replica(1).group().propose(batch(1 + i % 4, &format!("a{i}"))).unwrap();
                if i % 7 == 0 {
                    cluster.settle().await;
                }
            }
            cluster.settle().await;
            let leader_log = cluster.committed(1).await;
            assert_eq!(leader_log.len(), 31, "the leader's empty entry and 30 batches");
            assert!(BatchHeader::parse(&leader_log[0]).unwrap().is_control());
            for id in [2, 3] {
                assert_eq!(cluster.committed(id).await, leader_log, "replica {id}");
            }
            // Segments of 8 KiB: the log rolled, and every replica keeps its files.
            let segments = std::fs::read_dir(tmp.path().join("node3/t/0"))
                .unwrap()
                .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "log"))
                .count();
            assert!(segments > 1, "{segments} segments");
            assert!(tmp.path().join("node3/t/0/raft.state").exists());
            assert!(tmp.path().join("node3/t/0/leader-epochs").exists());

            // A follower compacts, crashes and restarts: it reopens at its anchor, rebuilds the
            // rest by scanning, shows what it had committed at once, and keeps up.
            cluster.replica(3).compact(5).await.unwrap();
            let anchor = cluster.replica(3).group().store().anchor();
            assert!(anchor.index > 20, "anchor {anchor:?}");
            cluster.crash_and_restart(3).await;
            assert_eq!(cluster.replica(3).group().store().anchor(), anchor);
            assert_eq!(cluster.replica(3).partition().high_watermark(), anchor.end_offset);
            for i in 0..5 {
                cluster.replica(1).group().propose(batch(2, &format!("b{i}"))).unwrap();
            }
            cluster.settle().await;
            let leader_log = cluster.committed(1).await;
            assert_eq!(cluster.committed(3).await, leader_log);

            // The leader crashes; a new one is elected among the others and takes writes; the
            // old leader returns as a follower with the same log.
            cluster.replicas[0] = None;
            cluster.tick(3, 2 * GroupSettings::default().election_ticks).await;
            cluster.elect(2).await;
            cluster.replica(2).group().propose(batch(3, "c")).unwrap();
            cluster.settle().await;
            cluster.replicas[0] = Some(open_replica(tmp.path(), 1, CacheLimits::default()).await);
            cluster.tick(2, 5).await;
            let new_log = cluster.committed(2).await;
            assert_eq!(new_log.len(), leader_log.len() + 2, "a second control batch and the new batch");
            for id in [1, 3] {
                assert_eq!(cluster.committed(id).await, new_log, "replica {id}");
            }
        });
    }

    #[test]
    fn retention_deletes_only_below_the_saved_anchor() {
        run(|| async {
            let tmp = tempfile::tempdir().unwrap();
            let mut cluster = Cluster::new(tmp.path()).await;
            cluster.elect(1).await;
            for i in 0..40 {
                cluster.replica(1).group().propose(batch(2, &format!("r{i}"))).unwrap();
                cluster.settle().await;
            }
            let partition = cluster.replica(3).partition().clone();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            partition.housekeep(now).await.unwrap();
            assert_eq!(partition.log_start_offset(), 0, "no anchor saved past the start yet");

            cluster.replica(3).compact(10).await.unwrap();
            let anchor = cluster.replica(3).group().store().anchor();
            partition.housekeep(now).await.unwrap();
            let start = partition.log_start_offset();
            assert!(start > 0 && start <= anchor.end_offset, "log start {start}, anchor {anchor:?}");
            // The open scan still finds every entry after the anchor.
            cluster.crash_and_restart(3).await;
            cluster.replica(1).group().propose(batch(1, "after")).unwrap();
            cluster.settle().await;
            let leader = cluster.committed(1).await;
            let follower = cluster.committed(3).await;
            assert_eq!(leader[leader.len() - follower.len()..], follower[..]);
        });
    }

    fn now_ms() -> i64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
    }

    /// Cuts node 3 off, writes 40 batches, and lets the leader (node 1) forget all but 2 entries
    /// and retention delete the segments below its anchor: node 3's log ends before the leader's
    /// log start. Returns node 3's log end before the cut.
    async fn leave_node_3_behind(cluster: &mut Cluster) -> i64 {
        cluster.elect(1).await;
        for i in 0..5 {
            cluster.replica(1).group().propose(batch(2, &format!("kept{i}"))).unwrap();
            cluster.settle().await;
        }
        cluster.cut.insert(3);
        let behind = cluster.replica(3).partition().log_end_offset();
        for i in 0..40 {
            cluster.replica(1).group().propose(batch(2, &format!("gone{i}"))).unwrap();
            cluster.settle().await;
        }
        cluster.replica(1).compact(2).await.unwrap();
        let leader = cluster.replica(1).partition().clone();
        leader.housekeep(now_ms()).await.unwrap();
        assert!(leader.log_start_offset() > behind, "retention deleted what node 3 lacks");
        behind
    }

    /// The committed batches of `id` equal the leader's (node 1) from `id`'s log start on.
    async fn assert_same_from_start(cluster: &mut Cluster, id: u64) {
        let start = cluster.replica(id).partition().log_start_offset();
        let leader: Vec<Bytes> = cluster
            .committed(1)
            .await
            .into_iter()
            .filter(|b| BatchHeader::parse(b).unwrap().base_offset >= start)
            .collect();
        assert!(!leader.is_empty());
        assert_eq!(cluster.committed(id).await, leader, "replica {id} from offset {start}");
        assert_eq!(
            cluster.replica(id).partition().high_watermark(),
            cluster.replica(1).partition().high_watermark()
        );
    }

    #[test]
    fn a_follower_behind_the_leaders_log_start_restarts_its_log_from_a_snapshot() {
        run(|| async {
            let tmp = tempfile::tempdir().unwrap();
            let mut cluster = Cluster::new(tmp.path()).await;
            let behind = leave_node_3_behind(&mut cluster).await;
            let anchor = cluster.replica(1).group().store().anchor();
            cluster.cut.clear();
            // Heartbeats find node 3 behind the leader's first entry: a snapshot, then appends.
            cluster.tick(1, 10).await;
            let follower = cluster.replica(3).partition().clone();
            assert!(behind < anchor.end_offset);
            assert_eq!(follower.log_start_offset(), anchor.end_offset, "the log restarted at the anchor");
            assert_eq!(cluster.replica(3).group().store().anchor(), anchor);
            assert_eq!(cluster.replica(3).group().store().epochs().term_at(anchor.index), Some(anchor.term));
            assert_same_from_start(&mut cluster, 3).await;
            // Nothing of the old log is left on disk below the new start.
            let dir = tmp.path().join("node3/t/0");
            let bases: Vec<i64> = std::fs::read_dir(&dir)
                .unwrap()
                .filter_map(|e| e.unwrap().file_name().to_str()?.strip_suffix(".log")?.parse().ok())
                .collect();
            assert!(bases.iter().all(|&b| b >= anchor.end_offset), "segments {bases:?}");

            // It keeps up, and reopens at its new start after a crash.
            cluster.replica(1).group().propose(batch(3, "after")).unwrap();
            cluster.settle().await;
            assert_same_from_start(&mut cluster, 3).await;
            cluster.crash_and_restart(3).await;
            assert_eq!(cluster.replica(3).partition().log_start_offset(), anchor.end_offset);
            cluster.replica(1).group().propose(batch(1, "after-restart")).unwrap();
            cluster.settle().await;
            assert_same_from_start(&mut cluster, 3).await;
        });
    }

    /// Producer 7's last batch, as (sequence, records, base offset, last offset).
    type LastBatch = (i32, usize, i64, i64);

    /// Producer 7's batches reach nodes 1 and 2 only, then fall below the leader's log start:
    /// node 3 (cut off until the caller heals it) can learn of them from a snapshot alone.
    async fn leave_producer_7_below_the_leaders_log_start(cluster: &mut Cluster) -> LastBatch {
        cluster.elect(1).await;
        cluster.replica(1).group().propose(batch(2, "kept")).unwrap();
        cluster.settle().await;
        cluster.cut.insert(3);
        let mut sent = Vec::new();
        for (i, sequence) in [0, 3, 5].into_iter().enumerate() {
            let proposed =
                cluster.replica(1).propose(idempotent(&format!("p{i}"), 7, 2, sequence, 3 - i)).unwrap();
            cluster.settle().await;
            sent.push((sequence, 3 - i, proposed.base_offset, proposed.last_offset));
        }
        for i in 0..40 {
            cluster.replica(1).group().propose(batch(2, &format!("gone{i}"))).unwrap();
            cluster.settle().await;
        }
        cluster.replica(1).compact(2).await.unwrap();
        let leader = cluster.replica(1).partition().clone();
        // Retention by size, at the batches' own time: the producer has not expired.
        leader.housekeep(1_700_000_000_000 + 1_000).await.unwrap();
        let last = sent[2];
        assert!(leader.log_start_offset() > last.3, "the producer's batches are below the log start");
        last
    }

    /// Asserts node 3 answers a retry of producer 7's last batch as a duplicate.
    fn assert_retry_is_a_duplicate(cluster: &mut Cluster, (sequence, records, base, last): LastBatch) {
        let retry = idempotent("p2", 7, 2, sequence, records);
        let header = BatchHeader::parse(&retry).unwrap();
        let verdict = cluster.replica(3).partition().check_proposal(&header, std::iter::empty()).unwrap();
        assert_eq!(verdict, RequestVerdict::Duplicate { base_offset: base, last_offset: last });
    }

    #[test]
    fn a_follower_restarted_from_a_snapshot_knows_the_producers_below_its_log_start() {
        run(|| async {
            let tmp = tempfile::tempdir().unwrap();
            let mut cluster = Cluster::new(tmp.path()).await;
            let last = leave_producer_7_below_the_leaders_log_start(&mut cluster).await;
            let (last_sequence, last_records, last_base, last_end) = last;
            cluster.cut.clear();
            cluster.tick(1, 10).await;
            let anchor = cluster.replica(1).group().store().anchor();
            assert_eq!(cluster.replica(3).partition().log_start_offset(), anchor.end_offset);
            assert!(!tmp.path().join("node3/t/0/restart.producers").exists(), "the staged copy is removed");

            // A retry of the producer's last batch is a duplicate on node 3, before and after a
            // restart (the state is in a producer-state snapshot at the new start).
            assert_retry_is_a_duplicate(&mut cluster, last);
            cluster.crash_and_restart(3).await;
            assert_retry_is_a_duplicate(&mut cluster, last);

            // Node 3 leads: it answers the retry with the original's offsets, takes the next
            // sequence and refuses a gap, as node 1 would have.
            cluster.replicas[0] = None;
            // Node 2's lease on node 1 runs out (an election timeout) before its own, randomized
            // one would make it campaign.
            cluster.tick(2, GroupSettings::default().election_ticks).await;
            cluster.elect(3).await;
            let again =
                cluster.replica(3).propose(idempotent("p2", 7, 2, last_sequence, last_records)).unwrap();
            assert!(again.retry, "the retry was not recognised");
            assert_eq!((again.base_offset, again.last_offset), (last_base, last_end));
            match cluster.replica(3).propose(idempotent("gap", 7, 2, last_sequence + 5, 1)) {
                Err(ProposalRefused::Producer(StorageError::OutOfOrderSequence { .. })) => {}
                other => panic!("a sequence gap was not refused: {other:?}"),
            }
            let next = cluster.replica(3).propose(idempotent("p3", 7, 2, last_sequence + 1, 1)).unwrap();
            assert!(!next.retry);
            cluster.settle().await;
        });
    }

    #[test]
    fn a_crash_after_the_flagged_state_save_finishes_the_restart_on_open() {
        run(|| async {
            let tmp = tempfile::tempdir().unwrap();
            let mut cluster = Cluster::new(tmp.path()).await;
            let behind = leave_node_3_behind(&mut cluster).await;
            let anchor = cluster.replica(1).group().store().anchor();
            // Node 3 crashes right after the restart's flagged save, before its log was touched:
            // the leader's epochs and anchor are saved, the old log is still there.
            let saved = cluster.replica(3).group().store().anchor();
            cluster.replicas[2] = None;
            let dir = tmp.path().join("node3/t/0");
            let old = ReplicaState::load(&dir).unwrap().unwrap();
            assert_eq!(old.anchor, saved);
            let mut epochs = cluster.replica(1).group().store().epochs().clone();
            epochs.truncate_from(anchor.index + 1);
            epochs.store(&dir).unwrap();
            ReplicaState { anchor, restart_pending: true, ..old }.store(&dir).unwrap();

            cluster.replicas[2] = Some(open_replica(tmp.path(), 3, CacheLimits::default()).await);
            let follower = cluster.replica(3).partition().clone();
            assert_eq!(follower.log_start_offset(), anchor.end_offset);
            assert_eq!(follower.log_end_offset(), anchor.end_offset, "the old log is gone");
            assert!(behind < anchor.end_offset);
            assert!(!ReplicaState::load(&dir).unwrap().unwrap().restart_pending, "the flag is cleared");
            // It catches up by appends (the leader still has every entry after its anchor).
            cluster.cut.clear();
            cluster.tick(1, 10).await;
            assert_same_from_start(&mut cluster, 3).await;
        });
    }

    #[test]
    fn a_crash_part_way_through_a_restart_keeps_the_leaders_producers() {
        // Node 3 crashes after the restart's flagged save: with its old log still whole, and with
        // the old log gone and the new segment made but not yet the producers' snapshot.
        for old_log_removed in [false, true] {
            run(move || async move {
                let tmp = tempfile::tempdir().unwrap();
                let mut cluster = Cluster::new(tmp.path()).await;
                let last = leave_producer_7_below_the_leaders_log_start(&mut cluster).await;
                let anchor = cluster.replica(1).group().store().anchor();
                let producers = cluster.replica(1).partition().producers_as_of(anchor.end_offset);
                // What node 3 does before the flag, on its own partition.
                cluster.replica(3).partition().stage_restart(anchor.end_offset, &producers).await.unwrap();
                cluster.replicas[2] = None;
                let dir = tmp.path().join("node3/t/0");
                let old = ReplicaState::load(&dir).unwrap().unwrap();
                let mut epochs = cluster.replica(1).group().store().epochs().clone();
                epochs.truncate_from(anchor.index + 1);
                epochs.store(&dir).unwrap();
                ReplicaState { anchor, restart_pending: true, ..old }.store(&dir).unwrap();
                if old_log_removed {
                    for entry in std::fs::read_dir(&dir).unwrap() {
                        let path = entry.unwrap().path();
                        let extension = path.extension().and_then(|e| e.to_str()).unwrap_or_default();
                        if ["log", "index", "timeindex", "snapshot"].contains(&extension) {
                            std::fs::remove_file(path).unwrap();
                        }
                    }
                    std::fs::File::create(dir.join(format!("{:020}.log", anchor.end_offset))).unwrap();
                }

                cluster.replicas[2] = Some(open_replica(tmp.path(), 3, CacheLimits::default()).await);
                assert_eq!(cluster.replica(3).partition().log_start_offset(), anchor.end_offset);
                assert!(!ReplicaState::load(&dir).unwrap().unwrap().restart_pending, "the flag is cleared");
                assert!(!dir.join("restart.producers").exists(), "the staged copy is removed");
                assert_retry_is_a_duplicate(&mut cluster, last);
                cluster.crash_and_restart(3).await;
                assert_retry_is_a_duplicate(&mut cluster, last);
            });
        }
    }

    #[test]
    fn a_lagging_follower_catches_up_from_the_leaders_files() {
        run(|| async {
            let tmp = tempfile::tempdir().unwrap();
            // Entry caches of one entry: what the follower lacks is read back from the log.
            let cache = CacheLimits { recent_bytes: 1, fetched_bytes: 1 << 20 };
            let mut cluster = Cluster::with_cache(tmp.path(), cache).await;
            cluster.elect(1).await;
            cluster.cut.insert(3);
            for i in 0..25 {
                cluster.replica(1).group().propose(batch(2, &format!("lag{i}"))).unwrap();
                cluster.settle().await;
            }
            assert!(cluster.replica(3).partition().log_end_offset() < 10, "node 3 was cut off");
            cluster.cut.clear();
            cluster.tick(1, 10).await;
            let leader = cluster.committed(1).await;
            assert_eq!(leader.len(), 26);
            assert_eq!(cluster.committed(3).await, leader);
        });
    }

    #[test]
    fn an_isolated_leaders_uncommitted_batches_are_cut_from_its_files() {
        run(|| async {
            let tmp = tempfile::tempdir().unwrap();
            let mut cluster = Cluster::new(tmp.path()).await;
            cluster.elect(1).await;
            cluster.replica(1).group().propose(batch(2, "kept")).unwrap();
            cluster.settle().await;
            let committed_end = cluster.replica(1).partition().high_watermark();
            cluster.cut.insert(1);
            for i in 0..3 {
                cluster.replica(1).group().propose(batch(2, &format!("lost{i}"))).unwrap();
            }
            cluster.settle().await;
            let partition = cluster.replica(1).partition().clone();
            assert!(partition.durable_end_offset() > committed_end, "written and synced, not committed");
            assert_eq!(partition.high_watermark(), committed_end);
            cluster.tick(3, 2 * GroupSettings::default().election_ticks).await;
            cluster.elect(2).await;
            cluster.replica(2).group().propose(batch(1, "new")).unwrap();
            cluster.settle().await;
            cluster.cut.clear();
            cluster.tick(2, 5).await;
            assert_eq!(cluster.replica(1).group().role(), Role::Follower);
            let log = cluster.committed(1).await;
            assert_eq!(log, cluster.committed(2).await);
            assert!(!log.iter().any(|b| b.windows(4).any(|w| w == b"lost")), "uncommitted batches served");
            assert_eq!(partition.log_end_offset(), cluster.replica(2).partition().log_end_offset());
        });
    }
}
