//! One replica of one Raft group (a partition, or the controller): raft-rs's `RawNode` driven
//! sans-IO. The caller owns time, the network and the disk: it calls `tick` on its timer, `step`
//! with messages from peers, `propose` with a producer's batch, and after each of those `poll`,
//! which hands back messages to send now and, when there is something to persist, a `Persist`
//! whose messages may leave only once the caller has made the store's writes durable and called
//! `persisted`. That order is what keeps a vote or an acknowledgement from going out before the
//! state it promises is on disk (raft-rs's `persisted_messages`).
//!
//! Owns the replica's consensus state: role, term, commit, the high watermark (the Kafka offset
//! after the last committed entry), and whether a leader may serve (it has committed an entry of
//! its own term). Depends on raft-rs, `store`, `record` for stamping batches, and `rng`.

use bytes::{Bytes, BytesMut};
use std::collections::BTreeMap;

use raft::eraftpb::{Entry, Message, MessageType};
use raft::{Config, ProgressState, RawNode, SnapshotStatus, StateRole};
use thiserror::Error;

use super::in_sync::InSyncTracker;
use super::logging::raft_logger;
use super::quiesce::{is_quiesce, Quiescence};
use super::rng::SeededRng;
use super::snapshot::{SnapshotData, SnapshotDataError};
use super::store::{entry_offsets, ReplicaStore, StoreError};
use crate::record::{self, BatchHeader};

/// Deliberately broken behaviours, which exist only to prove that the simulator catches the bugs
/// they stand for (issue 13): `ringlog-sim --sabotage` and its tests set them; nothing else does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Sabotage {
    #[default]
    None,
    /// Acknowledge (vote, append response) before the write is durable.
    AckBeforeSync,
    /// Report the end of the log, committed or not, as the high watermark.
    ServeUncommitted,
}

/// Timing and flow-control of every group on a node. Ticks are the caller's timer periods.
#[derive(Debug, Clone, Copy)]
pub struct GroupSettings {
    /// The election timeout is drawn from `election_ticks..2 * election_ticks` at every term
    /// and role change.
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Bytes of entries in one append message.
    pub max_size_per_msg: u64,
    /// Append messages in flight to one follower.
    pub max_inflight_msgs: usize,
    /// Bytes proposed but not committed before proposals are refused (backpressure).
    pub max_uncommitted_bytes: u64,
    /// A leader's follower that has not held everything the leader held at some moment of this
    /// many ticks leaves the in-sync replicas (`replica_lag_time_max_ms`, in ticks).
    pub in_sync_lag_ticks: u64,
    /// Ticks a leader's group must be idle before it goes quiet (`quiesce`); 0: never (the
    /// controller's group, and the simulator unless asked).
    pub quiesce_after_ticks: u64,
    /// Always `Sabotage::None` outside the simulator's tests.
    pub sabotage: Sabotage,
}

impl Default for GroupSettings {
    fn default() -> Self {
        GroupSettings {
            election_ticks: 10,
            heartbeat_ticks: 2,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            max_uncommitted_bytes: 64 << 20,
            // Kafka's 30 s at the default 100 ms tick.
            in_sync_lag_ticks: 300,
            quiesce_after_ticks: 0,
            sabotage: Sabotage::None,
        }
    }
}

#[derive(Debug, Error)]
pub enum GroupError {
    #[error("group {group}: raft: {source}")]
    Raft { group: String, source: raft::Error },
    #[error("group {group}: {source}")]
    Store { group: String, source: StoreError },
    #[error("group {group}: a snapshot from node {from} is refused: {source}")]
    BadSnapshot { group: String, from: u64, source: SnapshotDataError },
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProposeError {
    #[error("this replica is not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<u64> },
    #[error("this replica was just elected and has not yet committed an entry of its term")]
    LeaderNotReady,
    #[error("the batch cannot be proposed: {0}")]
    BadBatch(String),
    #[error("too much is proposed and not yet committed; retry later ({0})")]
    Busy(String),
}

/// Where a proposal went: it is committed once the high watermark passes `last_offset`, if the
/// entry at `index` then still has `term`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proposed {
    pub index: u64,
    pub term: u64,
    pub base_offset: i64,
    pub last_offset: i64,
    /// An idempotent producer's retry of a batch already in the leader's log, answered with that
    /// batch's offsets instead of being proposed again (`index` is 0: the original's entry is
    /// committed once the high watermark passes it while `term` lasts, as a leader never cuts
    /// its own log).
    pub retry: bool,
}

