//! The group consumer: a [`Consumer`] whose partitions come from a consumer group.
//!
//! Owns: the member's side of the group protocol (join, sync, heartbeats, leave), committed
//! offsets (automatic and manual), and the rebalance listener. Depends on `group` (wire calls),
//! `consumer` (fetching and positions) and `error`.
//!
//! How it runs:
//! - `poll` drives membership: it joins (JoinGroup parks until the coordinator has formed the
//!   generation, then SyncGroup returns this member's partitions, computed by the coordinator),
//!   positions every new partition at its committed offset (or `auto_offset_reset` when none is
//!   committed), then fetches.
//! - A background task sends heartbeats every `heartbeat_interval` on its own connection, so the
//!   member stays alive while the application processes a poll's records, and a parked JoinGroup
//!   never holds a heartbeat back. It only reports what it learns (rebalance, fenced, coordinator
//!   moved); the next `poll` acts on it.
//! - Rebalances are eager: before rejoining, the member gives up every partition. The listener's
//!   `on_revoked` runs first, and the offsets staged then (with `auto_commit`, the positions of
//!   every revoked partition) are committed while the old generation is still valid.
//! - At-least-once by default: a commit covers only records that `poll` already returned (the
//!   position is the offset after the last returned record), and auto-commit happens at the start
//!   of a later `poll`, when the application is done with the previous records.
//! - Transient failures (broker restart, coordinator moved) are retried inside `poll`, which
//!   returns no records meanwhile; they become errors once they last longer than the client's
//!   `request_timeout`. A lost coordinator does not stop fetching, and a partition whose leader
//!   is unknown or gone only leaves that partition out of a poll (see `Consumer::poll`): the
//!   member reads on through leader changes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::consumer::{Consumer, ConsumerConfig, ConsumerRecord, Offset};
use super::error::{ClientError, Result};
use super::group::{GroupCoordinator, JoinRequest, OffsetToCommit};
use super::ClientConfig;

/// Pause between attempts while the coordinator is unreachable or moving.
const RETRY_BACKOFF: Duration = Duration::from_millis(250);

/// How the coordinator divides the subscribed partitions among members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assignor {
    /// Per topic, contiguous ranges of partitions.
    Range,
    /// Every subscribed partition dealt to members in turn.
    RoundRobin,
    /// Balanced, keeping partitions with their previous owners where it can.
    Sticky,
}

impl Assignor {
    /// The protocol name sent in JoinGroup.
    pub fn name(self) -> &'static str {
        match self {
            Assignor::Range => "range",
            Assignor::RoundRobin => "roundrobin",
            Assignor::Sticky => "sticky",
        }
    }
}

impl std::str::FromStr for Assignor {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "range" => Ok(Assignor::Range),
            "roundrobin" => Ok(Assignor::RoundRobin),
            "sticky" => Ok(Assignor::Sticky),
            other => Err(format!("{other:?} is not an assignor (range, roundrobin, sticky)")),
        }
    }
}

/// Where a partition without a committed offset starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetReset {
    /// The log start offset.
    Beginning,
    /// The high watermark: only records produced after the member got the partition.
    End,
}

impl OffsetReset {
    fn offset(self) -> Offset {
        match self {
            OffsetReset::Beginning => Offset::Beginning,
            OffsetReset::End => Offset::End,
        }
    }
}

#[derive(Debug, Clone)]
pub struct GroupConsumerConfig {
    pub group_id: String,
    /// A member that sends no heartbeat for this long is removed and its partitions reassigned.
    pub session_timeout: Duration,
    /// How long the coordinator waits for members to rejoin during a rebalance.
    pub rebalance_timeout: Duration,
    /// Between heartbeats; well under `session_timeout` (Kafka uses a third of it).
    pub heartbeat_interval: Duration,
    pub assignor: Assignor,
    /// Commit the positions of returned records every `auto_commit_interval` (at the start of a
    /// poll), before partitions are revoked, and on `close`.
    pub auto_commit: bool,
    pub auto_commit_interval: Duration,
    /// For partitions the group has no committed offset for, and positions out of range.
    pub auto_offset_reset: OffsetReset,
}

