//! The Kafka listener end to end, over raw sockets to a real broker: every request is encoded by
//! the `kafka-protocol` crate at a version the broker advertises and every response decoded at
//! that version, so each (API, version) pair in the ApiVersions table is exercised with real
//! bytes. Assertions are on Kafka's semantics (error codes, offsets, stored bytes), the way an
//! unchanged Kafka client would rely on them. Bad input (unsupported versions, broken framing,
//! corrupt batches, hostile array counts) must cost a connection at most, never the broker or
//! anyone's acknowledged data. Setup that is not under test (creating topics, producing data a
//! fetch reads) goes through the native protocol where that keeps one API's test independent of
//! another API's implementation.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::create_partitions_request::CreatePartitionsTopic;
use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreatableTopicConfig};
use kafka_protocol::messages::describe_configs_request::DescribeConfigsResource;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::fetch_response::PartitionData;
use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::leave_group_request::MemberIdentity;
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
use kafka_protocol::messages::*;
use kafka_protocol::ResponseError as E;

use common::kafka::{raw_frame, s, versions, KafkaConn, CLIENT_ID};
use common::wire::Conn;
use common::Broker;
use ringlog::protocol::wire::ErrorCode;
use ringlog::record::builder::BatchBuilder;

/// Every API this file exercises version by version. The broker must advertise exactly these:
/// an API added to the table without a wire test here, or one dropped from it, fails
/// `api_versions_advertises_one_table_at_every_version`.
const EXERCISED: &[ApiKey] = &[
    ApiKey::Produce,
    ApiKey::Fetch,
    ApiKey::ListOffsets,
    ApiKey::Metadata,
    ApiKey::OffsetCommit,
    ApiKey::OffsetFetch,
    ApiKey::FindCoordinator,
    ApiKey::JoinGroup,
    ApiKey::Heartbeat,
    ApiKey::LeaveGroup,
    ApiKey::SyncGroup,
    ApiKey::DescribeGroups,
    ApiKey::ListGroups,
    ApiKey::ApiVersions,
    ApiKey::CreateTopics,
    ApiKey::DeleteTopics,
    ApiKey::InitProducerId,
    ApiKey::DescribeConfigs,
    ApiKey::CreatePartitions,
    ApiKey::DeleteGroups,
    ApiKey::OffsetForLeaderEpoch,
];

type Table = BTreeMap<i16, (i16, i16)>;

fn start(sets: &[&str]) -> (Broker, Table) {
    let broker = Broker::start(2, sets);
    let (_, table) = KafkaConn::connect(&broker.kafka).api_versions(0);
    (broker, table)
}

fn kafka_port(broker: &Broker) -> i32 {
    broker.kafka.rsplit_once(':').unwrap().1.parse().unwrap()
}

fn topic(name: &str) -> TopicName {
    TopicName(s(name))
}

fn group(name: &str) -> GroupId {
    GroupId(s(name))
}

fn create_native(broker: &Broker, name: &str, partitions: u32) {
    let resp = Conn::connect(&broker.addr).create_topic(name, partitions);
    assert_eq!(resp.root().error(), ErrorCode::None, "{:?}", resp.root().message());
}

/// A topic's partition count from native metadata (no auto-creation involved).
fn native_partitions(broker: &Broker, name: &str) -> Option<usize> {
    let resp = Conn::connect(&broker.addr).metadata();
    let body = resp.root().body_as_metadata_response().unwrap();
    let topics = body.topics().unwrap();
    let found = topics.iter().find(|t| t.name() == Some(name));
    found.map(|t| t.partitions().unwrap().len())
}

/// One uncompressed batch with keyed records and a header, timestamps from `timestamp_ms`.
fn batch(values: &[String], timestamp_ms: i64) -> Vec<u8> {
    let mut b = BatchBuilder::new();
    for (i, v) in values.iter().enumerate() {
        let key = format!("key-{i}");
        b.push(timestamp_ms + i as i64, Some(key.as_bytes()), Some(v.as_bytes()), &[("h", b"v")]);
    }
    b.finish().to_vec()
}

/// `batch` with producer id, epoch and base sequence set and its crc32c recomputed.
fn idempotent(mut batch: Vec<u8>, producer_id: i64, epoch: i16, base_sequence: i32) -> Vec<u8> {
    batch[43..51].copy_from_slice(&producer_id.to_be_bytes());
    batch[51..53].copy_from_slice(&epoch.to_be_bytes());
    batch[53..57].copy_from_slice(&base_sequence.to_be_bytes());
    let crc = crc32c::crc32c(&batch[21..]);
    batch[17..21].copy_from_slice(&crc.to_be_bytes());
    batch
}

fn produce_request(name: &str, partition: i32, records: &[u8], acks: i16) -> ProduceRequest {
    ProduceRequest::default().with_acks(acks).with_timeout_ms(10_000).with_topic_data(vec![
        TopicProduceData::default().with_name(topic(name)).with_partition_data(vec![
            PartitionProduceData::default()
                .with_index(partition)
                .with_records(Some(Bytes::copy_from_slice(records))),
        ]),
    ])
}

/// The single partition answer of a produce response: (error code, base offset).
#[track_caller]
fn produce_outcome(resp: &ProduceResponse, name: &str, partition: i32) -> (i16, i64) {
    assert_eq!(resp.responses.len(), 1, "{resp:?}");
    let t = &resp.responses[0];
    assert_eq!(t.name.0.as_str(), name);
    assert_eq!(t.partition_responses.len(), 1, "{resp:?}");
    let p = &t.partition_responses[0];
    assert_eq!(p.index, partition);
    (p.error_code, p.base_offset)
}

fn fetch_request(name: &str, partition: i32, offset: i64, max_wait_ms: i32) -> FetchRequest {
    FetchRequest::default()
        .with_max_wait_ms(max_wait_ms)
        .with_min_bytes(1)
        .with_max_bytes(4 << 20)
        .with_topics(vec![FetchTopic::default().with_topic(topic(name)).with_partitions(vec![
            FetchPartition::default()
                .with_partition(partition)
                .with_fetch_offset(offset)
                .with_partition_max_bytes(1 << 20),
        ])])
}

#[track_caller]
fn fetched<'a>(resp: &'a FetchResponse, name: &str, partition: i32) -> &'a PartitionData {
    assert_eq!(resp.responses.len(), 1, "{resp:?}");
    let t = &resp.responses[0];
    assert_eq!(t.topic.0.as_str(), name);
    assert_eq!(t.partitions.len(), 1);
    assert_eq!(t.partitions[0].partition_index, partition);
    &t.partitions[0]
}

/// The whole batches in a fetch's records (each one's crc32c checked).
fn split_batches(records: Option<&Bytes>) -> Vec<Vec<u8>> {
    let Some(records) = records else { return Vec::new() };
    let mut out = Vec::new();
    for b in ringlog::record::batches(records) {
        let (_, bytes) = b.expect("broker served a valid batch");
        out.push(bytes.to_vec());
    }
    out
}

/// A stored batch is the batch the client sent with its base offset assigned: the length and
/// everything the crc32c covers (and the crc itself) are the client's bytes. The partition
/// leader epoch is stamped with the leader's, 0 on a single broker, as a Kafka leader stamps it.
#[track_caller]
fn assert_stored_as_sent(stored: &[u8], sent: &[u8], base_offset: i64) {
    assert_eq!(stored.len(), sent.len(), "batch at {base_offset}: length");
    assert_eq!(i64::from_be_bytes(stored[..8].try_into().unwrap()), base_offset);
    assert_eq!(stored[8..12], sent[8..12]);
    let epoch = i32::from_be_bytes(stored[12..16].try_into().unwrap());
    assert_eq!(epoch, 0, "batch at {base_offset}: partition leader epoch");
    assert!(stored[16..] == sent[16..], "batch at {base_offset}: bytes differ from what was produced");
}

fn list_offsets_request(name: &str, partition: i32, timestamp: i64) -> ListOffsetsRequest {
    ListOffsetsRequest::default().with_replica_id(BrokerId(-1)).with_topics(vec![ListOffsetsTopic::default()
        .with_name(topic(name))
        .with_partitions(vec![ListOffsetsPartition::default()
            .with_partition_index(partition)
            .with_timestamp(timestamp)])])
}

/// (error code, offset) of a single-partition ListOffsets.
#[track_caller]
fn list_offset(conn: &mut KafkaConn, version: i16, name: &str, partition: i32, timestamp: i64) -> (i16, i64) {
    let resp = conn.call(version, &list_offsets_request(name, partition, timestamp));
    assert_eq!(resp.topics.len(), 1, "{resp:?}");
    assert_eq!(resp.topics[0].name.0.as_str(), name);
    let p = &resp.topics[0].partitions[0];
    assert_eq!(p.partition_index, partition);
    (p.error_code, p.offset)
}

const EARLIEST: i64 = -2;
const LATEST: i64 = -1;

