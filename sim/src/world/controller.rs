//! The controller in the simulator (stop 18). Every node also runs a member of the controller's
//! Raft group — `RaftGroup<ControllerLog>` with the settings `cluster::start` gives it — over its
//! controller directory on a simulated disk (`controller_disk`), written one persister job at a
//! time as `Cluster::run_persister` does, and applies what commits with the broker's state
//! machine, `cluster::state::ControllerState`. The serving leader does what `Cluster::run_ticks`
//! does: registers itself and the nodes it hears from, and creates `__consumer_offsets` once
//! enough have registered. Clients change topics (create with new names, grow, delete, create a
//! deleted name again) through any node: a node proposes a change when it serves as leader,
//! otherwise hands it to the leader it knows (a controller request in a frame) and again to a
//! new one when leadership moves, as `Cluster::change_topic` does, and answers its client once
//! it applied the request; a client whose answer is late gives up and asks again, which the node
//! makes a new request.
//!
//! Its frames and draws are its own (`ControllerWorld::rng`), so a seed's partition groups run
//! exactly as before stop 18; the node's faults (cuts, crashes, pauses, clocks) hit both.
//! Not modelled: the controller log's own write and sync errors (the broker then stops taking
//! part in the controller group until it restarts).
//!
//! Checked (`ControllerChecker`): one leader per term; a committed entry never changes, at any
//! node, whenever it applies it, nor in any log at the end; after the faults every node applied
//! the same entries and holds the same metadata (nodes, topics, ids, replica sets); every answer
//! a client got is what the final log decides for its request, replayed by a model of its own
//! (names, ids, partition counts), so an answered change is in the log exactly once.

use std::collections::btree_map::Entry as Slot;
use std::collections::{BTreeMap, BTreeSet, HashSet};

use bytes::Bytes;
use raft::eraftpb::{Entry, Message};
use ringlog::cluster::controller_log::{ControllerLog, PendingWrites};
use ringlog::cluster::state::{
    self, AppliedCommand, ControllerCommand, ControllerState, TopicChange, TopicCommand,
};
use ringlog::cluster::NodeInfo;
use ringlog::metadata::{TopicOverrides, OFFSETS_TOPIC};
use ringlog::replication::group::{GroupSettings, Persist, RaftGroup, Role};
use ringlog::replication::rng::SeededRng;
use ringlog::replication::wire::{self, GroupKey, PeerBatch};
use ringlog::shard::BrokerError;

use super::{Broken, Event, World, KEEPALIVE_TICKS, TICK_MS};
use crate::controller_disk::{ControllerDisk, CrashLoss};

/// As `cluster::REPROPOSE_AFTER`: a registration (or the offsets topic) not yet committed is
/// proposed again after this long.
const REPROPOSE_AFTER_MS: u64 = 2_000;
/// A node gives up on a change it took from a client after this long (the broker's
/// `replication_timeout_ms`, scaled as the simulator's ticks are).
const CHANGE_TIMEOUT_MS: u64 = 1_000;
/// A client asks again this many times, each a new request, before it gives up.
const CLIENT_TRIES: u32 = 3;
const CLIENTS: usize = 2;
/// The names clients create, grow and delete: few, so a deleted name is soon created again.
const TOPIC_NAMES: [&str; 3] = ["orders", "likes", "clicks"];

/// The events of the controller's members and clients.
#[derive(Debug)]
pub(super) enum ControllerEvent {
    Deliver {
        from: u64,
        to: u64,
        frame: Bytes,
    },
    /// The node's persister job completed (if it is still the same process).
    Synced {
        node: u64,
        incarnation: u64,
    },
    /// A client's turn: a new change, or its wait for an answer is over.
    Client {
        client: usize,
        turn: u64,
    },
}

/// Per destination: the controller group's messages and the changes handed to its leader.
type Outbox = BTreeMap<u64, (Vec<(GroupKey, Message)>, Vec<Bytes>)>;

/// One node's member of the controller group: what `cluster::Cluster` keeps.
struct Member {
    group: RaftGroup<ControllerLog>,
    state: ControllerState,
    applied: u64,
    /// The persister: the job under way (what waits on it) and the writes queued behind it.
    in_flight: Option<Vec<Persist>>,
    queued: Option<(PendingWrites, Vec<Persist>)>,
    /// The peers this process heard from, as they said they are: its leader registers them.
    heard: BTreeMap<u64, NodeInfo>,
    registrations_proposed: BTreeMap<u64, u64>,
    offsets_proposed: Option<u64>,
    /// Changes this node took from a client and answers once it applied them.
    waiting: BTreeMap<u64, Waiting>,
}

struct Waiting {
    command: TopicCommand,
    client: usize,
    handed_to: Option<u64>,
    deadline: u64,
}

struct Client {
    turn: u64,
    /// The change it wants, the node it asked and that node's request id for it.
    asking: Option<Asking>,
}

