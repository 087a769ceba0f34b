//! A deliberately small, blocking native-protocol client for tests that need to control the
//! exact bytes on a connection (bad input, routing through a chosen shard, long polling).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use flatbuffers::FlatBufferBuilder;
use ringlog::protocol::frame::frame_prefix;
use ringlog::protocol::wire::{self, RequestBody};
use ringlog::record::builder::BatchBuilder;

pub struct Conn {
    pub stream: TcpStream,
    next_cid: u32,
}

/// A decoded response: the header bytes (a `wire::Response`) and the payload region.
pub struct Resp {
    pub header: Vec<u8>,
    pub payload: Vec<u8>,
}

impl Resp {
    pub fn root(&self) -> wire::Response<'_> {
        flatbuffers::root::<wire::Response>(&self.header).expect("broker sent a valid Response")
    }
}

impl Conn {
    pub fn connect(addr: &str) -> Conn {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_nodelay(true).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Conn { stream, next_cid: 1 }
    }

    fn take_cid(&mut self) -> u32 {
        let cid = self.next_cid;
        self.next_cid += 1;
        cid
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Sends one request whose body is built by `build`, plus `payload`; returns the cid.
    pub fn send(
        &mut self,
        body_type: RequestBody,
        payload: &[u8],
        build: impl FnOnce(&mut FlatBufferBuilder<'static>) -> flatbuffers::WIPOffset<flatbuffers::UnionWIPOffset>,
    ) -> u32 {
        let cid = self.take_cid();
        self.send_raw(&request_frame(cid, 1, body_type, payload, build));
        cid
    }

    /// Reads one response frame; `None` if the broker closed the connection.
    pub fn recv(&mut self) -> Option<Resp> {
        let mut prefix = [0u8; 8];
        if self.stream.read_exact(&mut prefix).is_err() {
            return None;
        }
        let frame_len = u32::from_be_bytes(prefix[..4].try_into().unwrap()) as usize;
        let header_len = u32::from_be_bytes(prefix[4..].try_into().unwrap()) as usize;
        let mut rest = vec![0u8; frame_len - 4];
        self.stream.read_exact(&mut rest).ok()?;
        let payload = rest.split_off(header_len);
        Some(Resp { header: rest, payload })
    }

    pub fn create_topic(&mut self, name: &str, partitions: u32) -> Resp {
        self.send(RequestBody::CreateTopicRequest, &[], |fbb| {
            let name = fbb.create_string(name);
            wire::CreateTopicRequest::create(
                fbb,
                &wire::CreateTopicRequestArgs {
                    name: Some(name),
                    partitions: Some(partitions),
                    config: None,
                    replication_factor: None,
                },
            )
            .as_union_value()
        });
        self.recv().expect("create topic response")
    }

    pub fn metadata(&mut self) -> Resp {
        self.send(RequestBody::MetadataRequest, &[], |fbb| {
            wire::MetadataRequest::create(fbb, &wire::MetadataRequestArgs { topics: None }).as_union_value()
        });
        self.recv().expect("metadata response")
    }

    /// Produces `batch` (raw bytes) to one partition with acks=1.
    pub fn produce_raw(&mut self, topic: &str, partition: u32, batch: &[u8]) -> Option<Resp> {
        let cid = self.take_cid();
        self.send_raw(&produce_frame(cid, topic, partition, 1, batch));
        self.recv()
    }

    /// Produces the given values as one batch; returns (error code, base offset).
    /// Produces `values` stamped now (a 2023 stamp would be past the default time retention, and
    /// a test running longer than a housekeeping interval would see its records deleted).
    pub fn produce(&mut self, topic: &str, partition: u32, values: &[&[u8]]) -> (wire::ErrorCode, i64) {
        let batch = batch_now(values);
        let resp = self.produce_raw(topic, partition, &batch).expect("produce response");
        produce_result(&resp)
    }

    /// Fetches one partition; returns (error, high watermark, records as (offset, value)).
    pub fn fetch(&mut self, topic: &str, partition: u32, offset: i64, max_wait_ms: u32) -> Fetched {
        let cid = self.take_cid();
        self.send_raw(&fetch_frame(cid, topic, partition, offset, max_wait_ms, 1 << 20));
        let resp = self.recv().expect("fetch response");
        decode_fetch(&resp, offset)
    }
}

pub struct Fetched {
    pub error: wire::ErrorCode,
    pub high_watermark: i64,
    pub records: Vec<(i64, Vec<u8>)>,
}

/// A batch of `values` stamped November 2023: past the default time retention, which rolls and
/// deletes it at the next housekeeping pass.
pub fn batch_of(values: &[&[u8]]) -> Vec<u8> {
    batch_at(1_700_000_000_000, values)
}

/// A batch of `values` stamped now: kept by time retention.
pub fn batch_now(values: &[&[u8]]) -> Vec<u8> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    batch_at(now.as_millis() as i64, values)
}

pub fn produce_result(resp: &Resp) -> (wire::ErrorCode, i64) {
    let root = resp.root();
    assert_eq!(root.error(), wire::ErrorCode::None, "{:?}", root.message());
    let body = root.body_as_produce_response().expect("produce response body");
    let p = body.topics().unwrap().get(0).partitions().unwrap().get(0);
    (p.error(), p.base_offset())
}

pub fn decode_fetch(resp: &Resp, from: i64) -> Fetched {
    let root = resp.root();
    assert_eq!(root.error(), wire::ErrorCode::None, "{:?}", root.message());
    let body = root.body_as_fetch_response().expect("fetch response body");
    let p = body.topics().unwrap().get(0).partitions().unwrap().get(0);
    let start = p.payload_offset() as usize;
    let bytes = &resp.payload[start..start + p.payload_len() as usize];
    let mut records = Vec::new();
    for batch in ringlog::record::batches(bytes) {
        let (_, batch) = batch.expect("broker served a valid batch");
        for r in ringlog::record::reader::records(batch).unwrap() {
            let r = r.unwrap();
            if r.offset >= from {
                records.push((r.offset, r.value.unwrap_or_default().to_vec()));
            }
        }
    }
    Fetched { error: p.error(), high_watermark: p.high_watermark(), records }
}

/// A complete request frame (prefix, header, payload) with an explicit protocol version, for
/// tests that write frames themselves (pipelining from another thread, version probes).
pub fn request_frame(
    cid: u32,
    version: u16,
    body_type: RequestBody,
    payload: &[u8],
    build: impl FnOnce(&mut FlatBufferBuilder<'static>) -> flatbuffers::WIPOffset<flatbuffers::UnionWIPOffset>,
) -> Vec<u8> {
    let mut fbb = FlatBufferBuilder::new();
    let body = build(&mut fbb);
    let root = wire::Request::create(
        &mut fbb,
        &wire::RequestArgs { correlation_id: cid, version, body_type, body: Some(body) },
    );
    fbb.finish_minimal(root);
    let header = fbb.finished_data();
    let mut frame = frame_prefix(header.len(), payload.len()).to_vec();
    frame.extend_from_slice(header);
    frame.extend_from_slice(payload);
    frame
}

/// A complete protocol-version-1 produce frame for one partition.
pub fn produce_frame(cid: u32, topic: &str, partition: u32, acks: i8, batch: &[u8]) -> Vec<u8> {
    request_frame(cid, 1, RequestBody::ProduceRequest, batch, |fbb| {
        let parts = [wire::ProducePartition::create(
            fbb,
            &wire::ProducePartitionArgs { partition, payload_offset: 0, payload_len: batch.len() as u32 },
        )];
        let parts = fbb.create_vector(&parts);
        let name = fbb.create_string(topic);
        let topics = [wire::ProduceTopic::create(
            fbb,
            &wire::ProduceTopicArgs { name: Some(name), partitions: Some(parts) },
        )];
        let topics = fbb.create_vector(&topics);
        wire::ProduceRequest::create(
            fbb,
            &wire::ProduceRequestArgs { acks, timeout_ms: 30_000, topics: Some(topics) },
        )
        .as_union_value()
    })
}

/// A complete protocol-version-1 fetch frame for one partition.
pub fn fetch_frame(
    cid: u32,
    topic: &str,
    partition: u32,
    offset: i64,
    max_wait_ms: u32,
    max_bytes: u32,
) -> Vec<u8> {
    request_frame(cid, 1, RequestBody::FetchRequest, &[], |fbb| {
        let parts =
            [wire::FetchPartition::create(fbb, &wire::FetchPartitionArgs { partition, offset, max_bytes })];
        let parts = fbb.create_vector(&parts);
        let name = fbb.create_string(topic);
        let topics = [wire::FetchTopic::create(
            fbb,
            &wire::FetchTopicArgs { name: Some(name), partitions: Some(parts) },
        )];
        let topics = fbb.create_vector(&topics);
        wire::FetchRequest::create(
            fbb,
            &wire::FetchRequestArgs { max_wait_ms, min_bytes: 1, max_bytes, topics: Some(topics) },
        )
        .as_union_value()
    })
}

/// A batch whose records all carry `timestamp_ms` (retention by time looks at it).
pub fn batch_at(timestamp_ms: i64, values: &[&[u8]]) -> Vec<u8> {
    let mut b = BatchBuilder::new();
    for v in values {
        b.push(timestamp_ms, None, Some(v), &[]);
    }
    b.finish().to_vec()
}

/// Like `produce_result`, plus the partition's error message.
pub fn produce_outcome(resp: &Resp) -> (wire::ErrorCode, i64, String) {
    let root = resp.root();
    assert_eq!(root.error(), wire::ErrorCode::None, "{:?}", root.message());
    let body = root.body_as_produce_response().expect("produce response body");
    let p = body.topics().unwrap().get(0).partitions().unwrap().get(0);
    (p.error(), p.base_offset(), p.message().unwrap_or_default().to_string())
}

impl Conn {
    /// Creates a topic with explicit per-topic settings.
    pub fn create_topic_with(&mut self, name: &str, partitions: u32, config: wire::TopicConfigArgs) -> Resp {
        self.send(RequestBody::CreateTopicRequest, &[], |fbb| {
            let name = fbb.create_string(name);
            let config = wire::TopicConfig::create(fbb, &config);
            wire::CreateTopicRequest::create(
                fbb,
                &wire::CreateTopicRequestArgs {
                    name: Some(name),
                    partitions: Some(partitions),
                    config: Some(config),
                    replication_factor: None,
                },
            )
            .as_union_value()
        });
        self.recv().expect("create topic response")
    }

    pub fn delete_topic(&mut self, name: &str) -> Resp {
        self.send(RequestBody::DeleteTopicRequest, &[], |fbb| {
            let name = fbb.create_string(name);
            wire::DeleteTopicRequest::create(fbb, &wire::DeleteTopicRequestArgs { name: Some(name) })
                .as_union_value()
        });
        self.recv().expect("delete topic response")
    }

    /// (log start offset, high watermark) of one partition, from metadata.
    pub fn offsets(&mut self, topic: &str, partition: u32) -> (i64, i64) {
        let resp = self.metadata();
        let body = resp.root().body_as_metadata_response().expect("metadata response body");
        let t = body.topics().unwrap().iter().find(|t| t.name() == Some(topic)).expect("topic in metadata");
        let p = t.partitions().unwrap().iter().find(|p| p.partition() == partition).expect("partition");
        (p.log_start_offset(), p.high_watermark())
    }

    /// Every record of one partition from `from` up to its high watermark, in as many fetches as
    /// it takes.
    pub fn fetch_all(&mut self, topic: &str, partition: u32, from: i64) -> Vec<(i64, Vec<u8>)> {
        let mut records = Vec::new();
        let mut next = from;
        loop {
            let f = self.fetch(topic, partition, next, 0);
            assert_eq!(f.error, wire::ErrorCode::None, "fetch {topic}/{partition} at {next}");
            if let Some(&(last, _)) = f.records.last() {
                next = last + 1;
            }
            records.extend(f.records);
            if next >= f.high_watermark {
                return records;
            }
        }
    }
}
