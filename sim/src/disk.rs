//! The simulated disk of one replica: its partition log's batches and its two small files
//! (`raft.state`, `leader-epochs`), as `shard::replica` keeps them on a real one. The replica's
//! `ReplicaLog` hands over its writes (`LogWrite`) and they land here at once but become durable
//! only when a sync issued after them completes; a crash keeps the durable prefix and tears off
//! part of the rest. Opening after a crash does what the shard does: the saved state, then a scan
//! of the batches after its anchor.
//!
//! Segments and cuts (issue 13, stop 17). The log is kept in segment files as the partition keeps
//! it, rolled when the next batch would pass `segment_bytes`. A truncation is what
//! `Partition::truncate_to` does: it cuts the segment holding the offset (ftruncate) and unlinks
//! the later segment files, with no sync of its own. The cut of the file is durable once a sync
//! issued after it completes: an fdatasync of the file written next covers the file's size, a
//! syncfs everything. Until then a crash may undo it: the log comes back as it was before the
//! cut (the appends after it, never synced, lost with it). The unlinks are durable only once the
//! directory is synced after them: by a syncfs, by a save of `raft.state` (its store fsyncs the
//! directory) or by a roll's seal (`sync_dir`); an fdatasync of a segment file does not cover
//! them (ext4 with fast commits), so a crash may bring the unlinked files back, and the restart
//! then recovers them as `recover_segments` does: attached if they start where the log ends,
//! removed after a gap, and an overlap refuses to open. The journal commits in order, so an
//! unsynced batch that survives a crash brings every unlink before it along. A directory synced
//! at the cut (`SimDisk::new`'s `dir_synced_at_cut`, what the broker does since stop 17) leaves
//! only the undone cut.
//!
//! Faults (issue 13): a write may fail with an IO error after part of it reached the disk, a full
//! disk refuses appends and saves before a byte is written (the partition reserves space before
//! it accepts an append: `StorageFull`), and a sync may fail. A failed sync leaves what it should
//! have covered lost for good (the kernel may drop the pages: "fsyncgate"): a later sync that
//! succeeds does not make it durable, and a crash cuts the log there. What the replica does about
//! each is the caller's (`world::storage_faults`), as it is `shard::replica`'s in the broker.
//!
//! Restarts from a leader's snapshot (`LogWrite::RestartAt`, stop 18) are carried out as
//! `PartitionReplica::carry_out` does: the snapshot's epochs and `raft.state` with
//! `restart_pending` saved, the old log removed and a new empty one started at the offset with
//! the leader's producers, the state saved again with the flag clear. In the broker each step is
//! durable before the next; here the restart lands at once and is durable once a sync issued
//! after it completes, and a crash before that lands in one of its steps, drawn by the caller
//! (`RestartCrash`). Opening a disk whose saved state has the flag set finishes the restart, as
//! `PartitionReplica::open` does.
//!
//! The producers. The disk keeps the partition's producer state (`ProducerLog`): the producers a
//! snapshot brought, then every batch of the log recorded, rebuilt after a cut or a crash. The
//! replica's `ReplicaLog` reads a snapshot's producers from it (`ProducersAsOf`, as
//! `shard::replica` gives it the partition), so a leader's snapshot carries the real state as of
//! its offset, encoded as the broker encodes it; a follower's `RestartAt` brings the state the
//! real `apply_snapshot` decoded from the message it received, staged before the flag in the
//! partition's producer-state format (`Partition::stage_restart`) and read back by the open that
//! finishes an interrupted restart.

use std::cell::{Ref, RefCell};
use std::cmp::Reverse;
use std::rc::Rc;

use bytes::Bytes;
use raft::eraftpb::Entry;
use ringlog::record::BatchHeader;
use ringlog::replication::epochs::LeaderEpochs;
use ringlog::replication::replica_log::{
    CacheLimits, LogWrite, OpenError, ProducersAsOf, ReplicaLog, ReplicaState, ScannedBatch,
};
use ringlog::storage::{ProducerLog, ProducerStates};

/// A point in a disk's writes: a sync issued there covers everything written before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteMark(u64);

#[derive(Debug, Clone)]
struct Saved {
    state: ReplicaState,
    epochs: LeaderEpochs,
}

/// A fault drawn for one call of `SimDisk::write`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFault {
    None,
    /// The `nth` write of the call fails with an IO error after its first `landed` batches
    /// reached the disk (not durable); the writes after it are not carried out.
    Io {
        nth: usize,
        landed: usize,
    },
    /// The disk is full: appends and state saves fail with nothing written; truncations, which
    /// free space, go through.
    Full,
}

/// Why `SimDisk::write` stopped.
#[derive(Debug)]
pub enum WriteError {
    /// An injected fault, as the real storage returns it (`StorageError`, `StateFileError`).
    Failed(String),
    /// The replica's view and its disk disagree: a bug the run must report.
    Inconsistent(String),
}

/// The log as it was before a truncation no completed sync covers yet: what a crash may bring
/// back.
#[derive(Debug, Clone)]
struct UnsyncedCut {
    write: u64,
    batches: Vec<(Bytes, u64)>,
    segments: Vec<i64>,
    durable_batches: usize,
    lost_from: Option<usize>,
    /// Batches the cut kept: a failed sync after it that lost one of them lost it here too.
    kept: usize,
}

