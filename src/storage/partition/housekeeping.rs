//! Housekeeping: the roll by age, retention's deletes of whole sealed segments (files unlinked
//! off the shard, cached batches evicted a slice at a time) and `truncate_to`, which cuts the log
//! on disk, in the caches, indexes and producer state, and `restart_at`, which discards the whole
//! log for a replica brought forward by its leader's snapshot. Only whole segments whose seal
//! finished are ever deleted by retention.

use std::path::Path;
use std::rc::Rc;

use super::append::Chunk;
use super::recovery::{read_carry, recover_producer_state, remove_snapshots_after};
use super::{
    active, create_segment_file, remove_segment_files, sync_dir, Carry, Job, Partition, State,
    RECOVERY_BATCH_BYTES_MAX,
};
use crate::record::{BatchHeader, BATCH_HEADER_LEN};
use crate::storage::blocking;
use crate::storage::producer_state::{self, ProducerStates};
use crate::storage::retention::{segments_to_delete, RetentionInput};
use crate::storage::segment::{align_down, align_up, read_aligned, scan_segment_file, Segment};
use crate::storage::{Durability, HousekeepReport, StorageError, Visibility};

/// Marks a checkpoint write in flight; clears the mark and wakes waiters when dropped.
struct CheckpointGuard<'a>(&'a Partition);

impl Drop for CheckpointGuard<'_> {
    fn drop(&mut self) {
        self.0.state.borrow_mut().checkpointing = false;
        self.0.progress.notify_all();
    }
}

/// Cached batches dropped per step when retention deletes segments (see `evict_cached_below`).
const CACHE_EVICTION_SLICE_BATCHES: usize = 512;

