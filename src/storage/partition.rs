//! One partition log: appends, the flusher, reads, offsets by time, housekeeping (roll by age,
//! retention), truncation, recovery on open and clean close.
//!
//! Owns the partition directory and the state of its segments. May call `segment`, `index`,
//! `scan`, `retention`, the shard's tail cache and disk monitor, `record`, glommio. Never blocks
//! the shard on the data path except for the rare metadata syscalls named below.
//!
//! Write path. `append` (synchronous: call order is offset order) validates, stamps offsets and
//! copies the batches once into the tail of a queue of 4 KiB-aligned chunks (`DmaBuffer`s). The
//! flusher, one detached task per partition, pops chunks and writes each with O_DIRECT; exactly one
//! chunk is in flight per partition, so rewrites of the partial last block never reorder. A chunk
//! starts at the aligned position below the segment end and carries a copy of that partial block
//! (at most 4 KiB), which is rewritten with the new bytes as a write of its own (see `Chunk`).
//! Appends that arrive during a write fill the next chunk: group commit. With `Durability::Fsync`
//! the flusher issues one fdatasync per round after its writes, then advances the high watermark.
//!
//! Space is reserved before a byte is accepted: `append` checks that the active segment is
//! preallocated past the new end and, if not, calls `fallocate` synchronously, so ENOSPC surfaces
//! as `StorageFull` from `append` itself. That synchronous call is the fallback, not the rule: once
//! less than half a step of reserved space remains, the next `PREALLOCATE_STEP_BYTES` are reserved
//! on the blocking thread pool, and once the active segment is in its last step the next segment
//! file is created and preallocated there too (a spare, renamed into place on roll). Everything
//! else slow on the filesystem also runs there (`blocking`): unlinking deleted segments, writing
//! the indexes and syncing the directory when a segment is sealed.
//!
//! Idempotent producers (`producer_state`). `append` checks every idempotent batch against the
//! producer state once nothing else can fail the append, and records it in the same step: a
//! retried batch is answered with its original offsets and not written again. The state is
//! persisted as a snapshot at each roll (taken at the roll, written by the seal once the sealed
//! segment is synced, so it never covers bytes that are not durable) and at close; `open` loads
//! the newest usable snapshot and replays the batch headers after it. Whatever cuts the log (a
//! failed write, `truncate_to`, recovery's torn tails) cuts the state too, and removes snapshots
//! past the cut before new appends could make them look valid.
//!
//! Failures. A failed write rolls the in-memory log back to the end of the last completed write
//! (those offsets were never acknowledged), fails their durability waiters, and marks the partition
//! degraded; the next append rewrites from there. A failed fdatasync cannot be retried safely (the
//! kernel may have dropped the dirty pages), so the partition stops accepting appends until it is
//! reopened and recovery has re-read what is really on disk.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::rc::{Rc, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use glommio::io::DmaBuffer;

use super::blocking;
use super::notify::Notify;
use super::producer_state::{
    self, Appending, AppendingBatches, ProducerBatch, ProducerStates, Refused, Rejection, RequestVerdict,
};
use super::retention::{segments_to_delete, RetentionInput};
use super::scan::{scan_batches, ScanEnd};
use super::segment::{align_down, align_up, parse_log_name, read_aligned, scan_segment_file, Segment, ALIGN};
use super::{
    AppendResult, Durability, HousekeepReport, IndexEntry, LogConfig, ReadResult, RecoveryReport,
    ShardStorage, StorageError, TornTail,
};
use crate::record::{self, BatchError, BatchHeader, BatchLimits, BATCH_HEADER_LEN};

/// fallocate granularity ahead of the write position (capped at `segment_bytes`).
const PREALLOCATE_STEP_BYTES: u64 = 16 << 20;
/// Smallest chunk allocated for staging appends; larger batches get a chunk of their size.
const CHUNK_BYTES_MIN: usize = 128 << 10;
/// Largest single O_DIRECT read when serving a fetch or scanning.
const READ_WINDOW_BYTES_MAX: u64 = 4 << 20;
/// Rollback records kept for durability waiters that have not looked yet.
const ROLLBACKS_KEPT: usize = 64;
/// Recovery refuses to believe a length field larger than this (a scribbled header).
const RECOVERY_BATCH_BYTES_MAX: usize = 256 << 20;
const CLEAN_SHUTDOWN_MARKER: &str = ".clean_shutdown";
/// Cached batches dropped per step when retention deletes segments (see `evict_cached_below`).
const CACHE_EVICTION_SLICE_BATCHES: usize = 512;
/// The next segment's file, created and preallocated ahead of the roll. Recovery ignores it (not
/// a `<base_offset>.log` name) and open removes a leftover one.
const SPARE_SEGMENT_NAME: &str = ".spare-segment";
/// Bytes read per step when replaying batch headers into the producer state.
const REPLAY_WINDOW_BYTES: u64 = 1 << 20;

/// The next segment's file, prepared off the shard.
#[derive(Default)]
enum Spare {
    #[default]
    Absent,
    Preparing,
    Ready {
        file: std::fs::File,
        preallocated_bytes: u64,
    },
    /// Preparation failed (or the partition closed): not retried before the next roll.
    Failed,
}

/// Shared with the background task that prepares the spare (which outlives no partition state).
#[derive(Default)]
struct SpareSlot {
    spare: RefCell<Spare>,
    /// Wakes `close` waiting for a preparation to finish.
    prepared: Notify,
}

/// Bytes staged for one segment, starting at an aligned file position, written by the flusher
/// as one O_DIRECT write, or two when the chunk starts with the carried partial block.
///
/// Why two: a write that covers both an already-written block and fallocated, never-written
/// blocks is not an overwrite to ext4, which then wants the inode lock exclusively; io_uring's
/// non-blocking attempt fails with EAGAIN and the write is re-issued from an io-wq worker thread,
/// two context switches per write. Written apart, the rewritten block is a plain overwrite and the
/// rest touches unwritten blocks only, and both complete inline. They never overlap, so they are
/// issued together.
struct Chunk {
    segment: Rc<Segment>,
    /// The carried partial block and the first new bytes (exactly one block), when there is one.
    head: Option<DmaBuffer>,
    /// The bytes after `head` (from `file_pos` when there is no head), block-aligned.
    body: DmaBuffer,
    file_pos: u64,
    /// Bytes filled, from `file_pos` (including the carried partial block).
    len: usize,
    /// First offset staged in this chunk (not counting the carried block).
    first_offset: i64,
    /// Offset after the last batch staged in this chunk.
    end_offset: i64,
}

impl Chunk {
    fn head_len(&self) -> usize {
        if self.head.is_some() {
            ALIGN as usize
        } else {
            0
        }
    }

    fn capacity(&self) -> usize {
        self.head_len() + self.body.len()
    }

    /// Copies `bytes` in at chunk position `at` (head first, then body).
    fn put(&mut self, at: usize, bytes: &[u8]) {
        debug_assert!(at + bytes.len() <= self.capacity());
        let head_len = self.head_len();
        let (to_head, to_body) = bytes.split_at(head_len.saturating_sub(at).min(bytes.len()));
        if let (Some(head), false) = (self.head.as_mut(), to_head.is_empty()) {
            head.as_bytes_mut()[at..at + to_head.len()].copy_from_slice(to_head);
        }
        if !to_body.is_empty() {
            let body_at = at.max(head_len) - head_len;
            self.body.as_bytes_mut()[body_at..body_at + to_body.len()].copy_from_slice(to_body);
        }
    }

    /// Bytes `from..to` of the chunk, which must lie within one block (head and body never share
    /// one).
    fn block_bytes(&self, from: usize, to: usize) -> &[u8] {
        debug_assert!(from <= to && to <= self.len);
        assert_eq!(
            align_down(from as u64),
            align_down(to.saturating_sub(1).max(from) as u64),
            "range spans blocks"
        );
        match &self.head {
            Some(head) if from < ALIGN as usize => &head.as_bytes()[from..to],
            _ => {
                let head_len = self.head_len();
                &self.body.as_bytes()[from - head_len..to - head_len]
            }
        }
    }
}

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

struct Rollback {
    generation: u64,
    first_lost_offset: i64,
    segment: PathBuf,
    detail: String,
}

struct State {
    /// Ordered by base offset; never empty; the last one is active.
    segments: Vec<Rc<Segment>>,
    pending: VecDeque<Job>,
    carry: Carry,
    /// Plain fd of the active segment, for synchronous fallocate.
    active_file: Option<std::fs::File>,
    rollbacks: VecDeque<Rollback>,
    rollback_generation: u64,
    /// A write failed and was rolled back; cleared by the next successful write.
    degraded: bool,
    /// An fdatasync failed: no more appends until reopened.
    sync_failure: Option<String>,
    /// The flusher is executing a job.
    flushing: bool,
    truncating: bool,
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
    high_watermark: Cell<i64>,
    log_start_offset: Cell<i64>,
    log_end_offset: Cell<i64>,
    closed: Cell<bool>,
    flusher_running: Cell<bool>,
    /// Wakes the flusher: new jobs, or close.
    flush_wanted: Rc<Notify>,
    /// Wakes waiters: high watermark moved, rollback, flusher idle or stopped, close.
    progress: Notify,
    spare: Rc<SpareSlot>,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn active(st: &State) -> &Rc<Segment> {
    st.segments.last().expect("a partition always has an active segment")
}

fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StorageError::io(format!("syncing directory {}", dir.display()), e))
}

fn open_plain(path: &Path, create: bool) -> Result<std::fs::File, StorageError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(create)
        .open(path)
        .map_err(|e| StorageError::io(format!("opening {}", path.display()), e))
}