#[test]
fn api_versions_advertises_one_table_at_every_version() {
    let broker = Broker::start(2, &[]);
    let mut conn = KafkaConn::connect(&broker.kafka);
    let (first, table) = conn.api_versions(0);
    assert_eq!(first.error_code, 0);
    assert_eq!(first.api_keys.len(), table.len(), "an API advertised twice: {:?}", first.api_keys);
    let advertised: BTreeSet<i16> = table.keys().copied().collect();
    let exercised: BTreeSet<i16> = EXERCISED.iter().map(|api| *api as i16).collect();
    assert_eq!(advertised, exercised, "advertised APIs differ from the ones this file tests");
    for (&key, &(min, max)) in &table {
        let api = ApiKey::try_from(key).unwrap();
        let known = api.valid_versions();
        assert!(min <= max && known.min <= min && max <= known.max, "{api:?} {min}..={max} vs crate {known}");
    }

    let api_versions = versions(&table, ApiKey::ApiVersions);
    assert_eq!(*api_versions.start(), 0, "every client starts with ApiVersions v0");
    for version in api_versions.clone() {
        let (resp, t) = conn.api_versions(version);
        assert_eq!(resp.error_code, 0, "v{version}");
        assert_eq!(t, table, "ApiVersions v{version} advertises a different table");
    }

    // KIP-511: a client newer than the broker asks at a version the broker does not know; the
    // answer is a v0 response with UNSUPPORTED_VERSION and the table, and the connection stays.
    for version in [api_versions.end() + 1, 100, i16::MAX] {
        let cid = conn.take_cid();
        conn.send_raw(&raw_frame(ApiKey::ApiVersions as i16, version, cid, &[1, 1, 0]));
        let resp = conn.recv::<ApiVersionsRequest>(0, cid).expect("a v0 answer, not a close");
        assert_eq!(resp.error_code, E::UnsupportedVersion.code(), "v{version}");
        let t: Table =
            resp.api_keys.iter().map(|v: &ApiVersion| (v.api_key, (v.min_version, v.max_version))).collect();
        assert_eq!(t, table, "KIP-511 answer to v{version}");
    }
    let (resp, _) = conn.api_versions(0);
    assert_eq!(resp.error_code, 0, "the connection still works after the KIP-511 answers");
}

#[test]
fn metadata_at_every_version_describes_the_single_broker() {
    let (broker, table) = start(&[]);
    create_native(&broker, "meta", 3);
    let mut conn = KafkaConn::connect(&broker.kafka);
    let port = kafka_port(&broker);
    for version in versions(&table, ApiKey::Metadata) {
        let mut request = MetadataRequest::default()
            .with_topics(Some(vec![MetadataRequestTopic::default().with_name(Some(topic("meta")))]));
        if version >= 4 {
            request = request.with_allow_auto_topic_creation(false);
        }
        let resp = conn.call(version, &request);
        assert_eq!(resp.brokers.len(), 1, "v{version}: {resp:?}");
        let b = &resp.brokers[0];
        assert_eq!((b.node_id, b.host.as_str(), b.port), (BrokerId(0), "127.0.0.1", port), "v{version}");
        if version >= 1 {
            assert_eq!(resp.controller_id, BrokerId(0), "v{version}");
        }
        assert_eq!(resp.topics.len(), 1, "v{version}: {resp:?}");
        let t = &resp.topics[0];
        assert_eq!(t.error_code, 0, "v{version}");
        assert_eq!(t.name.as_ref().map(|n| n.0.as_str()), Some("meta"));
        assert!(!t.is_internal);
        let mut partitions: Vec<i32> = t.partitions.iter().map(|p| p.partition_index).collect();
        partitions.sort();
        assert_eq!(partitions, vec![0, 1, 2], "v{version}");
        for p in &t.partitions {
            assert_eq!(p.error_code, 0);
            assert_eq!(p.leader_id, BrokerId(0), "v{version} partition {}", p.partition_index);
            assert_eq!(p.replica_nodes, vec![BrokerId(0)]);
            assert_eq!(p.isr_nodes, vec![BrokerId(0)]);
            if version >= 7 {
                assert_eq!(p.leader_epoch, 0);
            }
        }
    }

    // All topics (a null list; v0 has no null list and means "all" by an empty one).
    let all = conn.call(1, &MetadataRequest::default().with_topics(None));
    assert!(all.topics.iter().any(|t| t.name.as_ref().is_some_and(|n| n.0.as_str() == "meta")));
    let all = conn.call(0, &MetadataRequest::default().with_topics(Some(vec![])));
    assert!(all.topics.iter().any(|t| t.name.as_ref().is_some_and(|n| n.0.as_str() == "meta")));

    // An unknown topic without auto-creation: UNKNOWN_TOPIC_OR_PARTITION, and nothing created.
    let max = *versions(&table, ApiKey::Metadata).end();
    let request = MetadataRequest::default()
        .with_topics(Some(vec![MetadataRequestTopic::default().with_name(Some(topic("nope")))]))
        .with_allow_auto_topic_creation(false);
    let resp = conn.call(max, &request);
    assert_eq!(resp.topics[0].error_code, E::UnknownTopicOrPartition.code());
    assert_eq!(native_partitions(&broker, "nope"), None);

    // With auto-creation (kafka_auto_create_topics defaults to true) the topic appears with the
    // default partition count; Kafka may answer the creating request with LEADER_NOT_AVAILABLE.
    let request = MetadataRequest::default()
        .with_topics(Some(vec![MetadataRequestTopic::default().with_name(Some(topic("auto")))]));
    let resp = conn.call(max, &request);
    let code = resp.topics[0].error_code;
    assert!(code == 0 || code == E::LeaderNotAvailable.code(), "auto-create answered {code}");
    // Clients retry LEADER_NOT_AVAILABLE; so does this test, a bounded number of times.
    let mut resp = conn.call(max, &request);
    for _ in 0..50 {
        if resp.topics[0].error_code != E::LeaderNotAvailable.code() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        resp = conn.call(max, &request);
    }
    assert_eq!(resp.topics[0].error_code, 0);
    assert_eq!(resp.topics[0].partitions.len(), 1);
    assert_eq!(native_partitions(&broker, "auto"), Some(1));
}

