//! Storage engine: partition logs made of O_DIRECT segment files, their sparse indexes, the
//! per-shard tail cache, crash recovery, segment rolling and retention.
//!
//! Owns everything under a partition directory (`<base_offset:020>.log`, `.index`, `.timeindex`,
//! `.clean_shutdown.<promise>`, the producer-state `<offset:020>.snapshot`) and the per-shard storage
//! context (`ShardStorage`: tail cache, disk-space monitor). May depend on `crate::record` (batch
//! format), `crate::metrics` (one-line hooks: write and fsync latency, the tail cache's counter
//! type) and glommio; never on the server, shard routing, controller, groups or protocol layers. Everything is
//! shard-local (`Rc`, `RefCell`, `Cell`): a `Partition` is opened, written, read and closed by the
//! one shard that owns it.
//!
//! Layout of the code, from pure to IO:
//! - `index`, `scan`, `retention`, `tail_cache`: pure logic, unit- and property-tested.
//! - `producer_state`: idempotent producers' sequence rules and state snapshots (KIP-98).
//! - `descriptors`: how RLIMIT_NOFILE is shared out, and so how many active segment files a
//!   shard keeps open (`partition/idle.rs` releases the least recently used idle ones).
//! - `disk_space`, `notify`: small shard-local helpers; `blocking`: filesystem work run off the
//!   shard (unlinks, index writes, directory syncs); `group_sync`: the shard's group commit (one
//!   `syncfs` per round for all its partitions).
//! - `segment`: one segment's files and the recovery scan over them.
//! - `partition/`: one partition log, a file per concern: `append`, `flusher` (the one writer of a
//!   partition), `read`, `housekeeping` (roll by age, retention, truncation) and `recovery`;
//!   `partition/mod.rs` holds the shared state, open and close.
//!
//! Durability, precisely: `append` only stages bytes in memory. The partition's flusher writes
//! them with one O_DIRECT write at a time. With `Durability::Written` a batch counts as durable once
//! the write holding it completed (the device has it; a power loss may still lose it if the device
//! cache is volatile). With `Durability::Fsync` it counts once a sync that began after that write
//! completed: the shard's `syncfs` round, or the partition's `fdatasync` (`FsyncScope`). The high watermark, and with it everything consumers can read,
//! only covers durable batches.

pub(crate) mod blocking;
pub mod descriptors;
mod disk_space;
mod group_sync;
mod index;
pub(crate) mod notify;
mod partition;
mod producer_state;
mod retention;
mod scan;
mod segment;
mod tail_cache;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::path::PathBuf;
use std::rc::{Rc, Weak};

pub use group_sync::FsyncScope;
pub use index::{IndexEntry, SegmentIndex};
pub use partition::{Partition, ProducerLog};
#[cfg(test)]
pub(crate) use producer_state::ProducerBatch;
pub(crate) use producer_state::SNAPSHOT_BYTES_MAX as PRODUCER_SNAPSHOT_BYTES_MAX;
pub use producer_state::{
    ProducerStates, RequestVerdict, SequenceGap, SnapshotError as ProducerSnapshotError,
};
pub use tail_cache::CacheStats;

use crate::record::BatchError;
use disk_space::DiskSpace;
use group_sync::GroupSync;
use segment::Segment;
use tail_cache::TailCache;

/// When a produce is acknowledged (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// After the O_DIRECT write holding the batch completed.
    Written,
    /// After an fdatasync that started after that write (group commit).
    Fsync,
}

#[derive(Clone, Debug)]
pub struct LogConfig {
    /// Roll the active segment when an append would make it exceed this.
    pub segment_bytes: u64,
    /// Roll the active segment when its first batch is older than this.
    pub segment_ms: u64,
    /// Per partition; delete the oldest whole segments beyond this.
    pub retention_bytes: Option<u64>,
    /// Delete whole segments whose newest record is older than this.
    pub retention_ms: Option<u64>,
    pub durability: Durability,
    /// Sparse index: one entry per this many bytes of log.
    pub index_interval_bytes: u32,
    /// Enforced on append.
    pub batch_bytes_max: usize,
    /// Enforced on append.
    pub records_per_batch_max: u32,
    /// What readers may see: everything durable (one copy: a single node), or what consensus
    /// committed (`Partition::commit_to`; a replica of a replicated partition).
    pub visibility: Visibility,
}

/// Where a partition's high watermark, the end of what readers see, comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Visibility {
    /// The high watermark follows the durable end (`Durability`): nothing else has to agree.
    #[default]
    Durable,
    /// The high watermark is set by the replication layer (`Partition::commit_to`), never past the
    /// local durable end; it starts at the log start after an open, until consensus says more.
    Committed,
}