/// A segment file a truncation unlinked, not yet covered by a sync of the directory: a crash may
/// bring it back with the batches it held durably.
#[derive(Debug, Clone)]
struct UnlinkedSegment {
    write: u64,
    base_offset: i64,
    batches: Vec<Bytes>,
}

/// What a crash does to a disk's unsynced cuts, drawn by the caller.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CutCrash {
    /// Undo the cut at this position in the unsynced ones (oldest first) and all after it.
    pub undo: Option<usize>,
    /// Unlinked segment files come back.
    pub relink: bool,
}

/// A restart from a snapshot no completed sync covers yet.
#[derive(Debug, Clone)]
struct PendingRestart {
    write: u64,
    /// The disk as it was before the restart: what a crash before the flagged save leaves.
    before: Box<SimDisk>,
    /// The snapshot's state with `restart_pending` set, and the same with it clear.
    flagged: Saved,
    done: Saved,
}

/// Where in an unsynced restart from a snapshot a crash lands, drawn by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartCrash {
    /// The old log and state stand (the snapshot is sent again).
    BeforeFlaggedSave,
    /// The flag is saved but the old log is not all gone and the new segment and producer-state
    /// file are not written: the open finishes the restart with the leader's producers staged
    /// before the flag (`Partition::stage_restart`).
    BeforeNewLog,
    /// The new log and its producer-state file are written, the flag still set: the open
    /// finishes the restart with the producers it recovers.
    BeforeClearedSave,
    /// The restart is done; only what was appended after it is subject to the crash.
    Done,
}

impl RestartCrash {
    pub const ALL: [RestartCrash; 4] = [
        RestartCrash::BeforeFlaggedSave,
        RestartCrash::BeforeNewLog,
        RestartCrash::BeforeClearedSave,
        RestartCrash::Done,
    ];
}

/// The partition's producer state, shared with the replica's `ReplicaLog`, which reads a
/// snapshot's producers from it. A clone of the disk (the disk as it was before a restart, kept
/// for a crash) copies the state: only the live disk's log may read it.
#[derive(Debug, Default)]
struct SharedProducers(Rc<RefCell<ProducerLog>>);

impl Clone for SharedProducers {
    fn clone(&self) -> SharedProducers {
        SharedProducers(Rc::new(RefCell::new(self.0.borrow().clone())))
    }
}

/// What a crash did to a disk's cuts, for the trace.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CutCrashReport {
    /// Batches of the log that a cut had removed and the crash brought back.
    pub undone_batches: usize,
    /// Base offsets of unlinked segment files that came back, and what recovery made of them.
    pub relinked: Vec<(i64, &'static str)>,
}

#[derive(Debug, Clone)]
pub struct SimDisk {
    voters: Vec<u64>,
    /// The log's batches with the write that put each there.
    batches: Vec<(Bytes, u64)>,
    /// Base offsets of the segment files, oldest first (the first is the log start).
    segments: Vec<i64>,
    /// Bytes of the active (last) segment, and where it rolls.
    active_bytes: u64,
    segment_bytes: u64,
    /// Truncations not yet covered by a completed sync, oldest first.
    unsynced_cuts: Vec<UnsyncedCut>,
    /// Segment files unlinked by truncations, not yet covered by a sync of the directory.
    unlinked: Vec<UnlinkedSegment>,
    /// Writes whose completion syncs the directory (saves of `raft.state`, rolls), oldest first.
    dir_syncs: Vec<u64>,
    /// Every sync is a syncfs (the shard group commit's `FsyncScope`, under way on main), not an
    /// fdatasync of the files written.
    syncfs: bool,
    /// The partition syncs the directory right after a truncation's unlinks.
    dir_synced_at_cut: bool,
    /// A crash brought back segment files that overlap: the partition refuses to open.
    corrupt: Option<String>,
    /// The longest prefix of `batches` a crash cannot take away.
    durable_batches: usize,
    /// The first batch a failed sync should have covered: from it on nothing survives a crash.
    lost_from: Option<usize>,
    writes: u64,
    /// Saves not yet covered by a completed sync, oldest first.
    unsynced_saves: Vec<(u64, Saved)>,
    durable_save: Option<Saved>,
    /// The idempotent producers of `producer_base` and the batches in `batches`, as the partition
    /// keeps them: each appended batch recorded, rebuilt from the log after a cut.
    producers: SharedProducers,
    /// The leader's producers as of the log start, which a snapshot brought (the partition's
    /// producer-state file at its log start).
    producer_base: ProducerStates,
    restart: Option<PendingRestart>,
    /// The file a flagged restart staged (`Partition::stage_restart`: the leader's producers in
    /// the producer-state format, as of the restart's offset), left by a crash before the restart
    /// finished: what the open finishes it with.
    staged_producers: Option<Vec<u8>>,
    /// Sabotage (issue 13): truncations are ignored and batches at offsets already written are
    /// dropped, so a divergent suffix survives rejoining.
    skip_truncation: bool,
}

fn header(batch: &[u8]) -> Option<BatchHeader> {
    BatchHeader::parse(batch).ok()
}

/// Records an idempotent producer's batch found in the log.
fn replay(producers: &mut ProducerLog, batch: &[u8]) {
    if let Some(h) = header(batch) {
        producers.record(&h);
    }
}

