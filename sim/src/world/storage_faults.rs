//! Disk faults (issue 13): write errors, sync errors, full disks, and what a replica does about
//! them — exactly what the broker does. `shard::replica::PartitionReplica::drive` returns any
//! storage error (a failed append or `StorageFull` from `append_replicated`, a failed
//! `wait_durable`, a failed save of `raft.state` or `leader-epochs`) before it reports anything
//! persisted or sends what waited for the write, and `cluster::replicas::run_replica` then ends
//! the replica's task ("this replica stops"): it neither ticks nor answers again until its
//! process restarts. Here the group leaves its node (its disk stays as the fault left it) and,
//! after a while, the node is restarted as an operator would — a crash and a start, since the
//! process has to go for the replica to come back.

use raft::eraftpb::Message;
use ringlog::replication::rng::SeededRng;
use ringlog::replication::wire::GroupKey;

use super::{Broken, Event, MoreEvent, World};
use crate::disk::{WriteFault, WriteMark};

/// How often this seed's disks fail.
#[derive(Debug, Clone)]
pub struct DiskFaults {
    /// Per call that writes: an IO error in one of its writes.
    pub write_error_per_million: u32,
    /// Per sync.
    pub sync_error_per_million: u32,
    /// Some node's disk fills up about this often (0: never), for `full_ms`.
    pub full_every_ms: u64,
    pub full_ms: (u64, u64),
}

impl DiskFaults {
    pub fn from_seed(rng: &mut SeededRng) -> DiskFaults {
        // A third of the seeds keep their disks healthy, so the other faults are also seen alone.
        if rng.chance(333_333) {
            return DiskFaults {
                write_error_per_million: 0,
                sync_error_per_million: 0,
                full_every_ms: 0,
                full_ms: (0, 0),
            };
        }
        DiskFaults {
            write_error_per_million: rng.range(0, 400) as u32,
            sync_error_per_million: rng.range(0, 2_000) as u32,
            full_every_ms: if rng.chance(500_000) { rng.range(1_500, 8_000) } else { 0 },
            full_ms: (50, rng.range(100, 2_000)),
        }
    }

    /// The fault for one call of `SimDisk::write` carrying `writes` writes.
    pub fn write_fault(&self, rng: &mut SeededRng, faults: bool, full: bool, writes: usize) -> WriteFault {
        if writes == 0 || !faults {
            return WriteFault::None;
        }
        if full {
            return WriteFault::Full;
        }
        if rng.chance(self.write_error_per_million) {
            let nth = rng.range(0, writes as u64) as usize;
            return WriteFault::Io { nth, landed: rng.range(0, 3) as usize };
        }
        WriteFault::None
    }
}

impl World {
    pub(super) fn schedule_more_faults(&mut self) {
        let every = self.scenario.disk.full_every_ms;
        if every > 0 {
            let at = self.more_rng.range(every / 2, every * 3 / 2);
            self.schedule(at, Event::More(MoreEvent::DiskFull));
        }
        self.schedule_clock_fault();
    }

    pub(super) fn handle_more(&mut self, fault: MoreEvent) {
        match fault {
            MoreEvent::DiskFull => self.fill_a_disk(),
            MoreEvent::Reboot { node, incarnation } => {
                if self.node(node).alive && self.node(node).incarnation == incarnation {
                    self.crash_node(node);
                    self.restart(node);
                }
            }
            MoreEvent::Clock => self.clock_fault(),
            MoreEvent::IdempotentProduce => self.idempotent_round(),
            MoreEvent::CrashAfterCut { node, incarnation } => self.crash_after_cut(node, incarnation),
            MoreEvent::CrashInRestart { node, incarnation } => self.crash_in_restart(node, incarnation),
        }
    }

    fn fill_a_disk(&mut self) {
        if !self.faults {
            return;
        }
        let node = self.more_rng.range(1, self.scenario.nodes + 1);
        let (low, high) = self.scenario.disk.full_ms;
        let length = self.more_rng.range(low, high + 1);
        self.node(node).disk_full_until = self.now + length;
        self.log(|| format!("n{node} disk full for {length} ms"));
        let every = self.scenario.disk.full_every_ms;
        let next = self.more_rng.range(every / 2, every * 3 / 2) + length;
        self.schedule(next, Event::More(MoreEvent::DiskFull));
    }

    /// Whether the sync now completing failed instead.
    pub(super) fn sync_fails(&mut self) -> bool {
        self.faults && self.more_rng.chance(self.scenario.disk.sync_error_per_million)
    }

    /// A sync failed: nothing it covered is durable, ever (`SimDisk::sync_failed`). The replica
    /// stops, as `PartitionReplica::drive` stops on a failed `wait_durable`: it must not report
    /// the writes persisted nor send what waited for them.
    pub(super) fn sync_failed(
        &mut self,
        node: u64,
        group: GroupKey,
        mark: WriteMark,
        number: u64,
        then_send: Vec<Message>,
    ) {
        if let Some(disk) = self.node(node).disks.get_mut(&group) {
            disk.sync_failed(mark);
        }
        if self.broken != Broken::IgnoreSyncErrors {
            return self.stop_replica(node, group, format!("fdatasync #{number} failed: EIO"));
        }
        // The sabotage: the failure is taken for success (as a broker that retries fsync does).
        self.log(|| format!("n{node} p{} sync #{number} failed and was ignored", group.partition));
        let Some(g) = self.node(node).groups.get_mut(&group) else { return };
        g.persisted(number);
        let mut outbox = std::collections::BTreeMap::new();
        for m in then_send {
            outbox.entry(m.to).or_insert_with(Vec::new).push((group, m));
        }
        self.flush(node, outbox);
        self.drive(node);
    }

    /// The replica of `group` on `node` stops after a storage error; its node is restarted later.
    pub(super) fn stop_replica(&mut self, node: u64, group: GroupKey, reason: String) {
        // `drive` may have taken it out already, mid-pass.
        self.node(node).groups.remove(&group);
        self.log(|| format!("n{node} p{}: {reason}; the replica stops", group.partition));
        let incarnation = self.node(node).incarnation;
        let after = self.more_rng.range(100, 2_000);
        self.schedule(after, Event::More(MoreEvent::Reboot { node, incarnation }));
    }

    /// Faults end: full disks are emptied, clocks run true, and nodes with a stopped replica are
    /// crashed here so that `end_faults` starts them again.
    pub(super) fn end_more_faults(&mut self) {
        for id in 1..=self.scenario.nodes {
            self.node(id).disk_full_until = 0;
            self.reset_clock(id);
            let n = self.node(id);
            if n.alive && n.groups.len() < n.disks.len() {
                self.crash_node(id);
            }
        }
    }
}
