//! Feeds arbitrary bytes to the replication protocol's decoder: what a node runs on bytes from a
//! peer's socket before any Raft group sees them. It must refuse, never panic, and every entry it
//! hands on must lie inside the frame.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use ringlog::replication::wire;

fuzz_target!(|data: &[u8]| {
    let frame = Bytes::copy_from_slice(data);
    if let Ok(batch) = wire::decode(frame.clone()) {
        for (_, message) in &batch.messages {
            for entry in message.entries.iter() {
                assert!(entry.data.len() <= frame.len());
            }
        }
        // What decodes must encode to a frame that decodes to the same messages.
        let again = wire::decode(Bytes::from(wire::encode(&batch).to_vec()));
        assert!(again.is_ok_and(|b| b.messages.len() == batch.messages.len()));
    }
});
