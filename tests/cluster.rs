//! A cluster of three real `ringlog serve` processes on loopback (issue 11, step 2): the nodes
//! find each other through `--seeds`, elect a controller leader, register every node in the
//! controller's replicated log, elect a new leader when the leader is killed with SIGKILL, take the
//! killed node back, keep the registry across a restart of all three, and refuse a node of
//! another cluster at the handshake. A replicated topic (issue 11, step 3): created through any
//! node, placed by the controller's log, written with acks=all and read back through both the
//! native client and Kafka's Metadata, through the death of a partition's leader, a restart that
//! catches up, and a deletion that removes every node's files; 100,000 keyed records (test 1)
//! stored byte for byte alike on every replica and read back in per-key order.
//!
//! Faults (issue 11, tests 3 and 4): a follower frozen with SIGSTOP while its leader commits
//! with the other follower catches up to byte-identical segment files; a leader cut off from its
//! peers (a relay in this process stands between the peer listeners, so clients still reach it)
//! acknowledges and serves nothing it took but could not commit, and after the cut heals its
//! files hold the new leader's log; the controller's leader killed with SIGKILL, topics are
//! still created and deleted through the others, and after a restart of all three the topics
//! and records are back and a deleted topic stays deleted.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{
    agreed_leader, free_ports, get, signal, start_node, start_node_with, start_three, start_three_with,
    status, wait_for,
};
use common::relay::{Cut, PeerRelay};
use common::Broker;
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::{InitProducerIdRequest, MetadataRequest, ProducerId, TopicName};
use ringlog::protocol::wire;

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
    assert!(metrics.lines().any(|l| l.starts_with("ringlog_raft_elections_running ")), "{metrics}");

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

/// `topic`'s replicated directories under `data_dir` (`replicated/<name>.<id hex>`).
fn replica_topic_dirs(data_dir: &std::path::Path, topic: &str) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(data_dir.join("replicated")) else { return Vec::new() };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name.rsplit_once('.').is_some_and(|(name, _)| name == topic)
        })
        .collect()
}

/// A node's segment files of its replica of `topic`/`partition`, in offset order.
fn segment_files(node: &Broker, topic: &str, partition: u32) -> Vec<std::path::PathBuf> {
    let dirs = replica_topic_dirs(&node.data_dir(), topic);
    assert_eq!(dirs.len(), 1, "one directory of {topic} in {}: {dirs:?}", node.data_dir().display());
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(dirs[0].join(partition.to_string()))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    files
}

/// The batches a node's replica of `topic`/`partition` holds below offset `below`, read from its
/// segment files directly (every `.log` in offset order, each batch's CRC checked, a file's scan
/// ending where its batches end): what the replica stored, not what it serves.
fn stored_batches(node: &Broker, topic: &str, partition: u32, below: i64) -> Vec<(i64, Vec<u8>)> {
    let mut stored = Vec::new();
    for file in segment_files(node, topic, partition) {
        let bytes = std::fs::read(&file).unwrap();
        for batch in ringlog::record::batches(&bytes) {
            let Ok((header, raw)) = batch else { break };
            if header.last_offset() >= below {
                return stored;
            }
            stored.push((header.base_offset, raw.to_vec()));
        }
    }
    stored
}

/// Whether any of `batches` holds a record whose value starts with `prefix`.
fn holds_value(batches: &[(i64, Vec<u8>)], prefix: &[u8]) -> bool {
    batches.iter().any(|(_, raw)| {
        ringlog::record::reader::records(raw)
            .unwrap()
            .any(|r| r.unwrap().value.is_some_and(|v| v.starts_with(prefix)))
    })
}

/// Waits until every node's replica of `topic` reports the same high watermark for every
/// partition and a leader; returns them.
fn converged(nodes: &[&Broker], topic: &str) -> Vec<(u64, i64)> {
    wait_for("every replica to reach the same high watermark", nodes, || {
        let views: Vec<Vec<(u64, i64)>> = nodes.iter().map(|n| leaders(n, topic)).collect::<Option<_>>()?;
        let first = &views[0];
        views.iter().all(|v| v.iter().zip(first).all(|(a, b)| a.1 == b.1)).then(|| first.clone())
    })
}

