//! The write path up to the flusher: `append` (validation, offsets and leader epoch 0, producer-state check, the one
//! copy of the bytes into chunks), `append_replicated` (a replica's append of batches its leader
//! stamped: offsets and epochs kept, producers recorded without verdicts), space reservation (synchronous fallocate, background steps, the
//! spare next segment) and the roll to a new active segment. Never writes record bytes to a file
//! itself: only the flusher does.

use std::cell::RefCell;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use glommio::io::DmaBuffer;

use super::{
    active, active_fd, create_segment_file, now_ms, Job, Partition, ProducerSnapshot, State,
    SPARE_SEGMENT_NAME,
};
use crate::record::{self, BatchError, BatchHeader, BatchLimits, BATCH_HEADER_LEN};
use crate::storage::blocking;
use crate::storage::notify::Notify;
use crate::storage::producer_state::{
    Appending, AppendingBatches, ProducerBatch, ProducerStates, Refused, Rejection, RequestVerdict, Verdict,
};
use crate::storage::segment::{align_down, align_up, Segment, ALIGN};
use crate::storage::tail_cache::Pin;
use crate::storage::{AppendResult, StorageError};

/// The partition leader epoch `append` stamps: a single node is the only leader its log has had.
const SINGLE_LEADER_EPOCH: i32 = 0;

/// Largest fallocate step ahead of the write position (capped at `segment_bytes`).
const PREALLOCATE_STEP_BYTES: u64 = 16 << 20;
/// Smallest step. Steps grow with the file (as much again as it holds), so a partition that gets
/// one record reserves 256 KiB, not 16 MiB: 50,000 such partitions must fit a disk.
const PREALLOCATE_STEP_MIN_BYTES: u64 = 256 << 10;

/// The next preallocation step for a file with `preallocated` bytes reserved.
pub(super) fn preallocate_step(preallocated: u64) -> u64 {
    preallocated.clamp(PREALLOCATE_STEP_MIN_BYTES, PREALLOCATE_STEP_BYTES)
}
/// Smallest chunk allocated for staging appends; larger batches get a chunk of their size.
const CHUNK_BYTES_MIN: usize = 128 << 10;
/// Request payloads smaller than this are copied for the tail cache rather than sliced (see
/// `append`): the size of a connection's receive buffer.
const CACHE_COPY_BELOW_BYTES: usize = 64 << 10;

/// The next segment's file, prepared off the shard.
#[derive(Default)]
enum Spare {
    #[default]
    Absent,
    Preparing,
    /// Created and preallocated; closed (a spare holds no descriptor), opened again at the roll.
    Ready {
        preallocated_bytes: u64,
    },
    /// Preparation failed (or the partition closed): not retried before the next roll.
    Failed,
}