impl Partition {
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
                    self.roll(&mut st, 0)?;
                    report.rolled_segment = Some(seg.base_offset);
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
                self.high_watermark.get().min(self.retention_floor.get()),
            )
            .min(sealed_prefix);
            let victims: Vec<Rc<Segment>> = st.segments.drain(..deletable).collect();
            if !victims.is_empty() {
                let start = st.segments[0].base_offset;
                self.log_start_offset.set(start);
            }
            victims
        };
        // A roll above queued the old segment's seal.
        self.wake_flusher();
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
        self.checkpoint_active().await;
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

    /// Writes the active segment's index as a checkpoint covering its synced bytes, when they grew
    /// since the last one, so recovery after a crash scans only what follows (`recovery`). Only
    /// with `Durability::Fsync`: under `Written` no byte is known to be synced before the seal.
    pub(super) async fn checkpoint_active(&self) {
        if self.config.durability != Durability::Fsync {
            return;
        }
        let (seg, covered, files) = {
            let mut st = self.state.borrow_mut();
            if st.truncating || st.checkpointing || st.sync_failure.is_some() {
                return;
            }
            let seg = active(&st).clone();
            let meta = seg.meta.borrow();
            // Set together after each fdatasync: the synced end of the active segment and the
            // offset that starts there.
            let (covered, next_offset) = (meta.durable_bytes, self.durable_end.get());
            let in_segment = next_offset > seg.base_offset && next_offset <= meta.next_offset;
            if meta.sealed || !in_segment || covered <= st.checkpointed_bytes {
                return;
            }
            drop(meta);
            st.checkpointing = true;
            let files = seg.encoded_checkpoint(covered, next_offset);
            (seg, covered, files)
        };
        // Cleared even if this future is dropped (housekeeping stops at shutdown).
        let _writing = CheckpointGuard(self);
        match blocking::run(move || files.write()).await {
            Ok(Ok(())) => {
                let mut st = self.state.borrow_mut();
                if Rc::ptr_eq(active(&st), &seg) {
                    st.checkpointed_bytes = covered;
                }
            }
            Ok(Err(e)) => tracing::warn!(segment = %seg.log_path.display(), error = %e,
                "writing a recovery checkpoint failed; a crash would scan more of the segment"),
            Err(panic) => tracing::warn!(segment = %seg.log_path.display(), "{panic}"),
        }
    }

    /// Drops every batch at or above `offset` (rounded down to the start of the batch holding
    /// it), on disk and in caches and indexes. Appends are refused while it runs. The cut of the
    /// segment holding `offset` becomes durable with the next sync of that file (the one that
    /// covers the appends after it); the files it unlinked (later segments, indexes, snapshots
    /// past the cut) are synced away before it returns.
    pub async fn truncate_to(&self, offset: i64) -> Result<(), StorageError> {
        if self.closed.get() {
            return Err(StorageError::Closed);
        }
        if offset >= self.log_end_offset.get() {
            return Ok(());
        }
        // A replica cuts only what consensus has not committed; a single node's log has no such
        // bound (its writes were never acknowledged past a failure).
        if self.config.visibility == Visibility::Committed && offset < self.high_watermark.get() {
            return Err(StorageError::TruncatingCommitted {
                offset,
                high_watermark: self.high_watermark.get(),
            });
        }
        self.touch();
        self.state.borrow_mut().truncating = true;
        self.wait_drained().await;
        let result = self.truncate_drained(offset.max(self.log_start_offset.get())).await;
        self.state.borrow_mut().truncating = false;
        self.progress.notify_all();
        result
    }

    /// Discards the whole log and starts it again, empty, at `offset` (Kafka's
    /// `truncateFullyAndStartAt`): a replica brought forward by its leader's snapshot, whose log
    /// ends before the leader's first kept entry. Every segment, index and producer-state snapshot
    /// is unlinked (oldest first), a new empty active segment is created at `offset`, `producers`
    /// (the leader's state as of `offset`, every batch below it) becomes the producer state and,
    /// when not empty, is written as the snapshot at `offset` (synced), and the directory is
    /// synced before this returns, so nothing that depends on the new start is acknowledged
    /// before it is durable, and an open afterwards recovers the same producers. Log start, log
    /// end, durable end and high watermark are all `offset` afterwards.
    ///
    /// Not atomic on disk: a crash part way leaves a suffix of the old segments, maybe with the
    /// new one, which `open` accepts; the caller records that a restart is due before calling
    /// this and calls it again after such a crash (`shard::replica`). Calling it again is
    /// harmless.
    pub async fn restart_at(&self, offset: i64, producers: ProducerStates) -> Result<(), StorageError> {
        if self.closed.get() {
            return Err(StorageError::Closed);
        }
        assert_eq!(
            self.config.visibility,
            Visibility::Committed,
            "only a replica's log is restarted from a leader's snapshot"
        );
        assert!(offset >= 0, "restarting a log at negative offset {offset}");
        self.touch();
        self.state.borrow_mut().truncating = true;
        self.wait_drained().await;
        let result = self.restart_drained(offset, producers).await;
        self.state.borrow_mut().truncating = false;
        self.progress.notify_all();
        result
    }

    /// Keeps `producers` (the leader's, as of `offset`) durably beside the log, for a restart at
    /// `offset` about to be flagged: the flag makes a crash finish the restart on open, and the
    /// producers must survive a crash anywhere until `restart_at` has written them as the new
    /// log's snapshot (docs/replication.md, stop 21). `restart_at` removes the staged file.
    pub async fn stage_restart(&self, offset: i64, producers: &ProducerStates) -> Result<(), StorageError> {
        let bytes = producers.encode_snapshot(offset);
        let dir = self.dir.clone();
        let context =
            || format!("staging the producers of a log restart at offset {offset} in {}", self.dir.display());
        match blocking::run(move || producer_state::write_staged_restart(&dir, &bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StorageError::io(context(), e)),
            Err(panic) => Err(StorageError::io(context(), std::io::Error::other(panic))),
        }
    }

    /// The producers `stage_restart` kept for a restart at `offset`: `None` when no file is
    /// staged or it was staged for another offset (a restart that was never flagged).
    pub async fn staged_restart(&self, offset: i64) -> Result<Option<ProducerStates>, StorageError> {
        let path = producer_state::staged_restart_path(&self.dir);
        let read_path = path.clone();
        let read = match blocking::run(move || std::fs::read(read_path)).await {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Ok(Err(e)) => return Err(StorageError::io(format!("reading {}", path.display()), e)),
            Err(panic) => {
                return Err(StorageError::io(
                    format!("reading {}", path.display()),
                    std::io::Error::other(panic),
                ))
            }
        };
        match ProducerStates::decode_snapshot(&read) {
            Ok((staged_at, producers)) => Ok((staged_at == offset).then_some(producers)),
            Err(e) => Err(StorageError::Corrupt { segment: path, position: 0, detail: e.to_string() }),
        }
    }

    /// Waits until no write, checkpoint or release of the active file is under way (appends are
    /// refused meanwhile: `truncating` is set).
    async fn wait_drained(&self) {
        loop {
            let notified = self.progress.notified();
            {
                let st = self.state.borrow();
                // A checkpoint in flight must land before the cut, which removes it; a release
                // would cut the file again after it.
                if st.pending.is_empty() && !st.flushing && !st.checkpointing && !st.releasing {
                    break;
                }
            }
            notified.await;
        }
    }

    async fn restart_drained(&self, offset: i64, producers: ProducerStates) -> Result<(), StorageError> {
        let old = self.state.borrow().segments.clone();
        let mut paths = Vec::with_capacity(3 * old.len());
        for seg in &old {
            seg.wait_preallocation_idle().await;
            seg.close_file().await;
            paths.extend(seg.file_paths_for_removal());
        }
        let dir = self.dir.clone();
        let fresh = Rc::new(Segment::new(&self.dir, offset, self.config.index_interval_bytes));
        let fresh_path = fresh.log_path.clone();
        // Recovery loads a snapshot at the log end (`offset`, the new log being empty) and
        // replays nothing before it; none is written for an empty state, as recovery finds none.
        let snapshot = (!producers.is_empty()).then(|| producers.encode_snapshot(offset));
        let done = blocking::run(move || {
            // Oldest first, indexes before logs, as retention deletes: a crash part way leaves a
            // contiguous suffix that recovery accepts.
            if let Some(failure) = blocking::remove_files(&paths).into_iter().next() {
                return Err(StorageError::io(failure, std::io::Error::other("restarting the log")));
            }
            remove_snapshots_after(&dir, i64::MIN)?;
            // The unlinks are durable before the new segment exists: after a crash an old
            // segment reaching past `offset` beside the new one would be an overlap, which
            // recovery refuses.
            sync_dir(&dir)?;
            create_segment_file(&fresh_path, 0)
                .map_err(|e| StorageError::io(format!("creating {}", fresh_path.display()), e))?;
            if let Some(bytes) = snapshot {
                producer_state::write_snapshot(&dir, offset, &bytes).map_err(|e| {
                    StorageError::io(format!("writing the producer-state snapshot in {}", dir.display()), e)
                })?;
            }
            // Makes the new segment and the snapshot's rename durable together.
            sync_dir(&dir)?;
            // The new log's snapshot holds the producers now; if this unlink is lost in a
            // crash, the staged copy is the same state for the same offset.
            let staged = producer_state::staged_restart_path(&dir);
            match std::fs::remove_file(&staged) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(StorageError::io(format!("removing {}", staged.display()), e))
                }
                _ => Ok(()),
            }
        })
        .await
        .map_err(|panic| {
            StorageError::io(
                format!("restarting {} at offset {offset}", self.dir.display()),
                std::io::Error::other(panic),
            )
        })
        .and_then(|done| done);
        {
            let mut st = self.state.borrow_mut();
            // Whatever happened on disk, the old segments are no longer served: on an error the
            // replica stops and reopens, and its open restarts the log again.
            st.segments = vec![fresh];
            st.carry = Carry { file_pos: 0, bytes: Vec::new() };
            st.checkpointed_bytes = 0;
            st.unsynced = false;
            st.producers = producers;
        }
        self.log_start_offset.set(offset);
        self.log_end_offset.set(offset);
        self.durable_end.set(offset);
        self.high_watermark.set(offset);
        self.retention_floor.set(offset);
        self.shard.tail_cache.borrow_mut().remove_partition(self.cache_id);
        self.shard.refresh_disk_space();
        done
    }

    fn seal_pending(&self, st: &State, seg: &Rc<Segment>) -> bool {
        st.pending.iter().any(|j| match j {
            Job::Seal(s, _) | Job::Write(Chunk { segment: s, .. }) => Rc::ptr_eq(s, seg),
        })
    }

    async fn truncate_drained(&self, offset: i64) -> Result<(), StorageError> {
        let (target, later) = {
            let st = self.state.borrow();
            let i = st.segments.partition_point(|s| s.base_offset <= offset).max(1);
            (st.segments[i - 1].clone(), st.segments[i..].to_vec())
        };
        self.ensure_file_slot().await;
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
        let mut carry = Carry { file_pos: align_down(cut_pos), bytes: Vec::new() };
        read_carry(&target, cut_pos, &mut carry).await?;
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
            st.checkpointed_bytes = 0;
        }
        self.log_end_offset.set(cut_offset);
        if self.durable_end.get() > cut_offset {
            self.durable_end.set(cut_offset);
        }
        if self.high_watermark.get() > cut_offset {
            self.high_watermark.set(cut_offset);
        }
        self.shard.tail_cache.borrow_mut().remove_from(self.cache_id, cut_offset);
        // Exact at once; the rebuild from the log then restores producers whose every remembered
        // batch was cut (they would otherwise be unknown, accepted at any sequence).
        self.state.borrow_mut().producers.truncate_from(cut_offset);
        let segments = self.state.borrow().segments.clone();
        match recover_producer_state(&self.dir, &segments, self.log_start_offset.get(), cut_offset, None)
            .await
        {
            Ok(producers) => self.state.borrow_mut().producers = producers,
            Err(e) => tracing::warn!(dir = %self.dir.display(), error = %e,
                "rebuilding the producer state after truncation failed; keeping the truncated state"),
        }
        // The unlinks are durable only once the directory is: the fdatasync that makes the
        // appends after the cut durable covers the cut file, not them (ext4 with fast commits).
        // A later segment back after a crash either follows the new batches with older epochs
        // (the replica refuses to open) or overlaps them (the partition refuses to open); found
        // by the simulator (docs/replication.md, stop 17). A producer-state snapshot past the
        // cut back after a crash would look valid once new appends pass its offset, and the cut
        // segment's removed indexes would describe bytes it no longer holds: so the directory is
        // synced after every cut, not only those that unlinked segments (truncations follow
        // leader changes; one directory sync each is cheap).
        let dir = self.dir.clone();
        blocking::run(move || sync_dir(&dir))
            .await
            .map_err(|panic| {
                StorageError::io(
                    format!("syncing {} after a truncation", self.dir.display()),
                    std::io::Error::other(panic),
                )
            })
            .and_then(|synced| synced)?;
        Ok(())
    }
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
