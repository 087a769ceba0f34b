//! Building RecordBatch v2 batches (the client's producer, tests, benchmarks).
//!
//! Owns: encoding records the way Kafka does (zigzag varints, relative offsets and timestamps),
//! filling in the 61-byte header and its crc32c, and compressing a finished batch's records
//! section ([`compress_batch`]). Depends on the header layout in [`crate::record`] and on
//! [`crate::record::compression`]; never allocates per record: records are encoded straight into
//! one growing buffer, their length computed before they are written.

use bytes::{BufMut, BytesMut};

use super::compression::{self, Compression, CompressionError};
use super::{BatchHeader, BATCH_HEADER_LEN, BATCH_LENGTH_PREFIX, COMPRESSION_MASK, CONTROL_FLAG, MAGIC_V2};

/// Kafka clients send -1 for fields only a broker or an idempotent producer fills in.
const NO_PRODUCER_ID: i64 = -1;
const NO_PRODUCER_EPOCH: i16 = -1;
const NO_SEQUENCE: i32 = -1;
const NO_LEADER_EPOCH: i32 = -1;
/// Kafka's timestamp for "none".
const NO_TIMESTAMP: i64 = -1;

/// Kafka's control record type for a new leader's first entry (KRaft's LEADER_CHANGE, KIP-595).
pub const LEADER_CHANGE_CONTROL_TYPE: i16 = 2;

const OFF_BATCH_LENGTH: usize = 8;
const OFF_CRC: usize = 17;
const OFF_ATTRIBUTES: usize = 21;

/// Builds one uncompressed RecordBatch v2. Base offset is 0 (the broker assigns offsets), producer
/// id/epoch/sequence -1, attributes 0 (no compression, CreateTime timestamps).
#[derive(Debug)]
pub struct BatchBuilder {
    buf: BytesMut,
    record_count: i32,
    base_timestamp_ms: i64,
    max_timestamp_ms: i64,
    attributes: i16,
}

impl Default for BatchBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl BatchBuilder {
    pub fn new() -> Self {
        Self::with_capacity(4096)
    }

    /// A builder whose buffer holds `capacity_bytes` (header included) before it grows.
    pub fn with_capacity(capacity_bytes: usize) -> Self {
        let mut buf = BytesMut::with_capacity(capacity_bytes.max(BATCH_HEADER_LEN));
        buf.put_bytes(0, BATCH_HEADER_LEN);
        BatchBuilder { buf, record_count: 0, base_timestamp_ms: -1, max_timestamp_ms: -1, attributes: 0 }
    }

    /// Records pushed so far.
    pub fn len(&self) -> usize {
        self.record_count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.record_count == 0
    }

    /// Size in bytes the finished batch will have.
    pub fn encoded_len(&self) -> usize {
        self.buf.len()
    }

