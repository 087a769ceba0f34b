//! The simulated disk of one replica: its partition log's batches and its two small files
//! (`raft.state`, `leader-epochs`), as `shard::replica` keeps them on a real one. The replica's
//! `ReplicaLog` hands over its writes (`LogWrite`) and they land here at once but become durable
//! only when a sync issued after them completes; a crash keeps the durable prefix and tears off
//! part of the rest. Opening after a crash does what the shard does: the saved state, then a scan
//! of the batches after its anchor.
//!
//! Faults (issue 13): a write may fail with an IO error after part of it reached the disk, a full
//! disk refuses appends and saves before a byte is written (the partition reserves space before
//! it accepts an append: `StorageFull`), and a sync may fail. A failed sync leaves what it should
//! have covered lost for good (the kernel may drop the pages: "fsyncgate"): a later sync that
//! succeeds does not make it durable, and a crash cuts the log there. What the replica does about
//! each is the caller's (`world::storage_faults`), as it is `shard::replica`'s in the broker.

use bytes::Bytes;
use raft::eraftpb::Entry;
use ringlog::record::BatchHeader;
use ringlog::replication::epochs::LeaderEpochs;
use ringlog::replication::replica_log::{
    CacheLimits, LogWrite, OpenError, ReplicaLog, ReplicaState, ScannedBatch,
};
use ringlog::storage::ProducerLog;

/// A point in a disk's writes: a sync issued there covers everything written before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteMark(u64);

#[derive(Debug, Clone)]
struct Saved {
    state: ReplicaState,
    epochs: LeaderEpochs,
}

/// A fault drawn for one call of `SimDisk::write`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFault {
    None,
    /// The `nth` write of the call fails with an IO error after its first `landed` batches
    /// reached the disk (not durable); the writes after it are not carried out.
    Io {
        nth: usize,
        landed: usize,
    },
    /// The disk is full: appends and state saves fail with nothing written; truncations, which
    /// free space, go through.
    Full,
}

/// Why `SimDisk::write` stopped.
#[derive(Debug)]
pub enum WriteError {
    /// An injected fault, as the real storage returns it (`StorageError`, `StateFileError`).
    Failed(String),
    /// The replica's view and its disk disagree: a bug the run must report.
    Inconsistent(String),
}

#[derive(Debug)]
pub struct SimDisk {
    voters: Vec<u64>,
    /// The log's batches with the write that put each there.
    batches: Vec<(Bytes, u64)>,
    /// The longest prefix of `batches` a crash cannot take away.
    durable_batches: usize,
    /// The first batch a failed sync should have covered: from it on nothing survives a crash.
    lost_from: Option<usize>,
    writes: u64,
    /// Saves not yet covered by a completed sync, oldest first.
    unsynced_saves: Vec<(u64, Saved)>,
    durable_save: Option<Saved>,
    /// The idempotent producers of the batches in `batches`, as the partition keeps them: each
    /// appended batch recorded, rebuilt from the log after a cut.
    producers: ProducerLog,
    /// Sabotage (issue 13): truncations are ignored and batches at offsets already written are
    /// dropped, so a divergent suffix survives rejoining.
    skip_truncation: bool,
}

fn header(batch: &[u8]) -> Option<BatchHeader> {
    BatchHeader::parse(batch).ok()
}

/// Records an idempotent producer's batch found in the log.
fn replay(producers: &mut ProducerLog, batch: &[u8]) {
    if let Some(h) = header(batch) {
        producers.record(&h);
    }
}

impl SimDisk {
    pub fn new(voters: Vec<u64>, skip_truncation: bool) -> SimDisk {
        SimDisk {
            voters,
            batches: Vec::new(),
            durable_batches: 0,
            lost_from: None,
            writes: 0,
            unsynced_saves: Vec::new(),
            durable_save: None,
            producers: ProducerLog::default(),
            skip_truncation,
        }
    }

    /// Where the next batch goes: the partition's log end (written, durable or not).
    pub fn end_offset(&self) -> i64 {
        self.batches.last().and_then(|(b, _)| header(b)).map_or(0, |h| h.last_offset() + 1)
    }

