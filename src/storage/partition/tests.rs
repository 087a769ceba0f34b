//! The partition's tests: open, append, read, housekeeping, truncation and close on real O_DIRECT
//! files in temporary directories, crashes simulated by dropping without close or damaging files.

use super::*;
use crate::record::{BatchError, BatchHeader};
use crate::storage::producer_state::ProducerBatch;
use crate::storage::scan::tests::batch;
use crate::storage::segment::ALIGN;
use crate::storage::{Durability, SequenceGap};
use bytes::{Bytes, BytesMut};
use glommio::{LocalExecutorBuilder, Placement};
use std::future::Future;
use std::io::{Seek, SeekFrom, Write};

fn run<F: Future<Output = ()> + 'static>(f: impl FnOnce() -> F + Send + 'static) {
    LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(1 << 20)
        .spawn(move || async move { f().await })
        .unwrap()
        .join()
        .unwrap();
}

fn config(segment_bytes: u64, durability: Durability) -> LogConfig {
    LogConfig {
        segment_bytes,
        segment_ms: 3_600_000,
        retention_bytes: None,
        retention_ms: None,
        durability,
        index_interval_bytes: 256,
        batch_bytes_max: 1 << 20,
        records_per_batch_max: 1000,
        visibility: crate::storage::Visibility::Durable,
    }
}

/// Appends `count` one-batch requests (records cycling 1..=3, timestamp from `ts`), returning
/// the stamped bytes of each batch as the log must hold them.
fn append_many(p: &Partition, count: usize, ts: impl Fn(usize) -> i64) -> Vec<Vec<u8>> {
    let mut expected = Vec::new();
    for i in 0..count {
        let records = (i % 3) as i32 + 1;
        let b = batch(-1, records, ts(i), i % 40);
        let r = p.append(BytesMut::from(&b[..])).unwrap();
        assert_eq!(r.last_offset - r.base_offset, i64::from(records) - 1);
        expected.push(batch(r.base_offset, records, ts(i), i % 40));
    }
    expected
}

/// Reads everything from `from` to the high watermark with `max_bytes` per read.
async fn read_all(p: &Partition, from: i64, max_bytes: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut offset = from;
    while offset < p.high_watermark() {
        let r = p.read(offset, max_bytes).await.unwrap();
        assert!(!r.chunks.is_empty(), "no progress at offset {offset}");
        for c in r.chunks {
            let h = BatchHeader::parse(&c).unwrap();
            assert!(h.last_offset() >= offset);
            offset = h.last_offset() + 1;
            out.push(c.to_vec());
        }
    }
    out
}

/// Opens partitions `t/0` to `t/{count - 1}` under `root` on `shard`, with their reports.
async fn open_partitions(
    root: &Path,
    shard: &Rc<ShardStorage>,
    count: usize,
    durability: Durability,
) -> Vec<(Rc<Partition>, RecoveryReport)> {
    let mut opened = Vec::new();
    for i in 0..count {
        let dir = root.join(format!("t/{i}"));
        opened.push(Partition::open(dir, config(1 << 20, durability), shard.clone()).await.unwrap());
    }
    opened
}

fn log_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

#[test]
fn round_trip_across_rolls_from_disk_and_cache() {
    run(|| async {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("t/0");
        // No tail cache: every read goes to disk.
        let shard = ShardStorage::new(tmp.path().to_path_buf(), 0, 0);
        let (p, report) =
            Partition::open(dir.clone(), config(4096, Durability::Written), shard).await.unwrap();
        assert_eq!(report.log_end_offset, 0);
        let expected = append_many(&p, 300, |i| 1000 + i as i64);
        p.wait_durable(p.log_end_offset() - 1).await.unwrap();
        assert_eq!(p.high_watermark(), p.log_end_offset());
        assert!(log_files(&dir).len() > 5, "expected several rolls");
        assert_eq!(read_all(&p, 0, 700).await, expected);
        assert_eq!(read_all(&p, 0, 1 << 20).await, expected);
        // Reading from the middle of a batch returns that whole batch first.
        let third = BatchHeader::parse(&expected[2]).unwrap();
        let r = p.read(third.last_offset(), 1).await.unwrap();
        assert_eq!(r.chunks.len(), 1);
        assert_eq!(&r.chunks[0][..], &expected[2][..]);

        // With a cache, a read at the tail is a hit and needs no disk.
        let shard = ShardStorage::new(tmp.path().to_path_buf(), 1 << 20, 0);
        let (q, _) =
            Partition::open(tmp.path().join("t/1"), config(4096, Durability::Written), shard.clone())
                .await
                .unwrap();
        let expected = append_many(&q, 50, |i| i as i64);
        q.wait_durable(q.log_end_offset() - 1).await.unwrap();
        let before = shard.cache_stats();
        assert_eq!(read_all(&q, 0, 1 << 20).await, expected);
        let after = shard.cache_stats();
        assert!(after.hits > before.hits);
        assert_eq!(after.misses, before.misses);
        p.close().await.unwrap();
        q.close().await.unwrap();
    });
}

/// Batches of many sizes, so chunks start with a carried block and then fill only that block,
/// end exactly at its boundary, or run far past it: the head and body writes put every byte
/// where a reopened log reads it back.
#[test]
fn chunks_split_at_the_carried_block_read_back_after_reopen() {
    run(|| async {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("p");
        let shard = ShardStorage::new(tmp.path().to_path_buf(), 0, 0);
        let (p, _) =
            Partition::open(dir.clone(), config(8 << 20, Durability::Fsync), shard.clone()).await.unwrap();
        let sizes = [1usize, 4000, 17, 4096, 9000, 3, 70_000, 500, 4095, 200_000, 12];
        let mut expected = Vec::new();
        for round in 0..6 {
            for (i, value_len) in sizes.iter().enumerate() {
                let b = batch(-1, 1, (round * 100 + i) as i64, *value_len);
                let r = p.append(BytesMut::from(&b[..])).unwrap();
                expected.push(batch(r.base_offset, 1, (round * 100 + i) as i64, *value_len));
            }
            // Alternate between letting every chunk reach the disk and queueing several.
            if round % 2 == 0 {
                p.wait_durable(p.log_end_offset() - 1).await.unwrap();
            }
        }
        p.wait_durable(p.log_end_offset() - 1).await.unwrap();
        assert_eq!(read_all(&p, 0, 64 << 10).await, expected);
        p.close().await.unwrap();

        let (p, report) =
            Partition::open(dir.clone(), config(8 << 20, Durability::Fsync), shard.clone()).await.unwrap();
        assert!(report.torn_tails.is_empty(), "{report}");
        assert_eq!(read_all(&p, 0, 1 << 20).await, expected);
        p.close().await.unwrap();
    });
}

