//! A cluster of three real `ringlog serve` processes on loopback (issue 11, step 2): the nodes
//! find each other through `--seeds`, elect a controller leader, register every node in the
//! controller's replicated log, elect a new leader when the leader is killed with SIGKILL, take the
//! killed node back, keep the registry across a restart of all three, and refuse a node of
//! another cluster at the handshake. A replicated topic (issue 11, step 3): created through any
//! node, placed by the controller's log, written with acks=all and read back through both the
//! native client and Kafka's Metadata, through the death of a partition's leader, a restart that
//! catches up, and a deletion that removes every node's files.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::Broker;
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::{InitProducerIdRequest, MetadataRequest, ProducerId, TopicName};
use ringlog::protocol::wire;
use serde_json::Value;

/// Free loopback ports for the peer listeners (bound and released; the brokers bind them again).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    listeners.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

fn get(admin: &str, path: &str) -> Option<(String, String)> {
    let mut stream = TcpStream::connect(admin).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.to_string(), body.to_string()))
}

fn status(node: &Broker) -> Option<Value> {
    let (line, body) = get(&node.admin, "/v1/cluster")?;
    assert!(line.contains("200"), "{line}: {body}");
    serde_json::from_str(&body).ok()
}

fn wait_for<T>(what: &str, nodes: &[&Broker], mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if let Some(value) = check() {
            return value;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = nodes.iter().map(|n| n.log()).collect();
            panic!("timed out waiting for {what}; logs:\n{}", logs.join("\n-----\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The leader every given node agrees on, once each sees `expected` nodes registered and alive.
fn agreed_leader(nodes: &[&Broker], expected: usize) -> Option<u64> {
    let mut leaders = Vec::new();
    for node in nodes {
        let s = status(node)?;
        let listed = s["nodes"].as_array()?;
        let up = listed.iter().filter(|n| n["alive"] == true && n["registered"] == true).count();
        if up != expected {
            return None;
        }
        leaders.push(s["controller_leader"].as_u64()?);
    }
    leaders.windows(2).all(|w| w[0] == w[1]).then(|| leaders[0])
}

fn start_node(dir: &std::path::Path, id: u64, seeds: &str) -> Broker {
    let sets = [
        format!("node_id={id}"),
        format!("seeds={seeds}"),
        "admin_listen=127.0.0.1:0".to_string(),
        "raft_tick_ms=50".to_string(),
    ];
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    Broker::start_in(dir, 1, &sets)
}

/// Nodes 1, 2 and 3 on loopback, each with its own data directory: their peer ports, their
/// directories (kept while the test runs) and the running brokers.
fn start_three() -> (Vec<u16>, Vec<tempfile::TempDir>, Vec<Broker>) {
    let ports = free_ports(3);
    let seeds: Vec<String> =
        ports.iter().enumerate().map(|(i, p)| format!("{}@127.0.0.1:{p}", i + 1)).collect();
    let seeds = seeds.join(",");
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes = (0..3).map(|i| start_node(dirs[i].path(), i as u64 + 1, &seeds)).collect();
    (ports, dirs, nodes)
}

#[test]
fn three_nodes_elect_a_controller_survive_its_death_and_keep_their_registry() {
    let (ports, _dirs, mut nodes) = start_three();

    let all: Vec<&Broker> = nodes.iter().collect();
    let leader = wait_for("three nodes to agree on a controller leader", &all, || agreed_leader(&all, 3));
    let (line, body) = get(&nodes[0].admin, "/health").unwrap();
    assert!(line.contains("200") && body.contains("in the cluster"), "{line}: {body}");
    let text = common::run_cli(&nodes[0].addr, &["cluster", "status", "--admin", &nodes[0].admin], None).ok();
    assert!(text.contains(&format!("controller leader {leader}")), "{text}");
    // Each node counts the Raft traffic it sends each peer (keepalives to all; Raft messages
    // between the leader and each follower, none between followers), and nothing for itself.
    let view = status(&nodes[0]).unwrap();
    for node in view["nodes"].as_array().unwrap() {
        if node["id"] == 1 {
            assert!(node["sent"].is_null(), "{view}");
            continue;
        }
        let frames = node["sent"]["frames"].as_u64().unwrap_or(0);
        assert!(frames > 0 && node["sent"]["bytes"].as_u64().unwrap_or(0) > 0, "{view}");
        if leader == 1 || node["id"] == leader {
            assert!(node["sent"]["messages"].as_u64().unwrap_or(0) > 0, "{view}");
        }
    }
    let (_, metrics) = get(&nodes[0].admin, "/metrics").unwrap();
    for peer in [2, 3] {
        let line = format!("ringlog_raft_frames_sent_total{{peer=\"{peer}\"}} ");
        assert!(metrics.lines().any(|l| l.starts_with(&line)), "no {line} in /metrics");
    }

    // The leader dies without a word: the other two elect a new one among themselves.
    let dead = (leader - 1) as usize;
    nodes[dead].kill9();
    let survivors: Vec<&Broker> =
        nodes.iter().enumerate().filter(|(i, _)| *i != dead).map(|(_, n)| n).collect();
    let next = wait_for("a new controller leader", &survivors, || {
        let leaders: Vec<u64> =
            survivors.iter().filter_map(|n| status(n)?["controller_leader"].as_u64()).collect();
        (leaders.len() == 2 && leaders[0] == leaders[1] && leaders[0] != leader).then(|| leaders[0])
    });
    let view = status(survivors[0]).unwrap();
    let dead_view = view["nodes"].as_array().unwrap().iter().find(|n| n["id"] == leader).unwrap().clone();
    assert_eq!(dead_view["registered"], true, "{view}");

    // It comes back (with a new native port) and rejoins under the new leader.
    nodes[dead].restart();
    let all: Vec<&Broker> = nodes.iter().collect();
    let after = wait_for("the killed node to rejoin", &all, || agreed_leader(&all, 3));
    assert_eq!(after, next);
    let new_native = nodes[dead].addr.clone();
    wait_for("the rejoined node's new address to be registered", &all, || {
        let s = status(&nodes[(next - 1) as usize])?;
        let entry = s["nodes"].as_array()?.iter().find(|n| n["id"] == leader)?.clone();
        (entry["native"] == new_native.as_str()).then_some(())
    });

    // All three stop cleanly and start again: the registry comes back from the controller's log.
    for node in &mut nodes {
        node.stop();
    }
    for node in &mut nodes {
        node.restart();
    }
    let all: Vec<&Broker> = nodes.iter().collect();
    wait_for("a controller leader after a full restart", &all, || agreed_leader(&all, 3));

    // A node of another cluster (other seeds) is refused at the handshake.
    let port = free_ports(1)[0];
    let stranger_seeds = format!("9@127.0.0.1:{port},1@127.0.0.1:{}", ports[0]);
    let stranger_dir = tempfile::tempdir().unwrap();
    let mut stranger = start_node(stranger_dir.path(), 9, &stranger_seeds);
    wait_for("node 1 to refuse the stranger", &[&nodes[0]], || {
        nodes[0].log().contains("refused peer 9: cluster id").then_some(())
    });
    let (line, _) = get(&stranger.admin, "/health").unwrap();
    assert!(line.contains("503"), "a node without a majority has no controller: {line}");
    let listed = status(&nodes[0]).unwrap();
    assert!(listed["nodes"].as_array().unwrap().iter().all(|n| n["id"] != 9), "{listed}");
    stranger.stop();
    for node in &mut nodes {
        node.stop();
    }
}

#[test]
fn bad_seeds_are_refused_at_start_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    for (seeds, reason) in [
        ("2@127.0.0.1:1", "this node's id 1 is not among the seeds"),
        ("1@nowhere", "is not an address"),
        ("1@127.0.0.1:1,1@127.0.0.1:2", "listed twice"),
    ] {
        let output = std::process::Command::new(common::BIN)
            .args(["serve", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--seeds", seeds, "--listen", "127.0.0.1:0", "--kafka-listen", "off"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{seeds}: {stderr}");
        assert!(stderr.contains(reason), "{seeds}: {stderr}");
    }
}

/// `ringlog topic describe NAME` on `node`: per partition (leader, high watermark), once every
/// partition shows a leader.
fn leaders(node: &Broker, topic: &str) -> Option<Vec<(u64, i64)>> {
    let out = common::run_cli(&node.addr, &["topic", "describe", topic], None);
    if !out.status.success() {
        return None;
    }
    let rows: Vec<(u64, i64)> = out
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with("PARTITION"))
        .skip(1)
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols[4].parse().unwrap_or(0), cols[3].parse().unwrap_or(-1))
        })
        .collect();
    rows.iter().all(|&(leader, _)| leader != 0).then_some(rows)
}