/// Writes the caller must make durable; then `persisted(number)`, then send `then_send`.
#[derive(Debug)]
pub struct Persist {
    pub number: u64,
    pub then_send: Vec<Message>,
}

#[derive(Debug, Default)]
pub struct Output {
    /// Messages that need nothing persisted first (a leader's appends, heartbeats).
    pub send: Vec<Message>,
    pub persist: Option<Persist>,
    /// Entries newly committed (and persisted here), in order, for the state machine.
    pub committed: Vec<Entry>,
}

/// A leader's view of one follower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FollowerProgress {
    pub id: u64,
    pub in_sync: bool,
    /// Kafka offsets of the leader's log the follower lacks; `None` until it has answered this
    /// leader (raft-rs starts every match index at 0 on election).
    pub lag: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Follower,
    PreCandidate,
    Candidate,
    Leader,
}

pub struct RaftGroup<S: ReplicaStore> {
    name: String,
    raw: RawNode<S>,
    rng: SeededRng,
    settings: GroupSettings,
    /// Term and role when the election timeout was last drawn from `rng`.
    drawn_for: (u64, StateRole),
    commit_index: u64,
    high_watermark: i64,
    /// A leader that has committed an entry of its own term: its high watermark is at least every
    /// earlier leader's, so it may serve (Redpanda's confirmed term).
    serving: bool,
    /// The last `Persist` handed out and not yet reported durable.
    persisting: Option<u64>,
    /// The ready that restored a snapshot, until it is persisted. Until then raft-rs's applied
    /// index is below the restarted log's first index, and a campaign (which reads the entries
    /// after the applied index for pending configuration changes) would find them compacted and
    /// panic: the election clock stands still and a leadership transfer to it is ignored.
    restoring: Option<u64>,
    /// Ticks since the group was opened: the clock of `in_sync`.
    ticks: u64,
    /// On a leader, which followers are in sync.
    in_sync: InSyncTracker,
    /// Whether the group is quiet (ticks ignored), and the quiesce heartbeats to send.
    quiescence: Quiescence,
    /// On a leader, the tick at which each follower was first seen waiting for a snapshot.
    snapshot_since: BTreeMap<u64, u64>,
}

/// Ticks, in election timeouts, a leader waits for a follower to take a snapshot before sending
/// it again: a snapshot lost on the way (a dropped frame, a connection reset) would otherwise
/// leave raft-rs waiting for an answer that never comes.
const SNAPSHOT_RETRY_ELECTIONS: u64 = 3;

fn role(state: StateRole) -> Role {
    match state {
        StateRole::Follower => Role::Follower,
        StateRole::PreCandidate => Role::PreCandidate,
        StateRole::Candidate => Role::Candidate,
        StateRole::Leader => Role::Leader,
    }
}