    /// Bytes `push` would add for a record with these fields, so a producer can decide before
    /// pushing whether the record still fits its batch size limit.
    pub fn record_encoded_len(
        &self,
        timestamp_ms: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, &[u8])],
    ) -> usize {
        let body = self.record_body_len(timestamp_ms, key, value, headers);
        varint_len(zigzag32(body as i32)) + body
    }

    /// Appends one record. Its offset delta is its index in the batch; its timestamp is stored
    /// relative to the first record's.
    ///
    /// Panics if a key, value or header is longer than `i32::MAX` bytes or the batch would pass
    /// `i32::MAX` records: Kafka's format cannot express them, and writing them would corrupt it.
    pub fn push(
        &mut self,
        timestamp_ms: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, &[u8])],
    ) {
        assert!(self.record_count < i32::MAX, "record batch is full (i32::MAX records)");
        if self.record_count == 0 {
            self.base_timestamp_ms = timestamp_ms;
            self.max_timestamp_ms = timestamp_ms;
        }
        let body_len = self.record_body_len(timestamp_ms, key, value, headers);
        assert!(body_len <= i32::MAX as usize, "record of {body_len} bytes is too large for RecordBatch v2");
        let before = self.buf.len();
        self.buf.reserve(varint_len(zigzag32(body_len as i32)) + body_len);

        put_varint(&mut self.buf, zigzag32(body_len as i32));
        let body_start = self.buf.len();
        self.buf.put_i8(0); // record attributes: unused in v2
        put_varint(&mut self.buf, zigzag64(timestamp_ms.wrapping_sub(self.base_timestamp_ms)));
        put_varint(&mut self.buf, zigzag32(self.record_count));
        put_nullable_bytes(&mut self.buf, key);
        put_nullable_bytes(&mut self.buf, value);
        put_varint(&mut self.buf, zigzag32(headers.len() as i32));
        for (name, header_value) in headers {
            put_nullable_bytes(&mut self.buf, Some(name.as_bytes()));
            put_nullable_bytes(&mut self.buf, Some(header_value));
        }
        debug_assert_eq!(self.buf.len() - body_start, body_len, "record length computed wrongly");
        debug_assert!(self.buf.len() > before);

        self.max_timestamp_ms = self.max_timestamp_ms.max(timestamp_ms);
        self.record_count += 1;
    }

    /// Fills in the header and returns the batch. An empty builder yields a valid batch with no
    /// records (last offset delta -1), which a broker refuses to append.
    pub fn finish(mut self) -> BytesMut {
        let total = self.buf.len();
        assert!(total - BATCH_LENGTH_PREFIX <= i32::MAX as usize, "record batch exceeds i32::MAX bytes");
        let mut header = &mut self.buf[..BATCH_HEADER_LEN];
        header.put_i64(0); // base offset: assigned by the broker
        header.put_i32((total - BATCH_LENGTH_PREFIX) as i32);
        header.put_i32(NO_LEADER_EPOCH);
        header.put_i8(MAGIC_V2);
        header.put_u32(0); // crc, below
        header.put_i16(self.attributes); // no compression, CreateTime (and control, for one)
        header.put_i32(self.record_count - 1);
        header.put_i64(self.base_timestamp_ms);
        header.put_i64(self.max_timestamp_ms);
        header.put_i64(NO_PRODUCER_ID);
        header.put_i16(NO_PRODUCER_EPOCH);
        header.put_i32(NO_SEQUENCE);
        header.put_i32(self.record_count);
        debug_assert!(header.is_empty());
        let crc = crc32c::crc32c(&self.buf[OFF_ATTRIBUTES..]);
        self.buf[OFF_CRC..OFF_ATTRIBUTES].copy_from_slice(&crc.to_be_bytes());
        self.buf
    }

    /// [`finish`](Self::finish), then [`compress_batch`].
    pub fn finish_compressed(self, compression: Compression) -> Result<BytesMut, CompressionError> {
        let batch = self.finish();
        if compression == Compression::None {
            return Ok(batch);
        }
        compress_batch(&batch, compression)
    }

    fn record_body_len(
        &self,
        timestamp_ms: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, &[u8])],
    ) -> usize {
        let base_timestamp_ms = if self.record_count == 0 { timestamp_ms } else { self.base_timestamp_ms };
        let mut len = 1 // attributes
            + varint_len(zigzag64(timestamp_ms.wrapping_sub(base_timestamp_ms)))
            + varint_len(zigzag32(self.record_count))
            + nullable_bytes_len(key)
            + nullable_bytes_len(value)
            + varint_len(zigzag32(headers.len() as i32));
        for (name, header_value) in headers {
            len += nullable_bytes_len(Some(name.as_bytes())) + nullable_bytes_len(Some(header_value));
        }
        len
    }
}

/// The control batch a replica writes for a new leader's empty Raft entry: one record whose key
/// is (version 0, LEADER_CHANGE), no value and no timestamp, at `base_offset` in `epoch`. Built
/// from those two alone, so every replica writes the same bytes for the same entry; consumers
/// skip control batches.
pub fn leader_change_batch(base_offset: i64, epoch: i32) -> BytesMut {
    let mut key = [0u8; 4];
    key[2..].copy_from_slice(&LEADER_CHANGE_CONTROL_TYPE.to_be_bytes());
    let mut builder = BatchBuilder::with_capacity(BATCH_HEADER_LEN + 16);
    builder.push(NO_TIMESTAMP, Some(&key), None, &[]);
    builder.attributes = CONTROL_FLAG;
    let mut batch = builder.finish();
    super::set_base_offset(&mut batch, base_offset);
    super::set_partition_leader_epoch(&mut batch, epoch);
    batch
}

/// Re-encodes a finished uncompressed batch with its records section compressed by `compression`:
/// same header fields, the codec in the attributes' low bits, length and crc32c recomputed (the
/// crc covers the compressed bytes, as Kafka defines it). `Compression::None` copies the batch.
///
/// Panics if `batch` is not one whole uncompressed batch: only a builder's output belongs here.
pub fn compress_batch(batch: &[u8], compression: Compression) -> Result<BytesMut, CompressionError> {
    let header = BatchHeader::parse(batch);
    assert!(
        matches!(header, Ok(h) if h.compression() == 0 && h.total_len() == batch.len()),
        "compress_batch needs one whole uncompressed batch, got {header:?} for {} bytes",
        batch.len()
    );
    let mut out = Vec::with_capacity(batch.len());
    out.extend_from_slice(&batch[..BATCH_HEADER_LEN]);
    compression::compress(compression, &batch[BATCH_HEADER_LEN..], &mut out)?;
    let batch_length = out.len() - BATCH_LENGTH_PREFIX;
    assert!(batch_length <= i32::MAX as usize, "compressed record batch exceeds i32::MAX bytes");
    out[OFF_BATCH_LENGTH..OFF_BATCH_LENGTH + 4].copy_from_slice(&(batch_length as i32).to_be_bytes());
    let attributes = i16::from_be_bytes([out[OFF_ATTRIBUTES], out[OFF_ATTRIBUTES + 1]]);
    let attributes = (attributes & !COMPRESSION_MASK) | compression.id();
    out[OFF_ATTRIBUTES..OFF_ATTRIBUTES + 2].copy_from_slice(&attributes.to_be_bytes());
    let crc = crc32c::crc32c(&out[OFF_ATTRIBUTES..]);
    out[OFF_CRC..OFF_ATTRIBUTES].copy_from_slice(&crc.to_be_bytes());
    // Through Bytes: it takes the Vec's allocation over, where BytesMut::from(&[u8]) would copy.
    Ok(BytesMut::from(bytes::Bytes::from(out)))
}