impl SimDisk {
    pub fn new(
        voters: Vec<u64>,
        skip_truncation: bool,
        segment_bytes: u64,
        syncfs: bool,
        dir_synced_at_cut: bool,
    ) -> SimDisk {
        SimDisk {
            voters,
            batches: Vec::new(),
            segments: vec![0],
            active_bytes: 0,
            segment_bytes,
            unsynced_cuts: Vec::new(),
            unlinked: Vec::new(),
            dir_syncs: Vec::new(),
            syncfs,
            dir_synced_at_cut,
            corrupt: None,
            durable_batches: 0,
            lost_from: None,
            writes: 0,
            unsynced_saves: Vec::new(),
            durable_save: None,
            producers: SharedProducers::default(),
            producer_base: ProducerStates::default(),
            restart: None,
            staged_producers: None,
            skip_truncation,
        }
    }

    /// Where the next batch goes: the partition's log end (written, durable or not).
    pub fn end_offset(&self) -> i64 {
        self.batches.last().and_then(|(b, _)| header(b)).map_or(self.start_offset(), |h| h.last_offset() + 1)
    }

    /// The partition's log start: the first segment's base offset.
    pub fn start_offset(&self) -> i64 {
        self.segments.first().copied().unwrap_or(0)
    }

    /// A restart from a snapshot no completed sync covers yet: a crash lands in one of its steps.
    pub fn has_unsynced_restart(&self) -> bool {
        self.restart.is_some()
    }

    /// The offset the log restarts at on the next open, if a crash left the flag saved.
    pub fn restart_on_open(&self) -> Option<i64> {
        let saved = self.durable_save.as_ref()?;
        saved.state.restart_pending.then_some(saved.state.anchor.end_offset)
    }

    /// Carries out a replica's writes, or as much of them as `fault` lets through.
    pub fn write(&mut self, writes: Vec<LogWrite>, fault: WriteFault) -> Result<(), WriteError> {
        for (nth, write) in writes.into_iter().enumerate() {
            self.writes += 1;
            let number = self.writes;
            let failing = match fault {
                WriteFault::Io { nth: at, landed } if at == nth => Some(landed),
                _ => None,
            };
            match write {
                LogWrite::TruncateTo { offset, .. } => {
                    if failing.is_some() {
                        return Err(WriteError::Failed(format!("truncating to offset {offset}: EIO")));
                    }
                    if self.skip_truncation {
                        continue;
                    }
                    self.truncate(offset, number);
                }
                LogWrite::Append { batches, end_offset, .. } => {
                    if fault == WriteFault::Full {
                        return Err(WriteError::Failed(format!(
                            "appending up to offset {end_offset}: ENOSPC"
                        )));
                    }
                    let count = batches.len();
                    for batch in batches.into_iter().take(failing.unwrap_or(count)) {
                        let base = header(&batch).map_or(-1, |h| h.base_offset);
                        let end = self.end_offset();
                        if self.skip_truncation && base < end {
                            continue;
                        }
                        if base != end {
                            return Err(WriteError::Inconsistent(format!(
                                "append at offset {base}, the log ends at {end}"
                            )));
                        }
                        replay(&mut self.producers.0.borrow_mut(), &batch);
                        self.roll_for(batch.len() as u64, base, number);
                        self.batches.push((batch, number));
                    }
                    if failing.is_some() {
                        return Err(WriteError::Failed(format!("writing up to offset {end_offset}: EIO")));
                    }
                }
                LogWrite::SaveState { state, epochs } => {
                    if fault == WriteFault::Full {
                        return Err(WriteError::Failed("saving raft.state: ENOSPC".into()));
                    }
                    if failing.is_some() {
                        return Err(WriteError::Failed("saving raft.state: EIO".into()));
                    }
                    self.unsynced_saves.push((number, Saved { state, epochs }));
                    self.dir_syncs.push(number);
                }
                LogWrite::RestartAt { state, epochs, producers } => {
                    // Both refusals come at the first save, before anything changed.
                    if fault == WriteFault::Full {
                        return Err(WriteError::Failed("saving leader-epochs: ENOSPC".into()));
                    }
                    if failing.is_some() {
                        return Err(WriteError::Failed("saving leader-epochs: EIO".into()));
                    }
                    self.restart_at(state, epochs, producers, number);
                }
            }
        }
        Ok(())
    }

    /// Restarts the log empty at the snapshot's offset with the leader's producers, remembering
    /// the disk as it was for a crash before the flagged save.
    fn restart_at(
        &mut self,
        state: ReplicaState,
        epochs: LeaderEpochs,
        producers: ProducerStates,
        number: u64,
    ) {
        let mut before = self.clone();
        // An earlier restart in flight finished before this one began (each of its steps is
        // durable before the next): it is no longer the crash's to undo.
        if let Some(earlier) = before.restart.take() {
            before.unsynced_saves.retain(|(write, _)| *write != earlier.write);
            before.durable_save = Some(earlier.done);
        }
        let flagged = ReplicaState { restart_pending: true, ..state.clone() };
        let done = Saved { state, epochs: epochs.clone() };
        self.batches.clear();
        self.segments = vec![done.state.anchor.end_offset];
        self.active_bytes = 0;
        self.unsynced_cuts.clear();
        self.unlinked.clear();
        self.durable_batches = 0;
        self.lost_from = None;
        self.dir_syncs.push(number);
        self.unsynced_saves.push((number, done.clone()));
        self.producer_base = producers;
        self.rebuild_producers();
        self.restart = Some(PendingRestart {
            write: number,
            before: Box::new(before),
            flagged: Saved { state: flagged, epochs },
            done,
        });
    }

