//! One simulated cluster: nodes running the real replication code (`ringlog::replication`: each
//! group a `RaftGroup` over the `ReplicaLog` a partition replica uses) over simulated disks
//! (`disk::SimDisk`), a simulated network that carries real frames (`wire`), and a
//! client workload, all on simulated time, driven by one seed. Faults are drawn from the seed:
//! message loss, delay, duplication and reordering, network partitions (both ways or one way) that
//! heal, node crashes that keep only what was synced (the unsynced tail lost or torn), pauses (a
//! stopped process), and slow syncs; disk write and sync errors and full disks
//! (`storage_faults`); clocks that jump, stand still or run fast or slow (`clock`); truncations
//! that a crash before their sync undoes, and crashes aimed right after them (`cuts`). Beside the
//! plain producer, idempotent producers retry at whichever node leads (`producers`). Every node
//! also runs a member of the controller group over its controller log and applies it with the
//! broker's state machine, while clients change topics through any node (`controller`).
//! Replicas compact their logs by the broker's rule, and followers a leader's compaction left
//! behind are sent snapshots and restart their logs (`snapshots`).
//!
//! With quiescence on (`--quiesce`), groups go quiet when idle (`replication::quiesce`), writes
//! come in bursts with idle gaps, every node sends each peer a keepalive every few ticks, and
//! each node counts a peer down when it has heard nothing from it for an election timeout — the
//! node-level liveness that wakes a quiet group whose leader died.

mod clock;
mod controller;
mod cuts;
mod producers;
mod snapshots;
mod storage_faults;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::fmt::Write;

use bytes::Bytes;
use raft::eraftpb::Message;
use ringlog::record::builder::BatchBuilder;
use ringlog::replication::group::{GroupSettings, Output, RaftGroup, Role, Sabotage};
use ringlog::replication::replica_log::{CacheLimits, ReplicaLog};
use ringlog::replication::rng::SeededRng;
use ringlog::replication::wire::{self, GroupKey, PeerBatch};

use crate::checker::{Checker, NodeView};
use crate::disk::{RestartCrash, SimDisk, WriteError, WriteMark};
use clock::{ClockFaults, NodeClock};
use controller::{ControllerEvent, ControllerWorld};
use cuts::CutFaults;
use producers::{IdempotentLoad, Producer};
use snapshots::Snapshots;
use storage_faults::DiskFaults;

pub const TICK_MS: u64 = 10;

/// With quiescence on: ticks between two keepalives from a node to each peer (as
/// `cluster::KEEPALIVE_TICKS`), and idle ticks before a leader goes quiet.
const KEEPALIVE_TICKS: u64 = 5;
const QUIESCE_AFTER_TICKS: u64 = 3;

/// What one run looks like; every field has a default drawn from the seed.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub nodes: u64,
    pub groups: u32,
    /// Faults are injected until here, then healed; the run ends `settle_ms` later.
    pub fault_ms: u64,
    pub settle_ms: u64,
    pub produce_every_ms: u64,
    pub loss_per_million: u32,
    pub duplicate_per_million: u32,
    pub delay_ms: (u64, u64),
    pub long_delay_per_million: u32,
    pub crash_every_ms: u64,
    pub partition_every_ms: u64,
    pub pause_every_ms: u64,
    pub sync_ms: (u64, u64),
    /// Entry data a replica keeps in memory: small, so followers that lag are served by reading
    /// the log back (raft-rs's asynchronous fetch).
    pub recent_cache_bytes: usize,
    pub disk: DiskFaults,
    pub clock: ClockFaults,
    pub idempotent: IdempotentLoad,
}

impl Scenario {
    /// The faults added by issue 13 come from `more`, so that the rest of a seed's run is drawn
    /// as it was before them.
    pub fn from_seed(rng: &mut SeededRng, more: &mut SeededRng) -> Scenario {
        Scenario {
            nodes: if rng.chance(300_000) { 5 } else { 3 },
            groups: rng.range(1, 5) as u32,
            fault_ms: rng.range(4_000, 10_000),
            settle_ms: 6_000,
            produce_every_ms: rng.range(2, 30),
            loss_per_million: rng.range(0, 50_000) as u32,
            duplicate_per_million: rng.range(0, 20_000) as u32,
            delay_ms: (1, rng.range(2, 30)),
            long_delay_per_million: rng.range(0, 10_000) as u32,
            crash_every_ms: rng.range(300, 3_000),
            partition_every_ms: rng.range(500, 4_000),
            pause_every_ms: rng.range(1_000, 6_000),
            sync_ms: (0, rng.range(1, 20)),
            recent_cache_bytes: rng.range(1, 64 << 10) as usize,
            disk: DiskFaults::from_seed(more),
            clock: ClockFaults::from_seed(more),
            idempotent: IdempotentLoad::from_seed(more),
        }
    }
}

