//! Sparse per-segment indexes: offset → byte position and max-timestamp → offset.
//!
//! Owns: the in-memory entries of one segment's `.index` and `.timeindex`, their lookup (binary
//! search to the closest entry at or below, the caller scans batch headers forward from there) and
//! their on-disk encoding with a crc32c so a torn or stale file is detected and rebuilt instead of
//! trusted. Pure logic: no IO, no glommio; depends only on std and crc32c.
//!
//! File layouts (big-endian), both ending in a crc32c of everything before it:
//! ```text
//! .index:     magic u32 | version u32 | base_offset i64 | log_bytes u64 | next_offset i64
//!             | max_timestamp_ms i64 | count u32 | count × (relative_offset u32, position u32) | crc u32
//! .timeindex: magic u32 | version u32 | base_offset i64 | count u32
//!             | count × (max_timestamp_ms i64, relative_offset u32) | crc u32
//! ```
//! A time entry `(ts, rel)` means: every batch up to and including the one at `rel` has a max
//! timestamp <= `ts`. So a search for `T` may start at the last entry with `ts < T`.

const INDEX_MAGIC: u32 = 0x524c_4958; // "RLIX"
const TIME_INDEX_MAGIC: u32 = 0x524c_5449; // "RLTI"
const FORMAT_VERSION: u32 = 1;
const INDEX_HEADER_LEN: usize = 4 + 4 + 8 + 8 + 8 + 8 + 4;
const TIME_INDEX_HEADER_LEN: usize = 4 + 4 + 8 + 4;
const INDEX_ENTRY_LEN: usize = 8;
const TIME_ENTRY_LEN: usize = 12;
const CRC_LEN: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    /// Batch base offset minus the segment's base offset.
    pub relative_offset: u32,
    /// Byte position of that batch in the segment file.
    pub position: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeEntry {
    pub max_timestamp_ms: i64,
    pub relative_offset: u32,
}

/// How much of its log file a persisted index must describe to be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coverage {
    /// All of it: a sealed segment, or an active one closed cleanly.
    Exact,
    /// A prefix of it: a checkpoint of the active segment; the rest is scanned.
    Prefix,
}

/// What a persisted `.index` says about its segment; compared with the log file before trusting it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentSummary {
    pub base_offset: i64,
    pub log_bytes: u64,
    pub next_offset: i64,
    pub max_timestamp_ms: i64,
}

/// Both sparse indexes of one segment plus its running max timestamp.
#[derive(Clone, Debug)]
pub struct SegmentIndex {
    offsets: Vec<IndexEntry>,
    times: Vec<TimeEntry>,
    interval_bytes: u32,
    bytes_since_entry: u64,
    max_timestamp_ms: i64,
}

impl SegmentIndex {
    pub fn new(interval_bytes: u32) -> SegmentIndex {
        SegmentIndex {
            offsets: Vec::new(),
            times: Vec::new(),
            interval_bytes: interval_bytes.max(1),
            bytes_since_entry: 0,
            max_timestamp_ms: i64::MIN,
        }
    }

    /// Records a batch of `batch_bytes` at `position`. Batches must arrive in log order.
    pub fn on_batch(&mut self, relative_offset: u32, position: u32, batch_bytes: u32, max_timestamp_ms: i64) {
        if let Some(last) = self.offsets.last() {
            debug_assert!(relative_offset > last.relative_offset, "index offsets must increase");
            debug_assert!(position > last.position, "index positions must increase");
        }
        self.max_timestamp_ms = self.max_timestamp_ms.max(max_timestamp_ms);
        if self.offsets.is_empty() || self.bytes_since_entry >= u64::from(self.interval_bytes) {
            self.offsets.push(IndexEntry { relative_offset, position });
            self.bytes_since_entry = 0;
            if self.times.last().is_none_or(|t| self.max_timestamp_ms > t.max_timestamp_ms) {
                self.times.push(TimeEntry { max_timestamp_ms: self.max_timestamp_ms, relative_offset });
            }
        }
        self.bytes_since_entry += u64::from(batch_bytes);
    }

    /// The closest entry at or below `relative_offset` (the segment start if none).
    pub fn lookup(&self, relative_offset: u32) -> IndexEntry {
        let after = self.offsets.partition_point(|e| e.relative_offset <= relative_offset);
        match after {
            0 => IndexEntry { relative_offset: 0, position: 0 },
            n => self.offsets[n - 1],
        }
    }

    /// Relative offset to start scanning from for the first batch with max timestamp >= `timestamp_ms`.
    pub fn lookup_time(&self, timestamp_ms: i64) -> u32 {
        let after = self.times.partition_point(|e| e.max_timestamp_ms < timestamp_ms);
        match after {
            0 => 0,
            n => self.times[n - 1].relative_offset,
        }
    }

