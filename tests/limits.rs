//! End-to-end: every configurable limit is enforced with its typed error while the broker stays
//! up and well-behaved clients on other connections are unaffected; bad configuration and a
//! second broker on a locked data directory are refused at start; SIGTERM with in-flight work
//! exits cleanly and keeps every acknowledged record.

mod common;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::wire::{batch_of, decode_fetch, fetch_frame, produce_frame, produce_result, request_frame, Conn};
use common::{wait_timeout, Broker, BIN};
use ringlog::protocol::wire::{self, ErrorCode, RequestBody};

/// Polls `done` every 20 ms until it holds; panics with `what` after `limit`.
fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One record whose batch is exactly `batch_bytes` long.
fn batch_of_len(batch_bytes: usize) -> Vec<u8> {
    (batch_bytes.saturating_sub(200)..batch_bytes)
        .map(|v| batch_of(&[&vec![b'x'; v]]))
        .find(|b| b.len() == batch_bytes)
        .unwrap_or_else(|| panic!("no single-record batch is exactly {batch_bytes} bytes"))
}

fn create_ok(conn: &mut Conn, name: &str, partitions: u32) {
    let resp = conn.create_topic(name, partitions);
    assert_eq!(resp.root().error(), ErrorCode::None, "create {name}: {:?}", resp.root().message());
}

fn create_err(conn: &mut Conn, name: &str, partitions: u32) -> (ErrorCode, String) {
    let resp = conn.create_topic(name, partitions);
    (resp.root().error(), resp.root().message().unwrap_or_default().to_string())
}

/// The well-behaved client: one record on `topic`/0 at the offset it expects.
fn good_round(good: &mut Conn, topic: &str, next: &mut i64) {
    let (err, base) = good.produce(topic, 0, &[b"good"]);
    assert_eq!(err, ErrorCode::None);
    assert_eq!(base, *next, "the well-behaved client's records are dense");
    *next += 1;
}

#[test]
fn batch_and_frame_limits_get_typed_errors_and_cost_others_nothing() {
    const FRAME_MAX: usize = 65536;
    const BATCH_MAX: usize = 16384;
    let mut broker = Broker::start(
        1,
        &[
            "records_per_batch_max=100",
            &format!("batch_bytes_max={BATCH_MAX}"),
            &format!("frame_bytes_max={FRAME_MAX}"),
            &format!("bytes_in_flight_per_connection_max={FRAME_MAX}"),
        ],
    );
    let mut good = Conn::connect(&broker.addr);
    create_ok(&mut good, "good", 1);
    create_ok(&mut good, "lim", 1);
    let mut good_next = 0;
    good_round(&mut good, "good", &mut good_next);

    let mut bad = Conn::connect(&broker.addr);
    let hundred: Vec<Vec<u8>> = (0..100).map(|i| format!("r{i}").into_bytes()).collect();
    let mut refs: Vec<&[u8]> = hundred.iter().map(Vec::as_slice).collect();
    assert_eq!(bad.produce("lim", 0, &refs), (ErrorCode::None, 0), "exactly records_per_batch_max");
    refs.push(b"one too many");
    let resp = bad.produce_raw("lim", 0, &batch_of(&refs)).unwrap();
    let (err, _, message) = common::wire::produce_outcome(&resp);
    assert_eq!(err, ErrorCode::TooManyRecords, "{message}");
    assert!(message.contains("101") && message.contains("100"), "names count and limit: {message}");
    good_round(&mut good, "good", &mut good_next);

    let exact = batch_of_len(BATCH_MAX);
    assert_eq!(produce_result(&bad.produce_raw("lim", 0, &exact).unwrap()), (ErrorCode::None, 100));
    let over = batch_of_len(BATCH_MAX + 1);
    let (err, _, message) = common::wire::produce_outcome(&bad.produce_raw("lim", 0, &over).unwrap());
    assert_eq!(err, ErrorCode::BatchTooLarge, "{message}");
    assert!(message.contains(&BATCH_MAX.to_string()), "names the limit: {message}");
    good_round(&mut good, "good", &mut good_next);

    // Frames: one request of exactly frame_bytes_max (several batches, each within the batch
    // limit) is served; one byte more is answered with an error and the connection closed.
    let frame_of = |last_batch_bytes: usize| {
        let mut payload = Vec::new();
        for _ in 0..4 {
            payload.extend_from_slice(&batch_of_len(15_000));
        }
        payload.extend_from_slice(&batch_of_len(last_batch_bytes));
        produce_frame(1, "lim", 0, 1, &payload)
    };
    let base_len = frame_of(1000).len();
    // The frame length field counts everything after itself.
    let exact_last = 1000 + (FRAME_MAX + 4 - base_len);
    let exact_frame = frame_of(exact_last);
    assert_eq!(exact_frame.len() - 4, FRAME_MAX);
    let mut edge = Conn::connect(&broker.addr);
    edge.send_raw(&exact_frame);
    let (err, base) = produce_result(&edge.recv().expect("a frame of exactly the limit is served"));
    assert_eq!((err, base), (ErrorCode::None, 101));
    assert_eq!(edge.fetch("lim", 0, 0, 0).high_watermark, 106, "all five batches appended");
    let over_frame = frame_of(exact_last + 1);
    edge.send_raw(&over_frame);
    let resp = edge.recv().expect("an error response before the close");
    assert_eq!(resp.root().error(), ErrorCode::BatchTooLarge);
    let message = resp.root().message().unwrap_or_default().to_string();
    assert!(message.contains(&FRAME_MAX.to_string()), "names the limit: {message}");
    assert!(edge.recv().is_none(), "connection closed after an oversized frame");
    good_round(&mut good, "good", &mut good_next);

    // Nothing from the refused requests was appended.
    let lim = good.fetch_all("lim", 0, 0);
    assert_eq!(lim.len(), 106);
    assert!(lim.iter().enumerate().all(|(i, (o, _))| *o == i as i64));
    assert!(!lim.iter().any(|(_, v)| v == b"one too many"));
    assert!(broker.log().contains("closing connection: frame of"), "oversized frame is logged");
    assert!(!broker.log().contains("panicked"));
    broker.stop();
}