#[derive(Debug)]
enum Event {
    Tick {
        node: u64,
    },
    Deliver {
        from: u64,
        to: u64,
        frame: Bytes,
    },
    Synced {
        node: u64,
        incarnation: u64,
        group: GroupKey,
        mark: WriteMark,
        number: u64,
        then_send: Vec<Message>,
    },
    Produce,
    Crash,
    Restart {
        node: u64,
    },
    Partition,
    Heal,
    Pause,
    Resume {
        node: u64,
    },
    EndFaults,
    More(MoreEvent),
    /// The controller group's traffic, persister and clients (stop 18).
    Controller(ControllerEvent),
}

/// The events of issue 13's faults and workload, handled in their modules (`handle_more`).
#[derive(Debug)]
enum MoreEvent {
    DiskFull,
    /// A node whose replica stopped is restarted (if it is still the same process).
    Reboot {
        node: u64,
        incarnation: u64,
    },
    Clock,
    IdempotentProduce,
    /// A node crashes soon after one of its disks cut its log (if it is still the same process).
    CrashAfterCut {
        node: u64,
        incarnation: u64,
    },
    /// A node crashes soon after one of its disks restarted its log from a snapshot.
    CrashInRestart {
        node: u64,
        incarnation: u64,
    },
}

struct Node {
    id: u64,
    /// Bumped at each crash: syncs issued before it never complete.
    incarnation: u64,
    alive: bool,
    paused_until: Option<u64>,
    groups: BTreeMap<GroupKey, RaftGroup<ReplicaLog>>,
    /// Outlive the node's crashes.
    disks: BTreeMap<GroupKey, SimDisk>,
    /// The disk is full until then (ms).
    disk_full_until: u64,
    clock: NodeClock,
    /// With quiescence on: when a frame from each peer last arrived (or this node started).
    heard: BTreeMap<u64, u64>,
}

pub struct World {
    pub scenario: Scenario,
    broken: Broken,
    rng: SeededRng,
    /// Draws the faults issue 13 added, apart from `rng`.
    more_rng: SeededRng,
    /// Draws the segments, syncs and crashes of truncations (stop 17), apart from both.
    cuts: CutFaults,
    /// Compaction and snapshot counts; its own draws, apart from all three.
    pub(crate) snapshots: Snapshots,
    now: u64,
    sequence: u64,
    events: BinaryHeap<Reverse<(u64, u64, usize)>>,
    payloads: Vec<Option<Event>>,
    nodes: Vec<Node>,
    /// Directed links that drop everything.
    cut: BTreeSet<(u64, u64)>,
    faults: bool,
    next_record: u64,
    producers: Vec<Producer>,
    pub checker: Checker,
    /// Every node's member of the controller group, and the clients that change topics.
    pub(crate) controller: ControllerWorld,
    pub trace: Option<String>,
    pub frames_sent: u64,
    pub messages_sent: u64,
    /// Groups go quiet when idle, and nodes keep node-level liveness by keepalives.
    quiesce: bool,
    /// Group-ticks a quiet group skipped, and quiet followers woken because their leader's node
    /// was counted down.
    pub quiet_ticks: u64,
    pub woken_by_death: u64,
}

fn view(nodes: &[Node]) -> Vec<NodeView<'_>> {
    nodes
        .iter()
        .map(|n| {
            let groups = n.groups.iter().filter_map(|(k, g)| Some((*k, g, n.disks.get(k)?))).collect();
            (n.id, n.alive, groups)
        })
        .collect()
}

fn group_key(index: u32) -> GroupKey {
    GroupKey { topic_id: 1, partition: index }
}

