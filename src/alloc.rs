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
//! Everything below the threshold goes to mimalloc; the cost on the hot path is one comparison
//! per call for the mappings and one more, with a relaxed load, for the choice of heap. Above the threshold mimalloc would itself serve the block from fresh OS
//! memory (its huge-object path), so large legitimate blocks cost the same system calls as before.
//! Under `vm.overcommit_memory=2` (strict accounting) the kernel ignores `MAP_NORESERVE`, and a
//! bogus request fails exactly as it would have without this allocator.
//!
//! Where mimalloc puts what, and huge pages: blocks under [`BULK_BLOCK_BYTES`] (metadata, and
//! the tail cache's copies of small batches) live in an arena of their own that the kernel never
//! backs with transparent huge pages; larger blocks (receive buffers, frames of large batches
//! that the cache keeps as slices, DMA buffers) stay in mimalloc's default arena, which it
//! advises for huge pages. See [`split_arenas`]. [`release_free_memory`] is what an idle shard
//! calls (through `ringlog::allocator`) to hand mimalloc's free pages back to the kernel at once
//! instead of when the thread next allocates.
//!
//! Owns nothing else and depends only on `libc` and `mimalloc`; it must never allocate itself.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;
use std::sync::atomic::{AtomicPtr, Ordering};

use mimalloc::MiMalloc as Small;

/// Blocks at least this large are mappings of their own. Beyond mimalloc's large objects (its
/// huge-object path maps them separately anyway), and far below the RAM of any machine a broker
/// runs on, so no bogus request is large enough to reach mimalloc and still be refused.
pub const LARGE_BLOCK_BYTES: usize = 64 << 20;

/// `mmap` returns page-aligned addresses; stricter alignments stay with mimalloc.
const PAGE_BYTES: usize = 4096;

/// See the module documentation.
pub struct ReservingAllocator;

/// Blocks smaller than this go to the small-block arena, which has no huge pages (see
/// [`split_arenas`]). The tail cache copies payloads under 64 KiB into blocks of their own size
/// (`storage::partition::append`) and keeps larger ones as slices of the frame they arrived in,
/// and connections read in 64 KiB chunks, so below the threshold is what churns a few KiB at a
/// time and above it the buffers that are filled and read end to end.
pub const BULK_BLOCK_BYTES: usize = 64 << 10;

/// Address space reserved for the small-block arena: committed page by page as it is touched
/// (`MAP_NORESERVE`), so only the pages in use count. Far above what a broker's small blocks
/// need (the tail cache's budget is 256 MiB per shard by default); should it fill, small blocks
/// fall back to the default arena. 4 GiB because mimalloc refused a 16 GiB area here (its limit
/// for one arena, metadata included).
const SMALL_ARENA_BYTES: usize = 4 << 30;

/// The mimalloc heap that allocates only in the small-block arena; null until [`split_arenas`]
/// has set it up, and then small blocks go to mimalloc's default heap like the others. One heap
/// for every thread: mimalloc v3 (what `libmimalloc-sys` builds unless its `v2` feature is on)
/// lets any thread allocate from any heap, and its arena ids are pointers. v2 would need a heap
/// per thread and `int` arena ids.
static SMALL_HEAP: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());

// mimalloc's own API (`mimalloc.h`), in the library the `mimalloc` crate links. Declared here
// rather than through `libmimalloc-sys`'s `extended` and `arena` features, which would add a
// dependency for eight functions.
extern "C" {
    fn mi_collect(force: bool);
    fn mi_arena_min_alignment() -> usize;
    #[allow(clippy::too_many_arguments)]
    fn mi_manage_os_memory_ex(
        start: *mut c_void,
        size: usize,
        is_committed: bool,
        is_pinned: bool,
        is_zero: bool,
        numa_node: libc::c_int,
        exclusive: bool,
        arena_id: *mut *mut c_void,
    ) -> bool;
    fn mi_heap_new_in_arena(arena_id: *mut c_void) -> *mut c_void;
    fn mi_heap_collect(heap: *mut c_void, force: bool);
    fn mi_heap_malloc_aligned(heap: *mut c_void, size: usize, alignment: usize) -> *mut c_void;
    fn mi_heap_zalloc_aligned(heap: *mut c_void, size: usize, alignment: usize) -> *mut c_void;
    fn mi_heap_realloc_aligned(
        heap: *mut c_void,
        p: *mut c_void,
        newsize: usize,
        alignment: usize,
    ) -> *mut c_void;
}

