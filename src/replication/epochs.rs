//! Leader epochs of one partition replica: for each Raft term that wrote to the log, the Kafka
//! offset and the Raft index of its first entry (Kafka's leader-epoch checkpoint, with the index
//! added because a Raft entry holds a whole batch). Answers what raft-rs asks (the term of an
//! index) and what Kafka clients ask (KIP-101/279/320): the end offset of an epoch, the epoch of
//! an offset, whether a client's leader epoch is current and whether a fetch's log diverged.
//!
//! Owns the file `leader-epochs` in a replica's directory; plain std IO, to be run off the shard.
//! Depends on nothing above std.

use std::io::Write;
use std::path::{Path, PathBuf};

use thiserror::Error;

pub const EPOCHS_FILE: &str = "leader-epochs";
const FORMAT_VERSION: u32 = 1;
/// A file longer than this is not one of ours (each line is at most ~60 bytes).
const FILE_BYTES_MAX: u64 = 64 << 20;

#[derive(Debug, Error)]
pub enum EpochsError {
    #[error("leader-epoch file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("leader-epoch file {path} is damaged at line {line}: {message}; the replica must be restored from its peers")]
    Corrupt { path: PathBuf, line: usize, message: String },
}

/// A fetch named an epoch this log has nothing at or below (see `LeaderEpochs::divergence`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("no leader epoch at or below {0} in this log")]
pub struct NoSuchEpoch(pub u64);

/// How a client's view of a partition's leader epoch compares with a replica's (KIP-320).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleEpoch {
    /// The client's is older: it missed an election and must refresh its metadata (Kafka's
    /// FENCED_LEADER_EPOCH).
    Fenced,
    /// The client's is newer: this replica has not heard of that election yet (Kafka's
    /// UNKNOWN_LEADER_EPOCH); the client retries.
    Unknown,
}

/// Kafka's check of a request's current leader epoch against the replica's
/// (`Partition.checkCurrentLeaderEpoch`): a client that names none (`None`, Kafka's -1) is not
/// checked.
pub fn check_current_epoch(client: Option<u64>, replica: u64) -> Result<(), StaleEpoch> {
    match client {
        Some(client) if client < replica => Err(StaleEpoch::Fenced),
        Some(client) if client > replica => Err(StaleEpoch::Unknown),
        _ => Ok(()),
    }
}

/// Where one epoch starts in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochStart {
    pub epoch: u64,
    pub start_offset: i64,
    pub start_index: u64,
}

/// Epochs in increasing order; start offsets and indexes never decrease.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaderEpochs {
    entries: Vec<EpochStart>,
}

/// Kafka's answer to "where does epoch E end": the largest epoch not above E that this log has,
/// and the offset where the next one starts (or the log end for the latest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochEnd {
    /// `None` when the log has no epoch at or below the requested one (Kafka's UNDEFINED).
    pub epoch: Option<u64>,
    /// `None` when the requested epoch is newer than any here.
    pub end_offset: Option<i64>,
}

impl LeaderEpochs {
    pub fn entries(&self) -> &[EpochStart] {
        &self.entries
    }

    pub fn latest(&self) -> Option<EpochStart> {
        self.entries.last().copied()
    }

    /// Records that `start.epoch` begins at `start`. An epoch already known is left as it is
    /// (its first entry came first). Entries it contradicts — a later epoch, or one starting at or
    /// after this start — are what a truncation should have removed: they are dropped, as
    /// Kafka's cache does, so the file always describes the log as written.
    pub fn assign(&mut self, start: EpochStart) {
        if self.entries.iter().any(|e| e.epoch == start.epoch) {
            return;
        }
        self.entries.retain(|e| {
            e.epoch < start.epoch && e.start_offset < start.start_offset && e.start_index < start.start_index
        });
        self.entries.push(start);
    }

    /// The term of the entry at `index`: the epoch whose start is the last at or below it.
    pub fn term_at(&self, index: u64) -> Option<u64> {
        let after = self.entries.partition_point(|e| e.start_index <= index);
        after.checked_sub(1).map(|i| self.entries[i].epoch)
    }