/// A deliberately broken variant of the code under test, to prove the checker catches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Broken {
    #[default]
    None,
    /// Followers acknowledge appends (and votes) before the write is durable.
    AckBeforeSync,
    /// Leaders report the log end as the high watermark, committed or not.
    ServeUncommitted,
    /// A rejoining replica keeps its divergent suffix instead of truncating it.
    SkipTruncation,
    /// A failed fdatasync is taken for success (retried, as brokers did before "fsyncgate"):
    /// the writes are reported persisted and acknowledged, though they are lost.
    IgnoreSyncErrors,
    /// A truncation leaves the unlinks of later segment files to a later sync of the directory
    /// (the broker before stop 17): a crash after an fdatasync of the cut file brings them back.
    UnsyncedUnlinks,
    /// A node applies a topic change to its controller state when it proposes it, and answers
    /// its client then, before a majority holds the entry (its commit is then skipped as a
    /// repeat of the request).
    ApplyAtPropose,
    /// A follower restarted from a leader's snapshot drops the producers it carries (the
    /// simulator before the issue 13 follow-ups sent none): a retry of a batch below its new log
    /// start is written again once it leads.
    ForgetSnapshotProducers,
}

fn settings(broken: Broken, quiesce: bool, in_sync_lag_ticks: u64) -> GroupSettings {
    let sabotage = match broken {
        Broken::AckBeforeSync => Sabotage::AckBeforeSync,
        Broken::ServeUncommitted => Sabotage::ServeUncommitted,
        Broken::None
        | Broken::SkipTruncation
        | Broken::IgnoreSyncErrors
        | Broken::UnsyncedUnlinks
        | Broken::ApplyAtPropose
        | Broken::ForgetSnapshotProducers => Sabotage::None,
    };
    GroupSettings {
        max_size_per_msg: 64 << 10,
        max_inflight_msgs: 16,
        quiesce_after_ticks: if quiesce { QUIESCE_AFTER_TICKS } else { 0 },
        in_sync_lag_ticks,
        sabotage,
        ..GroupSettings::default()
    }
}

impl World {
    /// `compact`: replicas compact their logs (and so send snapshots); off, a seed runs as it did
    /// before the simulator compacted.
    pub fn new(seed: u64, trace: bool, broken: Broken, quiesce: bool, compact: bool) -> World {
        let mut rng = SeededRng::new(seed);
        let mut more_rng = SeededRng::new(seed ^ 0x6973_7375_6531_3300);
        let mut scenario = Scenario::from_seed(&mut rng, &mut more_rng);
        if quiesce {
            // Sparse writes, so groups are idle long enough to go quiet between them.
            scenario.produce_every_ms = rng.range(40, 400);
        }
        let voters: Vec<u64> = (1..=scenario.nodes).collect();
        let mut cuts = CutFaults::new(seed, broken != Broken::UnsyncedUnlinks);
        let mut nodes = Vec::new();
        for id in 1..=scenario.nodes {
            let mut node = Node {
                id,
                incarnation: 0,
                alive: true,
                paused_until: None,
                groups: BTreeMap::new(),
                disks: BTreeMap::new(),
                disk_full_until: 0,
                clock: NodeClock::default(),
                heard: (1..=scenario.nodes).filter(|&peer| peer != id).map(|peer| (peer, 0)).collect(),
            };
            let syncfs = cuts.node_syncfs();
            for g in 0..scenario.groups {
                let disk = cuts.disk(voters.clone(), broken == Broken::SkipTruncation, syncfs);
                node.disks.insert(group_key(g), disk);
            }
            nodes.push(node);
        }
        let mut world = World {
            broken,
            checker: Checker::new(scenario.groups),
            controller: ControllerWorld::new(seed, scenario.nodes, broken),
            scenario,
            rng,
            more_rng,
            cuts,
            snapshots: Snapshots::new(seed, compact),
            now: 0,
            sequence: 0,
            events: BinaryHeap::new(),
            payloads: Vec::new(),
            nodes,
            cut: BTreeSet::new(),
            faults: true,
            next_record: 0,
            producers: Vec::new(),
            trace: trace.then(String::new),
            frames_sent: 0,
            messages_sent: 0,
            quiesce,
            quiet_ticks: 0,
            woken_by_death: 0,
        };
        for id in 1..=world.scenario.nodes {
            world.open_groups(id);
            let first_tick = world.rng.range(0, TICK_MS);
            world.schedule(first_tick, Event::Tick { node: id });
        }
        world.schedule(world.scenario.produce_every_ms, Event::Produce);
        let s = world.scenario.clone();
        for (every, event) in [
            (s.crash_every_ms, Event::Crash),
            (s.partition_every_ms, Event::Partition),
            (s.pause_every_ms, Event::Pause),
        ] {
            let at = world.rng.range(every / 2, every * 3 / 2);
            world.schedule(at, event);
        }
        world.schedule(s.fault_ms, Event::EndFaults);
        world.producers = (0..world.scenario.groups).map(Producer::new).collect();
        world.schedule_more_faults();
        world.schedule_idempotent();
        // After everything the partitions draw from `rng`, so their runs stay as they were.
        for id in 1..=world.scenario.nodes {
            world.open_controller(id);
        }
        world.start_controller_clients();
        world
    }