/// The values `ringlog consume` reads from `topic` through `node`, from the beginning.
fn consume_all(node: &Broker, topic: &str) -> Vec<String> {
    let out = common::run_cli(&node.addr, &["consume", topic, "--from", "beginning"], None).ok();
    out.lines().map(str::to_owned).collect()
}

fn lines(from: usize, to: usize) -> String {
    (from..to).map(|i| format!("like-{i}\n")).collect()
}

#[test]
fn a_replicated_topic_keeps_every_acknowledged_record_through_its_leaders_death() {
    let (_, dirs, mut nodes) = start_three();
    let all: Vec<&Broker> = nodes.iter().collect();
    let controller = wait_for("a controller leader", &all, || agreed_leader(&all, 3));

    // Created through a node that does not lead the controller: the client follows the
    // metadata to the one that does.
    let other =
        nodes.iter().find(|n| status(n).and_then(|s| s["node_id"].as_u64()) != Some(controller)).unwrap();
    let created = common::run_cli(
        &other.addr,
        &["topic", "create", "post-likes", "--partitions", "3", "--replication-factor", "3"],
        None,
    )
    .ok();
    assert!(created.contains("3 partitions"), "{created}");
    let refused = common::run_cli(
        &other.addr,
        &["topic", "create", "wide", "--partitions", "1", "--replication-factor", "4"],
        None,
    );
    assert!(
        !refused.status.success() && refused.stderr.contains("replication factor 4"),
        "{}",
        refused.stderr
    );

    let all: Vec<&Broker> = nodes.iter().collect();
    for node in &nodes {
        wait_for("every partition to have a leader on every node", &all, || leaders(node, "post-likes"));
    }
    // __consumer_offsets' partitions, created by the controller beside it, elect leaders too.
    for node in &nodes {
        wait_for("no leaderless partition", &all, || {
            (status(node)?["leaderless_partitions"] == 0).then_some(())
        });
    }
    // Only the leader takes a partition's requests: a follower answers NotLeader (naming the
    // leader) to a produce and a fetch; the leader refuses a damaged batch before it reaches
    // the Raft log. None of these leaves a record behind (the count below is exact).
    let described = leaders(&nodes[0], "post-likes").unwrap();
    let leader_of_0 = &nodes[(described[0].0 - 1) as usize];
    let follower_of_0 = &nodes[(described[0].0 % 3) as usize];
    let mut follower = common::wire::Conn::connect(&follower_of_0.addr);
    let (code, _) = follower.produce("post-likes", 0, &[b"misrouted"]);
    assert_eq!(code, wire::ErrorCode::NotLeader);
    assert_eq!(follower.fetch("post-likes", 0, 0, 0).error, wire::ErrorCode::NotLeader);
    let mut leader = common::wire::Conn::connect(&leader_of_0.addr);
    let mut damaged = common::wire::batch_now(&[b"damaged"]);
    let last = damaged.len() - 1;
    damaged[last] ^= 0xff;
    let answer = leader.produce_raw("post-likes", 0, &damaged).unwrap();
    assert_eq!(common::wire::produce_result(&answer).0, wire::ErrorCode::CorruptBatch);

    // Kafka clients see the same cluster: every node a broker under its node id, each
    // partition's leader, epoch and replicas, the controller's leader.
    let mut kafka = common::kafka::KafkaConn::connect(&nodes[0].kafka);
    let topic = MetadataRequestTopic::default().with_name(Some(TopicName(common::kafka::s("post-likes"))));
    let metadata = kafka.call(9, &MetadataRequest::default().with_topics(Some(vec![topic])));
    let mut brokers: Vec<i32> = metadata.brokers.iter().map(|b| b.node_id.0).collect();
    brokers.sort_unstable();
    assert_eq!(brokers, vec![1, 2, 3]);
    assert_eq!(metadata.controller_id.0 as u64, controller);
    let partitions = &metadata.topics[0].partitions;
    assert_eq!(partitions.len(), 3);
    for (p, partition) in partitions.iter().enumerate() {
        assert_eq!(partition.leader_id.0 as u64, described[p].0, "partition {p}");
        assert!(partition.leader_epoch >= 1 && partition.replica_nodes.len() == 3, "{partition:?}");
    }

    // Idempotent producers get ids no other node hands out: each carries its node's id.
    for (i, node) in nodes.iter().enumerate() {
        let mut kafka = common::kafka::KafkaConn::connect(&node.kafka);
        let request = InitProducerIdRequest::default()
            .with_transactional_id(None)
            .with_transaction_timeout_ms(60_000)
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1);
        let answer = kafka.call(4, &request);
        assert_eq!(answer.error_code, 0, "{answer:?}");
        assert_eq!(answer.producer_id.0 % 65_536, i as i64 + 1, "{answer:?}");
    }

    common::run_cli(
        &nodes[0].addr,
        &["produce", "post-likes", "--acks", "all"],
        Some(lines(0, 300).as_bytes()),
    )
    .ok();
    let mut read = consume_all(&nodes[1], "post-likes");
    read.sort();
    let mut expected: Vec<String> = lines(0, 300).lines().map(str::to_owned).collect();
    expected.sort();
    assert_eq!(read, expected);

    // The leader of partition 0 dies without a word; the other two elect a new one and take
    // writes; nothing acknowledged before is lost.
    let before = leaders(&nodes[0], "post-likes").unwrap();
    let dead = (before[0].0 - 1) as usize;
    nodes[dead].kill9();
    let survivor = &nodes[(dead + 1) % 3];
    let survivors: Vec<&Broker> =
        nodes.iter().enumerate().filter(|(i, _)| *i != dead).map(|(_, n)| n).collect();
    wait_for("a new leader of partition 0", &survivors, || {
        let now = leaders(survivor, "post-likes")?;
        (now[0].0 != before[0].0 && now.iter().all(|&(l, _)| l != before[0].0)).then_some(())
    });
    common::run_cli(
        &survivor.addr,
        &["produce", "post-likes", "--acks", "all"],
        Some(lines(300, 600).as_bytes()),
    )
    .ok();
    let mut read = consume_all(survivor, "post-likes");
    read.sort();
    let mut expected: Vec<String> = lines(0, 600).lines().map(str::to_owned).collect();
    expected.sort();
    assert_eq!(read, expected, "every acknowledged record, once");

    // It comes back and catches up: its copy of every partition reaches the leaders' high
    // watermark.
    nodes[dead].restart();
    let all: Vec<&Broker> = nodes.iter().collect();
    let target = leaders(&nodes[(dead + 1) % 3], "post-likes").unwrap();
    wait_for("the restarted node to catch up", &all, || {
        let mine = leaders(&nodes[dead], "post-likes")?;
        mine.iter().zip(&target).all(|(m, t)| m.1 == t.1).then_some(())
    });

    // Deleted through any node: gone everywhere, files included.
    common::run_cli(&nodes[dead].addr, &["topic", "delete", "post-likes"], None).ok();
    for (i, node) in nodes.iter().enumerate() {
        wait_for("the topic to be gone everywhere", &all, || {
            let out = common::run_cli(&node.addr, &["topic", "list"], None).ok();
            let dir = dirs[i].path().join("replicated");
            let left = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
            (!out.lines().any(|l| l == "post-likes") && left == 0).then_some(())
        });
    }
    for node in &mut nodes {
        node.stop();
    }
}
