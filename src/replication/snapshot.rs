//! What a partition leader's Raft snapshot carries beside raft-rs's metadata (index, term,
//! members): the Kafka offset where a follower's log restarts — the end of the leader's anchor
//! entry — and the leader epochs up to there, so the follower answers terms and Kafka's
//! OffsetForLeaderEpoch from its first entry on. raft-rs's `Snapshot.data` holds it as a
//! FlatBuffers `SnapshotData` (`schema/replication.fbs`); protobuf never parses it.
//!
//! No producer state travels: a follower restarted from a snapshot forgets its idempotent
//! producers below the new start, as Kafka's follower does in `truncateFullyAndStartAt`
//! (docs/replication.md, stop 18).
//!
//! Owns the `SnapshotData` format. Depends on the generated code and `epochs`; no IO.

use thiserror::Error;

use super::epochs::{EpochStart, LeaderEpochs};
use super::replication_generated::ringlog::replication as fb;

/// Far more epochs than a partition's history holds at once (one per election that wrote); a
/// snapshot with more is damage.
const EPOCHS_MAX: usize = 1 << 16;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SnapshotDataError {
    #[error("snapshot data is not a valid SnapshotData: {0}")]
    BadBuffer(String),
    #[error("snapshot of entry {index} restarts the log at offset {offset}")]
    BadOffset { index: u64, offset: i64 },
    #[error("snapshot of entry {index} carries {count} leader epochs, more than {EPOCHS_MAX}")]
    TooManyEpochs { index: u64, count: usize },
    #[error("snapshot of entry {index} at offset {offset}: leader epoch {epoch} (from offset {start_offset}, index {start_index}) is out of order or past the snapshot")]
    BadEpoch { index: u64, offset: i64, epoch: u64, start_offset: i64, start_index: u64 },
}

/// The data of a snapshot of entry `index` (raft-rs's metadata travels beside it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotData {
    /// The Kafka offset after the snapshot's entry: the follower's new log start.
    pub start_offset: i64,
    /// Epochs starting at or before the snapshot's entry, oldest first.
    pub epochs: LeaderEpochs,
}

impl SnapshotData {
    pub fn encode(&self) -> Vec<u8> {
        let mut fbb = flatbuffers::FlatBufferBuilder::with_capacity(64 + 24 * self.epochs.entries().len());
        let epochs: Vec<fb::EpochStart> = self
            .epochs
            .entries()
            .iter()
            .map(|e| fb::EpochStart::new(e.epoch, e.start_offset, e.start_index))
            .collect();
        let epochs = fbb.create_vector(&epochs);
        let root = fb::SnapshotData::create(
            &mut fbb,
            &fb::SnapshotDataArgs { start_offset: self.start_offset, epochs: Some(epochs) },
        );
        fbb.finish(root, None);
        fbb.finished_data().to_vec()
    }

    /// Decodes and checks the data of a snapshot of entry `index`: a valid buffer, a start offset
    /// that is not negative, epochs in increasing order that start at or before the snapshot.
    pub fn decode(bytes: &[u8], index: u64) -> Result<SnapshotData, SnapshotDataError> {
        let options = flatbuffers::VerifierOptions {
            max_depth: 4,
            max_tables: 16,
            max_apparent_size: 1 << 24,
            ..Default::default()
        };
        let root = flatbuffers::root_with_opts::<fb::SnapshotData>(&options, bytes)
            .map_err(|e| SnapshotDataError::BadBuffer(e.to_string()))?;
        let offset = root.start_offset();
        if offset < 0 {
            return Err(SnapshotDataError::BadOffset { index, offset });
        }
        let listed = root.epochs().map(|v| v.len()).unwrap_or(0);
        if listed > EPOCHS_MAX {
            return Err(SnapshotDataError::TooManyEpochs { index, count: listed });
        }
        let mut epochs = LeaderEpochs::default();
        let mut previous: Option<EpochStart> = None;
        for e in root.epochs().iter().flatten() {
            let start =
                EpochStart { epoch: e.epoch(), start_offset: e.start_offset(), start_index: e.start_index() };
            let ordered = previous.is_none_or(|p| {
                p.epoch < start.epoch
                    && p.start_offset <= start.start_offset
                    && p.start_index < start.start_index
            });
            if !ordered || start.start_index > index || start.start_offset > offset || start.start_offset < 0
            {
                return Err(SnapshotDataError::BadEpoch {
                    index,
                    offset,
                    epoch: start.epoch,
                    start_offset: start.start_offset,
                    start_index: start.start_index,
                });
            }
            epochs.assign(start);
            previous = Some(start);
        }
        Ok(SnapshotData { start_offset: offset, epochs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epochs(list: &[(u64, i64, u64)]) -> LeaderEpochs {
        let mut epochs = LeaderEpochs::default();
        for &(epoch, start_offset, start_index) in list {
            epochs.assign(EpochStart { epoch, start_offset, start_index });
        }
        epochs
    }

    #[test]
    fn snapshot_data_round_trips_and_damage_is_refused() {
        let data =
            SnapshotData { start_offset: 900, epochs: epochs(&[(1, 0, 1), (3, 400, 52), (4, 880, 97)]) };
        let bytes = data.encode();
        assert_eq!(SnapshotData::decode(&bytes, 100).unwrap(), data);
        let empty = SnapshotData { start_offset: 0, epochs: LeaderEpochs::default() };
        assert_eq!(SnapshotData::decode(&empty.encode(), 1).unwrap(), empty);

        // An epoch past the snapshot's entry, or out of order, or a negative start.
        assert!(matches!(
            SnapshotData::decode(&bytes, 90),
            Err(SnapshotDataError::BadEpoch { epoch: 4, .. })
        ));
        let early = SnapshotData { start_offset: 500, ..data.clone() };
        assert!(matches!(
            SnapshotData::decode(&early.encode(), 100),
            Err(SnapshotDataError::BadEpoch { .. })
        ));
        let negative = SnapshotData { start_offset: -1, epochs: LeaderEpochs::default() };
        assert!(matches!(
            SnapshotData::decode(&negative.encode(), 100),
            Err(SnapshotDataError::BadOffset { offset: -1, .. })
        ));
        assert!(matches!(SnapshotData::decode(b"garbage", 100), Err(SnapshotDataError::BadBuffer(_))));
        assert!(SnapshotData::decode(&bytes[..bytes.len() - 8], 100).is_err());
    }
}
