//! One TCP connection to one Kafka broker: version negotiation, pipelined requests, and a reader
//! task that hands each response frame to the connection's owner.
//!
//! Owns: framing (size prefix, request and response headers, correlation ids), the ApiVersions
//! handshake (each API at the highest version both sides speak), and the write path. Requests are
//! written by the owner task in order; responses come back in the same order (Kafka answers a
//! connection's requests in order), so the owner matches them against a queue of what it sent.
//! The owner bounds how many it has in flight; the reader never waits for it.
//!
//! Record batches are never copied into a request: the codec's output goes into a reused buffer
//! except for the batch bytes, which stay where they were built and go to the socket by
//! reference in one vectored write.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::ops::Range;
use std::time::Duration;

use bytes::buf::UninitSlice;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, CreateTopicsRequest, CreateTopicsResponse,
    DeleteTopicsRequest, DeleteTopicsResponse, FetchRequest, FetchResponse, ListOffsetsRequest,
    ListOffsetsResponse, MetadataRequest, MetadataResponse, ProduceRequest, ProduceResponse, RequestHeader,
    ResponseHeader,
};
use kafka_protocol::protocol::buf::ByteBufMut;
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{KafkaError, Result, SPOKEN};

/// Client id in every request header (brokers log it and use it for quotas).
const CLIENT_ID: &str = "ringlog-loadgen";
/// Largest response frame accepted: a fetch answers at most `fetch_max_bytes` (50 MiB) of records.
const RESPONSE_FRAME_BYTES_MAX: usize = 128 << 20;
/// The reader's buffer grows in steps of this; frames split off it share its allocation until
/// their owner drops them, then the space is reused in place.
const READ_BUFFER_BYTES: usize = 1 << 20;
/// Room for a request's own bytes (everything but record batches) before the buffer grows.
const REQUEST_HEAD_BYTES: usize = 64 << 10;
/// Slices handed to one `writev`; a request with more goes out in several calls.
const WRITE_SLICES_MAX: usize = 64;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The requests loadgen sends, with their API key and response type.
pub trait KafkaRequest: Encodable + HeaderVersion {
    const API: ApiKey;
    type Response: Decodable + HeaderVersion;
}

macro_rules! requests {
    ($($request:ident => $response:ident, $api:ident;)*) => {
        $(impl KafkaRequest for $request {
            const API: ApiKey = ApiKey::$api;
            type Response = $response;
        })*
    };
}

requests! {
    ApiVersionsRequest => ApiVersionsResponse, ApiVersions;
    MetadataRequest => MetadataResponse, Metadata;
    CreateTopicsRequest => CreateTopicsResponse, CreateTopics;
    DeleteTopicsRequest => DeleteTopicsResponse, DeleteTopics;
    ListOffsetsRequest => ListOffsetsResponse, ListOffsets;
    ProduceRequest => ProduceResponse, Produce;
    FetchRequest => FetchResponse, Fetch;
}

/// One response frame (header and body, size prefix removed) from connection `connection`, or why
/// that connection stopped.
pub struct Response {
    pub connection: usize,
    pub frame: Result<Bytes>,
}

pub type ResponseSender = mpsc::UnboundedSender<Response>;
pub type Responses = mpsc::UnboundedReceiver<Response>;

/// For one API: the version to use, or why there is none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Choice {
    Version(i16),
    /// The broker's range does not meet loadgen's.
    Disjoint {
        broker_min: i16,
        broker_max: i16,
    },
    /// The broker does not list the API.
    Missing,
}

/// The versions both sides speak, per API in [`SPOKEN`].
#[derive(Debug, Clone)]
pub struct Versions {
    chosen: Vec<(ApiKey, Choice)>,
}