/// `fallocate` mode 0 (the file size grows with it) up to `end_bytes`.
fn fallocate(file: &std::fs::File, end_bytes: u64) -> std::io::Result<()> {
    // SAFETY: plain fallocate on an fd the caller owns; no memory is passed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, end_bytes as libc::off_t) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The error an append gets for a batch the producer state refused.
fn refused(r: Refused) -> StorageError {
    let (index, producer_id, epoch) = (r.index, r.batch.producer_id, r.batch.epoch);
    match r.rejection {
        Rejection::Fenced { current_epoch } => {
            StorageError::ProducerFenced { index, producer_id, epoch, current_epoch }
        }
        Rejection::OutOfOrder(gap) => StorageError::OutOfOrderSequence {
            index,
            producer_id,
            epoch,
            first_sequence: r.batch.first_sequence,
            gap,
        },
    }
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

/// The first record of `batch` stamped at or after `timestamp_ms`, as (offset, timestamp). The
/// batch's max timestamp is known to qualify. A compressed batch is inflated (as Kafka does for
/// this lookup; it is off the produce and fetch paths); one that cannot be read answers with its
/// base offset, which is never past the wanted record.
fn first_record_at_or_after(batch: &[u8], header: &BatchHeader, timestamp_ms: i64) -> (i64, i64) {
    if let Ok(records) = record::reader::decode(batch, record::reader::DECOMPRESSED_BYTES_MAX_DEFAULT) {
        for r in records.iter().flatten() {
            if r.timestamp_ms >= timestamp_ms {
                return (r.offset, r.timestamp_ms);
            }
        }
    }
    (header.base_offset, header.max_timestamp)
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
        let marker = dir.join(CLEAN_SHUTDOWN_MARKER);
        report.clean_shutdown = marker.exists();
        if report.clean_shutdown {
            std::fs::remove_file(&marker)
                .map_err(|e| StorageError::io(format!("removing {}", marker.display()), e))?;
        }

        let mut bases: Vec<i64> = std::fs::read_dir(&dir)
            .map_err(|e| StorageError::io(format!("listing {}", dir.display()), e))?
            .filter_map(|entry| entry.ok().and_then(|e| e.file_name().to_str().and_then(parse_log_name)))
            .collect();
        bases.sort_unstable();
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
            open_plain(&seg.log_path, true)?;
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
                Carry { file_pos: align_down(meta.size_bytes), bytes: Vec::with_capacity(ALIGN as usize) },
            )
        };
        last.remove_index_files();
        let mut carry = carry;
        read_carry(&last, size, &mut carry).await?;
        let active_file = open_plain(&last.log_path, false)?;

        let log_start = segments[0].base_offset;
        let log_end = last.meta.borrow().next_offset;
        report.log_start_offset = log_start;
        report.log_end_offset = log_end;
        let producers =
            recover_producer_state(&dir, &segments, log_start, log_end, report.clean_shutdown).await?;

        let partition = Rc::new(Partition {
            cache_id: shard.allocate_partition_id(),
            dir,
            config,
            shard,
            state: RefCell::new(State {
                segments,
                pending: VecDeque::new(),
                carry,
                active_file: Some(active_file),
                rollbacks: VecDeque::new(),
                rollback_generation: 0,
                degraded: false,
                sync_failure: None,
                flushing: false,
                truncating: false,
                producers,
            }),
            high_watermark: Cell::new(log_end),
            log_start_offset: Cell::new(log_start),
            log_end_offset: Cell::new(log_end),
            closed: Cell::new(false),
            flusher_running: Cell::new(true),
            flush_wanted: Rc::new(Notify::default()),
            progress: Notify::default(),
            spare: Rc::new(SpareSlot::default()),
        });
        glommio::spawn_local(run_flusher(Rc::downgrade(&partition), partition.flush_wanted.clone())).detach();
        tracing::info!("{report}");
        Ok((partition, report))
    }

    /// Validates every batch, then (all valid, disk has room) assigns offsets, stamps them, stages
    /// the bytes for the flusher and caches them. All or nothing. Idempotent batches are checked
    /// against the producer state; a request that only retries appended batches is answered with
    /// the originals' offsets and writes nothing.
    pub fn append(&self, mut batches: BytesMut) -> Result<AppendResult, StorageError> {
        if self.closed.get() {
            return Err(StorageError::Closed);
        }
        let mut st = self.state.borrow_mut();
        if st.truncating {
            return Err(StorageError::Truncating);
        }
        if let Some(detail) = &st.sync_failure {
            return Err(StorageError::WriteFailed {
                segment: active(&st).log_path.clone(),
                first_lost_offset: self.high_watermark.get(),
                detail: detail.clone(),
            });
        }
        if self.shard.disk_space.check().is_err() {
            return Err(self.shard.storage_full());
        }

        let limits = BatchLimits {
            batch_bytes_max: self.config.batch_bytes_max,
            records_per_batch_max: self.config.records_per_batch_max,
        };
        if batches.is_empty() {
            let source = BatchError::Truncated { available: 0, needed: BATCH_HEADER_LEN };
            return Err(StorageError::InvalidBatch { index: 0, position: 0, source });
        }
        let base_offset = self.log_end_offset.get();
        let mut position = 0usize;
        let mut index = 0usize;
        let mut records = 0i64;
        let mut idempotent = AppendingBatches::None;
        while position < batches.len() {
            let header = record::validate_for_append(&batches[position..], &limits)
                .map_err(|source| StorageError::InvalidBatch { index, position, source })?;
            if let Some(batch) = ProducerBatch::of(&header) {
                let batch_base = base_offset + records;
                let last_offset = batch_base + i64::from(header.last_offset_delta);
                idempotent.push(Appending { index, batch, base_offset: batch_base, last_offset });
            }
            records += i64::from(header.last_offset_delta) + 1;
            position += header.total_len();
            index += 1;
        }
        let total_bytes = batches.len() as u64;
        let end_offset = base_offset + records;
        {
            let seg = active(&st);
            let meta = seg.meta.borrow();
            // Index entries hold positions and relative offsets as u32.
            let too_big = meta.size_bytes + total_bytes > self.config.segment_bytes
                || meta.size_bytes + total_bytes > u64::from(u32::MAX)
                || end_offset - seg.base_offset > i64::from(u32::MAX);
            let must_roll = meta.size_bytes > 0 && too_big;
            drop(meta);
            if must_roll {
                self.roll(&mut st)?;
            }
        }
        let seg = active(&st).clone();
        let start_pos = seg.meta.borrow().size_bytes;
        self.ensure_preallocated(&mut st, &seg, start_pos + total_bytes)?;
        self.prepare_ahead(&st, &seg, start_pos + total_bytes);
        // Last, because it records the batches: nothing below can fail the append.
        let appending = idempotent.as_slice();
        if !appending.is_empty() {
            match st.producers.apply(appending, index).map_err(refused)? {
                RequestVerdict::Append => {}
                RequestVerdict::Duplicate { base_offset, last_offset } => {
                    // A retry: the original is in the log (or being written); callers wait for
                    // its durability as they would have for this one.
                    return Ok(AppendResult {
                        base_offset,
                        last_offset,
                        log_start_offset: self.log_start_offset.get(),
                        duplicate: true,
                    });
                }
            }
        }

        {
            let mut meta = seg.meta.borrow_mut();
            assert_eq!(meta.next_offset, base_offset, "active segment end and log end offset disagree");
            let mut position = 0usize;
            let mut offset = base_offset;
            while position < batches.len() {
                let header = BatchHeader::parse(&batches[position..])
                    .map_err(|source| StorageError::InvalidBatch { index: 0, position, source })?;
                record::set_base_offset(&mut batches[position..], offset);
                let relative = (offset - seg.base_offset) as u32;
                let batch_pos = (start_pos + position as u64) as u32;
                meta.index.on_batch(relative, batch_pos, header.total_len() as u32, header.max_timestamp);
                offset += i64::from(header.last_offset_delta) + 1;
                position += header.total_len();
            }
            debug_assert_eq!(offset, end_offset);
            meta.size_bytes += total_bytes;
            meta.next_offset = end_offset;
            meta.first_append_ms.get_or_insert_with(now_ms);
        }
        self.stage(&mut st, &seg, &batches, base_offset, end_offset, start_pos);
        drop(st);

        let frozen = batches.freeze();
        let mut cache = self.shard.tail_cache.borrow_mut();
        let mut position = 0usize;
        while position < frozen.len() {
            let Ok(header) = BatchHeader::parse(&frozen[position..]) else { break };
            let len = header.total_len();
            cache.insert(
                self.cache_id,
                header.base_offset,
                header.last_offset(),
                frozen.slice(position..position + len),
            );
            position += len;
        }
        drop(cache);

        self.log_end_offset.set(end_offset);
        self.flush_wanted.notify_all();
        Ok(AppendResult {
            base_offset,
            last_offset: end_offset - 1,
            log_start_offset: self.log_start_offset.get(),
            duplicate: false,
        })
    }

    /// Resolves once every offset <= `last_offset` satisfies the durability policy.
    pub async fn wait_durable(&self, last_offset: i64) -> Result<(), StorageError> {
        let generation = self.state.borrow().rollback_generation;
        loop {
            let notified = self.progress.notified();
            {
                let st = self.state.borrow();
                if st.rollback_generation > generation {
                    let all_kept = st.rollbacks.front().is_some_and(|r| r.generation <= generation + 1);
                    let hit = st
                        .rollbacks
                        .iter()
                        .find(|r| r.generation > generation && r.first_lost_offset <= last_offset);
                    if let Some(r) = hit {
                        return Err(StorageError::WriteFailed {
                            segment: r.segment.clone(),
                            first_lost_offset: r.first_lost_offset,
                            detail: r.detail.clone(),
                        });
                    }
                    if !all_kept {
                        return Err(StorageError::WriteFailed {
                            segment: self.dir.clone(),
                            first_lost_offset: self.high_watermark.get(),
                            detail: "too many write failures to tell whether this offset survived".into(),
                        });
                    }
                }
                if self.high_watermark.get() > last_offset {
                    return Ok(());
                }
                if let Some(detail) = &st.sync_failure {
                    return Err(StorageError::WriteFailed {
                        segment: active(&st).log_path.clone(),
                        first_lost_offset: self.high_watermark.get(),
                        detail: detail.clone(),
                    });
                }
                if last_offset >= self.log_end_offset.get() {
                    return Err(self.out_of_range(last_offset));
                }
                if self.closed.get() && !self.flusher_running.get() {
                    return Err(StorageError::Closed);
                }
            }
            notified.await;
        }
    }

    /// Whole batches from the one containing `offset`, up to `max_bytes` (at least one batch),
    /// only below the high watermark; from the tail cache if it has them, else from disk.
    pub async fn read(&self, offset: i64, max_bytes: usize) -> Result<ReadResult, StorageError> {
        if self.closed.get() {
            return Err(StorageError::Closed);
        }
        let high_watermark = self.high_watermark.get();
        if offset < self.log_start_offset.get() || offset > high_watermark {
            return Err(self.out_of_range(offset));
        }
        let mut chunks = Vec::new();
        if offset < high_watermark {
            let hit = self.shard.tail_cache.borrow_mut().read(
                self.cache_id,
                offset,
                high_watermark,
                max_bytes,
                &mut chunks,
            );
            if !hit {
                let seg = {
                    let st = self.state.borrow();
                    let i = st.segments.partition_point(|s| s.base_offset <= offset);
                    match i {
                        0 => return Err(self.out_of_range(offset)),
                        i => st.segments[i - 1].clone(),
                    }
                };
                let read = self.read_segment(&seg, offset, high_watermark, max_bytes, &mut chunks).await;
                if let Err(e) = read {
                    // Retention deleted the segment while we read it: the offset is gone, say so.
                    if offset < self.log_start_offset.get() {
                        return Err(self.out_of_range(offset));
                    }
                    return Err(e);
                }
            }
        }
        Ok(ReadResult { chunks, high_watermark, log_start_offset: self.log_start_offset.get() })
    }

    pub fn high_watermark(&self) -> i64 {
        self.high_watermark.get()
    }

    pub fn log_start_offset(&self) -> i64 {
        self.log_start_offset.get()
    }

    pub fn log_end_offset(&self) -> i64 {
        self.log_end_offset.get()
    }

    /// Resolves when the high watermark passes `offset` (or the partition closes).
    pub async fn wait_for_data(&self, offset: i64) {
        loop {
            let notified = self.progress.notified();
            if self.high_watermark.get() > offset || self.closed.get() {
                return;
            }
            notified.await;
        }
    }

    /// Kafka ListOffsets: -2 → log start, -1 → high watermark, else the first batch whose max
    /// timestamp >= `timestamp_ms`, as (base offset, max timestamp).
    pub async fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<Option<(i64, i64)>, StorageError> {
        match timestamp_ms {
            -2 => return Ok(Some((self.log_start_offset.get(), -1))),
            -1 => return Ok(Some((self.high_watermark.get(), -1))),
            _ => {}
        }
        let mut offset = {
            let st = self.state.borrow();
            let found = st.segments.iter().find(|s| s.meta.borrow().index.max_timestamp_ms() >= timestamp_ms);
            match found {
                None => return Ok(None),
                Some(s) => s.base_offset + i64::from(s.meta.borrow().index.lookup_time(timestamp_ms)),
            }
        };
        offset = offset.max(self.log_start_offset.get());
        loop {
            if offset >= self.high_watermark.get() {
                return Ok(None);
            }
            let result = self.read(offset, 64 << 10).await?;
            let mut next = offset;
            for chunk in &result.chunks {
                let header = record::BatchHeader::parse(chunk).map_err(|e| StorageError::Corrupt {
                    segment: self.dir.clone(),
                    position: 0,
                    detail: format!("served batch at offset {next} has a bad header: {e}"),
                })?;
                if header.max_timestamp >= timestamp_ms {
                    return Ok(Some(first_record_at_or_after(chunk, &header, timestamp_ms)));
                }
                next = header.last_offset() + 1;
            }
            if next == offset {
                return Ok(None);
            }
            offset = next;
        }
    }

    /// Rolls the active segment by age (or when it is past time retention) and deletes whole
    /// segments beyond size and time retention.
    pub async fn housekeep(&self, now_ms: i64) -> Result<HousekeepReport, StorageError> {
        if self.closed.get() {
            return Err(StorageError::Closed);
        }
        let mut report = HousekeepReport::default();
        let victims = {
            let mut st = self.state.borrow_mut();
            let expired = st.producers.expire(now_ms);
            if expired > 0 {
                tracing::debug!(dir = %self.dir.display(), expired, "forgot producers idle past their expiry");
            }
            if !st.truncating && st.sync_failure.is_none() {
                let seg = active(&st).clone();
                let meta = seg.meta.borrow();
                let aged = meta
                    .first_append_ms
                    .is_some_and(|t| now_ms.saturating_sub(t) >= self.config.segment_ms as i64);
                let expired = self.config.retention_ms.is_some_and(|r| {
                    meta.index.max_timestamp_ms() != i64::MIN
                        && now_ms.saturating_sub(meta.index.max_timestamp_ms()) > r as i64
                });
                let roll = meta.size_bytes > 0 && (aged || expired);
                drop(meta);
                if roll {
                    self.roll(&mut st)?;
                    report.rolled_segment = Some(seg.base_offset);
                    self.flush_wanted.notify_all();
                }
            }
            // Only segments whose seal finished (file final, indexes on disk) may go.
            let inputs: Vec<RetentionInput> = st
                .segments
                .iter()
                .map(|s| {
                    let m = s.meta.borrow();
                    RetentionInput {
                        base_offset: s.base_offset,
                        next_offset: m.next_offset,
                        size_bytes: m.size_bytes,
                        max_timestamp_ms: m.index.max_timestamp_ms(),
                    }
                })
                .collect();
            let sealed_prefix = st
                .segments
                .iter()
                .take_while(|s| {
                    let m = s.meta.borrow();
                    m.final_on_disk && m.durable_bytes == m.size_bytes && !self.seal_pending(&st, s)
                })
                .count();
            let deletable = segments_to_delete(
                &inputs,
                self.config.retention_bytes,
                self.config.retention_ms,
                now_ms,
                self.high_watermark.get(),
            )
            .min(sealed_prefix);
            let victims: Vec<Rc<Segment>> = st.segments.drain(..deletable).collect();
            if !victims.is_empty() {
                let start = st.segments[0].base_offset;
                self.log_start_offset.set(start);
            }
            victims
        };
        if !victims.is_empty() {
            self.evict_cached_below(self.log_start_offset.get()).await;
        }
        let mut paths = Vec::with_capacity(3 * victims.len());
        for seg in victims {
            report.segments_deleted.push((seg.base_offset, seg.meta.borrow().size_bytes));
            // Close our descriptor before the unlink: the last close of an unlinked file frees its
            // blocks, and that must happen in the unlink on the blocking thread, not in a close on
            // the shard. A reader still holding the file keeps reading its data and closes it last.
            if let Some(file) = seg.take_file().and_then(|f| Rc::try_unwrap(f).ok()) {
                if let Err(e) = file.close().await {
                    tracing::warn!(path = %seg.log_path.display(), error = %e, "closing a deleted segment failed");
                }
            }
            paths.extend(seg.file_paths_for_removal());
        }
        if !paths.is_empty() {
            // Oldest segment first, indexes before logs: a crash part way leaves a contiguous
            // suffix of segments, each with its log, which recovery accepts.
            match blocking::run(move || blocking::remove_files(&paths)).await {
                Ok(failures) => {
                    for failure in failures {
                        tracing::warn!(dir = %self.dir.display(), "retention: {failure}");
                    }
                }
                Err(panic) => tracing::error!(dir = %self.dir.display(), "retention: {panic}"),
            }
            self.shard.refresh_disk_space();
        }
        report.log_start_offset = self.log_start_offset.get();
        Ok(report)
    }

    /// Drops the cached batches below `offset` a slice at a time, letting produce and fetch run in
    /// between: deleted segments can have tens of thousands of cached batches, and dropping them in
    /// one go stalled the shard for tens of milliseconds. Reads below the log start are answered
    /// with OffsetOutOfRange before the cache is consulted, so the leftovers are never served.
    async fn evict_cached_below(&self, offset: i64) {
        while self.shard.tail_cache.borrow_mut().remove_below(
            self.cache_id,
            offset,
            CACHE_EVICTION_SLICE_BATCHES,
        ) {
            // A timer, unlike a plain yield, lets the executor poll for I/O in between.
            glommio::timer::sleep(std::time::Duration::from_micros(50)).await;
        }
    }

    /// Drops every batch at or above `offset` (rounded down to the start of the batch holding
    /// it), on disk and in caches and indexes. Appends are refused while it runs.
    pub async fn truncate_to(&self, offset: i64) -> Result<(), StorageError> {
        if self.closed.get() {
            return Err(StorageError::Closed);
        }
        if offset >= self.log_end_offset.get() {
            return Ok(());
        }
        self.state.borrow_mut().truncating = true;
        loop {
            let notified = self.progress.notified();
            {
                let st = self.state.borrow();
                if st.pending.is_empty() && !st.flushing {
                    break;
                }
            }
            notified.await;
        }
        let result = self.truncate_drained(offset.max(self.log_start_offset.get())).await;
        self.state.borrow_mut().truncating = false;
        self.progress.notify_all();
        result
    }

    /// Flushes, fdatasyncs, persists indexes, writes the clean-shutdown marker and closes files.
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
        self.discard_spare().await;
        let (segments, sync_failure) = {
            let mut st = self.state.borrow_mut();
            st.active_file = None;
            (std::mem::take(&mut st.segments), st.sync_failure.clone())
        };
        let result = async {
            if sync_failure.is_some() {
                return Ok(());
            }
            let Some(last) = segments.last() else { return Ok(()) };
            last.wait_preallocation_idle().await;
            let file = last.file().await?;
            let size = last.meta.borrow().size_bytes;
            file.fdatasync()
                .await
                .map_err(|e| StorageError::io(format!("syncing {}", last.log_path.display()), e))?;
            file.truncate(size)
                .await
                .map_err(|e| StorageError::io(format!("truncating {}", last.log_path.display()), e))?;
            last.persist_indexes()?;
            // The marker promises a snapshot at the log end: without one, no marker.
            let offset = self.log_end_offset.get();
            let bytes = self.state.borrow().producers.encode_snapshot(offset);
            let dir = self.dir.clone();
            blocking::run(move || producer_state::write_snapshot(&dir, offset, &bytes))
                .await
                .map_err(std::io::Error::other)
                .and_then(|written| written)
                .map_err(|e| {
                    StorageError::io(format!("writing the producer-state snapshot in {}", self.dir.display()), e)
                })?;
            let marker = self.dir.join(CLEAN_SHUTDOWN_MARKER);
            std::fs::write(&marker, b"")
                .map_err(|e| StorageError::io(format!("writing {}", marker.display()), e))?;
            sync_dir(&self.dir)?;
            if let Err(e) = producer_state::prune_snapshots(&self.dir) {
                tracing::warn!(dir = %self.dir.display(), error = %e, "removing old producer-state snapshots failed");
            }
            Ok(())
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
        self.progress.notify_all();
        result
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

    fn out_of_range(&self, requested: i64) -> StorageError {
        StorageError::OffsetOutOfRange {
            requested,
            log_start: self.log_start_offset.get(),
            high_watermark: self.high_watermark.get(),
        }
    }

    fn seal_pending(&self, st: &State, seg: &Rc<Segment>) -> bool {
        st.pending.iter().any(|j| match j {
            Job::Seal(s, _) | Job::Write(Chunk { segment: s, .. }) => Rc::ptr_eq(s, seg),
        })
    }

    /// Starts a new active segment at the log end; the old one is sealed by the flusher.
    fn roll(&self, st: &mut State) -> Result<(), StorageError> {
        let old = active(st).clone();
        let base_offset = old.meta.borrow().next_offset;
        let seg = Rc::new(Segment::new(&self.dir, base_offset, self.config.index_interval_bytes));
        let file = match self.spare.spare.replace(Spare::Absent) {
            Spare::Ready { file, preallocated_bytes } => {
                // One rename on the shard instead of a create and a fallocate.
                match std::fs::rename(self.dir.join(SPARE_SEGMENT_NAME), &seg.log_path) {
                    Ok(()) => {
                        seg.meta.borrow_mut().preallocated_bytes = preallocated_bytes;
                        file
                    }
                    Err(e) => {
                        tracing::warn!(dir = %self.dir.display(), error = %e, "could not use the spare segment");
                        open_plain(&seg.log_path, true)?
                    }
                }
            }
            Spare::Preparing => {
                // Still being prepared: it serves the roll after this one.
                self.spare.spare.replace(Spare::Preparing);
                open_plain(&seg.log_path, true)?
            }
            Spare::Absent | Spare::Failed => open_plain(&seg.log_path, true)?,
        };
        old.meta.borrow_mut().sealed = true;
        // No batch at or past `base_offset` is recorded yet: the state is exactly the one at it.
        let snapshot =
            ProducerSnapshot { offset: base_offset, bytes: st.producers.encode_snapshot(base_offset) };
        st.pending.push_back(Job::Seal(old, snapshot));
        st.segments.push(seg);
        st.active_file = Some(file);
        st.carry.file_pos = 0;
        st.carry.bytes.clear();
        Ok(())
    }

    /// Reserves file space up to `need_end` in large steps, so appends do not extend the file.
    fn ensure_preallocated(&self, st: &mut State, seg: &Segment, need_end: u64) -> Result<(), StorageError> {
        let mut meta = seg.meta.borrow_mut();
        if need_end <= meta.preallocated_bytes {
            return Ok(());
        }
        let cap = align_up(self.config.segment_bytes.max(need_end));
        let target = align_up(need_end.max(meta.preallocated_bytes + PREALLOCATE_STEP_BYTES)).min(cap);
        let Some(file) = st.active_file.as_ref() else {
            return Err(StorageError::Closed);
        };
        if let Err(e) = fallocate(file, target) {
            if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
                self.shard.refresh_disk_space();
                return Err(self.shard.storage_full());
            }
            return Err(StorageError::io(
                format!("preallocating {} bytes of {}", target, seg.log_path.display()),
                e,
            ));
        }
        meta.preallocated_bytes = target;
        Ok(())
    }

    /// Reserves space ahead of appends on the blocking thread pool: the active segment's next
    /// preallocation step once less than half a step is left, and the spare next segment once the
    /// active one is in its last step. At most one of each is in flight.
    fn prepare_ahead(&self, st: &State, seg: &Rc<Segment>, end_bytes: u64) {
        let cap = align_up(self.config.segment_bytes);
        let step_target = {
            let meta = seg.meta.borrow();
            let wanted = !meta.preallocating
                && meta.preallocated_bytes < cap
                && end_bytes + PREALLOCATE_STEP_BYTES / 2 >= meta.preallocated_bytes;
            wanted.then(|| (meta.preallocated_bytes + PREALLOCATE_STEP_BYTES).min(cap))
        };
        if let (Some(target), Some(active_file)) = (step_target, st.active_file.as_ref()) {
            match active_file.try_clone() {
                Ok(file) => {
                    seg.meta.borrow_mut().preallocating = true;
                    let seg = seg.clone();
                    glommio::spawn_local(async move {
                        let reserved = blocking::run(move || fallocate(&file, target)).await;
                        let mut meta = seg.meta.borrow_mut();
                        meta.preallocating = false;
                        match reserved {
                            Ok(Ok(())) => meta.preallocated_bytes = meta.preallocated_bytes.max(target),
                            // `append` retries synchronously when it needs the space and reports
                            // the error then.
                            Ok(Err(e)) => tracing::debug!(segment = %seg.log_path.display(), error = %e,
                                "background preallocation failed"),
                            Err(panic) => tracing::warn!(segment = %seg.log_path.display(), "{panic}"),
                        }
                        drop(meta);
                        seg.preallocation_idle.notify_all();
                    })
                    .detach();
                }
                Err(e) => tracing::debug!(error = %e, "cannot duplicate the segment fd for preallocation"),
            }
        }
        // Only near the end of the segment (its last step, or its second half when it is small): a
        // spare holds a descriptor and a step of disk, which 10,000 partitions must not all pay.
        let spare_from = self
            .config
            .segment_bytes
            .saturating_sub(PREALLOCATE_STEP_BYTES)
            .max(self.config.segment_bytes / 2);
        if end_bytes < spare_from || !matches!(*self.spare.spare.borrow(), Spare::Absent) {
            return;
        }
        self.spare.spare.replace(Spare::Preparing);
        let slot = self.spare.clone();
        let path = self.dir.join(SPARE_SEGMENT_NAME);
        let preallocated_bytes = PREALLOCATE_STEP_BYTES.min(cap);
        glommio::spawn_local(async move {
            let shown = path.display().to_string();
            let prepared = blocking::run(move || {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&path)?;
                fallocate(&file, preallocated_bytes)?;
                Ok::<_, std::io::Error>(file)
            })
            .await;
            let next = match prepared {
                Ok(Ok(file)) => Spare::Ready { file, preallocated_bytes },
                Ok(Err(e)) => {
                    tracing::debug!(path = shown, error = %e, "preparing the next segment failed");
                    Spare::Failed
                }
                Err(panic) => {
                    tracing::warn!(path = shown, "{panic}");
                    Spare::Failed
                }
            };
            slot.spare.replace(next);
            slot.prepared.notify_all();
        })
        .detach();
    }

    /// Waits for a spare in preparation and removes the spare file (on close).
    async fn discard_spare(&self) {
        loop {
            let prepared = self.spare.prepared.notified();
            if !matches!(*self.spare.spare.borrow(), Spare::Preparing) {
                break;
            }
            prepared.await;
        }
        if let Spare::Ready { file, .. } = self.spare.spare.replace(Spare::Failed) {
            let path = self.dir.join(SPARE_SEGMENT_NAME);
            let removed = blocking::run(move || {
                drop(file);
                blocking::remove_files(&[path])
            })
            .await;
            match removed {
                Ok(failures) => failures.iter().for_each(|f| tracing::warn!("closing partition: {f}")),
                Err(panic) => tracing::warn!("closing partition: {panic}"),
            }
        }
    }

    /// Copies `bytes` (stamped batches starting at file position `start_pos`) into the chunk
    /// queue: the single copy of record bytes on the write path.
    fn stage(
        &self,
        st: &mut State,
        seg: &Rc<Segment>,
        bytes: &[u8],
        first_offset: i64,
        end_offset: i64,
        start_pos: u64,
    ) {
        let fits = match st.pending.back() {
            Some(Job::Write(c)) if Rc::ptr_eq(&c.segment, seg) => c.len + bytes.len() <= c.capacity(),
            _ => false,
        };
        if !fits {
            let file_pos = align_down(start_pos);
            let prefix_len = (start_pos - file_pos) as usize;
            let capacity = align_up((prefix_len + bytes.len()).max(CHUNK_BYTES_MIN) as u64) as usize;
            let head_len = if prefix_len > 0 { ALIGN as usize } else { 0 };
            let mut chunk = Chunk {
                segment: seg.clone(),
                head: (head_len > 0).then(|| glommio::allocate_dma_buffer(head_len)),
                body: glommio::allocate_dma_buffer(capacity - head_len),
                file_pos,
                len: prefix_len,
                first_offset,
                end_offset: first_offset,
            };
            match st.pending.back() {
                Some(Job::Write(c)) if Rc::ptr_eq(&c.segment, seg) => {
                    debug_assert_eq!(c.file_pos + c.len as u64, start_pos);
                    let from = (file_pos - c.file_pos) as usize;
                    chunk.put(0, c.block_bytes(from, c.len));
                }
                _ => {
                    assert!(
                        st.carry.file_pos == file_pos && st.carry.bytes.len() == prefix_len,
                        "carried block ({} bytes at {}) does not match the segment end {start_pos}",
                        st.carry.bytes.len(),
                        st.carry.file_pos
                    );
                    chunk.put(0, &st.carry.bytes);
                }
            }
            st.pending.push_back(Job::Write(chunk));
        }
        let Some(Job::Write(chunk)) = st.pending.back_mut() else {
            unreachable!("a write chunk was just ensured at the back of the queue")
        };
        debug_assert_eq!(chunk.file_pos + chunk.len as u64, start_pos);
        chunk.put(chunk.len, bytes);
        chunk.len += bytes.len();
        chunk.end_offset = end_offset;
    }

    /// Pops the next job; when it is the last chunk of the active segment, keeps a copy of its
    /// partial last block for the next chunk.
    fn take_job(&self) -> Option<Job> {
        let mut st = self.state.borrow_mut();
        let job = st.pending.pop_front()?;
        if let Job::Write(c) = &job {
            let more =
                st.pending.iter().any(|j| matches!(j, Job::Write(n) if Rc::ptr_eq(&n.segment, &c.segment)));
            if !more && !c.segment.meta.borrow().sealed {
                let end = c.file_pos + c.len as u64;
                let tail_from = align_down(end);
                st.carry.file_pos = tail_from;
                st.carry.bytes.clear();
                st.carry.bytes.extend_from_slice(c.block_bytes((tail_from - c.file_pos) as usize, c.len));
            }
        }
        Some(job)
    }

    /// One flusher round: the jobs queued at its start (chunks keep filling until popped), then
    /// one fdatasync per written segment under `Durability::Fsync`.
    async fn flush_round(&self) {
        let budget = self.state.borrow().pending.len();
        self.state.borrow_mut().flushing = true;
        let mut unsynced: Vec<Rc<Segment>> = Vec::new();
        let mut written_end: Option<i64> = None;
        for _ in 0..budget {
            let Some(job) = self.take_job() else { break };
            match job {
                Job::Write(chunk) => {
                    let seg = chunk.segment.clone();
                    let end_offset = chunk.end_offset;
                    if !self.write_chunk(chunk).await {
                        break;
                    }
                    written_end = Some(end_offset);
                    match self.config.durability {
                        Durability::Written => self.advance_durable(&seg, end_offset),
                        Durability::Fsync => {
                            if !unsynced.iter().any(|s| Rc::ptr_eq(s, &seg)) {
                                unsynced.push(seg);
                            }
                        }
                    }
                }
                Job::Seal(seg, snapshot) => match self.seal(&seg, snapshot).await {
                    Ok(()) => unsynced.retain(|s| !Rc::ptr_eq(s, &seg)),
                    Err(e) => {
                        tracing::error!(segment = %seg.log_path.display(), error = %e, "sealing segment failed");
                        if self.config.durability == Durability::Fsync {
                            self.fail_sync(&e.to_string());
                        }
                    }
                },
            }
        }
        if let Some(end_offset) = written_end {
            if self.config.durability == Durability::Fsync && self.state.borrow().sync_failure.is_none() {
                let mut ok = true;
                for seg in &unsynced {
                    let synced = match seg.file().await {
                        Ok(f) => crate::metrics::timed_fsync(f.fdatasync()).await.map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    if let Err(e) = synced {
                        tracing::error!(segment = %seg.log_path.display(), error = %e, "fdatasync failed");
                        self.fail_sync(&format!("fdatasync of {} failed: {e}", seg.log_path.display()));
                        ok = false;
                        break;
                    }
                }
                if ok {
                    for seg in &unsynced {
                        let mut meta = seg.meta.borrow_mut();
                        meta.durable_bytes = meta.written_bytes;
                    }
                    // Chunks written after a rollback in this round carry offsets <= the log end.
                    let end_offset = end_offset.min(self.log_end_offset.get());
                    if end_offset > self.high_watermark.get() {
                        self.high_watermark.set(end_offset);
                    }
                }
            }
        }
        self.state.borrow_mut().flushing = false;
        self.progress.notify_all();
    }

    fn advance_durable(&self, seg: &Segment, end_offset: i64) {
        {
            let mut meta = seg.meta.borrow_mut();
            meta.durable_bytes = meta.written_bytes;
        }
        if end_offset > self.high_watermark.get() {
            self.high_watermark.set(end_offset);
            self.progress.notify_all();
        }
    }

    /// Writes one chunk (its head and body together). On failure rolls the log back and returns
    /// false.
    async fn write_chunk(&self, chunk: Chunk) -> bool {
        let head_len = chunk.head_len();
        let Chunk { segment, head, mut body, file_pos, len, first_offset, end_offset } = chunk;
        let aligned = align_up(len as u64) as usize;
        let head = head.map(|mut head| {
            head.as_bytes_mut()[len.min(head_len)..].fill(0);
            Rc::new(head)
        });
        let body_len = aligned.saturating_sub(head_len);
        body.as_bytes_mut()[len.saturating_sub(head_len)..body_len].fill(0);
        body.trim_to_size(body_len);
        let body = Rc::new(body);
        let result = match segment.file().await {
            Ok(file) => {
                let write = |buf: &Rc<DmaBuffer>, pos: u64| {
                    let (buf, file) = (buf.clone(), file.clone());
                    async move {
                        let want = buf.len();
                        match file.write_rc_at(buf, pos).await {
                            Ok(n) if n == want => Ok(()),
                            Ok(n) => Err(format!("short write: {n} of {want} bytes at {pos}")),
                            Err(e) => Err(e.to_string()),
                        }
                    }
                };
                let head_write = async {
                    match &head {
                        Some(head) => write(head, file_pos).await,
                        None => Ok(()),
                    }
                };
                let body_write = async {
                    match body_len {
                        0 => Ok(()),
                        _ => write(&body, file_pos + head_len as u64).await,
                    }
                };
                let (head_written, body_written) =
                    crate::metrics::timed_segment_write(futures::future::join(head_write, body_write)).await;
                head_written.and(body_written)
            }
            Err(e) => Err(e.to_string()),
        };
        // The bytes from `file_pos` on, for the carried block a rollback keeps.
        let first_block = head.as_ref().unwrap_or(&body);
        match result {
            Ok(()) => {
                let mut meta = segment.meta.borrow_mut();
                debug_assert!(file_pos + len as u64 >= meta.written_bytes);
                meta.written_bytes = file_pos + len as u64;
                drop(meta);
                self.state.borrow_mut().degraded = false;
                true
            }
            Err(detail) => {
                tracing::error!(
                    segment = %segment.log_path.display(), position = file_pos, first_offset, end_offset,
                    error = %detail, "write failed; rolling back unacknowledged batches"
                );
                self.roll_back_write(&segment, first_offset, file_pos, first_block, detail);
                false
            }
        }
    }

    /// Undoes every append from `first_lost_offset` on: they were staged but never written.
    fn roll_back_write(
        &self,
        seg: &Rc<Segment>,
        first_lost_offset: i64,
        file_pos: u64,
        buf: &DmaBuffer,
        detail: String,
    ) {
        let mut st = self.state.borrow_mut();
        st.pending.clear();
        let keep = st.segments.iter().position(|s| Rc::ptr_eq(s, seg)).map_or(st.segments.len(), |i| i + 1);
        let removed: Vec<Rc<Segment>> = st.segments.drain(keep..).collect();
        for s in &removed {
            remove_segment_files(s);
        }
        let keep_bytes = {
            let mut meta = seg.meta.borrow_mut();
            assert!(self.high_watermark.get() <= first_lost_offset, "rolling back acknowledged offsets");
            meta.size_bytes = meta.written_bytes;
            meta.next_offset = first_lost_offset;
            meta.sealed = false;
            meta.final_on_disk = false;
            meta.index.truncate_from((first_lost_offset - seg.base_offset) as u32);
            meta.written_bytes
        };
        assert_eq!(align_down(keep_bytes), file_pos, "failed chunk did not start at the written end");
        st.carry.file_pos = file_pos;
        st.carry.bytes.clear();
        st.carry.bytes.extend_from_slice(&buf.as_bytes()[..(keep_bytes - file_pos) as usize]);
        if !removed.is_empty() {
            match open_plain(&seg.log_path, false) {
                Ok(f) => st.active_file = Some(f),
                Err(e) => {
                    tracing::error!(error = %e, "cannot reopen the rolled-back segment for appends");
                    st.active_file = None;
                }
            }
        }
        st.rollback_generation += 1;
        let generation = st.rollback_generation;
        st.rollbacks.push_back(Rollback {
            generation,
            first_lost_offset,
            segment: seg.log_path.clone(),
            detail,
        });
        if st.rollbacks.len() > ROLLBACKS_KEPT {
            st.rollbacks.pop_front();
        }
        st.degraded = true;
        st.producers.truncate_from(first_lost_offset);
        drop(st);
        self.log_end_offset.set(first_lost_offset);
        self.shard.tail_cache.borrow_mut().remove_from(self.cache_id, first_lost_offset);
        self.progress.notify_all();
    }

    fn fail_sync(&self, detail: &str) {
        let mut st = self.state.borrow_mut();
        if st.sync_failure.is_none() {
            st.sync_failure = Some(detail.to_string());
        }
        drop(st);
        self.progress.notify_all();
    }

    /// Makes a rolled segment final: synced, file cut to its size, indexes on disk; then writes
    /// the producer-state snapshot taken at the roll, which only covers bytes synced by now.
    async fn seal(&self, seg: &Rc<Segment>, snapshot: ProducerSnapshot) -> Result<(), StorageError> {
        seg.wait_preallocation_idle().await;
        let file = seg.file().await?;
        file.fdatasync()
            .await
            .map_err(|e| StorageError::io(format!("syncing {}", seg.log_path.display()), e))?;
        let (size, next_offset) = {
            let meta = seg.meta.borrow();
            assert_eq!(meta.written_bytes, meta.size_bytes, "sealing a segment with unwritten bytes");
            (meta.size_bytes, meta.next_offset)
        };
        file.truncate(size)
            .await
            .map_err(|e| StorageError::io(format!("truncating {} to {size}", seg.log_path.display()), e))?;
        let indexes = seg.encoded_indexes();
        let dir = self.dir.clone();
        let ProducerSnapshot { offset, bytes } = snapshot;
        let (sealed, snapshot_written) = blocking::run(move || {
            let snapshot_written = producer_state::write_snapshot(&dir, offset, &bytes);
            // Also makes the new segment's directory entry and the snapshot's rename durable.
            let sealed = indexes.write().and_then(|()| sync_dir(&dir));
            // Older snapshots go only once the new one is in place.
            let snapshot_written = snapshot_written.and_then(|()| producer_state::prune_snapshots(&dir));
            (sealed, snapshot_written)
        })
        .await
        .map_err(|panic| {
            StorageError::io(format!("sealing {}", seg.log_path.display()), std::io::Error::other(panic))
        })?;
        sealed?;
        if let Err(e) = snapshot_written {
            // Not fatal: an older snapshot, or a longer scan, serves recovery.
            tracing::warn!(dir = %self.dir.display(), offset, error = %e,
                "writing the producer-state snapshot failed; recovery after a crash will scan more of the log");
        }
        {
            let mut meta = seg.meta.borrow_mut();
            meta.durable_bytes = size;
            meta.final_on_disk = true;
        }
        if next_offset > self.high_watermark.get() {
            self.high_watermark.set(next_offset);
            self.progress.notify_all();
        }
        Ok(())
    }

    /// Reads whole batches from `seg` starting with the one containing `offset`.
    async fn read_segment(
        &self,
        seg: &Rc<Segment>,
        offset: i64,
        high_watermark: i64,
        max_bytes: usize,
        out: &mut Vec<Bytes>,
    ) -> Result<(), StorageError> {
        let (mut position, readable_end) = {
            let meta = seg.meta.borrow();
            let relative = u32::try_from(offset - seg.base_offset).unwrap_or(u32::MAX);
            (u64::from(meta.index.lookup(relative).position), meta.durable_bytes)
        };
        let file = seg.file().await?;
        let mut served_bytes = 0usize;
        let mut expected: Option<i64> = None;
        let mut window = (max_bytes as u64 + u64::from(self.config.index_interval_bytes) + ALIGN)
            .min(READ_WINDOW_BYTES_MAX);
        let corrupt = |position: u64, detail: String| {
            tracing::error!(segment = %seg.log_path.display(), position, %detail, "corrupt batch; not serving it");
            StorageError::Corrupt { segment: seg.log_path.clone(), position, detail }
        };
        'reads: while position < readable_end {
            let from = align_down(position);
            let to = align_up((position + window).min(readable_end));
            let data = read_aligned(&file, from, (to - from) as usize).await.map_err(|e| {
                StorageError::io(format!("reading {} at byte {from}", seg.log_path.display()), e)
            })?;
            let data = &data[..];
            if from + (data.len() as u64) < to.min(readable_end) {
                // The file is shorter than its durable end: retention is releasing it (or it was
                // damaged). Never loop on, never serve past what is there.
                return Err(corrupt(
                    from + data.len() as u64,
                    format!("file ends before its durable end {readable_end}"),
                ));
            }
            let valid_to = ((readable_end - from) as usize).min(data.len());
            // Batches collected from this read: (start, end) within `data`, copied once below.
            let mut spans: Vec<(usize, usize)> = Vec::new();
            let mut done = false;
            loop {
                if position >= readable_end {
                    done = true;
                    break;
                }
                let at = (position - from) as usize;
                let rest = &data[at.min(valid_to)..valid_to];
                if rest.len() < BATCH_HEADER_LEN && position + BATCH_HEADER_LEN as u64 > readable_end {
                    return Err(corrupt(position, "data ends inside a batch header".into()));
                }
                let header = match BatchHeader::parse(rest) {
                    Ok(h) => h,
                    Err(BatchError::Truncated { .. }) => break,
                    Err(e) => return Err(corrupt(position, e.to_string())),
                };
                let total = header.total_len();
                if position + total as u64 > readable_end {
                    return Err(corrupt(
                        position,
                        format!("batch of {total} bytes runs past the end of the data"),
                    ));
                }
                if header.base_offset >= high_watermark {
                    done = true;
                    break;
                }
                // Past max_bytes, but never before the first batch: a consumer must progress.
                let serves = header.last_offset() >= offset;
                if serves && served_bytes > 0 && served_bytes + total > max_bytes {
                    done = true;
                    break;
                }
                if rest.len() < total {
                    // The batch continues past this read; read again starting at it.
                    window = window.max(total as u64 + ALIGN);
                    break;
                }
                let header =
                    record::validate(&rest[..total]).map_err(|e| corrupt(position, e.to_string()))?;
                if let Some(exp) = expected {
                    if header.base_offset != exp {
                        return Err(corrupt(
                            position,
                            format!("batch offset {} where {exp} was expected", header.base_offset),
                        ));
                    }
                }
                expected = Some(header.last_offset() + 1);
                if header.last_offset() >= offset {
                    spans.push((at, at + total));
                    served_bytes += total;
                }
                position += total as u64;
            }
            if let (Some(first), Some(last)) = (spans.first(), spans.last()) {
                let copied = Bytes::copy_from_slice(&data[first.0..last.1]);
                let mut cache = self.shard.tail_cache.borrow_mut();
                for (start, end) in &spans {
                    let batch = copied.slice(start - first.0..end - first.0);
                    if let Ok(h) = BatchHeader::parse(&batch) {
                        cache.insert(self.cache_id, h.base_offset, h.last_offset(), batch.clone());
                    }
                    out.push(batch);
                }
            }
            if done {
                break 'reads;
            }
        }
        if out.is_empty() && offset < high_watermark && seg.meta.borrow().next_offset > offset {
            return Err(corrupt(position, format!("no batch containing offset {offset} found")));
        }
        Ok(())
    }

    async fn truncate_drained(&self, offset: i64) -> Result<(), StorageError> {
        let (target, later) = {
            let st = self.state.borrow();
            let i = st.segments.partition_point(|s| s.base_offset <= offset).max(1);
            (st.segments[i - 1].clone(), st.segments[i..].to_vec())
        };
        let file = target.file().await?;
        let size = target.meta.borrow().size_bytes;
        // Rebuild the segment's view by scanning it, then cut at the batch holding `offset`.
        let scanned = scan_segment_file(
            &file,
            &target.log_path,
            target.base_offset,
            size,
            self.config.index_interval_bytes,
            RECOVERY_BATCH_BYTES_MAX,
        )
        .await?;
        if let Some((position, detail)) = scanned.damage {
            return Err(StorageError::Corrupt { segment: target.log_path.clone(), position, detail });
        }
        let relative = (offset - target.base_offset) as u32;
        let cut = if offset == target.base_offset {
            (0, target.base_offset)
        } else {
            let entry = scanned.index.lookup(relative);
            find_batch_start(&file, &target.log_path, entry.position.into(), scanned.valid_bytes, offset)
                .await?
        };
        let (cut_pos, cut_offset) = cut;
        // Before anything is cut: a snapshot past the cut, left behind, would look valid again
        // once new appends pass its offset.
        remove_snapshots_after(&self.dir, cut_offset)?;
        target.wait_preallocation_idle().await;
        file.truncate(cut_pos).await.map_err(|e| {
            StorageError::io(format!("truncating {} to {cut_pos}", target.log_path.display()), e)
        })?;
        let rebuilt = scan_segment_file(
            &file,
            &target.log_path,
            target.base_offset,
            cut_pos,
            self.config.index_interval_bytes,
            RECOVERY_BATCH_BYTES_MAX,
        )
        .await?;
        assert!(
            rebuilt.valid_bytes == cut_pos && rebuilt.next_offset == cut_offset,
            "segment {} does not end at the truncation point after truncating",
            target.log_path.display()
        );
        target.remove_index_files();
        for seg in &later {
            remove_segment_files(seg);
        }
        let mut carry = Carry { file_pos: align_down(cut_pos), bytes: Vec::with_capacity(ALIGN as usize) };
        read_carry(&target, cut_pos, &mut carry).await?;
        let active_file = open_plain(&target.log_path, false)?;
        {
            let mut meta = target.meta.borrow_mut();
            meta.size_bytes = cut_pos;
            meta.written_bytes = cut_pos;
            meta.durable_bytes = cut_pos;
            meta.next_offset = cut_offset;
            meta.index = rebuilt.index;
            meta.preallocated_bytes = cut_pos;
            meta.sealed = false;
            meta.final_on_disk = false;
            let mut st = self.state.borrow_mut();
            let keep = st.segments.len() - later.len();
            st.segments.truncate(keep);
            st.carry = carry;
            st.active_file = Some(active_file);
        }
        self.log_end_offset.set(cut_offset);
        if self.high_watermark.get() > cut_offset {
            self.high_watermark.set(cut_offset);
        }
        self.shard.tail_cache.borrow_mut().remove_from(self.cache_id, cut_offset);
        // Exact at once; the rebuild from the log then restores producers whose every remembered
        // batch was cut (they would otherwise be unknown, accepted at any sequence).
        self.state.borrow_mut().producers.truncate_from(cut_offset);
        let segments = self.state.borrow().segments.clone();
        match recover_producer_state(&self.dir, &segments, self.log_start_offset.get(), cut_offset, false)
            .await
        {
            Ok(producers) => self.state.borrow_mut().producers = producers,
            Err(e) => tracing::warn!(dir = %self.dir.display(), error = %e,
                "rebuilding the producer state after truncation failed; keeping the truncated state"),
        }
        Ok(())
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        // Lets the flusher notice the partition is gone and end.
        self.flush_wanted.notify_all();
        if let Ok(mut cache) = self.shard.tail_cache.try_borrow_mut() {
            cache.remove_partition(self.cache_id);
        }
    }
}

