//! Consumer groups in a cluster (issue 11, test 5): `__consumer_offsets` is replicated, created by
//! the controller once every node has registered; a group's coordinator is the node leading its
//! offsets partition (FindCoordinator names it through either protocol, another node answers
//! NOT_COORDINATOR); when that node is killed with SIGKILL, the group finds the new coordinator
//! and resumes from the offsets it committed. A `GroupConsumer` keeps reading while the leaders
//! of its partitions and its coordinator die and come back (stop 16), and `ringlog group list`
//! through any node lists every group of the cluster, while each node's Kafka ListGroups answers
//! the groups it coordinates. SyncGroup is answered once the group's record is committed: a
//! coordinator cut off from the other replicas answers it with an error, and the group rebalances.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::cluster::{agreed_leader, start_three, start_three_with, status, wait_for};
use common::Broker;
use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::leave_group_request::MemberIdentity;
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
use kafka_protocol::messages::{
    FindCoordinatorRequest, GroupId, HeartbeatRequest, JoinGroupRequest, LeaveGroupRequest,
    ListGroupsRequest, OffsetCommitRequest, OffsetFetchRequest, SyncGroupRequest, TopicName,
};
use ringlog::client::{
    ClientConfig, ClientError, GroupConsumer, GroupConsumerConfig, Producer, ProducerConfig,
};
use tokio::runtime::Runtime;

const GROUP: &str = "notifications";
/// How long a member may take to read what was written; only reached when it is stuck.
const DEADLINE: Duration = Duration::from_secs(40);

/// The node Kafka's FindCoordinator names for `GROUP`, asked of `node`.
fn coordinator(node: &Broker) -> Option<u64> {
    coordinator_of(node, GROUP)
}

/// The node Kafka's FindCoordinator names for `group`, asked of `node`.
fn coordinator_of(node: &Broker, group: &str) -> Option<u64> {
    let mut kafka = common::kafka::KafkaConn::connect(&node.kafka);
    let answer = kafka.call(2, &FindCoordinatorRequest::default().with_key(common::kafka::s(group)));
    (answer.error_code == 0).then_some(answer.node_id.0 as u64)
}

