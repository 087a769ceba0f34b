//! Filesystem work that must not run on a shard thread: unlinking segments (freeing a large
//! preallocated file costs the filesystem milliseconds), writing index files and syncing
//! directories.
//!
//! Owns the one door from storage to glommio's blocking thread pool, so a patched glommio can be
//! swapped in here. May depend on glommio only. Closures run on another thread: they take owned,
//! `Send` data (paths, bytes, duplicated fds), never shard state.

use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs `work` on the executor's blocking thread pool and resolves with its result.
///
/// glommio 0.9 leaves the awaiting task hanging if the closure panics, so the closure is run under
/// `catch_unwind` and a panic comes back as `Err` with its message.
pub(crate) async fn run<R: Send + 'static>(work: impl FnOnce() -> R + Send + 'static) -> Result<R, String> {
    glommio::executor()
        .spawn_blocking(move || {
            catch_unwind(AssertUnwindSafe(work)).map_err(|panic| {
                panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "blocking filesystem task panicked".to_string())
            })
        })
        .await
}

/// Bytes freed per step when a large file is released gradually.
const RELEASE_STEP_BYTES: u64 = 2 << 20;
/// Pause between two steps: each step's freed blocks go out with its own journal commit.
const RELEASE_STEP_PAUSE: std::time::Duration = std::time::Duration::from_millis(2);

/// Removes `paths` in order; a missing file is not an error. Files larger than a step are first
/// shrunk step by step from the end: freeing tens of MiB in one unlink makes one journal commit
/// (and, on a `discard` mount, its discards) that every fdatasync on the filesystem then waits
/// for. Returns one message per failure.
pub(crate) fn remove_files(paths: &[std::path::PathBuf]) -> Vec<String> {
    paths
        .iter()
        .filter_map(|path| {
            release_gradually(path);
            match std::fs::remove_file(path) {
                Ok(()) => None,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => Some(format!("removing {}: {e}", path.display())),
            }
        })
        .collect()
}

/// Shrinks the file at `path` to zero, `RELEASE_STEP_BYTES` at a time. Best effort: the unlink
/// that follows frees whatever is left.
fn release_gradually(path: &std::path::Path) {
    let Ok(file) = std::fs::OpenOptions::new().write(true).open(path) else { return };
    let Ok(mut size_bytes) = file.metadata().map(|m| m.len()) else { return };
    while size_bytes > RELEASE_STEP_BYTES {
        size_bytes -= RELEASE_STEP_BYTES;
        if file.set_len(size_bytes).is_err() {
            return;
        }
        std::thread::sleep(RELEASE_STEP_PAUSE);
    }
}