impl<S: ReplicaStore> RaftGroup<S> {
    /// Opens replica `id` of the group `name` on `store` (which holds its members and whatever
    /// it persisted before). `seed` draws its election timeouts.
    pub fn new(
        id: u64,
        name: String,
        settings: GroupSettings,
        store: S,
        seed: u64,
    ) -> Result<RaftGroup<S>, GroupError> {
        let config = Config {
            id,
            election_tick: settings.election_ticks,
            heartbeat_tick: settings.heartbeat_ticks,
            max_size_per_msg: settings.max_size_per_msg,
            max_inflight_msgs: settings.max_inflight_msgs,
            max_uncommitted_size: settings.max_uncommitted_bytes.max(settings.max_size_per_msg),
            // A partitioned replica that comes back must not depose a healthy leader (pre-vote),
            // and a leader cut off from its quorum must step down instead of accepting writes
            // it can never commit (check-quorum). raft-rs has both off by default.
            pre_vote: true,
            check_quorum: true,
            ..Config::default()
        };
        let raft_error = |source| GroupError::Raft { group: name.clone(), source };
        let raw = RawNode::new(&config, store, &raft_logger(name.clone())).map_err(raft_error)?;
        // What the store compacted was committed and applied; the high watermark starts after it.
        let applied = raw.raft.raft_log.applied;
        let high_watermark = raw.store().end_offset(applied).unwrap_or(0);
        let mut group = RaftGroup {
            high_watermark,
            commit_index: applied,
            serving: false,
            persisting: None,
            restoring: None,
            ticks: 0,
            in_sync: InSyncTracker::new(settings.in_sync_lag_ticks),
            quiescence: Quiescence::new(settings.quiesce_after_ticks),
            snapshot_since: BTreeMap::new(),
            drawn_for: (raw.raft.term, raw.raft.state),
            name,
            raw,
            rng: SeededRng::new(seed),
            settings,
        };
        group.draw_election_timeout();
        Ok(group)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn id(&self) -> u64 {
        self.raw.raft.id
    }

    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    pub fn role(&self) -> Role {
        role(self.raw.raft.state)
    }

    pub fn leader(&self) -> Option<u64> {
        Some(self.raw.raft.leader_id).filter(|&id| id != raft::INVALID_ID)
    }

    /// Leader that may serve reads and take writes.
    pub fn is_serving(&self) -> bool {
        self.serving && self.raw.raft.state == StateRole::Leader
    }

    /// The last committed (and locally persisted) index this replica has applied.
    pub fn commit_index(&self) -> u64 {
        self.commit_index
    }

    /// On a leader, the lowest index every *in-sync* voter is known to hold; `None` on a
    /// follower. What a leader may forget (and retention delete): a follower out of the in-sync
    /// replicas (down, or behind for longer than the lag) does not hold it back, and is brought
    /// forward with a snapshot if it returns behind the leader's log start.
    pub fn lowest_match_in_sync(&self) -> Option<u64> {
        if self.raw.raft.state != StateRole::Leader {
            return None;
        }
        let me = self.raw.raft.id;
        let last = self.raw.raft.raft_log.last_index();
        let held = self.raw.raft.prs().iter().filter(|(&id, _)| id == me || self.in_sync.in_sync(id));
        held.map(|(&id, pr)| if id == me { last } else { pr.matched }).min()
    }

    /// The Kafka offset after the last committed entry: consumers read below it.
    pub fn high_watermark(&self) -> i64 {
        if self.settings.sabotage == Sabotage::ServeUncommitted {
            let last = self.raw.raft.raft_log.last_index();
            return self.end_offset_at(last).unwrap_or(self.high_watermark);
        }
        self.high_watermark
    }

    pub fn store(&self) -> &S {
        self.raw.store()
    }

    /// The store, for what the caller does with it beside consensus (taking its file writes).
    pub fn store_mut(&mut self) -> &mut S {
        self.raw.mut_store()
    }

    /// A tick of the caller's timer, every node counted live: see `tick_with`.
    pub fn tick(&mut self) {
        self.tick_with(|_| true);
    }

    /// A tick of the caller's timer; ignored while the group is quiet (its time stands still,
    /// for elections and for the in-sync replicas alike). `live`: whether a node is up, by the
    /// node-level liveness the caller keeps (a leader goes quiet only with every follower up).
    pub fn tick_with(&mut self, live: impl Fn(u64) -> bool) {
        if self.quiescence.is_quiet() || self.restoring.is_some() {
            return;
        }
        self.ticks += 1;
        self.raw.tick();
        self.after_raft_call();
        if self.raw.raft.state == StateRole::Leader {
            let raft = &self.raw.raft;
            let matched = raft.prs().iter().map(|(&id, pr)| (id, pr.matched));
            self.in_sync.observe(self.ticks, raft.raft_log.last_index(), raft.raft_log.committed, matched);
            self.retry_lost_snapshots();
        }
        // A leader with a follower out of sync stays awake: a quiet group's in-sync clock stands
        // still, so the follower would never be counted back in.
        let raft = &self.raw.raft;
        let all_in_sync = raft.state != StateRole::Leader
            || raft.prs().iter().all(|(&id, _)| id == raft.id || self.in_sync.in_sync(id));
        let idle = self.serving && self.persisting.is_none() && all_in_sync;
        self.quiescence.after_tick(&self.raw, idle, live);
    }

    /// Whether the next tick starts an election: the election timeout of a replica that may
    /// lead runs out with it (a follower's, or a candidate's whose election did not finish).
    pub fn election_due(&self) -> bool {
        let raft = &self.raw.raft;
        raft.state != StateRole::Leader
            && !self.quiescence.is_quiet()
            && self.restoring.is_none()
            && raft.promotable()
            && raft.election_elapsed + 1 >= raft.randomized_election_timeout()
    }

    /// Whether an election of this replica is under way (pre-vote or vote).
    pub fn campaigning(&self) -> bool {
        matches!(self.raw.raft.state, StateRole::PreCandidate | StateRole::Candidate)
    }

    /// A follower that has waited for its snapshot for `SNAPSHOT_RETRY_ELECTIONS` election
    /// timeouts is reported failed to raft-rs, which probes it again and sends a new snapshot if
    /// it still needs one.
    fn retry_lost_snapshots(&mut self) {
        let waiting: Vec<u64> = self
            .raw
            .raft
            .prs()
            .iter()
            .filter(|(_, pr)| pr.state == ProgressState::Snapshot)
            .map(|(&id, _)| id)
            .collect();
        self.snapshot_since.retain(|id, _| waiting.contains(id));
        let patience = SNAPSHOT_RETRY_ELECTIONS * self.settings.election_ticks as u64;
        for id in waiting {
            let since = *self.snapshot_since.entry(id).or_insert(self.ticks);
            if self.ticks - since >= patience {
                tracing::info!(
                    group = self.name,
                    follower = id,
                    "replication: no answer to a snapshot; sending again"
                );
                self.snapshot_since.remove(&id);
                self.raw.report_snapshot(id, SnapshotStatus::Failure);
            }
        }
    }

    /// The group is quiet: it ignores ticks until a proposal, a message or a node's death wakes it.
    pub fn is_quiet(&self) -> bool {
        self.quiescence.is_quiet()
    }

    /// Node-level liveness changed: a quiet group whose leader's node (or, on a leader, a
    /// follower's) is `down` wakes; a follower then campaigns within an election timeout.
    /// Returns whether it woke.
    pub fn on_nodes_down(&mut self, down: impl Fn(u64) -> bool) -> bool {
        self.quiescence.on_nodes_down(&mut self.raw, down)
    }

    /// On a leader, each follower's progress; nothing on a follower.
    pub fn followers(&self) -> impl Iterator<Item = FollowerProgress> + '_ {
        let raft = &self.raw.raft;
        let leading = raft.state == StateRole::Leader;
        let end = if leading { self.end_offset_at(raft.raft_log.last_index()).ok() } else { None };
        raft.prs().iter().filter(move |(&id, _)| leading && id != raft.id).map(move |(&id, pr)| {
            let held = (pr.matched > 0).then(|| self.end_offset_at(pr.matched).ok()).flatten();
            FollowerProgress { id, in_sync: self.in_sync.in_sync(id), lag: end.zip(held).map(|(e, h)| e - h) }
        })
    }