    fn log(&mut self, line: impl FnOnce() -> String) {
        if let Some(trace) = &mut self.trace {
            let _ = writeln!(trace, "{:>7} ms  {}", self.now, line());
        }
    }

    fn schedule(&mut self, after_ms: u64, event: Event) {
        self.sequence += 1;
        self.payloads.push(Some(event));
        self.events.push(Reverse((self.now + after_ms, self.sequence, self.payloads.len() - 1)));
    }

    fn node(&mut self, id: u64) -> &mut Node {
        &mut self.nodes[(id - 1) as usize]
    }

    fn open_groups(&mut self, id: u64) {
        let keys: Vec<GroupKey> = self.node(id).disks.keys().copied().collect();
        let limits = CacheLimits { recent_bytes: self.scenario.recent_cache_bytes, fetched_bytes: 1 << 20 };
        let lag_ticks = self.snapshots.compaction.lag_ticks;
        for key in keys {
            let seed = self.rng.next_u64();
            let Some(disk) = self.node(id).disks.get_mut(&key) else { continue };
            let restart = disk.restart_on_open();
            let log = match disk.open(limits) {
                Ok(log) => log,
                Err(e) => return self.checker.fail(format!("node {id} cannot open the log of {key:?}: {e}")),
            };
            if let Some(offset) = restart {
                self.snapshots.counts.finished_on_open += 1;
                self.log(|| {
                    format!("n{id} p{} finished its log's restart at offset {offset} on open", key.partition)
                });
            }
            let name = format!("p{}@n{id}", key.partition);
            match RaftGroup::new(id, name, settings(self.broken, self.quiesce, lag_ticks), log, seed) {
                Ok(group) => {
                    self.node(id).groups.insert(key, group);
                }
                Err(e) => self.checker.fail(format!("node {id} cannot open group {key:?}: {e}")),
            }
        }
    }

    /// Runs to the end; returns a digest of what happened (the same seed must give the same).
    pub fn run(&mut self) -> u64 {
        let end = self.scenario.fault_ms + self.scenario.settle_ms;
        let mut digest = 0xcbf2_9ce4_8422_2325u64;
        while let Some(Reverse((at, sequence, slot))) = self.events.pop() {
            if at > end || self.checker.failed() {
                break;
            }
            self.now = at;
            digest = (digest ^ sequence).wrapping_mul(0x100_0000_01b3);
            if let Some(event) = self.payloads[slot].take() {
                self.handle(event);
            }
        }
        self.checker.check_end(&view(&self.nodes), self.now);
        if !self.checker.failed() {
            self.check_controller_end();
        }
        if self.quiesce && !self.checker.failed() {
            // Seconds without writes or faults: every group must have gone quiet, on every node
            // (a group that cannot go quiet, or keeps waking, would tick for ever).
            let awake: Vec<String> = self
                .nodes
                .iter()
                .flat_map(|n| {
                    n.groups.iter().filter(|(_, g)| !g.is_quiet()).map(move |(k, _)| (n.id, k.partition))
                })
                .map(|(node, partition)| format!("p{partition}@n{node}"))
                .collect();
            if !awake.is_empty() {
                self.checker.fail(format!("still awake after the settling time: {awake:?}"));
            }
        }
        for node in &self.nodes {
            for group in node.groups.values() {
                digest = (digest ^ group.commit_index() ^ (group.term() << 32)).wrapping_mul(0x100_0000_01b3);
            }
        }
        (digest ^ self.controller.digest()).wrapping_mul(0x100_0000_01b3)
    }

    fn paused(&self, id: u64) -> Option<u64> {
        self.nodes[(id - 1) as usize].paused_until
    }

