//! The controller's files on a simulated disk (stop 18): what `cluster::controller_log`'s
//! `ControllerFiles` seam writes to in the simulator, in place of `DirFiles`. The broker's
//! persister runs one `PendingWrites` job at a time on the blocking pool (truncate and append
//! `raft.log`, fdatasync, replace `raft.state`, sync the directory) and releases what waited on
//! it when the job returns; here a job's writes reach the file at once (the page cache) and become
//! durable together when the simulated job completes (`synced`). A crash keeps what is durable,
//! plus a torn part of an unsynced append when the file only grew since; an unsynced cut is
//! undone. The restart reads the files back through `ControllerLog::recover`, exactly as
//! `ControllerLog::open` does.
//!
//! Owns nothing but bytes; the record format and recovery are the broker's.

use ringlog::cluster::controller_log::{ControllerFiles, ControllerLog, PendingWrites, HARD_STATE_BYTES};

/// `raft.log` and `raft.state` as one view of them holds them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Files {
    log: Vec<u8>,
    state: Option<[u8; HARD_STATE_BYTES]>,
}

impl ControllerFiles for Files {
    fn cut_log(&mut self, len: u64) -> std::io::Result<()> {
        self.log.truncate(len as usize);
        Ok(())
    }

    fn write_log_at(&mut self, at: u64, bytes: &[u8]) -> std::io::Result<()> {
        let at = at as usize;
        if self.log.len() < at {
            self.log.resize(at, 0);
        }
        let overlap = (self.log.len() - at).min(bytes.len());
        self.log[at..at + overlap].copy_from_slice(&bytes[..overlap]);
        self.log.extend_from_slice(&bytes[overlap..]);
        Ok(())
    }

    /// Durability comes when the simulated job completes (`ControllerDisk::synced`).
    fn sync_log(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    fn replace_state(&mut self, state: &[u8; HARD_STATE_BYTES]) -> std::io::Result<()> {
        self.state = Some(*state);
        Ok(())
    }

    fn sync_dir(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One node's controller directory; outlives the node's crashes.
#[derive(Debug, Default)]
pub struct ControllerDisk {
    /// What a reader of the files sees (the page cache).
    written: Files,
    /// What survives a crash.
    durable: Files,
    /// What the job under way makes durable when it completes.
    in_flight: Option<Files>,
}

/// What a crash did to the controller's files, for the trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashLoss {
    Nothing,
    /// Unsynced bytes appended to the log: how many were lost, how many kept (perhaps a torn
    /// record, cut at the next open).
    Appended {
        lost: usize,
        kept: usize,
    },
    /// An unsynced cut of the log came undone (the cut-off records are back).
    CutUndone,
}

impl ControllerDisk {
    /// Opens the log as `ControllerLog::open` does: the records up to a torn one, whose bytes
    /// are cut from the file (not synced, as there). Returns the torn tail's reason, if any.
    pub fn open(&mut self, voters: Vec<u64>) -> Result<(ControllerLog, Option<String>), String> {
        let (log, torn) =
            ControllerLog::recover(&self.written.log, self.written.state.as_ref().map(|s| &s[..]), voters)
                .map_err(|e| e.to_string())?;
        let torn = torn.map(|torn| {
            self.written.log.truncate(torn.at as usize);
            format!("{} at byte {}", torn.reason, torn.at)
        });
        Ok((log, torn))
    }

    /// Starts a persister job: its writes reach the files now and are durable at `synced`.
    pub fn start(&mut self, writes: PendingWrites) -> Result<(), String> {
        debug_assert!(self.in_flight.is_none(), "the persister runs one job at a time");
        writes.write_to(&mut self.written).map_err(|e| e.to_string())?;
        self.in_flight = Some(self.written.clone());
        Ok(())
    }

    /// The job under way completed: everything it wrote, and before it, is durable.
    pub fn synced(&mut self) {
        if let Some(files) = self.in_flight.take() {
            self.durable = files;
        }
    }

    /// The process died: the job under way never completes; the files keep what was durable,
    /// and of an unsynced append `keep_per_mille` thousandths.
    pub fn crash(&mut self, keep_per_mille: u64) -> CrashLoss {
        self.in_flight = None;
        let durable_len = self.durable.log.len();
        let grew_only =
            self.written.log.len() >= durable_len && self.written.log[..durable_len] == self.durable.log[..];
        let loss = if self.written.log == self.durable.log {
            CrashLoss::Nothing
        } else if grew_only {
            let unsynced = self.written.log.len() - durable_len;
            let kept = unsynced * keep_per_mille as usize / 1000;
            self.durable.log.extend_from_slice(&self.written.log[durable_len..durable_len + kept]);
            CrashLoss::Appended { lost: unsynced - kept, kept }
        } else {
            CrashLoss::CutUndone
        };
        self.written = self.durable.clone();
        loss
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::eraftpb::{Entry, HardState};
    use ringlog::replication::store::ReplicaStore;

    fn entry(term: u64, index: u64) -> Entry {
        Entry { term, index, ..Default::default() }
    }

    #[test]
    fn a_crash_keeps_what_a_completed_job_wrote_and_cuts_a_torn_record() {
        let mut disk = ControllerDisk::default();
        let (mut log, torn) = disk.open(vec![1, 2, 3]).unwrap();
        assert!(torn.is_none());
        log.append(&[entry(1, 1), entry(1, 2)]).unwrap();
        log.set_hard_state(&HardState { term: 1, vote: 1, commit: 2, ..Default::default() }).unwrap();
        disk.start(log.take_writes()).unwrap();
        disk.synced();
        log.append(&[entry(1, 3)]).unwrap();
        disk.start(log.take_writes()).unwrap();
        // Half of the unsynced record survives: torn, cut at the open.
        assert!(matches!(disk.crash(500), CrashLoss::Appended { kept, lost } if kept > 0 && lost > 0));
        let (log, torn) = disk.open(vec![1, 2, 3]).unwrap();
        assert!(torn.is_some());
        assert_eq!(log.entries().len(), 2);

        // A new leader's entries replace index 2, unsynced: the crash undoes the cut.
        let mut log = log;
        log.append(&[entry(2, 2)]).unwrap();
        disk.start(log.take_writes()).unwrap();
        assert_eq!(disk.crash(1000), CrashLoss::CutUndone);
        let (log, _) = disk.open(vec![1, 2, 3]).unwrap();
        assert_eq!(log.entries().iter().map(|e| e.term).collect::<Vec<_>>(), vec![1, 1]);
    }
}
