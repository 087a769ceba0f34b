//! The native-protocol server of one shard: listeners, connections, and request dispatch.
//!
//! Owns: accepting connections on the shared port and the shard's direct port, the per-shard
//! connection limit, and draining connections at shutdown. Requests are decoded and answered in
//! `dispatch`; bytes move in `connection`. May depend on `shard` (routing) and `protocol`; never
//! touches storage directly.

mod connection;
mod dispatch;
mod groups;

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures::channel::oneshot;
use futures::future::{FutureExt, Shared};
use glommio::net::TcpListener;

use crate::shard::runtime::Shutdown;
use crate::shard::Shard;

/// Resolves (for every clone) once shutdown has been requested.
pub(crate) type StopSignal = Shared<oneshot::Receiver<()>>;

/// Serves until shutdown is requested, then stops accepting and waits (up to the grace period)
/// for open connections to finish their in-flight requests.
pub(crate) async fn serve(shard: Rc<Shard>, listeners: Vec<TcpListener>, shutdown: Arc<Shutdown>) {
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let stop: StopSignal = stop_rx.shared();
    let watcher = glommio::spawn_local(async move {
        while !shutdown.requested() {
            glommio::timer::sleep(Duration::from_millis(50)).await;
        }
        drop(stop_tx);
    });
    let accepts: Vec<_> = listeners
        .into_iter()
        .map(|listener| glommio::spawn_local(accept_loop(shard.clone(), listener, stop.clone())))
        .collect();
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

async fn accept_loop(shard: Rc<Shard>, listener: TcpListener, stop: StopSignal) {
    loop {
        let accepted = futures::select! {
            accepted = listener.accept().fuse() => accepted,
            _ = stop.clone().fuse() => return,
        };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(e) => {
                // Typically EMFILE: back off instead of spinning on the error.
                tracing::warn!(shard = shard.id, "accept failed: {e}");
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
            connection::run(&shard, stream, stop).await;
            shard.connections.set(shard.connections.get() - 1);
        })
        .detach();
    }
}
