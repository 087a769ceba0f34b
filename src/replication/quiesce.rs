//! Idle groups go quiet (issue 11, stop 15; docs/replication.md, "Idle groups go quiet"): what
//! TiKV calls hibernating regions and CockroachDB quiescence. A leader whose group has been idle
//! for a few ticks — nothing proposed, written or in flight, every follower holding the whole log,
//! which is committed — sends each follower one last heartbeat marked *quiesce* (it carries the
//! commit, so the followers know it) and stops ticking; a follower that holds exactly that log
//! stops ticking too. No heartbeats, no election timers: an idle partition costs nothing per tick.
//!
//! Why it is safe: ticks only start heartbeats and elections; no Raft safety property depends on
//! them, and the quiesce heartbeat is a real heartbeat of the leader's term. What quiescence can
//! break is liveness, so every way out is explicit: any proposal, any message for the group
//! (except the followers' answers to the quiesce heartbeat itself), and node-level liveness — a
//! follower that learns its leader's node is down wakes with its leader lease expired, so it
//! campaigns within an election timeout and the other follower grants it a (pre-)vote; a leader
//! that learns a follower's node is down wakes, so check-quorum and the in-sync replicas see it.
//! A waking leader restarts its check-quorum count, so the ticks it spent quiet never make it
//! step down before its followers could answer.
//!
//! Owns: the quiet state of one group and the idleness rule. No IO and no clock: the caller's
//! ticks and its view of which nodes are live come in as arguments. Depends on raft-rs.

use bytes::Bytes;
use raft::eraftpb::{Message, MessageType};
use raft::ProgressState;
use raft::{RawNode, StateRole, Storage, INVALID_INDEX};

/// The context of the heartbeat that asks a follower to go quiet. Heartbeats otherwise carry a
/// context only for read-index requests, which ringlog does not use.
pub const QUIESCE_CONTEXT: &[u8] = b"ringlog:quiesce";

/// Whether `message` is a leader's quiesce heartbeat.
pub fn is_quiesce(message: &Message) -> bool {
    message.get_msg_type() == MessageType::MsgHeartbeat && message.context.as_ref() == QUIESCE_CONTEXT
}

/// One group's quiet state.
#[derive(Debug)]
pub struct Quiescence {
    /// Idle ticks before a leader goes quiet; 0: never.
    after_ticks: u64,
    idle_ticks: u64,
    quiet: bool,
    /// Quiesce heartbeats to hand out with the next `poll`.
    outgoing: Vec<Message>,
}

impl Quiescence {
    pub fn new(after_ticks: u64) -> Quiescence {
        Quiescence { after_ticks, idle_ticks: 0, quiet: false, outgoing: Vec::new() }
    }

    pub fn is_quiet(&self) -> bool {
        self.quiet
    }

    /// Quiesce heartbeats waiting to be sent.
    pub fn take_outgoing(&mut self) -> Vec<Message> {
        std::mem::take(&mut self.outgoing)
    }

    pub fn has_outgoing(&self) -> bool {
        !self.outgoing.is_empty()
    }

    /// After a tick of an awake group: on an idle leader (`idle` also covers what the caller
    /// knows: nothing being persisted, the leader serving) whose followers' nodes are all `live`,
    /// counts the tick; at `after_ticks` goes quiet and queues a quiesce heartbeat to each
    /// follower. Any tick that is not idle starts the count again.
    pub fn after_tick<S: Storage>(&mut self, raw: &RawNode<S>, idle: bool, live: impl Fn(u64) -> bool) {
        let raft = &raw.raft;
        let followers_live = raft.prs().iter().all(|(&id, _)| id == raft.id || live(id));
        if self.after_ticks == 0 || !idle || !followers_live || !leader_is_idle(raw) {
            self.idle_ticks = 0;
            return;
        }
        self.idle_ticks += 1;
        if self.idle_ticks < self.after_ticks {
            return;
        }
        let commit = raft.raft_log.committed;
        for (&id, _) in raft.prs().iter().filter(|(&id, _)| id != raft.id) {
            let mut beat = Message::default();
            beat.set_msg_type(MessageType::MsgHeartbeat);
            beat.to = id;
            beat.from = raft.id;
            beat.term = raft.term;
            // Every follower holds the whole log (`leader_is_idle`): the full commit is safe to
            // send, as raft-rs's own heartbeats send min(match, commit).
            beat.commit = commit;
            beat.context = Bytes::from_static(QUIESCE_CONTEXT);
            self.outgoing.push(beat);
        }
        self.quiet = true;
        tracing::debug!(target: "raft", term = raft.term, commit, "group goes quiet");
    }

