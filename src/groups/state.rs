//! One consumer group's state machine: membership, rebalances, generations, committed offsets.
//!
//! Owns: Kafka's classic group protocol as an explicit machine —
//! `Empty → PreparingRebalance → CompletingRebalance → Stable` (and back to `PreparingRebalance`
//! when a member joins, leaves or times out; `Empty` when the last member goes). A generation's
//! assignment takes effect (Stable, SyncGroup answered) only once the coordinator reports the
//! record that holds it stored (`record_stored`); if it cannot be stored (`record_failed`), the
//! members rejoin. Pure and synchronous: time is a `now_ms` argument, parked JoinGroup/SyncGroup
//! requests are oneshot senders answered when their phase completes, and what must be persisted
//! is flagged (`take_dirty`) for the coordinator to write. No IO, no glommio, so every transition
//! is unit tested here. Member ids handed out with MEMBER_ID_REQUIRED (KIP-394) are kept as
//! pending until the member joins with one or its session timeout passes; like members, they are
//! not persisted.

use std::collections::BTreeMap;

use futures::channel::oneshot;

use super::assignor::{self, Subscriber, ASSIGNORS};
use super::codec::{GroupValue, MemberRecord, OffsetValue};
use super::messages::*;

/// After an assignment could not be stored, the next join phase lasts at least this long, so a
/// coordinator whose log refuses writes (a full disk) does not spin its members through
/// rebalances as fast as they can rejoin.
const REJOIN_AFTER_UNSTORED_MS: i64 = 1_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupState {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
}

impl GroupState {
    pub fn name(self) -> &'static str {
        match self {
            GroupState::Empty => "Empty",
            GroupState::PreparingRebalance => "PreparingRebalance",
            GroupState::CompletingRebalance => "CompletingRebalance",
            GroupState::Stable => "Stable",
        }
    }
}

/// The broker options the state machine obeys.
#[derive(Debug, Clone, Copy)]
pub struct GroupLimits {
    pub initial_rebalance_delay_ms: u64,
    pub min_session_timeout_ms: u32,
    pub max_session_timeout_ms: u32,
    pub members_max: usize,
}

pub type JoinWaiter = oneshot::Sender<Result<JoinResponse, GroupError>>;
pub type SyncWaiter = oneshot::Sender<Result<SyncResponse, GroupError>>;

struct Member {
    client_id: String,
    client_host: String,
    session_timeout_ms: u32,
    rebalance_timeout_ms: u32,
    topics: Vec<String>,
    protocols: Vec<(String, Vec<u8>)>,
    server_assignment: bool,
    /// The current (or, while rebalancing, the previous) generation's assignment.
    assignment: Vec<TopicPartitions>,
    user_data: Vec<u8>,
    /// A Kafka leader's opaque assignment for this member, returned byte for byte.
    assignment_bytes: Option<Vec<u8>>,
    last_heartbeat_ms: i64,
    join_waiter: Option<JoinWaiter>,
    sync_waiter: Option<SyncWaiter>,
}

impl Member {
    /// Bytes this member holds beyond its own struct (strings, lists, assignment).
    fn heap_bytes(&self) -> usize {
        let topics: usize = self.topics.iter().map(|t| t.capacity() + std::mem::size_of::<String>()).sum();
        let protocols: usize = self
            .protocols
            .iter()
            .map(|(name, meta)| name.capacity() + meta.capacity() + std::mem::size_of::<(String, Vec<u8>)>())
            .sum();
        let assignment: usize = self
            .assignment
            .iter()
            .map(|(topic, parts)| {
                topic.capacity() + parts.capacity() * 4 + std::mem::size_of::<TopicPartitions>()
            })
            .sum();
        self.client_id.capacity()
            + self.client_host.capacity()
            + topics
            + protocols
            + assignment
            + self.user_data.capacity()
            + self.assignment_bytes.as_ref().map_or(0, Vec::capacity)
    }

    fn sync_response(&self) -> SyncResponse {
        SyncResponse {
            partitions: self.assignment.clone(),
            user_data: self.user_data.clone(),
            assignment_bytes: self.assignment_bytes.clone(),
        }
    }

    /// The member's metadata for `protocol` (empty if it offered none).
    fn metadata_for(&self, protocol: &str) -> Vec<u8> {
        self.protocols.iter().find(|(n, _)| n == protocol).map(|(_, md)| md.clone()).unwrap_or_default()
    }

    /// Members with a parked request are alive by definition: they are waiting on us.
    fn expired(&self, now_ms: i64) -> bool {
        self.join_waiter.is_none()
            && self.sync_waiter.is_none()
            && now_ms - self.last_heartbeat_ms > i64::from(self.session_timeout_ms)
    }
}

/// What a SyncGroup gets: the assignment now, or a wait for the leader's.
pub enum SyncWait {
    Ready(SyncResponse),
    Parked(oneshot::Receiver<Result<SyncResponse, GroupError>>),
}

pub struct Group {
    pub id: String,
    state: GroupState,
    generation: i32,
    protocol_type: String,
    protocol: String,
    leader: String,
    /// Ordered by member id, so assignors and leader choice are deterministic.
    members: BTreeMap<String, Member>,
    /// Member ids handed out with MEMBER_ID_REQUIRED, not yet joined → when each expires (the
    /// session timeout of the join that got it). They count toward `members_max`.
    pending: BTreeMap<String, i64>,
    pub offsets: BTreeMap<(String, u32), OffsetValue>,
    /// PreparingRebalance: the join phase completes once every member rejoined and this passed
    /// (the initial rebalance delay), or at `phase_deadline_ms` regardless.
    join_ready_at_ms: i64,
    /// Deadline of the current join or sync phase (the members' longest rebalance timeout).
    phase_deadline_ms: i64,
    /// The join phase began from Empty: each new member extends the initial delay.
    initial_rebalance: bool,
    /// When the group last became empty (offset retention counts from here).
    pub empty_since_ms: i64,
    /// Group metadata changed in a way that must be recorded in `__consumer_offsets`.
    dirty: bool,
    /// A group-metadata record for this group exists in the log (deletion writes its tombstone).
    pub has_metadata_record: bool,
    /// CompletingRebalance: the generation's assignment is set and flagged for recording; the
    /// group waits for the coordinator to report the record stored before it answers SyncGroup
    /// (Kafka's storeGroup before its SyncGroup answers), so no member works from an assignment
    /// a restart or a change of coordinator would not know.
    storing_assignment: bool,
}