impl Versions {
    /// Picks, for every API loadgen speaks, the highest version the broker's table also has.
    pub fn negotiate(broker: &[(i16, i16, i16)]) -> Versions {
        let chosen = SPOKEN
            .iter()
            .map(|&(api, min, max)| {
                let choice = match broker.iter().find(|(key, _, _)| *key == api as i16) {
                    None => Choice::Missing,
                    Some(&(_, broker_min, broker_max)) => {
                        let version = max.min(broker_max);
                        if version >= min.max(broker_min) {
                            Choice::Version(version)
                        } else {
                            Choice::Disjoint { broker_min, broker_max }
                        }
                    }
                };
                (api, choice)
            })
            .collect();
        Versions { chosen }
    }

    pub fn get(&self, api: ApiKey, addr: &str) -> Result<i16> {
        let spoken = SPOKEN.iter().find(|(a, _, _)| *a == api);
        let chosen = self.chosen.iter().find(|(a, _)| *a == api).map(|(_, c)| *c);
        match (spoken, chosen) {
            (_, Some(Choice::Version(version))) => Ok(version),
            (Some(&(_, min, max)), Some(Choice::Disjoint { broker_min, broker_max })) => {
                Err(KafkaError::Unsupported { addr: addr.to_string(), api, broker_min, broker_max, min, max })
            }
            _ => Err(KafkaError::Missing { addr: addr.to_string(), api }),
        }
    }

    /// `("Produce", 9)`, ... for the report.
    pub fn summary(&self) -> Vec<(String, i16)> {
        self.chosen
            .iter()
            .filter_map(|(api, c)| match c {
                Choice::Version(v) => Some((format!("{api:?}"), *v)),
                _ => None,
            })
            .collect()
    }
}

/// A request sent and not yet answered.
struct Awaiting {
    correlation_id: i32,
    api: ApiKey,
    version: i16,
}

pub struct Connection {
    addr: String,
    write: OwnedWriteHalf,
    versions: Versions,
    client_id: StrBytes,
    next_correlation_id: i32,
    awaiting: VecDeque<Awaiting>,
    /// The codec's output for the request being written; reused.
    head: BytesMut,
    /// The request as slices to write: pieces of `head` and record batches.
    chunks: Vec<Bytes>,
    /// Started once the handshake is done.
    reader: Option<JoinHandle<()>>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Some(reader) = &self.reader {
            reader.abort();
        }
    }
}