#[test]
fn unsupported_protocol_version_gets_typed_error_and_connection_stays_usable() {
    let mut broker = Broker::start(1, &[]);
    let mut conn = Conn::connect(&broker.addr);
    create_ok(&mut conn, "v", 1);
    let frame = request_frame(77, 2, RequestBody::MetadataRequest, &[], |fbb| {
        wire::MetadataRequest::create(fbb, &wire::MetadataRequestArgs { topics: None }).as_union_value()
    });
    conn.send_raw(&frame);
    let resp = conn.recv().expect("an error response, not a close");
    assert_eq!(resp.root().error(), ErrorCode::UnsupportedVersion);
    assert_eq!(resp.root().correlation_id(), 77, "the error answers the request that caused it");
    assert!(resp.root().message().unwrap_or_default().contains('2'), "{:?}", resp.root().message());
    assert_eq!(conn.produce("v", 0, &[b"still usable"]), (ErrorCode::None, 0));
    assert_eq!(conn.fetch("v", 0, 0, 0).records, vec![(0, b"still usable".to_vec())]);
    broker.stop();
}

#[test]
fn topic_name_partition_and_topic_count_limits() {
    let mut broker = Broker::start(2, &["partitions_per_topic_max=4", "topics_max=3"]);
    let mut conn = Conn::connect(&broker.addr);
    let longest = "n".repeat(249);
    create_ok(&mut conn, &longest, 1);
    for name in
        ["n".repeat(250), String::new(), ".".into(), "..".into(), "a/b".into(), "sp ace".into(), "é".into()]
    {
        let (err, message) = create_err(&mut conn, &name, 1);
        assert_eq!(err, ErrorCode::InvalidTopicName, "{name:?}: {message}");
        assert!(!message.is_empty());
    }
    let (err, message) = create_err(&mut conn, "five", 5);
    assert_eq!(err, ErrorCode::InvalidPartitions, "{message}");
    assert!(message.contains('4'), "names the limit: {message}");
    create_ok(&mut conn, "four", 4);
    create_ok(&mut conn, "third", 1);
    let (err, message) = create_err(&mut conn, "fourth", 1);
    assert_eq!(err, ErrorCode::ResourceExhausted, "{message}");
    assert!(message.contains("topics_max"), "{message}");
    // Nothing half-created: the refused topics do not exist.
    let names: Vec<String> = {
        let resp = conn.metadata();
        let body = resp.root().body_as_metadata_response().unwrap();
        body.topics().unwrap().iter().map(|t| t.name().unwrap_or_default().to_string()).collect()
    };
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(!names.iter().any(|n| n == "five" || n == "fourth"));
    // Deleting one makes room again.
    assert_eq!(conn.delete_topic("third").root().error(), ErrorCode::None);
    create_ok(&mut conn, "fourth", 1);
    assert_eq!(conn.produce("four", 3, &[b"ok"]), (ErrorCode::None, 0));
    assert_eq!(conn.produce(&longest, 0, &[b"ok"]), (ErrorCode::None, 0));
    broker.stop();
}