impl Group {
    /// Bytes the group holds: its strings, members, pending member ids and committed offsets. B-tree
    /// entries are counted at their size plus half (nodes are half to fully used).
    pub fn memory_bytes(&self) -> usize {
        let entry = |bytes: usize| bytes * 3 / 2;
        let members: usize = self
            .members
            .iter()
            .map(|(id, m)| id.capacity() + m.heap_bytes() + entry(std::mem::size_of::<(String, Member)>()))
            .sum();
        let pending: usize =
            self.pending.keys().map(|id| id.capacity() + entry(std::mem::size_of::<(String, i64)>())).sum();
        let offsets: usize = self
            .offsets
            .iter()
            .map(|((topic, _), v)| {
                topic.capacity()
                    + v.metadata.capacity()
                    + entry(std::mem::size_of::<((String, u32), OffsetValue)>())
            })
            .sum();
        std::mem::size_of::<Group>()
            + self.id.capacity()
            + self.protocol_type.capacity()
            + self.protocol.capacity()
            + self.leader.capacity()
            + members
            + pending
            + offsets
    }

    pub fn new(id: String, now_ms: i64) -> Group {
        Group {
            id,
            state: GroupState::Empty,
            generation: 0,
            protocol_type: String::new(),
            protocol: String::new(),
            leader: String::new(),
            members: BTreeMap::new(),
            pending: BTreeMap::new(),
            offsets: BTreeMap::new(),
            join_ready_at_ms: 0,
            phase_deadline_ms: 0,
            initial_rebalance: false,
            empty_since_ms: now_ms,
            dirty: false,
            has_metadata_record: false,
            storing_assignment: false,
        }
    }

    pub fn state(&self) -> GroupState {
        self.state
    }

    pub fn generation(&self) -> i32 {
        self.generation
    }