    /// Steps a message from a peer. A message raft-rs refuses is dropped with the reason: it
    /// comes from the network and must not stop the group.
    pub fn step(&mut self, mut message: Message) -> Result<(), GroupError> {
        if message.get_msg_type() == MessageType::MsgSnapshot {
            // Checked before raft-rs restores it: once restored, the log must be able to take it.
            let snapshot = message.get_snapshot();
            SnapshotData::decode(&snapshot.data, snapshot.get_metadata().index).map_err(|source| {
                GroupError::BadSnapshot { group: self.name.clone(), from: message.from, source }
            })?;
        }
        if self.restoring.is_some() && message.get_msg_type() == MessageType::MsgTimeoutNow {
            return Ok(());
        }
        let (from, term, commit) = (message.from, message.term, message.commit);
        let quiesce = is_quiesce(&message);
        if quiesce {
            // A heartbeat like any other for raft-rs (a context would make it a read-index
            // answer). A commit past this log would make raft-rs panic: a correct leader never
            // sends one (every follower held the whole log when it went quiet), so the commit is
            // left out and the follower stays awake.
            message.context = Bytes::new();
            if commit > self.raw.raft.raft_log.last_index() {
                message.commit = self.raw.raft.raft_log.committed;
            }
        }
        let answer = self.quiescence.is_answer(&self.raw, &message);
        let outcome = self.raw.step(message);
        self.quiescence.after_step(&mut self.raw, answer);
        if quiesce {
            self.quiescence.on_quiesce(&self.raw, from, term, commit);
        }
        self.after_raft_call();
        if self.raw.raft.state == StateRole::Leader && term == self.raw.raft.term {
            self.in_sync.heard(from, self.ticks);
        }
        match outcome {
            Ok(()) | Err(raft::Error::StepPeerNotFound) | Err(raft::Error::StepLocalMsg) => Ok(()),
            Err(source) => Err(GroupError::Raft { group: self.name.clone(), source }),
        }
    }

