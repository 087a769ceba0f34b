//! Many partitions, end to end with real broker processes: a broker that cannot open its data
//! directory under its descriptor limit exits promptly with an error naming the limit and the way
//! out (never hangs); a partition holds the same descriptors whether just created or reopened;
//! creation refuses what the limit cannot hold, so whatever was accepted restarts under the same
//! limit; a cleanly stopped broker reopens its partitions without scanning them.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::wire::Conn;
use common::{limit_open_files, wait_timeout, Broker, BIN};
use ringlog::protocol::wire::ErrorCode;

/// Partitions of the internal `__consumer_offsets` topic every data directory has.
const OFFSETS_PARTITIONS: u64 = 8;

fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() as u64
}

fn create_ok(conn: &mut Conn, name: &str, partitions: u32) {
    let resp = conn.create_topic(name, partitions);
    assert_eq!(resp.root().error(), ErrorCode::None, "create {name}: {:?}", resp.root().message());
}

/// A data directory (in a temporary directory that lives as long as the returned guard) holding
/// one topic of `partitions` partitions, written by a broker with default limits and stopped
/// cleanly.
fn data_dir_with(partitions: u32) -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::Builder::new().prefix("ringlog-many").tempdir_in(common::test_root()).unwrap();
    let mut broker = Broker::start_in(tmp.path(), 2, &[]);
    let mut conn = Conn::connect(&broker.addr);
    create_ok(&mut conn, "wide", partitions);
    drop(conn);
    broker.stop();
    let data = broker.data_dir();
    (tmp, data)
}

/// Runs `ringlog serve` on `data` with RLIMIT_NOFILE `max` and `taken` descriptors already used;
/// asserts it exits non-zero within `within` and returns its stderr and how long it ran.
fn serve_must_fail(data: &Path, max: u64, taken: usize, within: Duration) -> (String, Duration) {
    let mut command = Command::new(BIN);
    command
        .args(["serve", "--data-dir", &data.display().to_string(), "--listen", "127.0.0.1:0"])
        .args(["--shard-port-base", "0", "--shards", "2", "--kafka-listen", "127.0.0.1:0"])
        .args(["--set", "free_space_reserve_bytes=1048576"])
        .env("RINGLOG_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    limit_open_files(&mut command, max, taken);
    let started = Instant::now();
    let mut child = command.spawn().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let status = wait_timeout(&mut child, within);
    let elapsed = started.elapsed();
    let text = reader.join().unwrap();
    assert!(!status.success(), "the broker started (or exited 0) under {max} descriptors:\n{text}");
    (text, elapsed)
}

/// The last line of a failed `serve`: the error `main` prints.
fn final_error(stderr: &str) -> &str {
    stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("ringlog: "))
        .unwrap_or_else(|| panic!("no error line:\n{stderr}"))
}

#[test]
fn a_data_directory_beyond_the_descriptor_limit_is_refused_at_once_naming_the_limit() {
    for partitions in [2u32, 10_000] {
        let (_tmp, data) = data_dir_with(partitions);
        // 2 partitions (+8 internal) do not fit 200 descriptors once the reserve is kept; 10,000
        // do not fit 4,096.
        let max = if partitions == 2 { 200 } else { 4_096 };
        let (stderr, elapsed) = serve_must_fail(&data, max, 0, Duration::from_secs(20));
        let error = final_error(&stderr);
        let total = u64::from(partitions) + OFFSETS_PARTITIONS;
        assert!(error.contains(&format!("{total} partitions need")), "{error}");
        assert!(error.contains(&format!("RLIMIT_NOFILE {max}")), "{error}");
        assert!(error.contains("LimitNOFILE"), "{error}");
        assert!(elapsed < Duration::from_secs(10), "took {elapsed:?} to refuse");
    }
}

#[test]
fn running_out_of_descriptors_while_opening_stops_the_broker_promptly() {
    // The budget lets 10,000 partitions in under 12,000 descriptors, but 5,000 of them are taken
    // before the broker starts (as another library or leaked files could): opening runs out for
    // real, on both shards, part way. This used to hang forever without a word.
    let (_tmp, data) = data_dir_with(10_000);
    let (stderr, elapsed) = serve_must_fail(&data, 12_000, 5_000, Duration::from_secs(60));
    let error = final_error(&stderr);
    assert!(error.contains("Too many open files"), "{error}");
    assert!(error.contains("ran out of file descriptors"), "{error}");
    assert!(error.contains("LimitNOFILE"), "{error}");
    assert!(error.contains("RLIMIT_NOFILE 12000"), "{error}");
    assert!(elapsed < Duration::from_secs(20), "took {elapsed:?} to stop");

    // Nothing was damaged: with its descriptors back, the broker opens every partition.
    let dir = data.parent().unwrap();
    let mut broker = Broker::start_in(dir, 2, &[]);
    let mut conn = Conn::connect(&broker.addr);
    let (error, base) = conn.produce("wide", 9_999, &[b"after"]);
    assert_eq!((error, base), (ErrorCode::None, 0));
    broker.stop();
}