/// Gives blocks under [`BULK_BLOCK_BYTES`] an arena of their own that the kernel never backs
/// with transparent huge pages (`MADV_NOHUGEPAGE`), so that what mimalloc purges there stays
/// purged, while larger blocks keep the huge pages of mimalloc's default arena.
///
/// Why: mimalloc advises its arenas for huge pages (`MADV_HUGEPAGE`) and purges freed memory in
/// pieces as small as 4 KiB; khugepaged (`max_ptes_none` 511 by default) collapses any 2 MiB
/// range that still has one page present back into a whole resident huge page, so what mimalloc
/// purged came back, and RSS crept up under load and even idle (docs/benchmarks.md). What churns
/// in small pieces is the small blocks: the tail cache's copies of small batches, index entries,
/// map nodes. Turning huge pages off for the whole process instead (the fallback,
/// [`disable_transparent_huge_pages`]) kept memory flat but cost throughput: every 4 KiB of the
/// large buffers then took a fault of its own and a TLB entry of its own.
///
/// Must run at the start of `main`; blocks allocated before it stay where they are. Fails when
/// the arena cannot be mapped or mimalloc refuses it; small blocks then stay in the default arena.
pub fn split_arenas() -> Result<(), String> {
    // Our own mapping rather than `mi_reserve_os_memory_ex`, which maps committed memory without
    // `MAP_NORESERVE` (the overcommit heuristic may refuse it) and advises huge pages. Aligned to
    // what mimalloc requires of an arena's start.
    // SAFETY: takes no pointers.
    let align = unsafe { mi_arena_min_alignment() }.max(PAGE_BYTES);
    // SAFETY: an anonymous private mapping at an address of the kernel's choosing touches no
    // existing memory.
    let mapped = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SMALL_ARENA_BYTES + align,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if mapped == libc::MAP_FAILED {
        return Err(format!("mapping the small-block arena failed: {}", std::io::Error::last_os_error()));
    }
    let start = (mapped as usize).next_multiple_of(align) as *mut c_void;
    // SAFETY: [start, start + SMALL_ARENA_BYTES) lies in the mapping just made, which nothing
    // uses; the advice only sets a flag on it. Also keeps a kernel whose THP mode is `always` off
    // this range.
    if unsafe { libc::madvise(start, SMALL_ARENA_BYTES, libc::MADV_NOHUGEPAGE) } != 0 {
        return Err(format!(
            "advising the small-block arena against huge pages failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    let mut arena = std::ptr::null_mut();
    // SAFETY: the range is ours, aligned, readable and writable (committed as far as mimalloc
    // is concerned; the kernel commits pages when touched), zero-filled, and handed to mimalloc
    // for good: it is never unmapped. Exclusive: only the heap made for it allocates there.
    if !unsafe { mi_manage_os_memory_ex(start, SMALL_ARENA_BYTES, true, false, true, -1, true, &mut arena) } {
        return Err("mimalloc refused the small-block arena".into());
    }
    // SAFETY: `arena` is the id mimalloc just returned.
    let heap = unsafe { mi_heap_new_in_arena(arena) };
    if heap.is_null() {
        return Err("creating the small-block heap failed".into());
    }
    SMALL_HEAP.store(heap, Ordering::Release);
    Ok(())
}

/// Turns transparent huge pages off for the whole process (`PR_SET_THP_DISABLE`, existing
/// mappings included), so memory mimalloc has returned stays returned. The fallback when
/// [`split_arenas`] cannot be applied: flat memory, at the cost of 4 KiB faults and TLB entries.
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
/// frees from other threads, in both heaps, and returns every free range of mimalloc's arenas to
/// the kernel (`MADV_DONTNEED`) without waiting for their purge delay. Costs a walk over the
/// thread's pages; meant for a thread that has gone idle, not for the hot path.
pub fn release_free_memory() {
    let heap = SMALL_HEAP.load(Ordering::Acquire);
    // SAFETY: `mi_collect` and `mi_heap_collect` take no pointers but the heap mimalloc made;
    // they may be called from any thread at any time.
    unsafe {
        if !heap.is_null() {
            mi_heap_collect(heap, true);
        }
        mi_collect(true);
    }
}

/// The small-block heap, when `size` belongs there and the heap is set up.
#[inline]
fn small_heap(size: usize) -> *mut c_void {
    if size < BULK_BLOCK_BYTES {
        SMALL_HEAP.load(Ordering::Relaxed)
    } else {
        std::ptr::null_mut()
    }
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
        let heap = small_heap(layout.size());
        if !heap.is_null() {
            // SAFETY: `heap` is mimalloc's; the caller's guarantees hold for it as for the default
            // heap. A null (the arena full) falls through to the default heap.
            let ptr = unsafe { mi_heap_malloc_aligned(heap, layout.size(), layout.align()) };
            if !ptr.is_null() {
                return ptr.cast();
            }
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
        let heap = small_heap(layout.size());
        if !heap.is_null() {
            // SAFETY: as in `alloc`.
            let ptr = unsafe { mi_heap_zalloc_aligned(heap, layout.size(), layout.align()) };
            if !ptr.is_null() {
                return ptr.cast();
            }
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
        // By the new size: a block that grows past the threshold moves to the default heap, one
        // that shrinks below it to the small-block heap (unless mimalloc keeps it in place).
        let heap = small_heap(new_size);
        if !heap.is_null() {
            // SAFETY: `ptr` is a live mimalloc block (every block below the threshold is, in
            // whichever heap); on failure mimalloc leaves it as it was, and the default heap
            // tries.
            let moved = unsafe { mi_heap_realloc_aligned(heap, ptr.cast(), new_size, layout.align()) };
            if !moved.is_null() {
                return moved.cast();
            }
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

    extern "C" {
        fn mi_heap_contains(heap: *const c_void, p: *const c_void) -> bool;
    }

    /// The `VmFlags` of the mapping of this process that holds `p`.
    fn vm_flags_of(p: *const u8) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut holds = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((start, end)) = range.split_once('-') {
                    if let (Ok(start), Ok(end)) =
                        (usize::from_str_radix(start, 16), usize::from_str_radix(end, 16))
                    {
                        holds = (start..end).contains(&(p as usize));
                        continue;
                    }
                }
            }
            if holds {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return flags.trim().to_string();
                }
            }
        }
        panic!("no mapping holds {p:?}");
    }

    #[test]
    fn small_blocks_live_in_an_arena_without_huge_pages() {
        split_arenas().unwrap();
        let heap = SMALL_HEAP.load(Ordering::Acquire);

        let small = Box::new([7u8; 100]);
        assert!(unsafe { mi_heap_contains(heap, small.as_ptr().cast()) });
        assert!(vm_flags_of(small.as_ptr()).split(' ').any(|f| f == "nh"), "small-block arena not advised");
        let large = vec![9u8; BULK_BLOCK_BYTES];
        assert!(!unsafe { mi_heap_contains(heap, large.as_ptr().cast()) });

        // Growing across the threshold moves the block to the default heap, contents and all.
        let mut grown: Vec<u8> = (0..200).map(|i| i as u8).collect();
        assert!(unsafe { mi_heap_contains(heap, grown.as_ptr().cast()) });
        grown.reserve_exact(2 * BULK_BLOCK_BYTES);
        assert!(!unsafe { mi_heap_contains(heap, grown.as_ptr().cast()) });
        assert!(grown.iter().enumerate().all(|(i, &b)| b == i as u8));
        grown.truncate(10);
        grown.shrink_to_fit();
        assert!(unsafe { mi_heap_contains(heap, grown.as_ptr().cast()) });
        assert_eq!(grown, (0..10).collect::<Vec<u8>>());

        release_free_memory();
        assert_eq!((small[99], large[BULK_BLOCK_BYTES - 1]), (7, 9));
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
