//! The controller group's Raft log and hard state, in files of their own under
//! `<data_dir>/controller/`: `raft.log` (records `[u32 length][u32 crc32c][u64 term][u64 index]
//! [u8 kind][data]`, appended) and `raft.state` (term, vote, commit and a crc32c, replaced by
//! rename). The controller's log is small (node registrations, later topic changes), so it is
//! kept whole in memory and the files are written by plain std IO on the blocking pool; partition
//! groups will use the partition log itself (docs/replication.md).
//!
//! Writes reach memory at once (what raft-rs reads) and the files when the caller runs the
//! `PendingWrites` it takes; a record cut short by a crash is dropped at the next open.
//!
//! The files are reached through one seam, `ControllerFiles`: `DirFiles` is the directory on
//! disk; the simulator (`ringlog-sim`) puts a simulated disk there, so the record format, the
//! order of writes and syncs and the recovery after a crash (`recover`) that it runs are these.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use raft::eraftpb::{ConfState, Entry, EntryType, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError as RaftStorageError};

use crate::replication::store::{
    entries_between, entry_offsets, initial_state_for, term_in, ReplicaStore, StoreError,
};

const LOG_FILE: &str = "raft.log";
const STATE_FILE: &str = "raft.state";
const RECORD_HEADER: usize = 8;
const BODY_FIXED: usize = 17;
/// A record longer than this is not one of ours.
const RECORD_BYTES_MAX: usize = 64 << 20;

pub struct ControllerLog {
    conf_state: ConfState,
    hard_state: HardState,
    entries: Vec<Entry>,
    /// Kafka-style offsets after each entry (kept for `ReplicaStore`; the controller does not
    /// serve them).
    ends: Vec<i64>,
    /// Byte position of each entry's record in `raft.log`, and the file's length.
    positions: Vec<u64>,
    file_len: u64,
    pending: PendingWrites,
}

/// File writes not yet made; run them (off the shard) with `PendingWrites::write`.
#[derive(Debug, Default)]
pub struct PendingWrites {
    /// Cut `raft.log` to this length first (a follower's conflicting suffix).
    truncate_to: Option<u64>,
    append_at: u64,
    append: Vec<u8>,
    hard_state: Option<[u8; HARD_STATE_BYTES]>,
}

impl PendingWrites {
    pub fn is_empty(&self) -> bool {
        self.truncate_to.is_none() && self.append.is_empty() && self.hard_state.is_none()
    }

    /// Later writes after earlier ones, as one batch of file operations.
    pub fn merge(&mut self, later: PendingWrites) {
        if self.is_empty() {
            *self = later;
            return;
        }
        if let Some(cut) = later.truncate_to {
            let kept = cut.saturating_sub(self.append_at) as usize;
            if cut < self.append_at {
                self.truncate_to = Some(self.truncate_to.map_or(cut, |t| t.min(cut)));
                self.append_at = cut;
                self.append.clear();
            } else {
                self.append.truncate(kept);
            }
        }
        if !later.append.is_empty() {
            debug_assert_eq!(self.append_at + self.append.len() as u64, later.append_at);
            self.append.extend_from_slice(&later.append);
        }
        if later.hard_state.is_some() {
            self.hard_state = later.hard_state;
        }
    }

    /// Makes the writes durable: truncate, append and fdatasync the log, then replace the state
    /// file (temporary file, fdatasync, rename), then sync the directory. Blocking with
    /// `DirFiles`.
    pub fn write_to(self, files: &mut impl ControllerFiles) -> std::io::Result<()> {
        if let Some(len) = self.truncate_to {
            files.cut_log(len)?;
        }
        if !self.append.is_empty() {
            files.write_log_at(self.append_at, &self.append)?;
        }
        files.sync_log()?;
        if let Some(state) = self.hard_state {
            files.replace_state(&state)?;
        }
        files.sync_dir()
    }
}

/// Where the controller's log and hard state are written: the operations `PendingWrites` runs,
/// in its order. A sync returns once what was written before it is durable.
pub trait ControllerFiles {
    /// Cuts `raft.log` to `len` bytes.
    fn cut_log(&mut self, len: u64) -> std::io::Result<()>;
    fn write_log_at(&mut self, at: u64, bytes: &[u8]) -> std::io::Result<()>;
    fn sync_log(&mut self) -> std::io::Result<()>;
    /// Replaces `raft.state` as a whole, durably but for the directory entry (`sync_dir`).
    fn replace_state(&mut self, state: &[u8; HARD_STATE_BYTES]) -> std::io::Result<()>;
    fn sync_dir(&mut self) -> std::io::Result<()>;
}