    /// On a follower that has just stepped a quiesce heartbeat from `from` for `term` with
    /// `commit`: goes quiet only if it follows `from` in `term` and its log ends exactly at the
    /// commit, which it knows (so it lacks nothing and holds nothing uncommitted). Otherwise it
    /// stays awake: its election timer will wake the others if something is wrong.
    pub fn on_quiesce<S: Storage>(&mut self, raw: &RawNode<S>, from: u64, term: u64, commit: u64) {
        let raft = &raw.raft;
        let log = &raft.raft_log;
        if raft.state == StateRole::Follower
            && raft.term == term
            && raft.leader_id == from
            && log.committed == commit
            && log.last_index() == commit
        {
            self.quiet = true;
        }
    }

    /// Wakes a quiet group (proposal, message, campaign). A leader restarts its check-quorum
    /// count: it stopped ticking, so the followers must get a whole election timeout to answer
    /// before it counts who did.
    pub fn wake<S: Storage>(&mut self, raw: &mut RawNode<S>) {
        if !self.quiet {
            return;
        }
        self.quiet = false;
        self.idle_ticks = 0;
        // Not sent yet: the followers stay awake with their leader.
        self.outgoing.clear();
        if raw.raft.state == StateRole::Leader {
            raw.raft.election_elapsed = 0;
        }
    }

    /// Whether `message`, about to be stepped, is a follower's answer to this quiet leader's
    /// quiesce heartbeat (a heartbeat response of its term): the one message that need not wake it.
    pub fn is_answer<S: Storage>(&self, raw: &RawNode<S>, message: &Message) -> bool {
        self.quiet
            && raw.raft.state == StateRole::Leader
            && message.get_msg_type() == MessageType::MsgHeartbeatResponse
            && message.term == raw.raft.term
    }

    /// After a message was stepped: a quiet group wakes unless the message was an answer
    /// (`is_answer`, asked before the step) that left the leader idle.
    pub fn after_step<S: Storage>(&mut self, raw: &mut RawNode<S>, answer: bool) {
        if self.quiet && !(answer && leader_is_idle(raw)) {
            self.wake(raw);
        }
    }

    /// Node-level liveness changed. A quiet follower whose leader's node is `down` wakes with its
    /// leader lease over, so it campaigns within an election timeout (its randomized timeout
    /// minus the base one) and grants a peer's pre-vote at once; a quiet leader with a follower's
    /// node down wakes, so check-quorum and the in-sync replicas see that follower go. Returns
    /// whether the group woke.
    pub fn on_nodes_down<S: Storage>(&mut self, raw: &mut RawNode<S>, down: impl Fn(u64) -> bool) -> bool {
        if !self.quiet {
            return false;
        }
        let raft = &raw.raft;
        match raft.state {
            StateRole::Leader => {
                if !raft.prs().iter().any(|(&id, _)| id != raft.id && down(id)) {
                    return false;
                }
                self.wake(raw);
            }
            _ => {
                let leader = raft.leader_id;
                if leader != raft::INVALID_ID && !down(leader) {
                    return false;
                }
                self.wake(raw);
                let timeout = raw.raft.election_timeout();
                raw.raft.election_elapsed = timeout;
            }
        }
        true
    }
}

/// A leader with nothing to do: its log is committed and applied, each follower holds all of it
/// with nothing in flight, no leadership transfer or membership change is under way.
fn leader_is_idle<S: Storage>(raw: &RawNode<S>) -> bool {
    let raft = &raw.raft;
    let log = &raft.raft_log;
    let last = log.last_index();
    raft.state == StateRole::Leader
        && log.unstable.entries.is_empty()
        && log.committed == last
        && log.applied == last
        && raft.lead_transferee.is_none()
        && raft.pending_conf_index <= log.committed
        && raft.prs().iter().all(|(&id, pr)| {
            id == raft.id
                || (pr.matched == last
                    && pr.state == ProgressState::Replicate
                    && pr.ins.count() == 0
                    && pr.pending_request_snapshot == INVALID_INDEX)
        })
}

#[cfg(test)]
mod tests {
    use crate::record::builder::BatchBuilder;
    use crate::replication::epochs::LeaderEpochs;
    use crate::replication::group::{GroupSettings, RaftGroup, Role};
    use crate::replication::replica_log::{CacheLimits, ReplicaLog, ReplicaState};

