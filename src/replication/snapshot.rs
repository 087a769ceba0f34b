//! What a partition leader's Raft snapshot carries beside raft-rs's metadata (index, term,
//! members): the Kafka offset where a follower's log restarts — the end of the leader's anchor
//! entry — and the leader epochs up to there, so the follower answers terms and Kafka's
//! OffsetForLeaderEpoch from its first entry on. raft-rs's `Snapshot.data` holds it as a
//! FlatBuffers `SnapshotData` (`schema/replication.fbs`); protobuf never parses it.
//!
//! The leader's idempotent producers as of the start offset travel too (Kafka's follower forgets
//! them in `truncateFullyAndStartAt`; ours installs them with its restarted log), in the
//! partition's producer-state snapshot format, so a follower that becomes leader still knows a
//! retry of a batch below its log start (docs/replication.md, stop 18). They are verified here,
//! whole, before any replica sees them.
//!
//! Owns the `SnapshotData` format. Depends on the generated code, `epochs` and the producer-state
//! codec of `storage`; no IO.

use thiserror::Error;

use super::epochs::{EpochStart, LeaderEpochs};
use super::replication_generated::ringlog::replication as fb;
use crate::storage::{ProducerSnapshotError, ProducerStates, PRODUCER_SNAPSHOT_BYTES_MAX};

/// Far more epochs than a partition's history holds at once (one per election that wrote); a
/// snapshot with more is damage.
const EPOCHS_MAX: usize = 1 << 16;

/// What the verifier reads at most: the largest producer state and the most epochs, with room.
const BUFFER_BYTES_MAX: usize = 1 << 25;
const _: () = assert!(PRODUCER_SNAPSHOT_BYTES_MAX + 24 * EPOCHS_MAX + 1024 < BUFFER_BYTES_MAX);

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
    #[error("snapshot of entry {index}: its producer state is {bytes} bytes, more than a partition's bounded table encodes to ({PRODUCER_SNAPSHOT_BYTES_MAX})")]
    ProducersTooLarge { index: u64, bytes: usize },
    #[error("snapshot of entry {index}: its producer state does not decode: {source}")]
    BadProducers { index: u64, source: ProducerSnapshotError },
    #[error("snapshot of entry {index} restarts the log at offset {offset}, but its producer state is as of offset {producers_offset}")]
    ProducersOffset { index: u64, offset: i64, producers_offset: i64 },
}

