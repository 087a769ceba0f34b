//! What a replica's log must offer consensus: raft-rs reads it through `raft::Storage`; the group
//! writes through `ReplicaStore`. The partition log is the Raft log (DESIGN.md): one entry is one
//! batch, so an entry's Kafka offsets come from its batch header, and entries that carry no client
//! data (a new leader's empty entry) take one offset each, written as a control batch that
//! consumers skip. `replica_log::ReplicaLog` is the implementation over a partition log (the
//! simulator runs it too, on a simulated disk); `cluster::controller_log` the controller's.

use raft::eraftpb::{Entry, EntryType, HardState};
use thiserror::Error;

use crate::record::BatchHeader;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("entry {index} holds offsets {base}.. but the log continues at {expected}: the leader's log and ours disagree")]
    OffsetGap { index: u64, base: i64, expected: i64 },
    #[error("entry {index} of term {term} does not hold a record batch: {reason}")]
    NotABatch { index: u64, term: u64, reason: String },
    #[error("entry {index} would leave a hole after the last index {last}")]
    IndexGap { index: u64, last: u64 },
    #[error("replica log: {0}")]
    Io(String),
    #[error(transparent)]
    Snapshot(#[from] super::snapshot::SnapshotDataError),
}

/// The Kafka offsets one entry occupies: `(base, count)`; an entry without a batch takes one
/// offset at `base_if_unstamped`. Fails when a data entry is not a whole batch (a peer sent
/// garbage, or the log is damaged).
pub fn entry_offsets(entry: &Entry, base_if_unstamped: i64) -> Result<(i64, i64), StoreError> {
    let carries_batch = entry.get_entry_type() == EntryType::EntryNormal && !entry.data.is_empty();
    if !carries_batch {
        return Ok((base_if_unstamped, 1));
    }
    let header = BatchHeader::parse(&entry.data).map_err(|e| StoreError::NotABatch {
        index: entry.index,
        term: entry.term,
        reason: e.to_string(),
    })?;
    if header.total_len() != entry.data.len() || header.last_offset_delta < 0 {
        return Err(StoreError::NotABatch {
            index: entry.index,
            term: entry.term,
            reason: format!(
                "header says {} bytes and {} offsets, entry has {} bytes",
                header.total_len(),
                i64::from(header.last_offset_delta) + 1,
                entry.data.len()
            ),
        });
    }
    Ok((header.base_offset, i64::from(header.last_offset_delta) + 1))
}

/// raft-rs's `Storage::initial_state` for a log of `last_index` entries. The commit index is a
/// hint (the leader sends it again); a crash may keep a hard state whose commit is past the
/// entries that survived, which raft-rs refuses, so it is clamped to what is there.
pub fn initial_state_for(
    hard_state: &HardState,
    conf_state: &raft::eraftpb::ConfState,
    last_index: u64,
) -> raft::RaftState {
    let mut hard_state = hard_state.clone();
    hard_state.commit = hard_state.commit.min(last_index);
    raft::RaftState { hard_state, conf_state: conf_state.clone() }
}

/// raft-rs's `Storage::term` for a log held whole in memory from index 1.
pub fn term_in(entries: &[Entry], index: u64) -> raft::Result<u64> {
    match index {
        0 => Ok(0),
        i => usize::try_from(i - 1)
            .ok()
            .and_then(|at| entries.get(at))
            .map(|e| e.term)
            .ok_or(raft::Error::Store(raft::StorageError::Unavailable)),
    }
}

/// raft-rs's `Storage::entries` for a log held whole in memory from index 1: entries
/// `[low, high)`, at least one, then as many as fit `max_size` bytes of data.
pub fn entries_between(
    entries: &[Entry],
    low: u64,
    high: u64,
    max_size: Option<u64>,
) -> raft::Result<Vec<Entry>> {
    use raft::StorageError as RaftStorageError;
    if low < 1 {
        return Err(raft::Error::Store(RaftStorageError::Compacted));
    }
    if high > entries.len() as u64 + 1 || low > high {
        return Err(raft::Error::Store(RaftStorageError::Unavailable));
    }
    let max_size = max_size.unwrap_or(u64::MAX);
    let mut size = 0u64;
    let mut out = Vec::new();
    for entry in &entries[(low - 1) as usize..(high - 1) as usize] {
        size += entry.data.len() as u64;
        if !out.is_empty() && size > max_size {
            break;
        }
        out.push(entry.clone());
    }
    Ok(out)
}

/// The write side of a replica's log. Writes are volatile until the caller has made them durable
/// and told the group (`RaftGroup::persisted`); what the group reads back through
/// `raft::Storage` includes them at once.
pub trait ReplicaStore: raft::Storage {
    /// Appends `entries` (consecutive indexes), first dropping whatever the log holds at or after
    /// the first one's index: a follower's conflicting suffix. Checks that each entry's offsets
    /// continue the log's; keeps the leader epochs.
    fn append(&mut self, entries: &[Entry]) -> Result<(), StoreError>;

    fn set_hard_state(&mut self, hard_state: &HardState) -> Result<(), StoreError>;

    /// The Kafka offset after the entry at `index` (for `first_index() - 1`, the log start).
    fn end_offset(&self, index: u64) -> Option<i64>;

    /// Takes a leader's snapshot (raft-rs restored it): the snapshot's entry becomes the last
    /// forgotten one and the log holds nothing after it.
    fn apply_snapshot(&mut self, snapshot: &raft::eraftpb::Snapshot) -> Result<(), StoreError>;
}
