//! Reading records out of a RecordBatch v2 batch: zero-copy when it is uncompressed.
//!
//! Owns: decoding Kafka's record encoding (zigzag varints, relative offsets and timestamps), and
//! the two ways in: [`records`] borrows keys and values straight from an uncompressed batch and
//! refuses compressed ones (the broker uses it and must never inflate a batch); [`decode`] reads
//! any batch, borrowing from an uncompressed one (no allocation) and inflating a compressed one
//! into one owned buffer, bounded by the caller's limit. Depends on the header parser in
//! [`crate::record`] and on [`crate::record::compression`]. Every length and varint read from the
//! batch is bounded by the bytes that are there: malformed input is a [`BatchError::BadRecord`],
//! never a panic or an out-of-bounds slice.

use bytes::Bytes;
use thiserror::Error;

use super::compression::{self, Compression, CompressionError};
use super::{BatchError, BatchHeader, BATCH_HEADER_LEN};

/// Attributes bit 3: the broker set every record's timestamp to the batch's max timestamp.
const TIMESTAMP_TYPE_LOG_APPEND: i16 = 0x08;
/// The smallest encoded record: length, attributes, timestamp delta, offset delta, key length,
/// value length and header count, one byte each.
const RECORD_BYTES_MIN: usize = 7;
/// A reader's default bound on a batch's decompressed records section. Kafka's default batch limit
/// is 1 MiB compressed; this leaves room for a 64× ratio while a hostile batch costs at most this.
pub const DECOMPRESSED_BYTES_MAX_DEFAULT: usize = 64 << 20;

/// One record, borrowing its key, value and headers from the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub offset: i64,
    pub timestamp_ms: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub headers: Headers<'a>,
}

/// Iterates over the records of a batch. Fused: after the first error it yields nothing.
#[derive(Debug, Clone)]
pub struct RecordIter<'a> {
    header: BatchHeader,
    rest: &'a [u8],
    index: usize,
    failed: bool,
}

/// Why [`decode`] could not read a batch: the batch itself, or its compressed records section.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error(transparent)]
    Compression(#[from] CompressionError),
}

/// Iterates over the records of an uncompressed `batch` (one whole batch, normally checked by
/// [`crate::record::validate`] first), borrowing from it. A compressed batch is refused with
/// [`BatchError::UnsupportedCompression`]: read it with [`decode`].
pub fn records(batch: &[u8]) -> Result<RecordIter<'_>, BatchError> {
    let (header, section) = records_section(batch)?;
    if header.compression() != 0 {
        return Err(BatchError::UnsupportedCompression { codec: header.compression() });
    }
    Ok(RecordIter::new(header, section))
}

/// Reads any batch (one whole batch, normally checked by [`crate::record::validate`] first):
/// an uncompressed one is borrowed as [`records`] does; a compressed one (gzip, snappy, lz4,
/// zstd) is inflated into one owned buffer of at most `decompressed_bytes_max` bytes. Codec ids
/// 5..7 are [`BatchError::UnsupportedCompression`].
pub fn decode(batch: &[u8], decompressed_bytes_max: usize) -> Result<BatchRecords<'_>, DecodeError> {
    let (header, section) = records_section(batch)?;
    let codec = Compression::from_attributes(header.attributes)?;
    if codec == Compression::None {
        return Ok(BatchRecords { header, section: Section::Borrowed(section) });
    }
    // Refuse without inflating a batch whose record count alone cannot fit the limit.
    if (header.record_count as usize).saturating_mul(RECORD_BYTES_MIN) > decompressed_bytes_max {
        return Err(CompressionError::TooLarge { codec, limit_bytes: decompressed_bytes_max }.into());
    }
    let inflated = compression::decompress(codec, section, decompressed_bytes_max)?;
    Ok(BatchRecords { header, section: Section::Decompressed(Bytes::from(inflated)) })
}

/// The header and records section of a whole batch, with a usable record count.
fn records_section(batch: &[u8]) -> Result<(BatchHeader, &[u8]), BatchError> {
    let header = BatchHeader::parse(batch)?;
    let total = header.total_len();
    if batch.len() < total {
        return Err(BatchError::Truncated { available: batch.len(), needed: total });
    }
    if header.record_count < 0 {
        return Err(BatchError::BadRecordCount {
            record_count: header.record_count,
            last_offset_delta: header.last_offset_delta,
        });
    }
    Ok((header, &batch[BATCH_HEADER_LEN..total]))
}

