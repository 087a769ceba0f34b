//! Consumer groups in a cluster (issue 11, test 5): `__consumer_offsets` is replicated, created by
//! the controller once every node has registered; a group's coordinator is the node leading its
//! offsets partition (FindCoordinator names it through either protocol, another node answers
//! NOT_COORDINATOR); when that node is killed with SIGKILL, the group finds the new coordinator
//! and resumes from the offsets it committed.

mod common;

use std::collections::BTreeSet;

use common::cluster::{agreed_leader, start_three, status, wait_for};
use common::Broker;
use kafka_protocol::messages::{FindCoordinatorRequest, GroupId, HeartbeatRequest};

const GROUP: &str = "notifications";

/// The node Kafka's FindCoordinator names for `GROUP`, asked of `node`.
fn coordinator(node: &Broker) -> Option<u64> {
    let mut kafka = common::kafka::KafkaConn::connect(&node.kafka);
    let answer = kafka.call(2, &FindCoordinatorRequest::default().with_key(common::kafka::s(GROUP)));
    (answer.error_code == 0).then_some(answer.node_id.0 as u64)
}

/// A heartbeat for an unknown member: the coordinator answers UNKNOWN_MEMBER_ID (25), any other
/// node NOT_COORDINATOR (16).
fn heartbeat_code(node: &Broker) -> i16 {
    let mut kafka = common::kafka::KafkaConn::connect(&node.kafka);
    let heartbeat = HeartbeatRequest::default()
        .with_group_id(GroupId(common::kafka::s(GROUP)))
        .with_generation_id(1)
        .with_member_id(common::kafka::s("nobody"));
    kafka.call(1, &heartbeat).error_code
}

/// `count` records of the group (all it has left without `count`), through `node`, as
/// `partition:offset:value`.
fn consume(node: &Broker, count: Option<usize>) -> Vec<String> {
    let mut args = vec!["consume", "likes", "--group", GROUP, "--print-meta", "--commit-interval-ms", "100"];
    let count = count.map(|c| c.to_string());
    if let Some(count) = &count {
        args.extend(["--count", count]);
    }
    let out = common::run_cli(&node.addr, &args, None).ok();
    out.lines()
        .map(|l| {
            let cols: Vec<&str> = l.split('\t').collect();
            format!("{}:{}:{}", cols[0], cols[1], cols[4])
        })
        .collect()
}

#[test]
fn a_group_resumes_from_its_committed_offsets_after_its_coordinator_dies() {
    let (_, _dirs, mut nodes) = start_three();
    let all: Vec<&Broker> = nodes.iter().collect();
    wait_for("a controller leader", &all, || agreed_leader(&all, 3));
    let created = common::run_cli(
        &nodes[0].addr,
        &["topic", "create", "likes", "--partitions", "3", "--replication-factor", "3"],
        None,
    )
    .ok();
    assert!(created.contains("3 partitions"), "{created}");
    let records: String = (0..300).map(|i| format!("like-{i}\n")).collect();
    let produced =
        common::run_cli(&nodes[0].addr, &["produce", "likes", "--acks", "all"], Some(records.as_bytes()));
    assert!(produced.status.success(), "{}", produced.stderr);

    // Every node names the same coordinator once the offsets partitions have leaders; only it
    // serves the group.
    let chosen = wait_for("every node to name one coordinator", &all, || {
        let named: BTreeSet<Option<u64>> = nodes.iter().map(coordinator).collect();
        (named.len() == 1).then(|| named.into_iter().next().flatten()).flatten()
    });
    for (i, node) in nodes.iter().enumerate() {
        let expected = if i as u64 + 1 == chosen { 25 } else { 16 };
        wait_for("the coordinator to load its partition", &all, || {
            (heartbeat_code(node) == expected).then_some(())
        });
    }

    let first = consume(&nodes[0], Some(100));
    assert_eq!(first.len(), 100);

    // The coordinator's node dies; another leads the offsets partition, loads the group from
    // the replicated log and serves it.
    nodes[(chosen - 1) as usize].kill9();
    let survivors: Vec<&Broker> = nodes.iter().filter(|n| status(n).is_some()).collect();
    assert_eq!(survivors.len(), 2);
    let successor = wait_for("a new coordinator", &survivors, || {
        survivors.iter().map(|n| coordinator(n)).find(|c| c.is_some_and(|c| c != chosen)).flatten()
    });
    let through = survivors[0];
    let rest = consume(through, None);
    assert_eq!(rest.len(), 200, "the group resumed where it committed (coordinator {chosen} → {successor})");
    let mut seen: BTreeSet<String> = BTreeSet::new();
    for record in first.iter().chain(&rest) {
        assert!(seen.insert(record.clone()), "{record} read twice");
    }
    let values: BTreeSet<String> = seen.iter().map(|r| r.rsplit(':').next().unwrap().to_string()).collect();
    assert_eq!(values.len(), 300);

    // The killed node returns: it follows the new coordinator, which keeps the group.
    nodes[(chosen - 1) as usize].restart();
    let all: Vec<&Broker> = nodes.iter().collect();
    wait_for("three nodes again", &all, || agreed_leader(&all, 3));
    assert!(consume(&nodes[(chosen - 1) as usize], None).is_empty(), "nothing left to read");
}