#[test]
fn a_follower_stopped_while_its_leader_takes_writes_catches_up_to_the_same_bytes() {
    // Batches up to 1 MiB and segments of 1 MiB, so the catch-up crosses segments.
    let (_, _dirs, mut nodes) = start_three_with(&["batch_bytes_max=1048576".to_string()]);
    let all: Vec<&Broker> = nodes.iter().collect();
    wait_for("a controller leader", &all, || agreed_leader(&all, 3));
    common::run_cli(
        &nodes[0].addr,
        &[
            "topic",
            "create",
            "paused",
            "--partitions",
            "1",
            "--replication-factor",
            "3",
            "--segment-bytes",
            "1048576",
        ],
        None,
    )
    .ok();
    for node in &nodes {
        wait_for("a leader of paused on every node", &all, || leaders(node, "paused"));
    }
    let small = lines(0, 200);
    common::run_cli(&nodes[0].addr, &["produce", "paused", "--acks", "all"], Some(small.as_bytes())).ok();

    let leader = converged(&all, "paused")[0].0;
    let stopped = (leader as usize) % 3;
    let at_stop = leaders(&nodes[stopped], "paused").unwrap()[0].1;
    signal(&nodes[stopped], libc::SIGSTOP);

    // About 6 MiB while it is frozen: more than the leader keeps of recent entries in memory
    // (4 MiB), so the follower is served from the leader's files when it returns.
    let filler = "x".repeat(1000);
    let bulk: String = (0..6000).map(|i| format!("bulk-{i:05}-{filler}\n")).collect();
    let through = &nodes[(leader - 1) as usize];
    common::run_cli(&through.addr, &["produce", "paused", "--acks", "all"], Some(bulk.as_bytes())).ok();
    let (_, leader_hw) = leaders(through, "paused").unwrap()[0];
    let frozen = stored_batches(&nodes[stopped], "paused", 0, i64::MAX);
    let frozen_end = frozen
        .last()
        .map_or(0, |(_, raw)| ringlog::record::BatchHeader::parse(raw).unwrap().last_offset() + 1);
    assert!(
        frozen_end >= at_stop && frozen_end < leader_hw,
        "the stopped follower lagged: {frozen_end} of {leader_hw}"
    );

    signal(&nodes[stopped], libc::SIGCONT);
    let all: Vec<&Broker> = nodes.iter().collect();
    let hw = converged(&all, "paused")[0].1;
    assert!(hw >= leader_hw, "{hw} < {leader_hw}");
    let logs: Vec<Vec<(i64, Vec<u8>)>> = nodes.iter().map(|n| stored_batches(n, "paused", 0, hw)).collect();
    let end =
        logs[0].last().map(|(_, raw)| ringlog::record::BatchHeader::parse(raw).unwrap().last_offset() + 1);
    assert_eq!(end, Some(hw), "the batches below the high watermark end at it");
    for (i, log) in logs.iter().enumerate() {
        assert!(
            log == &logs[0],
            "node {} stores other bytes below the high watermark {hw} than node 1",
            i + 1
        );
    }
    for node in &nodes {
        assert!(segment_files(node, "paused", 0).len() > 1, "the log spans segments");
    }
    let read = consume_all(&nodes[stopped], "paused");
    assert_eq!(read.len(), 6200);
    for node in &mut nodes {
        node.stop();
    }
}

#[test]
fn a_leader_cut_off_from_its_peers_never_serves_what_it_did_not_commit_and_rejoins_truncated() {
    let real = free_ports(3);
    let (relay, seeds) = PeerRelay::start(&real);
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes: Vec<Broker> = (0..3)
        .map(|i| {
            let extra =
                [format!("peer_listen=127.0.0.1:{}", real[i]), "replication_timeout_ms=2000".to_string()];
            start_node_with(dirs[i].path(), i as u64 + 1, &seeds, &extra)
        })
        .collect();
    let all: Vec<&Broker> = nodes.iter().collect();
    wait_for("a controller leader", &all, || agreed_leader(&all, 3));
    common::run_cli(
        &nodes[0].addr,
        &["topic", "create", "cut-off", "--partitions", "1", "--replication-factor", "3"],
        None,
    )
    .ok();
    for node in &nodes {
        wait_for("a leader of cut-off on every node", &all, || leaders(node, "cut-off"));
    }
    let mut acknowledged = 100;
    common::run_cli(&nodes[0].addr, &["produce", "cut-off", "--acks", "all"], Some(lines(0, 100).as_bytes()))
        .ok();

    for (round, cut) in [Cut::Silent, Cut::Refused].into_iter().enumerate() {
        let old = converged(&all, "cut-off")[0].0;
        let isolated = &nodes[(old - 1) as usize];
        let majority: Vec<&Broker> = nodes.iter().filter(|n| !std::ptr::eq(*n, isolated)).collect();

        // Cut off from both peers, it still leads for up to two election timeouts
        // (check-quorum) and takes these writes into its log, but no majority can commit them.
        relay.isolate(old, cut);
        let mut conns: Vec<common::wire::Conn> =
            (0..3).map(|_| common::wire::Conn::connect(&isolated.addr)).collect();
        for (i, conn) in conns.iter_mut().enumerate() {
            let batch = common::wire::batch_now(&[format!("uncommitted-{round}-{i}").as_bytes()]);
            conn.send_raw(&common::wire::produce_frame(1, "cut-off", 0, -1, &batch));
        }
        for conn in &mut conns {
            let (code, _) = common::wire::produce_result(&conn.recv().unwrap());
            assert_ne!(code, wire::ErrorCode::None, "{cut:?}: an uncommitted write was acknowledged");
        }
        let marker = format!("uncommitted-{round}-");
        let taken: Vec<i64> = stored_batches(isolated, "cut-off", 0, i64::MAX)
            .into_iter()
            .filter(|batch| holds_value(std::slice::from_ref(batch), marker.as_bytes()))
            .map(|(_, raw)| ringlog::record::BatchHeader::parse(&raw).unwrap().last_offset())
            .collect();
        assert!(
            !taken.is_empty(),
            "{cut:?}: the isolated leader never took the writes, so this proves nothing"
        );
        let (first_taken, last_taken) = (taken[0], taken[taken.len() - 1]);

        // Whenever asked, the isolated node serves nothing it did not commit.
        let mut client = common::wire::Conn::connect(&isolated.addr);
        let mut never_serves_uncommitted = || {
            let fetched = client.fetch("cut-off", 0, 0, 0);
            assert!(
                fetched.high_watermark <= first_taken,
                "{cut:?}: its high watermark passed an uncommitted write"
            );
            assert!(
                fetched.records.iter().all(|(_, v)| !v.starts_with(b"uncommitted-")),
                "{cut:?}: it served an uncommitted write"
            );
        };
        never_serves_uncommitted();

        // The other two elect a leader among themselves and take writes.
        wait_for("a new leader on the majority side", &majority, || {
            never_serves_uncommitted();
            let now = leaders(majority[0], "cut-off")?;
            (now[0].0 != old).then_some(())
        });
        common::run_cli(
            &majority[0].addr,
            &["produce", "cut-off", "--acks", "all"],
            Some(lines(acknowledged, acknowledged + 200).as_bytes()),
        )
        .ok();
        acknowledged += 200;
        never_serves_uncommitted();

        // Healed, it follows the new leader: its divergent suffix is cut and replaced, and its
        // log matches the others' byte for byte below the high watermark.
        relay.heal();
        let hw = converged(&all, "cut-off")[0].1;
        assert!(hw > last_taken, "the new leader's log covers where the uncommitted writes were");
        let logs: Vec<Vec<(i64, Vec<u8>)>> =
            nodes.iter().map(|n| stored_batches(n, "cut-off", 0, hw)).collect();
        let end = logs[0]
            .last()
            .map(|(_, raw)| ringlog::record::BatchHeader::parse(raw).unwrap().last_offset() + 1);
        assert_eq!(end, Some(hw), "the batches below the high watermark end at it");
        for (i, log) in logs.iter().enumerate() {
            assert!(log == &logs[0], "{cut:?}: node {} stores other bytes below {hw} than node 1", i + 1);
            assert!(!holds_value(log, b"uncommitted-"), "{cut:?}: node {} kept an uncommitted write", i + 1);
        }
        let mut read = consume_all(isolated, "cut-off");
        read.sort();
        let mut expected: Vec<String> = lines(0, acknowledged).lines().map(str::to_owned).collect();
        expected.sort();
        assert_eq!(read, expected, "{cut:?}: every acknowledged record once, nothing else");
    }
    for node in &mut nodes {
        node.stop();
    }
}

