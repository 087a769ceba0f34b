//! Topic creation is all-or-nothing: when a shard cannot open its partitions (here: the broker
//! runs out of file descriptors for real), the topic is forgotten everywhere, its directory is
//! removed, the client gets the error, and the broker keeps serving. A topic beyond the
//! descriptor budget is refused before anything is opened.

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
    // 600 idle connections take more descriptors than the budget reserves for everything but
    // partitions, so a topic the budget admits can still run out of descriptors for real.
    let before = open_fds(pid);
    let idle: Vec<std::net::TcpStream> =
        (0..600).map(|_| std::net::TcpStream::connect(&broker.addr).unwrap()).collect();
    // Each connection costs the broker more than one descriptor (the socket and the writer's
    // dup): wait until it has set all of them up, i.e. until its count stops growing.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut last = 0;
    loop {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let now = open_fds(pid);
        if now >= before + 600 && now == last {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the broker did not accept the idle connections");
        last = now;
    }
    // 200 descriptors left: room for the small topic below, not for 400 partitions, which the
    // budget (limit less 256 reserved, 1 per partition) admits.
    limit_open_files(pid, open_fds(pid) + 200);

    let out = broker.cli(&["topic", "create", "huge", "--partitions", "400"], None);
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

    // The budget refuses at once what the limit cannot hold, before opening anything.
    let out = broker.cli(&["topic", "create", "giant", "--partitions", "2000"], None);
    assert!(!out.status.success(), "a topic beyond the descriptor budget was created: {}", out.stdout);
    assert!(out.stderr.contains("descriptor budget"), "{}", out.stderr);
    assert!(out.stderr.contains("ResourceExhausted"), "{}", out.stderr);
    assert!(!broker.data_dir().join("topics").join("giant").exists());
    drop(idle);

    // After a restart with its normal limit, the failed topic stays gone.
    broker.stop();
    broker.restart();
    let listed = broker.cli(&["topic", "list"], None).ok();
    assert!(!listed.lines().any(|l| l.split_whitespace().next() == Some("huge")), "{listed}");
    assert!(listed.lines().any(|l| l.split_whitespace().next() == Some("small")), "{listed}");
    broker.cli(&["topic", "create", "huge", "--partitions", "8"], None).ok();
    broker.stop();
}
