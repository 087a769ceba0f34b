//! Real Kafka clients through leader kills on a three-node cluster (issue 12's tests): unchanged
//! librdkafka (confluent-kafka), kafka-python 3 and kafkajs against three `ringlog serve`
//! processes, a replication-factor-3 topic whose partition-0 leader is killed with SIGKILL while
//! an idempotent producer writes and consumers read. Each client records what it did as a
//! history (tests/kafka/history_clients.py, tests/kafka/kafkajs_history.js), and the history
//! checker (scripts/checker/kafka_history.py, its own unit tests run here too) must find no lost
//! or duplicated write, no offset holding two values, no consumer skipping or going back, and no
//! offset reset or truncation reported by a client. Last, consumers placed past a cut-off
//! leader's truncation point must find it through OffsetForLeaderEpoch and resume at the new
//! leader's end of that epoch. `KEEP_KAFKA_HISTORY=DIR` keeps the histories and logs.
//!
//! The clients are installed by `.ci/run`; a missing one fails the test with the install command.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::{agreed_leader, free_ports, start_node_with, wait_for};
use common::relay::{Cut, PeerRelay};
use common::Broker;
use serde_json::Value;

const TOPIC: &str = "history";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn checker() -> PathBuf {
    repo().join("scripts").join("checker")
}

fn scripts_dir() -> PathBuf {
    repo().join("tests").join("kafka")
}

/// Fails the test, naming the install command, when `probe` does not run.
fn require(name: &str, mut probe: Command, install: &str) {
    let found = probe.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    assert!(found, "{name} is missing: install it with `{install}` (.ci/run does)");
}

fn require_python(module: &str, install: &str) {
    let mut probe = Command::new("python3");
    probe.args(["-c", &format!("import {module}")]);
    require(module, probe, install);
}

fn require_kafkajs() {
    let mut probe = Command::new("node");
    probe.args(["-e", "require('kafkajs')"]).current_dir(scripts_dir());
    require("kafkajs (node)", probe, "npm ci --prefix tests/kafka");
}

/// A client process, its output in files beside its history.
struct Proc {
    name: String,
    child: Option<Child>,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Proc {
    fn spawn(dir: &Path, name: &str, mut cmd: Command) -> Proc {
        let stdout = dir.join(format!("{name}.stdout"));
        let stderr = dir.join(format!("{name}.stderr"));
        cmd.stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .stdin(Stdio::null());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("{name}: cannot start {cmd:?}: {e}"));
        Proc { name: name.to_owned(), child: Some(child), stdout, stderr }
    }

    fn output(&self) -> String {
        format!(
            "--- {} stdout (tail)\n{}\n--- {} stderr (tail)\n{}",
            self.name,
            tail(&read(&self.stdout), 30),
            self.name,
            tail(&read(&self.stderr), 30)
        )
    }

    /// Fails the test at once if the process already exited unsuccessfully.
    #[track_caller]
    fn assert_running(&mut self) {
        let status = self.child.as_mut().and_then(|c| c.try_wait().unwrap());
        if let Some(status) = status {
            panic!("{} exited early ({status}):\n{}", self.name, self.output());
        }
    }

