//! The `ringlog` binary's global allocator: mimalloc, except that blocks of
//! [`LARGE_BLOCK_BYTES`] or more are anonymous `MAP_NORESERVE` mappings of their own.
//!
//! Why mimalloc below the threshold: under a steady produce/consume load glibc malloc kept
//! growing (~12 MB/min at 100,000 msgs/s while every accounted structure held steady) and gave
//! nothing back when every topic was deleted: glibc returns memory to the kernel only by trimming
//! the top of a heap, so free chunks below a live one stay resident, and a broker's heaps mix
//! short-lived blocks (requests, staged chunks) with long-lived ones (cached batches, indexes)
//! allocated on one shard and freed on another. mimalloc keeps per-thread heaps of size-segregated
//! pages, hands frees from other threads back to the owning page, and returns (purges) pages left
//! empty. The soak figures are in docs/benchmarks.md.
//!
//! Why the large-block mappings: a decoder that sizes a `Vec` from a count read off the wire before reading the elements
//! (the `kafka-protocol` crate's `Array`/`CompactArray` do: `Vec::with_capacity(n)`) turns a
//! 30-byte request claiming 2^31 elements into a request for ~150 GB. An ordinary allocator
//! refuses that (the kernel's overcommit heuristic rejects a mapping larger than RAM + swap),
//! and Rust answers an allocation failure by aborting the process: every shard, every
//! connection. A `MAP_NORESERVE` mapping is address space only: it is not charged against the
//! overcommit heuristic, pages are committed when first touched, so the bogus capacity costs
//! nothing and the decode fails normally a few bytes later, when the elements run out. The
//! block is released with `munmap` when the `Vec` drops.
//!
//! Everything below the threshold goes to mimalloc unchanged; the only cost on the hot path is one
//! comparison per call. Above the threshold mimalloc would itself serve the block from fresh OS
//! memory (its huge-object path), so large legitimate blocks cost the same system calls as before.
//! Under `vm.overcommit_memory=2` (strict accounting) the kernel ignores `MAP_NORESERVE`, and a
//! bogus request fails exactly as it would have without this allocator.
//!
//! [`disable_transparent_huge_pages`] keeps the kernel from filling purged pages back in;
//! [`release_free_memory`] is what an idle shard calls (through `ringlog::allocator`) to hand
//! mimalloc's free pages back to the kernel at once instead of when the thread next allocates.
//!
//! Owns nothing else and depends only on `libc` and `mimalloc`; it must never allocate itself.

use std::alloc::{GlobalAlloc, Layout};

use mimalloc::MiMalloc as Small;

/// Blocks at least this large are mappings of their own. Beyond mimalloc's large objects (its
/// huge-object path maps them separately anyway), and far below the RAM of any machine a broker
/// runs on, so no bogus request is large enough to reach mimalloc and still be refused.
pub const LARGE_BLOCK_BYTES: usize = 64 << 20;

/// `mmap` returns page-aligned addresses; stricter alignments stay with mimalloc.
const PAGE_BYTES: usize = 4096;

/// See the module documentation.
pub struct ReservingAllocator;

// mimalloc's own API (`mimalloc.h`), in the library the `mimalloc` crate links. Declared here
// rather than through `libmimalloc-sys`'s `extended` feature, which would add a dependency for
// one function.
extern "C" {
    fn mi_collect(force: bool);
}

