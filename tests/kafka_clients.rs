//! Proof with real clients: unchanged Apache Kafka clients against a real `ringlog serve`
//! process over its Kafka listener. kcat (librdkafka) is driven from here; confluent-kafka
//! (Python, librdkafka), kafka-python and kafkajs (node) run the scripts in tests/kafka/, which
//! get the listener's address as an argument and write what they saw to files these tests read.
//! Every test starts its own 2-shard broker and asserts to Kafka's semantics.
//!
//! The clients are installed by `.ci/run`; a test whose client is missing fails and names the
//! install command (never a silent skip).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::Broker;

/// Longest wait for anything a test waits on; only reached when something is wrong.
const DEADLINE: Duration = Duration::from_secs(60);
/// Longest a client script may run.
const SCRIPT_LIMIT: Duration = Duration::from_secs(120);
/// A small offsets topic opens faster; a short initial delay forms groups quickly.
const BROKER_SETS: &[&str] = &["offsets_topic_partitions=4", "group_initial_rebalance_delay_ms=300"];

fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("kafka")
}

/// A Kafka client these tests need on the machine.
#[derive(Clone, Copy)]
enum Client {
    Kcat,
    ConfluentKafka,
    KafkaPython,
    Kafkajs,
}

impl Client {
    /// Fails the test, naming the install command, when the client is missing.
    fn require(self) {
        let (name, mut probe, install) = match self {
            Client::Kcat => ("kcat", command("kcat", &["-V"]), "apt-get install -y kcat"),
            Client::ConfluentKafka => (
                "confluent-kafka (Python)",
                command("python3", &["-c", "import confluent_kafka"]),
                "python3 -m pip install confluent-kafka==2.16.1",
            ),
            Client::KafkaPython => (
                "kafka-python",
                command("python3", &["-c", "import kafka"]),
                "python3 -m pip install kafka-python==3.0.12",
            ),
            Client::Kafkajs => {
                let mut probe = command("node", &["-e", "require('kafkajs')"]);
                probe.current_dir(scripts_dir());
                ("kafkajs (node)", probe, "npm ci --prefix tests/kafka")
            }
        };
        let found = probe.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
        assert!(found, "{name} is missing: install it with `{install}` (.ci/run does)");
    }
}

fn command(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// The broker log's warnings, errors and panics: what a failure message should show.
fn broker_problems(broker: &Broker) -> String {
    let log = broker.log();
    let lines: Vec<&str> =
        log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("panicked")).collect();
    let tail = &lines[lines.len().saturating_sub(40)..];
    format!("broker log, last {} warnings/errors:\n{}", tail.len(), tail.join("\n"))
}

#[track_caller]
fn assert_no_panic(broker: &Broker) {
    let log = broker.log();
    assert!(!log.contains("panicked"), "the broker panicked:\n{log}");
}

/// A client process with its stdout and stderr going to files in the test's directory.
struct Proc {
    name: String,
    child: Option<Child>,
    stdout: PathBuf,
    stderr: PathBuf,
}

