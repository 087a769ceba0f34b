//! The read side: fetches (tail cache first, then O_DIRECT reads of whole batches from a
//! segment), long polls on the high watermark and ListOffsets by time. Never serves anything at
//! or past the high watermark, and never changes the log (it only fills the tail cache).

use std::rc::Rc;

use bytes::Bytes;

use super::Partition;
use crate::record::{self, BatchError, BatchHeader, BATCH_HEADER_LEN};
use crate::storage::segment::{align_down, align_up, read_aligned, Segment, ALIGN};
use crate::storage::tail_cache::Pin;
use crate::storage::{ReadResult, StorageError};

/// Largest single O_DIRECT read when serving a fetch or scanning.
const READ_WINDOW_BYTES_MAX: u64 = 4 << 20;

/// The first record of `batch` stamped at or after `timestamp_ms`, as (offset, timestamp). The
/// batch's max timestamp is known to qualify. A compressed batch is inflated (as Kafka does for
/// this lookup; it is off the produce and fetch paths); one that cannot be read answers with its
/// base offset, which is never past the wanted record.
fn first_record_at_or_after(batch: &[u8], header: &BatchHeader, timestamp_ms: i64) -> (i64, i64) {
    if let Ok(records) = record::reader::decode(batch, record::reader::DECOMPRESSED_BYTES_MAX_DEFAULT) {
        for r in records.iter().flatten() {
            if r.timestamp_ms >= timestamp_ms {
                return (r.offset, r.timestamp_ms);
            }
        }
    }
    (header.base_offset, header.max_timestamp)
}

/// A read of the active segment under way (`Partition::active_readers`).
struct ActiveRead<'a>(&'a Partition);

impl<'a> ActiveRead<'a> {
    fn new(partition: &'a Partition) -> ActiveRead<'a> {
        partition.active_readers.set(partition.active_readers.get() + 1);
        ActiveRead(partition)
    }
}

impl Drop for ActiveRead<'_> {
    fn drop(&mut self) {
        self.0.active_readers.set(self.0.active_readers.get() - 1);
    }
}

impl Partition {
    /// Whole batches from the one containing `offset`, up to `max_bytes` (at least one batch),
    /// only below the high watermark; from the tail cache if it has them, else from disk.
    pub async fn read(&self, offset: i64, max_bytes: usize) -> Result<ReadResult, StorageError> {
        self.read_below(offset, self.high_watermark.get(), max_bytes).await
    }

    /// A replica's read of its own log (the scan at open, entries a follower lacks): like `read`,
    /// but up to `end`, which may pass the high watermark though never the durable end (what is
    /// not yet written is not on disk to read).
    pub async fn read_replica(
        &self,
        offset: i64,
        end: i64,
        max_bytes: usize,
    ) -> Result<ReadResult, StorageError> {
        self.read_below(offset, end.min(self.durable_end.get()), max_bytes).await
    }

    async fn read_below(
        &self,
        offset: i64,
        limit: i64,
        max_bytes: usize,
    ) -> Result<ReadResult, StorageError> {
        if self.closed.get() {
            return Err(StorageError::Closed);
        }
        let high_watermark = self.high_watermark.get();
        if offset < self.log_start_offset.get() || offset > limit {
            return Err(self.out_of_range(offset));
        }
        self.touch();
        let mut chunks = Vec::new();
        if offset < limit {
            let hit =
                self.shard.tail_cache.borrow_mut().read(self.cache_id, offset, limit, max_bytes, &mut chunks);
            if !hit {
                let seg = {
                    let st = self.state.borrow();
                    let i = st.segments.partition_point(|s| s.base_offset <= offset);
                    match i {
                        0 => return Err(self.out_of_range(offset)),
                        i => st.segments[i - 1].clone(),
                    }
                };
                let read = self.read_segment(&seg, offset, limit, max_bytes, &mut chunks).await;
                if let Err(e) = read {
                    // Retention deleted the segment while we read it: the offset is gone, say so.
                    if offset < self.log_start_offset.get() {
                        return Err(self.out_of_range(offset));
                    }
                    return Err(e);
                }
            }
        }
        Ok(ReadResult { chunks, high_watermark, log_start_offset: self.log_start_offset.get() })
    }

    /// Resolves when the high watermark passes `offset` (or the partition closes).
    pub async fn wait_for_data(&self, offset: i64) {
        loop {
            let notified = self.progress.notified();
            if self.high_watermark.get() > offset || self.closed.get() {
                return;
            }
            notified.await;
        }
    }

    /// Kafka ListOffsets: -2 → log start, -1 → high watermark, else the first batch whose max
    /// timestamp >= `timestamp_ms`, as (base offset, max timestamp).
    pub async fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<Option<(i64, i64)>, StorageError> {
        match timestamp_ms {
            -2 => return Ok(Some((self.log_start_offset.get(), -1))),
            -1 => return Ok(Some((self.high_watermark.get(), -1))),
            _ => {}
        }
        let mut offset = {
            let st = self.state.borrow();
            let found = st.segments.iter().find(|s| s.meta.borrow().index.max_timestamp_ms() >= timestamp_ms);
            match found {
                None => return Ok(None),
                Some(s) => s.base_offset + i64::from(s.meta.borrow().index.lookup_time(timestamp_ms)),
            }
        };
        offset = offset.max(self.log_start_offset.get());
        loop {
            if offset >= self.high_watermark.get() {
                return Ok(None);
            }
            let result = self.read(offset, 64 << 10).await?;
            let mut next = offset;
            for chunk in &result.chunks {
                let header = record::BatchHeader::parse(chunk).map_err(|e| StorageError::Corrupt {
                    segment: self.dir.clone(),
                    position: 0,
                    detail: format!("served batch at offset {next} has a bad header: {e}"),
                })?;
                if header.max_timestamp >= timestamp_ms {
                    return Ok(Some(first_record_at_or_after(chunk, &header, timestamp_ms)));
                }
                next = header.last_offset() + 1;
            }
            if next == offset {
                return Ok(None);
            }
            offset = next;
        }
    }

