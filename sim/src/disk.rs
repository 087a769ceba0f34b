//! The simulated disk of one replica: its partition log's batches and its two small files
//! (`raft.state`, `leader-epochs`), as `shard::replica` keeps them on a real one. The replica's
//! `ReplicaLog` hands over its writes (`LogWrite`) and they land here at once but become durable
//! only when a sync issued after them completes; a crash keeps the durable prefix and tears off
//! part of the rest. Opening after a crash does what the shard does: the saved state, then a scan
//! of the batches after its anchor.

use bytes::Bytes;
use raft::eraftpb::Entry;
use ringlog::record::BatchHeader;
use ringlog::replication::epochs::LeaderEpochs;
use ringlog::replication::replica_log::{
    CacheLimits, LogWrite, OpenError, ReplicaLog, ReplicaState, ScannedBatch,
};

/// A point in a disk's writes: a sync issued there covers everything written before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteMark(u64);

#[derive(Debug, Clone)]
struct Saved {
    state: ReplicaState,
    epochs: LeaderEpochs,
}

#[derive(Debug)]
pub struct SimDisk {
    voters: Vec<u64>,
    /// The log's batches with the write that put each there.
    batches: Vec<(Bytes, u64)>,
    /// The longest prefix of `batches` a crash cannot take away.
    durable_batches: usize,
    writes: u64,
    /// Saves not yet covered by a completed sync, oldest first.
    unsynced_saves: Vec<(u64, Saved)>,
    durable_save: Option<Saved>,
    /// Sabotage (issue 13): truncations are ignored and batches at offsets already written are
    /// dropped, so a divergent suffix survives rejoining.
    skip_truncation: bool,
}

fn header(batch: &[u8]) -> Option<BatchHeader> {
    BatchHeader::parse(batch).ok()
}

impl SimDisk {
    pub fn new(voters: Vec<u64>, skip_truncation: bool) -> SimDisk {
        SimDisk {
            voters,
            batches: Vec::new(),
            durable_batches: 0,
            writes: 0,
            unsynced_saves: Vec::new(),
            durable_save: None,
            skip_truncation,
        }
    }

    fn end_offset(&self) -> i64 {
        self.batches.last().and_then(|(b, _)| header(b)).map_or(0, |h| h.last_offset() + 1)
    }

    /// Carries out a replica's writes; fails on an append that does not continue the log (the
    /// replica's view and its disk disagree: a bug the run must report).
    pub fn write(&mut self, writes: Vec<LogWrite>) -> Result<(), String> {
        for write in writes {
            self.writes += 1;
            let number = self.writes;
            match write {
                LogWrite::TruncateTo { offset, .. } => {
                    if self.skip_truncation {
                        continue;
                    }
                    let keep = self
                        .batches
                        .partition_point(|(b, _)| header(b).is_some_and(|h| h.base_offset < offset));
                    self.batches.truncate(keep);
                    self.durable_batches = self.durable_batches.min(keep);
                }
                LogWrite::Append { batches, .. } => {
                    for batch in batches {
                        let base = header(&batch).map_or(-1, |h| h.base_offset);
                        let end = self.end_offset();
                        if self.skip_truncation && base < end {
                            continue;
                        }
                        if base != end {
                            return Err(format!("append at offset {base}, the log ends at {end}"));
                        }
                        self.batches.push((batch, number));
                    }
                }
                LogWrite::SaveState { state, epochs } => {
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
        while self.batches.get(self.durable_batches).is_some_and(|(_, write)| *write <= mark.0) {
            self.durable_batches += 1;
        }
        let covered = self.unsynced_saves.partition_point(|(write, _)| *write <= mark.0);
        if let Some((_, saved)) = self.unsynced_saves.drain(..covered).next_back() {
            self.durable_save = Some(saved);
        }
    }

    /// The node crashed: of the batches not yet synced the first `torn_keep` survive (writes
    /// reach the disk in order), the rest are lost; the files are as last synced.
    pub fn crash(&mut self, torn_keep: usize) {
        let keep = (self.durable_batches + torn_keep).min(self.batches.len());
        self.batches.truncate(keep);
        self.durable_batches = keep;
        self.unsynced_saves.clear();
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
