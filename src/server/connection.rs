//! One client connection, for either wire protocol: read frames, hand them to the protocol's
//! dispatch in order, write replies in order.
//!
//! Owns: the socket, the receive buffer, the per-connection bytes-in-flight limit (both counted in
//! the shard's memory gauges: `connection_buffers`, `requests_in_flight`), and the
//! response writer. The reader and writer are separate tasks on two descriptors of the same
//! socket (a `dup`), so neither waits on the other and nothing needs a lock. Replies leave in
//! request order; those finished together are written with one `sendmsg` of their headers and
//! record bytes when the socket takes them whole, so record bytes are never copied into a
//! response buffer. Reads go straight
//! into the receive buffer's spare capacity with a non-blocking `recv` while bytes are waiting,
//! and park in glommio (readiness) only when the socket is empty.

use std::os::fd::{AsRawFd, FromRawFd};
use std::rc::Rc;

use bytes::BytesMut;
use futures::future::FutureExt;
use futures::AsyncReadExt;
use futures::AsyncWriteExt;
use glommio::channels::local_channel;
use glommio::net::TcpStream;
use glommio::sync::{Semaphore, StaticPermit};

use super::{Boxed, Protocol, Reply, ResponseFrame, StopSignal};
use crate::metrics::{self, Memory};
use crate::shard::Shard;

/// Requests read but not yet answered, per connection (pipelining depth).
const PIPELINE_DEPTH: usize = 256;
const READ_CHUNK_BYTES: usize = 64 << 10;
/// Most finished replies one `sendmsg` carries (each is a head and its payload chunks; the
/// kernel takes at most 1,024 parts per call, the rest follow with async writes).
const REPLIES_PER_SEND: usize = 64;
/// What a parked read takes through glommio before the non-blocking path drains the rest.
const WAKE_READ_BYTES: usize = 4096;

struct Pending {
    reply: Boxed<Reply>,
    /// Released when the reply is written: bounds bytes in flight per connection.
    _permit: Option<InFlight>,
}

/// A request's bytes counted against the connection's in-flight limit and in the shard's
/// `requests_in_flight` memory until its reply is written.
struct InFlight {
    _permit: StaticPermit,
    bytes: usize,
}

impl InFlight {
    fn new(permit: StaticPermit, bytes: usize) -> InFlight {
        metrics::memory_grew(Memory::RequestsInFlight, bytes);
        InFlight { _permit: permit, bytes }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::memory_shrank(Memory::RequestsInFlight, self.bytes);
    }
}

/// The receive buffer's capacity as counted in the shard's `connection_buffers` memory, kept in
/// step with the buffer and released with the connection.
struct BufferGauge(usize);

impl BufferGauge {
    fn set(&mut self, capacity: usize) {
        if capacity > self.0 {
            metrics::memory_grew(Memory::ConnectionBuffers, capacity - self.0);
        } else if capacity < self.0 {
            metrics::memory_shrank(Memory::ConnectionBuffers, self.0 - capacity);
        }
        self.0 = capacity;
    }
}

impl Drop for BufferGauge {
    fn drop(&mut self) {
        self.set(0);
    }
}

pub(crate) async fn run<P: Protocol>(shard: &Rc<Shard>, stream: TcpStream, stop: StopSignal) {
    let peer = stream.peer_addr().ok();
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(?peer, "TCP_NODELAY not set: {e}");
    }
    // SAFETY: dup returns a new descriptor we own exclusively; it is handed to the writer stream,
    // which closes it when dropped.
    let writer_fd = unsafe { libc::dup(stream.as_raw_fd()) };
    if writer_fd < 0 {
        tracing::warn!(?peer, "closing connection: dup failed: {}", std::io::Error::last_os_error());
        return;
    }
    // SAFETY: writer_fd is a valid, owned socket descriptor (checked above).
    let writer = unsafe { TcpStream::from_raw_fd(writer_fd) };
    let in_flight = Rc::new(Semaphore::new(shard.config.bytes_in_flight_per_connection_max as u64));
    let (queue_tx, queue_rx) = local_channel::new_bounded::<Pending>(PIPELINE_DEPTH);
    let writer_task = glommio::spawn_local(write_loop(writer, queue_rx));
    read_loop::<P>(shard, stream, &in_flight, queue_tx, stop, peer).await;
    writer_task.await;
}

async fn read_loop<P: Protocol>(
    shard: &Rc<Shard>,
    mut stream: TcpStream,
    in_flight: &Rc<Semaphore>,
    queue: local_channel::LocalSender<Pending>,
    stop: StopSignal,
    peer: Option<std::net::SocketAddr>,
) {
    let frame_bytes_max = shard.config.frame_bytes_max;
    let mut buf = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let mut gauge = BufferGauge(0);
    loop {
        loop {
            let frame = match P::split(&mut buf, frame_bytes_max) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(?peer, shard = shard.id, protocol = P::NAME, "closing connection: {e}");
                    if let Some(frame) = P::framing_error(&e) {
                        let reply = Reply::Close(frame);
                        let _ =
                            queue.send(Pending { reply: async { reply }.boxed_local(), _permit: None }).await;
                    }
                    return;
                }
            };
            let frame_bytes = P::frame_len(&frame);
            let Ok(permit) = in_flight.acquire_static_permit(frame_bytes as u64).await else { return };
            let permit = InFlight::new(permit, frame_bytes);
            let (reply, close) = P::handle(shard, frame, peer).await;
            if queue.send(Pending { reply, _permit: Some(permit) }).await.is_err() || close {
                return;
            }
        }
        if stop.peek().is_some() {
            return;
        }
        if buf.capacity() - buf.len() < READ_CHUNK_BYTES / 4 {
            buf.reserve(READ_CHUNK_BYTES);
        }
        gauge.set(buf.capacity());
        // Bytes already waiting in the socket go straight into spare capacity: no zeroing, no wait.
        match recv_nonblocking(stream.as_raw_fd(), &mut buf) {
            Ok(Some(0)) => {
                if !buf.is_empty() {
                    tracing::debug!(?peer, bytes = buf.len(), "connection closed mid-frame");
                }
                return;
            }
            Ok(Some(_)) => continue,
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(?peer, "connection read failed: {e}");
                return;
            }
        }
        // Nothing there: park in glommio until the socket is readable, taking at most one small
        // block through it (the only bytes that need zeroing); the rest comes through the fast
        // path above on the next turn.
        let filled = buf.len();
        buf.resize(filled + WAKE_READ_BYTES, 0);
        let read = futures::select! {
            read = stream.read(&mut buf[filled..]).fuse() => read,
            _ = stop.clone().fuse() => return,
        };
        match read {
            Ok(0) => {
                if filled > 0 {
                    tracing::debug!(?peer, bytes = filled, "connection closed mid-frame");
                }
                return;
            }
            Ok(n) => buf.truncate(filled + n),
            Err(e) => {
                tracing::debug!(?peer, "connection read failed: {e}");
                return;
            }
        }
    }
}

