//! Kafka framing, request headers and response encoding.
//!
//! Owns: cutting `i32 size | request` frames off the byte stream (bounded before anything is
//! buffered), decoding the request header at the version its API and version call for (and, for
//! the fuzzer, a whole request: [`decode_request`]), and encoding responses with their header and
//! size prefix. [`respond_zero_copy`] encodes a response
//! whose record fields are storage buffers without copying them: the crate writes every other
//! field, and each record chunk goes to the socket as its own `sendmsg` part.

use std::ops::Range;

use bytes::buf::UninitSlice;
use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, RequestHeader, RequestKind, ResponseHeader};
use kafka_protocol::protocol::buf::ByteBufMut;
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion};

use crate::protocol::frame::{check_frame_len, FrameError};
use crate::server::{Reply, ResponseFrame};

/// What every handler needs to know about the request it answers.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// `None` for an API key this crate version does not know.
    pub api_key: Option<ApiKey>,
    pub api_key_raw: i16,
    pub version: i16,
    pub correlation_id: i32,
    pub client_id: Option<String>,
}

/// Takes one complete request (without its size prefix) off the front of `buf`.
pub fn split_request(buf: &mut BytesMut, frame_bytes_max: usize) -> Result<Option<BytesMut>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let size = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if size < 0 {
        return Err(FrameError::TooShort { frame_bytes: 0 });
    }
    let size = size as u64;
    // The native check counts its 4-byte header-length field inside the frame; a Kafka request
    // needs at least its 8-byte fixed header part.
    if size < 8 {
        return Err(FrameError::TooShort { frame_bytes: size });
    }
    check_frame_len(size, frame_bytes_max)?;
    let total = 4 + size as usize;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(total);
    let _ = frame.split_to(4);
    Ok(Some(frame))
}

/// Decodes the request header; returns it and where the body starts in `frame`.
pub fn decode_header(frame: &[u8]) -> Result<(RequestContext, usize), String> {
    if frame.len() < 8 {
        return Err(format!("request of {} bytes is shorter than a request header", frame.len()));
    }
    let api_key_raw = i16::from_be_bytes([frame[0], frame[1]]);
    let version = i16::from_be_bytes([frame[2], frame[3]]);
    let correlation_id = i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
    let api_key = ApiKey::try_from(api_key_raw).ok();
    let Some(api) = api_key else {
        // Unknown API: nothing past the fixed fields can be trusted; versions::check rejects it.
        let ctx = RequestContext { api_key, api_key_raw, version, correlation_id, client_id: None };
        return Ok((ctx, 8));
    };
    if !(0..=i16::MAX / 2).contains(&version) {
        let ctx = RequestContext { api_key, api_key_raw, version, correlation_id, client_id: None };
        return Ok((ctx, 8));
    }
    let header_version = api.request_header_version(version);
    // Decoded in place: only the client id and any tagged fields are copied out, never the rest
    // of a large produce frame. Every read of the crate's header decoder is bounds-checked.
    let mut rest = frame;
    let header = RequestHeader::decode(&mut rest, header_version)
        .map_err(|e| format!("{api:?} v{version}: bad request header: {e}"))?;
    let consumed = frame.len() - rest.len();
    let ctx = RequestContext {
        api_key,
        api_key_raw,
        version,
        correlation_id,
        client_id: header.client_id.map(|c| c.to_string()),
    };
    Ok((ctx, consumed))
}

/// Decodes a whole request, header and body, exactly as the broker admits and decodes it before
/// dispatch: the header ([`decode_header`]), the API and version [`versions::check`] admits,
/// then the body with the crate's decoder for that API and version. The entry point for the
/// fuzzer and for tests; the broker's own path keeps the frame to slice produce batches from it.
///
/// [`versions::check`]: super::versions::check
// Reachable from outside the crate (the fuzz target) only once `kafka::codec` is `pub`.
pub fn decode_request(frame: &[u8]) -> Result<(RequestContext, RequestKind), String> {
    let (ctx, body_offset) = decode_header(frame)?;
    super::versions::check(ctx.api_key_raw, ctx.version)?;
    let api = ctx.api_key.ok_or_else(|| format!("API key {} is unknown", ctx.api_key_raw))?;
    let mut body = Bytes::copy_from_slice(&frame[body_offset..]);
    let request = RequestKind::decode(api, &mut body, ctx.version)
        .map_err(|e| format!("{api:?} v{}: malformed request: {e}", ctx.version))?;
    Ok((ctx, request))
}

