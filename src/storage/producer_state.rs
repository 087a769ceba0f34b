//! Idempotent producers (KIP-98): per partition and producer id, the current epoch and the last
//! batches appended, which decide whether a batch is appended, fenced, out of order, or a retry of
//! an appended batch (answered with its original offsets, not written again); and the snapshot
//! file that carries this state across restarts.
//!
//! Owns: the sequence rules (Apache Kafka's `ProducerStateManager` semantics), the bound on
//! producers per partition and their expiry, the snapshot format (`<offset:020>.snapshot`: the
//! state after every batch below `offset`) and the blocking file functions that write, list and
//! prune snapshots. Pure logic apart from those file functions, which `partition` runs off the
//! shard. Depends on `crate::record` only. `partition` decides when to check, snapshot, replay
//! and truncate.
//!
//! The rules, for a batch with producer id >= 0 and base sequence >= 0 (others are not
//! idempotent and never looked at):
//! - unknown producer (no state: new, expired, or evicted): appended at any epoch and sequence;
//! - epoch below the current one: fenced (a newer producer instance took over);
//! - epoch above the current one: its first sequence must be 0;
//! - same epoch: a batch whose (first, last) sequence equals one of the last
//!   [`BATCHES_RETAINED`] batches is a duplicate; otherwise its first sequence must follow the last
//!   one (wrapping from `i32::MAX` to 0).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::record::BatchHeader;

/// Batches remembered per producer for duplicate detection: Kafka's value, matching the
/// clients' ceiling of five requests in flight per connection with idempotence on.
pub(crate) const BATCHES_RETAINED: usize = 5;
/// A producer that appended nothing for this long is forgotten (Kafka's
/// `producer.id.expiration.ms` default), measured against its last batch's max timestamp.
pub(crate) const PRODUCER_EXPIRATION_MS: i64 = 24 * 3600 * 1000;
/// Producers remembered per partition. Batches carry any producer id a client chooses, so the
/// table is bounded; past the bound the least recently active tenth is forgotten.
pub(crate) const PRODUCERS_PER_PARTITION_MAX: usize = 100_000;

const SNAPSHOT_MAGIC: &[u8; 4] = b"RLPS";
const SNAPSHOT_VERSION: u16 = 1;
const SNAPSHOT_HEADER_LEN: usize = 4 + 2 + 2 + 8 + 4;
const SNAPSHOT_ENTRY_LEN: usize = 8 + 2 + 1 + 1 + 8;
const SNAPSHOT_BATCH_LEN: usize = 4 + 4 + 8 + 8;
const SNAPSHOT_CRC_LEN: usize = 4;
/// The largest snapshot a bounded table encodes to (about 14 MB): what a reader of one that came
/// from elsewhere (a leader's Raft snapshot) accepts at most.
pub(crate) const SNAPSHOT_BYTES_MAX: usize = SNAPSHOT_HEADER_LEN
    + PRODUCERS_PER_PARTITION_MAX * (SNAPSHOT_ENTRY_LEN + BATCHES_RETAINED * SNAPSHOT_BATCH_LEN)
    + SNAPSHOT_CRC_LEN;
const SNAPSHOT_SUFFIX: &str = ".snapshot";
const SNAPSHOT_TEMP_SUFFIX: &str = ".snapshot.tmp";

/// The idempotence fields of one batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ProducerBatch {
    pub producer_id: i64,
    pub epoch: i16,
    pub first_sequence: i32,
    pub last_sequence: i32,
    /// The batch's max timestamp (drives expiry, as in Kafka).
    pub timestamp_ms: i64,
}

impl ProducerBatch {
    /// The batch's idempotence fields; `None` when it is not idempotent.
    pub fn of(header: &BatchHeader) -> Option<ProducerBatch> {
        if header.producer_id < 0 || header.base_sequence < 0 {
            return None;
        }
        Some(ProducerBatch {
            producer_id: header.producer_id,
            epoch: header.producer_epoch,
            first_sequence: header.base_sequence,
            last_sequence: increment_sequence(header.base_sequence, header.last_offset_delta),
            timestamp_ms: header.max_timestamp,
        })
    }
}

/// `sequence + by`, wrapping past `i32::MAX` to 0 as Kafka's producers number batches.
pub(crate) fn increment_sequence(sequence: i32, by: i32) -> i32 {
    debug_assert!(sequence >= 0 && by >= 0);
    if sequence > i32::MAX - by {
        by - (i32::MAX - sequence) - 1
    } else {
        sequence + by
    }
}

/// Where one appended batch is: what a duplicate is answered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(crate) struct BatchMeta {
    pub first_sequence: i32,
    pub last_sequence: i32,
    pub base_offset: i64,
    pub last_offset: i64,
}

/// One producer's state on one partition. `Copy` and fixed-size: appending never allocates.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ProducerEntry {
    epoch: i16,
    /// Oldest first; `len` of them are valid, at least one.
    batches: [BatchMeta; BATCHES_RETAINED],
    len: u8,
    last_timestamp_ms: i64,
}

impl ProducerEntry {
    fn new(batch: &ProducerBatch, base_offset: i64, last_offset: i64) -> ProducerEntry {
        let mut entry = ProducerEntry {
            epoch: batch.epoch,
            batches: [BatchMeta::default(); BATCHES_RETAINED],
            len: 0,
            last_timestamp_ms: batch.timestamp_ms,
        };
        entry.record(batch, base_offset, last_offset);
        entry
    }

    #[cfg(test)]
    pub fn epoch(&self) -> i16 {
        self.epoch
    }

    pub fn batches(&self) -> &[BatchMeta] {
        &self.batches[..self.len as usize]
    }

    fn last(&self) -> &BatchMeta {
        debug_assert!(self.len > 0, "a producer entry always holds a batch");
        &self.batches[self.len as usize - 1]
    }

