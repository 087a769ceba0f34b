//! Topic creation is all-or-nothing: when a shard cannot open one of its partitions (here: a
//! file stands where the partition's directory must go), the topic is forgotten everywhere, its
//! directory is removed, the client gets the error, and the broker keeps serving. Running out of
//! descriptors no longer fails a creation: a new partition holds its file only while creating
//! it, so with a handful to spare (far fewer than its partitions) the topic is created. A topic beyond
//! `partitions_per_shard_max` is refused before anything is opened.

mod common;

use common::Broker;

/// Open descriptors of process `pid`.
fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() as u64
}

/// Sets the soft RLIMIT_NOFILE of the running process `pid`, keeping its hard limit (so it can be
/// raised again without privileges).
fn limit_open_files(pid: u32, max: u64) {
    let mut current = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: prlimit with a null new limit only writes the current one into the struct we own.
    let rc =
        unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_NOFILE, std::ptr::null(), &mut current) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let limit = libc::rlimit { rlim_cur: max.min(current.rlim_max), rlim_max: current.rlim_max };
    // SAFETY: prlimit reads the struct we pass and writes nothing (old limit pointer is null).
    let rc = unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

#[test]
fn a_topic_that_cannot_be_opened_is_rolled_back_and_one_without_spare_descriptors_is_created() {
    let mut broker = Broker::start(2, &["partitions_per_shard_max=1000"]);
    let pid = broker.child.as_ref().unwrap().id();
    assert!(broker.log().contains("RLIMIT_NOFILE soft limit"), "start-up logs the descriptor limit");
    // Idle partitions hold no descriptor (a new one opens its file only to create it): with room
    // for the CLI's connection and a few descriptors the broker opens in passing (the blocking
    // pool's files, a housekeeping pass), far fewer than the 400 partitions, they are created.
    limit_open_files(pid, open_fds(pid) + 16);
    let out = broker.cli(&["topic", "create", "wide", "--partitions", "400"], None).ok();
    assert!(out.contains("wide"), "{out}");
    limit_open_files(pid, u64::MAX);

    // Partition 123's directory cannot be created: the whole topic is rolled back.
    let topic_dir = broker.data_dir().join("topics").join("huge");
    std::fs::create_dir_all(&topic_dir).unwrap();
    std::fs::write(topic_dir.join("123"), b"in the way").unwrap();
    let out = broker.cli(&["topic", "create", "huge", "--partitions", "400"], None);
    assert!(!out.status.success(), "a topic whose partition cannot be opened was created: {}", out.stdout);
    assert!(out.stderr.contains("rolled back"), "{}", out.stderr);
    assert!(out.stderr.contains("partition 123"), "{}", out.stderr);

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

    // `partitions_per_shard_max` refuses at once what it does not allow, before opening anything.
    let out = broker.cli(&["topic", "create", "giant", "--partitions", "2000"], None);
    assert!(!out.status.success(), "a topic beyond partitions_per_shard_max was created: {}", out.stdout);
    assert!(out.stderr.contains("partitions_per_shard_max 1000"), "{}", out.stderr);
    assert!(out.stderr.contains("ResourceExhausted"), "{}", out.stderr);
    assert!(!broker.data_dir().join("topics").join("giant").exists());

    // After a restart with its normal limit, the failed topic stays gone.
    broker.stop();
    broker.restart();
    let listed = broker.cli(&["topic", "list"], None).ok();
    assert!(!listed.lines().any(|l| l.split_whitespace().next() == Some("huge")), "{listed}");
    assert!(listed.lines().any(|l| l.split_whitespace().next() == Some("small")), "{listed}");
    broker.cli(&["topic", "create", "huge", "--partitions", "8"], None).ok();
    broker.stop();
}