fn response_header(ctx: &RequestContext) -> (ResponseHeader, i16) {
    let header = ResponseHeader::default().with_correlation_id(ctx.correlation_id);
    let version = match ctx.api_key {
        Some(api) => api.response_header_version(ctx.version),
        None => 0,
    };
    (header, version)
}

fn encode_error(ctx: &RequestContext, e: impl std::fmt::Display) -> Reply {
    // Only reachable if a handler builds a response the crate cannot encode at this version (a
    // bug): the client cannot be answered, so the connection closes rather than desynchronize.
    tracing::error!(api = ?ctx.api_key, version = ctx.version, "kafka: cannot encode response: {e}");
    Reply::Close(ResponseFrame { head: Vec::new(), payload: Vec::new() })
}

/// Encodes `body` as the response to `ctx`.
pub fn respond<R: Encodable + HeaderVersion>(ctx: &RequestContext, body: &R) -> Reply {
    let (header, header_version) = response_header(ctx);
    let mut buf = BytesMut::with_capacity(256);
    buf.put_i32(0);
    if let Err(e) = header.encode(&mut buf, header_version) {
        return encode_error(ctx, e);
    }
    if let Err(e) = body.encode(&mut buf, ctx.version) {
        return encode_error(ctx, e);
    }
    let size = (buf.len() - 4) as i32;
    buf[..4].copy_from_slice(&size.to_be_bytes());
    Reply::Frame(ResponseFrame { head: Vec::from(buf), payload: Vec::new() })
}

/// Record sets to send by reference in one response. [`RecordSets::add`] takes a partition's
/// chunks (storage buffers) and returns the placeholder to put in the response's `records`
/// field; [`respond_zero_copy`] then sends the chunks where the crate writes the placeholder.
#[derive(Default)]
pub struct RecordSets {
    /// Per placeholder, in the order the encoder will meet them: its chunks.
    sets: Vec<Vec<Bytes>>,
}

impl RecordSets {
    pub fn add(&mut self, chunks: Vec<Bytes>) -> Bytes {
        let len: usize = chunks.iter().map(Bytes::len).sum();
        self.sets.push(chunks);
        placeholder(len)
    }
}

/// A `len`-byte view of a reserved, never-touched region: a placeholder is recognized by its
/// address, so no record bytes are materialized for it. Matching by order and length (not by
/// address alone) keeps two placeholders of one response apart.
fn placeholder(len: usize) -> Bytes {
    Bytes::from_static(&reserved()[..len.min(RESERVED_BYTES)])
}

/// Larger than any response can be (`frame_bytes_max` bounds fetch sizes far below it).
const RESERVED_BYTES: usize = 1 << 32;

fn reserved() -> &'static [u8] {
    static RESERVED: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let addr = *RESERVED.get_or_init(|| {
        // SAFETY: an anonymous, private, read-only mapping with no backing reservation: it costs
        // address space only. It is never unmapped, so the 'static slice below stays valid.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RESERVED_BYTES,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert!(ptr != libc::MAP_FAILED, "cannot reserve address space for record placeholders");
        ptr as usize
    });
    // SAFETY: `addr` is the start of a live read-only mapping of RESERVED_BYTES (zero pages).
    unsafe { std::slice::from_raw_parts(addr as *const u8, RESERVED_BYTES) }
}

/// Encodes `body` as the response to `ctx`, sending the chunks of every record set in `records`
/// (whose placeholders `body` holds) as their own parts instead of copying them into the head.
pub fn respond_zero_copy<R: Encodable + HeaderVersion>(
    ctx: &RequestContext,
    body: &R,
    records: RecordSets,
) -> Reply {
    let (header, header_version) = response_header(ctx);
    let expected = records.sets.len();
    let mut buf = SegmentedBuf::new(records.sets);
    buf.put_i32(0);
    if let Err(e) = header.encode(&mut buf, header_version) {
        return encode_error(ctx, e);
    }
    if let Err(e) = body.encode(&mut buf, ctx.version) {
        return encode_error(ctx, e);
    }
    if buf.next_set != expected {
        // A placeholder was written as bytes (zeros) instead of being replaced: never send that.
        let met = buf.next_set;
        return encode_error(ctx, format!("{met} of {expected} record sets were referenced"));
    }
    Reply::Frame(buf.into_frame())
}