/// A batch ready to be read by [`decode`]: its header and its records section, borrowed from
/// the batch or inflated.
#[derive(Debug, Clone)]
pub struct BatchRecords<'a> {
    header: BatchHeader,
    section: Section<'a>,
}

#[derive(Debug, Clone)]
enum Section<'a> {
    Borrowed(&'a [u8]),
    Decompressed(Bytes),
}

impl BatchRecords<'_> {
    /// The batch's header (its attributes still name the codec).
    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    /// The inflated records section, for a caller that hands out owned views of keys and values
    /// (`Bytes::slice_ref`); `None` when the records borrow the batch itself.
    pub fn decompressed(&self) -> Option<&Bytes> {
        match &self.section {
            Section::Borrowed(_) => None,
            Section::Decompressed(bytes) => Some(bytes),
        }
    }

    /// Iterates over the records.
    pub fn iter(&self) -> RecordIter<'_> {
        let section: &[u8] = match &self.section {
            Section::Borrowed(section) => section,
            Section::Decompressed(bytes) => bytes,
        };
        RecordIter::new(self.header, section)
    }
}

impl<'r> IntoIterator for &'r BatchRecords<'_> {
    type Item = Result<Record<'r>, BatchError>;
    type IntoIter = RecordIter<'r>;

    fn into_iter(self) -> RecordIter<'r> {
        self.iter()
    }
}

impl<'a> RecordIter<'a> {
    fn new(header: BatchHeader, section: &'a [u8]) -> RecordIter<'a> {
        debug_assert!(header.record_count >= 0);
        RecordIter { header, rest: section, index: 0, failed: false }
    }

    /// The batch's header.
    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    fn bad(&mut self, reason: &'static str) -> Option<Result<Record<'a>, BatchError>> {
        self.failed = true;
        Some(Err(BatchError::BadRecord { index: self.index, reason }))
    }
}

impl<'a> Iterator for RecordIter<'a> {
    type Item = Result<Record<'a>, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        if self.index >= self.header.record_count as usize {
            if !self.rest.is_empty() {
                return self.bad("bytes left after the last record");
            }
            return None;
        }
        let mut cursor = Cursor { buf: self.rest };
        let Some(body_len) = cursor.varint32() else { return self.bad("bad record length varint") };
        if body_len < 0 || body_len as usize > cursor.buf.len() {
            return self.bad("record length exceeds the batch");
        }
        let (body, after) = cursor.buf.split_at(body_len as usize);
        match parse_record(body) {
            Ok(fields) => {
                self.rest = after;
                self.index += 1;
                let timestamp_ms = if self.header.attributes & TIMESTAMP_TYPE_LOG_APPEND != 0 {
                    self.header.max_timestamp
                } else {
                    self.header.base_timestamp.wrapping_add(fields.timestamp_delta)
                };
                Some(Ok(Record {
                    offset: self.header.base_offset.wrapping_add(i64::from(fields.offset_delta)),
                    timestamp_ms,
                    key: fields.key,
                    value: fields.value,
                    headers: fields.headers,
                }))
            }
            Err(reason) => self.bad(reason),
        }
    }
}

struct RecordFields<'a> {
    timestamp_delta: i64,
    offset_delta: i32,
    key: Option<&'a [u8]>,
    value: Option<&'a [u8]>,
    headers: Headers<'a>,
}

fn parse_record(body: &[u8]) -> Result<RecordFields<'_>, &'static str> {
    let mut c = Cursor { buf: body };
    c.byte().ok_or("missing record attributes")?;
    let timestamp_delta = c.varint64().ok_or("bad timestamp delta varint")?;
    let offset_delta = c.varint32().ok_or("bad offset delta varint")?;
    let key = c.nullable_bytes().ok_or("bad key length")?;
    let value = c.nullable_bytes().ok_or("bad value length")?;
    let header_count = c.varint32().ok_or("bad header count varint")?;
    if header_count < 0 {
        return Err("negative header count");
    }
    let headers_start = c.buf;
    for _ in 0..header_count {
        let name = c.nullable_bytes().ok_or("bad header key length")?.ok_or("null header key")?;
        std::str::from_utf8(name).map_err(|_| "header key is not UTF-8")?;
        c.nullable_bytes().ok_or("bad header value length")?;
    }
    if !c.buf.is_empty() {
        return Err("bytes left after the record's headers");
    }
    Ok(RecordFields {
        timestamp_delta,
        offset_delta,
        key,
        value,
        headers: Headers { buf: headers_start, remaining: header_count as usize },
    })
}

