//! End-to-end on a real, small filesystem: below the free-space reserve, produce gets StorageFull
//! (raw protocol and CLI) while fetch, topic deletion and retention keep working; no partial batch
//! is left behind; produce resumes by itself once space is freed. A SyncGroup whose group record
//! cannot be stored fails for every member of that sync, and the group rebalances.
//!
//! Needs root: the test formats a 64 MiB ext4 image and loop-mounts it as the data directory.

mod common;

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::kafka::{s, KafkaConn};
use common::wire::{batch_at, produce_outcome, Conn};
use common::Broker;
use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
use kafka_protocol::messages::{
    DescribeGroupsRequest, GroupId, HeartbeatRequest, JoinGroupRequest, JoinGroupResponse, SyncGroupRequest,
};
use kafka_protocol::ResponseError as E;
use ringlog::protocol::wire::{self, ErrorCode};

const FS_BYTES: u64 = 64 << 20;
const RESERVE_BYTES: u64 = 16 << 20;

/// A loop-mounted ext4 filesystem at `<dir>/data`, unmounted (and its image removed) on drop,
/// also when the test panics.
struct LoopFs {
    dir: tempfile::TempDir,
    mount_point: PathBuf,
    mounted: bool,
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?}: {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl LoopFs {
    fn new() -> LoopFs {
        let dir =
            tempfile::Builder::new().prefix("ringlog-diskfull").tempdir_in(common::test_root()).unwrap();
        let image = dir.path().join("fs.img");
        let mount_point = dir.path().join("data");
        std::fs::create_dir(&mount_point).unwrap();
        std::fs::File::create(&image).unwrap().set_len(FS_BYTES).unwrap();
        let mut fs = LoopFs { dir, mount_point, mounted: false };
        run(Command::new("mkfs.ext4").args(["-q", "-F", "-b", "4096", "-m", "0"]).arg(&image))
            .unwrap_or_else(|e| panic!("disk_full tests need mkfs.ext4: {e}"));
        run(Command::new("mount").args(["-o", "loop"]).arg(&image).arg(&fs.mount_point)).unwrap_or_else(
            |e| {
                panic!(
                    "disk_full tests must run as root to loop-mount a small filesystem (uid {}): {e}",
                    // SAFETY: getuid has no preconditions.
                    unsafe { libc::getuid() }
                )
            },
        );
        fs.mounted = true;
        fs
    }

    /// Allocates filler until the filesystem refuses even one more block; returns its path.
    fn fill_completely(&self) -> PathBuf {
        let path = self.mount_point.join("filler");
        let file = std::fs::File::create(&path).unwrap();
        let mut offset = 0i64;
        for chunk in [1i64 << 20, 4096] {
            // SAFETY: fallocate on a descriptor we own; no memory is passed.
            while unsafe { libc::fallocate(file.as_raw_fd(), 0, offset, chunk) } == 0 {
                offset += chunk;
            }
            let e = std::io::Error::last_os_error();
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "fallocate filler: {e}");
        }
        file.sync_all().unwrap();
        path
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Bytes available to unprivileged users, as the broker's free-space monitor reads it.
    fn free_bytes(&self) -> u64 {
        let path = CString::new(self.mount_point.as_os_str().as_bytes()).unwrap();
        // SAFETY: an all-zero statvfs is a valid out-parameter; path is NUL-terminated.
        let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(path.as_ptr(), &mut stat) }, 0);
        stat.f_bavail as u64 * stat.f_frsize as u64
    }

    /// Allocates a filler file leaving half the reserve free; returns its path.
    fn fill_below_reserve(&self) -> PathBuf {
        let path = self.mount_point.join("filler");
        let file = std::fs::File::create(&path).unwrap();
        let len = self.free_bytes() - RESERVE_BYTES / 2;
        // SAFETY: fallocate on a descriptor we own; no memory is passed.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
        assert_eq!(rc, 0, "fallocate filler: {}", std::io::Error::last_os_error());
        file.sync_all().unwrap();
        assert!(self.free_bytes() < RESERVE_BYTES);
        path
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if self.mounted && run(Command::new("umount").arg(&self.mount_point)).is_err() {
            // Still busy (a broker that refused to die): detach it so the image can go.
            let _ = run(Command::new("umount").arg("-l").arg(&self.mount_point));
        }
    }
}

fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// The producer's view of `events`/0: every acknowledged record, in offset order.
struct Ledger {
    acked: Vec<(i64, Vec<u8>)>,
    attempt: u32,
}

impl Ledger {
    /// Produces one 3-record batch; records it if acknowledged. Returns the error and message.
    fn produce(&mut self, conn: &mut Conn) -> (ErrorCode, String) {
        self.attempt += 1;
        let values: Vec<Vec<u8>> = (0..3).map(|r| format!("a{}-{r}", self.attempt).into_bytes()).collect();
        let refs: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
        let resp = conn.produce_raw("events", 0, &batch_at(now_ms(), &refs)).expect("produce response");
        let (err, base, message) = produce_outcome(&resp);
        match err {
            ErrorCode::None => {
                assert_eq!(base, self.acked.len() as i64, "offsets stay dense");
                self.acked.extend(values.into_iter().enumerate().map(|(i, v)| (base + i as i64, v)));
            }
            ErrorCode::StorageFull => {}
            other => panic!("produce failed with {other:?}: {message}"),
        }
        (err, message)
    }
}

#[test]
fn below_the_free_space_reserve_produce_is_refused_and_resumes_once_space_is_freed() {
    let fs = LoopFs::new();
    // Declared after `fs`, so it is stopped (or killed) before the filesystem is unmounted.
    let mut broker = Broker::start_in(
        fs.root(),
        1,
        &[
            &format!("free_space_reserve_bytes={RESERVE_BYTES}"),
            "default_retention_ms=-1",
            "default_segment_bytes=1048576",
            "batch_bytes_max=65536",
            "housekeeping_interval_ms=200",
        ],
    );
    let mut conn = Conn::connect(&broker.addr);
    for (name, retention_ms) in [("events", None), ("doomed", None), ("aging", Some(1500))] {
        let config = wire::TopicConfigArgs { retention_ms, segment_bytes: Some(65536), ..Default::default() };
        let resp = conn.create_topic_with(name, 1, config);
        assert_eq!(resp.root().error(), ErrorCode::None, "{name}: {:?}", resp.root().message());
    }
    let mut ledger = Ledger { acked: Vec::new(), attempt: 0 };
    for _ in 0..20 {
        assert_eq!(ledger.produce(&mut conn).0, ErrorCode::None);
    }
    assert_eq!(conn.produce("doomed", 0, &[b"bye"]).0, ErrorCode::None);

    // `aging` expires 1.5 s after its records' timestamp. The disk must be found full before that
    // for the retention check below to mean something; on a slow machine, free it and try again.
    let mut filler;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let resp = conn.produce_raw("aging", 0, &batch_at(now_ms(), &[b"old news"])).unwrap();
        assert_eq!(produce_outcome(&resp).0, ErrorCode::None);
        filler = fs.fill_below_reserve();
        let mut refusal = String::new();
        wait_until(Duration::from_secs(10), "produce to be refused with StorageFull", || {
            let (err, message) = ledger.produce(&mut conn);
            refusal = message;
            err == ErrorCode::StorageFull
        });
        assert!(
            refusal.contains("free") && refusal.contains(&RESERVE_BYTES.to_string()),
            "the refusal says why: {refusal}"
        );
        let (aging_start, aging_end) = conn.offsets("aging", 0);
        if aging_start < aging_end {
            break;
        }
        assert!(attempts < 3, "retention always ran before the disk was found full");
        std::fs::remove_file(&filler).unwrap();
        wait_until(Duration::from_secs(10), "produce to resume", || {
            ledger.produce(&mut conn).0 == ErrorCode::None
        });
    }

    // Still refused, every time, and the same through the CLI: one clear line, non-zero exit.
    for _ in 0..5 {
        assert_eq!(ledger.produce(&mut conn).0, ErrorCode::StorageFull);
    }
    let out = broker.cli(&["produce", "events", "--partition", "0"], Some(b"from-cli\n"));
    assert!(!out.status.success(), "CLI produce on a full disk must fail: {}", out.stdout);
    assert_eq!(out.stderr.trim().lines().count(), 1, "one line: {}", out.stderr);
    assert!(out.stderr.contains("StorageFull") && out.stderr.contains("free"), "{}", out.stderr);

    // Reads, deletion and retention do not need free space.
    assert_eq!(conn.fetch_all("events", 0, 0), ledger.acked, "fetch on a full disk");
    let resp = conn.delete_topic("doomed");
    assert_eq!(resp.root().error(), ErrorCode::None, "delete on a full disk: {:?}", resp.root().message());
    assert_eq!(conn.fetch("doomed", 0, 0, 0).error, ErrorCode::UnknownTopicOrPartition);
    wait_until(Duration::from_secs(15), "retention to delete `aging`'s expired segment", || {
        let (start, end) = conn.offsets("aging", 0);
        start == end && end > 0
    });
    assert_eq!(ledger.produce(&mut conn).0, ErrorCode::StorageFull, "still full after retention");

    // Free the space: produce resumes without a restart.
    std::fs::remove_file(&filler).unwrap();
    wait_until(Duration::from_secs(10), "produce to resume", || {
        ledger.produce(&mut conn).0 == ErrorCode::None
    });
    for _ in 0..5 {
        assert_eq!(ledger.produce(&mut conn).0, ErrorCode::None);
    }
    broker.cli(&["produce", "events", "--partition", "0"], Some(b"from-cli\n")).ok();
    ledger.acked.push((ledger.acked.len() as i64, b"from-cli".to_vec()));

    // Exactly the acknowledged records, dense, nothing from the refused attempts; also after a
    // restart, which re-reads every batch from disk.
    assert_eq!(conn.fetch_all("events", 0, 0), ledger.acked);
    broker.stop();
    broker.restart();
    let mut conn = Conn::connect(&broker.addr);
    let stored = conn.fetch_all("events", 0, 0);
    assert_eq!(stored.len(), ledger.acked.len());
    assert!(stored == ledger.acked, "after restart the log holds exactly the acknowledged records");
    let log = broker.log();
    assert!(!log.contains("panicked") && !log.contains("truncat"), "no torn batch was recovered:\n{log}");
    broker.stop();
}