/// A `ByteBufMut` that copies ordinary fields into inline chunks but replaces each record-set
/// placeholder, when the crate writes it (`put_slice(&records[..])`), with the set's chunks.
struct SegmentedBuf {
    sets: Vec<Vec<Bytes>>,
    next_set: usize,
    /// Finished parts; inline chunks and record chunks in wire order.
    parts: Vec<Bytes>,
    /// The inline chunk being written.
    current: BytesMut,
    /// Logical length of everything in `parts`.
    parts_len: usize,
}

impl SegmentedBuf {
    fn new(sets: Vec<Vec<Bytes>>) -> SegmentedBuf {
        SegmentedBuf {
            sets,
            next_set: 0,
            parts: Vec::new(),
            current: BytesMut::with_capacity(256),
            parts_len: 0,
        }
    }

    /// The next record set, if `src` is its placeholder.
    fn take_set(&mut self, src: &[u8]) -> Option<Vec<Bytes>> {
        let set = self.sets.get_mut(self.next_set)?;
        let len: usize = set.iter().map(Bytes::len).sum();
        if src.as_ptr() != reserved().as_ptr() || src.len() != len {
            return None;
        }
        self.next_set += 1;
        Some(std::mem::take(set))
    }

    /// The frame, with the size prefix (the first 4 bytes written, always in the head) filled in.
    fn into_frame(mut self) -> ResponseFrame {
        let size = (self.offset() - 4) as i32;
        let mut parts = std::mem::take(&mut self.parts);
        if !self.current.is_empty() {
            parts.push(self.current.split().freeze());
        }
        let mut parts = parts.into_iter();
        let mut head = parts.next().map(Vec::from).unwrap_or_default();
        debug_assert!(head.len() >= 4, "the size prefix is written first");
        if let Some(prefix) = head.get_mut(..4) {
            prefix.copy_from_slice(&size.to_be_bytes());
        }
        ResponseFrame { head, payload: parts.filter(|p| !p.is_empty()).collect() }
    }
}

// SAFETY: every method forwards to the inner `BytesMut`, whose implementation upholds the
// `BufMut` contract; `put_slice` only adds whole referenced chunks in between.
unsafe impl BufMut for SegmentedBuf {
    fn remaining_mut(&self) -> usize {
        self.current.remaining_mut()
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        // SAFETY: the caller initialized `cnt` bytes of the chunk `chunk_mut` returned, which is
        // the inner buffer's.
        unsafe { self.current.advance_mut(cnt) }
    }

    fn chunk_mut(&mut self) -> &mut UninitSlice {
        self.current.chunk_mut()
    }

    fn put_slice(&mut self, src: &[u8]) {
        match self.take_set(src) {
            Some(chunks) => {
                let inline = self.current.split().freeze();
                self.parts_len += inline.len();
                self.parts.push(inline);
                for chunk in chunks {
                    self.parts_len += chunk.len();
                    self.parts.push(chunk);
                }
            }
            None => self.current.extend_from_slice(src),
        }
    }
}

impl ByteBufMut for SegmentedBuf {
    fn offset(&self) -> usize {
        self.parts_len + self.current.len()
    }

    fn seek(&mut self, offset: usize) {
        // The crate seeks only forward over gaps it fills later, or back within the field it
        // is writing (snappy), never into a referenced buffer.
        assert!(offset >= self.parts_len, "seek into an already sent part");
        self.current.resize(offset - self.parts_len, 0);
    }

