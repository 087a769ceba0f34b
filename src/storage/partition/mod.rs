//! One partition log: appends, the flusher, reads, offsets by time, housekeeping (roll by age,
//! retention), truncation, a replica's restart at a new start, recovery on open and clean close.
//!
//! Owns the partition directory and the state of its segments. May call `segment`, `index`,
//! `scan`, `retention`, the shard's tail cache and disk monitor, `record`, glommio. Never blocks
//! the shard on the data path except for the rare metadata syscalls named below.
//!
//! Layout: this file holds the shared state (`Partition`, `State`, the job queue's types), `open`,
//! `close`, `remove`, the accessors and the small helpers every part uses. `append`: validation,
//! staging into chunks, preallocation and the spare segment, roll. `flusher`: the flusher task
//! (writes, fdatasync, seal, rollback of a failed write) and `wait_durable`. `read`: fetches, long
//! polls, offsets by time. `housekeeping`: roll by age, retention, truncation, and the restart of
//! a replica's whole log at its leader's snapshot (`restart_at`). `recovery`: segments and
//! producer state rebuilt on open (and after a truncation), the carried block, snapshots past a
//! cut.
//!
//! Write path. `append` (synchronous: call order is offset order) validates, stamps offsets and
//! copies the batches once into the tail of a queue of 4 KiB-aligned chunks (`DmaBuffer`s). The
//! flusher, one detached task per partition, pops chunks and writes each with O_DIRECT; exactly one
//! chunk is in flight per partition, so rewrites of the partial last block never reorder. A chunk
//! starts at the aligned position below the segment end and carries a copy of that partial block
//! (at most 4 KiB), which is rewritten with the new bytes as a write of its own (see `Chunk`).
//! Appends that arrive during a write fill the next chunk: group commit. With `Durability::Fsync`
//! the flusher waits for one sync per round after its writes (the shard's syncfs round, shared with
//! the shard's other partitions, or an fdatasync of its own), then advances the durable end.
//!
//! Visibility. Two ends: the durable end (what `wait_durable` waits for) and the high watermark
//! (what readers see, never above it). A single node's high watermark follows the durable end
//! (`Visibility::Durable`). A replica of a replicated partition (`Visibility::Committed`) shows
//! only what consensus committed (`commit_to`), starts from the log start after an open, refuses
//! to truncate below it, and takes its leader's batches as stamped (`append_replicated`).
//!
//! Space is reserved before a byte is accepted: `append` checks that the active segment is
//! preallocated past the new end and, if not, calls `fallocate` synchronously, so ENOSPC surfaces
//! as `StorageFull` from `append` itself. That synchronous call is the fallback, not the rule: once
//! less than half a step of reserved space remains, the next step (as much again as the file
//! holds, 256 KiB to `PREALLOCATE_STEP_BYTES`) is reserved on the blocking thread pool, and once
//! the active segment is in its last step the next segment file is created and preallocated there
//! too (a spare, renamed into place on roll). Everything else slow on the filesystem also runs
//! there (`blocking`): unlinking deleted segments, writing the indexes and syncing the directory
//! when a segment is sealed.
//!
//! Descriptors: a partition holds at most one, its active segment's, and only while used (`idle`):
//! open and recovery close every file they opened; the first append, read or write opens the
//! active one again, and the shard's bounded set of open active files
//! (`ShardStorage::note_active_open`) releases the least recently used idle ones. An append that
//! finds the file closed stages its bytes and starts the reservation on the blocking pool; the
//! flusher's first write may extend the file (so ENOSPC then fails the write, which is rolled
//! back, instead of the append). Sealed segments are opened only to be read and closed again by
//! the shard's bounded set (`ShardStorage::note_sealed_read`); a spare holds none; a roll creates
//! the new segment (reserving an append's space in it) and closes it, and a seal of a closed
//! segment does what it still needs by path on the blocking pool.
//!
//! Recovery checkpoints: with `Durability::Fsync`, housekeeping writes the active segment's index
//! covering its synced bytes (`checkpoint_active`), so recovery after a crash scans only what
//! follows; after a clean shutdown only the active segment's last block is read again and its
//! batches checked (damage at rest there is cut, as after a crash).
//!
//! Idempotent producers (`producer_state`). `append` checks every idempotent batch against the
//! producer state once nothing else can fail the append, and records it in the same step: a
//! retried batch is answered with its original offsets and not written again. The state is
//! persisted as a snapshot at each roll (taken at the roll, written by the seal once the sealed
//! segment is synced, so it never covers bytes that are not durable) and at close when there is
//! any state (the clean-shutdown marker says which: `recovery::Promise`); `open` loads the newest
//! usable snapshot and replays the batch headers after it, or nothing when the marker promised
//! no state. Whatever cuts the log (a
//! failed write, `truncate_to`, recovery's torn tails) cuts the state too, and removes snapshots
//! past the cut before new appends could make them look valid.
//!
//! Failures. A failed write rolls the in-memory log back to the end of the last completed write
//! (those offsets were never acknowledged), fails their durability waiters, and marks the partition
//! degraded; the next append rewrites from there. A failed fdatasync cannot be retried safely (the
//! kernel may have dropped the dirty pages), so the partition stops accepting appends until it is
//! reopened and recovery has re-read what is really on disk.