impl Connection {
    /// Connects, negotiates versions, and starts the reader task, which sends every response
    /// frame to `responses` tagged with `id`.
    pub async fn connect(addr: &str, id: usize, responses: ResponseSender) -> Result<Connection> {
        let connect_error = |source| KafkaError::Connect { addr: addr.to_string(), source };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| connect_error(std::io::ErrorKind::TimedOut.into()))?
            .map_err(connect_error)?;
        // Requests are written whole in one call; never hold a small one back for Nagle.
        stream.set_nodelay(true).map_err(connect_error)?;
        let (mut read, write) = stream.into_split();
        let mut conn = Connection {
            addr: addr.to_string(),
            write,
            versions: Versions::negotiate(&[(ApiKey::ApiVersions as i16, 0, 0)]),
            client_id: StrBytes::from_static_str(CLIENT_ID),
            next_correlation_id: 0,
            awaiting: VecDeque::new(),
            head: BytesMut::with_capacity(REQUEST_HEAD_BYTES),
            chunks: Vec::new(),
            reader: None,
        };
        // Something that accepts but never answers is not a Kafka broker: do not wait forever.
        tokio::time::timeout(CONNECT_TIMEOUT, conn.handshake(&mut read))
            .await
            .map_err(|_| KafkaError::Timeout {
                what: format!("ApiVersions to {addr}"),
                seconds: CONNECT_TIMEOUT.as_secs(),
            })?
            .map_err(|e| match e {
                // The first answer did not parse: most likely another protocol's port.
                KafkaError::Protocol { addr, api, version, message } => KafkaError::Protocol {
                    message: format!(
                        "{message} (is {addr} a Kafka-protocol listener? ringlog's native port is not)"
                    ),
                    addr,
                    api,
                    version,
                },
                other => other,
            })?;
        conn.reader = Some(tokio::spawn(read_frames(conn.addr.clone(), id, read, responses)));
        Ok(conn)
    }

    /// ApiVersions at the highest version loadgen speaks, read before the reader task starts. A
    /// broker that does not serve that version answers with a v0 body carrying its table
    /// (KIP-511), which is all that is needed.
    async fn handshake(&mut self, read: &mut OwnedReadHalf) -> Result<()> {
        let (_, _, max) = SPOKEN[0];
        debug_assert_eq!(SPOKEN[0].0, ApiKey::ApiVersions);
        self.versions = Versions::negotiate(&[(ApiKey::ApiVersions as i16, 0, max)]);
        let request = ApiVersionsRequest::default()
            .with_client_software_name(StrBytes::from_static_str(CLIENT_ID))
            .with_client_software_version(StrBytes::from_static_str(env!("CARGO_PKG_VERSION")));
        self.send(&request).await?;
        let mut size = [0u8; 4];
        read.read_exact(&mut size).await.map_err(|e| self.read_error(e))?;
        let size = frame_size(i32::from_be_bytes(size), &self.addr)?;
        let mut frame = vec![0u8; size];
        read.read_exact(&mut frame).await.map_err(|e| self.read_error(e))?;
        let mut frame = Bytes::from(frame);
        let awaiting =
            self.awaiting.pop_front().ok_or_else(|| self.protocol(ApiKey::ApiVersions, 0, "no request"))?;
        let header = ResponseHeader::decode(&mut frame, ApiVersionsResponse::header_version(max))
            .map_err(|e| self.protocol(ApiKey::ApiVersions, max, format!("response header: {e}")))?;
        if header.correlation_id != awaiting.correlation_id {
            return Err(self.protocol(ApiKey::ApiVersions, max, "correlation id mismatch".to_string()));
        }
        // The error code leads every version of the body; on UNSUPPORTED_VERSION the body is v0.
        let unsupported = frame.len() >= 2 && i16::from_be_bytes([frame[0], frame[1]]) == 35;
        let version = if unsupported { 0 } else { max };
        let response = ApiVersionsResponse::decode(&mut frame, version)
            .map_err(|e| self.protocol(ApiKey::ApiVersions, version, format!("{e}")))?;
        if response.error_code != 0 && !unsupported {
            return Err(KafkaError::Broker {
                what: format!("ApiVersions to {}", self.addr),
                code: response.error_code,
                message: None,
            });
        }
        let table: Vec<(i16, i16, i16)> =
            response.api_keys.iter().map(|k| (k.api_key, k.min_version, k.max_version)).collect();
        self.versions = Versions::negotiate(&table);
        Ok(())
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn versions(&self) -> &Versions {
        &self.versions
    }

    /// Writes `request` and expects its response.
    pub async fn send<R: KafkaRequest>(&mut self, request: &R) -> Result<()> {
        self.send_with_records(request, &[], true).await
    }

    /// Writes `request`, whose record fields hold `records` in encoding order: those batches go
    /// to the socket by reference. `expect_response` is false only for a Produce with acks 0,
    /// which the broker does not answer.
    pub async fn send_with_records<R: KafkaRequest>(
        &mut self,
        request: &R,
        records: &[Bytes],
        expect_response: bool,
    ) -> Result<()> {
        let version = self.versions.get(R::API, &self.addr)?;
        let correlation_id = self.next_correlation_id;
        self.next_correlation_id = self.next_correlation_id.wrapping_add(1);
        let header = RequestHeader::default()
            .with_request_api_key(R::API as i16)
            .with_request_api_version(version)
            .with_correlation_id(correlation_id)
            .with_client_id(Some(self.client_id.clone()));
        let header_version = R::header_version(version);
        self.encode_frame(&header, header_version, request, version, records)
            .map_err(|e| self.protocol(R::API, version, format!("encoding the request: {e}")))?;
        if let Err(source) = write_chunks(&mut self.write, &mut self.chunks).await {
            self.chunks.clear();
            return Err(KafkaError::Io { addr: self.addr.clone(), source });
        }
        if expect_response {
            self.awaiting.push_back(Awaiting { correlation_id, api: R::API, version });
        }
        Ok(())
    }

    fn encode_frame<R: Encodable>(
        &mut self,
        header: &RequestHeader,
        header_version: i16,
        request: &R,
        version: i16,
        records: &[Bytes],
    ) -> std::result::Result<(), String> {
        debug_assert!(self.chunks.is_empty());
        let size = header.compute_size(header_version).map_err(|e| e.to_string())?
            + request.compute_size(version).map_err(|e| e.to_string())?;
        let size = i32::try_from(size).map_err(|_| format!("request of {size} bytes is too large"))?;
        self.head.clear();
        self.head.reserve(REQUEST_HEAD_BYTES);
        let mut writer = FrameWriter {
            head: &mut self.head,
            chunks: &mut self.chunks,
            records,
            next_record: 0,
            chunked_bytes: 0,
        };
        writer.put_i32(size);
        header.encode(&mut writer, header_version).map_err(|e| e.to_string())?;
        request.encode(&mut writer, version).map_err(|e| e.to_string())?;
        let written = writer.offset();
        let referenced = writer.next_record;
        writer.finish();
        debug_assert_eq!(written, size as usize + 4, "compute_size and encode disagree");
        debug_assert_eq!(referenced, records.len(), "every batch is sent by reference");
        Ok(())
    }

    /// Decodes the response to the oldest request in flight, which must be an `R`.
    pub fn decode<R: KafkaRequest>(&mut self, mut frame: Bytes) -> Result<R::Response> {
        let awaiting = self
            .awaiting
            .pop_front()
            .ok_or_else(|| self.protocol(R::API, -1, "a response arrived with no request in flight"))?;
        if awaiting.api != R::API {
            let message = format!("expected the response to a {:?} request", awaiting.api);
            return Err(self.protocol(R::API, awaiting.version, message));
        }
        let version = awaiting.version;
        let header = ResponseHeader::decode(&mut frame, R::Response::header_version(version))
            .map_err(|e| self.protocol(R::API, version, format!("response header: {e}")))?;
        if header.correlation_id != awaiting.correlation_id {
            let message = format!(
                "response correlation id {} where {} was expected",
                header.correlation_id, awaiting.correlation_id
            );
            return Err(self.protocol(R::API, version, message));
        }
        R::Response::decode(&mut frame, version)
            .map_err(|e| self.protocol(R::API, version, format!("response body: {e}")))
    }

    fn protocol(&self, api: ApiKey, version: i16, message: impl Into<String>) -> KafkaError {
        KafkaError::Protocol { addr: self.addr.clone(), api, version, message: message.into() }
    }

    fn read_error(&self, source: std::io::Error) -> KafkaError {
        if source.kind() == std::io::ErrorKind::UnexpectedEof {
            KafkaError::Closed { addr: self.addr.clone() }
        } else {
            KafkaError::Io { addr: self.addr.clone(), source }
        }
    }
}

