//! Micro-benchmarks of the native frame codec for the two hot requests: encoding a produce request
//! and decoding it as the broker does (split the frame, verify the FlatBuffers header, walk the
//! partitions), and encoding a fetch response and decoding it as the client does. Sizes: 1 and
//! 100 partitions with a 16 KiB batch each (batch bytes travel in the payload region and are never
//! copied by the codec, so the cost is per partition, not per byte). Run: `cargo bench --bench frame`.

use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use flatbuffers::FlatBufferBuilder;
use ringlog::protocol::frame::{frame_prefix, split_frame};
use ringlog::protocol::{self, wire};

const BATCH_BYTES: usize = 16 << 10;

/// A produce request as the client sends it: prefix and header in one buffer, the batches as
/// separate buffers (written with one vectored write, never copied into the frame).
fn encode_produce(partitions: u32, batch: &Bytes) -> (BytesMut, Vec<Bytes>) {
    let mut fbb = FlatBufferBuilder::with_capacity(256);
    let parts: Vec<_> = (0..partitions)
        .map(|p| {
            wire::ProducePartition::create(
                &mut fbb,
                &wire::ProducePartitionArgs {
                    partition: p,
                    payload_offset: p * BATCH_BYTES as u32,
                    payload_len: BATCH_BYTES as u32,
                },
            )
        })
        .collect();
    let parts = fbb.create_vector(&parts);
    let name = fbb.create_string("bench-topic");
    let topic = wire::ProduceTopic::create(
        &mut fbb,
        &wire::ProduceTopicArgs { name: Some(name), partitions: Some(parts) },
    );
    let topics = fbb.create_vector(&[topic]);
    let body = wire::ProduceRequest::create(
        &mut fbb,
        &wire::ProduceRequestArgs { acks: protocol::ACKS_LEADER, timeout_ms: 30_000, topics: Some(topics) },
    );
    let request = wire::Request::create(
        &mut fbb,
        &wire::RequestArgs {
            correlation_id: 7,
            version: protocol::PROTOCOL_VERSION,
            body_type: wire::RequestBody::ProduceRequest,
            body: Some(body.as_union_value()),
        },
    );
    fbb.finish(request, None);
    let header = fbb.finished_data();
    let payload_len = partitions as usize * batch.len();
    let mut head = BytesMut::with_capacity(8 + header.len());
    head.extend_from_slice(&frame_prefix(header.len(), payload_len));
    head.extend_from_slice(header);
    (head, (0..partitions).map(|_| batch.clone()).collect())
}

/// The frame as it sits in the broker's receive buffer.
fn contiguous(head: &BytesMut, payload: &[Bytes]) -> BytesMut {
    let mut frame = head.clone();
    for b in payload {
        frame.extend_from_slice(b);
    }
    frame
}

/// What the broker does with a produce frame before routing: split, verify, walk partitions.
fn decode_produce(mut buf: BytesMut) -> usize {
    let frame = split_frame(&mut buf, 64 << 20).ok().flatten().expect("whole frame");
    let request = flatbuffers::root_with_opts::<wire::Request>(&protocol::verifier_options(), &frame.header)
        .expect("valid header");
    let produce = request.body_as_produce_request().expect("produce body");
    let mut bytes = 0;
    for topic in produce.topics().iter().flatten() {
        for p in topic.partitions().iter().flatten() {
            let start = p.payload_offset() as usize;
            bytes += frame.payload[start..start + p.payload_len() as usize].len();
        }
    }
    bytes
}

/// A fetch response header as the broker encodes it (the batches follow as separate buffers).
fn encode_fetch_response(partitions: u32) -> Vec<u8> {
    let mut fbb = FlatBufferBuilder::with_capacity(512);
    let results: Vec<_> = (0..partitions)
        .map(|p| {
            wire::FetchPartitionResult::create(
                &mut fbb,
                &wire::FetchPartitionResultArgs {
                    partition: p,
                    high_watermark: 1_000_000,
                    log_start_offset: 0,
                    payload_offset: p * BATCH_BYTES as u32,
                    payload_len: BATCH_BYTES as u32,
                    ..Default::default()
                },
            )
        })
        .collect();
    let results = fbb.create_vector(&results);
    let name = fbb.create_string("bench-topic");
    let topic = wire::FetchTopicResult::create(
        &mut fbb,
        &wire::FetchTopicResultArgs { name: Some(name), partitions: Some(results) },
    );
    let topics = fbb.create_vector(&[topic]);
    let body = wire::FetchResponse::create(&mut fbb, &wire::FetchResponseArgs { topics: Some(topics) });
    let response = wire::Response::create(
        &mut fbb,
        &wire::ResponseArgs {
            correlation_id: 7,
            body_type: wire::ResponseBody::FetchResponse,
            body: Some(body.as_union_value()),
            ..Default::default()
        },
    );
    fbb.finish_minimal(response);
    fbb.finished_data().to_vec()
}

/// What the client does with a fetch response header: verify, walk partitions' payload ranges.
fn decode_fetch_response(header: &[u8]) -> u64 {
    let response = flatbuffers::root_with_opts::<wire::Response>(&protocol::verifier_options(), header)
        .expect("valid header");
    let fetch = response.body_as_fetch_response().expect("fetch body");
    let mut bytes = 0u64;
    for topic in fetch.topics().iter().flatten() {
        for p in topic.partitions().iter().flatten() {
            bytes += u64::from(p.payload_len()) + p.high_watermark() as u64 % 2;
        }
    }
    bytes
}

fn benches(c: &mut Criterion) {
    let batch = Bytes::from(vec![0x5au8; BATCH_BYTES]);
    let mut g = c.benchmark_group("frame");
    for partitions in [1u32, 100] {
        let (head, payload) = encode_produce(partitions, &batch);
        let frame = contiguous(&head, &payload);
        g.bench_with_input(BenchmarkId::new("produce_request_encode", partitions), &partitions, |b, &n| {
            b.iter(|| encode_produce(black_box(n), &batch).0.len())
        });
        g.bench_with_input(BenchmarkId::new("produce_request_decode", partitions), &frame, |b, frame| {
            // Cloning a BytesMut copies it; measured separately so the decode figure can subtract it.
            b.iter(|| decode_produce(black_box(frame.clone())))
        });
        g.bench_with_input(BenchmarkId::new("produce_frame_clone", partitions), &frame, |b, frame| {
            b.iter(|| black_box(frame.clone()).len())
        });
        let header = encode_fetch_response(partitions);
        g.bench_with_input(BenchmarkId::new("fetch_response_encode", partitions), &partitions, |b, &n| {
            b.iter(|| encode_fetch_response(black_box(n)).len())
        });
        g.bench_with_input(BenchmarkId::new("fetch_response_decode", partitions), &header, |b, header| {
            b.iter(|| decode_fetch_response(black_box(header)))
        });
    }
    g.finish();
}

criterion_group!(frames, benches);
criterion_main!(frames);