mod append;
mod flusher;
mod housekeeping;
mod idle;
mod read;
mod recovery;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::rc::{Rc, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use super::blocking;
use super::notify::Notify;
use super::producer_state::{self, ProducerStates};
use super::segment::{align_down, parse_log_name, Segment};
use super::{LogConfig, RecoveryReport, ShardStorage, StorageError, Visibility};
use crate::metrics::Memory;
pub use append::ProducerLog;
use append::{Chunk, SpareSlot};
use flusher::Rollback;
use recovery::{read_carry, recover_producer_state, recover_segments, Promise};

/// Recovery refuses to believe a length field larger than this (a scribbled header).
const RECOVERY_BATCH_BYTES_MAX: usize = 256 << 20;
const CLEAN_SHUTDOWN_MARKER: &str = ".clean_shutdown";
/// The next segment's file, created and preallocated ahead of the roll. Recovery ignores it (not
/// a `<base_offset>.log` name) and open removes a leftover one.
const SPARE_SEGMENT_NAME: &str = ".spare-segment";

enum Job {
    Write(Chunk),
    /// The segment was rolled: sync it, truncate the file to its size, persist its indexes and
    /// the producer-state snapshot taken at the roll.
    Seal(Rc<Segment>, ProducerSnapshot),
}

/// The producer state at `offset` (after every batch below it), encoded, waiting to be written.
struct ProducerSnapshot {
    offset: i64,
    bytes: Vec<u8>,
}

/// The active segment's partial last block, for the next chunk to start with.
struct Carry {
    file_pos: u64,
    bytes: Vec<u8>,
}

struct State {
    /// Ordered by base offset; never empty; the last one is active.
    segments: Vec<Rc<Segment>>,
    pending: VecDeque<Job>,
    carry: Carry,
    rollbacks: VecDeque<Rollback>,
    rollback_generation: u64,
    /// A write failed and was rolled back; cleared by the next successful write.
    degraded: bool,
    /// An fdatasync failed: no more appends until reopened.
    sync_failure: Option<String>,
    /// The flusher is executing a job.
    flushing: bool,
    /// A checkpoint of the active segment's index is being written (`checkpoint_active`).
    checkpointing: bool,
    /// Log bytes of the active segment the last checkpoint covers.
    checkpointed_bytes: u64,
    truncating: bool,
    /// The idle active file is being synced, cut to size and closed (`idle`): no write may start.
    releasing: bool,
    /// A write completed that no fdatasync has covered yet.
    unsynced: bool,
    /// Idempotent producers: epochs and the last batches of each, for every batch in the log.
    producers: ProducerStates,
}

pub struct Partition {
    dir: PathBuf,
    config: LogConfig,
    shard: Rc<ShardStorage>,
    /// Key of this partition in the shard's tail cache.
    cache_id: u64,
    state: RefCell<State>,
    /// Offsets below are durable by the durability policy: what `wait_durable` waits for and what
    /// a replica reports to consensus as persisted.
    durable_end: Cell<i64>,
    /// Offsets below are visible to readers: the durable end under `Visibility::Durable`, what
    /// `commit_to` set under `Visibility::Committed`. Never above the durable end.
    high_watermark: Cell<i64>,
    /// Retention keeps every segment holding offsets at or above this, whatever its limits: a
    /// replica's open scan starts at its saved anchor (`keep_from`).
    retention_floor: Cell<i64>,
    log_start_offset: Cell<i64>,
    log_end_offset: Cell<i64>,
    closed: Cell<bool>,
    /// A flusher task is alive: from the first job queued until the partition's active file is
    /// released or the partition closes. An idle partition has none (its future is ~2 KB, most
    /// of an idle partition's memory).
    flusher_running: Cell<bool>,
    /// Wakes a running flusher: new jobs, the active file released, close.
    flush_wanted: Rc<Notify>,
    /// Wakes waiters: high watermark moved, rollback, flusher idle or stopped, close.
    progress: Notify,
    spare: Rc<SpareSlot>,
    /// This partition, for the shard's set of open active files (`idle`).
    self_ref: Weak<Partition>,
    /// In the shard's set of partitions whose active file may be open.
    in_open_set: Cell<bool>,
    /// Used since the shard's last sweep of that set.
    recently_used: Cell<bool>,
    /// Holds one of the shard's slots for open active files (`idle`).
    holds_file_slot: Cell<bool>,
    /// Reads of the active segment under way: the file may not be released under them.
    active_readers: Cell<usize>,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn active(st: &State) -> &Rc<Segment> {
    st.segments.last().expect("a partition always has an active segment")
}

/// The active segment's descriptor for synchronous calls (fallocate): its DmaFile's, or the plain
/// one a roll opened before the DmaFile was.
fn active_fd(st: &State) -> Option<std::os::fd::RawFd> {
    use std::os::fd::AsRawFd;
    active(st).open_file().map(|f| f.as_raw_fd())
}

fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StorageError::io(format!("syncing directory {}", dir.display()), e))
}

