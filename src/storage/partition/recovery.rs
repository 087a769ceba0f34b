//! Recovery: the segments found on open (indexes loaded or rebuilt, torn tails cut, segments past
//! an offset gap removed; the active segment scanned only past its checkpoint, and after a clean
//! shutdown only its last block), the active segment's carried partial block, and the producer state
//! rebuilt from the newest usable snapshot plus a replay of the batch headers after it (also after
//! a truncation). Removes snapshots past a cut so they can never look valid again.

use std::path::Path;
use std::rc::Rc;

use super::{now_ms, remove_segment_files, sync_dir, Carry, CLEAN_SHUTDOWN_MARKER, RECOVERY_BATCH_BYTES_MAX};
use crate::storage::blocking;
use crate::storage::index::Coverage;
use crate::storage::producer_state::{self, ProducerBatch, ProducerStates};
use crate::storage::scan::{scan_batches, ScanEnd};
use crate::storage::segment::{align_down, align_up, read_aligned, scan_segment_file_from, Segment, ALIGN};
use crate::storage::{IndexEntry, LogConfig, RecoveryReport, SegmentIndex, StorageError, TornTail};

/// Bytes read per step when replaying batch headers into the producer state.
const REPLAY_WINDOW_BYTES: u64 = 1 << 20;
/// A replay that read more than this leaves a snapshot behind, so the next recovery starts there;
/// a shorter one costs the next recovery less than writing a file per partition now would.
const SNAPSHOT_AFTER_REPLAY_BYTES: u64 = 1 << 20;
/// The promise is in the marker's name, after `CLEAN_SHUTDOWN_MARKER` and a dot; the file is empty.
/// An empty file holds no data block, so removing it at the next open is cheap (freeing a block
/// cost ~3 ms an unlink on ext4 mounted with `discard`), and a name cannot be half written. The
/// bare marker of older versions promises nothing and is treated as no marker.
const MARKER_NO_PRODUCERS: &str = "no-producers";
const MARKER_SNAPSHOT: &str = "snapshot-";

/// What a cleanly closed partition promised, in its clean-shutdown marker, about the producer
/// state at its log end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Promise {
    /// No producer state: recovery starts empty and replays nothing.
    NoProducers,
    /// A snapshot at this offset; recovery loads it (or, if it was lost, replays as after a crash).
    Snapshot(i64),
}

impl Promise {
    /// The clean-shutdown marker's file name.
    pub(super) fn marker_name(self) -> String {
        match self {
            Promise::NoProducers => format!("{CLEAN_SHUTDOWN_MARKER}.{MARKER_NO_PRODUCERS}"),
            Promise::Snapshot(offset) => format!("{CLEAN_SHUTDOWN_MARKER}.{MARKER_SNAPSHOT}{offset}"),
        }
    }

    /// The promise a directory entry named `name` makes, if it is a marker that makes one.
    pub(super) fn from_marker_name(name: &str) -> Option<Promise> {
        let promise = name.strip_prefix(CLEAN_SHUTDOWN_MARKER)?.strip_prefix('.')?;
        if promise == MARKER_NO_PRODUCERS {
            return Some(Promise::NoProducers);
        }
        promise.strip_prefix(MARKER_SNAPSHOT)?.parse().ok().map(Promise::Snapshot)
    }
}

/// Fills `carry` with the bytes of the partial block below `size` (the next write rewrites it).
pub(super) async fn read_carry(seg: &Segment, size: u64, carry: &mut Carry) -> Result<(), StorageError> {
    carry.file_pos = align_down(size);
    carry.bytes.clear();
    let partial = (size - carry.file_pos) as usize;
    if partial == 0 {
        return Ok(());
    }
    let file = seg.file().await?;
    let block = read_aligned(&file, carry.file_pos, ALIGN as usize).await.map_err(|e| {
        StorageError::io(format!("reading {} at byte {}", seg.log_path.display(), carry.file_pos), e)
    })?;
    if block.len() < partial {
        return Err(StorageError::Corrupt {
            segment: seg.log_path.clone(),
            position: carry.file_pos,
            detail: format!("file shorter than its recovered size {size}"),
        });
    }
    carry.bytes.extend_from_slice(&block[..partial]);
    Ok(())
}

