//! Descriptors of idle partitions: a partition's active segment file is open only while it is
//! used. Opening it takes one of the shard's slots (`ensure_file_slot`; as many as the
//! descriptor budget gives the shard); when none is free, the shard asks the least recently used
//! idle partitions (a clock over the partitions `touch` entered) to `release_active_file`, which
//! syncs the file, gives back the space reserved past its end, closes it and then frees the slot;
//! while every holder is busy, the opener waits. So descriptors stay bounded even when one request
//! touches thousands of partitions. The next append, read or write opens the file again through
//! the ring (glommio's open is an io_uring OPENAT) and reserves space on the blocking thread pool
//! (`reserve_off_shard`), so reopening never blocks the shard on the filesystem.
//!
//! Never releases a file with staged, unwritten or (under `Durability::Fsync`) unsynced bytes,
//! nor while the flusher, a checkpoint, a truncation or a background fallocate is at work: the
//! flusher waits for a release in progress (`wait_released`) before it writes, so the release's
//! truncation can never cut a new write.

use std::os::fd::AsRawFd;
use std::rc::Rc;

use glommio::io::DmaFile;

use super::append::{fallocate, preallocate_step};
use super::{active, Partition};
use crate::storage::blocking;
use crate::storage::segment::{align_up, Segment};

impl Partition {
    /// The partition is being used: its active file may be opened (or is open) and counts
    /// against the shard's bound until released.
    pub(super) fn touch(&self) {
        self.recently_used.set(true);
        if !self.in_open_set.replace(true) {
            self.shard.note_active_open(self.self_ref.clone());
        }
    }

    /// Whether the partition was used since the last time the shard asked; clears the mark (the
    /// second chance of the shard's clock sweep).
    pub(crate) fn take_recent_use(&self) -> bool {
        self.recently_used.replace(false)
    }

    /// Closes the active segment's file if the partition is idle; false if it is busy (it stays
    /// in the shard's set). The sync, the truncation to the logical size and the close run as a
    /// task of their own; until it ends the flusher does not write.
    pub(crate) fn release_active_file(&self) -> bool {
        if self.closed.get() {
            self.in_open_set.set(false);
            return true;
        }
        // Borrowed elsewhere: the partition is in the middle of something.
        let Ok(mut st) = self.state.try_borrow_mut() else { return false };
        if !st.pending.is_empty()
            || st.flushing
            || st.checkpointing
            || st.truncating
            || st.releasing
            || self.active_readers.get() > 0
        {
            return false;
        }
        let seg = active(&st).clone();
        {
            let meta = seg.meta.borrow();
            if meta.preallocating
                || meta.written_bytes != meta.size_bytes
                || meta.durable_bytes != meta.size_bytes
            {
                return false;
            }
        }
        self.in_open_set.set(false);
        let (Some(file), Some(partition)) = (seg.take_file(), self.self_ref.upgrade()) else {
            if self.holds_file_slot.replace(false) {
                self.shard.give_back_file_slot();
            }
            return true;
        };
        st.releasing = true;
        let unsynced = st.unsynced;
        drop(st);
        if self.holds_file_slot.get() {
            self.shard.file_slot_releasing(true);
        }
        glommio::spawn_local(async move { partition.finish_release(seg, file, unsynced).await }).detach();
        true
    }

    async fn finish_release(&self, seg: Rc<Segment>, file: Rc<DmaFile>, unsynced: bool) {
        let (size, reserved) = {
            let meta = seg.meta.borrow();
            (meta.size_bytes, meta.preallocated_bytes)
        };
        let outcome: Result<(), String> = async {
            if unsynced {
                file.fdatasync().await.map_err(|e| format!("fdatasync: {e}"))?;
            }
            if reserved > size {
                file.truncate(size).await.map_err(|e| format!("truncating to {size}: {e}"))?;
            }
            Ok(())
        }
        .await;
        match outcome {
            Ok(()) => {
                seg.meta.borrow_mut().preallocated_bytes = size;
                self.state.borrow_mut().unsynced = false;
            }
            // The bytes are written; a failed sync here is found by the next sync or close.
            Err(e) => tracing::warn!(segment = %seg.log_path.display(), error = %e,
                "releasing the file of an idle partition"),
        }
        if let Ok(file) = Rc::try_unwrap(file) {
            if let Err(e) = file.close().await {
                tracing::warn!(segment = %seg.log_path.display(), error = %e, "closing an idle segment file");
            }
        }
        if self.holds_file_slot.replace(false) {
            self.shard.file_slot_releasing(false);
            self.shard.give_back_file_slot();
        }
        self.state.borrow_mut().releasing = false;
        self.progress.notify_all();
    }

    /// Before the active file is opened (or used): waits for a release in progress to end, then
    /// for one of the shard's slots for open active files if this partition holds none.
    pub(super) async fn ensure_file_slot(&self) {
        self.wait_released().await;
        if !self.holds_file_slot.get() {
            self.shard.take_file_slot().await;
            if self.holds_file_slot.replace(true) {
                // Another task of this partition took one while this one waited: one is enough.
                self.shard.give_back_file_slot();
            }
            // A sweep may have dropped it from the set while it waited (it held no file then).
            self.touch();
        }
    }

    /// Resolves once no release of the active file is in progress.
    pub(super) async fn wait_released(&self) {
        loop {
            let notified = self.progress.notified();
            if !self.state.borrow().releasing {
                return;
            }
            notified.await;
        }
    }

    /// Reserves space up to `end` in `seg` on the blocking thread pool, opening the file there by
    /// path (a released partition has no descriptor to lend). Used by the flusher for bytes an
    /// append accepted while the file was closed. A failure is logged: the write that follows
    /// then extends the file itself, and reports ENOSPC if there is no room.
    pub(super) async fn reserve_off_shard(&self, seg: &Rc<Segment>, end: u64) {
        loop {
            seg.wait_preallocation_idle().await;
            self.wait_released().await;
            let meta = seg.meta.borrow();
            if meta.preallocated_bytes >= end {
                return;
            }
            if !meta.preallocating && !self.state.borrow().releasing {
                break;
            }
        }
        let target = {
            let mut meta = seg.meta.borrow_mut();
            let cap = align_up(self.config.segment_bytes.max(end));
            let step = preallocate_step(meta.preallocated_bytes);
            meta.preallocating = true;
            align_up(end.max(meta.preallocated_bytes + step)).min(cap)
        };
        let path = seg.log_path.clone();
        let reserved = blocking::run(move || {
            let file = std::fs::OpenOptions::new().write(true).open(&path)?;
            fallocate(file.as_raw_fd(), target)
        })
        .await;
        {
            let mut meta = seg.meta.borrow_mut();
            meta.preallocating = false;
            match reserved {
                Ok(Ok(())) => meta.preallocated_bytes = meta.preallocated_bytes.max(target),
                Ok(Err(e)) => {
                    if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
                        self.shard.refresh_disk_space();
                    }
                    tracing::debug!(segment = %seg.log_path.display(), error = %e, "reserving space failed");
                }
                Err(panic) => tracing::warn!(segment = %seg.log_path.display(), "{panic}"),
            }
        }
        seg.preallocation_idle.notify_all();
    }
}
