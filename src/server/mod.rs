//! The client-facing server of one shard: listeners, connections, and the seam to the protocols.
//!
//! Owns: accepting connections on the listeners it is given, the per-shard connection limit, the
//! shutdown signal, and draining connections at shutdown. Bytes move in `connection`, which serves
//! any [`Protocol`] and hands record bytes to one `sendmsg` without copying them. Which protocol a
//! listener speaks is decided by whoever wires it (`broker`): the protocols (`native`, `kafka`)
//! sit above this module and implement [`Protocol`]; nothing here knows either of them.
//! May depend on `shard` (the connection's shard: config, counters) and `protocol::frame`;
//! never touches storage directly.

pub(crate) mod connection;

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::channel::oneshot;
use futures::future::{FutureExt, Shared};
use glommio::net::TcpListener;

use crate::protocol::frame::FrameError;
use crate::shard::Shard;

/// Shutdown requested (a signal, or a failed start-up), shared by every shard of the process.
#[derive(Default)]
pub struct Shutdown {
    requested: AtomicBool,
}

impl Shutdown {
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    pub fn request(&self) {
        self.requested.store(true, Ordering::Release);
    }
}

/// Resolves (for every clone) once shutdown has been requested.
pub type StopSignal = Shared<oneshot::Receiver<()>>;

pub type Boxed<T> = Pin<Box<dyn Future<Output = T>>>;

/// An encoded response as it goes on the socket: `head` (length prefix and everything up to the
/// first record chunk), then `payload` in order. Record bytes sit in `payload` as the storage
/// layer's own buffers, so the writer hands them to one `sendmsg` without copying them.
pub struct ResponseFrame {
    pub head: Vec<u8>,
    pub payload: Vec<Bytes>,
}

pub enum Reply {
    /// Nothing goes back (acks = 0).
    None,
    Frame(ResponseFrame),
    /// Send this, then close the connection (the stream can no longer be trusted).
    Close(ResponseFrame),
}

/// A wire protocol a connection can speak: how frames are cut from the byte stream and who
/// answers them. `handle` does everything that must happen in arrival order before it returns
/// (routing, produce appends, cross-shard sends); the reply future only waits and encodes.
pub trait Protocol: 'static {
    const NAME: &'static str;
    type Frame;
    /// Takes one complete frame off the front of `buf`; `Ok(None)` when more bytes are needed.
    fn split(buf: &mut BytesMut, frame_bytes_max: usize) -> Result<Option<Self::Frame>, FrameError>;
    /// Bytes the frame holds, counted against the connection's in-flight limit.
    fn frame_len(frame: &Self::Frame) -> usize;
    /// What to send before closing a connection whose framing broke, if the protocol can say it.
    fn framing_error(error: &FrameError) -> Option<ResponseFrame>;
    /// Returns the reply future and whether the connection must close after it. `peer` is the
    /// client's address, when the socket could tell it.
    fn handle(
        shard: &Rc<Shard>,
        frame: Self::Frame,
        peer: Option<std::net::SocketAddr>,
    ) -> impl Future<Output = (Boxed<Reply>, bool)>;
}

/// A listener and the protocol its connections speak, ready to be served by [`serve`].
pub struct Listener {
    accept: Box<dyn FnOnce(Rc<Shard>, StopSignal) -> glommio::Task<()>>,
}

impl Listener {
    pub fn new<P: Protocol>(listener: TcpListener) -> Listener {
        Listener {
            accept: Box::new(move |shard, stop| {
                glommio::spawn_local(accept_loop::<P>(shard, listener, stop))
            }),
        }
    }
}

/// Serves until shutdown is requested, then stops accepting and waits (up to the grace period)
/// for open connections to finish their in-flight requests.
pub async fn serve(shard: Rc<Shard>, listeners: Vec<Listener>, shutdown: Arc<Shutdown>) {
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let stop: StopSignal = stop_rx.shared();
    let watcher = glommio::spawn_local(async move {
        while !shutdown.requested() {
            glommio::timer::sleep(Duration::from_millis(50)).await;
        }
        drop(stop_tx);
    });
    let accepts: Vec<_> = listeners.into_iter().map(|l| (l.accept)(shard.clone(), stop.clone())).collect();
    let _ = stop.clone().await;
    watcher.await;
    for accept in accepts {
        accept.await;
    }
    let grace = Duration::from_millis(shard.config.shutdown_grace_ms);
    let started = std::time::Instant::now();
    while shard.connections.get() > 0 && started.elapsed() < grace {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    if shard.connections.get() > 0 {
        tracing::warn!(
            shard = shard.id,
            open = shard.connections.get(),
            "grace period over; closing connections"
        );
    }
}

async fn accept_loop<P: Protocol>(shard: Rc<Shard>, listener: TcpListener, stop: StopSignal) {
    loop {
        let accepted = futures::select! {
            accepted = listener.accept().fuse() => accepted,
            _ = stop.clone().fuse() => return,
        };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(e) => {
                // Typically EMFILE: back off instead of spinning on the error.
                tracing::warn!(shard = shard.id, protocol = P::NAME, "accept failed: {e}");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if shard.connections.get() >= shard.config.connections_per_shard_max {
            tracing::warn!(
                shard = shard.id,
                peer = ?stream.peer_addr().ok(),
                limit = shard.config.connections_per_shard_max,
                "connection refused: connections_per_shard_max reached"
            );
            continue;
        }
        shard.connections.set(shard.connections.get() + 1);
        let shard = shard.clone();
        let stop = stop.clone();
        glommio::spawn_local(async move {
            connection::run::<P>(&shard, stream, stop).await;
            shard.connections.set(shard.connections.get() - 1);
        })
        .detach();
    }
}
