//! End-to-end tests of consumer groups against the real `ringlog serve` process: the group
//! consumer (`GroupConsumer`), `ringlog consume --group` as a child process, and the `ringlog
//! group` commands. Every test starts its own broker, with short session timeouts so that the
//! waits the tests must make (a killed member's session expiring) stay around two seconds.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Broker;
use ringlog::client::*;
use ringlog::protocol::wire::ErrorCode;

/// Generous enough for a loaded 2-core CI machine; only reached when something is wrong.
const DEADLINE: Duration = Duration::from_secs(40);
const SESSION_TIMEOUT: Duration = Duration::from_secs(2);
/// Options every test broker gets: a small offsets topic opens faster.
const BROKER_SETS: &[&str] = &["offsets_topic_partitions=4", "group_initial_rebalance_delay_ms=300"];

fn client(addr: &str) -> ClientConfig {
    ClientConfig { request_timeout: Duration::from_secs(10), ..ClientConfig::new(addr.to_owned()) }
}

fn group_config(group: &str) -> GroupConsumerConfig {
    GroupConsumerConfig {
        session_timeout: SESSION_TIMEOUT,
        rebalance_timeout: Duration::from_secs(5),
        heartbeat_interval: Duration::from_millis(300),
        auto_commit_interval: Duration::from_millis(100),
        ..GroupConsumerConfig::new(group)
    }
}

/// Waits for `check` to return `Some`, polling every 50 ms; panics with `what` at the deadline.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(started.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Produces `count` records round-robin over `partitions`; returns (partition, offset) → value.
async fn produce(
    addr: &str,
    topic: &str,
    partitions: u32,
    first: usize,
    count: usize,
) -> BTreeMap<(u32, i64), String> {
    let producer = Producer::connect(client(addr), ProducerConfig::default()).await.unwrap();
    let mut deliveries = Vec::with_capacity(count);
    for i in first..first + count {
        let value = format!("record-{i}");
        let delivery =
            producer.send_to(topic, i as u32 % partitions, None, Bytes::from(value.clone())).await.unwrap();
        deliveries.push((value, delivery));
    }
    producer.flush().await;
    let mut written = BTreeMap::new();
    for (value, delivery) in deliveries {
        let meta = delivery.await.unwrap();
        written.insert((meta.partition, meta.offset), value);
    }
    written
}

/// Each member's assignment after its latest poll, by member number.
type Assignments = HashMap<usize, Vec<(Arc<str>, u32)>>;

/// A record as one member saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    member: usize,
    partition: u32,
    offset: i64,
    value: String,
}

/// Group consumers polling in the background, each in its own task, until stopped.
struct Members {
    seen: Arc<Mutex<Vec<Seen>>>,
    assignments: Arc<Mutex<Assignments>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Members {
    fn new() -> Members {
        Members { seen: Arc::default(), assignments: Arc::default(), stop: Arc::default(), tasks: Vec::new() }
    }

    async fn spawn(&mut self, member: usize, addr: &str, config: GroupConsumerConfig, topic: &str) {
        let mut consumer = GroupConsumer::connect(client(addr), config).await.unwrap();
        consumer.subscribe(vec![topic.to_owned()]);
        let (seen, assignments, stop) = (self.seen.clone(), self.assignments.clone(), self.stop.clone());
        self.tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                let records = consumer.poll(Duration::from_millis(200)).await.unwrap();
                let mut seen = seen.lock().unwrap();
                for r in records {
                    let value = String::from_utf8(r.value.unwrap().to_vec()).unwrap();
                    seen.push(Seen { member, partition: r.partition, offset: r.offset, value });
                }
                drop(seen);
                assignments.lock().unwrap().insert(member, consumer.assignment());
            }
            consumer.close().await.unwrap();
        }));
    }

    fn distinct(&self) -> BTreeSet<(u32, i64)> {
        self.seen.lock().unwrap().iter().map(|s| (s.partition, s.offset)).collect()
    }

    /// Stops every member (each commits and leaves) and returns what they saw.
    async fn stop(self) -> Vec<Seen> {
        self.stop.store(true, Ordering::Release);
        for t in self.tasks {
            t.await.unwrap();
        }
        Arc::try_unwrap(self.seen).unwrap().into_inner().unwrap()
    }
}