#[test]
fn zero_partitions_is_refused() {
    let mut broker = Broker::start(1, &[]);
    let out = broker.cli(&["topic", "create", "zero", "--partitions", "0"], None);
    assert!(!out.status.success(), "created a topic with 0 partitions: {}", out.stdout);
    assert!(out.stderr.contains("InvalidPartitions"), "{}", out.stderr);
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
    let listed = broker.cli(&["topic", "list"], None).ok();
    assert!(!listed.lines().any(|l| l == "zero"), "{listed}");
    broker.stop();
}

/// Sends a metadata request and reads the answer; false if the broker closed the connection.
fn served(stream: &mut TcpStream) -> bool {
    let frame = request_frame(1, 1, RequestBody::MetadataRequest, &[], |fbb| {
        wire::MetadataRequest::create(fbb, &wire::MetadataRequestArgs { topics: None }).as_union_value()
    });
    if stream.write_all(&frame).is_err() {
        return false;
    }
    let mut prefix = [0u8; 8];
    if stream.read_exact(&mut prefix).is_err() {
        return false;
    }
    let frame_len = u32::from_be_bytes(prefix[..4].try_into().unwrap()) as usize;
    let mut rest = vec![0u8; frame_len - 4];
    stream.read_exact(&mut rest).is_ok()
}