/// A record's headers: (key, value) pairs, already checked when the record was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Headers<'a> {
    buf: &'a [u8],
    remaining: usize,
}

impl<'a> Headers<'a> {
    pub fn len(&self) -> usize {
        self.remaining
    }

    pub fn is_empty(&self) -> bool {
        self.remaining == 0
    }
}

impl<'a> Iterator for Headers<'a> {
    type Item = (&'a str, Option<&'a [u8]>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        let mut c = Cursor { buf: self.buf };
        // Checked by parse_record: a failure here means the headers were not built by it.
        let name = c.nullable_bytes()??;
        let name = std::str::from_utf8(name).ok()?;
        let value = c.nullable_bytes()?;
        self.buf = c.buf;
        self.remaining -= 1;
        Some((name, value))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.buf.split_first()?;
        self.buf = rest;
        Some(b)
    }

    /// An unsigned LEB128 of at most `max_bytes` bytes.
    fn unsigned(&mut self, max_bytes: u32) -> Option<u64> {
        let mut value = 0u64;
        for i in 0..max_bytes {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    fn varint32(&mut self) -> Option<i32> {
        let raw = self.unsigned(5)?;
        let raw = u32::try_from(raw).ok()?;
        Some(((raw >> 1) as i32) ^ -((raw & 1) as i32))
    }

    fn varint64(&mut self) -> Option<i64> {
        let raw = self.unsigned(10)?;
        Some(((raw >> 1) as i64) ^ -((raw & 1) as i64))
    }

    /// A varint length (-1 = null) followed by that many bytes.
    fn nullable_bytes(&mut self) -> Option<Option<&'a [u8]>> {
        let len = self.varint32()?;
        if len == -1 {
            return Some(None);
        }
        let len = usize::try_from(len).ok()?;
        if len > self.buf.len() {
            return None;
        }
        let (bytes, rest) = self.buf.split_at(len);
        self.buf = rest;
        Some(Some(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::builder::{compress_batch, BatchBuilder};
    use crate::record::{set_base_offset, validate, COMPRESSION_MASK};
    use proptest::prelude::*;

    type TestRecord = (i64, Option<Vec<u8>>, Option<Vec<u8>>, Vec<(String, Vec<u8>)>);

    fn arb_record() -> impl Strategy<Value = TestRecord> {
        (
            any::<i64>(),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300)),
            proptest::collection::vec(
                ("[a-z\\u{e9}]{0,8}", proptest::collection::vec(any::<u8>(), 0..20)),
                0..4,
            ),
        )
    }

    fn build(records: &[TestRecord]) -> bytes::BytesMut {
        let mut b = BatchBuilder::new();
        for (ts, key, value, headers) in records {
            let headers: Vec<(&str, &[u8])> =
                headers.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
            b.push(*ts, key.as_deref(), value.as_deref(), &headers);
        }
        b.finish()
    }

    proptest! {
        #[test]
        /// Every codec: build, compress, validate (crc over the compressed bytes), decode.
        fn builder_validate_reader_round_trip(
            input in proptest::collection::vec(arb_record(), 1..30),
            base_offset in 0i64..1 << 40,
        ) {
            let records = input;
            let plain = build(&records);
            for codec in Compression::ALL {
                let mut batch = compress_batch(&plain, codec).unwrap();
                set_base_offset(&mut batch, base_offset);
                let header = validate(&batch).unwrap();
                prop_assert_eq!(header.compression(), codec.id());
                prop_assert_eq!(header.record_count as usize, records.len());
                prop_assert_eq!(header.max_timestamp, records.iter().map(|r| r.0).max().unwrap());
                let decoded = decode(&batch, 1 << 20).unwrap();
                prop_assert_eq!(decoded.decompressed().is_some(), codec != Compression::None);
                let read: Vec<Record<'_>> = decoded.iter().collect::<Result<_, _>>().unwrap();
                prop_assert_eq!(read.len(), records.len());
                for (i, (got, (ts, key, value, headers))) in read.iter().zip(&records).enumerate() {
                    prop_assert_eq!(got.offset, base_offset + i as i64);
                    prop_assert_eq!(got.timestamp_ms, *ts);
                    prop_assert_eq!(got.key, key.as_deref());
                    prop_assert_eq!(got.value, value.as_deref());
                    let got_headers: Vec<(&str, Option<&[u8]>)> = got.headers.collect();
                    let want_headers: Vec<(&str, Option<&[u8]>)> =
                        headers.iter().map(|(k, v)| (k.as_str(), Some(v.as_slice()))).collect();
                    prop_assert_eq!(got_headers, want_headers);
                }
            }
        }

        /// Garbage behind a valid header with a codec set: an error value, never a panic.
        #[test]
        fn decode_never_panics_on_garbage_sections(
            codec in 1i16..8,
            section in proptest::collection::vec(any::<u8>(), 0..400),
            record_count in 0i32..20,
        ) {
            let mut batch = build(&[(1, None, None, vec![])]).to_vec();
            batch.truncate(BATCH_HEADER_LEN);
            batch.extend_from_slice(&section);
            patch_header(&mut batch, codec, record_count);
            match decode(&batch, 1 << 16) {
                Ok(decoded) => {
                    for r in decoded.iter().flatten() {
                        r.headers.for_each(drop);
                    }
                }
                Err(DecodeError::Batch(e)) => {
                    prop_assert_eq!(e, BatchError::UnsupportedCompression { codec });
                }
                Err(DecodeError::Compression(_)) => {}
            }
        }

        #[test]
        fn reader_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            if let Ok(iter) = records(&bytes) {
                for r in iter.flatten() {
                    r.headers.for_each(drop);
                }
            }
        }

        #[test]
        fn reader_never_panics_on_corrupted_records(
            input in proptest::collection::vec(arb_record(), 1..5),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
        ) {
            let mut batch = build(&input).to_vec();
            for (at, byte) in flips {
                // Damage only the record region so the header still parses.
                let len = batch.len() - BATCH_HEADER_LEN;
                batch[BATCH_HEADER_LEN + at % len] = byte;
            }
            let n = (cut % batch.len()).max(BATCH_HEADER_LEN);
            batch.truncate(n);
            let len = (n - 12) as i32;
            batch[8..12].copy_from_slice(&len.to_be_bytes());
            if let Ok(iter) = records(&batch) {
                let mut errors = 0;
                for r in iter {
                    match r {
                        Ok(r) => r.headers.for_each(drop),
                        Err(e) => {
                            let is_bad_record = matches!(e, BatchError::BadRecord { .. });
                            prop_assert!(is_bad_record, "unexpected error {:?}", e);
                            errors += 1;
                        }
                    }
                }
                prop_assert!(errors <= 1);
            }
        }
    }

    /// Sets the codec, record count, length and crc of a batch whose section was replaced.
    fn patch_header(batch: &mut [u8], codec: i16, record_count: i32) {
        let length = (batch.len() - 12) as i32;
        batch[8..12].copy_from_slice(&length.to_be_bytes());
        let attributes = (i16::from_be_bytes([batch[21], batch[22]]) & !COMPRESSION_MASK) | codec;
        batch[21..23].copy_from_slice(&attributes.to_be_bytes());
        batch[23..27].copy_from_slice(&(record_count - 1).to_be_bytes());
        batch[57..61].copy_from_slice(&record_count.to_be_bytes());
        let crc = crc32c::crc32c(&batch[21..]);
        batch[17..21].copy_from_slice(&crc.to_be_bytes());
    }

    fn records_of(batch: &[u8]) -> Vec<Record<'_>> {
        records(batch).unwrap().collect::<Result<Vec<_>, _>>().unwrap()
    }