impl Default for LogConfig {
    fn default() -> LogConfig {
        LogConfig {
            segment_bytes: 1 << 30,
            segment_ms: 7 * 24 * 3600 * 1000,
            retention_bytes: None,
            retention_ms: Some(7 * 24 * 3600 * 1000),
            durability: Durability::Fsync,
            index_interval_bytes: 4096,
            batch_bytes_max: 1 << 20,
            records_per_batch_max: 1 << 20,
            visibility: Visibility::Durable,
        }
    }
}

#[derive(thiserror::Error, Debug)]
pub enum StorageError {
    #[error("batch {index} (at byte {position} of the request) was rejected: {source}")]
    InvalidBatch {
        index: usize,
        position: usize,
        #[source]
        source: BatchError,
    },
    #[error(
        "offset {requested} is out of range: the log starts at {log_start} and the high watermark is {high_watermark}"
    )]
    OffsetOutOfRange { requested: i64, log_start: i64, high_watermark: i64 },
    #[error(
        "disk almost full under {}: {free_bytes} bytes free, {reserve_bytes} reserved; produce is refused until space is freed",
        dir.display()
    )]
    StorageFull { free_bytes: u64, reserve_bytes: u64, dir: PathBuf },
    #[error("corrupt data in {}: byte {position}: {detail}", segment.display())]
    Corrupt { segment: PathBuf, position: u64, detail: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
        /// The OS error number, kept apart: glommio's errors lose it when they become
        /// `std::io::Error`, and callers classify by it (descriptors exhausted, disk full).
        errno: Option<i32>,
    },
    #[error(
        "writing {} failed, offsets from {first_lost_offset} were not persisted and were rolled back: {detail}",
        segment.display()
    )]
    WriteFailed { segment: PathBuf, first_lost_offset: i64, detail: String },
    #[error(
        "producer {producer_id} with epoch {epoch} is fenced (batch {index} of the request): epoch {current_epoch} has written to this partition since"
    )]
    ProducerFenced { index: usize, producer_id: i64, epoch: i16, current_epoch: i16 },
    #[error(
        "out-of-order sequence: batch {index} of the request, from producer {producer_id} epoch {epoch}, starts at sequence {first_sequence}; {gap}"
    )]
    OutOfOrderSequence { index: usize, producer_id: i64, epoch: i16, first_sequence: i32, gap: SequenceGap },
    #[error("partition is being truncated; retry the append")]
    Truncating,
    #[error(
        "replicated batch {index} starts at offset {found} but the log continues at {expected}: the leader's log and this one disagree"
    )]
    OffsetMismatch { index: usize, expected: i64, found: i64 },
    #[error("refusing to truncate to offset {offset}: offsets below the high watermark {high_watermark} are committed")]
    TruncatingCommitted { offset: i64, high_watermark: i64 },
    #[error("partition is closed")]
    Closed,
}

impl StorageError {
    pub(crate) fn io(context: impl Into<String>, source: impl Into<IoFailure>) -> StorageError {
        let IoFailure { error, errno } = source.into();
        StorageError::Io { context: context.into(), source: error, errno }
    }

    /// The process or the system ran out of file descriptors (EMFILE, ENFILE): an operator's
    /// limit (`LimitNOFILE`), not damage.
    pub fn is_out_of_descriptors(&self) -> bool {
        matches!(self, StorageError::Io { errno: Some(libc::EMFILE | libc::ENFILE), .. })
    }
}

/// An I/O failure with its OS error number, from `std` or from glommio.
pub(crate) struct IoFailure {
    error: std::io::Error,
    errno: Option<i32>,
}

impl From<std::io::Error> for IoFailure {
    fn from(error: std::io::Error) -> IoFailure {
        IoFailure { errno: error.raw_os_error(), error }
    }
}