/// The data of a snapshot of entry `index` (raft-rs's metadata travels beside it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotData {
    /// The Kafka offset after the snapshot's entry: the follower's new log start.
    pub start_offset: i64,
    /// Epochs starting at or before the snapshot's entry, oldest first.
    pub epochs: LeaderEpochs,
    /// The leader's idempotent producers as of `start_offset` (`ProducerStates::as_of`); empty
    /// when it has none, or when the snapshot came from a leader that did not send them.
    pub producers: ProducerStates,
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
        // An empty state is left out: the same bytes as a snapshot from before the field.
        let producers = (!self.producers.is_empty())
            .then(|| fbb.create_vector(&self.producers.encode_snapshot(self.start_offset)));
        let root = fb::SnapshotData::create(
            &mut fbb,
            &fb::SnapshotDataArgs { start_offset: self.start_offset, epochs: Some(epochs), producers },
        );
        fbb.finish(root, None);
        fbb.finished_data().to_vec()
    }

    /// Decodes and checks the data of a snapshot of entry `index`: a valid buffer, a start offset
    /// that is not negative, epochs in increasing order that start at or before the snapshot, and
    /// a producer state of bounded size, intact (crc32c), as of the start offset and so with every
    /// batch below it.
    pub fn decode(bytes: &[u8], index: u64) -> Result<SnapshotData, SnapshotDataError> {
        let options = flatbuffers::VerifierOptions {
            max_depth: 4,
            max_tables: 16,
            max_apparent_size: BUFFER_BYTES_MAX,
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
        let producers = match root.producers() {
            None => ProducerStates::default(),
            Some(bytes) if bytes.len() > PRODUCER_SNAPSHOT_BYTES_MAX => {
                return Err(SnapshotDataError::ProducersTooLarge { index, bytes: bytes.len() });
            }
            Some(bytes) => {
                // The codec refuses any batch at or past the offset it names.
                let (producers_offset, producers) = ProducerStates::decode_snapshot(bytes.bytes())
                    .map_err(|source| SnapshotDataError::BadProducers { index, source })?;
                if producers_offset != offset {
                    return Err(SnapshotDataError::ProducersOffset { index, offset, producers_offset });
                }
                producers
            }
        };
        Ok(SnapshotData { start_offset: offset, epochs, producers })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::ProducerBatch;

    fn epochs(list: &[(u64, i64, u64)]) -> LeaderEpochs {
        let mut epochs = LeaderEpochs::default();
        for &(epoch, start_offset, start_index) in list {
            epochs.assign(EpochStart { epoch, start_offset, start_index });
        }
        epochs
    }

    #[test]
    fn snapshot_data_round_trips_and_damage_is_refused() {
        let data = SnapshotData {
            start_offset: 900,
            epochs: epochs(&[(1, 0, 1), (3, 400, 52), (4, 880, 97)]),
            producers: ProducerStates::default(),
        };
        let bytes = data.encode();
        assert_eq!(SnapshotData::decode(&bytes, 100).unwrap(), data);
        let empty = SnapshotData {
            start_offset: 0,
            epochs: LeaderEpochs::default(),
            producers: ProducerStates::default(),
        };
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
        let negative = SnapshotData {
            start_offset: -1,
            epochs: LeaderEpochs::default(),
            producers: ProducerStates::default(),
        };
        assert!(matches!(
            SnapshotData::decode(&negative.encode(), 100),
            Err(SnapshotDataError::BadOffset { offset: -1, .. })
        ));
        assert!(matches!(SnapshotData::decode(b"garbage", 100), Err(SnapshotDataError::BadBuffer(_))));
        assert!(SnapshotData::decode(&bytes[..bytes.len() - 8], 100).is_err());
    }

    /// Producers 1 and 2, each with batches below and at or past offset 900.
    fn producers() -> ProducerStates {
        let mut states = ProducerStates::default();
        for (producer_id, first_sequence, base_offset) in [(1, 0, 850), (2, 0, 860), (1, 5, 895), (2, 3, 900)]
        {
            let batch = ProducerBatch {
                producer_id,
                epoch: 2,
                first_sequence,
                last_sequence: first_sequence + 4,
                timestamp_ms: 1_000,
            };
            states.replay(&batch, base_offset, base_offset + 4);
        }
        states
    }

    /// A `SnapshotData` restarting at `start_offset` with `producers` as its producer bytes.
    fn with_producers(start_offset: i64, producers: &[u8]) -> Vec<u8> {
        let mut fbb = flatbuffers::FlatBufferBuilder::new();
        let producers = fbb.create_vector(producers);
        let root = fb::SnapshotData::create(
            &mut fbb,
            &fb::SnapshotDataArgs { start_offset, epochs: None, producers: Some(producers) },
        );
        fbb.finish(root, None);
        fbb.finished_data().to_vec()
    }

    #[test]
    fn producer_state_round_trips_and_damage_is_refused() {
        let data = SnapshotData {
            start_offset: 900,
            epochs: epochs(&[(1, 0, 1)]),
            producers: producers().as_of(900),
        };
        assert_eq!(data.producers.len(), 2);
        let bytes = data.encode();
        assert_eq!(SnapshotData::decode(&bytes, 100).unwrap(), data);

        // A state past the start offset (a batch ending at 904 in a snapshot restarting at 900,
        // its encoding claiming 900) is refused by the codec; so is a state as of another offset
        // than the log restarts at.
        let mut past = producers().as_of(905).encode_snapshot(905);
        past[8..16].copy_from_slice(&900i64.to_be_bytes());
        let body = past.len() - 4;
        let crc = crc32c::crc32c(&past[..body]);
        past[body..].copy_from_slice(&crc.to_be_bytes());
        assert!(matches!(
            SnapshotData::decode(&with_producers(900, &past), 100),
            Err(SnapshotDataError::BadProducers { .. })
        ));
        let other = data.producers.encode_snapshot(950);
        assert_eq!(
            SnapshotData::decode(&with_producers(900, &other), 100),
            Err(SnapshotDataError::ProducersOffset { index: 100, offset: 900, producers_offset: 950 })
        );
        // Every flipped bit of the state is caught (crc32c, or the checks behind it).
        let state = data.producers.encode_snapshot(900);
        let at = bytes.windows(state.len()).position(|w| w == state.as_slice()).unwrap();
        for i in at..at + state.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(SnapshotData::decode(&bad, 100).is_err(), "flip at byte {i} accepted");
        }
        // Too large to be a bounded table's.
        let huge = vec![0u8; PRODUCER_SNAPSHOT_BYTES_MAX + 1];
        assert!(matches!(
            SnapshotData::decode(&with_producers(900, &huge), 100),
            Err(SnapshotDataError::ProducersTooLarge { .. })
        ));
    }
}
