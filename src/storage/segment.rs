//! One segment of a partition log: its files, in-memory index and positions, and the recovery
//! scan over its log file.
//!
//! Owns: file naming (`<base_offset:020>.log/.index/.timeindex`), opening the glommio `DmaFile`
//! lazily, persisting and loading the indexes, and driving `scan::scan_batches` over aligned
//! O_DIRECT reads. Depends on `index`, `scan`, `record`, glommio. Does not decide when to roll,
//! write or delete: `partition` does.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use glommio::io::{DmaFile, OpenOptions, ReadResult};

use super::index::{Coverage, IndexEntry, SegmentIndex, SegmentSummary};
use super::notify::Notify;
use super::scan::{scan_batches, ScanEnd};
use super::StorageError;

/// Alignment of every O_DIRECT write and read position (covers 512 and 4096-byte devices).
pub(crate) const ALIGN: u64 = 4096;
/// Bytes read per step of a recovery scan.
const SCAN_WINDOW_BYTES: u64 = 256 * 1024;

pub(crate) fn align_down(v: u64) -> u64 {
    v & !(ALIGN - 1)
}

pub(crate) fn align_up(v: u64) -> u64 {
    align_down(v + ALIGN - 1)
}

pub(crate) fn log_path(dir: &Path, base_offset: i64) -> PathBuf {
    dir.join(format!("{base_offset:020}.log"))
}

/// O_DIRECT read of up to `len` bytes at `pos` (both aligned) through the shard's io_uring;
/// shorter at the end of the file. Every storage read goes through here.
pub(crate) async fn read_aligned(file: &DmaFile, pos: u64, len: usize) -> std::io::Result<ReadResult> {
    debug_assert!(pos % ALIGN == 0 && len as u64 % ALIGN == 0, "unaligned O_DIRECT read");
    file.read_at_aligned(pos, len).await.map_err(std::io::Error::from)
}