    /// Forgets entries at or above `relative_offset` (a rolled-back write). The max timestamp is
    /// kept: an overestimate only delays time retention, never serves wrong data.
    pub fn truncate_from(&mut self, relative_offset: u32) {
        self.offsets.retain(|e| e.relative_offset < relative_offset);
        self.times.retain(|e| e.relative_offset < relative_offset);
        // The next batch gets an entry: the distance from the last kept entry is unknown.
        self.bytes_since_entry = u64::from(self.interval_bytes);
    }

    /// Bytes the entries hold in memory.
    pub fn memory_bytes(&self) -> usize {
        self.offsets.capacity() * std::mem::size_of::<IndexEntry>()
            + self.times.capacity() * std::mem::size_of::<TimeEntry>()
    }

    /// The entry to resume a scan from so that every byte from `position` on is read again: the
    /// last one at or below it (the segment start if none). Entries from it on are dropped; the
    /// scan records them again.
    pub fn resume_at_or_below(&mut self, position: u64) -> IndexEntry {
        let kept = self.offsets.partition_point(|e| u64::from(e.position) <= position);
        let start = match kept {
            0 => IndexEntry { relative_offset: 0, position: 0 },
            n => self.offsets[n - 1],
        };
        self.truncate_from(start.relative_offset);
        start
    }

    /// The entries of the batches below byte `log_bytes` and relative offset `next_relative`
    /// (where the bytes end), for a checkpoint. The max timestamp is kept whole: an overestimate
    /// only delays time retention.
    pub fn prefix(&self, log_bytes: u64, next_relative: u32) -> SegmentIndex {
        let below = |e: &IndexEntry| u64::from(e.position) < log_bytes && e.relative_offset < next_relative;
        SegmentIndex {
            offsets: self.offsets.iter().copied().filter(below).collect(),
            times: self.times.iter().copied().filter(|t| t.relative_offset < next_relative).collect(),
            interval_bytes: self.interval_bytes,
            bytes_since_entry: 0,
            max_timestamp_ms: self.max_timestamp_ms,
        }
    }

    /// Largest max timestamp of any batch recorded (i64::MIN when empty).
    pub fn max_timestamp_ms(&self) -> i64 {
        self.max_timestamp_ms
    }

    #[cfg(test)]
    pub fn entries(&self) -> &[IndexEntry] {
        &self.offsets
    }

    #[cfg(test)]
    pub fn time_entries(&self) -> &[TimeEntry] {
        &self.times
    }

