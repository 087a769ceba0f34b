//! Compaction and snapshots (issue 13): every node forgets the oldest entries of its replicas'
//! windows by the broker's rule (`cluster::replicas::compact_if_due`): a follower up to `keep`
//! entries behind what it applied, a leader up to `keep` behind the lowest match index of its
//! *in-sync* voters, once `step` more could go. A voter out of the in-sync replicas — crashed, cut
//! off, or behind for longer than the drawn `lag_ticks` — does not hold a leader back, so it is
//! sent a snapshot when it returns behind the leader's anchor and restarts its log
//! (`disk::SimDisk`). Small knobs, so that happens often in a run.
//!
//! The snapshot's producers are the broker's: the leader's `ReplicaLog` reads them from its disk's
//! producer state (`ProducerLog::as_of`, what `Partition::producers_as_of` returns) and encodes
//! them into the snapshot's data; the follower's `apply_snapshot` decodes them from the message it
//! received and hands them to its disk with the `RestartAt` (`disk::SimDisk`).
//!
//! The save of the new anchor meets the disk's faults as every save does (`storage_faults`): a
//! write error or a full disk fails it, and the replica stops, as `cluster::replicas::run_replica`
//! stops it when `compact_if_due` returns the error; the node is restarted later and the replica
//! reopens at its old anchor. Like a round's saves, it becomes durable with the next sync, whose
//! failure also stops the replica.
//!
//! The draws (knobs, and where a crash lands in an unsynced restart) come from a generator of
//! their own (`seed ^ const`), drawn only when a disk has a restart in flight; the faults of the
//! compactions' saves from another, so that the other draws of a seed stay as they were.

use raft::eraftpb::{Message, MessageType};
use ringlog::replication::group::GroupSettings;
use ringlog::replication::replica_log::LogWrite;
use ringlog::replication::rng::SeededRng;
use ringlog::replication::snapshot::SnapshotData;

use super::{Event, MoreEvent, World};
use crate::disk::{RestartCrash, SimDisk, WriteError};

#[derive(Debug, Clone, Copy)]
pub struct Compaction {
    /// Entries kept behind what may be forgotten (`raft_compaction_keep_entries`).
    pub keep: u64,
    /// Forgetting waits until this many more entries could go (`raft_compaction_step_entries`).
    pub step: u64,
    /// A follower that held less than its leader for this many ticks leaves the in-sync replicas
    /// (`replica_lag_time_max_ms`): short, so crashed followers leave them within a run.
    pub lag_ticks: u64,
}

impl Compaction {
    pub fn from_seed(rng: &mut SeededRng) -> Compaction {
        Compaction { keep: rng.range(2, 51), step: rng.range(5, 101), lag_ticks: rng.range(20, 151) }
    }

    /// Nothing is ever forgotten, with the broker's default lag: runs as before compaction, for
    /// regression seeds found then.
    pub fn off() -> Compaction {
        Compaction { keep: u64::MAX, step: u64::MAX, lag_ticks: GroupSettings::default().in_sync_lag_ticks }
    }
}

/// What the snapshots of a run did, for the summary.
#[derive(Debug, Default, Clone, Copy)]
pub struct SnapshotCounts {
    pub compactions: u64,
    pub sent: u64,
    /// Logs restarted from a snapshot (`RestartAt` carried out).
    pub restarts: u64,
    /// Restarts a crash interrupted after the flagged save, finished when the replica reopened.
    pub finished_on_open: u64,
    /// Restarts a crash undid before the flagged save.
    pub undone: u64,
    /// Compactions whose save failed (the replica stopped).
    pub failed_saves: u64,
}

/// A crash at a random moment rarely falls in the sync a restart from a snapshot waits for, so
/// half the restarts are followed by a crash of their node within a sync's time (while a majority
/// stays up).
const CRASH_IN_RESTART_PER_MILLION: u32 = 500_000;

pub struct Snapshots {
    rng: SeededRng,
    /// Draws the write faults of compactions' saves.
    save_rng: SeededRng,
    pub compaction: Compaction,
    pub counts: SnapshotCounts,
}

impl Snapshots {
    pub fn new(seed: u64, compact: bool) -> Snapshots {
        let mut rng = SeededRng::new(seed ^ 0x736e_6170_7368_6f74);
        let drawn = Compaction::from_seed(&mut rng);
        let compaction = if compact { drawn } else { Compaction::off() };
        let save_rng = SeededRng::new(seed ^ 0x636f_6d70_6163_7421);
        Snapshots { rng, save_rng, compaction, counts: SnapshotCounts::default() }
    }