/// The flusher: the only task that writes a partition's files, one job at a time.
async fn run_flusher(partition: Weak<Partition>, wake: Rc<Notify>) {
    loop {
        let notified = wake.notified();
        {
            let Some(p) = partition.upgrade() else { return };
            if !p.state.borrow().pending.is_empty() {
                p.flush_round().await;
                continue;
            }
            if p.closed.get() {
                p.flusher_running.set(false);
                p.progress.notify_all();
                return;
            }
        }
        notified.await;
    }
}

/// Fills `carry` with the bytes of the partial block below `size` (the next write rewrites it).
async fn read_carry(seg: &Segment, size: u64, carry: &mut Carry) -> Result<(), StorageError> {
    carry.file_pos = align_down(size);
    carry.bytes.clear();
    let partial = (size - carry.file_pos) as usize;
    if partial == 0 {
        return Ok(());
    }
    let file = seg.file().await?;
    let block = read_aligned(&file, carry.file_pos, ALIGN as usize).await.map_err(|e| {
        StorageError::io(format!("reading {} at byte {}", seg.log_path.display(), carry.file_pos), e)
    })?;
    if block.len() < partial {
        return Err(StorageError::Corrupt {
            segment: seg.log_path.clone(),
            position: carry.file_pos,
            detail: format!("file shorter than its recovered size {size}"),
        });
    }
    carry.bytes.extend_from_slice(&block[..partial]);
    Ok(())
}