/// Turns transparent huge pages off for the whole process (`PR_SET_THP_DISABLE`, existing
/// mappings included), so memory mimalloc has returned stays returned.
///
/// Why: mimalloc asks for huge pages on its arenas (`MADV_HUGEPAGE`, its `allow_thp` option,
/// read before `main`), and the kernel's khugepaged then collapses any 2 MiB range of them that
/// still has one page present into a whole resident huge page (`max_ptes_none` is 511 by
/// default). Pages mimalloc purged came back a little at a time, in the background: a broker idle
/// after its topics were deleted grew by 4.5 MiB in 30 s with nothing running, all of it in the
/// arena, and the arena held 22 MiB of huge pages (docs/benchmarks.md). Without huge pages a
/// fault maps 4 KiB instead of 2 MiB; the soak and side-by-side figures measure that cost.
pub fn disable_transparent_huge_pages() -> std::io::Result<()> {
    // SAFETY: PR_SET_THP_DISABLE only sets a flag on this process's address space.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Frees the calling thread's mimalloc pages that hold no live block, including those emptied by
/// frees from other threads, and returns every free range of mimalloc's arenas to the kernel
/// (`MADV_DONTNEED`) without waiting for their purge delay. Costs a walk over the thread's pages;
/// meant for a thread that has gone idle, not for the hot path.
pub fn release_free_memory() {
    // SAFETY: `mi_collect` takes no pointers; it may be called from any thread at any time.
    unsafe { mi_collect(true) }
}

/// Whether a block of this layout is (or is to be) a mapping of its own. The hot paths test only
/// the size, one comparison; the alignment is looked at on the cold path.
#[inline]
fn is_mapped(size: usize, align: usize) -> bool {
    size >= LARGE_BLOCK_BYTES && align <= PAGE_BYTES
}

// The large-block paths are cold and out of line, so mimalloc's path stays one
// comparison and a tail call.

/// A new large block: a fresh private anonymous mapping (zero-filled), or null.
#[cold]
#[inline(never)]
unsafe fn alloc_large(layout: Layout, zeroed: bool) -> *mut u8 {
    if !is_mapped(layout.size(), layout.align()) {
        // SAFETY: forwarded with the caller's guarantees.
        return unsafe {
            if zeroed {
                Small.alloc_zeroed(layout)
            } else {
                Small.alloc(layout)
            }
        };
    }
    // SAFETY: an anonymous private mapping at an address of the kernel's choosing touches no
    // existing memory.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            layout.size(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        std::ptr::null_mut()
    } else {
        ptr.cast()
    }
}

#[cold]
#[inline(never)]
unsafe fn dealloc_large(ptr: *mut u8, layout: Layout) {
    if !is_mapped(layout.size(), layout.align()) {
        // SAFETY: forwarded with the caller's guarantees.
        return unsafe { Small.dealloc(ptr, layout) };
    }
    // SAFETY: `ptr` is a live mapping of `layout.size()` bytes that nothing uses any more.
    let rc = unsafe { libc::munmap(ptr.cast(), layout.size()) };
    debug_assert_eq!(rc, 0, "munmap of a large block failed");
}

/// `realloc` where the old or the new size is large.
#[cold]
#[inline(never)]
unsafe fn realloc_large(ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
    match (is_mapped(layout.size(), layout.align()), is_mapped(new_size, layout.align())) {
        // SAFETY: forwarded with the caller's guarantees.
        (false, false) => unsafe { Small.realloc(ptr, layout, new_size) },
        (true, true) => {
            // SAFETY: `ptr` is a live mapping of `layout.size()` bytes; the kernel keeps its
            // contents and its MAP_NORESERVE accounting, and the old address is not used again
            // if it moves.
            let moved = unsafe { libc::mremap(ptr.cast(), layout.size(), new_size, libc::MREMAP_MAYMOVE) };
            if moved == libc::MAP_FAILED {
                std::ptr::null_mut()
            } else {
                moved.cast()
            }
        }
        _ => {
            // Across the threshold: a block from the other side, then a copy.
            // SAFETY: `new_size` is non-zero and, rounded up to `layout.align()`, fits isize
            // (the caller's guarantees for realloc).
            let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
            // SAFETY: a non-zero size, as above.
            let new_ptr = unsafe { ReservingAllocator.alloc(new_layout) };
            if !new_ptr.is_null() {
                // SAFETY: both blocks are live, distinct, and at least this long.
                unsafe { std::ptr::copy_nonoverlapping(ptr, new_ptr, layout.size().min(new_size)) };
                // SAFETY: `ptr` was allocated with `layout`; it is not used again.
                unsafe { ReservingAllocator.dealloc(ptr, layout) };
            }
            new_ptr
        }
    }
}

