//! A replica's Raft log kept over its partition log, without IO: the partition log holds the
//! entries (one batch each, `partitionLeaderEpoch` = term), and this keeps what raft-rs needs on
//! top of it — the Kafka offset after each entry of a window of recent indexes, the terms (leader
//! epochs), the hard state and members — and hands the caller the writes to carry out
//! (`take_writes`): truncations, appends of stamped batches, and saves of the small state file.
//!
//! The window starts after the *anchor*, a committed and applied entry whose index, term and end
//! offset are saved in `raft.state`; entries before it are compacted as far as raft-rs is
//! concerned (a partition applies an entry by moving its high watermark, so it keeps nothing else
//! of them). On open the caller scans the batch headers from the anchor's end offset to the log
//! end, which rebuilds the window and the epochs after the anchor: the saved state need not
//! follow every append, only term and vote changes (saved before the messages that depend on
//! them) and anchor moves.
//!
//! Entry data comes from a small cache of recent entries; older entries are read back through
//! raft-rs's asynchronous fetch (`LogTemporarilyUnavailable`, then `fetches`, `fetched` and
//! `RaftGroup::on_entries_fetched`). Where raft-rs cannot wait (handing out committed entries
//! to apply) an entry not in memory is given *hollow* — index and term, no data — since applying
//! needs no more.
//!
//! A follower whose log ends before its leader's first kept entry is sent a snapshot (`snapshot`:
//! the leader's anchor, and `snapshot::SnapshotData`); applying it (`apply_snapshot`) makes the
//! snapshot's entry the anchor, forgets the whole window and asks the caller to restart the
//! partition log at the anchor's end offset with the leader's producer state as of there
//! (`LogWrite::RestartAt`). The leader's producer state lives in its partition, not here: the
//! caller hands this log a `ProducersAsOf` to read it from when a snapshot is built.
//!
//! Owns the `raft.state` file format (plain std IO, to be run off the shard). Depends on
//! `store`, `epochs`, `snapshot`, `record`.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use raft::eraftpb::{ConfState, Entry, EntryType, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError as RaftStorageError};
use thiserror::Error;

use super::epochs::{EpochStart, LeaderEpochs};
use super::snapshot::SnapshotData;
use super::store::{entry_offsets, initial_state_for, ReplicaStore, StoreError};
use crate::record::builder::leader_change_batch;
use crate::record::BatchHeader;
use crate::storage::ProducerStates;

pub const STATE_FILE: &str = "raft.state";
const STATE_MAGIC: u32 = 0x524c_5253; // "RLRS"
/// Version 2 adds the flags word (`restart_pending`); version 1 files are read as without it.
const STATE_VERSION: u32 = 2;
const FLAG_RESTART_PENDING: u32 = 1;
/// Far more voters than a replica set has; a count past it is damage.
const VOTERS_MAX: usize = 64;

#[derive(Debug, Error)]
pub enum StateFileError {
    #[error("replica state file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("replica state file {path} is damaged ({reason}); the replica must be restored from its peers")]
    Corrupt { path: PathBuf, reason: String },
}

/// The last compacted entry: committed, applied, and the start of what the window describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Anchor {
    pub index: u64,
    pub term: u64,
    /// The Kafka offset after it: where the window's first entry starts.
    pub end_offset: i64,
}

/// What `raft.state` holds.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReplicaState {
    pub term: u64,
    pub vote: u64,
    pub voters: Vec<u64>,
    pub anchor: Anchor,
    /// The partition log must be discarded and started again, empty, at `anchor.end_offset`:
    /// set in the save before a snapshot's restart, cleared in the save after it, so a crash in
    /// between finishes the restart on open (docs/replication.md, stop 18).
    pub restart_pending: bool,
}