/// The topics `node` lists, sorted.
fn topic_names(node: &Broker) -> Option<Vec<String>> {
    let out = common::run_cli(&node.addr, &["topic", "list"], None);
    out.status.success().then(|| {
        let mut names: Vec<String> = out.stdout.lines().map(str::to_owned).collect();
        names.sort();
        names
    })
}

/// Names of the replicated topic directories in `node`'s data directory, without their ids,
/// leaving out the broker's own (`__consumer_offsets`).
fn replica_dir_names(node: &Broker) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(node.data_dir().join("replicated")) else { return Vec::new() };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| Some(e.file_name().to_str()?.rsplit_once('.')?.0.to_owned()))
        .filter(|name| !name.starts_with("__"))
        .collect();
    names.sort();
    names
}

/// Whether `node`'s metadata lists `topic` at any time within `window`, asked over and over.
fn listed_within(node: &Broker, topic: &str, window: Duration) -> bool {
    let mut conn = common::wire::Conn::connect(&node.addr);
    let until = Instant::now() + window;
    while Instant::now() < until {
        let resp = conn.metadata();
        let body = resp.root().body_as_metadata_response().unwrap();
        if body.topics().is_some_and(|t| t.iter().any(|t| t.name() == Some(topic))) {
            return true;
        }
    }
    false
}