// SAFETY: small blocks are mimalloc's, with its guarantees. A mapped block is a
// mapping of at least `size` bytes, page-aligned (so aligned for any `align <= PAGE_BYTES`),
// used by nobody else until it is unmapped. Whether a block is mapped is decided from its
// layout's size and alignment alone, and `GlobalAlloc` passes `dealloc` and `realloc` the
// layout the block was last allocated with, so every block returns to the allocator that
// made it.
unsafe impl GlobalAlloc for ReservingAllocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= LARGE_BLOCK_BYTES {
            // SAFETY: forwarded with the caller's guarantees.
            return unsafe { alloc_large(layout, false) };
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { Small.alloc(layout) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= LARGE_BLOCK_BYTES {
            // SAFETY: forwarded with the caller's guarantees; anonymous pages read as zero.
            return unsafe { alloc_large(layout, true) };
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { Small.alloc_zeroed(layout) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() >= LARGE_BLOCK_BYTES {
            // SAFETY: forwarded with the caller's guarantees.
            return unsafe { dealloc_large(ptr, layout) };
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { Small.dealloc(ptr, layout) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.size() >= LARGE_BLOCK_BYTES || new_size >= LARGE_BLOCK_BYTES {
            // SAFETY: forwarded with the caller's guarantees.
            return unsafe { realloc_large(ptr, layout, new_size) };
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { Small.realloc(ptr, layout, new_size) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bogus_capacity_costs_address_space_only() {
        let allocator = ReservingAllocator;
        // 2^31 elements of 72 bytes: what a 30-byte Metadata request asks the decoder for.
        let layout = Layout::from_size_align(72 << 31, 8).unwrap();
        unsafe {
            let ptr = allocator.alloc(layout);
            assert!(!ptr.is_null(), "a 144 GiB reservation failed");
            // The first and the last page are usable; nothing in between is committed.
            ptr.write(1);
            ptr.add(layout.size() - 1).write(2);
            assert_eq!((ptr.read(), ptr.add(layout.size() - 1).read()), (1, 2));
            allocator.dealloc(ptr, layout);
        }
    }

    #[test]
    fn blocks_keep_their_contents_across_the_threshold() {
        let allocator = ReservingAllocator;
        let small = Layout::from_size_align(LARGE_BLOCK_BYTES - 8, 8).unwrap();
        unsafe {
            let ptr = allocator.alloc_zeroed(small);
            assert!(!ptr.is_null());
            assert_eq!(ptr.add(small.size() - 1).read(), 0);
            ptr.write(7);
            ptr.add(small.size() - 1).write(9);
            // small → large: copied into a mapping.
            let big_size = LARGE_BLOCK_BYTES * 2;
            let big = allocator.realloc(ptr, small, big_size);
            assert!(!big.is_null());
            assert_eq!((big.read(), big.add(small.size() - 1).read()), (7, 9));
            big.add(big_size - 1).write(5);
            // large → larger: remapped.
            let big_layout = Layout::from_size_align(big_size, 8).unwrap();
            let bigger = allocator.realloc(big, big_layout, big_size * 2);
            assert!(!bigger.is_null());
            assert_eq!((bigger.read(), bigger.add(big_size - 1).read()), (7, 5));
            // large → small: copied back to mimalloc.
            let bigger_layout = Layout::from_size_align(big_size * 2, 8).unwrap();
            let back = allocator.realloc(bigger, bigger_layout, 64);
            assert!(!back.is_null());
            assert_eq!(back.read(), 7);
            allocator.dealloc(back, Layout::from_size_align(64, 8).unwrap());
        }
    }

    #[test]
    fn over_aligned_large_blocks_stay_with_mimalloc() {
        assert!(!is_mapped(LARGE_BLOCK_BYTES, PAGE_BYTES * 2));
        assert!(is_mapped(LARGE_BLOCK_BYTES, PAGE_BYTES));
        assert!(!is_mapped(LARGE_BLOCK_BYTES - 1, 8));
        let allocator = ReservingAllocator;
        let layout = Layout::from_size_align(LARGE_BLOCK_BYTES, PAGE_BYTES * 4).unwrap();
        unsafe {
            let ptr = allocator.alloc(layout);
            assert!(!ptr.is_null());
            assert_eq!(ptr as usize % (PAGE_BYTES * 4), 0);
            let bigger = allocator.realloc(ptr, layout, LARGE_BLOCK_BYTES * 2);
            assert!(!bigger.is_null());
            allocator
                .dealloc(bigger, Layout::from_size_align(LARGE_BLOCK_BYTES * 2, PAGE_BYTES * 4).unwrap());
        }
    }
}
