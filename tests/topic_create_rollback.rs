//! Topic creation is all-or-nothing: when a shard cannot open its partitions (here: the broker
//! runs out of file descriptors for real), the topic is forgotten everywhere, its directory is
//! removed, the client gets the error, and the broker keeps serving.

mod common;

use common::Broker;

/// Open descriptors of process `pid`.
fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() as u64
}

/// Sets both the soft and the hard RLIMIT_NOFILE of the running process `pid`.
fn limit_open_files(pid: u32, max: u64) {
    let limit = libc::rlimit { rlim_cur: max, rlim_max: max };
    // SAFETY: prlimit reads the struct we pass and writes nothing (old limit pointer is null).
    let rc = unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

#[test]
fn topic_that_runs_out_of_descriptors_is_rolled_back_and_the_broker_keeps_serving() {
    let mut broker = Broker::start(2, &[]);
    let pid = broker.child.as_ref().unwrap().id();
    assert!(broker.log().contains("RLIMIT_NOFILE soft limit"), "start-up logs the descriptor limit");
    // Room for the small topic below and connections, far from enough for 2,000 partitions
    // (each takes about 1.5 descriptors).
    limit_open_files(pid, open_fds(pid) + 200);

    let out = broker.cli(&["topic", "create", "huge", "--partitions", "2000"], None);
    assert!(!out.status.success(), "a topic beyond the descriptor limit was created: {}", out.stdout);
    assert!(out.stderr.contains("rolled back"), "{}", out.stderr);
    assert!(out.stderr.contains("Too many open files"), "{}", out.stderr);
    assert!(out.stderr.contains("ResourceExhausted"), "{}", out.stderr);

    let listed = broker.cli(&["topic", "list"], None).ok();
    assert!(!listed.lines().any(|l| l.split_whitespace().next() == Some("huge")), "{listed}");
    let dir = broker.data_dir().join("topics").join("huge");
    assert!(!dir.exists(), "{} survived the rollback", dir.display());
    assert!(broker.log().contains("rolling back"), "the rollback is logged");

    // The name is free again and the broker still creates and serves topics.
    let out = broker.cli(&["topic", "create", "small", "--partitions", "4"], None).ok();
    assert!(out.contains("small"), "{out}");
    let lines: String = (0..100).map(|i| format!("k{i}:v{i}\n")).collect();
    broker.cli(&["produce", "small", "--key-separator", ":"], Some(lines.as_bytes())).ok();
    let consumed = broker.cli(&["consume", "small", "--from", "beginning"], None).ok();
    let mut values: Vec<&str> = consumed.lines().collect();
    values.sort_unstable();
    let mut expected: Vec<String> = (0..100).map(|i| format!("v{i}")).collect();
    expected.sort_unstable();
    assert_eq!(values, expected);

    // After a restart with its normal limit, the failed topic stays gone.
    broker.stop();
    broker.restart();
    let listed = broker.cli(&["topic", "list"], None).ok();
    assert!(!listed.lines().any(|l| l.split_whitespace().next() == Some("huge")), "{listed}");
    assert!(listed.lines().any(|l| l.split_whitespace().next() == Some("small")), "{listed}");
    broker.cli(&["topic", "create", "huge", "--partitions", "8"], None).ok();
    broker.stop();
}
