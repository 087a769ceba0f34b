//! End-to-end over raw native-protocol sockets: cross-shard routing, long polling, bad input.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::wire::{batch_of, produce_result, Conn};
use common::Broker;
use ringlog::protocol::wire::ErrorCode;

/// Partition → owning shard, from metadata.
fn owners(conn: &mut Conn, topic: &str) -> Vec<u32> {
    let resp = conn.metadata();
    let body = resp.root().body_as_metadata_response().unwrap();
    let t = body.topics().unwrap().iter().find(|t| t.name() == Some(topic)).unwrap();
    t.partitions().unwrap().iter().map(|p| p.shard()).collect()
}

#[test]
fn routed_and_direct_paths_serve_the_same_data() {
    let broker = Broker::start(2, &[]);
    assert_eq!(broker.direct.len(), 2);
    let mut shard0 = Conn::connect(&broker.direct[0]);
    let resp = shard0.create_topic("x", 4);
    assert_eq!(resp.root().error(), ErrorCode::None, "{:?}", resp.root().message());
    let owners = owners(&mut shard0, "x");
    assert!(owners.contains(&0) && owners.contains(&1), "4 partitions spread over 2 shards: {owners:?}");
    // Produce every partition through shard 0 only: half of it is routed to shard 1.
    for p in 0..4u32 {
        for round in 0..3 {
            let values: Vec<Vec<u8>> = (0..10).map(|i| format!("p{p}-r{round}-{i}").into_bytes()).collect();
            let refs: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
            let (err, base) = shard0.produce("x", p, &refs);
            assert_eq!(err, ErrorCode::None);
            assert_eq!(base, round * 10);
        }
    }
    for (p, &owner) in owners.iter().enumerate() {
        let routed = shard0.fetch("x", p as u32, 0, 0);
        let mut direct_conn = Conn::connect(&broker.direct[owner as usize]);
        let direct = direct_conn.fetch("x", p as u32, 0, 0);
        assert_eq!(routed.error, ErrorCode::None);
        assert_eq!(routed.records.len(), 30);
        assert_eq!(routed.records, direct.records, "partition {p}");
        assert_eq!(routed.high_watermark, 30);
        assert_eq!(routed.records[29].1, format!("p{p}-r2-9").into_bytes());
        // Mid-log fetch skips what came before the offset.
        assert_eq!(direct_conn.fetch("x", p as u32, 25, 0).records.first().unwrap().0, 25);
    }
}

#[test]
fn long_poll_returns_as_soon_as_a_record_is_appended() {
    let broker = Broker::start(2, &[]);
    let mut admin = Conn::connect(&broker.addr);
    admin.create_topic("lp", 2);
    let owners = owners(&mut admin, "lp");
    for p in 0..2u32 {
        // Park on the non-owner shard too, so the wake-up crosses the mesh.
        let other = 1 - owners[p as usize] as usize;
        let mut waiter = Conn::connect(&broker.direct[other]);
        let started = Instant::now();
        let handle = std::thread::spawn(move || {
            let f = waiter.fetch("lp", p, 0, 20_000);
            (f, started.elapsed())
        });
        std::thread::sleep(Duration::from_millis(300));
        let mut producer = Conn::connect(&broker.addr);
        assert_eq!(producer.produce("lp", p, &[b"wake"]).0, ErrorCode::None);
        let (fetched, waited) = handle.join().unwrap();
        assert_eq!(fetched.records, vec![(0, b"wake".to_vec())]);
        // Far below the 20 s max wait: the append woke the parked fetch.
        assert!(waited < Duration::from_secs(10), "fetch waited {waited:?}");
    }
}

/// The well-behaved client: two records on each partition, at the offsets it expects
/// (`extra_on_1` records were appended to partition 1 by someone else since its last round).
fn good_round(good: &mut Conn, produced: &mut i64, extra_on_1: i64) {
    for p in 0..2u32 {
        let (err, base) = good.produce("good", p, &[b"a", b"b"]);
        assert_eq!(err, ErrorCode::None);
        assert_eq!(base, *produced + if p == 1 { extra_on_1 } else { 0 });
    }
    *produced += 2;
}