#[test]
fn topic_admin_apis_at_every_version() {
    let (broker, table) = start(&[]);
    let mut conn = KafkaConn::connect(&broker.kafka);

    for version in versions(&table, ApiKey::CreateTopics) {
        let name = format!("ct-v{version}");
        let creatable = CreatableTopic::default()
            .with_name(topic(&name))
            .with_num_partitions(2)
            .with_replication_factor(1)
            .with_configs(vec![CreatableTopicConfig::default()
                .with_name(s("retention.ms"))
                .with_value(Some(s("3600000")))]);
        let request =
            CreateTopicsRequest::default().with_timeout_ms(10_000).with_topics(vec![creatable.clone()]);
        let resp = conn.call(version, &request);
        assert_eq!(resp.topics.len(), 1, "v{version}: {resp:?}");
        let t = &resp.topics[0];
        assert_eq!(
            (t.name.0.as_str(), t.error_code),
            (name.as_str(), 0),
            "v{version}: {:?}",
            t.error_message
        );
        if version >= 5 {
            assert_eq!((t.num_partitions, t.replication_factor), (2, 1), "v{version}");
        }
        assert_eq!(native_partitions(&broker, &name), Some(2), "v{version}");

        let again = conn.call(version, &request);
        assert_eq!(again.topics[0].error_code, E::TopicAlreadyExists.code(), "v{version}");

        // validate_only checks and creates nothing.
        let name = format!("ct-validate-v{version}");
        let request = CreateTopicsRequest::default()
            .with_timeout_ms(10_000)
            .with_validate_only(true)
            .with_topics(vec![creatable.clone().with_name(topic(&name))]);
        let resp = conn.call(version, &request);
        assert_eq!(resp.topics[0].error_code, 0, "v{version}: {:?}", resp.topics[0].error_message);
        assert_eq!(native_partitions(&broker, &name), None, "v{version}: validate_only created the topic");
    }
    let max = *versions(&table, ApiKey::CreateTopics).end();
    let bad = |name: &str, partitions: i32, replication: i16| {
        CreateTopicsRequest::default().with_timeout_ms(10_000).with_topics(vec![CreatableTopic::default()
            .with_name(topic(name))
            .with_num_partitions(partitions)
            .with_replication_factor(replication)])
    };
    let resp = conn.call(max, &bad("three-replicas", 1, 3));
    assert_eq!(resp.topics[0].error_code, E::InvalidReplicationFactor.code(), "one broker, three replicas");
    let resp = conn.call(max, &bad("bad/name", 1, 1));
    assert_eq!(resp.topics[0].error_code, E::InvalidTopicException.code());
    let resp = conn.call(max, &bad("no-partitions", 0, 1));
    assert_eq!(resp.topics[0].error_code, E::InvalidPartitions.code());
    // -1: the broker's defaults (KIP-464).
    let resp = conn.call(max, &bad("defaults", -1, -1));
    assert_eq!(resp.topics[0].error_code, 0);
    assert_eq!(native_partitions(&broker, "defaults"), Some(1));

    for version in versions(&table, ApiKey::DescribeConfigs) {
        let name = format!("ct-v{max}");
        let mut request =
            DescribeConfigsRequest::default().with_resources(vec![DescribeConfigsResource::default()
                .with_resource_type(2)
                .with_resource_name(s(&name))
                .with_configuration_keys(None)]);
        if version >= 1 {
            request = request.with_include_synonyms(true);
        }
        let resp = conn.call(version, &request);
        assert_eq!(resp.results.len(), 1, "v{version}");
        let r = &resp.results[0];
        assert_eq!(
            (r.error_code, r.resource_type, r.resource_name.as_str()),
            (0, 2, name.as_str()),
            "v{version}"
        );
        let retention = r.configs.iter().find(|c| c.name.as_str() == "retention.ms");
        let retention = retention.unwrap_or_else(|| panic!("v{version}: no retention.ms in {:?}", r.configs));
        assert_eq!(retention.value.as_ref().map(|v| v.as_str()), Some("3600000"), "v{version}");
        assert_eq!(
            retention.config_source, 1,
            "v{version}: retention.ms was set on the topic (DYNAMIC_TOPIC_CONFIG)"
        );
        assert!(!retention.is_sensitive);

        // Only the keys asked for; an unknown topic is an error for that resource alone.
        let request = DescribeConfigsRequest::default().with_resources(vec![
            DescribeConfigsResource::default()
                .with_resource_type(2)
                .with_resource_name(s(&name))
                .with_configuration_keys(Some(vec![s("retention.ms")])),
            DescribeConfigsResource::default()
                .with_resource_type(2)
                .with_resource_name(s("nope"))
                .with_configuration_keys(None),
        ]);
        let resp = conn.call(version, &request);
        assert_eq!(resp.results.len(), 2, "v{version}");
        assert_eq!(resp.results[0].error_code, 0);
        let names: Vec<&str> = resp.results[0].configs.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, vec!["retention.ms"], "v{version}");
        assert_eq!(resp.results[1].error_code, E::UnknownTopicOrPartition.code(), "v{version}");
    }

    create_native(&broker, "cp", 1);
    let mut partitions = 1;
    for version in versions(&table, ApiKey::CreatePartitions) {
        let grow = |count: i32, validate_only: bool| {
            CreatePartitionsRequest::default()
                .with_timeout_ms(10_000)
                .with_validate_only(validate_only)
                .with_topics(vec![CreatePartitionsTopic::default()
                    .with_name(topic("cp"))
                    .with_count(count)
                    .with_assignments(None)])
        };
        let resp = conn.call(version, &grow(partitions + 2, true));
        assert_eq!(resp.results[0].error_code, 0, "v{version}: {:?}", resp.results[0].error_message);
        assert_eq!(native_partitions(&broker, "cp"), Some(partitions as usize), "validate_only changed it");
        let resp = conn.call(version, &grow(partitions + 1, false));
        assert_eq!(resp.results.len(), 1);
        assert_eq!(resp.results[0].name.0.as_str(), "cp");
        assert_eq!(resp.results[0].error_code, 0, "v{version}: {:?}", resp.results[0].error_message);
        partitions += 1;
        assert_eq!(native_partitions(&broker, "cp"), Some(partitions as usize), "v{version}");
        let resp = conn.call(version, &grow(partitions, false));
        assert_eq!(resp.results[0].error_code, E::InvalidPartitions.code(), "v{version}: same count");
    }

    for version in versions(&table, ApiKey::DeleteTopics) {
        let name = format!("dt-v{version}");
        create_native(&broker, &name, 2);
        let request =
            DeleteTopicsRequest::default().with_timeout_ms(10_000).with_topic_names(vec![topic(&name)]);
        let resp = conn.call(version, &request);
        assert_eq!(resp.responses.len(), 1, "v{version}");
        let r = &resp.responses[0];
        assert_eq!(r.name.as_ref().map(|n| n.0.as_str()), Some(name.as_str()));
        assert_eq!(r.error_code, 0, "v{version}");
        assert_eq!(native_partitions(&broker, &name), None, "v{version}: {name} still listed");
        let resp = conn.call(version, &request);
        assert_eq!(resp.responses[0].error_code, E::UnknownTopicOrPartition.code(), "v{version}");
    }
}

#[test]
fn produce_at_every_version_then_fetch_at_every_version() {
    let (broker, table) = start(&[]);
    create_native(&broker, "pv", 1);
    let mut conn = KafkaConn::connect(&broker.kafka);
    let mut sent: Vec<(i64, Vec<u8>)> = Vec::new();
    let mut sent_values: Vec<String> = Vec::new();
    let mut next_offset = 0i64;
    for version in versions(&table, ApiKey::Produce) {
        let values: Vec<String> = (0..3).map(|i| format!("produce-v{version}-{i}")).collect();
        let records = batch(&values, 1_700_000_000_000 + version as i64 * 1000);
        sent_values.extend(values);
        let resp = conn.call(version, &produce_request("pv", 0, &records, -1));
        let (code, base) = produce_outcome(&resp, "pv", 0);
        assert_eq!((code, base), (0, next_offset), "Produce v{version}");
        let p = &resp.responses[0].partition_responses[0];
        assert_eq!(p.log_append_time_ms, -1, "v{version}: CreateTime topic");
        if version >= 5 {
            assert_eq!(p.log_start_offset, 0, "v{version}");
        }
        sent.push((base, records));
        next_offset += 3;
    }
    let max = *versions(&table, ApiKey::Produce).end();

    // acks=1 is acknowledged like acks=-1; acks=0 gets no response at all, so the next answer on
    // the connection is the next request's (`call` checks its correlation id), and that next
    // produce lands after the unacknowledged one.
    let records = batch(&["acks-1".to_string()], 1_700_000_100_000);
    let resp = conn.call(max, &produce_request("pv", 0, &records, 1));
    assert_eq!(produce_outcome(&resp, "pv", 0), (0, next_offset));
    sent.push((next_offset, records));
    sent_values.push("acks-1".to_string());
    next_offset += 1;
    let records = batch(&["acks-0".to_string()], 1_700_000_200_000);
    conn.send(max, &produce_request("pv", 0, &records, 0));
    sent.push((next_offset, records));
    sent_values.push("acks-0".to_string());
    next_offset += 1;
    let records = batch(&["after-acks-0".to_string()], 1_700_000_300_000);
    let resp = conn.call(max, &produce_request("pv", 0, &records, -1));
    assert_eq!(produce_outcome(&resp, "pv", 0), (0, next_offset), "appended after the acks=0 batch");
    sent.push((next_offset, records));
    sent_values.push("after-acks-0".to_string());
    next_offset += 1;

    // A wrong partition or topic is an error for that partition; the connection stays usable.
    let records = batch(&["lost".to_string()], 1);
    let resp = conn.call(max, &produce_request("pv", 7, &records, -1));
    assert_eq!(produce_outcome(&resp, "pv", 7).0, E::UnknownTopicOrPartition.code());

    for version in versions(&table, ApiKey::Fetch) {
        let resp = conn.call(version, &fetch_request("pv", 0, 0, 0));
        if version >= 7 {
            assert_eq!(resp.error_code, 0, "Fetch v{version}");
        }
        let p = fetched(&resp, "pv", 0);
        assert_eq!(p.error_code, 0, "Fetch v{version}");
        assert_eq!(p.high_watermark, next_offset, "Fetch v{version}");
        assert_eq!(p.last_stable_offset, next_offset, "Fetch v{version}");
        if version >= 5 {
            assert_eq!(p.log_start_offset, 0, "Fetch v{version}");
        }
        let stored = split_batches(p.records.as_ref());
        assert_eq!(stored.len(), sent.len(), "Fetch v{version}: batches");
        for ((base, sent), stored) in sent.iter().zip(&stored) {
            assert_stored_as_sent(stored, sent, *base);
        }

        // From the middle of a batch: the batch holding that offset comes first.
        let resp = conn.call(version, &fetch_request("pv", 0, 4, 0));
        let stored = split_batches(fetched(&resp, "pv", 0).records.as_ref());
        assert_eq!(i64::from_be_bytes(stored[0][..8].try_into().unwrap()), 3, "Fetch v{version} at 4");

        // At the end: nothing, no error. Past the end: OFFSET_OUT_OF_RANGE.
        let resp = conn.call(version, &fetch_request("pv", 0, next_offset, 0));
        let p = fetched(&resp, "pv", 0);
        assert_eq!(p.error_code, 0);
        assert!(split_batches(p.records.as_ref()).is_empty(), "Fetch v{version} at the end");
        let resp = conn.call(version, &fetch_request("pv", 0, next_offset + 100, 0));
        assert_eq!(fetched(&resp, "pv", 0).error_code, E::OffsetOutOfRange.code(), "Fetch v{version}");
        let resp = conn.call(version, &fetch_request("nope", 0, 0, 0));
        assert_eq!(fetched(&resp, "nope", 0).error_code, E::UnknownTopicOrPartition.code());
    }

    // The Kafka-produced batches are the same bytes through the native protocol.
    let native = Conn::connect(&broker.addr).fetch_all("pv", 0, 0);
    let native: Vec<(i64, String)> =
        native.into_iter().map(|(offset, v)| (offset, String::from_utf8(v).unwrap())).collect();
    let expected: Vec<(i64, String)> =
        sent_values.into_iter().enumerate().map(|(i, v)| (i as i64, v)).collect();
    assert_eq!(native, expected);
}