    pub fn member_count(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Whether member ids handed out with MEMBER_ID_REQUIRED await their member's join.
    pub fn has_pending_members(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Whether the group's metadata must be written; clears the flag.
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// Whether the record just taken (`take_dirty`) holds a new assignment that the group holds
    /// back until the coordinator reports it stored (`record_stored`) or lost (`record_failed`).
    pub fn awaits_record(&self) -> bool {
        self.storing_assignment
    }

    /// The record holding `generation`'s assignment is stored: the group becomes Stable and every
    /// member waiting in SyncGroup gets its assignment. A report about a generation the group
    /// has left (it rebalanced meanwhile) changes nothing.
    pub fn record_stored(&mut self, generation: i32) {
        if self.awaits(generation) {
            self.become_stable();
        }
    }

    /// The record holding `generation`'s assignment could not be stored: that assignment is void.
    /// Every member waiting in SyncGroup gets `error`, and the group rebalances (its members
    /// rejoin, forming the next generation). A report about a generation the group has left
    /// changes nothing.
    pub fn record_failed(&mut self, generation: i32, error: GroupError, now_ms: i64) {
        if !self.awaits(generation) {
            return;
        }
        tracing::warn!(group = %self.id, generation, "assignment not stored; the group rebalances: {error}");
        for m in self.members.values_mut() {
            m.assignment.clear();
            m.user_data.clear();
            m.assignment_bytes = None;
            if let Some(w) = m.sync_waiter.take() {
                let _ = w.send(Err(error.clone()));
            }
        }
        self.prepare_rebalance(now_ms);
        self.join_ready_at_ms = (now_ms + REJOIN_AFTER_UNSTORED_MS).min(self.phase_deadline_ms);
    }

    fn awaits(&self, generation: i32) -> bool {
        self.state == GroupState::CompletingRebalance
            && self.storing_assignment
            && generation == self.generation
    }

    /// Restores what the log recorded, at `now_ms` (a replay applies each record of the group in
    /// turn; the last one stands). A group recorded with its members, in a record that carries
    /// all a live member needs, comes back Stable with them, each with a whole session timeout
    /// from now to reach this coordinator: as in Kafka, members carry on through a change of
    /// coordinator or a restart without a rebalance, and one that never comes back times out as
    /// any silent member does. Otherwise the group is Empty with its last generation, protocol
    /// and leader until members join.
    pub fn restore(&mut self, value: &GroupValue, now_ms: i64) {
        debug_assert!(
            self.members.values().all(|m| m.join_waiter.is_none() && m.sync_waiter.is_none()),
            "restore runs before any member joins"
        );
        self.generation = value.generation;
        self.protocol_type = value.protocol_type.clone();
        self.protocol = value.protocol.clone();
        self.leader = value.leader.clone();
        self.empty_since_ms = value.state_timestamp_ms;
        self.has_metadata_record = true;
        self.members.clear();
        if !value.members_complete || value.members.is_empty() {
            self.state = GroupState::Empty;
            return;
        }
        for m in &value.members {
            let member = Member {
                client_id: m.client_id.clone(),
                client_host: m.client_host.clone(),
                session_timeout_ms: m.session_timeout_ms,
                rebalance_timeout_ms: m.rebalance_timeout_ms,
                topics: m.topics.clone(),
                // Only the chosen protocol is recorded; a rebalance asks every member again.
                protocols: vec![(value.protocol.clone(), m.metadata.clone())],
                server_assignment: m.server_assignment,
                assignment: m.assignment.clone(),
                user_data: m.user_data.clone(),
                assignment_bytes: m.assignment_bytes.clone(),
                last_heartbeat_ms: now_ms,
                join_waiter: None,
                sync_waiter: None,
            };
            self.members.insert(m.member_id.clone(), member);
        }
        self.state = GroupState::Stable;
    }

    /// The record to write for the group's current metadata.
    pub fn metadata_record(&self, now_ms: i64) -> GroupValue {
        GroupValue {
            protocol_type: self.protocol_type.clone(),
            protocol: self.protocol.clone(),
            generation: self.generation,
            leader: self.leader.clone(),
            state_timestamp_ms: now_ms,
            members: self
                .members
                .iter()
                .map(|(id, m)| MemberRecord {
                    member_id: id.clone(),
                    client_id: m.client_id.clone(),
                    session_timeout_ms: m.session_timeout_ms,
                    rebalance_timeout_ms: m.rebalance_timeout_ms,
                    topics: m.topics.clone(),
                    assignment: m.assignment.clone(),
                    user_data: m.user_data.clone(),
                    client_host: m.client_host.clone(),
                    metadata: m.metadata_for(&self.protocol),
                    server_assignment: m.server_assignment,
                    assignment_bytes: m.assignment_bytes.clone(),
                })
                .collect(),
            members_complete: true,
        }
    }

    // ---- Membership -------------------------------------------------------------------------

    /// JoinGroup. On success the member is in the group and the returned receiver is answered
    /// when the join phase completes (this call may complete it). With
    /// `req.context.require_known_member_id`, an empty member id gets a new pending id in
    /// [`GroupError::MemberIdRequired`] instead, and a join naming a pending id joins.
    pub fn join(
        &mut self,
        mut req: JoinRequest,
        new_member_id: impl FnOnce(&str) -> String,
        limits: &GroupLimits,
        partition_count: &dyn Fn(&str) -> Option<u32>,
        now_ms: i64,
    ) -> Result<oneshot::Receiver<Result<JoinResponse, GroupError>>, GroupError> {
        let context = std::mem::take(&mut req.context);
        let (min, max) = (limits.min_session_timeout_ms, limits.max_session_timeout_ms);
        if !(min..=max).contains(&req.session_timeout_ms) {
            return Err(GroupError::InvalidSessionTimeout { requested: req.session_timeout_ms, min, max });
        }
        if req.protocols.is_empty() {
            return Err(self.inconsistent("the member lists no protocols (assignors)"));
        }
        if req.server_assignment && !req.protocols.iter().any(|(name, _)| ASSIGNORS.contains(&name.as_str()))
        {
            return Err(self.inconsistent(format!(
                "server-side assignment needs one of the assignors {ASSIGNORS:?}; the member offers {:?}",
                req.protocols.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>()
            )));
        }
        let others: Vec<&Member> =
            self.members.iter().filter(|(id, _)| **id != req.member_id).map(|(_, m)| m).collect();
        if !others.is_empty() {
            if req.protocol_type != self.protocol_type {
                return Err(self.inconsistent(format!(
                    "protocol type '{}' differs from the group's '{}'",
                    req.protocol_type, self.protocol_type
                )));
            }
            let shared = req
                .protocols
                .iter()
                .any(|(name, _)| others.iter().all(|m| m.protocols.iter().any(|(n, _)| n == name)));
            if !shared {
                return Err(self.inconsistent("the member's protocols share none with the other members'"));
            }
        }
        self.pending.retain(|_, expires_ms| now_ms <= *expires_ms);
        let member_id = if req.member_id.is_empty() {
            let members = self.members.len() + self.pending.len();
            if members >= limits.members_max {
                return Err(GroupError::TooManyMembers { group: self.id.clone(), members });
            }
            let member_id = new_member_id(&req.client_id);
            if context.require_known_member_id {
                self.pending.insert(member_id.clone(), now_ms + i64::from(req.session_timeout_ms));
                return Err(GroupError::MemberIdRequired { group: self.id.clone(), member: member_id });
            }
            member_id
        } else if self.members.contains_key(&req.member_id) || self.pending.remove(&req.member_id).is_some() {
            req.member_id.clone()
        } else {
            return Err(GroupError::UnknownMember { group: self.id.clone(), member: req.member_id });
        };
        let (tx, rx) = oneshot::channel();
        let is_new = !self.members.contains_key(&member_id);
        let member = self.members.entry(member_id.clone()).or_insert_with(|| Member {
            client_id: String::new(),
            client_host: String::new(),
            session_timeout_ms: 0,
            rebalance_timeout_ms: 0,
            topics: Vec::new(),
            protocols: Vec::new(),
            server_assignment: true,
            assignment: Vec::new(),
            user_data: Vec::new(),
            assignment_bytes: None,
            last_heartbeat_ms: now_ms,
            join_waiter: None,
            sync_waiter: None,
        });
        member.client_id = req.client_id;
        member.client_host = context.client_host;
        member.session_timeout_ms = req.session_timeout_ms;
        member.rebalance_timeout_ms = req.rebalance_timeout_ms;
        member.topics = req.topics;
        member.protocols = req.protocols;
        member.server_assignment = req.server_assignment;
        member.last_heartbeat_ms = now_ms;
        if let Some(old) = member.join_waiter.replace(tx) {
            let _ = old.send(Err(GroupError::RebalanceInProgress { group: self.id.clone() }));
        }
        self.protocol_type = req.protocol_type;
        match self.state {
            GroupState::Empty => {
                self.initial_rebalance = true;
                self.prepare_rebalance(now_ms);
                self.join_ready_at_ms = now_ms + limits.initial_rebalance_delay_ms as i64;
            }
            GroupState::PreparingRebalance => {
                self.phase_deadline_ms =
                    self.phase_deadline_ms.max(now_ms + i64::from(req.rebalance_timeout_ms));
                if self.initial_rebalance && is_new {
                    self.join_ready_at_ms =
                        (now_ms + limits.initial_rebalance_delay_ms as i64).min(self.phase_deadline_ms);
                }
            }
            GroupState::CompletingRebalance | GroupState::Stable => self.prepare_rebalance(now_ms),
        }
        self.try_complete_join(partition_count, now_ms);
        Ok(rx)
    }

    /// SyncGroup: the member's assignment, now or once the leader sends it.
    pub fn sync(&mut self, req: SyncRequest, now_ms: i64) -> Result<SyncWait, GroupError> {
        self.check_member(&req.member_id, req.generation)?;
        match self.state {
            GroupState::Empty | GroupState::PreparingRebalance => {
                Err(GroupError::RebalanceInProgress { group: self.id.clone() })
            }
            GroupState::Stable => Ok(SyncWait::Ready(self.touch(&req.member_id, now_ms)?.sync_response())),
            GroupState::CompletingRebalance if req.member_id == self.leader && !self.storing_assignment => {
                let mut given: BTreeMap<String, MemberAssignment> =
                    req.assignments.into_iter().map(|a| (a.member_id.clone(), a)).collect();
                for (id, m) in self.members.iter_mut() {
                    let a = given.remove(id).unwrap_or_default();
                    m.assignment = a.partitions;
                    m.user_data = a.user_data;
                    m.assignment_bytes = a.assignment_bytes;
                }
                self.store_assignment();
                self.park_sync(&req.member_id, now_ms)
            }
            GroupState::CompletingRebalance => self.park_sync(&req.member_id, now_ms),
        }
    }

    /// Parks a SyncGroup until the group becomes Stable (or rebalances).
    fn park_sync(&mut self, member_id: &str, now_ms: i64) -> Result<SyncWait, GroupError> {
        let (tx, rx) = oneshot::channel();
        let group = self.id.clone();
        let m = self.touch(member_id, now_ms)?;
        if let Some(old) = m.sync_waiter.replace(tx) {
            let _ = old.send(Err(GroupError::RebalanceInProgress { group }));
        }
        Ok(SyncWait::Parked(rx))
    }

    /// Heartbeat: keeps the session alive; tells the member when it must rejoin.
    pub fn heartbeat(&mut self, member_id: &str, generation: i32, now_ms: i64) -> Result<(), GroupError> {
        self.check_member(member_id, generation)?;
        self.touch(member_id, now_ms)?;
        match self.state {
            GroupState::PreparingRebalance => Err(GroupError::RebalanceInProgress { group: self.id.clone() }),
            _ => Ok(()),
        }
    }

    pub fn leave(
        &mut self,
        member_id: &str,
        partition_count: &dyn Fn(&str) -> Option<u32>,
        now_ms: i64,
    ) -> Result<(), GroupError> {
        // As Kafka: a member that got its id but never joined may leave too, freeing its place.
        if self.pending.remove(member_id).is_some() {
            return Ok(());
        }
        if !self.members.contains_key(member_id) {
            return Err(self.unknown(member_id));
        }
        self.remove_member(member_id, "left the group");
        self.after_removal(partition_count, now_ms);
        Ok(())
    }

    /// Checks that a commit may be applied: a current member of the current generation (not while
    /// the leader's assignment is awaited), or, with generation -1 and no member id, a group
    /// without members.
    pub fn check_commit(&mut self, member_id: &str, generation: i32, now_ms: i64) -> Result<(), GroupError> {
        if generation < 0 && member_id.is_empty() {
            if self.members.is_empty() {
                return Ok(());
            }
            return Err(GroupError::NotEmpty { group: self.id.clone(), members: self.members.len() });
        }
        self.check_member(member_id, generation)?;
        // Taken while the assignment's record is being stored (members assigned server-side
        // commit once joined): appended after that record, a commit is never durable without it.
        if self.state == GroupState::CompletingRebalance && !self.storing_assignment {
            return Err(GroupError::RebalanceInProgress { group: self.id.clone() });
        }
        self.touch(member_id, now_ms)?;
        Ok(())
    }

    /// Deadlines: session expiry, the end of the initial delay, join and sync phase timeouts.
    pub fn tick(&mut self, partition_count: &dyn Fn(&str) -> Option<u32>, now_ms: i64) {
        let expired: Vec<String> =
            self.members.iter().filter(|(_, m)| m.expired(now_ms)).map(|(id, _)| id.clone()).collect();
        for id in &expired {
            self.remove_member(id, "session timed out");
        }
        if !expired.is_empty() {
            self.after_removal(partition_count, now_ms);
        }
        if self.state == GroupState::CompletingRebalance && now_ms >= self.phase_deadline_ms {
            // The leader never sent the assignment: drop whoever has not synced, start again.
            let pending: Vec<String> = self
                .members
                .iter()
                .filter(|(_, m)| m.sync_waiter.is_none())
                .map(|(id, _)| id.clone())
                .collect();
            for id in &pending {
                self.remove_member(id, "did not sync within the rebalance timeout");
            }
            self.after_removal(partition_count, now_ms);
        }
        self.try_complete_join(partition_count, now_ms);
    }

    // ---- Reporting ----------------------------------------------------------------------------

    pub fn listing(&self) -> GroupListing {
        GroupListing {
            group_id: self.id.clone(),
            state: self.state.name(),
            protocol_type: self.protocol_type.clone(),
            members: self.members.len() as u32,
        }
    }

    pub fn describe(&self) -> GroupDescription {
        GroupDescription {
            group_id: self.id.clone(),
            state: self.state.name(),
            protocol_type: self.protocol_type.clone(),
            protocol: self.protocol.clone(),
            generation: self.generation,
            leader_id: self.leader.clone(),
            members: self
                .members
                .iter()
                .map(|(id, m)| MemberDescription {
                    member_id: id.clone(),
                    client_id: m.client_id.clone(),
                    client_host: m.client_host.clone(),
                    assignment: m.assignment.clone(),
                    metadata: m.metadata_for(&self.protocol),
                    assignment_bytes: m.assignment_bytes.clone(),
                })
                .collect(),
        }
    }

    // ---- Transitions --------------------------------------------------------------------------

    fn inconsistent(&self, detail: impl Into<String>) -> GroupError {
        GroupError::InconsistentProtocol { group: self.id.clone(), detail: detail.into() }
    }

    fn unknown(&self, member_id: &str) -> GroupError {
        GroupError::UnknownMember { group: self.id.clone(), member: member_id.to_string() }
    }

    fn check_member(&self, member_id: &str, generation: i32) -> Result<(), GroupError> {
        if !self.members.contains_key(member_id) {
            return Err(self.unknown(member_id));
        }
        if generation != self.generation {
            return Err(GroupError::IllegalGeneration {
                group: self.id.clone(),
                generation,
                current: self.generation,
            });
        }
        Ok(())
    }

    fn touch(&mut self, member_id: &str, now_ms: i64) -> Result<&mut Member, GroupError> {
        let unknown = self.unknown(member_id);
        let m = self.members.get_mut(member_id).ok_or(unknown)?;
        m.last_heartbeat_ms = now_ms;
        Ok(m)
    }

    fn max_rebalance_timeout_ms(&self) -> i64 {
        self.members.values().map(|m| i64::from(m.rebalance_timeout_ms)).max().unwrap_or(0)
    }

    /// Enters PreparingRebalance: every member must rejoin within the rebalance timeout.
    fn prepare_rebalance(&mut self, now_ms: i64) {
        if self.state == GroupState::CompletingRebalance {
            self.answer_syncs_with_rebalance();
        }
        if self.state != GroupState::Empty {
            self.initial_rebalance = false;
        }
        self.storing_assignment = false;
        self.state = GroupState::PreparingRebalance;
        self.join_ready_at_ms = now_ms;
        self.phase_deadline_ms = now_ms + self.max_rebalance_timeout_ms();
    }

    fn answer_syncs_with_rebalance(&mut self) {
        for m in self.members.values_mut() {
            if let Some(w) = m.sync_waiter.take() {
                let _ = w.send(Err(GroupError::RebalanceInProgress { group: self.id.clone() }));
            }
        }
    }

    fn remove_member(&mut self, member_id: &str, why: &str) {
        if let Some(m) = self.members.remove(member_id) {
            tracing::info!(group = %self.id, member = member_id, generation = self.generation, "member {why}");
            let gone = || GroupError::UnknownMember { group: self.id.clone(), member: member_id.to_string() };
            if let Some(w) = m.join_waiter {
                let _ = w.send(Err(gone()));
            }
            if let Some(w) = m.sync_waiter {
                let _ = w.send(Err(gone()));
            }
        }
    }

    fn after_removal(&mut self, partition_count: &dyn Fn(&str) -> Option<u32>, now_ms: i64) {
        match self.state {
            GroupState::Stable | GroupState::CompletingRebalance if !self.members.is_empty() => {
                self.prepare_rebalance(now_ms)
            }
            GroupState::Stable | GroupState::CompletingRebalance => self.become_empty(now_ms),
            GroupState::PreparingRebalance => self.try_complete_join(partition_count, now_ms),
            GroupState::Empty => {}
        }
    }

    fn become_empty(&mut self, now_ms: i64) {
        debug_assert!(self.members.is_empty());
        // Kafka bumps the generation when the last member goes, fencing any straggler.
        self.generation += 1;
        self.state = GroupState::Empty;
        self.storing_assignment = false;
        self.leader.clear();
        self.empty_since_ms = now_ms;
        self.initial_rebalance = false;
        self.dirty = true;
    }

    /// The assignment is set: record it, and hold the members' SyncGroup answers until it is stored.
    fn store_assignment(&mut self) {
        self.storing_assignment = true;
        self.dirty = true;
    }

    fn become_stable(&mut self) {
        self.state = GroupState::Stable;
        self.storing_assignment = false;
        for m in self.members.values_mut() {
            if let Some(w) = m.sync_waiter.take() {
                let _ = w.send(Ok(m.sync_response()));
            }
        }
    }

    /// Ends the join phase once every member has rejoined (after the initial delay), or at the
    /// deadline, dropping members that did not rejoin in time.
    fn try_complete_join(&mut self, partition_count: &dyn Fn(&str) -> Option<u32>, now_ms: i64) {
        if self.state != GroupState::PreparingRebalance {
            return;
        }
        let timed_out = now_ms >= self.phase_deadline_ms;
        if timed_out {
            let late: Vec<String> = self
                .members
                .iter()
                .filter(|(_, m)| m.join_waiter.is_none())
                .map(|(id, _)| id.clone())
                .collect();
            for id in &late {
                self.remove_member(id, "did not rejoin within the rebalance timeout");
            }
        } else if now_ms < self.join_ready_at_ms || self.members.values().any(|m| m.join_waiter.is_none()) {
            return;
        }
        if self.members.is_empty() {
            self.become_empty(now_ms);
            return;
        }
        self.generation += 1;
        self.initial_rebalance = false;
        self.protocol = self.choose_protocol();
        let server_side = self.members.values().all(|m| m.server_assignment);
        let leader_ok = self.members.get(&self.leader).is_some_and(|m| server_side || !m.server_assignment);
        if !leader_ok {
            self.leader = self
                .members
                .iter()
                .find(|(_, m)| server_side || !m.server_assignment)
                .map(|(id, _)| id.clone())
                .unwrap_or_default();
        }
        for m in self.members.values_mut() {
            m.last_heartbeat_ms = now_ms;
        }
        let responses: Vec<(String, JoinResponse)> = self
            .members
            .keys()
            .map(|id| {
                let members = if !server_side && *id == self.leader {
                    self.members
                        .iter()
                        .map(|(mid, m)| JoinMember {
                            member_id: mid.clone(),
                            client_id: m.client_id.clone(),
                            topics: m.topics.clone(),
                            metadata: m.metadata_for(&self.protocol),
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                let response = JoinResponse {
                    generation: self.generation,
                    protocol: self.protocol.clone(),
                    leader_id: self.leader.clone(),
                    member_id: id.clone(),
                    members,
                };
                (id.clone(), response)
            })
            .collect();
        self.state = GroupState::CompletingRebalance;
        self.phase_deadline_ms = now_ms + self.max_rebalance_timeout_ms();
        if server_side {
            self.assign_server_side(partition_count);
            self.store_assignment();
        }
        tracing::info!(
            group = %self.id,
            generation = self.generation,
            members = self.members.len(),
            protocol = %self.protocol,
            server_side,
            "join phase complete"
        );
        for (id, response) in responses {
            if let Some(w) = self.members.get_mut(&id).and_then(|m| m.join_waiter.take()) {
                let _ = w.send(Ok(response));
            }
        }
    }

    /// Kafka's vote: among the protocols every member supports (and, with server-side assignment,
    /// the coordinator can run), each member votes for its most preferred; ties go to the first
    /// member's preference order.
    fn choose_protocol(&self) -> String {
        let server_side = self.members.values().all(|m| m.server_assignment);
        let Some(first) = self.members.values().next() else { return String::new() };
        let candidates: Vec<&str> = first
            .protocols
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| self.members.values().all(|m| m.protocols.iter().any(|(p, _)| p == n)))
            .filter(|n| !server_side || ASSIGNORS.contains(n))
            .collect();
        let mut votes = vec![0usize; candidates.len()];
        for m in self.members.values() {
            if let Some(i) = m.protocols.iter().find_map(|(n, _)| candidates.iter().position(|c| c == n)) {
                votes[i] += 1;
            }
        }
        let best = votes.iter().enumerate().max_by_key(|(i, v)| (**v, std::cmp::Reverse(*i))).map(|(i, _)| i);
        match best {
            Some(i) => candidates[i].to_string(),
            // Every member offers a known assignor but they share none: range is always possible.
            None if server_side => "range".to_string(),
            None => String::new(),
        }
    }

    fn assign_server_side(&mut self, partition_count: &dyn Fn(&str) -> Option<u32>) {
        let subscribers: BTreeMap<String, Subscriber> = self
            .members
            .iter()
            .map(|(id, m)| {
                let owned =
                    m.assignment.iter().flat_map(|(t, ps)| ps.iter().map(move |p| (t.clone(), *p))).collect();
                (id.clone(), Subscriber { topics: m.topics.clone(), owned })
            })
            .collect();
        let assignment = assignor::assign(&self.protocol, &subscribers, partition_count)
            .or_else(|| assignor::assign("range", &subscribers, partition_count))
            .unwrap_or_default();
        for (id, m) in self.members.iter_mut() {
            m.assignment = assignment.get(id).cloned().unwrap_or_default();
            m.user_data.clear();
            m.assignment_bytes = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    const LIMITS: GroupLimits = GroupLimits {
        initial_rebalance_delay_ms: 300,
        min_session_timeout_ms: 1000,
        max_session_timeout_ms: 60_000,
        members_max: 10,
    };

    fn counts(t: &str) -> Option<u32> {
        (t == "t").then_some(6)
    }

    fn join_req(member_id: &str, server_assignment: bool) -> JoinRequest {
        JoinRequest {
            group_id: "g".into(),
            member_id: member_id.into(),
            client_id: "c".into(),
            session_timeout_ms: 3000,
            rebalance_timeout_ms: 5000,
            protocol_type: "consumer".into(),
            topics: vec!["t".into()],
            protocols: vec![("range".into(), b"md".to_vec())],
            server_assignment,
            context: JoinContext::default(),
        }
    }

    type JoinRx = oneshot::Receiver<Result<JoinResponse, GroupError>>;

    fn join(g: &mut Group, id: &str, server: bool, now: i64, next_id: &str) -> JoinRx {
        let next = next_id.to_string();
        g.join(join_req(id, server), move |_| next, &LIMITS, &counts, now).unwrap()
    }

    fn answered<T>(rx: &mut oneshot::Receiver<T>) -> Option<T> {
        rx.now_or_never().map(|r| r.expect("sender answered, not dropped"))
    }

    fn assigned(g: &mut Group, id: &str, now: i64) -> Vec<u32> {
        let req = SyncRequest {
            group_id: "g".into(),
            generation: g.generation(),
            member_id: id.into(),
            assignments: vec![],
        };
        let response = match g.sync(req, now).unwrap() {
            SyncWait::Ready(r) => r,
            SyncWait::Parked(mut rx) => {
                assert!(answered(&mut rx).is_none(), "no assignment before its record is stored");
                record(g);
                answered(&mut rx).unwrap().unwrap()
            }
        };
        response.partitions.into_iter().flat_map(|(_, ps)| ps).collect()
    }

    /// What the coordinator does after each request: records the group if a transition flagged
    /// it, and reports a held-back assignment's record stored.
    fn record(g: &mut Group) {
        if g.take_dirty() && g.awaits_record() {
            g.record_stored(g.generation());
        }
    }

    /// Two members form generation 1 after the initial delay.
    fn stable_pair() -> Group {
        let mut g = Group::new("g".into(), 0);
        let mut a = join(&mut g, "", true, 0, "a");
        let mut b = join(&mut g, "", true, 100, "b");
        assert!(answered(&mut a).is_none(), "JoinGroup parks through the initial delay");
        g.tick(&counts, 350);
        assert!(answered(&mut a).is_none(), "b's arrival extended the delay");
        g.tick(&counts, 400);
        let ra = answered(&mut a).unwrap().unwrap();
        let rb = answered(&mut b).unwrap().unwrap();
        assert_eq!((ra.generation, rb.generation), (1, 1));
        assert_eq!((ra.member_id.as_str(), rb.member_id.as_str()), ("a", "b"));
        assert_eq!(ra.leader_id, "a");
        assert!(ra.members.is_empty(), "server-side assignment: no member list for the leader");
        assert_eq!(g.state(), GroupState::CompletingRebalance, "until its record is stored");
        assert!(g.take_dirty() && g.awaits_record(), "a new generation is recorded");
        g.record_stored(1);
        assert_eq!(g.state(), GroupState::Stable);
        g
    }

    #[test]
    fn members_join_together_and_get_disjoint_assignments() {
        let mut g = stable_pair();
        let (a, b) = (assigned(&mut g, "a", 500), assigned(&mut g, "b", 500));
        assert_eq!(a, vec![0, 1, 2]);
        assert_eq!(b, vec![3, 4, 5]);
        assert!(g.heartbeat("a", 1, 600).is_ok());
    }

    #[test]
    fn a_new_member_triggers_a_rebalance_and_fences_the_old_generation() {
        let mut g = stable_pair();
        let mut c = join(&mut g, "", true, 1000, "c");
        assert_eq!(g.state(), GroupState::PreparingRebalance);
        assert!(matches!(g.heartbeat("a", 1, 1001), Err(GroupError::RebalanceInProgress { .. })));
        // Commits of the current generation are still accepted while rejoining (on_revoked).
        assert!(g.check_commit("a", 1, 1002).is_ok());
        let mut a = join(&mut g, "a", true, 1003, "unused");
        assert!(answered(&mut c).is_none(), "b has not rejoined yet");
        let mut b = join(&mut g, "b", true, 1004, "unused");
        for rx in [&mut a, &mut b, &mut c] {
            assert_eq!(answered(rx).unwrap().unwrap().generation, 2);
        }
        assert!(matches!(
            g.check_commit("a", 1, 1005),
            Err(GroupError::IllegalGeneration { current: 2, .. })
        ));
        assert!(matches!(g.heartbeat("b", 1, 1005), Err(GroupError::IllegalGeneration { .. })));
        assert!(g.check_commit("a", 2, 1005).is_ok(), "appended after the generation's record");
        let all: Vec<u32> = ["a", "b", "c"].iter().flat_map(|m| assigned(&mut g, m, 1006)).collect();
        let mut sorted = all.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn an_expired_member_is_removed_and_its_partitions_reassigned() {
        let mut g = stable_pair();
        g.heartbeat("a", 1, 2000).unwrap();
        g.tick(&counts, 3401);
        assert_eq!(g.state(), GroupState::PreparingRebalance, "b missed its 3 s session");
        assert!(matches!(g.heartbeat("b", 1, 3402), Err(GroupError::UnknownMember { .. })));
        let mut a = join(&mut g, "a", true, 3403, "unused");
        let r = answered(&mut a).unwrap().unwrap();
        assert_eq!(r.generation, 2);
        assert_eq!(assigned(&mut g, "a", 3404), vec![0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn members_that_do_not_rejoin_are_dropped_at_the_rebalance_timeout() {
        let mut g = stable_pair();
        let mut a = join(&mut g, "a", true, 1000, "unused");
        // b keeps heartbeating (told to rejoin) but never does.
        for t in (1500..6000).step_by(500) {
            assert!(matches!(g.heartbeat("b", 1, t), Err(GroupError::RebalanceInProgress { .. })));
            g.tick(&counts, t);
        }
        assert!(answered(&mut a).is_none());
        g.tick(&counts, 6000);
        assert_eq!(answered(&mut a).unwrap().unwrap().generation, 2);
        assert_eq!(g.member_count(), 1);
    }

    #[test]
    fn leaving_rebalances_and_the_last_leave_empties_the_group() {
        let mut g = stable_pair();
        g.leave("b", &counts, 1000).unwrap();
        assert_eq!(g.state(), GroupState::PreparingRebalance);
        assert!(matches!(g.leave("b", &counts, 1001), Err(GroupError::UnknownMember { .. })));
        g.leave("a", &counts, 1002).unwrap();
        assert_eq!(g.state(), GroupState::Empty);
        assert_eq!(g.generation(), 2, "the generation moves on so stragglers are fenced");
        assert_eq!(g.empty_since_ms, 1002);
        assert!(g.take_dirty());
        assert!(g.check_commit("", -1, 1003).is_ok(), "empty groups take commits outside membership");
    }

    #[test]
    fn commits_outside_membership_need_an_empty_group() {
        let mut g = stable_pair();
        assert!(matches!(g.check_commit("", -1, 500), Err(GroupError::NotEmpty { members: 2, .. })));
        assert!(matches!(g.check_commit("zz", 1, 500), Err(GroupError::UnknownMember { .. })));
    }

    #[test]
    fn kafka_style_leader_assignment() {
        let mut g = Group::new("g".into(), 0);
        let mut a = join(&mut g, "", false, 0, "a");
        let mut b = join(&mut g, "", false, 0, "b");
        g.tick(&counts, 300);
        let ra = answered(&mut a).unwrap().unwrap();
        let rb = answered(&mut b).unwrap().unwrap();
        assert_eq!(ra.leader_id, "a");
        assert_eq!(ra.members.len(), 2, "the leader gets every member's metadata");
        assert_eq!(ra.members[1].metadata, b"md");
        assert!(rb.members.is_empty());
        assert_eq!(g.state(), GroupState::CompletingRebalance);
        assert!(matches!(g.heartbeat("b", 1, 301), Ok(())));
        let follower =
            SyncRequest { group_id: "g".into(), generation: 1, member_id: "b".into(), assignments: vec![] };
        let SyncWait::Parked(mut parked) = g.sync(follower, 302).unwrap() else { panic!("follower parks") };
        assert!(matches!(g.check_commit("b", 1, 303), Err(GroupError::RebalanceInProgress { .. })));
        let assignments = vec![
            MemberAssignment {
                member_id: "a".into(),
                partitions: vec![("t".into(), vec![0, 1, 2])],
                user_data: vec![],
                assignment_bytes: None,
            },
            // A Kafka leader's opaque bytes travel with the decoded partitions.
            MemberAssignment {
                member_id: "b".into(),
                partitions: vec![("t".into(), vec![3, 4, 5])],
                user_data: vec![7],
                assignment_bytes: Some(vec![0, 1, 0xff, 0]),
            },
        ];
        let leader = SyncRequest { group_id: "g".into(), generation: 1, member_id: "a".into(), assignments };
        let SyncWait::Parked(mut leader) = g.sync(leader, 304).unwrap() else {
            panic!("the leader's sync waits for the group's record")
        };
        assert!(answered(&mut leader).is_none() && answered(&mut parked).is_none(), "not stored yet");
        assert_eq!(g.state(), GroupState::CompletingRebalance);
        assert!(g.take_dirty() && g.awaits_record(), "the assignment is recorded");
        assert_eq!(g.metadata_record(304).members[1].assignment, vec![("t".to_string(), vec![3, 4, 5])]);
        g.record_stored(1);
        let mine = answered(&mut leader).unwrap().unwrap();
        assert_eq!(mine.partitions, vec![("t".to_string(), vec![0, 1, 2])]);
        let theirs = answered(&mut parked).unwrap().unwrap();
        assert_eq!(
            theirs,
            SyncResponse {
                partitions: vec![("t".into(), vec![3, 4, 5])],
                user_data: vec![7],
                assignment_bytes: Some(vec![0, 1, 0xff, 0]),
            }
        );
        assert_eq!(g.state(), GroupState::Stable);
        let again =
            SyncRequest { group_id: "g".into(), generation: 1, member_id: "b".into(), assignments: vec![] };
        let SyncWait::Ready(again) = g.sync(again, 305).unwrap() else {
            panic!("stable groups answer at once")
        };
        assert_eq!(again, theirs);
        let described = g.describe();
        assert_eq!(described.members[1].metadata, b"md", "the metadata of the chosen protocol");
        assert_eq!(described.members[1].assignment_bytes.as_deref(), Some(&[0, 1, 0xff, 0][..]));
        assert_eq!(described.members[0].assignment_bytes, None);
    }

    /// Kafka's SyncGroup when storing the group fails: every member of the sync gets the error
    /// and the group rebalances in the same generation; no member keeps the unstored assignment.
    #[test]
    fn an_assignment_that_is_not_stored_is_void_and_the_group_rebalances() {
        let mut g = Group::new("g".into(), 0);
        let mut a = join(&mut g, "", false, 0, "a");
        let mut b = join(&mut g, "", false, 0, "b");
        g.tick(&counts, 300);
        assert_eq!(answered(&mut a).unwrap().unwrap().leader_id, "a");
        assert!(answered(&mut b).unwrap().is_ok());
        let sync = |member: &str, assignments| SyncRequest {
            group_id: "g".into(),
            generation: 1,
            member_id: member.into(),
            assignments,
        };
        let SyncWait::Parked(mut b_sync) = g.sync(sync("b", vec![]), 301).unwrap() else { panic!("parks") };
        let given = vec![MemberAssignment {
            member_id: "b".into(),
            partitions: vec![("t".into(), vec![0, 1])],
            ..Default::default()
        }];
        let SyncWait::Parked(mut a_sync) = g.sync(sync("a", given), 302).unwrap() else { panic!("parks") };
        assert!(g.take_dirty() && g.awaits_record());
        assert!(g.check_commit("b", 1, 302).is_ok(), "appended after the group's record");
        // The leader's SyncGroup sent again while the record is being stored waits too.
        let SyncWait::Parked(mut a_again) = g.sync(sync("a", vec![]), 303).unwrap() else { panic!("parks") };
        assert!(matches!(answered(&mut a_sync), Some(Err(GroupError::RebalanceInProgress { .. }))));
        let lost = GroupError::CoordinatorNotAvailable("disk full".into());
        let error =
            GroupError::AssignmentNotStored { group: "g".into(), generation: 1, source: Box::new(lost) };
        g.record_failed(0, error.clone(), 304);
        assert!(answered(&mut b_sync).is_none(), "a report about another generation changes nothing");
        g.record_failed(1, error, 305);
        for rx in [&mut a_again, &mut b_sync] {
            let answer = answered(rx).unwrap();
            assert!(
                matches!(answer, Err(GroupError::AssignmentNotStored { generation: 1, .. })),
                "{answer:?}"
            );
        }
        assert_eq!((g.state(), g.generation()), (GroupState::PreparingRebalance, 1));
        assert!(!g.take_dirty(), "nothing new to record");
        assert!(g.describe().members.iter().all(|m| m.assignment.is_empty()), "no unstored assignment");
        assert!(matches!(g.heartbeat("b", 1, 306), Err(GroupError::RebalanceInProgress { .. })));
        // A late report that it was stored after all changes nothing: the generation is void.
        g.record_stored(1);
        assert_eq!(g.state(), GroupState::PreparingRebalance);
        // The members rejoin and the next generation forms, not sooner than a second after the
        // failure.
        let mut a = join(&mut g, "a", false, 400, "unused");
        let mut b = join(&mut g, "b", false, 401, "unused");
        g.tick(&counts, 1304);
        assert!(answered(&mut a).is_none(), "no new generation within a second of the failure");
        g.tick(&counts, 1305);
        assert_eq!(answered(&mut a).unwrap().unwrap().generation, 2);
        assert_eq!(answered(&mut b).unwrap().unwrap().generation, 2);
        let SyncWait::Parked(mut a_sync) =
            g.sync(SyncRequest { generation: 2, ..sync("a", vec![]) }, 402).unwrap()
        else {
            panic!("parks")
        };
        g.record_stored(1);
        assert!(answered(&mut a_sync).is_none(), "a report about generation 1 does not complete 2");
        assert!(g.take_dirty() && g.awaits_record());
        g.record_stored(2);
        assert!(answered(&mut a_sync).unwrap().is_ok());
        assert_eq!(g.state(), GroupState::Stable);
    }

    #[test]
    fn a_leader_that_never_syncs_is_dropped() {
        let mut g = Group::new("g".into(), 0);
        let _a = join(&mut g, "", false, 0, "a");
        let _b = join(&mut g, "", false, 0, "b");
        g.tick(&counts, 300);
        let follower =
            SyncRequest { group_id: "g".into(), generation: 1, member_id: "b".into(), assignments: vec![] };
        let SyncWait::Parked(mut parked) = g.sync(follower, 301).unwrap() else { panic!("parks") };
        g.tick(&counts, 300 + 5000);
        assert!(matches!(answered(&mut parked).unwrap(), Err(GroupError::RebalanceInProgress { .. })));
        assert_eq!(g.member_count(), 1);
        assert_eq!(g.state(), GroupState::PreparingRebalance);
    }

    #[test]
    fn bad_joins_are_refused() {
        let mut g = stable_pair();
        let mut req = join_req("", true);
        req.session_timeout_ms = 10;
        assert!(matches!(
            g.join(req, |_| "x".into(), &LIMITS, &counts, 0),
            Err(GroupError::InvalidSessionTimeout { .. })
        ));
        let mut req = join_req("", true);
        req.protocols = vec![("custom".into(), vec![])];
        assert!(matches!(
            g.join(req, |_| "x".into(), &LIMITS, &counts, 0),
            Err(GroupError::InconsistentProtocol { .. })
        ));
        let mut req = join_req("", false);
        req.protocols = vec![("custom".into(), vec![])];
        assert!(matches!(
            g.join(req, |_| "x".into(), &LIMITS, &counts, 0),
            Err(GroupError::InconsistentProtocol { .. })
        ));
        assert!(matches!(
            g.join(join_req("ghost", true), |_| "x".into(), &LIMITS, &counts, 0),
            Err(GroupError::UnknownMember { .. })
        ));
        assert_eq!(g.state(), GroupState::Stable, "refused joins change nothing");
    }

    #[test]
    fn a_restored_group_keeps_its_members_until_their_sessions_end() {
        let mut g = stable_pair();
        let before = (assigned(&mut g, "a", 500), assigned(&mut g, "b", 500));
        let record = g.metadata_record(777);
        assert_eq!(record.members.len(), 2);
        let mut restored = Group::new("g".into(), 0);
        restored.restore(&record, 10_000);
        assert_eq!(
            (restored.state(), restored.member_count(), restored.generation()),
            (GroupState::Stable, 2, 1)
        );
        // The members carry on in their generation: heartbeats, commits and their assignments.
        assert!(restored.heartbeat("a", 1, 12_000).is_ok());
        assert!(restored.check_commit("a", 1, 12_000).is_ok());
        assert_eq!((assigned(&mut restored, "a", 12_000), assigned(&mut restored, "b", 10_000)), before);
        assert_eq!(restored.describe().members[0].metadata, b"md".to_vec());
        // b is not heard from after the restore: its session (3 s) ends; a rebalance follows,
        // which a alone completes.
        restored.tick(&counts, 13_001);
        assert_eq!(restored.member_count(), 1);
        assert_eq!(restored.state(), GroupState::PreparingRebalance);
        let mut a = join(&mut restored, "a", true, 13_100, "unused");
        restored.tick(&counts, 13_100);
        let r = answered(&mut a).unwrap().unwrap();
        assert_eq!((r.generation, r.member_id.as_str()), (2, "a"));
        assert_eq!(assigned(&mut restored, "a", 13_200), vec![0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn a_group_recorded_empty_or_without_live_members_restores_empty_and_continues_the_generation() {
        let g = stable_pair();
        let mut record = g.metadata_record(777);
        record.members_complete = false;
        let mut restored = Group::new("g".into(), 0);
        restored.restore(&record, 1_000);
        assert_eq!((restored.state(), restored.member_count()), (GroupState::Empty, 0));
        assert_eq!(restored.empty_since_ms, 777);
        let mut a = join(&mut restored, "", true, 1000, "a2");
        restored.tick(&counts, 1300);
        assert_eq!(answered(&mut a).unwrap().unwrap().generation, 2);

        // A later record of the group replaces what an earlier one restored.
        let mut replayed = Group::new("g".into(), 0);
        replayed.restore(&g.metadata_record(800), 1_000);
        assert_eq!(replayed.member_count(), 2);
        let emptied = GroupValue { members: Vec::new(), generation: 2, ..g.metadata_record(900) };
        replayed.restore(&emptied, 1_000);
        assert_eq!(
            (replayed.state(), replayed.member_count(), replayed.generation()),
            (GroupState::Empty, 0, 2)
        );
    }

    /// A Kafka v4+ join: KIP-394 applies, and the client's address comes along.
    fn join_kip394(g: &mut Group, id: &str, now: i64, next_id: &str) -> Result<JoinRx, GroupError> {
        let context = JoinContext { client_host: "/10.0.0.7".into(), require_known_member_id: true };
        let next = next_id.to_string();
        g.join(JoinRequest { context, ..join_req(id, false) }, move |_| next, &LIMITS, &counts, now)
    }

    #[test]
    fn a_pending_member_id_becomes_a_member_when_it_rejoins() {
        let mut g = Group::new("g".into(), 0);
        let refused = join_kip394(&mut g, "", 0, "p").map(|_| ());
        assert!(
            matches!(&refused, Err(GroupError::MemberIdRequired { member, .. }) if member == "p"),
            "{refused:?}"
        );
        assert_eq!((g.state(), g.member_count()), (GroupState::Empty, 0), "not a member yet");
        assert!(g.has_pending_members());
        let mut p = join_kip394(&mut g, "p", 100, "unused").unwrap();
        assert!(!g.has_pending_members(), "the pending id is now a member's");
        assert_eq!((g.state(), g.member_count()), (GroupState::PreparingRebalance, 1));
        g.tick(&counts, 400);
        let r = answered(&mut p).unwrap().unwrap();
        assert_eq!((r.member_id.as_str(), r.leader_id.as_str(), r.generation), ("p", "p", 1));
        let described = g.describe();
        assert_eq!(described.members[0].client_host, "/10.0.0.7");
        // Once a member, its id rejoins as any member's does.
        assert!(join_kip394(&mut g, "p", 500, "unused").is_ok());
    }

    #[test]
    fn an_id_neither_member_nor_pending_is_refused_and_pending_ids_count_toward_the_limit() {
        let mut g = stable_pair();
        assert!(matches!(join_kip394(&mut g, "ghost", 500, "unused"), Err(GroupError::UnknownMember { .. })));
        let limits = GroupLimits { members_max: 3, ..LIMITS };
        let kip394 = JoinContext { client_host: String::new(), require_known_member_id: true };
        let join_new = |g: &mut Group, next: &'static str| {
            g.join(
                JoinRequest { context: kip394.clone(), ..join_req("", false) },
                move |_| next.into(),
                &limits,
                &counts,
                600,
            )
            .map(|_| ())
        };
        assert!(matches!(join_new(&mut g, "p"), Err(GroupError::MemberIdRequired { .. })));
        assert!(
            matches!(join_new(&mut g, "q"), Err(GroupError::TooManyMembers { members: 3, .. })),
            "two members and one pending id fill a group of 3"
        );
        g.leave("p", &counts, 700).unwrap();
        assert!(!g.has_pending_members(), "a pending id may leave, freeing its place");
        assert_eq!(g.state(), GroupState::Stable, "leaving before joining changes nothing else");
        assert!(matches!(join_new(&mut g, "q"), Err(GroupError::MemberIdRequired { .. })));
    }

    #[test]
    fn a_pending_member_id_expires_after_the_session_timeout() {
        let mut g = Group::new("g".into(), 0);
        assert!(matches!(join_kip394(&mut g, "", 0, "p"), Err(GroupError::MemberIdRequired { .. })));
        // join_req's session timeout is 3 s.
        assert!(matches!(join_kip394(&mut g, "p", 3001, "unused"), Err(GroupError::UnknownMember { .. })));
        assert!(!g.has_pending_members(), "swept by the later join");
        assert_eq!(g.member_count(), 0);
    }
}
