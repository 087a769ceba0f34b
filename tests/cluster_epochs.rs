//! Kafka's leader-epoch protocol against three real `ringlog serve` processes on loopback
//! (issue 12, the broker's side): raw Kafka frames through the `kafka-protocol` crate, a
//! replicated partition's leader killed with SIGKILL, and the answers a client that trusts
//! leader epochs (KIP-101/279/320/951) acts on — OffsetForLeaderEpoch on the leader and not on
//! its followers, the old epoch's end on the new leader, fenced and unknown epochs in Fetch and
//! ListOffsets, a diverging epoch for a log that read past its epoch's end, the current leader
//! named in errors, a prompt fatal answer to transactional clients, and a produce that cannot
//! commit answering REQUEST_TIMED_OUT after its own `timeout_ms`.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::cluster::{start_three, status, wait_for};
use common::kafka::{s, KafkaConn};
use common::Broker;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::fetch_response::PartitionData;
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::list_offsets_response::ListOffsetsPartitionResponse;
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::offset_for_leader_epoch_request::{
    OffsetForLeaderPartition, OffsetForLeaderTopic,
};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::produce_response::PartitionProduceResponse;
use kafka_protocol::messages::*;
use kafka_protocol::ResponseError as E;
use ringlog::record::builder::BatchBuilder;

const TOPIC: &str = "epochs";

fn topic() -> TopicName {
    TopicName(s(TOPIC))
}

/// Partition 0's (leader, leader epoch) in `node`'s Kafka Metadata v9, once it names a leader.
fn leader_in_metadata(node: &Broker) -> Option<(i32, i32)> {
    let mut conn = KafkaConn::connect(&node.kafka);
    let request = MetadataRequest::default()
        .with_topics(Some(vec![MetadataRequestTopic::default().with_name(Some(topic()))]))
        .with_allow_auto_topic_creation(false);
    let metadata = conn.call(9, &request);
    let partition = metadata.topics.first()?.partitions.first()?;
    (partition.error_code == 0 && partition.leader_id.0 > 0)
        .then_some((partition.leader_id.0, partition.leader_epoch))
}

/// The leader and epoch every given node's metadata agrees on.
fn agreed(nodes: &[&Broker]) -> Option<(i32, i32)> {
    let seen: Vec<(i32, i32)> = nodes.iter().map(|n| leader_in_metadata(n)).collect::<Option<_>>()?;
    seen.windows(2).all(|w| w[0] == w[1]).then(|| seen[0])
}

fn batch(values: &[&str]) -> Bytes {
    let mut b = BatchBuilder::new();
    for v in values {
        b.push(1_700_000_000_000, None, Some(v.as_bytes()), &[]);
    }
    b.finish().freeze()
}

/// Produce v10 (`acks=all`) of one batch to partition 0; the response with its one partition.
fn produce(
    conn: &mut KafkaConn,
    records: Bytes,
    timeout_ms: i32,
) -> (ProduceResponse, PartitionProduceResponse) {
    let request = ProduceRequest::default().with_acks(-1).with_timeout_ms(timeout_ms).with_topic_data(vec![
        TopicProduceData::default().with_name(topic()).with_partition_data(vec![
            PartitionProduceData::default().with_index(0).with_records(Some(records)),
        ]),
    ]);
    let response = conn.call(10, &request);
    let partition = response.responses[0].partition_responses[0].clone();
    (response, partition)
}

/// OffsetForLeaderEpoch at `version` for partition `partition`: (error, epoch, end offset).
fn epoch_end(node: &Broker, version: i16, partition: i32, current: i32, epoch: i32) -> (i16, i32, i64) {
    let request = OffsetForLeaderEpochRequest::default().with_replica_id(BrokerId(-1)).with_topics(vec![
        OffsetForLeaderTopic::default().with_topic(topic()).with_partitions(vec![
            OffsetForLeaderPartition::default()
                .with_partition(partition)
                .with_current_leader_epoch(current)
                .with_leader_epoch(epoch),
        ]),
    ]);
    let response = KafkaConn::connect(&node.kafka).call(version, &request);
    let answer = &response.topics[0].partitions[0];
    assert_eq!(answer.partition, partition);
    (answer.error_code, answer.leader_epoch, answer.end_offset)
}