/// Waits until the group is Stable with `members` members that hold every one of the topic's
/// `partitions` partitions between them; returns the description.
async fn stable_group(admin: &Admin, group: &str, members: usize, partitions: u32) -> GroupDescription {
    let started = Instant::now();
    loop {
        let d = admin.describe_group(group).await;
        if let Ok(d) = &d {
            let assigned: usize =
                d.members.iter().flat_map(|m| &m.assignment).map(|t| t.partitions.len()).sum();
            if d.state == "Stable" && d.members.len() == members && assigned == partitions as usize {
                return d.clone();
            }
        }
        assert!(
            started.elapsed() < DEADLINE,
            "group {group} not Stable with {members} members holding {partitions} partitions: {d:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every partition appears in exactly one member's assignment.
fn assert_exclusive(d: &GroupDescription, partitions: u32) {
    let mut owners: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
    for m in &d.members {
        for t in &m.assignment {
            for &p in &t.partitions {
                owners.entry(p).or_default().push(&m.member_id);
            }
        }
    }
    assert_eq!(owners.keys().copied().collect::<Vec<_>>(), (0..partitions).collect::<Vec<_>>(), "{d:?}");
    assert!(owners.values().all(|o| o.len() == 1), "a partition has several owners: {owners:?}");
}

/// Committed offsets of the group, by partition of `topic`.
async fn committed(admin: &Admin, group: &str, topic: &str) -> BTreeMap<u32, i64> {
    admin
        .group_offsets(group, &[])
        .await
        .unwrap()
        .into_iter()
        .filter(|o| o.topic == topic)
        .filter_map(|o| Some((o.partition, o.offset?)))
        .collect()
}

/// Log end (high watermark) of each partition.
async fn log_ends(admin: &Admin, topic: &str) -> BTreeMap<u32, i64> {
    admin
        .describe_topic(topic)
        .await
        .unwrap()
        .partitions
        .iter()
        .map(|p| (p.partition, p.high_watermark))
        .collect()
}

/// `ringlog consume` as a child process whose stdout lines are collected by a thread.
struct ConsoleConsumer {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: std::thread::JoinHandle<()>,
}

impl ConsoleConsumer {
    fn start(addr: &str, args: &[&str]) -> ConsoleConsumer {
        let mut child = Command::new(common::BIN)
            .args(args)
            .env("RINGLOG_BOOTSTRAP", addr)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        ConsoleConsumer { child, lines, reader }
    }

    /// (partition, offset, value) of each `--print-meta` line.
    fn records(lines: &[String]) -> Vec<(u32, i64, String)> {
        lines
            .iter()
            .map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                assert_eq!(f.len(), 5, "not a --print-meta line: {l:?}");
                (f[0].parse().unwrap(), f[1].parse().unwrap(), f[4].to_owned())
            })
            .collect()
    }
}

/// A free loopback port, so a restarted broker listens where its clients expect it.
fn free_port() -> u16 {
    common::free_ports(1)[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_split_six_partitions_and_read_every_record_once() {
    const TOPIC: &str = "orders";
    const PARTITIONS: u32 = 6;
    let broker = Broker::start(2, BROKER_SETS);
    let admin = Admin::connect(client(&broker.addr)).await.unwrap();
    admin.create_topic(TOPIC, PARTITIONS, &TopicSettings::default()).await.unwrap();

    let mut members = Members::new();
    for i in 0..3 {
        members.spawn(i, &broker.addr, group_config("g1"), TOPIC).await;
    }
    let d = stable_group(&admin, "g1", 3, PARTITIONS).await;
    assert_exclusive(&d, PARTITIONS);
    assert!(d.members.iter().all(|m| !m.assignment.is_empty()), "a member got nothing: {d:?}");
    assert_eq!((d.protocol.as_str(), d.protocol_type.as_str()), ("range", "consumer"));

    let written = produce(&broker.addr, TOPIC, PARTITIONS, 0, 600).await;
    eventually("every record consumed", || async {
        (members.distinct().len() >= written.len()).then_some(())
    })
    .await;
    let assignments = members.assignments.lock().unwrap().clone();
    let seen = members.stop().await;

    // Exactly once: as many deliveries as records, each record once, with its value.
    assert_eq!(seen.len(), written.len(), "duplicates were delivered");
    let got: BTreeMap<(u32, i64), String> =
        seen.iter().map(|s| ((s.partition, s.offset), s.value.clone())).collect();
    assert_eq!(got, written);
    // Each member only saw its own partitions, and the members' own views agree with the
    // coordinator's.
    for s in &seen {
        assert!(
            assignments[&s.member].iter().any(|(t, p)| &**t == TOPIC && *p == s.partition),
            "member {} got partition {} outside its assignment {:?}",
            s.member,
            s.partition,
            assignments[&s.member]
        );
    }
    let mut from_members: Vec<u32> = assignments.values().flatten().map(|(_, p)| *p).collect();
    from_members.sort_unstable();
    assert_eq!(from_members, (0..PARTITIONS).collect::<Vec<_>>());
    // Everything was committed on close.
    assert_eq!(committed(&admin, "g1", TOPIC).await, log_ends(&admin, TOPIC).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_member_partitions_resume_from_its_last_commit() {
    const TOPIC: &str = "likes";
    const PARTITIONS: u32 = 6;
    let broker = Broker::start(2, BROKER_SETS);
    let admin = Admin::connect(client(&broker.addr)).await.unwrap();
    admin.create_topic(TOPIC, PARTITIONS, &TopicSettings::default()).await.unwrap();

    let mut console = ConsoleConsumer::start(
        &broker.addr,
        &[
            "consume",
            TOPIC,
            "--group",
            "g2",
            "--print-meta",
            "--follow",
            "--session-timeout-ms",
            "2000",
            "--commit-interval-ms",
            "50",
        ],
    );
    let mut members = Members::new();
    for i in 0..2 {
        members.spawn(i, &broker.addr, group_config("g2"), TOPIC).await;
    }
    let d = stable_group(&admin, "g2", 3, PARTITIONS).await;
    assert_exclusive(&d, PARTITIONS);
    let cli_member = d.members.iter().find(|m| m.client_id == "ringlog-cli").expect("the CLI member");
    let cli_partitions: Vec<u32> = cli_member.assignment.iter().flat_map(|t| t.partitions.clone()).collect();
    assert!(!cli_partitions.is_empty());

    let mut written = produce(&broker.addr, TOPIC, PARTITIONS, 0, 600).await;
    // Kill the CLI member while it is still reading (it may or may not be done).
    eventually("the CLI member printing", || async {
        (!console.lines.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    console.child.kill().unwrap();
    console.child.wait().unwrap();
    // Its session has not expired yet, so nobody else can have committed for its partitions.
    let commits_at_kill = committed(&admin, "g2", TOPIC).await;
    console.reader.join().unwrap();
    let printed = ConsoleConsumer::records(&console.lines.lock().unwrap());

    written.extend(produce(&broker.addr, TOPIC, PARTITIONS, 600, 600).await);
    let d = stable_group(&admin, "g2", 2, PARTITIONS).await;
    assert_exclusive(&d, PARTITIONS);
    eventually("every record consumed by the survivors", || async {
        let mut all = members.distinct();
        all.extend(printed.iter().map(|(p, o, _)| (*p, *o)));
        (all.len() >= written.len()).then_some(())
    })
    .await;
    let seen = members.stop().await;

    // Nothing lost, no value changed.
    let mut union: BTreeMap<(u32, i64), String> =
        printed.iter().map(|(p, o, v)| ((*p, *o), v.clone())).collect();
    union.extend(seen.iter().map(|s| ((s.partition, s.offset), s.value.clone())));
    assert_eq!(union, written);
    // The CLI member only printed its own partitions, each record once.
    assert!(printed.iter().all(|(p, _, _)| cli_partitions.contains(p)), "{printed:?}");
    let printed_set: BTreeSet<(u32, i64)> = printed.iter().map(|(p, o, _)| (*p, *o)).collect();
    assert_eq!(printed_set.len(), printed.len(), "the CLI printed a record twice");
    // The survivors resumed each of its partitions exactly at its last commit: the only
    // re-deliveries are what it printed after that commit.
    let mut survivor_counts: BTreeMap<(u32, i64), usize> = BTreeMap::new();
    for s in &seen {
        *survivor_counts.entry((s.partition, s.offset)).or_default() += 1;
    }
    assert!(survivor_counts.values().all(|&n| n == 1), "survivors re-delivered among themselves");
    for &p in &cli_partitions {
        let commit = commits_at_kill.get(&p).copied().unwrap_or(0);
        let first = survivor_counts.keys().filter(|(sp, _)| *sp == p).map(|(_, o)| *o).min();
        assert_eq!(first, Some(commit), "partition {p}: survivors did not start at the commit {commit}");
    }
    let redelivered: BTreeSet<(u32, i64)> =
        printed_set.iter().filter(|k| survivor_counts.contains_key(k)).copied().collect();
    let after_commit: BTreeSet<(u32, i64)> = printed_set
        .iter()
        .filter(|(p, o)| *o >= commits_at_kill.get(p).copied().unwrap_or(0))
        .copied()
        .collect();
    assert_eq!(redelivered, after_commit);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_and_group_survive_broker_restarts() {
    const TOPIC: &str = "payments";
    const PARTITIONS: u32 = 4;
    let port = free_port();
    let listen = format!("listen=127.0.0.1:{port}");
    let mut sets = BROKER_SETS.to_vec();
    sets.push(&listen);
    let mut broker = Broker::start(2, &sets);
    assert_eq!(broker.addr, format!("127.0.0.1:{port}"));
    let addr = broker.addr.clone();
    let admin = Admin::connect(client(&addr)).await.unwrap();
    admin.create_topic(TOPIC, PARTITIONS, &TopicSettings::default()).await.unwrap();

    let mut members = Members::new();
    for i in 0..2 {
        members.spawn(i, &addr, group_config("g3"), TOPIC).await;
    }
    stable_group(&admin, "g3", 2, PARTITIONS).await;
    let mut written = BTreeMap::new();
    for (round, graceful) in [(0, true), (1, false)] {
        written.extend(produce(&addr, TOPIC, PARTITIONS, round * 200, 200).await);
        eventually("everything consumed and committed", || async {
            let admin = Admin::connect(client(&addr)).await.ok()?;
            let ends = log_ends(&admin, TOPIC).await;
            (members.distinct().len() == written.len() && committed(&admin, "g3", TOPIC).await == ends)
                .then_some(())
        })
        .await;
        let admin = Admin::connect(client(&addr)).await.unwrap();
        let commits_before = committed(&admin, "g3", TOPIC).await;
        let generation_before = admin.describe_group("g3").await.unwrap().generation_id;
        drop(admin);
        if graceful {
            broker.stop();
        } else {
            broker.kill9();
        }
        broker.restart();
        let admin = Admin::connect(client(&addr)).await.unwrap();
        assert_eq!(committed(&admin, "g3", TOPIC).await, commits_before, "round {round}: commits lost");
        // The group came back with its members, as in Kafka: they carry on in their generation,
        // no rebalance.
        let d = stable_group(&admin, "g3", 2, PARTITIONS).await;
        assert_eq!(d.generation_id, generation_before, "round {round}: the members rejoined");
    }
    written.extend(produce(&addr, TOPIC, PARTITIONS, 400, 200).await);
    eventually("everything consumed", || async { (members.distinct().len() == written.len()).then_some(()) })
        .await;
    let seen = members.stop().await;
    // Every record arrived, and since all of it was committed before each restart, none twice.
    assert_eq!(seen.len(), written.len(), "records were re-delivered after a restart");
    let got: BTreeMap<(u32, i64), String> =
        seen.iter().map(|s| ((s.partition, s.offset), s.value.clone())).collect();
    assert_eq!(got, written);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_groups_each_receive_every_record() {
    const TOPIC: &str = "events";
    const PARTITIONS: u32 = 3;
    let broker = Broker::start(2, BROKER_SETS);
    let admin = Admin::connect(client(&broker.addr)).await.unwrap();
    admin.create_topic(TOPIC, PARTITIONS, &TopicSettings::default()).await.unwrap();
    let written = produce(&broker.addr, TOPIC, PARTITIONS, 0, 300).await;

    // Group A: the CLI, which stops once its partitions are caught up.
    let out = broker.cli(&["consume", TOPIC, "--group", "ga", "--print-meta"], None).ok();
    let lines: Vec<String> = out.lines().map(str::to_owned).collect();
    let a: BTreeMap<(u32, i64), String> =
        ConsoleConsumer::records(&lines).into_iter().map(|(p, o, v)| ((p, o), v)).collect();
    assert_eq!(lines.len(), written.len());
    assert_eq!(a, written);

    // Group B: two in-process members.
    let mut members = Members::new();
    for i in 0..2 {
        members.spawn(i, &broker.addr, group_config("gb"), TOPIC).await;
    }
    eventually("group B consumed everything", || async {
        (members.distinct().len() >= written.len()).then_some(())
    })
    .await;
    let seen = members.stop().await;
    let b: BTreeMap<(u32, i64), String> =
        seen.iter().map(|s| ((s.partition, s.offset), s.value.clone())).collect();
    assert_eq!(b, written);
    assert_eq!(seen.len(), written.len());

    // Both groups committed everything, independently.
    let ends = log_ends(&admin, TOPIC).await;
    assert_eq!(committed(&admin, "ga", TOPIC).await, ends);
    assert_eq!(committed(&admin, "gb", TOPIC).await, ends);
    let listed = broker.cli(&["group", "list"], None).ok();
    let rows: Vec<Vec<&str>> = listed.lines().skip(1).map(|l| l.split_whitespace().collect()).collect();
    assert!(rows.iter().any(|r| r[0] == "ga" && r[1] == "Empty"), "{listed}");
    assert!(rows.iter().any(|r| r[0] == "gb" && r[1] == "Empty"), "{listed}");
    assert!(!rows.iter().any(|r| r[0].starts_with("__")), "{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_commits_fail_and_resets_need_an_empty_group() {
    const TOPIC: &str = "audit";
    const PARTITIONS: u32 = 2;
    let broker = Broker::start(2, BROKER_SETS);
    let admin = Admin::connect(client(&broker.addr)).await.unwrap();
    admin.create_topic(TOPIC, PARTITIONS, &TopicSettings::default()).await.unwrap();
    let written = produce(&broker.addr, TOPIC, PARTITIONS, 0, 100).await;
    let per_partition = (written.len() / PARTITIONS as usize) as i64;

    // Fencing, with the low-level API: A is in generation g; B joins, A rejoins, both are in
    // g+1; a commit (or heartbeat) with g is refused.
    let c = client(&broker.addr);
    let timeout = Duration::from_secs(15);
    let a = GroupCoordinator::connect(&c, "g5", timeout).await.unwrap();
    let b = GroupCoordinator::connect(&c, "g5", timeout).await.unwrap();
    let join = |member_id: &str| JoinRequest {
        member_id: member_id.to_owned(),
        session_timeout: Duration::from_secs(10),
        rebalance_timeout: Duration::from_secs(10),
        topics: vec![TOPIC.to_owned()],
        protocols: vec![("range".to_owned(), Vec::new())],
        server_assignment: true,
    };
    let first = a.join(&join("")).await.unwrap();
    assert!(!first.member_id.is_empty(), "the coordinator assigns member ids");
    let partitions = a.sync(first.generation_id, &first.member_id, &[]).await.unwrap();
    assert_eq!(partitions, vec![TopicPartitions { topic: TOPIC.into(), partitions: vec![0, 1] }]);
    let b_join = tokio::spawn({
        let (b, request) = (b.clone(), join(""));
        async move { b.join(&request).await }
    });
    eventually("A asked to rejoin", || async {
        match a.heartbeat(first.generation_id, &first.member_id).await {
            Err(e) if e.code() == Some(ErrorCode::RebalanceInProgress) => Some(()),
            Ok(()) => None,
            Err(e) => panic!("heartbeat during the rebalance: {e}"),
        }
    })
    .await;
    let a_rejoined = a.join(&join(&first.member_id)).await.unwrap();
    let b_joined = b_join.await.unwrap().unwrap();
    assert_eq!(a_rejoined.generation_id, b_joined.generation_id);
    assert!(a_rejoined.generation_id > first.generation_id);
    let stale = [OffsetToCommit { topic: TOPIC.into(), partition: 0, offset: 7, metadata: String::new() }];
    let err = a.commit(first.generation_id, &first.member_id, &stale).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::IllegalGeneration), "{err}");
    assert!(err.needs_rejoin());
    let err = a.heartbeat(first.generation_id, &first.member_id).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::IllegalGeneration), "{err}");
    assert!(committed(&admin, "g5", TOPIC).await.is_empty(), "the fenced commit was stored");

    // Resets are refused while the group has members, over the API and the CLI.
    let err = admin.reset_group_offsets("g5", TOPIC, &[], ResetTarget::Earliest).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::GroupNotEmpty), "{err}");
    let refused = broker.cli(&["group", "reset", "g5", "--topic", TOPIC, "--to", "earliest"], None);
    assert!(!refused.status.success() && refused.stderr.contains("GroupNotEmpty"), "{}", refused.stderr);
    let refused = broker.cli(&["group", "delete", "g5"], None);
    assert!(!refused.status.success() && refused.stderr.contains("GroupNotEmpty"), "{}", refused.stderr);
    a.leave(&a_rejoined.member_id).await.unwrap();
    b.leave(&b_joined.member_id).await.unwrap();

    // Empty now: reset to an explicit offset, then a member starts there.
    let reset = admin.reset_group_offsets("g5", TOPIC, &[], ResetTarget::Offset(10)).await.unwrap();
    assert_eq!(
        reset.iter().map(|o| (o.partition, o.offset)).collect::<Vec<_>>(),
        vec![(0, Some(10)), (1, Some(10))]
    );
    let mut consumer = GroupConsumer::connect(c.clone(), group_config("g5")).await.unwrap();
    consumer.subscribe(vec![TOPIC.to_owned()]);
    let mut first_offsets: BTreeMap<u32, i64> = BTreeMap::new();
    let started = Instant::now();
    while first_offsets.len() < PARTITIONS as usize {
        assert!(started.elapsed() < DEADLINE, "no records after the reset");
        for r in consumer.poll(Duration::from_millis(200)).await.unwrap() {
            first_offsets.entry(r.partition).or_insert(r.offset);
        }
    }
    assert_eq!(first_offsets, BTreeMap::from([(0, 10), (1, 10)]));
    consumer.close().await.unwrap();

    // Through the CLI: to a timestamp past every record (= the log end), then to earliest.
    let out =
        broker.cli(&["group", "reset", "g5", "--topic", TOPIC, "--to", "2999-01-01T00:00:00Z"], None).ok();
    let rows: Vec<Vec<&str>> = out.lines().skip(1).map(|l| l.split_whitespace().collect()).collect();
    let expected = per_partition.to_string();
    assert_eq!(rows, vec![vec![TOPIC, "0", expected.as_str()], vec![TOPIC, "1", expected.as_str()]]);
    let none = broker.cli(&["consume", TOPIC, "--group", "g5"], None).ok();
    assert_eq!(none, "", "nothing after the log end");
    broker
        .cli(&["group", "reset", "g5", "--topic", TOPIC, "--partition", "1", "--to", "earliest"], None)
        .ok();
    let out = broker.cli(&["consume", TOPIC, "--group", "g5", "--print-meta"], None).ok();
    let lines: Vec<String> = out.lines().map(str::to_owned).collect();
    let records = ConsoleConsumer::records(&lines);
    assert_eq!(records.len() as i64, per_partition, "partition 1 read again from its start");
    assert!(records.iter().all(|(p, _, _)| *p == 1));
    assert_eq!(committed(&admin, "g5", TOPIC).await, log_ends(&admin, TOPIC).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_shows_lag_as_log_end_minus_commit() {
    const TOPIC: &str = "clicks";
    const PARTITIONS: u32 = 3;
    let broker = Broker::start(2, BROKER_SETS);
    let admin = Admin::connect(client(&broker.addr)).await.unwrap();
    admin.create_topic(TOPIC, PARTITIONS, &TopicSettings::default()).await.unwrap();
    produce(&broker.addr, TOPIC, PARTITIONS, 0, 90).await;

    let mut consumer = GroupConsumer::connect(
        client(&broker.addr),
        GroupConsumerConfig { auto_commit: false, ..group_config("g6") },
    )
    .await
    .unwrap();
    consumer.subscribe(vec![TOPIC.to_owned()]);
    let started = Instant::now();
    while consumer.assignment().len() < PARTITIONS as usize {
        assert!(started.elapsed() < DEADLINE, "never assigned");
        consumer.poll(Duration::from_millis(100)).await.unwrap();
    }
    consumer
        .commit_offsets([((TOPIC.to_owned(), 0), 5), ((TOPIC.to_owned(), 1), 0), ((TOPIC.to_owned(), 2), 30)])
        .await
        .unwrap();
    produce(&broker.addr, TOPIC, PARTITIONS, 90, 30).await;

    let check = |out: &str, member: &str| {
        let rows: Vec<Vec<String>> = out
            .lines()
            .skip_while(|l| !l.starts_with("TOPIC"))
            .skip(1)
            .map(|l| l.split_whitespace().map(str::to_owned).collect())
            .collect();
        assert_eq!(rows.len(), PARTITIONS as usize, "{out}");
        rows.into_iter()
            .map(|r| {
                assert_eq!(r[0], TOPIC);
                assert_eq!(r[5], member, "{out}");
                (
                    r[1].parse::<u32>().unwrap(),
                    (
                        r[2].parse::<i64>().unwrap(),
                        r[3].parse::<i64>().unwrap(),
                        r[4].parse::<i64>().unwrap(),
                    ),
                )
            })
            .collect::<BTreeMap<_, _>>()
    };
    let ends = log_ends(&admin, TOPIC).await;
    let expected: BTreeMap<u32, (i64, i64, i64)> =
        [(0, 5), (1, 0), (2, 30)].into_iter().map(|(p, c)| (p, (c, ends[&p], ends[&p] - c))).collect();
    let out = broker.cli(&["group", "describe", "g6"], None).ok();
    assert!(out.contains("state: Stable"), "{out}");
    assert_eq!(check(&out, consumer.member_id()), expected);

    // After the member commits what it consumed and leaves, lag is zero where it read all.
    let started = Instant::now();
    while ends.iter().any(|(&p, &end)| consumer.position(TOPIC, p).is_none_or(|pos| pos < end)) {
        assert!(started.elapsed() < DEADLINE, "consumer stuck");
        consumer.poll(Duration::from_millis(100)).await.unwrap();
    }
    consumer.commit().await.unwrap();
    consumer.close().await.unwrap();
    let out = broker.cli(&["group", "describe", "g6"], None).ok();
    assert!(out.contains("state: Empty"), "{out}");
    let zero: BTreeMap<u32, (i64, i64, i64)> = ends.iter().map(|(&p, &e)| (p, (e, e, 0))).collect();
    assert_eq!(check(&out, "-"), zero);

    broker.cli(&["group", "delete", "g6"], None).ok();
    let listed = broker.cli(&["group", "list"], None).ok();
    assert!(!listed.lines().any(|l| l.starts_with("g6 ")), "{listed}");
}