impl GroupConsumerConfig {
    pub fn new(group_id: impl Into<String>) -> GroupConsumerConfig {
        GroupConsumerConfig {
            group_id: group_id.into(),
            session_timeout: Duration::from_secs(10),
            rebalance_timeout: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(3),
            assignor: Assignor::Range,
            auto_commit: true,
            auto_commit_interval: Duration::from_secs(5),
            auto_offset_reset: OffsetReset::Beginning,
        }
    }
}

/// Offsets to commit before revoked partitions are given up. With `auto_commit`, it starts with
/// the position of every revoked partition; a listener may change or remove them.
#[derive(Debug, Default)]
pub struct RevokeCommit {
    offsets: BTreeMap<(Arc<str>, u32), i64>,
}

impl RevokeCommit {
    /// Commits `offset` (the next offset to consume) for the partition.
    pub fn stage(&mut self, topic: &str, partition: u32, offset: i64) {
        self.offsets.insert((Arc::from(topic), partition), offset);
    }

    /// Commits nothing for the partition.
    pub fn unstage(&mut self, topic: &str, partition: u32) {
        self.offsets.remove(&(Arc::from(topic), partition));
    }

    pub fn staged(&self) -> impl Iterator<Item = (&str, u32, i64)> {
        self.offsets.iter().map(|((t, p), o)| (&**t, *p, *o))
    }
}

/// Told when the member's partitions change. Called from inside `poll` (and `close`).
pub trait RebalanceListener: Send {
    /// Before the member gives up `partitions` to rejoin the group (or to leave it): the last
    /// chance to commit for them, through `commit`.
    fn on_revoked(&mut self, partitions: &[(Arc<str>, u32)], commit: &mut RevokeCommit) {
        let _ = (partitions, commit);
    }

    /// The member was fenced (its session expired, or a rebalance finished without it): the
    /// partitions may already be another member's and nothing can be committed for them.
    fn on_lost(&mut self, partitions: &[(Arc<str>, u32)]) {
        let _ = partitions;
    }

    /// After the member got its partitions of a new generation, before records are fetched.
    fn on_assigned(&mut self, partitions: &[(Arc<str>, u32)]) {
        let _ = partitions;
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Membership {
    member_id: String,
    generation_id: i32,
    coordinator_addr: String,
}

/// What the heartbeat task learned, for the next `poll`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeartbeatEvent {
    /// A rebalance started: rejoin, committing first.
    Rebalance,
    /// The generation is over without us (IllegalGeneration) or the coordinator forgot us
    /// (UnknownMemberId): rejoin, nothing can be committed.
    Fenced { unknown_member: bool },
    /// The coordinator moved or is unreachable: look it up again.
    CoordinatorLost,
}

#[derive(Default)]
struct HeartbeatState {
    /// `None` while not a member (or rejoining): no heartbeats are sent.
    member: Option<Membership>,
    event: Option<HeartbeatEvent>,
}

type Shared = Arc<Mutex<HeartbeatState>>;

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, HeartbeatState> {
    // The state is two plain fields, valid after any panic; keep going.
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

pub struct GroupConsumer {
    client: ClientConfig,
    config: GroupConsumerConfig,
    consumer: Consumer,
    coordinator: Option<GroupCoordinator>,
    subscription: Vec<String>,
    /// Kept across rejoins so the coordinator recognizes the member; cleared when it forgot us.
    member_id: String,
    /// -1 while not a member of a generation.
    generation_id: i32,
    shared: Shared,
    heartbeat_task: tokio::task::JoinHandle<()>,
    listener: Option<Box<dyn RebalanceListener>>,
    /// What this member last committed (or fetched as committed), to skip unchanged commits.
    committed: HashMap<(Arc<str>, u32), i64>,
    last_auto_commit: Instant,
    /// Since when transient failures have kept the member from making progress.
    failing_since: Option<Instant>,
}

impl std::fmt::Debug for GroupConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupConsumer")
            .field("group_id", &self.config.group_id)
            .field("member_id", &self.member_id)
            .field("generation_id", &self.generation_id)
            .finish()
    }
}