/// Fetch v12 of partition 0 at `offset`, without waiting.
fn fetch(node: &Broker, offset: i64, current: i32, last_fetched: i32) -> PartitionData {
    let request = FetchRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_max_wait_ms(0)
        .with_min_bytes(0)
        .with_max_bytes(4 << 20)
        .with_session_epoch(-1)
        .with_topics(vec![FetchTopic::default().with_topic(topic()).with_partitions(vec![
            FetchPartition::default()
                .with_partition(0)
                .with_current_leader_epoch(current)
                .with_fetch_offset(offset)
                .with_last_fetched_epoch(last_fetched)
                .with_log_start_offset(-1)
                .with_partition_max_bytes(1 << 20),
        ])]);
    let response = KafkaConn::connect(&node.kafka).call(12, &request);
    response.responses[0].partitions[0].clone()
}

/// ListOffsets v6 of partition 0 at `timestamp` (-1 latest, -2 earliest).
fn list_offset(node: &Broker, current: i32, timestamp: i64) -> ListOffsetsPartitionResponse {
    let request = ListOffsetsRequest::default().with_replica_id(BrokerId(-1)).with_topics(vec![
        ListOffsetsTopic::default().with_name(topic()).with_partitions(vec![ListOffsetsPartition::default()
            .with_partition_index(0)
            .with_current_leader_epoch(current)
            .with_timestamp(timestamp)]),
    ]);
    let response = KafkaConn::connect(&node.kafka).call(6, &request);
    response.topics[0].partitions[0].clone()
}

/// Every batch of the leader's log as (base offset, partition leader epoch, record count).
fn log_of(leader: &Broker, epoch: i32) -> Vec<(i64, i32, i32)> {
    let data = fetch(leader, 0, epoch, -1);
    assert_eq!(data.error_code, 0, "{data:?}");
    let records = data.records.unwrap_or_default();
    let mut batches = Vec::new();
    let mut at = 0;
    while at + 61 <= records.len() {
        let field = |from: usize| i32::from_be_bytes(records[at + from..at + from + 4].try_into().unwrap());
        let base = i64::from_be_bytes(records[at..at + 8].try_into().unwrap());
        batches.push((base, field(12), field(23) + 1));
        at += 12 + field(8) as usize;
    }
    assert_eq!(at, records.len(), "whole batches");
    batches
}

fn node(nodes: &[Broker], id: i32) -> &Broker {
    &nodes[(id - 1) as usize]
}