    /// Cuts the log at the batch holding `offset` as `Partition::truncate_drained` does: the
    /// segment holding it is cut, the later ones unlinked; none of it durable yet.
    fn truncate(&mut self, offset: i64, number: u64) {
        if offset >= self.end_offset() {
            return;
        }
        let keep = self.batches.partition_point(|(b, _)| header(b).is_some_and(|h| h.base_offset < offset));
        let target = self.segments.partition_point(|&base| base <= offset).max(1);
        self.unsynced_cuts.push(UnsyncedCut {
            write: number,
            batches: self.batches.clone(),
            segments: self.segments.clone(),
            durable_batches: self.durable_batches,
            lost_from: self.lost_from,
            kept: keep,
        });
        if !self.dir_synced_at_cut {
            // What each unlinked file holds for good: its batches synced before the cut.
            let durable = self.durable_batches.min(self.lost_from.unwrap_or(usize::MAX));
            for (n, &base_offset) in self.segments.iter().enumerate().skip(target) {
                let next = self.segments.get(n + 1).copied().unwrap_or(i64::MAX);
                let batches = self.batches[..durable]
                    .iter()
                    .filter(|(b, _)| header(b).is_some_and(|h| (base_offset..next).contains(&h.base_offset)))
                    .map(|(b, _)| b.clone())
                    .collect();
                self.unlinked.push(UnlinkedSegment { write: number, base_offset, batches });
            }
        }
        self.segments.truncate(target);
        self.batches.truncate(keep);
        self.durable_batches = self.durable_batches.min(keep);
        self.lost_from = self.lost_from.filter(|&lost| lost < keep);
        self.active_bytes = self.active_segment_bytes();
        self.rebuild_producers();
    }

    fn active_segment_bytes(&self) -> u64 {
        let base = self.segments.last().copied().unwrap_or(0);
        self.batches
            .iter()
            .filter(|(b, _)| header(b).is_some_and(|h| h.base_offset >= base))
            .map(|(b, _)| b.len() as u64)
            .sum()
    }

    /// Rolls to a new segment at `base` when a batch of `len` bytes would pass the active one's
    /// size (`Partition::append`'s rule); the seal that follows syncs the directory.
    fn roll_for(&mut self, len: u64, base: i64, number: u64) {
        if self.active_bytes > 0 && self.active_bytes + len > self.segment_bytes {
            self.segments.push(base);
            self.active_bytes = 0;
            self.dir_syncs.push(number);
        }
        self.active_bytes += len;
    }

    pub fn mark(&self) -> WriteMark {
        WriteMark(self.writes)
    }

    /// A sync issued at `mark` completed.
    pub fn synced(&mut self, mark: WriteMark) {
        // Done once its cleared save is durable; a failed sync that should have covered that save
        // leaves it to the crash that follows (the replica stops).
        let saved = |r: &PendingRestart| self.unsynced_saves.iter().any(|(write, _)| *write == r.write);
        if self.restart.as_ref().is_some_and(|r| r.write <= mark.0 && saved(r)) {
            self.restart = None;
        }
        let lost = self.lost_from.unwrap_or(usize::MAX);
        while self.durable_batches < lost
            && self.batches.get(self.durable_batches).is_some_and(|(_, write)| *write <= mark.0)
        {
            self.durable_batches += 1;
        }
        let covered = self.unsynced_saves.partition_point(|(write, _)| *write <= mark.0);
        if let Some((_, saved)) = self.unsynced_saves.drain(..covered).next_back() {
            self.durable_save = Some(saved);
        }
        self.unsynced_cuts.retain(|cut| cut.write > mark.0);
        let covered = self.dir_syncs.partition_point(|&write| write <= mark.0);
        let dir_synced = if self.syncfs { Some(mark.0) } else { self.dir_syncs.drain(..covered).next_back() };
        if let Some(at) = dir_synced {
            self.unlinked.retain(|u| u.write > at);
        }
    }

    /// A sync issued at `mark` failed: what it should have covered is lost (`lost_from`), and
    /// the saves it should have made durable never will be.
    pub fn sync_failed(&mut self, mark: WriteMark) {
        if self.batches.get(self.durable_batches).is_some_and(|(_, write)| *write <= mark.0) {
            self.lost_from.get_or_insert(self.durable_batches);
        }
        self.unsynced_saves.retain(|(write, _)| *write > mark.0);
    }

    /// Whether segment files a cut unlinked still wait for a sync of the directory: a crash may
    /// bring them back (`CutCrash::relink`).
    pub fn has_unsynced_unlinks(&self) -> bool {
        !self.unlinked.is_empty()
    }

    /// Truncations no completed sync covers yet: what a crash may undo (`CutCrash::undo`).
    pub fn unsynced_cuts(&self) -> usize {
        self.unsynced_cuts.len()
    }