/// The controller's files in a directory, written with std IO (blocking: run on the blocking
/// pool).
pub struct DirFiles {
    dir: PathBuf,
    log: Option<std::fs::File>,
}

impl DirFiles {
    pub fn new(dir: PathBuf) -> DirFiles {
        DirFiles { dir, log: None }
    }

    fn log(&mut self) -> std::io::Result<&std::fs::File> {
        if self.log.is_none() {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .open(self.dir.join(LOG_FILE))?;
            self.log = Some(file);
        }
        self.log.as_ref().ok_or_else(|| std::io::Error::other("the log file was just opened"))
    }
}

impl ControllerFiles for DirFiles {
    fn cut_log(&mut self, len: u64) -> std::io::Result<()> {
        self.log()?.set_len(len)
    }

    fn write_log_at(&mut self, at: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.log()?.write_all_at(bytes, at)
    }

    fn sync_log(&mut self) -> std::io::Result<()> {
        self.log()?.sync_data()
    }

    fn replace_state(&mut self, state: &[u8; HARD_STATE_BYTES]) -> std::io::Result<()> {
        let temp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(state)?;
        file.sync_data()?;
        std::fs::rename(&temp, self.dir.join(STATE_FILE))
    }

    fn sync_dir(&mut self) -> std::io::Result<()> {
        std::fs::File::open(&self.dir)?.sync_all()
    }
}

/// What `ControllerLog::recover` cut off the end of `raft.log`: a record a crash left torn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// The log's length once cut: what the file must be cut to.
    pub at: u64,
    pub reason: String,
}

/// `raft.state` exists but is not one: refusing to start beats voting twice in a term.
#[derive(Debug, thiserror::Error)]
#[error("the controller's hard state is damaged (bad length or crc)")]
pub struct DamagedState;

/// Bytes of `raft.state`: term, vote, commit, crc32c.
pub const HARD_STATE_BYTES: usize = 28;

fn encode_hard_state(hs: &HardState) -> [u8; HARD_STATE_BYTES] {
    let mut out = [0u8; HARD_STATE_BYTES];
    out[..8].copy_from_slice(&hs.term.to_be_bytes());
    out[8..16].copy_from_slice(&hs.vote.to_be_bytes());
    out[16..24].copy_from_slice(&hs.commit.to_be_bytes());
    let crc = crc32c::crc32c(&out[..24]);
    out[24..].copy_from_slice(&crc.to_be_bytes());
    out
}

fn be_u64(b: &[u8]) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[..8]);
    u64::from_be_bytes(x)
}