#[test]
fn bad_input_gets_errors_and_costs_well_behaved_clients_nothing() {
    let mut broker = Broker::start(2, &["frame_bytes_max=1048576", "batch_bytes_max=65536"]);
    let mut good = Conn::connect(&broker.addr);
    good.create_topic("good", 2);
    let mut produced = 0i64;
    good_round(&mut good, &mut produced, 0);

    // Garbage bytes: a nonsense length prefix; the broker answers with an error and closes.
    let mut garbage = TcpStream::connect(&broker.addr).unwrap();
    garbage.write_all(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
    let mut sink = Vec::new();
    garbage.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = garbage.read_to_end(&mut sink);
    good_round(&mut good, &mut produced, 0);

    // A valid length prefix around a header that is not a FlatBuffer.
    let mut junk = Conn::connect(&broker.addr);
    junk.send_raw(&[0, 0, 0, 12, 0, 0, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
    let resp = junk.recv().expect("an error response before the close");
    assert_eq!(resp.root().error(), ErrorCode::InvalidRequest);
    assert!(junk.recv().is_none(), "connection closed after an untrustworthy frame");

    // A frame over the limit is refused from its length prefix alone.
    let mut big = Conn::connect(&broker.addr);
    big.send_raw(&(8u32 << 20).to_be_bytes());
    let resp = big.recv().expect("an error response");
    assert_eq!(resp.root().error(), ErrorCode::BatchTooLarge);
    assert!(resp.root().message().unwrap().contains("limit"));

    // A batch with a wrong crc32c is rejected and nothing is appended.
    let mut bad = Conn::connect(&broker.addr);
    let mut batch = batch_of(&[b"evil"]);
    let last = batch.len() - 1;
    batch[last] ^= 0xff;
    let (err, _) = produce_result(&bad.produce_raw("good", 0, &batch).unwrap());
    assert_eq!(err, ErrorCode::CorruptBatch);
    // A batch over batch_bytes_max.
    let huge = vec![7u8; 100_000];
    let (err, _) = produce_result(&bad.produce_raw("good", 0, &batch_of(&[&huge])).unwrap());
    assert_eq!(err, ErrorCode::BatchTooLarge);
    // An unknown topic and an unknown partition.
    assert_eq!(bad.produce("nope", 0, &[b"x"]).0, ErrorCode::UnknownTopicOrPartition);
    assert_eq!(bad.produce("good", 99, &[b"x"]).0, ErrorCode::UnknownTopicOrPartition);
    assert_eq!(bad.fetch("nope", 0, 0, 0).error, ErrorCode::UnknownTopicOrPartition);
    // The connection is still usable after per-partition errors.
    assert_eq!(bad.produce("good", 1, &[b"fine"]).0, ErrorCode::None);
    good_round(&mut good, &mut produced, 1);

    // A truncated frame: half a request, then the client goes away.
    let mut truncated = TcpStream::connect(&broker.addr).unwrap();
    truncated.write_all(&[0, 0, 1, 0, 0, 0, 0, 16, 1, 2, 3]).unwrap();
    drop(truncated);

    // 10,000 connections opened and dropped.
    for _ in 0..10_000 {
        let _ = TcpStream::connect(&broker.addr);
    }
    good_round(&mut good, &mut produced, 1);
    assert!(broker.alive());

    // Nothing was lost and nothing extra was appended (partition 1 has one extra "fine").
    let p0 = good.fetch("good", 0, 0, 0);
    let p1 = good.fetch("good", 1, 0, 0);
    assert_eq!(p0.records.len() as i64, produced);
    assert_eq!(p1.records.len() as i64, produced + 1);
    assert!(p0.records.iter().all(|(_, v)| v == b"a" || v == b"b"));
    assert!(!broker.log().contains("panicked"));
    broker.stop();
}

/// `batch` with its attributes replaced and its crc32c recomputed, so only the attributes make it
/// unwelcome.
fn with_attributes(mut batch: Vec<u8>, attributes: i16) -> Vec<u8> {
    batch[21..23].copy_from_slice(&attributes.to_be_bytes());
    let crc = crc32c::crc32c(&batch[21..]);
    batch[17..21].copy_from_slice(&crc.to_be_bytes());
    batch
}

#[test]
fn control_and_transactional_batches_from_a_client_are_refused_and_nothing_is_written() {
    let broker = Broker::start(1, &[]);
    let mut conn = Conn::connect(&broker.addr);
    conn.create_topic("tx", 1);
    assert_eq!(conn.produce("tx", 0, &[b"before"]), (ErrorCode::None, 0));
    let control = with_attributes(batch_of(&[b"marker"]), 0x20);
    let transactional = with_attributes(batch_of(&[b"in-a-transaction"]), 0x10);
    // A good batch ahead of the control batch in the same payload is refused with it.
    let mixed = [batch_of(&[b"good"]), control.clone()].concat();
    for (what, payload, needle) in [
        ("control", &control, "control batch"),
        ("transactional", &transactional, "transactional"),
        ("good + control", &mixed, "control batch"),
    ] {
        let resp = conn.produce_raw("tx", 0, payload).expect("produce response");
        let (code, _, message) = common::wire::produce_outcome(&resp);
        assert_eq!(code, ErrorCode::InvalidRequest, "{what}: {message}");
        assert!(message.contains(needle), "{what}: the message says why: {message}");
    }
    let fetched = conn.fetch("tx", 0, 0, 0);
    assert_eq!(fetched.high_watermark, 1, "nothing was appended");
    assert_eq!(fetched.records, vec![(0, b"before".to_vec())]);
    // The connection still works, and the next good batch gets the next offset.
    assert_eq!(conn.produce("tx", 0, &[b"after"]), (ErrorCode::None, 1));
}

/// Replies leave in request order even when later requests finish first: long-polling fetches
/// (answered after their wait) pipelined among produces answered at once; the writer gathers the
/// finished replies behind each fetch into one send, and every reply arrives exactly once.
#[test]
fn pipelined_replies_keep_request_order_when_later_ones_finish_first() {
    let mut broker = Broker::start(1, &[]);
    let mut conn = Conn::connect(&broker.addr);
    let resp = conn.create_topic("quiet", 1);
    assert_eq!(resp.root().error(), ErrorCode::None, "{:?}", resp.root().message());
    let resp = conn.create_topic("busy", 1);
    assert_eq!(resp.root().error(), ErrorCode::None, "{:?}", resp.root().message());
    const REQUESTS: u32 = 300;
    let mut frames = Vec::new();
    for cid in 1..=REQUESTS {
        if cid % 50 == 1 {
            frames.extend(common::wire::fetch_frame(cid, "quiet", 0, 0, 100, 1 << 20));
        } else {
            let value = format!("v{cid}");
            frames.extend(common::wire::produce_frame(cid, "busy", 0, 1, &batch_of(&[value.as_bytes()])));
        }
    }
    conn.send_raw(&frames);
    let mut next_offset = 0;
    for cid in 1..=REQUESTS {
        let resp = conn.recv().expect("a reply for every request");
        assert_eq!(resp.root().correlation_id(), cid, "replies out of request order");
        if cid % 50 == 1 {
            let fetched = common::wire::decode_fetch(&resp, 0);
            assert!(fetched.records.is_empty(), "nothing was produced to the quiet topic");
        } else {
            assert_eq!(produce_result(&resp), (ErrorCode::None, next_offset), "request {cid}");
            next_offset += 1;
        }
    }
    assert_eq!(conn.offsets("busy", 0).1, next_offset);
    broker.stop();
}
