//! In-sync replicas on three real `ringlog serve` processes (issue 11, stop 14): a topic with
//! three replicas per partition starts with every replica in sync on every node; a node stopped
//! with SIGSTOP, then one killed with SIGKILL, leaves every partition's in-sync set within the
//! lag (2 s here), as `topic describe`, `cluster status` (cluster-wide under-replicated count:
//! every partition, `__consumer_offsets`' included),
//! Kafka Metadata and `/metrics` show on every surviving node, leaders and followers alike; and
//! once back and caught up it joins again and the count returns to 0.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{get, signal, start_three_with, wait_for};
use common::Broker;
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::{MetadataRequest, TopicName};
use serde_json::Value;

const TOPIC: &str = "isr-likes";
/// Replicated partitions of the cluster: the topic's 3 and `__consumer_offsets`' 2 (the
/// controller creates it with three replicas once three nodes registered).
const PARTITIONS: u64 = 5;

/// `ringlog cluster status --format json` against `node`.
fn cluster_status(node: &Broker) -> Option<Value> {
    let out =
        common::run_cli(&node.addr, &["cluster", "status", "--admin", &node.admin, "--format", "json"], None);
    out.status.success().then(|| serde_json::from_str(&out.stdout).ok()).flatten()
}

fn under_replicated(node: &Broker) -> Option<u64> {
    cluster_status(node)?["under_replicated_partitions"].as_u64()
}

fn describe(node: &Broker) -> Option<common::cluster::Described> {
    common::cluster::describe(node, TOPIC)
}

/// Every partition has a leader in `expected` and exactly `expected` in sync, on `node`.
fn in_sync_everywhere(node: &Broker, expected: &[u64]) -> Option<()> {
    let described = describe(node)?;
    let good = described.len() == 3
        && described.iter().all(|(leader, isr, replicas)| {
            leader.is_some_and(|l| expected.contains(&l)) && isr == expected && replicas == &[1, 2, 3]
        });
    good.then_some(())
}

/// Kafka Metadata v9 through `node`: per partition, (leader, isr sorted, replicas count).
fn kafka_partitions(node: &Broker) -> Vec<(i32, Vec<i32>, usize)> {
    let mut kafka = common::kafka::KafkaConn::connect(&node.kafka);
    let topic = MetadataRequestTopic::default().with_name(Some(TopicName(common::kafka::s(TOPIC))));
    let metadata = kafka.call(9, &MetadataRequest::default().with_topics(Some(vec![topic])));
    metadata.topics[0]
        .partitions
        .iter()
        .map(|p| {
            let mut isr: Vec<i32> = p.isr_nodes.iter().map(|b| b.0).collect();
            isr.sort_unstable();
            (p.leader_id.0, isr, p.replica_nodes.len())
        })
        .collect()
}

/// A gauge without labels from `node`'s `/metrics`.
fn gauge(node: &Broker, name: &str) -> Option<u64> {
    let (line, metrics) = get(&node.admin, "/metrics")?;
    line.contains("200").then_some(())?;
    metrics.lines().find_map(|l| l.strip_prefix(&format!("{name} ")).and_then(|v| v.parse().ok()))
}

fn produce(node: &Broker, from: usize, to: usize) {
    let lines: String = (from..to).map(|i| format!("like-{i}\n")).collect();
    common::run_cli(&node.addr, &["produce", TOPIC, "--acks", "all"], Some(lines.as_bytes())).ok();
}