fn encode_record(entry: &Entry, out: &mut Vec<u8>) {
    let body_len = BODY_FIXED + entry.data.len();
    let start = out.len();
    out.extend_from_slice(&(body_len as u32).to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&entry.term.to_be_bytes());
    out.extend_from_slice(&entry.index.to_be_bytes());
    out.push(entry.get_entry_type() as u8);
    out.extend_from_slice(&entry.data);
    let crc = crc32c::crc32c(&out[start + RECORD_HEADER..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
}

impl ControllerLog {
    /// Opens (or creates) the controller's log in `dir`; `voters` are the cluster's seeds. A torn
    /// last record is cut off and reported in the returned warning.
    pub fn open(dir: &Path, voters: Vec<u64>) -> std::io::Result<(ControllerLog, Option<String>)> {
        std::fs::create_dir_all(dir)?;
        let read = |name: &str| match std::fs::read(dir.join(name)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        };
        let bytes = read(LOG_FILE)?.unwrap_or_default();
        let state = read(STATE_FILE)?;
        let (log, torn) = ControllerLog::recover(&bytes, state.as_deref(), voters).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", dir.join(STATE_FILE).display()),
            )
        })?;
        let Some(torn) = torn else { return Ok((log, None)) };
        std::fs::OpenOptions::new().write(true).open(dir.join(LOG_FILE))?.set_len(torn.at)?;
        let warning = format!(
            "{}: {} at byte {} of {}; the {} bytes from there were cut",
            dir.join(LOG_FILE).display(),
            torn.reason,
            torn.at,
            bytes.len(),
            bytes.len() as u64 - torn.at
        );
        Ok((log, Some(warning)))
    }

    /// The log as the bytes of `raft.log` and `raft.state` (absent: a new node) hold it: every
    /// whole record up to the first one a crash left torn, which is reported for the caller to
    /// cut from the file.
    pub fn recover(
        bytes: &[u8],
        state: Option<&[u8]>,
        voters: Vec<u64>,
    ) -> Result<(ControllerLog, Option<TornTail>), DamagedState> {
        let mut log = ControllerLog {
            conf_state: ConfState { voters, ..Default::default() },
            hard_state: HardState::default(),
            entries: Vec::new(),
            ends: Vec::new(),
            positions: Vec::new(),
            file_len: 0,
            pending: PendingWrites::default(),
        };
        let mut at = 0usize;
        let mut torn = None;
        while at < bytes.len() {
            match log.parse_record(&bytes[at..]) {
                Ok((entry, len)) => {
                    let expected = log.ends.last().copied().unwrap_or(0);
                    let (_, count) = entry_offsets(&entry, expected).unwrap_or((expected, 1));
                    log.positions.push(at as u64);
                    log.ends.push(expected + count);
                    log.entries.push(entry);
                    at += len;
                }
                Err(reason) => {
                    torn = Some(TornTail { at: at as u64, reason });
                    break;
                }
            }
        }
        log.file_len = at as u64;
        log.pending.append_at = log.file_len;
        match state {
            Some(state)
                if state.len() == HARD_STATE_BYTES
                    && crc32c::crc32c(&state[..24]).to_be_bytes() == state[24..HARD_STATE_BYTES] =>
            {
                log.hard_state.term = be_u64(&state[0..]);
                log.hard_state.vote = be_u64(&state[8..]);
                log.hard_state.commit = be_u64(&state[16..]);
            }
            Some(_) => return Err(DamagedState),
            None => {}
        }
        Ok((log, torn))
    }

    /// The entries held, from index 1 (committed or not).
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    fn parse_record(&self, bytes: &[u8]) -> Result<(Entry, usize), String> {
        if bytes.len() < RECORD_HEADER + BODY_FIXED {
            return Err("a record cut short".into());
        }
        let body_len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        if !(BODY_FIXED..=RECORD_BYTES_MAX).contains(&body_len) || bytes.len() < RECORD_HEADER + body_len {
            return Err(format!("a record of {body_len} bytes that the file does not hold"));
        }
        let body = &bytes[RECORD_HEADER..RECORD_HEADER + body_len];
        if crc32c::crc32c(body).to_be_bytes() != bytes[4..8] {
            return Err("a record whose crc32c does not match".into());
        }
        let index = be_u64(&body[8..]);
        if index != self.entries.len() as u64 + 1 {
            return Err(format!("entry {index} where {} was expected", self.entries.len() + 1));
        }
        let mut entry = Entry {
            term: be_u64(body),
            index,
            data: bytes::Bytes::copy_from_slice(&body[BODY_FIXED..]),
            ..Default::default()
        };
        entry.set_entry_type(match body[16] {
            1 => EntryType::EntryConfChange,
            2 => EntryType::EntryConfChangeV2,
            _ => EntryType::EntryNormal,
        });
        Ok((entry, RECORD_HEADER + body_len))
    }

    /// The file writes made since the last call.
    pub fn take_writes(&mut self) -> PendingWrites {
        let next = PendingWrites { append_at: self.file_len, ..Default::default() };
        std::mem::replace(&mut self.pending, next)
    }
}

impl raft::Storage for ControllerLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(initial_state_for(&self.hard_state, &self.conf_state, self.entries.len() as u64))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        entries_between(&self.entries, low, high, max_size.into())
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        term_in(&self.entries, idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.entries.len() as u64)
    }

    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        // Never compacted: raft-rs never needs one.
        Err(raft::Error::Store(RaftStorageError::SnapshotTemporarilyUnavailable))
    }
}

