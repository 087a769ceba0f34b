//! End-to-end tests of the public client API (`Admin`, `Producer`, `Consumer`) against the real
//! `ringlog serve` process: round trips, acks, seeks, retention resets, admin errors and the
//! durability contract under `kill -9`. Every test starts its own broker.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::Broker;
use ringlog::client::*;
use ringlog::protocol::wire::ErrorCode;

/// Generous enough for a loaded 2-core CI machine; only reached when something is wrong.
const DEADLINE: Duration = Duration::from_secs(30);

fn client(broker: &Broker) -> ClientConfig {
    ClientConfig { request_timeout: Duration::from_secs(10), ..ClientConfig::new(broker.addr.clone()) }
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Polls until every assigned partition's position reaches its `end` offset; returns the
/// records per partition in the order `poll` returned them.
async fn read_until(
    consumer: &mut Consumer,
    topic: &str,
    ends: &BTreeMap<u32, i64>,
) -> BTreeMap<u32, Vec<ConsumerRecord>> {
    let started = Instant::now();
    let mut out: BTreeMap<u32, Vec<ConsumerRecord>> = ends.keys().map(|&p| (p, Vec::new())).collect();
    while ends.iter().any(|(&p, &end)| consumer.position(topic, p).is_none_or(|pos| pos < end)) {
        assert!(started.elapsed() < DEADLINE, "consumer stuck: {:?}", consumer.assignment());
        for r in consumer.poll(Duration::from_millis(200)).await.unwrap() {
            out.get_mut(&r.partition).unwrap().push(r);
        }
    }
    out
}

async fn connect_consumer(broker: &Broker, config: ConsumerConfig, topic: &str, partitions: u32) -> Consumer {
    let mut consumer = Consumer::connect(client(broker), config).await.unwrap();
    consumer.assign((0..partitions).map(|p| (topic.to_owned(), p)).collect());
    consumer
}

/// A produced record as the producer's delivery reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Written {
    offset: i64,
    key: Option<Bytes>,
    value: Bytes,
    /// Produced after the timestamp mark (second phase).
    late: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_keys_offsets_and_seeks_on_two_shards() {
    const TOPIC: &str = "events";
    const PARTITIONS: u32 = 4;
    let broker = Broker::start(2, &[]);
    let admin = Admin::connect(client(&broker)).await.unwrap();
    admin.create_topic(TOPIC, PARTITIONS, &TopicSettings::default()).await.unwrap();
    let producer = Producer::connect(
        client(&broker),
        ProducerConfig {
            batch_bytes: 8 << 10,
            linger: Duration::from_millis(2),
            ..ProducerConfig::default()
        },
    )
    .await
    .unwrap();

    // Two phases split by a timestamp mark: every first-phase record is stamped before it,
    // every second-phase one at or after it, and a flush keeps them in different batches.
    let mut deliveries = Vec::new();
    let mut mark_ms = 0;
    for (phase, range) in [(false, 0..3000u32), (true, 3000..4000)] {
        if phase {
            tokio::time::sleep(Duration::from_millis(20)).await;
            mark_ms = now_ms();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for i in range {
            let key = (i % 5 != 0).then(|| Bytes::from(format!("key-{}", i % 37)));
            let value = Bytes::from(format!("value-{i}"));
            let delivery = producer.send(TOPIC, key.clone(), value.clone()).await.unwrap();
            deliveries.push((key, value, phase, delivery));
        }
        producer.flush().await;
    }

    let mut written: BTreeMap<u32, Vec<Written>> = (0..PARTITIONS).map(|p| (p, Vec::new())).collect();
    let mut unkeyed_partitions = HashSet::new();
    for (key, value, late, delivery) in deliveries {
        let meta = delivery.await.unwrap();
        assert!(meta.partition < PARTITIONS);
        match &key {
            Some(k) => {
                assert_eq!(meta.partition, key_partition(k, PARTITIONS), "keyed records follow murmur2")
            }
            None => {
                unkeyed_partitions.insert(meta.partition);
            }
        }
        written.get_mut(&meta.partition).unwrap().push(Written { offset: meta.offset, key, value, late });
    }
    assert_eq!(unkeyed_partitions.len(), PARTITIONS as usize, "null keys go round-robin");
    for (p, records) in &written {
        // One producer, ordered per partition: offsets are dense from 0 in send order.
        let offsets: Vec<i64> = records.iter().map(|w| w.offset).collect();
        assert_eq!(offsets, (0..records.len() as i64).collect::<Vec<_>>(), "partition {p} offsets");
    }
    let ends: BTreeMap<u32, i64> = written.iter().map(|(&p, w)| (p, w.len() as i64)).collect();

    let description = admin.describe_topic(TOPIC).await.unwrap();
    let shards: HashSet<u32> = description.partitions.iter().map(|p| p.shard).collect();
    assert_eq!(shards, HashSet::from([0, 1]), "4 partitions spread over both shards");
    for info in &description.partitions {
        assert_eq!((info.log_start_offset, info.high_watermark), (0, ends[&info.partition]));
    }

    // From the beginning: exactly what was produced, in order, at the reported offsets.
    let mut consumer = connect_consumer(&broker, ConsumerConfig::default(), TOPIC, PARTITIONS).await;
    let read = read_until(&mut consumer, TOPIC, &ends).await;
    for (p, records) in &read {
        let got: Vec<(i64, Option<Bytes>, Bytes)> =
            records.iter().map(|r| (r.offset, r.key.clone(), r.value.clone().unwrap())).collect();
        let want: Vec<(i64, Option<Bytes>, Bytes)> =
            written[p].iter().map(|w| (w.offset, w.key.clone(), w.value.clone())).collect();
        assert_eq!(got, want, "partition {p}");
        assert!(records.iter().all(|r| &*r.topic == TOPIC && r.partition == *p));
        assert_eq!(consumer.high_watermark(TOPIC, *p), Some(ends[p]));
        assert_eq!(consumer.position(TOPIC, *p), Some(ends[p]));
    }

    // At(n): from exactly n.
    let mid = ends[&0] / 2;
    let mut consumer = connect_consumer(&broker, ConsumerConfig::default(), TOPIC, 1).await;
    consumer.seek(TOPIC, 0, Offset::At(mid)).unwrap();
    let read = read_until(&mut consumer, TOPIC, &BTreeMap::from([(0, ends[&0])])).await;
    let got: Vec<(i64, Bytes)> = read[&0].iter().map(|r| (r.offset, r.value.clone().unwrap())).collect();
    let want: Vec<(i64, Bytes)> =
        written[&0][mid as usize..].iter().map(|w| (w.offset, w.value.clone())).collect();
    assert_eq!(got, want);

    // Timestamp(ts): each partition from its first record stamped at or after the mark.
    let mut consumer = connect_consumer(&broker, ConsumerConfig::default(), TOPIC, PARTITIONS).await;
    for p in 0..PARTITIONS {
        consumer.seek(TOPIC, p, Offset::Timestamp(mark_ms)).unwrap();
    }
    let read = read_until(&mut consumer, TOPIC, &ends).await;
    for (p, records) in &read {
        let first_late = written[p].iter().position(|w| w.late).unwrap();
        let listed = admin.list_offsets(TOPIC, *p, OffsetSpec::Timestamp(mark_ms)).await.unwrap();
        assert_eq!(listed.offset, first_late as i64, "partition {p}");
        assert!(listed.timestamp_ms >= mark_ms, "partition {p}: {listed:?}");
        let got: Vec<i64> = records.iter().map(|r| r.offset).collect();
        assert_eq!(got, (first_late as i64..ends[p]).collect::<Vec<_>>(), "partition {p}");
        assert!(records.iter().all(|r| r.timestamp_ms >= mark_ms));
    }

    // End: nothing until something new is produced, then exactly that.
    let mut consumer = connect_consumer(&broker, ConsumerConfig::default(), TOPIC, PARTITIONS).await;
    for p in 0..PARTITIONS {
        consumer.seek(TOPIC, p, Offset::End).unwrap();
    }
    assert!(consumer.poll(Duration::from_millis(50)).await.unwrap().is_empty());
    for p in 0..PARTITIONS {
        assert_eq!(consumer.position(TOPIC, p), Some(ends[&p]));
    }
    let tail = producer.send_to(TOPIC, 3, None, Bytes::from_static(b"after-end")).await.unwrap();
    producer.flush().await;
    assert_eq!(tail.await.unwrap(), RecordMetadata { partition: 3, offset: ends[&3] });
    let mut after_end = Vec::new();
    while consumer.position(TOPIC, 3) != Some(ends[&3] + 1) {
        after_end.extend(consumer.poll(Duration::from_millis(200)).await.unwrap());
    }
    let got: Vec<(u32, i64, Bytes)> =
        after_end.iter().map(|r| (r.partition, r.offset, r.value.clone().unwrap())).collect();
    assert_eq!(got, vec![(3, ends[&3], Bytes::from_static(b"after-end"))]);
    assert_eq!(consumer.high_watermark(TOPIC, 3), Some(ends[&3] + 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_none_and_all_both_deliver() {
    const TOPIC: &str = "acks";
    let broker = Broker::start(2, &[]);
    let admin = Admin::connect(client(&broker)).await.unwrap();
    admin.create_topic(TOPIC, 2, &TopicSettings::default()).await.unwrap();
    let mut expected: BTreeMap<u32, Vec<Bytes>> = BTreeMap::new();
    for (partition, acks) in [(0u32, 0i8), (1, -1)] {
        let config = ProducerConfig { acks, batch_bytes: 4 << 10, ..ProducerConfig::default() };
        let producer = Producer::connect(client(&broker), config).await.unwrap();
        let mut deliveries = Vec::new();
        for i in 0..500 {
            let value = Bytes::from(format!("acks{acks}-{i}"));
            deliveries.push(producer.send_to(TOPIC, partition, None, value.clone()).await.unwrap());
            expected.entry(partition).or_default().push(value);
        }
        producer.flush().await;
        for (i, delivery) in deliveries.into_iter().enumerate() {
            let offset = if acks == 0 { -1 } else { i as i64 };
            assert_eq!(delivery.await.unwrap(), RecordMetadata { partition, offset }, "acks={acks}");
        }
    }
    // acks=0 has no response to wait for: the data arrives when the broker gets to it.
    let mut consumer = connect_consumer(&broker, ConsumerConfig::default(), TOPIC, 2).await;
    let read = read_until(&mut consumer, TOPIC, &BTreeMap::from([(0, 500), (1, 500)])).await;
    for (p, records) in read {
        let offsets: Vec<i64> = records.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, (0..500).collect::<Vec<_>>());
        let values: Vec<Bytes> = records.into_iter().map(|r| r.value.unwrap()).collect();
        assert_eq!(values, expected[&p], "partition {p}");
    }
}

/// Full batches for 32 partitions add up to 4 MiB per shard, four times the broker's frame limit:
/// the producer cuts them into requests of at most `max_request_bytes` and every record lands,
/// where one request per shard would be refused and its connection closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_stay_under_max_request_bytes() {
    const TOPIC: &str = "wide";
    const PARTITIONS: u32 = 32;
    const RECORDS: usize = 16;
    let broker = Broker::start(2, &["frame_bytes_max=1048576", "batch_bytes_max=262144"]);
    let admin = Admin::connect(client(&broker)).await.unwrap();
    admin.create_topic(TOPIC, PARTITIONS, &TopicSettings::default()).await.unwrap();
    let config = ProducerConfig {
        batch_bytes: 128 << 10,
        // Long enough that every partition's batch is full before any is sent by time.
        linger: Duration::from_secs(2),
        max_request_bytes: 512 << 10,
        ..ProducerConfig::default()
    };
    let producer = Producer::connect(client(&broker), config).await.unwrap();
    let mut deliveries = Vec::new();
    for i in 0..RECORDS {
        for partition in 0..PARTITIONS {
            let value = Bytes::from(vec![(i as u8) ^ (partition as u8); 8000]);
            deliveries.push((partition, producer.send_to(TOPIC, partition, None, value).await.unwrap()));
        }
    }
    producer.flush().await;
    for (partition, delivery) in deliveries {
        let written = delivery.await.unwrap_or_else(|e| panic!("partition {partition}: {e}"));
        assert_eq!(written.partition, partition);
    }
    let mut consumer = connect_consumer(&broker, ConsumerConfig::default(), TOPIC, PARTITIONS).await;
    let ends = (0..PARTITIONS).map(|p| (p, RECORDS as i64)).collect();
    let read = read_until(&mut consumer, TOPIC, &ends).await;
    for (partition, records) in read {
        let values: Vec<u8> = records.iter().map(|r| r.value.as_ref().unwrap()[0]).collect();
        let expected: Vec<u8> = (0..RECORDS).map(|i| (i as u8) ^ (partition as u8)).collect();
        assert_eq!(values, expected, "partition {partition}");
    }
}

/// A one-partition topic of 1500 records of ~1 KB in 256 KiB segments, kept to 512 KiB: waits
/// until retention deleted offset 0 and returns the produced values.
async fn topic_past_retention(broker: &Broker, topic: &str) -> (Admin, Vec<Bytes>) {
    let admin = Admin::connect(client(broker)).await.unwrap();
    let settings = TopicSettings {
        segment_bytes: Some(262144),
        retention_bytes: Some(524288),
        ..TopicSettings::default()
    };
    admin.create_topic(topic, 1, &settings).await.unwrap();
    // batch_bytes stays below the broker's batch_bytes_max (and so below segment_bytes).
    let producer =
        Producer::connect(client(broker), ProducerConfig { batch_bytes: 65536, ..ProducerConfig::default() })
            .await
            .unwrap();
    let mut values = Vec::new();
    let mut deliveries = Vec::new();
    for i in 0..1500 {
        let value = Bytes::from(format!("{i:05}-{}", "x".repeat(1000)));
        deliveries.push(producer.send(topic, None, value.clone()).await.unwrap());
        values.push(value);
    }
    producer.flush().await;
    for (i, d) in deliveries.into_iter().enumerate() {
        assert_eq!(d.await.unwrap().offset, i as i64);
    }
    let started = Instant::now();
    loop {
        let earliest = admin.list_offsets(topic, 0, OffsetSpec::Earliest).await.unwrap().offset;
        if earliest > 0 {
            assert!(earliest < 1500, "retention keeps at least retention_bytes: log start {earliest}");
            return (admin, values);
        }
        assert!(started.elapsed() < DEADLINE, "retention never deleted offset 0");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const RETENTION_BROKER: [&str; 2] = ["housekeeping_interval_ms=200", "batch_bytes_max=262144"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offset_deleted_by_retention_is_typed_or_reset() {
    const TOPIC: &str = "short";
    let broker = Broker::start(1, &RETENTION_BROKER);
    let (admin, values) = topic_past_retention(&broker, TOPIC).await;

    let mut consumer = connect_consumer(&broker, ConsumerConfig::default(), TOPIC, 1).await;
    consumer.seek(TOPIC, 0, Offset::At(0)).unwrap();
    let err = consumer.poll(Duration::from_millis(100)).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::OffsetOutOfRange { topic, partition: 0, offset: 0, .. } if topic == TOPIC),
        "expected OffsetOutOfRange for offset 0, got {err:?}"
    );
    assert_eq!(err.code(), Some(ErrorCode::OffsetOutOfRange));
    assert_eq!(consumer.position(TOPIC, 0), Some(0), "without a reset policy the position stays");

    let reset = ConsumerConfig { auto_offset_reset: Some(Offset::Beginning), ..ConsumerConfig::default() };
    let mut consumer = connect_consumer(&broker, reset, TOPIC, 1).await;
    consumer.seek(TOPIC, 0, Offset::At(0)).unwrap();
    let read = read_until(&mut consumer, TOPIC, &BTreeMap::from([(0, 1500)])).await;
    let log_start = admin.list_offsets(TOPIC, 0, OffsetSpec::Earliest).await.unwrap().offset;
    let got: Vec<(i64, Bytes)> = read[&0].iter().map(|r| (r.offset, r.value.clone().unwrap())).collect();
    let want: Vec<(i64, Bytes)> = (log_start..1500).map(|o| (o, values[o as usize].clone())).collect();
    assert_eq!(got, want, "reset to the log start {log_start} and read to the end");
}

/// The typed error is meant to carry the log's bounds so the application can pick a position;
/// the broker's fetch error result leaves them at the schema default (-1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offset_out_of_range_reports_the_log_bounds() {
    const TOPIC: &str = "bounds";
    let broker = Broker::start(1, &RETENTION_BROKER);
    let (admin, _) = topic_past_retention(&broker, TOPIC).await;
    let log_start = admin.list_offsets(TOPIC, 0, OffsetSpec::Earliest).await.unwrap().offset;
    let mut consumer = connect_consumer(&broker, ConsumerConfig::default(), TOPIC, 1).await;
    for offset in [0, 1501] {
        consumer.seek(TOPIC, 0, Offset::At(offset)).unwrap();
        let err = consumer.poll(Duration::from_millis(100)).await.unwrap_err();
        match err {
            ClientError::OffsetOutOfRange { offset: o, log_start_offset, high_watermark, .. } => {
                assert_eq!((o, log_start_offset, high_watermark), (offset, log_start, 1500));
            }
            other => panic!("expected OffsetOutOfRange, got {other:?}"),
        }
    }
}

/// Timestamps are per record, and a batch can straddle the asked time: the answer is the first
/// record stamped at or after it, as the schema and `OffsetSpec::Timestamp` document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamp_lookup_finds_the_record_inside_a_batch() {
    const TOPIC: &str = "straddle";
    let broker = Broker::start(1, &[]);
    let admin = Admin::connect(client(&broker)).await.unwrap();
    admin.create_topic(TOPIC, 1, &TopicSettings::default()).await.unwrap();
    // A long linger keeps both records in one batch.
    let config = ProducerConfig { linger: Duration::from_secs(5), ..ProducerConfig::default() };
    let producer = Producer::connect(client(&broker), config).await.unwrap();
    let before = producer.send(TOPIC, None, Bytes::from_static(b"before")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mark_ms = now_ms();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let after = producer.send(TOPIC, None, Bytes::from_static(b"after")).await.unwrap();
    producer.flush().await;
    assert_eq!((before.await.unwrap().offset, after.await.unwrap().offset), (0, 1));

    let listed = admin.list_offsets(TOPIC, 0, OffsetSpec::Timestamp(mark_ms)).await.unwrap();
    assert_eq!(listed.offset, 1, "{listed:?}");
    let mut consumer = connect_consumer(&broker, ConsumerConfig::default(), TOPIC, 1).await;
    consumer.seek(TOPIC, 0, Offset::Timestamp(mark_ms)).unwrap();
    let read = read_until(&mut consumer, TOPIC, &BTreeMap::from([(0, 2)])).await;
    let got: Vec<(i64, Bytes)> = read[&0].iter().map(|r| (r.offset, r.value.clone().unwrap())).collect();
    assert_eq!(got, vec![(1, Bytes::from_static(b"after"))]);
}

/// No record is stamped that late: the schema says the answer is the log end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamp_lookup_past_the_last_record_is_the_log_end() {
    const TOPIC: &str = "late";
    let broker = Broker::start(1, &[]);
    let admin = Admin::connect(client(&broker)).await.unwrap();
    admin.create_topic(TOPIC, 1, &TopicSettings::default()).await.unwrap();
    let producer = Producer::connect(client(&broker), ProducerConfig::default()).await.unwrap();
    for i in 0..3 {
        producer.send(TOPIC, None, Bytes::from(format!("r{i}"))).await.unwrap();
    }
    producer.flush().await;
    let listed = admin.list_offsets(TOPIC, 0, OffsetSpec::Timestamp(now_ms() + 60_000)).await.unwrap();
    assert_eq!(listed.offset, 3, "{listed:?}");
}

/// Seeking to a time after every record waits for new records, whatever the broker answers
/// for the lookup; with a reset policy of Beginning it must not re-read the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seek_to_a_future_timestamp_waits_at_the_end() {
    const TOPIC: &str = "future";
    let broker = Broker::start(1, &[]);
    let admin = Admin::connect(client(&broker)).await.unwrap();
    admin.create_topic(TOPIC, 1, &TopicSettings::default()).await.unwrap();
    let producer = Producer::connect(client(&broker), ProducerConfig::default()).await.unwrap();
    for i in 0..3 {
        producer.send(TOPIC, None, Bytes::from(format!("r{i}"))).await.unwrap();
    }
    producer.flush().await;
    for reset in [None, Some(Offset::Beginning)] {
        let config = ConsumerConfig { auto_offset_reset: reset, ..ConsumerConfig::default() };
        let mut consumer = connect_consumer(&broker, config, TOPIC, 1).await;
        consumer.seek(TOPIC, 0, Offset::Timestamp(now_ms() + 60_000)).unwrap();
        assert_eq!(consumer.poll(Duration::from_millis(50)).await.unwrap(), vec![], "reset {reset:?}");
        assert_eq!(consumer.position(TOPIC, 0), Some(3), "reset {reset:?}");
    }
}

#[tokio::test]
async fn connection_refused_names_the_address() {
    let mut broker = Broker::start(1, &[]);
    let addr = broker.addr.clone();
    Admin::connect(client(&broker)).await.unwrap();
    broker.stop();
    let err = Admin::connect(ClientConfig::new(addr.clone())).await.err().unwrap();
    match &err {
        ClientError::Io { addr: a, source } => {
            assert_eq!(*a, addr);
            assert_eq!(source.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
        }
        other => panic!("expected an I/O error, got {other:?}"),
    }
    assert!(err.to_string().starts_with(&addr), "{err}");
    let err =
        Producer::connect(ClientConfig::new(addr.clone()), ProducerConfig::default()).await.err().unwrap();
    assert!(err.to_string().starts_with(&addr), "{err}");
}

#[track_caller]
fn broker_code(result: Result<impl std::fmt::Debug, ClientError>) -> ErrorCode {
    match result {
        Err(e @ ClientError::Broker { .. }) => e.code().unwrap(),
        other => panic!("expected a broker error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_create_describe_list_offsets_delete() {
    let broker = Broker::start(2, &[]);
    let admin = Admin::connect(client(&broker)).await.unwrap();
    let settings = TopicSettings {
        retention_bytes: Some(1 << 30),
        retention_ms: Some(3_600_000),
        segment_bytes: Some(8 << 20),
        segment_ms: Some(600_000),
        durability: Some(Durability::Written),
    };
    let created = admin.create_topic("orders", 4, &settings).await.unwrap();
    assert_eq!(created.iter().map(|p| p.partition).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    assert_eq!(created.iter().map(|p| p.shard).collect::<HashSet<_>>(), HashSet::from([0, 1]));

    let description = admin.describe_topic("orders").await.unwrap();
    assert_eq!(description.name, "orders");
    assert_eq!(description.config, settings);
    assert_eq!(description.partitions, created);
    assert!(description.partitions.iter().all(|p| p.log_start_offset == 0 && p.high_watermark == 0));

    // Unset settings describe as the broker's defaults.
    admin.create_topic("plain", 1, &TopicSettings::default()).await.unwrap();
    let week_ms = 7 * 24 * 3600 * 1000;
    assert_eq!(
        admin.describe_topic("plain").await.unwrap().config,
        TopicSettings {
            retention_bytes: Some(-1),
            retention_ms: Some(week_ms),
            segment_bytes: Some(1 << 30),
            segment_ms: Some(week_ms),
            durability: Some(Durability::Fsync),
        }
    );
    assert_eq!(admin.list_topics().await.unwrap(), vec!["orders".to_owned(), "plain".to_owned()]);

    // Offsets: 10 records in two batches per partition, split by a timestamp mark.
    let producer = Producer::connect(client(&broker), ProducerConfig::default()).await.unwrap();
    let mut mark_ms = 0;
    for round in 0..2 {
        if round == 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            mark_ms = now_ms();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for p in 0..4 {
            for i in 0..5 {
                producer.send_to("orders", p, None, Bytes::from(format!("{round}-{i}"))).await.unwrap();
            }
        }
        producer.flush().await;
    }
    for p in 0..4 {
        let earliest = admin.list_offsets("orders", p, OffsetSpec::Earliest).await.unwrap();
        assert_eq!(earliest.offset, 0);
        let latest = admin.list_offsets("orders", p, OffsetSpec::Latest).await.unwrap();
        assert_eq!(latest.offset, 10);
        let at_mark = admin.list_offsets("orders", p, OffsetSpec::Timestamp(mark_ms)).await.unwrap();
        assert_eq!(at_mark.offset, 5, "partition {p}");
        assert!(at_mark.timestamp_ms >= mark_ms);
    }
    assert_eq!(
        admin.list_offsets("orders", 4, OffsetSpec::Latest).await.unwrap_err().code(),
        Some(ErrorCode::UnknownTopicOrPartition)
    );

    // Errors.
    assert_eq!(
        broker_code(admin.create_topic("orders", 2, &TopicSettings::default()).await),
        ErrorCode::TopicAlreadyExists
    );
    for name in ["", ".", "..", "a/b", "sp ace", "ünï", &"x".repeat(250)] {
        let result = admin.create_topic(name, 1, &TopicSettings::default()).await;
        assert_eq!(broker_code(result), ErrorCode::InvalidTopicName, "{name:?}");
    }
    assert_eq!(
        broker_code(admin.create_topic("huge", 10_001, &TopicSettings::default()).await),
        ErrorCode::InvalidPartitions,
        "above partitions_per_topic_max"
    );
    let tiny_segments = TopicSettings { segment_bytes: Some(1), ..TopicSettings::default() };
    assert_eq!(broker_code(admin.create_topic("tiny", 1, &tiny_segments).await), ErrorCode::InvalidConfig);
    assert_eq!(admin.list_topics().await.unwrap(), vec!["orders".to_owned(), "plain".to_owned()]);

    // Delete: gone from describe and list; the name can be used again, from offset 0.
    admin.delete_topic("orders").await.unwrap();
    let err = admin.describe_topic("orders").await.unwrap_err();
    assert!(matches!(&err, ClientError::UnknownTopic { topic } if topic == "orders"), "{err:?}");
    assert_eq!(err.code(), Some(ErrorCode::UnknownTopicOrPartition));
    assert_eq!(admin.list_topics().await.unwrap(), vec!["plain".to_owned()]);
    assert_eq!(
        admin.delete_topic("orders").await.unwrap_err().code(),
        Some(ErrorCode::UnknownTopicOrPartition)
    );
    admin.create_topic("orders", 2, &TopicSettings::default()).await.unwrap();
    let again = admin.describe_topic("orders").await.unwrap();
    assert!(again.partitions.iter().all(|p| p.log_start_offset == 0 && p.high_watermark == 0), "{again:?}");
}

/// A topic needs at least one partition; asking for none is an error, not a request for the
/// broker's default (the admin API has no "default" value for the count).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_topic_with_zero_partitions_is_invalid() {
    let broker = Broker::start(1, &[]);
    let admin = Admin::connect(client(&broker)).await.unwrap();
    let result = admin.create_topic("none", 0, &TopicSettings::default()).await;
    assert_eq!(broker_code(result), ErrorCode::InvalidPartitions);
    assert_eq!(admin.list_topics().await.unwrap(), Vec::<String>::new());
}

/// The durability contract: with durability Fsync and acks=all, every acknowledged record
/// survives `kill -9` at exactly its offset; nothing is served twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_production_keeps_every_acknowledged_record() {
    const TOPIC: &str = "durable";
    const PARTITIONS: u32 = 4;
    let mut broker = Broker::start(2, &[]);
    let admin = Admin::connect(client(&broker)).await.unwrap();
    let settings = TopicSettings { durability: Some(Durability::Fsync), ..TopicSettings::default() };
    admin.create_topic(TOPIC, PARTITIONS, &settings).await.unwrap();
    let config =
        ClientConfig { request_timeout: Duration::from_secs(5), ..ClientConfig::new(broker.addr.clone()) };
    let producer = Arc::new(
        Producer::connect(
            config,
            ProducerConfig {
                acks: -1,
                linger: Duration::from_millis(1),
                batch_bytes: 16 << 10,
                buffer_bytes: 1 << 20,
                ..ProducerConfig::default()
            },
        )
        .await
        .unwrap(),
    );

    let stop = Arc::new(AtomicBool::new(false));
    let sender = tokio::spawn({
        let (producer, stop) = (producer.clone(), stop.clone());
        async move {
            let mut sent = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let value = Bytes::from(format!("record-{i:09}"));
                match producer.send(TOPIC, None, value.clone()).await {
                    Ok(delivery) => sent.push((value, delivery)),
                    Err(_) => break,
                }
                i += 1;
            }
            sent
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    broker.kill9();
    stop.store(true, Ordering::Relaxed);
    let sent = tokio::time::timeout(DEADLINE, sender).await.unwrap().unwrap();

    // A delivery that resolves Ok was acknowledged by the broker before it died.
    let mut delivered: Vec<(u32, i64, Bytes)> = Vec::new();
    let mut failed = 0;
    for (value, delivery) in sent {
        match tokio::time::timeout(DEADLINE, delivery).await.expect("delivery never resolved") {
            Ok(meta) => delivered.push((meta.partition, meta.offset, value)),
            Err(_) => failed += 1,
        }
    }
    assert!(!delivered.is_empty(), "nothing was acknowledged in a second of sending");
    assert!(failed > 0, "the kill happened with nothing in flight; the test proved little");
    drop(producer);

    tokio::task::block_in_place(|| broker.restart());
    // The restarted broker listens on new free ports.
    let admin = Admin::connect(client(&broker)).await.unwrap();
    let description = admin.describe_topic(TOPIC).await.unwrap();
    let ends: BTreeMap<u32, i64> =
        description.partitions.iter().map(|p| (p.partition, p.high_watermark)).collect();
    let mut consumer = connect_consumer(&broker, ConsumerConfig::default(), TOPIC, PARTITIONS).await;
    let read = read_until(&mut consumer, TOPIC, &ends).await;

    let mut stored: HashMap<(u32, i64), Bytes> = HashMap::new();
    let mut values_seen = HashSet::new();
    for (p, records) in &read {
        let offsets: Vec<i64> = records.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, (0..ends[p]).collect::<Vec<_>>(), "partition {p}: offsets dense, each once");
        for r in records {
            let value = r.value.clone().unwrap();
            assert!(values_seen.insert(value.clone()), "{value:?} stored twice");
            stored.insert((r.partition, r.offset), value);
        }
    }
    for (p, offset, value) in &delivered {
        assert_eq!(stored.get(&(*p, *offset)), Some(value), "acknowledged record lost at {p}/{offset}");
    }
    let log = broker.log();
    assert!(!log.contains("panicked"), "broker log:\n{log}");
}

/// Batches queued behind a broker that died must all resolve, with an error, once nothing can
/// reach it: no response, linger or send is left to move the queue along. One partition with one
/// request in flight, 40 sealed batches queued on a single-threaded runtime before the sender
/// task runs once.
#[tokio::test]
async fn batches_queued_when_the_broker_dies_all_fail() {
    const TOPIC: &str = "orphaned";
    let mut broker = Broker::start(1, &[]);
    let admin = Admin::connect(client(&broker)).await.unwrap();
    admin.create_topic(TOPIC, 1, &TopicSettings::default()).await.unwrap();
    let config = ProducerConfig {
        linger: Duration::from_millis(1),
        batch_bytes: 1024,
        max_in_flight_per_connection: 1,
        ..ProducerConfig::default()
    };
    let producer = Producer::connect(client(&broker), config).await.unwrap();
    // Learns the topic's metadata and opens the connection to its owner.
    let first = producer.send(TOPIC, None, Bytes::from_static(b"first")).await.unwrap();
    assert_eq!(first.await.unwrap().offset, 0);

    broker.kill9();
    // Each record fills a batch of its own.
    let mut deliveries = Vec::new();
    for i in 0..40u8 {
        deliveries.push(producer.send(TOPIC, None, Bytes::from(vec![i; 1000])).await.unwrap());
    }
    for (i, delivery) in deliveries.into_iter().enumerate() {
        let result = tokio::time::timeout(DEADLINE, delivery).await;
        let result = result.unwrap_or_else(|_| panic!("delivery of record {i} never resolved"));
        let err = result.expect_err("the broker is dead; nothing can be acknowledged");
        assert!(
            matches!(err, ClientError::Io { .. } | ClientError::NotSent { .. } | ClientError::Timeout { .. }),
            "record {i}: {err:?}"
        );
    }
    tokio::time::timeout(DEADLINE, producer.flush()).await.expect("flush never returned");
}

/// A peer that accepts connections and never answers: connecting fails with a timeout naming the
/// address instead of waiting for the handshake forever.
#[tokio::test]
async fn silent_peer_times_out_the_handshake() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    // Holds every accepted socket open and silent until the test process ends.
    std::thread::spawn(move || {
        let held: Vec<std::net::TcpStream> = listener.incoming().map_while(Result::ok).collect();
        drop(held);
    });
    let config =
        ClientConfig { request_timeout: Duration::from_millis(300), ..ClientConfig::new(addr.clone()) };
    let result = tokio::time::timeout(DEADLINE, Producer::connect(config, ProducerConfig::default())).await;
    let err =
        result.expect("connect never returned").err().expect("a silent peer cannot complete a handshake");
    assert!(matches!(&err, ClientError::Timeout { addr: a, .. } if *a == addr), "{err:?}");
}
