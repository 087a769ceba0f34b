//! The admin HTTP listener: `GET /metrics` (Prometheus text) and `GET /health`, served by shard 0.
//!
//! Owns: a deliberately small HTTP/1.1 server — one request per connection, `Connection: close`,
//! request head bounded in size and time — because a scraper and a health check need nothing
//! more and a bigger HTTP stack would be the largest dependency of the broker. A scrape gathers
//! one snapshot from every shard over the mesh; no shard ever waits on the admin listener.

use std::rc::Rc;
use std::time::{Duration, Instant};

use futures::future::FutureExt;
use futures::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};

use crate::cluster::Cluster;
use crate::metrics::exposition::{self, ProcessInfo};
use crate::metrics::ShardSnapshot;
use crate::shard::Shard;

/// Largest request head (request line + headers) accepted.
const REQUEST_HEAD_BYTES_MAX: usize = 8 << 10;
/// A client that has not sent its request head by then is disconnected.
const REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Concurrent admin connections; more are closed at accept (scrapers need one or two).
const CONNECTIONS_MAX: usize = 64;

/// Accepts admin connections until the task is dropped (at shutdown).
pub(crate) async fn serve(shard: Rc<Shard>, listener: TcpListener, started: Instant) {
    let open = Rc::new(std::cell::Cell::new(0usize));
    loop {
        let stream = match listener.accept().await {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!("admin listener: accept failed: {e}");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if open.get() >= CONNECTIONS_MAX {
            tracing::warn!(limit = CONNECTIONS_MAX, "admin listener: too many connections; closing one");
            continue;
        }
        open.set(open.get() + 1);
        let (shard, open) = (shard.clone(), open.clone());
        glommio::spawn_local(async move {
            if let Err(e) = handle(&shard, stream, started).await {
                tracing::debug!("admin connection: {e}");
            }
            open.set(open.get() - 1);
        })
        .detach();
    }
}

async fn handle(shard: &Rc<Shard>, mut stream: TcpStream, started: Instant) -> std::io::Result<()> {
    let head = futures::select! {
        head = read_head(&mut stream).fuse() => head?,
        _ = glommio::timer::sleep(REQUEST_HEAD_TIMEOUT).fuse() => return Ok(()),
    };
    let Some(head) = head else {
        return respond(
            &mut stream,
            "431 Request Header Fields Too Large",
            "text/plain",
            "request head too large\n",
        )
        .await;
    };
    let mut parts = head.lines().next().unwrap_or_default().split(' ');
    let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let path = path.split('?').next().unwrap_or_default();
    match (method, path) {
        ("GET", "/metrics") => {
            let snapshots = gather(shard).await;
            let process = ProcessInfo {
                resident_bytes: exposition::resident_bytes(),
                shards: shard.count,
                uptime_seconds: started.elapsed().as_secs_f64(),
                peers: shard.extension::<Cluster>().map(|c| c.peer_traffic()).unwrap_or_default(),
                replication: shard.extension::<Cluster>().map(|c| c.replication_metrics()),
            };
            let body = exposition::render(&snapshots, &process);
            respond(&mut stream, "200 OK", "text/plain; version=0.0.4; charset=utf-8", &body).await
        }
        ("GET", "/health") => match shard.extension::<Cluster>().map(|c| c.status()) {
            None => respond(&mut stream, "200 OK", "text/plain", "ok\n").await,
            Some(status) => match (status.controller_leader, &status.failure) {
                (Some(leader), None) => {
                    let body = format!(
                        "ok: node {} is in the cluster; controller leader: node {leader}\n",
                        status.node_id
                    );
                    respond(&mut stream, "200 OK", "text/plain", &body).await
                }
                (_, Some(failure)) => {
                    let body = format!("node {} has left the controller group: {failure}\n", status.node_id);
                    respond(&mut stream, "503 Service Unavailable", "text/plain", &body).await
                }
                (None, None) => {
                    let body = format!(
                        "node {} knows no controller leader (yet): a majority of the seeds must be up\n",
                        status.node_id
                    );
                    respond(&mut stream, "503 Service Unavailable", "text/plain", &body).await
                }
            },
        },
        ("GET", "/v1/cluster") => match shard.extension::<Cluster>().map(|c| c.status()) {
            Some(status) => {
                let body = serde_json::to_string_pretty(&status).unwrap_or_default() + "\n";
                respond(&mut stream, "200 OK", "application/json", &body).await
            }
            None => {
                respond(
                    &mut stream,
                    "404 Not Found",
                    "text/plain",
                    "this broker is a single node (no seeds)\n",
                )
                .await
            }
        },
        ("GET", _) => {
            respond(&mut stream, "404 Not Found", "text/plain", "try /metrics, /health or /v1/cluster\n")
                .await
        }
        _ => respond(&mut stream, "405 Method Not Allowed", "text/plain", "only GET\n").await,
    }
}

/// The request head up to the blank line; `None` when it exceeds `REQUEST_HEAD_BYTES_MAX`.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before the request head",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(end);
            return Ok(Some(String::from_utf8_lossy(&buf).into_owned()));
        }
        if buf.len() > REQUEST_HEAD_BYTES_MAX {
            return Ok(None);
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.close().await
}

/// Every shard's snapshot, in shard order: this shard's directly, the others' over the mesh. A
/// shard that has stopped (shutdown) is left out.
async fn gather(shard: &Rc<Shard>) -> Vec<ShardSnapshot> {
    let mut replies = Vec::new();
    for other in (0..shard.count).filter(|&s| s != shard.id) {
        replies.push(shard.invoke_on(other, |s| async move { s.metrics_snapshot() }).await);
    }
    let mut all = vec![shard.metrics_snapshot()];
    for reply in replies {
        if let Ok(snapshot) = reply.await {
            all.push(snapshot);
        }
    }
    all.sort_by_key(|s| s.shard);
    all
}
