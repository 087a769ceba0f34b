//! What a shard asks of the process's allocator: give back the memory it has freed once the
//! shard goes idle.
//!
//! Why: mimalloc (the `ringlog` binary's allocator, `src/alloc.rs`) returns free pages to the
//! kernel only from inside its own calls, after a delay, and only for the heap of the thread
//! making the call. A shard that stops allocating (its topics deleted, its clients gone) keeps
//! what it freed resident: 69 MiB two minutes after a 30-minute soak's topics were all deleted,
//! against 25 MiB idle before it (docs/benchmarks.md). Housekeeping calls [`release_free_memory`]
//! on each shard once that shard has gone a whole housekeeping interval without traffic.
//!
//! The binary chooses the allocator, so the binary says how to release: it registers a function
//! with [`set_release_free_memory`] before the broker starts. Without one (tests, a program that
//! embeds the broker with another allocator) the call does nothing.
//!
//! A leaf: depends on nothing in the crate.

use std::sync::OnceLock;

static RELEASE_FREE_MEMORY: OnceLock<fn()> = OnceLock::new();

/// Registers `release`: gives the kernel back what the calling thread's heap holds free. Called
/// once per process, before the broker starts; a second call is ignored.
pub fn set_release_free_memory(release: fn()) {
    // The first registration wins: the allocator cannot change while the process runs.
    let _ = RELEASE_FREE_MEMORY.set(release);
}

/// Gives back what the calling thread's heap holds free, if the binary registered how.
pub(crate) fn release_free_memory() {
    if let Some(release) = RELEASE_FREE_MEMORY.get() {
        release();
    }
}