    /// The node crashed: `restart` says where in an unsynced restart from a snapshot it landed;
    /// `cuts` says which unsynced cuts it undoes and whether unlinked segment files come back;
    /// then of the batches not yet synced the first `torn_keep` survive (writes reach the disk in
    /// order) unless a failed sync lost them, the rest are lost; the files are as last synced.
    pub fn crash(&mut self, torn_keep: usize, cuts: CutCrash, restart: RestartCrash) -> CutCrashReport {
        let mut report = CutCrashReport::default();
        if let Some(pending) = self.restart.take() {
            self.crash_in_restart(*pending.before, pending.flagged, pending.done, restart);
        }
        if let Some(undone) = cuts.undo.filter(|&n| n < self.unsynced_cuts.len()) {
            let cut = self.unsynced_cuts.swap_remove(undone);
            report.undone_batches = cut.batches.len().saturating_sub(cut.kept);
            // A failed sync since the cut lost what it should have covered of the kept prefix.
            let lost_since = self.lost_from.filter(|&lost| lost < cut.kept);
            self.lost_from = match (cut.lost_from, lost_since) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            self.batches = cut.batches;
            self.segments = cut.segments;
            self.durable_batches = cut.durable_batches;
            self.unlinked.retain(|u| u.write < cut.write);
        }
        let keep = (self.durable_batches + torn_keep)
            .min(self.batches.len())
            .min(self.lost_from.unwrap_or(usize::MAX));
        // The journal commits in order: an unsynced batch that survived came with every unlink
        // before it (only an fdatasync commits a file's blocks alone).
        if let Some(&(_, last_torn)) = self.batches[..keep].get(self.durable_batches..).and_then(<[_]>::last)
        {
            self.unlinked.retain(|u| u.write > last_torn);
        }
        self.batches.truncate(keep);
        let end = self.end_offset();
        // Segment files past the end: empty or torn away; recovery removes them after the gap.
        let first = self.segments.first().copied().unwrap_or(0);
        self.segments.retain(|&base| base == first || base <= end);
        if cuts.relink {
            self.relink(&mut report);
        }
        self.durable_batches = self.batches.len();
        self.lost_from = None;
        self.unsynced_saves.clear();
        self.unsynced_cuts.clear();
        self.unlinked.clear();
        self.dir_syncs.clear();
        self.active_bytes = self.active_segment_bytes();
        self.rebuild_producers();
        report
    }

    /// The crash landed in step `at` of a restart from a snapshot; `before` is the disk before it.
    fn crash_in_restart(&mut self, before: SimDisk, flagged: Saved, done: Saved, at: RestartCrash) {
        match at {
            RestartCrash::BeforeFlaggedSave => {
                // Write numbers stay increasing: marks issued before the crash are compared with them.
                let writes = self.writes;
                *self = before;
                self.writes = writes;
            }
            RestartCrash::BeforeNewLog => {
                // Retention's order unlinks the oldest segments first: a suffix of the old log
                // may be left; the whole of its durable part stands for every such suffix.
                let durable = before.durable_batches.min(before.lost_from.unwrap_or(usize::MAX));
                self.batches = before.batches[..durable].to_vec();
                self.segments = before.segments;
                self.staged_producers = Some(self.stage(&flagged));
                self.producer_base = ProducerStates::default();
                self.durable_save = Some(flagged);
            }
            RestartCrash::BeforeClearedSave => {
                self.batches.clear();
                self.staged_producers = Some(self.stage(&flagged));
                self.durable_save = Some(flagged);
            }
            RestartCrash::Done => {
                self.durable_save = Some(done);
                return;
            }
        }
        self.unsynced_saves.clear();
        self.unsynced_cuts.clear();
        self.unlinked.clear();
        self.durable_batches = self.batches.len();
        self.lost_from = None;
    }

    /// Unlinked segment files came back: recovery (`recover_segments`) walks the segments by base
    /// offset, attaches one that starts where the log ends, removes one after a gap (and all
    /// after it) and refuses an overlap. A file whose name a newer segment took stays gone.
    fn relink(&mut self, report: &mut CutCrashReport) {
        let mut back: Vec<UnlinkedSegment> = std::mem::take(&mut self.unlinked)
            .into_iter()
            .filter(|u| !self.segments.contains(&u.base_offset))
            .collect();
        back.sort_by_key(|u| (u.base_offset, Reverse(u.write)));
        back.dedup_by_key(|u| u.base_offset);
        for segment in back {
            let end = self.end_offset();
            let verdict = if segment.base_offset < end {
                self.corrupt.get_or_insert_with(|| {
                    format!(
                        "segment starts at offset {} but the one before ends at {end}: offsets overlap",
                        segment.base_offset
                    )
                });
                "overlaps"
            } else if segment.base_offset > end {
                "removed after a gap"
            } else {
                self.segments.push(segment.base_offset);
                let number = self.writes;
                self.batches.extend(segment.batches.into_iter().map(|b| (b, number)));
                "attached"
            };
            report.relinked.push((segment.base_offset, verdict));
            if verdict != "attached" {
                break;
            }
        }
    }