impl ReplicaState {
    /// A replica that has never written: its log starts at `log_start_offset`.
    pub fn new(voters: Vec<u64>, log_start_offset: i64) -> ReplicaState {
        ReplicaState {
            voters,
            anchor: Anchor { end_offset: log_start_offset, ..Anchor::default() },
            ..Default::default()
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + 8 * self.voters.len());
        out.extend_from_slice(&STATE_MAGIC.to_be_bytes());
        out.extend_from_slice(&STATE_VERSION.to_be_bytes());
        for v in [self.term, self.vote, self.anchor.index, self.anchor.term] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out.extend_from_slice(&self.anchor.end_offset.to_be_bytes());
        out.extend_from_slice(&(self.voters.len() as u32).to_be_bytes());
        for v in &self.voters {
            out.extend_from_slice(&v.to_be_bytes());
        }
        let flags = if self.restart_pending { FLAG_RESTART_PENDING } else { 0 };
        out.extend_from_slice(&flags.to_be_bytes());
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Result<ReplicaState, String> {
        let (body, crc) = bytes.split_at_checked(bytes.len().saturating_sub(4)).ok_or("empty")?;
        let stored = u32::from_be_bytes(crc.try_into().map_err(|_| "shorter than its checksum")?);
        if crc32c::crc32c(body) != stored {
            return Err("checksum mismatch".into());
        }
        let mut fields = body.chunks(8);
        let mut word = |what: &str| -> Result<[u8; 8], String> {
            fields.next().and_then(|c| c.try_into().ok()).ok_or_else(|| format!("ends before {what}"))
        };
        let head = word("the header")?;
        let (magic, version) = head.split_at(4);
        let version = u32::from_be_bytes([version[0], version[1], version[2], version[3]]);
        if magic != STATE_MAGIC.to_be_bytes() || !(1..=STATE_VERSION).contains(&version) {
            return Err(format!("not a version 1 to {STATE_VERSION} replica state"));
        }
        let term = u64::from_be_bytes(word("the term")?);
        let vote = u64::from_be_bytes(word("the vote")?);
        let index = u64::from_be_bytes(word("the anchor")?);
        let anchor_term = u64::from_be_bytes(word("the anchor's term")?);
        let end_offset = i64::from_be_bytes(word("the anchor's offset")?);
        let rest = &body[48..];
        let count = rest.get(..4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize);
        let count = count.filter(|&n| n <= VOTERS_MAX).ok_or("no valid voter count")?;
        let flags_len = if version >= 2 { 4 } else { 0 };
        if rest.len() != 4 + 8 * count + flags_len {
            return Err(format!("{count} voters announced, {} bytes follow", rest.len() - 4));
        }
        let (voters, flags) = rest[4..].split_at(8 * count);
        let voters: Vec<u64> =
            voters.chunks(8).filter_map(|c| c.try_into().ok().map(u64::from_be_bytes)).collect();
        let flags = flags.try_into().map_or(0, u32::from_be_bytes);
        if flags & !FLAG_RESTART_PENDING != 0 {
            return Err(format!("unknown flags {flags:#x}"));
        }
        if end_offset < 0 || anchor_term > term {
            return Err(format!(
                "anchor {index} of term {anchor_term} at offset {end_offset} in term {term}"
            ));
        }
        Ok(ReplicaState {
            term,
            vote,
            voters,
            anchor: Anchor { index, term: anchor_term, end_offset },
            restart_pending: flags & FLAG_RESTART_PENDING != 0,
        })
    }

    /// Reads `<dir>/raft.state`; `None` when the replica never saved one.
    pub fn load(dir: &Path) -> Result<Option<ReplicaState>, StateFileError> {
        let path = dir.join(STATE_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => ReplicaState::decode(&bytes)
                .map(Some)
                .map_err(|reason| StateFileError::Corrupt { path, reason }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateFileError::Io { path, source }),
        }
    }

    /// Writes `<dir>/raft.state` atomically and durably (temporary file, fdatasync, rename,
    /// directory fsync): after a crash it is the old state or the new one.
    pub fn store(&self, dir: &Path) -> Result<(), StateFileError> {
        let path = dir.join(STATE_FILE);
        let temp = dir.join(format!("{STATE_FILE}.tmp"));
        let io = |source| StateFileError::Io { path: path.clone(), source };
        let mut file = std::fs::File::create(&temp).map_err(io)?;
        file.write_all(&self.encode()).map_err(io)?;
        file.sync_data().map_err(io)?;
        std::fs::rename(&temp, &path).map_err(io)?;
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)
    }
}

/// A write the caller carries out on the partition log and the replica's directory, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum LogWrite {
    /// Cut the log at `offset`: the suffix from `index` on lost to a newer leader's entries.
    TruncateTo { index: u64, offset: i64 },
    /// Append these stamped batches (`append_replicated`): entries `first_index..=last_index`,
    /// ending at Kafka offset `end_offset`.
    Append { first_index: u64, last_index: u64, end_offset: i64, batches: Vec<Bytes> },
    /// Save both files, epochs first (a newer epochs file than state is cut back on open).
    SaveState { state: ReplicaState, epochs: LeaderEpochs },
    /// A leader's snapshot was applied: discard the whole partition log and start it again,
    /// empty, at `state.anchor.end_offset`. In this order: save `epochs`, save `state` with
    /// `restart_pending` set, restart the log (directory synced), save `state` as given (the
    /// flag clear). A crash before the flagged save leaves the old log and state; after it, the
    /// open restarts the log again before anything reads it.
    RestartAt { state: ReplicaState, epochs: LeaderEpochs, producers: ProducerStates },
}

/// The leader's idempotent producers as of an offset (`ProducerStates::as_of` of its partition's
/// state), read when raft-rs asks for a snapshot (a synchronous call, hence a callback).
pub struct ProducersAsOf(pub Box<dyn Fn(i64) -> ProducerStates>);

impl std::fmt::Debug for ProducersAsOf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProducersAsOf")
    }
}

/// Entries raft-rs asked for that are not in memory: read batches `[base_offset, end_offset)`
/// of the partition log, hand them to `fetched` with `first_index`, then call
/// `RaftGroup::on_entries_fetched(context)`.
#[derive(Debug)]
pub struct FetchRequest {
    pub first_index: u64,
    pub base_offset: i64,
    pub end_offset: i64,
    pub max_bytes: u64,
    pub context: GetEntriesContext,
    /// `context`'s debug form: who asked (the context has no equality).
    asker: String,
}