struct Asking {
    command: TopicCommand,
    node: u64,
    incarnation: u64,
    tries: u32,
    /// Answered NOT_CONTROLLER (asked again at once, not counted as a try).
    not_controller: bool,
}

/// The controller side of the world: members, their disks, clients, and the checker.
pub struct ControllerWorld {
    rng: SeededRng,
    disks: Vec<ControllerDisk>,
    members: Vec<Option<Member>>,
    clients: Vec<Client>,
    next_request: u64,
    offsets_partitions: u32,
    /// `--broken apply-at-propose`: a node applies a topic change it proposes at once.
    apply_at_propose: bool,
    pub checker: ControllerChecker,
}

impl ControllerWorld {
    pub(super) fn new(seed: u64, nodes: u64, broken: Broken) -> ControllerWorld {
        ControllerWorld {
            rng: SeededRng::new(seed ^ 0x636f_6e74_726f_6c18),
            disks: (0..nodes).map(|_| ControllerDisk::default()).collect(),
            members: (0..nodes).map(|_| None).collect(),
            clients: (0..CLIENTS).map(|_| Client { turn: 0, asking: None }).collect(),
            next_request: 0,
            offsets_partitions: ringlog::config::BrokerConfig::default().offsets_topic_partitions,
            apply_at_propose: broken == Broken::ApplyAtPropose,
            checker: ControllerChecker::default(),
        }
    }
}

impl ControllerWorld {
    /// What the members reached, for the run's digest.
    pub(super) fn digest(&self) -> u64 {
        self.members.iter().flatten().fold(0xcbf2_9ce4_8422_2325u64, |digest, m| {
            (digest ^ m.applied ^ (m.group.term() << 32)).wrapping_mul(0x100_0000_01b3)
        })
    }
}

/// What a node says of itself at the handshake; a restart comes with new ports, so the leader
/// registers the node again.
fn node_info(id: u64, incarnation: u64) -> NodeInfo {
    NodeInfo {
        id,
        peer: format!("127.0.0.{id}:9100"),
        native: format!("127.0.0.{id}:{}", 9092 + incarnation),
        kafka: None,
        admin: format!("127.0.0.{id}:9644"),
    }
}

fn describe(command: &TopicCommand) -> String {
    match command {
        TopicCommand::Create { name, partitions, replication_factor, .. } => {
            format!("create {name} ({partitions} partitions x{replication_factor})")
        }
        TopicCommand::Grow { name, partitions, .. } => format!("grow {name} to {partitions} partitions"),
        TopicCommand::Delete { name, .. } => format!("delete {name}"),
    }
}

/// An outcome as the checker compares it: what a topic change did, or why it was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Created { id: u128, partitions: u32 },
    Grown { id: u128, partitions: u32 },
    Deleted { id: u128 },
    Refused(&'static str),
}

fn outcome_of(command: &TopicCommand, applied: &state::Applied) -> Outcome {
    match (command, applied) {
        (TopicCommand::Create { .. }, Ok(t)) => {
            Outcome::Created { id: t.replication.topic_id, partitions: t.replication.replicas.len() as u32 }
        }
        (TopicCommand::Grow { .. }, Ok(t)) => {
            Outcome::Grown { id: t.replication.topic_id, partitions: t.replication.replicas.len() as u32 }
        }
        (TopicCommand::Delete { .. }, Ok(t)) => Outcome::Deleted { id: t.replication.topic_id },
        (_, Err(BrokerError::TopicAlreadyExists { .. })) => Outcome::Refused("exists"),
        (_, Err(BrokerError::UnknownTopic { .. })) => Outcome::Refused("unknown"),
        (_, Err(BrokerError::InvalidPartitions(_))) => Outcome::Refused("partitions"),
        (_, Err(BrokerError::InvalidReplicationFactor(_))) => Outcome::Refused("replication factor"),
        (_, Err(_)) => Outcome::Refused("other"),
    }
}

impl World {
    fn member(&mut self, node: u64) -> Option<&mut Member> {
        self.controller.members[(node - 1) as usize].as_mut()
    }

    /// Starts node `id`'s member from its controller directory, as `cluster::start` does, and
    /// applies again what the log holds committed.
    pub(super) fn open_controller(&mut self, id: u64) {
        let voters: Vec<u64> = (1..=self.scenario.nodes).collect();
        let (log, torn) = match self.controller.disks[(id - 1) as usize].open(voters) {
            Ok(opened) => opened,
            Err(e) => return self.checker.fail(format!("n{id} cannot open the controller's log: {e}")),
        };
        if let Some(torn) = torn {
            self.log(|| format!("n{id} controller log: torn record cut ({torn})"));
        }
        let seed = self.controller.rng.next_u64();
        let group = match RaftGroup::new(id, "controller".into(), GroupSettings::default(), log, seed) {
            Ok(group) => group,
            Err(e) => return self.checker.fail(format!("n{id} cannot start the controller group: {e}")),
        };
        self.controller.members[(id - 1) as usize] = Some(Member {
            group,
            state: ControllerState::default(),
            applied: 0,
            in_flight: None,
            queued: None,
            heard: BTreeMap::new(),
            registrations_proposed: BTreeMap::new(),
            offsets_proposed: None,
            waiting: BTreeMap::new(),
        });
        self.drive_controller(id);
    }