impl GroupConsumer {
    /// Connects to the bootstrap broker; the group is joined by the first `poll` after
    /// `subscribe`.
    pub async fn connect(client: ClientConfig, config: GroupConsumerConfig) -> Result<GroupConsumer> {
        if config.group_id.is_empty() {
            return Err(ClientError::InvalidArgument("the group id is empty".to_owned()));
        }
        if config.heartbeat_interval.is_zero() || config.heartbeat_interval >= config.session_timeout {
            return Err(ClientError::InvalidArgument(format!(
                "heartbeat_interval {:?} must be above zero and below session_timeout {:?}",
                config.heartbeat_interval, config.session_timeout
            )));
        }
        let consumer_config = ConsumerConfig {
            initial_offset: config.auto_offset_reset.offset(),
            auto_offset_reset: Some(config.auto_offset_reset.offset()),
            ..ConsumerConfig::default()
        };
        let consumer = Consumer::connect(client.clone(), consumer_config).await?;
        let shared: Shared = Arc::default();
        let heartbeat_task = tokio::spawn(heartbeat_loop(
            shared.clone(),
            config.group_id.clone(),
            client.client_id.clone(),
            config.heartbeat_interval,
            client.request_timeout.min(config.session_timeout),
        ));
        Ok(GroupConsumer {
            client,
            config,
            consumer,
            coordinator: None,
            subscription: Vec::new(),
            member_id: String::new(),
            generation_id: -1,
            shared,
            heartbeat_task,
            listener: None,
            committed: HashMap::new(),
            last_auto_commit: Instant::now(),
            failing_since: None,
        })
    }

    /// Sets the topics to consume; takes effect at the next `poll` (a rebalance if already a
    /// member).
    pub fn subscribe(&mut self, topics: Vec<String>) {
        let mut topics = topics;
        topics.sort();
        topics.dedup();
        if topics == self.subscription {
            return;
        }
        self.subscription = topics;
        if self.generation_id >= 0 {
            lock(&self.shared).event.get_or_insert(HeartbeatEvent::Rebalance);
        }
    }

    pub fn set_rebalance_listener(&mut self, listener: impl RebalanceListener + 'static) {
        self.listener = Some(Box::new(listener));
    }

    pub fn group_id(&self) -> &str {
        &self.config.group_id
    }

    /// The id the coordinator gave this member (empty before the first join).
    pub fn member_id(&self) -> &str {
        &self.member_id
    }

    /// The generation this member belongs to; -1 while it is not a member.
    pub fn generation_id(&self) -> i32 {
        self.generation_id
    }

    /// The partitions of the current generation.
    pub fn assignment(&self) -> Vec<(Arc<str>, u32)> {
        self.consumer.assignment()
    }

    /// The next offset `poll` returns for the partition (what `commit` would commit).
    pub fn position(&self, topic: &str, partition: u32) -> Option<i64> {
        self.consumer.position(topic, partition)
    }

    /// Moves an assigned partition's position to `offset` (Kafka's `seek`): the next poll reads
    /// from there, and a commit commits it. For records `poll` returned that the application did
    /// not process, so they are neither skipped nor committed.
    pub fn seek(&mut self, topic: &str, partition: u32, offset: i64) -> Result<()> {
        self.consumer.seek(topic, partition, Offset::At(offset))
    }

    /// The partition's high watermark as of the last fetch.
    pub fn high_watermark(&self, topic: &str, partition: u32) -> Option<i64> {
        self.consumer.high_watermark(topic, partition)
    }