/// One batch of the log after the anchor, as the open scan found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScannedBatch {
    pub base_offset: i64,
    pub last_offset: i64,
    pub epoch: u64,
}

#[derive(Debug, Error)]
pub enum OpenError {
    #[error("the log continues at offset {expected} but the next batch starts at {found}")]
    Gap { expected: i64, found: i64 },
    #[error("batch at offset {offset} has leader epoch {epoch}, older than the {previous} before it")]
    EpochBackwards { offset: i64, epoch: u64, previous: u64 },
}

/// How much recent entry data is kept, and how much read-back data.
#[derive(Debug, Clone, Copy)]
pub struct CacheLimits {
    pub recent_bytes: usize,
    pub fetched_bytes: usize,
}

impl Default for CacheLimits {
    fn default() -> Self {
        CacheLimits { recent_bytes: 4 << 20, fetched_bytes: 4 << 20 }
    }
}

#[derive(Debug)]
pub struct ReplicaLog {
    conf_state: ConfState,
    hard_state: HardState,
    anchor: Anchor,
    /// The Kafka offset after each entry from `anchor.index + 1` on.
    ends: VecDeque<i64>,
    epochs: LeaderEpochs,
    /// Data of the newest entries, in index order, ending at the last index.
    recent: VecDeque<Entry>,
    recent_bytes: usize,
    /// Entries read back for raft-rs's asynchronous fetch, until served or evicted.
    fetched: BTreeMap<u64, Entry>,
    fetched_bytes: usize,
    limits: CacheLimits,
    fetches: std::cell::RefCell<Vec<FetchRequest>>,
    writes: Vec<LogWrite>,
    /// Where a snapshot's producer state comes from; without it (a log with no partition behind
    /// it) snapshots carry none.
    producers_as_of: Option<ProducersAsOf>,
}

impl ReplicaLog {
    /// The replica as saved (`state`, `epochs` from its files) and as its log continues after the
    /// anchor (`tail`, every batch from the anchor's end offset to the log end, in order).
    pub fn open(
        state: ReplicaState,
        mut epochs: LeaderEpochs,
        tail: impl IntoIterator<Item = ScannedBatch>,
        limits: CacheLimits,
    ) -> Result<ReplicaLog, OpenError> {
        let anchor = state.anchor;
        epochs.truncate_from(anchor.index + 1);
        let mut ends = VecDeque::new();
        let mut expected = anchor.end_offset;
        let mut previous = epochs.latest().map_or(anchor.term, |e| e.epoch.max(anchor.term));
        for (n, batch) in tail.into_iter().enumerate() {
            if batch.base_offset != expected {
                return Err(OpenError::Gap { expected, found: batch.base_offset });
            }
            if batch.epoch < previous {
                return Err(OpenError::EpochBackwards {
                    offset: batch.base_offset,
                    epoch: batch.epoch,
                    previous,
                });
            }
            let index = anchor.index + 1 + n as u64;
            if epochs.latest().is_none_or(|e| e.epoch < batch.epoch) {
                epochs.assign(EpochStart {
                    epoch: batch.epoch,
                    start_offset: batch.base_offset,
                    start_index: index,
                });
            }
            previous = batch.epoch;
            expected = batch.last_offset + 1;
            ends.push_back(expected);
        }
        let hard_state =
            HardState { term: state.term, vote: state.vote, commit: anchor.index, ..Default::default() };
        let conf_state = ConfState { voters: state.voters, ..Default::default() };
        Ok(ReplicaLog {
            conf_state,
            hard_state,
            anchor,
            ends,
            epochs,
            recent: VecDeque::new(),
            recent_bytes: 0,
            fetched: BTreeMap::new(),
            fetched_bytes: 0,
            limits,
            fetches: std::cell::RefCell::new(Vec::new()),
            writes: Vec::new(),
            producers_as_of: None,
        })
    }

    /// Makes the snapshots this log sends carry the producer state `source` gives.
    pub fn set_producers_as_of(&mut self, source: ProducersAsOf) {
        self.producers_as_of = Some(source);
    }

    pub fn anchor(&self) -> Anchor {
        self.anchor
    }

    pub fn epochs(&self) -> &LeaderEpochs {
        &self.epochs
    }

    pub fn last_index(&self) -> u64 {
        self.anchor.index + self.ends.len() as u64
    }

    /// The Kafka offset the next entry starts at.
    pub fn end_offset_of_log(&self) -> i64 {
        self.ends.back().copied().unwrap_or(self.anchor.end_offset)
    }

    /// What the caller must carry out, in order, before reporting the group's `Persist` done.
    pub fn take_writes(&mut self) -> Vec<LogWrite> {
        std::mem::take(&mut self.writes)
    }

    /// Whether entry `index` is in memory (a read for it would be wasted).
    pub fn holds(&self, index: u64) -> bool {
        self.cached(index).is_some()
    }

    /// Reads raft-rs asked for while entries were not in memory.
    pub fn take_fetches(&mut self) -> Vec<FetchRequest> {
        std::mem::take(self.fetches.get_mut())
    }

