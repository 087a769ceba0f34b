//! Feeds arbitrary bytes to everything the broker runs on bytes from a socket before trusting
//! them: frame splitting, FlatBuffers verification of the request header, and the record batch
//! checks and record decoding of any produce payload.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use ringlog::protocol::{frame, verifier_options, wire};
use ringlog::record;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    let opts = verifier_options();
    while let Ok(Some(f)) = frame::split_frame(&mut buf, 1 << 20) {
        if let Ok(request) = flatbuffers::root_with_opts::<wire::Request>(&opts, &f.header) {
            if let Some(produce) = request.body_as_produce_request() {
                for topic in produce.topics().iter().flatten() {
                    let _ = topic.name();
                    for p in topic.partitions().iter().flatten() {
                        let start = p.payload_offset() as usize;
                        let end = start.saturating_add(p.payload_len() as usize);
                        if let Some(batches) = f.payload.get(start..end) {
                            let limits = record::BatchLimits { batch_bytes_max: 1 << 20, records_per_batch_max: 10_000 };
                            let _ = record::validate_for_append(batches, &limits);
                        }
                    }
                }
            }
        }
        // The record decoder directly too: random bytes rarely pass a crc32c check first.
        if let Ok(records) = record::reader::records(&f.payload) {
            for r in records.flatten() {
                let _ = (r.key, r.value);
            }
        }
        for batch in record::batches(&f.payload).flatten() {
            if let Ok(records) = record::reader::records(batch.1) {
                for r in records.flatten() {
                    let _ = (r.key, r.value);
                }
            }
        }
    }
});