impl<T> From<glommio::GlommioError<T>> for IoFailure {
    fn from(e: glommio::GlommioError<T>) -> IoFailure {
        let errno = match &e {
            glommio::GlommioError::IoError(source)
            | glommio::GlommioError::EnhancedIoError { source, .. } => source.raw_os_error(),
            _ => None,
        };
        IoFailure { error: e.into(), errno }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendResult {
    pub base_offset: i64,
    pub last_offset: i64,
    pub log_start_offset: i64,
    /// An idempotent producer's retry of batches already in the log: nothing was written and
    /// the offsets are the originals'.
    pub duplicate: bool,
}

#[derive(Clone, Debug)]
pub struct ReadResult {
    /// Whole batches, in offset order.
    pub chunks: Vec<bytes::Bytes>,
    pub high_watermark: i64,
    pub log_start_offset: i64,
}

/// A torn or damaged tail found by recovery and cut off.
#[derive(Clone, Debug)]
pub struct TornTail {
    pub segment: PathBuf,
    pub position: u64,
    pub bytes_dropped: u64,
    /// Last offset kept in this segment, if any.
    pub last_good_offset: Option<i64>,
    pub detail: String,
}

#[derive(Clone, Debug, Default)]
pub struct RecoveryReport {
    pub dir: PathBuf,
    pub clean_shutdown: bool,
    pub segments_found: usize,
    pub segments_scanned: usize,
    /// Log bytes read by the scans (a tail scan counts only the tail).
    pub bytes_scanned: u64,
    pub indexes_loaded: usize,
    pub indexes_rebuilt: usize,
    pub torn_tails: Vec<TornTail>,
    /// Segments deleted because an earlier segment lost data (their offsets would not follow).
    pub segments_removed: Vec<PathBuf>,
    pub log_start_offset: i64,
    pub log_end_offset: i64,
}

impl fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "recovered {}: {} segments ({} scanned, {} bytes, {} indexes loaded, {} rebuilt), offsets {}..{}, {}",
            self.dir.display(),
            self.segments_found,
            self.segments_scanned,
            self.bytes_scanned,
            self.indexes_loaded,
            self.indexes_rebuilt,
            self.log_start_offset,
            self.log_end_offset,
            if self.clean_shutdown { "clean shutdown" } else { "no clean-shutdown marker" },
        )?;
        for t in &self.torn_tails {
            write!(
                f,
                "; truncated {} at byte {} ({} bytes dropped, last good offset {:?}: {})",
                t.segment.display(),
                t.position,
                t.bytes_dropped,
                t.last_good_offset,
                t.detail
            )?;
        }
        for s in &self.segments_removed {
            write!(f, "; removed {}", s.display())?;
        }
        Ok(())
    }
}

/// What opening a set of partitions found, summed for one log line.
#[derive(Clone, Debug, Default)]
pub struct RecoverySummary {
    pub partitions: usize,
    /// Partitions without a clean-shutdown marker.
    pub after_crash: usize,
    pub segments: usize,
    pub segments_scanned: usize,
    pub bytes_scanned: u64,
    pub indexes_rebuilt: usize,
    /// Torn or damaged tails cut off, and the bytes they held.
    pub truncated: usize,
    pub bytes_dropped: u64,
    pub segments_removed: usize,
}

impl RecoverySummary {
    pub fn add(&mut self, r: &RecoveryReport) {
        self.partitions += 1;
        self.after_crash += usize::from(!r.clean_shutdown);
        self.segments += r.segments_found;
        self.segments_scanned += r.segments_scanned;
        self.bytes_scanned += r.bytes_scanned;
        self.indexes_rebuilt += r.indexes_rebuilt;
        self.truncated += r.torn_tails.len();
        self.bytes_dropped += r.torn_tails.iter().map(|t| t.bytes_dropped).sum::<u64>();
        self.segments_removed += r.segments_removed.len();
    }

    pub fn merge(&mut self, other: &RecoverySummary) {
        self.partitions += other.partitions;
        self.after_crash += other.after_crash;
        self.segments += other.segments;
        self.segments_scanned += other.segments_scanned;
        self.bytes_scanned += other.bytes_scanned;
        self.indexes_rebuilt += other.indexes_rebuilt;
        self.truncated += other.truncated;
        self.bytes_dropped += other.bytes_dropped;
        self.segments_removed += other.segments_removed;
    }
}

impl fmt::Display for RecoverySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} partitions ({} without a clean shutdown), {} segments, {} scanned ({} bytes), {} indexes \
             rebuilt, ",
            self.partitions,
            self.after_crash,
            self.segments,
            self.segments_scanned,
            self.bytes_scanned,
            self.indexes_rebuilt,
        )?;
        // Damage is named only when there was some, so a log search for it finds only real cuts.
        match self.truncated {
            0 => write!(f, "no damaged tails")?,
            n => write!(f, "{n} torn tails truncated ({} bytes dropped)", self.bytes_dropped)?,
        }
        write!(f, ", {} segments removed", self.segments_removed)
    }
}

#[derive(Clone, Debug, Default)]
pub struct HousekeepReport {
    /// Base offset of the segment rolled by age or time retention, if any.
    pub rolled_segment: Option<i64>,
    /// (base offset, bytes) of each deleted segment.
    pub segments_deleted: Vec<(i64, u64)>,
    pub log_start_offset: i64,
}