    /// Where a crash lands in `disk`'s restart in flight (`Done` when there is none).
    pub fn crash(&mut self, disk: &SimDisk) -> RestartCrash {
        if !disk.has_unsynced_restart() {
            return RestartCrash::Done;
        }
        RestartCrash::ALL[self.rng.range(0, RestartCrash::ALL.len() as u64) as usize]
    }

    /// Counts the snapshots in `messages`; returns (recipient, index, offset, producers) of each,
    /// for the trace.
    pub fn sending(&mut self, messages: &[Message]) -> Vec<(u64, u64, i64, usize)> {
        let mut sent = Vec::new();
        for m in messages.iter().filter(|m| m.get_msg_type() == MessageType::MsgSnapshot) {
            let snapshot = m.get_snapshot();
            let index = snapshot.get_metadata().index;
            // The leader built it from its own anchor a moment ago: it decodes.
            let Ok(data) = SnapshotData::decode(&snapshot.data, index) else { continue };
            sent.push((m.to, index, data.start_offset, data.producers.len()));
            self.counts.sent += 1;
        }
        sent
    }
}

/// The sabotage `Broken::ForgetSnapshotProducers`: each restart in `writes` drops its producers.
pub fn forget_producers(writes: &mut [LogWrite]) {
    for write in writes {
        if let LogWrite::RestartAt { producers, .. } = write {
            *producers = Default::default();
        }
    }
}

/// The (index, offset) of each restart from a snapshot in `writes`, for the trace.
pub fn restarts(writes: &[LogWrite]) -> Vec<(u64, i64)> {
    let restart = |write: &LogWrite| match write {
        LogWrite::RestartAt { state, .. } => Some((state.anchor.index, state.anchor.end_offset)),
        _ => None,
    };
    writes.iter().filter_map(restart).collect()
}

impl World {
    pub(super) fn after_restart(&mut self, node: u64) {
        if !self.faults || !self.snapshots.rng.chance(CRASH_IN_RESTART_PER_MILLION) {
            return;
        }
        let after = self.snapshots.rng.range(0, self.scenario.sync_ms.1 + 1);
        let incarnation = self.node(node).incarnation;
        self.schedule(after, Event::More(MoreEvent::CrashInRestart { node, incarnation }));
    }

    pub(super) fn crash_in_restart(&mut self, node: u64, incarnation: u64) {
        if self.aimed_crash(node, incarnation, "right after a log restart") {
            let after = self.snapshots.rng.range(100, 2_000);
            self.schedule(after, Event::Restart { node });
        }
    }

    /// After a node's round: each of its replicas compacts by the broker's rule, and its disk
    /// carries out the anchor's save (durable with the next sync, as every save here), or fails
    /// it and the replica stops.
    pub(super) fn compact(&mut self, node: u64) {
        let Compaction { keep, step, .. } = self.snapshots.compaction;
        let n = &mut self.nodes[(node - 1) as usize];
        let full = self.faults && n.disk_full_until > self.now;
        let mut compacted = Vec::new();
        let mut stopped = Vec::new();
        for (key, group) in n.groups.iter_mut() {
            let applied = group.commit_index();
            let limit = group.lowest_match_in_sync().map_or(applied, |lowest| lowest.min(applied));
            let to = limit.saturating_sub(keep);
            if to < group.store().anchor().index.saturating_add(step) {
                continue;
            }
            if let Err(e) = group.store_mut().compact_to(to, applied) {
                self.checker.fail(format!("n{node} p{}: {e}", key.partition));
                return;
            }
            let Some(disk) = n.disks.get_mut(key) else { continue };
            let writes = group.store_mut().take_writes();
            let faults = &self.scenario.disk;
            let fault = faults.write_fault(&mut self.snapshots.save_rng, self.faults, full, writes.len());
            match disk.write(writes, fault) {
                Ok(()) => {}
                Err(WriteError::Failed(e)) => {
                    stopped.push((*key, format!("compacting to index {to}: {e}")));
                    continue;
                }
                Err(WriteError::Inconsistent(e)) => {
                    self.checker.fail(format!("n{node} p{}: compacting: {e}", key.partition));
                    return;
                }
            }
            self.snapshots.counts.compactions += 1;
            compacted.push((key.partition, to));
        }
        for (partition, to) in compacted {
            self.log(|| format!("n{node} p{partition} compacted to index {to}"));
        }
        for (key, reason) in stopped {
            self.snapshots.counts.failed_saves += 1;
            self.stop_replica(node, key, reason);
        }
    }
}