    fn handle(&mut self, event: Event) {
        // A paused node handles nothing until it resumes: what arrives for it waits.
        let target = match &event {
            Event::Tick { node }
            | Event::Synced { node, .. }
            | Event::Controller(ControllerEvent::Synced { node, .. }) => Some(*node),
            Event::Deliver { to, .. } | Event::Controller(ControllerEvent::Deliver { to, .. }) => Some(*to),
            _ => None,
        };
        if let Some(until) = target.and_then(|id| self.paused(id)) {
            self.sequence += 1;
            self.payloads.push(Some(event));
            self.events.push(Reverse((until, self.sequence, self.payloads.len() - 1)));
            return;
        }
        match event {
            Event::Tick { node } => {
                let now = self.now;
                let ticking = self.node(node).alive && !self.node(node).clock.stands_still(now);
                if ticking && self.quiesce {
                    self.tick_quiescing(node);
                } else if ticking {
                    for group in self.node(node).groups.values_mut() {
                        group.tick();
                    }
                    self.drive(node);
                }
                if ticking {
                    self.tick_controller(node);
                }
                let every = self.node(node).clock.tick_ms;
                self.schedule(every, Event::Tick { node });
            }
            Event::Deliver { from, to, frame } => self.deliver(from, to, frame),
            Event::Synced { node, incarnation, group, mark, number, then_send } => {
                if self.node(node).incarnation != incarnation || !self.node(node).alive {
                    return;
                }
                if self.sync_fails() {
                    return self.sync_failed(node, group, mark, number, then_send);
                }
                if let Some(disk) = self.node(node).disks.get_mut(&group) {
                    disk.synced(mark);
                }
                self.after_sync(node, group);
                // A replica stopped by a storage error sends nothing more: in the broker its
                // rounds run one after another, so a later round's acknowledgements (here, a
                // sync that completes after an earlier one failed) never exist.
                let Some(g) = self.node(node).groups.get_mut(&group) else { return };
                g.persisted(number);
                self.log(|| format!("n{node} p{} synced #{number}", group.partition));
                let mut outbox = BTreeMap::new();
                for m in then_send {
                    outbox.entry(m.to).or_insert_with(Vec::new).push((group, m));
                }
                self.flush(node, outbox);
                self.drive(node);
            }
            Event::Produce => {
                // Quiet for the last two seconds, so the end state can be checked at rest.
                if self.now + 2_000 >= self.scenario.fault_ms + self.scenario.settle_ms {
                    return;
                }
                self.produce();
                let every = self.scenario.produce_every_ms;
                self.schedule(every, Event::Produce);
            }
            Event::Crash => self.crash(),
            Event::Restart { node } => self.restart(node),
            Event::Partition => self.partition(),
            Event::Heal => {
                self.cut.clear();
                self.log(|| "network healed".into());
            }
            Event::Pause => self.pause(),
            Event::Resume { node } => {
                self.node(node).paused_until = None;
                self.log(|| format!("n{node} resumed"));
            }
            Event::EndFaults => self.end_faults(),
            Event::More(fault) => self.handle_more(fault),
            Event::Controller(event) => self.handle_controller(event),
        }
    }

    /// A tick with quiescence on: node-level liveness first (a peer unheard for an election
    /// timeout is down, and quiet groups that depend on it wake), then the groups' ticks (a quiet
    /// group ignores its own), then a keepalive to every peer every few ticks.
    fn tick_quiescing(&mut self, node: u64) {
        let now = self.now;
        let down_after = GroupSettings::default().election_ticks as u64 * TICK_MS;
        let n = &mut self.nodes[(node - 1) as usize];
        let down: BTreeSet<u64> = n
            .heard
            .iter()
            .filter(|&(_, &at)| now.saturating_sub(at) >= down_after)
            .map(|(&p, _)| p)
            .collect();
        let mut woken = Vec::new();
        for (key, group) in n.groups.iter_mut() {
            let follower = group.role() != Role::Leader;
            if group.on_nodes_down(|id| down.contains(&id)) && follower {
                woken.push(key.partition);
            }
            if group.is_quiet() {
                self.quiet_ticks += 1;
            }
            group.tick_with(|id| !down.contains(&id));
        }
        self.woken_by_death += woken.len() as u64;
        for partition in woken {
            self.log(|| format!("n{node} p{partition} woken: its leader's node is down ({down:?})"));
        }
        self.drive(node);
        if (now / TICK_MS).is_multiple_of(KEEPALIVE_TICKS) {
            let peers = self.node(node).heard.keys().map(|&peer| (peer, Vec::new())).collect();
            self.flush(node, peers);
        }
    }