    /// The epoch that wrote `offset`: the last one starting at or before it.
    pub fn epoch_at(&self, offset: i64) -> Option<u64> {
        let after = self.entries.partition_point(|e| e.start_offset <= offset);
        after.checked_sub(1).map(|i| self.entries[i].epoch)
    }

    /// Kafka's divergence check of a fetch that says the batch before `fetch_offset` carried
    /// `last_fetched` (KIP-320, Fetch v12+; Kafka's `Partition.readRecords`): `Ok(None)` when the
    /// client's log agrees with this one; `Ok(Some(end))` when it diverged, `end` saying where
    /// the largest epoch not above `last_fetched` ends here (the client truncates to it); `Err`
    /// when this log knows no such epoch, which Kafka answers OFFSET_OUT_OF_RANGE.
    pub fn divergence(
        &self,
        last_fetched: u64,
        fetch_offset: i64,
        log_end_offset: i64,
    ) -> Result<Option<(u64, i64)>, NoSuchEpoch> {
        let EpochEnd { epoch: Some(epoch), end_offset: Some(end_offset) } =
            self.end_for(last_fetched, log_end_offset)
        else {
            return Err(NoSuchEpoch(last_fetched));
        };
        Ok((epoch < last_fetched || end_offset < fetch_offset).then_some((epoch, end_offset)))
    }

    /// Kafka's OffsetForLeaderEpoch answer for `requested`, given the log end offset.
    pub fn end_for(&self, requested: u64, log_end_offset: i64) -> EpochEnd {
        match self.entries.last() {
            None => EpochEnd { epoch: None, end_offset: None },
            Some(latest) if latest.epoch == requested => {
                EpochEnd { epoch: Some(requested), end_offset: Some(log_end_offset) }
            }
            Some(latest) if latest.epoch < requested => EpochEnd { epoch: None, end_offset: None },
            Some(_) => {
                let higher = self.entries.partition_point(|e| e.epoch <= requested);
                let next_start = self.entries[higher].start_offset;
                let floor = higher.checked_sub(1).map(|i| self.entries[i].epoch);
                EpochEnd { epoch: floor.or(Some(requested)), end_offset: Some(next_start) }
            }
        }
    }

    /// The log lost every entry from `index` (at `offset`) on: epochs starting there or later go.
    pub fn truncate_from(&mut self, index: u64) {
        self.entries.retain(|e| e.start_index < index);
    }

    /// The log now starts at `index` / `offset` (retention or a snapshot): epochs wholly before
    /// it go, and the one it falls in starts there.
    pub fn truncate_before(&mut self, index: u64, offset: i64) {
        let keep_from = self.entries.partition_point(|e| e.start_index <= index).saturating_sub(1);
        self.entries.drain(..keep_from);
        if let Some(first) = self.entries.first_mut() {
            if first.start_index < index {
                first.start_index = index;
                first.start_offset = offset;
            }
        }
    }