    /// The process died: the member goes, its directory keeps what was durable.
    pub(super) fn crash_controller(&mut self, node: u64) {
        self.controller.members[(node - 1) as usize] = None;
        let keep_per_mille = self.controller.rng.range(0, 1_001);
        match self.controller.disks[(node - 1) as usize].crash(keep_per_mille) {
            CrashLoss::Nothing => {}
            CrashLoss::Appended { lost, kept } => self.log(|| {
                format!("n{node} controller log: {lost} unsynced bytes lost in the crash, {kept} kept")
            }),
            CrashLoss::CutUndone => {
                self.log(|| format!("n{node} controller log: the crash undid an unsynced cut"))
            }
        }
    }

    /// One tick of the node's timer for its member, then what `Cluster::run_ticks` does after
    /// it: the leader's registrations and offsets topic; every keepalive period, changes whose
    /// leader moved are handed again.
    pub(super) fn tick_controller(&mut self, node: u64) {
        let now = self.now;
        let Some(member) = self.member(node) else { return };
        member.group.tick();
        if member.group.is_serving() {
            self.register_nodes(node);
            self.ensure_offsets_topic(node);
        }
        if (now / TICK_MS).is_multiple_of(KEEPALIVE_TICKS) {
            self.hand_again(node);
        }
        self.drive_controller(node);
    }

    fn register_nodes(&mut self, node: u64) {
        let now = self.now;
        let me = node_info(node, self.nodes[(node - 1) as usize].incarnation);
        let Some(member) = self.member(node) else { return };
        let mut known = vec![me];
        known.extend(member.heard.values().cloned());
        let stale: Vec<NodeInfo> = member.state.stale_registrations(&known).into_iter().cloned().collect();
        for info in stale {
            let recent = member
                .registrations_proposed
                .get(&info.id)
                .is_some_and(|&at| now.saturating_sub(at) < REPROPOSE_AFTER_MS);
            if recent {
                continue;
            }
            if propose(&mut member.group, &ControllerCommand::Register(info.clone()), now).is_ok() {
                member.registrations_proposed.insert(info.id, now);
            }
        }
    }

    fn ensure_offsets_topic(&mut self, node: u64) {
        let now = self.now;
        let nodes = self.scenario.nodes as usize;
        let partitions = self.controller.offsets_partitions;
        let request = self.request_id(node);
        let Some(member) = self.member(node) else { return };
        let Some(replication_factor) = member.state.offsets_topic_due(nodes) else { return };
        if member.offsets_proposed.is_some_and(|at| now.saturating_sub(at) < REPROPOSE_AFTER_MS) {
            return;
        }
        let command = TopicCommand::Create {
            request,
            name: OFFSETS_TOPIC.into(),
            partitions,
            replication_factor,
            overrides: TopicOverrides::default(),
        };
        if propose(&mut member.group, &ControllerCommand::Topic(command), now).is_ok() {
            member.offsets_proposed = Some(now);
        }
    }

    /// A request id as the node that takes a change makes it: its id in the high bits.
    fn request_id(&mut self, node: u64) -> u64 {
        self.controller.next_request += 1;
        (node << 40) | self.controller.next_request
    }

    /// Polls the node's member until it has nothing more, as `Cluster::drive` does: sends,
    /// queues writes for the persister, applies what committed.
    pub(super) fn drive_controller(&mut self, node: u64) {
        let mut outbox: BTreeMap<u64, Vec<(GroupKey, Message)>> = BTreeMap::new();
        loop {
            let Some(member) = self.member(node) else { return };
            let output = match member.group.poll() {
                Ok(output) => output,
                Err(e) => return self.checker.fail(format!("n{node} controller: {e}")),
            };
            if output.send.is_empty() && output.persist.is_none() && output.committed.is_empty() {
                break;
            }
            for m in output.send {
                outbox.entry(m.to).or_default().push((GroupKey::CONTROLLER, m));
            }
            if let Some(persist) = output.persist {
                let writes = member.group.store_mut().take_writes();
                match &mut member.queued {
                    Some((queued, persists)) => {
                        queued.merge(writes);
                        persists.push(persist);
                    }
                    None => member.queued = Some((writes, vec![persist])),
                }
            }
            for entry in &output.committed {
                self.apply_controller_entry(node, entry);
            }
        }
        self.start_controller_job(node);
        if let Some(member) = self.member(node) {
            if member.group.role() == Role::Leader {
                let term = member.group.term();
                if self.controller.checker.leader(term, node) {
                    self.log(|| format!("n{node} leads the controller in term {term}"));
                }
            }
        }
        if let Some(failure) = self.controller.checker.failure.take() {
            self.checker.fail(failure);
        }
        let outbox = outbox.into_iter().map(|(to, messages)| (to, (messages, Vec::new()))).collect();
        self.flush_controller(node, outbox);
    }