    /// Entries the store could not give at once (`LogTemporarilyUnavailable`) are now in it.
    pub fn on_entries_fetched(&mut self, context: raft::GetEntriesContext) {
        if context.can_async() {
            self.raw.on_entries_fetched(context);
            self.after_raft_call();
        }
    }

    /// Starts an election now (a new group's preferred replica; tests).
    pub fn campaign(&mut self) -> Result<(), GroupError> {
        self.quiescence.wake(&mut self.raw);
        let outcome = self.raw.campaign();
        self.after_raft_call();
        outcome.map_err(|source| GroupError::Raft { group: self.name.clone(), source })
    }

    /// Asks the leader to hand leadership to `to` once it has caught up.
    pub fn transfer_leader(&mut self, to: u64) {
        self.quiescence.wake(&mut self.raw);
        self.raw.transfer_leader(to);
        self.after_raft_call();
    }

    /// Whether this replica may take proposals now: it leads, and has committed an entry of its
    /// term (so its log holds everything committed before).
    pub fn may_propose(&self) -> Result<(), ProposeError> {
        if self.raw.raft.state != StateRole::Leader {
            return Err(ProposeError::NotLeader { leader: self.leader() });
        }
        if !self.serving {
            return Err(ProposeError::LeaderNotReady);
        }
        Ok(())
    }

    /// The batches of entries raft-rs holds that the store has not been given yet, in log order:
    /// on a leader, what it proposed since its last round.
    pub fn unstable_batches(&self) -> impl Iterator<Item = &Bytes> {
        let unstable = &self.raw.raft.raft_log.unstable;
        unstable
            .entries
            .iter()
            .filter(|e| e.get_entry_type() == raft::eraftpb::EntryType::EntryNormal && !e.data.is_empty())
            .map(|e| &e.data)
    }

    /// Appends a producer's batch (validated by the caller) to the log: stamps its base offset
    /// and leader epoch (this term) and proposes it, without copying it.
    pub fn propose(&mut self, mut batch: BytesMut) -> Result<Proposed, ProposeError> {
        self.may_propose()?;
        self.quiescence.wake(&mut self.raw);
        let header = BatchHeader::parse(&batch).map_err(|e| ProposeError::BadBatch(e.to_string()))?;
        if header.total_len() != batch.len() || header.last_offset_delta < 0 {
            return Err(ProposeError::BadBatch(format!(
                "{} bytes given, header says {}",
                batch.len(),
                header.total_len()
            )));
        }
        let term = self.raw.raft.term;
        let epoch = i32::try_from(term)
            .map_err(|_| ProposeError::BadBatch(format!("term {term} exceeds a leader epoch")))?;
        let index = self.raw.raft.raft_log.last_index() + 1;
        let base_offset = self.end_offset_at(index - 1).map_err(|e| ProposeError::BadBatch(e.to_string()))?;
        record::set_base_offset(&mut batch, base_offset);
        record::set_partition_leader_epoch(&mut batch, epoch);
        let mut message = Message::default();
        message.set_msg_type(MessageType::MsgPropose);
        message.from = self.raw.raft.id;
        let entry = Entry { data: batch.freeze(), ..Default::default() };
        message.set_entries(vec![entry].into());
        let outcome = self.raw.raft.step(message);
        self.after_raft_call();
        match outcome {
            Ok(()) => {
                debug_assert_eq!(self.raw.raft.raft_log.last_index(), index);
                let last_offset = base_offset + i64::from(header.last_offset_delta);
                Ok(Proposed { index, term, base_offset, last_offset, retry: false })
            }
            Err(raft::Error::ProposalDropped) if self.raw.raft.state == StateRole::Leader => {
                Err(ProposeError::Busy(format!(
                    "over {} bytes uncommitted, or a leadership transfer is under way",
                    self.settings.max_uncommitted_bytes
                )))
            }
            Err(_) => Err(ProposeError::NotLeader { leader: self.leader() }),
        }
    }

