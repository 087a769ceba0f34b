//! Descriptors of idle partitions: a partition's active segment file is open only while it is
//! used. Opening it takes one of the shard's slots (`ensure_file_slot`; as many as the
//! descriptor budget gives the shard); when none is free, the shard asks the least recently used
//! idle partitions (a clock over the partitions `touch` entered) to `release_active_file`, which
//! syncs the file, gives back the space reserved past its end, closes it and then frees the slot;
//! while every holder is busy, the opener waits. So descriptors stay bounded even when one request
//! touches thousands of partitions. The next append, read or write opens the file again through
//! the ring (glommio's open is an io_uring OPENAT), and the append reserves space on the blocking
//! thread pool (`prepare_ahead`), so reopening never blocks the shard on the filesystem. The
//! shard keeps a few slots free ahead of need (`ShardStorage::sweep`), so an opener seldom waits
//! for a release's sync and close.
//!
//! Never releases a file with staged, unwritten or (under `Durability::Fsync`) unsynced bytes,
//! nor while the flusher, a checkpoint, a truncation or a background fallocate is at work: the
//! flusher waits for a release in progress (`wait_released`) before it writes, so the release's
//! truncation can never cut a new write.

use std::rc::Rc;

use glommio::io::DmaFile;

use super::{active, Partition};
use crate::storage::segment::Segment;

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
            drop(st);
            if self.holds_file_slot.replace(false) {
                self.shard.give_back_file_slot();
            }
            self.flush_wanted.notify_all();
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
        // An idle flusher ends with the file.
        self.flush_wanted.notify_all();
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
}