impl ReplicaStore for ControllerLog {
    fn append(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        let Some(first) = entries.first() else { return Ok(()) };
        let last = self.entries.len() as u64;
        if first.index == 0 || first.index > last + 1 {
            return Err(StoreError::IndexGap { index: first.index, last });
        }
        let keep = (first.index - 1) as usize;
        if keep < self.entries.len() {
            let cut = self.positions[keep];
            self.entries.truncate(keep);
            self.ends.truncate(keep);
            self.positions.truncate(keep);
            self.file_len = cut;
            let later = PendingWrites { truncate_to: Some(cut), append_at: cut, ..Default::default() };
            self.pending.merge(later);
        }
        let mut bytes = Vec::new();
        for entry in entries {
            let expected = self.ends.last().copied().unwrap_or(0);
            let (base, count) = entry_offsets(entry, expected)?;
            if base != expected {
                return Err(StoreError::OffsetGap { index: entry.index, base, expected });
            }
            self.positions.push(self.file_len + bytes.len() as u64);
            encode_record(entry, &mut bytes);
            self.entries.push(entry.clone());
            self.ends.push(base + count);
        }
        let later = PendingWrites { append_at: self.file_len, append: bytes, ..Default::default() };
        self.file_len += later.append.len() as u64;
        self.pending.merge(later);
        Ok(())
    }

    fn set_hard_state(&mut self, hard_state: &HardState) -> Result<(), StoreError> {
        self.hard_state = hard_state.clone();
        let later = PendingWrites {
            append_at: self.file_len,
            hard_state: Some(encode_hard_state(hard_state)),
            ..Default::default()
        };
        self.pending.merge(later);
        Ok(())
    }

    fn end_offset(&self, index: u64) -> Option<i64> {
        match index {
            0 => Some(0),
            i => self.ends.get(usize::try_from(i - 1).ok()?).copied(),
        }
    }

    fn apply_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), StoreError> {
        // No controller log is ever compacted, so no leader sends one.
        Err(StoreError::Io(format!(
            "the controller's log takes no snapshots (one of entry {} arrived)",
            snapshot.get_metadata().index
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use raft::Storage;

    fn hard_state(term: u64, vote: u64, commit: u64) -> HardState {
        HardState { term, vote, commit, ..Default::default() }
    }

    fn entry(term: u64, index: u64, data: &'static [u8]) -> Entry {
        Entry { term, index, data: Bytes::from_static(data), ..Default::default() }
    }

    #[test]
    fn survives_reopen_truncation_and_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, warning) = ControllerLog::open(dir.path(), vec![1, 2, 3]).unwrap();
        assert!(warning.is_none());
        log.append(&[entry(1, 1, b""), entry(1, 2, b""), entry(1, 3, b"")]).unwrap();
        log.set_hard_state(&hard_state(1, 2, 2)).unwrap();
        log.take_writes().write_to(&mut DirFiles::new(dir.path().to_path_buf())).unwrap();
        // A new leader's entries replace index 3 on.
        log.append(&[entry(2, 3, b""), entry(2, 4, b"")]).unwrap();
        log.set_hard_state(&hard_state(2, 3, 3)).unwrap();
        log.take_writes().write_to(&mut DirFiles::new(dir.path().to_path_buf())).unwrap();
        let (reopened, warning) = ControllerLog::open(dir.path(), vec![1, 2, 3]).unwrap();
        assert!(warning.is_none());
        let terms: Vec<u64> = reopened.entries().iter().map(|e| e.term).collect();
        assert_eq!(terms, vec![1, 1, 2, 2]);
        assert_eq!(reopened.hard_state, hard_state(2, 3, 3));
        // A crash in the middle of a record: the record is cut, the rest stays.
        let file = dir.path().join(LOG_FILE);
        let len = std::fs::metadata(&file).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(len - 3).unwrap();
        let (cut, warning) = ControllerLog::open(dir.path(), vec![1, 2, 3]).unwrap();
        assert_eq!(cut.entries.len(), 3);
        assert!(warning.is_some_and(|w| w.contains("cut")));
        assert_eq!(cut.initial_state().unwrap().hard_state.commit, 3);
    }

    #[test]
    fn a_damaged_state_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), [7u8; 28]).unwrap();
        let err = ControllerLog::open(dir.path(), vec![1]).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("damaged")));
    }
}