/// The bytes of one request frame as the codec writes them. The codec's own bytes go into
/// `head`; a record batch it would copy — recognised by address as the next of `records` — is
/// kept by reference instead, closing the current piece of `head` first.
struct FrameWriter<'a> {
    head: &'a mut BytesMut,
    chunks: &'a mut Vec<Bytes>,
    records: &'a [Bytes],
    next_record: usize,
    /// Bytes already moved to `chunks`.
    chunked_bytes: usize,
}

impl FrameWriter<'_> {
    fn finish(self) {
        if !self.head.is_empty() {
            self.chunks.push(self.head.split().freeze());
        }
    }

    fn head_range(&self, r: Range<usize>) -> Range<usize> {
        // The codec only ever seeks within what it is writing now (gaps for sizes), never back
        // into a batch already handed over: that would be a codec change loadgen must not miss.
        assert!(r.start >= self.chunked_bytes, "the codec reached back past a record batch");
        r.start - self.chunked_bytes..r.end - self.chunked_bytes
    }
}

// SAFETY: every method forwards to `head`, a `BytesMut`, whose own implementation upholds the
// contract; `put_slice` either forwards or does not write to `head` at all.
unsafe impl BufMut for FrameWriter<'_> {
    fn remaining_mut(&self) -> usize {
        self.head.remaining_mut()
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        // SAFETY: the caller initialised `cnt` bytes of the slice `chunk_mut` returned, which is
        // `head`'s own.
        unsafe { self.head.advance_mut(cnt) }
    }

    fn chunk_mut(&mut self) -> &mut UninitSlice {
        self.head.chunk_mut()
    }

    fn put_slice(&mut self, src: &[u8]) {
        if let Some(batch) = self.records.get(self.next_record) {
            if !src.is_empty() && src.len() == batch.len() && std::ptr::eq(src.as_ptr(), batch.as_ptr()) {
                self.next_record += 1;
                if !self.head.is_empty() {
                    let piece = self.head.split().freeze();
                    self.chunked_bytes += piece.len();
                    self.chunks.push(piece);
                }
                self.chunked_bytes += batch.len();
                self.chunks.push(batch.clone());
                return;
            }
        }
        self.head.put_slice(src);
    }
}