    fn range(&mut self, r: Range<usize>) -> &mut [u8] {
        // The crate fills gaps only within the field it is writing, never before a record set;
        // the size prefix is filled by `into_frame`.
        assert!(r.start >= self.parts_len, "range reaches into an already finished part");
        let start = r.start - self.parts_len;
        let end = r.end - self.parts_len;
        &mut self.current[start..end]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::protocol::StrBytes;

    #[test]
    fn record_sets_are_referenced_not_copied() {
        let (a, b) = (Bytes::from(vec![7u8; 1000]), Bytes::from(vec![8u8; 24]));
        let mut sets = RecordSets::default();
        let first = sets.add(vec![a.clone(), b.clone()]);
        let second = sets.add(vec![b.clone()]);
        let mut buf = SegmentedBuf::new(sets.sets);
        buf.put_i32(0);
        buf.put_slice(b"abc");
        buf.put_slice(&first[..]);
        buf.put_slice(b"z");
        buf.put_slice(&second[..]);
        assert_eq!(buf.next_set, 2);
        let frame = buf.into_frame();
        assert_eq!(frame.head, [&1052i32.to_be_bytes()[..], b"abc"].concat());
        let ptrs: Vec<_> = frame.payload.iter().map(|p| p.as_ptr()).collect();
        assert_eq!(ptrs[0], a.as_ptr(), "record bytes were copied");
        assert_eq!(ptrs[1], b.as_ptr());
        assert_eq!(&frame.payload[2][..], b"z");
        assert_eq!(ptrs[3], b.as_ptr());
    }

    fn frame_of<R: Encodable>(api: ApiKey, version: i16, client_id: Option<&str>, body: &R) -> Vec<u8> {
        let header = RequestHeader::default()
            .with_request_api_key(api as i16)
            .with_request_api_version(version)
            .with_correlation_id(77)
            .with_client_id(client_id.map(|c| StrBytes::from_string(c.to_string())));
        let mut buf = BytesMut::new();
        header.encode(&mut buf, api.request_header_version(version)).unwrap();
        body.encode(&mut buf, version).unwrap();
        buf.to_vec()
    }

    #[test]
    fn requests_decode_at_every_header_version() {
        use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
        use kafka_protocol::messages::{MetadataRequest, TopicName};
        let topics =
            vec![MetadataRequestTopic::default()
                .with_name(Some(TopicName(StrBytes::from_static_str("orders"))))];
        // v0: header v1; v9: header v2 (flexible, tagged fields).
        for version in [0, 9] {
            let frame = frame_of(
                ApiKey::Metadata,
                version,
                Some("client-a"),
                &MetadataRequest::default().with_topics(Some(topics.clone())),
            );
            let (ctx, request) = decode_request(&frame).unwrap();
            assert_eq!((ctx.api_key, ctx.version, ctx.correlation_id), (Some(ApiKey::Metadata), version, 77));
            assert_eq!(ctx.client_id.as_deref(), Some("client-a"));
            let RequestKind::Metadata(request) = request else { panic!("decoded as {request:?}") };
            assert_eq!(request.topics, Some(topics.clone()));
        }
        let frame = frame_of(ApiKey::Metadata, 1, None, &MetadataRequest::default());
        assert_eq!(decode_request(&frame).unwrap().0.client_id, None);
    }

    #[test]
    fn bad_requests_are_errors_that_say_what_was_wrong() {
        use kafka_protocol::messages::MetadataRequest;
        let mut frame = frame_of(ApiKey::Metadata, 1, Some("c"), &MetadataRequest::default());
        // A client id longer than the frame.
        frame[8..10].copy_from_slice(&400i16.to_be_bytes());
        assert!(decode_request(&frame).unwrap_err().contains("bad request header"));
        // A negative topic count.
        let mut frame = frame_of(ApiKey::Metadata, 1, Some("c"), &MetadataRequest::default());
        let len = frame.len();
        frame[len - 4..].copy_from_slice(&(-3i32).to_be_bytes());
        assert!(decode_request(&frame).unwrap_err().contains("malformed"));
        // More topics claimed than bytes left (small enough to allocate in this test process).
        frame[len - 4..].copy_from_slice(&100_000i32.to_be_bytes());
        assert!(decode_request(&frame).unwrap_err().contains("Metadata v1"));
        // An unsupported version, an API this broker does not serve, an unknown API key.
        let frame = frame_of(ApiKey::Metadata, 10, Some("c"), &MetadataRequest::default());
        assert!(decode_request(&frame).unwrap_err().contains("Metadata version 10"));
        let mut frame = frame_of(ApiKey::Metadata, 1, Some("c"), &MetadataRequest::default());
        frame[..2].copy_from_slice(&(ApiKey::SaslHandshake as i16).to_be_bytes());
        assert!(decode_request(&frame).unwrap_err().contains("API key 17"));
        frame[..2].copy_from_slice(&999i16.to_be_bytes());
        assert!(decode_request(&frame).unwrap_err().contains("API key 999"));
        assert!(decode_request(&frame[..7]).unwrap_err().contains("shorter than a request header"));
    }

    #[test]
    fn oversized_and_short_frames_are_refused() {
        let mut buf = BytesMut::from(&(1_000_000i32.to_be_bytes())[..]);
        assert!(matches!(split_request(&mut buf, 1024), Err(FrameError::TooLarge { .. })));
        let mut buf = BytesMut::from(&((-5i32).to_be_bytes())[..]);
        assert!(split_request(&mut buf, 1024).is_err());
        let mut buf = BytesMut::from(&[0u8, 0, 0, 3, 1, 2, 3][..]);
        assert!(split_request(&mut buf, 1024).is_err());
    }
}
