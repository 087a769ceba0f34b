//! The partition replicas this node hosts, over the peer links (issue 11, step 3). Each replica is
//! a task that owns its `shard::replica::PartitionReplica` and takes its inputs — messages from
//! peers, ticks, proposals — from a queue, so nothing else ever holds it across its IO: it steps
//! what has arrived, drives one round (writes, fdatasync, then the messages that waited on them)
//! and publishes its status. One timer ticks every replica. What a replica sends leaves through
//! the links in the frames the controller's messages use.
//!
//! For now replicas live on shard 0, beside the links; moving each to its partition's owning
//! shard (a connection per node pair per shard pair) is the next step (docs/replication.md).
//! Depends on `links`, `shard::replica`, `replication`.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use bytes::BytesMut;
use futures::channel::{mpsc, oneshot};
use futures::StreamExt;
use raft::eraftpb::Message;

use super::links::{Outbox, PeerLinks};
use crate::replication::group::{ProposeError, Proposed, Role};
use crate::replication::wire::GroupKey;
use crate::shard::replica::PartitionReplica;

/// What a replica task takes from its queue.
enum Input {
    Message(Message),
    Tick,
    Propose(BytesMut, oneshot::Sender<Result<Proposed, ProposeError>>),
}

/// A replica as its task last published it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaStatus {
    pub role: Role,
    pub serving: bool,
    pub leader: Option<u64>,
    pub term: u64,
    pub high_watermark: i64,
    /// Set when the replica stopped on an error (its log could not be written or read).
    pub failed: bool,
}