    /// Batches read back for a `FetchRequest` starting at `first_index`: kept until raft-rs
    /// asks again. Batches that no longer match the window (a truncation in between) are dropped.
    pub fn fetched(&mut self, first_index: u64, batches: impl IntoIterator<Item = Bytes>) {
        for (index, data) in (first_index..).zip(batches) {
            let Some(term) = self.term_of(index) else { break };
            let Some(end) = self.end_of(index) else { break };
            let Ok(header) = BatchHeader::parse(&data) else { break };
            if header.last_offset() + 1 != end || header.partition_leader_epoch as u64 != term {
                break;
            }
            self.fetched_bytes += data.len();
            if let Some(replaced) =
                self.fetched.insert(index, Entry { term, index, data, ..Default::default() })
            {
                self.fetched_bytes -= replaced.data.len();
            }
        }
        while self.fetched_bytes > self.limits.fetched_bytes {
            let Some((_, oldest)) = self.fetched.pop_first() else { break };
            self.fetched_bytes -= oldest.data.len();
        }
    }

    /// Forgets entries up to `index` (committed and applied): it becomes the anchor, saved with
    /// the next `SaveState` this emits now. The caller keeps the log's retention from passing the
    /// anchor's end offset, since the open scan starts there.
    pub fn compact_to(&mut self, index: u64, applied: u64) -> Result<(), StoreError> {
        if index <= self.anchor.index {
            return Ok(());
        }
        if index > applied || index > self.last_index() {
            return Err(StoreError::Io(format!(
                "cannot compact to {index}: applied {applied}, last {}",
                self.last_index()
            )));
        }
        let drop = (index - self.anchor.index) as usize;
        let end_offset = self.ends[drop - 1];
        let term = self.term_of(index).unwrap_or(self.anchor.term);
        self.ends.drain(..drop);
        self.anchor = Anchor { index, term, end_offset };
        self.hard_state.commit = self.hard_state.commit.max(index);
        self.fetched.retain(|&i, _| i > index);
        self.fetched_bytes = self.fetched.values().map(|e| e.data.len()).sum();
        self.save_state();
        Ok(())
    }

    fn save_state(&mut self) {
        let state = self.state();
        self.writes.push(LogWrite::SaveState { state, epochs: self.epochs.clone() });
    }

    fn state(&self) -> ReplicaState {
        ReplicaState {
            term: self.hard_state.term,
            vote: self.hard_state.vote,
            voters: self.conf_state.voters.clone(),
            anchor: self.anchor,
            restart_pending: false,
        }
    }

    fn term_of(&self, index: u64) -> Option<u64> {
        if index == self.anchor.index {
            return Some(self.anchor.term);
        }
        if index < self.anchor.index || index > self.last_index() {
            return None;
        }
        self.epochs.term_at(index)
    }

    fn end_of(&self, index: u64) -> Option<i64> {
        match index.checked_sub(self.anchor.index)? {
            0 => Some(self.anchor.end_offset),
            n => self.ends.get(n as usize - 1).copied(),
        }
    }

    fn cached(&self, index: u64) -> Option<&Entry> {
        let first = self.last_index() + 1 - self.recent.len() as u64;
        match index.checked_sub(first) {
            Some(at) => self.recent.get(at as usize),
            None => self.fetched.get(&index),
        }
    }

    fn remember(&mut self, entry: Entry) {
        self.recent_bytes += entry.data.len();
        self.recent.push_back(entry);
        while self.recent_bytes > self.limits.recent_bytes && self.recent.len() > 1 {
            if let Some(oldest) = self.recent.pop_front() {
                self.recent_bytes -= oldest.data.len();
            }
        }
    }
}

