//! One pipelined connection to one broker endpoint.
//!
//! Owns: the TCP stream (TCP_NODELAY), the handshake, correlation ids, and matching responses to
//! requests. A writer task sends frames in the order they were queued, each as one vectored
//! write (frame prefix + FlatBuffers header + record batches, never copied together); a reader
//! task splits responses off the stream and hands each to the request at the front of the
//! in-order queue. Depends on `protocol` only; never on the broker's runtime.
//!
//! Why two tasks: a broker that answers in order may block writing a response while we are still
//! writing a large request; reading and writing independently keeps both sides moving.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use flatbuffers::{FlatBufferBuilder, UnionWIPOffset, WIPOffset};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify};

use super::error::{ClientError, Result};
use crate::protocol::frame::{frame_prefix, split_frame, FRAME_PREFIX_LEN};
use crate::protocol::{verifier_options, wire, PROTOCOL_VERSION};

/// Largest response frame accepted: a fetch's `max_bytes` (50 MiB by default) plus headers.
pub const RESPONSE_FRAME_BYTES_MAX: usize = 128 << 20;
/// Frames gathered into one vectored write; stays under Linux's IOV_MAX of 1024.
const IOVECS_PER_WRITE_MAX: usize = 1000;
const READ_BUFFER_BYTES: usize = 64 << 10;

/// A response: its FlatBuffers header and its payload region, both zero-copy views of the
/// receive buffer.
#[derive(Debug, Clone)]
pub struct ResponseFrame {
    pub header: Bytes,
    pub payload: Bytes,
}

impl ResponseFrame {
    /// The verified `Response` table. Verification is bounded by `verifier_options()` and costs
    /// per table, not per byte.
    pub fn response(&self) -> std::result::Result<wire::Response<'_>, flatbuffers::InvalidFlatbuffer> {
        flatbuffers::root_with_opts::<wire::Response>(&verifier_options(), &self.header)
    }
}

enum Reply {
    /// Resolved with the response frame.
    Response(oneshot::Sender<Result<ResponseFrame>>),
    /// No response will come (produce with acks = 0): resolved once the frame is written.
    Written(oneshot::Sender<Result<()>>),
}

struct Outgoing {
    head: Bytes,
    payload: Vec<Bytes>,
    correlation_id: u32,
    reply: Reply,
}

struct Pending {
    correlation_id: u32,
    reply: oneshot::Sender<Result<ResponseFrame>>,
}

struct Link {
    addr: String,
    requests: mpsc::UnboundedSender<Outgoing>,
    next_correlation_id: AtomicU32,
    closed: Arc<AtomicBool>,
    request_timeout: Duration,
}

/// A handle to a connection; clones share it. The connection closes when the last handle (and
/// the last outstanding reply) is dropped.
#[derive(Clone)]
pub struct Connection {
    link: Arc<Link>,
    shard: u32,
    shard_count: u32,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("addr", &self.link.addr).field("shard", &self.shard).finish()
    }
}

/// A request on its way; await [`PendingReply::response`] or [`PendingReply::written`].
pub struct PendingReply {
    // Keeps the connection open until the reply arrives.
    conn: Connection,
    inner: PendingInner,
}

enum PendingInner {
    Response(oneshot::Receiver<Result<ResponseFrame>>),
    Written(oneshot::Receiver<Result<()>>),
}

