//! An in-memory replica log that models a disk: what was written but not yet synced can be lost
//! or torn by a crash. The simulator runs consensus on it (one `MemDisk` per node and group
//! survives the node's crashes; the group holds a `MemLog` handle to it). No compaction yet:
//! the log starts at index 1, offset 0.

use std::cell::RefCell;
use std::rc::Rc;

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError as RaftStorageError};

use super::epochs::{EpochStart, LeaderEpochs};
use super::store::{entries_between, entry_offsets, initial_state_for, term_in, ReplicaStore, StoreError};

/// Per entry in the log: the Kafka offset after it, and the write that put it there.
#[derive(Debug, Clone, Copy)]
struct Written {
    end_offset: i64,
    write: u64,
}

/// The simulated disk of one replica.
#[derive(Debug, Default)]
struct MemDisk {
    conf_state: ConfState,
    hard_state: HardState,
    entries: Vec<Entry>,
    written: Vec<Written>,
    epochs: LeaderEpochs,
    /// Numbers every write; a sync covers the writes numbered up to its mark.
    writes: u64,
    /// The longest prefix of `entries` a crash cannot take away.
    durable_entries: usize,
    /// Sabotage (issue 13): keep a conflicting suffix instead of cutting it, as a replica that
    /// skipped truncation on rejoin would.
    skip_truncation: bool,
    /// Hard states written and not yet covered by a completed sync, oldest first.
    unsynced_hard_states: Vec<(u64, HardState)>,
    durable_hard_state: HardState,
}

/// Handle to a replica's simulated disk: the group's view of its log, and the simulator's.
#[derive(Debug, Clone)]
pub struct MemLog(Rc<RefCell<MemDisk>>);

/// A point in a disk's writes: a sync issued there covers everything written before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteMark(u64);

impl MemLog {
    /// A fresh replica of a group whose members are `voters`.
    pub fn new(voters: Vec<u64>) -> MemLog {
        let disk = MemDisk { conf_state: ConfState { voters, ..Default::default() }, ..Default::default() };
        MemLog(Rc::new(RefCell::new(disk)))
    }

    /// Sabotage for the simulator's tests: entries a new leader sends for indexes this log already
    /// holds are ignored, so a divergent suffix survives rejoining.
    pub fn skip_truncation(&self) {
        self.0.borrow_mut().skip_truncation = true;
    }

    /// What a sync issued now would make durable.
    pub fn mark(&self) -> WriteMark {
        WriteMark(self.0.borrow().writes)
    }

    /// A sync issued at `mark` completed.
    pub fn synced(&self, mark: WriteMark) {
        let mut disk = self.0.borrow_mut();
        let disk = &mut *disk;
        while disk.written.get(disk.durable_entries).is_some_and(|w| w.write <= mark.0) {
            disk.durable_entries += 1;
        }
        let covered = disk.unsynced_hard_states.partition_point(|(write, _)| *write <= mark.0);
        if let Some((_, hard_state)) = disk.unsynced_hard_states.drain(..covered).last() {
            disk.durable_hard_state = hard_state;
        }
    }

    /// The node crashed: of the entries not yet synced the first `torn_keep` survive (writes
    /// reach the disk in order), the rest are lost; the hard state is the last synced one.
    pub fn crash(&self, torn_keep: usize) {
        let mut disk = self.0.borrow_mut();
        let keep = (disk.durable_entries + torn_keep).min(disk.entries.len());
        disk.entries.truncate(keep);
        disk.written.truncate(keep);
        disk.durable_entries = keep;
        disk.hard_state = disk.durable_hard_state.clone();
        disk.unsynced_hard_states.clear();
        disk.epochs.truncate_from(keep as u64 + 1);
    }

    /// Every entry with the Kafka offset after it.
    pub fn entries_with_ends(&self) -> Vec<(Entry, i64)> {
        let disk = self.0.borrow();
        disk.entries.iter().cloned().zip(disk.written.iter().map(|w| w.end_offset)).collect()
    }

    /// The entry at `index` and the Kafka offset after it.
    pub fn entry(&self, index: u64) -> Option<(Entry, i64)> {
        let disk = self.0.borrow();
        let at = usize::try_from(index.checked_sub(1)?).ok()?;
        Some((disk.entries.get(at)?.clone(), disk.written.get(at)?.end_offset))
    }

    pub fn last_index(&self) -> u64 {
        self.0.borrow().entries.len() as u64
    }

    pub fn hard_state(&self) -> HardState {
        self.0.borrow().hard_state.clone()
    }

    pub fn epochs(&self) -> LeaderEpochs {
        self.0.borrow().epochs.clone()
    }
}

impl raft::Storage for MemLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let disk = self.0.borrow();
        Ok(initial_state_for(&disk.hard_state, &disk.conf_state, disk.entries.len() as u64))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        entries_between(&self.0.borrow().entries, low, high, max_size.into())
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        term_in(&self.0.borrow().entries, idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.0.borrow().entries.len() as u64)
    }

    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        // Never compacted, so raft-rs never asks for one.
        Err(raft::Error::Store(RaftStorageError::SnapshotTemporarilyUnavailable))
    }
}

impl ReplicaStore for MemLog {
    fn append(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        let Some(first) = entries.first() else { return Ok(()) };
        let mut disk = self.0.borrow_mut();
        let last = disk.entries.len() as u64;
        if first.index == 0 || first.index > last + 1 {
            return Err(StoreError::IndexGap { index: first.index, last });
        }
        let skip = if disk.skip_truncation { (last + 1 - first.index) as usize } else { 0 };
        let keep = (first.index - 1) as usize + skip.min(entries.len());
        disk.entries.truncate(keep);
        disk.written.truncate(keep);
        disk.durable_entries = disk.durable_entries.min(keep);
        disk.epochs.truncate_from(keep as u64 + 1);
        disk.writes += 1;
        let write = disk.writes;
        for entry in entries.iter().skip(skip) {
            let expected = disk.written.last().map_or(0, |w| w.end_offset);
            let (base, count) = entry_offsets(entry, expected)?;
            if base != expected {
                return Err(StoreError::OffsetGap { index: entry.index, base, expected });
            }
            if disk.epochs.latest().is_none_or(|e| e.epoch < entry.term) {
                disk.epochs.assign(EpochStart {
                    epoch: entry.term,
                    start_offset: base,
                    start_index: entry.index,
                });
            }
            disk.entries.push(entry.clone());
            disk.written.push(Written { end_offset: base + count, write });
        }
        Ok(())
    }

    fn set_hard_state(&mut self, hard_state: &HardState) -> Result<(), StoreError> {
        let mut disk = self.0.borrow_mut();
        disk.writes += 1;
        let write = disk.writes;
        disk.hard_state = hard_state.clone();
        disk.unsynced_hard_states.push((write, hard_state.clone()));
        Ok(())
    }

    fn end_offset(&self, index: u64) -> Option<i64> {
        let disk = self.0.borrow();
        match index {
            0 => Some(0),
            i => disk.written.get((i - 1) as usize).map(|w| w.end_offset),
        }
    }
}