    /// SIGTERM, then waits for a successful exit within `limit`.
    #[track_caller]
    fn stop(&mut self, limit: Duration) {
        let mut child = self.child.take().expect("process running");
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{} did not stop within {limit:?}:\n{}", self.name, self.output());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "{} failed ({status}):\n{}", self.name, self.output());
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

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The complete lines of a history file (a client may be writing the last one).
fn events(path: &Path) -> Vec<Value> {
    let text = read(path);
    let complete = &text[..text.rfind('\n').map_or(0, |n| n + 1)];
    complete.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// (partition, offset, time) of every acknowledgement in a producer's history.
fn acks(path: &Path) -> Vec<(u64, i64, f64)> {
    events(path)
        .iter()
        .filter(|e| e["type"] == "ack")
        .map(|e| {
            (e["partition"].as_u64().unwrap(), e["offset"].as_i64().unwrap(), e["time"].as_f64().unwrap())
        })
        .collect()
}

/// The highest offset a consumer's history read, per partition.
fn last_reads(path: &Path) -> BTreeMap<u64, i64> {
    let mut last = BTreeMap::new();
    for e in events(path).iter().filter(|e| e["type"] == "poll") {
        for r in e["records"].as_array().unwrap() {
            let (p, o) = (r[0].as_u64().unwrap(), r[1].as_i64().unwrap());
            let at = last.entry(p).or_insert(o);
            *at = (*at).max(o);
        }
    }
    last
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

/// The checker's report on `histories`; fails the test when it cannot read them.
fn check(histories: &[&Path]) -> (bool, Value) {
    let out = Command::new("python3")
        .arg("-B")
        .arg(checker().join("kafka_history.py"))
        .args(histories)
        .output()
        .expect("python3 runs the checker");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "the checker printed no report ({e}, exit {}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), report)
}

/// `ringlog topic describe TOPIC --format json` through `node`.
fn describe(node: &Broker) -> Option<Value> {
    let out = common::run_cli(&node.addr, &["topic", "describe", TOPIC, "--format", "json"], None);
    out.status.success().then(|| serde_json::from_str(&out.stdout).ok()).flatten()
}

/// The leader `node` names for `partition` of TOPIC.
fn leader(node: &Broker, partition: usize) -> Option<u64> {
    describe(node)?["partitions"][partition]["leader"].as_u64()
}

/// The broker logs' panics, if any, and a few warnings: what a failure message should show.
fn broker_problems(nodes: &[Broker]) -> String {
    let mut out = String::new();
    for (i, node) in nodes.iter().enumerate() {
        let log = node.log();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
        out += &format!(
            "--- node {} log, last warnings/errors:\n{}\n",
            i + 1,
            lines[lines.len().saturating_sub(15)..].join("\n")
        );
    }
    out
}

fn assert_no_panic(nodes: &[Broker]) {
    for (i, node) in nodes.iter().enumerate() {
        let log = node.log();
        assert!(!log.contains("panicked"), "node {} panicked:\n{log}", i + 1);
    }
}

/// With KEEP_KAFKA_HISTORY=DIR, copies the test's histories, client output and broker logs
/// to DIR/<test> when dropped (pass or fail), for a look after the run.
struct KeepHistory {
    test: &'static str,
    dirs: Vec<PathBuf>,
}

impl Drop for KeepHistory {
    fn drop(&mut self) {
        let Some(root) = std::env::var_os("KEEP_KAFKA_HISTORY") else { return };
        let dest = PathBuf::from(root).join(self.test);
        let _ = std::fs::create_dir_all(&dest);
        for (i, dir) in self.dirs.iter().enumerate() {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.ends_with(".jsonl") || name.ends_with(".stdout") || name.ends_with(".stderr") {
                    let _ = std::fs::copy(entry.path(), dest.join(&name));
                } else if name == "broker.log" {
                    let _ = std::fs::copy(entry.path(), dest.join(format!("node-{}.log", i + 1)));
                }
            }
        }
        eprintln!("histories and logs kept in {}", dest.display());
    }
}

/// Three nodes whose Kafka listeners keep their ports across restarts (so a client's bootstrap
/// list stays right), a small `__consumer_offsets`, groups formed quickly; waits for the
/// controller, creates TOPIC (`partitions`, replication factor 3) and waits until every node
/// names a leader for each of its partitions. With a relay, the nodes' peers reach each other
/// through it (`relay` names each node's real peer port and the seeds naming the relay).
fn cluster_with_topic(
    partitions: u32,
    relay: Option<(&[u16], &str)>,
) -> (Vec<tempfile::TempDir>, Vec<Broker>, String) {
    let kafka_ports = free_ports(3);
    let extra = |i: usize| {
        let mut extra = vec![
            format!("kafka_listen=127.0.0.1:{}", kafka_ports[i]),
            "offsets_topic_partitions=3".to_string(),
            "group_initial_rebalance_delay_ms=300".to_string(),
        ];
        if let Some((peers, _)) = relay {
            extra.push(format!("peer_listen=127.0.0.1:{}", peers[i]));
            // A leader cut off answers its producers promptly instead of after 10 s.
            extra.push("replication_timeout_ms=2000".to_string());
        }
        extra
    };
    let seeds = match relay {
        Some((_, seeds)) => seeds.to_string(),
        None => free_ports(3)
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{}@127.0.0.1:{p}", i + 1))
            .collect::<Vec<_>>()
            .join(","),
    };
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes: Vec<Broker> =
        (0..3).map(|i| start_node_with(dirs[i].path(), i as u64 + 1, &seeds, &extra(i))).collect();
    let all: Vec<&Broker> = nodes.iter().collect();
    wait_for("a controller leader", &all, || agreed_leader(&all, 3));
    let partitions = partitions.to_string();
    common::run_cli(
        &nodes[0].addr,
        &["topic", "create", TOPIC, "--partitions", &partitions, "--replication-factor", "3"],
        None,
    )
    .ok();
    for node in &nodes {
        wait_for("every partition's leader on every node", &all, || {
            let d = describe(node)?;
            d["partitions"].as_array()?.iter().all(|p| p["leader"].as_u64().is_some()).then_some(())
        });
    }
    // One cluster to a Kafka client: every node names the cluster id `/v1/cluster` shows
    // (librdkafka warns of a client connected to several clusters otherwise).
    let ids: Vec<Option<String>> = nodes.iter().map(kafka_cluster_id).collect();
    let status = common::cluster::status(&nodes[0]).unwrap();
    assert!(ids.iter().all(|id| id.as_deref() == status["cluster_id"].as_str()), "{ids:?} vs {status}");
    let bootstrap = nodes.iter().map(|n| n.kafka.clone()).collect::<Vec<_>>().join(",");
    (dirs, nodes, bootstrap)
}

/// A pause in partition 0's acknowledgements at least this long is the outage a kill causes (a
/// new leader is elected after 10 to 20 Raft ticks of 50 ms).
const OUTAGE_S: f64 = 0.25;

/// What one kill of partition 0's leader showed.
struct Kill {
    node: u64,
    /// Seconds from the kill until a survivor's metadata named another leader.
    new_leader_named_s: f64,
    /// Seconds from the kill until the producer's first acknowledgement on partition 0 after
    /// the outage.
    first_ack_s: f64,
}

impl Kill {
    fn describe(&self) -> String {
        format!(
            "node {} (new leader named after {:.2} s, first acknowledgement after {:.2} s)",
            self.node, self.new_leader_named_s, self.first_ack_s
        )
    }
}

/// Kills partition 0's leader with SIGKILL, waits until the survivors name another leader and
/// the producer has `acks_after` acknowledgements on partition 0 since the kill, restarts the
/// node, waits until it is registered and alive again, names the same leader as the others and
/// has caught up, then for `acks_after` more acknowledgements.
fn kill_partition_leader(
    nodes: &mut [Broker],
    producer_history: &Path,
    acks_after: usize,
    producer: &mut Proc,
) -> Kill {
    let all: Vec<&Broker> = nodes.iter().collect();
    let old = wait_for("partition 0's leader", &all, || {
        let named: Vec<Option<u64>> = nodes.iter().map(|n| leader(n, 0)).collect();
        named.windows(2).all(|w| w[0] == w[1]).then_some(named[0]).flatten()
    });
    let victim = (old - 1) as usize;
    nodes[victim].kill9();
    let killed_at = unix_now();
    let started = Instant::now();
    let survivors: Vec<&Broker> =
        nodes.iter().enumerate().filter(|(i, _)| *i != victim).map(|(_, n)| n).collect();
    wait_for("the survivors to name a new leader of partition 0", &survivors, || {
        survivors.iter().all(|n| leader(n, 0).is_some_and(|l| l != old)).then_some(())
    });
    let new_leader_named_s = started.elapsed().as_secs_f64();
    let first_ack = wait_for("acknowledgements on partition 0 after the kill", &survivors, || {
        producer.assert_running();
        let mut times: Vec<f64> = acks(producer_history).iter().filter(|a| a.0 == 0).map(|a| a.2).collect();
        times.sort_by(f64::total_cmp);
        let after = times.partition_point(|&t| t <= killed_at);
        (times.len() - after >= acks_after).then(|| {
            // The first acknowledgement after the outage: a reply of the old leader read just
            // before the kill may still be handed to the client just after it.
            (after.max(1)..times.len())
                .find(|&i| times[i] - times[i - 1] >= OUTAGE_S)
                .map_or(times[after], |i| times[i])
        })
    });
    nodes[victim].restart();
    let all: Vec<&Broker> = nodes.iter().collect();
    let now_leader = wait_for("the killed node to rejoin", &all, || {
        agreed_leader(&all, 3)?;
        let named: Vec<Option<u64>> = nodes.iter().map(|n| leader(n, 0)).collect();
        named.windows(2).all(|w| w[0] == w[1]).then_some(named[0]).flatten()
    });
    // Caught up: its copy of partition 0 holds what the leader had committed once it rejoined,
    // while the producer goes on writing.
    let high_watermark = |node: &Broker| describe(node)?["partitions"][0]["high_watermark"].as_i64();
    let target =
        wait_for("the leader's high watermark", &all, || high_watermark(&nodes[(now_leader - 1) as usize]));
    wait_for("the restarted node to catch up", &all, || {
        producer.assert_running();
        (high_watermark(&nodes[victim])? >= target).then_some(())
    });
    // And takes writes with the others for a while.
    let acked = acks(producer_history).len();
    wait_for("acknowledgements with the node back", &all, || {
        producer.assert_running();
        (acks(producer_history).len() >= acked + acks_after).then_some(())
    });
    Kill { node: old, new_leader_named_s, first_ack_s: first_ack - killed_at }
}

/// Waits until each consumer history has read every partition at least to the producer's last
/// acknowledged offset in it.
fn wait_for_consumers(nodes: &[Broker], producer_history: &Path, consumers: &mut [(&Path, &mut Proc)]) {
    let mut ends: BTreeMap<u64, i64> = BTreeMap::new();
    for (p, o, _) in acks(producer_history) {
        let end = ends.entry(p).or_insert(o);
        *end = (*end).max(o);
    }
    let all: Vec<&Broker> = nodes.iter().collect();
    wait_for("the consumers to read up to the last acknowledged offsets", &all, || {
        let mut done = true;
        for (history, proc) in consumers.iter_mut() {
            proc.assert_running();
            let read = last_reads(history);
            done &= ends.iter().all(|(p, end)| read.get(p).is_some_and(|r| r >= end));
        }
        done.then_some(())
    });
}

#[test]
fn the_history_checker_finds_each_anomaly_in_hand_made_histories() {
    let out = Command::new("python3")
        .args(["-B", "-m", "unittest", "discover", "-s"])
        .arg(checker())
        .output()
        .expect("python3 runs the checker's unit tests");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the checker's unit tests failed:\n{stderr}");
    assert!(stderr.contains("OK"), "{stderr}");
}

#[test]
fn confluent_kafka_and_kafka_python_through_three_leader_kills() {
    require_python("confluent_kafka", "python3 -m pip install confluent-kafka==2.16.1");
    require_python("kafka", "python3 -m pip install kafka-python==3.0.12");
    let started = Instant::now();
    let (dirs, mut nodes, bootstrap) = cluster_with_topic(3, None);
    let _keep = KeepHistory { test: "confluent", dirs: dirs.iter().map(|d| d.path().to_owned()).collect() };
    let dir = dirs[0].path();
    let history = |name: &str| dir.join(format!("{name}.jsonl"));
    let client = |role: &str, extra: &[&str]| {
        let mut cmd = Command::new("python3");
        cmd.arg(scripts_dir().join("history_clients.py"))
            .args([role, "--bootstrap", &bootstrap, "--topic", TOPIC, "--history"])
            .arg(history(role))
            .args(extra)
            .env("PYTHONUNBUFFERED", "1");
        Proc::spawn(dir, role, cmd)
    };
    const CONSUMERS: [&str; 3] = ["reader", "assigned", "group"];
    let mut reader = client("reader", &[]);
    let mut assigned = client("assigned", &["--debug", "fetch"]);
    let mut group = client("group", &["--group", "history-readers"]);
    let mut producer = client("producer", &["--rate", "1500"]);
    let all: Vec<&Broker> = nodes.iter().collect();
    wait_for("the producer and the consumers to start", &all, || {
        for p in [&mut reader, &mut assigned, &mut group, &mut producer] {
            p.assert_running();
        }
        let reading = CONSUMERS.iter().all(|c| !last_reads(&history(c)).is_empty());
        (reading && acks(&history("producer")).len() >= 500).then_some(())
    });

    let kills: Vec<Kill> = (0..3)
        .map(|_| kill_partition_leader(&mut nodes, &history("producer"), 1000, &mut producer))
        .collect();
    producer.stop(Duration::from_secs(45));
    wait_for_consumers(
        &nodes,
        &history("producer"),
        &mut [
            (&history("reader"), &mut reader),
            (&history("assigned"), &mut assigned),
            (&history("group"), &mut group),
        ],
    );
    for consumer in [&mut reader, &mut assigned, &mut group] {
        consumer.stop(Duration::from_secs(20));
    }

    let histories: Vec<PathBuf> = ["producer"].iter().chain(&CONSUMERS).map(|c| history(c)).collect();
    let (valid, report) = check(&histories.iter().map(PathBuf::as_path).collect::<Vec<_>>());
    // librdkafka's answers to its OffsetForLeaderEpoch questions after the leader changes.
    let validated = read(&dir.join("assigned.stderr"))
        .lines()
        .filter(|l| l.contains("offset and epoch validation succeeded"))
        .count();
    eprintln!(
        "{} acknowledged; kills: {}; librdkafka validated its positions {validated} times; in {:.1} s",
        report["stats"]["acked"],
        kills.iter().map(Kill::describe).collect::<Vec<_>>().join(", "),
        started.elapsed().as_secs_f64()
    );
    assert!(valid, "the history holds anomalies:\n{report:#}\n{}", broker_problems(&nodes));
    // Every consumer read every partition to its last record; with no skip and no backward
    // step from its starting positions, each read every record, in order.
    let last = &report["stats"]["last_offset"];
    for consumer in CONSUMERS {
        assert_eq!(&report["stats"]["last_read"][consumer], last, "{consumer} stopped short: {report:#}");
    }
    assert_eq!(report["stats"]["failed"], 0, "deliveries failed: {report:#}");
    assert!(validated >= 1, "librdkafka never validated a position through OffsetForLeaderEpoch");
    for client in ["producer", "assigned", "group"] {
        let stderr = read(&dir.join(format!("{client}.stderr")));
        assert!(
            !stderr.contains("different ClusterId"),
            "{client} saw several clusters:\n{}",
            tail(&stderr, 20)
        );
    }
    assert_no_panic(&nodes);
}

#[test]
fn kafkajs_producer_and_group_through_a_leader_kill() {
    require_kafkajs();
    let started = Instant::now();
    let (dirs, mut nodes, bootstrap) = cluster_with_topic(3, None);
    let _keep = KeepHistory { test: "kafkajs", dirs: dirs.iter().map(|d| d.path().to_owned()).collect() };
    let dir = dirs[0].path();
    let history = dir.join("kafkajs.jsonl");
    let mut cmd = Command::new("node");
    cmd.arg("kafkajs_history.js")
        .args([&bootstrap, TOPIC])
        .arg(&history)
        .arg("400")
        .current_dir(scripts_dir());
    let mut client = Proc::spawn(dir, "kafkajs", cmd);
    let all: Vec<&Broker> = nodes.iter().collect();
    wait_for("kafkajs to produce and consume", &all, || {
        client.assert_running();
        (!last_reads(&history).is_empty() && acks(&history).len() >= 500).then_some(())
    });

    let kill = kill_partition_leader(&mut nodes, &history, 300, &mut client);
    client.stop(Duration::from_secs(45));

    let (valid, report) = check(&[&history]);
    eprintln!(
        "{} acknowledged; kill: {}; in {:.1} s",
        report["stats"]["acked"],
        kill.describe(),
        started.elapsed().as_secs_f64()
    );
    assert!(valid, "the history holds anomalies:\n{report:#}\n{}", broker_problems(&nodes));
    assert_eq!(
        report["stats"]["last_read"]["kafkajs-consumer"], report["stats"]["last_offset"],
        "the consumer stopped short: {report:#}"
    );
    assert_eq!(report["stats"]["failed"], 0, "sends failed: {report:#}");
    assert_no_panic(&nodes);
}

/// tests/kafka/history_clients.py ROLE as process `name`, its history in `dir/name.jsonl`.
fn python_client(dir: &Path, bootstrap: &str, role: &str, name: &str, extra: &[&str]) -> Proc {
    let mut cmd = Command::new("python3");
    cmd.arg(scripts_dir().join("history_clients.py"))
        .args([role, "--bootstrap", bootstrap, "--topic", TOPIC, "--name", name, "--history"])
        .arg(dir.join(format!("{name}.jsonl")))
        .args(extra)
        .env("PYTHONUNBUFFERED", "1");
    Proc::spawn(dir, name, cmd)
}

/// Runs a client to its successful exit (at most a minute).
#[track_caller]
fn run_to_end(mut proc: Proc) {
    let mut child = proc.child.take().expect("process running");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{} did not finish within a minute:\n{}", proc.name, proc.output());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{} failed ({status}):\n{}", proc.name, proc.output());
}

/// The cluster id in `node`'s Kafka Metadata.
fn kafka_cluster_id(node: &Broker) -> Option<String> {
    let request = kafka_protocol::messages::MetadataRequest::default().with_topics(Some(vec![]));
    let response = common::kafka::KafkaConn::connect(&node.kafka).call(9, &request);
    response.cluster_id.map(|id| id.to_string())
}

/// Kafka's OffsetForLeaderEpoch for partition 0 of TOPIC at `node`: (error, end offset).
fn epoch_end(node: &Broker, epoch: i32) -> (i16, i64) {
    use kafka_protocol::messages::offset_for_leader_epoch_request::{
        OffsetForLeaderPartition, OffsetForLeaderTopic,
    };
    use kafka_protocol::messages::{BrokerId, OffsetForLeaderEpochRequest, TopicName};
    let request = OffsetForLeaderEpochRequest::default().with_replica_id(BrokerId(-1)).with_topics(vec![
        OffsetForLeaderTopic::default().with_topic(TopicName(common::kafka::s(TOPIC))).with_partitions(vec![
            OffsetForLeaderPartition::default()
                .with_partition(0)
                .with_current_leader_epoch(-1)
                .with_leader_epoch(epoch),
        ]),
    ]);
    let response = common::kafka::KafkaConn::connect(&node.kafka).call(3, &request);
    let answer = &response.topics[0].partitions[0];
    (answer.error_code, answer.end_offset)
}

/// Issue 12's last test: a leader cut off from its peers takes writes it can never commit, the
/// others elect a leader and take more, and the cut heals (the old leader's suffix is replaced).
/// A librdkafka consumer that was reading from the cut-off leader validates its position with
/// the new leader through OffsetForLeaderEpoch and goes on where it was: ringlog never served
/// it the uncommitted records, so nothing it read was truncated. Then a librdkafka and a
/// kafka-python consumer are placed where a consumer that had read those records would stand
/// (their offset with the old leader epoch; ringlog itself never serves such records, as
/// tests/cluster.rs checks). Both must find the truncation through OffsetForLeaderEpoch and
/// go on at the new leader's end of that epoch: not the log's beginning, not its end.
#[test]
fn consumers_past_a_cut_off_leaders_truncation_point_find_it_and_resume_at_the_epoch_boundary() {
    require_python("confluent_kafka", "python3 -m pip install confluent-kafka==2.16.1");
    require_python("kafka", "python3 -m pip install kafka-python==3.0.12");
    let started = Instant::now();
    let peers = free_ports(3);
    let (relay, seeds) = PeerRelay::start(&peers);
    let (dirs, nodes, bootstrap) = cluster_with_topic(1, Some((&peers, &seeds)));
    let _keep = KeepHistory { test: "truncation", dirs: dirs.iter().map(|d| d.path().to_owned()).collect() };
    let dir = dirs[0].path();
    let history = |name: &str| dir.join(format!("{name}.jsonl"));
    let all: Vec<&Broker> = nodes.iter().collect();

    // 100 committed records, read by a consumer that stays on.
    run_to_end(python_client(dir, &bootstrap, "producer", "before", &["--count", "100", "--rate", "1000"]));
    let mut live = python_client(dir, &bootstrap, "assigned", "live", &["--debug", "fetch"]);
    let committed_end = acks(&history("before")).iter().map(|a| a.1).max().unwrap() + 1;
    wait_for("the live consumer to read the 100 records", &all, || {
        live.assert_running();
        (last_reads(&history("live")).get(&0) == Some(&(committed_end - 1))).then_some(())
    });
    let d = describe(&nodes[0]).unwrap();
    let (old, old_epoch) = (
        d["partitions"][0]["leader"].as_u64().unwrap(),
        d["partitions"][0]["leader_epoch"].as_i64().unwrap(),
    );
    let isolated = &nodes[(old - 1) as usize];
    let majority: Vec<&Broker> = nodes.iter().filter(|n| !std::ptr::eq(*n, isolated)).collect();

    // Cut off, the leader takes three writes into its log that no majority can commit.
    relay.isolate(old, Cut::Silent);
    let mut conns: Vec<common::wire::Conn> =
        (0..3).map(|_| common::wire::Conn::connect(&isolated.addr)).collect();
    for (i, conn) in conns.iter_mut().enumerate() {
        let batch = common::wire::batch_now(&[format!("uncommitted-{i}").as_bytes()]);
        conn.send_raw(&common::wire::produce_frame(1, TOPIC, 0, -1, &batch));
    }
    for conn in &mut conns {
        let (code, _) = common::wire::produce_result(&conn.recv().unwrap());
        assert_ne!(code, ringlog::protocol::wire::ErrorCode::None, "an uncommitted write was acknowledged");
    }
    // Where a consumer that had read them would stand.
    let past_truncation = committed_end + 3;

    // The others elect a leader, whose leader-change record starts its epoch; then the cut
    // heals, the old leader's suffix is replaced, and 200 records are written. (Not during the
    // cut: librdkafka asks one connected broker for metadata, and kept asking the cut-off one,
    // which knows no leader, until its messages timed out.)
    wait_for("a new leader on the majority side", &majority, || {
        majority.iter().all(|n| leader(n, 0).is_some_and(|l| l != old)).then_some(())
    });
    relay.heal();
    let new_leader = wait_for("every node to name the new leader", &all, || {
        let named: Vec<Option<u64>> = nodes.iter().map(|n| leader(n, 0)).collect();
        named.windows(2).all(|w| w[0] == w[1]).then_some(named[0]).flatten().filter(|&l| l != old)
    });
    run_to_end(python_client(dir, &bootstrap, "producer", "after", &["--count", "200", "--rate", "1000"]));
    let (code, boundary) = epoch_end(&nodes[(new_leader - 1) as usize], old_epoch as i32);
    assert_eq!(code, 0, "OffsetForLeaderEpoch of epoch {old_epoch} at the new leader");
    assert!(
        (committed_end..past_truncation).contains(&boundary),
        "epoch {old_epoch} ends at {boundary} on the new leader: not between the committed end \
         {committed_end} and the cut-off leader's log end {past_truncation}"
    );

    let position = ["--start", &past_truncation.to_string(), "--epoch", &old_epoch.to_string()];
    let mut librdkafka = python_client(
        dir,
        &bootstrap,
        "assigned",
        "positioned-librdkafka",
        &[&position[..], &["--debug", "fetch,topic"]].concat(),
    );
    let mut kafka_python = python_client(dir, &bootstrap, "reader", "positioned-kafka-python", &position);
    let end = acks(&history("after")).iter().map(|a| a.1).max().unwrap();
    let first_after = acks(&history("after")).iter().map(|a| a.1).min().unwrap();
    wait_for("every consumer to read the new leader's records", &all, || {
        let mut done = true;
        for (name, proc) in [
            ("live", &mut live),
            ("positioned-librdkafka", &mut librdkafka),
            ("positioned-kafka-python", &mut kafka_python),
        ] {
            proc.assert_running();
            done &= last_reads(&history(name)).get(&0).is_some_and(|&o| o >= end);
        }
        done.then_some(())
    });
    for proc in [&mut live, &mut librdkafka, &mut kafka_python] {
        proc.stop(Duration::from_secs(20));
    }

    let names = ["before", "after", "live", "positioned-librdkafka", "positioned-kafka-python"];
    let histories: Vec<PathBuf> = names.iter().map(|n| history(n)).collect();
    let (_, report) = check(&histories.iter().map(PathBuf::as_path).collect::<Vec<_>>());
    let validated = read(&dir.join("live.stderr"))
        .lines()
        .filter(|l| l.contains("offset and epoch validation succeeded"))
        .count();
    eprintln!(
        "committed end {committed_end}, cut-off leader's log end {past_truncation}, epoch {old_epoch} ends at \
         {boundary} on the new leader; the live consumer validated its position {validated} times; in {:.1} s\n{report:#}",
        started.elapsed().as_secs_f64()
    );
    // Nothing but the truncations the placed consumers were put in front of. The live consumer
    // went on where it was (librdkafka validates its position with the new leader when it
    // learns the new epoch while fetching, and skips it when it learned it while no leader was
    // known: `validated` says which).
    let mut anomalies = report["anomalies"].as_object().unwrap().clone();
    let truncations = anomalies.remove("truncation").and_then(|t| t.as_u64()).unwrap_or(0);
    assert!(
        anomalies.values().all(|c| c == 0),
        "the history holds anomalies:\n{report:#}\n{}",
        broker_problems(&nodes)
    );
    // Each placed consumer found the truncation and went on at the epoch's end on the new
    // leader; the live one found none.
    for name in ["positioned-librdkafka", "positioned-kafka-python"] {
        let events = events(&history(name));
        let found = events.iter().filter(|e| e["type"] == "truncation").count();
        assert!(found >= 1, "{name} did not detect the truncation: {events:?}");
        let resumed: Vec<i64> = events
            .iter()
            .filter(|e| e["type"] == "assign")
            .filter_map(|e| e["positions"]["0"].as_i64())
            .collect();
        assert_eq!(
            resumed.last(),
            Some(&boundary),
            "{name} went on elsewhere than the epoch's end: {resumed:?}"
        );
        let first_read = events
            .iter()
            .filter(|e| e["type"] == "poll")
            .flat_map(|e| e["records"].as_array().unwrap().clone())
            .map(|r| r[1].as_i64().unwrap())
            .min();
        // The first record after the boundary (a leader-change record is there) is the first
        // the new leader took.
        assert_eq!(first_read, Some(first_after), "{name}: first read");
        assert_eq!(report["stats"]["last_read"][name]["0"], report["stats"]["last_offset"]["0"]);
    }
    assert!(
        events(&history("live")).iter().all(|e| e["type"] != "truncation"),
        "the live consumer, which read only committed records, was told of a truncation"
    );
    assert_eq!(
        truncations as usize,
        ["positioned-librdkafka", "positioned-kafka-python"]
            .iter()
            .map(|n| events(&history(n)).iter().filter(|e| e["type"] == "truncation").count())
            .sum::<usize>()
    );
    assert_no_panic(&nodes);
}