    /// The Kafka offset after the entry at `index`, which may still be in raft-rs's unstable log
    /// (proposed or received, not yet handed to the store).
    fn end_offset_at(&self, index: u64) -> Result<i64, StoreError> {
        let unstable = &self.raw.raft.raft_log.unstable;
        let mut at = index;
        let mut empty_entries_after = 0;
        while at >= unstable.offset && at > 0 {
            let Some(entry) = unstable.entries.get((at - unstable.offset) as usize) else { break };
            let (base, count) = entry_offsets(entry, 0)?;
            if entry.get_entry_type() == raft::eraftpb::EntryType::EntryNormal && !entry.data.is_empty() {
                return Ok(base + count + empty_entries_after);
            }
            empty_entries_after += count;
            at -= 1;
        }
        let stored = self
            .raw
            .store()
            .end_offset(at)
            .ok_or(StoreError::IndexGap { index: at, last: self.raw.store().last_index().unwrap_or(0) })?;
        Ok(stored + empty_entries_after)
    }

    /// Whether `poll` would hand over anything.
    pub fn has_ready(&self) -> bool {
        self.raw.has_ready() || self.quiescence.has_outgoing()
    }

    /// Hands over what raft-rs has ready: messages, writes for the store, committed entries.
    pub fn poll(&mut self) -> Result<Output, GroupError> {
        // Quiesce heartbeats go after whatever raft-rs sends in the same pass: a follower that
        // got the tick's plain heartbeat after its quiesce heartbeat would wake at once.
        let quiesce = self.quiescence.take_outgoing();
        let mut output = Output::default();
        if !self.raw.has_ready() {
            output.send = quiesce;
            return Ok(output);
        }
        let mut ready = self.raw.ready();
        output.send = ready.take_messages();
        output.send.extend(quiesce);
        let name = self.name.clone();
        let store_error = |source| GroupError::Store { group: name.clone(), source };
        let hard_state = ready.hs().cloned();
        let restored = !ready.snapshot().is_empty();
        if restored {
            // The hard state first: the restart's state save carries its term and vote.
            if let Some(hard_state) = &hard_state {
                self.raw.mut_store().set_hard_state(hard_state).map_err(store_error)?;
            }
            let snapshot = ready.snapshot().clone();
            self.raw.mut_store().apply_snapshot(&snapshot).map_err(store_error)?;
            self.restored(snapshot.get_metadata().index)?;
        }
        let entries = ready.take_entries();
        self.raw.mut_store().append(&entries).map_err(store_error)?;
        if let (Some(hard_state), false) = (&hard_state, restored) {
            self.raw.mut_store().set_hard_state(hard_state).map_err(store_error)?;
        }
        let committed = ready.take_committed_entries();
        let mut then_send = ready.take_persisted_messages();
        if self.settings.sabotage == Sabotage::AckBeforeSync {
            output.send.append(&mut then_send);
        }
        let number = ready.number();
        self.raw.advance_append_async(ready);
        if entries.is_empty() && hard_state.is_none() && !restored && self.persisting.is_none() {
            // Nothing written and nothing being written: what waits on persistence can go now.
            // (With a write in flight it waits for that write: an acknowledgement in this ready
            // may cover entries an earlier ready is still persisting.)
            self.raw.on_persist_ready(number);
            output.send.extend(then_send);
        } else {
            self.persisting = Some(number);
            output.persist = Some(Persist { number, then_send });
        }
        if restored {
            self.restoring = Some(number);
        }
        self.apply(&committed)?;
        output.committed = committed;
        Ok(output)
    }

