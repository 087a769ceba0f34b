//! Truncations a crash may undo (issue 13, stop 17). `Partition::truncate_to` cuts the segment
//! holding the offset with no sync of its own, so the cut is durable only once a later sync covers
//! it (`disk::SimDisk`); the unlinks of later segment files it syncs at once since stop 17
//! (`--broken unsynced-unlinks` leaves them to a later sync of the directory, as before). Here
//! are the draws: each node's sync (a syncfs per round, as the group commit under way on main
//! does, or an fdatasync per written file), each disk's segment size, at a crash whether it undoes
//! an unsynced cut and whether unlinked segment files come back, and crashes aimed right after
//! cuts. They come from a generator of their own (`seed ^ const`) and are drawn only when a disk
//! cut its log, so seeds without a truncation run as before.

use ringlog::replication::replica_log::LogWrite;
use ringlog::replication::rng::SeededRng;
use ringlog::replication::wire::GroupKey;

use super::{Event, MoreEvent, World};
use crate::disk::{CutCrash, CutCrashReport, SimDisk};

/// A segment rolls past this many bytes: small, so a cut of a few batches often spans segments
/// (the simulator's batches are 70–200 bytes).
const SEGMENT_BYTES: (u64, u64) = (256, 2_048);

/// Builds a node's disks with their segment sizes and the node's kind of sync.
pub struct CutFaults {
    rng: SeededRng,
    /// A truncation syncs the directory after its unlinks, as the broker does since stop 17;
    /// `--broken unsynced-unlinks` leaves them to a later sync.
    dir_synced_at_cut: bool,
}

impl CutFaults {
    pub fn new(seed: u64, dir_synced_at_cut: bool) -> CutFaults {
        CutFaults { rng: SeededRng::new(seed ^ 0x7472_756e_6361_7465), dir_synced_at_cut }
    }

    /// Whether a node's syncs are a syncfs of the whole filesystem (drawn once per node, like the
    /// broker's `fsync_scope` setting).
    pub fn node_syncfs(&mut self) -> bool {
        self.rng.chance(500_000)
    }

    pub fn disk(&mut self, voters: Vec<u64>, skip_truncation: bool, syncfs: bool) -> SimDisk {
        let segment_bytes = self.rng.range(SEGMENT_BYTES.0, SEGMENT_BYTES.1);
        SimDisk::new(voters, skip_truncation, segment_bytes, syncfs, self.dir_synced_at_cut)
    }

    /// At a crash: undo one of the disk's unsynced cuts (and all after it) half the time, and
    /// bring its unlinked segment files back three times in four (the worst case ext4 allows,
    /// drawn so that runs where they stay gone are also seen).
    pub fn crash(&mut self, disk: &SimDisk) -> CutCrash {
        let cuts = disk.unsynced_cuts();
        let undo = (cuts > 0 && self.rng.chance(500_000)).then(|| self.rng.range(0, cuts as u64) as usize);
        let relink = disk.has_unsynced_unlinks() && self.rng.chance(750_000);
        CutCrash { undo, relink }
    }
}

/// The trace line of what a crash did to one disk's cuts, if anything.
pub fn describe(report: &CutCrashReport) -> Option<String> {
    let mut parts = Vec::new();
    if report.undone_batches > 0 {
        parts.push(format!("a cut undone by the crash brings back {} batches", report.undone_batches));
    }
    for (base, verdict) in &report.relinked {
        parts.push(format!("unlinked segment file at offset {base} is back: {verdict}"));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// The offsets `writes` cut `disk`'s log at (a truncation at or past its end cuts nothing).
pub fn cut_offsets<'a>(writes: &'a [LogWrite], disk: &SimDisk) -> impl Iterator<Item = i64> + 'a {
    let end = disk.end_offset();
    writes.iter().filter_map(move |w| match w {
        LogWrite::TruncateTo { offset, .. } if *offset < end => Some(*offset),
        _ => None,
    })
}

/// A crash at a random moment rarely falls between a cut and the sync that covers it, so a
/// fifth of the cuts are followed by a crash of their node within a sync's time (while a majority
/// stays up).
const CRASH_AFTER_CUT_PER_MILLION: u32 = 500_000;

impl World {
    pub(super) fn after_cut(&mut self, node: u64, key: GroupKey, offset: i64) {
        self.log(|| format!("n{node} p{} cut its log at offset {offset}", key.partition));
        if !self.faults || !self.cuts.rng.chance(CRASH_AFTER_CUT_PER_MILLION) {
            return;
        }
        let after = self.cuts.rng.range(0, 3 * self.scenario.sync_ms.1 + 1);
        let incarnation = self.node(node).incarnation;
        self.schedule(after, Event::More(MoreEvent::CrashAfterCut { node, incarnation }));
    }

    /// A sync that left a cut's unlinks unsynced (an fdatasync of the cut file) opens the
    /// window where a crash brings them back: half the time a crash falls in it.
    pub(super) fn after_sync(&mut self, node: u64, key: GroupKey) {
        let open = self.node(node).disks.get(&key).is_some_and(SimDisk::has_unsynced_unlinks);
        if !self.faults || !open || !self.cuts.rng.chance(CRASH_AFTER_CUT_PER_MILLION) {
            return;
        }
        let after = self.cuts.rng.range(0, self.scenario.sync_ms.1 + 1);
        let incarnation = self.node(node).incarnation;
        self.schedule(after, Event::More(MoreEvent::CrashAfterCut { node, incarnation }));
    }

    pub(super) fn crash_after_cut(&mut self, node: u64, incarnation: u64) {
        if self.aimed_crash(node, incarnation, "right after a cut") {
            let after = self.cuts.rng.range(100, 2_000);
            self.schedule(after, Event::Restart { node });
        }
    }
}