#[test]
fn with_no_reserve_a_completely_full_disk_refuses_produce_without_a_partial_batch() {
    let fs = LoopFs::new();
    let mut broker = Broker::start_in(
        fs.root(),
        1,
        &["free_space_reserve_bytes=0", "default_retention_ms=-1", "batch_bytes_max=65536"],
    );
    let mut conn = Conn::connect(&broker.addr);
    let config = wire::TopicConfigArgs { segment_bytes: Some(65536), ..Default::default() };
    assert_eq!(conn.create_topic_with("events", 1, config).root().error(), ErrorCode::None);
    let mut ledger = Ledger { acked: Vec::new(), attempt: 0 };
    for _ in 0..10 {
        assert_eq!(ledger.produce(&mut conn).0, ErrorCode::None);
    }
    let filler = fs.fill_completely();
    // The active segment was preallocated, so appends into it may still succeed; the segment
    // after it cannot be allocated. Every 3-record batch is ~100 bytes: 64 KiB takes < 1000.
    let mut refusal = None;
    for _ in 0..2000 {
        let (err, message) = ledger.produce(&mut conn);
        if err != ErrorCode::None {
            refusal = Some(message);
            break;
        }
    }
    let refusal = refusal.expect("produce was refused once the preallocated segment was used up");
    assert!(refusal.contains("free"), "{refusal}");
    assert_eq!(conn.fetch_all("events", 0, 0), ledger.acked, "fetch on a full disk");
    std::fs::remove_file(&filler).unwrap();
    wait_until(Duration::from_secs(10), "produce to resume", || {
        ledger.produce(&mut conn).0 == ErrorCode::None
    });
    assert_eq!(conn.fetch_all("events", 0, 0), ledger.acked);
    broker.stop();
    broker.restart();
    let mut conn = Conn::connect(&broker.addr);
    let stored = conn.fetch_all("events", 0, 0);
    assert!(stored == ledger.acked, "after restart the log holds exactly the acknowledged records");
    assert!(!broker.log().contains("panicked"));
    broker.stop();
}

