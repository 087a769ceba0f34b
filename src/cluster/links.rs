//! This node's links to its peers: one dialer per other voter (it sends only on the connection it
//! dialed, reconnecting with backoff and queueing a bounded number of frames meanwhile), and the
//! acceptor for the connections the others dial, whose frames it decodes and hands to `deliver`.
//! Every group this node shares with a peer — the controller and partition replicas — travels in
//! the same `PeerBatch` frames over these connections: what the groups send during one pass of
//! the executor is gathered and leaves as one frame per peer (coalesced heartbeats, so idle
//! partitions do not cost a frame each per tick). Keepalives carry this node's in-sync report
//! (`cluster::in_sync`). Also keeps when each peer was last heard and what was sent to it.
//!
//! Depends on `transport` (handshake, frames), `replication::wire` and glommio's TCP.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::channel::mpsc;
use futures::StreamExt;
use glommio::net::{TcpListener, TcpStream};
use raft::eraftpb::Message;

use super::transport::{self, NodeInfo};
use crate::replication::wire::{self, EncodedFrame, GroupKey, LeaderReport, PeerBatch};
use crate::storage::notify::Notify;

/// Frames queued for one peer while its connection is down; more are dropped (Raft resends).
const QUEUED_FRAMES_MAX: usize = 256;

/// A keepalive's report of the partitions this node leads that peers cannot see whole.
#[derive(Debug, Clone)]
pub struct Keepalive {
    pub report: Vec<LeaderReport>,
    /// `wire::report_digest(&report)`.
    pub digest: u64,
    /// Send it whole to every peer (it changed, or it is time to); otherwise the digest only,
    /// except to a peer whose last one was dropped.
    pub whole: bool,
}

/// Messages gathered for each peer, sent as one frame per peer.
pub type Outbox = BTreeMap<u64, Vec<(GroupKey, Message)>>;

/// What a node hands the batches it receives to: the peer's id and its batch.
pub type Deliver = Rc<dyn Fn(u64, PeerBatch)>;

pub struct PeerLinks {
    me: NodeInfo,
    cluster_id: u64,
    voters: BTreeMap<u64, SocketAddr>,
    senders: BTreeMap<u64, mpsc::Sender<EncodedFrame>>,
    /// Peers that dialed us: when we last had a frame from each, and what they said they are.
    heard: RefCell<BTreeMap<u64, (Instant, NodeInfo)>>,
    /// Gathered since the last pass of `run_sender`.
    pending: RefCell<Outbox>,
    /// The in-sync report for the next frame to every peer.
    pending_report: RefCell<Option<Keepalive>>,
    /// Peers whose last frame with a report was dropped: the next one goes to them whole.
    owed_whole_report: RefCell<std::collections::BTreeSet<u64>>,
    /// Controller commands for each peer (its controller leader), sent with its next frame.
    pending_requests: RefCell<BTreeMap<u64, Vec<Bytes>>>,
    wake_sender: Notify,
    sent: RefCell<BTreeMap<u64, SentCounts>>,
}

/// What this node sent one peer since it started (dropped frames included: a full queue is a
/// peer that cannot keep up or cannot be reached).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SentCounts {
    pub frames: u64,
    pub messages: u64,
    pub bytes: u64,
    pub dropped_frames: u64,
}

impl PeerLinks {
    /// Starts the acceptor on `listener` and a dialer to every voter but `me`.
    pub fn start(
        me: NodeInfo,
        cluster_id: u64,
        voters: BTreeMap<u64, SocketAddr>,
        listener: TcpListener,
        deliver: Deliver,
    ) -> Rc<PeerLinks> {
        let mut senders = BTreeMap::new();
        let mut receivers = Vec::new();
        for (&id, &addr) in &voters {
            if id != me.id {
                let (tx, rx) = mpsc::channel(QUEUED_FRAMES_MAX);
                senders.insert(id, tx);
                receivers.push((id, addr, rx));
            }
        }
        let links = Rc::new(PeerLinks {
            me,
            cluster_id,
            voters,
            senders,
            heard: RefCell::new(BTreeMap::new()),
            pending: RefCell::new(Outbox::new()),
            pending_report: RefCell::new(None),
            owed_whole_report: RefCell::default(),
            pending_requests: RefCell::new(BTreeMap::new()),
            wake_sender: Notify::default(),
            sent: RefCell::new(BTreeMap::new()),
        });
        glommio::spawn_local(links.clone().run_acceptor(listener, deliver)).detach();
        glommio::spawn_local(links.clone().run_sender()).detach();
        for (id, addr, rx) in receivers {
            glommio::spawn_local(links.clone().run_dialer(id, addr, rx)).detach();
        }
        links
    }

