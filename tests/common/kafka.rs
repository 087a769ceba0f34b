//! A deliberately small, blocking Apache Kafka wire client for tests that need to control the
//! exact request bytes: every request is encoded with the `kafka-protocol` crate at a version the
//! test chooses, every response decoded at that same version, and the correlation id checked.
//! Raw frames (bad input) go through [`KafkaConn::send_raw`].
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, RequestHeader, ResponseHeader,
};
use kafka_protocol::protocol::{Decodable, Encodable, Request, StrBytes};

pub const CLIENT_ID: &str = "kafka-wire-test";

pub struct KafkaConn {
    pub stream: TcpStream,
    pub next_cid: i32,
}

/// One request frame, size prefix included.
pub fn request_frame<R: Request>(version: i16, correlation_id: i32, body: &R) -> Vec<u8> {
    let api = ApiKey::try_from(R::KEY).expect("a request type the crate knows");
    let header = RequestHeader::default()
        .with_request_api_key(R::KEY)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str(CLIENT_ID)));
    let mut buf = BytesMut::new();
    buf.put_i32(0);
    header.encode(&mut buf, api.request_header_version(version)).unwrap();
    body.encode(&mut buf, version).unwrap_or_else(|e| panic!("encoding {api:?} v{version}: {e}"));
    let size = (buf.len() - 4) as i32;
    buf[..4].copy_from_slice(&size.to_be_bytes());
    buf.to_vec()
}

/// A frame with a hand-written header and body (bad input).
pub fn raw_frame(api_key: i16, version: i16, correlation_id: i32, body: &[u8]) -> Vec<u8> {
    let mut buf = Vec::new();
    buf.extend_from_slice(&0i32.to_be_bytes());
    buf.extend_from_slice(&api_key.to_be_bytes());
    buf.extend_from_slice(&version.to_be_bytes());
    buf.extend_from_slice(&correlation_id.to_be_bytes());
    // Client id: a non-compact nullable string in every header version.
    buf.extend_from_slice(&(CLIENT_ID.len() as i16).to_be_bytes());
    buf.extend_from_slice(CLIENT_ID.as_bytes());
    let flexible = ApiKey::try_from(api_key).is_ok_and(|api| api.request_header_version(version) >= 2);
    if flexible {
        buf.push(0); // no tagged fields
    }
    buf.extend_from_slice(body);
    let size = (buf.len() - 4) as i32;
    buf[..4].copy_from_slice(&size.to_be_bytes());
    buf
}

impl KafkaConn {
    pub fn connect(addr: &str) -> KafkaConn {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_nodelay(true).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        KafkaConn { stream, next_cid: 1000 }
    }

    pub fn take_cid(&mut self) -> i32 {
        self.next_cid += 1;
        self.next_cid
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Sends `body` at `version`; returns its correlation id.
    pub fn send<R: Request>(&mut self, version: i16, body: &R) -> i32 {
        let cid = self.take_cid();
        let frame = request_frame(version, cid, body);
        self.send_raw(&frame);
        cid
    }

    /// One response frame without its size prefix; `None` if the broker closed the connection.
    pub fn recv_frame(&mut self) -> Option<Bytes> {
        let mut prefix = [0u8; 4];
        self.stream.read_exact(&mut prefix).ok()?;
        let size = i32::from_be_bytes(prefix);
        assert!(size >= 4, "response size prefix {size}");
        let mut frame = vec![0u8; size as usize];
        self.stream.read_exact(&mut frame).ok()?;
        Some(Bytes::from(frame))
    }

    /// Reads the response to request `cid` of type `R` at `version`; `None` if the connection
    /// closed instead.
    pub fn recv<R: Request>(&mut self, version: i16, cid: i32) -> Option<R::Response> {
        let mut frame = self.recv_frame()?;
        Some(decode_response::<R>(&mut frame, version, cid))
    }

    /// Sends a request and waits for its response; panics if the broker closes the connection.
    #[track_caller]
    pub fn call<R: Request>(&mut self, version: i16, body: &R) -> R::Response {
        let cid = self.send(version, body);
        let api = ApiKey::try_from(R::KEY).unwrap();
        self.recv::<R>(version, cid)
            .unwrap_or_else(|| panic!("broker closed the connection instead of answering {api:?} v{version}"))
    }

    /// Whether the broker closes the connection (EOF) without sending anything more.
    /// A read that times out (the connection is still open) counts as not closed.
    pub fn closed_by_broker(&mut self) -> bool {
        let mut byte = [0u8; 1];
        match self.stream.read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }

    /// `api key → (min, max)` from ApiVersions at `version`.
    pub fn api_versions(&mut self, version: i16) -> (ApiVersionsResponse, BTreeMap<i16, (i16, i16)>) {
        let mut request = ApiVersionsRequest::default();
        if version >= 3 {
            request = request
                .with_client_software_name(StrBytes::from_static_str("ringlog-wire-test"))
                .with_client_software_version(StrBytes::from_static_str("1.0"));
        }
        let response = self.call(version, &request);
        let table = response.api_keys.iter().map(|v| (v.api_key, (v.min_version, v.max_version))).collect();
        (response, table)
    }
}

/// Decodes a response frame (header + body) to request type `R` at `version`, checking that the
/// correlation id is echoed and that the body was consumed exactly.
#[track_caller]
pub fn decode_response<R: Request>(frame: &mut Bytes, version: i16, cid: i32) -> R::Response {
    let api = ApiKey::try_from(R::KEY).unwrap();
    let header = ResponseHeader::decode(frame, api.response_header_version(version))
        .unwrap_or_else(|e| panic!("{api:?} v{version}: bad response header: {e}"));
    assert_eq!(header.correlation_id, cid, "{api:?} v{version}: correlation id not echoed");
    let body = <R::Response as Decodable>::decode(frame, version)
        .unwrap_or_else(|e| panic!("{api:?} v{version}: bad response body: {e}"));
    assert!(frame.is_empty(), "{api:?} v{version}: {} bytes left after the response body", frame.len());
    body
}

/// The versions `table` advertises for `api`, as a range; panics if it is not advertised.
#[track_caller]
pub fn versions(table: &BTreeMap<i16, (i16, i16)>, api: ApiKey) -> std::ops::RangeInclusive<i16> {
    let (min, max) = *table.get(&(api as i16)).unwrap_or_else(|| panic!("{api:?} is not advertised"));
    min..=max
}

pub fn s(text: &str) -> StrBytes {
    StrBytes::from_string(text.to_string())
}