/// Per partition of `topic`, its preferred replica, once `node` sees every partition led by it.
fn led_by_preferred(node: &Broker, topic: &str) -> Option<Vec<u64>> {
    let out = common::run_cli(&node.addr, &["topic", "describe", topic, "--format", "json"], None);
    let described: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
    described["partitions"]
        .as_array()?
        .iter()
        .map(|p| {
            let preferred = p["replicas"].as_array()?.first()?.as_u64()?;
            (p["leader"].as_u64() == Some(preferred)).then_some(preferred)
        })
        .collect()
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

/// A Kafka member of `GROUP` through `node` (its coordinator), alone in a new generation with an
/// assignment of its own: (member id, generation).
fn join_kafka_member(node: &Broker) -> (String, i32) {
    let mut kafka = common::kafka::KafkaConn::connect(&node.kafka);
    let joined = kafka.call(
        3,
        &JoinGroupRequest::default()
            .with_group_id(GroupId(common::kafka::s(GROUP)))
            .with_session_timeout_ms(30_000)
            .with_rebalance_timeout_ms(10_000)
            .with_protocol_type(common::kafka::s("consumer"))
            .with_protocols(vec![JoinGroupRequestProtocol::default().with_name(common::kafka::s("range"))]),
    );
    assert_eq!(joined.error_code, 0, "JoinGroup");
    let (member, generation) = (joined.member_id.to_string(), joined.generation_id);
    let synced = kafka.call(
        2,
        &SyncGroupRequest::default()
            .with_group_id(GroupId(common::kafka::s(GROUP)))
            .with_generation_id(generation)
            .with_member_id(common::kafka::s(&member))
            .with_assignments(vec![SyncGroupRequestAssignment::default()
                .with_member_id(common::kafka::s(&member))
                .with_assignment(Bytes::from_static(b"all of likes"))]),
    );
    assert_eq!(synced.error_code, 0, "SyncGroup");
    // Answered once committed, and so is the group's record, which went before it in the log.
    // It commits what the group had committed, changing nothing the console consumer reads.
    let fetched = kafka.call(
        1,
        &OffsetFetchRequest::default().with_group_id(GroupId(common::kafka::s(GROUP))).with_topics(Some(
            vec![OffsetFetchRequestTopic::default()
                .with_name(TopicName(common::kafka::s("likes")))
                .with_partition_indexes(vec![0])],
        )),
    );
    let had = fetched.topics[0].partitions[0].committed_offset;
    let committed = kafka.call(
        2,
        &OffsetCommitRequest::default()
            .with_group_id(GroupId(common::kafka::s(GROUP)))
            .with_generation_id_or_member_epoch(generation)
            .with_member_id(common::kafka::s(&member))
            .with_topics(vec![OffsetCommitRequestTopic::default()
                .with_name(TopicName(common::kafka::s("likes")))
                .with_partitions(vec![OffsetCommitRequestPartition::default()
                    .with_partition_index(0)
                    .with_committed_offset(had)])]),
    );
    assert_eq!(committed.topics[0].partitions[0].error_code, 0, "OffsetCommit");
    (member, generation)
}

/// A heartbeat of `member` in `generation`, sent to `node`: its error code.
fn member_heartbeat(node: &Broker, member: &str, generation: i32) -> i16 {
    let mut kafka = common::kafka::KafkaConn::connect(&node.kafka);
    let heartbeat = HeartbeatRequest::default()
        .with_group_id(GroupId(common::kafka::s(GROUP)))
        .with_generation_id(generation)
        .with_member_id(common::kafka::s(member));
    kafka.call(2, &heartbeat).error_code
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
    // A Kafka member joins the group the console consumer left.
    let (member, generation) = join_kafka_member(&nodes[(chosen - 1) as usize]);

    // The coordinator's node dies; another leads the offsets partition, loads the group from
    // the replicated log and serves it.
    nodes[(chosen - 1) as usize].kill9();
    let survivors: Vec<&Broker> = nodes.iter().filter(|n| status(n).is_some()).collect();
    assert_eq!(survivors.len(), 2);
    let successor = wait_for("a new coordinator", &survivors, || {
        survivors.iter().map(|n| coordinator(n)).find(|c| c.is_some_and(|c| c != chosen)).flatten()
    });
    // The member carries on in its generation with the new coordinator, as with Kafka: the group
    // came back with its members, no rebalance.
    let new_coordinator = &nodes[(successor - 1) as usize];
    let code = wait_for("the new coordinator to load the group", &survivors, || {
        Some(member_heartbeat(new_coordinator, &member, generation)).filter(|&code| code != 16 && code != 14)
    });
    assert_eq!(code, 0, "the member's heartbeat to the new coordinator {successor}");
    let mut kafka = common::kafka::KafkaConn::connect(&new_coordinator.kafka);
    let left = kafka.call(
        3,
        &LeaveGroupRequest::default()
            .with_group_id(GroupId(common::kafka::s(GROUP)))
            .with_members(vec![MemberIdentity::default().with_member_id(common::kafka::s(&member))]),
    );
    assert_eq!(left.error_code, 0, "LeaveGroup");
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

/// What the member reads (`before-*`, `after-kill-*`, `after-return-*`): 3 partitions, 3 copies.
const FEED: &str = "feed";

fn member_config(group: &str) -> GroupConsumerConfig {
    GroupConsumerConfig {
        session_timeout: Duration::from_secs(6),
        rebalance_timeout: Duration::from_secs(5),
        heartbeat_interval: Duration::from_millis(300),
        auto_commit_interval: Duration::from_millis(100),
        ..GroupConsumerConfig::new(group)
    }
}

/// Writes `<label>-0..count` round-robin over the feed's partitions with `acks=all`, sending
/// again what failed (a leader may be being elected) until everything is acknowledged.
fn produce_acked(rt: &Runtime, producer: &Producer, label: &str, count: usize) -> Vec<String> {
    let values: Vec<String> = (0..count).map(|i| format!("{label}-{i}")).collect();
    rt.block_on(async {
        let started = Instant::now();
        let mut pending = values.clone();
        while !pending.is_empty() {
            let mut deliveries = Vec::new();
            for (i, value) in pending.iter().enumerate() {
                let value_bytes = Bytes::from(value.clone());
                let delivery = producer.send_to(FEED, (i % 3) as u32, None, value_bytes).await.unwrap();
                deliveries.push((value.clone(), delivery));
            }
            producer.flush().await;
            pending.clear();
            let mut failure = None;
            for (value, delivery) in deliveries {
                if let Err(e) = delivery.await {
                    pending.push(value);
                    failure = Some(e);
                }
            }
            if let Some(e) = failure {
                assert!(started.elapsed() < DEADLINE, "{} records never acknowledged: {e}", pending.len());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    values
}

/// Polls the member until it has returned every value of `written` (adding what it returns to
/// `read`), committing after each poll; fails with the nodes' logs if it has not within
/// `DEADLINE`.
fn read_all(
    rt: &Runtime,
    member: &mut GroupConsumer,
    written: &[String],
    read: &mut BTreeSet<String>,
    nodes: &[&Broker],
    when: &str,
) {
    let started = Instant::now();
    let mut last_error: Option<ClientError> = None;
    rt.block_on(async {
        while let Some(missing) = written.iter().find(|v| !read.contains(*v)) {
            if started.elapsed() > DEADLINE {
                let logs: Vec<String> = nodes.iter().map(|n| n.log()).collect();
                panic!(
                    "{when}: the member had not read {missing} after {DEADLINE:?} \
                     (last poll error: {last_error:?}); logs:\n{}",
                    logs.join("\n-----\n")
                );
            }
            // An application polls on through errors; the deadline decides.
            match member.poll(Duration::from_millis(100)).await {
                Ok(records) if records.is_empty() => {}
                Ok(records) => {
                    read.extend(
                        records
                            .iter()
                            .map(|r| String::from_utf8_lossy(r.value.as_deref().unwrap_or(b"")).into_owned()),
                    );
                    // As the nemesis' member does: after every poll, so a rejoin starts where
                    // this member was rather than at the log start.
                    if let Err(e) = member.commit().await {
                        last_error = Some(e);
                    }
                }
                Err(e) => last_error = Some(e),
            }
        }
    });
}

#[test]
fn a_group_member_reads_on_through_the_death_and_return_of_its_leader_and_coordinator() {
    let (_, _dirs, mut nodes) = start_three_with(&["leader_balance_interval_ms=500".to_string()]);
    let all: Vec<&Broker> = nodes.iter().collect();
    wait_for("a controller leader", &all, || agreed_leader(&all, 3));
    let created = common::run_cli(
        &nodes[0].addr,
        &["topic", "create", FEED, "--partitions", "3", "--replication-factor", "3"],
        None,
    )
    .ok();
    assert!(created.contains("3 partitions"), "{created}");

    // Leadership settles on the preferred replicas, spread over the nodes by placement. The member
    // bootstraps through node 1, which stays up; the node killed leads a partition of the feed
    // and coordinates the member's group.
    let preferred =
        wait_for("the feed led by its preferred replicas", &all, || led_by_preferred(&nodes[0], FEED));
    wait_for("the offsets topic led by its preferred replicas", &all, || {
        led_by_preferred(&nodes[0], "__consumer_offsets")
    });
    let (victim, group) =
        wait_for("a group coordinated by a node leading a partition of the feed", &all, || {
            (0..64).map(|i| format!("readers-{i}")).find_map(|group| {
                let coordinator = coordinator_of(&nodes[0], &group)?;
                (coordinator != 1 && preferred.contains(&coordinator)).then_some((coordinator, group))
            })
        });
    let victim = (victim - 1) as usize;

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let client =
        ClientConfig { request_timeout: Duration::from_secs(10), ..ClientConfig::new(nodes[0].addr.clone()) };
    let producer = rt.block_on(Producer::connect(
        client.clone(),
        ProducerConfig { acks: -1, ..ProducerConfig::default() },
    ));
    let producer = producer.unwrap();
    let mut member = rt.block_on(GroupConsumer::connect(client, member_config(&group))).unwrap();
    member.subscribe(vec![FEED.to_string()]);
    let mut read = BTreeSet::new();

    let before = produce_acked(&rt, &producer, "before", 60);
    read_all(&rt, &mut member, &before, &mut read, &all, "before any fault");
    assert_eq!(member.assignment().len(), 3, "the only member holds every partition");

    // SIGKILL: a partition's leader and the group's coordinator are gone at once. Survivors take
    // both over; what is written through them reaches the member.
    nodes[victim].kill9();
    let survivors: Vec<&Broker> = nodes.iter().filter(|n| status(n).is_some()).collect();
    assert_eq!(survivors.len(), 2);
    let after_kill = produce_acked(&rt, &producer, "after-kill", 60);
    read_all(&rt, &mut member, &after_kill, &mut read, &survivors, "after the kill");

    // The node returns and takes its leaderships back from the survivors, which stay up: the
    // member's metadata names leaders that now refuse its fetches.
    nodes[victim].restart();
    let all: Vec<&Broker> = nodes.iter().collect();
    wait_for("the feed back on its preferred replicas", &all, || led_by_preferred(&nodes[victim], FEED));
    wait_for("the offsets topic back on its preferred replicas", &all, || {
        led_by_preferred(&nodes[victim], "__consumer_offsets")
    });
    let after_return = produce_acked(&rt, &producer, "after-return", 60);
    read_all(&rt, &mut member, &after_return, &mut read, &all, "after the node returned");

    // Nothing else was read: every value is one of those written.
    let written: BTreeSet<String> = before.into_iter().chain(after_kill).chain(after_return).collect();
    assert_eq!(read, written);
}

#[test]
fn group_list_through_any_node_lists_every_group_of_the_cluster() {
    let (_, _dirs, nodes) = start_three_with(&["leader_balance_interval_ms=500".to_string()]);
    let all: Vec<&Broker> = nodes.iter().collect();
    wait_for("a controller leader", &all, || agreed_leader(&all, 3));
    common::run_cli(
        &nodes[0].addr,
        &["topic", "create", "pages", "--partitions", "1", "--replication-factor", "3"],
        None,
    )
    .ok();
    let produced =
        common::run_cli(&nodes[0].addr, &["produce", "pages", "--acks", "all"], Some(b"a\nb\nc\n"));
    assert!(produced.status.success(), "{}", produced.stderr);

    // One group per coordinating node, groups at node 1 (the CLI's bootstrap below) and elsewhere.
    wait_for("the offsets topic led by its preferred replicas", &all, || {
        led_by_preferred(&nodes[0], "__consumer_offsets")
    });
    let groups: BTreeMap<u64, String> = wait_for("groups coordinated by several nodes", &all, || {
        let mut by_node = BTreeMap::new();
        for group in (0..64).map(|i| format!("pages-{i}")) {
            by_node.entry(coordinator_of(&nodes[0], &group)?).or_insert(group);
        }
        (by_node.len() >= 2 && by_node.keys().any(|&node| node != 1)).then_some(by_node)
    });
    for group in groups.values() {
        let out =
            common::run_cli(&nodes[0].addr, &["consume", "pages", "--group", group, "--count", "1"], None);
        assert_eq!(out.ok().lines().count(), 1);
    }

    let expected: BTreeSet<&str> = groups.values().map(String::as_str).collect();
    for (i, node) in nodes.iter().enumerate() {
        let listed = node.cli(&["group", "list"], None).ok();
        let names: BTreeSet<&str> =
            listed.lines().skip(1).filter_map(|l| l.split_whitespace().next()).collect();
        assert_eq!(names, expected, "group list through node {}:\n{listed}", i + 1);
    }

    // Kafka's admin clients send ListGroups to every broker: each answers the groups it
    // coordinates, so their union is every group, each listed once.
    for (i, node) in nodes.iter().enumerate() {
        let id = i as u64 + 1;
        let mut kafka = common::kafka::KafkaConn::connect(&node.kafka);
        let answer = kafka.call(4, &ListGroupsRequest::default());
        assert_eq!(answer.error_code, 0);
        let names: BTreeSet<String> = answer.groups.iter().map(|g| g.group_id.0.to_string()).collect();
        let own: BTreeSet<String> =
            groups.iter().filter(|(coordinator, _)| **coordinator == id).map(|(_, g)| g.clone()).collect();
        assert_eq!(names, own, "Kafka ListGroups of node {id}");
    }
}

/// Issue 11: as Kafka's coordinator, ours answers SyncGroup only once the group's record holding
/// the new assignment is stored, here committed by a majority of `__consumer_offsets`' replicas.
/// With the two other nodes killed before the member syncs, the record cannot commit: the member
/// gets COORDINATOR_NOT_AVAILABLE instead of an assignment no other node would know of (the
/// pending record fails when the coordinator steps down for want of a quorum, or at the
/// replication timeout). Once the nodes are back, the member rejoins and the next generation is
/// committed and answered.
#[test]
fn a_sync_whose_group_record_is_not_committed_fails_and_the_member_rejoins() {
    let extra = ["offsets_topic_partitions=1", "replication_timeout_ms=2000"].map(String::from);
    let (_, _dirs, mut nodes) = start_three_with(&extra);
    let all: Vec<&Broker> = nodes.iter().collect();
    wait_for("a controller leader", &all, || agreed_leader(&all, 3));
    let chosen = wait_for("every node to name one coordinator", &all, || {
        let named: BTreeSet<Option<u64>> = nodes.iter().map(coordinator).collect();
        (named.len() == 1).then(|| named.into_iter().next().flatten()).flatten()
    });
    let at = (chosen - 1) as usize;
    wait_for("the coordinator to load its partition", &all, || {
        (heartbeat_code(&nodes[at]) == 25).then_some(())
    });
    let join = |member: &str| {
        JoinGroupRequest::default()
            .with_group_id(GroupId(common::kafka::s(GROUP)))
            .with_session_timeout_ms(30_000)
            .with_rebalance_timeout_ms(10_000)
            .with_member_id(common::kafka::s(member))
            .with_protocol_type(common::kafka::s("consumer"))
            .with_protocols(vec![JoinGroupRequestProtocol::default().with_name(common::kafka::s("range"))])
    };
    let sync = |member: &str, generation: i32| {
        SyncGroupRequest::default()
            .with_group_id(GroupId(common::kafka::s(GROUP)))
            .with_generation_id(generation)
            .with_member_id(common::kafka::s(member))
            .with_assignments(vec![SyncGroupRequestAssignment::default()
                .with_member_id(common::kafka::s(member))
                .with_assignment(Bytes::from_static(b"all of likes"))])
    };
    let mut kafka = common::kafka::KafkaConn::connect(&nodes[at].kafka);
    let joined = kafka.call(3, &join(""));
    assert_eq!(joined.error_code, 0, "JoinGroup");
    let (member, generation) = (joined.member_id.to_string(), joined.generation_id);

    for (i, node) in nodes.iter_mut().enumerate().filter(|(i, _)| *i != at) {
        node.kill9();
        assert!(status(node).is_none(), "node {} still answers", i + 1);
    }
    // COORDINATOR_NOT_AVAILABLE, or NOT_COORDINATOR should the node have lost its leadership
    // already: either way the member finds the coordinator and rejoins.
    let synced = kafka.call(2, &sync(&member, generation));
    assert!([15, 16].contains(&synced.error_code), "SyncGroup without a majority: {synced:?}");
    assert!(synced.assignment.is_empty());

    for (_, node) in nodes.iter_mut().enumerate().filter(|(i, _)| *i != at) {
        node.restart();
    }
    let all: Vec<&Broker> = nodes.iter().collect();
    wait_for("three nodes again", &all, || agreed_leader(&all, 3));
    // The member rejoins wherever the group is coordinated now; with a new id if that node never
    // heard of it (the group's record did not commit).
    let (node, rejoined) = wait_for("the member to rejoin", &all, || {
        let node = &nodes[(coordinator(&nodes[0])? - 1) as usize];
        let mut kafka = common::kafka::KafkaConn::connect(&node.kafka);
        let mut answer = kafka.call(3, &join(&member));
        if answer.error_code == 25 {
            answer = kafka.call(3, &join(""));
        }
        (answer.error_code == 0).then_some((node, answer))
    });
    let mut kafka = common::kafka::KafkaConn::connect(&node.kafka);
    let synced = kafka.call(2, &sync(&rejoined.member_id, rejoined.generation_id));
    assert_eq!((synced.error_code, &synced.assignment[..]), (0, &b"all of likes"[..]), "{synced:?}");
    assert_eq!(member_heartbeat(node, &rejoined.member_id, rejoined.generation_id), 0);
}