#[test]
fn topics_change_through_a_new_controller_after_a_kill_and_survive_a_restart_of_all_three() {
    let (_, _dirs, mut nodes) = start_three();
    let all: Vec<&Broker> = nodes.iter().collect();
    let controller = wait_for("a controller leader", &all, || agreed_leader(&all, 3));
    for (name, partitions) in [("kept", "2"), ("doomed", "8")] {
        common::run_cli(
            &nodes[0].addr,
            &["topic", "create", name, "--partitions", partitions, "--replication-factor", "3"],
            None,
        )
        .ok();
        for node in &nodes {
            wait_for("a leader of every partition on every node", &all, || leaders(node, name));
        }
    }
    common::run_cli(&nodes[0].addr, &["produce", "kept", "--acks", "all"], Some(lines(0, 100).as_bytes()))
        .ok();
    common::run_cli(&nodes[0].addr, &["produce", "doomed", "--acks", "all"], Some(lines(0, 50).as_bytes()))
        .ok();

    // The controller's leader dies without a word; the other two elect another.
    let dead = (controller - 1) as usize;
    nodes[dead].kill9();
    let survivors: Vec<&Broker> =
        nodes.iter().enumerate().filter(|(i, _)| *i != dead).map(|(_, n)| n).collect();
    let next = wait_for("a new controller leader", &survivors, || {
        let leaders: Vec<u64> =
            survivors.iter().filter_map(|n| status(n)?["controller_leader"].as_u64()).collect();
        (leaders.len() == 2 && leaders[0] == leaders[1] && leaders[0] != controller).then(|| leaders[0])
    });
    // Through the survivor that does not lead it: the client follows NotController.
    let via = survivors.iter().find(|n| status(n).and_then(|s| s["node_id"].as_u64()) != Some(next)).unwrap();
    let created = common::run_cli(
        &via.addr,
        &["topic", "create", "born", "--partitions", "2", "--replication-factor", "3"],
        None,
    )
    .ok();
    assert!(created.contains("2 partitions"), "{created}");
    common::run_cli(&via.addr, &["topic", "delete", "doomed"], None).ok();
    for node in &survivors {
        wait_for("born led on the survivors", &survivors, || leaders(node, "born"));
    }
    common::run_cli(&via.addr, &["produce", "born", "--acks", "all"], Some(lines(0, 80).as_bytes())).ok();
    let expected_topics = vec!["born".to_string(), "kept".to_string()];
    for node in &survivors {
        assert_eq!(topic_names(node).unwrap(), expected_topics);
    }

    // The dead node returns and applies what it missed: born appears, doomed and its files go.
    nodes[dead].restart();
    let all: Vec<&Broker> = nodes.iter().collect();
    wait_for("the killed node to rejoin", &all, || agreed_leader(&all, 3));
    wait_for("the returned node to apply the changes it missed", &all, || {
        (topic_names(&nodes[dead])? == expected_topics && replica_dir_names(&nodes[dead]) == expected_topics)
            .then_some(())
    });

    // All three stop and start again on their data: the controller's log brings the topics
    // back, and the replicas their records. Each node had applied the deletion before it
    // stopped, so none shows doomed at any moment after it starts (replaying the log once
    // reopened every deleted topic for a moment before removing it again).
    for node in &mut nodes {
        node.stop();
    }
    for node in &mut nodes {
        node.restart();
        assert!(
            !listed_within(node, "doomed", Duration::from_millis(300)),
            "a deleted topic showed again after a restart"
        );
    }
    let all: Vec<&Broker> = nodes.iter().collect();
    wait_for("a controller leader after a full restart", &all, || agreed_leader(&all, 3));
    for node in &nodes {
        wait_for("the topics back on every node", &all, || {
            (topic_names(node)? == expected_topics && replica_dir_names(node) == expected_topics)
                .then_some(())
        });
    }
    for (topic, count) in [("kept", 100), ("born", 80)] {
        converged(&all, topic);
        let mut read = consume_all(&nodes[dead], topic);
        read.sort();
        let mut expected: Vec<String> = lines(0, count).lines().map(str::to_owned).collect();
        expected.sort();
        assert_eq!(read, expected, "{topic} after a full restart");
    }
    let gone = common::run_cli(&nodes[0].addr, &["topic", "describe", "doomed"], None);
    assert!(!gone.status.success(), "doomed came back: {}", gone.stdout);
    for node in &mut nodes {
        node.stop();
    }
}