impl raft::Storage for ReplicaLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(initial_state_for(&self.hard_state, &self.conf_state, self.last_index()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.anchor.index {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        if high > self.last_index() + 1 || low > high {
            return Err(raft::Error::Store(RaftStorageError::Unavailable));
        }
        let max_size = max_size.into().unwrap_or(u64::MAX);
        let mut out = Vec::new();
        let mut size = 0u64;
        for index in low..high {
            let entry = match self.cached(index) {
                Some(entry) => entry.clone(),
                None if context.can_async() => {
                    // raft-rs asks again at every proposal it broadcasts while a follower waits
                    // for this read: hundreds of identical reads of a megabyte in one round, and
                    // a follower that lags once lagging for good (measured: docs/benchmarks.md,
                    // "The slow mode"). One read per first index and asker; the context has no
                    // equality, its debug form tells the askers apart (follower, term).
                    let asker = format!("{context:?}");
                    let mut fetches = self.fetches.borrow_mut();
                    if !fetches.iter().any(|f| f.first_index == index && f.asker == asker) {
                        fetches.push(FetchRequest {
                            first_index: index,
                            base_offset: self.end_of(index - 1).unwrap_or(self.anchor.end_offset),
                            end_offset: self.end_of(high - 1).unwrap_or(self.anchor.end_offset),
                            max_bytes: max_size.saturating_sub(size).max(1),
                            context,
                            asker,
                        });
                    }
                    return Err(raft::Error::Store(RaftStorageError::LogTemporarilyUnavailable));
                }
                None => {
                    let term =
                        self.term_of(index).ok_or(raft::Error::Store(RaftStorageError::Unavailable))?;
                    Entry { term, index, ..Default::default() }
                }
            };
            size += entry.data.len() as u64;
            if !out.is_empty() && size > max_size {
                break;
            }
            out.push(entry);
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx < self.anchor.index {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        self.term_of(idx).ok_or(raft::Error::Store(RaftStorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.anchor.index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(ReplicaLog::last_index(self))
    }

    /// The anchor as a snapshot, for a follower that needs entries this log has forgotten: it
    /// restarts its log at the anchor's end offset and takes the rest as appends.
    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.anchor.index == 0 {
            // Nothing forgotten: raft-rs never asks then, and refuses an empty snapshot.
            return Err(raft::Error::Store(RaftStorageError::SnapshotTemporarilyUnavailable));
        }
        let mut epochs = self.epochs.clone();
        epochs.truncate_from(self.anchor.index + 1);
        // Everything below the anchor's end is applied, so in the partition and its producer
        // state; later batches are left out and reach the follower as appends.
        let start_offset = self.anchor.end_offset;
        let producers =
            self.producers_as_of.as_ref().map(|source| (source.0)(start_offset)).unwrap_or_default();
        let data = SnapshotData { start_offset, epochs, producers };
        let mut snapshot = Snapshot { data: data.encode().into(), ..Default::default() };
        let metadata = snapshot.mut_metadata();
        metadata.index = self.anchor.index;
        metadata.term = self.anchor.term;
        metadata.set_conf_state(self.conf_state.clone());
        Ok(snapshot)
    }
}

impl ReplicaStore for ReplicaLog {
    fn append(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        let Some(first) = entries.first() else { return Ok(()) };
        let last = self.last_index();
        if first.index <= self.anchor.index || first.index > last + 1 {
            return Err(StoreError::IndexGap { index: first.index, last });
        }
        if first.index <= last {
            let keep = (first.index - 1 - self.anchor.index) as usize;
            self.ends.truncate(keep);
            let cached_from = last + 1 - self.recent.len() as u64;
            let keep_recent = first.index.saturating_sub(cached_from) as usize;
            for dropped in self.recent.drain(keep_recent.min(self.recent.len())..) {
                self.recent_bytes -= dropped.data.len();
            }
            self.fetched.retain(|&i, _| i < first.index);
            self.fetched_bytes = self.fetched.values().map(|e| e.data.len()).sum();
            self.epochs.truncate_from(first.index);
            let offset = self.end_offset_of_log();
            self.writes.push(LogWrite::TruncateTo { index: first.index, offset });
        }
        let mut batches = Vec::with_capacity(entries.len());
        for entry in entries {
            let expected = self.end_offset_of_log();
            let data = if entry.get_entry_type() == EntryType::EntryNormal && entry.data.is_empty() {
                let epoch = i32::try_from(entry.term).map_err(|_| StoreError::NotABatch {
                    index: entry.index,
                    term: entry.term,
                    reason: "term exceeds a leader epoch".into(),
                })?;
                leader_change_batch(expected, epoch).freeze()
            } else {
                entry.data.clone()
            };
            let stamped = Entry { data: data.clone(), ..entry.clone() };
            let (base, count) = entry_offsets(&stamped, expected)?;
            if base != expected {
                return Err(StoreError::OffsetGap { index: entry.index, base, expected });
            }
            let epoch = BatchHeader::parse(&data).map(|h| h.partition_leader_epoch as u64).ok();
            if epoch != Some(entry.term) {
                return Err(StoreError::NotABatch {
                    index: entry.index,
                    term: entry.term,
                    reason: format!("its batch carries leader epoch {epoch:?}"),
                });
            }
            if self.epochs.latest().is_none_or(|e| e.epoch < entry.term) {
                self.epochs.assign(EpochStart {
                    epoch: entry.term,
                    start_offset: base,
                    start_index: entry.index,
                });
            }
            self.ends.push_back(base + count);
            self.remember(stamped);
            batches.push(data);
        }
        self.writes.push(LogWrite::Append {
            first_index: first.index,
            last_index: self.last_index(),
            end_offset: self.end_offset_of_log(),
            batches,
        });
        Ok(())
    }

    fn set_hard_state(&mut self, hard_state: &HardState) -> Result<(), StoreError> {
        let changed = hard_state.term != self.hard_state.term || hard_state.vote != self.hard_state.vote;
        self.hard_state = hard_state.clone();
        if changed {
            self.save_state();
        }
        Ok(())
    }

    fn end_offset(&self, index: u64) -> Option<i64> {
        self.end_of(index)
    }

    fn apply_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), StoreError> {
        let metadata = snapshot.get_metadata();
        let index = metadata.index;
        let data = SnapshotData::decode(&snapshot.data, index).map_err(StoreError::Snapshot)?;
        if index <= self.anchor.index {
            return Err(StoreError::Io(format!(
                "a snapshot of entry {index} does not pass the anchor {}",
                self.anchor.index
            )));
        }
        self.anchor = Anchor { index, term: metadata.term, end_offset: data.start_offset };
        self.ends.clear();
        self.recent.clear();
        self.recent_bytes = 0;
        self.fetched.clear();
        self.fetched_bytes = 0;
        self.fetches.get_mut().clear();
        self.epochs = data.epochs;
        self.conf_state = metadata.get_conf_state().clone();
        self.hard_state.commit = self.hard_state.commit.max(index);
        let state = self.state();
        self.writes.push(LogWrite::RestartAt {
            state,
            epochs: self.epochs.clone(),
            producers: data.producers,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use bytes::BytesMut;

    use super::*;
    use crate::record::builder::BatchBuilder;
    use crate::replication::group::{GroupSettings, ProposeError, RaftGroup, Role};

    /// A replica's partition log and files, as the shard would keep them.
    #[derive(Debug, Default, Clone)]
    struct Disk {
        batches: Vec<Bytes>,
        state: Option<ReplicaState>,
        epochs: LeaderEpochs,
    }

    fn header(batch: &[u8]) -> BatchHeader {
        BatchHeader::parse(batch).unwrap()
    }

    impl Disk {
        fn end(&self) -> i64 {
            self.batches.last().map_or(0, |b| header(b).last_offset() + 1)
        }

        fn carry_out(&mut self, writes: Vec<LogWrite>) {
            for write in writes {
                match write {
                    LogWrite::TruncateTo { offset, .. } => {
                        self.batches.retain(|b| header(b).base_offset < offset)
                    }
                    LogWrite::Append { batches, end_offset, .. } => {
                        for batch in batches {
                            assert_eq!(header(&batch).base_offset, self.end(), "appends continue the log");
                            crate::record::validate(&batch).unwrap();
                            self.batches.push(batch);
                        }
                        assert_eq!(self.end(), end_offset);
                    }
                    LogWrite::SaveState { state, epochs } => {
                        self.state = Some(state);
                        self.epochs = epochs;
                    }
                    LogWrite::RestartAt { .. } => panic!("these tests never compact past a follower"),
                }
            }
        }

        fn from(&self, offset: i64) -> impl Iterator<Item = &Bytes> {
            self.batches.iter().filter(move |b| header(b).base_offset >= offset)
        }

        fn open(&self, voters: &[u64], limits: CacheLimits) -> ReplicaLog {
            let state = self.state.clone().unwrap_or_else(|| ReplicaState::new(voters.to_vec(), 0));
            let tail: Vec<ScannedBatch> = self
                .from(state.anchor.end_offset)
                .map(|b| {
                    let h = header(b);
                    ScannedBatch {
                        base_offset: h.base_offset,
                        last_offset: h.last_offset(),
                        epoch: h.partition_leader_epoch as u64,
                    }
                })
                .collect();
            ReplicaLog::open(state, self.epochs.clone(), tail, limits).unwrap()
        }
    }

    struct Node {
        group: RaftGroup<ReplicaLog>,
        disk: Disk,
    }

    struct Cluster {
        nodes: Vec<Node>,
        /// Nodes whose messages, in and out, are dropped.
        cut: HashSet<u64>,
        limits: CacheLimits,
    }

    const VOTERS: [u64; 3] = [1, 2, 3];

    impl Cluster {
        fn new(limits: CacheLimits) -> Cluster {
            let nodes = VOTERS.iter().map(|&id| Node::start(id, Disk::default(), limits)).collect();
            Cluster { nodes, cut: HashSet::new(), limits }
        }

        fn node(&mut self, id: u64) -> &mut Node {
            &mut self.nodes[(id - 1) as usize]
        }

        /// Polls, persists and delivers until nothing moves.
        fn settle(&mut self) {
            for _ in 0..200 {
                let mut mail = Vec::new();
                for node in &mut self.nodes {
                    mail.extend(node.turn());
                }
                mail.retain(|m| !self.cut.contains(&m.from) && !self.cut.contains(&m.to));
                if mail.is_empty() {
                    return;
                }
                for m in mail {
                    self.node(m.to).group.step(m).unwrap();
                }
            }
            panic!("the cluster did not settle");
        }

        fn elect(&mut self, id: u64) {
            self.node(id).group.campaign().unwrap();
            self.settle();
            assert_eq!(self.node(id).group.role(), Role::Leader);
            assert!(self.node(id).group.is_serving());
        }

        fn restart(&mut self, id: u64) {
            let disk = self.node(id).disk.clone();
            let limits = self.limits;
            *self.node(id) = Node::start(id, disk, limits);
        }

        /// Every pair of replicas holds the same bytes below the lower of their high watermarks.
        fn assert_logs_match(&self) {
            let hw = self.nodes.iter().map(|n| n.group.high_watermark()).min().unwrap();
            let committed: Vec<Vec<&Bytes>> = self
                .nodes
                .iter()
                .map(|n| n.disk.batches.iter().filter(|b| header(b).base_offset < hw).collect())
                .collect();
            assert!(committed.iter().all(|log| log == &committed[0]), "replicas differ below {hw}");
        }
    }

    impl Node {
        fn start(id: u64, disk: Disk, limits: CacheLimits) -> Node {
            let log = disk.open(&VOTERS, limits);
            let settings = GroupSettings::default();
            let group = RaftGroup::new(id, format!("t-0@{id}"), settings, log, id).unwrap();
            Node { group, disk }
        }

        /// One round: the group's output, its writes carried out (synchronously durable here),
        /// its reads served. Returns the messages to deliver.
        fn turn(&mut self) -> Vec<raft::eraftpb::Message> {
            let output = self.group.poll().unwrap();
            let mut mail = output.send;
            self.disk.carry_out(self.group.store_mut().take_writes());
            if let Some(persist) = output.persist {
                self.group.persisted(persist.number);
                mail.extend(persist.then_send);
            }
            for fetch in self.group.store_mut().take_fetches() {
                let batches: Vec<Bytes> = self
                    .disk
                    .from(fetch.base_offset)
                    .filter(|b| header(b).base_offset < fetch.end_offset)
                    .cloned()
                    .collect();
                self.group.store_mut().fetched(fetch.first_index, batches);
                self.group.on_entries_fetched(fetch.context);
            }
            mail
        }
    }

    fn batch(records: usize, tag: &str) -> BytesMut {
        let mut builder = BatchBuilder::new();
        for i in 0..records {
            builder.push(1_700_000_000_000, None, Some(format!("{tag}{i}").as_bytes()), &[]);
        }
        builder.finish()
    }

    #[test]
    fn replicas_write_the_same_batches_and_a_new_leaders_entry_as_a_control_batch() {
        let mut cluster = Cluster::new(CacheLimits::default());
        cluster.elect(1);
        let first = cluster.node(1).group.propose(batch(3, "a")).unwrap();
        cluster.node(1).group.propose(batch(2, "b")).unwrap();
        cluster.settle();
        assert_eq!(first.base_offset, 1, "the leader's empty entry took offset 0");
        for node in &cluster.nodes {
            assert_eq!(node.group.high_watermark(), 6);
            assert_eq!(node.disk.batches.len(), 3);
            let control = header(&node.disk.batches[0]);
            assert!(control.is_control());
            assert_eq!(control.partition_leader_epoch as u64, first.term);
            assert!(!header(&node.disk.batches[1]).is_control());
            assert_eq!(node.disk.state.as_ref().map(|s| s.term), Some(first.term), "term saved");
        }
        cluster.assert_logs_match();
    }

    #[test]
    fn a_restarted_replica_rebuilds_its_window_from_the_anchor_and_the_log() {
        let mut cluster = Cluster::new(CacheLimits::default());
        cluster.elect(1);
        for i in 0..10 {
            cluster.node(1).group.propose(batch(2, &format!("r{i}-"))).unwrap();
        }
        cluster.settle();
        // Node 3 compacts half its log (the anchor is saved), then restarts: the window is the
        // saved anchor plus a scan of what follows it.
        let applied = cluster.node(3).group.commit_index();
        cluster.node(3).group.store_mut().compact_to(6, applied).unwrap();
        let writes = cluster.node(3).group.store_mut().take_writes();
        cluster.node(3).disk.carry_out(writes);
        assert_eq!(cluster.node(3).disk.state.as_ref().map(|s| s.anchor.index), Some(6));
        cluster.restart(3);
        let hw = cluster.node(3).group.high_watermark();
        let anchor = cluster.node(3).group.store().anchor();
        assert_eq!(hw, anchor.end_offset, "the high watermark restarts at the anchor");
        assert_eq!(cluster.node(3).group.store().last_index(), applied);
        cluster.settle();
        for i in 0..5 {
            cluster.node(1).group.propose(batch(1, &format!("s{i}-"))).unwrap();
        }
        cluster.settle();
        let end = cluster.node(1).disk.end();
        assert!(cluster.nodes.iter().all(|n| n.group.high_watermark() == end));
        cluster.assert_logs_match();
        // The leader restarts too, without a saved anchor: it scans its whole log.
        cluster.restart(1);
        cluster.elect(2);
        cluster.node(2).group.propose(batch(1, "after")).unwrap();
        cluster.settle();
        cluster.assert_logs_match();
        assert_eq!(cluster.node(1).disk.end(), cluster.node(2).disk.end());
    }

    #[test]
    fn an_isolated_leaders_uncommitted_writes_are_cut_when_it_rejoins() {
        let mut cluster = Cluster::new(CacheLimits::default());
        cluster.elect(1);
        cluster.node(1).group.propose(batch(1, "kept")).unwrap();
        cluster.settle();
        let committed_end = cluster.node(1).group.high_watermark();
        cluster.cut.insert(1);
        cluster.node(1).group.propose(batch(4, "lost")).unwrap();
        cluster.settle();
        assert_eq!(cluster.node(1).group.high_watermark(), committed_end, "nothing commits alone");
        assert!(cluster.node(1).disk.end() > committed_end);
        // The others stop hearing from it; once their election timeouts pass, 2 can win.
        for _ in 0..2 * GroupSettings::default().election_ticks {
            cluster.node(3).group.tick();
            cluster.settle();
        }
        cluster.elect(2);
        cluster.node(2).group.propose(batch(2, "new")).unwrap();
        cluster.settle();
        cluster.cut.clear();
        // The old leader hears the new term and takes the new leader's log.
        for _ in 0..30 {
            cluster.node(2).group.tick();
            cluster.settle();
        }
        assert_eq!(cluster.node(1).group.role(), Role::Follower);
        assert_eq!(cluster.nodes[0].disk.batches, cluster.nodes[1].disk.batches);
        let values: Vec<Bytes> = cluster.node(1).disk.batches.clone();
        assert!(!values.iter().any(|b| b.windows(4).any(|w| w == b"lost")), "uncommitted writes survived");
        let epochs = cluster.node(1).group.store().epochs().entries().to_vec();
        assert_eq!(epochs.last().map(|e| e.epoch), Some(cluster.node(2).group.term()));
        assert_eq!(
            cluster.node(1).group.propose(batch(1, "x")),
            Err(ProposeError::NotLeader { leader: Some(2) })
        );
    }

    #[test]
    fn a_lagging_follower_is_served_from_the_log_when_the_cache_has_moved_on() {
        // Caches of one entry: whatever a follower lacks is read back from the log.
        let mut cluster = Cluster::new(CacheLimits { recent_bytes: 1, fetched_bytes: 1 << 20 });
        cluster.elect(1);
        cluster.cut.insert(3);
        for i in 0..20 {
            cluster.node(1).group.propose(batch(3, &format!("m{i}-"))).unwrap();
            cluster.settle();
        }
        cluster.cut.clear();
        for _ in 0..10 {
            cluster.node(1).group.tick();
            cluster.settle();
        }
        assert_eq!(cluster.nodes[2].disk.batches, cluster.nodes[0].disk.batches);
        assert_eq!(cluster.node(3).group.high_watermark(), cluster.node(1).disk.end());
    }

    #[test]
    fn asking_again_for_entries_being_read_costs_no_second_read() {
        let mut cluster = Cluster::new(CacheLimits { recent_bytes: 1, fetched_bytes: 1 << 20 });
        cluster.elect(1);
        for i in 0..5 {
            cluster.node(1).group.propose(batch(3, &format!("m{i}-"))).unwrap();
            cluster.settle();
        }
        let log = cluster.node(1).group.store_mut();
        let ask = |log: &ReplicaLog| raft::Storage::entries(log, 2, 5, None, GetEntriesContext::empty(true));
        for _ in 0..3 {
            assert!(matches!(ask(log), Err(raft::Error::Store(RaftStorageError::LogTemporarilyUnavailable))));
        }
        let fetches = log.take_fetches();
        assert_eq!(fetches.len(), 1, "{fetches:?}");
        // Read back twice (two askers at one index): held once, counted once.
        let batches: Vec<Bytes> =
            cluster.nodes[0].disk.from(fetches[0].base_offset).take(3).cloned().collect();
        let log = cluster.node(1).group.store_mut();
        log.fetched(2, batches.clone());
        let held = log.fetched_bytes;
        log.fetched(2, batches);
        assert_eq!(log.fetched_bytes, held);
        assert!(log.holds(2) && log.holds(4));
        assert_eq!(ask(log).map(|entries| entries.len()).ok(), Some(3));
        assert!(log.take_fetches().is_empty());
    }

    #[test]
    fn state_file_round_trip_and_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(ReplicaState::load(dir.path()).ok(), Some(None));
        let state = ReplicaState {
            term: 9,
            vote: 2,
            voters: vec![1, 2, 3],
            anchor: Anchor { index: 40, term: 7, end_offset: 1234 },
            restart_pending: true,
        };
        state.store(dir.path()).unwrap();
        assert_eq!(ReplicaState::load(dir.path()).ok(), Some(Some(state.clone())));
        // A version 1 file (no flags word) still reads, without a restart pending.
        let mut v1 = state.encode();
        v1.truncate(v1.len() - 8);
        v1[4..8].copy_from_slice(&1u32.to_be_bytes());
        let crc = crc32c::crc32c(&v1);
        v1.extend_from_slice(&crc.to_be_bytes());
        std::fs::write(dir.path().join(STATE_FILE), &v1).unwrap();
        let read = ReplicaState::load(dir.path()).unwrap().unwrap();
        assert_eq!(read, ReplicaState { restart_pending: false, ..state.clone() });
        let good = state.encode();
        let mut flipped = good.clone();
        flipped[20] ^= 1;
        for damaged in [vec![], good[..good.len() - 1].to_vec(), flipped, b"RLRS".to_vec()] {
            std::fs::write(dir.path().join(STATE_FILE), &damaged).unwrap();
            let err = ReplicaState::load(dir.path()).err().map(|e| e.to_string());
            assert!(err.as_deref().is_some_and(|e| e.contains("damaged")), "{damaged:?}: {err:?}");
        }
    }
}