    pub fn producers(&self) -> Ref<'_, ProducerLog> {
        self.producers.0.borrow()
    }

    /// The staged restart file for the restart `flagged` saves: the snapshot's producers (this
    /// disk's base once the restart began) as of its offset.
    fn stage(&self, flagged: &Saved) -> Vec<u8> {
        self.producer_base.encode_snapshot(flagged.state.anchor.end_offset)
    }

    /// After a cut, from the log, as `Partition::truncate_to` and recovery rebuild it (after the
    /// producers a snapshot brought, as the partition's producer-state file at its start).
    fn rebuild_producers(&mut self) {
        let mut producers = ProducerLog::starting_with(self.producer_base.clone());
        for (batch, _) in &self.batches {
            replay(&mut producers, batch);
        }
        *self.producers.0.borrow_mut() = producers;
    }

    /// Opens the replica's log as the shard does after a start: a restart from a snapshot the
    /// saved state flags finished first, then saved state and a scan.
    pub fn open(&mut self, limits: CacheLimits) -> Result<ReplicaLog, String> {
        if let Some(corrupt) = &self.corrupt {
            return Err(format!("the partition does not open: {corrupt}"));
        }
        if let Some(offset) = self.restart_on_open() {
            self.finish_restart(offset)?;
        }
        let (state, epochs) = match self.durable_save.clone() {
            Some(saved) => (saved.state, saved.epochs),
            None => (ReplicaState::new(self.voters.clone(), 0), LeaderEpochs::default()),
        };
        let from = state.anchor.end_offset;
        let tail =
            self.batches.iter().filter_map(|(b, _)| header(b)).filter(|h| h.base_offset >= from).map(|h| {
                ScannedBatch {
                    base_offset: h.base_offset,
                    last_offset: h.last_offset(),
                    epoch: u64::try_from(h.partition_leader_epoch).unwrap_or(0),
                }
            });
        let mut log = ReplicaLog::open(state, epochs, tail, limits).map_err(|e: OpenError| e.to_string())?;
        let producers = Rc::clone(&self.producers.0);
        log.set_producers_as_of(ProducersAsOf(Box::new(move |offset| producers.borrow().as_of(offset))));
        Ok(log)
    }

    /// `PartitionReplica::open` with `restart_pending` saved: the log restarted at `offset`, with
    /// the producers staged before the flag; then the state saved with the flag clear. The
    /// staged file is never damaged here, so one that does not decode is a bug of the model.
    fn finish_restart(&mut self, offset: i64) -> Result<(), String> {
        let staged = match self.staged_producers.take() {
            Some(bytes) => match ProducerStates::decode_snapshot(&bytes) {
                Ok((staged_at, producers)) => (staged_at == offset).then_some(producers),
                Err(e) => return Err(format!("the producers staged for the restart do not decode: {e}")),
            },
            None => None,
        };
        // Only a disk written before staging (no simulated disk is) restarts without them.
        self.producer_base = match staged {
            Some(producers) => producers,
            None if self.start_offset() == offset => self.producers().as_of(offset),
            None => ProducerStates::default(),
        };
        self.batches.clear();
        self.segments = vec![offset];
        self.active_bytes = 0;
        self.durable_batches = 0;
        self.rebuild_producers();
        if let Some(saved) = &mut self.durable_save {
            saved.state.restart_pending = false;
        }
        Ok(())
    }

    /// The batches `[from, end)`, for a replica's read-back.
    pub fn read(&self, from: i64, end: i64) -> Vec<Bytes> {
        self.batches
            .iter()
            .filter(|(b, _)| header(b).is_some_and(|h| h.base_offset >= from && h.base_offset < end))
            .map(|(b, _)| b.clone())
            .collect()
    }

    /// Every batch of the log below `end`, oldest first.
    pub fn batches_below(&self, end: i64) -> impl Iterator<Item = (i64, &Bytes)> {
        self.batches
            .iter()
            .filter_map(move |(b, _)| Some((header(b)?.base_offset, b)))
            .filter(move |(base, _)| *base < end)
    }

    /// The entry the disk holds at the offsets the log places entry `index` at: what a reader of
    /// the partition would get there, whatever the replica believes.
    pub fn entry_at(&self, log: &ReplicaLog, index: u64) -> Option<(Entry, i64)> {
        use ringlog::replication::store::ReplicaStore;
        let base = log.end_offset(index.checked_sub(1)?)?;
        let end = log.end_offset(index)?;
        let (batch, _) =
            self.batches.iter().find(|(b, _)| header(b).is_some_and(|h| h.base_offset == base))?;
        let h = header(batch)?;
        let entry = Entry {
            term: u64::try_from(h.partition_leader_epoch).ok()?,
            index,
            data: batch.clone(),
            ..Default::default()
        };
        debug_assert!(end > base);
        Some((entry, h.last_offset() + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use ringlog::record::builder::BatchBuilder;
    use ringlog::record::{set_base_offset, set_partition_leader_epoch};
    use ringlog::replication::replica_log::Anchor;
    use ringlog::replication::snapshot::SnapshotData;
    use ringlog::storage::RequestVerdict;

    fn batch(base_offset: i64, records: u8, epoch: i32) -> Bytes {
        let mut builder = BatchBuilder::new();
        for record in 0..records {
            builder.push(0, None, Some(&[record]), &[]);
        }
        let mut bytes = builder.finish();
        set_base_offset(&mut bytes, base_offset);
        set_partition_leader_epoch(&mut bytes, epoch);
        bytes.freeze()
    }

    fn append(disk: &mut SimDisk, batches: Vec<Bytes>) {
        let end_offset = batches.last().and_then(|b| header(b)).map_or(0, |h| h.last_offset() + 1);
        let write = LogWrite::Append { first_index: 0, last_index: 0, end_offset, batches };
        disk.write(vec![write], WriteFault::None).unwrap();
    }

    fn sync(disk: &mut SimDisk) {
        let mark = disk.mark();
        disk.synced(mark);
    }

    /// Offsets 0–5 in one-record batches of epoch 1, three a segment (segments at 0 and 3), all
    /// synced; then a new leader's entries replace everything from offset 1: a batch of
    /// `records` records of epoch 2, which fits in the first segment (no roll, so no seal syncs
    /// the directory), synced by an fdatasync of that file unless `syncfs`.
    fn cut_and_replace(records: u8, syncfs: bool, dir_synced_at_cut: bool) -> SimDisk {
        let one = batch(0, 1, 1).len() as u64;
        let mut disk = SimDisk::new(vec![1, 2, 3], false, 3 * one, syncfs, dir_synced_at_cut);
        append(&mut disk, (0..6).map(|offset| batch(offset, 1, 1)).collect());
        sync(&mut disk);
        assert_eq!(disk.segments, vec![0, 3]);
        let cut = LogWrite::TruncateTo { index: 2, offset: 1 };
        disk.write(vec![cut], WriteFault::None).unwrap();
        append(&mut disk, vec![batch(1, records, 2)]);
        assert_eq!(disk.segments, vec![0], "the new batch fits in the cut segment");
        sync(&mut disk);
        disk
    }

    fn open(disk: &SimDisk) -> Result<ReplicaLog, String> {
        disk.clone().open(CacheLimits::default())
    }

    /// The broker before stop 17: an fdatasync of the cut file does not make the unlink of the
    /// later segment durable, and the file that comes back makes the partition unopenable.
    #[test]
    fn an_unlinked_segment_back_after_a_crash_breaks_the_log() {
        let relink = CutCrash { undo: None, relink: true };
        // The new batch ends at offset 3, where the unlinked segment starts: attached, and its
        // older epoch after the newer one refuses to open.
        let mut disk = cut_and_replace(2, false, false);
        let report = disk.crash(0, relink, RestartCrash::Done);
        assert_eq!(report.relinked, vec![(3, "attached")]);
        assert!(open(&disk).unwrap_err().contains("older than"), "{:?}", open(&disk).err());
        // It ends at offset 4, past the unlinked segment's start: the segments overlap.
        let mut disk = cut_and_replace(3, false, false);
        assert_eq!(disk.crash(0, relink, RestartCrash::Done).relinked, vec![(3, "overlaps")]);
        assert!(open(&disk).unwrap_err().contains("offsets overlap"));
        // A syncfs covers the unlink, and so does a directory synced at the cut.
        for (syncfs, dir_synced_at_cut) in [(true, false), (false, true)] {
            let mut disk = cut_and_replace(3, syncfs, dir_synced_at_cut);
            assert_eq!(disk.crash(0, relink, RestartCrash::Done), CutCrashReport::default());
            assert_eq!(open(&disk).unwrap().end_offset_of_log(), 4);
        }
    }

    /// A cut no sync covered may be undone by a crash: the log comes back as it was before it,
    /// and the unsynced batch appended after it is lost. Once synced, it stays cut.
    #[test]
    fn a_crash_before_the_sync_may_undo_a_cut() {
        let one = batch(0, 1, 1).len() as u64;
        let mut disk = SimDisk::new(vec![1, 2, 3], false, 3 * one, false, true);
        append(&mut disk, (0..6).map(|offset| batch(offset, 1, 1)).collect());
        sync(&mut disk);
        disk.write(vec![LogWrite::TruncateTo { index: 2, offset: 1 }], WriteFault::None).unwrap();
        append(&mut disk, vec![batch(1, 3, 2)]);
        assert_eq!(disk.end_offset(), 4);
        let report = disk.crash(2, CutCrash { undo: Some(0), relink: false }, RestartCrash::Done);
        assert_eq!(report.undone_batches, 5);
        assert_eq!(disk.end_offset(), 6);
        assert_eq!(disk.segments, vec![0, 3]);
        assert_eq!(open(&disk).unwrap().end_offset_of_log(), 6);

        disk.write(vec![LogWrite::TruncateTo { index: 2, offset: 1 }], WriteFault::None).unwrap();
        append(&mut disk, vec![batch(1, 3, 2)]);
        sync(&mut disk);
        assert_eq!((disk.unsynced_cuts(), disk.has_unsynced_unlinks()), (0, false));
        disk.crash(0, CutCrash { undo: Some(0), relink: true }, RestartCrash::Done);
        assert_eq!(open(&disk).unwrap().end_offset_of_log(), 4);
    }

    /// An idempotent producer's batch of one record at `base_offset`, sequence `sequence`.
    fn idempotent(base_offset: i64, sequence: i32) -> Bytes {
        let mut b = BytesMut::from(&batch(base_offset, 1, 1)[..]);
        b[43..51].copy_from_slice(&7i64.to_be_bytes());
        b[51..53].copy_from_slice(&0i16.to_be_bytes());
        b[53..57].copy_from_slice(&sequence.to_be_bytes());
        let crc = crc32c::crc32c(&b[21..]);
        b[17..21].copy_from_slice(&crc.to_be_bytes());
        b.freeze()
    }

    fn is_duplicate(disk: &SimDisk, sequence: i32) -> bool {
        let h = header(&idempotent(0, sequence)).unwrap();
        matches!(disk.producers().check_proposal(&h, []), Ok(RequestVerdict::Duplicate { .. }))
    }

    /// The real path of a snapshot's producers: the leader's log reads them from its disk and
    /// encodes them as of the snapshot's offset, the follower's decodes them from the snapshot
    /// and its disk installs them with the restart. A batch at or past the offset is not in them
    /// (the follower gets it as an append).
    #[test]
    fn a_snapshot_carries_the_leaders_producers_to_the_followers_disk() {
        use raft::Storage;
        use ringlog::replication::store::ReplicaStore;

        let mut leader = SimDisk::new(vec![1, 2, 3], false, 1 << 20, false, true);
        append(&mut leader, (0..3).map(|offset| idempotent(offset, offset as i32)).collect());
        let mut log = leader.open(CacheLimits::default()).unwrap();
        log.compact_to(2, 3).unwrap();
        let snapshot = log.snapshot(0, 2).unwrap();
        let data = SnapshotData::decode(&snapshot.data, 2).unwrap();
        assert_eq!((data.start_offset, data.producers.len()), (2, 1));

        let mut follower = SimDisk::new(vec![1, 2, 3], false, 1 << 20, false, true);
        let mut log = follower.open(CacheLimits::default()).unwrap();
        log.apply_snapshot(&snapshot).unwrap();
        follower.write(log.take_writes(), WriteFault::None).unwrap();
        assert_eq!((follower.start_offset(), follower.end_offset()), (2, 2));
        assert!(is_duplicate(&follower, 0) && is_duplicate(&follower, 1));
        assert!(!is_duplicate(&follower, 2));
    }

    /// Offsets 0–5 synced and saved with the anchor at index 0; then a restart from a leader's
    /// snapshot of index 10 at offset 20, whose producers hold sequence 0 (offset 12), and a batch
    /// appended after it at offset 20, none of it synced yet.
    fn restarting() -> SimDisk {
        let mut disk = SimDisk::new(vec![1, 2, 3], false, 1 << 20, false, true);
        append(&mut disk, (0..6).map(|offset| batch(offset, 1, 1)).collect());
        let state = ReplicaState::new(vec![1, 2, 3], 0);
        disk.write(vec![LogWrite::SaveState { state, epochs: LeaderEpochs::default() }], WriteFault::None)
            .unwrap();
        sync(&mut disk);
        let anchor = Anchor { index: 10, term: 1, end_offset: 20 };
        let state = ReplicaState { term: 1, anchor, ..ReplicaState::new(vec![1, 2, 3], 0) };
        let mut leader = ProducerLog::default();
        leader.record(&header(&idempotent(12, 0)).unwrap());
        let restart =
            LogWrite::RestartAt { state, epochs: LeaderEpochs::default(), producers: leader.as_of(20) };
        disk.write(vec![restart], WriteFault::None).unwrap();
        append(&mut disk, vec![batch(20, 1, 1)]);
        assert_eq!((disk.start_offset(), disk.end_offset()), (20, 21));
        assert!(disk.has_unsynced_restart() && is_duplicate(&disk, 0));
        disk
    }

    /// A crash before the flagged save leaves the old log and state; after it, the open finishes
    /// the restart with the snapshot's producers, staged before the flag;
    /// once synced, only the appends after the restart are the crash's.
    #[test]
    fn a_crash_in_a_restart_from_a_snapshot_leaves_the_old_log_or_finishes_the_restart_on_open() {
        let mut disk = restarting();
        disk.crash(0, CutCrash::default(), RestartCrash::BeforeFlaggedSave);
        assert_eq!((disk.start_offset(), disk.end_offset(), disk.restart_on_open()), (0, 6, None));
        let log = disk.open(CacheLimits::default()).unwrap();
        assert_eq!((log.anchor().index, log.end_offset_of_log()), (0, 6));
        assert!(!is_duplicate(&disk, 0));

        for at in [RestartCrash::BeforeNewLog, RestartCrash::BeforeClearedSave] {
            let mut disk = restarting();
            disk.crash(2, CutCrash::default(), at);
            assert_eq!(disk.restart_on_open(), Some(20), "{at:?}");
            let log = disk.open(CacheLimits::default()).unwrap();
            assert_eq!((log.anchor().index, log.end_offset_of_log()), (10, 20), "{at:?}");
            assert_eq!((disk.start_offset(), disk.end_offset(), disk.restart_on_open()), (20, 20, None));
            assert!(is_duplicate(&disk, 0), "{at:?}");
        }

        let mut disk = restarting();
        disk.crash(1, CutCrash::default(), RestartCrash::Done);
        assert_eq!(disk.open(CacheLimits::default()).unwrap().end_offset_of_log(), 21);
        assert!(is_duplicate(&disk, 0));

        let mut disk = restarting();
        sync(&mut disk);
        assert!(!disk.has_unsynced_restart());
        disk.crash(0, CutCrash::default(), RestartCrash::BeforeFlaggedSave);
        let log = disk.open(CacheLimits::default()).unwrap();
        assert_eq!((log.anchor().index, log.end_offset_of_log()), (10, 21));
        assert!(is_duplicate(&disk, 0));
    }
}