/// Nodes 1 and 2 with directories of their own and node 3 on `fs`, each with `extra` and node 3
/// also with `extra_3`, once every node knows the controller's leader. The directories live as
/// long as the first value.
fn three_with_node_3_on(
    fs: &LoopFs,
    extra: &[String],
    extra_3: &[String],
) -> (Vec<tempfile::TempDir>, Vec<Broker>) {
    let ports = common::cluster::free_ports(3);
    let seeds = common::cluster::seeds(&ports);
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes: Vec<Broker> = (0..2)
        .map(|i| common::cluster::start_node_with(dirs[i].path(), i as u64 + 1, &seeds, extra))
        .collect();
    let node_3: Vec<String> = extra.iter().chain(extra_3).cloned().collect();
    nodes.push(common::cluster::start_node_with(fs.root(), 3, &seeds, &node_3));
    let all: Vec<&Broker> = nodes.iter().collect();
    common::cluster::wait_for("a controller leader known to every node", &all, || {
        common::cluster::agreed_leader(&all, 3)
    });
    (dirs, nodes)
}

/// Issue 11: on a three-node cluster, one node's disk falls below its free-space reserve. Its
/// replicas stop as writes reach them (shown in `/v1/cluster` and `cluster status`) and leave
/// the in-sync replicas, while the other two keep acknowledging `acks=all` writes. Once space is
/// freed they reopen from their files by themselves, catch up and are in sync again; the node
/// leads its preferred partition again, and every acknowledged record reads back.
#[test]
fn a_replica_stopped_by_a_full_disk_reopens_once_space_is_back_and_catches_up() {
    const TOPIC: &str = "likes";
    let fs = LoopFs::new();
    let extra: Vec<String> = [
        "replica_lag_time_max_ms=2000",
        "offsets_topic_partitions=1",
        "leader_balance_interval_ms=1000",
        "housekeeping_interval_ms=200",
        "default_segment_bytes=1048576",
        "batch_bytes_max=65536",
    ]
    .map(String::from)
    .to_vec();
    let reserve = [format!("free_space_reserve_bytes={RESERVE_BYTES}")];
    let (_dirs, mut nodes) = three_with_node_3_on(&fs, &extra, &reserve);
    let all: Vec<&Broker> = nodes.iter().collect();
    common::cluster::create_replicated(&nodes[0], TOPIC, 3, 3);
    let in_sync = |node: &Broker, expected: &[u64]| {
        let described = common::cluster::describe(node, TOPIC)?;
        let good = described.len() == 3
            && described
                .iter()
                .all(|(leader, isr, _)| leader.is_some_and(|l| expected.contains(&l)) && isr == expected);
        good.then_some(())
    };
    common::cluster::wait_for("every replica in sync", &all, || in_sync(&nodes[0], &[1, 2, 3]));

    // Through node 1, retrying what is not acknowledged (a leader on node 3 stops mid-write).
    let produce = |from: usize, to: usize| {
        let lines: String = (from..to).map(|i| format!("like-{i}\n")).collect();
        common::cluster::wait_for("the records to be acknowledged", &all, || {
            let out =
                common::run_cli(&nodes[0].addr, &["produce", TOPIC, "--acks", "all"], Some(lines.as_bytes()));
            out.status.success().then_some(())
        });
    };
    produce(0, 100);
    let filler = fs.fill_below_reserve();
    // Node 3 reads its free space every 200 ms: the writes that reach it before then still land.
    let stopped = |node: &Broker| common::cluster::status(node)?["stopped_replicas"].as_u64();
    let mut written = 100;
    common::cluster::wait_for("node 3's replicas of the topic to stop", &all, || {
        produce(written, written + 10);
        written += 10;
        (stopped(&nodes[2])? >= 3).then_some(())
    });
    let status =
        common::run_cli(&nodes[2].addr, &["cluster", "status", "--admin", &nodes[2].admin], None).ok();
    assert!(status.contains("replicas stopped on a storage error on this node"), "{status}");
    let survivors: Vec<&Broker> = nodes[..2].iter().collect();
    common::cluster::wait_for("the in-sync replicas to shrink", &survivors, || in_sync(&nodes[0], &[1, 2]));
    produce(written, written + 100);
    written += 100;
    assert!(stopped(&nodes[2]).is_some_and(|n| n >= 3), "no reopen while the disk stays full");

    std::fs::remove_file(&filler).unwrap();
    common::cluster::wait_for("node 3's replicas to reopen and catch up", &all, || {
        (stopped(&nodes[2])? == 0).then_some(())?;
        in_sync(&nodes[0], &[1, 2, 3])?;
        in_sync(&nodes[2], &[1, 2, 3])
    });
    common::cluster::wait_for("node 3 to lead a partition again", &all, || {
        common::cluster::describe(&nodes[0], TOPIC)?
            .iter()
            .any(|(leader, _, _)| *leader == Some(3))
            .then_some(())
    });
    assert!(nodes[2].log().contains("replica reopened"), "{}", nodes[2].log());
    let read = common::run_cli(&nodes[2].addr, &["consume", TOPIC, "--from", "beginning"], None).ok();
    let mut read: Vec<&str> = read.lines().collect();
    read.sort_unstable();
    read.dedup();
    assert_eq!(read.len(), written, "every acknowledged record, once");
    for node in &mut nodes {
        node.stop();
    }
}

