//! The flusher, the one task that writes a partition's files: it pops staged chunks and seals,
//! writes them with O_DIRECT (one chunk in flight), syncs once per round (the shard's syncfs round
//! or its own fdatasync, `FsyncScope`), advances the high watermark, and rolls the log back when a
//! write fails. Also `wait_durable`, which waits on it. Nothing else may write segment data; a
//! failed sync is never retried.

use std::path::PathBuf;
use std::rc::{Rc, Weak};

use glommio::io::DmaBuffer;

use super::append::Chunk;
use super::{active, remove_segment_files, sync_dir, Job, Partition, ProducerSnapshot};
use crate::storage::blocking;
use crate::storage::notify::Notify;
use crate::storage::producer_state;
use crate::storage::segment::{align_down, align_up, Segment};
use crate::storage::{Durability, FsyncScope, StorageError};

/// Rollback records kept for durability waiters that have not looked yet.
const ROLLBACKS_KEPT: usize = 64;

pub(super) struct Rollback {
    generation: u64,
    first_lost_offset: i64,
    segment: PathBuf,
    detail: String,
}

impl Partition {
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
                            first_lost_offset: self.durable_end.get(),
                            detail: "too many write failures to tell whether this offset survived".into(),
                        });
                    }
                }
                if self.durable_end.get() > last_offset {
                    return Ok(());
                }
                if let Some(detail) = &st.sync_failure {
                    return Err(StorageError::WriteFailed {
                        segment: active(&st).log_path.clone(),
                        first_lost_offset: self.durable_end.get(),
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
        let sync_needed =
            self.config.durability == Durability::Fsync && self.state.borrow().sync_failure.is_none();
        if let Some(end_offset) = written_end.filter(|_| sync_needed) {
            if self.sync_written(&unsynced).await {
                // The flusher is the only writer: every write so far is covered.
                self.state.borrow_mut().unsynced = false;
                for seg in &unsynced {
                    let mut meta = seg.meta.borrow_mut();
                    meta.durable_bytes = meta.written_bytes;
                }
                // Chunks written after a rollback in this round carry offsets <= the log end.
                self.advance_durable_end(end_offset.min(self.log_end_offset.get()));
            }
        }
        self.state.borrow_mut().flushing = false;
        self.progress.notify_all();
    }

    /// Makes the round's writes to `unsynced` durable: through the shard's group commit, or one
    /// fdatasync per segment (`FsyncScope`). On failure stops the partition's appends and returns
    /// false.
    async fn sync_written(&self, unsynced: &[Rc<Segment>]) -> bool {
        if unsynced.is_empty() {
            return true;
        }
        let synced = match self.shard.fsync_scope() {
            FsyncScope::Filesystem => self.shard.group_sync.sync(|| self.fdatasync_each(unsynced)).await,
            FsyncScope::File => self.fdatasync_each(unsynced).await,
        };
        match synced {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(dir = %self.dir.display(), error = %e, "sync failed; appends stop until the partition is reopened");
                self.fail_sync(&e);
                false
            }
        }
    }

    async fn fdatasync_each(&self, unsynced: &[Rc<Segment>]) -> Result<(), String> {
        for seg in unsynced {
            let synced = match seg.file().await {
                Ok(f) => crate::metrics::timed_fsync(f.fdatasync()).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            synced.map_err(|e| format!("fdatasync of {} failed: {e}", seg.log_path.display()))?;
        }
        Ok(())
    }

    /// Under `Durability::Written`: what the flusher wrote to `seg` counts as durable.
    fn advance_durable(&self, seg: &Segment, end_offset: i64) {
        {
            let mut meta = seg.meta.borrow_mut();
            meta.durable_bytes = meta.written_bytes;
        }
        self.advance_durable_end(end_offset);
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
        // A release in progress cuts the file to its old size: write after it. A write past the
        // reserved space (a file reopened after idling) extends the file itself rather than wait
        // for the reservation the append started on the blocking pool (`prepare_ahead`).
        self.wait_released().await;
        self.ensure_file_slot().await;
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
                let mut st = self.state.borrow_mut();
                st.degraded = false;
                st.unsynced = true;
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
            assert!(self.durable_end.get() <= first_lost_offset, "rolling back durable offsets");
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
        let (size, next_offset, reserved) = {
            let meta = seg.meta.borrow();
            assert_eq!(meta.written_bytes, meta.size_bytes, "sealing a segment with unwritten bytes");
            (meta.size_bytes, meta.next_offset, meta.preallocated_bytes)
        };
        if let Some(file) = seg.open_file() {
            file.fdatasync()
                .await
                .map_err(|e| StorageError::io(format!("syncing {}", seg.log_path.display()), e))?;
            file.truncate(size).await.map_err(|e| {
                StorageError::io(format!("truncating {} to {size}", seg.log_path.display()), e)
            })?;
        } else {
            // Closed: released while idle (synced and cut then, unless that failed) or never
            // reopened since. Whatever is left is done by path on the blocking pool, so a
            // housekeeping pass sealing thousands of idle partitions opens nothing on the shard.
            let unsynced = self.state.borrow().unsynced;
            if unsynced || reserved != size {
                let path = seg.log_path.clone();
                blocking::run(move || {
                    let file = std::fs::OpenOptions::new().write(true).open(&path)?;
                    file.set_len(size)?;
                    file.sync_data()
                })
                .await
                .map_err(std::io::Error::other)
                .and_then(|done| done)
                .map_err(|e| {
                    StorageError::io(format!("syncing {} at its seal", seg.log_path.display()), e)
                })?;
            }
        }
        self.wait_checkpoint_written().await;
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
        // Sealed segments hold no descriptor; reads reopen them (`ShardStorage::note_sealed_read`).
        seg.close_file().await;
        self.advance_durable_end(next_offset);
        Ok(())
    }
}

impl Partition {
    /// Wakes the flusher for queued jobs, starting one if none runs. Never called with `state`
    /// borrowed: glommio may run a task it spawns at once.
    pub(super) fn wake_flusher(&self) {
        if self.flusher_running.get() {
            self.flush_wanted.notify_all();
        } else if !self.state.borrow().pending.is_empty() {
            self.flusher_running.set(true);
            glommio::spawn_local(run_flusher(self.self_ref.clone(), self.flush_wanted.clone())).detach();
        }
    }
}

/// The flusher: the only task that writes a partition's files, one job at a time. It lives while
/// the partition is in use: with no job left it ends once the active file has been released
/// (`idle`) or the partition closes, and the next job starts another (`wake_flusher`). A busy
/// partition keeps its task; an idle one holds none.
async fn run_flusher(partition: Weak<Partition>, wake: Rc<Notify>) {
    loop {
        let notified = wake.notified();
        {
            let Some(p) = partition.upgrade() else { return };
            if !p.state.borrow().pending.is_empty() {
                p.flush_round().await;
                continue;
            }
            if p.closed.get() || !p.holds_file_slot.get() {
                p.flusher_running.set(false);
                p.progress.notify_all();
                return;
            }
        }
        notified.await;
    }
}