impl ByteBufMut for FrameWriter<'_> {
    fn offset(&self) -> usize {
        self.chunked_bytes + self.head.len()
    }

    fn seek(&mut self, offset: usize) {
        let r = self.head_range(offset..offset);
        self.head.resize(r.start, 0);
    }

    fn range(&mut self, r: Range<usize>) -> &mut [u8] {
        let r = self.head_range(r);
        &mut self.head[r]
    }
}

/// Writes `chunks` in order with vectored writes, then clears it.
async fn write_chunks(write: &mut OwnedWriteHalf, chunks: &mut Vec<Bytes>) -> std::io::Result<()> {
    let mut first = 0;
    while first < chunks.len() {
        let written = {
            let mut slices = [IoSlice::new(&[]); WRITE_SLICES_MAX];
            let count = (chunks.len() - first).min(WRITE_SLICES_MAX);
            for (slice, chunk) in slices.iter_mut().zip(&chunks[first..first + count]) {
                *slice = IoSlice::new(chunk);
            }
            write.write_vectored(&slices[..count]).await?
        };
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let mut left = written;
        while left > 0 {
            let chunk = &mut chunks[first];
            if left >= chunk.len() {
                left -= chunk.len();
                first += 1;
            } else {
                chunk.advance(left);
                left = 0;
            }
        }
        while chunks.get(first).is_some_and(Bytes::is_empty) {
            first += 1;
        }
    }
    chunks.clear();
    Ok(())
}

fn frame_size(size: i32, addr: &str) -> Result<usize> {
    match usize::try_from(size) {
        Ok(size) if (4..=RESPONSE_FRAME_BYTES_MAX).contains(&size) => Ok(size),
        _ => Err(KafkaError::Protocol {
            addr: addr.to_string(),
            api: ApiKey::ApiVersions,
            version: -1,
            message: format!(
                "response frame size {size} is outside 4..={RESPONSE_FRAME_BYTES_MAX} bytes: not a Kafka \
                 broker, or a corrupt stream"
            ),
        }),
    }
}

