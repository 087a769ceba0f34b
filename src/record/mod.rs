//! The record batch format: Kafka's RecordBatch v2 (magic 2), used on the wire and on disk.
//!
//! Owns: parsing and validating the 61-byte batch header and its crc32c, stamping the fields the
//! broker assigns (base offset, partition leader epoch), building batches (`builder`), reading
//! records out of them (`reader`) and the codecs of compressed batches (`compression`, used by the
//! client only: the broker stores batches as sent). Depends on nothing in ringlog; shared by
//! broker and client.
//!
//! Layout of the header (big-endian):
//! ```text
//!  0 base_offset i64 | 8 batch_length i32 | 12 partition_leader_epoch i32 | 16 magic i8
//! 17 crc u32 (crc32c of bytes 21..end) | 21 attributes i16 | 23 last_offset_delta i32
//! 27 base_timestamp i64 | 35 max_timestamp i64 | 43 producer_id i64 | 51 producer_epoch i16
//! 53 base_sequence i32 | 57 record_count i32 | 61 records...
//! ```
//! The crc starts after the partition leader epoch, so the broker may stamp base offset and
//! epoch without recomputing it.

pub mod builder;
pub mod compression;
pub mod reader;

use thiserror::Error;

pub const BATCH_HEADER_LEN: usize = 61;
/// Bytes before `batch_length` counts: base offset and the length field itself.
pub const BATCH_LENGTH_PREFIX: usize = 12;
pub const MAGIC_V2: i8 = 2;

const OFF_BASE_OFFSET: usize = 0;
const OFF_BATCH_LENGTH: usize = 8;
const OFF_LEADER_EPOCH: usize = 12;
const OFF_MAGIC: usize = 16;
const OFF_CRC: usize = 17;
const OFF_ATTRIBUTES: usize = 21;
const OFF_LAST_OFFSET_DELTA: usize = 23;
const OFF_BASE_TIMESTAMP: usize = 27;
const OFF_MAX_TIMESTAMP: usize = 35;
const OFF_PRODUCER_ID: usize = 43;
const OFF_PRODUCER_EPOCH: usize = 51;
const OFF_BASE_SEQUENCE: usize = 53;
const OFF_RECORD_COUNT: usize = 57;

/// Low three bits of `attributes`.
pub const COMPRESSION_MASK: i16 = 0x07;
/// `attributes` bit of a control batch (transaction markers; a new leader's empty entry): written
/// by brokers only (`shard::rules` refuses clients'), skipped by consumers.
pub const CONTROL_FLAG: i16 = 0x20;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BatchError {
    #[error("batch truncated: {available} bytes available, {needed} needed")]
    Truncated { available: usize, needed: usize },
    #[error("batch length {batch_length} is invalid (must cover the {BATCH_HEADER_LEN}-byte header)")]
    BadLength { batch_length: i32 },
    #[error("batch of {batch_bytes} bytes exceeds the limit of {limit_bytes} bytes")]
    TooLarge { batch_bytes: usize, limit_bytes: usize },
    #[error("unsupported batch magic {magic} (only RecordBatch v2, magic 2, is accepted)")]
    BadMagic { magic: i8 },
    #[error("batch crc32c mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    CrcMismatch { stored: u32, computed: u32 },
    #[error("batch has {record_count} records, limit is {limit}")]
    TooManyRecords { record_count: i32, limit: u32 },
    #[error(
        "batch header is inconsistent: record_count {record_count}, last_offset_delta {last_offset_delta}"
    )]
    BadRecordCount { record_count: i32, last_offset_delta: i32 },
    #[error("malformed record {index} in batch: {reason}")]
    BadRecord { index: usize, reason: &'static str },
    #[error("compression codec {codec} is not supported by this reader")]
    UnsupportedCompression { codec: i16 },
}

/// The parsed fixed-size header of one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: i64,
    pub batch_length: i32,
    pub partition_leader_epoch: i32,
    pub magic: i8,
    pub crc: u32,
    pub attributes: i16,
    pub last_offset_delta: i32,
    pub base_timestamp: i64,
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub record_count: i32,
}

/// Limits a producer's batch is checked against before it is appended.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub batch_bytes_max: usize,
    pub records_per_batch_max: u32,
}

fn be_i16(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([b[at], b[at + 1]])
}
fn be_i32(b: &[u8], at: usize) -> i32 {
    i32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be_i64(b: &[u8], at: usize) -> i64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    i64::from_be_bytes(x)
}