/// Creates `path` (truncating what is there) with `reserve_bytes` allocated, and closes it again:
/// a new segment holds no descriptor until its partition's flusher opens it through a slot. On
/// failure nothing is left behind.
fn create_segment_file(path: &Path, reserve_bytes: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(path)?;
    if reserve_bytes > 0 {
        if let Err(e) = append::fallocate(file.as_raw_fd(), reserve_bytes) {
            drop(file);
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
    }
    Ok(())
}

fn remove_segment_files(seg: &Segment) {
    for path in [seg.log_path.clone(), seg.index_path(), seg.time_index_path()] {
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "could not remove segment file");
            }
        }
    }
}

impl Partition {
    /// Opens (or creates) the partition directory and recovers it.
    pub async fn open(
        dir: PathBuf,
        config: LogConfig,
        shard: Rc<ShardStorage>,
    ) -> Result<(Rc<Partition>, RecoveryReport), StorageError> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| StorageError::io(format!("creating {}", dir.display()), e))?;
        super::segment::probe_device(&dir).await?;
        let mut report = RecoveryReport { dir: dir.clone(), ..RecoveryReport::default() };
        let mut bases: Vec<i64> = Vec::new();
        let mut markers: Vec<String> = Vec::new();
        for entry in
            std::fs::read_dir(&dir).map_err(|e| StorageError::io(format!("listing {}", dir.display()), e))?
        {
            let Some(name) = entry.ok().and_then(|e| e.file_name().into_string().ok()) else { continue };
            match parse_log_name(&name) {
                Some(base) => bases.push(base),
                None if name.starts_with(CLEAN_SHUTDOWN_MARKER) => markers.push(name),
                None => {}
            }
        }
        bases.sort_unstable();
        // The marker is gone before anything can change: from here on the log is in use.
        let promise = markers.iter().find_map(|name| Promise::from_marker_name(name));
        report.clean_shutdown = promise.is_some();
        for name in markers {
            let marker = dir.join(name);
            std::fs::remove_file(&marker)
                .map_err(|e| StorageError::io(format!("removing {}", marker.display()), e))?;
        }
        report.segments_found = bases.len();
        let spare_path = dir.join(SPARE_SEGMENT_NAME);
        match std::fs::remove_file(&spare_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(StorageError::io(format!("removing {}", spare_path.display()), e));
            }
            _ => {}
        }

        let segments = recover_segments(&dir, &config, &bases, &mut report).await?;
        let segments = if segments.is_empty() {
            let seg = Rc::new(Segment::new(&dir, 0, config.index_interval_bytes));
            create_segment_file(&seg.log_path, 0)
                .map_err(|e| StorageError::io(format!("creating {}", seg.log_path.display()), e))?;
            vec![seg]
        } else {
            segments
        };

        let last = segments.last().expect("at least one segment").clone();
        let (size, carry) = {
            let mut meta = last.meta.borrow_mut();
            meta.sealed = false;
            (
                meta.size_bytes,
                // Empty until there is a partial block: no per-partition buffer before a write.
                Carry { file_pos: align_down(meta.size_bytes), bytes: Vec::new() },
            )
        };
        let mut carry = carry;
        read_carry(&last, size, &mut carry).await?;

        let log_start = segments[0].base_offset;
        let log_end = last.meta.borrow().next_offset;
        report.log_start_offset = log_start;
        report.log_end_offset = log_end;
        let producers = recover_producer_state(&dir, &segments, log_start, log_end, promise).await?;
        // Recovery and replay opened files; none stays open: the first append, read or write
        // opens the active one again (`idle`), reads reopen sealed ones on demand.
        for seg in &segments {
            seg.close_file().await;
        }
        let high_watermark = match config.visibility {
            Visibility::Durable => log_end,
            // What was committed before the restart is not known here: consensus tells again.
            Visibility::Committed => log_start,
        };

        let partition = Rc::new_cyclic(|self_ref| Partition {
            cache_id: shard.allocate_partition_id(),
            dir,
            config,
            shard,
            state: RefCell::new(State {
                segments,
                pending: VecDeque::new(),
                carry,
                rollbacks: VecDeque::new(),
                rollback_generation: 0,
                degraded: false,
                sync_failure: None,
                flushing: false,
                checkpointing: false,
                checkpointed_bytes: 0,
                truncating: false,
                releasing: false,
                unsynced: false,
                producers,
            }),
            durable_end: Cell::new(log_end),
            high_watermark: Cell::new(high_watermark),
            retention_floor: Cell::new(i64::MAX),
            log_start_offset: Cell::new(log_start),
            log_end_offset: Cell::new(log_end),
            closed: Cell::new(false),
            flusher_running: Cell::new(false),
            flush_wanted: Rc::new(Notify::default()),
            progress: Notify::default(),
            spare: Rc::new(SpareSlot::default()),
            self_ref: self_ref.clone(),
            in_open_set: Cell::new(false),
            recently_used: Cell::new(false),
            holds_file_slot: Cell::new(false),
            active_readers: Cell::new(0),
        });
        tracing::debug!("{report}");
        Ok((partition, report))
    }

    pub fn high_watermark(&self) -> i64 {
        self.high_watermark.get()
    }

    /// The offset after the last durable one (by the durability policy).
    pub fn durable_end_offset(&self) -> i64 {
        self.durable_end.get()
    }

    /// Under `Visibility::Committed`: consensus committed every offset below `offset`, and this
    /// replica holds them durably; readers may see them. Lower values than the current high
    /// watermark are ignored (it never goes back).
    pub fn commit_to(&self, offset: i64) {
        assert_eq!(
            self.config.visibility,
            Visibility::Committed,
            "commit_to on a partition that is not replicated"
        );
        assert!(
            offset <= self.durable_end.get(),
            "committing offset {offset} past the durable end {}: readers would see what a crash can lose",
            self.durable_end.get()
        );
        if offset > self.high_watermark.get() {
            self.high_watermark.set(offset);
            self.progress.notify_all();
        }
    }

    /// The flusher made every offset below `end_offset` durable.
    pub(super) fn advance_durable_end(&self, end_offset: i64) {
        if end_offset <= self.durable_end.get() {
            return;
        }
        self.durable_end.set(end_offset);
        if self.config.visibility == Visibility::Durable {
            self.high_watermark.set(end_offset);
        }
        self.progress.notify_all();
    }

    /// Retention may delete only segments wholly below `offset` from now on.
    pub fn keep_from(&self, offset: i64) {
        self.retention_floor.set(offset);
    }

    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    /// The partition's directory (a replica keeps its consensus files beside the segments).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn log_start_offset(&self) -> i64 {
        self.log_start_offset.get()
    }

    pub fn log_end_offset(&self) -> i64 {
        self.log_end_offset.get()
    }

    /// Flushes, fdatasyncs, persists indexes, writes the clean-shutdown marker and closes files.
    /// The marker and indexes are not synced here (see `ShardStorage::sync_filesystem`).
    pub async fn close(&self) -> Result<(), StorageError> {
        let already = self.closed.replace(true);
        self.flush_wanted.notify_all();
        loop {
            let notified = self.progress.notified();
            if !self.flusher_running.get() {
                break;
            }
            notified.await;
        }
        if already {
            return Ok(());
        }
        self.wait_released().await;
        self.discard_spare().await;
        let (segments, sync_failure, unsynced) = {
            let mut st = self.state.borrow_mut();
            (std::mem::take(&mut st.segments), st.sync_failure.clone(), st.unsynced)
        };
        let result = async {
            if sync_failure.is_some() {
                return Ok(());
            }
            let Some(last) = segments.last() else { return Ok(()) };
            last.wait_preallocation_idle().await;
            let (size, reserved) = {
                let meta = last.meta.borrow();
                (meta.size_bytes, meta.preallocated_bytes)
            };
            // A file released while idle, or never written since open, is synced and cut to size
            // already: closing it costs no reopen.
            if unsynced || reserved > size {
                if last.open_file().is_none() {
                    // Thousands of partitions close at once: reopening counts against the slots.
                    self.ensure_file_slot().await;
                }
                let file = last.file().await?;
                file.fdatasync()
                    .await
                    .map_err(|e| StorageError::io(format!("syncing {}", last.log_path.display()), e))?;
                file.truncate(size)
                    .await
                    .map_err(|e| StorageError::io(format!("truncating {}", last.log_path.display()), e))?;
            }
            self.wait_checkpoint_written().await;
            let indexes = last.encoded_indexes();
            // The marker says what recovery will find of the producer state: nothing at all (most
            // partitions: no file to write or read), or a snapshot at the log end.
            let offset = self.log_end_offset.get();
            let (promise, snapshot) = {
                let st = self.state.borrow();
                match st.producers.is_empty() {
                    true => (Promise::NoProducers, None),
                    false => (Promise::Snapshot(offset), Some(st.producers.encode_snapshot(offset))),
                }
            };
            let dir = self.dir.clone();
            // One trip to the blocking thread and no fsync: the log is synced above; the files
            // written here are checked when read (crcs, the marker's promise), and the shard syncs
            // the filesystem once after closing all its partitions (`ShardStorage::sync_filesystem`).
            let written = blocking::run(move || -> Result<(), StorageError> {
                indexes.write()?;
                if let Some(bytes) = snapshot {
                    producer_state::write_snapshot_unsynced(&dir, offset, &bytes).map_err(|e| {
                        StorageError::io(format!("writing the producer-state snapshot in {}", dir.display()), e)
                    })?;
                }
                let marker = dir.join(promise.marker_name());
                std::fs::write(&marker, b"")
                    .map_err(|e| StorageError::io(format!("writing {}", marker.display()), e))?;
                if let Err(e) = producer_state::prune_snapshots(&dir) {
                    tracing::warn!(dir = %dir.display(), error = %e, "removing old producer-state snapshots failed");
                }
                Ok(())
            })
            .await;
            written.map_err(|panic| {
                StorageError::io(format!("closing {}", self.dir.display()), std::io::Error::other(panic))
            })?
        }
        .await;
        self.shard.tail_cache.borrow_mut().remove_partition(self.cache_id);
        for seg in segments {
            if let Some(file) = seg.take_file() {
                if let Ok(file) = Rc::try_unwrap(file) {
                    if let Err(e) = file.close().await {
                        tracing::warn!(path = %seg.log_path.display(), error = %e, "closing segment failed");
                    }
                }
            }
        }
        if self.holds_file_slot.replace(false) {
            self.shard.give_back_file_slot();
        }
        self.progress.notify_all();
        result
    }

    /// Resolves once no checkpoint write is in flight: what writes the segment's final indexes
    /// waits, so a checkpoint never lands after them.
    pub(super) async fn wait_checkpoint_written(&self) {
        loop {
            let notified = self.progress.notified();
            if !self.state.borrow().checkpointing {
                return;
            }
            notified.await;
        }
    }

    /// Closes the partition and removes its directory (topic deletion).
    pub async fn remove(&self) -> Result<(), StorageError> {
        self.close().await?;
        let dir = self.dir.clone();
        glommio::executor()
            .spawn_blocking(move || std::fs::remove_dir_all(&dir))
            .await
            .map_err(|e| StorageError::io(format!("removing {}", self.dir.display()), e))
    }

    /// What this partition holds in memory, by owner (sized for a metrics snapshot): its
    /// segments' indexes, its producer state, and the chunks and snapshots queued for the
    /// flusher (not the one chunk it may be writing).
    pub fn memory(&self) -> [(Memory, usize); 3] {
        let st = self.state.borrow();
        let indexes = st.segments.iter().map(|seg| seg.meta.borrow().index.memory_bytes()).sum();
        let queued: usize = st
            .pending
            .iter()
            .map(|job| match job {
                Job::Write(chunk) => chunk.head_len() + chunk.body.len(),
                Job::Seal(_, snapshot) => snapshot.bytes.capacity(),
            })
            .sum();
        [
            (Memory::SegmentIndexes, indexes),
            (Memory::ProducerState, st.producers.memory_bytes()),
            (Memory::WriteStaging, queued + st.carry.bytes.capacity()),
        ]
    }

    fn out_of_range(&self, requested: i64) -> StorageError {
        StorageError::OffsetOutOfRange {
            requested,
            log_start: self.log_start_offset.get(),
            high_watermark: self.high_watermark.get(),
        }
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        // Lets a waiting flusher notice the partition is gone and end.
        self.flush_wanted.notify_all();
        if self.holds_file_slot.get() {
            self.shard.give_back_file_slot();
        }
        if let Ok(mut cache) = self.shard.tail_cache.try_borrow_mut() {
            cache.remove_partition(self.cache_id);
        }
    }
}

#[cfg(test)]
mod tests;