struct Hosted {
    inputs: mpsc::UnboundedSender<Input>,
    status: Rc<Cell<ReplicaStatus>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HostError {
    #[error("no replica of {0:?} on this node")]
    Unknown(GroupKey),
    #[error("the replica of {0:?} stopped")]
    Stopped(GroupKey),
    #[error(transparent)]
    Propose(#[from] ProposeError),
}

pub struct ReplicaHost {
    links: Rc<PeerLinks>,
    replicas: RefCell<BTreeMap<GroupKey, Hosted>>,
}

impl ReplicaHost {
    /// A host whose replicas are ticked every `tick`.
    pub fn start(links: Rc<PeerLinks>, tick: Duration) -> Rc<ReplicaHost> {
        let host = Rc::new(ReplicaHost { links, replicas: RefCell::new(BTreeMap::new()) });
        glommio::spawn_local(run_ticks(Rc::downgrade(&host), tick)).detach();
        host
    }

    /// Hosts `replica` as the member of group `key` on this node.
    pub fn add(&self, key: GroupKey, mut replica: PartitionReplica) {
        let (inputs, queue) = mpsc::unbounded();
        let status = Rc::new(Cell::new(status_of(&mut replica, false)));
        glommio::spawn_local(run_replica(key, replica, queue, self.links.clone(), status.clone())).detach();
        self.replicas.borrow_mut().insert(key, Hosted { inputs, status });
    }

    /// A message from a peer for group `key`; false when this node has no such replica.
    pub fn deliver(&self, key: GroupKey, message: Message) -> bool {
        match self.replicas.borrow().get(&key) {
            Some(hosted) => hosted.inputs.unbounded_send(Input::Message(message)).is_ok(),
            None => false,
        }
    }

    /// Proposes a producer's batch to group `key`: where it went, once the leader has it in its
    /// log (committed when the high watermark passes its last offset in the same term).
    pub async fn propose(&self, key: GroupKey, batch: BytesMut) -> Result<Proposed, HostError> {
        let (reply, answer) = oneshot::channel();
        let sent = match self.replicas.borrow().get(&key) {
            Some(hosted) => hosted.inputs.unbounded_send(Input::Propose(batch, reply)).is_ok(),
            None => return Err(HostError::Unknown(key)),
        };
        if !sent {
            return Err(HostError::Stopped(key));
        }
        Ok(answer.await.map_err(|_| HostError::Stopped(key))??)
    }

    pub fn status(&self, key: GroupKey) -> Option<ReplicaStatus> {
        self.replicas.borrow().get(&key).map(|hosted| hosted.status.get())
    }
}

/// One timer for every replica of the host; ends with the host.
async fn run_ticks(host: std::rc::Weak<ReplicaHost>, tick: Duration) {
    loop {
        glommio::timer::sleep(tick).await;
        let Some(host) = host.upgrade() else { return };
        for hosted in host.replicas.borrow().values() {
            let _ = hosted.inputs.unbounded_send(Input::Tick);
        }
    }
}

fn status_of(replica: &mut PartitionReplica, failed: bool) -> ReplicaStatus {
    let group = replica.group();
    ReplicaStatus {
        role: group.role(),
        serving: group.is_serving(),
        leader: group.leader(),
        term: group.term(),
        high_watermark: group.high_watermark(),
        failed,
    }
}

fn outbox(key: GroupKey, messages: Vec<Message>) -> Outbox {
    let mut outbox = Outbox::new();
    for m in messages {
        outbox.entry(m.to).or_default().push((key, m));
    }
    outbox
}

/// The replica's task: takes everything queued, then drives rounds until raft-rs has nothing
/// more ready, then waits for the next input.
async fn run_replica(
    key: GroupKey,
    mut replica: PartitionReplica,
    mut queue: mpsc::UnboundedReceiver<Input>,
    links: Rc<PeerLinks>,
    status: Rc<Cell<ReplicaStatus>>,
) {
    while let Some(first) = queue.next().await {
        let mut next = Some(first);
        while let Some(input) = next.take().or_else(|| queue.try_recv().ok()) {
            let group = replica.group();
            match input {
                Input::Message(message) => {
                    if let Err(e) = group.step(message) {
                        tracing::warn!(group = group.name(), "replication: {e}");
                    }
                }
                Input::Tick => group.tick(),
                Input::Propose(batch, reply) => {
                    let _ = reply.send(group.propose(batch));
                }
            }
        }
        loop {
            let sent = replica.drive(|messages| links.send(outbox(key, messages))).await;
            match sent {
                Ok(messages) => links.send(outbox(key, messages)),
                Err(e) => {
                    tracing::error!("replication: {e}; this replica stops");
                    status.set(status_of(&mut replica, true));
                    return;
                }
            }
            if !replica.group().has_ready() {
                break;
            }
        }
        status.set(status_of(&mut replica, false));
    }
}

#[cfg(test)]
mod tests {
    //! Three nodes, each a glommio executor on its own thread with its own peer listener on
    //! loopback, its own directory and one replica of one partition: real sockets, real frames,
    //! real O_DIRECT files and fdatasync.

    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
    use std::sync::{mpsc as std_mpsc, Arc};
    use std::time::Instant;

    use bytes::Bytes;
    use glommio::net::TcpListener;
    use glommio::{LocalExecutorBuilder, Placement};

    use super::*;
    use crate::cluster::NodeInfo;
    use crate::record::builder::BatchBuilder;
    use crate::record::BatchHeader;
    use crate::replication::group::GroupSettings;
    use crate::storage::{Durability, LogConfig, Partition, ShardStorage, Visibility};

    const KEY: GroupKey = GroupKey { topic_id: 7, partition: 0 };
    const RECORDS: usize = 50;

    fn config() -> LogConfig {
        LogConfig {
            segment_bytes: 1 << 20,
            segment_ms: 3_600_000,
            retention_bytes: None,
            retention_ms: None,
            durability: Durability::Fsync,
            index_interval_bytes: 4096,
            batch_bytes_max: 1 << 20,
            records_per_batch_max: 1000,
            visibility: Visibility::Committed,
        }
    }

    fn info(id: u64, peer: SocketAddr) -> NodeInfo {
        NodeInfo { id, peer: peer.to_string(), native: String::new(), kafka: None, admin: String::new() }
    }

    /// Everything the node's committed log holds, batch by batch.
    async fn committed(partition: &Partition, end: i64) -> Vec<Bytes> {
        let mut out = Vec::new();
        let mut offset = 0;
        while offset < end {
            let read = partition.read(offset, 1 << 20).await.unwrap();
            for chunk in read.chunks {
                let mut position = 0;
                while position < chunk.len() {
                    let header = BatchHeader::parse(&chunk[position..]).unwrap();
                    out.push(chunk.slice(position..position + header.total_len()));
                    position += header.total_len();
                    offset = header.last_offset() + 1;
                }
            }
        }
        out.into_iter().filter(|b| BatchHeader::parse(b).unwrap().base_offset < end).collect()
    }

    #[test]
    fn three_nodes_replicate_a_partition_over_real_sockets() {
        let tmp = tempfile::tempdir().unwrap();
        let (addr_tx, addr_rx) = std_mpsc::channel();
        let (log_tx, log_rx) = std_mpsc::channel();
        let target = Arc::new(AtomicI64::new(-1));
        let reported = Arc::new(AtomicUsize::new(0));
        let mut voters_tx = Vec::new();
        let mut threads = Vec::new();
        for id in 1..=3u64 {
            let (tx, voters_rx) = std_mpsc::channel::<BTreeMap<u64, SocketAddr>>();
            voters_tx.push(tx);
            let (addr_tx, log_tx) = (addr_tx.clone(), log_tx.clone());
            let (target, reported) = (target.clone(), reported.clone());
            let dir = tmp.path().join(format!("node{id}"));
            let thread = LocalExecutorBuilder::new(Placement::Unbound)
                .io_memory(1 << 20)
                .spawn(move || async move {
                    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                    addr_tx.send((id, listener.local_addr().unwrap())).unwrap();
                    let voters = voters_rx.recv().unwrap();
                    let deliver_to: Rc<RefCell<Option<Rc<ReplicaHost>>>> = Rc::new(RefCell::new(None));
                    let route = deliver_to.clone();
                    let deliver: super::super::links::Deliver = Rc::new(move |_from, batch| {
                        if let Some(host) = route.borrow().as_ref() {
                            for (key, message) in batch.messages {
                                host.deliver(key, message);
                            }
                        }
                    });
                    let links =
                        PeerLinks::start(info(id, voters[&id]), 42, voters.clone(), listener, deliver);
                    let host = ReplicaHost::start(links, Duration::from_millis(50));
                    *deliver_to.borrow_mut() = Some(host.clone());

                    let shard = ShardStorage::new(dir.clone(), 1 << 20, 0);
                    let (partition, _) = Partition::open(dir.join("t/0"), config(), shard).await.unwrap();
                    let settings = GroupSettings::default();
                    let members = voters.keys().copied().collect();
                    let replica = PartitionReplica::open(
                        format!("t-0@{id}"),
                        id,
                        members,
                        partition.clone(),
                        settings,
                        id,
                    )
                    .await
                    .unwrap();
                    host.add(KEY, replica);

                    let deadline = Instant::now() + Duration::from_secs(60);
                    let mut next = 0;
                    loop {
                        assert!(Instant::now() < deadline, "node {id}: no progress: {:?}", host.status(KEY));
                        let status = host.status(KEY).unwrap();
                        assert!(!status.failed);
                        if status.serving && next < RECORDS {
                            let mut builder = BatchBuilder::new();
                            builder.push(1_700_000_000_000, None, Some(format!("v{next}").as_bytes()), &[]);
                            match host.propose(KEY, builder.finish()).await {
                                Ok(proposed) => {
                                    // One at a time: wait for this one to commit (or the term to end).
                                    while host.status(KEY).is_some_and(|s| {
                                        s.term == proposed.term && s.high_watermark <= proposed.last_offset
                                    }) {
                                        glommio::timer::sleep(Duration::from_millis(2)).await;
                                    }
                                    if host.status(KEY).is_some_and(|s| s.term == proposed.term) {
                                        next += 1;
                                    }
                                }
                                Err(e) => tracing::debug!("node {id}: {e}"),
                            }
                            if next == RECORDS {
                                target.store(partition.high_watermark(), Ordering::SeqCst);
                            }
                            continue;
                        }
                        let end = target.load(Ordering::SeqCst);
                        if end >= 0 && partition.high_watermark() >= end {
                            log_tx.send((id, committed(&partition, end).await)).unwrap();
                            reported.fetch_add(1, Ordering::SeqCst);
                            // Stay up (heartbeats, catch-up) until every node has its log.
                            while reported.load(Ordering::SeqCst) < 3 {
                                assert!(Instant::now() < deadline, "node {id}: the others did not catch up");
                                glommio::timer::sleep(Duration::from_millis(10)).await;
                            }
                            return;
                        }
                        glommio::timer::sleep(Duration::from_millis(5)).await;
                    }
                })
                .unwrap();
            threads.push(thread);
        }
        let voters: BTreeMap<u64, SocketAddr> = (0..3).map(|_| addr_rx.recv().unwrap()).collect();
        for tx in &voters_tx {
            tx.send(voters.clone()).unwrap();
        }
        for thread in threads {
            thread.join().unwrap();
        }
        let mut logs: Vec<(u64, Vec<Bytes>)> = (0..3).map(|_| log_rx.recv().unwrap()).collect();
        logs.sort_by_key(|(id, _)| *id);
        assert_eq!(logs[0].1, logs[1].1, "nodes 1 and 2 differ");
        assert_eq!(logs[0].1, logs[2].1, "nodes 1 and 3 differ");
        // In log order, first appearances: v0, v1, ... (a proposal whose term ended before its
        // commit is proposed again, and the first may still commit: no producer ids here).
        let mut values: Vec<String> = Vec::new();
        for batch in logs[0].1.iter().filter(|b| !BatchHeader::parse(b).unwrap().is_control()) {
            for record in crate::record::reader::records(batch).unwrap() {
                let value = String::from_utf8(record.unwrap().value.unwrap().to_vec()).unwrap();
                if !values.contains(&value) {
                    values.push(value);
                }
            }
        }
        let expected: Vec<String> = (0..RECORDS).map(|i| format!("v{i}")).collect();
        assert_eq!(values, expected);
    }
}
