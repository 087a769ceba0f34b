//! Micro-benchmarks of the sparse segment indexes: offset → position and timestamp → offset
//! lookups in a full 1 GiB segment's index (4 KiB index interval: 262,144 entries).
//! Run: `cargo bench --bench index`.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use ringlog::storage::SegmentIndex;

const SEGMENT_BYTES: u32 = 1 << 30;
const BATCH_BYTES: u32 = 16 << 10;
const RECORDS_PER_BATCH: u32 = 16;

fn full_index() -> SegmentIndex {
    let mut index = SegmentIndex::new(4096);
    let batches = SEGMENT_BYTES / BATCH_BYTES;
    for i in 0..batches {
        index.on_batch(i * RECORDS_PER_BATCH, i * BATCH_BYTES, BATCH_BYTES, 1_700_000_000_000 + i64::from(i));
    }
    index
}

fn benches(c: &mut Criterion) {
    let index = full_index();
    let last_offset = SEGMENT_BYTES / BATCH_BYTES * RECORDS_PER_BATCH;
    let mut g = c.benchmark_group("segment_index_1GiB");
    // Spread lookups over the whole segment so the branch predictor cannot learn one path.
    let mut probe = 0u32;
    g.bench_function("lookup_offset", |b| {
        b.iter(|| {
            probe = probe.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            index.lookup(black_box(probe % last_offset))
        })
    });
    let mut probe = 0i64;
    g.bench_function("lookup_time", |b| {
        b.iter(|| {
            probe = (probe * 1_103_515_245 + 12_345) & 0xffff;
            index.lookup_time(black_box(1_700_000_000_000 + probe))
        })
    });
    g.finish();
}

criterion_group!(indexes, benches);
criterion_main!(indexes);