    /// The store's writes up to `Persist::number` are durable. Reports may arrive out of order; a durable write covers every earlier one.
    pub fn persisted(&mut self, number: u64) {
        if self.persisting.is_some_and(|last| last <= number) {
            self.persisting = None;
        }
        self.raw.on_persist_ready(number);
        if self.restoring.is_some_and(|restore| restore <= number) {
            // The restored snapshot is persisted, so applied (`restored` moved the commit index
            // to it): raft-rs's applied index follows.
            self.restoring = None;
            self.raw.advance_apply_to(self.commit_index);
        }
        self.after_raft_call();
    }

    /// A leader's snapshot of entry `index` replaced the log: everything up to it is committed
    /// and, once the caller has carried out the store's restart, durable here.
    fn restored(&mut self, index: u64) -> Result<(), GroupError> {
        let end = self.raw.store().end_offset(index).ok_or_else(|| GroupError::Store {
            group: self.name.clone(),
            source: StoreError::IndexGap { index, last: self.commit_index },
        })?;
        // raft-rs restores only a snapshot past its commit.
        assert!(index >= self.commit_index, "a snapshot took {} back to {index}", self.name);
        assert!(end >= self.high_watermark, "a snapshot took {}'s high watermark back", self.name);
        self.commit_index = index;
        self.high_watermark = end;
        Ok(())
    }

    fn apply(&mut self, committed: &[Entry]) -> Result<(), GroupError> {
        let Some(last) = committed.last() else { return Ok(()) };
        let end = self.raw.store().end_offset(last.index).ok_or_else(|| GroupError::Store {
            group: self.name.clone(),
            source: StoreError::IndexGap { index: last.index, last: self.commit_index },
        })?;
        // raft-rs hands out committed entries only once they are persisted here, in order.
        assert!(last.index > self.commit_index, "commit index went backwards in {}", self.name);
        assert!(end >= self.high_watermark, "high watermark went backwards in {}", self.name);
        self.commit_index = last.index;
        self.high_watermark = end;
        if self.raw.raft.state == StateRole::Leader && committed.iter().any(|e| e.term == self.raw.raft.term)
        {
            self.serving = true;
        }
        self.raw.advance_apply_to(last.index);
        Ok(())
    }

    /// After anything raft-rs did: a new term or role drew a new election timeout from raft-rs's
    /// `thread_rng`; replace it with one from our seed, a leader that lost its term stops
    /// serving, and a new leader starts tracking which followers are in sync.
    fn after_raft_call(&mut self) {
        let now = (self.raw.raft.term, self.raw.raft.state);
        if now != self.drawn_for {
            self.drawn_for = now;
            self.draw_election_timeout();
            self.serving = false;
            if now.1 == StateRole::Leader {
                let me = self.raw.raft.id;
                let followers = self.raw.raft.prs().iter().map(|(&id, _)| id).filter(|&id| id != me);
                self.in_sync.lead(self.ticks, followers);
            } else {
                self.in_sync.stop();
            }
        }
    }