#[test]
fn close_and_reopen_keeps_everything() {
    run(|| async {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("p");
        let shard = ShardStorage::new(tmp.path().to_path_buf(), 0, 0);
        let (p, _) =
            Partition::open(dir.clone(), config(4096, Durability::Fsync), shard.clone()).await.unwrap();
        let mut expected = append_many(&p, 120, |i| i as i64);
        p.close().await.unwrap();
        assert!(matches!(p.append(BytesMut::from(&batch(0, 1, 0, 1)[..])), Err(StorageError::Closed)));
        assert!(dir.join(format!("{CLEAN_SHUTDOWN_MARKER}.no-producers")).exists());

        let (p, report) =
            Partition::open(dir.clone(), config(4096, Durability::Fsync), shard.clone()).await.unwrap();
        assert!(report.clean_shutdown, "{report}");
        assert!(report.torn_tails.is_empty(), "{report}");
        assert!(report.indexes_loaded > 0, "{report}");
        // A clean shutdown scans no sealed segment, and of the active one only its last block.
        assert_eq!(report.segments_scanned, 1, "only the active segment's tail is read again: {report}");
        assert!(report.bytes_scanned <= 2 * ALIGN + 4096, "{report}");
        assert!(!dir.join(format!("{CLEAN_SHUTDOWN_MARKER}.no-producers")).exists());
        let end = p.log_end_offset();
        assert_eq!(read_all(&p, 0, 4096).await, expected);
        // Offsets continue after reopen.
        expected.extend(append_many(&p, 10, |i| i as i64));
        assert_eq!(BatchHeader::parse(&expected[120]).unwrap().base_offset, end);
        p.wait_durable(p.log_end_offset() - 1).await.unwrap();
        assert_eq!(read_all(&p, 0, 4096).await, expected);
        p.close().await.unwrap();
    });
}

#[test]
fn crash_with_torn_tail_is_truncated_and_reported() {
    run(|| async {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("p");
        let shard = ShardStorage::new(tmp.path().to_path_buf(), 0, 0);
        let (p, _) =
            Partition::open(dir.clone(), config(1 << 20, Durability::Written), shard.clone()).await.unwrap();
        let expected = append_many(&p, 40, |i| i as i64);
        p.wait_durable(p.log_end_offset() - 1).await.unwrap();
        drop(p); // "crash": no close, no marker, file still preallocated with zeroes.

        let last_pos: usize = expected[..39].iter().map(|b| b.len()).sum();
        let path = log_files(&dir).pop().unwrap();
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.seek(SeekFrom::Start((last_pos + expected[39].len() - 5) as u64)).unwrap();
        f.write_all(&[0xff; 3]).unwrap();
        drop(f);

        let (p, report) =
            Partition::open(dir.clone(), config(1 << 20, Durability::Written), shard).await.unwrap();
        assert!(!report.clean_shutdown);
        assert_eq!(report.torn_tails.len(), 1, "{report}");
        let torn = &report.torn_tails[0];
        assert_eq!(torn.position, last_pos as u64);
        let last_good = BatchHeader::parse(&expected[38]).unwrap().last_offset();
        assert_eq!(torn.last_good_offset, Some(last_good));
        assert_eq!(p.log_end_offset(), last_good + 1);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), last_pos as u64);
        assert_eq!(read_all(&p, 0, 1000).await, expected[..39].to_vec());
        // Appends continue at the truncation point.
        let more = append_many(&p, 3, |i| i as i64);
        assert_eq!(BatchHeader::parse(&more[0]).unwrap().base_offset, last_good + 1);
        p.wait_durable(p.log_end_offset() - 1).await.unwrap();
        p.close().await.unwrap();
    });
}

#[test]
fn a_crash_after_a_checkpoint_scans_only_the_tail() {
    run(|| async {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("p");
        let shard = ShardStorage::new(tmp.path().to_path_buf(), 0, 0);
        let cfg = || config(1 << 20, Durability::Fsync);
        let (p, _) = Partition::open(dir.clone(), cfg(), shard.clone()).await.unwrap();
        let mut expected = append_many(&p, 300, |i| i as i64);
        p.wait_durable(p.log_end_offset() - 1).await.unwrap();
        p.checkpoint_active().await;
        let checkpointed: u64 = expected.iter().map(|b| b.len() as u64).sum();
        expected.extend(append_many(&p, 20, |i| 300 + i as i64));
        p.wait_durable(p.log_end_offset() - 1).await.unwrap();
        drop(p); // "crash": no close, no marker, file still preallocated with zeroes.

        // Damage the last batch: the tail scan still finds and cuts it.
        let last_pos: u64 = expected[..319].iter().map(|b| b.len() as u64).sum();
        let path = log_files(&dir).pop().unwrap();
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.seek(SeekFrom::Start(last_pos + 30)).unwrap();
        f.write_all(&[0xff; 3]).unwrap();
        drop(f);

        let (p, report) = Partition::open(dir.clone(), cfg(), shard.clone()).await.unwrap();
        assert!(!report.clean_shutdown);
        assert_eq!((report.indexes_loaded, report.segments_scanned), (1, 1), "{report}");
        let tail = last_pos - checkpointed;
        // From the last index entry at or below the checkpoint's last block: at most one
        // block, one index interval and one batch before the checkpoint end.
        let slack = ALIGN + 256 + expected[299].len() as u64;
        assert!(
            report.bytes_scanned >= tail && report.bytes_scanned <= tail + slack,
            "scanned {} bytes for a tail of {tail}: {report}",
            report.bytes_scanned
        );
        assert_eq!(report.torn_tails.len(), 1, "{report}");
        assert_eq!(report.torn_tails[0].position, last_pos);
        assert_eq!(read_all(&p, 0, 1000).await, expected[..319].to_vec());
        assert_eq!(p.read(250, 100).await.unwrap().chunks.len(), 1, "the index still finds old batches");
        p.close().await.unwrap();

        // A clean close writes the whole index over the checkpoint: the next open reads only the
        // last block again.
        let (p, report) = Partition::open(dir.clone(), cfg(), shard).await.unwrap();
        assert_eq!(report.segments_scanned, 1, "{report}");
        assert!(report.bytes_scanned <= slack, "{report}");
        assert_eq!(read_all(&p, 0, 1000).await, expected[..319].to_vec());
        p.close().await.unwrap();
    });
}

fn files_with_extension(dir: &Path, ext: &str) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|e| e == ext))
        .count()
}

#[test]
fn spare_segments_and_off_shard_deletion_leave_states_recovery_accepts() {
    run(|| async {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("p");
        let shard = ShardStorage::new(tmp.path().to_path_buf(), 0, 0);
        let mut cfg = config(8192, Durability::Written);
        cfg.retention_bytes = Some(4 * 8192);
        let (p, _) = Partition::open(dir.clone(), cfg.clone(), shard.clone()).await.unwrap();
        let expected = append_many(&p, 600, |i| i as i64);
        p.wait_durable(p.log_end_offset() - 1).await.unwrap();
        assert!(log_files(&dir).len() > 8, "many rolls, each through a spare or a fresh file");
        assert_eq!(read_all(&p, 0, 1 << 20).await, expected);

        let report = p.housekeep(now_ms()).await.unwrap();
        assert!(!report.segments_deleted.is_empty(), "{report}");
        let logs = log_files(&dir).len();
        // Deleted segments lose all three files; sealed ones keep both indexes.
        assert_eq!(files_with_extension(&dir, "index"), logs - 1);
        assert_eq!(files_with_extension(&dir, "timeindex"), logs - 1);
        let start = p.log_start_offset();
        assert!(matches!(p.read(0, 100).await, Err(StorageError::OffsetOutOfRange { requested: 0, .. })));
        let kept = read_all(&p, start, 1 << 20).await;
        assert_eq!(kept[..], expected[expected.len() - kept.len()..]);
        p.close().await.unwrap();
        assert!(!dir.join(SPARE_SEGMENT_NAME).exists(), "close removes the spare");

        // A crash part way through a deletion: the oldest segment's indexes are gone, its log is
        // not; and a spare was left behind.
        let oldest = log_files(&dir).remove(0);
        std::fs::remove_file(oldest.with_extension("index")).unwrap();
        std::fs::remove_file(oldest.with_extension("timeindex")).unwrap();
        std::fs::write(dir.join(SPARE_SEGMENT_NAME), vec![0u8; 8192]).unwrap();
        let (p, report) = Partition::open(dir.clone(), cfg, shard).await.unwrap();
        assert_eq!(report.indexes_rebuilt, 1, "{report}");
        assert!(!dir.join(SPARE_SEGMENT_NAME).exists(), "open removes a leftover spare");
        assert_eq!(p.log_start_offset(), start);
        assert_eq!(read_all(&p, start, 1 << 20).await, kept);
        p.close().await.unwrap();
    });
}