    /// Joins or rejoins the group if needed, commits if auto-commit is due, then fetches from
    /// the member's partitions for up to `max_wait`.
    pub async fn poll(&mut self, max_wait: Duration) -> Result<Vec<ConsumerRecord>> {
        if let Err(e) = self.ensure_member().await {
            return self.transient(e, max_wait).await;
        }
        if self.config.auto_commit && self.last_auto_commit.elapsed() >= self.config.auto_commit_interval {
            self.last_auto_commit = Instant::now();
            if let Err(e) = self.commit().await {
                tracing::warn!(group = %self.config.group_id, error = %e, "auto-commit failed");
            }
        }
        if self.consumer.assignment().is_empty() {
            // Nothing to fetch: wait as a fetch would, so callers' loops do not spin.
            tokio::time::sleep(max_wait.min(self.config.heartbeat_interval)).await;
            return Ok(Vec::new());
        }
        match self.consumer.poll(max_wait).await {
            Ok(records) => {
                self.failing_since = None;
                Ok(records)
            }
            Err(e) => self.transient(e, max_wait).await,
        }
    }

    /// Commits the position of every assigned partition that moved since the last commit: the
    /// offset after the last record `poll` returned.
    pub async fn commit(&mut self) -> Result<()> {
        let offsets: Vec<((Arc<str>, u32), i64)> = self
            .consumer
            .assignment()
            .into_iter()
            .filter_map(|tp| {
                let position = self.consumer.position(&tp.0, tp.1)?;
                (self.committed.get(&tp) != Some(&position)).then_some((tp, position))
            })
            .collect();
        self.send_commit(offsets).await
    }

    /// Commits the given offsets (each the next offset to consume) as a member of the current
    /// generation.
    pub async fn commit_offsets(
        &mut self,
        offsets: impl IntoIterator<Item = ((String, u32), i64)>,
    ) -> Result<()> {
        let offsets = offsets.into_iter().map(|((t, p), o)| ((Arc::from(t), p), o)).collect();
        self.send_commit(offsets).await
    }

    /// Commits (with auto-commit), tells the listener, and leaves the group so the others
    /// rebalance at once. Returns the commit's error, if any, after leaving.
    pub async fn close(mut self) -> Result<()> {
        let mut result = Ok(());
        if self.generation_id >= 0 {
            result = self.revoke().await;
            let coordinator = self.coordinator().await;
            let left = match coordinator {
                Ok(c) => c.leave(&self.member_id).await,
                Err(e) => Err(e),
            };
            if let Err(e) = left {
                tracing::warn!(group = %self.config.group_id, error = %e, "leave group failed; the session will expire");
            }
        }
        self.heartbeat_task.abort();
        result
    }

    /// Decides what a failed step means: transient failures are retried by the next poll
    /// (returning no records now) until they outlast the request timeout.
    async fn transient(&mut self, e: ClientError, max_wait: Duration) -> Result<Vec<ConsumerRecord>> {
        let transient = e.invalidates_coordinator() || e.invalidates_metadata() || e.is_retriable();
        if !transient {
            return Err(e);
        }
        let since = *self.failing_since.get_or_insert_with(Instant::now);
        if since.elapsed() > self.client.request_timeout {
            self.failing_since = None;
            return Err(e);
        }
        tracing::debug!(group = %self.config.group_id, error = %e, "transient failure; retrying");
        tokio::time::sleep(RETRY_BACKOFF.min(max_wait.max(Duration::from_millis(10)))).await;
        Ok(Vec::new())
    }