/// Removes the producer-state snapshots past `offset` and makes the removal durable.
pub(super) fn remove_snapshots_after(dir: &Path, offset: i64) -> Result<(), StorageError> {
    let snapshots = producer_state::list_snapshots(dir)
        .map_err(|e| StorageError::io(format!("listing producer-state snapshots in {}", dir.display()), e))?;
    let mut removed = false;
    for (_, path) in snapshots.iter().filter(|(at, _)| *at > offset) {
        std::fs::remove_file(path)
            .map_err(|e| StorageError::io(format!("removing {}", path.display()), e))?;
        removed = true;
    }
    if removed {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Rebuilds the producer state of a log holding `log_start..log_end` in `segments`: the newest
/// usable snapshot, then the batch headers after it. Snapshots past `log_end` (they describe
/// batches the log no longer holds) and damaged ones are removed, each with a log line. A clean
/// shutdown that promised no producer state (`Promise::NoProducers`) costs nothing.
pub(super) async fn recover_producer_state(
    dir: &Path,
    segments: &[Rc<Segment>],
    log_start: i64,
    log_end: i64,
    promise: Option<Promise>,
) -> Result<ProducerStates, StorageError> {
    if promise == Some(Promise::NoProducers) {
        return Ok(ProducerStates::default());
    }
    let listing = |e| StorageError::io(format!("listing producer-state snapshots in {}", dir.display()), e);
    producer_state::remove_temporary_snapshots(dir).map_err(listing)?;
    let snapshots = producer_state::list_snapshots(dir).map_err(listing)?;
    let found = snapshots.len();
    let mut loaded: Option<(i64, ProducerStates)> = None;
    let mut removed = false;
    for (offset, path) in snapshots {
        let unusable = if offset > log_end {
            format!("it is past the log end offset {log_end}")
        } else {
            let decoded = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|bytes| ProducerStates::decode_snapshot(&bytes).map_err(|e| e.to_string()));
            match decoded {
                Ok((at, states)) if at == offset => {
                    loaded = Some((offset, states));
                    break;
                }
                Ok((at, _)) => format!("it holds the state at offset {at}, not at {offset} as named"),
                Err(e) => e,
            }
        };
        tracing::warn!(snapshot = %path.display(), "removing an unusable producer-state snapshot: {unusable}");
        std::fs::remove_file(&path)
            .map_err(|e| StorageError::io(format!("removing {}", path.display()), e))?;
        removed = true;
    }
    if removed {
        sync_dir(dir)?;
    }
    let snapshot_offset = loaded.as_ref().map(|(offset, _)| *offset);
    let (mut states, from) = match loaded {
        Some((offset, states)) => (states, offset.max(log_start)),
        None => {
            if log_end > log_start {
                tracing::debug!(dir = %dir.display(), log_start, log_end, found,
                    "no usable producer-state snapshot: rebuilding it by scanning the whole log");
            }
            (ProducerStates::default(), log_start)
        }
    };
    let (replayed, replayed_bytes) = replay_producer_batches(segments, from, log_end, &mut states).await?;
    let worth_keeping = !states.is_empty() || replayed_bytes > SNAPSHOT_AFTER_REPLAY_BYTES;
    if snapshot_offset.is_none() && log_end > log_start && worth_keeping {
        // Spares the next recovery this scan. Safe even if the batches below `log_end` are not
        // synced yet: should a power loss take them, the snapshot is past the log end and goes.
        // Not synced: one lost to a crash only means the next recovery scans again.
        let bytes = states.encode_snapshot(log_end);
        let target = dir.to_path_buf();
        let written = blocking::run(move || {
            producer_state::write_snapshot_unsynced(&target, log_end, &bytes).map_err(|e| {
                StorageError::io(format!("writing a producer-state snapshot in {}", target.display()), e)
            })
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("{e}; the next recovery scans again"),
            Err(panic) => tracing::warn!(dir = %dir.display(), "writing a producer-state snapshot: {panic}"),
        }
    }
    if from < log_end || !states.is_empty() {
        tracing::debug!(
            dir = %dir.display(),
            snapshot = ?snapshot_offset,
            scanned_from = from,
            scanned_to = log_end,
            idempotent_batches = replayed,
            producers = states.len(),
            "producer state recovered"
        );
    }
    Ok(states)
}

/// Replays the idempotent batches with base offsets in `from..to` (`from` a batch boundary) into
/// `states`, reading only the segments that hold them. Returns how many were replayed and the
/// bytes read. Damage
/// stops the segment's replay with a warning (reads of those offsets report it themselves).
async fn replay_producer_batches(
    segments: &[Rc<Segment>],
    from: i64,
    to: i64,
    states: &mut ProducerStates,
) -> Result<(u64, u64), StorageError> {
    let mut replayed = 0u64;
    let mut bytes_read = 0u64;
    for seg in segments {
        let (size_bytes, start) = {
            let meta = seg.meta.borrow();
            if meta.next_offset <= from || seg.base_offset >= to {
                continue;
            }
            let start = match u32::try_from(from - seg.base_offset) {
                Ok(relative) if relative > 0 => meta.index.lookup(relative),
                _ => IndexEntry { relative_offset: 0, position: 0 },
            };
            (meta.size_bytes, start)
        };
        let file = seg.file().await?;
        let mut position = u64::from(start.position);
        let mut expected = seg.base_offset + i64::from(start.relative_offset);
        let mut window = REPLAY_WINDOW_BYTES;
        while position < size_bytes {
            let read_from = align_down(position);
            let read_to = align_up((position + window).min(size_bytes));
            let data = read_aligned(&file, read_from, (read_to - read_from) as usize).await.map_err(|e| {
                StorageError::io(format!("reading {} at byte {read_from}", seg.log_path.display()), e)
            })?;
            let end = ((size_bytes - read_from) as usize).min(data.len());
            let buf = data.get((position - read_from) as usize..end).unwrap_or(&[]);
            let outcome = scan_batches(buf, expected, RECOVERY_BATCH_BYTES_MAX, |_, h| {
                if (from..to).contains(&h.base_offset) {
                    if let Some(batch) = ProducerBatch::of(h) {
                        states.replay(&batch, h.base_offset, h.last_offset());
                        replayed += 1;
                    }
                }
            });
            bytes_read += data.len() as u64;
            position += outcome.valid_bytes as u64;
            expected = outcome.next_offset;
            let stopped = match outcome.end {
                ScanEnd::NeedMore { needed_bytes, .. } => {
                    let wanted = needed_bytes as u64 + ALIGN;
                    if position >= size_bytes || (outcome.valid_bytes == 0 && window >= wanted) {
                        // No progress with a window that holds the batch: the file ends early.
                        (position < size_bytes)
                            .then(|| format!("file ends inside the batch at byte {position}"))
                    } else {
                        window = window.max(wanted);
                        continue;
                    }
                }
                ScanEnd::Zeroes { .. } => {
                    Some(format!("zero bytes at {position}, before the end of the data"))
                }
                ScanEnd::Invalid { detail, .. } => Some(detail),
            };
            if let Some(detail) = stopped {
                tracing::warn!(segment = %seg.log_path.display(), position, %detail,
                    "producer-state replay stopped early in this segment");
            }
            break;
        }
    }
    Ok((replayed, bytes_read))
}

/// Recovers the segments named by `bases` (sorted): loads or rebuilds their indexes, truncates
/// torn tails, drops segments whose offsets no longer follow.
pub(super) async fn recover_segments(
    dir: &Path,
    config: &LogConfig,
    bases: &[i64],
    report: &mut RecoveryReport,
) -> Result<Vec<Rc<Segment>>, StorageError> {
    let mut segments: Vec<Rc<Segment>> = Vec::new();
    let recovered_at_ms = now_ms();
    for (i, &base) in bases.iter().enumerate() {
        let seg = Rc::new(Segment::new(dir, base, config.index_interval_bytes));
        if let Some(prev) = segments.last() {
            let prev_next = prev.meta.borrow().next_offset;
            if base < prev_next {
                return Err(StorageError::Corrupt {
                    segment: seg.log_path.clone(),
                    position: 0,
                    detail: format!(
                        "segment starts at offset {base} but {} ends at {prev_next}: offsets overlap",
                        prev.log_path.display()
                    ),
                });
            }
            if base > prev_next {
                // An earlier segment lost its tail: what follows cannot be attached in order.
                for &later in &bases[i..] {
                    let gone = Segment::new(dir, later, config.index_interval_bytes);
                    tracing::warn!(segment = %gone.log_path.display(), expected_offset = prev_next,
                        "removing segment after an offset gap");
                    remove_segment_files(&gone);
                    report.segments_removed.push(gone.log_path.clone());
                }
                break;
            }
        }
        let is_last = i + 1 == bases.len();
        // Sized without opening: a sealed segment whose indexes load stays closed until read.
        let file_bytes = std::fs::metadata(&seg.log_path)
            .map_err(|e| StorageError::io(format!("sizing {}", seg.log_path.display()), e))?
            .len();
        // The active segment's index is a checkpoint: all of it after a clean shutdown, a synced
        // prefix otherwise (written by housekeeping), so a crash costs a scan of the tail only.
        // Even after a clean shutdown the last block is read again and its batches checked: it is
        // the one a write rewrites, and damage at rest there must be cut, not served as corrupt.
        let coverage = if is_last { Coverage::Prefix } else { Coverage::Exact };
        let (index, start, checkpoint_bytes) = match seg.load_indexes(
            file_bytes,
            config.index_interval_bytes,
            coverage,
        ) {
            Ok((index, summary)) if !is_last => {
                report.indexes_loaded += 1;
                let mut meta = seg.meta.borrow_mut();
                meta.size_bytes = file_bytes;
                meta.written_bytes = file_bytes;
                meta.durable_bytes = file_bytes;
                meta.preallocated_bytes = file_bytes;
                meta.next_offset = summary.next_offset;
                meta.index = index;
                // Only sealed segments take this branch (the active one's tail is always checked).
                meta.sealed = true;
                meta.final_on_disk = true;
                drop(meta);
                segments.push(seg);
                continue;
            }
            Ok((mut index, summary)) => {
                report.indexes_loaded += 1;
                // Every byte of the checkpoint's last block is read again: the flusher
                // rewrites that block, so it is the one a crash may have torn.
                let start = index.resume_at_or_below(align_down(summary.log_bytes));
                (index, start, Some(summary.log_bytes))
            }
            Err(reason) => {
                if !is_last || report.clean_shutdown {
                    tracing::info!(segment = %seg.log_path.display(), %reason, "rebuilding index by scanning");
                }
                let start = IndexEntry { relative_offset: 0, position: 0 };
                (SegmentIndex::new(config.index_interval_bytes), start, None)
            }
        };

        let file = seg.file().await?;
        let scanned = scan_segment_file_from(
            &file,
            &seg.log_path,
            base,
            file_bytes,
            index,
            start,
            RECOVERY_BATCH_BYTES_MAX,
        )
        .await?;
        report.segments_scanned += 1;
        report.bytes_scanned += scanned.valid_bytes.saturating_sub(u64::from(start.position));
        if let Some((position, detail)) = &scanned.damage {
            let last_good_offset = (scanned.next_offset > base).then_some(scanned.next_offset - 1);
            tracing::warn!(
                segment = %seg.log_path.display(), position, bytes_dropped = file_bytes - position,
                ?last_good_offset, %detail, "truncating torn or damaged tail"
            );
            report.torn_tails.push(TornTail {
                segment: seg.log_path.clone(),
                position: *position,
                bytes_dropped: file_bytes - position,
                last_good_offset,
                detail: detail.clone(),
            });
        }
        if checkpoint_bytes.is_some_and(|covered| scanned.valid_bytes < covered) {
            // The cut went below the checkpoint: it no longer describes this log.
            seg.remove_index_files();
        }
        if file_bytes > scanned.valid_bytes {
            file.truncate(scanned.valid_bytes)
                .await
                .map_err(|e| StorageError::io(format!("truncating {}", seg.log_path.display()), e))?;
        }
        {
            let mut meta = seg.meta.borrow_mut();
            meta.size_bytes = scanned.valid_bytes;
            meta.written_bytes = scanned.valid_bytes;
            meta.durable_bytes = scanned.valid_bytes;
            meta.preallocated_bytes = scanned.valid_bytes;
            meta.next_offset = scanned.next_offset;
            meta.index = scanned.index;
            meta.sealed = !is_last;
            meta.final_on_disk = !is_last;
            meta.first_append_ms = (scanned.valid_bytes > 0).then_some(recovered_at_ms);
        }
        if !is_last {
            report.indexes_rebuilt += 1;
            seg.persist_indexes()?;
            seg.close_file().await;
        }
        segments.push(seg);
    }
    Ok(segments)
}