    /// Records an appended batch; a new epoch starts a new batch history (as in Kafka).
    fn record(&mut self, batch: &ProducerBatch, base_offset: i64, last_offset: i64) {
        debug_assert!(base_offset <= last_offset);
        if batch.epoch != self.epoch {
            self.epoch = batch.epoch;
            self.len = 0;
        }
        let meta = BatchMeta {
            first_sequence: batch.first_sequence,
            last_sequence: batch.last_sequence,
            base_offset,
            last_offset,
        };
        if (self.len as usize) < BATCHES_RETAINED {
            self.batches[self.len as usize] = meta;
            self.len += 1;
        } else {
            self.batches.copy_within(1.., 0);
            self.batches[BATCHES_RETAINED - 1] = meta;
        }
        self.last_timestamp_ms = batch.timestamp_ms;
    }

    /// Forgets batches at or after `offset`; false when none is left.
    fn truncate_from(&mut self, offset: i64) -> bool {
        let kept = self.batches().iter().take_while(|b| b.base_offset < offset).count();
        self.len = kept as u8;
        kept > 0
    }
}

/// Slots past `len` are leftovers, not state.
impl PartialEq for ProducerEntry {
    fn eq(&self, other: &ProducerEntry) -> bool {
        self.epoch == other.epoch
            && self.batches() == other.batches()
            && self.last_timestamp_ms == other.last_timestamp_ms
    }
}

impl Eq for ProducerEntry {}

/// What to do with a batch that passed the checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Append,
    /// A retry of this appended batch: answer with its offsets, write nothing.
    Duplicate(BatchMeta),
}

/// Why a batch's sequence is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SequenceGap {
    /// A batch of a newer epoch must start at sequence 0.
    NewEpoch { current_epoch: i16 },
    /// Same epoch: the batch does not continue the last one.
    Expected { next_sequence: i32 },
    /// A retry of an appended batch in a request that also holds new batches.
    DuplicateAmongNew,
}

impl fmt::Display for SequenceGap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SequenceGap::NewEpoch { current_epoch } => write!(
                f,
                "a new epoch must start at sequence 0 (the partition has seen epoch {current_epoch})"
            ),
            SequenceGap::Expected { next_sequence } => write!(f, "expected sequence {next_sequence}"),
            SequenceGap::DuplicateAmongNew => {
                write!(f, "it repeats an appended batch, in a request that also holds new batches")
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rejection {
    Fenced { current_epoch: i16 },
    OutOfOrder(SequenceGap),
}

/// The rules of the module documentation for `batch` against its producer's state.
pub(crate) fn check(entry: Option<&ProducerEntry>, batch: &ProducerBatch) -> Result<Verdict, Rejection> {
    let Some(entry) = entry else { return Ok(Verdict::Append) };
    if batch.epoch < entry.epoch {
        return Err(Rejection::Fenced { current_epoch: entry.epoch });
    }
    if batch.epoch > entry.epoch {
        return match batch.first_sequence {
            0 => Ok(Verdict::Append),
            _ => Err(Rejection::OutOfOrder(SequenceGap::NewEpoch { current_epoch: entry.epoch })),
        };
    }
    let duplicate = entry
        .batches()
        .iter()
        .find(|b| b.first_sequence == batch.first_sequence && b.last_sequence == batch.last_sequence);
    if let Some(original) = duplicate {
        return Ok(Verdict::Duplicate(*original));
    }
    let next_sequence = increment_sequence(entry.last().last_sequence, 1);
    if batch.first_sequence == next_sequence {
        Ok(Verdict::Append)
    } else {
        Err(Rejection::OutOfOrder(SequenceGap::Expected { next_sequence }))
    }
}

/// One idempotent batch of an append request, with the offsets it gets if appended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Appending {
    /// Position of the batch in the request (for errors).
    pub index: usize,
    pub batch: ProducerBatch,
    pub base_offset: i64,
    pub last_offset: i64,
}

/// The idempotent batches of one append request. Requests nearly always hold one batch (Kafka
/// clients send one per partition), which is kept inline: no allocation.
#[derive(Default)]
pub(crate) enum AppendingBatches {
    #[default]
    None,
    One(Appending),
    Many(Vec<Appending>),
}

impl AppendingBatches {
    pub fn push(&mut self, appending: Appending) {
        *self = match std::mem::take(self) {
            AppendingBatches::None => AppendingBatches::One(appending),
            AppendingBatches::One(first) => AppendingBatches::Many(vec![first, appending]),
            AppendingBatches::Many(mut all) => {
                all.push(appending);
                AppendingBatches::Many(all)
            }
        };
    }

    pub fn as_slice(&self) -> &[Appending] {
        match self {
            AppendingBatches::None => &[],
            AppendingBatches::One(one) => std::slice::from_ref(one),
            AppendingBatches::Many(all) => all,
        }
    }
}

/// What an append request turns into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestVerdict {
    /// Append every batch; the producer state already records them.
    Append,
    /// Every batch of the request is a retry: answer with the originals' offsets.
    Duplicate { base_offset: i64, last_offset: i64 },
}

/// A refused batch of a request, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Refused {
    pub index: usize,
    pub batch: ProducerBatch,
    pub rejection: Rejection,
}

/// The producer state of one partition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProducerStates {
    producers: HashMap<i64, ProducerEntry>,
}

impl ProducerStates {
    /// Bytes the table holds: an entry and a control byte per slot.
    pub(crate) fn memory_bytes(&self) -> usize {
        self.producers.capacity() * (std::mem::size_of::<(i64, ProducerEntry)>() + 1)
    }

