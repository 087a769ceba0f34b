//! Micro-benchmarks of the record batch hot path: building, validating (crc32c + header) and
//! reading a 1 KiB-record batch. Run: `cargo bench --bench batch`.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use ringlog::record::{self, builder::BatchBuilder, BatchLimits};

fn batch(records: usize, value_bytes: usize) -> bytes::BytesMut {
    let value = vec![0x5au8; value_bytes];
    let mut b = BatchBuilder::new();
    for i in 0..records {
        b.push(1_700_000_000_000 + i as i64, Some(format!("key-{i}").as_bytes()), Some(&value), &[]);
    }
    b.finish()
}

fn benches(c: &mut Criterion) {
    let limits = BatchLimits { batch_bytes_max: 4 << 20, records_per_batch_max: 1_000_000 };
    let b = batch(256, 1024);
    let mut g = c.benchmark_group("batch_256x1KiB");
    g.throughput(Throughput::Bytes(b.len() as u64));
    g.bench_function("validate_for_append", |bench| {
        bench.iter(|| record::validate_for_append(black_box(&b), &limits).map(|h| h.record_count))
    });
    g.bench_function("build", |bench| bench.iter(|| batch(256, 1024).len()));
    g.bench_function("read_records", |bench| {
        bench.iter(|| record::reader::records(black_box(&b)).map(|it| it.filter(Result::is_ok).count()))
    });
    g.finish();
}

criterion_group!(batches, benches);
criterion_main!(batches);