/// Issue 11: a node whose controller log can no longer be written (its disk full to the last
/// block) stops taking part in the controller group. A topic change sent to it is refused at once
/// with the reason and what to do, not left to end as "the cluster is still forming" or a
/// timeout; the other two nodes keep taking changes.
#[test]
fn a_node_whose_controller_log_failed_refuses_topic_changes_with_the_reason() {
    let fs = LoopFs::new();
    let (_dirs, nodes) = three_with_node_3_on(&fs, &["offsets_topic_partitions=1".to_string()], &[]);
    let all: Vec<&Broker> = nodes.iter().collect();
    let _filler = fs.fill_completely();

    // Each change through node 1 is appended to every node's controller log: node 3's append
    // fails. Two copies, so a change commits whichever node led the controller.
    let mut created = 0;
    let failure = common::cluster::wait_for("node 3's controller group to fail", &all, || {
        let name = format!("trigger-{created}");
        let out = common::run_cli(
            &nodes[0].addr,
            &["topic", "create", &name, "--partitions", "1", "--replication-factor", "2"],
            None,
        );
        if out.status.success() {
            created += 1;
        }
        common::cluster::status(&nodes[2])?["failure"].as_str().map(str::to_owned)
    });
    assert!(failure.contains("controller"), "{failure}");

    let out = common::run_cli(
        &nodes[2].addr,
        &["topic", "create", "refused", "--partitions", "1", "--replication-factor", "3"],
        None,
    );
    assert!(!out.status.success(), "node 3 took a topic change: {}", out.stdout);
    assert!(
        out.stderr.contains("node 3's controller group") && out.stderr.contains("no longer takes part"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("still forming"), "{}", out.stderr);
    // Through node 1 the cluster still changes.
    common::cluster::wait_for("a topic created through node 1", &all, || {
        let out = common::run_cli(
            &nodes[0].addr,
            &["topic", "create", "after", "--partitions", "1", "--replication-factor", "2"],
            None,
        );
        (out.status.success() || out.stderr.contains("already exists")).then_some(())
    });
}

/// Issue 11: a node that cannot open its replicas of a new topic (here its `replicated/`
/// directory made immutable, so their directories cannot be created) leaves them out, and the
/// other two serve the topic; once the directory can be written again the node opens them by
/// itself, catches up and is back in the in-sync replicas, with no restart.
#[test]
fn replicas_that_could_not_open_are_opened_once_their_files_can_be_made() {
    const TOPIC: &str = "late";
    let fs = LoopFs::new();
    let extra: Vec<String> =
        ["replica_lag_time_max_ms=2000", "offsets_topic_partitions=1"].map(String::from).to_vec();
    let (_dirs, mut nodes) = three_with_node_3_on(&fs, &extra, &[]);
    let all: Vec<&Broker> = nodes.iter().collect();
    // Node 3 has opened its replica of `__consumer_offsets`, whose directory must stay writable.
    let replicated = fs.mount_point.join("replicated");
    common::cluster::wait_for("node 3's replica of the offsets topic", &all, || {
        let mut entries = std::fs::read_dir(&replicated).ok()?;
        entries
            .any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("__consumer_offsets.")))
            .then_some(())
    });
    run(Command::new("chattr").arg("+i").arg(&replicated)).unwrap_or_else(|e| panic!("chattr +i: {e}"));
    common::cluster::create_replicated(&nodes[0], TOPIC, 2, 3);
    let in_sync = |node: &Broker, expected: &[u64]| {
        let described = common::cluster::describe(node, TOPIC)?;
        let good = described.len() == 2
            && described.iter().all(|(leader, isr, _)| leader.is_some() && isr == expected);
        good.then_some(())
    };
    common::cluster::wait_for("nodes 1 and 2 to serve the topic without node 3", &all, || {
        in_sync(&nodes[0], &[1, 2])?;
        nodes[2].log().contains("cannot open this node's replica").then_some(())
    });
    let lines: String = (0..50).map(|i| format!("late-{i}\n")).collect();
    let out = common::run_cli(&nodes[0].addr, &["produce", TOPIC, "--acks", "all"], Some(lines.as_bytes()));
    assert!(out.status.success(), "acks=all without node 3: {}", out.stderr);

    run(Command::new("chattr").arg("-i").arg(&replicated)).unwrap_or_else(|e| panic!("chattr -i: {e}"));
    common::cluster::wait_for("node 3's replicas to open and catch up", &all, || {
        in_sync(&nodes[0], &[1, 2, 3])?;
        in_sync(&nodes[2], &[1, 2, 3])
    });
    assert!(nodes[2].log().contains("replica reopened"), "{}", nodes[2].log());
    for node in &mut nodes {
        node.stop();
    }
}