    /// Producers known.
    pub fn len(&self) -> usize {
        self.producers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    #[cfg(test)]
    pub(crate) fn get(&self, producer_id: i64) -> Option<&ProducerEntry> {
        self.producers.get(&producer_id)
    }

    /// Checks the idempotent `batches` of a request of `request_batches` batches in order, each as
    /// if the earlier ones were appended, and records them all when the request is to be
    /// appended. Nothing is recorded when a batch is refused or the request is a retry. Must only
    /// be called once nothing else can fail the append.
    pub(crate) fn apply(
        &mut self,
        batches: &[Appending],
        request_batches: usize,
    ) -> Result<RequestVerdict, Refused> {
        if let [only] = batches {
            return self.apply_one(only, request_batches == 1);
        }
        // Several batches (native clients only): check against a copy of the entries involved.
        let mut overlay: Vec<(i64, Option<ProducerEntry>)> = Vec::new();
        let mut duplicates: Option<(usize, i64, i64)> = None;
        let mut duplicate_count = 0usize;
        for a in batches {
            let id = a.batch.producer_id;
            let slot = match overlay.iter().position(|(p, _)| *p == id) {
                Some(i) => i,
                None => {
                    overlay.push((id, self.producers.get(&id).copied()));
                    overlay.len() - 1
                }
            };
            let entry = &mut overlay[slot].1;
            match check(entry.as_ref(), &a.batch) {
                Ok(Verdict::Append) => match entry {
                    Some(e) => e.record(&a.batch, a.base_offset, a.last_offset),
                    None => *entry = Some(ProducerEntry::new(&a.batch, a.base_offset, a.last_offset)),
                },
                Ok(Verdict::Duplicate(original)) => {
                    duplicate_count += 1;
                    let (first, base, last) =
                        duplicates.get_or_insert((a.index, original.base_offset, original.last_offset));
                    *first = (*first).min(a.index);
                    *base = (*base).min(original.base_offset);
                    *last = (*last).max(original.last_offset);
                }
                Err(rejection) => return Err(Refused { index: a.index, batch: a.batch, rejection }),
            }
        }
        if let Some((first, base_offset, last_offset)) = duplicates {
            if duplicate_count == request_batches {
                return Ok(RequestVerdict::Duplicate { base_offset, last_offset });
            }
            let batch = batches.iter().find(|a| a.index == first).map_or(batches[0].batch, |a| a.batch);
            let rejection = Rejection::OutOfOrder(SequenceGap::DuplicateAmongNew);
            return Err(Refused { index: first, batch, rejection });
        }
        for (id, entry) in overlay {
            if let Some(entry) = entry {
                self.make_room_for(id);
                self.producers.insert(id, entry);
            }
        }
        Ok(RequestVerdict::Append)
    }

    /// The hot path: one batch, one hash lookup.
    fn apply_one(&mut self, a: &Appending, whole_request: bool) -> Result<RequestVerdict, Refused> {
        let refused = |rejection| Refused { index: a.index, batch: a.batch, rejection };
        self.make_room_for(a.batch.producer_id);
        match self.producers.entry(a.batch.producer_id) {
            Entry::Vacant(vacant) => {
                vacant.insert(ProducerEntry::new(&a.batch, a.base_offset, a.last_offset));
                Ok(RequestVerdict::Append)
            }
            Entry::Occupied(mut occupied) => match check(Some(occupied.get()), &a.batch) {
                Ok(Verdict::Append) => {
                    occupied.get_mut().record(&a.batch, a.base_offset, a.last_offset);
                    Ok(RequestVerdict::Append)
                }
                Ok(Verdict::Duplicate(original)) if whole_request => Ok(RequestVerdict::Duplicate {
                    base_offset: original.base_offset,
                    last_offset: original.last_offset,
                }),
                Ok(Verdict::Duplicate(_)) => {
                    Err(refused(Rejection::OutOfOrder(SequenceGap::DuplicateAmongNew)))
                }
                Err(rejection) => Err(refused(rejection)),
            },
        }
    }

    /// Checks `batch` as if `pending` (batches of the log not recorded here yet, in log order,
    /// with their offsets) had been appended first. Records nothing: a replicated partition's
    /// leader checks a batch before proposing it, and the state records it once the log holds it.
    pub(crate) fn check_after(
        &self,
        batch: &ProducerBatch,
        pending: impl IntoIterator<Item = (ProducerBatch, i64, i64)>,
    ) -> Result<Verdict, Rejection> {
        let mut entry = self.producers.get(&batch.producer_id).copied();
        for (earlier, base_offset, last_offset) in pending {
            if earlier.producer_id != batch.producer_id {
                continue;
            }
            match entry.as_mut() {
                Some(e) => e.record(&earlier, base_offset, last_offset),
                None => entry = Some(ProducerEntry::new(&earlier, base_offset, last_offset)),
            }
        }
        check(entry.as_ref(), batch)
    }

    /// Records a batch found in the log (recovery), without checks: the log is the truth.
    pub(crate) fn replay(&mut self, batch: &ProducerBatch, base_offset: i64, last_offset: i64) {
        self.make_room_for(batch.producer_id);
        match self.producers.entry(batch.producer_id) {
            Entry::Vacant(vacant) => {
                vacant.insert(ProducerEntry::new(batch, base_offset, last_offset));
            }
            Entry::Occupied(mut occupied) => occupied.get_mut().record(batch, base_offset, last_offset),
        }
    }

    /// Forgets batches at or after `offset` (rolled back, never acknowledged). A producer left
    /// with no batch becomes unknown: its retries are accepted at any sequence, as in Kafka.
    pub(crate) fn truncate_from(&mut self, offset: i64) {
        self.producers.retain(|_, entry| entry.truncate_from(offset));
    }

    /// The state as of `offset`, for a follower whose log restarts there (a leader's Raft
    /// snapshot): each producer's batches that end below `offset`, and no producer that has none
    /// there — the follower rebuilds the rest from the appends after `offset`, which also bring
    /// back the batches a later one pushed out of the [`BATCHES_RETAINED`] window. A producer's
    /// epoch is its kept batches' epoch (a new epoch starts a new history), and its timestamp,
    /// which only drives expiry, stays that of its latest batch.
    pub(crate) fn as_of(&self, offset: i64) -> ProducerStates {
        let producers = self
            .producers
            .iter()
            .filter_map(|(&id, entry)| {
                let mut kept = *entry;
                kept.len = entry.batches().iter().take_while(|b| b.last_offset < offset).count() as u8;
                (kept.len > 0).then_some((id, kept))
            })
            .collect();
        ProducerStates { producers }
    }

    /// Forgets producers whose last batch is older than [`PRODUCER_EXPIRATION_MS`]; returns how many.
    pub(crate) fn expire(&mut self, now_ms: i64) -> usize {
        let before = self.producers.len();
        self.producers.retain(|_, e| now_ms.saturating_sub(e.last_timestamp_ms) < PRODUCER_EXPIRATION_MS);
        before - self.producers.len()
    }

    /// Keeps the table within [`PRODUCERS_PER_PARTITION_MAX`] before `producer_id` is added: when
    /// full, forgets the least recently active tenth at once, so the sort is paid once per many
    /// new producers.
    fn make_room_for(&mut self, producer_id: i64) {
        if self.producers.len() < PRODUCERS_PER_PARTITION_MAX || self.producers.contains_key(&producer_id) {
            return;
        }
        let mut stamps: Vec<i64> = self.producers.values().map(|e| e.last_timestamp_ms).collect();
        let evict = (PRODUCERS_PER_PARTITION_MAX / 10).max(1);
        let (_, cutoff, _) = stamps.select_nth_unstable(evict - 1);
        let cutoff = *cutoff;
        let mut left = evict;
        self.producers.retain(|_, e| {
            if left > 0 && e.last_timestamp_ms <= cutoff {
                left -= 1;
                return false;
            }
            true
        });
        tracing::warn!(
            producers_max = PRODUCERS_PER_PARTITION_MAX,
            forgotten = evict - left,
            "too many idempotent producers on one partition; forgot the least recently active"
        );
    }

    /// The snapshot file's bytes for this state taken at `offset` (the state after every batch
    /// below it). Producers in id order, so equal states give equal files. Public for the
    /// simulator, which keeps a staged restart's file (`Partition::stage_restart`) in memory.
    pub fn encode_snapshot(&self, offset: i64) -> Vec<u8> {
        let mut ids: Vec<i64> = self.producers.keys().copied().collect();
        ids.sort_unstable();
        let batches: usize = self.producers.values().map(|e| e.len as usize).sum();
        let mut out = Vec::with_capacity(
            SNAPSHOT_HEADER_LEN
                + ids.len() * SNAPSHOT_ENTRY_LEN
                + batches * SNAPSHOT_BATCH_LEN
                + SNAPSHOT_CRC_LEN,
        );
        out.extend_from_slice(SNAPSHOT_MAGIC);
        out.extend_from_slice(&SNAPSHOT_VERSION.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&(ids.len() as u32).to_be_bytes());
        for id in ids {
            let e = &self.producers[&id];
            debug_assert!(e.batches().iter().all(|b| b.last_offset < offset), "snapshot behind its state");
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(&e.epoch.to_be_bytes());
            out.push(e.len);
            out.push(0);
            out.extend_from_slice(&e.last_timestamp_ms.to_be_bytes());
            for b in e.batches() {
                out.extend_from_slice(&b.first_sequence.to_be_bytes());
                out.extend_from_slice(&b.last_sequence.to_be_bytes());
                out.extend_from_slice(&b.base_offset.to_be_bytes());
                out.extend_from_slice(&b.last_offset.to_be_bytes());
            }
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    /// Decodes a snapshot file: `(offset, state)`. Public for the simulator, as `encode_snapshot`.
    pub fn decode_snapshot(bytes: &[u8]) -> Result<(i64, ProducerStates), SnapshotError> {
        if bytes.len() < SNAPSHOT_HEADER_LEN + SNAPSHOT_CRC_LEN {
            return Err(SnapshotError::Truncated { bytes: bytes.len() });
        }
        if &bytes[..4] != SNAPSHOT_MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        let version = u16::from_be_bytes([bytes[4], bytes[5]]);
        if version != SNAPSHOT_VERSION {
            return Err(SnapshotError::UnsupportedVersion { version });
        }
        let (body, crc) = bytes.split_at(bytes.len() - SNAPSHOT_CRC_LEN);
        let stored = u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]);
        let computed = crc32c::crc32c(body);
        if stored != computed {
            return Err(SnapshotError::CrcMismatch { stored, computed });
        }
        let mut r = Reader { buf: body, at: 8 };
        let offset = r.i64()?;
        let count = r.u32()? as usize;
        if offset < 0 {
            return Err(SnapshotError::Malformed("negative offset"));
        }
        if count > PRODUCERS_PER_PARTITION_MAX {
            return Err(SnapshotError::Malformed("more producers than a partition keeps"));
        }
        // Bounded by the bytes present, not by the count field.
        let mut producers = HashMap::with_capacity(count.min(body.len() / SNAPSHOT_ENTRY_LEN));
        for _ in 0..count {
            let id = r.i64()?;
            let epoch = r.i16()?;
            let len = r.u8()?;
            r.u8()?;
            let last_timestamp_ms = r.i64()?;
            if id < 0 {
                return Err(SnapshotError::Malformed("negative producer id"));
            }
            if len == 0 || len as usize > BATCHES_RETAINED {
                return Err(SnapshotError::Malformed("producer batch count out of range"));
            }
            let mut entry = ProducerEntry {
                epoch,
                batches: [BatchMeta::default(); BATCHES_RETAINED],
                len,
                last_timestamp_ms,
            };
            let mut previous_last = -1i64;
            for slot in entry.batches.iter_mut().take(len as usize) {
                let b = BatchMeta {
                    first_sequence: r.i32()?,
                    last_sequence: r.i32()?,
                    base_offset: r.i64()?,
                    last_offset: r.i64()?,
                };
                if b.base_offset <= previous_last || b.base_offset > b.last_offset || b.last_offset >= offset
                {
                    return Err(SnapshotError::Malformed("batch offsets out of order or past the snapshot"));
                }
                if b.first_sequence < 0 || b.last_sequence < 0 {
                    return Err(SnapshotError::Malformed("negative sequence"));
                }
                previous_last = b.last_offset;
                *slot = b;
            }
            if producers.insert(id, entry).is_some() {
                return Err(SnapshotError::Malformed("producer id listed twice"));
            }
        }
        if r.at != body.len() {
            return Err(SnapshotError::Malformed("bytes after the last producer"));
        }
        Ok((offset, ProducerStates { producers }))
    }
}

#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum SnapshotError {
    #[error("{bytes} bytes is too short for a producer snapshot")]
    Truncated { bytes: usize },
    #[error("not a producer snapshot (bad magic)")]
    BadMagic,
    #[error("snapshot format version {version} is newer than this broker reads ({SNAPSHOT_VERSION})")]
    UnsupportedVersion { version: u16 },
    #[error("crc32c mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    CrcMismatch { stored: u32, computed: u32 },
    #[error("malformed: {0}")]
    Malformed(&'static str),
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], SnapshotError> {
        let bytes = self
            .buf
            .get(self.at..self.at + N)
            .ok_or(SnapshotError::Malformed("producer count exceeds the entries present"))?;
        self.at += N;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.take::<1>()?[0])
    }
    fn i16(&mut self) -> Result<i16, SnapshotError> {
        Ok(i16::from_be_bytes(self.take()?))
    }
    fn i32(&mut self) -> Result<i32, SnapshotError> {
        Ok(i32::from_be_bytes(self.take()?))
    }
    fn u32(&mut self) -> Result<u32, SnapshotError> {
        Ok(u32::from_be_bytes(self.take()?))
    }
    fn i64(&mut self) -> Result<i64, SnapshotError> {
        Ok(i64::from_be_bytes(self.take()?))
    }
}