    /// The persister takes everything queued as one job, if none is under way.
    fn start_controller_job(&mut self, node: u64) {
        let i = (node - 1) as usize;
        let Some(member) = self.controller.members[i].as_mut() else { return };
        if member.in_flight.is_some() {
            return;
        }
        let Some((writes, persists)) = member.queued.take() else { return };
        if let Err(e) = self.controller.disks[i].start(writes) {
            return self.checker.fail(format!("n{node} controller log write: {e}"));
        }
        member.in_flight = Some(persists);
        let (low, high) = self.scenario.sync_ms;
        let slow = self.faults && self.controller.rng.chance(5_000);
        let after =
            if slow { self.controller.rng.range(50, 400) } else { self.controller.rng.range(low, high + 1) };
        let incarnation = self.nodes[i].incarnation;
        self.schedule(after, Event::Controller(ControllerEvent::Synced { node, incarnation }));
    }

    fn controller_synced(&mut self, node: u64, incarnation: u64) {
        let i = (node - 1) as usize;
        if self.nodes[i].incarnation != incarnation || !self.nodes[i].alive {
            return;
        }
        self.controller.disks[i].synced();
        let Some(member) = self.controller.members[i].as_mut() else { return };
        let mut outbox: Outbox = BTreeMap::new();
        for persist in member.in_flight.take().unwrap_or_default() {
            member.group.persisted(persist.number);
            for m in persist.then_send {
                outbox.entry(m.to).or_default().0.push((GroupKey::CONTROLLER, m));
            }
        }
        self.flush_controller(node, outbox);
        self.drive_controller(node);
    }

    /// Applies committed entry `entry` at `node`, checks it, and carries out what it did: a
    /// topic change this node took from a client answers that client.
    fn apply_controller_entry(&mut self, node: u64, entry: &Entry) {
        let first_time = match self.controller.checker.committed(node, entry) {
            Ok(first_time) => first_time,
            Err(failure) => return self.checker.fail(failure),
        };
        let Some(member) = self.member(node) else { return };
        if entry.index != member.applied + 1 {
            let applied = member.applied;
            return self.checker.fail(format!(
                "n{node} controller applied entry {} after {applied}: not in log order",
                entry.index
            ));
        }
        member.applied = entry.index;
        let commands = match state::decode_entry(entry.index, &entry.data) {
            Ok(commands) => commands,
            Err(e) => return self.checker.fail(format!("n{node}: {e}")),
        };
        for command in commands {
            let topic_command = match &command {
                ControllerCommand::Topic(c) => Some(c.clone()),
                ControllerCommand::Register(_) => None,
            };
            let Some(member) = self.member(node) else { return };
            match member.state.apply_command(entry.index, command) {
                AppliedCommand::Registered(info) => {
                    member.registrations_proposed.remove(&info.id);
                    if first_time {
                        self.log(|| {
                            format!("controller #{} committed: n{} registered", entry.index, info.id)
                        });
                    }
                }
                AppliedCommand::Topic { request, outcome, change } => {
                    if first_time {
                        let (Some(command), change) = (&topic_command, &change) else { continue };
                        let what = match change {
                            Some(TopicChange::Create(t)) => format!("id {}", t.replication.topic_id),
                            Some(TopicChange::Grow(t, had)) => {
                                format!("{had} -> {} partitions", t.replication.replicas.len())
                            }
                            Some(TopicChange::Delete(t)) => format!("id {} gone", t.replication.topic_id),
                            None => "refused".into(),
                        };
                        let line = format!(
                            "controller #{} committed: {} [request {request:x}]: {what}",
                            entry.index,
                            describe(command)
                        );
                        self.log(|| line);
                    }
                    self.answer(node, request, &outcome);
                }
                AppliedCommand::Repeated { request } => {
                    self.controller.checker.repeats += u64::from(first_time);
                    if first_time {
                        self.log(|| {
                            format!(
                                "controller #{} committed: request {request:x} again, skipped",
                                entry.index
                            )
                        });
                    }
                }
            }
        }
    }

