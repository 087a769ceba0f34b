//! Producer ids for Kafka InitProducerId, handed out by the controller (shard 0).
//!
//! Owns: `<data_dir>/producer_ids` and the block of ids reserved in it. A block's end is persisted
//! (fsync, rename) before any id of the block is handed out, so no id is handed out twice across
//! shards (all ask the controller; the request is rare, one per producer start) or restarts (a
//! restart skips the rest of a block).

use std::cell::Cell;
use std::path::Path;

use crate::shard::BrokerError;

/// Ids per block reserved on disk by the producer-id allocator (Kafka's block size).
const PRODUCER_ID_BLOCK: i64 = 1000;
/// `<data_dir>/producer_ids`: the end of the last reserved block (every id below it may have
/// been handed out). Magic, i64 big-endian, crc32c of both.
const PRODUCER_IDS_FILE: &str = "producer_ids";
const PRODUCER_IDS_MAGIC: &[u8; 4] = b"RLPI";
const PRODUCER_IDS_FILE_BYTES: usize = 4 + 8 + 4;

/// The controller's producer ids: handed out from blocks whose end is persisted before any id of
/// the block is.
pub(super) struct ProducerIdAllocator {
    /// One request at a time: a block is persisted before its ids are used.
    gate: glommio::sync::Semaphore,
    /// `(next id, end of the reserved block)`; `None` until the file is read on first use.
    block: Cell<Option<(i64, i64)>>,
}

impl ProducerIdAllocator {
    pub fn new() -> ProducerIdAllocator {
        ProducerIdAllocator { gate: glommio::sync::Semaphore::new(1), block: Cell::new(None) }
    }

    /// A producer id for Kafka InitProducerId: a new one with epoch 0, or for `current` (an id
    /// this broker handed out, with its epoch: a KIP-360 bump) the same id with the next epoch,
    /// and a new id once that epoch is exhausted. Apache Kafka itself ignores `current` without a
    /// transactional id and always hands out a new id; the bump keeps the id space small and is
    /// equally valid for clients (a higher epoch starting at sequence 0 is accepted everywhere).
    pub async fn next(
        &self,
        data_dir: &Path,
        current: Option<(i64, i16)>,
    ) -> Result<(i64, i16), BrokerError> {
        let _turn = self.gate.acquire_permit(1).await.map_err(|_| BrokerError::ShuttingDown)?;
        let path = data_dir.join(PRODUCER_IDS_FILE);
        let failed = |detail: String| {
            tracing::error!(path = %path.display(), "producer ids: {detail}");
            BrokerError::ControllerFile { file: format!("producer ids ({})", path.display()), detail }
        };
        let (next, end) = match self.block.get() {
            Some(block) => block,
            None => {
                let file = path.clone();
                let end = glommio::executor()
                    .spawn_blocking(move || read_producer_id_block_end(&file))
                    .await
                    .map_err(failed)?;
                (end, end)
            }
        };
        self.block.set(Some((next, end)));
        let end = if producer_id_from_block(next, end, current).is_some() {
            end
        } else {
            let new_end = end
                .checked_add(PRODUCER_ID_BLOCK)
                .ok_or_else(|| failed(format!("the id space is exhausted at {end}")))?;
            let file = path.clone();
            glommio::executor()
                .spawn_blocking(move || write_producer_id_block_end(&file, new_end))
                .await
                .map_err(|e| failed(format!("persisting the next block: {e}")))?;
            tracing::info!(first = end, end = new_end, "reserved a block of producer ids");
            new_end
        };
        let answer = producer_id_from_block(next, end, current)
            .ok_or_else(|| failed(format!("no id in the block {next}..{end} just reserved")))?;
        self.block.set(Some((next_after(next, answer), end)));
        Ok(answer)
    }
}