/// Walks batch headers from `position` (a batch start) to the batch holding `offset`.
async fn find_batch_start(
    file: &glommio::io::DmaFile,
    path: &Path,
    mut position: u64,
    end: u64,
    offset: i64,
) -> Result<(u64, i64), StorageError> {
    while position < end {
        let from = align_down(position);
        let len = align_up(position + BATCH_HEADER_LEN as u64) - from;
        let block = read_aligned(file, from, len as usize)
            .await
            .map_err(|e| StorageError::io(format!("reading {} at byte {position}", path.display()), e))?;
        let header_bytes = block.get((position - from) as usize..).unwrap_or(&[]);
        let header = BatchHeader::parse(header_bytes).map_err(|e| StorageError::Corrupt {
            segment: path.to_path_buf(),
            position,
            detail: e.to_string(),
        })?;
        if header.last_offset() >= offset {
            return Ok((position, header.base_offset));
        }
        position += header.total_len() as u64;
    }
    Err(StorageError::Corrupt {
        segment: path.to_path_buf(),
        position,
        detail: format!("offset {offset} not found before the end of the segment"),
    })
}

/// Removes the producer-state snapshots past `offset` and makes the removal durable.
fn remove_snapshots_after(dir: &Path, offset: i64) -> Result<(), StorageError> {
    let snapshots = producer_state::list_snapshots(dir)
        .map_err(|e| StorageError::io(format!("listing producer-state snapshots in {}", dir.display()), e))?;
    let mut removed = false;
    for (_, path) in snapshots.iter().filter(|(at, _)| *at > offset) {
        std::fs::remove_file(path)
            .map_err(|e| StorageError::io(format!("removing {}", path.display()), e))?;
        removed = true;
    }
    if removed {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Rebuilds the producer state of a log holding `log_start..log_end` in `segments`: the newest
/// usable snapshot, then the batch headers after it. Snapshots past `log_end` (they describe
/// batches the log no longer holds) and damaged ones are removed, each with a log line.
async fn recover_producer_state(
    dir: &Path,
    segments: &[Rc<Segment>],
    log_start: i64,
    log_end: i64,
    clean_shutdown: bool,
) -> Result<ProducerStates, StorageError> {
    let listing = |e| StorageError::io(format!("listing producer-state snapshots in {}", dir.display()), e);
    producer_state::remove_temporary_snapshots(dir).map_err(listing)?;
    let snapshots = producer_state::list_snapshots(dir).map_err(listing)?;
    let found = snapshots.len();
    let mut loaded: Option<(i64, ProducerStates)> = None;
    let mut removed = false;
    for (offset, path) in snapshots {
        let unusable = if offset > log_end {
            format!("it is past the log end offset {log_end}")
        } else {
            let decoded = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|bytes| ProducerStates::decode_snapshot(&bytes).map_err(|e| e.to_string()));
            match decoded {
                Ok((at, states)) if at == offset => {
                    loaded = Some((offset, states));
                    break;
                }
                Ok((at, _)) => format!("it holds the state at offset {at}, not at {offset} as named"),
                Err(e) => e,
            }
        };
        tracing::warn!(snapshot = %path.display(), "removing an unusable producer-state snapshot: {unusable}");
        std::fs::remove_file(&path)
            .map_err(|e| StorageError::io(format!("removing {}", path.display()), e))?;
        removed = true;
    }
    if removed {
        sync_dir(dir)?;
    }
    let snapshot_offset = loaded.as_ref().map(|(offset, _)| *offset);
    let (mut states, from) = match loaded {
        Some((offset, states)) => (states, offset.max(log_start)),
        None if found == 0 && clean_shutdown => {
            // Every clean close writes a snapshot: this log was written before producer state
            // was kept, and scanning all of it would find nothing to remember.
            tracing::info!(dir = %dir.display(),
                "no producer-state snapshot after a clean shutdown: starting with no producer state");
            (ProducerStates::default(), log_end)
        }
        None => {
            if log_end > log_start {
                tracing::info!(dir = %dir.display(), log_start, log_end,
                    "no usable producer-state snapshot: rebuilding it by scanning the whole log");
            }
            (ProducerStates::default(), log_start)
        }
    };
    let replayed = replay_producer_batches(segments, from, log_end, &mut states).await?;
    if snapshot_offset.is_none() && log_end > log_start {
        // Spares the next recovery this scan. Safe even if the batches below `log_end` are not
        // synced yet: should a power loss take them, the snapshot is past the log end and goes.
        let bytes = states.encode_snapshot(log_end);
        let target = dir.to_path_buf();
        let written = blocking::run(move || {
            producer_state::write_snapshot(&target, log_end, &bytes).map_err(|e| {
                StorageError::io(format!("writing a producer-state snapshot in {}", target.display()), e)
            })?;
            sync_dir(&target)
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("{e}; the next recovery scans again"),
            Err(panic) => tracing::warn!(dir = %dir.display(), "writing a producer-state snapshot: {panic}"),
        }
    }
    if from < log_end || !states.is_empty() {
        tracing::info!(
            dir = %dir.display(),
            snapshot = ?snapshot_offset,
            scanned_from = from,
            scanned_to = log_end,
            idempotent_batches = replayed,
            producers = states.len(),
            "producer state recovered"
        );
    }
    Ok(states)
}

/// Replays the idempotent batches with base offsets in `from..to` (`from` a batch boundary) into
/// `states`, reading only the segments that hold them. Returns how many were replayed. Damage
/// stops the segment's replay with a warning (reads of those offsets report it themselves).
async fn replay_producer_batches(
    segments: &[Rc<Segment>],
    from: i64,
    to: i64,
    states: &mut ProducerStates,
) -> Result<u64, StorageError> {
    let mut replayed = 0u64;
    for seg in segments {
        let (size_bytes, start) = {
            let meta = seg.meta.borrow();
            if meta.next_offset <= from || seg.base_offset >= to {
                continue;
            }
            let start = match u32::try_from(from - seg.base_offset) {
                Ok(relative) if relative > 0 => meta.index.lookup(relative),
                _ => IndexEntry { relative_offset: 0, position: 0 },
            };
            (meta.size_bytes, start)
        };
        let file = seg.file().await?;
        let mut position = u64::from(start.position);
        let mut expected = seg.base_offset + i64::from(start.relative_offset);
        let mut window = REPLAY_WINDOW_BYTES;
        while position < size_bytes {
            let read_from = align_down(position);
            let read_to = align_up((position + window).min(size_bytes));
            let data = read_aligned(&file, read_from, (read_to - read_from) as usize).await.map_err(|e| {
                StorageError::io(format!("reading {} at byte {read_from}", seg.log_path.display()), e)
            })?;
            let end = ((size_bytes - read_from) as usize).min(data.len());
            let buf = data.get((position - read_from) as usize..end).unwrap_or(&[]);
            let outcome = scan_batches(buf, expected, RECOVERY_BATCH_BYTES_MAX, |_, h| {
                if (from..to).contains(&h.base_offset) {
                    if let Some(batch) = ProducerBatch::of(h) {
                        states.replay(&batch, h.base_offset, h.last_offset());
                        replayed += 1;
                    }
                }
            });
            position += outcome.valid_bytes as u64;
            expected = outcome.next_offset;
            let stopped = match outcome.end {
                ScanEnd::NeedMore { needed_bytes, .. } => {
                    let wanted = needed_bytes as u64 + ALIGN;
                    if position >= size_bytes || (outcome.valid_bytes == 0 && window >= wanted) {
                        // No progress with a window that holds the batch: the file ends early.
                        (position < size_bytes)
                            .then(|| format!("file ends inside the batch at byte {position}"))
                    } else {
                        window = window.max(wanted);
                        continue;
                    }
                }
                ScanEnd::Zeroes { .. } => {
                    Some(format!("zero bytes at {position}, before the end of the data"))
                }
                ScanEnd::Invalid { detail, .. } => Some(detail),
            };
            if let Some(detail) = stopped {
                tracing::warn!(segment = %seg.log_path.display(), position, %detail,
                    "producer-state replay stopped early in this segment");
            }
            break;
        }
    }
    Ok(replayed)
}

/// Recovers the segments named by `bases` (sorted): loads or rebuilds their indexes, truncates
/// torn tails, drops segments whose offsets no longer follow.
async fn recover_segments(
    dir: &Path,
    config: &LogConfig,
    bases: &[i64],
    report: &mut RecoveryReport,
) -> Result<Vec<Rc<Segment>>, StorageError> {
    let mut segments: Vec<Rc<Segment>> = Vec::new();
    let recovered_at_ms = now_ms();
    for (i, &base) in bases.iter().enumerate() {
        let seg = Rc::new(Segment::new(dir, base, config.index_interval_bytes));
        if let Some(prev) = segments.last() {
            let prev_next = prev.meta.borrow().next_offset;
            if base < prev_next {
                return Err(StorageError::Corrupt {
                    segment: seg.log_path.clone(),
                    position: 0,
                    detail: format!(
                        "segment starts at offset {base} but {} ends at {prev_next}: offsets overlap",
                        prev.log_path.display()
                    ),
                });
            }
            if base > prev_next {
                // An earlier segment lost its tail: what follows cannot be attached in order.
                for &later in &bases[i..] {
                    let gone = Segment::new(dir, later, config.index_interval_bytes);
                    tracing::warn!(segment = %gone.log_path.display(), expected_offset = prev_next,
                        "removing segment after an offset gap");
                    remove_segment_files(&gone);
                    report.segments_removed.push(gone.log_path.clone());
                }
                break;
            }
        }
        let is_last = i + 1 == bases.len();
        let file = seg.file().await?;
        let file_bytes = file
            .file_size()
            .await
            .map_err(|e| StorageError::io(format!("sizing {}", seg.log_path.display()), e))?;

        if !is_last {
            match seg.load_indexes(file_bytes, config.index_interval_bytes) {
                Ok((index, summary)) => {
                    report.indexes_loaded += 1;
                    let mut meta = seg.meta.borrow_mut();
                    meta.size_bytes = file_bytes;
                    meta.written_bytes = file_bytes;
                    meta.durable_bytes = file_bytes;
                    meta.preallocated_bytes = file_bytes;
                    meta.next_offset = summary.next_offset;
                    meta.index = index;
                    meta.sealed = true;
                    meta.final_on_disk = true;
                    drop(meta);
                    segments.push(seg);
                    continue;
                }
                Err(reason) => {
                    tracing::info!(segment = %seg.log_path.display(), %reason, "rebuilding index by scanning");
                }
            }
        }

        let scanned = scan_segment_file(
            &file,
            &seg.log_path,
            base,
            file_bytes,
            config.index_interval_bytes,
            RECOVERY_BATCH_BYTES_MAX,
        )
        .await?;
        report.segments_scanned += 1;
        if let Some((position, detail)) = &scanned.damage {
            let last_good_offset = (scanned.next_offset > base).then_some(scanned.next_offset - 1);
            tracing::warn!(
                segment = %seg.log_path.display(), position, bytes_dropped = file_bytes - position,
                ?last_good_offset, %detail, "truncating torn or damaged tail"
            );
            report.torn_tails.push(TornTail {
                segment: seg.log_path.clone(),
                position: *position,
                bytes_dropped: file_bytes - position,
                last_good_offset,
                detail: detail.clone(),
            });
        }
        if file_bytes > scanned.valid_bytes {
            file.truncate(scanned.valid_bytes)
                .await
                .map_err(|e| StorageError::io(format!("truncating {}", seg.log_path.display()), e))?;
        }
        {
            let mut meta = seg.meta.borrow_mut();
            meta.size_bytes = scanned.valid_bytes;
            meta.written_bytes = scanned.valid_bytes;
            meta.durable_bytes = scanned.valid_bytes;
            meta.preallocated_bytes = scanned.valid_bytes;
            meta.next_offset = scanned.next_offset;
            meta.index = scanned.index;
            meta.sealed = !is_last;
            meta.final_on_disk = !is_last;
            meta.first_append_ms = (scanned.valid_bytes > 0).then_some(recovered_at_ms);
        }
        if !is_last {
            report.indexes_rebuilt += 1;
            seg.persist_indexes()?;
        }
        segments.push(seg);
    }
    Ok(segments)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::scan::tests::batch;
    use crate::storage::{Durability, SequenceGap};
    use glommio::{LocalExecutorBuilder, Placement};
    use std::future::Future;
    use std::io::{Seek, SeekFrom, Write};

    fn run<F: Future<Output = ()> + 'static>(f: impl FnOnce() -> F + Send + 'static) {
        LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(1 << 20)
            .spawn(move || async move { f().await })
            .unwrap()
            .join()
            .unwrap();
    }

    fn config(segment_bytes: u64, durability: Durability) -> LogConfig {
        LogConfig {
            segment_bytes,
            segment_ms: 3_600_000,
            retention_bytes: None,
            retention_ms: None,
            durability,
            index_interval_bytes: 256,
            batch_bytes_max: 1 << 20,
            records_per_batch_max: 1000,
        }
    }

    /// Appends `count` one-batch requests (records cycling 1..=3, timestamp from `ts`), returning
    /// the stamped bytes of each batch as the log must hold them.
    fn append_many(p: &Partition, count: usize, ts: impl Fn(usize) -> i64) -> Vec<Vec<u8>> {
        let mut expected = Vec::new();
        for i in 0..count {
            let records = (i % 3) as i32 + 1;
            let b = batch(-1, records, ts(i), i % 40);
            let r = p.append(BytesMut::from(&b[..])).unwrap();
            assert_eq!(r.last_offset - r.base_offset, i64::from(records) - 1);
            expected.push(batch(r.base_offset, records, ts(i), i % 40));
        }
        expected
    }

    /// Reads everything from `from` to the high watermark with `max_bytes` per read.
    async fn read_all(p: &Partition, from: i64, max_bytes: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut offset = from;
        while offset < p.high_watermark() {
            let r = p.read(offset, max_bytes).await.unwrap();
            assert!(!r.chunks.is_empty(), "no progress at offset {offset}");
            for c in r.chunks {
                let h = BatchHeader::parse(&c).unwrap();
                assert!(h.last_offset() >= offset);
                offset = h.last_offset() + 1;
                out.push(c.to_vec());
            }
        }
        out
    }

    fn log_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn round_trip_across_rolls_from_disk_and_cache() {
        run(|| async {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("t/0");
            // No tail cache: every read goes to disk.
            let shard = ShardStorage::new(tmp.path().to_path_buf(), 0, 0);
            let (p, report) =
                Partition::open(dir.clone(), config(4096, Durability::Written), shard).await.unwrap();
            assert_eq!(report.log_end_offset, 0);
            let expected = append_many(&p, 300, |i| 1000 + i as i64);
            p.wait_durable(p.log_end_offset() - 1).await.unwrap();
            assert_eq!(p.high_watermark(), p.log_end_offset());
            assert!(log_files(&dir).len() > 5, "expected several rolls");
            assert_eq!(read_all(&p, 0, 700).await, expected);
            assert_eq!(read_all(&p, 0, 1 << 20).await, expected);
            // Reading from the middle of a batch returns that whole batch first.
            let third = BatchHeader::parse(&expected[2]).unwrap();
            let r = p.read(third.last_offset(), 1).await.unwrap();
            assert_eq!(r.chunks.len(), 1);
            assert_eq!(&r.chunks[0][..], &expected[2][..]);

            // With a cache, a read at the tail is a hit and needs no disk.
            let shard = ShardStorage::new(tmp.path().to_path_buf(), 1 << 20, 0);
            let (q, _) =
                Partition::open(tmp.path().join("t/1"), config(4096, Durability::Written), shard.clone())
                    .await
                    .unwrap();
            let expected = append_many(&q, 50, |i| i as i64);
            q.wait_durable(q.log_end_offset() - 1).await.unwrap();
            let before = shard.cache_stats();
            assert_eq!(read_all(&q, 0, 1 << 20).await, expected);
            let after = shard.cache_stats();
            assert!(after.hits > before.hits);
            assert_eq!(after.misses, before.misses);
            p.close().await.unwrap();
            q.close().await.unwrap();
        });
    }

    /// Batches of many sizes, so chunks start with a carried block and then fill only that block,
    /// end exactly at its boundary, or run far past it: the head and body writes put every byte
    /// where a reopened log reads it back.
    #[test]
    fn chunks_split_at_the_carried_block_read_back_after_reopen() {
        run(|| async {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("p");
            let shard = ShardStorage::new(tmp.path().to_path_buf(), 0, 0);
            let (p, _) = Partition::open(dir.clone(), config(8 << 20, Durability::Fsync), shard.clone())
                .await
                .unwrap();
            let sizes = [1usize, 4000, 17, 4096, 9000, 3, 70_000, 500, 4095, 200_000, 12];
            let mut expected = Vec::new();
            for round in 0..6 {
                for (i, value_len) in sizes.iter().enumerate() {
                    let b = batch(-1, 1, (round * 100 + i) as i64, *value_len);
                    let r = p.append(BytesMut::from(&b[..])).unwrap();
                    expected.push(batch(r.base_offset, 1, (round * 100 + i) as i64, *value_len));
                }
                // Alternate between letting every chunk reach the disk and queueing several.
                if round % 2 == 0 {
                    p.wait_durable(p.log_end_offset() - 1).await.unwrap();
                }
            }
            p.wait_durable(p.log_end_offset() - 1).await.unwrap();
            assert_eq!(read_all(&p, 0, 64 << 10).await, expected);
            p.close().await.unwrap();

            let (p, report) = Partition::open(dir.clone(), config(8 << 20, Durability::Fsync), shard.clone())
                .await
                .unwrap();
            assert!(report.torn_tails.is_empty(), "{report}");
            assert_eq!(read_all(&p, 0, 1 << 20).await, expected);
            p.close().await.unwrap();
        });
    }

    #[test]
    fn close_and_reopen_keeps_everything() {
        run(|| async {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("p");
            let shard = ShardStorage::new(tmp.path().to_path_buf(), 0, 0);
            let (p, _) =
                Partition::open(dir.clone(), config(4096, Durability::Fsync), shard.clone()).await.unwrap();
            let mut expected = append_many(&p, 120, |i| i as i64);
            p.close().await.unwrap();
            assert!(matches!(p.append(BytesMut::from(&batch(0, 1, 0, 1)[..])), Err(StorageError::Closed)));
            assert!(dir.join(CLEAN_SHUTDOWN_MARKER).exists());

            let (p, report) =
                Partition::open(dir.clone(), config(4096, Durability::Fsync), shard.clone()).await.unwrap();
            assert!(report.clean_shutdown, "{report}");
            assert!(report.torn_tails.is_empty(), "{report}");
            assert!(report.indexes_loaded > 0, "{report}");
            assert_eq!(report.segments_scanned, 1, "only the last segment is scanned: {report}");
            assert!(!dir.join(CLEAN_SHUTDOWN_MARKER).exists());
            let end = p.log_end_offset();
            assert_eq!(read_all(&p, 0, 4096).await, expected);
            // Offsets continue after reopen.
            expected.extend(append_many(&p, 10, |i| i as i64));
            assert_eq!(BatchHeader::parse(&expected[120]).unwrap().base_offset, end);
            p.wait_durable(p.log_end_offset() - 1).await.unwrap();
            assert_eq!(read_all(&p, 0, 4096).await, expected);
            p.close().await.unwrap();
        });
    }

    #[test]
    fn crash_with_torn_tail_is_truncated_and_reported() {
        run(|| async {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("p");
            let shard = ShardStorage::new(tmp.path().to_path_buf(), 0, 0);
            let (p, _) = Partition::open(dir.clone(), config(1 << 20, Durability::Written), shard.clone())
                .await
                .unwrap();
            let expected = append_many(&p, 40, |i| i as i64);
            p.wait_durable(p.log_end_offset() - 1).await.unwrap();
            drop(p); // "crash": no close, no marker, file still preallocated with zeroes.

            let last_pos: usize = expected[..39].iter().map(|b| b.len()).sum();
            let path = log_files(&dir).pop().unwrap();
            let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.seek(SeekFrom::Start((last_pos + expected[39].len() - 5) as u64)).unwrap();
            f.write_all(&[0xff; 3]).unwrap();
            drop(f);

            let (p, report) =
                Partition::open(dir.clone(), config(1 << 20, Durability::Written), shard).await.unwrap();
            assert!(!report.clean_shutdown);
            assert_eq!(report.torn_tails.len(), 1, "{report}");
            let torn = &report.torn_tails[0];
            assert_eq!(torn.position, last_pos as u64);
            let last_good = BatchHeader::parse(&expected[38]).unwrap().last_offset();
            assert_eq!(torn.last_good_offset, Some(last_good));
            assert_eq!(p.log_end_offset(), last_good + 1);
            assert_eq!(std::fs::metadata(&path).unwrap().len(), last_pos as u64);
            assert_eq!(read_all(&p, 0, 1000).await, expected[..39].to_vec());
            // Appends continue at the truncation point.
            let more = append_many(&p, 3, |i| i as i64);
            assert_eq!(BatchHeader::parse(&more[0]).unwrap().base_offset, last_good + 1);
            p.wait_durable(p.log_end_offset() - 1).await.unwrap();
            p.close().await.unwrap();
        });
    }

    fn files_with_extension(dir: &Path, ext: &str) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|e| e == ext))
            .count()
    }

    #[test]
    fn spare_segments_and_off_shard_deletion_leave_states_recovery_accepts() {
        run(|| async {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("p");
            let shard = ShardStorage::new(tmp.path().to_path_buf(), 0, 0);
            let mut cfg = config(8192, Durability::Written);
            cfg.retention_bytes = Some(4 * 8192);
            let (p, _) = Partition::open(dir.clone(), cfg.clone(), shard.clone()).await.unwrap();
            let expected = append_many(&p, 600, |i| i as i64);
            p.wait_durable(p.log_end_offset() - 1).await.unwrap();
            assert!(log_files(&dir).len() > 8, "many rolls, each through a spare or a fresh file");
            assert_eq!(read_all(&p, 0, 1 << 20).await, expected);

            let report = p.housekeep(now_ms()).await.unwrap();
            assert!(!report.segments_deleted.is_empty(), "{report}");
            let logs = log_files(&dir).len();
            // Deleted segments lose all three files; sealed ones keep both indexes.
            assert_eq!(files_with_extension(&dir, "index"), logs - 1);
            assert_eq!(files_with_extension(&dir, "timeindex"), logs - 1);
            let start = p.log_start_offset();
            assert!(matches!(p.read(0, 100).await, Err(StorageError::OffsetOutOfRange { requested: 0, .. })));
            let kept = read_all(&p, start, 1 << 20).await;
            assert_eq!(kept[..], expected[expected.len() - kept.len()..]);
            p.close().await.unwrap();
            assert!(!dir.join(SPARE_SEGMENT_NAME).exists(), "close removes the spare");

            // A crash part way through a deletion: the oldest segment's indexes are gone, its log is
            // not; and a spare was left behind.
            let oldest = log_files(&dir).remove(0);
            std::fs::remove_file(oldest.with_extension("index")).unwrap();
            std::fs::remove_file(oldest.with_extension("timeindex")).unwrap();
            std::fs::write(dir.join(SPARE_SEGMENT_NAME), vec![0u8; 8192]).unwrap();
            let (p, report) = Partition::open(dir.clone(), cfg, shard).await.unwrap();
            assert_eq!(report.indexes_rebuilt, 1, "{report}");
            assert!(!dir.join(SPARE_SEGMENT_NAME).exists(), "open removes a leftover spare");
            assert_eq!(p.log_start_offset(), start);
            assert_eq!(read_all(&p, start, 1 << 20).await, kept);
            p.close().await.unwrap();
        });
    }

    #[test]
    fn reading_a_segment_shrunk_behind_its_back_fails_instead_of_looping() {
        run(|| async {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("p");
            let shard = ShardStorage::new(tmp.path().to_path_buf(), 0, 0);
            let (p, _) =
                Partition::open(dir.clone(), config(8192, Durability::Written), shard).await.unwrap();
            append_many(&p, 200, |i| i as i64);
            p.wait_durable(p.log_end_offset() - 1).await.unwrap();
            assert!(log_files(&dir).len() > 2);
            // What retention's gradual release does to a deleted segment a reader still holds.
            let first = log_files(&dir).remove(0);
            std::fs::OpenOptions::new().write(true).open(&first).unwrap().set_len(4096).unwrap();
            match p.read(0, 1 << 20).await {
                Err(StorageError::Corrupt { segment, .. }) => assert_eq!(segment, first),
                other => panic!("expected Corrupt for a shrunk segment, got {other:?}"),
            }
            p.close().await.unwrap();
        });
    }

    #[test]
    fn retention_by_size_and_time_deletes_whole_segments() {
        run(|| async {
            let tmp = tempfile::tempdir().unwrap();
            let shard = ShardStorage::new(tmp.path().to_path_buf(), 1 << 20, 0);
            let now = 10_000_000i64;

            let mut cfg = config(4096, Durability::Written);
            cfg.retention_bytes = Some(3 * 4096);
            let (p, _) = Partition::open(tmp.path().join("size"), cfg, shard.clone()).await.unwrap();
            let expected = append_many(&p, 300, |_| now);
            p.wait_durable(p.log_end_offset() - 1).await.unwrap();
            let before = log_files(&tmp.path().join("size")).len();
            let report = p.housekeep(now).await.unwrap();
            assert!(!report.segments_deleted.is_empty(), "{report}");
            assert_eq!(log_files(&tmp.path().join("size")).len(), before - report.segments_deleted.len());
            let start = p.log_start_offset();
            assert_eq!(report.log_start_offset, start);
            assert!(start > 0);
            let total: u64 = std::fs::read_dir(tmp.path().join("size"))
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "log"))
                .map(|p| std::fs::metadata(p).unwrap().len().min(4096))
                .sum();
            assert!(total >= 2 * 4096, "size retention keeps at least the limit minus one segment");
            assert!(matches!(p.read(0, 100).await, Err(StorageError::OffsetOutOfRange { requested: 0, .. })));
            let kept = read_all(&p, start, 1 << 20).await;
            assert_eq!(kept[..], expected[expected.len() - kept.len()..]);
            p.close().await.unwrap();

            let mut cfg = config(4096, Durability::Written);
            cfg.retention_ms = Some(3_600_000);
            let (p, _) = Partition::open(tmp.path().join("time"), cfg, shard.clone()).await.unwrap();
            let old = append_many(&p, 100, |_| now - 7_200_000);
            let fresh_from = p.log_end_offset();
            // Roll so the old data sits in sealed segments only.
            let report = p.housekeep(now).await.unwrap();
            assert!(report.rolled_segment.is_some(), "active segment past retention is rolled: {report}");
            let fresh = append_many(&p, 20, |_| now);
            p.wait_durable(p.log_end_offset() - 1).await.unwrap();
            let report = p.housekeep(now).await.unwrap();
            assert!(!old.is_empty());
            assert_eq!(p.log_start_offset(), fresh_from, "{report}");
            assert!(matches!(p.read(fresh_from - 1, 100).await, Err(StorageError::OffsetOutOfRange { .. })));
            assert_eq!(read_all(&p, fresh_from, 1 << 20).await, fresh);
            p.close().await.unwrap();
        });
    }

    #[test]
    fn fsync_durability_wait_and_long_poll_resolve() {
        run(|| async {
            let tmp = tempfile::tempdir().unwrap();
            let shard = ShardStorage::new(tmp.path().to_path_buf(), 1 << 20, 0);
            let (p, _) = Partition::open(tmp.path().join("p"), config(1 << 20, Durability::Fsync), shard)
                .await
                .unwrap();
            let waiter = {
                let p = p.clone();
                glommio::spawn_local(async move { p.wait_for_data(0).await })
            };
            let r = p.append(BytesMut::from(&batch(0, 5, 1, 10)[..])).unwrap();
            assert_eq!((r.base_offset, r.last_offset), (0, 4));
            p.wait_durable(4).await.unwrap();
            assert_eq!(p.high_watermark(), 5);
            waiter.await;
            let more = append_many(&p, 50, |i| i as i64);
            p.wait_durable(p.log_end_offset() - 1).await.unwrap();
            assert_eq!(p.high_watermark(), p.log_end_offset());
            assert_eq!(read_all(&p, 5, 64).await, more);
            assert!(matches!(p.wait_durable(1000).await, Err(StorageError::OffsetOutOfRange { .. })));
            p.close().await.unwrap();
        });
    }

    #[test]
    fn small_max_bytes_returns_one_whole_batch() {
        run(|| async {
            let tmp = tempfile::tempdir().unwrap();
            for cache_bytes in [0usize, 1 << 20] {
                let shard = ShardStorage::new(tmp.path().to_path_buf(), cache_bytes, 0);
                let dir = tmp.path().join(format!("p{cache_bytes}"));
                let (p, _) = Partition::open(dir, config(1 << 20, Durability::Written), shard).await.unwrap();
                let expected = append_many(&p, 10, |i| i as i64);
                p.wait_durable(p.log_end_offset() - 1).await.unwrap();
                let r = p.read(0, 1).await.unwrap();
                assert_eq!(r.chunks.len(), 1);
                assert_eq!(&r.chunks[0][..], &expected[0][..]);
                assert_eq!(r.high_watermark, p.log_end_offset());
                let end = p.read(p.high_watermark(), 1).await.unwrap();
                assert!(end.chunks.is_empty());
                assert!(matches!(
                    p.read(p.high_watermark() + 1, 1).await,
                    Err(StorageError::OffsetOutOfRange { .. })
                ));
                p.close().await.unwrap();
            }
        });
    }

    #[test]
    fn corrupt_batch_in_sealed_segment_is_reported_with_position() {
        run(|| async {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("p");
            let shard = ShardStorage::new(tmp.path().to_path_buf(), 0, 0);
            let (p, _) =
                Partition::open(dir.clone(), config(4096, Durability::Written), shard.clone()).await.unwrap();
            let expected = append_many(&p, 200, |i| i as i64);
            p.close().await.unwrap();

            let first = log_files(&dir).remove(0);
            let pos: usize = expected[..5].iter().map(|b| b.len()).sum();
            let mut f = std::fs::OpenOptions::new().write(true).open(&first).unwrap();
            f.seek(SeekFrom::Start(pos as u64 + 40)).unwrap();
            f.write_all(&[0x5a]).unwrap();
            drop(f);

            let (p, report) =
                Partition::open(dir.clone(), config(4096, Durability::Written), shard).await.unwrap();
            assert!(report.torn_tails.is_empty(), "sealed segments are not scanned on open: {report}");
            let ok = p.read(0, 1).await.unwrap();
            assert_eq!(&ok.chunks[0][..], &expected[0][..]);
            let bad_offset = BatchHeader::parse(&expected[5]).unwrap().base_offset;
            match p.read(bad_offset, 1 << 20).await {
                Err(StorageError::Corrupt { segment, position, .. }) => {
                    assert_eq!(segment, first);
                    assert_eq!(position, pos as u64);
                }
                other => panic!("expected Corrupt, got {other:?}"),
            }
            p.close().await.unwrap();
        });
    }

    #[test]
    fn invalid_batch_rejects_the_whole_request_and_full_disk_refuses() {
        run(|| async {
            let tmp = tempfile::tempdir().unwrap();
            let shard = ShardStorage::new(tmp.path().to_path_buf(), 1 << 20, 0);
            let (p, _) = Partition::open(tmp.path().join("p"), config(1 << 20, Durability::Written), shard)
                .await
                .unwrap();
            let mut two = batch(0, 2, 1, 5);
            let mut bad = batch(0, 1, 1, 5);
            bad[40] ^= 1;
            two.extend_from_slice(&bad);
            match p.append(BytesMut::from(&two[..])) {
                Err(StorageError::InvalidBatch {
                    index: 1, source: BatchError::CrcMismatch { .. }, ..
                }) => {}
                other => panic!("expected InvalidBatch, got {other:?}"),
            }
            assert_eq!(p.log_end_offset(), 0);
            assert!(matches!(p.append(BytesMut::new()), Err(StorageError::InvalidBatch { index: 0, .. })));
            p.close().await.unwrap();

            let full = ShardStorage::new(tmp.path().to_path_buf(), 1 << 20, u64::MAX);
            let (p, _) = Partition::open(tmp.path().join("q"), config(1 << 20, Durability::Written), full)
                .await
                .unwrap();
            assert!(matches!(
                p.append(BytesMut::from(&batch(0, 1, 1, 5)[..])),
                Err(StorageError::StorageFull { .. })
            ));
            assert_eq!(p.log_end_offset(), 0);
            let r = p.read(0, 100).await.unwrap();
            assert!(r.chunks.is_empty(), "reads keep working when the disk is full");
            p.remove().await.unwrap();
            assert!(!tmp.path().join("q").exists());
        });
    }

    #[test]
    fn truncate_to_drops_the_tail_and_appends_continue() {
        run(|| async {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("p");
            let shard = ShardStorage::new(tmp.path().to_path_buf(), 1 << 20, 0);
            let (p, _) =
                Partition::open(dir.clone(), config(4096, Durability::Written), shard.clone()).await.unwrap();
            let expected = append_many(&p, 150, |i| i as i64);
            p.wait_durable(p.log_end_offset() - 1).await.unwrap();
            // Cut inside the 100th batch: that batch goes too.
            let cut_batch = BatchHeader::parse(&expected[100]).unwrap();
            p.truncate_to(cut_batch.last_offset()).await.unwrap();
            assert_eq!(p.log_end_offset(), cut_batch.base_offset);
            assert_eq!(p.high_watermark(), cut_batch.base_offset);
            assert_eq!(read_all(&p, 0, 4096).await, expected[..100].to_vec());
            let more = append_many(&p, 5, |i| i as i64);
            assert_eq!(BatchHeader::parse(&more[0]).unwrap().base_offset, cut_batch.base_offset);
            p.close().await.unwrap();
            let (p, report) = Partition::open(dir, config(4096, Durability::Written), shard).await.unwrap();
            assert!(report.torn_tails.is_empty(), "{report}");
            let mut all = expected[..100].to_vec();
            all.extend(more);
            assert_eq!(read_all(&p, 0, 4096).await, all);
            p.close().await.unwrap();
        });
    }

    #[test]
    fn offset_for_timestamp_uses_batch_max_timestamps() {
        run(|| async {
            let tmp = tempfile::tempdir().unwrap();
            let shard = ShardStorage::new(tmp.path().to_path_buf(), 0, 0);
            let (p, _) = Partition::open(tmp.path().join("p"), config(4096, Durability::Written), shard)
                .await
                .unwrap();
            let expected = append_many(&p, 200, |i| 1000 + 10 * i as i64);
            p.wait_durable(p.log_end_offset() - 1).await.unwrap();
            assert_eq!(p.offset_for_timestamp(-2).await.unwrap(), Some((0, -1)));
            assert_eq!(p.offset_for_timestamp(-1).await.unwrap(), Some((p.high_watermark(), -1)));
            for i in [0usize, 1, 57, 150, 199] {
                let want = BatchHeader::parse(&expected[i]).unwrap().base_offset;
                let ts = 1000 + 10 * i as i64;
                assert_eq!(p.offset_for_timestamp(ts).await.unwrap(), Some((want, ts)));
                assert_eq!(p.offset_for_timestamp(ts - 5).await.unwrap(), Some((want, ts)));
            }
            assert_eq!(p.offset_for_timestamp(1000 + 10 * 200).await.unwrap(), None);
            p.close().await.unwrap();
        });
    }

    /// An idempotent batch of `records` records: `batch` with producer fields and its crc redone.
    fn idempotent(producer_id: i64, epoch: i16, first_sequence: i32, records: i32) -> Vec<u8> {
        let mut b = batch(-1, records, now_ms(), 16);
        b[43..51].copy_from_slice(&producer_id.to_be_bytes());
        b[51..53].copy_from_slice(&epoch.to_be_bytes());
        b[53..57].copy_from_slice(&first_sequence.to_be_bytes());
        let crc = crc32c::crc32c(&b[21..]);
        b[17..21].copy_from_slice(&crc.to_be_bytes());
        b
    }

    fn append_bytes(p: &Partition, bytes: &[u8]) -> Result<(i64, i64), StorageError> {
        p.append(BytesMut::from(bytes)).map(|r| (r.base_offset, r.last_offset))
    }

    fn snapshot_offsets(dir: &Path) -> Vec<i64> {
        producer_state::list_snapshots(dir).unwrap().into_iter().map(|(offset, _)| offset).collect()
    }

    #[test]
    fn a_retried_batch_gets_its_original_offsets_and_is_not_written_again() {
        run(|| async {
            let tmp = tempfile::tempdir().unwrap();
            let shard = ShardStorage::new(tmp.path().to_path_buf(), 1 << 20, 0);
            let (p, _) = Partition::open(tmp.path().join("p"), config(1 << 20, Durability::Fsync), shard)
                .await
                .unwrap();
            let first = idempotent(1, 0, 0, 3);
            let second = idempotent(1, 0, 3, 2);
            assert_eq!(append_bytes(&p, &first).unwrap(), (0, 2));
            assert_eq!(append_bytes(&p, &batch(-1, 2, 5, 5)).unwrap(), (3, 4), "native batches mix in");
            assert_eq!(append_bytes(&p, &second).unwrap(), (5, 6));
            // Retries, while the originals may still be in flight and after they are durable.
            assert_eq!(append_bytes(&p, &second).unwrap(), (5, 6));
            p.wait_durable(6).await.unwrap();
            assert_eq!(append_bytes(&p, &first).unwrap(), (0, 2));
            p.wait_durable(2).await.unwrap();
            // A request made only of retries answers with the span of the originals.
            let both: Vec<u8> = [first.clone(), second.clone()].concat();
            assert_eq!(append_bytes(&p, &both).unwrap(), (0, 6));
            assert_eq!(p.log_end_offset(), 7, "nothing was written for the retries");
            let stored = read_all(&p, 0, 1 << 20).await;
            assert_eq!(stored.len(), 3);
            assert_eq!(stored[0][12..], first[12..], "the original, as sent, at offset 0");
            assert_eq!(stored[2][12..], second[12..]);
            // The producer continues where it was.
            assert_eq!(append_bytes(&p, &idempotent(1, 0, 5, 1)).unwrap(), (7, 7));
            p.close().await.unwrap();
        });
    }

    #[test]
    fn out_of_order_and_fenced_batches_refuse_the_whole_request() {
        run(|| async {
            let tmp = tempfile::tempdir().unwrap();
            let shard = ShardStorage::new(tmp.path().to_path_buf(), 1 << 20, 0);
            let (p, _) = Partition::open(tmp.path().join("p"), config(1 << 20, Durability::Written), shard)
                .await
                .unwrap();
            assert_eq!(append_bytes(&p, &idempotent(1, 2, 0, 2)).unwrap(), (0, 1));
            match append_bytes(&p, &idempotent(1, 2, 5, 1)) {
                Err(StorageError::OutOfOrderSequence {
                    index: 0,
                    producer_id: 1,
                    epoch: 2,
                    first_sequence: 5,
                    gap: SequenceGap::Expected { next_sequence: 2 },
                }) => {}
                other => panic!("expected an out-of-order sequence, got {other:?}"),
            }
            match append_bytes(&p, &idempotent(1, 1, 2, 1)) {
                Err(StorageError::ProducerFenced { producer_id: 1, epoch: 1, current_epoch: 2, .. }) => {}
                other => panic!("expected a fenced producer, got {other:?}"),
            }
            match append_bytes(&p, &idempotent(1, 3, 2, 1)) {
                Err(StorageError::OutOfOrderSequence {
                    gap: SequenceGap::NewEpoch { current_epoch: 2 },
                    ..
                }) => {}
                other => panic!("expected a new epoch not at sequence 0 to be refused, got {other:?}"),
            }
            // A valid batch of another producer and a bad one: neither is written nor recorded.
            let mixed: Vec<u8> = [idempotent(2, 0, 0, 1), idempotent(1, 2, 9, 1)].concat();
            assert!(matches!(
                append_bytes(&p, &mixed),
                Err(StorageError::OutOfOrderSequence { index: 1, .. })
            ));
            // A retry and a new batch together.
            let retry_and_new: Vec<u8> = [idempotent(1, 2, 0, 2), idempotent(1, 2, 2, 1)].concat();
            match append_bytes(&p, &retry_and_new) {
                Err(StorageError::OutOfOrderSequence {
                    index: 0,
                    gap: SequenceGap::DuplicateAmongNew,
                    ..
                }) => {}
                other => panic!("expected a retry mixed with new batches to be refused, got {other:?}"),
            }
            assert_eq!(p.log_end_offset(), 2);
            // Producer 2's refused batch was not recorded: sent again, it is new, not a retry.
            assert_eq!(append_bytes(&p, &idempotent(2, 0, 0, 1)).unwrap(), (2, 2));
            assert_eq!(append_bytes(&p, &idempotent(1, 2, 2, 1)).unwrap(), (3, 3));
            // A new epoch from 0 takes over; the old one is fenced from then on.
            assert_eq!(append_bytes(&p, &idempotent(1, 3, 0, 1)).unwrap(), (4, 4));
            assert!(matches!(
                append_bytes(&p, &idempotent(1, 2, 3, 1)),
                Err(StorageError::ProducerFenced { .. })
            ));
            assert_eq!(p.log_end_offset(), 5);
            p.close().await.unwrap();
        });
    }

    /// A producer driven by the tests: its next sequence and every batch it sent, as
    /// (bytes as sent, base offset, last offset).
    struct TestProducer {
        id: i64,
        next_sequence: i32,
        sent: Vec<(Vec<u8>, i64, i64)>,
    }

    fn test_producers(ids: std::ops::Range<i64>) -> Vec<TestProducer> {
        ids.map(|id| TestProducer { id, next_sequence: 0, sent: Vec::new() }).collect()
    }

    /// Appends `count` batches per producer (1..=3 records each, producers interleaved).
    fn append_producers(p: &Partition, producers: &mut [TestProducer], count: usize) {
        for i in 0..count {
            for producer in producers.iter_mut() {
                let records = (i % 3) as i32 + 1;
                let b = idempotent(producer.id, 0, producer.next_sequence, records);
                let (base, last) = append_bytes(p, &b).unwrap();
                assert_eq!(last - base, i64::from(records) - 1);
                producer.next_sequence += records;
                producer.sent.push((b, base, last));
            }
        }
    }

    /// Every producer's last five batches are retries answered with their offsets, the one before
    /// them is out of order, and nothing is written by checking.
    fn assert_producers_known(p: &Partition, producers: &[TestProducer]) {
        let end = p.log_end_offset();
        for TestProducer { id, sent, .. } in producers {
            let recent = &sent[sent.len() - 5..];
            for (b, base, last) in recent {
                assert_eq!(append_bytes(p, b).unwrap(), (*base, *last), "producer {id}");
            }
            let older = &sent[sent.len() - 6].0;
            assert!(
                matches!(append_bytes(p, older), Err(StorageError::OutOfOrderSequence { .. })),
                "producer {id}: a batch older than the last five is not a retry"
            );
        }
        assert_eq!(p.log_end_offset(), end);
    }

    #[test]
    fn producer_state_survives_close_crash_and_lost_or_damaged_snapshots() {
        run(|| async {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("p");
            let shard = ShardStorage::new(tmp.path().to_path_buf(), 0, 0);
            let cfg = config(4096, Durability::Written);
            let (p, _) = Partition::open(dir.clone(), cfg.clone(), shard.clone()).await.unwrap();
            let mut producers = test_producers(10..13);
            append_producers(&p, &mut producers, 60);
            p.wait_durable(p.log_end_offset() - 1).await.unwrap();
            assert!(log_files(&dir).len() > 3, "several rolls, each with a snapshot");
            assert_producers_known(&p, &producers);

            // Clean close: a snapshot at the log end, and nothing to scan on open.
            let end = p.log_end_offset();
            p.close().await.unwrap();
            let snapshots = snapshot_offsets(&dir);
            assert_eq!(snapshots[0], end);
            assert!(snapshots.len() <= producer_state::SNAPSHOTS_KEPT, "{snapshots:?}");
            let (p, report) = Partition::open(dir.clone(), cfg.clone(), shard.clone()).await.unwrap();
            assert!(report.clean_shutdown);
            assert_producers_known(&p, &producers);

            // Crash (no close): the newest snapshot plus a replay of what follows it.
            append_producers(&p, &mut producers, 20);
            p.wait_durable(p.log_end_offset() - 1).await.unwrap();
            assert!(snapshot_offsets(&dir)[0] < p.log_end_offset());
            drop(p);
            let (p, report) = Partition::open(dir.clone(), cfg.clone(), shard.clone()).await.unwrap();
            assert!(!report.clean_shutdown);
            assert_producers_known(&p, &producers);

            // Crash with every snapshot lost: a scan of the whole log rebuilds the same state.
            append_producers(&p, &mut producers, 10);
            p.wait_durable(p.log_end_offset() - 1).await.unwrap();
            drop(p);
            for (_, path) in producer_state::list_snapshots(&dir).unwrap() {
                std::fs::remove_file(path).unwrap();
            }
            let (p, _) = Partition::open(dir.clone(), cfg.clone(), shard.clone()).await.unwrap();
            assert_producers_known(&p, &producers);

            // A damaged newest snapshot and one past the log end (claiming producer 10 moved to
            // epoch 9) are both removed; the state is rebuilt from the log.
            append_producers(&p, &mut producers, 30);
            p.wait_durable(p.log_end_offset() - 1).await.unwrap();
            let end = p.log_end_offset();
            drop(p);
            let newest = producer_state::list_snapshots(&dir).unwrap().remove(0).1;
            let mut bytes = std::fs::read(&newest).unwrap();
            let last = bytes.len() - 1;
            bytes[last] ^= 0xff;
            std::fs::write(&newest, bytes).unwrap();
            let mut bogus = ProducerStates::default();
            let fake = ProducerBatch {
                producer_id: 10,
                epoch: 9,
                first_sequence: 0,
                last_sequence: 0,
                timestamp_ms: now_ms(),
            };
            bogus.replay(&fake, end + 50, end + 50);
            let past_end = end + 100;
            producer_state::write_snapshot(&dir, past_end, &bogus.encode_snapshot(past_end)).unwrap();
            let (p, _) = Partition::open(dir.clone(), cfg.clone(), shard.clone()).await.unwrap();
            let left = snapshot_offsets(&dir);
            assert!(!left.contains(&past_end), "{left:?}");
            assert!(!newest.exists(), "the damaged snapshot is removed");
            assert_producers_known(&p, &producers);
            p.close().await.unwrap();
        });
    }

    #[test]
    fn a_snapshot_inside_a_segment_is_replayed_from_its_offset() {
        run(|| async {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("p");
            let shard = ShardStorage::new(tmp.path().to_path_buf(), 0, 0);
            let cfg = config(1 << 20, Durability::Written);
            let (p, _) = Partition::open(dir.clone(), cfg.clone(), shard.clone()).await.unwrap();
            let mut producers = test_producers(1..2);
            append_producers(&p, &mut producers, 30);
            let closed_at = p.log_end_offset();
            p.close().await.unwrap();
            assert_eq!(snapshot_offsets(&dir), vec![closed_at]);

            let (p, _) = Partition::open(dir.clone(), cfg.clone(), shard.clone()).await.unwrap();
            producers.extend(test_producers(2..3));
            append_producers(&p, &mut producers, 30);
            p.wait_durable(p.log_end_offset() - 1).await.unwrap();
            drop(p);
            assert_eq!(log_files(&dir).len(), 1, "one segment: the snapshot is inside it");
            let (p, _) = Partition::open(dir.clone(), cfg.clone(), shard.clone()).await.unwrap();
            assert_producers_known(&p, &producers);
            p.close().await.unwrap();

            // A clean shutdown without any snapshot is a log from before producer state was kept:
            // it is not scanned, and every producer starts unknown.
            for (_, path) in producer_state::list_snapshots(&dir).unwrap() {
                std::fs::remove_file(path).unwrap();
            }
            let (p, report) = Partition::open(dir.clone(), cfg, shard).await.unwrap();
            assert!(report.clean_shutdown);
            let end = p.log_end_offset();
            assert_eq!(snapshot_offsets(&dir), vec![end], "the state it starts with is saved at once");
            let (last, _, _) = producers[1].sent.last().unwrap();
            assert_eq!(append_bytes(&p, last).unwrap().0, end, "written again: no state to match");
            p.close().await.unwrap();
        });
    }

    #[test]
    fn a_torn_tail_takes_its_batches_out_of_the_producer_state() {
        run(|| async {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("p");
            let shard = ShardStorage::new(tmp.path().to_path_buf(), 0, 0);
            let cfg = config(1 << 20, Durability::Written);
            let (p, _) = Partition::open(dir.clone(), cfg.clone(), shard.clone()).await.unwrap();
            let sent: Vec<Vec<u8>> = (0..10).map(|i| idempotent(1, 0, i, 1)).collect();
            for (i, b) in sent.iter().enumerate() {
                assert_eq!(append_bytes(&p, b).unwrap(), (i as i64, i as i64));
            }
            p.wait_durable(9).await.unwrap();
            drop(p);
            let last_pos: usize = sent[..9].iter().map(Vec::len).sum();
            let path = log_files(&dir).pop().unwrap();
            let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.seek(SeekFrom::Start((last_pos + sent[9].len() - 5) as u64)).unwrap();
            f.write_all(&[0xff; 3]).unwrap();
            drop(f);

            let (p, report) = Partition::open(dir.clone(), cfg, shard).await.unwrap();
            assert_eq!(report.torn_tails.len(), 1, "{report}");
            assert_eq!(p.log_end_offset(), 9);
            // The torn batch is new again: written, not answered from stale state.
            assert_eq!(append_bytes(&p, &sent[9]).unwrap(), (9, 9));
            assert_eq!(p.log_end_offset(), 10);
            assert_eq!(append_bytes(&p, &sent[8]).unwrap(), (8, 8), "the kept batches are still retries");
            assert_eq!(append_bytes(&p, &sent[9]).unwrap(), (9, 9));
            assert_eq!(p.log_end_offset(), 10);
            p.wait_durable(9).await.unwrap();
            assert_eq!(read_all(&p, 0, 1 << 20).await.len(), 10);
            p.close().await.unwrap();
        });
    }

    #[test]
    fn truncate_to_takes_cut_batches_out_of_the_producer_state() {
        run(|| async {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("p");
            let shard = ShardStorage::new(tmp.path().to_path_buf(), 1 << 20, 0);
            let cfg = config(4096, Durability::Written);
            let (p, _) = Partition::open(dir.clone(), cfg.clone(), shard.clone()).await.unwrap();
            let sent: Vec<Vec<u8>> = (0..150).map(|i| idempotent(1, 0, 2 * i, 2)).collect();
            for (i, b) in sent.iter().enumerate() {
                assert_eq!(append_bytes(&p, b).unwrap().0, 2 * i as i64);
            }
            // Producer 2 appears only past the cut.
            assert_eq!(append_bytes(&p, &idempotent(2, 4, 7, 1)).unwrap(), (300, 300));
            p.wait_durable(300).await.unwrap();
            assert!(snapshot_offsets(&dir)[0] > 200, "snapshots past the cut exist before it");

            p.truncate_to(201).await.unwrap();
            assert_eq!(p.log_end_offset(), 200);
            assert!(snapshot_offsets(&dir).iter().all(|&s| s <= 200), "{:?}", snapshot_offsets(&dir));
            assert_eq!(append_bytes(&p, &sent[99]).unwrap(), (198, 199), "kept batches are retries");
            assert_eq!(p.log_end_offset(), 200);
            assert_eq!(append_bytes(&p, &sent[100]).unwrap(), (200, 201), "cut batches are new");
            assert_eq!(p.log_end_offset(), 202);
            // Producer 2 is unknown again: any epoch and sequence.
            assert_eq!(append_bytes(&p, &idempotent(2, 1, 3, 1)).unwrap(), (202, 202));
            p.wait_durable(202).await.unwrap();
            p.close().await.unwrap();

            let (p, _) = Partition::open(dir, cfg, shard).await.unwrap();
            assert_eq!(append_bytes(&p, &sent[100]).unwrap(), (200, 201));
            assert!(matches!(
                append_bytes(&p, &idempotent(2, 0, 4, 1)),
                Err(StorageError::ProducerFenced { current_epoch: 1, .. })
            ));
            p.close().await.unwrap();
        });
    }
}