    /// `records` is the broker's reader: it must never inflate, so it refuses every codec.
    #[test]
    fn records_refuses_compressed_batches_and_decode_refuses_undefined_codecs() {
        let plain = build(&[(1, None, Some(b"x".to_vec()), vec![])]);
        let snappy = compress_batch(&plain, Compression::Snappy).unwrap();
        assert_eq!(records(&snappy).err(), Some(BatchError::UnsupportedCompression { codec: 2 }));
        for codec in 5..=7 {
            let mut batch = plain.to_vec();
            patch_header(&mut batch, codec, 1);
            validate(&batch).unwrap();
            let err = decode(&batch, 1 << 20).err();
            assert_eq!(err, Some(DecodeError::Batch(BatchError::UnsupportedCompression { codec })));
        }
    }

    /// An uncompressed batch through `decode`: no buffer of its own, records point into the batch.
    #[test]
    fn decode_borrows_uncompressed_batches() {
        let batch = build(&[(1, Some(b"k".to_vec()), Some(b"value".to_vec()), vec![])]);
        let decoded = decode(&batch, 0).unwrap();
        assert!(decoded.decompressed().is_none());
        let record = decoded.iter().next().unwrap().unwrap();
        let range = batch.as_ptr_range();
        assert!(range.contains(&record.value.unwrap().as_ptr()));
        assert!(range.contains(&record.key.unwrap().as_ptr()));
    }