    /// Polls every group of `node` until none has output: sends what may go now, starts syncs.
    fn drive(&mut self, node: u64) {
        let mut outbox: BTreeMap<u64, Vec<(GroupKey, Message)>> = BTreeMap::new();
        let mut syncs = Vec::new();
        let mut fetched = Vec::new();
        let mut stopped = Vec::new();
        let mut cut_at = Vec::new();
        let mut snapshots_sent = Vec::new();
        let mut restarts = Vec::new();
        loop {
            let mut progressed = false;
            let n = &mut self.nodes[(node - 1) as usize];
            for (key, group) in n.groups.iter_mut() {
                let output = match group.poll() {
                    Ok(output) => output,
                    Err(e) => {
                        self.checker.fail(format!("n{node}: {e}"));
                        return;
                    }
                };
                let Output { send, persist, .. } = output;
                progressed |= !send.is_empty() || persist.is_some();
                let Some(disk) = n.disks.get_mut(key) else {
                    for m in send {
                        outbox.entry(m.to).or_default().push((*key, m));
                    }
                    continue;
                };
                let then_send = persist.as_ref().map_or(&[][..], |p| &p.then_send[..]);
                for sent in [&send[..], then_send] {
                    let sent = self.snapshots.sending(sent);
                    snapshots_sent.extend(sent.into_iter().map(|s| (key.partition, s)));
                }
                for m in send {
                    outbox.entry(m.to).or_default().push((*key, m));
                }
                let mut writes = group.store_mut().take_writes();
                if self.broken == Broken::ForgetSnapshotProducers {
                    snapshots::forget_producers(&mut writes);
                }
                let started = snapshots::restarts(&writes);
                cut_at.extend(cuts::cut_offsets(&writes, disk).map(|offset| (*key, offset)));
                let full = self.faults && n.disk_full_until > self.now;
                let fault =
                    self.scenario.disk.write_fault(&mut self.more_rng, self.faults, full, writes.len());
                match disk.write(writes, fault) {
                    Ok(()) => {
                        self.snapshots.counts.restarts += started.len() as u64;
                        restarts.extend(started.into_iter().map(|r| (key.partition, r)));
                    }
                    Err(WriteError::Failed(e)) => {
                        // `shard::replica::drive` returns the error and the replica's task ends:
                        // nothing of this round is reported persisted or acknowledged.
                        stopped.push((*key, e));
                        continue;
                    }
                    Err(WriteError::Inconsistent(e)) => {
                        self.checker.fail(format!("n{node} p{}: {e}", key.partition));
                        return;
                    }
                }
                if let Some(persist) = persist {
                    syncs.push((*key, disk.mark(), persist));
                }
                for fetch in group.store_mut().take_fetches() {
                    let batches = disk.read(fetch.base_offset, fetch.end_offset);
                    fetched.push((*key, fetch.first_index, batches.len()));
                    group.store_mut().fetched(fetch.first_index, batches);
                    group.on_entries_fetched(fetch.context);
                    progressed = true;
                }
            }
            for (key, _) in &stopped {
                n.groups.remove(key);
            }
            self.checker.observe(&view(&self.nodes), self.now);
            if !progressed {
                break;
            }
        }
        for (partition, (to, index, offset, producers)) in snapshots_sent {
            self.log(|| {
                format!(
                    "n{node} p{partition} sends n{to} a snapshot of index {index}: its log restarts at offset {offset}, with {producers} producers"
                )
            });
        }
        for (partition, (index, offset)) in &restarts {
            self.log(|| format!("n{node} p{partition} restarts its log at offset {offset} from a snapshot of index {index}"));
        }
        if !restarts.is_empty() {
            self.after_restart(node);
        }
        for (key, first_index, count) in fetched {
            self.log(|| {
                format!(
                    "n{node} p{} read {count} entries back from {first_index} for a follower",
                    key.partition
                )
            });
        }
        for (key, reason) in stopped {
            self.stop_replica(node, key, reason);
        }
        for (key, offset) in cut_at {
            self.after_cut(node, key, offset);
        }
        self.compact(node);
        let incarnation = self.node(node).incarnation;
        for (group, mark, persist) in syncs {
            let (low, high) = self.scenario.sync_ms;
            let slow = self.faults && self.rng.chance(5_000);
            let after = if slow { self.rng.range(50, 400) } else { self.rng.range(low, high + 1) };
            self.schedule(
                after,
                Event::Synced {
                    node,
                    incarnation,
                    group,
                    mark,
                    number: persist.number,
                    then_send: persist.then_send,
                },
            );
        }
        self.flush(node, outbox);
    }