impl fmt::Display for HousekeepReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rolled_segment {
            Some(base) => write!(f, "rolled segment {base}")?,
            None => write!(f, "no roll")?,
        }
        let bytes: u64 = self.segments_deleted.iter().map(|(_, b)| b).sum();
        write!(
            f,
            ", deleted {} segments ({bytes} bytes), log start {}",
            self.segments_deleted.len(),
            self.log_start_offset
        )
    }
}

/// Per-shard storage context: the tail cache (one memory budget shared by the shard's
/// partitions, LRU), the disk-space monitor for the data directory, the bounded set of sealed
/// segment files open for reads and the bounded set of partitions whose active file is open.
pub struct ShardStorage {
    data_dir: PathBuf,
    tail_cache: RefCell<TailCache>,
    disk_space: DiskSpace,
    next_partition_id: Cell<u64>,
    /// Sealed segments whose files are open for reads, least recently read first; at most
    /// `descriptors::SEALED_FILES_PER_SHARD` (part of the descriptor reserve).
    sealed_open: RefCell<VecDeque<Weak<Segment>>>,
    /// Partitions whose active segment file may be open, in the order they joined; swept as a
    /// clock (one used since the last sweep is passed over once) when the slots run out.
    active_open: RefCell<VecDeque<Weak<Partition>>>,
    active_files_max: Cell<usize>,
    /// Slots taken: partitions allowed to hold their active file open (one each, until its
    /// release has closed it). Opening waits for a slot, so descriptors stay bounded even when
    /// one request touches thousands of partitions at once.
    file_slots_taken: Cell<usize>,
    /// Of those, slots whose release is under way (given back when its close is done).
    file_slots_releasing: Cell<usize>,
    fsync_scope: Cell<FsyncScope>,
    /// The shard's group commit under `FsyncScope::Filesystem`.
    group_sync: GroupSync,
}

impl ShardStorage {
    pub fn new(
        data_dir: PathBuf,
        tail_cache_bytes: usize,
        free_space_reserve_bytes: u64,
    ) -> Rc<ShardStorage> {
        Rc::new(ShardStorage {
            disk_space: DiskSpace::new(data_dir.clone(), free_space_reserve_bytes),
            group_sync: GroupSync::new(data_dir.clone()),
            fsync_scope: Cell::new(FsyncScope::default()),
            data_dir,
            tail_cache: RefCell::new(TailCache::new(tail_cache_bytes)),
            next_partition_id: Cell::new(0),
            sealed_open: RefCell::new(VecDeque::new()),
            active_open: RefCell::new(VecDeque::new()),
            active_files_max: Cell::new(descriptors::ACTIVE_FILES_PER_SHARD_MIN),
            file_slots_taken: Cell::new(0),
            file_slots_releasing: Cell::new(0),
        })
    }