/// Shared with the background task that prepares the spare (which outlives no partition state).
#[derive(Default)]
pub(super) struct SpareSlot {
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
pub(super) struct Chunk {
    pub(super) segment: Rc<Segment>,
    /// The carried partial block and the first new bytes (exactly one block), when there is one.
    pub(super) head: Option<DmaBuffer>,
    /// The bytes after `head` (from `file_pos` when there is no head), block-aligned.
    pub(super) body: DmaBuffer,
    pub(super) file_pos: u64,
    /// Bytes filled, from `file_pos` (including the carried partial block).
    pub(super) len: usize,
    /// First offset staged in this chunk (not counting the carried block).
    pub(super) first_offset: i64,
    /// Offset after the last batch staged in this chunk.
    pub(super) end_offset: i64,
}

impl Chunk {
    pub(super) fn head_len(&self) -> usize {
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
    pub(super) fn block_bytes(&self, from: usize, to: usize) -> &[u8] {
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

/// `fallocate` mode 0 (the file size grows with it) up to `end_bytes`.
pub(super) fn fallocate(fd: RawFd, end_bytes: u64) -> std::io::Result<()> {
    // SAFETY: plain fallocate on an fd the caller keeps open for the call; no memory is passed.
    let rc = unsafe { libc::fallocate(fd, 0, 0, end_bytes as libc::off_t) };
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

/// `Partition::check_proposal` over `producers`, without the partition.
fn check_proposal(
    producers: &ProducerStates,
    header: &BatchHeader,
    pending: impl IntoIterator<Item = BatchHeader>,
) -> Result<RequestVerdict, StorageError> {
    let Some(batch) = ProducerBatch::of(header) else { return Ok(RequestVerdict::Append) };
    let pending = pending.into_iter().filter_map(|h| {
        let earlier = ProducerBatch::of(&h)?;
        Some((earlier, h.base_offset, h.last_offset()))
    });
    match producers.check_after(&batch, pending) {
        Ok(Verdict::Append) => Ok(RequestVerdict::Append),
        Ok(Verdict::Duplicate(original)) => Ok(RequestVerdict::Duplicate {
            base_offset: original.base_offset,
            last_offset: original.last_offset,
        }),
        Err(rejection) => Err(refused(Refused { index: 0, batch, rejection })),
    }
}

/// The producer state of a log kept apart from a `Partition`, without IO: a model of a replica's
/// partition (the simulator's disk) records the batches it holds, as the partition does on
/// append and rebuilds after a cut, and runs the leader's check over it.
#[derive(Clone, Debug, Default)]
pub struct ProducerLog {
    producers: ProducerStates,
}

impl ProducerLog {
    /// Records a batch of the log; one without a producer id changes nothing.
    pub fn record(&mut self, header: &BatchHeader) {
        if let Some(batch) = ProducerBatch::of(header) {
            self.producers.replay(&batch, header.base_offset, header.last_offset());
        }
    }

    /// A log restarted from a leader's snapshot: `producers` (the snapshot's) are its state
    /// before any batch, as `Partition::restart_at` installs them.
    pub fn starting_with(producers: ProducerStates) -> ProducerLog {
        ProducerLog { producers }
    }

    /// `Partition::producers_as_of` over this state: what a snapshot restarting a follower's log
    /// at `offset` carries.
    pub fn as_of(&self, offset: i64) -> ProducerStates {
        self.producers.as_of(offset)
    }

    /// `Partition::check_proposal` over this state.
    pub fn check_proposal(
        &self,
        header: &BatchHeader,
        pending: impl IntoIterator<Item = BatchHeader>,
    ) -> Result<RequestVerdict, StorageError> {
        check_proposal(&self.producers, header, pending)
    }
}

impl Partition {
    /// Validates every batch, then (all valid, disk has room) assigns offsets, stamps them, stages
    /// the bytes for the flusher and caches them. All or nothing. Idempotent batches are checked
    /// against the producer state; a request that only retries appended batches is answered with
    /// the originals' offsets and writes nothing.
    pub fn append(&self, batches: BytesMut) -> Result<AppendResult, StorageError> {
        let appended = self.stage_client_batches(batches);
        // Also after a refusal: a roll before it queued a seal.
        self.wake_flusher();
        appended
    }

    fn stage_client_batches(&self, mut batches: BytesMut) -> Result<AppendResult, StorageError> {
        let mut st = self.appendable(&batches)?;
        let limits = self.batch_limits();
        let base_offset = self.log_end_offset.get();
        let mut position = 0usize;
        let mut index = 0usize;
        let mut records = 0i64;
        let mut idempotent = AppendingBatches::None;
        while position < batches.len() {
            let header = record::validate_for_append(&batches[position..], &limits)
                .map_err(|source| StorageError::InvalidBatch { index, position, source })?;
            let batch_base = base_offset + records;
            // Stamped as it is checked (outside the crc): a refused request's buffer is dropped.
            // The epoch too, as a Kafka leader stamps its own: a single node's log has had one
            // leader, epoch 0, which is what it answers Kafka clients' epoch questions with.
            record::set_base_offset(&mut batches[position..], batch_base);
            record::set_partition_leader_epoch(&mut batches[position..], SINGLE_LEADER_EPOCH);
            if let Some(batch) = ProducerBatch::of(&header) {
                let last_offset = batch_base + i64::from(header.last_offset_delta);
                idempotent.push(Appending { index, batch, base_offset: batch_base, last_offset });
            }
            records += i64::from(header.last_offset_delta) + 1;
            position += header.total_len();
            index += 1;
        }
        let end_offset = base_offset + records;
        let (seg, start_pos) = self.make_room(&mut st, batches.len() as u64, end_offset)?;
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
        self.place(st, &seg, batches.freeze(), end_offset, start_pos)
    }

    /// A replica's append of batches its leader stamped: each must carry the offset the log
    /// continues at, and keeps it and its leader epoch. No producer-state verdicts (the leader
    /// gave them); the state records the batches so a later leader here knows the producers.
    /// Validated and staged like `append`, all or nothing.
    pub fn append_replicated(&self, batches: Bytes) -> Result<AppendResult, StorageError> {
        let appended = self.stage_replicated_batches(batches);
        self.wake_flusher();
        appended
    }

    fn stage_replicated_batches(&self, batches: Bytes) -> Result<AppendResult, StorageError> {
        let mut st = self.appendable(&batches)?;
        let limits = self.batch_limits();
        let base_offset = self.log_end_offset.get();
        let mut position = 0usize;
        let mut index = 0usize;
        let mut expected = base_offset;
        while position < batches.len() {
            let header = record::validate_for_append(&batches[position..], &limits)
                .map_err(|source| StorageError::InvalidBatch { index, position, source })?;
            if header.base_offset != expected {
                return Err(StorageError::OffsetMismatch { index, expected, found: header.base_offset });
            }
            expected = header.last_offset() + 1;
            position += header.total_len();
            index += 1;
        }
        let end_offset = expected;
        let (seg, start_pos) = self.make_room(&mut st, batches.len() as u64, end_offset)?;
        let mut position = 0usize;
        while position < batches.len() {
            let Ok(header) = BatchHeader::parse(&batches[position..]) else { break };
            if let Some(batch) = ProducerBatch::of(&header) {
                st.producers.replay(&batch, header.base_offset, header.last_offset());
            }
            position += header.total_len();
        }
        self.place(st, &seg, batches, end_offset, start_pos)
    }

    /// The check a replicated partition's leader makes of a batch before proposing it: against
    /// the producer state of this log, continued by `pending` (the headers of batches proposed
    /// after this log's end, in log order). A retry of a batch in either is answered with its
    /// original offsets; nothing is recorded (the state records a batch when the log takes it).
    pub(crate) fn check_proposal(
        &self,
        header: &BatchHeader,
        pending: impl IntoIterator<Item = BatchHeader>,
    ) -> Result<RequestVerdict, StorageError> {
        check_proposal(&self.state.borrow().producers, header, pending)
    }

    /// The producer state as of `offset` (`ProducerStates::as_of`): what a leader's snapshot
    /// restarting a follower's log at `offset` carries.
    pub fn producers_as_of(&self, offset: i64) -> ProducerStates {
        self.state.borrow().producers.as_of(offset)
    }

    /// The partition's state, if it takes appends now, and `batches` is not empty.
    fn appendable(&self, batches: &[u8]) -> Result<std::cell::RefMut<'_, State>, StorageError> {
        if self.closed.get() {
            return Err(StorageError::Closed);
        }
        self.touch();
        let st = self.state.borrow_mut();
        if st.truncating {
            return Err(StorageError::Truncating);
        }
        if let Some(detail) = &st.sync_failure {
            return Err(StorageError::WriteFailed {
                segment: active(&st).log_path.clone(),
                first_lost_offset: self.durable_end.get(),
                detail: detail.clone(),
            });
        }
        if self.shard.disk_space.check().is_err() {
            return Err(self.shard.storage_full());
        }
        if batches.is_empty() {
            let source = BatchError::Truncated { available: 0, needed: BATCH_HEADER_LEN };
            return Err(StorageError::InvalidBatch { index: 0, position: 0, source });
        }
        Ok(st)
    }

    fn batch_limits(&self) -> BatchLimits {
        BatchLimits {
            batch_bytes_max: self.config.batch_bytes_max,
            records_per_batch_max: self.config.records_per_batch_max,
        }
    }

    /// Rolls when `total_bytes` more would not fit the active segment (or its u32 index fields up
    /// to `end_offset`), and reserves the space; returns the segment and the position they start
    /// at.
    fn make_room(
        &self,
        st: &mut State,
        total_bytes: u64,
        end_offset: i64,
    ) -> Result<(Rc<Segment>, u64), StorageError> {
        {
            let seg = active(st);
            let meta = seg.meta.borrow();
            // Index entries hold positions and relative offsets as u32.
            let too_big = meta.size_bytes + total_bytes > self.config.segment_bytes
                || meta.size_bytes + total_bytes > u64::from(u32::MAX)
                || end_offset - seg.base_offset > i64::from(u32::MAX);
            let must_roll = meta.size_bytes > 0 && too_big;
            drop(meta);
            if must_roll {
                self.roll(st, total_bytes)?;
            }
        }
        let seg = active(st).clone();
        let start_pos = seg.meta.borrow().size_bytes;
        self.ensure_preallocated(st, &seg, start_pos + total_bytes)?;
        self.prepare_ahead(st, &seg, start_pos + total_bytes);
        Ok((seg, start_pos))
    }

    /// Indexes the validated `batches` (stamped with the offsets from the log end on), stages
    /// them for the flusher and caches them. Cannot fail: everything that can was checked.
    fn place(
        &self,
        mut st: std::cell::RefMut<'_, State>,
        seg: &Rc<Segment>,
        batches: Bytes,
        end_offset: i64,
        start_pos: u64,
    ) -> Result<AppendResult, StorageError> {
        let base_offset = self.log_end_offset.get();
        {
            let mut meta = seg.meta.borrow_mut();
            assert_eq!(meta.next_offset, base_offset, "active segment end and log end offset disagree");
            let mut position = 0usize;
            let mut offset = base_offset;
            while position < batches.len() {
                let header = BatchHeader::parse(&batches[position..])
                    .map_err(|source| StorageError::InvalidBatch { index: 0, position, source })?;
                debug_assert_eq!(header.base_offset, offset);
                let relative = (offset - seg.base_offset) as u32;
                let batch_pos = (start_pos + position as u64) as u32;
                meta.index.on_batch(relative, batch_pos, header.total_len() as u32, header.max_timestamp);
                offset += i64::from(header.last_offset_delta) + 1;
                position += header.total_len();
            }
            debug_assert_eq!(offset, end_offset);
            meta.size_bytes += batches.len() as u64;
            meta.next_offset = end_offset;
            meta.first_append_ms.get_or_insert_with(now_ms);
        }
        self.stage(&mut st, seg, &batches, base_offset, end_offset, start_pos);
        drop(st);

        // A cached slice keeps its whole allocation alive. A small payload shares a connection's
        // receive buffer (64 KiB and up) with other requests, kept for as long as any of their
        // batches stays cached: it is copied into an allocation of its own size. A large one is
        // most of its buffer (a frame larger than the receive buffer is read into one reserved
        // for it), and copying it would cost more than it frees; it is counted as pinning its own
        // length, an underestimate when the buffer grew by doubling.
        let (cached, pin) = if batches.len() < CACHE_COPY_BELOW_BYTES {
            (Bytes::copy_from_slice(&batches), Pin::new(batches.len()))
        } else {
            let pinned = batches.len();
            (batches, Pin::new(pinned))
        };
        let mut cache = self.shard.tail_cache.borrow_mut();
        let mut position = 0usize;
        while position < cached.len() {
            let Ok(header) = BatchHeader::parse(&cached[position..]) else { break };
            let len = header.total_len();
            cache.insert(
                self.cache_id,
                header.base_offset,
                header.last_offset(),
                cached.slice(position..position + len),
                &pin,
            );
            position += len;
        }
        drop(cache);

        self.log_end_offset.set(end_offset);
        Ok(AppendResult {
            base_offset,
            last_offset: end_offset - 1,
            log_start_offset: self.log_start_offset.get(),
            duplicate: false,
        })
    }

    /// Starts a new active segment at the log end; the old one is sealed by the flusher. The new
    /// file is created (or renamed from the spare) but not kept open: the flusher opens it
    /// through the shard's slots on its first write, so a housekeeping pass that rolls thousands
    /// of idle partitions at once (time retention) holds no descriptor for them. A roll for an
    /// append of `append_bytes` reserves their space in the new file before anything changes, so
    /// a full disk refuses the append (`StorageFull`) rather than fail its write later.
    pub(super) fn roll(&self, st: &mut State, append_bytes: u64) -> Result<(), StorageError> {
        self.touch();
        let old = active(st).clone();
        let base_offset = old.meta.borrow().next_offset;
        let seg = Rc::new(Segment::new(&self.dir, base_offset, self.config.index_interval_bytes));
        let reserve = match append_bytes {
            0 => 0,
            n => align_up(n.max(preallocate_step(0))).min(align_up(self.config.segment_bytes.max(n))),
        };
        let create = || {
            create_segment_file(&seg.log_path, reserve).map_err(|e| {
                if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
                    self.shard.refresh_disk_space();
                    return self.shard.storage_full();
                }
                StorageError::io(format!("creating {}", seg.log_path.display()), e)
            })?;
            seg.meta.borrow_mut().preallocated_bytes = reserve;
            Ok::<(), StorageError>(())
        };
        match self.spare.spare.replace(Spare::Absent) {
            Spare::Ready { preallocated_bytes } => {
                // A rename on the shard instead of a create and a fallocate.
                match std::fs::rename(self.dir.join(SPARE_SEGMENT_NAME), &seg.log_path) {
                    Ok(()) => seg.meta.borrow_mut().preallocated_bytes = preallocated_bytes,
                    Err(e) => {
                        tracing::warn!(dir = %self.dir.display(), error = %e, "could not use the spare segment");
                        create()?;
                    }
                }
            }
            Spare::Preparing => {
                // Still being prepared: it serves the roll after this one.
                self.spare.spare.replace(Spare::Preparing);
                create()?;
            }
            Spare::Absent | Spare::Failed => create()?,
        }
        old.meta.borrow_mut().sealed = true;
        // No batch at or past `base_offset` is recorded yet: the state is exactly the one at it.
        let snapshot =
            ProducerSnapshot { offset: base_offset, bytes: st.producers.encode_snapshot(base_offset) };
        st.pending.push_back(Job::Seal(old, snapshot));
        st.segments.push(seg);
        st.checkpointed_bytes = 0;
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
        let step = preallocate_step(meta.preallocated_bytes);
        let target = align_up(need_end.max(meta.preallocated_bytes + step)).min(cap);
        let Some(fd) = active_fd(st) else {
            // The file is closed (released while idle): the reservation runs on the blocking pool
            // (`prepare_ahead`) rather than the append opening the file here.
            return Ok(());
        };
        if let Err(e) = fallocate(fd, target) {
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
            let step = preallocate_step(meta.preallocated_bytes);
            let wanted = !meta.preallocating
                && !st.releasing
                && meta.preallocated_bytes < cap
                && end_bytes + step / 2 >= meta.preallocated_bytes;
            wanted.then(|| (meta.preallocated_bytes + step).min(cap))
        };
        if let Some(target) = step_target {
            // Opened by path on the pool thread, not a duplicate of the active descriptor: a
            // duplicate waiting in the pool's queue is a descriptor outside the shard's slots, and
            // thousands of first appends queue thousands of them.
            seg.meta.borrow_mut().preallocating = true;
            let seg = seg.clone();
            glommio::spawn_local(async move {
                let path = seg.log_path.clone();
                let reserved = blocking::run(move || {
                    let file = std::fs::OpenOptions::new().write(true).open(&path)?;
                    fallocate(file.as_raw_fd(), target)
                })
                .await;
                let mut meta = seg.meta.borrow_mut();
                meta.preallocating = false;
                match reserved {
                    Ok(Ok(())) => meta.preallocated_bytes = meta.preallocated_bytes.max(target),
                    // `append` retries synchronously when it needs the space and reports the
                    // error then.
                    Ok(Err(e)) => tracing::debug!(segment = %seg.log_path.display(), error = %e,
                        "background preallocation failed"),
                    Err(panic) => tracing::warn!(segment = %seg.log_path.display(), "{panic}"),
                }
                drop(meta);
                seg.preallocation_idle.notify_all();
            })
            .detach();
        }
        // Only near the end of the segment (its last step, or its second half when it is small): a
        // spare holds a step of disk, which 10,000 partitions must not all pay.
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
            let prepared = blocking::run(move || create_segment_file(&path, preallocated_bytes)).await;
            let next = match prepared {
                Ok(Ok(())) => Spare::Ready { preallocated_bytes },
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
    pub(super) async fn discard_spare(&self) {
        loop {
            let prepared = self.spare.prepared.notified();
            if !matches!(*self.spare.spare.borrow(), Spare::Preparing) {
                break;
            }
            prepared.await;
        }
        if let Spare::Ready { .. } = self.spare.spare.replace(Spare::Failed) {
            let path = self.dir.join(SPARE_SEGMENT_NAME);
            let removed = blocking::run(move || blocking::remove_files(&[path])).await;
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
}