    pub fn encode_offsets(&self, summary: &SegmentSummary) -> Vec<u8> {
        let mut out = Vec::with_capacity(INDEX_HEADER_LEN + self.offsets.len() * INDEX_ENTRY_LEN + CRC_LEN);
        out.extend_from_slice(&INDEX_MAGIC.to_be_bytes());
        out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        out.extend_from_slice(&summary.base_offset.to_be_bytes());
        out.extend_from_slice(&summary.log_bytes.to_be_bytes());
        out.extend_from_slice(&summary.next_offset.to_be_bytes());
        out.extend_from_slice(&summary.max_timestamp_ms.to_be_bytes());
        out.extend_from_slice(&(self.offsets.len() as u32).to_be_bytes());
        for e in &self.offsets {
            out.extend_from_slice(&e.relative_offset.to_be_bytes());
            out.extend_from_slice(&e.position.to_be_bytes());
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    pub fn encode_times(&self, base_offset: i64) -> Vec<u8> {
        let mut out = Vec::with_capacity(TIME_INDEX_HEADER_LEN + self.times.len() * TIME_ENTRY_LEN + CRC_LEN);
        out.extend_from_slice(&TIME_INDEX_MAGIC.to_be_bytes());
        out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        out.extend_from_slice(&base_offset.to_be_bytes());
        out.extend_from_slice(&(self.times.len() as u32).to_be_bytes());
        for e in &self.times {
            out.extend_from_slice(&e.max_timestamp_ms.to_be_bytes());
            out.extend_from_slice(&e.relative_offset.to_be_bytes());
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    /// Decodes a persisted pair of index files for the segment at `base_offset` whose log file is
    /// `file_bytes` long, covering it as `coverage` asks. Returns why it is not plausible instead
    /// of trusting it.
    pub fn decode(
        offsets_file: &[u8],
        times_file: &[u8],
        base_offset: i64,
        file_bytes: u64,
        interval_bytes: u32,
        coverage: Coverage,
    ) -> Result<(SegmentIndex, SegmentSummary), String> {
        let body = checked_body(offsets_file, INDEX_MAGIC, INDEX_HEADER_LEN)?;
        let summary = SegmentSummary {
            base_offset: be_i64(body, 8),
            log_bytes: be_i64(body, 16) as u64,
            next_offset: be_i64(body, 24),
            max_timestamp_ms: be_i64(body, 32),
        };
        if summary.base_offset != base_offset {
            return Err(format!("index is for base offset {}, not {base_offset}", summary.base_offset));
        }
        let covered = match coverage {
            Coverage::Exact => summary.log_bytes == file_bytes,
            Coverage::Prefix => summary.log_bytes <= file_bytes,
        };
        if !covered {
            return Err(format!("index covers {} log bytes, the log has {file_bytes}", summary.log_bytes));
        }
        let log_bytes = summary.log_bytes;
        if summary.next_offset < base_offset || (log_bytes > 0) != (summary.next_offset > base_offset) {
            return Err(format!("index next offset {} is implausible", summary.next_offset));
        }
        let count = be_u32(body, 40) as usize;
        if body.len() != INDEX_HEADER_LEN + count * INDEX_ENTRY_LEN {
            return Err(format!("index declares {count} entries but holds {} bytes", body.len()));
        }
        let span = summary.next_offset - base_offset;
        let mut index = SegmentIndex::new(interval_bytes);
        for i in 0..count {
            let at = INDEX_HEADER_LEN + i * INDEX_ENTRY_LEN;
            let e = IndexEntry { relative_offset: be_u32(body, at), position: be_u32(body, at + 4) };
            let ordered = index
                .offsets
                .last()
                .is_none_or(|p| e.relative_offset > p.relative_offset && e.position > p.position);
            if !ordered || u64::from(e.position) >= log_bytes || i64::from(e.relative_offset) >= span {
                return Err(format!("index entry {i} ({e:?}) is out of order or beyond the log"));
            }
            index.offsets.push(e);
        }

        let body = checked_body(times_file, TIME_INDEX_MAGIC, TIME_INDEX_HEADER_LEN)?;
        if be_i64(body, 8) != base_offset {
            return Err(format!("time index is for base offset {}, not {base_offset}", be_i64(body, 8)));
        }
        let count = be_u32(body, 16) as usize;
        if body.len() != TIME_INDEX_HEADER_LEN + count * TIME_ENTRY_LEN {
            return Err(format!("time index declares {count} entries but holds {} bytes", body.len()));
        }
        for i in 0..count {
            let at = TIME_INDEX_HEADER_LEN + i * TIME_ENTRY_LEN;
            let e = TimeEntry { max_timestamp_ms: be_i64(body, at), relative_offset: be_u32(body, at + 8) };
            let ordered = index.times.last().is_none_or(|p| {
                e.relative_offset > p.relative_offset && e.max_timestamp_ms > p.max_timestamp_ms
            });
            if !ordered
                || i64::from(e.relative_offset) >= span
                || e.max_timestamp_ms > summary.max_timestamp_ms
            {
                return Err(format!("time index entry {i} ({e:?}) is out of order or beyond the log"));
            }
            index.times.push(e);
        }
        index.max_timestamp_ms = summary.max_timestamp_ms;
        Ok((index, summary))
    }
}

/// Checks magic, version and trailing crc; returns the bytes before the crc.
fn checked_body(file: &[u8], magic: u32, header_len: usize) -> Result<&[u8], String> {
    if file.len() < header_len + CRC_LEN {
        return Err(format!("file of {} bytes is shorter than its header", file.len()));
    }
    let (body, crc) = file.split_at(file.len() - CRC_LEN);
    let stored = be_u32(crc, 0);
    let computed = crc32c::crc32c(body);
    if stored != computed {
        return Err(format!("crc32c mismatch: stored {stored:#010x}, computed {computed:#010x}"));
    }
    if be_u32(body, 0) != magic || be_u32(body, 4) != FORMAT_VERSION {
        return Err("unknown magic or version".to_string());
    }
    Ok(body)
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be_i64(b: &[u8], at: usize) -> i64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    i64::from_be_bytes(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Builds an index from (batch bytes, timestamp) pairs, one offset per batch.
    fn build(batches: &[(u32, i64)], interval: u32) -> (SegmentIndex, Vec<(u32, u32, i64)>) {
        let mut index = SegmentIndex::new(interval);
        let mut layout = Vec::new();
        let mut position = 0u32;
        for (i, (bytes, ts)) in batches.iter().enumerate() {
            index.on_batch(i as u32, position, *bytes, *ts);
            layout.push((i as u32, position, *ts));
            position += bytes;
        }
        (index, layout)
    }

    #[test]
    fn first_batch_always_indexed_and_interval_respected() {
        let (index, _) = build(&[(100, 1), (100, 2), (100, 3), (100, 4), (100, 5)], 250);
        let rel: Vec<u32> = index.entries().iter().map(|e| e.relative_offset).collect();
        assert_eq!(rel, vec![0, 3]);
        assert_eq!(index.lookup(2), IndexEntry { relative_offset: 0, position: 0 });
        assert_eq!(index.lookup(4), IndexEntry { relative_offset: 3, position: 300 });
    }

    #[test]
    fn encode_decode_round_trip_and_rejects_damage() {
        let (index, _) = build(&[(100, 5), (200, 3), (300, 9), (50, 10)], 100);
        let summary =
            SegmentSummary { base_offset: 40, log_bytes: 650, next_offset: 44, max_timestamp_ms: 10 };
        let off = index.encode_offsets(&summary);
        let times = index.encode_times(40);
        let exact = Coverage::Exact;
        let (back, s) = SegmentIndex::decode(&off, &times, 40, 650, 100, exact).unwrap();
        assert_eq!(s, summary);
        assert_eq!(back.entries(), index.entries());
        assert_eq!(back.time_entries(), index.time_entries());
        assert!(SegmentIndex::decode(&off, &times, 40, 651, 100, exact).is_err(), "log length changed");
        assert!(SegmentIndex::decode(&off, &times, 41, 650, 100, exact).is_err(), "wrong segment");
        let mut bad = off.clone();
        bad[INDEX_HEADER_LEN + 2] ^= 1;
        assert!(SegmentIndex::decode(&bad, &times, 40, 650, 100, exact).is_err(), "crc must catch a flip");
        assert!(SegmentIndex::decode(&off[..off.len() - 1], &times, 40, 650, 100, exact).is_err());
    }

    #[test]
    fn a_checkpoint_covers_a_prefix_and_resumes_below_the_last_block() {
        let (index, _) = build(&[(100, 5), (200, 3), (300, 9), (50, 10)], 100);
        let summary =
            SegmentSummary { base_offset: 40, log_bytes: 650, next_offset: 44, max_timestamp_ms: 10 };
        let (off, times) = (index.encode_offsets(&summary), index.encode_times(40));
        let prefix = Coverage::Prefix;
        let (mut back, s) = SegmentIndex::decode(&off, &times, 40, 1 << 20, 100, prefix).unwrap();
        assert_eq!(s, summary, "a longer (preallocated) file keeps the checkpoint");
        assert!(SegmentIndex::decode(&off, &times, 40, 649, 100, prefix).is_err(), "a shorter file does not");
        // Entries at positions 0, 100, 300, 600: resuming at 512 re-reads from the batch at 300.
        assert_eq!(back.resume_at_or_below(512), IndexEntry { relative_offset: 2, position: 300 });
        assert_eq!(back.entries().len(), 2);
        assert_eq!(back.resume_at_or_below(0), IndexEntry { relative_offset: 0, position: 0 });
        assert!(back.entries().is_empty());
    }

    proptest! {
        #[test]
        fn lookup_finds_closest_entry_at_or_below(
            batches in prop::collection::vec((1u32..5000, -1000i64..1000), 1..200),
            interval in 1u32..20_000,
            probe in 0u32..250,
        ) {
            let (index, layout) = build(&batches, interval);
            let target = probe.min(layout.len() as u32 - 1);
            let entry = index.lookup(target);
            prop_assert!(entry.relative_offset <= target);
            // The entry points at a real batch start.
            prop_assert_eq!(layout[entry.relative_offset as usize].1, entry.position);
            // No indexed entry lies between it and the target.
            prop_assert!(index.entries().iter().all(|e| e.relative_offset <= entry.relative_offset
                || e.relative_offset > target));
            // Scanning forward from the entry is bounded by the interval plus one batch.
            let gap: u32 = layout[entry.relative_offset as usize..target as usize]
                .iter().map(|(i, _, _)| batches[*i as usize].0).sum();
            let biggest = batches.iter().map(|b| b.0).max().unwrap();
            prop_assert!(gap <= interval + biggest);
        }

        #[test]
        fn time_lookup_never_skips_a_match(
            batches in prop::collection::vec((1u32..5000, -1000i64..1000), 1..200),
            interval in 1u32..20_000,
            target in -1100i64..1100,
        ) {
            let (index, layout) = build(&batches, interval);
            let start = index.lookup_time(target);
            // Every batch before the start has max timestamp < target: starting there skips no match.
            prop_assert!(layout[..start as usize].iter().all(|(_, _, ts)| *ts < target));
        }
    }
}