    /// Node `node` applied `request`: the client it took the change from gets its answer.
    fn answer(&mut self, node: u64, request: u64, outcome: &state::Applied) {
        let Some(member) = self.member(node) else { return };
        let Some(waiting) = member.waiting.remove(&request) else { return };
        let incarnation = self.nodes[(node - 1) as usize].incarnation;
        let client = &mut self.controller.clients[waiting.client];
        let asked = client.asking.as_ref().is_some_and(|a| {
            a.node == node && a.incarnation == incarnation && a.command.request() == request
        });
        if !asked {
            return;
        }
        client.asking = None;
        let answered = outcome_of(&waiting.command, outcome);
        let line = format!(
            "n{node} answers client {}: {} [request {request:x}]: {answered:?}",
            waiting.client,
            describe(&waiting.command)
        );
        self.log(|| line);
        self.controller.checker.answers.push((request, waiting.command, answered));
        self.next_client_turn(waiting.client);
    }

    /// A client's next change comes after a pause (none in the last two seconds, so the end
    /// state is checked at rest).
    fn next_client_turn(&mut self, client: usize) {
        let pause = self.controller.rng.range(50, 600);
        self.controller.clients[client].turn += 1;
        let turn = self.controller.clients[client].turn;
        self.schedule(pause, Event::Controller(ControllerEvent::Client { client, turn }));
    }

    pub(super) fn start_controller_clients(&mut self) {
        for client in 0..CLIENTS {
            self.next_client_turn(client);
        }
    }

    fn client_turn(&mut self, client: usize, turn: u64) {
        if self.controller.clients[client].turn != turn {
            return;
        }
        if self.now + 2_000 >= self.scenario.fault_ms + self.scenario.settle_ms {
            return;
        }
        let (command, tries) = match self.controller.clients[client].asking.take() {
            Some(asking) if asking.not_controller => (asking.command, asking.tries),
            // No answer in time (a timeout, or the node it asked went away): ask again.
            Some(asking) if asking.tries < CLIENT_TRIES => {
                let line = format!(
                    "client {client}: no answer to {} [request {:x}]; asking again",
                    describe(&asking.command),
                    asking.command.request()
                );
                self.log(|| line);
                self.controller.checker.client_retries += 1;
                (asking.command, asking.tries + 1)
            }
            Some(_) | None => (self.new_change(), 1),
        };
        // A client asks any node it can reach (a paused one would keep it waiting).
        let up: Vec<u64> =
            self.nodes.iter().filter(|n| n.alive && n.paused_until.is_none()).map(|n| n.id).collect();
        let Some(&node) = up.get(self.controller.rng.range(0, up.len().max(1) as u64) as usize) else {
            return self.next_client_turn(client);
        };
        let request = self.request_id(node);
        let command = with_request(command, request);
        let leader = self.member(node).and_then(|m| m.group.leader());
        let incarnation = self.nodes[(node - 1) as usize].incarnation;
        let line = format!("client {client} asks n{node}: {} [request {request:x}]", describe(&command));
        self.log(|| line);
        let deadline = self.now + CHANGE_TIMEOUT_MS;
        if let Some(member) = self.member(node) {
            let waiting = Waiting { command: command.clone(), client, handed_to: None, deadline };
            member.waiting.insert(request, waiting);
        }
        // Set before the node hands it on: an answer may come at once (`--broken apply-at-propose`).
        let asking = Asking { command: command.clone(), node, incarnation, tries, not_controller: false };
        self.controller.clients[client].asking = Some(asking);
        let handed = leader.is_some_and(|leader| self.hand_to(node, leader, request));
        let turn = self.controller.clients[client].turn + 1;
        if !handed {
            // NOT_CONTROLLER: no leader known there, or it cannot take changes yet; the client
            // asks again after a pause.
            self.log(|| format!("n{node} answers client {client}: not the controller"));
            if let Some(member) = self.member(node) {
                member.waiting.remove(&request);
            }
            let asking = Asking { command, node, incarnation, tries, not_controller: true };
            self.controller.clients[client].asking = Some(asking);
            self.controller.clients[client].turn = turn;
            return self.schedule(100, Event::Controller(ControllerEvent::Client { client, turn }));
        }
        if self.controller.clients[client].asking.is_some() {
            self.controller.clients[client].turn = turn;
            self.schedule(CHANGE_TIMEOUT_MS + 1, Event::Controller(ControllerEvent::Client { client, turn }));
        }
    }

    fn new_change(&mut self) -> TopicCommand {
        let rng = &mut self.controller.rng;
        let name = TOPIC_NAMES[rng.range(0, TOPIC_NAMES.len() as u64) as usize].to_string();
        match rng.range(0, 100) {
            0..=44 => TopicCommand::Create {
                request: 0,
                name,
                partitions: rng.range(1, 4) as u32,
                replication_factor: rng.range(1, self.scenario.nodes + 1) as u16,
                overrides: TopicOverrides::default(),
            },
            45..=69 => TopicCommand::Grow { request: 0, name, partitions: rng.range(2, 7) as u32 },
            _ => TopicCommand::Delete { request: 0, name },
        }
    }