thread_local! {
    /// Devices (st_dev) whose io_uring poll-ring support this thread's glommio has probed.
    static PROBED_DEVICES: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

/// Makes glommio's per-thread, per-device poll-ring probe see a real device read.
///
/// glommio decides whether O_DIRECT reads of a device go to its IOPOLL ring by reading the first
/// block of the first DMA file opened on that device. When that file is new and empty, the read
/// ends at EOF without reaching the device, the device is wrongly marked pollable, and every later
/// read fails with EOPNOTSUPP on devices without poll queues (virtio, most SATA; glommio issue
/// #605). Opening a file that holds a block of data first makes the probe honest.
pub(crate) async fn probe_device(dir: &Path) -> Result<(), StorageError> {
    use std::os::unix::fs::MetadataExt;
    let dev =
        std::fs::metadata(dir).map_err(|e| StorageError::io(format!("stat {}", dir.display()), e))?.dev();
    if PROBED_DEVICES.with(|p| p.borrow().contains(&dev)) {
        return Ok(());
    }
    let path = dir.join(format!(".io-probe-{:?}", std::thread::current().id()).replace(['(', ')'], ""));
    let io = |e| StorageError::io(format!("device probe file {}", path.display()), e);
    std::fs::write(&path, vec![0xa5u8; ALIGN as usize]).map_err(io)?;
    let opened = DmaFile::open(&path).await;
    let _ = std::fs::remove_file(&path);
    let file = opened.map_err(|e| io(std::io::Error::from(e)))?;
    let _ = file.close().await;
    PROBED_DEVICES.with(|p| p.borrow_mut().push(dev));
    Ok(())
}

/// Parses `<base_offset:020>.log`.
pub(crate) fn parse_log_name(name: &str) -> Option<i64> {
    let stem = name.strip_suffix(".log")?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

/// Positions and index of a segment; mutated by appends, the flusher and recovery.
pub(crate) struct SegmentMeta {
    /// End of the bytes accepted by `append` (the logical size).
    pub size_bytes: u64,
    /// End of the bytes a completed write put on disk.
    pub written_bytes: u64,
    /// End of the bytes that satisfy the durability policy: readers stop here.
    pub durable_bytes: u64,
    /// Offset the next batch appended to this segment gets.
    pub next_offset: i64,
    pub index: SegmentIndex,
    /// File size reserved by fallocate (only meaningful for the active segment).
    pub preallocated_bytes: u64,
    /// A background fallocate of this file is in flight; nothing may truncate the file until it
    /// ends (it would grow the file again).
    pub preallocating: bool,
    /// No more appends; its final size is set (the flusher truncates the file to it).
    pub sealed: bool,
    /// The seal finished: file synced and cut to size, indexes on disk. Only such segments may be
    /// deleted by retention (a seal in progress would otherwise write files of a deleted segment).
    pub final_on_disk: bool,
    /// Wall-clock time of the first append (or of recovery), for rolling by age.
    pub first_append_ms: Option<i64>,
}

pub(crate) struct Segment {
    pub base_offset: i64,
    pub log_path: PathBuf,
    file: RefCell<Option<Rc<DmaFile>>>,
    pub meta: RefCell<SegmentMeta>,
    /// Woken when a background fallocate ends.
    pub preallocation_idle: Notify,
}

impl Segment {
    pub fn new(dir: &Path, base_offset: i64, index_interval_bytes: u32) -> Segment {
        Segment {
            base_offset,
            log_path: log_path(dir, base_offset),
            file: RefCell::new(None),
            preallocation_idle: Notify::default(),
            meta: RefCell::new(SegmentMeta {
                size_bytes: 0,
                written_bytes: 0,
                durable_bytes: 0,
                next_offset: base_offset,
                index: SegmentIndex::new(index_interval_bytes),
                preallocated_bytes: 0,
                preallocating: false,
                sealed: false,
                final_on_disk: false,
                first_append_ms: None,
            }),
        }
    }

    pub fn index_path(&self) -> PathBuf {
        self.log_path.with_extension("index")
    }

    pub fn time_index_path(&self) -> PathBuf {
        self.log_path.with_extension("timeindex")
    }

    /// Resolves once no background fallocate of this file is in flight.
    pub async fn wait_preallocation_idle(&self) {
        loop {
            let idle = self.preallocation_idle.notified();
            if !self.meta.borrow().preallocating {
                return;
            }
            idle.await;
        }
    }

    /// The segment's DmaFile, opened read-write on first use.
    pub async fn file(&self) -> Result<Rc<DmaFile>, StorageError> {
        if let Some(f) = self.file.borrow().as_ref() {
            return Ok(f.clone());
        }
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .dma_open(&self.log_path)
            .await
            .map_err(|e| StorageError::io(format!("opening {}", self.log_path.display()), e))?;
        // Another task may have opened it while we awaited; keep the first.
        let mut slot = self.file.borrow_mut();
        Ok(slot.get_or_insert_with(|| Rc::new(opened)).clone())
    }

    /// Hands over the open file (on close), leaving the segment without one.
    pub fn take_file(&self) -> Option<Rc<DmaFile>> {
        self.file.borrow_mut().take()
    }

    /// The segment's DmaFile if it is open; never opens it.
    pub fn open_file(&self) -> Option<Rc<DmaFile>> {
        self.file.borrow().clone()
    }

    /// Closes the segment's file if it is open. A reader still holding it keeps it until done;
    /// the descriptor goes with the last holder.
    pub async fn close_file(&self) {
        if let Some(file) = self.take_file().and_then(|f| Rc::try_unwrap(f).ok()) {
            if let Err(e) = file.close().await {
                tracing::warn!(path = %self.log_path.display(), error = %e, "closing a segment file failed");
            }
        }
    }

    /// Both index files as they should be written now; `IndexFiles::write` may run off the shard.
    pub fn encoded_indexes(&self) -> IndexFiles {
        let meta = self.meta.borrow();
        let summary = SegmentSummary {
            base_offset: self.base_offset,
            log_bytes: meta.size_bytes,
            next_offset: meta.next_offset,
            max_timestamp_ms: meta.index.max_timestamp_ms(),
        };
        IndexFiles {
            offsets: (self.index_path(), meta.index.encode_offsets(&summary)),
            times: (self.time_index_path(), meta.index.encode_times(self.base_offset)),
        }
    }

    /// Index files describing only the first `log_bytes` of the log, which end where offset
    /// `next_offset` starts: a checkpoint of the active segment for recovery.
    pub fn encoded_checkpoint(&self, log_bytes: u64, next_offset: i64) -> IndexFiles {
        let meta = self.meta.borrow();
        let index = meta.index.prefix(log_bytes, (next_offset - self.base_offset) as u32);
        let summary = SegmentSummary {
            base_offset: self.base_offset,
            log_bytes,
            next_offset,
            max_timestamp_ms: index.max_timestamp_ms(),
        };
        IndexFiles {
            offsets: (self.index_path(), index.encode_offsets(&summary)),
            times: (self.time_index_path(), index.encode_times(self.base_offset)),
        }
    }

    /// Writes both index files (small, rebuildable, crc-protected: no fsync needed).
    pub fn persist_indexes(&self) -> Result<(), StorageError> {
        self.encoded_indexes().write()
    }

    /// The segment's files, indexes first: a crash while removing them in this order leaves a log
    /// without indexes, which recovery rebuilds, never an index without its log.
    pub fn file_paths_for_removal(&self) -> [PathBuf; 3] {
        [self.index_path(), self.time_index_path(), self.log_path.clone()]
    }

    /// Removes index files that would go stale (the segment changes again). Missing is fine.
    pub fn remove_index_files(&self) {
        for path in [self.index_path(), self.time_index_path()] {
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove a stale index file");
                }
            }
        }
    }

    /// Loads persisted indexes if present and consistent with a log file of `log_bytes`: covering
    /// all of it (`Coverage::Exact`), or a prefix of it (`Coverage::Prefix`, a checkpoint of the
    /// active segment).
    pub fn load_indexes(
        &self,
        log_bytes: u64,
        interval_bytes: u32,
        coverage: Coverage,
    ) -> Result<(SegmentIndex, SegmentSummary), String> {
        let offsets = std::fs::read(self.index_path()).map_err(|e| e.to_string())?;
        let times = std::fs::read(self.time_index_path()).map_err(|e| e.to_string())?;
        SegmentIndex::decode(&offsets, &times, self.base_offset, log_bytes, interval_bytes, coverage)
    }
}

