//! Client tests over real sockets against a small in-process stand-in broker that speaks the
//! native protocol (handshake, metadata, produce, fetch, list offsets) and keeps batches in
//! memory. It checks what a real broker checks on produce (batch validation) and stamps base
//! offsets, so offsets and bytes seen by the client are the ones a broker would produce.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use flatbuffers::FlatBufferBuilder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::protocol::frame::{frame_prefix, split_frame};
use crate::protocol::{verifier_options, wire};
use crate::record::{set_base_offset, validate_for_append, BatchLimits};

const TOPIC: &str = "events";
const PARTITIONS: u32 = 2;

#[derive(Default)]
struct Log {
    /// (base offset, batch bytes)
    batches: Vec<(i64, Bytes)>,
    next_offset: i64,
}

struct FakeBroker {
    port: u16,
    logs: Arc<Mutex<HashMap<u32, Log>>>,
}

async fn start_broker() -> FakeBroker {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let logs: Arc<Mutex<HashMap<u32, Log>>> =
        Arc::new(Mutex::new((0..PARTITIONS).map(|p| (p, Log::default())).collect()));
    let shared = logs.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(stream, port, shared.clone()));
        }
    });
    FakeBroker { port, logs }
}

async fn serve(mut stream: TcpStream, port: u16, logs: Arc<Mutex<HashMap<u32, Log>>>) {
    let mut buf = BytesMut::with_capacity(1 << 16);
    loop {
        while let Some(frame) = split_frame(&mut buf, 64 << 20).unwrap() {
            let request =
                flatbuffers::root_with_opts::<wire::Request>(&verifier_options(), &frame.header).unwrap();
            let mut fbb = FlatBufferBuilder::new();
            let mut payload = Vec::new();
            let (body_type, body) = match request.body_type() {
                wire::RequestBody::HandshakeRequest => {
                    let v = fbb.create_string("fake");
                    let b = wire::HandshakeResponse::create(
                        &mut fbb,
                        &wire::HandshakeResponseArgs {
                            version: 1,
                            broker_version: Some(v),
                            shard: 0,
                            shard_count: 2,
                            apis: None,
                        },
                    );
                    (wire::ResponseBody::HandshakeResponse, b.as_union_value())
                }
                wire::RequestBody::MetadataRequest => {
                    let logs = logs.lock().unwrap();
                    let host = fbb.create_string("0.0.0.0");
                    let shards: Vec<_> = (0..2)
                        .map(|shard| {
                            wire::ShardEndpoint::create(
                                &mut fbb,
                                &wire::ShardEndpointArgs { shard, host: Some(host), port },
                            )
                        })
                        .collect();
                    let shards = fbb.create_vector(&shards);
                    let parts: Vec<_> = (0..PARTITIONS)
                        .map(|p| {
                            wire::PartitionMetadata::create(
                                &mut fbb,
                                &wire::PartitionMetadataArgs {
                                    partition: p,
                                    shard: p % 2,
                                    log_start_offset: 0,
                                    high_watermark: logs[&p].next_offset,
                                },
                            )
                        })
                        .collect();
                    let parts = fbb.create_vector(&parts);
                    let name = fbb.create_string(TOPIC);
                    let asked: Vec<&str> =
                        request.body_as_metadata_request().unwrap().topics().unwrap().iter().collect();
                    let topic = if asked.is_empty() || asked == [TOPIC] {
                        wire::TopicMetadata::create(
                            &mut fbb,
                            &wire::TopicMetadataArgs {
                                name: Some(name),
                                partitions: Some(parts),
                                ..Default::default()
                            },
                        )
                    } else {
                        let name = fbb.create_string(asked[0]);
                        wire::TopicMetadata::create(
                            &mut fbb,
                            &wire::TopicMetadataArgs {
                                name: Some(name),
                                error: wire::ErrorCode::UnknownTopicOrPartition,
                                ..Default::default()
                            },
                        )
                    };
                    let topics = fbb.create_vector(&[topic]);
                    let b = wire::MetadataResponse::create(
                        &mut fbb,
                        &wire::MetadataResponseArgs { shards: Some(shards), topics: Some(topics) },
                    );
                    (wire::ResponseBody::MetadataResponse, b.as_union_value())
                }
                wire::RequestBody::ProduceRequest => {
                    let produce = request.body_as_produce_request().unwrap();
                    let mut logs = logs.lock().unwrap();
                    let mut results = Vec::new();
                    for t in produce.topics().unwrap() {
                        for p in t.partitions().unwrap() {
                            let start = p.payload_offset() as usize;
                            let mut batch =
                                BytesMut::from(&frame.payload[start..start + p.payload_len() as usize]);
                            let limits =
                                BatchLimits { batch_bytes_max: 1 << 20, records_per_batch_max: 100_000 };
                            let header = validate_for_append(&batch, &limits).unwrap();
                            let log = logs.get_mut(&p.partition()).unwrap();
                            let base_offset = log.next_offset;
                            set_base_offset(&mut batch, base_offset);
                            log.next_offset += i64::from(header.record_count);
                            log.batches.push((base_offset, batch.freeze()));
                            results.push(wire::ProducePartitionResult::create(
                                &mut fbb,
                                &wire::ProducePartitionResultArgs {
                                    partition: p.partition(),
                                    base_offset,
                                    log_start_offset: 0,
                                    ..Default::default()
                                },
                            ));
                        }
                    }
                    if produce.acks() == 0 {
                        continue;
                    }
                    let results = fbb.create_vector(&results);
                    let name = fbb.create_string(TOPIC);
                    let t = wire::ProduceTopicResult::create(
                        &mut fbb,
                        &wire::ProduceTopicResultArgs { name: Some(name), partitions: Some(results) },
                    );
                    let topics = fbb.create_vector(&[t]);
                    let b = wire::ProduceResponse::create(
                        &mut fbb,
                        &wire::ProduceResponseArgs { topics: Some(topics) },
                    );
                    (wire::ResponseBody::ProduceResponse, b.as_union_value())
                }
                wire::RequestBody::FetchRequest => {
                    let fetch = request.body_as_fetch_request().unwrap();
                    let logs = logs.lock().unwrap();
                    let mut results = Vec::new();
                    let mut payload_len = 0u32;
                    for t in fetch.topics().unwrap() {
                        for p in t.partitions().unwrap() {
                            let log = &logs[&p.partition()];
                            let mut args = wire::FetchPartitionResultArgs {
                                partition: p.partition(),
                                high_watermark: log.next_offset,
                                log_start_offset: 0,
                                payload_offset: payload_len,
                                ..Default::default()
                            };
                            if p.offset() > log.next_offset || p.offset() < 0 {
                                args.error = wire::ErrorCode::OffsetOutOfRange;
                            } else {
                                // Whole batches from the one holding the offset, as a broker does.
                                for (base, bytes) in &log.batches {
                                    let count = i64::from(
                                        crate::record::BatchHeader::parse(bytes).unwrap().record_count,
                                    );
                                    if base + count > p.offset() {
                                        payload.push(bytes.clone());
                                        args.payload_len += bytes.len() as u32;
                                    }
                                }
                                payload_len += args.payload_len;
                            }
                            results.push(wire::FetchPartitionResult::create(&mut fbb, &args));
                        }
                    }
                    let results = fbb.create_vector(&results);
                    let name = fbb.create_string(TOPIC);
                    let t = wire::FetchTopicResult::create(
                        &mut fbb,
                        &wire::FetchTopicResultArgs { name: Some(name), partitions: Some(results) },
                    );
                    let topics = fbb.create_vector(&[t]);
                    let b = wire::FetchResponse::create(
                        &mut fbb,
                        &wire::FetchResponseArgs { topics: Some(topics) },
                    );
                    (wire::ResponseBody::FetchResponse, b.as_union_value())
                }
                wire::RequestBody::ListOffsetsRequest => {
                    let list = request.body_as_list_offsets_request().unwrap();
                    let logs = logs.lock().unwrap();
                    let t = list.topics().unwrap().get(0);
                    let p = t.partitions().unwrap().get(0);
                    let offset = if p.timestamp() == crate::protocol::EARLIEST_TIMESTAMP {
                        0
                    } else {
                        logs[&p.partition()].next_offset
                    };
                    let r = wire::ListOffsetsPartitionResult::create(
                        &mut fbb,
                        &wire::ListOffsetsPartitionResultArgs {
                            partition: p.partition(),
                            offset,
                            ..Default::default()
                        },
                    );
                    let rs = fbb.create_vector(&[r]);
                    let name = fbb.create_string(t.name().unwrap());
                    let t = wire::ListOffsetsTopicResult::create(
                        &mut fbb,
                        &wire::ListOffsetsTopicResultArgs { name: Some(name), partitions: Some(rs) },
                    );
                    let topics = fbb.create_vector(&[t]);
                    let b = wire::ListOffsetsResponse::create(
                        &mut fbb,
                        &wire::ListOffsetsResponseArgs { topics: Some(topics) },
                    );
                    (wire::ResponseBody::ListOffsetsResponse, b.as_union_value())
                }
                other => panic!("fake broker got unexpected request {other:?}"),
            };
            let response = wire::Response::create(
                &mut fbb,
                &wire::ResponseArgs {
                    correlation_id: request.correlation_id(),
                    body_type,
                    body: Some(body),
                    ..Default::default()
                },
            );
            fbb.finish(response, None);
            let header = fbb.finished_data();
            let payload_bytes: usize = payload.iter().map(Bytes::len).sum();
            let mut out = frame_prefix(header.len(), payload_bytes).to_vec();
            out.extend_from_slice(header);
            for p in payload {
                out.extend_from_slice(&p);
            }
            if stream.write_all(&out).await.is_err() {
                return;
            }
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

fn client_config(broker: &FakeBroker) -> ClientConfig {
    ClientConfig {
        request_timeout: Duration::from_secs(10),
        ..ClientConfig::new(format!("127.0.0.1:{}", broker.port))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_then_consume_over_real_sockets() {
    let broker = start_broker().await;
    let config = client_config(&broker);
    let producer = Producer::connect(
        config.clone(),
        ProducerConfig { batch_bytes: 4096, linger: Duration::from_millis(2), ..ProducerConfig::default() },
    )
    .await
    .unwrap();
    let mut deliveries = Vec::new();
    for i in 0..2000u32 {
        let key = (i % 7 != 0).then(|| Bytes::from(format!("key-{}", i % 13)));
        let value = Bytes::from(format!("value-{i}"));
        deliveries.push((key.clone(), value.clone(), producer.send(TOPIC, key, value).await.unwrap()));
    }
    producer.flush().await;
    let mut written: HashMap<u32, Vec<(i64, Bytes)>> = HashMap::new();
    for (key, value, delivery) in deliveries {
        let meta = delivery.await.unwrap();
        if let Some(key) = &key {
            assert_eq!(meta.partition, key_partition(key, PARTITIONS), "keyed records follow murmur2");
        }
        written.entry(meta.partition).or_default().push((meta.offset, value));
    }
    for (partition, records) in &written {
        let offsets: Vec<i64> = records.iter().map(|r| r.0).collect();
        assert_eq!(offsets, (0..records.len() as i64).collect::<Vec<_>>(), "partition {partition} offsets");
        assert_eq!(broker.logs.lock().unwrap()[partition].next_offset, records.len() as i64);
    }

    let admin = Admin::connect(config.clone()).await.unwrap();
    assert_eq!(admin.list_topics().await.unwrap(), vec![TOPIC.to_owned()]);
    let description = admin.describe_topic(TOPIC).await.unwrap();
    assert_eq!(description.partitions.len(), PARTITIONS as usize);
    assert!(matches!(admin.describe_topic("nope").await, Err(ClientError::UnknownTopic { .. })));
    let latest = admin.list_offsets(TOPIC, 1, OffsetSpec::Latest).await.unwrap();
    assert_eq!(latest.offset, written[&1].len() as i64);

    let mut consumer = Consumer::connect(config, ConsumerConfig::default()).await.unwrap();
    consumer.assign((0..PARTITIONS).map(|p| (TOPIC.to_owned(), p)).collect());
    consumer.seek(TOPIC, 1, Offset::At(5)).unwrap();
    let mut read: HashMap<u32, Vec<(i64, Bytes)>> = HashMap::new();
    let expected = written[&0].len() + written[&1].len() - 5;
    while read.values().map(Vec::len).sum::<usize>() < expected {
        let records = consumer.poll(Duration::from_millis(100)).await.unwrap();
        assert!(!records.is_empty(), "the stand-in broker always has the data");
        for r in records {
            read.entry(r.partition).or_default().push((r.offset, r.value.unwrap()));
        }
    }
    assert_eq!(read[&0], written[&0]);
    assert_eq!(read[&1][..], written[&1][5..]);
    assert_eq!(consumer.high_watermark(TOPIC, 0), Some(written[&0].len() as i64));
    assert_eq!(consumer.position(TOPIC, 1), Some(written[&1].len() as i64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offset_out_of_range_is_typed_or_reset() {
    let broker = start_broker().await;
    let config = client_config(&broker);
    let producer = Producer::connect(config.clone(), ProducerConfig { acks: 0, ..ProducerConfig::default() })
        .await
        .unwrap();
    let delivery = producer.send_to(TOPIC, 0, None, Bytes::from_static(b"only")).await.unwrap();
    producer.flush().await;
    assert_eq!(delivery.await.unwrap(), RecordMetadata { partition: 0, offset: -1 }, "acks=0 has no offset");

    let mut consumer = Consumer::connect(config.clone(), ConsumerConfig::default()).await.unwrap();
    consumer.assign(vec![(TOPIC.to_owned(), 0)]);
    consumer.seek(TOPIC, 0, Offset::At(100)).unwrap();
    let err = consumer.poll(Duration::from_millis(10)).await.unwrap_err();
    assert!(
        matches!(err, ClientError::OffsetOutOfRange { offset: 100, high_watermark: 1, .. }),
        "unexpected {err:?}"
    );

    let config = ConsumerConfig { auto_offset_reset: Some(Offset::Beginning), ..ConsumerConfig::default() };
    let mut consumer = Consumer::connect(client_config(&broker), config).await.unwrap();
    consumer.assign(vec![(TOPIC.to_owned(), 0)]);
    consumer.seek(TOPIC, 0, Offset::At(100)).unwrap();
    let mut values = Vec::new();
    for _ in 0..5 {
        values.extend(
            consumer.poll(Duration::from_millis(10)).await.unwrap().into_iter().map(|r| r.value.unwrap()),
        );
        if !values.is_empty() {
            break;
        }
    }
    assert_eq!(values, vec![Bytes::from_static(b"only")]);
}

#[tokio::test]
async fn connection_reports_refused_address() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    let err = Admin::connect(ClientConfig::new(addr.clone())).await.err().unwrap();
    assert!(matches!(&err, ClientError::Io { addr: a, .. } if *a == addr), "{err:?}");
    assert!(err.to_string().starts_with(&addr));
}
