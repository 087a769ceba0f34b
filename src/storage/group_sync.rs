//! Group commit across a shard's partitions: one `syncfs` of the data directory's filesystem per
//! round makes durable every O_DIRECT write that completed before the round started, in place of
//! one `fdatasync` per partition.
//!
//! Why: an O_DIRECT write on ext4 leaves two things to make durable, the data in the device's
//! volatile cache and the metadata the write changed (file size, extents converted from
//! preallocated); `syncfs` commits the journal once and flushes the device once for all of them.
//! One `fdatasync` per partition does the same work per file: with a thousand partitions written
//! in a round, a thousand fsyncs queue in io_uring's worker pool (a handful run at a time, each
//! with its own device flush once the journal commit they share is done), and a write to a quiet
//! partition waits behind all of them.
//!
//! What it costs: `syncfs` also writes back whatever else is dirty on that filesystem, so the
//! data directory should have a filesystem of its own (`FsyncScope::File` is the fallback when it
//! cannot). Owns the shard's rounds and one descriptor on the data directory, held across rounds
//! so `syncfs` reports writeback errors since the previous round (Linux ≥ 5.8). May depend on
//! `blocking` and `notify`.

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::sync::Arc;

use crate::storage::blocking;
use crate::storage::notify::Notify;

/// How the flusher makes its writes durable under `Durability::Fsync`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FsyncScope {
    /// One `syncfs` per shard round (`GroupSync`).
    #[default]
    Filesystem,
    /// One `fdatasync` per written segment file per partition round.
    File,
}

/// Rounds numbered from 1; at most one sync (a round or a solo sync) runs at a time on a shard.
#[derive(Default)]
pub(crate) struct GroupSync {
    dir: PathBuf,
    handle: RefCell<Option<Arc<std::fs::File>>>,
    started: Cell<u64>,
    finished: Cell<u64>,
    running: Cell<bool>,
    /// Callers of `sync` not yet answered.
    waiting: Cell<usize>,
    /// The latest failed round and why. A waiter fails when a round at or after its own failed:
    /// a writeback error cannot be traced to a file, so everyone who relied on it is told.
    failure: RefCell<Option<(u64, String)>>,
    done: Notify,
}

/// Ends a sync in progress however its future ends (completed or dropped), so waiters move on.
struct Running<'a>(&'a GroupSync);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.set(false);
        self.0.done.notify_all();
    }
}

/// Counts a caller of `sync` until it is answered or gives up.
struct Waiting<'a>(&'a GroupSync);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.set(self.0.waiting.get() - 1);
    }
}

impl GroupSync {
    pub(crate) fn new(dir: PathBuf) -> GroupSync {
        GroupSync { dir, ..GroupSync::default() }
    }

    /// Resolves once the writes that completed before this call are durable. A caller that finds
    /// nothing running and nobody else waiting syncs alone with `solo` (its own files'
    /// fdatasync through io_uring: one partition at a time needs no filesystem-wide sync, and the
    /// hop to the blocking pool costs it); otherwise it waits for a round that started after this
    /// call (one syncfs for everyone who waits), running it itself when none is running.
    pub(crate) async fn sync<F, S>(&self, solo: S) -> Result<(), String>
    where
        S: FnOnce() -> F,
        F: std::future::Future<Output = Result<(), String>>,
    {
        let round = self.started.get() + 1;
        self.waiting.set(self.waiting.get() + 1);
        let _waiting = Waiting(self);
        let mut solo = Some(solo);
        loop {
            if self.finished.get() >= round {
                return match &*self.failure.borrow() {
                    Some((failed, detail)) if *failed >= round => Err(detail.clone()),
                    _ => Ok(()),
                };
            }
            if !self.running.get() {
                if self.waiting.get() == 1 {
                    if let Some(solo) = solo.take() {
                        self.running.set(true);
                        let _running = Running(self);
                        return solo().await;
                    }
                }
                self.run_round().await;
                continue;
            }
            let done = self.done.notified();
            done.await;
        }
    }

    #[cfg(test)]
    pub(crate) fn rounds_finished(&self) -> u64 {
        self.finished.get()
    }

    async fn run_round(&self) {
        self.running.set(true);
        let _running = Running(self);
        let round = self.started.get() + 1;
        self.started.set(round);
        let handle = self.handle.borrow().clone();
        let dir = self.dir.clone();
        let outcome = crate::metrics::timed_fsync(blocking::run(move || syncfs(&dir, handle))).await;
        let result = match outcome {
            Ok((handle, result)) => {
                if let Some(handle) = handle {
                    *self.handle.borrow_mut() = Some(handle);
                }
                result
            }
            Err(panic) => Err(panic),
        };
        if let Err(e) = result {
            tracing::error!(dir = %self.dir.display(), round, error = %e, "syncfs failed");
            *self.failure.borrow_mut() = Some((round, e));
        }
        debug_assert_eq!(self.finished.get() + 1, round, "rounds complete in order");
        self.finished.set(round);
    }
}

/// Runs on the blocking pool: opens the data directory the first time, then `syncfs` on it.
/// Returns the handle to keep (the one opened, if any) and the outcome.
fn syncfs(
    dir: &std::path::Path,
    handle: Option<Arc<std::fs::File>>,
) -> (Option<Arc<std::fs::File>>, Result<(), String>) {
    use std::os::fd::AsRawFd;
    let (opened, handle) = match handle {
        Some(handle) => (None, handle),
        None => match std::fs::File::open(dir) {
            Ok(file) => {
                let file = Arc::new(file);
                (Some(file.clone()), file)
            }
            Err(e) => return (None, Err(format!("opening {} to sync its filesystem: {e}", dir.display()))),
        },
    };
    // SAFETY: syncfs on a descriptor held open for the call; no memory is passed.
    let result = match unsafe { libc::syncfs(handle.as_raw_fd()) } {
        0 => Ok(()),
        _ => Err(format!(
            "syncfs of the filesystem holding {} failed: {}",
            dir.display(),
            std::io::Error::last_os_error()
        )),
    };
    (opened, result)
}