    /// `Cluster::hand_to`: node `node` proposes the change when it serves as the controller's
    /// leader, or sends it to `leader` in a controller request. False when it could do neither
    /// (it is the leader but cannot take changes yet: NOT_CONTROLLER).
    fn hand_to(&mut self, node: u64, leader: u64, request: u64) -> bool {
        let now = self.now;
        let apply_at_propose = self.controller.apply_at_propose;
        let Some(member) = self.member(node) else { return false };
        let Some(waiting) = member.waiting.get(&request) else { return false };
        let command = ControllerCommand::Topic(waiting.command.clone());
        if leader != node {
            let Ok(encoded) = serde_json::to_vec(&command) else { return false };
            if let Some(waiting) = member.waiting.get_mut(&request) {
                waiting.handed_to = Some(leader);
            }
            self.log(|| format!("n{node} hands request {request:x} to n{leader}"));
            let outbox = BTreeMap::from([(leader, (Vec::new(), vec![Bytes::from(encoded)]))]);
            self.flush_controller(node, outbox);
            return true;
        }
        if !member.group.is_serving() {
            return false;
        }
        let proposed = propose(&mut member.group, &command, now);
        if proposed.is_err() {
            return false;
        }
        if let Some(waiting) = member.waiting.get_mut(&request) {
            waiting.handed_to = Some(leader);
        }
        if let (Ok(index), true) = (proposed, apply_at_propose) {
            self.apply_at_propose(node, index, command);
        }
        self.drive_controller(node);
        true
    }

    /// The sabotage: the leader applies its own proposal at once, answering its client before a
    /// majority holds the entry; when the entry commits, its request id is known and it is
    /// skipped.
    fn apply_at_propose(&mut self, node: u64, index: u64, command: ControllerCommand) {
        let Some(member) = self.member(node) else { return };
        if let AppliedCommand::Topic { request, outcome, .. } = member.state.apply_command(index, command) {
            self.answer(node, request, &outcome);
        }
    }

    /// Every keepalive period: a change whose leader moved is handed to the new one (the log
    /// applies a request id once); one past its deadline is given up (its client timed out).
    fn hand_again(&mut self, node: u64) {
        let now = self.now;
        let Some(member) = self.member(node) else { return };
        member.waiting.retain(|_, w| w.deadline > now);
        let Some(leader) = member.group.leader() else { return };
        let again: Vec<u64> =
            member.waiting.iter().filter(|(_, w)| w.handed_to != Some(leader)).map(|(&r, _)| r).collect();
        for request in again {
            // Not handed (this node leads but cannot take changes yet): tried again next period.
            let _ = self.hand_to(node, leader, request);
        }
    }

    /// A change another node handed here: proposed when this node serves as leader, dropped
    /// otherwise, as `Cluster::on_controller_request` does.
    fn on_controller_request(&mut self, node: u64, request: &[u8]) {
        let now = self.now;
        let Ok(command @ ControllerCommand::Topic(_)) = serde_json::from_slice::<ControllerCommand>(request)
        else {
            return self.checker.fail(format!("n{node} got a controller request that is not a topic change"));
        };
        let apply_at_propose = self.controller.apply_at_propose;
        let Some(member) = self.member(node) else { return };
        if !member.group.is_serving() {
            return;
        }
        let proposed = propose(&mut member.group, &command, now);
        if let (Ok(index), true) = (proposed, apply_at_propose) {
            self.apply_at_propose(node, index, command);
        }
    }

    /// The controller's frames: one per destination, on the same network as the partitions'
    /// (cuts, loss, duplicates, delays) but drawn from the controller's generator.
    fn flush_controller(&mut self, from: u64, outbox: Outbox) {
        for (to, (messages, controller_requests)) in outbox {
            if messages.is_empty() && controller_requests.is_empty() {
                continue;
            }
            self.controller.checker.frames += 1;
            let batch = PeerBatch {
                from_node: from,
                to_node: to,
                messages,
                controller_requests,
                ..PeerBatch::default()
            };
            let frame = Bytes::from(wire::encode(&batch).to_vec());
            let rng = &mut self.controller.rng;
            if self.cut.contains(&(from, to)) || (self.faults && rng.chance(self.scenario.loss_per_million)) {
                continue;
            }
            let copies = if self.faults && rng.chance(self.scenario.duplicate_per_million) { 2 } else { 1 };
            for _ in 0..copies {
                let rng = &mut self.controller.rng;
                let long = self.faults && rng.chance(self.scenario.long_delay_per_million);
                let (low, high) = self.scenario.delay_ms;
                let delay = if long { rng.range(100, 1_000) } else { rng.range(low, high + 1) };
                let frame = frame.clone();
                self.schedule(delay, Event::Controller(ControllerEvent::Deliver { from, to, frame }));
            }
        }
    }