impl BatchHeader {
    /// Parses the header at the start of `buf`. Checks only that 61 bytes are there and that the
    /// length field covers a header; use [`validate`] for the full check.
    pub fn parse(buf: &[u8]) -> Result<BatchHeader, BatchError> {
        if buf.len() < BATCH_HEADER_LEN {
            return Err(BatchError::Truncated { available: buf.len(), needed: BATCH_HEADER_LEN });
        }
        let batch_length = be_i32(buf, OFF_BATCH_LENGTH);
        if batch_length < (BATCH_HEADER_LEN - BATCH_LENGTH_PREFIX) as i32 {
            return Err(BatchError::BadLength { batch_length });
        }
        Ok(BatchHeader {
            base_offset: be_i64(buf, OFF_BASE_OFFSET),
            batch_length,
            partition_leader_epoch: be_i32(buf, OFF_LEADER_EPOCH),
            magic: buf[OFF_MAGIC] as i8,
            crc: u32::from_be_bytes([buf[OFF_CRC], buf[OFF_CRC + 1], buf[OFF_CRC + 2], buf[OFF_CRC + 3]]),
            attributes: be_i16(buf, OFF_ATTRIBUTES),
            last_offset_delta: be_i32(buf, OFF_LAST_OFFSET_DELTA),
            base_timestamp: be_i64(buf, OFF_BASE_TIMESTAMP),
            max_timestamp: be_i64(buf, OFF_MAX_TIMESTAMP),
            producer_id: be_i64(buf, OFF_PRODUCER_ID),
            producer_epoch: be_i16(buf, OFF_PRODUCER_EPOCH),
            base_sequence: be_i32(buf, OFF_BASE_SEQUENCE),
            record_count: be_i32(buf, OFF_RECORD_COUNT),
        })
    }

    /// Whole batch size in bytes, including base offset and length fields.
    pub fn total_len(&self) -> usize {
        self.batch_length as usize + BATCH_LENGTH_PREFIX
    }

    pub fn last_offset(&self) -> i64 {
        self.base_offset + i64::from(self.last_offset_delta)
    }

    pub fn compression(&self) -> i16 {
        self.attributes & COMPRESSION_MASK
    }

    pub fn is_control(&self) -> bool {
        self.attributes & CONTROL_FLAG != 0
    }
}

/// Full check of the batch at the start of `buf` as stored or served: length within `buf`, magic,
/// crc32c. Returns the header; the batch occupies `header.total_len()` bytes.
pub fn validate(buf: &[u8]) -> Result<BatchHeader, BatchError> {
    let header = BatchHeader::parse(buf)?;
    let total = header.total_len();
    if buf.len() < total {
        return Err(BatchError::Truncated { available: buf.len(), needed: total });
    }
    if header.magic != MAGIC_V2 {
        return Err(BatchError::BadMagic { magic: header.magic });
    }
    let computed = crc32c::crc32c(&buf[OFF_ATTRIBUTES..total]);
    if computed != header.crc {
        return Err(BatchError::CrcMismatch { stored: header.crc, computed });
    }
    Ok(header)
}

/// [`validate`] plus the checks a producer's batch must pass before it is appended: size and
/// record-count limits, and a record count consistent with the offset delta.
pub fn validate_for_append(buf: &[u8], limits: &BatchLimits) -> Result<BatchHeader, BatchError> {
    let header = BatchHeader::parse(buf)?;
    if header.total_len() > limits.batch_bytes_max {
        return Err(BatchError::TooLarge {
            batch_bytes: header.total_len(),
            limit_bytes: limits.batch_bytes_max,
        });
    }
    let header = validate(buf)?;
    if header.record_count <= 0 || header.last_offset_delta != header.record_count - 1 {
        return Err(BatchError::BadRecordCount {
            record_count: header.record_count,
            last_offset_delta: header.last_offset_delta,
        });
    }
    if header.record_count as u32 > limits.records_per_batch_max {
        return Err(BatchError::TooManyRecords {
            record_count: header.record_count,
            limit: limits.records_per_batch_max,
        });
    }
    Ok(header)
}

/// Stamps the broker-assigned base offset. Outside the crc, so the batch stays valid.
pub fn set_base_offset(batch: &mut [u8], base_offset: i64) {
    debug_assert!(batch.len() >= BATCH_HEADER_LEN);
    batch[OFF_BASE_OFFSET..OFF_BASE_OFFSET + 8].copy_from_slice(&base_offset.to_be_bytes());
}

/// Stamps the partition leader epoch (the Raft term, once replication exists). Outside the crc.
pub fn set_partition_leader_epoch(batch: &mut [u8], epoch: i32) {
    debug_assert!(batch.len() >= BATCH_HEADER_LEN);
    batch[OFF_LEADER_EPOCH..OFF_LEADER_EPOCH + 4].copy_from_slice(&epoch.to_be_bytes());
}

/// Iterates over the whole batches at the front of `buf`, validating each; stops at the first
/// incomplete batch (a fetch may end with one) and yields an error for a damaged one.
pub fn batches(buf: &[u8]) -> Batches<'_> {
    Batches { buf, pos: 0, failed: false }
}

pub struct Batches<'a> {
    buf: &'a [u8],
    pos: usize,
    failed: bool,
}

impl<'a> Iterator for Batches<'a> {
    /// The batch's header and its bytes, or the error and the byte position where it was found.
    type Item = Result<(BatchHeader, &'a [u8]), (usize, BatchError)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let rest = &self.buf[self.pos..];
        let header = match BatchHeader::parse(rest) {
            Ok(h) => h,
            Err(BatchError::Truncated { .. }) => return None,
            Err(e) => {
                self.failed = true;
                return Some(Err((self.pos, e)));
            }
        };
        if rest.len() < header.total_len() {
            return None;
        }
        match validate(rest) {
            Ok(h) => {
                let bytes = &rest[..h.total_len()];
                self.pos += h.total_len();
                Some(Ok((h, bytes)))
            }
            Err(e) => {
                self.failed = true;
                Some(Err((self.pos, e)))
            }
        }
    }
}