    /// Reads whole batches from `seg` starting with the one containing `offset`.
    async fn read_segment(
        &self,
        seg: &Rc<Segment>,
        offset: i64,
        high_watermark: i64,
        max_bytes: usize,
        out: &mut Vec<Bytes>,
    ) -> Result<(), StorageError> {
        let (mut position, readable_end) = {
            let meta = seg.meta.borrow();
            let relative = u32::try_from(offset - seg.base_offset).unwrap_or(u32::MAX);
            (u64::from(meta.index.lookup(relative).position), meta.durable_bytes)
        };
        let active = !seg.meta.borrow().final_on_disk;
        if active {
            self.ensure_file_slot().await;
        }
        // Keeps a release away while this read opens and uses the active file.
        let _reading = active.then(|| ActiveRead::new(self));
        let file = seg.file().await?;
        if !active {
            self.shard.note_sealed_read(seg);
        }
        let mut served_bytes = 0usize;
        let mut expected: Option<i64> = None;
        let mut window = (max_bytes as u64 + u64::from(self.config.index_interval_bytes) + ALIGN)
            .min(READ_WINDOW_BYTES_MAX);
        let corrupt = |position: u64, detail: String| {
            tracing::error!(segment = %seg.log_path.display(), position, %detail, "corrupt batch; not serving it");
            StorageError::Corrupt { segment: seg.log_path.clone(), position, detail }
        };
        'reads: while position < readable_end {
            let from = align_down(position);
            let to = align_up((position + window).min(readable_end));
            let data = read_aligned(&file, from, (to - from) as usize).await.map_err(|e| {
                StorageError::io(format!("reading {} at byte {from}", seg.log_path.display()), e)
            })?;
            let data = &data[..];
            if from + (data.len() as u64) < to.min(readable_end) {
                // The file is shorter than its durable end: retention is releasing it (or it was
                // damaged). Never loop on, never serve past what is there.
                return Err(corrupt(
                    from + data.len() as u64,
                    format!("file ends before its durable end {readable_end}"),
                ));
            }
            let valid_to = ((readable_end - from) as usize).min(data.len());
            // Batches collected from this read: (start, end) within `data`, copied once below.
            let mut spans: Vec<(usize, usize)> = Vec::new();
            let mut done = false;
            loop {
                if position >= readable_end {
                    done = true;
                    break;
                }
                let at = (position - from) as usize;
                let rest = &data[at.min(valid_to)..valid_to];
                if rest.len() < BATCH_HEADER_LEN && position + BATCH_HEADER_LEN as u64 > readable_end {
                    return Err(corrupt(position, "data ends inside a batch header".into()));
                }
                let header = match BatchHeader::parse(rest) {
                    Ok(h) => h,
                    Err(BatchError::Truncated { .. }) => break,
                    Err(e) => return Err(corrupt(position, e.to_string())),
                };
                let total = header.total_len();
                if position + total as u64 > readable_end {
                    return Err(corrupt(
                        position,
                        format!("batch of {total} bytes runs past the end of the data"),
                    ));
                }
                if header.base_offset >= high_watermark {
                    done = true;
                    break;
                }
                // Past max_bytes, but never before the first batch: a consumer must progress.
                let serves = header.last_offset() >= offset;
                if serves && served_bytes > 0 && served_bytes + total > max_bytes {
                    done = true;
                    break;
                }
                if rest.len() < total {
                    // The batch continues past this read; read again starting at it.
                    window = window.max(total as u64 + ALIGN);
                    break;
                }
                let header =
                    record::validate(&rest[..total]).map_err(|e| corrupt(position, e.to_string()))?;
                if let Some(exp) = expected {
                    if header.base_offset != exp {
                        return Err(corrupt(
                            position,
                            format!("batch offset {} where {exp} was expected", header.base_offset),
                        ));
                    }
                }
                expected = Some(header.last_offset() + 1);
                if header.last_offset() >= offset {
                    spans.push((at, at + total));
                    served_bytes += total;
                }
                position += total as u64;
            }
            if let (Some(first), Some(last)) = (spans.first(), spans.last()) {
                // One copy of the served batches per read. glommio 0.9 reads only into its own
                // buffers, which are not `Send` (an `Rc` into the reactor, an arena allocator in a
                // `RefCell`), and these bytes leave the shard: mesh replies to fetches from other
                // shards, and the tail cache serves every shard. 12-24 % of the shard's CPU in a
                // backlog drain; measured in docs/benchmarks.md (issue 14).
                let copied = Bytes::copy_from_slice(&data[first.0..last.1]);
                let pin = Pin::new(copied.len());
                let mut cache = self.shard.tail_cache.borrow_mut();
                for (start, end) in &spans {
                    let batch = copied.slice(start - first.0..end - first.0);
                    if let Ok(h) = BatchHeader::parse(&batch) {
                        cache.insert(self.cache_id, h.base_offset, h.last_offset(), batch.clone(), &pin);
                    }
                    out.push(batch);
                }
            }
            if done {
                break 'reads;
            }
        }
        if out.is_empty() && offset < high_watermark && seg.meta.borrow().next_offset > offset {
            return Err(corrupt(position, format!("no batch containing offset {offset} found")));
        }
        Ok(())
    }
}