#[test]
fn a_partition_holds_the_same_descriptors_created_written_and_reopened() {
    const PARTITIONS: u32 = 400;
    let mut broker = Broker::start(2, &[]);
    let pid = broker.child.as_ref().unwrap().id();
    let mut conn = Conn::connect(&broker.addr);
    let before = open_fds(pid);
    create_ok(&mut conn, "fds", PARTITIONS);
    let created = open_fds(pid) - before;
    for p in 0..PARTITIONS {
        assert_eq!(conn.produce("fds", p, &[format!("r{p}").as_bytes()]), (ErrorCode::None, 0));
    }
    // Let the background preallocations (each holds a duplicate descriptor) finish.
    std::thread::sleep(Duration::from_millis(500));
    let written = open_fds(pid) - before;
    drop(conn);
    broker.stop();

    broker.restart();
    let pid = broker.child.as_ref().unwrap().id();
    let mut conn = Conn::connect(&broker.addr);
    let reopened = open_fds(pid) - before;
    let per = u64::from(PARTITIONS);
    for (what, held) in [("created", created), ("written", written), ("reopened", reopened)] {
        assert!(
            held.abs_diff(per) <= 16,
            "{what}: {PARTITIONS} partitions hold {held} descriptors (created {created}, written {written}, \
             reopened {reopened})"
        );
    }
    for p in (0..PARTITIONS).step_by(37) {
        let fetched = conn.fetch("fds", p, 0, 0);
        assert_eq!(fetched.records, vec![(0, format!("r{p}").into_bytes())], "partition {p}");
    }
    // A clean restart reads only the last block of each active segment again (at most an index
    // interval and a batch: here one record each), never whole segments.
    let log = broker.log();
    assert!(log.contains("opened 2 topics"), "{log}");
    let scanned_bytes: u64 = log
        .lines()
        .filter_map(|l| l.split(" scanned (").nth(1)?.split(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(
        scanned_bytes <= u64::from(PARTITIONS + 8) * 8192,
        "a clean restart scanned {scanned_bytes} bytes for {PARTITIONS} one-record partitions:\n{log}"
    );
    drop(conn);
    broker.stop();
}

#[test]
fn creation_refuses_what_the_limit_cannot_reopen_and_what_it_accepted_restarts() {
    // 1,024 descriptors: 256 reserved, room for 768 partitions, 8 of them internal.
    let mut broker = Broker::start_limited(2, &[], 1_024);
    let mut conn = Conn::connect(&broker.addr);
    create_ok(&mut conn, "big", 700);
    let resp = conn.create_topic("over", 100);
    let message = resp.root().message().unwrap_or_default().to_string();
    assert_eq!(resp.root().error(), ErrorCode::ResourceExhausted, "{message}");
    assert!(message.contains("RLIMIT_NOFILE 1024"), "{message}");
    assert!(message.contains("room for 768"), "{message}");
    assert!(message.contains("LimitNOFILE"), "{message}");
    create_ok(&mut conn, "rest", 60);
    let resp = conn.create_topic("one-more", 1);
    assert_eq!(resp.root().error(), ErrorCode::ResourceExhausted, "the budget is full");
    assert_eq!(conn.produce("big", 699, &[b"kept"]), (ErrorCode::None, 0));
    assert_eq!(conn.produce("rest", 59, &[b"kept"]), (ErrorCode::None, 0));
    drop(conn);
    broker.stop();

    // The same limit reopens everything that was accepted.
    broker.restart();
    let mut conn = Conn::connect(&broker.addr);
    assert_eq!(conn.fetch("big", 699, 0, 0).records, vec![(0, b"kept".to_vec())]);
    assert_eq!(conn.fetch("rest", 59, 0, 0).records, vec![(0, b"kept".to_vec())]);
    assert_eq!(conn.create_topic("over", 1).root().error(), ErrorCode::ResourceExhausted);
    drop(conn);
    broker.stop();
}