/// The answer from the reserved block `next..end`: for `current` (an id below `next`, so one
/// handed out before, with an epoch Kafka would still bump: below `i16::MAX - 1`) the same id
/// with the next epoch; else the next new id with epoch 0; `None` when the block is used up.
fn producer_id_from_block(next: i64, end: i64, current: Option<(i64, i16)>) -> Option<(i64, i16)> {
    debug_assert!(0 <= next && next <= end);
    if let Some((producer_id, epoch)) = current {
        if (0..next).contains(&producer_id) && (0..i16::MAX - 1).contains(&epoch) {
            return Some((producer_id, epoch + 1));
        }
    }
    (next < end).then_some((next, 0))
}
/// The block's next id once `answer` is handed out.
fn next_after(next: i64, answer: (i64, i16)) -> i64 {
    if answer == (next, 0) {
        next + 1
    } else {
        next
    }
}
/// The reserved end recorded in the producer-ids file; 0 when there is none yet (a new data
/// directory). Blocking.
fn read_producer_id_block_end(path: &Path) -> Result<i64, String> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(format!("reading: {e}")),
    };
    if bytes.len() != PRODUCER_IDS_FILE_BYTES || &bytes[..4] != PRODUCER_IDS_MAGIC {
        return Err(format!("{} bytes without the expected layout; the file is damaged", bytes.len()));
    }
    let (body, crc) = bytes.split_at(PRODUCER_IDS_FILE_BYTES - 4);
    let stored = u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32c::crc32c(body) != stored {
        return Err("crc32c mismatch; the file is damaged".into());
    }
    let mut end = [0u8; 8];
    end.copy_from_slice(&body[4..]);
    match i64::from_be_bytes(end) {
        end if end >= 0 => Ok(end),
        end => Err(format!("negative block end {end}; the file is damaged")),
    }
}
/// Replaces the producer-ids file atomically and durably (temp file, fsync, rename, fsync of
/// the directory). Blocking.
fn write_producer_id_block_end(path: &Path, end: i64) -> std::io::Result<()> {
    use std::io::Write;
    let mut bytes = Vec::with_capacity(PRODUCER_IDS_FILE_BYTES);
    bytes.extend_from_slice(PRODUCER_IDS_MAGIC);
    bytes.extend_from_slice(&end.to_be_bytes());
    bytes.extend_from_slice(&crc32c::crc32c(&bytes).to_be_bytes());
    let temp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&temp)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temp, path)?;
    match path.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn ids_come_from_the_block_and_known_ids_get_the_next_epoch() {
        assert_eq!(producer_id_from_block(0, 0, None), None, "nothing reserved yet");
        assert_eq!(producer_id_from_block(5, 1000, None), Some((5, 0)));
        assert_eq!(next_after(5, (5, 0)), 6);
        // KIP-360 bump of an id handed out before.
        assert_eq!(producer_id_from_block(5, 1000, Some((3, 7))), Some((3, 8)));
        assert_eq!(next_after(5, (3, 8)), 5, "a bump uses no new id");
        assert_eq!(producer_id_from_block(5, 5, Some((3, 7))), Some((3, 8)), "even with the block used up");
        // Exhausted epochs, ids never handed out and negative epochs get a new id.
        assert_eq!(producer_id_from_block(5, 1000, Some((3, i16::MAX - 1))), Some((5, 0)));
        assert_eq!(producer_id_from_block(5, 1000, Some((3, i16::MAX - 2))), Some((3, i16::MAX - 1)));
        assert_eq!(producer_id_from_block(5, 1000, Some((5, 0))), Some((5, 0)));
        assert_eq!(producer_id_from_block(5, 1000, Some((3, -4))), Some((5, 0)));
        assert_eq!(producer_id_from_block(1000, 1000, Some((2000, 1))), None);
    }
    #[test]
    fn the_block_end_survives_in_its_file_and_damage_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(PRODUCER_IDS_FILE);
        assert_eq!(read_producer_id_block_end(&path), Ok(0), "a new data directory starts at 0");
        write_producer_id_block_end(&path, 3000).unwrap();
        assert_eq!(read_producer_id_block_end(&path), Ok(3000));
        write_producer_id_block_end(&path, 4000).unwrap();
        assert_eq!(read_producer_id_block_end(&path), Ok(4000));
        assert!(!path.with_extension("tmp").exists());
        let good = std::fs::read(&path).unwrap();
        for at in 0..good.len() {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            std::fs::write(&path, &bad).unwrap();
            assert!(read_producer_id_block_end(&path).is_err(), "flip at byte {at} accepted");
        }
        std::fs::write(&path, &good[..good.len() - 1]).unwrap();
        assert!(read_producer_id_block_end(&path).is_err());
    }
}