struct Finished {
    name: String,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Finished {
    /// Asserts a zero exit status; the message holds the client's output and the broker's
    /// complaints.
    #[track_caller]
    fn ok(self, broker: &Broker) -> String {
        assert!(
            self.status.success(),
            "{} failed ({}):\n--- stdout (tail)\n{}\n--- stderr (tail)\n{}\n--- {}",
            self.name,
            self.status,
            tail(&self.stdout, 40),
            tail(&self.stderr, 40),
            broker_problems(broker)
        );
        self.stdout
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Proc {
    fn spawn(dir: &Path, name: &str, mut cmd: Command, stdin: Option<Vec<u8>>) -> Proc {
        let stdout = dir.join(format!("{name}.stdout"));
        let stderr = dir.join(format!("{name}.stderr"));
        cmd.stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{name}: cannot start {cmd:?}: {e}"));
        if let Some(data) = stdin {
            let mut input = child.stdin.take().unwrap();
            std::thread::spawn(move || {
                let _ = input.write_all(&data);
            });
        }
        Proc { name: name.to_owned(), child: Some(child), stdout, stderr }
    }

    fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Fails the test at once, with the process's output, if it already exited unsuccessfully:
    /// what a wait on its progress should do rather than run into the deadline.
    #[track_caller]
    fn assert_not_failed(&mut self) {
        let status = self.child.as_mut().and_then(|c| c.try_wait().unwrap());
        if let Some(status) = status.filter(|s| !s.success()) {
            panic!(
                "{} failed ({status}):\n--- stdout (tail)\n{}\n--- stderr (tail)\n{}",
                self.name,
                tail(&read(&self.stdout), 20),
                tail(&read(&self.stderr), 20)
            );
        }
    }

    fn signal(&self, signal: i32) {
        let pid = self.child.as_ref().expect("process running").id();
        unsafe { libc::kill(pid as i32, signal) };
    }

    /// Waits for the exit (killing the process at `limit`, which fails the test).
    fn wait(mut self, limit: Duration) -> Finished {
        let mut child = self.child.take().unwrap();
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not finish within {limit:?}:\n--- stdout\n{}\n--- stderr\n{}",
                    self.name,
                    tail(&read(&self.stdout), 40),
                    tail(&read(&self.stderr), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Finished { name: self.name.clone(), status, stdout: read(&self.stdout), stderr: read(&self.stderr) }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Runs `kcat -b <kafka listener> ARGS` to completion.
fn kcat(broker: &Broker, name: &str, args: &[&str], stdin: Option<Vec<u8>>) -> Finished {
    let mut cmd = command("kcat", &["-b", &broker.kafka]);
    cmd.args(args);
    Proc::spawn(&broker.dir, name, cmd, stdin).wait(SCRIPT_LIMIT)
}

/// Starts a script from tests/kafka with `python3`.
fn python(broker: &Broker, name: &str, script: &str, args: &[&str]) -> Proc {
    let mut cmd = command("python3", &[scripts_dir().join(script).to_str().unwrap()]);
    cmd.args(args).env("PYTHONUNBUFFERED", "1");
    Proc::spawn(&broker.dir, name, cmd, None)
}

/// Polls `done` every 50 ms until it holds; at the deadline, fails with `what` and `diagnose()`.
#[track_caller]
fn wait_until(what: &str, mut done: impl FnMut() -> bool, diagnose: impl Fn() -> String) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < DEADLINE, "timed out waiting for {what}\n{}", diagnose());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One delivery report of tests/kafka/confluent_produce.py.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ack {
    id: u64,
    partition: u32,
    offset: i64,
    timestamp_ms: i64,
    key: String,
    value: String,
}

/// The acknowledged records by id, and the failure lines, of a delivery report file.
fn read_acks(path: &Path) -> (BTreeMap<u64, Ack>, Vec<String>) {
    let mut acks = BTreeMap::new();
    let mut failed = Vec::new();
    for line in read(path).lines() {
        let f: Vec<&str> = line.split('\t').collect();
        match f[0] {
            "ACK" => {
                assert_eq!(f.len(), 7, "bad delivery report line {line:?}");
                let ack = Ack {
                    id: f[1].parse().unwrap(),
                    partition: f[2].parse().unwrap(),
                    offset: f[3].parse().unwrap(),
                    timestamp_ms: f[4].parse().unwrap(),
                    key: f[5].to_owned(),
                    value: f[6].to_owned(),
                };
                let previous = acks.insert(ack.id, ack);
                assert!(previous.is_none(), "id {} acknowledged twice: {line:?}", f[1]);
            }
            "FAILED" => failed.push(line.to_owned()),
            _ => panic!("bad delivery report line {line:?}"),
        }
    }
    (acks, failed)
}

/// The id at the front of a value written by confluent_produce.py.
fn value_id(value: &str) -> u64 {
    value.split('|').next().and_then(|id| id.parse().ok()).unwrap_or_else(|| panic!("no id in {value:?}"))
}

/// `kcat -C -e -f '%p\t%o\t%k\t%s\n'` lines: partition, offset, key, value.
fn parse_kcat_records(out: &str) -> Vec<(u32, i64, String, String)> {
    out.lines()
        .map(|l| {
            let f: Vec<&str> = l.splitn(4, '\t').collect();
            assert_eq!(f.len(), 4, "bad kcat line {l:?}");
            (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].to_owned(), f[3].to_owned())
        })
        .collect()
}

/// `ringlog consume --print-meta` lines: partition, offset, timestamp, key, value.
fn parse_cli_records(out: &str) -> Vec<(u32, i64, i64, String, String)> {
    out.lines()
        .map(|l| {
            let f: Vec<&str> = l.splitn(5, '\t').collect();
            assert_eq!(f.len(), 5, "bad --print-meta line {l:?}");
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
                f[3].to_owned(),
                f[4].to_owned(),
            )
        })
        .collect()
}

/// Lines `key:value` for i in `range`, 997 distinct keys.
fn keyed_lines(range: std::ops::Range<usize>) -> String {
    range.map(|i| format!("user-{}:like-{i}\n", i % 997)).collect()
}

fn sorted_lines(text: &[u8]) -> Vec<&[u8]> {
    let mut lines: Vec<&[u8]> = text.split(|&b| b == b'\n').filter(|l| !l.is_empty()).collect();
    lines.sort_unstable();
    lines
}

#[test]
fn kcat_lists_metadata_and_round_trips_10k_keyed_lines() {
    Client::Kcat.require();
    const TOPIC: &str = "kcat-keyed";
    let broker = Broker::start(2, &[]);
    broker.cli(&["topic", "create", TOPIC, "--partitions", "4"], None).ok();

    let meta = kcat(&broker, "kcat-metadata", &["-L", "-t", TOPIC], None).ok(&broker);
    let lines: Vec<&str> = meta.lines().map(str::trim).collect();
    assert!(lines.contains(&"1 brokers:"), "{meta}");
    assert!(
        lines.iter().any(|l| *l == format!("broker 0 at {}", broker.kafka)
            || l.starts_with(&format!("broker 0 at {} ", broker.kafka))),
        "broker 0 is not listed at the advertised address {}:\n{meta}",
        broker.kafka
    );
    assert!(lines.contains(&format!("topic \"{TOPIC}\" with 4 partitions:").as_str()), "{meta}");
    for p in 0..4 {
        assert!(
            lines.iter().any(|l| l.starts_with(&format!("partition {p}, leader 0, replicas: 0, isrs: 0"))),
            "partition {p} not listed with leader 0:\n{meta}"
        );
    }

    let input = keyed_lines(0..10_000);
    let produced =
        kcat(&broker, "kcat-produce", &["-P", "-t", TOPIC, "-K:"], Some(input.clone().into_bytes()));
    let stderr = produced.stderr.clone();
    produced.ok(&broker);
    assert!(!stderr.contains("ERROR") && !stderr.contains("failed"), "kcat -P reported:\n{stderr}");

    // As kcat prints them with -K: `key:value`, byte for byte the lines that went in.
    let out = kcat(&broker, "kcat-consume-k", &["-C", "-e", "-q", "-t", TOPIC, "-K:"], None).ok(&broker);
    let (got, want) = (sorted_lines(out.as_bytes()), sorted_lines(input.as_bytes()));
    assert_eq!(got.len(), want.len(), "kcat consumed {} lines, produced {}", got.len(), want.len());
    assert!(got == want, "the consumed lines differ from the produced ones");

    // With positions: dense offsets per partition, each key on one partition, and within a
    // partition the records in the order they were produced.
    let out =
        kcat(&broker, "kcat-consume-f", &["-C", "-e", "-q", "-t", TOPIC, "-f", "%p\t%o\t%k\t%s\n"], None)
            .ok(&broker);
    let records = parse_kcat_records(&out);
    assert_eq!(records.len(), 10_000);
    let mut key_partition: HashMap<&str, u32> = HashMap::new();
    let mut per_partition: BTreeMap<u32, Vec<(i64, usize)>> = BTreeMap::new();
    for (p, offset, key, value) in &records {
        let i: usize = value.strip_prefix("like-").unwrap().parse().unwrap();
        assert_eq!(key, &format!("user-{}", i % 997));
        let owner = *key_partition.entry(key).or_insert(*p);
        assert_eq!(owner, *p, "key {key} on partitions {owner} and {p}");
        per_partition.entry(*p).or_default().push((*offset, i));
    }
    assert_eq!(per_partition.keys().copied().collect::<Vec<_>>(), vec![0, 1, 2, 3], "997 keys reach all 4");
    for (p, rows) in &per_partition {
        let offsets: Vec<i64> = rows.iter().map(|r| r.0).collect();
        assert_eq!(offsets, (0..rows.len() as i64).collect::<Vec<_>>(), "partition {p}: offsets not dense");
        assert!(rows.windows(2).all(|w| w[0].1 < w[1].1), "partition {p}: records out of produce order");
    }

    // A topic nobody created: producing to it creates it with default_partitions (1).
    let auto: String = (0..100).map(|i| format!("auto-{i}\n")).collect();
    kcat(&broker, "kcat-produce-auto", &["-P", "-t", "kcat-auto"], Some(auto.clone().into_bytes()))
        .ok(&broker);
    let meta = kcat(&broker, "kcat-metadata-auto", &["-L", "-t", "kcat-auto"], None).ok(&broker);
    assert!(meta.contains("topic \"kcat-auto\" with 1 partitions:"), "{meta}");
    let out = kcat(&broker, "kcat-consume-auto", &["-C", "-e", "-q", "-t", "kcat-auto"], None).ok(&broker);
    assert_eq!(out, auto, "a single partition returns the lines in order");
    let topics = broker.cli(&["topic", "list"], None).ok();
    assert_eq!(topics.lines().collect::<BTreeSet<_>>(), BTreeSet::from(["kcat-auto", TOPIC]));
    assert_no_panic(&broker);
}

/// What one group member's log (tests/kafka/confluent_member.py) says.
#[derive(Debug, Default)]
struct MemberLog {
    /// The partitions held now (eager rebalancing: cleared on revoke, replaced on assign).
    assigned: Vec<u32>,
    /// (partition, offset, id) in consumption order.
    records: Vec<(u32, i64, u64)>,
    /// (partition, next offset) of each successful commit, in order.
    commits: Vec<(u32, i64)>,
    /// COMMIT_FAILED and ERROR lines.
    problems: Vec<String>,
    /// Whether records were logged after the last commit (they are not committed yet).
    uncommitted: bool,
}

impl MemberLog {
    fn read(path: &Path) -> MemberLog {
        let mut log = MemberLog::default();
        let text = read(path);
        // A killed process may leave half a line at the end.
        let complete = &text[..text.rfind('\n').map_or(0, |n| n + 1)];
        for line in complete.lines() {
            let f: Vec<&str> = line.split('\t').collect();
            let parts = |s: &str| -> Vec<u32> {
                s.split(',').filter(|p| !p.is_empty()).map(|p| p.parse().unwrap()).collect()
            };
            match f[0] {
                "ASSIGN" => log.assigned = parts(f.get(1).copied().unwrap_or("")),
                "REVOKE" | "LOST" => log.assigned.clear(),
                "REC" => {
                    log.records.push((f[1].parse().unwrap(), f[2].parse().unwrap(), f[3].parse().unwrap()));
                    log.uncommitted = true;
                }
                "COMMIT" => {
                    log.commits.push((f[1].parse().unwrap(), f[2].parse().unwrap()));
                    log.uncommitted = false;
                }
                "COMMIT_FAILED" | "ERROR" => log.problems.push(line.to_owned()),
                "CLOSED" => {}
                other => panic!("{}: unknown line kind {other:?} in {line:?}", path.display()),
            }
        }
        log
    }

    /// The last committed offset per partition.
    fn last_commits(&self) -> BTreeMap<u32, i64> {
        self.commits.iter().copied().collect()
    }
}

/// True when the members' current assignments are disjoint, each non-empty, and cover
/// `0..partitions`.
fn assignments_cover(logs: &[MemberLog], partitions: u32) -> bool {
    let mut all: Vec<u32> = logs.iter().flat_map(|l| l.assigned.iter().copied()).collect();
    all.sort_unstable();
    logs.iter().all(|l| !l.assigned.is_empty()) && all == (0..partitions).collect::<Vec<_>>()
}

#[test]
fn confluent_kafka_100k_records_five_codecs_and_a_group_that_loses_a_member() {
    Client::ConfluentKafka.require();
    const TOPIC: &str = "events";
    const PARTITIONS: u32 = 6;
    const RECORDS: u64 = 100_000;
    const VICTIM: usize = 1;
    let broker = Broker::start(2, BROKER_SETS);
    broker.cli(&["topic", "create", TOPIC, "--partitions", &PARTITIONS.to_string()], None).ok();

    let log_paths: Vec<PathBuf> = (0..3).map(|i| broker.dir.join(format!("member-{i}.log"))).collect();
    let mut members: Vec<Proc> = (0..3)
        .map(|i| {
            let name = format!("member-{i}");
            let log = log_paths[i].to_str().unwrap();
            python(
                &broker,
                &name,
                "confluent_member.py",
                &["--bootstrap", &broker.kafka, "--topic", TOPIC, "--group", "g-events"]
                    .into_iter()
                    .chain([
                        "--name",
                        &name,
                        "--log",
                        log,
                        "--session-timeout-ms",
                        "3000",
                        "--pause-ms",
                        "10",
                    ])
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    let logs = || log_paths.iter().map(|p| MemberLog::read(p)).collect::<Vec<_>>();
    let diagnose = || {
        format!(
            "member logs' current assignments: {:?}\n{}",
            logs().iter().map(|l| l.assigned.clone()).collect::<Vec<_>>(),
            broker_problems(&broker)
        )
    };
    wait_until(
        "the 3 members to share the 6 partitions",
        || assignments_cover(&logs(), PARTITIONS),
        diagnose,
    );

    let acked_path = broker.dir.join("acked.tsv");
    let mut producer = python(
        &broker,
        "producer",
        "confluent_produce.py",
        &[
            "--bootstrap",
            &broker.kafka,
            "--topic",
            TOPIC,
            "--count",
            &RECORDS.to_string(),
            "--codecs",
            "none,gzip,snappy,lz4,zstd",
            "--acked",
            acked_path.to_str().unwrap(),
        ],
    );
    // Mid-way: the victim has consumed and committed some of its share, far from all of it,
    // and holds consumed records it has not committed yet.
    wait_until(
        "the victim to consume 3000 records, commit, and consume more",
        || {
            producer.assert_not_failed();
            let log = MemberLog::read(&log_paths[VICTIM]);
            log.records.len() >= 3000 && !log.commits.is_empty() && log.uncommitted
        },
        diagnose,
    );
    let mut victim_process = members[VICTIM].child.take().unwrap();
    victim_process.kill().unwrap(); // SIGKILL: no chance to commit or leave the group
    victim_process.wait().unwrap();
    let victim = MemberLog::read(&log_paths[VICTIM]);
    let victim_partitions = victim.assigned.clone();

    producer.wait(SCRIPT_LIMIT).ok(&broker);
    let (acks, failed) = read_acks(&acked_path);
    assert!(failed.is_empty(), "failed deliveries: {:?}", &failed[..failed.len().min(5)]);
    assert_eq!(acks.keys().copied().collect::<Vec<_>>(), (0..RECORDS).collect::<Vec<_>>());
    // The idempotent producer wrote each record once: per partition the offsets are dense.
    let mut ends: BTreeMap<u32, i64> = BTreeMap::new();
    let mut by_partition: BTreeMap<u32, Vec<i64>> = BTreeMap::new();
    for a in acks.values() {
        by_partition.entry(a.partition).or_default().push(a.offset);
    }
    for (p, offsets) in &mut by_partition {
        offsets.sort_unstable();
        assert_eq!(
            *offsets,
            (0..offsets.len() as i64).collect::<Vec<_>>(),
            "partition {p} offsets not dense"
        );
        ends.insert(*p, offsets.len() as i64);
    }
    assert_eq!(ends.len(), PARTITIONS as usize, "records reached only partitions {:?}", ends.keys());

    // The group rebalances onto the survivors, which drain the topic.
    let survivors: Vec<usize> = (0..3).filter(|&i| i != VICTIM).collect();
    wait_until(
        "the survivors to commit every partition's log end",
        || {
            let logs = logs();
            let survivor_logs: Vec<MemberLog> =
                logs.into_iter().enumerate().filter(|(i, _)| *i != VICTIM).map(|(_, l)| l).collect();
            let mut committed: BTreeMap<u32, i64> = victim.last_commits();
            for l in &survivor_logs {
                for (p, o) in l.last_commits() {
                    let c = committed.entry(p).or_insert(o);
                    *c = (*c).max(o);
                }
            }
            assignments_cover(&survivor_logs, PARTITIONS) && committed == ends
        },
        || format!("log ends {ends:?}\n{}", diagnose()),
    );
    for &i in &survivors {
        members[i].signal(libc::SIGTERM);
    }
    for (i, member) in members.into_iter().enumerate() {
        if i != VICTIM {
            member.wait(Duration::from_secs(30)).ok(&broker);
        }
    }
    let logs = logs();

    // Every record consumed was where the producer was told it was written.
    let mut consumed: HashMap<u64, Vec<(usize, u32, i64)>> = HashMap::new();
    for (member, log) in logs.iter().enumerate() {
        for &(p, o, id) in &log.records {
            let ack = &acks[&id];
            assert_eq!((ack.partition, ack.offset), (p, o), "member {member} read id {id} at {p}/{o}");
            consumed.entry(id).or_default().push((member, p, o));
        }
    }
    // Nothing lost.
    let missing: Vec<u64> = (0..RECORDS).filter(|id| !consumed.contains_key(id)).collect();
    assert!(
        missing.is_empty(),
        "{} ids never consumed, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    // Duplicates only after the killed member's last commit of that partition: the survivors
    // resumed its partitions there, and never re-read what a live member had committed.
    let victim_commits = victim.last_commits();
    // A partition it never committed had no commit at all (nothing existed to consume before
    // the group was stable), so the survivors start it at the log start.
    let resume_from = |p: u32| -> i64 { victim_commits.get(&p).copied().unwrap_or(0) };
    let survivor_problems: Vec<&String> = survivors.iter().flat_map(|&i| &logs[i].problems).collect();
    for (id, reads) in &consumed {
        if reads.len() == 1 {
            continue;
        }
        let (_, p, o) = reads[0];
        let by_victim = reads.iter().filter(|r| r.0 == VICTIM).count();
        assert!(
            by_victim == 1 && reads.len() == 2 && o >= resume_from(p),
            "id {id} at {p}/{o} consumed {} times {reads:?}; the killed member last committed \
             {:?} on partition {p}; survivors' commit failures/errors: {survivor_problems:?}",
            reads.len(),
            victim_commits.get(&p)
        );
    }
    // The survivors resumed each of the victim's partitions at its last commit (or right after
    // its last record, when the commit in flight at the kill had landed).
    for &p in &victim_partitions {
        let first = survivors.iter().flat_map(|&i| &logs[i].records).filter(|r| r.0 == p).map(|r| r.1).min();
        let after_last_read = victim.records.iter().filter(|r| r.0 == p).map(|r| r.1 + 1).max();
        assert!(
            first.is_some_and(|o| o == resume_from(p) || Some(o) == after_last_read)
                || (first.is_none() && after_last_read == ends.get(&p).copied()),
            "partition {p}: survivors started at {first:?}; the killed member last committed {:?} and last \
             read {after_last_read:?}",
            victim_commits.get(&p)
        );
    }
    // It really was mid-way: survivors took over records of the victim's partitions.
    let taken_over = survivors
        .iter()
        .flat_map(|&i| &logs[i].records)
        .filter(|r| victim_partitions.contains(&r.0) && r.1 >= resume_from(r.0))
        .count();
    assert!(taken_over > 0, "the victim had consumed everything before the kill; nothing was taken over");
    let duplicates = consumed.values().filter(|reads| reads.len() > 1).count();
    eprintln!(
        "killed member: partitions {victim_partitions:?}, {} records read, last commits {victim_commits:?}; \
         survivors took over {taken_over} records, {duplicates} read twice",
        victim.records.len()
    );
    assert_no_panic(&broker);
}

#[test]
fn kafka_python_assign_seek_offsets_for_times_and_committed_offsets() {
    Client::KafkaPython.require();
    const TOPIC: &str = "kafka-python";
    let broker = Broker::start(2, BROKER_SETS);
    broker.cli(&["topic", "create", TOPIC, "--partitions", "3"], None).ok();
    let out = python(
        &broker,
        "kafka-python",
        "kafka_python_checks.py",
        &["--bootstrap", &broker.kafka, "--topic", TOPIC],
    )
    .wait(SCRIPT_LIMIT)
    .ok(&broker);
    assert!(!out.contains("FAIL"), "{out}");
    assert_eq!(out.lines().last(), Some("all checks passed"), "{out}");
    assert_no_panic(&broker);
}

#[test]
fn a_transactional_producer_is_refused_at_once_with_a_fatal_error() {
    Client::ConfluentKafka.require();
    let broker = Broker::start(1, BROKER_SETS);
    let out = python(&broker, "transactions", "confluent_transactions.py", &[&broker.kafka])
        .wait(SCRIPT_LIMIT)
        .ok(&broker);
    assert!(out.contains("fatal=True retriable=False code=53"), "{out}");
    assert!(out.contains("transactions are not supported by this broker"), "{out}");
    assert_no_panic(&broker);
}

#[test]
fn kafkajs_producer_and_group_consumer_round_trip() {
    Client::Kafkajs.require();
    const TOPIC: &str = "kafkajs";
    let broker = Broker::start(2, BROKER_SETS);
    broker.cli(&["topic", "create", TOPIC, "--partitions", "3"], None).ok();
    let mut cmd = command("node", &["kafkajs_roundtrip.js", &broker.kafka, TOPIC, "2000"]);
    cmd.current_dir(scripts_dir());
    let out = Proc::spawn(&broker.dir, "kafkajs", cmd, None).wait(SCRIPT_LIMIT).ok(&broker);
    assert!(!out.contains("FAIL"), "{out}");
    assert_eq!(out.lines().last(), Some("all checks passed"), "{out}");
    assert_no_panic(&broker);
}

#[test]
fn kafka_client_records_read_identically_by_the_ringlog_cli_and_cli_records_by_kcat() {
    Client::ConfluentKafka.require();
    Client::Kcat.require();
    let broker = Broker::start(2, BROKER_SETS);

    // confluent-kafka → ringlog CLI, every codec, explicit timestamps.
    broker.cli(&["topic", "create", "from-kafka", "--partitions", "2"], None).ok();
    let acked_path = broker.dir.join("acked.tsv");
    let base_ms = (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
        as i64)
        - 3_600_000;
    python(
        &broker,
        "producer",
        "confluent_produce.py",
        &[
            "--bootstrap",
            &broker.kafka,
            "--topic",
            "from-kafka",
            "--count",
            "5000",
            "--codecs",
            "none,gzip,snappy,lz4,zstd",
            "--headers",
            "--timestamp-ms",
            &base_ms.to_string(),
            "--acked",
            acked_path.to_str().unwrap(),
        ],
    )
    .wait(SCRIPT_LIMIT)
    .ok(&broker);
    let (acks, failed) = read_acks(&acked_path);
    assert!(failed.is_empty() && acks.len() == 5000, "{failed:?}");
    let mut want: Vec<(u32, i64, i64, String, String)> = acks
        .values()
        .map(|a| (a.partition, a.offset, a.timestamp_ms, a.key.clone(), a.value.clone()))
        .collect();
    want.sort();
    for (_, _, ts, _, value) in &want {
        assert_eq!(*ts, base_ms + value_id(value) as i64, "the producer's own timestamp came back changed");
    }
    // Headers: `ringlog consume` does not print them, so only keys, values and timestamps here.
    let out = broker.cli(&["consume", "from-kafka", "--print-meta"], None).ok();
    let mut got = parse_cli_records(&out);
    got.sort();
    assert_eq!(
        got.len(),
        want.len(),
        "ringlog consume printed {} records, the Kafka client wrote {}",
        got.len(),
        want.len()
    );
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g, w, "ringlog consume differs from what the Kafka client wrote (codec in the value)");
    }

    // ringlog CLI → kcat.
    broker.cli(&["topic", "create", "from-ringlog", "--partitions", "2"], None).ok();
    let input = keyed_lines(0..3000);
    broker
        .cli(&["produce", "from-ringlog", "--key-separator", ":", "--acks", "all"], Some(input.as_bytes()))
        .ok();
    let mut native: Vec<(u32, i64, i64, String, String)> =
        parse_cli_records(&broker.cli(&["consume", "from-ringlog", "--print-meta"], None).ok());
    native.sort();
    let out = kcat(
        &broker,
        "kcat-consume",
        &["-C", "-e", "-q", "-t", "from-ringlog", "-f", "%p\t%o\t%T\t%k\t%s\n"],
        None,
    )
    .ok(&broker);
    let mut kafka: Vec<(u32, i64, i64, String, String)> = parse_cli_records(&out);
    kafka.sort();
    assert_eq!(kafka.len(), native.len(), "kcat read {} records, the CLI {}", kafka.len(), native.len());
    for (k, n) in kafka.iter().zip(&native) {
        assert_eq!(k, n, "kcat differs from ringlog consume");
    }
    let as_lines: String = kafka.iter().map(|(_, _, _, k, v)| format!("{k}:{v}\n")).collect();
    assert_eq!(sorted_lines(as_lines.as_bytes()), sorted_lines(input.as_bytes()));
    assert_no_panic(&broker);
}

/// A free loopback port, so the restarted broker's Kafka listener is where the producer was.
fn free_port() -> u16 {
    common::free_ports(1)[0]
}

#[test]
fn kill9_during_idempotent_production_keeps_every_acknowledged_record_exactly_once() {
    Client::ConfluentKafka.require();
    Client::Kcat.require();
    const TOPIC: &str = "durable";
    const RECORDS: u64 = 60_000;
    let port = free_port();
    let listen = format!("kafka_listen=127.0.0.1:{port}");
    let mut sets = BROKER_SETS.to_vec();
    sets.push(&listen);
    let mut broker = Broker::start(2, &sets);
    assert_eq!(broker.kafka, format!("127.0.0.1:{port}"));
    // No --durability: the topic gets the default policy, default_durability=fsync, so an
    // acks=all acknowledgement means the records were fsynced.
    broker.cli(&["topic", "create", TOPIC, "--partitions", "4"], None).ok();
    let describe = broker.cli(&["topic", "describe", TOPIC], None).ok();
    assert!(describe.lines().any(|l| l == "durability: fsync"), "{describe}");

    let acked_path = broker.dir.join("acked.tsv");
    let mut producer = python(
        &broker,
        "producer",
        "confluent_produce.py",
        &[
            "--bootstrap",
            &broker.kafka,
            "--topic",
            TOPIC,
            "--count",
            &RECORDS.to_string(),
            "--codecs",
            "none,lz4",
            "--chunk",
            "1000",
            "--pause-ms",
            "30",
            "--acked",
            acked_path.to_str().unwrap(),
        ],
    );
    let producer_stderr = producer.stderr.clone();
    wait_until(
        "10000 acknowledgements",
        || {
            producer.assert_not_failed();
            read(&acked_path).lines().filter(|l| l.starts_with("ACK")).count() >= 10_000
        },
        || format!("producer stderr:\n{}\n{}", tail(&read(&producer_stderr), 20), broker_problems(&broker)),
    );
    assert!(producer.running(), "the producer finished before the kill: nothing was in flight");
    broker.kill9();
    let acked_at_kill = read(&acked_path).lines().filter(|l| l.starts_with("ACK")).count();
    broker.restart();
    assert_eq!(broker.kafka, format!("127.0.0.1:{port}"), "the Kafka port moved on restart");

    let finished = producer.wait(SCRIPT_LIMIT);
    let (acks, failed) = read_acks(&acked_path);
    assert!(acks.len() >= acked_at_kill);
    let out = kcat(&broker, "kcat-consume", &["-C", "-e", "-q", "-t", TOPIC, "-f", "%p\t%o\t%k\t%s\n"], None)
        .ok(&broker);
    let mut found: HashMap<u64, Vec<(u32, i64)>> = HashMap::new();
    for (p, o, _, value) in parse_kcat_records(&out) {
        found.entry(value_id(&value)).or_default().push((p, o));
    }
    // Every acknowledged record is there exactly once, where its acknowledgement said.
    for (id, ack) in &acks {
        assert_eq!(
            found.get(id).map(Vec::as_slice),
            Some(&[(ack.partition, ack.offset)][..]),
            "acknowledged id {id} (at {}/{}) after the restart",
            ack.partition,
            ack.offset
        );
    }
    // An unacknowledged record may be there once or not at all, never twice.
    let twice: Vec<(&u64, &Vec<(u32, i64)>)> = found.iter().filter(|(_, at)| at.len() > 1).collect();
    assert!(twice.is_empty(), "records stored more than once: {:?}", &twice[..twice.len().min(10)]);
    assert!(found.keys().all(|id| *id < RECORDS));
    eprintln!(
        "{acked_at_kill} acknowledged at the kill, {} in all, {} stored, {} delivery failures; producer: {}",
        acks.len(),
        found.len(),
        failed.len(),
        finished.stdout.trim()
    );
    assert_no_panic(&broker);
    // And the idempotent producer, reconnecting to the restarted broker, delivered the rest.
    assert!(
        failed.is_empty() && finished.status.success(),
        "the producer did not deliver everything after the restart ({} acknowledged before the \
         kill, {} in all): {:?}\n{}\n--- stderr\n{}\n{}",
        acked_at_kill,
        acks.len(),
        &failed[..failed.len().min(5)],
        finished.stdout,
        tail(&finished.stderr, 20),
        broker_problems(&broker)
    );
}