#[test]
fn reading_a_segment_shrunk_behind_its_back_fails_instead_of_looping() {
    run(|| async {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("p");
        let shard = ShardStorage::new(tmp.path().to_path_buf(), 0, 0);
        let (p, _) = Partition::open(dir.clone(), config(8192, Durability::Written), shard).await.unwrap();
        append_many(&p, 200, |i| i as i64);
        p.wait_durable(p.log_end_offset() - 1).await.unwrap();
        assert!(log_files(&dir).len() > 2);
        // What retention's gradual release does to a deleted segment a reader still holds.
        let first = log_files(&dir).remove(0);
        std::fs::OpenOptions::new().write(true).open(&first).unwrap().set_len(4096).unwrap();
        match p.read(0, 1 << 20).await {
            Err(StorageError::Corrupt { segment, .. }) => assert_eq!(segment, first),
            other => panic!("expected Corrupt for a shrunk segment, got {other:?}"),
        }
        p.close().await.unwrap();
    });
}

#[test]
fn retention_by_size_and_time_deletes_whole_segments() {
    run(|| async {
        let tmp = tempfile::tempdir().unwrap();
        let shard = ShardStorage::new(tmp.path().to_path_buf(), 1 << 20, 0);
        let now = 10_000_000i64;

        let mut cfg = config(4096, Durability::Written);
        cfg.retention_bytes = Some(3 * 4096);
        let (p, _) = Partition::open(tmp.path().join("size"), cfg, shard.clone()).await.unwrap();
        let expected = append_many(&p, 300, |_| now);
        p.wait_durable(p.log_end_offset() - 1).await.unwrap();
        let before = log_files(&tmp.path().join("size")).len();
        let report = p.housekeep(now).await.unwrap();
        assert!(!report.segments_deleted.is_empty(), "{report}");
        assert_eq!(log_files(&tmp.path().join("size")).len(), before - report.segments_deleted.len());
        let start = p.log_start_offset();
        assert_eq!(report.log_start_offset, start);
        assert!(start > 0);
        let total: u64 = std::fs::read_dir(tmp.path().join("size"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .map(|p| std::fs::metadata(p).unwrap().len().min(4096))
            .sum();
        assert!(total >= 2 * 4096, "size retention keeps at least the limit minus one segment");
        assert!(matches!(p.read(0, 100).await, Err(StorageError::OffsetOutOfRange { requested: 0, .. })));
        let kept = read_all(&p, start, 1 << 20).await;
        assert_eq!(kept[..], expected[expected.len() - kept.len()..]);
        p.close().await.unwrap();

        let mut cfg = config(4096, Durability::Written);
        cfg.retention_ms = Some(3_600_000);
        let (p, _) = Partition::open(tmp.path().join("time"), cfg, shard.clone()).await.unwrap();
        let old = append_many(&p, 100, |_| now - 7_200_000);
        let fresh_from = p.log_end_offset();
        // Roll so the old data sits in sealed segments only.
        let report = p.housekeep(now).await.unwrap();
        assert!(report.rolled_segment.is_some(), "active segment past retention is rolled: {report}");
        let fresh = append_many(&p, 20, |_| now);
        p.wait_durable(p.log_end_offset() - 1).await.unwrap();
        let report = p.housekeep(now).await.unwrap();
        assert!(!old.is_empty());
        assert_eq!(p.log_start_offset(), fresh_from, "{report}");
        assert!(matches!(p.read(fresh_from - 1, 100).await, Err(StorageError::OffsetOutOfRange { .. })));
        assert_eq!(read_all(&p, fresh_from, 1 << 20).await, fresh);
        p.close().await.unwrap();
    });
}

#[test]
fn fsync_durability_wait_and_long_poll_resolve() {
    run(|| async {
        let tmp = tempfile::tempdir().unwrap();
        let shard = ShardStorage::new(tmp.path().to_path_buf(), 1 << 20, 0);
        let (p, _) =
            Partition::open(tmp.path().join("p"), config(1 << 20, Durability::Fsync), shard).await.unwrap();
        let waiter = {
            let p = p.clone();
            glommio::spawn_local(async move { p.wait_for_data(0).await })
        };
        let r = p.append(BytesMut::from(&batch(0, 5, 1, 10)[..])).unwrap();
        assert_eq!((r.base_offset, r.last_offset), (0, 4));
        p.wait_durable(4).await.unwrap();
        assert_eq!(p.high_watermark(), 5);
        waiter.await;
        let more = append_many(&p, 50, |i| i as i64);
        p.wait_durable(p.log_end_offset() - 1).await.unwrap();
        assert_eq!(p.high_watermark(), p.log_end_offset());
        assert_eq!(read_all(&p, 5, 64).await, more);
        assert!(matches!(p.wait_durable(1000).await, Err(StorageError::OffsetOutOfRange { .. })));
        p.close().await.unwrap();
    });
}

/// Many partitions of one shard written at once wait for shared syncfs rounds, not one sync
/// each, and what they acknowledged is on disk after a crash (the partitions dropped unclosed).
#[test]
fn fsync_durable_writes_of_many_partitions_share_the_shards_sync_rounds() {
    run(|| async {
        let tmp = tempfile::tempdir().unwrap();
        let shard = ShardStorage::new(tmp.path().to_path_buf(), 0, 0);
        shard.set_active_files_max(128);
        let partitions: Vec<_> = open_partitions(tmp.path(), &shard, 64, Durability::Fsync)
            .await
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        // The first wave opens every file (on the blocking pool, between sync rounds); the
        // second finds them open, so its writes complete together.
        let mut expected = vec![Vec::new(); partitions.len()];
        let mut rounds = 0;
        for _wave in 0..2 {
            let rounds_before = shard.group_sync.rounds_finished();
            for (p, expected) in partitions.iter().zip(&mut expected) {
                expected.extend(append_many(p, 3, |i| i as i64));
            }
            let waits = partitions.iter().map(|p| p.wait_durable(p.log_end_offset() - 1));
            for waited in futures::future::join_all(waits).await {
                waited.unwrap();
            }
            rounds = shard.group_sync.rounds_finished() - rounds_before;
        }
        assert!((1..=4).contains(&rounds), "64 partitions took {rounds} sync rounds");
        drop(partitions);

        let shard = ShardStorage::new(tmp.path().to_path_buf(), 0, 0);
        let reopened = open_partitions(tmp.path(), &shard, expected.len(), Durability::Fsync).await;
        for (i, ((p, report), expected)) in reopened.into_iter().zip(&expected).enumerate() {
            assert!(!report.clean_shutdown);
            assert_eq!(read_all(&p, 0, 1 << 20).await, *expected, "partition {i}");
            p.close().await.unwrap();
        }
    });
}

#[test]
fn small_max_bytes_returns_one_whole_batch() {
    run(|| async {
        let tmp = tempfile::tempdir().unwrap();
        for cache_bytes in [0usize, 1 << 20] {
            let shard = ShardStorage::new(tmp.path().to_path_buf(), cache_bytes, 0);
            let dir = tmp.path().join(format!("p{cache_bytes}"));
            let (p, _) = Partition::open(dir, config(1 << 20, Durability::Written), shard).await.unwrap();
            let expected = append_many(&p, 10, |i| i as i64);
            p.wait_durable(p.log_end_offset() - 1).await.unwrap();
            let r = p.read(0, 1).await.unwrap();
            assert_eq!(r.chunks.len(), 1);
            assert_eq!(&r.chunks[0][..], &expected[0][..]);
            assert_eq!(r.high_watermark, p.log_end_offset());
            let end = p.read(p.high_watermark(), 1).await.unwrap();
            assert!(end.chunks.is_empty());
            assert!(matches!(
                p.read(p.high_watermark() + 1, 1).await,
                Err(StorageError::OffsetOutOfRange { .. })
            ));
            p.close().await.unwrap();
        }
    });
}

#[test]
fn corrupt_batch_in_sealed_segment_is_reported_with_position() {
    run(|| async {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("p");
        let shard = ShardStorage::new(tmp.path().to_path_buf(), 0, 0);
        let (p, _) =
            Partition::open(dir.clone(), config(4096, Durability::Written), shard.clone()).await.unwrap();
        let expected = append_many(&p, 200, |i| i as i64);
        p.close().await.unwrap();

        let first = log_files(&dir).remove(0);
        let pos: usize = expected[..5].iter().map(|b| b.len()).sum();
        let mut f = std::fs::OpenOptions::new().write(true).open(&first).unwrap();
        f.seek(SeekFrom::Start(pos as u64 + 40)).unwrap();
        f.write_all(&[0x5a]).unwrap();
        drop(f);

        let (p, report) =
            Partition::open(dir.clone(), config(4096, Durability::Written), shard).await.unwrap();
        assert!(report.torn_tails.is_empty(), "sealed segments are not scanned on open: {report}");
        let ok = p.read(0, 1).await.unwrap();
        assert_eq!(&ok.chunks[0][..], &expected[0][..]);
        let bad_offset = BatchHeader::parse(&expected[5]).unwrap().base_offset;
        match p.read(bad_offset, 1 << 20).await {
            Err(StorageError::Corrupt { segment, position, .. }) => {
                assert_eq!(segment, first);
                assert_eq!(position, pos as u64);
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        p.close().await.unwrap();
    });
}

#[test]
fn invalid_batch_rejects_the_whole_request_and_full_disk_refuses() {
    run(|| async {
        let tmp = tempfile::tempdir().unwrap();
        let shard = ShardStorage::new(tmp.path().to_path_buf(), 1 << 20, 0);
        let (p, _) =
            Partition::open(tmp.path().join("p"), config(1 << 20, Durability::Written), shard).await.unwrap();
        let mut two = batch(0, 2, 1, 5);
        let mut bad = batch(0, 1, 1, 5);
        bad[40] ^= 1;
        two.extend_from_slice(&bad);
        match p.append(BytesMut::from(&two[..])) {
            Err(StorageError::InvalidBatch { index: 1, source: BatchError::CrcMismatch { .. }, .. }) => {}
            other => panic!("expected InvalidBatch, got {other:?}"),
        }
        assert_eq!(p.log_end_offset(), 0);
        assert!(matches!(p.append(BytesMut::new()), Err(StorageError::InvalidBatch { index: 0, .. })));
        p.close().await.unwrap();

        let full = ShardStorage::new(tmp.path().to_path_buf(), 1 << 20, u64::MAX);
        let (p, _) =
            Partition::open(tmp.path().join("q"), config(1 << 20, Durability::Written), full).await.unwrap();
        assert!(matches!(
            p.append(BytesMut::from(&batch(0, 1, 1, 5)[..])),
            Err(StorageError::StorageFull { .. })
        ));
        assert_eq!(p.log_end_offset(), 0);
        let r = p.read(0, 100).await.unwrap();
        assert!(r.chunks.is_empty(), "reads keep working when the disk is full");
        p.remove().await.unwrap();
        assert!(!tmp.path().join("q").exists());
    });
}

#[test]
fn truncate_to_drops_the_tail_and_appends_continue() {
    run(|| async {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("p");
        let shard = ShardStorage::new(tmp.path().to_path_buf(), 1 << 20, 0);
        let (p, _) =
            Partition::open(dir.clone(), config(4096, Durability::Written), shard.clone()).await.unwrap();
        let expected = append_many(&p, 150, |i| i as i64);
        p.wait_durable(p.log_end_offset() - 1).await.unwrap();
        // Cut inside the 100th batch: that batch goes too.
        let cut_batch = BatchHeader::parse(&expected[100]).unwrap();
        p.truncate_to(cut_batch.last_offset()).await.unwrap();
        assert_eq!(p.log_end_offset(), cut_batch.base_offset);
        assert_eq!(p.high_watermark(), cut_batch.base_offset);
        assert_eq!(read_all(&p, 0, 4096).await, expected[..100].to_vec());
        let more = append_many(&p, 5, |i| i as i64);
        assert_eq!(BatchHeader::parse(&more[0]).unwrap().base_offset, cut_batch.base_offset);
        p.close().await.unwrap();
        let (p, report) = Partition::open(dir, config(4096, Durability::Written), shard).await.unwrap();
        assert!(report.torn_tails.is_empty(), "{report}");
        let mut all = expected[..100].to_vec();
        all.extend(more);
        assert_eq!(read_all(&p, 0, 4096).await, all);
        p.close().await.unwrap();
    });
}

#[test]
fn offset_for_timestamp_uses_batch_max_timestamps() {
    run(|| async {
        let tmp = tempfile::tempdir().unwrap();
        let shard = ShardStorage::new(tmp.path().to_path_buf(), 0, 0);
        let (p, _) =
            Partition::open(tmp.path().join("p"), config(4096, Durability::Written), shard).await.unwrap();
        let expected = append_many(&p, 200, |i| 1000 + 10 * i as i64);
        p.wait_durable(p.log_end_offset() - 1).await.unwrap();
        assert_eq!(p.offset_for_timestamp(-2).await.unwrap(), Some((0, -1)));
        assert_eq!(p.offset_for_timestamp(-1).await.unwrap(), Some((p.high_watermark(), -1)));
        for i in [0usize, 1, 57, 150, 199] {
            let want = BatchHeader::parse(&expected[i]).unwrap().base_offset;
            let ts = 1000 + 10 * i as i64;
            assert_eq!(p.offset_for_timestamp(ts).await.unwrap(), Some((want, ts)));
            assert_eq!(p.offset_for_timestamp(ts - 5).await.unwrap(), Some((want, ts)));
        }
        assert_eq!(p.offset_for_timestamp(1000 + 10 * 200).await.unwrap(), None);
        p.close().await.unwrap();
    });
}

/// An idempotent batch of `records` records: `batch` with producer fields and its crc redone.
fn idempotent(producer_id: i64, epoch: i16, first_sequence: i32, records: i32) -> Vec<u8> {
    let mut b = batch(-1, records, now_ms(), 16);
    b[43..51].copy_from_slice(&producer_id.to_be_bytes());
    b[51..53].copy_from_slice(&epoch.to_be_bytes());
    b[53..57].copy_from_slice(&first_sequence.to_be_bytes());
    let crc = crc32c::crc32c(&b[21..]);
    b[17..21].copy_from_slice(&crc.to_be_bytes());
    b
}

fn append_bytes(p: &Partition, bytes: &[u8]) -> Result<(i64, i64), StorageError> {
    p.append(BytesMut::from(bytes)).map(|r| (r.base_offset, r.last_offset))
}

fn snapshot_offsets(dir: &Path) -> Vec<i64> {
    producer_state::list_snapshots(dir).unwrap().into_iter().map(|(offset, _)| offset).collect()
}

#[test]
fn a_retried_batch_gets_its_original_offsets_and_is_not_written_again() {
    run(|| async {
        let tmp = tempfile::tempdir().unwrap();
        let shard = ShardStorage::new(tmp.path().to_path_buf(), 1 << 20, 0);
        let (p, _) =
            Partition::open(tmp.path().join("p"), config(1 << 20, Durability::Fsync), shard).await.unwrap();
        let first = idempotent(1, 0, 0, 3);
        let second = idempotent(1, 0, 3, 2);
        assert_eq!(append_bytes(&p, &first).unwrap(), (0, 2));
        assert_eq!(append_bytes(&p, &batch(-1, 2, 5, 5)).unwrap(), (3, 4), "native batches mix in");
        assert_eq!(append_bytes(&p, &second).unwrap(), (5, 6));
        // Retries, while the originals may still be in flight and after they are durable.
        assert_eq!(append_bytes(&p, &second).unwrap(), (5, 6));
        p.wait_durable(6).await.unwrap();
        assert_eq!(append_bytes(&p, &first).unwrap(), (0, 2));
        p.wait_durable(2).await.unwrap();
        // A request made only of retries answers with the span of the originals.
        let both: Vec<u8> = [first.clone(), second.clone()].concat();
        assert_eq!(append_bytes(&p, &both).unwrap(), (0, 6));
        assert_eq!(p.log_end_offset(), 7, "nothing was written for the retries");
        let stored = read_all(&p, 0, 1 << 20).await;
        assert_eq!(stored.len(), 3);
        assert_eq!(stored[0][12..], first[12..], "the original, as sent, at offset 0");
        assert_eq!(stored[2][12..], second[12..]);
        // The producer continues where it was.
        assert_eq!(append_bytes(&p, &idempotent(1, 0, 5, 1)).unwrap(), (7, 7));
        p.close().await.unwrap();
    });
}

#[test]
fn out_of_order_and_fenced_batches_refuse_the_whole_request() {
    run(|| async {
        let tmp = tempfile::tempdir().unwrap();
        let shard = ShardStorage::new(tmp.path().to_path_buf(), 1 << 20, 0);
        let (p, _) =
            Partition::open(tmp.path().join("p"), config(1 << 20, Durability::Written), shard).await.unwrap();
        assert_eq!(append_bytes(&p, &idempotent(1, 2, 0, 2)).unwrap(), (0, 1));
        match append_bytes(&p, &idempotent(1, 2, 5, 1)) {
            Err(StorageError::OutOfOrderSequence {
                index: 0,
                producer_id: 1,
                epoch: 2,
                first_sequence: 5,
                gap: SequenceGap::Expected { next_sequence: 2 },
            }) => {}
            other => panic!("expected an out-of-order sequence, got {other:?}"),
        }
        match append_bytes(&p, &idempotent(1, 1, 2, 1)) {
            Err(StorageError::ProducerFenced { producer_id: 1, epoch: 1, current_epoch: 2, .. }) => {}
            other => panic!("expected a fenced producer, got {other:?}"),
        }
        match append_bytes(&p, &idempotent(1, 3, 2, 1)) {
            Err(StorageError::OutOfOrderSequence {
                gap: SequenceGap::NewEpoch { current_epoch: 2 }, ..
            }) => {}
            other => panic!("expected a new epoch not at sequence 0 to be refused, got {other:?}"),
        }
        // A valid batch of another producer and a bad one: neither is written nor recorded.
        let mixed: Vec<u8> = [idempotent(2, 0, 0, 1), idempotent(1, 2, 9, 1)].concat();
        assert!(matches!(append_bytes(&p, &mixed), Err(StorageError::OutOfOrderSequence { index: 1, .. })));
        // A retry and a new batch together.
        let retry_and_new: Vec<u8> = [idempotent(1, 2, 0, 2), idempotent(1, 2, 2, 1)].concat();
        match append_bytes(&p, &retry_and_new) {
            Err(StorageError::OutOfOrderSequence {
                index: 0, gap: SequenceGap::DuplicateAmongNew, ..
            }) => {}
            other => panic!("expected a retry mixed with new batches to be refused, got {other:?}"),
        }
        assert_eq!(p.log_end_offset(), 2);
        // Producer 2's refused batch was not recorded: sent again, it is new, not a retry.
        assert_eq!(append_bytes(&p, &idempotent(2, 0, 0, 1)).unwrap(), (2, 2));
        assert_eq!(append_bytes(&p, &idempotent(1, 2, 2, 1)).unwrap(), (3, 3));
        // A new epoch from 0 takes over; the old one is fenced from then on.
        assert_eq!(append_bytes(&p, &idempotent(1, 3, 0, 1)).unwrap(), (4, 4));
        assert!(matches!(
            append_bytes(&p, &idempotent(1, 2, 3, 1)),
            Err(StorageError::ProducerFenced { .. })
        ));
        assert_eq!(p.log_end_offset(), 5);
        p.close().await.unwrap();
    });
}

/// A producer driven by the tests: its next sequence and every batch it sent, as
/// (bytes as sent, base offset, last offset).
struct TestProducer {
    id: i64,
    next_sequence: i32,
    sent: Vec<(Vec<u8>, i64, i64)>,
}

fn test_producers(ids: std::ops::Range<i64>) -> Vec<TestProducer> {
    ids.map(|id| TestProducer { id, next_sequence: 0, sent: Vec::new() }).collect()
}

/// Appends `count` batches per producer (1..=3 records each, producers interleaved).
fn append_producers(p: &Partition, producers: &mut [TestProducer], count: usize) {
    for i in 0..count {
        for producer in producers.iter_mut() {
            let records = (i % 3) as i32 + 1;
            let b = idempotent(producer.id, 0, producer.next_sequence, records);
            let (base, last) = append_bytes(p, &b).unwrap();
            assert_eq!(last - base, i64::from(records) - 1);
            producer.next_sequence += records;
            producer.sent.push((b, base, last));
        }
    }
}

/// Every producer's last five batches are retries answered with their offsets, the one before
/// them is out of order, and nothing is written by checking.
fn assert_producers_known(p: &Partition, producers: &[TestProducer]) {
    let end = p.log_end_offset();
    for TestProducer { id, sent, .. } in producers {
        let recent = &sent[sent.len() - 5..];
        for (b, base, last) in recent {
            assert_eq!(append_bytes(p, b).unwrap(), (*base, *last), "producer {id}");
        }
        let older = &sent[sent.len() - 6].0;
        assert!(
            matches!(append_bytes(p, older), Err(StorageError::OutOfOrderSequence { .. })),
            "producer {id}: a batch older than the last five is not a retry"
        );
    }
    assert_eq!(p.log_end_offset(), end);
}

#[test]
fn producer_state_survives_close_crash_and_lost_or_damaged_snapshots() {
    run(|| async {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("p");
        let shard = ShardStorage::new(tmp.path().to_path_buf(), 0, 0);
        let cfg = config(4096, Durability::Written);
        let (p, _) = Partition::open(dir.clone(), cfg.clone(), shard.clone()).await.unwrap();
        let mut producers = test_producers(10..13);
        append_producers(&p, &mut producers, 60);
        p.wait_durable(p.log_end_offset() - 1).await.unwrap();
        assert!(log_files(&dir).len() > 3, "several rolls, each with a snapshot");
        assert_producers_known(&p, &producers);

        // Clean close: a snapshot at the log end, and nothing to scan on open.
        let end = p.log_end_offset();
        p.close().await.unwrap();
        let snapshots = snapshot_offsets(&dir);
        assert_eq!(snapshots[0], end);
        assert!(snapshots.len() <= producer_state::SNAPSHOTS_KEPT, "{snapshots:?}");
        let (p, report) = Partition::open(dir.clone(), cfg.clone(), shard.clone()).await.unwrap();
        assert!(report.clean_shutdown);
        assert_producers_known(&p, &producers);

        // Crash (no close): the newest snapshot plus a replay of what follows it.
        append_producers(&p, &mut producers, 20);
        p.wait_durable(p.log_end_offset() - 1).await.unwrap();
        assert!(snapshot_offsets(&dir)[0] < p.log_end_offset());
        drop(p);
        let (p, report) = Partition::open(dir.clone(), cfg.clone(), shard.clone()).await.unwrap();
        assert!(!report.clean_shutdown);
        assert_producers_known(&p, &producers);

        // Crash with every snapshot lost: a scan of the whole log rebuilds the same state.
        append_producers(&p, &mut producers, 10);
        p.wait_durable(p.log_end_offset() - 1).await.unwrap();
        drop(p);
        for (_, path) in producer_state::list_snapshots(&dir).unwrap() {
            std::fs::remove_file(path).unwrap();
        }
        let (p, _) = Partition::open(dir.clone(), cfg.clone(), shard.clone()).await.unwrap();
        assert_producers_known(&p, &producers);

        // A damaged newest snapshot and one past the log end (claiming producer 10 moved to
        // epoch 9) are both removed; the state is rebuilt from the log.
        append_producers(&p, &mut producers, 30);
        p.wait_durable(p.log_end_offset() - 1).await.unwrap();
        let end = p.log_end_offset();
        drop(p);
        let newest = producer_state::list_snapshots(&dir).unwrap().remove(0).1;
        let mut bytes = std::fs::read(&newest).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&newest, bytes).unwrap();
        let mut bogus = ProducerStates::default();
        let fake = ProducerBatch {
            producer_id: 10,
            epoch: 9,
            first_sequence: 0,
            last_sequence: 0,
            timestamp_ms: now_ms(),
        };
        bogus.replay(&fake, end + 50, end + 50);
        let past_end = end + 100;
        producer_state::write_snapshot(&dir, past_end, &bogus.encode_snapshot(past_end)).unwrap();
        let (p, _) = Partition::open(dir.clone(), cfg.clone(), shard.clone()).await.unwrap();
        let left = snapshot_offsets(&dir);
        assert!(!left.contains(&past_end), "{left:?}");
        assert!(!newest.exists(), "the damaged snapshot is removed");
        assert_producers_known(&p, &producers);
        p.close().await.unwrap();
    });
}

#[test]
fn a_snapshot_inside_a_segment_is_replayed_from_its_offset() {
    run(|| async {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("p");
        let shard = ShardStorage::new(tmp.path().to_path_buf(), 0, 0);
        let cfg = config(1 << 20, Durability::Written);
        let (p, _) = Partition::open(dir.clone(), cfg.clone(), shard.clone()).await.unwrap();
        let mut producers = test_producers(1..2);
        append_producers(&p, &mut producers, 30);
        let closed_at = p.log_end_offset();
        p.close().await.unwrap();
        assert_eq!(snapshot_offsets(&dir), vec![closed_at]);

        let (p, _) = Partition::open(dir.clone(), cfg.clone(), shard.clone()).await.unwrap();
        producers.extend(test_producers(2..3));
        append_producers(&p, &mut producers, 30);
        p.wait_durable(p.log_end_offset() - 1).await.unwrap();
        drop(p);
        assert_eq!(log_files(&dir).len(), 1, "one segment: the snapshot is inside it");
        let (p, _) = Partition::open(dir.clone(), cfg.clone(), shard.clone()).await.unwrap();
        assert_producers_known(&p, &producers);
        p.close().await.unwrap();

        // The snapshot the clean shutdown promised is gone (an older version's empty marker
        // promises nothing either): the log is replayed from its start, every producer known.
        for (_, path) in producer_state::list_snapshots(&dir).unwrap() {
            std::fs::remove_file(path).unwrap();
        }
        let (p, report) = Partition::open(dir.clone(), cfg.clone(), shard.clone()).await.unwrap();
        assert!(report.clean_shutdown);
        assert_producers_known(&p, &producers);
        p.close().await.unwrap();

        // Without producers a clean shutdown writes no snapshot, only the promise that there is
        // no state, and the reopen reads nothing more.
        let plain = tmp.path().join("q");
        let (q, _) = Partition::open(plain.clone(), cfg.clone(), shard.clone()).await.unwrap();
        append_many(&q, 10, |i| i as i64);
        q.close().await.unwrap();
        assert_eq!(snapshot_offsets(&plain), Vec::<i64>::new());
        assert!(plain.join(format!("{CLEAN_SHUTDOWN_MARKER}.no-producers")).exists());
        let (q, report) = Partition::open(plain.clone(), cfg, shard).await.unwrap();
        assert!(report.clean_shutdown, "{report}");
        assert_eq!(q.log_end_offset(), (0..10).map(|i| i % 3 + 1).sum::<i64>());
        q.close().await.unwrap();
    });
}

#[test]
fn a_torn_tail_takes_its_batches_out_of_the_producer_state() {
    run(|| async {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("p");
        let shard = ShardStorage::new(tmp.path().to_path_buf(), 0, 0);
        let cfg = config(1 << 20, Durability::Written);
        let (p, _) = Partition::open(dir.clone(), cfg.clone(), shard.clone()).await.unwrap();
        let sent: Vec<Vec<u8>> = (0..10).map(|i| idempotent(1, 0, i, 1)).collect();
        for (i, b) in sent.iter().enumerate() {
            assert_eq!(append_bytes(&p, b).unwrap(), (i as i64, i as i64));
        }
        p.wait_durable(9).await.unwrap();
        drop(p);
        let last_pos: usize = sent[..9].iter().map(Vec::len).sum();
        let path = log_files(&dir).pop().unwrap();
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.seek(SeekFrom::Start((last_pos + sent[9].len() - 5) as u64)).unwrap();
        f.write_all(&[0xff; 3]).unwrap();
        drop(f);

        let (p, report) = Partition::open(dir.clone(), cfg, shard).await.unwrap();
        assert_eq!(report.torn_tails.len(), 1, "{report}");
        assert_eq!(p.log_end_offset(), 9);
        // The torn batch is new again: written, not answered from stale state.
        assert_eq!(append_bytes(&p, &sent[9]).unwrap(), (9, 9));
        assert_eq!(p.log_end_offset(), 10);
        assert_eq!(append_bytes(&p, &sent[8]).unwrap(), (8, 8), "the kept batches are still retries");
        assert_eq!(append_bytes(&p, &sent[9]).unwrap(), (9, 9));
        assert_eq!(p.log_end_offset(), 10);
        p.wait_durable(9).await.unwrap();
        assert_eq!(read_all(&p, 0, 1 << 20).await.len(), 10);
        p.close().await.unwrap();
    });
}

#[test]
fn truncate_to_takes_cut_batches_out_of_the_producer_state() {
    run(|| async {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("p");
        let shard = ShardStorage::new(tmp.path().to_path_buf(), 1 << 20, 0);
        let cfg = config(4096, Durability::Written);
        let (p, _) = Partition::open(dir.clone(), cfg.clone(), shard.clone()).await.unwrap();
        let sent: Vec<Vec<u8>> = (0..150).map(|i| idempotent(1, 0, 2 * i, 2)).collect();
        for (i, b) in sent.iter().enumerate() {
            assert_eq!(append_bytes(&p, b).unwrap().0, 2 * i as i64);
        }
        // Producer 2 appears only past the cut.
        assert_eq!(append_bytes(&p, &idempotent(2, 4, 7, 1)).unwrap(), (300, 300));
        p.wait_durable(300).await.unwrap();
        assert!(snapshot_offsets(&dir)[0] > 200, "snapshots past the cut exist before it");

        p.truncate_to(201).await.unwrap();
        assert_eq!(p.log_end_offset(), 200);
        assert!(snapshot_offsets(&dir).iter().all(|&s| s <= 200), "{:?}", snapshot_offsets(&dir));
        assert_eq!(append_bytes(&p, &sent[99]).unwrap(), (198, 199), "kept batches are retries");
        assert_eq!(p.log_end_offset(), 200);
        assert_eq!(append_bytes(&p, &sent[100]).unwrap(), (200, 201), "cut batches are new");
        assert_eq!(p.log_end_offset(), 202);
        // Producer 2 is unknown again: any epoch and sequence.
        assert_eq!(append_bytes(&p, &idempotent(2, 1, 3, 1)).unwrap(), (202, 202));
        p.wait_durable(202).await.unwrap();
        p.close().await.unwrap();

        let (p, _) = Partition::open(dir, cfg, shard).await.unwrap();
        assert_eq!(append_bytes(&p, &sent[100]).unwrap(), (200, 201));
        assert!(matches!(
            append_bytes(&p, &idempotent(2, 0, 4, 1)),
            Err(StorageError::ProducerFenced { current_epoch: 1, .. })
        ));
        p.close().await.unwrap();
    });
}

/// More partitions than the shard keeps files open for, under both durability policies: each is
/// written, released while idle (synced, cut to its size, closed), written again through a
/// reopen, read back from disk, closed and reopened; the shard's open set stays at its bound
/// (descriptors are counted per process by tests/many_partitions.rs, not here: tests share it).
#[test]
fn idle_partitions_release_their_files_and_reopen_on_use() {
    run(|| async {
        for durability in [Durability::Fsync, Durability::Written] {
            let tmp = tempfile::tempdir().unwrap();
            // No tail cache: reads go to the files.
            let shard = ShardStorage::new(tmp.path().to_path_buf(), 0, 0);
            shard.set_active_files_max(16);
            let partitions: Vec<_> = open_partitions(tmp.path(), &shard, 60, durability)
                .await
                .into_iter()
                .map(|(p, _)| p)
                .collect();
            assert_eq!(shard.active_files(), 0, "open partitions hold no file before use");
            let mut expected: Vec<Vec<Vec<u8>>> = Vec::new();
            for round in 0..2 {
                for p in &partitions {
                    expected.push(append_many(p, 3, |i| (round * 10 + i) as i64));
                    p.wait_durable(p.log_end_offset() - 1).await.unwrap();
                }
                // Let the releases' syncs and closes finish.
                glommio::timer::sleep(std::time::Duration::from_millis(200)).await;
                assert!(shard.active_files() <= 17, "{} active files open", shard.active_files());
            }
            for (i, p) in partitions.iter().enumerate() {
                let mut want = expected[i].clone();
                want.extend(expected[partitions.len() + i].clone());
                assert_eq!(read_all(p, 0, 1 << 20).await, want, "partition {i}");
            }
            // A released file keeps no space reserved past its end.
            let first = tmp.path().join("t/0").join("00000000000000000000.log");
            let size: usize = expected[0].iter().chain(&expected[60]).map(Vec::len).sum();
            assert_eq!(std::fs::metadata(&first).unwrap().len(), size as u64);
            for p in &partitions {
                p.close().await.unwrap();
            }
            for (i, _) in partitions.iter().enumerate() {
                let dir = tmp.path().join(format!("t/{i}"));
                let (p, report) =
                    Partition::open(dir, config(1 << 20, durability), shard.clone()).await.unwrap();
                assert!(report.clean_shutdown && report.torn_tails.is_empty(), "{report}");
                let mut want = expected[i].clone();
                want.extend(expected[partitions.len() + i].clone());
                assert_eq!(read_all(&p, 0, 1 << 20).await, want, "partition {i} reopened");
                p.close().await.unwrap();
            }
        }
    });
}

fn replica_config() -> LogConfig {
    LogConfig { visibility: crate::storage::Visibility::Committed, ..config(4096, Durability::Fsync) }
}

#[test]
fn committed_visibility_shows_only_what_consensus_committed_and_never_cuts_it() {
    run(|| async {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("r/0");
        let shard = ShardStorage::new(tmp.path().to_path_buf(), 1 << 20, 0);
        let (p, _) = Partition::open(dir.clone(), replica_config(), shard.clone()).await.unwrap();
        let expected = append_many(&p, 40, |i| 1000 + i as i64);
        p.wait_durable(p.log_end_offset() - 1).await.unwrap();
        assert_eq!(p.durable_end_offset(), p.log_end_offset());
        assert_eq!(p.high_watermark(), 0, "durable is not visible until committed");
        assert!(p.read(0, 1 << 20).await.unwrap().chunks.is_empty());

        let tenth_end = BatchHeader::parse(&expected[9]).unwrap().last_offset() + 1;
        p.commit_to(tenth_end);
        assert_eq!(p.high_watermark(), tenth_end);
        assert_eq!(read_all(&p, 0, 1 << 20).await, expected[..10]);
        p.commit_to(3);
        assert_eq!(p.high_watermark(), tenth_end, "the high watermark never goes back");

        match p.truncate_to(tenth_end - 1).await {
            Err(StorageError::TruncatingCommitted { offset, high_watermark }) => {
                assert_eq!((offset, high_watermark), (tenth_end - 1, tenth_end));
            }
            other => panic!("cutting committed offsets: {other:?}"),
        }
        assert_eq!(p.log_end_offset(), BatchHeader::parse(&expected[39]).unwrap().last_offset() + 1);
        // The uncommitted suffix goes, durable end with it.
        let twentieth_end = BatchHeader::parse(&expected[19]).unwrap().last_offset() + 1;
        p.truncate_to(twentieth_end).await.unwrap();
        assert_eq!((p.log_end_offset(), p.durable_end_offset()), (twentieth_end, twentieth_end));
        p.close().await.unwrap();

        // After a restart nothing is visible until consensus says so again.
        let (p, _) = Partition::open(dir, replica_config(), shard).await.unwrap();
        assert_eq!((p.high_watermark(), p.durable_end_offset()), (0, twentieth_end));
        p.commit_to(twentieth_end);
        assert_eq!(read_all(&p, 0, 1 << 20).await, expected[..20]);
        p.close().await.unwrap();
    });
}

#[test]
fn a_replica_keeps_its_leaders_offsets_epochs_and_producers() {
    run(|| async {
        let tmp = tempfile::tempdir().unwrap();
        let shard = ShardStorage::new(tmp.path().to_path_buf(), 1 << 20, 0);
        let (leader, _) =
            Partition::open(tmp.path().join("l"), config(4096, Durability::Fsync), shard.clone())
                .await
                .unwrap();
        let mut sent = Vec::new();
        for i in 0..30 {
            let bytes = match i % 3 {
                0 => idempotent(7, 0, i / 3 * 2, 2),
                _ => batch(-1, 3, 1000 + i64::from(i), 20),
            };
            leader.append(BytesMut::from(&bytes[..])).unwrap();
        }
        leader.wait_durable(leader.log_end_offset() - 1).await.unwrap();
        for (epoch, mut b) in read_all(&leader, 0, 1 << 20).await.into_iter().enumerate() {
            // The leader epoch is outside the crc: a leader stamps it without recomputing.
            crate::record::set_partition_leader_epoch(&mut b, epoch as i32 / 10 + 1);
            sent.push(b);
        }

        let dir = tmp.path().join("f");
        let (follower, _) = Partition::open(dir.clone(), replica_config(), shard.clone()).await.unwrap();
        // A batch that does not continue the log is refused and changes nothing.
        match follower.append_replicated(Bytes::copy_from_slice(&sent[1])) {
            Err(StorageError::OffsetMismatch { index: 0, expected: 0, found }) => assert_eq!(found, 2),
            other => panic!("a gap was accepted: {other:?}"),
        }
        assert_eq!(follower.log_end_offset(), 0);
        for group in sent.chunks(4) {
            let r = follower.append_replicated(Bytes::from(group.concat())).unwrap();
            assert_eq!(r.base_offset, BatchHeader::parse(&group[0]).unwrap().base_offset);
            assert!(!r.duplicate);
        }
        assert_eq!(follower.log_end_offset(), leader.log_end_offset());
        follower.wait_durable(follower.log_end_offset() - 1).await.unwrap();
        follower.commit_to(follower.durable_end_offset());
        assert_eq!(read_all(&follower, 0, 1 << 20).await, sent, "the same bytes, epochs included");

        // Should this replica lead, it knows the producer: a retry of its last batch is answered
        // with the original offsets, and the next sequence continues.
        let last = idempotent(7, 0, 18, 2);
        let retried = follower.append(BytesMut::from(&last[..])).unwrap();
        assert!(retried.duplicate);
        assert_eq!(retried.base_offset, BatchHeader::parse(&sent[27]).unwrap().base_offset);
        let next = follower.append(BytesMut::from(&idempotent(7, 0, 20, 1)[..])).unwrap();
        assert_eq!(next.base_offset, leader.log_end_offset());
        drop(follower);

        // A crash keeps what was durable, epochs and all.
        let (follower, _) = Partition::open(dir, replica_config(), shard).await.unwrap();
        follower.commit_to(leader.log_end_offset());
        assert_eq!(read_all(&follower, 0, 1 << 20).await, sent);
        follower.close().await.unwrap();
        leader.close().await.unwrap();
    });
}

/// `b` with the control attribute set (crc recomputed).
fn as_control(mut b: Vec<u8>) -> Vec<u8> {
    let attributes = i16::from_be_bytes([b[21], b[22]]) | crate::record::CONTROL_FLAG;
    b[21..23].copy_from_slice(&attributes.to_be_bytes());
    let crc = crc32c::crc32c(&b[21..]);
    b[17..21].copy_from_slice(&crc.to_be_bytes());
    b
}

#[test]
fn a_replica_keeps_its_leaders_control_batches() {
    run(|| async {
        let tmp = tempfile::tempdir().unwrap();
        let shard = ShardStorage::new(tmp.path().to_path_buf(), 1 << 20, 0);
        let (r, _) = Partition::open(tmp.path().join("r"), replica_config(), shard).await.unwrap();
        let marker = as_control(batch(0, 1, 2, 4));
        assert!(BatchHeader::parse(&marker).unwrap().is_control());
        r.append_replicated(Bytes::copy_from_slice(&marker)).unwrap();
        r.wait_durable(0).await.unwrap();
        r.commit_to(1);
        assert_eq!(read_all(&r, 0, 1 << 20).await, vec![marker]);
        r.close().await.unwrap();
    });
}

#[test]
fn a_replica_log_restarted_at_an_offset_holds_nothing_before_it_and_reopens_there() {
    run(|| async {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("r/0");
        let shard = ShardStorage::new(tmp.path().to_path_buf(), 1 << 20, 0);
        let (p, _) = Partition::open(dir.clone(), replica_config(), shard.clone()).await.unwrap();
        append_many(&p, 40, |i| 1000 + i as i64);
        p.append(BytesMut::from(&idempotent(7, 0, 0, 2)[..])).unwrap();
        p.wait_durable(p.log_end_offset() - 1).await.unwrap();
        p.commit_to(10);
        let files = |dir: &Path| {
            let mut names: Vec<String> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| !n.starts_with('.'))
                .collect();
            names.sort();
            names
        };
        assert!(files(&dir).len() > 3, "{:?}", files(&dir));

        // Past the log end, as a follower behind its leader's log start restarts.
        let start = p.log_end_offset() + 500;
        p.restart_at(start, ProducerStates::default()).await.unwrap();
        assert_eq!(files(&dir), vec![format!("{start:020}.log")]);
        assert_eq!(
            (p.log_start_offset(), p.log_end_offset(), p.durable_end_offset(), p.high_watermark()),
            (start, start, start, start)
        );
        assert!(p.read(start, 1 << 20).await.unwrap().chunks.is_empty());
        // The producer state went with the log: the producer's next batch is a new producer's.
        let fresh = p.append(BytesMut::from(&idempotent(7, 0, 2, 1)[..])).unwrap();
        assert!(!fresh.duplicate);
        assert_eq!(fresh.base_offset, start);
        let sent = batch(start + 1, 3, 5000, 20);
        p.append_replicated(Bytes::copy_from_slice(&sent)).unwrap();
        p.wait_durable(start + 3).await.unwrap();
        p.commit_to(start + 4);
        assert_eq!(read_all(&p, start + 1, 1 << 20).await, vec![sent.clone()]);
        drop(p);

        // A crash keeps the new start; restarting again at the same offset is harmless.
        let (p, _) = Partition::open(dir.clone(), replica_config(), shard.clone()).await.unwrap();
        assert_eq!((p.log_start_offset(), p.log_end_offset()), (start, start + 4));
        p.commit_to(start + 4);
        assert_eq!(read_all(&p, start + 1, 1 << 20).await, vec![sent]);
        p.restart_at(start, ProducerStates::default()).await.unwrap();
        assert_eq!((p.log_start_offset(), p.log_end_offset()), (start, start));
        p.close().await.unwrap();
    });
}