    /// A compressed section that is damaged but carries a valid crc32c (a buggy or hostile
    /// producer computed it over the damage) and one that inflates past the limit: typed errors.
    #[test]
    fn corrupt_and_oversized_compressed_batches_are_typed_errors() {
        let value = vec![b'z'; 1000];
        let records: Vec<TestRecord> = (0..200).map(|i| (i, None, Some(value.clone()), vec![])).collect();
        let plain = build(&records);
        for codec in [Compression::Gzip, Compression::Snappy, Compression::Lz4, Compression::Zstd] {
            let compressed = compress_batch(&plain, codec).unwrap();
            let section_len = compressed.len() - BATCH_HEADER_LEN;

            let limit = plain.len() / 2;
            assert_eq!(
                decode(&compressed, limit).err(),
                Some(DecodeError::Compression(CompressionError::TooLarge { codec, limit_bytes: limit })),
                "{codec}"
            );

            let mut cut = compressed[..BATCH_HEADER_LEN + section_len / 2].to_vec();
            patch_header(&mut cut, codec.id(), 200);
            validate(&cut).unwrap();
            match decode(&cut, 1 << 20) {
                Err(DecodeError::Compression(CompressionError::Corrupt { codec: c, .. })) => {
                    assert_eq!(c, codec)
                }
                other => panic!("{codec}: a section cut in half gave {other:?}"),
            }
        }
        // A batch claiming more records than the limit could hold is refused before inflating.
        let mut claim = compress_batch(&plain, Compression::Gzip).unwrap().to_vec();
        patch_header(&mut claim, Compression::Gzip.id(), 1_000_000);
        assert_eq!(
            decode(&claim, 1 << 20).err(),
            Some(DecodeError::Compression(CompressionError::TooLarge {
                codec: Compression::Gzip,
                limit_bytes: 1 << 20
            }))
        );
        // The records inside a well-compressed section are checked like any others.
        let mut short = compress_batch(&plain, Compression::Lz4).unwrap().to_vec();
        patch_header(&mut short, Compression::Lz4.id(), 201);
        let decoded = decode(&short, 1 << 20).unwrap();
        let results: Vec<_> = decoded.iter().collect();
        assert!(matches!(results.last(), Some(Err(BatchError::BadRecord { index: 200, .. }))));
    }

    const FIXTURE_BASE_OFFSET: i64 = 1000;
    const FIXTURE_BASE_TIMESTAMP_MS: i64 = 1_700_000_000_000;
    const FIXTURE_TIMESTAMP_DELTAS_MS: [i64; 6] = [0, 40, -20, 75, 10, 30];

    type OwnedRecord = (i64, i64, Option<Vec<u8>>, Option<Vec<u8>>, Vec<(String, Option<Vec<u8>>)>);

    /// The records `tests/fixtures/kafka-batches/generate.py` writes, at `FIXTURE_BASE_OFFSET`.
    fn fixture_records() -> Vec<OwnedRecord> {
        FIXTURE_TIMESTAMP_DELTAS_MS
            .iter()
            .enumerate()
            .map(|(i, delta)| {
                let key = (i != 0).then(|| format!("key-{i}").into_bytes());
                let value =
                    (i != 4).then(|| format!("value {i} of the fixture batch; ").repeat(12).into_bytes());
                let mut headers = Vec::new();
                if i % 2 == 1 {
                    headers.push(("trace".to_owned(), Some(format!("t-{i}").into_bytes())));
                    headers.push(("empty".to_owned(), Some(Vec::new())));
                }
                if i == 5 {
                    headers.push(("null-value".to_owned(), None));
                }
                (FIXTURE_BASE_OFFSET + i as i64, FIXTURE_BASE_TIMESTAMP_MS + delta, key, value, headers)
            })
            .collect()
    }