impl Connection {
    /// Connects, sets TCP_NODELAY and performs the handshake.
    pub async fn connect(addr: &str, client_id: &str, request_timeout: Duration) -> Result<Connection> {
        let stream = tokio::time::timeout(request_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Timeout { addr: addr.to_owned(), timeout: request_timeout })?
            .map_err(|e| ClientError::io(addr, e))?;
        stream.set_nodelay(true).map_err(|e| ClientError::io(addr, e))?;
        let (read_half, write_half) = stream.into_split();
        let (requests_tx, requests_rx) = mpsc::unbounded_channel();
        let (pending_tx, pending_rx) = mpsc::unbounded_channel();
        let closed = Arc::new(AtomicBool::new(false));
        let shutdown = Arc::new(Notify::new());
        tokio::spawn(write_loop(
            addr.to_owned(),
            write_half,
            requests_rx,
            pending_tx,
            closed.clone(),
            shutdown.clone(),
        ));
        tokio::spawn(read_loop(addr.to_owned(), read_half, pending_rx, closed.clone(), shutdown));
        let link = Arc::new(Link {
            addr: addr.to_owned(),
            requests: requests_tx,
            next_correlation_id: AtomicU32::new(1),
            closed,
            request_timeout,
        });
        let mut conn = Connection { link, shard: 0, shard_count: 0 };

        let frame = conn
            .request(
                |fbb| {
                    let client_id = fbb.create_string(client_id);
                    let body = wire::HandshakeRequest::create(
                        fbb,
                        &wire::HandshakeRequestArgs {
                            client_id: Some(client_id),
                            min_version: PROTOCOL_VERSION,
                            max_version: PROTOCOL_VERSION,
                        },
                    );
                    (wire::RequestBody::HandshakeRequest, body.as_union_value())
                },
                Vec::new(),
            )
            .await?;
        let response = conn.check_response(&frame, "handshake")?;
        let handshake = response
            .body_as_handshake_response()
            .ok_or_else(|| ClientError::protocol(addr, "handshake answered with another response type"))?;
        if handshake.version() != PROTOCOL_VERSION {
            return Err(ClientError::protocol(
                addr,
                format!(
                    "broker chose protocol version {}, this client speaks {PROTOCOL_VERSION}",
                    handshake.version()
                ),
            ));
        }
        conn.shard = handshake.shard();
        conn.shard_count = handshake.shard_count();
        tracing::debug!(addr, shard = conn.shard, shard_count = conn.shard_count, "connected");
        Ok(conn)
    }

    pub fn addr(&self) -> &str {
        &self.link.addr
    }

    /// The shard this connection landed on, from the handshake.
    pub fn shard(&self) -> u32 {
        self.shard
    }

    pub fn shard_count(&self) -> u32 {
        self.shard_count
    }

    /// True once the stream failed or closed; a pool should connect again.
    pub fn is_closed(&self) -> bool {
        self.link.closed.load(Ordering::Acquire)
    }

    /// Sends a request and waits for its response (within the request timeout).
    pub async fn request<F>(&self, body: F, payload: Vec<Bytes>) -> Result<ResponseFrame>
    where
        F: FnOnce(&mut FlatBufferBuilder<'static>) -> (wire::RequestBody, WIPOffset<UnionWIPOffset>),
    {
        self.start(body, payload, true)?.response().await
    }

    /// Queues a request without waiting. Requests queued on one connection are written, and
    /// answered, in the order of these calls. With `expect_response` false (produce with
    /// acks = 0) the reply resolves once the frame is written.
    pub fn start<F>(&self, body: F, payload: Vec<Bytes>, expect_response: bool) -> Result<PendingReply>
    where
        F: FnOnce(&mut FlatBufferBuilder<'static>) -> (wire::RequestBody, WIPOffset<UnionWIPOffset>),
    {
        if self.is_closed() {
            return Err(ClientError::NotSent { addr: self.link.addr.clone() });
        }
        let correlation_id = self.link.next_correlation_id.fetch_add(1, Ordering::Relaxed);
        let payload_len: usize = payload.iter().map(Bytes::len).sum();
        let head = encode_request(correlation_id, payload_len, body);
        let (reply, inner) = if expect_response {
            let (tx, rx) = oneshot::channel();
            (Reply::Response(tx), PendingInner::Response(rx))
        } else {
            let (tx, rx) = oneshot::channel();
            (Reply::Written(tx), PendingInner::Written(rx))
        };
        self.link
            .requests
            .send(Outgoing { head, payload, correlation_id, reply })
            .map_err(|_| ClientError::NotSent { addr: self.link.addr.clone() })?;
        Ok(PendingReply { conn: self.clone(), inner })
    }

    /// The response's verified header, or the request-level error it carries.
    pub fn check_response<'a>(&self, frame: &'a ResponseFrame, context: &str) -> Result<wire::Response<'a>> {
        let response = frame.response().map_err(|e| {
            ClientError::protocol(&self.link.addr, format!("undecodable {context} response: {e}"))
        })?;
        if response.error() != wire::ErrorCode::None {
            return Err(ClientError::broker(context, response.error(), response.message()));
        }
        Ok(response)
    }
}