    /// One frame per destination for everything gathered in this pass (coalesced heartbeats).
    fn flush(&mut self, from: u64, outbox: BTreeMap<u64, Vec<(GroupKey, Message)>>) {
        for (to, messages) in outbox {
            self.messages_sent += messages.len() as u64;
            self.frames_sent += 1;
            let frame = Bytes::from(
                wire::encode(&PeerBatch { from_node: from, to_node: to, messages, ..PeerBatch::default() })
                    .to_vec(),
            );
            if self.cut.contains(&(from, to))
                || (self.faults && self.rng.chance(self.scenario.loss_per_million))
            {
                continue;
            }
            let copies =
                if self.faults && self.rng.chance(self.scenario.duplicate_per_million) { 2 } else { 1 };
            for _ in 0..copies {
                let long = self.faults && self.rng.chance(self.scenario.long_delay_per_million);
                let (low, high) = self.scenario.delay_ms;
                let delay = if long { self.rng.range(100, 1_000) } else { self.rng.range(low, high + 1) };
                self.schedule(delay, Event::Deliver { from, to, frame: frame.clone() });
            }
        }
    }

    fn deliver(&mut self, from: u64, to: u64, frame: Bytes) {
        if !self.node(to).alive || self.cut.contains(&(from, to)) {
            return;
        }
        let batch = match wire::decode(frame) {
            Ok(batch) => batch,
            Err(e) => return self.checker.fail(format!("frame n{from}->n{to} does not decode: {e}")),
        };
        let now = self.now;
        self.node(to).heard.insert(from, now);
        for (key, m) in batch.messages {
            let kind = m.get_msg_type();
            let Some(group) = self.node(to).groups.get_mut(&key) else { continue };
            if let Err(e) = group.step(m) {
                self.checker.fail(format!("n{to} p{}: step {kind:?}: {e}", key.partition));
                return;
            }
        }
        self.drive(to);
    }

    fn produce(&mut self) {
        let g = self.rng.range(0, u64::from(self.scenario.groups)) as u32;
        let key = group_key(g);
        let leaders: Vec<u64> = self
            .nodes
            .iter()
            .filter(|n| n.alive && n.paused_until.is_none())
            .filter(|n| n.groups.get(&key).is_some_and(|g| g.role() == Role::Leader))
            .map(|n| n.id)
            .collect();
        let Some(&leader) = leaders.get(self.rng.range(0, leaders.len().max(1) as u64) as usize) else {
            return;
        };
        let records = self.rng.range(1, 4);
        let mut builder = BatchBuilder::new();
        let mut ids = Vec::new();
        for _ in 0..records {
            self.next_record += 1;
            ids.push(self.next_record);
            builder.push(self.now as i64, None, Some(&self.next_record.to_be_bytes()), &[]);
        }
        let Some(group) = self.node(leader).groups.get_mut(&key) else { return };
        match group.propose(builder.finish()) {
            Ok(proposed) => {
                self.log(|| {
                    format!(
                        "n{leader} p{g} proposed {ids:?} at index {} offset {}",
                        proposed.index, proposed.base_offset
                    )
                });
                self.checker.proposed(key, leader, proposed, ids);
                self.drive(leader);
            }
            Err(e) => self.log(|| format!("n{leader} p{g} refused a produce: {e}")),
        }
    }

    fn alive_nodes(&self) -> Vec<u64> {
        self.nodes.iter().filter(|n| n.alive).map(|n| n.id).collect()
    }

    fn crash(&mut self) {
        if !self.faults {
            return;
        }
        let alive = self.alive_nodes();
        // Keep a majority up most of the time, but not always: a cluster must also come back
        // from losing its quorum.
        let may_lose_quorum = self.rng.chance(100_000);
        if alive.len() as u64 > self.scenario.nodes / 2 + 1 || may_lose_quorum {
            let node = alive[self.rng.range(0, alive.len() as u64) as usize];
            self.crash_node(node);
            let after = self.rng.range(100, 2_000);
            self.schedule(after, Event::Restart { node });
        }
        let every = self.scenario.crash_every_ms;
        let next = self.rng.range(every / 2, every * 3 / 2);
        self.schedule(next, Event::Crash);
    }