/// One non-blocking `recv` into `buf`'s spare capacity. `Ok(None)` when nothing is waiting.
fn recv_nonblocking(fd: i32, buf: &mut BytesMut) -> std::io::Result<Option<usize>> {
    let spare = buf.spare_capacity_mut();
    debug_assert!(!spare.is_empty(), "recv into a full buffer would look like EOF");
    // SAFETY: the kernel writes at most `spare.len()` bytes into memory `buf` owns; MSG_DONTWAIT
    // keeps the blocking descriptor from blocking the shard.
    let n = unsafe { libc::recv(fd, spare.as_mut_ptr().cast(), spare.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Ok(None),
            _ => Err(e),
        };
    }
    let n = n as usize;
    // SAFETY: recv initialized exactly `n` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(Some(n))
}

/// Writes replies in request order. Replies already finished when the writer gets to them leave
/// together, up to `REPLIES_PER_SEND` in one `sendmsg`: a pipelining client's replies tend to
/// finish at once (one sync round makes a whole window of produces durable), and one syscall per
/// reply kept the shard busy for milliseconds while other connections' replies waited.
async fn write_loop(mut stream: TcpStream, queue: local_channel::LocalReceiver<Pending>) {
    let mut frames: Vec<ResponseFrame> = Vec::with_capacity(REPLIES_PER_SEND);
    let mut permits: Vec<Option<InFlight>> = Vec::with_capacity(REPLIES_PER_SEND);
    let mut next: Option<Pending> = None;
    loop {
        let pending = match next.take() {
            Some(pending) => pending,
            None => match queue.recv().await {
                Some(pending) => pending,
                None => break,
            },
        };
        permits.push(pending._permit);
        let mut close = gather(pending.reply.await, &mut frames);
        while !close && frames.len() < REPLIES_PER_SEND {
            // Polled once: an empty queue answers Pending and the waiter unregisters when dropped.
            let Some(Some(mut pending)) = queue.recv().now_or_never() else { break };
            match (&mut pending.reply).now_or_never() {
                Some(reply) => {
                    permits.push(pending._permit);
                    close = gather(reply, &mut frames);
                }
                None => {
                    next = Some(pending);
                    break;
                }
            }
        }
        if let Err(e) = write_frames(&mut stream, &frames).await {
            tracing::debug!("connection write failed: {e}");
            break;
        }
        frames.clear();
        permits.clear();
        if close {
            break;
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both).await;
}

/// Adds a reply's frame to those to send; true when the connection closes after it.
fn gather(reply: Reply, frames: &mut Vec<ResponseFrame>) -> bool {
    match reply {
        Reply::None => false,
        Reply::Frame(frame) => {
            frames.push(frame);
            false
        }
        Reply::Close(frame) => {
            frames.push(frame);
            true
        }
    }
}

/// Writes the frames' heads and payload chunks in order. First one non-blocking `sendmsg` of all
/// parts; whatever the socket did not take is finished with ordinary async writes.
async fn write_frames(stream: &mut TcpStream, frames: &[ResponseFrame]) -> std::io::Result<()> {
    let parts: Vec<&[u8]> = frames
        .iter()
        .flat_map(|frame| std::iter::once(&frame.head[..]).chain(frame.payload.iter().map(|b| &b[..])))
        .collect();
    if parts.is_empty() {
        return Ok(());
    }
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut sent = send_vectored_nonblocking(stream.as_raw_fd(), &parts);
    if sent == total {
        return Ok(());
    }
    for part in parts {
        if sent >= part.len() {
            sent -= part.len();
            continue;
        }
        stream.write_all(&part[sent..]).await?;
        sent = 0;
    }
    Ok(())
}

/// Bytes `sendmsg` took without blocking (0 on EAGAIN or error; the async path then reports it).
fn send_vectored_nonblocking(fd: i32, parts: &[&[u8]]) -> usize {
    const IOV_MAX: usize = 1024;
    let iov: Vec<libc::iovec> = parts
        .iter()
        .take(IOV_MAX)
        .map(|p| libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: p.len() })
        .collect();
    // SAFETY: an all-zero msghdr is valid; we then point it at `iov`, which outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len() as _;
    // SAFETY: the iovecs reference live slices; MSG_DONTWAIT keeps the blocking fd from blocking
    // the shard; MSG_NOSIGNAL turns a closed peer into EPIPE instead of SIGPIPE.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n < 0 {
        0
    } else {
        n as usize
    }
}