/// The reader task: splits the stream into frames and sends each to the owner, until the
/// connection fails or the owner is gone.
async fn read_frames(addr: String, id: usize, mut read: OwnedReadHalf, responses: ResponseSender) {
    let mut buf = BytesMut::with_capacity(READ_BUFFER_BYTES);
    loop {
        while buf.len() >= 4 {
            let size = match frame_size(i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]), &addr) {
                Ok(size) => size,
                Err(e) => {
                    let _ = responses.send(Response { connection: id, frame: Err(e) });
                    return;
                }
            };
            if buf.len() < 4 + size {
                buf.reserve(4 + size - buf.len());
                break;
            }
            buf.advance(4);
            let frame = buf.split_to(size).freeze();
            if responses.send(Response { connection: id, frame: Ok(frame) }).is_err() {
                return;
            }
        }
        if buf.capacity() - buf.len() < READ_BUFFER_BYTES / 4 {
            buf.reserve(READ_BUFFER_BYTES);
        }
        let error = match read.read_buf(&mut buf).await {
            Ok(0) => KafkaError::Closed { addr: addr.clone() },
            Ok(_) => continue,
            Err(source) => KafkaError::Io { addr: addr.clone(), source },
        };
        let _ = responses.send(Response { connection: id, frame: Err(error) });
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
    use kafka_protocol::messages::TopicName;

    fn produce_request(batches: &[Bytes]) -> ProduceRequest {
        let partitions = batches
            .iter()
            .enumerate()
            .map(|(i, b)| PartitionProduceData::default().with_index(i as i32).with_records(Some(b.clone())))
            .collect();
        ProduceRequest::default().with_acks(1).with_timeout_ms(30_000).with_topic_data(vec![
            TopicProduceData::default()
                .with_name(TopicName(StrBytes::from_static_str("t")))
                .with_partition_data(partitions),
        ])
    }

    /// The frame as pieces equals the frame the codec writes into one buffer, and every batch is
    /// one of the pieces, by reference.
    #[test]
    fn batches_go_by_reference_and_the_frame_is_unchanged() {
        let batches: Vec<Bytes> = (0..3u8).map(|i| Bytes::from(vec![i; 1000 + usize::from(i)])).collect();
        let request = produce_request(&batches);
        for version in [3, 8, 9, 12] {
            let header = RequestHeader::default()
                .with_request_api_key(0)
                .with_request_api_version(version)
                .with_correlation_id(7)
                .with_client_id(Some(StrBytes::from_static_str(CLIENT_ID)));
            let header_version = ProduceRequest::header_version(version);

            let mut whole = BytesMut::new();
            let size = header.compute_size(header_version).unwrap() + request.compute_size(version).unwrap();
            whole.put_i32(size as i32);
            header.encode(&mut whole, header_version).unwrap();
            request.encode(&mut whole, version).unwrap();

            let mut head = BytesMut::new();
            let mut chunks = Vec::new();
            let mut writer = FrameWriter {
                head: &mut head,
                chunks: &mut chunks,
                records: &batches,
                next_record: 0,
                chunked_bytes: 0,
            };
            writer.put_i32(size as i32);
            header.encode(&mut writer, header_version).unwrap();
            request.encode(&mut writer, version).unwrap();
            assert_eq!(writer.next_record, 3);
            writer.finish();

            let joined: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
            assert_eq!(joined, &whole[..], "v{version}");
            for b in &batches {
                assert!(chunks.iter().any(|c| c.as_ptr() == b.as_ptr() && c.len() == b.len()), "v{version}");
            }
            // Flexible versions end each partition and the request with tagged fields.
            let pieces = if version >= 9 { 7 } else { 6 };
            assert_eq!(chunks.len(), pieces, "head, then a batch and a head per partition (v{version})");
        }
    }

    /// Equal bytes elsewhere are copied: only the batches themselves are referenced.
    #[test]
    fn equal_bytes_elsewhere_are_copied() {
        let batch = Bytes::from(vec![5u8; 100]);
        let copy = Bytes::from(vec![5u8; 100]);
        let mut head = BytesMut::new();
        let mut chunks = Vec::new();
        let records = [batch.clone()];
        let mut writer = FrameWriter {
            head: &mut head,
            chunks: &mut chunks,
            records: &records,
            next_record: 0,
            chunked_bytes: 0,
        };
        writer.put_slice(&copy);
        writer.put_slice(&batch);
        writer.put_slice(b"tail");
        assert_eq!(writer.offset(), 204);
        writer.finish();
        let lens: Vec<usize> = chunks.iter().map(Bytes::len).collect();
        assert_eq!(lens, [100, 100, 4]);
        assert_eq!(chunks[1].as_ptr(), batch.as_ptr());
    }

    #[test]
    fn versions_pick_the_highest_common_one() {
        let broker =
            [(ApiKey::Produce as i16, 0, 9), (ApiKey::Fetch as i16, 4, 17), (ApiKey::Metadata as i16, 0, 0)];
        let v = Versions::negotiate(&broker);
        assert_eq!(v.get(ApiKey::Produce, "b").unwrap(), 9);
        assert_eq!(v.get(ApiKey::Fetch, "b").unwrap(), 12);
        let e = v.get(ApiKey::Metadata, "b").unwrap_err().to_string();
        assert!(e.contains("0..=0") && e.contains("1..=12"), "{e}");
        assert!(matches!(v.get(ApiKey::ListOffsets, "b"), Err(KafkaError::Missing { .. })));
        assert_eq!(v.summary(), [("Produce".to_string(), 9), ("Fetch".to_string(), 12)]);
    }

    /// Pipelining against a scripted broker: three requests written back to back before any
    /// response is read, answered in order, each response matched to its request.
    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let broker = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut requests = Vec::new();
            for _ in 0..4 {
                let size = s.read_i32().await.unwrap() as usize;
                let mut frame = vec![0u8; size];
                s.read_exact(&mut frame).await.unwrap();
                let mut frame = Bytes::from(frame);
                let header = RequestHeader::decode(&mut frame, 1).unwrap();
                requests.push(header.clone());
                if header.request_api_key == ApiKey::ApiVersions as i16 {
                    let body = ApiVersionsResponse::default().with_api_keys(vec![
                        kafka_protocol::messages::api_versions_response::ApiVersion::default()
                            .with_api_key(ApiKey::ListOffsets as i16)
                            .with_min_version(1)
                            .with_max_version(2),
                    ]);
                    respond(&mut s, header.correlation_id, 0, &body, header.request_api_version).await;
                }
            }
            // All three ListOffsets (v2: the highest both speak) arrived before any answer: answer
            // them now, in order.
            for (i, header) in requests[1..].iter().enumerate() {
                let body = ListOffsetsResponse::default().with_throttle_time_ms(i as i32);
                respond(&mut s, header.correlation_id, 0, &body, 2).await;
            }
            requests
        });
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut conn = Connection::connect(&addr, 9, tx).await.unwrap();
        for _ in 0..3 {
            conn.send(&ListOffsetsRequest::default()).await.unwrap();
        }
        assert_eq!(conn.awaiting.len(), 3);
        for i in 0..3 {
            let response = rx.recv().await.unwrap();
            assert_eq!(response.connection, 9);
            let body = conn.decode::<ListOffsetsRequest>(response.frame.unwrap()).unwrap();
            assert_eq!(body.throttle_time_ms, i);
        }
        assert!(conn.awaiting.is_empty());
        let requests = broker.await.unwrap();
        let ids: Vec<i32> = requests.iter().map(|h| h.correlation_id).collect();
        assert_eq!(ids, [0, 1, 2, 3]);
        assert_eq!(requests[0].request_api_version, 3, "ApiVersions at the highest version first");
        assert!(requests[1..].iter().all(|h| h.request_api_version == 2), "then the highest common one");
        drop(conn);
        let closed = rx.recv().await;
        assert!(closed.is_none() || closed.is_some_and(|r| r.frame.is_err()));
    }

    async fn respond<M: Encodable>(
        s: &mut TcpStream,
        correlation_id: i32,
        header_version: i16,
        body: &M,
        version: i16,
    ) {
        let header = ResponseHeader::default().with_correlation_id(correlation_id);
        let mut buf = BytesMut::new();
        let size = header.compute_size(header_version).unwrap() + body.compute_size(version).unwrap();
        buf.put_i32(size as i32);
        header.encode(&mut buf, header_version).unwrap();
        body.encode(&mut buf, version).unwrap();
        s.write_all(&buf).await.unwrap();
    }
}