    fn groups() -> Vec<RaftGroup<ReplicaLog>> {
        (1..=3)
            .map(|id| {
                let state = ReplicaState::new(vec![1, 2, 3], 0);
                let store =
                    ReplicaLog::open(state, LeaderEpochs::default(), [], CacheLimits::default()).unwrap();
                let settings = GroupSettings { quiesce_after_ticks: 3, ..GroupSettings::default() };
                RaftGroup::new(id, format!("q@{id}"), settings, store, id).unwrap()
            })
            .collect()
    }

    /// Delivers everything the live groups send (writes durable at once) until nothing moves;
    /// returns the number of messages that were sent.
    fn settle(groups: &mut [RaftGroup<ReplicaLog>], up: &[bool]) -> usize {
        let mut sent = 0;
        for _ in 0..100 {
            let mut mail = Vec::new();
            for (_, group) in groups.iter_mut().enumerate().filter(|(i, _)| up[*i]) {
                let output = group.poll().unwrap();
                group.store_mut().take_writes();
                mail.extend(output.send);
                if let Some(persist) = output.persist {
                    group.persisted(persist.number);
                    mail.extend(persist.then_send);
                }
            }
            if mail.is_empty() {
                return sent;
            }
            sent += mail.len();
            for m in mail.into_iter().filter(|m| up[(m.to - 1) as usize]) {
                groups[(m.to - 1) as usize].step(m).unwrap();
            }
        }
        panic!("the groups did not settle");
    }

    /// One tick of every live group, with the nodes that are not `up` counted down, then delivery.
    fn tick(groups: &mut [RaftGroup<ReplicaLog>], up: &[bool]) -> usize {
        for (_, group) in groups.iter_mut().enumerate().filter(|(i, _)| up[*i]) {
            group.on_nodes_down(|id| !up[(id - 1) as usize]);
            group.tick_with(|id| up[(id - 1) as usize]);
        }
        settle(groups, up)
    }

    fn batch() -> bytes::BytesMut {
        let mut builder = BatchBuilder::new();
        builder.push(1_700_000_000_000, None, Some(b"v"), &[]);
        builder.finish()
    }

    #[test]
    fn an_idle_group_goes_quiet_wakes_on_a_write_and_fails_over_when_its_leaders_node_dies() {
        let mut groups = groups();
        let mut up = [true; 3];
        groups[0].campaign().unwrap();
        settle(&mut groups, &up);
        assert!(groups[0].is_serving());
        groups[0].propose(batch()).unwrap();
        settle(&mut groups, &up);

        // Idle: after a few ticks every replica is quiet, and ticks send nothing more.
        for _ in 0..10 {
            tick(&mut groups, &up);
        }
        assert!(groups.iter().all(RaftGroup::is_quiet), "all quiet");
        assert_eq!((0..50).map(|_| tick(&mut groups, &up)).sum::<usize>(), 0, "quiet groups sent messages");

        // A write wakes the leader, its append wakes the followers, and all go quiet again.
        let proposed = groups[0].propose(batch()).unwrap();
        assert!(!groups[0].is_quiet());
        settle(&mut groups, &up);
        assert!(groups.iter().all(|g| g.high_watermark() > proposed.last_offset));
        for _ in 0..10 {
            tick(&mut groups, &up);
        }
        assert!(groups.iter().all(RaftGroup::is_quiet), "quiet again");
        // The leader's long quiet does not make check-quorum depose it once it wakes.
        groups[0].propose(batch()).unwrap();
        for _ in 0..40 {
            tick(&mut groups, &up);
        }
        assert_eq!(groups[0].role(), Role::Leader);
        assert!(groups.iter().all(RaftGroup::is_quiet));

        // The leader's node dies: the quiet followers, told its node is down, wake and one of
        // them leads within an election timeout (10 ticks) of the news.
        up[0] = false;
        let mut ticks = 0;
        while !groups[1..].iter().any(RaftGroup::is_serving) {
            ticks += 1;
            assert!(ticks <= 12, "no new leader after {ticks} ticks");
            tick(&mut groups, &up);
        }
        let leader = if groups[1].is_serving() { 1 } else { 2 };
        let proposed = groups[leader].propose(batch()).unwrap();
        settle(&mut groups, &up);
        assert!(groups[1..].iter().all(|g| g.high_watermark() > proposed.last_offset));
        // A follower's node is down: the survivors stay awake (the leader must see it go).
        for _ in 0..20 {
            tick(&mut groups, &up);
        }
        assert!(!groups[leader].is_quiet());
    }
}