#[test]
fn fetch_long_polls_until_a_produce_arrives() {
    let (broker, table) = start(&[]);
    create_native(&broker, "lp", 1);
    let version = *versions(&table, ApiKey::Fetch).end();
    let addr = broker.kafka.clone();
    let waiter = std::thread::spawn(move || {
        let mut conn = KafkaConn::connect(&addr);
        conn.call(version, &fetch_request("lp", 0, 0, 20_000))
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let records = batch(&["wake".to_string()], 1_700_000_000_000);
    let mut producer = KafkaConn::connect(&broker.kafka);
    let produce_version = *versions(&table, ApiKey::Produce).end();
    let resp = producer.call(produce_version, &produce_request("lp", 0, &records, -1));
    assert_eq!(produce_outcome(&resp, "lp", 0), (0, 0));
    let resp = waiter.join().unwrap();
    let p = fetched(&resp, "lp", 0);
    assert_eq!(p.error_code, 0);
    let stored = split_batches(p.records.as_ref());
    assert_eq!(stored.len(), 1, "the parked fetch returned the new batch");
    assert_stored_as_sent(&stored[0], &records, 0);
}

#[test]
fn fetch_and_list_offsets_serve_natively_produced_batches() {
    let (broker, table) = start(&[]);
    create_native(&broker, "np", 2);
    let mut native = Conn::connect(&broker.addr);
    // Three batches on partition 1, ten seconds apart.
    let mut sent = Vec::new();
    for i in 0..3i64 {
        let values: Vec<String> = (0..4).map(|r| format!("native-{i}-{r}")).collect();
        let records = batch(&values, 1_800_000_000_000 + i * 10_000);
        let resp = native.produce_raw("np", 1, &records).unwrap();
        assert_eq!(common::wire::produce_result(&resp), (ErrorCode::None, i * 4));
        sent.push((i * 4, records));
    }
    let mut conn = KafkaConn::connect(&broker.kafka);
    for version in versions(&table, ApiKey::Fetch) {
        let resp = conn.call(version, &fetch_request("np", 1, 0, 0));
        let p = fetched(&resp, "np", 1);
        assert_eq!((p.error_code, p.high_watermark), (0, 12), "Fetch v{version}");
        let stored = split_batches(p.records.as_ref());
        assert_eq!(stored.len(), 3, "Fetch v{version}");
        for ((base, sent), stored) in sent.iter().zip(&stored) {
            assert_stored_as_sent(stored, sent, *base);
        }
    }
    for version in versions(&table, ApiKey::ListOffsets) {
        assert_eq!(list_offset(&mut conn, version, "np", 1, EARLIEST), (0, 0), "ListOffsets v{version}");
        assert_eq!(list_offset(&mut conn, version, "np", 1, LATEST), (0, 12), "ListOffsets v{version}");
        assert_eq!(list_offset(&mut conn, version, "np", 0, LATEST), (0, 0), "empty partition v{version}");
        // By timestamp: the first offset whose timestamp is at or after it.
        let ts = 1_800_000_000_000 + 10_000;
        assert_eq!(list_offset(&mut conn, version, "np", 1, ts), (0, 4), "ListOffsets v{version} by time");
        assert_eq!(list_offset(&mut conn, version, "np", 1, ts + 1), (0, 5), "ListOffsets v{version}");
        let code = list_offset(&mut conn, version, "np", 9, LATEST).0;
        assert_eq!(code, E::UnknownTopicOrPartition.code(), "ListOffsets v{version}");
    }
}

/// OffsetForLeaderEpoch for `name`/`partition` at `version`: (error, epoch, end offset).
fn epoch_end(
    conn: &mut KafkaConn,
    version: i16,
    name: &str,
    partition: i32,
    current: i32,
    epoch: i32,
) -> (i16, i32, i64) {
    use kafka_protocol::messages::offset_for_leader_epoch_request::{
        OffsetForLeaderPartition, OffsetForLeaderTopic,
    };
    let request = OffsetForLeaderEpochRequest::default().with_replica_id(BrokerId(-1)).with_topics(vec![
        OffsetForLeaderTopic::default().with_topic(topic(name)).with_partitions(vec![
            OffsetForLeaderPartition::default()
                .with_partition(partition)
                .with_current_leader_epoch(current)
                .with_leader_epoch(epoch),
        ]),
    ]);
    let resp = conn.call(version, &request);
    let p = &resp.topics[0].partitions[0];
    assert_eq!((resp.topics[0].topic.0.as_str(), p.partition), (name, partition));
    (p.error_code, p.leader_epoch, p.end_offset)
}

/// A single broker's partitions have had one leader, epoch 0: OffsetForLeaderEpoch answers epoch 0
/// with the log end and a later one with "undefined"; Fetch, ListOffsets and OffsetForLeaderEpoch
/// check the client's current epoch against 0; Fetch v12 answers a diverging epoch; ListOffsets
/// v4+ names epoch 0.
#[test]
fn leader_epochs_of_a_single_broker() {
    let (broker, table) = start(&[]);
    create_native(&broker, "le", 2);
    let mut conn = KafkaConn::connect(&broker.kafka);
    let produce_version = *versions(&table, ApiKey::Produce).end();
    for i in 0..2 {
        let values: Vec<String> = (0..4).map(|r| format!("epoch-{i}-{r}")).collect();
        let resp =
            conn.call(produce_version, &produce_request("le", 1, &batch(&values, 1_700_000_000_000), -1));
        assert_eq!(produce_outcome(&resp, "le", 1), (0, i * 4));
    }
    for version in versions(&table, ApiKey::OffsetForLeaderEpoch) {
        assert_eq!(epoch_end(&mut conn, version, "le", 1, 0, 0), (0, 0, 8), "v{version}");
        assert_eq!(epoch_end(&mut conn, version, "le", 0, 0, 0), (0, 0, 0), "v{version}, empty");
        assert_eq!(epoch_end(&mut conn, version, "le", 1, -1, 0), (0, 0, 8), "v{version}, unchecked");
        assert_eq!(epoch_end(&mut conn, version, "le", 1, 0, 3), (0, -1, -1), "v{version}, a later epoch");
        assert_eq!(epoch_end(&mut conn, version, "le", 1, 0, -1), (0, -1, -1), "v{version}, no epoch");
        let unknown = epoch_end(&mut conn, version, "le", 1, 1, 0).0;
        assert_eq!(unknown, E::UnknownLeaderEpoch.code(), "v{version}");
        assert_eq!(epoch_end(&mut conn, version, "le", 2, 0, 0).0, E::UnknownTopicOrPartition.code());
        assert_eq!(epoch_end(&mut conn, version, "nope", 0, 0, 0).0, E::UnknownTopicOrPartition.code());
    }
    for version in versions(&table, ApiKey::ListOffsets) {
        let mut request = list_offsets_request("le", 1, LATEST);
        if version >= 4 {
            request.topics[0].partitions[0].current_leader_epoch = 0;
        }
        let resp = conn.call(version, &request);
        let p = &resp.topics[0].partitions[0];
        let epoch = if version >= 4 { 0 } else { -1 };
        assert_eq!((p.error_code, p.offset, p.leader_epoch), (0, 8, epoch), "ListOffsets v{version}");
        request.topics[0].partitions[0].timestamp = EARLIEST;
        let p = conn.call(version, &request).topics[0].partitions[0].clone();
        assert_eq!((p.error_code, p.offset, p.leader_epoch), (0, 0, epoch), "ListOffsets v{version}");
        if version >= 4 {
            request.topics[0].partitions[0].current_leader_epoch = 1;
            let code = conn.call(version, &request).topics[0].partitions[0].error_code;
            assert_eq!(code, E::UnknownLeaderEpoch.code(), "ListOffsets v{version}");
        }
    }
    for version in versions(&table, ApiKey::Fetch).filter(|v| *v >= 9) {
        let with_epochs = |current: i32, offset: i64, last_fetched: i32| {
            let mut request = fetch_request("le", 1, offset, 0);
            let p = &mut request.topics[0].partitions[0];
            p.current_leader_epoch = current;
            p.last_fetched_epoch = last_fetched;
            request
        };
        let p = fetched(&conn.call(version, &with_epochs(0, 0, -1)), "le", 1).clone();
        assert_eq!((p.error_code, split_batches(p.records.as_ref()).len()), (0, 2), "Fetch v{version}");
        let p = fetched(&conn.call(version, &with_epochs(1, 0, -1)), "le", 1).clone();
        assert_eq!(p.error_code, E::UnknownLeaderEpoch.code(), "Fetch v{version}");
        if version >= 12 {
            // Read to offset 4 in epoch 0: the log agrees. Past its end in epoch 0, or in an epoch
            // this log never had: diverged, or unknown (out of range), as Kafka answers.
            let p = fetched(&conn.call(version, &with_epochs(0, 4, 0)), "le", 1).clone();
            assert_eq!((p.error_code, p.diverging_epoch.epoch), (0, -1), "Fetch v{version}");
            assert_eq!(split_batches(p.records.as_ref()).len(), 1);
            let p = fetched(&conn.call(version, &with_epochs(0, 10, 0)), "le", 1).clone();
            assert_eq!(
                (p.error_code, p.diverging_epoch.epoch, p.diverging_epoch.end_offset, p.high_watermark),
                (0, 0, 8, 8),
                "Fetch v{version}"
            );
            assert!(split_batches(p.records.as_ref()).is_empty());
            let p = fetched(&conn.call(version, &with_epochs(0, 4, 2)), "le", 1).clone();
            assert_eq!(p.error_code, E::OffsetOutOfRange.code(), "Fetch v{version}");
        }
    }
}

#[test]
fn init_producer_id_at_every_version_and_idempotent_produce() {
    let (broker, table) = start(&[]);
    create_native(&broker, "idem", 1);
    let mut conn = KafkaConn::connect(&broker.kafka);
    let mut ids = BTreeSet::new();
    let mut last = (0i64, 0i16);
    for version in versions(&table, ApiKey::InitProducerId) {
        let request =
            InitProducerIdRequest::default().with_transactional_id(None).with_transaction_timeout_ms(60_000);
        let resp = conn.call(version, &request);
        assert_eq!(resp.error_code, 0, "InitProducerId v{version}");
        assert!(resp.producer_id.0 >= 0, "v{version}: producer id {:?}", resp.producer_id);
        assert!(resp.producer_epoch >= 0);
        assert!(
            ids.insert(resp.producer_id.0),
            "v{version}: producer id {} handed out twice",
            resp.producer_id.0
        );
        last = (resp.producer_id.0, resp.producer_epoch);
    }

    let (producer_id, epoch) = last;
    let version = *versions(&table, ApiKey::Produce).end();
    let values = |tag: &str| (0..2).map(|i| format!("{tag}-{i}")).collect::<Vec<String>>();
    let first = idempotent(batch(&values("first"), 1_700_000_000_000), producer_id, epoch, 0);
    let resp = conn.call(version, &produce_request("idem", 0, &first, -1));
    assert_eq!(produce_outcome(&resp, "idem", 0), (0, 0));
    // A retry of the same batch is acknowledged with its original offset and not appended again.
    let resp = conn.call(version, &produce_request("idem", 0, &first, -1));
    assert_eq!(produce_outcome(&resp, "idem", 0), (0, 0), "duplicate batch");
    // A gap in the sequence numbers is refused.
    let gap = idempotent(batch(&values("gap"), 1_700_000_000_000), producer_id, epoch, 5);
    let resp = conn.call(version, &produce_request("idem", 0, &gap, -1));
    assert_eq!(produce_outcome(&resp, "idem", 0).0, E::OutOfOrderSequenceNumber.code());
    let next = idempotent(batch(&values("next"), 1_700_000_000_000), producer_id, epoch, 2);
    let resp = conn.call(version, &produce_request("idem", 0, &next, -1));
    assert_eq!(produce_outcome(&resp, "idem", 0), (0, 2));
    let stored = Conn::connect(&broker.addr).fetch_all("idem", 0, 0);
    let values: Vec<Vec<u8>> = stored.into_iter().map(|(_, v)| v).collect();
    assert_eq!(
        values,
        vec![b"first-0".to_vec(), b"first-1".to_vec(), b"next-0".to_vec(), b"next-1".to_vec()]
    );
}

/// The version of `api` to use in round `round` of the group walk: each round moves every API one
/// version up until its maximum, so every advertised version is used at least once.
fn round_version(table: &Table, api: ApiKey, round: i16) -> i16 {
    let range = versions(table, api);
    (range.start() + round).min(*range.end())
}

#[test]
fn group_apis_at_every_version() {
    let (broker, table) = start(&[]);
    create_native(&broker, "gt", 2);
    let group_apis = [
        ApiKey::FindCoordinator,
        ApiKey::JoinGroup,
        ApiKey::SyncGroup,
        ApiKey::Heartbeat,
        ApiKey::OffsetCommit,
        ApiKey::OffsetFetch,
        ApiKey::LeaveGroup,
        ApiKey::DescribeGroups,
        ApiKey::ListGroups,
        ApiKey::DeleteGroups,
    ];
    let rounds =
        group_apis.iter().map(|&api| versions(&table, api)).map(|r| r.end() - r.start() + 1).max().unwrap();
    let port = kafka_port(&broker);
    let subscription = Bytes::from_static(b"\x00\x01\x00\x00\x00\x01\x00\x02gt\xff\xff\xff\xff");
    let mut conn = KafkaConn::connect(&broker.kafka);
    for round in 0..rounds {
        let v = |api| round_version(&table, api, round);
        let name = format!("group-{round}");
        let ctx = format!("round {round}");

        let fc = v(ApiKey::FindCoordinator);
        let mut request = FindCoordinatorRequest::default().with_key(s(&name));
        if fc >= 1 {
            request = request.with_key_type(0);
        }
        let resp = conn.call(fc, &request);
        assert_eq!(resp.error_code, 0, "{ctx}: FindCoordinator v{fc}");
        assert_eq!((resp.node_id, resp.host.as_str(), resp.port), (BrokerId(0), "127.0.0.1", port));

        let jg = v(ApiKey::JoinGroup);
        let join = |member_id: &str| {
            let mut request = JoinGroupRequest::default()
                .with_group_id(group(&name))
                .with_session_timeout_ms(30_000)
                .with_member_id(s(member_id))
                .with_protocol_type(s("consumer"))
                .with_protocols(vec![JoinGroupRequestProtocol::default()
                    .with_name(s("range"))
                    .with_metadata(subscription.clone())]);
            if jg >= 1 {
                request = request.with_rebalance_timeout_ms(30_000);
            }
            request
        };
        let mut resp = conn.call(jg, &join(""));
        if jg >= 4 && resp.error_code == E::MemberIdRequired.code() {
            // KIP-394 (checked strictly in `join_group_v4_requires_a_member_id_first`): the new
            // member got its id and rejoins with it.
            let member_id = resp.member_id.to_string();
            resp = conn.call(jg, &join(&member_id));
            assert_eq!(resp.member_id.as_str(), member_id);
        }
        assert_eq!(resp.error_code, 0, "{ctx}: JoinGroup v{jg}");
        let member_id = resp.member_id.to_string();
        let generation = resp.generation_id;
        assert!(generation >= 1, "{ctx}: generation {generation}");
        assert_eq!(resp.leader.as_str(), member_id, "{ctx}: the only member leads");
        assert_eq!(resp.protocol_name.as_ref().map(|p| p.as_str()), Some("range"));
        if jg >= 7 {
            assert_eq!(resp.protocol_type.as_ref().map(|p| p.as_str()), Some("consumer"));
        }
        assert_eq!(resp.members.len(), 1);
        assert_eq!(resp.members[0].member_id.as_str(), member_id);
        assert_eq!(resp.members[0].metadata, subscription, "{ctx}: subscription echoed to the leader");

        let sg = v(ApiKey::SyncGroup);
        let assignment = Bytes::from(format!("assignment-{round}").into_bytes());
        let mut request = SyncGroupRequest::default()
            .with_group_id(group(&name))
            .with_generation_id(generation)
            .with_member_id(s(&member_id))
            .with_assignments(vec![SyncGroupRequestAssignment::default()
                .with_member_id(s(&member_id))
                .with_assignment(assignment.clone())]);
        if sg >= 5 {
            request = request.with_protocol_type(Some(s("consumer"))).with_protocol_name(Some(s("range")));
        }
        let resp = conn.call(sg, &request);
        assert_eq!(resp.error_code, 0, "{ctx}: SyncGroup v{sg}");
        assert_eq!(resp.assignment, assignment);
        if sg >= 5 {
            assert_eq!(resp.protocol_type.as_ref().map(|p| p.as_str()), Some("consumer"));
            assert_eq!(resp.protocol_name.as_ref().map(|p| p.as_str()), Some("range"));
        }

        let hb = v(ApiKey::Heartbeat);
        let heartbeat = |generation: i32, member: &str| {
            HeartbeatRequest::default()
                .with_group_id(group(&name))
                .with_generation_id(generation)
                .with_member_id(s(member))
        };
        assert_eq!(conn.call(hb, &heartbeat(generation, &member_id)).error_code, 0, "{ctx}: Heartbeat v{hb}");
        let stale = conn.call(hb, &heartbeat(generation + 5, &member_id)).error_code;
        assert_eq!(stale, E::IllegalGeneration.code(), "{ctx}: Heartbeat v{hb}, wrong generation");
        let stranger = conn.call(hb, &heartbeat(generation, "stranger")).error_code;
        assert_eq!(stranger, E::UnknownMemberId.code(), "{ctx}: Heartbeat v{hb}, unknown member");

        let oc = v(ApiKey::OffsetCommit);
        let committed = [(0, 42 + round as i64), (1, 7)];
        let request = OffsetCommitRequest::default()
            .with_group_id(group(&name))
            .with_generation_id_or_member_epoch(generation)
            .with_member_id(s(&member_id))
            .with_topics(vec![OffsetCommitRequestTopic::default().with_name(topic("gt")).with_partitions(
                committed
                    .iter()
                    .map(|&(p, offset)| {
                        OffsetCommitRequestPartition::default()
                            .with_partition_index(p)
                            .with_committed_offset(offset)
                            .with_committed_metadata(Some(s("meta")))
                    })
                    .collect(),
            )]);
        let resp = conn.call(oc, &request);
        assert_eq!(resp.topics.len(), 1, "{ctx}: OffsetCommit v{oc}");
        assert_eq!(resp.topics[0].name.0.as_str(), "gt");
        let codes: Vec<(i32, i16)> =
            resp.topics[0].partitions.iter().map(|p| (p.partition_index, p.error_code)).collect();
        assert_eq!(codes, vec![(0, 0), (1, 0)], "{ctx}: OffsetCommit v{oc}");

        let of = v(ApiKey::OffsetFetch);
        let offset_fetch = || {
            let mut request =
                OffsetFetchRequest::default().with_group_id(group(&name)).with_topics(Some(vec![
                    OffsetFetchRequestTopic::default()
                        .with_name(topic("gt"))
                        .with_partition_indexes(vec![0, 1]),
                ]));
            if of >= 7 {
                request = request.with_require_stable(true);
            }
            request
        };
        let resp = conn.call(of, &offset_fetch());
        if of >= 2 {
            assert_eq!(resp.error_code, 0, "{ctx}: OffsetFetch v{of}");
        }
        let got: Vec<(i32, i64, Option<&str>, i16)> = resp.topics[0]
            .partitions
            .iter()
            .map(|p| {
                (p.partition_index, p.committed_offset, p.metadata.as_ref().map(|m| m.as_str()), p.error_code)
            })
            .collect();
        assert_eq!(
            got,
            vec![(0, 42 + round as i64, Some("meta"), 0), (1, 7, Some("meta"), 0)],
            "{ctx}: OffsetFetch v{of}"
        );

        let dg = v(ApiKey::DescribeGroups);
        let describe = DescribeGroupsRequest::default().with_groups(vec![group(&name)]);
        let resp = conn.call(dg, &describe);
        assert_eq!(resp.groups.len(), 1);
        let g = &resp.groups[0];
        assert_eq!((g.error_code, g.group_id.0.as_str()), (0, name.as_str()), "{ctx}: DescribeGroups v{dg}");
        assert_eq!((g.group_state.as_str(), g.protocol_type.as_str()), ("Stable", "consumer"));
        assert_eq!(g.protocol_data.as_str(), "range");
        assert_eq!(g.members.len(), 1);
        let m = &g.members[0];
        assert_eq!((m.member_id.as_str(), m.client_id.as_str()), (member_id.as_str(), CLIENT_ID));
        assert_eq!((&m.member_metadata, &m.member_assignment), (&subscription, &assignment));

        let del = v(ApiKey::DeleteGroups);
        let delete = DeleteGroupsRequest::default().with_groups_names(vec![group(&name)]);
        let resp = conn.call(del, &delete);
        assert_eq!(
            resp.results[0].error_code,
            E::NonEmptyGroup.code(),
            "{ctx}: DeleteGroups v{del} with a member"
        );

        let lg = v(ApiKey::LeaveGroup);
        let mut request = LeaveGroupRequest::default().with_group_id(group(&name));
        request = if lg >= 3 {
            request.with_members(vec![MemberIdentity::default().with_member_id(s(&member_id))])
        } else {
            request.with_member_id(s(&member_id))
        };
        let resp = conn.call(lg, &request);
        assert_eq!(resp.error_code, 0, "{ctx}: LeaveGroup v{lg}");
        if lg >= 3 {
            assert_eq!(resp.members.len(), 1);
            assert_eq!(
                (resp.members[0].member_id.as_str(), resp.members[0].error_code),
                (member_id.as_str(), 0)
            );
        }

        let resp = conn.call(dg, &describe);
        let g = &resp.groups[0];
        assert_eq!((g.error_code, g.group_state.as_str()), (0, "Empty"), "{ctx}: after LeaveGroup");
        assert!(g.members.is_empty());

        let lgs = v(ApiKey::ListGroups);
        let resp = conn.call(lgs, &ListGroupsRequest::default());
        assert_eq!(resp.error_code, 0, "{ctx}: ListGroups v{lgs}");
        let listed = resp.groups.iter().find(|g| g.group_id.0.as_str() == name);
        let listed = listed.unwrap_or_else(|| panic!("{ctx}: ListGroups v{lgs} misses {name}: {resp:?}"));
        assert_eq!(listed.protocol_type.as_str(), "consumer");
        if lgs >= 4 {
            assert_eq!(listed.group_state.as_str(), "Empty");
            let request = ListGroupsRequest::default().with_states_filter(vec![s("Stable")]);
            let resp = conn.call(lgs, &request);
            assert!(
                resp.groups.iter().all(|g| g.group_id.0.as_str() != name),
                "{ctx}: states filter ignored"
            );
        }

        let resp = conn.call(del, &delete);
        assert_eq!(resp.results.len(), 1);
        assert_eq!((resp.results[0].group_id.0.as_str(), resp.results[0].error_code), (name.as_str(), 0));
        let resp = conn.call(del, &delete);
        assert_eq!(resp.results[0].error_code, E::GroupIdNotFound.code(), "{ctx}: DeleteGroups v{del} again");
        // Its offsets went with it.
        let resp = conn.call(of, &offset_fetch());
        let offsets: Vec<i64> = resp.topics[0].partitions.iter().map(|p| p.committed_offset).collect();
        assert_eq!(offsets, vec![-1, -1], "{ctx}: offsets of a deleted group");
        let resp = conn.call(dg, &describe);
        assert_eq!((resp.groups[0].error_code, resp.groups[0].group_state.as_str()), (0, "Dead"), "{ctx}");
    }
}

/// A Kafka member of a stable group carries on through a kill -9 and restart of its coordinator,
/// as with Kafka: the group comes back from `__consumer_offsets` Stable with its members, so the
/// member's heartbeat, commit and SyncGroup in its generation succeed with no rebalance.
#[test]
fn a_stable_groups_member_carries_on_through_a_broker_restart() {
    let (mut broker, _) = start(&[]);
    create_native(&broker, "gt", 2);
    let name = "outlives-restarts";
    let subscription = Bytes::from_static(b"\x00\x01\x00\x00\x00\x01\x00\x02gt\xff\xff\xff\xff");
    let assignment = Bytes::from_static(b"partitions 0 and 1");
    let mut conn = KafkaConn::connect(&broker.kafka);
    let joined = conn.call(
        3,
        &JoinGroupRequest::default()
            .with_group_id(group(name))
            .with_session_timeout_ms(30_000)
            .with_rebalance_timeout_ms(30_000)
            .with_member_id(s(""))
            .with_protocol_type(s("consumer"))
            .with_protocols(vec![JoinGroupRequestProtocol::default()
                .with_name(s("range"))
                .with_metadata(subscription.clone())]),
    );
    assert_eq!(joined.error_code, 0);
    let (member_id, generation) = (joined.member_id.to_string(), joined.generation_id);
    let sync = SyncGroupRequest::default()
        .with_group_id(group(name))
        .with_generation_id(generation)
        .with_member_id(s(&member_id))
        .with_assignments(vec![SyncGroupRequestAssignment::default()
            .with_member_id(s(&member_id))
            .with_assignment(assignment.clone())]);
    assert_eq!(conn.call(2, &sync).error_code, 0);
    // Answered once durable, after the group's record that went before it.
    let commit = |conn: &mut KafkaConn, offset: i64| {
        let request = OffsetCommitRequest::default()
            .with_group_id(group(name))
            .with_generation_id_or_member_epoch(generation)
            .with_member_id(s(&member_id))
            .with_topics(vec![OffsetCommitRequestTopic::default().with_name(topic("gt")).with_partitions(
                vec![OffsetCommitRequestPartition::default()
                    .with_partition_index(0)
                    .with_committed_offset(offset)],
            )]);
        conn.call(2, &request).topics[0].partitions[0].error_code
    };
    assert_eq!(commit(&mut conn, 5), 0);

    broker.kill9();
    broker.restart();
    let mut conn = KafkaConn::connect(&broker.kafka);
    let heartbeat = HeartbeatRequest::default()
        .with_group_id(group(name))
        .with_generation_id(generation)
        .with_member_id(s(&member_id));
    assert_eq!(conn.call(2, &heartbeat).error_code, 0, "the member is still in its generation");
    assert_eq!(commit(&mut conn, 9), 0);
    // A member that missed the SyncGroup answer asks again and gets the leader's assignment.
    let resynced = conn.call(2, &sync.with_assignments(vec![]));
    assert_eq!((resynced.error_code, &resynced.assignment), (0, &assignment));
    let described = conn.call(5, &DescribeGroupsRequest::default().with_groups(vec![group(name)]));
    let g = &described.groups[0];
    assert_eq!((g.group_state.as_str(), g.members.len()), ("Stable", 1), "{described:?}");
    let m = &g.members[0];
    assert_eq!((m.member_id.as_str(), m.client_host.as_str()), (member_id.as_str(), "/127.0.0.1"));
    assert_eq!((&m.member_metadata, &m.member_assignment), (&subscription, &assignment));
}

#[test]
fn join_group_v4_requires_a_member_id_first() {
    let (broker, table) = start(&[]);
    let mut conn = KafkaConn::connect(&broker.kafka);
    let join = |member_id: &str| {
        JoinGroupRequest::default()
            .with_group_id(group("kip-394"))
            .with_session_timeout_ms(30_000)
            .with_rebalance_timeout_ms(30_000)
            .with_member_id(s(member_id))
            .with_protocol_type(s("consumer"))
            .with_protocols(vec![JoinGroupRequestProtocol::default().with_name(s("range"))])
    };
    let leave = |member_id: &str| {
        LeaveGroupRequest::default()
            .with_group_id(group("kip-394"))
            .with_members(vec![MemberIdentity::default().with_member_id(s(member_id))])
    };
    for version in versions(&table, ApiKey::JoinGroup) {
        let resp = conn.call(version, &join(""));
        assert!(!resp.member_id.is_empty(), "JoinGroup v{version}: no member id handed out");
        let member_id = resp.member_id.to_string();
        if version >= 4 {
            // KIP-394: the first answer only hands out the id; the member joins with it.
            assert_eq!(resp.error_code, E::MemberIdRequired.code(), "JoinGroup v{version}");
            assert_eq!(resp.generation_id, -1, "JoinGroup v{version}: not a member yet");
            let resp = conn.call(version, &join(&member_id));
            assert_eq!((resp.error_code, resp.member_id.as_str()), (0, member_id.as_str()), "v{version}");
            assert_eq!(resp.leader.as_str(), member_id, "v{version}: the only member leads");
        } else {
            assert_eq!(resp.error_code, 0, "JoinGroup v{version}: joins at once");
            assert_eq!(resp.leader.as_str(), member_id, "v{version}: the only member leads");
        }
        // The member's client host, as Kafka shows it.
        let described = conn.call(5, &DescribeGroupsRequest::default().with_groups(vec![group("kip-394")]));
        let members = &described.groups[0].members;
        assert_eq!(members.len(), 1, "v{version}: {described:?}");
        assert_eq!(members[0].client_host.as_str(), "/127.0.0.1", "v{version}");
        assert_eq!(conn.call(4, &leave(&member_id)).error_code, 0, "v{version}");
    }
    // An id the coordinator never handed out is refused.
    let version = *versions(&table, ApiKey::JoinGroup).end();
    let resp = conn.call(version, &join("never-handed-out"));
    assert_eq!(resp.error_code, E::UnknownMemberId.code());
}

/// Produces `a`, `b` on both partitions of "good" through a fresh Kafka connection; checks the
/// offsets are the next ones expected.
fn good_round(broker: &Broker, version: i16, expected: &mut [i64; 2]) {
    let mut conn = KafkaConn::connect(&broker.kafka);
    for p in 0..2 {
        let records = batch(&["a".to_string(), "b".to_string()], 1_700_000_000_000);
        let resp = conn.call(version, &produce_request("good", p, &records, -1));
        assert_eq!(produce_outcome(&resp, "good", p), (0, expected[p as usize]), "partition {p}");
        expected[p as usize] += 2;
    }
}

/// Sends `bytes` on a new connection and asserts the broker closes it without an answer.
#[track_caller]
fn assert_closed_after(broker: &Broker, what: &str, bytes: &[u8]) {
    let mut conn = KafkaConn::connect(&broker.kafka);
    conn.send_raw(bytes);
    assert!(conn.closed_by_broker(), "{what}: the connection was not closed");
}

#[test]
fn bad_input_closes_one_connection_and_loses_nothing() {
    let mut broker = Broker::start(2, &["frame_bytes_max=1048576", "batch_bytes_max=65536"]);
    create_native(&broker, "good", 2);
    let (_, table) = KafkaConn::connect(&broker.kafka).api_versions(0);
    let produce = *versions(&table, ApiKey::Produce).end();
    let mut expected = [0i64; 2];
    good_round(&broker, produce, &mut expected);

    // A version below or above what is served, a known API that is not served, an unknown key:
    // the connection closes and the log says what was asked for.
    let below = versions(&table, ApiKey::Produce).start() - 1;
    let above = versions(&table, ApiKey::Fetch).end() + 1;
    let unsupported = [
        (ApiKey::Produce as i16, below, format!("Produce version {below}")),
        (ApiKey::Fetch as i16, above, format!("Fetch version {above}")),
        (ApiKey::SaslHandshake as i16, 1, "API key 17".to_string()),
        (1000, 0, "API key 1000".to_string()),
    ];
    for (key, version, logged) in unsupported {
        assert_closed_after(&broker, &logged, &raw_frame(key, version, 1, &[]));
        good_round(&broker, produce, &mut expected);
        let log = broker.log();
        assert!(log.contains(&logged), "no log line naming '{logged}':\n{log}");
    }

    // Broken framing: a header shorter than its fixed fields, a client id longer than the frame,
    // negative and oversized size prefixes.
    let mut short = 6i32.to_be_bytes().to_vec();
    short.extend_from_slice(&[0, 3, 0, 1, 0, 0]);
    let mut long_client_id = raw_frame(ApiKey::Metadata as i16, 1, 1, &[]);
    long_client_id[12..14].copy_from_slice(&500i16.to_be_bytes());
    let framing: [(&str, Vec<u8>); 4] = [
        ("truncated header", short),
        ("client id past the end", long_client_id),
        ("negative size", (-5i32).to_be_bytes().to_vec()),
        ("oversized frame", (64i32 << 20).to_be_bytes().to_vec()),
    ];
    for (what, bytes) in framing {
        assert_closed_after(&broker, what, &bytes);
        good_round(&broker, produce, &mut expected);
    }

    // A body that does not decode: a negative topic count; a produce cut short.
    let garbage = raw_frame(ApiKey::Metadata as i16, 1, 1, &(-7i32).to_be_bytes());
    assert_closed_after(&broker, "negative array length", &garbage);
    let mut cut = common::kafka::request_frame(
        produce,
        1,
        &produce_request("good", 0, &batch(&["x".to_string()], 1), -1),
    );
    cut.truncate(cut.len() - 30);
    let size = (cut.len() - 4) as i32;
    cut[..4].copy_from_slice(&size.to_be_bytes());
    assert_closed_after(&broker, "produce cut short", &cut);
    // Half a request, then the client goes away.
    let mut half = KafkaConn::connect(&broker.kafka);
    half.send_raw(&cut[..cut.len() / 2]);
    drop(half);
    good_round(&broker, produce, &mut expected);

    // A batch whose crc32c is wrong: CORRUPT_MESSAGE for that partition, nothing appended, the
    // connection still usable.
    let mut conn = KafkaConn::connect(&broker.kafka);
    let mut corrupt = batch(&["evil".to_string()], 1_700_000_000_000);
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xff;
    let resp = conn.call(produce, &produce_request("good", 0, &corrupt, -1));
    assert_eq!(produce_outcome(&resp, "good", 0).0, E::CorruptMessage.code());
    // A batch over batch_bytes_max: MESSAGE_TOO_LARGE.
    let huge = batch(&["x".repeat(100_000)], 1_700_000_000_000);
    let resp = conn.call(produce, &produce_request("good", 1, &huge, -1));
    assert_eq!(produce_outcome(&resp, "good", 1).0, E::MessageTooLarge.code());
    let fine = batch(&["a".to_string(), "b".to_string()], 1_700_000_000_000);
    let resp = conn.call(produce, &produce_request("good", 1, &fine, -1));
    assert_eq!(produce_outcome(&resp, "good", 1), (0, expected[1]), "the connection is still usable");
    expected[1] += 2;
    good_round(&broker, produce, &mut expected);

    assert!(broker.alive());
    let mut native = Conn::connect(&broker.addr);
    for p in 0..2u32 {
        let records = native.fetch_all("good", p, 0);
        assert_eq!(records.len() as i64, expected[p as usize], "partition {p}");
        assert!(records
            .iter()
            .enumerate()
            .all(|(i, (offset, v))| *offset == i as i64 && (v == b"a" || v == b"b")));
    }
    assert!(!broker.log().contains("panicked"));
    broker.stop();
}

/// Request bodies whose first (or nested) array claims far more elements than the request
/// holds: `i32::MAX` for classic arrays, `u32::MAX - 1` for compact ones.
fn hostile_requests() -> Vec<(&'static str, i16, i16, Vec<u8>)> {
    let array = 0x7fff_ffffi32.to_be_bytes().to_vec();
    let compact = vec![0xff, 0xff, 0xff, 0xff, 0x0f];
    let cat = |parts: &[&[u8]]| parts.concat();
    let fetch_head: Vec<u8> = cat(&[
        &(-1i32).to_be_bytes(),
        &0i32.to_be_bytes(),
        &1i32.to_be_bytes(),
        &(1i32 << 20).to_be_bytes(),
        &[0],
    ]);
    vec![
        ("Metadata v0 topics", ApiKey::Metadata as i16, 0, array.clone()),
        ("Metadata v9 topics", ApiKey::Metadata as i16, 9, compact.clone()),
        (
            "Produce v3 topics",
            ApiKey::Produce as i16,
            3,
            cat(&[&[0xff, 0xff, 0, 1], &10_000i32.to_be_bytes(), &array]),
        ),
        (
            "Produce v9 topics",
            ApiKey::Produce as i16,
            9,
            cat(&[&[0, 0, 1], &10_000i32.to_be_bytes(), &compact]),
        ),
        ("Fetch v4 topics", ApiKey::Fetch as i16, 4, cat(&[&fetch_head, &array])),
        (
            "ListOffsets v1 partitions",
            ApiKey::ListOffsets as i16,
            1,
            cat(&[&(-1i32).to_be_bytes(), &1i32.to_be_bytes(), &[0, 1, b'x'], &array]),
        ),
        ("DescribeGroups v0 groups", ApiKey::DescribeGroups as i16, 0, array.clone()),
        ("DeleteGroups v2 groups", ApiKey::DeleteGroups as i16, 2, compact.clone()),
        ("CreateTopics v2 topics", ApiKey::CreateTopics as i16, 2, array.clone()),
        ("ListGroups v4 states", ApiKey::ListGroups as i16, 4, compact),
        ("OffsetFetch v1 topics", ApiKey::OffsetFetch as i16, 1, cat(&[&[0, 1, b'g'], &array])),
    ]
}

#[test]
fn hostile_array_counts_cost_one_connection_not_the_broker() {
    let mut broker = Broker::start(2, &[]);
    for (what, key, version, body) in hostile_requests() {
        let frame = raw_frame(key, version, 1, &body);
        assert!(frame.len() < 64, "{what}: a small request ({} bytes)", frame.len());
        assert_closed_after(&broker, what, &frame);
        // A fresh connection is answered (an aborting broker may take a moment to exit, so
        // asking is the reliable check, not the process table).
        let answered = std::net::TcpStream::connect(&broker.kafka).ok().and_then(|stream| {
            stream.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
            let mut conn = KafkaConn { stream, next_cid: 1 };
            let cid = conn.send(0, &ApiVersionsRequest::default());
            conn.recv::<ApiVersionsRequest>(0, cid)
        });
        let log = broker.log();
        let tail = &log[log.len().saturating_sub(2000)..];
        assert!(
            answered.is_some_and(|r| r.error_code == 0),
            "{what} took the broker down; log tail:\n{tail}"
        );
        assert!(broker.alive(), "{what}: broker exited");
    }
    let log = broker.log();
    assert!(!log.contains("memory allocation of"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    broker.stop();
}

/// A varint as the flexible versions encode counts and lengths.
fn varint(mut n: u32) -> Vec<u8> {
    let mut out = Vec::new();
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
    out
}

/// Well-formed requests of about `REQUEST_BYTES` that list as many (empty or minimal) elements
/// as fit: each element costs the broker some memory while it is decoded and answered.
fn element_floods() -> Vec<(&'static str, i16, i16, Vec<u8>)> {
    const REQUEST_BYTES: usize = 256 << 10;
    let cat = |parts: &[&[u8]]| parts.concat();
    let many = |element: &[u8]| {
        let n = REQUEST_BYTES / element.len();
        cat(&[&varint(n as u32 + 1), &element.repeat(n)])
    };
    let fetch_partition = cat(&[
        &0i32.to_be_bytes(),
        &(-1i32).to_be_bytes(),
        &0i64.to_be_bytes(),
        &(-1i32).to_be_bytes(),
        &(-1i64).to_be_bytes(),
        &1000i32.to_be_bytes(),
        &[0],
    ]);
    let list_partition = cat(&[&0i32.to_be_bytes(), &(-1i32).to_be_bytes(), &(-1i64).to_be_bytes(), &[0]]);
    let commit_partition = cat(&[&0i32.to_be_bytes(), &1i64.to_be_bytes(), &(-1i32).to_be_bytes(), &[0, 0]]);
    vec![
        (
            "DescribeGroups v5, empty group ids",
            ApiKey::DescribeGroups as i16,
            5,
            cat(&[&many(&[1]), &[0, 0]]),
        ),
        ("DeleteGroups v2, empty group ids", ApiKey::DeleteGroups as i16, 2, cat(&[&many(&[1]), &[0]])),
        ("Metadata v9, empty topic names", ApiKey::Metadata as i16, 9, cat(&[&many(&[1, 0]), &[0, 0, 0]])),
        (
            "Produce v9, topics without partitions",
            ApiKey::Produce as i16,
            9,
            cat(&[&[0, 0, 1], &1000i32.to_be_bytes(), &many(&[1, 1, 0]), &[0]]),
        ),
        (
            "Fetch v12, partitions of one topic",
            ApiKey::Fetch as i16,
            12,
            cat(&[
                &(-1i32).to_be_bytes(),
                &0i32.to_be_bytes(),
                &1i32.to_be_bytes(),
                &(1i32 << 20).to_be_bytes(),
                &[0],
                &0i32.to_be_bytes(),
                &(-1i32).to_be_bytes(),
                &[2, 2, b't'],
                &many(&fetch_partition),
                &[0, 1, 1, 0],
            ]),
        ),
        (
            "ListOffsets v6, partitions of one topic",
            ApiKey::ListOffsets as i16,
            6,
            cat(&[&(-1i32).to_be_bytes(), &[0, 2, 2, b't'], &many(&list_partition), &[0, 0]]),
        ),
        (
            "OffsetFetch v7, partitions of one topic",
            ApiKey::OffsetFetch as i16,
            7,
            cat(&[&[2, b'g', 2, 2, b't'], &many(&0i32.to_be_bytes()), &[0, 0, 0]]),
        ),
        (
            "OffsetCommit v8, partitions of one topic",
            ApiKey::OffsetCommit as i16,
            8,
            cat(&[
                &[2, b'g'],
                &(-1i32).to_be_bytes(),
                &[1, 0, 2, 2, b't'],
                &many(&commit_partition),
                &[0, 0],
            ]),
        ),
        (
            "DescribeConfigs v4, topic resources",
            ApiKey::DescribeConfigs as i16,
            4,
            cat(&[&many(&[2, 2, b't', 0, 0]), &[0, 0, 0]]),
        ),
    ]
}

/// The broker's peak resident memory (VmHWM) since the last [`reset_peak_rss`], in bytes.
fn peak_rss_bytes(broker: &Broker) -> u64 {
    let pid = broker.child.as_ref().unwrap().id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// Resets the broker's peak resident memory to its current one (Linux 4.0+, `clear_refs` 5).
fn reset_peak_rss(broker: &Broker) {
    let pid = broker.child.as_ref().unwrap().id();
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
}

/// What one request may add to the broker's peak memory: a generous multiple of its size. Past
/// that, requests of the largest frame size (16 MiB by default) multiply into gigabytes and a
/// few clients take the host's memory (a 16 MiB DescribeGroups once grew a broker to 23 GB
/// before the kernel's OOM killer stopped it).
const PEAK_GROWTH_PER_REQUEST_BYTES: u64 = 64 << 20;

#[test]
fn element_floods_cost_memory_in_proportion_to_their_size() {
    let mut report = Vec::new();
    let mut too_costly = false;
    for (what, key, version, body) in element_floods() {
        // A broker each: memory an earlier request freed to the allocator but not to the
        // kernel would hide what the next one costs.
        let mut broker = Broker::start(2, &[]);
        create_native(&broker, "t", 1);
        reset_peak_rss(&broker);
        let before = peak_rss_bytes(&broker);
        let mut conn = KafkaConn::connect(&broker.kafka);
        conn.send_raw(&raw_frame(key, version, 1, &body));
        // Answered or refused (closed): either way the request has been dealt with.
        let _ = conn.recv_frame();
        let grown = peak_rss_bytes(&broker).saturating_sub(before);
        too_costly |= grown > PEAK_GROWTH_PER_REQUEST_BYTES;
        report.push(format!("{what}: {} KiB request, peak memory +{} MiB", body.len() >> 10, grown >> 20));
        let (resp, _) = KafkaConn::connect(&broker.kafka).api_versions(0);
        assert_eq!(resp.error_code, 0, "{what}: the broker still answers");
        broker.stop();
    }
    let limit = PEAK_GROWTH_PER_REQUEST_BYTES >> 20;
    assert!(!too_costly, "a request grew peak memory past {limit} MiB:\n{}", report.join("\n"));
}
