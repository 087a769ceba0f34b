//! Heap per idle partition, counted exactly: this test binary's global allocator tallies live
//! bytes, and the real storage code opens partitions from real files on a glommio shard. Issue 15
//! asks for ≤ 4 KB of RSS per idle partition at 50,000 partitions; the heap a partition keeps is
//! the part the code controls (the rest is the allocator's pages and the kernel's), so it gets a
//! budget of its own that a change cannot silently spend. 1,306 bytes when written; a flusher
//! task per idle partition, as before, added ~2,100.

use std::alloc::{GlobalAlloc, Layout, System};
use std::rc::Rc;
use std::sync::atomic::{AtomicIsize, Ordering};

use glommio::LocalExecutorBuilder;
use ringlog::storage::{LogConfig, Partition, ShardStorage};

struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const PARTITIONS: usize = 2_000;

/// Live heap bytes one idle partition keeps: opened after a restart, with one record in its log.
fn heap_per_idle_partition(dir: &std::path::Path) -> f64 {
    let dir = dir.to_path_buf();
    LocalExecutorBuilder::default()
        .spawn(move || async move {
            let storage = ShardStorage::new(dir.clone(), 64 << 20, 0);
            let config = LogConfig::default();
            // First life: one record each, then a clean close.
            for i in 0..PARTITIONS {
                let (p, _) = Partition::open(dir.join(format!("t/{i}")), config.clone(), storage.clone())
                    .await
                    .expect("open");
                let mut batch = ringlog::record::builder::BatchBuilder::new();
                batch.push(1_700_000_000_000, None, Some(format!("record {i}").as_bytes()), &[]);
                let appended = p.append(batch.finish()).expect("append");
                p.wait_durable(appended.last_offset).await.expect("durable");
                p.close().await.expect("close");
            }
            drop(storage);
            // Second life: opened and left idle.
            let storage = ShardStorage::new(dir.clone(), 64 << 20, 0);
            let before = LIVE_BYTES.load(Ordering::Relaxed);
            let mut open: Vec<Rc<Partition>> = Vec::with_capacity(PARTITIONS);
            for i in 0..PARTITIONS {
                let (p, _) = Partition::open(dir.join(format!("t/{i}")), config.clone(), storage.clone())
                    .await
                    .expect("reopen");
                open.push(p);
            }
            glommio::timer::sleep(std::time::Duration::from_millis(100)).await;
            let after = LIVE_BYTES.load(Ordering::Relaxed);
            let per_partition =
                (after - before - (PARTITIONS * std::mem::size_of::<Rc<Partition>>()) as isize) as f64
                    / PARTITIONS as f64;
            for p in open {
                p.close().await.expect("close");
            }
            per_partition
        })
        .expect("executor")
        .join()
        .expect("join")
}

#[test]
fn an_idle_partition_keeps_little_heap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let per_partition = heap_per_idle_partition(dir.path());
    println!("live heap per idle partition: {per_partition:.0} bytes");
    assert!(per_partition > 0.0, "the counting allocator saw nothing: {per_partition}");
    assert!(
        per_partition < 2048.0,
        "an idle partition keeps {per_partition:.0} bytes of heap (budget 2,048: does it hold a task, a \
         buffer or a cache entry before its first write?)"
    );
}