    fn deliver_controller(&mut self, from: u64, to: u64, frame: Bytes) {
        if !self.nodes[(to - 1) as usize].alive || self.cut.contains(&(from, to)) {
            return;
        }
        let batch = match wire::decode(frame) {
            Ok(batch) => batch,
            Err(e) => {
                return self.checker.fail(format!("controller frame n{from}->n{to} does not decode: {e}"))
            }
        };
        let info = node_info(from, self.nodes[(from - 1) as usize].incarnation);
        let Some(member) = self.member(to) else { return };
        member.heard.insert(from, info);
        for request in &batch.controller_requests {
            self.on_controller_request(to, request);
        }
        for (key, m) in batch.messages {
            let Some(member) = self.member(to) else { return };
            if key != GroupKey::CONTROLLER {
                return self.checker.fail(format!("a controller frame n{from}->n{to} carries {key:?}"));
            }
            let kind = m.get_msg_type();
            if let Err(e) = member.group.step(m) {
                return self.checker.fail(format!("n{to} controller: step {kind:?}: {e}"));
            }
        }
        self.drive_controller(to);
    }

    pub(super) fn handle_controller(&mut self, event: ControllerEvent) {
        match event {
            ControllerEvent::Deliver { from, to, frame } => self.deliver_controller(from, to, frame),
            ControllerEvent::Synced { node, incarnation } => self.controller_synced(node, incarnation),
            ControllerEvent::Client { client, turn } => self.client_turn(client, turn),
        }
    }

    /// After the faults and the settling time: every member applied the same entries and holds
    /// the same metadata, every log agrees with what committed, and every answer is what the
    /// final log decides.
    pub(super) fn check_controller_end(&mut self) {
        let mut applied = Vec::new();
        for (i, member) in self.controller.members.iter().enumerate() {
            let Some(member) = member else {
                return self.checker.fail(format!("n{} has no controller member at the end", i + 1));
            };
            applied.push(member.applied);
            if let Err(failure) = self.controller.checker.log_agrees(i as u64 + 1, &member.group) {
                return self.checker.fail(failure);
            }
        }
        let commit = self.controller.checker.committed.keys().next_back().copied().unwrap_or(0);
        if applied.iter().any(|&a| a != commit) {
            return self.checker.fail(format!(
                "controller not converged: applied {applied:?} of {commit} committed entries"
            ));
        }
        let members: Vec<&Member> = self.controller.members.iter().flatten().collect();
        let first = &members[0].state;
        for (i, member) in members.iter().enumerate().skip(1) {
            if member.state.registered() != first.registered() || member.state.topics() != first.topics() {
                return self.checker.fail(format!(
                    "controller metadata differs: n1 has {:?}, n{} has {:?}",
                    summary(first),
                    i + 1,
                    summary(&member.state)
                ));
            }
        }
        let entries = members[0].group.store().entries()[..commit as usize].to_vec();
        let failure = self.controller.checker.check_answers(&entries, first, self.scenario.nodes);
        if let Some(failure) = failure {
            self.checker.fail(failure);
        }
    }
}

fn summary(state: &ControllerState) -> Vec<(String, u128, usize)> {
    state
        .topics()
        .values()
        .map(|t| (t.name.clone(), t.replication.topic_id, t.replication.replicas.len()))
        .collect()
}

fn with_request(command: TopicCommand, new: u64) -> TopicCommand {
    match command {
        TopicCommand::Create { name, partitions, replication_factor, overrides, .. } => {
            TopicCommand::Create { request: new, name, partitions, replication_factor, overrides }
        }
        TopicCommand::Grow { name, partitions, .. } => TopicCommand::Grow { request: new, name, partitions },
        TopicCommand::Delete { name, .. } => TopicCommand::Delete { request: new, name },
    }
}

/// `Cluster::propose`: the command as the log's entry; returns the entry's index.
fn propose(group: &mut RaftGroup<ControllerLog>, command: &ControllerCommand, now: u64) -> Result<u64, ()> {
    let data = state::encode_command(command, now as i64).map_err(|_| ())?;
    group.propose(data).map(|proposed| proposed.index).map_err(|_| ())
}

/// The controller's invariants (see the module's top).
#[derive(Default)]
pub struct ControllerChecker {
    failure: Option<String>,
    leaders: BTreeMap<u64, u64>,
    /// Index → (term, crc32c of the data) of every entry seen committed.
    committed: BTreeMap<u64, (u64, u32)>,
    /// (request, command, what the client was answered).
    answers: Vec<(u64, TopicCommand, Outcome)>,
    pub frames: u64,
    pub repeats: u64,
    pub client_retries: u64,
}

impl ControllerChecker {
    /// Records `node` leading in `term`; true the first time. A second leader fails the run.
    fn leader(&mut self, term: u64, node: u64) -> bool {
        match self.leaders.insert(term, node) {
            Some(other) if other != node => {
                self.failure
                    .get_or_insert(format!("two controller leaders in term {term}: n{other} and n{node}"));
                false
            }
            Some(_) => false,
            None => true,
        }
    }