    /// A crash aimed at a window a fault opened (a cut's unsynced unlinks, a restart from a
    /// snapshot): `node` crashes if it is still the incarnation that opened it and a majority
    /// stays up. Whether it crashed; the caller schedules the restart from its own generator.
    fn aimed_crash(&mut self, node: u64, incarnation: u64, why: &str) -> bool {
        let alive = self.alive_nodes().len() as u64;
        if !self.faults
            || !self.node(node).alive
            || self.node(node).incarnation != incarnation
            || alive <= self.scenario.nodes / 2 + 1
        {
            return false;
        }
        self.log(|| format!("n{node} crashes {why}"));
        self.crash_node(node);
        true
    }

    /// The node's process dies: its groups go, its disks keep what was synced and a torn part
    /// of the rest.
    fn crash_node(&mut self, node: u64) {
        let n = self.node(node);
        n.alive = false;
        n.incarnation += 1;
        n.paused_until = None;
        n.groups.clear();
        let tears: Vec<usize> = (0..n.disks.len()).map(|_| self.rng.range(0, 3) as usize).collect();
        let draws: Vec<_> =
            self.nodes[(node - 1) as usize].disks.values().map(|d| self.cuts.crash(d)).collect();
        let restarts: Vec<_> =
            self.nodes[(node - 1) as usize].disks.values().map(|d| self.snapshots.crash(d)).collect();
        let mut cut_lines = Vec::new();
        for ((key, disk), ((torn_keep, cut), restart)) in
            self.nodes[(node - 1) as usize].disks.iter_mut().zip(tears.into_iter().zip(draws).zip(restarts))
        {
            if disk.has_unsynced_restart() {
                cut_lines.push(format!(
                    "n{node} p{}: the crash lands in its log's restart: {restart:?}",
                    key.partition
                ));
                if restart == RestartCrash::BeforeFlaggedSave {
                    self.snapshots.counts.undone += 1;
                }
            }
            if let Some(line) = cuts::describe(&disk.crash(torn_keep, cut, restart)) {
                cut_lines.push(format!("n{node} p{}: {line}", key.partition));
            }
        }
        self.log(|| format!("n{node} crashed"));
        for line in cut_lines {
            self.log(|| line);
        }
        self.crash_controller(node);
    }

    fn restart(&mut self, node: u64) {
        if self.node(node).alive {
            return;
        }
        self.node(node).alive = true;
        // A node that just started has heard no one yet: it gives every peer an election
        // timeout, as at the start of the run.
        let now = self.now;
        self.node(node).heard.values_mut().for_each(|at| *at = now);
        self.open_groups(node);
        self.log(|| format!("n{node} restarted"));
        self.open_controller(node);
        self.checker.restarted(node);
    }

    fn partition(&mut self) {
        if !self.faults {
            return;
        }
        let victim = self.rng.range(1, self.scenario.nodes + 1);
        let one_way = self.rng.chance(300_000);
        for other in 1..=self.scenario.nodes {
            if other != victim {
                self.cut.insert((victim, other));
                if !one_way {
                    self.cut.insert((other, victim));
                }
            }
        }
        self.log(|| format!("n{victim} cut off{}", if one_way { " (its sends only)" } else { "" }));
        let heal = self.rng.range(200, 3_000);
        self.schedule(heal, Event::Heal);
        let every = self.scenario.partition_every_ms;
        let next = self.rng.range(every / 2, every * 3 / 2) + heal;
        self.schedule(next, Event::Partition);
    }

    fn pause(&mut self) {
        if !self.faults {
            return;
        }
        let node = self.rng.range(1, self.scenario.nodes + 1);
        if self.node(node).alive && self.node(node).paused_until.is_none() {
            let length = self.rng.range(100, 2_500);
            self.node(node).paused_until = Some(self.now + length);
            self.log(|| format!("n{node} paused for {length} ms"));
            self.schedule(length, Event::Resume { node });
        }
        let every = self.scenario.pause_every_ms;
        let next = self.rng.range(every / 2, every * 3 / 2);
        self.schedule(next, Event::Pause);
    }

    fn end_faults(&mut self) {
        self.faults = false;
        self.cut.clear();
        self.end_more_faults();
        for id in 1..=self.scenario.nodes {
            if self.node(id).paused_until.take().is_some() {
                self.log(|| format!("n{id} resumed"));
            }
            if !self.node(id).alive {
                self.restart(id);
            }
        }
        self.log(|| "faults end: network healed, every node up".into());
    }
}