    async fn coordinator(&mut self) -> Result<GroupCoordinator> {
        if let Some(c) = &self.coordinator {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        // JoinGroup parks until every member rejoined: up to the rebalance timeout.
        let timeout = self.client.request_timeout + self.config.rebalance_timeout;
        let c = GroupCoordinator::connect(&self.client, &self.config.group_id, timeout).await?;
        tracing::debug!(group = %self.config.group_id, addr = c.addr(), "found the group coordinator");
        if let Some(member) = lock(&self.shared).member.as_mut() {
            // The heartbeats follow the coordinator if it moved.
            member.coordinator_addr = c.addr().to_owned();
        }
        self.coordinator = Some(c.clone());
        Ok(c)
    }

    /// Makes this member part of the current generation, rejoining if the heartbeat task saw a
    /// rebalance or a fence.
    async fn ensure_member(&mut self) -> Result<()> {
        let event = lock(&self.shared).event.take();
        match event {
            None if self.generation_id >= 0 || self.subscription.is_empty() => return Ok(()),
            None | Some(HeartbeatEvent::Rebalance) => {
                if let Err(e) = self.revoke().await {
                    tracing::warn!(group = %self.config.group_id, error = %e, "commit before rejoining failed");
                }
            }
            Some(HeartbeatEvent::Fenced { unknown_member }) => {
                tracing::info!(group = %self.config.group_id, member = %self.member_id, "fenced; rejoining");
                self.lose(unknown_member);
            }
            Some(HeartbeatEvent::CoordinatorLost) => {
                self.coordinator = None;
                if self.generation_id >= 0 {
                    // Look it up again now, which points the heartbeats at it: they tell whether
                    // it still knows this member (after a broker restart it does not). Until one
                    // is found (its node died and no leader of its offsets partition is known
                    // yet), the member reads on, as librdkafka's does: the heartbeats report the
                    // loss again and a later poll looks again.
                    if let Err(e) = self.coordinator().await {
                        tracing::debug!(group = %self.config.group_id, error = %e, "group coordinator not found yet");
                    }
                    return Ok(());
                }
            }
        }
        if self.subscription.is_empty() {
            return Ok(());
        }
        loop {
            match self.join_and_sync().await {
                Ok(()) => {
                    self.failing_since = None;
                    return Ok(());
                }
                Err(e) if e.needs_rejoin() => {
                    if e.code() == Some(crate::protocol::wire::ErrorCode::UnknownMemberId) {
                        self.member_id.clear();
                    }
                    tracing::debug!(group = %self.config.group_id, error = %e, "rejoining");
                }
                Err(e) => {
                    if e.invalidates_coordinator() {
                        self.coordinator = None;
                    }
                    return Err(e);
                }
            }
        }
    }

    async fn join_and_sync(&mut self) -> Result<()> {
        let coordinator = self.coordinator().await?;
        let request = JoinRequest {
            member_id: self.member_id.clone(),
            session_timeout: self.config.session_timeout,
            rebalance_timeout: self.config.rebalance_timeout,
            topics: self.subscription.clone(),
            protocols: vec![(self.config.assignor.name().to_owned(), Vec::new())],
            server_assignment: true,
        };
        let joined = coordinator.join(&request).await?;
        self.member_id = joined.member_id;
        let generation_id = joined.generation_id;
        let assignment = coordinator.sync(generation_id, &self.member_id, &[]).await?;
        let committed = coordinator.fetch_offsets(&assignment).await?;

        let partitions: Vec<(String, u32)> =
            assignment.iter().flat_map(|t| t.partitions.iter().map(|&p| (t.topic.clone(), p))).collect();
        self.consumer.assign(partitions);
        self.committed.clear();
        for c in &committed {
            if let Some(offset) = c.offset {
                self.committed.insert((Arc::from(c.topic.as_str()), c.partition), offset);
            }
        }
        let reset = self.config.auto_offset_reset.offset();
        for (topic, partition) in self.consumer.assignment() {
            let start = self.committed.get(&(topic.clone(), partition)).map_or(reset, |&o| Offset::At(o));
            self.consumer.seek(&topic, partition, start)?;
        }
        self.generation_id = generation_id;
        lock(&self.shared).member = Some(Membership {
            member_id: self.member_id.clone(),
            generation_id,
            coordinator_addr: coordinator.addr().to_owned(),
        });
        let assigned = self.consumer.assignment();
        tracing::info!(
            group = %self.config.group_id,
            member = %self.member_id,
            generation_id,
            partitions = ?assigned,
            "joined the group"
        );
        if let Some(listener) = self.listener.as_mut() {
            listener.on_assigned(&assigned);
        }
        Ok(())
    }

    /// Gives up every partition before rejoining or leaving: tells the listener, commits what it
    /// staged (with auto-commit, every position), and stops heartbeating.
    async fn revoke(&mut self) -> Result<()> {
        let revoked = self.consumer.assignment();
        let mut commit = RevokeCommit::default();
        if self.config.auto_commit {
            for tp in &revoked {
                if let Some(position) = self.consumer.position(&tp.0, tp.1) {
                    if self.committed.get(tp) != Some(&position) {
                        commit.offsets.insert(tp.clone(), position);
                    }
                }
            }
        }
        if let Some(listener) = self.listener.as_mut() {
            listener.on_revoked(&revoked, &mut commit);
        }
        let result = self.send_commit(commit.offsets.into_iter().collect()).await;
        self.leave_generation();
        result
    }

    /// The member was fenced: its partitions are gone without a commit.
    fn lose(&mut self, unknown_member: bool) {
        let lost = self.consumer.assignment();
        if let Some(listener) = self.listener.as_mut() {
            listener.on_lost(&lost);
        }
        if unknown_member {
            self.member_id.clear();
        }
        self.leave_generation();
    }

    fn leave_generation(&mut self) {
        self.consumer.assign(Vec::new());
        self.generation_id = -1;
        let mut state = lock(&self.shared);
        state.member = None;
        // Whatever the heartbeats said was about the generation we just left.
        state.event = None;
    }

    async fn send_commit(&mut self, offsets: Vec<((Arc<str>, u32), i64)>) -> Result<()> {
        if offsets.is_empty() {
            return Ok(());
        }
        if self.generation_id < 0 {
            return Err(ClientError::NotGroupMember { group_id: self.config.group_id.clone() });
        }
        let wire_offsets: Vec<OffsetToCommit> = offsets
            .iter()
            .map(|((topic, partition), offset)| OffsetToCommit {
                topic: topic.to_string(),
                partition: *partition,
                offset: *offset,
                metadata: String::new(),
            })
            .collect();
        let coordinator = self.coordinator().await?;
        match coordinator.commit(self.generation_id, &self.member_id, &wire_offsets).await {
            Ok(()) => {
                self.committed.extend(offsets);
                Ok(())
            }
            Err(e) => {
                let mut state = lock(&self.shared);
                match e.code() {
                    Some(crate::protocol::wire::ErrorCode::RebalanceInProgress) => {
                        state.event.get_or_insert(HeartbeatEvent::Rebalance);
                    }
                    Some(crate::protocol::wire::ErrorCode::IllegalGeneration) => {
                        state.event = Some(HeartbeatEvent::Fenced { unknown_member: false });
                    }
                    Some(crate::protocol::wire::ErrorCode::UnknownMemberId) => {
                        state.event = Some(HeartbeatEvent::Fenced { unknown_member: true });
                    }
                    _ if e.invalidates_coordinator() => {
                        drop(state);
                        self.coordinator = None;
                    }
                    _ => {}
                }
                Err(e)
            }
        }
    }
}

impl Drop for GroupConsumer {
    fn drop(&mut self) {
        // Without `close`, the coordinator notices the member is gone at its session timeout.
        self.heartbeat_task.abort();
    }
}

/// Sends a heartbeat every `interval` while the consumer is a member; records what the
/// coordinator answers for the next `poll`. Runs until the consumer aborts it.
async fn heartbeat_loop(
    shared: Shared,
    group_id: String,
    client_id: String,
    interval: Duration,
    request_timeout: Duration,
) {
    let mut coordinator: Option<GroupCoordinator> = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(membership) = lock(&shared).member.clone() else { continue };
        let reusable =
            coordinator.as_ref().is_some_and(|c| !c.is_closed() && c.addr() == membership.coordinator_addr);
        if !reusable {
            let connected = GroupCoordinator::connect_at(
                &membership.coordinator_addr,
                &group_id,
                &client_id,
                request_timeout,
            )
            .await;
            match connected {
                Ok(c) => coordinator = Some(c),
                Err(e) => {
                    tracing::debug!(group = %group_id, error = %e, "heartbeat connection failed");
                    coordinator = None;
                    report(&shared, &membership, HeartbeatEvent::CoordinatorLost);
                    continue;
                }
            }
        }
        let Some(c) = coordinator.as_ref() else { continue };
        let Err(e) = c.heartbeat(membership.generation_id, &membership.member_id).await else { continue };
        use crate::protocol::wire::ErrorCode;
        let event = match e.code() {
            Some(ErrorCode::RebalanceInProgress) => HeartbeatEvent::Rebalance,
            Some(ErrorCode::IllegalGeneration) => HeartbeatEvent::Fenced { unknown_member: false },
            Some(ErrorCode::UnknownMemberId) => HeartbeatEvent::Fenced { unknown_member: true },
            _ => {
                tracing::debug!(group = %group_id, error = %e, "heartbeat failed");
                if e.invalidates_coordinator() {
                    coordinator = None;
                    HeartbeatEvent::CoordinatorLost
                } else {
                    continue;
                }
            }
        };
        report(&shared, &membership, event);
    }
}