/// Encoded index files of one segment: owned bytes, so they can be written on another thread.
pub(crate) struct IndexFiles {
    offsets: (PathBuf, Vec<u8>),
    times: (PathBuf, Vec<u8>),
}

impl IndexFiles {
    /// Overwrites both files in place. Not truncated first: an active segment's index only grows
    /// between writes, and freeing its blocks to allocate them again costs milliseconds an index
    /// on ext4 mounted with `discard` (what made a clean stop of 10,000 partitions take 7 s). A
    /// crash part way leaves a file whose crc fails, which recovery rebuilds by scanning.
    pub fn write(&self) -> Result<(), StorageError> {
        use std::io::Write;
        for (path, bytes) in [&self.offsets, &self.times] {
            let written =
                std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(path).and_then(
                    |mut file| {
                        file.write_all(bytes)?;
                        // Only what a shorter index leaves at the end is cut (after a truncation).
                        if file.metadata()?.len() > bytes.len() as u64 {
                            file.set_len(bytes.len() as u64)?;
                        }
                        Ok(())
                    },
                );
            written.map_err(|e| StorageError::io(format!("writing {}", path.display()), e))?;
        }
        Ok(())
    }
}

/// Result of scanning a segment file from its start.
pub(crate) struct ScannedSegment {
    pub index: SegmentIndex,
    pub valid_bytes: u64,
    pub next_offset: i64,
    /// Set when the scan stopped at damage rather than at the end of the data: (position, detail).
    pub damage: Option<(u64, String)>,
}

