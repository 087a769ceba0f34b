//! Micro-benchmarks of record batch encode (BatchBuilder) and decode (header parse + record
//! iteration) at the message sizes the standard workloads use: 100 B, 1 KiB and 16 KiB values.
//! Run: `cargo bench --bench record`.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringlog::record::{self, builder::BatchBuilder};

fn build(records: usize, value: &[u8]) -> bytes::BytesMut {
    let mut b = BatchBuilder::new();
    for i in 0..records {
        b.push(1_700_000_000_000 + i as i64, None, Some(value), &[]);
    }
    b.finish()
}

fn benches(c: &mut Criterion) {
    // About 256 KiB per batch, the producer's default batch size.
    for (value_bytes, records) in [(100usize, 2048usize), (1024, 256), (16 << 10, 16)] {
        let value = vec![0xa5u8; value_bytes];
        let batch = build(records, &value);
        let mut g = c.benchmark_group("record_batch");
        g.throughput(Throughput::Bytes(batch.len() as u64));
        let id = format!("{records}x{value_bytes}B");
        g.bench_with_input(BenchmarkId::new("encode", &id), &value, |bench, value| {
            bench.iter(|| build(records, black_box(value)).len())
        });
        g.bench_with_input(BenchmarkId::new("decode", &id), &batch, |bench, batch| {
            bench.iter(|| {
                let header = record::BatchHeader::parse(black_box(batch)).map(|h| h.record_count);
                let values: usize = record::reader::records(batch)
                    .map(|it| it.flatten().map(|r| r.value.map_or(0, <[u8]>::len)).sum())
                    .unwrap_or(0);
                (header, values)
            })
        });
        g.finish();
    }
}

criterion_group!(record_batches, benches);
criterion_main!(record_batches);