#[test]
fn a_hundred_thousand_keyed_records_are_stored_alike_on_every_replica_in_per_key_order() {
    let (_, _dirs, nodes) = start_three();
    let all: Vec<&Broker> = nodes.iter().collect();
    wait_for("a controller leader", &all, || agreed_leader(&all, 3));
    let created = common::run_cli(
        &nodes[1].addr,
        &["topic", "create", "keyed", "--partitions", "6", "--replication-factor", "3"],
        None,
    )
    .ok();
    assert!(created.contains("6 partitions"), "{created}");
    for node in &nodes {
        wait_for("a leader of every partition on every node", &all, || leaders(node, "keyed"));
    }
    let input: String = (0..100_000).map(|i| format!("user-{}:{i}\n", i % 97)).collect();
    common::run_cli(
        &nodes[0].addr,
        &["produce", "keyed", "--acks", "all", "--key-separator", ":"],
        Some(input.as_bytes()),
    )
    .ok();

    // Every replica stores the same bytes below its partition's high watermark.
    let converged = converged(&all, "keyed");
    let mut records = 0usize;
    for (p, &(_, hw)) in converged.iter().enumerate() {
        let logs: Vec<Vec<(i64, Vec<u8>)>> =
            nodes.iter().map(|n| stored_batches(n, "keyed", p as u32, hw)).collect();
        let end = logs[0]
            .last()
            .map(|(_, raw)| ringlog::record::BatchHeader::parse(raw).unwrap().last_offset() + 1);
        assert_eq!(end, Some(hw), "partition {p}: the stored batches end at the high watermark");
        for (i, log) in logs.iter().enumerate().skip(1) {
            assert!(log == &logs[0], "partition {p}: node {} stores other bytes than node 1", i + 1);
        }
        for (_, raw) in &logs[0] {
            if !ringlog::record::BatchHeader::parse(raw).unwrap().is_control() {
                records += ringlog::record::reader::records(raw).unwrap().count();
            }
        }
    }
    assert_eq!(records, 100_000);

    // Node 1 runs two shards: each keeps the replicas of the partitions it owns, writing them
    // through its own io_uring ring (DESIGN: a core owns its partitions, replicated or not).
    assert_eq!(common::cluster::shards_of(1), 2);
    let described =
        common::run_cli(&nodes[0].addr, &["topic", "describe", "keyed", "--format", "json"], None).ok();
    let described: serde_json::Value = serde_json::from_str(&described).unwrap();
    let shards: std::collections::BTreeSet<u64> =
        described["partitions"].as_array().unwrap().iter().map(|p| p["shard"].as_u64().unwrap()).collect();
    assert_eq!(shards, [0, 1].into(), "{described}");
    let (_, metrics) = get(&nodes[0].admin, "/metrics").unwrap();
    let written = |shard: &str| -> u64 {
        let line = format!("ringlog_io_file_written_bytes_total{{shard=\"{shard}\"}} ");
        metrics.lines().find_map(|l| l.strip_prefix(&line)?.parse().ok()).unwrap_or(0)
    };
    for shard in ["0", "1"] {
        assert!(written(shard) > 500_000, "shard {shard} wrote {} bytes of replicas", written(shard));
    }

    // Read back through a follower of most partitions: each key's records in the order sent.
    let out = common::run_cli(&nodes[2].addr, &["consume", "keyed", "--print-meta"], None).ok();
    let mut rows: Vec<(u32, i64, String, u64)> = out
        .lines()
        .map(|l| {
            let cols: Vec<&str> = l.split('\t').collect();
            (
                cols[0].parse().unwrap(),
                cols[1].parse().unwrap(),
                cols[3].to_string(),
                cols[4].parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(rows.len(), 100_000);
    rows.sort();
    let mut last: std::collections::HashMap<String, (u32, u64)> = std::collections::HashMap::new();
    for (partition, _, key, value) in rows {
        if let Some(&(p, previous)) = last.get(&key) {
            assert_eq!(p, partition, "key {key} spans partitions");
            assert!(value > previous, "key {key}: {value} after {previous}");
        }
        last.insert(key, (partition, value));
    }
    assert_eq!(last.len(), 97);
}

/// Replica counts of `topic`'s partitions in Kafka's Metadata from `node`, once it lists them
/// (asked without creating it).
fn kafka_replica_counts(node: &Broker, topic: &str) -> Option<Vec<usize>> {
    Some(kafka_leaders(node, topic)?.iter().map(|(_, replicas)| replicas.len()).collect())
}

#[test]
fn every_topic_of_a_cluster_is_replicated_whichever_protocol_and_node_creates_it() {
    use kafka_protocol::messages::create_topics_request::CreatableTopic;
    use kafka_protocol::messages::{CreateTopicsRequest, DeleteTopicsRequest};

    let (_, _dirs, nodes) = start_three();
    let all: Vec<&Broker> = nodes.iter().collect();
    let controller = wait_for("a controller leader", &all, || agreed_leader(&all, 3));
    // Kafka's admin clients send topic changes to the controller Metadata names; another node
    // hands them to the controller's leader, as Kafka's brokers forward them.
    let controller_node = &nodes[(controller - 1) as usize];
    let other = &nodes[(controller % 3) as usize];
    let mut kafka = common::kafka::KafkaConn::connect(&controller_node.kafka);
    let mut elsewhere = common::kafka::KafkaConn::connect(&other.kafka);
    let create = |name: &str, replication: i16| {
        CreateTopicsRequest::default().with_timeout_ms(10_000).with_topics(vec![CreatableTopic::default()
            .with_name(TopicName(common::kafka::s(name)))
            .with_num_partitions(2)
            .with_replication_factor(replication)])
    };
    // Kafka's CreateTopics: the broker default (-1) is min(3, nodes), an explicit factor is kept,
    // more than the nodes is refused. The controller's log runs every change, so each node shows
    // each topic (a topic created on one node is not local to it).
    for (name, asked, copies) in [("by-default", -1, 3), ("two-copies", 2, 2)] {
        let answer = kafka.call(5, &create(name, asked));
        let topic = &answer.topics[0];
        assert_eq!(topic.error_code, 0, "{name}: {:?}", topic.error_message);
        assert_eq!((topic.num_partitions, topic.replication_factor), (2, copies as i16), "{name}");
        for node in &nodes {
            let counts = wait_for("the topic on every node", &all, || kafka_replica_counts(node, name));
            assert_eq!(counts, vec![copies; 2], "{name}");
        }
    }
    let refused = kafka.call(5, &create("four-copies", 4));
    assert_eq!(refused.topics[0].error_code, 38, "{:?}", refused.topics[0].error_message);
    let forwarded = elsewhere.call(5, &create("through-another-node", -1));
    assert_eq!(forwarded.topics[0].error_code, 0, "{:?}", forwarded.topics[0].error_message);
    let counts = wait_for("a forwarded topic on the controller", &all, || {
        kafka_replica_counts(controller_node, "through-another-node")
    });
    assert_eq!(counts, vec![3, 3]);
    let refused = elsewhere.call(5, &create("through-another-node", -1));
    assert_eq!(
        refused.topics[0].error_code, 36,
        "TOPIC_ALREADY_EXISTS: {:?}",
        refused.topics[0].error_message
    );

    // The native CLI without --replication-factor, and a Kafka client's automatic creation.
    common::run_cli(&nodes[1].addr, &["topic", "create", "native-default", "--partitions", "2"], None).ok();
    let counts =
        wait_for("native-default on node 3", &all, || kafka_replica_counts(&nodes[2], "native-default"));
    assert_eq!(counts, vec![3, 3]);
    let auto = MetadataRequestTopic::default().with_name(Some(TopicName(common::kafka::s("auto-made"))));
    elsewhere.call(
        9,
        &MetadataRequest::default().with_topics(Some(vec![auto])).with_allow_auto_topic_creation(true),
    );
    let counts =
        wait_for("auto-made on the controller", &all, || kafka_replica_counts(controller_node, "auto-made"));
    assert!(counts.iter().all(|&c| c == 3), "{counts:?}");

    // DeleteTopics, through a node that hands it to the controller, removes a replicated topic
    // from every node.
    let delete = DeleteTopicsRequest::default()
        .with_timeout_ms(10_000)
        .with_topic_names(vec![TopicName(common::kafka::s("two-copies"))]);
    let answer = elsewhere.call(4, &delete);
    assert_eq!(answer.responses[0].error_code, 0, "{:?}", answer.responses[0].error_message);
    for node in &nodes {
        wait_for("two-copies gone everywhere", &all, || {
            kafka_replica_counts(node, "two-copies").is_none().then_some(())
        });
    }
}

/// Per partition of `topic` as `node` describes it: (leader, preferred replica).
fn leader_and_preferred(node: &Broker, topic: &str) -> Option<Vec<(Option<u64>, u64)>> {
    let out = common::run_cli(&node.addr, &["topic", "describe", topic, "--format", "json"], None);
    let described: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
    described["partitions"]
        .as_array()?
        .iter()
        .map(|p| Some((p["leader"].as_u64(), p["replicas"].as_array()?.first()?.as_u64()?)))
        .collect()
}

#[test]
fn leadership_returns_to_the_preferred_replica_once_it_has_caught_up() {
    let (_, _dirs, mut nodes) = start_three_with(&["leader_balance_interval_ms=500".to_string()]);
    let all: Vec<&Broker> = nodes.iter().collect();
    wait_for("a controller leader", &all, || agreed_leader(&all, 3));
    common::run_cli(
        &nodes[0].addr,
        &["topic", "create", "balanced", "--partitions", "3", "--replication-factor", "3"],
        None,
    )
    .ok();
    // Whoever wins the first elections, each partition ends up led by its preferred replica,
    // so leadership is spread over the three nodes as placement spread it.
    let on_preferred = |node: &Broker| {
        let view = leader_and_preferred(node, "balanced")?;
        view.iter().all(|&(leader, preferred)| leader == Some(preferred)).then_some(view)
    };
    let view = wait_for("every partition led by its preferred replica", &all, || on_preferred(&nodes[0]));
    let preferred: Vec<u64> = view.iter().map(|&(_, p)| p).collect();
    let mut spread = preferred.clone();
    spread.sort_unstable();
    assert_eq!(spread, vec![1, 2, 3]);

    // Partition 0's leader dies; a survivor takes over and takes writes.
    let dead = (preferred[0] - 1) as usize;
    nodes[dead].kill9();
    let survivor = &nodes[(dead + 1) % 3];
    let survivors: Vec<&Broker> =
        nodes.iter().enumerate().filter(|(i, _)| *i != dead).map(|(_, n)| n).collect();
    wait_for("a new leader of partition 0", &survivors, || {
        let view = leader_and_preferred(survivor, "balanced")?;
        view[0].0.filter(|&l| l != preferred[0])
    });
    common::run_cli(
        &survivor.addr,
        &["produce", "balanced", "--acks", "all"],
        Some(lines(0, 100).as_bytes()),
    )
    .ok();

    // It returns, catches up, and gets partition 0 back.
    nodes[dead].restart();
    let all: Vec<&Broker> = nodes.iter().collect();
    wait_for("partition 0 led by its preferred replica again", &all, || on_preferred(&nodes[dead]));
    assert_eq!(consume_all(&nodes[dead], "balanced").len(), 100);
}

/// Per partition of `topic` in Kafka's Metadata from `node`: (leader, replicas), once it lists
/// the topic (asked without creating it).
fn kafka_leaders(node: &Broker, topic: &str) -> Option<Vec<(i32, Vec<i32>)>> {
    let mut kafka = common::kafka::KafkaConn::connect(&node.kafka);
    let wanted = MetadataRequestTopic::default().with_name(Some(TopicName(common::kafka::s(topic))));
    let asked =
        MetadataRequest::default().with_topics(Some(vec![wanted])).with_allow_auto_topic_creation(false);
    let metadata = kafka.call(9, &asked);
    let found = metadata.topics.first().filter(|t| t.error_code == 0)?;
    let partitions =
        found.partitions.iter().map(|p| (p.leader_id.0, p.replica_nodes.iter().map(|r| r.0).collect()));
    Some(partitions.collect())
}

#[test]
fn a_partition_on_fewer_nodes_than_the_cluster_is_led_as_seen_from_every_node() {
    let (_, _dirs, mut nodes) = start_three();
    let all: Vec<&Broker> = nodes.iter().collect();
    wait_for("a controller leader", &all, || agreed_leader(&all, 3));
    common::run_cli(
        &nodes[0].addr,
        &["topic", "create", "one-copy", "--partitions", "3", "--replication-factor", "1"],
        None,
    )
    .ok();
    // Each partition lives on one node; the other two learn its leader from that node's
    // keepalives, so every node's Metadata names every leader, the partition's only replica.
    for node in &nodes {
        let view = wait_for("every leader named by every node", &all, || {
            let view = kafka_leaders(node, "one-copy")?;
            view.iter().all(|(leader, _)| *leader > 0).then_some(view)
        });
        for (leader, replicas) in &view {
            assert_eq!(replicas, &vec![*leader], "{view:?}");
        }
        let described = leader_and_preferred(node, "one-copy").unwrap_or_default();
        assert!(described.iter().all(|&(leader, only)| leader == Some(only)), "{described:?}");
        // Cluster-wide: `__consumer_offsets`, created as the third node registered, included.
        wait_for("no partition without a leader, as every node sees it", &all, || {
            (status(node)?["leaderless_partitions"] == 0).then_some(())
        });
    }
    let mut hosts: Vec<i32> =
        kafka_leaders(&nodes[0], "one-copy").unwrap_or_default().iter().map(|p| p.0).collect();
    hosts.sort_unstable();
    assert_eq!(hosts, vec![1, 2, 3], "placement spreads one-copy partitions over the nodes");

    // The native client through any node reaches each partition's leader on another.
    common::run_cli(
        &nodes[1].addr,
        &["produce", "one-copy", "--acks", "all"],
        Some(lines(0, 300).as_bytes()),
    )
    .ok();
    let mut read = consume_all(&nodes[2], "one-copy");
    read.sort_unstable();
    let mut written: Vec<String> = lines(0, 300).lines().map(str::to_owned).collect();
    written.sort_unstable();
    assert_eq!(read, written);

    // The node holding partition 0 dies: the others stop naming a leader for it once its
    // reports are stale, and count it leaderless.
    let (holder, _) = kafka_leaders(&nodes[0], "one-copy").unwrap_or_default()[0].clone();
    let dead = (holder - 1) as usize;
    nodes[dead].kill9();
    let survivors: Vec<&Broker> =
        nodes.iter().enumerate().filter(|(i, _)| *i != dead).map(|(_, n)| n).collect();
    for node in &survivors {
        wait_for("partition 0 leaderless", &survivors, || {
            let view = kafka_leaders(node, "one-copy")?;
            (view[0].0 == -1).then_some(())
        });
        assert_eq!(status(node).map(|s| s["leaderless_partitions"].clone()), Some(1.into()));
    }
}

/// A Kafka CreatePartitions of `topic` to `count` partitions (v3), with manual `assignments`
/// when given: the topic's error code and message.
fn kafka_grow(
    kafka: &mut common::kafka::KafkaConn,
    topic: &str,
    count: i32,
    assignments: Option<Vec<Vec<i32>>>,
    validate_only: bool,
) -> (i16, String) {
    use kafka_protocol::messages::create_partitions_request::{
        CreatePartitionsAssignment, CreatePartitionsTopic,
    };
    use kafka_protocol::messages::{BrokerId, CreatePartitionsRequest};
    let assignments = assignments.map(|sets| {
        sets.into_iter()
            .map(|ids| {
                CreatePartitionsAssignment::default().with_broker_ids(ids.into_iter().map(BrokerId).collect())
            })
            .collect()
    });
    let request = CreatePartitionsRequest::default()
        .with_timeout_ms(10_000)
        .with_validate_only(validate_only)
        .with_topics(vec![CreatePartitionsTopic::default()
            .with_name(TopicName(common::kafka::s(topic)))
            .with_count(count)
            .with_assignments(assignments)]);
    let answer = kafka.call(3, &request);
    assert_eq!(answer.results.len(), 1, "{answer:?}");
    let result = &answer.results[0];
    (result.error_code, result.error_message.as_ref().map(|m| m.to_string()).unwrap_or_default())
}

/// `ringlog topic describe` of `topic` on `node` once it shows `count` partitions, each with a
/// leader: per partition (leader, preferred replica, replica count).
fn grown_view(node: &Broker, topic: &str, count: usize) -> Option<Vec<(u64, u64, usize)>> {
    let out = common::run_cli(&node.addr, &["topic", "describe", topic, "--format", "json"], None);
    let described: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
    let view: Vec<(u64, u64, usize)> = described["partitions"]
        .as_array()?
        .iter()
        .map(|p| {
            let replicas = p["replicas"].as_array()?;
            Some((p["leader"].as_u64()?, replicas.first()?.as_u64()?, replicas.len()))
        })
        .collect::<Option<_>>()?;
    (view.len() == count).then_some(view)
}

#[test]
fn a_replicated_topic_grows_through_a_node_that_does_not_lead_the_controller() {
    let (_, _dirs, mut nodes) = start_three();
    let all: Vec<&Broker> = nodes.iter().collect();
    let controller = wait_for("a controller leader", &all, || agreed_leader(&all, 3));
    let via = controller as usize % 3; // another node than the controller's leader
    common::run_cli(
        &nodes[via].addr,
        &["topic", "create", "growing", "--partitions", "2", "--replication-factor", "3"],
        None,
    )
    .ok();
    for node in &nodes {
        wait_for("growing led on every node", &all, || grown_view(node, "growing", 2));
    }
    common::run_cli(
        &nodes[via].addr,
        &["produce", "growing", "--acks", "all"],
        Some(lines(0, 100).as_bytes()),
    )
    .ok();

    // Kafka's CreatePartitions through that node: what cannot grow is refused as Kafka does,
    // and validate_only changes nothing (the grow to 4 that follows would be refused had it
    // made 5).
    let mut kafka = common::kafka::KafkaConn::connect(&nodes[via].kafka);
    for (count, code, says) in [(2, 37, "already has 2 partitions"), (1, 37, "cannot be removed")] {
        let (error, message) = kafka_grow(&mut kafka, "growing", count, None, false);
        assert_eq!(error, code, "INVALID_PARTITIONS for {count}: {message}");
        assert!(message.contains(says), "{message}");
    }
    let (error, message) = kafka_grow(&mut kafka, "no-such-topic", 4, None, false);
    assert_eq!(error, 3, "UNKNOWN_TOPIC_OR_PARTITION: {message}");
    let (error, message) = kafka_grow(&mut kafka, "growing", 3, Some(vec![vec![1, 2, 3]]), false);
    assert_eq!(error, 42, "INVALID_REQUEST: {message}");
    assert!(message.contains("manual replica assignments"), "{message}");
    let (error, message) = kafka_grow(&mut kafka, "growing", 5, None, true);
    assert_eq!(error, 0, "validate_only: {message}");
    assert_eq!(kafka_leaders(&nodes[via], "growing").map(|v| v.len()), Some(2), "validate_only grew it");
    let (error, message) = kafka_grow(&mut kafka, "growing", 4, None, false);
    assert_eq!(error, 0, "grow to 4: {message}");
    for node in &nodes {
        wait_for("4 partitions on every node", &all, || {
            kafka_leaders(node, "growing").filter(|v| v.len() == 4)
        });
    }

    // The native protocol through the same node, by the CLI.
    let checked = common::run_cli(
        &nodes[via].addr,
        &["topic", "alter", "growing", "--partitions", "5", "--validate-only"],
        None,
    )
    .ok();
    assert!(checked.contains("from 4 to 5 partitions (validate only"), "{checked}");
    let grown =
        common::run_cli(&nodes[via].addr, &["topic", "alter", "growing", "--partitions", "5"], None).ok();
    assert!(grown.contains("now has 5 partitions"), "{grown}");
    for (count, says) in [("5", "already has 5 partitions"), ("3", "cannot be removed")] {
        let refused =
            common::run_cli(&nodes[via].addr, &["topic", "alter", "growing", "--partitions", count], None);
        let stderr = &refused.stderr;
        assert!(
            !refused.status.success() && stderr.contains("InvalidPartitions") && stderr.contains(says),
            "{stderr}"
        );
    }

    // Every node shows 5 partitions, each with a leader and 3 replicas, in both protocols; the
    // preferred leaders carry on the topic's spread (the node after the previous partition's).
    for node in &nodes {
        let view = wait_for("5 partitions led on every node", &all, || grown_view(node, "growing", 5));
        let preferred: Vec<u64> = view.iter().map(|&(_, preferred, _)| preferred).collect();
        assert!(view.iter().all(|&(_, _, replicas)| replicas == 3), "{view:?}");
        assert!(preferred.windows(2).all(|w| w[1] == w[0] % 3 + 1), "{preferred:?}");
        let kafka_view = wait_for("Kafka leaders of 5 partitions", &all, || {
            let view = kafka_leaders(node, "growing")?;
            (view.len() == 5 && view.iter().all(|(leader, _)| *leader > 0)).then_some(view)
        });
        assert!(kafka_view.iter().all(|(_, replicas)| replicas.len() == 3), "{kafka_view:?}");
    }

    // Each new partition takes acks=all writes through one node and reads them back through
    // another; the first partitions kept what they had.
    let per_partition = |p: u32| -> String { (0..50).map(|i| format!("p{p}-{i}\n")).collect() };
    for p in 2..5u32 {
        let partition = p.to_string();
        common::run_cli(
            &nodes[(via + 1) % 3].addr,
            &["produce", "growing", "--partition", &partition, "--acks", "all"],
            Some(per_partition(p).as_bytes()),
        )
        .ok();
        let read = common::run_cli(
            &nodes[(via + 2) % 3].addr,
            &["consume", "growing", "--partition", &partition, "--from", "beginning"],
            None,
        )
        .ok();
        assert_eq!(
            read.lines().collect::<Vec<_>>(),
            per_partition(p).lines().collect::<Vec<_>>(),
            "partition {p}"
        );
    }
    let mut read = consume_all(&nodes[via], "growing");
    read.sort();
    let mut expected: Vec<String> = lines(0, 100).lines().map(str::to_owned).collect();
    expected.extend((2..5).flat_map(|p| per_partition(p).lines().map(str::to_owned).collect::<Vec<_>>()));
    expected.sort();
    assert_eq!(read, expected);

    // A restart replays the growth from the controller's log: the node shows 5 partitions
    // again, with its replicas of each in its data directory, and reads through it find every
    // record.
    nodes[via].kill9();
    nodes[via].restart();
    let all: Vec<&Broker> = nodes.iter().collect();
    wait_for("the restarted node back", &all, || agreed_leader(&all, 3));
    wait_for("5 partitions led after the restart", &all, || grown_view(&nodes[via], "growing", 5));
    let dirs = replica_topic_dirs(&nodes[via].data_dir(), "growing");
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let mut partitions: Vec<String> = std::fs::read_dir(&dirs[0])
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    partitions.sort();
    assert_eq!(partitions, ["0", "1", "2", "3", "4"]);
    let mut read = consume_all(&nodes[via], "growing");
    read.sort();
    assert_eq!(read, expected, "after the restart");

    // Deleted afterwards: every node removes the new partitions' files with the old ones.
    common::run_cli(&nodes[via].addr, &["topic", "delete", "growing"], None).ok();
    for node in &nodes {
        wait_for("growing's files gone", &all, || {
            replica_topic_dirs(&node.data_dir(), "growing").is_empty().then_some(())
        });
    }
    for node in &mut nodes {
        node.stop();
    }
}