    pub fn elections(&self) -> usize {
        self.leaders.len()
    }

    pub fn answered(&self) -> usize {
        self.answers.len()
    }

    /// An entry `node` applies as committed; true when no node had applied it before.
    fn committed(&mut self, node: u64, entry: &Entry) -> Result<bool, String> {
        let seen = (entry.term, crc32c::crc32c(&entry.data));
        match self.committed.insert(entry.index, seen) {
            Some(before) if before != seen => Err(format!(
                "controller entry {} committed as (term {}, crc {:08x}) but n{node} applies (term {}, crc {:08x})",
                entry.index, before.0, before.1, seen.0, seen.1
            )),
            Some(_) => Ok(false),
            None => Ok(true),
        }
    }

    /// `node`'s log holds every committed entry as it committed.
    fn log_agrees(&self, node: u64, group: &RaftGroup<ControllerLog>) -> Result<(), String> {
        let entries = group.store().entries();
        for (&index, &(term, crc)) in &self.committed {
            let held = entries.get((index - 1) as usize).map(|e| (e.term, crc32c::crc32c(&e.data)));
            if held != Some((term, crc)) {
                return Err(format!(
                    "n{node}'s controller log lost or changed committed entry {index}: {held:?}"
                ));
            }
        }
        Ok(())
    }

    /// Replays the final log with a model of its own and holds every answer to it: an answered
    /// change is in the log, applied once, with the outcome its client was told.
    fn check_answers(&self, entries: &[Entry], state: &ControllerState, nodes: u64) -> Option<String> {
        let mut model = Model::default();
        let mut decided: BTreeMap<u64, Outcome> = BTreeMap::new();
        for entry in entries {
            let commands = state::decode_entry(entry.index, &entry.data).ok()?;
            for command in commands {
                if let Some((request, outcome)) = model.apply(entry.index, command) {
                    decided.insert(request, outcome);
                }
            }
        }
        if model.registered.len() as u64 != nodes {
            return Some(format!("controller registered {:?} of {nodes} nodes", model.registered));
        }
        let held: BTreeMap<String, (u128, u32)> = state
            .topics()
            .values()
            .map(|t| (t.name.clone(), (t.replication.topic_id, t.replication.replicas.len() as u32)))
            .collect();
        if held != model.topics {
            return Some(format!(
                "controller metadata {held:?}, but the log replayed gives {:?}",
                model.topics
            ));
        }
        let mut created: BTreeMap<&str, BTreeSet<u128>> = BTreeMap::new();
        for (request, command, answered) in &self.answers {
            match decided.get(request) {
                Some(outcome) if outcome == answered => {}
                other => {
                    return Some(format!(
                    "request {request:x} ({}) was answered {answered:?}, but the final log decides {other:?}",
                    describe(command)
                ))
                }
            }
            if let (TopicCommand::Create { name, .. }, Outcome::Created { id, .. }) = (command, answered) {
                if !created.entry(name).or_default().insert(*id) {
                    return Some(format!("{name} created twice with id {id}"));
                }
            }
        }
        None
    }
}

/// The checker's own reading of the controller's log: names, ids and partition counts.
#[derive(Default)]
struct Model {
    registered: BTreeSet<u64>,
    topics: BTreeMap<String, (u128, u32)>,
    requests: HashSet<u64>,
}

impl Model {
    fn apply(&mut self, index: u64, command: ControllerCommand) -> Option<(u64, Outcome)> {
        let command = match command {
            ControllerCommand::Register(info) => {
                self.registered.insert(info.id);
                return None;
            }
            ControllerCommand::Topic(command) => command,
        };
        let request = command.request();
        if !self.requests.insert(request) {
            return None;
        }
        let nodes = self.registered.len();
        let outcome = match command {
            TopicCommand::Create { name, partitions, replication_factor, .. } => {
                match self.topics.entry(name) {
                    Slot::Occupied(_) => Outcome::Refused("exists"),
                    Slot::Vacant(_) if replication_factor == 0 || usize::from(replication_factor) > nodes => {
                        Outcome::Refused("replication factor")
                    }
                    Slot::Vacant(slot) => {
                        slot.insert((u128::from(index), partitions));
                        Outcome::Created { id: u128::from(index), partitions }
                    }
                }
            }
            TopicCommand::Delete { name, .. } => match self.topics.remove(&name) {
                Some((id, _)) => Outcome::Deleted { id },
                None => Outcome::Refused("unknown"),
            },
            TopicCommand::Grow { name, partitions, .. } => match self.topics.get_mut(&name) {
                None => Outcome::Refused("unknown"),
                Some((_, had)) if partitions <= *had => Outcome::Refused("partitions"),
                Some((id, had)) => {
                    *had = partitions;
                    Outcome::Grown { id: *id, partitions }
                }
            },
        };
        Some((request, outcome))
    }
}