impl PendingReply {
    pub fn addr(&self) -> &str {
        &self.conn.link.addr
    }

    /// Waits for the response. Fails with a protocol error if the request expected none.
    pub async fn response(self) -> Result<ResponseFrame> {
        let addr = &self.conn.link.addr;
        let timeout = self.conn.link.request_timeout;
        match self.inner {
            PendingInner::Response(rx) => match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(ClientError::io(addr, std::io::ErrorKind::ConnectionAborted.into())),
                Err(_) => Err(ClientError::Timeout { addr: addr.clone(), timeout }),
            },
            PendingInner::Written(_) => {
                Err(ClientError::protocol(addr, "request was sent without a response"))
            }
        }
    }

    /// Waits until the frame is written (or, for a request with a response, answered).
    pub async fn written(self) -> Result<()> {
        let addr = self.conn.link.addr.clone();
        let timeout = self.conn.link.request_timeout;
        match self.inner {
            PendingInner::Written(rx) => match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(ClientError::io(&addr, std::io::ErrorKind::ConnectionAborted.into())),
                Err(_) => Err(ClientError::Timeout { addr, timeout }),
            },
            PendingInner::Response(_) => self.response().await.map(drop),
        }
    }
}

/// Builds `prefix | Request header` for a request whose payload is `payload_len` bytes.
pub(crate) fn encode_request<F>(correlation_id: u32, payload_len: usize, body: F) -> Bytes
where
    F: FnOnce(&mut FlatBufferBuilder<'static>) -> (wire::RequestBody, WIPOffset<UnionWIPOffset>),
{
    let mut fbb = FlatBufferBuilder::with_capacity(256);
    let (body_type, body) = body(&mut fbb);
    let request = wire::Request::create(
        &mut fbb,
        &wire::RequestArgs { correlation_id, version: PROTOCOL_VERSION, body_type, body: Some(body) },
    );
    fbb.finish(request, None);
    let header = fbb.finished_data();
    let mut head = BytesMut::with_capacity(FRAME_PREFIX_LEN + header.len());
    head.extend_from_slice(&frame_prefix(header.len(), payload_len));
    head.extend_from_slice(header);
    head.freeze()
}

async fn write_loop(
    addr: String,
    mut stream: OwnedWriteHalf,
    mut requests: mpsc::UnboundedReceiver<Outgoing>,
    pending: mpsc::UnboundedSender<Pending>,
    closed: Arc<AtomicBool>,
    shutdown: Arc<Notify>,
) {
    let mut batch: Vec<Outgoing> = Vec::new();
    let mut written: Vec<oneshot::Sender<Result<()>>> = Vec::new();
    while let Some(first) = requests.recv().await {
        // Gather what is already queued so pipelined requests share one system call.
        let mut iovecs = 1 + first.payload.len();
        batch.push(first);
        while iovecs < IOVECS_PER_WRITE_MAX {
            match requests.try_recv() {
                Ok(next) => {
                    iovecs += 1 + next.payload.len();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        // Register before writing, so a response can never arrive ahead of its request.
        let mut frames = Vec::with_capacity(batch.len());
        for outgoing in batch.drain(..) {
            match outgoing.reply {
                Reply::Response(reply) => {
                    // The reader only goes away after `closed` is set; the error below covers it.
                    let _ = pending.send(Pending { correlation_id: outgoing.correlation_id, reply });
                }
                Reply::Written(reply) => written.push(reply),
            }
            frames.push((outgoing.head, outgoing.payload));
        }
        let result = write_frames(&mut stream, &frames).await;
        match result {
            Ok(()) => {
                for reply in written.drain(..) {
                    let _ = reply.send(Ok(()));
                }
            }
            Err(e) => {
                tracing::debug!(addr, error = %e, "write failed; closing connection");
                closed.store(true, Ordering::Release);
                let error = ClientError::io(&addr, e);
                for reply in written.drain(..) {
                    let _ = reply.send(Err(error.clone()));
                }
                shutdown.notify_one();
                // Whatever was queued after the failed write never left this process.
                requests.close();
                while let Ok(outgoing) = requests.try_recv() {
                    let not_sent = ClientError::NotSent { addr: addr.clone() };
                    match outgoing.reply {
                        Reply::Response(reply) => drop(reply.send(Err(not_sent))),
                        Reply::Written(reply) => drop(reply.send(Err(not_sent))),
                    }
                }
                return;
            }
        }
    }
    // Every handle is gone: nobody waits for a response any more.
    let _ = stream.shutdown().await;
    shutdown.notify_one();
}

async fn write_frames(stream: &mut OwnedWriteHalf, frames: &[(Bytes, Vec<Bytes>)]) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(frames.iter().map(|f| 1 + f.1.len()).sum());
    for (head, payload) in frames {
        slices.push(IoSlice::new(head));
        slices.extend(payload.iter().filter(|b| !b.is_empty()).map(|b| IoSlice::new(b)));
    }
    let mut remaining = &mut slices[..];
    while !remaining.is_empty() {
        let n = stream.write_vectored(remaining).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut remaining, n);
    }
    Ok(())
}

async fn read_loop(
    addr: String,
    mut stream: OwnedReadHalf,
    mut pending: mpsc::UnboundedReceiver<Pending>,
    closed: Arc<AtomicBool>,
    shutdown: Arc<Notify>,
) {
    let mut buf = BytesMut::with_capacity(READ_BUFFER_BYTES);
    let mut waiting: VecDeque<Pending> = VecDeque::new();
    let error = 'read: loop {
        loop {
            match split_frame(&mut buf, RESPONSE_FRAME_BYTES_MAX) {
                Ok(Some(frame)) => {
                    let frame =
                        ResponseFrame { header: frame.header.freeze(), payload: frame.payload.freeze() };
                    if let Err(e) = deliver(&addr, frame, &mut pending, &mut waiting) {
                        break 'read e;
                    }
                }
                Ok(None) => break,
                Err(e) => break 'read ClientError::protocol(&addr, e.to_string()),
            }
        }
        if buf.capacity() - buf.len() < READ_BUFFER_BYTES / 4 {
            buf.reserve(READ_BUFFER_BYTES);
        }
        tokio::select! {
            read = stream.read_buf(&mut buf) => match read {
                Ok(0) => {
                    break ClientError::io(&addr, std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof, "connection closed by the broker"));
                }
                Ok(_) => {}
                Err(e) => break ClientError::io(&addr, e),
            },
            () = shutdown.notified() => {
                break ClientError::io(&addr, std::io::ErrorKind::ConnectionAborted.into());
            }
        }
    };
    closed.store(true, Ordering::Release);
    pending.close();
    while let Ok(p) = pending.try_recv() {
        waiting.push_back(p);
    }
    if !waiting.is_empty() {
        tracing::debug!(addr, error = %error, outstanding = waiting.len(), "connection lost with requests in flight");
    }
    for p in waiting {
        let _ = p.reply.send(Err(error.clone()));
    }
}

/// Hands a response to the oldest outstanding request, checking it echoes that request's id.
fn deliver(
    addr: &str,
    frame: ResponseFrame,
    pending: &mut mpsc::UnboundedReceiver<Pending>,
    waiting: &mut VecDeque<Pending>,
) -> Result<()> {
    let correlation_id = frame
        .response()
        .map_err(|e| ClientError::protocol(addr, format!("undecodable response header: {e}")))?
        .correlation_id();
    while let Ok(p) = pending.try_recv() {
        waiting.push_back(p);
    }
    let Some(expected) = waiting.pop_front() else {
        return Err(ClientError::protocol(addr, format!("response {correlation_id} without a request")));
    };
    if expected.correlation_id != correlation_id {
        let e = ClientError::protocol(
            addr,
            format!("response {correlation_id} arrived while {} was expected", expected.correlation_id),
        );
        let _ = expected.reply.send(Err(e.clone()));
        return Err(e);
    }
    // The requester may have given up (timeout); the response is then dropped.
    let _ = expected.reply.send(Ok(frame));
    Ok(())
}