/// Records an event unless the membership it is about already ended; a fence outranks a
/// rebalance, which outranks a lost coordinator.
fn report(shared: &Shared, about: &Membership, event: HeartbeatEvent) {
    let mut state = lock(shared);
    if state.member.as_ref() != Some(about) {
        return;
    }
    let rank = |e: &HeartbeatEvent| match e {
        HeartbeatEvent::Fenced { .. } => 2,
        HeartbeatEvent::Rebalance => 1,
        HeartbeatEvent::CoordinatorLost => 0,
    };
    if state.event.as_ref().is_none_or(|old| rank(&event) > rank(old)) {
        state.event = Some(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn membership(generation_id: i32) -> Membership {
        Membership { member_id: "m-1".into(), generation_id, coordinator_addr: "h:1".into() }
    }

    #[test]
    fn heartbeat_reports_rank_and_ignore_ended_memberships() {
        let shared: Shared = Arc::default();
        report(&shared, &membership(1), HeartbeatEvent::Rebalance);
        assert_eq!(lock(&shared).event, None, "not a member: nothing to report");
        lock(&shared).member = Some(membership(2));
        report(&shared, &membership(1), HeartbeatEvent::Rebalance);
        assert_eq!(lock(&shared).event, None, "about an older generation");
        report(&shared, &membership(2), HeartbeatEvent::CoordinatorLost);
        report(&shared, &membership(2), HeartbeatEvent::Rebalance);
        assert_eq!(lock(&shared).event, Some(HeartbeatEvent::Rebalance));
        report(&shared, &membership(2), HeartbeatEvent::Fenced { unknown_member: true });
        report(&shared, &membership(2), HeartbeatEvent::Rebalance);
        assert_eq!(lock(&shared).event, Some(HeartbeatEvent::Fenced { unknown_member: true }));
    }

    #[test]
    fn assignor_names_round_trip() {
        for a in [Assignor::Range, Assignor::RoundRobin, Assignor::Sticky] {
            assert_eq!(a.name().parse::<Assignor>(), Ok(a));
        }
        assert!("cooperative".parse::<Assignor>().is_err());
    }

    #[test]
    fn revoke_commit_stages_and_unstages() {
        let mut c = RevokeCommit::default();
        c.stage("t", 1, 10);
        c.stage("t", 0, 5);
        c.stage("t", 1, 12);
        c.unstage("t", 0);
        assert_eq!(c.staged().collect::<Vec<_>>(), vec![("t", 1, 12)]);
    }
}