    /// Reads `<dir>/leader-epochs`; a missing file is an empty history.
    pub fn load(dir: &Path) -> Result<LeaderEpochs, EpochsError> {
        let path = dir.join(EPOCHS_FILE);
        let io = |source| EpochsError::Io { path: path.clone(), source };
        let file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(LeaderEpochs::default()),
            Err(e) => return Err(io(e)),
        };
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::Read::take(file, FILE_BYTES_MAX), &mut text)
            .map_err(io)?;
        LeaderEpochs::parse(&text).map_err(|(line, message)| EpochsError::Corrupt {
            path: path.clone(),
            line,
            message,
        })
    }

    /// Writes `<dir>/leader-epochs` atomically (temporary file, fdatasync, rename, directory
    /// fsync): after a crash the file is either the old or the new one, never a mix.
    pub fn store(&self, dir: &Path) -> Result<(), EpochsError> {
        let path = dir.join(EPOCHS_FILE);
        let temp = dir.join(format!("{EPOCHS_FILE}.tmp"));
        let io = |source| EpochsError::Io { path: path.clone(), source };
        let mut file = std::fs::File::create(&temp).map_err(io)?;
        file.write_all(self.render().as_bytes()).map_err(io)?;
        file.sync_data().map_err(io)?;
        std::fs::rename(&temp, &path).map_err(io)?;
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)
    }

    fn render(&self) -> String {
        let mut text = format!("{FORMAT_VERSION}\n{}\n", self.entries.len());
        for e in &self.entries {
            text.push_str(&format!("{} {} {}\n", e.epoch, e.start_offset, e.start_index));
        }
        text
    }

    fn parse(text: &str) -> Result<LeaderEpochs, (usize, String)> {
        let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l));
        let mut next = |what: &str| lines.next().ok_or((0, format!("ends before {what}")));
        let (n, version) = next("the version")?;
        if version.trim() != FORMAT_VERSION.to_string() {
            return Err((n, format!("version {version:?}, expected {FORMAT_VERSION}")));
        }
        let (n, count) = next("the count")?;
        let count: usize = count.trim().parse().map_err(|_| (n, format!("count {count:?}")))?;
        let mut epochs = LeaderEpochs::default();
        for _ in 0..count {
            let (n, line) = next("all epochs")?;
            let fields: Vec<&str> = line.split_ascii_whitespace().collect();
            let parsed = match fields.as_slice() {
                [epoch, offset, index] => (epoch.parse::<u64>(), offset.parse::<i64>(), index.parse::<u64>()),
                _ => return Err((n, format!("{line:?} is not 'epoch offset index'"))),
            };
            let start = match parsed {
                (Ok(epoch), Ok(start_offset), Ok(start_index)) if start_offset >= 0 => {
                    EpochStart { epoch, start_offset, start_index }
                }
                _ => return Err((n, format!("{line:?} is not 'epoch offset index'"))),
            };
            if let Some(last) = epochs.entries.last() {
                let ordered = last.epoch < start.epoch
                    && last.start_offset <= start.start_offset
                    && last.start_index <= start.start_index;
                if !ordered {
                    return Err((n, format!("{line:?} goes backwards after {last:?}")));
                }
            }
            epochs.entries.push(start);
        }
        Ok(epochs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(epoch: u64, start_offset: i64, start_index: u64) -> EpochStart {
        EpochStart { epoch, start_offset, start_index }
    }

    #[test]
    fn terms_and_kafka_answers() {
        let mut epochs = LeaderEpochs::default();
        epochs.assign(start(1, 0, 1));
        epochs.assign(start(1, 5, 3)); // already known: ignored
        epochs.assign(start(3, 100, 20));
        epochs.assign(start(4, 250, 31));
        assert_eq!(epochs.term_at(0), None);
        assert_eq!(epochs.term_at(1), Some(1));
        assert_eq!(epochs.term_at(19), Some(1));
        assert_eq!(epochs.term_at(20), Some(3));
        assert_eq!(epochs.term_at(1000), Some(4));
        // Latest epoch: the log end. An epoch in between: the next one's start. Epoch 2 was never
        // written here: answered as epoch 1 ending where 3 starts (KIP-279).
        assert_eq!(epochs.end_for(4, 300), EpochEnd { epoch: Some(4), end_offset: Some(300) });
        assert_eq!(epochs.end_for(3, 300), EpochEnd { epoch: Some(3), end_offset: Some(250) });
        assert_eq!(epochs.end_for(2, 300), EpochEnd { epoch: Some(1), end_offset: Some(100) });
        assert_eq!(epochs.end_for(9, 300), EpochEnd { epoch: None, end_offset: None });
        assert_eq!(epochs.end_for(0, 300), EpochEnd { epoch: Some(0), end_offset: Some(0) });
    }

    /// Kafka's answers (KIP-320; `Partition.checkCurrentLeaderEpoch` and `readRecords`) case by
    /// case, over a log whose epochs 1, 3 and 4 start at 0, 100 and 250 and which ends at 300.
    #[test]
    fn fencing_and_divergence_follow_kafka() {
        use StaleEpoch::{Fenced, Unknown};
        for (client, replica, expected) in [
            (None, 5, Ok(())),
            (Some(4), 5, Err(Fenced)),
            (Some(0), 5, Err(Fenced)),
            (Some(5), 5, Ok(())),
            (Some(6), 5, Err(Unknown)),
            (Some(0), 0, Ok(())),
            (Some(1), 0, Err(Unknown)),
        ] {
            assert_eq!(
                check_current_epoch(client, replica),
                expected,
                "client {client:?}, replica {replica}"
            );
        }
        let mut epochs = LeaderEpochs::default();
        for (e, o, i) in [(1, 0, 1), (3, 100, 20), (4, 250, 31)] {
            epochs.assign(start(e, o, i));
        }
        for (last_fetched, fetch_offset, expected) in [
            // The leader's own epoch ends at the log end: a fetch up to it agrees.
            (4, 280, Ok(None)),
            (4, 300, Ok(None)),
            // Past the log end in the same epoch: what the client read is gone.
            (4, 310, Ok(Some((4, 300)))),
            // An older epoch ends where the next starts: reading up to there agrees, past it not.
            (3, 250, Ok(None)),
            (3, 260, Ok(Some((3, 250)))),
            (1, 50, Ok(None)),
            (1, 120, Ok(Some((1, 100)))),
            // Epoch 2 never wrote here: diverged, whatever the offset (the largest epoch below
            // it, 1, ends at 100).
            (2, 100, Ok(Some((1, 100)))),
            (2, 40, Ok(Some((1, 100)))),
            // Older than any epoch here: its end is where the first known one starts.
            (0, 0, Ok(None)),
            (0, 5, Ok(Some((0, 0)))),
            // Newer than any: no answer, Kafka's OFFSET_OUT_OF_RANGE.
            (5, 300, Err(NoSuchEpoch(5))),
        ] {
            assert_eq!(
                epochs.divergence(last_fetched, fetch_offset, 300),
                expected,
                "last fetched epoch {last_fetched} at offset {fetch_offset}"
            );
        }
        assert_eq!(LeaderEpochs::default().divergence(0, 0, 0), Err(NoSuchEpoch(0)));
        for (offset, epoch) in
            [(-1, None), (0, Some(1)), (99, Some(1)), (100, Some(3)), (250, Some(4)), (999, Some(4))]
        {
            assert_eq!(epochs.epoch_at(offset), epoch, "offset {offset}");
        }
    }

    #[test]
    fn truncation_both_ends() {
        let mut epochs = LeaderEpochs::default();
        for (e, o, i) in [(1, 0, 1), (2, 10, 5), (5, 40, 9)] {
            epochs.assign(start(e, o, i));
        }
        let mut tail = epochs.clone();
        tail.truncate_from(5);
        assert_eq!(tail.entries(), &[start(1, 0, 1)]);
        // A new leader's entry at an index the log already had replaces what followed it.
        let mut diverged = epochs.clone();
        diverged.assign(start(6, 10, 5));
        assert_eq!(diverged.entries(), &[start(1, 0, 1), start(6, 10, 5)]);
        let mut head = epochs;
        head.truncate_before(7, 25);
        assert_eq!(head.entries(), &[start(2, 25, 7), start(5, 40, 9)]);
        assert_eq!(head.term_at(7), Some(2));
    }

    #[test]
    fn file_round_trip_and_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(LeaderEpochs::load(dir.path()).ok(), Some(LeaderEpochs::default()));
        let mut epochs = LeaderEpochs::default();
        epochs.assign(start(1, 0, 1));
        epochs.assign(start(7, 1234, 99));
        epochs.store(dir.path()).unwrap();
        assert_eq!(LeaderEpochs::load(dir.path()).ok(), Some(epochs));
        for damaged in ["2\n0\n", "1\n2\n1 0 1\n", "1\n2\n3 0 1\n2 5 6\n", "1\n1\n1 -4 1\n"] {
            std::fs::write(dir.path().join(EPOCHS_FILE), damaged).unwrap();
            let err = LeaderEpochs::load(dir.path()).err().map(|e| e.to_string());
            assert!(err.as_deref().is_some_and(|e| e.contains("damaged")), "{damaged:?}: {err:?}");
        }
    }
}