fn open(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

#[test]
fn connections_beyond_the_per_shard_limit_are_closed_at_accept() {
    let mut broker = Broker::start(2, &["connections_per_shard_max=3"]);
    // Direct ports pin each connection to a known shard.
    let mut held: Vec<TcpStream> = (0..3).map(|_| open(&broker.direct[0])).collect();
    for s in &mut held {
        assert!(served(s), "connections within the limit are served");
    }
    let mut refused = open(&broker.direct[0]);
    assert!(!served(&mut refused), "a fourth connection to shard 0 is closed");
    wait_until(Duration::from_secs(10), "the refusal log line", || {
        broker.log().contains("connection refused: connections_per_shard_max reached")
    });
    // The limit is per shard: shard 1 still has room, and the held connections still work.
    let mut other_shard = open(&broker.direct[1]);
    assert!(served(&mut other_shard));
    for s in &mut held {
        assert!(served(s), "connections within the limit are unaffected");
    }
    // Closing one makes room (the broker notices the close asynchronously).
    drop(held.pop());
    wait_until(Duration::from_secs(10), "a free connection slot on shard 0", || {
        served(&mut open(&broker.direct[0]))
    });
    drop(held);
    let mut after = Vec::new();
    wait_until(Duration::from_secs(10), "all three slots freed", || {
        after.clear();
        after = (0..3).map(|_| open(&broker.direct[0])).collect::<Vec<_>>();
        after.iter_mut().all(served)
    });
    let mut fourth = open(&broker.direct[0]);
    assert!(!served(&mut fourth), "and the limit still holds");
    assert!(broker.alive());
    broker.stop();
}

#[test]
fn pipelining_beyond_bytes_in_flight_stops_reading_but_answers_everything_in_order() {
    const IN_FLIGHT_MAX: usize = 256 << 10;
    const FETCHES: u32 = 32;
    const PRODUCES: u32 = 200;
    const RECORDS_PER_PRODUCE: usize = 8;
    let mut broker = Broker::start(
        1,
        &[
            &format!("frame_bytes_max={IN_FLIGHT_MAX}"),
            &format!("batch_bytes_max={IN_FLIGHT_MAX}"),
            &format!("bytes_in_flight_per_connection_max={IN_FLIGHT_MAX}"),
        ],
    );
    let mut admin = Conn::connect(&broker.addr);
    create_ok(&mut admin, "big", 1);
    create_ok(&mut admin, "pipe", 1);
    for i in 0..4u8 {
        let value = vec![b'a' + i; 250_000];
        assert_eq!(admin.produce("big", 0, &[&value]).0, ErrorCode::None);
    }

    // Fetch replies of ~1 MB each that this client does not read yet fill the socket buffers,
    // so the broker cannot write any reply and holds the permits of every request it has read.
    let mut frames: Vec<Vec<u8>> =
        (0..FETCHES).map(|i| fetch_frame(1 + i, "big", 0, 0, 0, 1 << 20)).collect();
    let fetch_request_bytes = frames[0].len() - 8;
    let values: Vec<Vec<Vec<u8>>> = (0..PRODUCES)
        .map(|i| {
            (0..RECORDS_PER_PRODUCE)
                .map(|r| format!("{i:04}-{r}-{}", "v".repeat(1000)).into_bytes())
                .collect()
        })
        .collect();
    for (i, vals) in values.iter().enumerate() {
        let refs: Vec<&[u8]> = vals.iter().map(Vec::as_slice).collect();
        frames.push(produce_frame(1 + FETCHES + i as u32, "pipe", 0, 1, &batch_of(&refs)));
    }
    let produce_request_bytes = frames.last().unwrap().len() - 8;
    let total_request_bytes: usize = frames.iter().map(Vec::len).sum();
    assert!(total_request_bytes > 4 * IN_FLIGHT_MAX);

    let mut client = Conn::connect(&broker.addr);
    let mut writer = client.stream.try_clone().unwrap();
    let written = Arc::new(AtomicUsize::new(0));
    let written_by_writer = written.clone();
    let writer_thread = std::thread::spawn(move || {
        for frame in frames {
            writer.write_all(&frame).unwrap();
            written_by_writer.fetch_add(1, Ordering::SeqCst);
        }
    });

    // The broker appends produces only while their request bytes fit the limit.
    let appended_max = (IN_FLIGHT_MAX / produce_request_bytes) as i64;
    let appended_min =
        ((IN_FLIGHT_MAX - FETCHES as usize * fetch_request_bytes) / produce_request_bytes) as i64;
    let mut admin_probe = Conn::connect(&broker.addr);
    let mut appended_now = || admin_probe.offsets("pipe", 0).1 / RECORDS_PER_PRODUCE as i64;
    wait_until(Duration::from_secs(20), "the broker to fill its in-flight budget", || {
        appended_now() >= appended_min
    });
    // Give it every chance to read on, then check it did not: no timing asserted, only the bound.
    std::thread::sleep(Duration::from_millis(300));
    let stalled_at = appended_now();
    assert!(
        (appended_min..=appended_max).contains(&stalled_at),
        "with replies undrained the broker appended {stalled_at} produce requests; the {IN_FLIGHT_MAX}-byte \
         budget allows {appended_min}..={appended_max} ({produce_request_bytes}-byte requests)"
    );
    assert!(stalled_at < PRODUCES as i64);

    // Drain: every reply arrives, in request order, nothing lost.
    for i in 0..FETCHES {
        let resp = client.recv().expect("fetch reply");
        assert_eq!(resp.root().correlation_id(), 1 + i);
        let fetched = decode_fetch(&resp, 0);
        assert_eq!(fetched.error, ErrorCode::None);
        assert_eq!(fetched.records.len(), 4, "fetch {i} carries the whole 1 MB partition");
    }
    for i in 0..PRODUCES {
        let resp = client.recv().expect("produce reply");
        assert_eq!(resp.root().correlation_id(), 1 + FETCHES + i, "replies in request order");
        assert_eq!(produce_result(&resp), (ErrorCode::None, i as i64 * RECORDS_PER_PRODUCE as i64));
    }
    writer_thread.join().unwrap();
    assert_eq!(written.load(Ordering::SeqCst), (FETCHES + PRODUCES) as usize);
    let stored = admin.fetch_all("pipe", 0, 0);
    let expected: Vec<(i64, Vec<u8>)> =
        values.into_iter().flatten().enumerate().map(|(o, v)| (o as i64, v)).collect();
    assert_eq!(stored.len(), expected.len());
    assert!(stored == expected, "the partition holds exactly the pipelined records, in order");
    assert!(!broker.log().contains("panicked"));
    broker.stop();
}

/// Runs `ringlog serve` with a bad configuration; returns its stderr after asserting that it
/// exited non-zero on its own.
fn serve_fails(args: &[&str], env: &[(&str, &str)]) -> String {
    let dir = tempfile::Builder::new().prefix("ringlog-badcfg").tempdir_in(common::test_root()).unwrap();
    let data_dir = dir.path().join("data").display().to_string();
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--data-dir", &data_dir, "--listen", "127.0.0.1:0", "--shard-port-base", "0"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let status = wait_timeout(&mut child, Duration::from_secs(30));
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(!status.success(), "serve {args:?} {env:?} should be refused; stderr:\n{stderr}");
    assert_ne!(status.code(), None, "exited, not killed by a signal: {status:?}");
    stderr
}

#[test]
fn bad_configuration_is_refused_naming_the_option() {
    let err = serve_fails(&["--set", "frame_bytes_max=lots"], &[]);
    assert!(err.contains("frame_bytes_max"), "{err}");
    let err = serve_fails(&["--set", "frame_bytes_maxx=1024"], &[]);
    assert!(err.contains("frame_bytes_maxx") && err.contains("no such"), "{err}");
    let err = serve_fails(&["--set", "batch_bytes_max=10"], &[]);
    assert!(err.contains("batch_bytes_max"), "{err}");
    let err = serve_fails(&["--set", "connections_per_shard_max=0"], &[]);
    assert!(err.contains("connections_per_shard_max"), "{err}");
    let err = serve_fails(&[], &[("RINGLOG_SHARDZ", "2")]);
    assert!(err.contains("RINGLOG_SHARDZ"), "{err}");
    let err = serve_fails(&[], &[("RINGLOG_TOPICS_MAX", "many")]);
    assert!(err.contains("RINGLOG_TOPICS_MAX"), "{err}");

    let dir = tempfile::Builder::new().prefix("ringlog-badcfg").tempdir_in(common::test_root()).unwrap();
    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "shards = 1\nfree_space_reserv_bytes = 1048576\n").unwrap();
    let err = serve_fails(&["--config", typo.to_str().unwrap()], &[]);
    assert!(err.contains("free_space_reserv_bytes") && err.contains("typo.toml"), "{err}");
    let bad_type = dir.path().join("bad_type.toml");
    std::fs::write(&bad_type, "shards = 1\nrecords_per_batch_max = \"lots\"\n").unwrap();
    let err = serve_fails(&["--config", bad_type.to_str().unwrap()], &[]);
    assert!(err.contains("records_per_batch_max") && err.contains("bad_type.toml"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_second_broker_on_the_same_data_dir_is_refused() {
    let mut first = Broker::start(1, &[]);
    let mut conn = Conn::connect(&first.addr);
    create_ok(&mut conn, "mine", 1);
    assert_eq!(conn.produce("mine", 0, &[b"kept"]), (ErrorCode::None, 0));
    let data_dir = first.data_dir().display().to_string();
    let mut second = Command::new(BIN)
        .args(["serve", "--data-dir", &data_dir, "--listen", "127.0.0.1:0", "--shard-port-base", "0"])
        .args(["--shards", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_timeout(&mut second, Duration::from_secs(30));
    let mut stderr = String::new();
    second.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(!status.success(), "a second broker started on a locked data dir:\n{stderr}");
    assert!(stderr.contains("in use by another ringlog process") && stderr.contains(&data_dir), "{stderr}");
    // The first broker and its data are untouched.
    assert_eq!(conn.produce("mine", 0, &[b"still mine"]), (ErrorCode::None, 1));
    assert_eq!(conn.fetch_all("mine", 0, 0).len(), 2);
    first.stop();
}

/// What one producer thread got acknowledged: (partition, base offset, values).
type Acked = Vec<(u32, i64, Vec<Vec<u8>>)>;

/// Produces to `topic` partition `partition` through `addr`, four requests in flight, until the
/// connection closes. Returns what was acknowledged.
fn produce_until_closed(addr: String, partition: u32, acked_count: Arc<AtomicUsize>) -> Acked {
    let mut conn = Conn::connect(&addr);
    let mut writer = conn.stream.try_clone().unwrap();
    let mut pending: VecDeque<(u32, Vec<Vec<u8>>)> = VecDeque::new();
    let mut acked = Vec::new();
    let mut cid = 0u32;
    let mut open = true;
    loop {
        while open && pending.len() < 4 {
            cid += 1;
            let values: Vec<Vec<u8>> =
                (0..10).map(|r| format!("p{partition}-{cid}-{r}").into_bytes()).collect();
            let refs: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
            if writer.write_all(&produce_frame(cid, "s", partition, 1, &batch_of(&refs))).is_err() {
                open = false;
                break;
            }
            pending.push_back((cid, values));
        }
        let Some((expected_cid, values)) = pending.pop_front() else { return acked };
        let Some(resp) = conn.recv() else { return acked };
        let root = resp.root();
        assert_eq!(root.correlation_id(), expected_cid, "replies in order");
        if root.error() != ErrorCode::None {
            assert_eq!(root.error(), ErrorCode::ShuttingDown, "{:?}", root.message());
            continue;
        }
        let (err, base) = produce_result(&resp);
        if err == ErrorCode::None {
            acked.push((partition, base, values));
            acked_count.fetch_add(1, Ordering::SeqCst);
        } else {
            assert_eq!(err, ErrorCode::ShuttingDown, "only a shutdown may refuse these produces");
        }
    }
}

#[test]
fn sigterm_with_long_poll_and_produces_in_flight_exits_cleanly_and_keeps_acknowledged_records() {
    const GRACE_MS: u64 = 2000;
    let mut broker =
        Broker::start(2, &[&format!("shutdown_grace_ms={GRACE_MS}"), "fetch_wait_ms_max=120000"]);
    let mut admin = Conn::connect(&broker.addr);
    create_ok(&mut admin, "s", 2);
    create_ok(&mut admin, "idle", 1);

    // A fetch parked for up to two minutes on a partition nobody writes to.
    let mut waiter = Conn::connect(&broker.addr);
    waiter.send_raw(&fetch_frame(1, "idle", 0, 0, 120_000, 1 << 20));
    let parked = std::thread::spawn(move || waiter.recv().map(|r| r.root().error()));

    let acked_count = Arc::new(AtomicUsize::new(0));
    let producers: Vec<_> = (0..2u32)
        .map(|p| {
            let addr = broker.direct[p as usize].clone();
            let count = acked_count.clone();
            std::thread::spawn(move || produce_until_closed(addr, p, count))
        })
        .collect();
    wait_until(Duration::from_secs(20), "produces to be acknowledged", || {
        acked_count.load(Ordering::SeqCst) >= 40
    });
    assert!(!parked.is_finished(), "the long poll is still parked");

    let mut child = broker.child.take().unwrap();
    // SAFETY: signalling the child process we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    // Far below the parked fetch's two minutes: the grace period bounds shutdown.
    let status = wait_timeout(&mut child, Duration::from_millis(GRACE_MS) + Duration::from_secs(15));
    assert!(status.success(), "broker exited with {status:?}; log:\n{}", broker.log());
    let acked: Acked = producers.into_iter().flat_map(|h| h.join().unwrap()).collect();
    let parked_result = parked.join().unwrap();
    assert!(
        matches!(parked_result, None | Some(ErrorCode::None) | Some(ErrorCode::ShuttingDown)),
        "the parked fetch ends with a close, an empty answer or ShuttingDown: {parked_result:?}"
    );

    broker.restart();
    let mut reader = Conn::connect(&broker.addr);
    for p in 0..2u32 {
        let stored = reader.fetch_all("s", p, 0);
        assert!(stored.iter().enumerate().all(|(i, (o, _))| *o == i as i64), "dense offsets on s/{p}");
        for (_, base, values) in acked.iter().filter(|(ap, _, _)| *ap == p) {
            for (i, v) in values.iter().enumerate() {
                let offset = *base + i as i64;
                assert_eq!(
                    stored.get(offset as usize).map(|(_, v)| v),
                    Some(v),
                    "acknowledged s/{p}@{offset}"
                );
            }
        }
    }
    assert!(!broker.log().contains("panicked"));
    broker.stop();
}

#[test]
fn the_kafka_listener_can_be_disabled_and_bad_kafka_addresses_are_refused() {
    let broker = Broker::start(1, &["kafka_listen=off"]);
    assert_eq!(broker.kafka, "off", "the ready line says the Kafka listener is off");
    let mut conn = Conn::connect(&broker.addr);
    create_ok(&mut conn, "native-only", 1);

    let err = serve_fails(&["--kafka-listen", "127.0.0.1"], &[]);
    assert!(err.contains("kafka_listen"), "{err}");
    let err =
        serve_fails(&["--kafka-listen", "127.0.0.1:0", "--set", "kafka_advertised_listener=nohost"], &[]);
    assert!(err.contains("kafka_advertised_listener"), "{err}");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let err = serve_fails(&["--kafka-listen", &taken, "--set", "listen_wait_ms=200"], &[]);
    assert!(err.contains("kafka_listen") && err.contains(&taken), "{err}");
    assert!(err.contains(&format!("held by pid {}", std::process::id())), "names the holder: {err}");
}