/// Scans the log file of the segment at `base_offset`, `file_bytes` long, batch by batch.
pub(crate) async fn scan_segment_file(
    file: &DmaFile,
    path: &Path,
    base_offset: i64,
    file_bytes: u64,
    interval_bytes: u32,
    batch_bytes_max: usize,
) -> Result<ScannedSegment, StorageError> {
    let index = SegmentIndex::new(interval_bytes);
    let start = IndexEntry { relative_offset: 0, position: 0 };
    scan_segment_file_from(file, path, base_offset, file_bytes, index, start, batch_bytes_max).await
}

/// Scans as `scan_segment_file` does, from the batch at `start` on: `index` already holds the
/// entries below it (a checkpoint), the scan adds the rest.
pub(crate) async fn scan_segment_file_from(
    file: &DmaFile,
    path: &Path,
    base_offset: i64,
    file_bytes: u64,
    mut index: SegmentIndex,
    start: IndexEntry,
    batch_bytes_max: usize,
) -> Result<ScannedSegment, StorageError> {
    let mut position = u64::from(start.position);
    let mut next_offset = base_offset + i64::from(start.relative_offset);
    let mut window = SCAN_WINDOW_BYTES;
    loop {
        if position >= file_bytes {
            return Ok(ScannedSegment { index, valid_bytes: position, next_offset, damage: None });
        }
        let read_from = align_down(position);
        let read_len = align_up((position - read_from + window).min(file_bytes - read_from));
        let data = read_aligned(file, read_from, read_len as usize)
            .await
            .map_err(|e| StorageError::io(format!("reading {} at byte {read_from}", path.display()), e))?;
        let skip = (position - read_from) as usize;
        let buf = data.get(skip..).unwrap_or(&[]);
        let at_eof = read_from + data.len() as u64 >= file_bytes;
        let start = position;
        let outcome = scan_batches(buf, next_offset, batch_bytes_max, |p, h| {
            let relative = (h.base_offset - base_offset) as u32;
            index.on_batch(relative, (start + p as u64) as u32, h.total_len() as u32, h.max_timestamp);
        });
        position += outcome.valid_bytes as u64;
        next_offset = outcome.next_offset;
        match outcome.end {
            ScanEnd::Zeroes { .. } => {
                return Ok(ScannedSegment { index, valid_bytes: position, next_offset, damage: None });
            }
            ScanEnd::Invalid { detail, .. } => {
                return Ok(ScannedSegment {
                    index,
                    valid_bytes: position,
                    next_offset,
                    damage: Some((position, detail)),
                });
            }
            ScanEnd::NeedMore { position: p, needed_bytes } => {
                let rest = &buf[p.min(buf.len())..];
                if at_eof {
                    let damage = if rest.iter().all(|b| *b == 0) {
                        None
                    } else {
                        Some((
                            position,
                            format!("incomplete batch: {} of {needed_bytes} bytes present", rest.len()),
                        ))
                    };
                    return Ok(ScannedSegment { index, valid_bytes: position, next_offset, damage });
                }
                // Widen the window when one batch does not fit; otherwise just move on.
                window = window.max(needed_bytes as u64 + ALIGN);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_reject_strangers() {
        let p = log_path(Path::new("/d"), 42);
        assert_eq!(p, PathBuf::from("/d/00000000000000000042.log"));
        assert_eq!(parse_log_name("00000000000000000042.log"), Some(42));
        assert_eq!(parse_log_name("42.log"), None);
        assert_eq!(parse_log_name("0000000000000000004x.log"), None);
        assert_eq!(parse_log_name("00000000000000000042.index"), None);
    }

    #[test]
    fn alignment_helpers() {
        assert_eq!(align_down(4097), 4096);
        assert_eq!(align_up(4097), 8192);
        assert_eq!(align_up(4096), 4096);
        assert_eq!(align_up(0), 0);
    }
}