    pub fn me(&self) -> &NodeInfo {
        &self.me
    }

    /// The other voters' ids.
    pub fn peers(&self) -> impl Iterator<Item = u64> + '_ {
        self.senders.keys().copied()
    }

    /// When each peer was last heard, and what it said about itself.
    pub fn heard(&self) -> std::cell::Ref<'_, BTreeMap<u64, (Instant, NodeInfo)>> {
        self.heard.borrow()
    }

    /// The peers not heard within `after` (node-level liveness).
    pub fn down(&self, after: Duration) -> std::collections::BTreeSet<u64> {
        let heard = self.heard.borrow();
        self.peers().filter(|id| heard.get(id).is_none_or(|(at, _)| at.elapsed() >= after)).collect()
    }

    /// Queues `outbox` (an empty list for a peer sends it an empty frame: a keepalive); it leaves
    /// with everything else queued in this pass of the executor, one frame per peer.
    pub fn send(&self, outbox: Outbox) {
        let mut pending = self.pending.borrow_mut();
        for (to, mut messages) in outbox {
            pending.entry(to).or_default().append(&mut messages);
        }
        drop(pending);
        self.wake_sender.notify_all();
    }

    /// Sends every peer a keepalive (a frame even when nothing else is queued for it) carrying
    /// the report of the partitions this node leads whose in-sync replicas are short: whole, or
    /// its digest only when `keepalive.whole` is false (and the peer's last one was not dropped).
    pub fn send_keepalive(&self, keepalive: Keepalive) {
        *self.pending_report.borrow_mut() = Some(keepalive);
        self.send(self.peers().map(|to| (to, Vec::new())).collect());
    }

    /// Hands `command` (a controller log record) to peer `to`, the controller's leader, to propose.
    pub fn send_controller_request(&self, to: u64, command: Bytes) {
        self.pending_requests.borrow_mut().entry(to).or_default().push(command);
        self.send(BTreeMap::from([(to, Vec::new())]));
    }

    /// What was sent to each peer.
    pub fn sent(&self) -> BTreeMap<u64, SentCounts> {
        self.sent.borrow().clone()
    }

    /// Sends what was gathered, once the tasks woken with it have had their turn. A full queue
    /// means the peer is unreachable: Raft sends again what matters.
    async fn run_sender(self: Rc<Self>) {
        loop {
            let woken = self.wake_sender.notified();
            if self.pending.borrow().is_empty() {
                woken.await;
                continue;
            }
            futures_lite::future::yield_now().await;
            let outbox = std::mem::take(&mut *self.pending.borrow_mut());
            let report = self.pending_report.borrow_mut().take();
            let mut requests = std::mem::take(&mut *self.pending_requests.borrow_mut());
            for (to, messages) in outbox {
                let Some(sender) = self.senders.get(&to) else { continue };
                let count = messages.len() as u64;
                let owed = report.is_some() && self.owed_whole_report.borrow().contains(&to);
                let leader_reports = report.as_ref().filter(|k| k.whole || owed).map(|k| k.report.clone());
                let batch = PeerBatch {
                    from_node: self.me.id,
                    to_node: to,
                    messages,
                    leader_reports,
                    controller_requests: requests.remove(&to).unwrap_or_default(),
                    report_digest: report.as_ref().map_or(0, |k| k.digest),
                };
                let carries_report = batch.leader_reports.is_some();
                let frame = wire::encode(&batch);
                let bytes = frame.len() as u64;
                let queued = sender.clone().try_send(frame).is_ok();
                if report.is_some() {
                    let mut owed = self.owed_whole_report.borrow_mut();
                    if !queued {
                        owed.insert(to);
                    } else if carries_report {
                        owed.remove(&to);
                    }
                }
                let mut sent = self.sent.borrow_mut();
                let counts = sent.entry(to).or_default();
                counts.frames += 1;
                counts.messages += count;
                counts.bytes += bytes;
                counts.dropped_frames += u64::from(!queued);
            }
        }
    }

    async fn run_acceptor(self: Rc<Self>, listener: TcpListener, deliver: Deliver) {
        loop {
            match listener.accept().await {
                Ok(stream) => {
                    glommio::spawn_local(self.clone().run_reader(stream, deliver.clone())).detach();
                }
                Err(e) => {
                    tracing::warn!("cluster: peer listener: accept failed: {e}");
                    glommio::timer::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn run_reader(self: Rc<Self>, mut stream: TcpStream, deliver: Deliver) {
        let (cluster_id, me) = (self.cluster_id, self.me.id);
        let voters = &self.voters;
        let check = |hello: &transport::Hello| {
            if hello.cluster_id != cluster_id {
                return Err(format!(
                    "cluster id {:016x} is not ours ({cluster_id:016x}): the nodes were given different seeds",
                    hello.cluster_id
                ));
            }
            if hello.to != me {
                return Err(format!("this is node {me}, not node {}", hello.to));
            }
            if hello.from == me || !voters.contains_key(&hello.from) || hello.info.id != hello.from {
                return Err(format!("node {} is not another node of this cluster", hello.from));
            }
            Ok(())
        };
        let hello = {
            let welcome = Box::pin(transport::welcome(&mut stream, check));
            let timeout = Box::pin(glommio::timer::sleep(transport::HANDSHAKE_TIMEOUT));
            match futures::future::select(welcome, timeout).await {
                futures::future::Either::Left((Ok(hello), _)) => Some(hello),
                futures::future::Either::Left((Err(e), _)) => {
                    tracing::warn!("cluster: peer connection: {e}");
                    None
                }
                futures::future::Either::Right(_) => None,
            }
        };
        let Some(hello) = hello else { return };
        let from = hello.from;
        tracing::info!(node = from, "cluster: peer connected");
        self.heard.borrow_mut().insert(from, (Instant::now(), hello.info));
        loop {
            let frame = match transport::read_frame(&mut stream).await {
                Ok(frame) => frame,
                Err(e) => {
                    tracing::info!(node = from, "cluster: peer connection closed: {e}");
                    return;
                }
            };
            let batch = match wire::decode(frame) {
                Ok(batch) if batch.from_node == from && batch.to_node == me => batch,
                Ok(batch) => {
                    tracing::warn!(
                        node = from,
                        "cluster: frame from {} to {} on this connection; closing it",
                        batch.from_node,
                        batch.to_node
                    );
                    return;
                }
                Err(e) => {
                    tracing::warn!(node = from, "cluster: bad frame, closing the connection: {e}");
                    return;
                }
            };
            if let Some((at, _)) = self.heard.borrow_mut().get_mut(&from) {
                *at = Instant::now();
            }
            deliver(from, batch);
        }
    }

    async fn run_dialer(self: Rc<Self>, to: u64, addr: SocketAddr, mut frames: mpsc::Receiver<EncodedFrame>) {
        // Reused for every frame: small parts are gathered here, so no frame costs an allocation.
        let mut scratch = Vec::with_capacity(transport::GATHER_BYTES_MAX);
        let mut backoff = Duration::from_millis(100);
        let mut failures = 0u64;
        loop {
            let hello =
                transport::Hello { cluster_id: self.cluster_id, from: self.me.id, to, info: self.me.clone() };
            let connected = async {
                let mut stream = TcpStream::connect_timeout(addr, transport::HANDSHAKE_TIMEOUT)
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                stream.set_nodelay(true)?;
                transport::greet(&mut stream, &hello).await?;
                Ok::<_, std::io::Error>(stream)
            }
            .await;
            match connected {
                Ok(mut stream) => {
                    tracing::info!(node = to, %addr, "cluster: connected to peer");
                    failures = 0;
                    backoff = Duration::from_millis(100);
                    while let Some(frame) = frames.next().await {
                        if let Err(e) = transport::write_frame(&mut stream, &frame, &mut scratch).await {
                            tracing::info!(node = to, "cluster: connection to peer lost: {e}");
                            break;
                        }
                    }
                }
                Err(e) => {
                    // Said once, then every 50th try, so a node that stays down does not flood
                    // the log.
                    if failures % 50 == 0 {
                        tracing::warn!(node = to, %addr, "cluster: cannot reach peer: {e}; retrying");
                    }
                    failures += 1;
                }
            }
            glommio::timer::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}