fn zigzag32(v: i32) -> u64 {
    u64::from(((v << 1) ^ (v >> 31)) as u32)
}

fn zigzag64(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn varint_len(mut v: u64) -> usize {
    let mut len = 1;
    while v >= 0x80 {
        v >>= 7;
        len += 1;
    }
    len
}

fn put_varint(buf: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        buf.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

fn nullable_bytes_len(bytes: Option<&[u8]>) -> usize {
    match bytes {
        None => varint_len(zigzag32(-1)),
        Some(b) => {
            assert!(
                b.len() <= i32::MAX as usize,
                "field of {} bytes is too large for RecordBatch v2",
                b.len()
            );
            varint_len(zigzag32(b.len() as i32)) + b.len()
        }
    }
}

fn put_nullable_bytes(buf: &mut BytesMut, bytes: Option<&[u8]>) {
    match bytes {
        None => put_varint(buf, zigzag32(-1)),
        Some(b) => {
            put_varint(buf, zigzag32(b.len() as i32));
            buf.put_slice(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{validate, validate_for_append, BatchLimits};

    #[test]
    fn a_leader_change_batch_is_one_control_record_the_same_on_every_replica() {
        let batch = leader_change_batch(41, 7);
        assert_eq!(batch, leader_change_batch(41, 7), "built from offset and epoch alone");
        let limits = BatchLimits { batch_bytes_max: 1 << 20, records_per_batch_max: 10 };
        let header = validate_for_append(&batch, &limits).unwrap();
        assert!(header.is_control());
        assert_eq!((header.base_offset, header.last_offset(), header.partition_leader_epoch), (41, 41, 7));
        assert_eq!((header.record_count, header.max_timestamp), (1, NO_TIMESTAMP));
        assert_eq!(header.total_len(), batch.len());
        // Kafka's control record key: version 0, then the type.
        let key = [0u8, 0, 0, LEADER_CHANGE_CONTROL_TYPE as u8];
        assert!(batch.windows(4).any(|w| w == key));
    }

    #[test]
    fn varints_match_kafka_encoding() {
        // Values from Kafka's ByteUtilsTest (zigzag: 0→0, -1→1, 1→2, 63→126, -64→127, 64→128).
        let cases: &[(i32, &[u8])] = &[
            (0, &[0x00]),
            (-1, &[0x01]),
            (1, &[0x02]),
            (63, &[0x7e]),
            (-64, &[0x7f]),
            (64, &[0x80, 0x01]),
            (i32::MAX, &[0xfe, 0xff, 0xff, 0xff, 0x0f]),
            (i32::MIN, &[0xff, 0xff, 0xff, 0xff, 0x0f]),
        ];
        for (v, want) in cases {
            let mut buf = BytesMut::new();
            put_varint(&mut buf, zigzag32(*v));
            assert_eq!(&buf[..], *want, "varint of {v}");
            assert_eq!(varint_len(zigzag32(*v)), want.len());
        }
        let mut buf = BytesMut::new();
        put_varint(&mut buf, zigzag64(i64::MIN));
        assert_eq!(buf.len(), 10);
    }

    /// One record (null key, value "v", no headers) laid out by hand from Kafka's
    /// "Record" and "RecordBatch" specification (KIP-98 / kafka.apache.org protocol docs).
    #[test]
    fn golden_single_record_batch() {
        let mut b = BatchBuilder::new();
        b.push(1_700_000_000_000, None, Some(b"v"), &[]);
        let batch = b.finish();

        let mut want: Vec<u8> = Vec::new();
        want.extend_from_slice(&0i64.to_be_bytes()); // base offset
        want.extend_from_slice(&(61 - 12 + 8i32).to_be_bytes()); // batch length: header rest + record
        want.extend_from_slice(&(-1i32).to_be_bytes()); // partition leader epoch
        want.push(2); // magic
        want.extend_from_slice(&[0, 0, 0, 0]); // crc placeholder, checked below
        want.extend_from_slice(&0i16.to_be_bytes()); // attributes
        want.extend_from_slice(&0i32.to_be_bytes()); // last offset delta
        want.extend_from_slice(&1_700_000_000_000i64.to_be_bytes()); // base timestamp
        want.extend_from_slice(&1_700_000_000_000i64.to_be_bytes()); // max timestamp
        want.extend_from_slice(&(-1i64).to_be_bytes()); // producer id
        want.extend_from_slice(&(-1i16).to_be_bytes()); // producer epoch
        want.extend_from_slice(&(-1i32).to_be_bytes()); // base sequence
        want.extend_from_slice(&1i32.to_be_bytes()); // record count
                                                     // length 7 (zigzag 14), attributes 0, ts delta 0, offset delta 0, key -1 (zigzag 1),
                                                     // value length 1 (zigzag 2), 'v', header count 0.
        want.extend_from_slice(&[0x0e, 0x00, 0x00, 0x00, 0x01, 0x02, b'v', 0x00]);
        let crc = crc32c::crc32c(&want[21..]);
        want[17..21].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(&batch[..], &want[..]);

        // The crc32c crate is Castagnoli: check value of the standard test vector.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn header_fields_and_limits() {
        let mut b = BatchBuilder::with_capacity(0);
        assert!(b.is_empty());
        b.push(100, Some(b"k"), Some(b"a"), &[("h", b"x")]);
        b.push(50, None, None, &[]);
        b.push(300, Some(b""), Some(b""), &[]);
        let predicted = b.encoded_len();
        assert_eq!(b.len(), 3);
        let batch = b.finish();
        assert_eq!(batch.len(), predicted);
        let header =
            validate_for_append(&batch, &BatchLimits { batch_bytes_max: 1 << 20, records_per_batch_max: 10 })
                .unwrap();
        assert_eq!(header.record_count, 3);
        assert_eq!(header.last_offset_delta, 2);
        assert_eq!(header.base_timestamp, 100);
        assert_eq!(header.max_timestamp, 300);
        assert_eq!(header.producer_id, -1);
        assert_eq!(header.partition_leader_epoch, -1);
        assert_eq!(header.compression(), 0);
    }

    #[test]
    fn record_encoded_len_predicts_push() {
        let mut b = BatchBuilder::new();
        for i in 0..200i64 {
            let value = vec![7u8; i as usize * 3];
            let predicted = b.record_encoded_len(i * 1000 - 5000, Some(b"key"), Some(&value), &[("a", b"b")]);
            let before = b.encoded_len();
            b.push(i * 1000 - 5000, Some(b"key"), Some(&value), &[("a", b"b")]);
            assert_eq!(b.encoded_len() - before, predicted);
        }
        validate(&b.finish()).unwrap();
    }

    /// Compressing keeps every header field but the codec, length and crc, which the crc covers.
    #[test]
    fn compressed_batches_keep_their_header() {
        let mut b = BatchBuilder::new();
        for i in 0..100i64 {
            b.push(1_000 + i * 7, Some(b"key"), Some(b"a value that repeats, a value that repeats"), &[]);
        }
        let plain = b.finish();
        let plain_header = validate(&plain).unwrap();
        for codec in Compression::ALL {
            let mut again = BatchBuilder::new();
            for i in 0..100i64 {
                again.push(
                    1_000 + i * 7,
                    Some(b"key"),
                    Some(b"a value that repeats, a value that repeats"),
                    &[],
                );
            }
            let batch = again.finish_compressed(codec).unwrap();
            assert_eq!(batch, compress_batch(&plain, codec).unwrap(), "{codec}: deterministic");
            let header = validate(&batch).unwrap();
            assert_eq!(header.total_len(), batch.len());
            assert_eq!(header.compression(), codec.id());
            assert_eq!(
                BatchHeader {
                    batch_length: plain_header.batch_length,
                    crc: plain_header.crc,
                    attributes: 0,
                    ..header
                },
                plain_header,
                "{codec}"
            );
            if codec != Compression::None {
                assert!(batch.len() < plain.len() / 3, "{codec}: {} of {} bytes", batch.len(), plain.len());
                let mut damaged = batch.to_vec();
                let last = damaged.len() - 1;
                damaged[last] ^= 1;
                assert!(matches!(validate(&damaged), Err(crate::record::BatchError::CrcMismatch { .. })));
            }
        }
    }

    #[test]
    fn empty_batch_is_well_formed_but_not_appendable() {
        let batch = BatchBuilder::new().finish();
        let header = validate(&batch).unwrap();
        assert_eq!(header.record_count, 0);
        let limits = BatchLimits { batch_bytes_max: 1 << 20, records_per_batch_max: 10 };
        assert!(validate_for_append(&batch, &limits).is_err());
    }
}
