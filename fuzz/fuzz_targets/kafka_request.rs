//! Feeds arbitrary bytes to everything the broker runs on a Kafka request before trusting it:
//! framing (`split_request`), the request header, the API/version check, and the body decoder
//! of every API and version the broker serves (`decode_request`). Runs under the `ringlog`
//! binary's global allocator, so a count read off the wire meets the same allocator as in
//! production.
//!
//! Random bytes rarely form a header naming a served API at a served version, so besides the
//! raw input as a stream and as one frame, the input also drives a request built around it: its
//! first two bytes pick an entry of `SUPPORTED` and a version in its range, the rest is the
//! body (after a well-formed header), so every decoder gets the fuzzer's attention.
#![no_main]

use bytes::BytesMut;
use kafka_protocol::messages::ApiKey;
use libfuzzer_sys::fuzz_target;
use ringlog::kafka::codec::{decode_request, split_request};
use ringlog::kafka::versions::SUPPORTED;

// Only the allocator is used here, not the idle shards' `release_free_memory`.
#[allow(dead_code)]
#[path = "../../src/alloc.rs"]
mod alloc;

#[global_allocator]
static GLOBAL: alloc::ReservingAllocator = alloc::ReservingAllocator;

/// A header for `api` at `version` (correlation id 1, null client id) followed by `body`.
fn frame_for(api: ApiKey, version: i16, body: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(11 + body.len());
    frame.extend_from_slice(&(api as i16).to_be_bytes());
    frame.extend_from_slice(&version.to_be_bytes());
    frame.extend_from_slice(&1i32.to_be_bytes());
    frame.extend_from_slice(&(-1i16).to_be_bytes());
    if api.request_header_version(version) >= 2 {
        frame.push(0); // no tagged fields
    }
    frame.extend_from_slice(body);
    frame
}

fuzz_target!(|data: &[u8]| {
    let mut stream = BytesMut::from(data);
    while let Ok(Some(frame)) = split_request(&mut stream, 1 << 20) {
        let _ = decode_request(&frame);
    }
    let _ = decode_request(data);
    if let [pick, version, body @ ..] = data {
        let (api, min, max) = SUPPORTED[*pick as usize % SUPPORTED.len()];
        let version = min + (*version as i16) % (max - min + 1);
        if let Ok((ctx, _)) = decode_request(&frame_for(api, version, body)) {
            assert_eq!((ctx.api_key, ctx.version), (Some(api), version));
        }
    }
});