/// While node `gone` is away: on both others, every partition of the topic has the two of them
/// in sync and a leader among them, the cluster-wide count is every partition, Kafka clients see
/// the same, and the leaders' own gauges add up to it. Returns how long it took from `since`.
fn shrinks_without(nodes: &[Broker], gone: usize, since: Instant) -> Duration {
    let survivors: Vec<&Broker> =
        nodes.iter().enumerate().filter(|(i, _)| *i != gone).map(|(_, n)| n).collect();
    let expected: Vec<u64> = (1..=3).filter(|&id| id != gone as u64 + 1).collect();
    wait_for("the in-sync replicas to shrink on every survivor", &survivors, || {
        for node in &survivors {
            in_sync_everywhere(node, &expected)?;
            (under_replicated(node)? == PARTITIONS).then_some(())?;
        }
        Some(())
    });
    let took = since.elapsed();
    let kafka_expected: Vec<i32> = expected.iter().map(|&id| id as i32).collect();
    for node in &survivors {
        for (leader, isr, replicas) in kafka_partitions(node) {
            assert!(kafka_expected.contains(&leader), "leader {leader}");
            assert_eq!((isr, replicas), (kafka_expected.clone(), 3));
        }
    }
    wait_for("the leaders' gauges to add up", &survivors, || {
        let sum: u64 =
            survivors.iter().map(|n| gauge(n, "ringlog_under_replicated_partitions")).sum::<Option<u64>>()?;
        (sum == PARTITIONS).then_some(())
    });
    took
}

/// Every node, the returned one included, has all three in sync and counts nothing
/// under-replicated, and every partition of the cluster has a leader.
fn whole_again(nodes: &[Broker]) -> Duration {
    let since = Instant::now();
    let all: Vec<&Broker> = nodes.iter().collect();
    wait_for("every replica back in sync on every node", &all, || {
        for node in &all {
            in_sync_everywhere(node, &[1, 2, 3])?;
            (under_replicated(node)? == 0).then_some(())?;
        }
        let leaders: u64 = all.iter().map(|n| gauge(n, "ringlog_partition_leaders")).sum::<Option<u64>>()?;
        (leaders == PARTITIONS).then_some(())
    });
    for node in &all {
        for (_, isr, _) in kafka_partitions(node) {
            assert_eq!(isr, vec![1, 2, 3]);
        }
    }
    since.elapsed()
}

#[test]
fn a_stopped_or_killed_node_leaves_the_in_sync_replicas_and_rejoins_once_caught_up() {
    let extra = ["replica_lag_time_max_ms=2000".to_string(), "offsets_topic_partitions=2".to_string()];
    let (_, _dirs, mut nodes) = start_three_with(&extra);
    let all: Vec<&Broker> = nodes.iter().collect();
    // Every node registered too: a controller that has a leader but no registered nodes yet
    // refuses a replication factor of 3 (the other cluster tests wait the same way).
    wait_for("a controller leader and three registered nodes, as every node sees them", &all, || {
        common::cluster::agreed_leader(&all, 3)
    });
    common::cluster::create_replicated(&nodes[0], TOPIC, 3, 3);
    whole_again(&nodes);
    produce(&nodes[0], 0, 100);

    // Stopped (SIGSTOP): its connections stay open but it answers nothing.
    let stopped = 2;
    signal(&nodes[stopped], libc::SIGSTOP);
    let took = shrinks_without(&nodes, stopped, Instant::now());
    eprintln!("node {} stopped: in-sync replicas shrank everywhere after {took:?}", stopped + 1);
    produce(&nodes[0], 100, 200);
    signal(&nodes[stopped], libc::SIGCONT);
    let took = whole_again(&nodes);
    eprintln!("node {} resumed: back in sync everywhere after {took:?}", stopped + 1);

    // Killed (SIGKILL): the leader of partition 0, so a new leader's followers are tracked too.
    let killed = (describe(&nodes[0]).unwrap()[0].0.unwrap() - 1) as usize;
    nodes[killed].kill9();
    let took = shrinks_without(&nodes, killed, Instant::now());
    eprintln!("node {} killed: in-sync replicas shrank everywhere after {took:?}", killed + 1);
    let survivor = &nodes[(killed + 1) % 3];
    produce(survivor, 200, 300);
    nodes[killed].restart();
    let took = whole_again(&nodes);
    eprintln!("node {} restarted: back in sync everywhere after {took:?}", killed + 1);
    // Back in sync means caught up: every record, read through the node that was killed.
    let read = common::run_cli(&nodes[killed].addr, &["consume", TOPIC, "--from", "beginning"], None).ok();
    let mut read: Vec<&str> = read.lines().collect();
    read.sort_unstable();
    read.dedup();
    assert_eq!(read.len(), 300);

    for node in &mut nodes {
        node.stop();
    }
}