/// Issue 11: as Kafka's coordinator, ours answers SyncGroup only once the group's record holding
/// the new assignment is stored in `__consumer_offsets`. Here the disk is below its free-space
/// reserve when the leader syncs, so the record cannot be written: the leader and the member
/// parked in SyncGroup both get COORDINATOR_NOT_AVAILABLE (never an assignment that a restart
/// would not know), and the group rebalances. Once space is back the members rejoin, and the next
/// generation is stored, answered, and still there after a restart.
#[test]
fn a_sync_whose_group_record_cannot_be_stored_fails_for_every_member_and_the_group_rebalances() {
    let fs = LoopFs::new();
    let mut broker = Broker::start_in(
        fs.root(),
        1,
        &[&format!("free_space_reserve_bytes={RESERVE_BYTES}"), "housekeeping_interval_ms=200"],
    );
    let mut conn = Conn::connect(&broker.addr);
    assert_eq!(conn.create_topic("events", 1).root().error(), ErrorCode::None);
    let name = GroupId(s("unstored"));
    let join = |member_id: &str| {
        JoinGroupRequest::default()
            .with_group_id(name.clone())
            .with_session_timeout_ms(30_000)
            .with_rebalance_timeout_ms(30_000)
            .with_member_id(s(member_id))
            .with_protocol_type(s("consumer"))
            .with_protocols(vec![JoinGroupRequestProtocol::default()
                .with_name(s("range"))
                .with_metadata(Bytes::from_static(b"subscription"))])
    };
    // Both join within the initial rebalance delay (300 ms): one generation, one leader.
    let join_both = |conns: &mut [KafkaConn; 2], ids: [&str; 2]| -> [JoinGroupResponse; 2] {
        let cids = [conns[0].send(3, &join(ids[0])), conns[1].send(3, &join(ids[1]))];
        [0, 1].map(|i| {
            let resp = conns[i].recv::<JoinGroupRequest>(3, cids[i]).expect("JoinGroup answered");
            assert_eq!(resp.error_code, 0, "JoinGroup: {resp:?}");
            resp
        })
    };
    let mut conns = [KafkaConn::connect(&broker.kafka), KafkaConn::connect(&broker.kafka)];
    let joined = join_both(&mut conns, ["", ""]);
    let generation = joined[0].generation_id;
    let ids = joined.clone().map(|r| r.member_id.to_string());
    let leader = ids.iter().position(|id| *id == joined[0].leader.as_str()).expect("a member leads");
    let follower = 1 - leader;
    let sync = |member: usize, generation: i32, assign: bool| {
        let assignments = if assign {
            ids.iter()
                .map(|id| {
                    SyncGroupRequestAssignment::default()
                        .with_member_id(s(id))
                        .with_assignment(Bytes::from(format!("partitions of {id}")))
                })
                .collect()
        } else {
            Vec::new()
        };
        SyncGroupRequest::default()
            .with_group_id(name.clone())
            .with_generation_id(generation)
            .with_member_id(s(&ids[member]))
            .with_assignments(assignments)
    };

    let filler = fs.fill_below_reserve();
    wait_until(Duration::from_secs(10), "produce to be refused with StorageFull", || {
        conn.produce("events", 0, &[b"x"]).0 == ErrorCode::StorageFull
    });
    // The follower's SyncGroup parks until the leader's; give it time to arrive first.
    let parked = conns[follower].send(2, &sync(follower, generation, false));
    std::thread::sleep(Duration::from_millis(500));
    let resp = conns[leader].call(2, &sync(leader, generation, true));
    assert_eq!(resp.error_code, E::CoordinatorNotAvailable.code(), "the leader's SyncGroup: {resp:?}");
    let resp = conns[follower].recv::<SyncGroupRequest>(2, parked).expect("SyncGroup answered");
    assert_eq!(resp.error_code, E::CoordinatorNotAvailable.code(), "the parked SyncGroup: {resp:?}");
    assert!(resp.assignment.is_empty(), "{resp:?}");
    let describe = DescribeGroupsRequest::default().with_groups(vec![name.clone()]);
    let described = conns[leader].call(5, &describe);
    let g = &described.groups[0];
    assert_eq!((g.group_state.as_str(), g.members.len()), ("PreparingRebalance", 2), "{described:?}");
    assert!(
        g.members.iter().all(|m| m.member_assignment.is_empty()),
        "no unstored assignment: {described:?}"
    );
    let heartbeat = |member: usize, generation: i32| {
        HeartbeatRequest::default()
            .with_group_id(name.clone())
            .with_generation_id(generation)
            .with_member_id(s(&ids[member]))
    };
    let resp = conns[follower].call(2, &heartbeat(follower, generation));
    assert_eq!(resp.error_code, E::RebalanceInProgress.code(), "{resp:?}");
    let log = broker.log();
    assert!(log.contains(&format!("the assignment of generation {generation} was not stored")), "{log}");

    // Space is back: the members rejoin with their ids and the next generation completes.
    std::fs::remove_file(&filler).unwrap();
    wait_until(Duration::from_secs(10), "produce to resume", || {
        conn.produce("events", 0, &[b"x"]).0 == ErrorCode::None
    });
    let rejoined = join_both(&mut conns, [&ids[0], &ids[1]]);
    let next = rejoined[0].generation_id;
    assert_eq!((next, rejoined[1].generation_id), (generation + 1, generation + 1));
    let leader = ids.iter().position(|id| *id == rejoined[0].leader.as_str()).expect("a member leads");
    let follower = 1 - leader;
    let parked = conns[follower].send(2, &sync(follower, next, false));
    std::thread::sleep(Duration::from_millis(500));
    let resp = conns[leader].call(2, &sync(leader, next, true));
    assert_eq!(resp.error_code, 0, "{resp:?}");
    assert_eq!(resp.assignment, Bytes::from(format!("partitions of {}", ids[leader])));
    let resp = conns[follower].recv::<SyncGroupRequest>(2, parked).expect("SyncGroup answered");
    assert_eq!(resp.error_code, 0, "{resp:?}");
    assert_eq!(resp.assignment, Bytes::from(format!("partitions of {}", ids[follower])));

    // Answered once stored: after a restart the members carry on in that generation.
    broker.stop();
    broker.restart();
    let mut conn = KafkaConn::connect(&broker.kafka);
    for member in [leader, follower] {
        assert_eq!(conn.call(2, &heartbeat(member, next)).error_code, 0, "member {}", ids[member]);
    }
    let described = conn.call(5, &describe);
    let g = &described.groups[0];
    assert_eq!((g.group_state.as_str(), g.members.len()), ("Stable", 2), "{described:?}");
    assert!(!broker.log().contains("panicked"));
    broker.stop();
}