    fn owned(r: &Record<'_>) -> OwnedRecord {
        let headers = r.headers.map(|(k, v)| (k.to_owned(), v.map(<[u8]>::to_vec))).collect();
        (r.offset, r.timestamp_ms, r.key.map(<[u8]>::to_vec), r.value.map(<[u8]>::to_vec), headers)
    }

    /// Batches written by kafka-python's DefaultRecordBatchBuilder, one per codec and framing.
    #[test]
    fn kafka_python_batches_decode_to_their_records() {
        let fixtures: [(&str, &[u8], Compression); 6] = [
            ("none", include_bytes!("../../tests/fixtures/kafka-batches/none.bin"), Compression::None),
            ("gzip", include_bytes!("../../tests/fixtures/kafka-batches/gzip.bin"), Compression::Gzip),
            (
                "snappy-xerial",
                include_bytes!("../../tests/fixtures/kafka-batches/snappy-xerial.bin"),
                Compression::Snappy,
            ),
            (
                "snappy-raw",
                include_bytes!("../../tests/fixtures/kafka-batches/snappy-raw.bin"),
                Compression::Snappy,
            ),
            ("lz4", include_bytes!("../../tests/fixtures/kafka-batches/lz4.bin"), Compression::Lz4),
            ("zstd", include_bytes!("../../tests/fixtures/kafka-batches/zstd.bin"), Compression::Zstd),
        ];
        for (name, bytes, codec) in fixtures {
            let mut batch = bytes.to_vec();
            set_base_offset(&mut batch, FIXTURE_BASE_OFFSET);
            let header = validate(&batch).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(header.total_len(), batch.len(), "{name}");
            assert_eq!(header.compression(), codec.id(), "{name}");
            assert_eq!(
                (header.producer_id, header.producer_epoch, header.base_sequence, header.record_count),
                (4242, 3, 100, 6),
                "{name}"
            );
            assert_eq!(header.base_timestamp, FIXTURE_BASE_TIMESTAMP_MS, "{name}");
            assert_eq!(header.max_timestamp, FIXTURE_BASE_TIMESTAMP_MS + 75, "{name}");
            let decoded = decode(&batch, 1 << 20).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(decoded.decompressed().is_some(), codec != Compression::None, "{name}");
            let got: Vec<OwnedRecord> = decoded.iter().map(|r| owned(&r.unwrap())).collect();
            assert_eq!(got, fixture_records(), "{name}");
        }
    }

    #[test]
    fn log_append_time_uses_max_timestamp() {
        let mut batch = build(&[(10, None, None, vec![]), (20, None, None, vec![])]);
        batch[22] |= 0x08;
        let read = records_of(&batch);
        assert!(read.iter().all(|r| r.timestamp_ms == 20));
    }

    #[test]
    fn record_count_larger_than_records_is_bad_record() {
        let mut batch = build(&[(1, None, Some(b"x".to_vec()), vec![])]);
        batch[57..61].copy_from_slice(&2i32.to_be_bytes());
        let results: Vec<_> = records(&batch).unwrap().collect();
        assert_eq!(results.len(), 2);
        assert!(results[0].is_ok());
        assert!(matches!(results[1], Err(BatchError::BadRecord { index: 1, .. })));
    }

    #[test]
    fn trailing_bytes_are_bad_record() {
        let mut batch = build(&[(1, None, Some(b"x".to_vec()), vec![])]);
        batch[57..61].copy_from_slice(&0i32.to_be_bytes());
        let results: Vec<_> = records(&batch).unwrap().collect();
        assert!(matches!(results[..], [Err(BatchError::BadRecord { index: 0, .. })]));
    }

    #[test]
    fn overlong_varint_is_bad_record() {
        let mut c = Cursor { buf: &[0xff, 0xff, 0xff, 0xff, 0xff, 0x01] };
        assert_eq!(c.varint32(), None);
        let mut c = Cursor { buf: &[0xff, 0xff, 0xff, 0xff, 0x1f] };
        assert_eq!(c.varint32(), None, "five-byte varint beyond 32 bits");
        let mut c = Cursor { buf: &[0xfe, 0xff, 0xff, 0xff, 0x0f] };
        assert_eq!(c.varint32(), Some(i32::MAX));
    }
}