    /// Carries out a replica's writes, or as much of them as `fault` lets through.
    pub fn write(&mut self, writes: Vec<LogWrite>, fault: WriteFault) -> Result<(), WriteError> {
        for (nth, write) in writes.into_iter().enumerate() {
            self.writes += 1;
            let number = self.writes;
            let failing = match fault {
                WriteFault::Io { nth: at, landed } if at == nth => Some(landed),
                _ => None,
            };
            match write {
                LogWrite::TruncateTo { offset, .. } => {
                    if failing.is_some() {
                        return Err(WriteError::Failed(format!("truncating to offset {offset}: EIO")));
                    }
                    if self.skip_truncation {
                        continue;
                    }
                    let keep = self
                        .batches
                        .partition_point(|(b, _)| header(b).is_some_and(|h| h.base_offset < offset));
                    self.batches.truncate(keep);
                    self.durable_batches = self.durable_batches.min(keep);
                    self.lost_from = self.lost_from.filter(|&lost| lost < keep);
                    self.rebuild_producers();
                }
                LogWrite::Append { batches, end_offset, .. } => {
                    if fault == WriteFault::Full {
                        return Err(WriteError::Failed(format!(
                            "appending up to offset {end_offset}: ENOSPC"
                        )));
                    }
                    let count = batches.len();
                    for batch in batches.into_iter().take(failing.unwrap_or(count)) {
                        let base = header(&batch).map_or(-1, |h| h.base_offset);
                        let end = self.end_offset();
                        if self.skip_truncation && base < end {
                            continue;
                        }
                        if base != end {
                            return Err(WriteError::Inconsistent(format!(
                                "append at offset {base}, the log ends at {end}"
                            )));
                        }
                        replay(&mut self.producers, &batch);
                        self.batches.push((batch, number));
                    }
                    if failing.is_some() {
                        return Err(WriteError::Failed(format!("writing up to offset {end_offset}: EIO")));
                    }
                }
                LogWrite::SaveState { state, epochs } => {
                    if fault == WriteFault::Full {
                        return Err(WriteError::Failed("saving raft.state: ENOSPC".into()));
                    }
                    if failing.is_some() {
                        return Err(WriteError::Failed("saving raft.state: EIO".into()));
                    }
                    self.unsynced_saves.push((number, Saved { state, epochs }));
                }
            }
        }
        Ok(())
    }

    pub fn mark(&self) -> WriteMark {
        WriteMark(self.writes)
    }

    /// A sync issued at `mark` completed.
    pub fn synced(&mut self, mark: WriteMark) {
        let lost = self.lost_from.unwrap_or(usize::MAX);
        while self.durable_batches < lost
            && self.batches.get(self.durable_batches).is_some_and(|(_, write)| *write <= mark.0)
        {
            self.durable_batches += 1;
        }
        let covered = self.unsynced_saves.partition_point(|(write, _)| *write <= mark.0);
        if let Some((_, saved)) = self.unsynced_saves.drain(..covered).next_back() {
            self.durable_save = Some(saved);
        }
    }

    /// A sync issued at `mark` failed: what it should have covered is lost (`lost_from`), and
    /// the saves it should have made durable never will be.
    pub fn sync_failed(&mut self, mark: WriteMark) {
        if self.batches.get(self.durable_batches).is_some_and(|(_, write)| *write <= mark.0) {
            self.lost_from.get_or_insert(self.durable_batches);
        }
        self.unsynced_saves.retain(|(write, _)| *write > mark.0);
    }

    /// The node crashed: of the batches not yet synced the first `torn_keep` survive (writes
    /// reach the disk in order) unless a failed sync lost them, the rest are lost; the files are
    /// as last synced.
    pub fn crash(&mut self, torn_keep: usize) {
        let keep = (self.durable_batches + torn_keep)
            .min(self.batches.len())
            .min(self.lost_from.unwrap_or(usize::MAX));
        self.batches.truncate(keep);
        self.durable_batches = keep;
        self.lost_from = None;
        self.unsynced_saves.clear();
        self.rebuild_producers();
    }

    pub fn producers(&self) -> &ProducerLog {
        &self.producers
    }

    /// After a cut, from the log, as `Partition::truncate_to` and recovery rebuild it.
    fn rebuild_producers(&mut self) {
        let mut producers = ProducerLog::default();
        for (batch, _) in &self.batches {
            replay(&mut producers, batch);
        }
        self.producers = producers;
    }

    /// Opens the replica's log as the shard does after a start: saved state, then a scan.
    pub fn open(&self, limits: CacheLimits) -> Result<ReplicaLog, OpenError> {
        let (state, epochs) = match self.durable_save.clone() {
            Some(saved) => (saved.state, saved.epochs),
            None => (ReplicaState::new(self.voters.clone(), 0), LeaderEpochs::default()),
        };
        let from = state.anchor.end_offset;
        let tail =
            self.batches.iter().filter_map(|(b, _)| header(b)).filter(|h| h.base_offset >= from).map(|h| {
                ScannedBatch {
                    base_offset: h.base_offset,
                    last_offset: h.last_offset(),
                    epoch: u64::try_from(h.partition_leader_epoch).unwrap_or(0),
                }
            });
        ReplicaLog::open(state, epochs, tail, limits)
    }

    /// The batches `[from, end)`, for a replica's read-back.
    pub fn read(&self, from: i64, end: i64) -> Vec<Bytes> {
        self.batches
            .iter()
            .filter(|(b, _)| header(b).is_some_and(|h| h.base_offset >= from && h.base_offset < end))
            .map(|(b, _)| b.clone())
            .collect()
    }

    /// The entry the disk holds at the offsets the log places entry `index` at: what a reader of
    /// the partition would get there, whatever the replica believes.
    pub fn entry_at(&self, log: &ReplicaLog, index: u64) -> Option<(Entry, i64)> {
        use ringlog::replication::store::ReplicaStore;
        let base = log.end_offset(index.checked_sub(1)?)?;
        let end = log.end_offset(index)?;
        let (batch, _) =
            self.batches.iter().find(|(b, _)| header(b).is_some_and(|h| h.base_offset == base))?;
        let h = header(batch)?;
        let entry = Entry {
            term: u64::try_from(h.partition_leader_epoch).ok()?,
            index,
            data: batch.clone(),
            ..Default::default()
        };
        debug_assert!(end > base);
        Some((entry, h.last_offset() + 1))
    }
}