    /// Takes a slot for one active file, first releasing idle partitions' files when none is
    /// free; while every holder is busy (writing, syncing), waits for one to finish. Taking one
    /// of the last few free slots starts releases for the openers after it.
    async fn take_file_slot(&self) {
        loop {
            if self.file_slots_taken.get() < self.active_files_max.get() {
                self.file_slots_taken.set(self.file_slots_taken.get() + 1);
                if self.file_slots_taken.get() + self.file_slots_headroom() > self.active_files_max.get() {
                    self.sweep();
                }
                return;
            }
            self.sweep();
            if self.file_slots_taken.get() < self.active_files_max.get() {
                continue;
            }
            // Releases free slots when their close is done; busy holders become idle without
            // telling anyone: look again shortly.
            glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    fn give_back_file_slot(&self) {
        self.file_slots_taken.set(self.file_slots_taken.get().saturating_sub(1));
    }

    fn file_slot_releasing(&self, releasing: bool) {
        let n = self.file_slots_releasing.get();
        self.file_slots_releasing.set(if releasing { n + 1 } else { n.saturating_sub(1) });
    }

    /// Slots the sweep keeps free (or being freed) ahead of need, so an opener seldom waits for
    /// a release's sync, truncation and close: one in 32.
    fn file_slots_headroom(&self) -> usize {
        (self.active_files_max.get() / 32).max(1)
    }

    /// Slots neither free nor about to be.
    fn file_slots_kept(&self) -> usize {
        self.file_slots_taken.get().saturating_sub(self.file_slots_releasing.get())
    }

    /// Bounds the active segment files this shard keeps open (`descriptors::DescriptorBudget`).
    pub fn set_active_files_max(&self, files: usize) {
        self.active_files_max.set(files.max(descriptors::ACTIVE_FILES_PER_SHARD_MIN));
    }

    /// How this shard's partitions make their writes durable under `Durability::Fsync`.
    pub fn set_fsync_scope(&self, scope: FsyncScope) {
        self.fsync_scope.set(scope);
    }

    fn fsync_scope(&self) -> FsyncScope {
        self.fsync_scope.get()
    }

    /// Partitions whose active file may be open now (at most the bound, unless every one of them
    /// was busy when the last joined).
    pub fn active_files(&self) -> usize {
        self.active_open.borrow().len()
    }

    /// `partition` is in use and may open its active file: it joins the set the sweep visits.
    fn note_active_open(&self, partition: Weak<Partition>) {
        self.active_open.borrow_mut().push_back(partition);
        if self.file_slots_taken.get() + self.file_slots_headroom() > self.active_files_max.get() {
            self.sweep();
        }
    }

    /// Asks the least recently used idle partitions to release their active files until the
    /// headroom is free or being freed. One pass at most: busy partitions stay, for a later sweep.
    fn sweep(&self) {
        let mut open = self.active_open.borrow_mut();
        let max = self.active_files_max.get();
        let mut visits = open.len();
        while self.file_slots_kept() + self.file_slots_headroom() > max && visits > 0 {
            visits -= 1;
            let Some(weak) = open.pop_front() else { break };
            let Some(p) = weak.upgrade() else { continue };
            if p.take_recent_use() || !p.release_active_file() {
                open.push_back(weak);
            }
        }
    }

    /// `seg`, sealed, was just read with its file open: it becomes the most recently read, and
    /// the least recently read beyond the bound close their files.
    fn note_sealed_read(&self, seg: &Rc<Segment>) {
        let mut open = self.sealed_open.borrow_mut();
        let me = Rc::downgrade(seg);
        open.retain(|w| w.strong_count() > 0 && !w.ptr_eq(&me));
        open.push_back(me);
        while open.len() > descriptors::SEALED_FILES_PER_SHARD {
            let Some(seg) = open.pop_front().and_then(|w| w.upgrade()) else { continue };
            glommio::spawn_local(async move { seg.close_file().await }).detach();
        }
    }

    /// Makes everything written under the data directory durable with one syncfs, on the blocking
    /// thread: after closing every partition, instead of a directory fsync per partition.
    pub async fn sync_filesystem(&self) -> Result<(), StorageError> {
        let dir = self.data_dir.clone();
        let synced = blocking::run(move || {
            use std::os::fd::AsRawFd;
            let handle = std::fs::File::open(&dir)?;
            // SAFETY: syncfs on a descriptor we hold open for the call; no memory is passed.
            match unsafe { libc::syncfs(handle.as_raw_fd()) } {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|synced| synced);
        synced.map_err(|e| {
            StorageError::io(format!("syncing the filesystem of {}", self.data_dir.display()), e)
        })
    }

    /// Re-reads free space of the data directory (statvfs). Produce is refused while free space
    /// is below the reserve and resumes by itself once space is freed.
    pub fn refresh_disk_space(&self) {
        self.disk_space.refresh();
    }

    /// `StorageFull` while free space is below the reserve (as of the last refresh).
    pub fn check_disk_space(&self) -> Result<(), StorageError> {
        self.disk_space.check().map_err(|_| self.storage_full())
    }

    /// A value that changes with every append, read and deletion on this shard (see
    /// `TailCache::activity`): housekeeping compares it between runs to tell an idle shard.
    pub fn activity(&self) -> (u64, u64, usize) {
        self.tail_cache.borrow().activity()
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.tail_cache.borrow().stats()
    }

    /// The tail cache's memory: its batches, the allocations they pin, its bookkeeping.
    pub fn cache_memory(&self) -> [(crate::metrics::Memory, usize); 3] {
        use crate::metrics::Memory;
        let cache = self.tail_cache.borrow();
        [
            (Memory::TailCache, cache.stats().used_bytes),
            (Memory::TailCachePinned, cache.pinned_bytes()),
            (Memory::TailCacheIndex, cache.index_bytes()),
        ]
    }

    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    fn allocate_partition_id(&self) -> u64 {
        let id = self.next_partition_id.get();
        self.next_partition_id.set(id + 1);
        id
    }

    fn storage_full(&self) -> StorageError {
        StorageError::StorageFull {
            free_bytes: self.disk_space.free_bytes(),
            reserve_bytes: self.disk_space.reserve_bytes(),
            dir: self.disk_space.dir().to_path_buf(),
        }
    }
}