pub(crate) fn snapshot_path(dir: &Path, offset: i64) -> PathBuf {
    dir.join(format!("{offset:020}{SNAPSHOT_SUFFIX}"))
}

/// Parses `<offset:020>.snapshot`.
fn parse_snapshot_name(name: &str) -> Option<i64> {
    let stem = name.strip_suffix(SNAPSHOT_SUFFIX)?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

/// The snapshot files in `dir`, newest (highest offset) first.
pub(crate) fn list_snapshots(dir: &Path) -> std::io::Result<Vec<(i64, PathBuf)>> {
    let mut found: Vec<(i64, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let offset = parse_snapshot_name(entry.file_name().to_str()?)?;
            Some((offset, entry.path()))
        })
        .collect();
    found.sort_unstable_by_key(|(offset, _)| std::cmp::Reverse(*offset));
    Ok(found)
}

/// Removes temporary snapshot files a crash left behind (never renamed into place).
pub(crate) fn remove_temporary_snapshots(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_str().is_some_and(|n| n.ends_with(SNAPSHOT_TEMP_SUFFIX)) {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Writes a snapshot atomically: a temporary file, fsync, rename. The caller syncs the directory
/// (to make the rename durable) before relying on it. Blocking: run off the shard.
pub(crate) fn write_snapshot(dir: &Path, offset: i64, bytes: &[u8]) -> std::io::Result<()> {
    write_snapshot_file(dir, offset, bytes, true)
}

/// Writes a snapshot as `write_snapshot` does but without the fsync, for snapshots nothing relies
/// on being there after a crash: one that is lost or torn fails its crc at load, is removed, and
/// recovery replays from an older one or the log start instead. Blocking: run off the shard.
pub(crate) fn write_snapshot_unsynced(dir: &Path, offset: i64, bytes: &[u8]) -> std::io::Result<()> {
    write_snapshot_file(dir, offset, bytes, false)
}

fn write_snapshot_file(dir: &Path, offset: i64, bytes: &[u8], sync: bool) -> std::io::Result<()> {
    let path = snapshot_path(dir, offset);
    let temp = dir.join(format!("{offset:020}{SNAPSHOT_TEMP_SUFFIX}"));
    let mut file = std::fs::File::create(&temp)?;
    file.write_all(bytes)?;
    if sync {
        file.sync_all()?;
    }
    drop(file);
    std::fs::rename(&temp, &path)
}

/// Where a replica keeps the producers a log restart from its leader's snapshot installs, from
/// before the restart is flagged until it is done. Not a `.snapshot` name: the restart removes
/// every snapshot, and recovery must never take this one for the log's own.
const STAGED_RESTART_NAME: &str = "restart.producers";

pub(crate) fn staged_restart_path(dir: &Path) -> PathBuf {
    dir.join(STAGED_RESTART_NAME)
}

/// Writes the staged restart file (snapshot format, as of the restart's offset) atomically and
/// durably: temporary file, fsync, rename, directory fsync. Blocking: run off the shard.
pub(crate) fn write_staged_restart(dir: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let temp = dir.join(format!("{STAGED_RESTART_NAME}.tmp"));
    let mut file = std::fs::File::create(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temp, staged_restart_path(dir))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Snapshot files kept: the newest, and one older to fall back on if the newest is damaged.
pub(crate) const SNAPSHOTS_KEPT: usize = 2;

/// Removes all but the newest [`SNAPSHOTS_KEPT`] snapshots. Blocking: run off the shard.
pub(crate) fn prune_snapshots(dir: &Path) -> std::io::Result<()> {
    for (_, path) in list_snapshots(dir)?.into_iter().skip(SNAPSHOTS_KEPT) {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pb(producer_id: i64, epoch: i16, first: i32, records: i32) -> ProducerBatch {
        ProducerBatch {
            producer_id,
            epoch,
            first_sequence: first,
            last_sequence: increment_sequence(first, records - 1),
            timestamp_ms: 1_000,
        }
    }

    /// Records in `batch` minus one (its last offset delta), undoing the sequence wrap.
    fn delta(batch: &ProducerBatch) -> i64 {
        let (first, last) = (i64::from(batch.first_sequence), i64::from(batch.last_sequence));
        if last >= first {
            last - first
        } else {
            i64::from(i32::MAX) - first + last + 1
        }
    }

    fn appending(index: usize, batch: ProducerBatch, base_offset: i64) -> Appending {
        Appending { index, batch, base_offset, last_offset: base_offset + delta(&batch) }
    }

    fn one(
        states: &mut ProducerStates,
        batch: ProducerBatch,
        base: i64,
    ) -> Result<RequestVerdict, Rejection> {
        states.apply(&[appending(0, batch, base)], 1).map_err(|r| r.rejection)
    }

    #[test]
    fn sequences_wrap_at_i32_max() {
        assert_eq!(increment_sequence(5, 3), 8);
        assert_eq!(increment_sequence(i32::MAX, 1), 0);
        assert_eq!(increment_sequence(i32::MAX - 1, 3), 1);
        assert_eq!(increment_sequence(i32::MAX, 0), i32::MAX);
        let mut s = ProducerStates::default();
        assert_eq!(one(&mut s, pb(1, 0, i32::MAX - 1, 2), 0), Ok(RequestVerdict::Append));
        assert_eq!(one(&mut s, pb(1, 0, 0, 1), 2), Ok(RequestVerdict::Append));
    }

    #[test]
    fn the_rules() {
        let mut s = ProducerStates::default();
        // Unknown producer: any epoch and sequence.
        assert_eq!(one(&mut s, pb(7, 3, 42, 2), 10), Ok(RequestVerdict::Append));
        // Next in sequence.
        assert_eq!(one(&mut s, pb(7, 3, 44, 1), 12), Ok(RequestVerdict::Append));
        // Retry of the first batch: its original offsets.
        assert_eq!(
            one(&mut s, pb(7, 3, 42, 2), 13),
            Ok(RequestVerdict::Duplicate { base_offset: 10, last_offset: 11 })
        );
        // Same first sequence, different length: not a duplicate, and out of order.
        assert_eq!(
            one(&mut s, pb(7, 3, 42, 1), 13),
            Err(Rejection::OutOfOrder(SequenceGap::Expected { next_sequence: 45 }))
        );
        // A gap.
        assert_eq!(
            one(&mut s, pb(7, 3, 47, 1), 13),
            Err(Rejection::OutOfOrder(SequenceGap::Expected { next_sequence: 45 }))
        );
        // Older epoch: fenced.
        assert_eq!(one(&mut s, pb(7, 2, 45, 1), 13), Err(Rejection::Fenced { current_epoch: 3 }));
        // Newer epoch must start at 0.
        assert_eq!(
            one(&mut s, pb(7, 4, 45, 1), 13),
            Err(Rejection::OutOfOrder(SequenceGap::NewEpoch { current_epoch: 3 }))
        );
        assert_eq!(s.get(7).unwrap().batches().len(), 2, "refused batches are not recorded");
        assert_eq!(one(&mut s, pb(7, 4, 0, 1), 13), Ok(RequestVerdict::Append));
        let e = s.get(7).unwrap();
        assert_eq!((e.epoch(), e.batches().len()), (4, 1), "a new epoch starts a new history");
        // The old epoch's batches are no longer duplicates: fenced.
        assert_eq!(one(&mut s, pb(7, 3, 42, 2), 14), Err(Rejection::Fenced { current_epoch: 4 }));
        // Producers are independent.
        assert_eq!(one(&mut s, pb(8, 0, 0, 1), 14), Ok(RequestVerdict::Append));
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn only_the_last_five_batches_are_duplicates() {
        let mut s = ProducerStates::default();
        for i in 0..8 {
            assert_eq!(one(&mut s, pb(1, 0, i, 1), i64::from(i)), Ok(RequestVerdict::Append));
        }
        for i in 3..8 {
            let want = RequestVerdict::Duplicate { base_offset: i64::from(i), last_offset: i64::from(i) };
            assert_eq!(one(&mut s, pb(1, 0, i, 1), 100), Ok(want));
        }
        assert_eq!(
            one(&mut s, pb(1, 0, 2, 1), 100),
            Err(Rejection::OutOfOrder(SequenceGap::Expected { next_sequence: 8 }))
        );
    }

    #[test]
    fn several_batches_in_one_request() {
        let mut s = ProducerStates::default();
        // In order across the request, and across producers.
        let batches = [
            appending(0, pb(1, 0, 0, 2), 0),
            appending(1, pb(2, 0, 0, 1), 2),
            appending(2, pb(1, 0, 2, 1), 3),
        ];
        assert_eq!(s.apply(&batches, 4), Ok(RequestVerdict::Append));
        assert_eq!(s.get(1).unwrap().batches().len(), 2);
        // All retries: the originals' range.
        let retry = [appending(0, pb(1, 0, 0, 2), 10), appending(1, pb(1, 0, 2, 1), 12)];
        assert_eq!(s.apply(&retry, 2), Ok(RequestVerdict::Duplicate { base_offset: 0, last_offset: 3 }));
        // A retry mixed with a new batch, or with a non-idempotent batch: refused, nothing recorded.
        let mixed = [appending(0, pb(1, 0, 2, 1), 10), appending(1, pb(1, 0, 3, 1), 11)];
        let before = s.clone();
        assert_eq!(
            s.apply(&mixed, 2).map_err(|r| (r.index, r.rejection)),
            Err((0, Rejection::OutOfOrder(SequenceGap::DuplicateAmongNew)))
        );
        assert_eq!(
            s.apply(&[appending(1, pb(1, 0, 2, 1), 10)], 2).map_err(|r| r.rejection),
            Err(Rejection::OutOfOrder(SequenceGap::DuplicateAmongNew))
        );
        // A gap in the second batch refuses the whole request: the first is not recorded.
        let gap = [appending(0, pb(1, 0, 3, 1), 10), appending(1, pb(1, 0, 9, 1), 11)];
        assert_eq!(s.apply(&gap, 2).map_err(|r| r.index), Err(1));
        assert_eq!(s, before);
        // A batch repeating an earlier one of the same request.
        let twice = [appending(0, pb(3, 0, 0, 1), 10), appending(1, pb(3, 0, 0, 1), 11)];
        assert_eq!(
            s.apply(&twice, 2).map_err(|r| (r.index, r.rejection)),
            Err((1, Rejection::OutOfOrder(SequenceGap::DuplicateAmongNew)))
        );
        assert_eq!(s, before);
    }

    #[test]
    fn truncation_and_expiry() {
        let mut s = ProducerStates::default();
        for i in 0..4 {
            one(&mut s, pb(1, 0, i, 1), i64::from(i)).unwrap();
        }
        one(&mut s, pb(2, 0, 0, 1), 4).unwrap();
        s.truncate_from(2);
        assert_eq!(s.get(1).unwrap().batches().len(), 2);
        assert!(s.get(2).is_none(), "a producer with no batch left is unknown");
        assert_eq!(one(&mut s, pb(1, 0, 2, 1), 2), Ok(RequestVerdict::Append), "the cut batch can be resent");

        let mut old = pb(3, 0, 0, 1);
        old.timestamp_ms = 1_000 - PRODUCER_EXPIRATION_MS;
        one(&mut s, old, 3).unwrap();
        assert_eq!(s.expire(1_000), 1);
        assert!(s.get(3).is_none());
        assert!(s.get(1).is_some());
    }

    #[test]
    fn the_state_as_of_an_offset_keeps_the_batches_below_it() {
        let mut s = ProducerStates::default();
        // In log order: producer 1 at 0 and 2; producer 3 at 4 (epoch 0) and 5 (epoch 1: its
        // new history alone is kept); producer 1 at 6; producer 2 at 8. 5 is a batch boundary,
        // as a snapshot's start offset is.
        s.replay(&pb(1, 0, 0, 2), 0, 1);
        s.replay(&pb(1, 0, 2, 2), 2, 3);
        s.replay(&pb(3, 0, 0, 1), 4, 4);
        s.replay(&pb(3, 1, 0, 1), 5, 5);
        s.replay(&pb(1, 0, 4, 2), 6, 7);
        s.replay(&pb(2, 0, 0, 1), 8, 8);

        let at = s.as_of(5);
        assert_eq!(at.get(1).unwrap().batches().iter().map(|b| b.base_offset).collect::<Vec<_>>(), [0, 2]);
        assert!(at.get(2).is_none(), "a producer with nothing below the offset is left out");
        assert!(at.get(3).is_none(), "its epoch-0 batch was forgotten at the new epoch");
        assert_eq!(at.len(), 1);
        // Its snapshot encoding names the offset and holds only what is below it.
        assert_eq!(ProducerStates::decode_snapshot(&at.encode_snapshot(5)), Ok((5, at.clone())));
        // As of the log end: everything. As of the log start: nothing.
        assert_eq!(s.as_of(9), s);
        assert!(s.as_of(0).is_empty());
        // The follower's state after the appends from the offset on is the leader's.
        let mut follower = s.as_of(5);
        follower.replay(&pb(3, 1, 0, 1), 5, 5);
        follower.replay(&pb(1, 0, 4, 2), 6, 7);
        follower.replay(&pb(2, 0, 0, 1), 8, 8);
        assert_eq!(follower, s);
        // The retry of producer 1's batch below the offset is a duplicate there.
        assert_eq!(
            one(&mut s.as_of(5), pb(1, 0, 2, 2), 9),
            Ok(RequestVerdict::Duplicate { base_offset: 2, last_offset: 3 })
        );
    }

    #[test]
    fn the_table_is_bounded() {
        let mut s = ProducerStates::default();
        for id in 0..PRODUCERS_PER_PARTITION_MAX as i64 {
            let mut b = pb(id, 0, 0, 1);
            b.timestamp_ms = id;
            s.replay(&b, id, id);
        }
        assert_eq!(s.len(), PRODUCERS_PER_PARTITION_MAX);
        let newcomer = pb(PRODUCERS_PER_PARTITION_MAX as i64, 0, 0, 1);
        one(&mut s, newcomer, 0).unwrap();
        assert_eq!(s.len(), PRODUCERS_PER_PARTITION_MAX - PRODUCERS_PER_PARTITION_MAX / 10 + 1);
        assert!(s.get(0).is_none(), "the least recently active go first");
        assert!(s.get(PRODUCERS_PER_PARTITION_MAX as i64 - 1).is_some());
    }

    #[test]
    fn snapshots_round_trip_and_reject_damage() {
        let mut s = ProducerStates::default();
        for i in 0..7 {
            s.replay(&pb(i64::from(i % 3), (i / 3) as i16, i, 2), i64::from(i) * 2, i64::from(i) * 2 + 1);
        }
        let bytes = s.encode_snapshot(14);
        assert_eq!(ProducerStates::decode_snapshot(&bytes), Ok((14, s.clone())));
        let empty = ProducerStates::default().encode_snapshot(0);
        assert_eq!(ProducerStates::decode_snapshot(&empty), Ok((0, ProducerStates::default())));

        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x40;
            assert!(ProducerStates::decode_snapshot(&bad).is_err(), "flip at byte {at} accepted");
        }
        for len in 0..bytes.len() {
            assert!(ProducerStates::decode_snapshot(&bytes[..len]).is_err());
        }
        let mut newer = bytes.clone();
        newer[4..6].copy_from_slice(&2u16.to_be_bytes());
        assert_eq!(
            ProducerStates::decode_snapshot(&newer),
            Err(SnapshotError::UnsupportedVersion { version: 2 })
        );
        // A state past the snapshot's offset is refused (a snapshot only covers what is below it).
        let mut past = s.encode_snapshot(14);
        past[8..16].copy_from_slice(&13i64.to_be_bytes());
        let n = past.len() - 4;
        let crc = crc32c::crc32c(&past[..n]);
        past[n..].copy_from_slice(&crc.to_be_bytes());
        assert!(matches!(ProducerStates::decode_snapshot(&past), Err(SnapshotError::Malformed(_))));
    }

    #[test]
    fn snapshot_files_are_written_listed_and_pruned() {
        let tmp = tempfile::tempdir().unwrap();
        for offset in [5i64, 100, 42] {
            write_snapshot(tmp.path(), offset, &ProducerStates::default().encode_snapshot(offset)).unwrap();
        }
        std::fs::write(tmp.path().join("00000000000000000007.snapshot.tmp"), b"torn").unwrap();
        std::fs::write(tmp.path().join("00000000000000000000.log"), b"").unwrap();
        let offsets: Vec<i64> = list_snapshots(tmp.path()).unwrap().into_iter().map(|(o, _)| o).collect();
        assert_eq!(offsets, vec![100, 42, 5]);
        remove_temporary_snapshots(tmp.path()).unwrap();
        assert!(!tmp.path().join("00000000000000000007.snapshot.tmp").exists());
        prune_snapshots(tmp.path()).unwrap();
        let offsets: Vec<i64> = list_snapshots(tmp.path()).unwrap().into_iter().map(|(o, _)| o).collect();
        assert_eq!(offsets, vec![100, 42]);
        assert_eq!(parse_snapshot_name("00000000000000000042.snapshot"), Some(42));
        assert_eq!(parse_snapshot_name("42.snapshot"), None);
        assert_eq!(parse_snapshot_name("00000000000000000042.snapshot.tmp"), None);
    }

    /// (first sequence, last sequence, base offset, last offset) of an appended batch.
    type ModelBatch = (i32, i32, i64, i64);

    /// A reference model of the producers' state, written from the rules as stated: per
    /// producer, the epoch and every batch appended in it.
    #[derive(Clone, Debug, Default)]
    struct Model {
        producers: HashMap<i64, (i16, Vec<ModelBatch>)>,
    }

    impl Model {
        fn apply(&mut self, b: &ProducerBatch, base: i64, last: i64) -> Result<RequestVerdict, Rejection> {
            let Some((epoch, batches)) = self.producers.get_mut(&b.producer_id) else {
                self.producers
                    .insert(b.producer_id, (b.epoch, vec![(b.first_sequence, b.last_sequence, base, last)]));
                return Ok(RequestVerdict::Append);
            };
            if b.epoch < *epoch {
                return Err(Rejection::Fenced { current_epoch: *epoch });
            }
            if b.epoch > *epoch {
                if b.first_sequence != 0 {
                    return Err(Rejection::OutOfOrder(SequenceGap::NewEpoch { current_epoch: *epoch }));
                }
                *epoch = b.epoch;
                *batches = vec![(b.first_sequence, b.last_sequence, base, last)];
                return Ok(RequestVerdict::Append);
            }
            let recent = &batches[batches.len().saturating_sub(BATCHES_RETAINED)..];
            if let Some(d) = recent.iter().find(|d| d.0 == b.first_sequence && d.1 == b.last_sequence) {
                return Ok(RequestVerdict::Duplicate { base_offset: d.2, last_offset: d.3 });
            }
            let last_sequence = batches.last().map_or(-1, |d| d.1);
            let next_sequence = if last_sequence == i32::MAX { 0 } else { last_sequence + 1 };
            if b.first_sequence != next_sequence {
                return Err(Rejection::OutOfOrder(SequenceGap::Expected { next_sequence }));
            }
            batches.push((b.first_sequence, b.last_sequence, base, last));
            Ok(RequestVerdict::Append)
        }
    }

    proptest! {
        /// Random producers replaying, skipping and repeating sequences: the table agrees with the
        /// model on every verdict, and a snapshot taken at any point restores the same verdicts.
        #[test]
        fn agrees_with_the_model(
            ops in prop::collection::vec((0i64..3, 0i16..3, 0i32..12, 1i32..4), 1..120),
            snapshot_at in any::<prop::sample::Index>(),
        ) {
            let mut table = ProducerStates::default();
            let mut model = Model::default();
            let mut offset = 0i64;
            let snapshot_at = snapshot_at.index(ops.len());
            for (i, (producer_id, epoch, first, records)) in ops.into_iter().enumerate() {
                if i == snapshot_at {
                    let (at, restored) = ProducerStates::decode_snapshot(&table.encode_snapshot(offset)).unwrap();
                    prop_assert_eq!(at, offset);
                    prop_assert_eq!(&restored, &table);
                    table = restored;
                }
                let b = pb(producer_id, epoch, first, records);
                let last = offset + i64::from(records) - 1;
                let got = one(&mut table, b, offset);
                let want = model.apply(&b, offset, last);
                prop_assert_eq!(got, want);
                if got == Ok(RequestVerdict::Append) {
                    offset = last + 1;
                }
            }
        }

        /// Replaying the appended batches (recovery) rebuilds exactly the live table.
        #[test]
        fn replay_rebuilds_the_live_state(
            ops in prop::collection::vec((0i64..4, 0i16..3, 0i32..10, 1i32..4), 1..120),
        ) {
            let mut live = ProducerStates::default();
            let mut appended = Vec::new();
            let mut offset = 0i64;
            for (producer_id, epoch, first, records) in ops {
                let b = pb(producer_id, epoch, first, records);
                if one(&mut live, b, offset) == Ok(RequestVerdict::Append) {
                    let last = offset + i64::from(records) - 1;
                    appended.push((b, offset, last));
                    offset = last + 1;
                }
            }
            let mut replayed = ProducerStates::default();
            for (b, base, last) in &appended {
                replayed.replay(b, *base, *last);
            }
            prop_assert_eq!(replayed, live);
        }
    }
}