#[test]
fn leader_epochs_are_answered_as_kafka_does_through_a_leaders_death() {
    let (_, _dirs, mut nodes) = start_three();
    let all: Vec<&Broker> = nodes.iter().collect();
    wait_for("a controller every node knows", &all, || {
        let leaders: Vec<Option<u64>> =
            all.iter().map(|n| status(n).and_then(|s| s["controller_leader"].as_u64())).collect();
        (leaders.iter().all(Option::is_some) && leaders.windows(2).all(|w| w[0] == w[1])).then_some(())
    });

    // Transactions are not built: a transactional client learns it at once, with a code every
    // client treats as fatal (not COORDINATOR_NOT_AVAILABLE, which librdkafka retries for 10 s).
    let mut conn = KafkaConn::connect(&nodes[0].kafka);
    let asked = Instant::now();
    let found = conn.call(3, &FindCoordinatorRequest::default().with_key(s("txn")).with_key_type(1));
    assert_eq!(found.error_code, E::TransactionalIdAuthorizationFailed.code(), "{found:?}");
    let init = InitProducerIdRequest::default()
        .with_transactional_id(Some(TransactionalId(s("txn"))))
        .with_transaction_timeout_ms(60_000)
        .with_producer_id(ProducerId(-1))
        .with_producer_epoch(-1);
    assert_eq!(conn.call(4, &init).error_code, E::TransactionalIdAuthorizationFailed.code());
    assert!(asked.elapsed() < Duration::from_secs(1), "took {:?}", asked.elapsed());

    let created = wait_for("the topic to be created", &all, || {
        let out =
            nodes[0].cli(&["topic", "create", TOPIC, "--partitions", "1", "--replication-factor", "3"], None);
        out.status.success().then_some(out.stdout)
    });
    assert!(created.contains("1 partition"), "{created}");
    let (first_leader, first_epoch) = wait_for("every node to name one leader", &all, || agreed(&all));
    let leader = node(&nodes, first_leader);
    let followers: Vec<&Broker> =
        (1..=3).filter(|&id| id != first_leader).map(|id| node(&nodes, id)).collect();
    let mut to_leader = KafkaConn::connect(&leader.kafka);
    for i in 0..3 {
        let values: Vec<String> = (0..5).map(|r| format!("first-{i}-{r}")).collect();
        let values: Vec<&str> = values.iter().map(String::as_str).collect();
        let (_, answer) = produce(&mut to_leader, batch(&values), 10_000);
        assert_eq!(answer.error_code, 0, "{answer:?}");
    }

    // KIP-951: a follower refuses a produce naming the leader, its epoch and its endpoint.
    let (response, refused) =
        produce(&mut KafkaConn::connect(&followers[0].kafka), batch(&["misrouted"]), 10_000);
    assert_eq!(refused.error_code, E::NotLeaderOrFollower.code(), "{refused:?}");
    assert_eq!(
        (refused.current_leader.leader_id.0, refused.current_leader.leader_epoch),
        (first_leader, first_epoch)
    );
    let port: i32 = leader.kafka.rsplit_once(':').unwrap().1.parse().unwrap();
    let endpoints: Vec<(i32, i32)> = response.node_endpoints.iter().map(|n| (n.node_id.0, n.port)).collect();
    assert_eq!(endpoints, vec![(first_leader, port)]);

    // The leader answers where its epoch ends (the log end, all of it committed); the followers
    // send the client to it. Fenced and unknown current epochs, unknown partitions, an epoch
    // newer than any: each as Kafka answers it.
    let latest = list_offset(leader, first_epoch, -1);
    assert_eq!((latest.error_code, latest.leader_epoch), (0, first_epoch), "{latest:?}");
    let high_watermark = latest.offset;
    assert!(high_watermark >= 15, "{latest:?}");
    for version in 2..=4 {
        let answer = epoch_end(leader, version, 0, first_epoch, first_epoch);
        assert_eq!(answer, (0, first_epoch, high_watermark), "v{version}");
        for follower in &followers {
            let refused = epoch_end(follower, version, 0, first_epoch, first_epoch).0;
            assert_eq!(refused, E::NotLeaderOrFollower.code(), "v{version}");
        }
        let stale = epoch_end(leader, version, 0, first_epoch - 1, first_epoch).0;
        assert_eq!(stale, E::FencedLeaderEpoch.code(), "v{version}");
        let future = epoch_end(leader, version, 0, first_epoch + 1, first_epoch).0;
        assert_eq!(future, E::UnknownLeaderEpoch.code(), "v{version}");
        assert_eq!(epoch_end(leader, version, 0, -1, first_epoch + 1), (0, -1, -1), "v{version}");
        assert_eq!(epoch_end(leader, version, 7, -1, first_epoch).0, E::UnknownTopicOrPartition.code());
    }

    // Fetch: the current epoch checked (-1 is not), the current leader named to a client that
    // missed an election or asked a follower, a log read past its epoch's end told where it ends.
    let stale = fetch(leader, 0, first_epoch - 1, -1);
    assert_eq!(stale.error_code, E::FencedLeaderEpoch.code(), "{stale:?}");
    assert_eq!(
        (stale.current_leader.leader_id.0, stale.current_leader.leader_epoch),
        (first_leader, first_epoch)
    );
    assert_eq!(fetch(leader, 0, first_epoch + 1, -1).error_code, E::UnknownLeaderEpoch.code());
    let unchecked = fetch(leader, 0, -1, -1);
    assert_eq!((unchecked.error_code, unchecked.high_watermark), (0, high_watermark));
    assert!(unchecked.records.as_ref().is_some_and(|r| !r.is_empty()));
    let misrouted = fetch(followers[0], 0, first_epoch, -1);
    assert_eq!(misrouted.error_code, E::NotLeaderOrFollower.code());
    assert_eq!(misrouted.current_leader.leader_id.0, first_leader, "{misrouted:?}");
    let past_end = fetch(leader, high_watermark + 3, first_epoch, first_epoch);
    assert_eq!(
        (past_end.error_code, past_end.diverging_epoch.epoch, past_end.diverging_epoch.end_offset),
        (0, first_epoch, high_watermark),
        "{past_end:?}"
    );
    assert_eq!(fetch(leader, 5, first_epoch, first_epoch).diverging_epoch.epoch, -1, "no divergence");
    // ListOffsets: the epoch of the offset it returns; a stale epoch is fenced.
    let log = log_of(leader, first_epoch);
    let earliest = list_offset(leader, first_epoch, -2);
    assert_eq!((earliest.error_code, earliest.offset, earliest.leader_epoch), (0, 0, log[0].1), "{log:?}");
    assert_eq!(list_offset(leader, first_epoch - 1, -1).error_code, E::FencedLeaderEpoch.code());

    // The leader dies without a word. The new one answers the old epoch with the offset where
    // its own starts, shows a "latest" that never went below the old leader's, and fences
    // clients still at the old epoch.
    let dead = first_leader;
    nodes[(dead - 1) as usize].kill9();
    let survivors: Vec<&Broker> = (1..=3).filter(|&id| id != dead).map(|id| node(&nodes, id)).collect();
    let (new_leader, new_epoch) = wait_for("the survivors to agree on a new leader", &survivors, || {
        agreed(&survivors).filter(|&(leader, _)| leader != dead)
    });
    assert!(new_epoch > first_epoch);
    let leader = node(&nodes, new_leader);
    let latest = wait_for("the new leader to serve", &survivors, || {
        let latest = list_offset(leader, new_epoch, -1);
        assert!(
            [0, E::OffsetNotAvailable.code(), E::NotLeaderOrFollower.code()].contains(&latest.error_code),
            "{latest:?}"
        );
        (latest.error_code == 0).then_some(latest)
    });
    assert_eq!(latest.leader_epoch, new_epoch);
    assert!(latest.offset > high_watermark, "latest went from {high_watermark} to {latest:?}");
    let log = log_of(leader, new_epoch);
    let (new_start, _, _) =
        *log.iter().find(|(_, epoch, _)| *epoch > first_epoch).expect("a batch of a later epoch");
    assert!(new_start >= high_watermark, "{log:?}");
    for version in 2..=4 {
        assert_eq!(
            epoch_end(leader, version, 0, new_epoch, first_epoch),
            (0, first_epoch, new_start),
            "v{version}"
        );
        assert_eq!(
            epoch_end(leader, version, 0, new_epoch, new_epoch),
            (0, new_epoch, latest.offset),
            "v{version}"
        );
        let stale = epoch_end(leader, version, 0, first_epoch, first_epoch).0;
        assert_eq!(stale, E::FencedLeaderEpoch.code(), "v{version}");
    }
    let stale = fetch(leader, 0, first_epoch, -1);
    assert_eq!(stale.error_code, E::FencedLeaderEpoch.code());
    assert_eq!(
        (stale.current_leader.leader_id.0, stale.current_leader.leader_epoch),
        (new_leader, new_epoch)
    );
    assert_eq!(fetch(leader, 0, new_epoch + 1, -1).error_code, E::UnknownLeaderEpoch.code());
    assert_eq!(list_offset(leader, first_epoch, -1).error_code, E::FencedLeaderEpoch.code());
    // A consumer that read the old epoch past where it ends here (an old leader's uncommitted
    // suffix) is told to truncate to that end, and gets no records; one that stopped there reads on.
    let diverged = fetch(leader, new_start + 1, new_epoch, first_epoch);
    assert_eq!(
        (diverged.error_code, diverged.diverging_epoch.epoch, diverged.diverging_epoch.end_offset),
        (0, first_epoch, new_start),
        "{diverged:?}"
    );
    assert!(diverged.records.as_ref().is_none_or(|r| r.is_empty()));
    let agrees = fetch(leader, new_start, new_epoch, first_epoch);
    assert_eq!((agrees.error_code, agrees.diverging_epoch.end_offset), (0, -1));
    assert!(agrees.records.as_ref().is_some_and(|r| !r.is_empty()));

    // Without a quorum (a second node killed) a produce answers REQUEST_TIMED_OUT after its own
    // timeout_ms, not the broker's 10 s. The leader steps down only an election timeout or two
    // (0.5-1 s here) after it last heard from a quorum, after this answer.
    let mut to_leader = KafkaConn::connect(&leader.kafka);
    let (_, answer) = produce(&mut to_leader, batch(&["with a quorum"]), 10_000);
    assert_eq!(answer.error_code, 0, "{answer:?}");
    let other = (1..=3).find(|&id| id != dead && id != new_leader).unwrap();
    nodes[(other - 1) as usize].kill9();
    let sent = Instant::now();
    let (_, answer) = produce(&mut to_leader, batch(&["without a quorum"]), 200);
    let took = sent.elapsed();
    assert_eq!(answer.error_code, E::RequestTimedOut.code(), "{answer:?} after {took:?}");
    assert!(took >= Duration::from_millis(200) && took < Duration::from_secs(2), "answered after {took:?}");
}