    fn draw_election_timeout(&mut self) {
        // raft-rs's range with min and max left at 0: [election, 2 * election).
        let low = self.settings.election_ticks as u64;
        let timeout = self.rng.range(low, 2 * low) as usize;
        self.raw.raft.set_randomized_election_timeout(timeout);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::builder::BatchBuilder;
    use crate::replication::epochs::LeaderEpochs;
    use crate::replication::replica_log::{CacheLimits, ReplicaLog, ReplicaState};
    use raft::{GetEntriesContext, Storage};

    /// Three replicas, messages delivered and writes taken as durable at once, in order (the
    /// writes themselves are `replica_log`'s tests').
    fn settle(groups: &mut [RaftGroup<ReplicaLog>]) {
        for _ in 0..100 {
            let mut mail = Vec::new();
            for group in groups.iter_mut() {
                let output = group.poll().unwrap();
                group.store_mut().take_writes();
                mail.extend(output.send);
                if let Some(persist) = output.persist {
                    group.persisted(persist.number);
                    mail.extend(persist.then_send);
                }
            }
            if mail.is_empty() {
                return;
            }
            for m in mail {
                groups[(m.to - 1) as usize].step(m).unwrap();
            }
        }
        panic!("the group did not settle");
    }

    fn batch(records: usize) -> BytesMut {
        let mut builder = BatchBuilder::new();
        for i in 0..records {
            builder.push(1_700_000_000_000, None, Some(format!("v{i}").as_bytes()), &[]);
        }
        builder.finish()
    }

    #[test]
    fn leader_stamps_offsets_and_epoch_and_serves_after_its_first_commit() {
        let mut groups: Vec<_> = (1..=3)
            .map(|id| {
                let state = ReplicaState::new(vec![1, 2, 3], 0);
                let store =
                    ReplicaLog::open(state, LeaderEpochs::default(), [], CacheLimits::default()).unwrap();
                RaftGroup::new(id, format!("t-0@{id}"), GroupSettings::default(), store, id).unwrap()
            })
            .collect();
        assert_eq!(groups[1].propose(batch(1)), Err(ProposeError::NotLeader { leader: None }));
        groups[0].campaign().unwrap();
        // Elected, but its empty entry is not committed until the followers have it.
        let output = groups[0].poll().unwrap();
        groups[0].store_mut().take_writes();
        if groups[0].role() == Role::Leader {
            assert_eq!(groups[0].propose(batch(1)), Err(ProposeError::LeaderNotReady));
        }
        for m in output.send {
            groups[(m.to - 1) as usize].step(m).unwrap();
        }
        if let Some(persist) = output.persist {
            groups[0].persisted(persist.number);
            for m in persist.then_send {
                groups[(m.to - 1) as usize].step(m).unwrap();
            }
        }
        settle(&mut groups);
        assert!(groups[0].is_serving());
        assert_eq!(groups[2].propose(batch(1)), Err(ProposeError::NotLeader { leader: Some(1) }));
        // The empty entry took offset 0: the first batch starts at 1.
        let first = groups[0].propose(batch(3)).unwrap();
        let second = groups[0].propose(batch(2)).unwrap();
        assert_eq!((first.base_offset, first.last_offset, second.base_offset), (1, 3, 4));
        settle(&mut groups);
        for group in &groups {
            assert_eq!(group.high_watermark(), 6, "{}", group.name());
            let context = GetEntriesContext::empty(false);
            let entries = group.store().entries(second.index, second.index + 1, None, context).unwrap();
            let entry = &entries[0];
            let end = group.store().end_offset(second.index).unwrap();
            let header = BatchHeader::parse(&entry.data).unwrap();
            assert_eq!((header.base_offset, end), (4, 6));
            assert_eq!(header.partition_leader_epoch as u64, first.term);
            record::validate(&entry.data).unwrap();
        }
        let epochs = groups[2].store().epochs();
        assert_eq!(epochs.term_at(second.index), Some(first.term));
        assert_eq!(epochs.end_for(first.term, 6).end_offset, Some(6));
        // A batch that is not whole is refused before it reaches the log.
        let mut cut = batch(1);
        cut.truncate(cut.len() - 1);
        assert!(matches!(groups[0].propose(cut), Err(ProposeError::BadBatch(_))));
    }

    /// `election_due` is true on exactly the tick that starts an election, which is what lets a
    /// node hold an election back by not counting that tick.
    #[test]
    fn an_election_is_due_on_the_tick_that_starts_it() {
        let state = ReplicaState::new(vec![1, 2, 3], 0);
        let store = ReplicaLog::open(state, LeaderEpochs::default(), [], CacheLimits::default()).unwrap();
        let settings = GroupSettings { quiesce_after_ticks: 0, ..GroupSettings::default() };
        let mut follower = RaftGroup::new(1, "t-0@1".into(), settings, store, 7).unwrap();
        let mut ticks = 0;
        while !follower.election_due() {
            assert!(!follower.campaigning());
            follower.tick_with(|_| true);
            ticks += 1;
            assert!(ticks < 4 * settings.election_ticks, "never due");
        }
        // Held back: asked again, still due, and nothing started.
        assert!(follower.election_due() && !follower.campaigning());
        follower.tick_with(|_| true);
        assert!(follower.campaigning(), "the due tick started an election (pre-vote)");
        assert!(!follower.election_due());
    }
}
