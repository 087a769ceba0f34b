//! A cluster still forming (issue #11), on real `ringlog serve` processes: a topic created the
//! moment three nodes are up — before they have registered with the controller, which the other
//! cluster tests wait for — is created once they have, through the Rust client and the CLI at
//! once, and serves a round trip; a replication factor beyond the seed list is refused at once and
//! for good; and a factor waiting for a node that never starts is refused, after a bounded wait
//! (`replication_timeout_ms`, or a Kafka request's `timeout_ms`), as retriable (native
//! `ClusterForming`, Kafka REQUEST_TIMED_OUT) naming the node.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::cluster::{agreed_leader, free_ports, seeds, start_node_with, start_three, status, wait_for};
use common::Broker;
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::{CreateTopicsRequest, TopicName};
use ringlog::client::{Admin, ClientConfig, Producer, ProducerConfig, TopicSettings};
use ringlog::protocol::wire::ErrorCode;

/// The values `ringlog consume` reads from `topic` through `node`, from the beginning, sorted.
fn consume_sorted(node: &Broker, topic: &str) -> Vec<String> {
    let out = common::run_cli(&node.addr, &["consume", topic, "--from", "beginning"], None).ok();
    let mut values: Vec<String> = out.lines().map(str::to_owned).collect();
    values.sort();
    values
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_created_as_the_cluster_starts_waits_for_its_nodes_and_serves() {
    let (_, _dirs, nodes) = start_three();
    // No wait for a controller or for registrations: the requests go as soon as every node said
    // it is ready, as the next line of a deploy script would send them.
    let through_cli = nodes[1].addr.clone();
    let by_cli = std::thread::spawn(move || {
        let args = ["topic", "create", "forming-cli", "--partitions", "2", "--replication-factor", "3"];
        common::run_cli(&through_cli, &args, None)
    });
    let admin = Admin::connect(ClientConfig::new(nodes[0].addr.clone())).await.unwrap();
    let settings = TopicSettings::default();

    // More copies than the seed list names is refused at once, not after the forming wait, and
    // says what would fit (it used to reach the log before any registration and be refused with
    // "the cluster has 0 registered nodes ([]); choose 1 to 0").
    let asked = Instant::now();
    let refused = admin.create_replicated_topic("too-wide", 1, 4, &settings).await.unwrap_err();
    let took = asked.elapsed();
    assert_eq!(refused.code(), Some(ErrorCode::InvalidReplicationFactor), "{refused}");
    assert!(!refused.is_retriable(), "{refused}");
    assert!(refused.to_string().contains("choose 1 to 3"), "{refused}");
    assert!(took < Duration::from_secs(2), "refused after {took:?}, not at once");

    // Then the moment issue #11 struck: a controller leader just elected, the nodes'
    // registrations not yet in its log (they follow within a tick or so).
    let deadline = Instant::now() + Duration::from_secs(40);
    while status(&nodes[0]).is_none_or(|s| s["controller_leader"].is_null()) {
        assert!(Instant::now() < deadline, "no controller leader; log:\n{}", nodes[0].log());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let partitions = admin.create_replicated_topic("forming", 3, 3, &settings).await.unwrap();
    assert_eq!(partitions.len(), 3);
    for p in &partitions {
        let mut replicas = p.replication.as_ref().map(|r| r.replicas.clone()).unwrap_or_default();
        replicas.sort_unstable();
        assert_eq!(replicas, [1, 2, 3], "{p:?}");
    }
    // The CLI's create, sent before any leader was elected, met the cluster still forming and
    // waited on the node that took it (this test is about that moment, not about a cluster that
    // happened to be formed already).
    let by_cli = by_cli.join().unwrap().ok();
    assert!(by_cli.contains("created topic forming-cli with 2 partitions"), "{by_cli}");
    let log = nodes[1].log();
    assert!(log.contains("the cluster is still forming"), "{log}");

    // The topic serves: written with acks=all through another node, read back whole. The
    // producer rides out its partitions' first elections with its own retries.
    let producer = Producer::connect(
        ClientConfig::new(nodes[2].addr.clone()),
        ProducerConfig { acks: -1, ..ProducerConfig::default() },
    )
    .await
    .unwrap();
    let mut expected: Vec<String> = (0..30).map(|i| format!("like-{i:02}")).collect();
    let mut deliveries = Vec::new();
    for value in &expected {
        deliveries.push(producer.send("forming", None, Bytes::from(value.clone())).await.unwrap());
    }
    producer.flush().await;
    for delivery in deliveries {
        delivery.await.unwrap();
    }
    expected.sort();
    assert_eq!(consume_sorted(&nodes[0], "forming"), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_factor_waiting_for_a_node_that_never_starts_is_refused_as_retriable_naming_it() {
    // Three seeds, two nodes started: they elect a controller and register each other; node 3
    // never comes. Each node waits 1 s for registrations before refusing.
    let seeds = seeds(&free_ports(3));
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let extra = ["replication_timeout_ms=1000".to_string()];
    let nodes: Vec<Broker> =
        (0..2).map(|i| start_node_with(dirs[i].path(), i as u64 + 1, &seeds, &extra)).collect();
    let all: Vec<&Broker> = nodes.iter().collect();
    wait_for("nodes 1 and 2 registered", &all, || agreed_leader(&all, 2));

    // The native client sends the refused create again until its request timeout (3 s here),
    // then reports the broker's reason.
    let config =
        ClientConfig { request_timeout: Duration::from_secs(3), ..ClientConfig::new(nodes[0].addr.clone()) };
    let admin = Admin::connect(config).await.unwrap();
    let settings = TopicSettings::default();
    let asked = Instant::now();
    let refused = admin.create_replicated_topic("needs-three", 1, 3, &settings).await.unwrap_err();
    let took = asked.elapsed();
    assert_eq!(refused.code(), Some(ErrorCode::ClusterForming), "{refused}");
    assert!(refused.is_retriable(), "{refused}");
    let message = refused.to_string();
    for part in ["still forming", "2 nodes registered", "[1, 2]", "seed nodes [3] not yet", "retry"] {
        assert!(message.contains(part), "{part:?} in {message}");
    }
    assert!(took >= Duration::from_secs(2), "sent once only ({took:?}): the client did not retry");
    assert!(took < Duration::from_secs(10), "the retries are bounded by the request timeout: {took:?}");
    // The CLI gives up as its --request-timeout-ms says (the default is 30 s), with the reason.
    let asked = Instant::now();
    let args = [
        "topic",
        "create",
        "needs-three",
        "--partitions",
        "1",
        "--replication-factor",
        "3",
        "--request-timeout-ms",
        "2500",
    ];
    let out = common::run_cli(&nodes[0].addr, &args, None);
    let took = asked.elapsed();
    assert!(!out.status.success(), "created with a node missing: {}", out.stdout);
    assert!(out.stderr.contains("seed nodes [3] not yet"), "{}", out.stderr);
    assert!(took < Duration::from_secs(20), "the CLI kept retrying past its request timeout: {took:?}");
    // Two copies fit the nodes registered.
    admin.create_replicated_topic("two-copies", 1, 2, &settings).await.unwrap();

    // Kafka's CreateTopics through the other node: REQUEST_TIMED_OUT, which Kafka clients retry,
    // once the request's own timeout_ms has passed (not the broker's 1 s); with timeout_ms 0, at
    // once.
    let mut kafka = common::kafka::KafkaConn::connect(&nodes[1].kafka);
    let create = |timeout_ms: i32| {
        CreateTopicsRequest::default().with_timeout_ms(timeout_ms).with_topics(vec![CreatableTopic::default(
        )
        .with_name(TopicName(common::kafka::s("needs-three")))
        .with_num_partitions(1)
        .with_replication_factor(3)])
    };
    for timeout_ms in [2500, 0] {
        let asked = Instant::now();
        let answer = kafka.call(5, &create(timeout_ms));
        let took = asked.elapsed();
        let topic = &answer.topics[0];
        assert_eq!(topic.error_code, 7, "timeout_ms {timeout_ms}: {:?}", topic.error_message);
        let message = topic.error_message.as_ref().map(|m| m.to_string()).unwrap_or_default();
        assert!(message.contains("seed nodes [3] not yet"), "{message}");
        if timeout_ms > 0 {
            assert!(took >= Duration::from_millis(2500), "answered before timeout_ms: {took:?}");
        } else {
            assert!(message.contains("(waited 0 ms)"), "timeout_ms 0 waited: {message}");
        }
    }

    // Nothing was created by the refusals.
    let topics = admin.list_topics().await.unwrap();
    assert!(
        topics.contains(&"two-copies".to_string()) && !topics.contains(&"needs-three".to_string()),
        "{topics:?}"
    );
}
