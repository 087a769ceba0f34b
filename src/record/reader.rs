//! Reading records out of an uncompressed RecordBatch v2 batch, zero-copy.
//!
//! Owns: decoding Kafka's record encoding (zigzag varints, relative offsets and timestamps).
//! Depends only on the header parser in [`crate::record`]. Every length and varint read from the
//! batch is bounded by the bytes that are there: malformed input is a [`BatchError::BadRecord`],
//! never a panic or an out-of-bounds slice.

use super::{BatchError, BatchHeader, BATCH_HEADER_LEN};

/// Attributes bit 3: the broker set every record's timestamp to the batch's max timestamp.
const TIMESTAMP_TYPE_LOG_APPEND: i16 = 0x08;

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

/// Iterates over the records of `batch` (one whole batch, normally checked by
/// [`crate::record::validate`] first). Compressed batches are refused.
pub fn records(batch: &[u8]) -> Result<RecordIter<'_>, BatchError> {
    let header = BatchHeader::parse(batch)?;
    let total = header.total_len();
    if batch.len() < total {
        return Err(BatchError::Truncated { available: batch.len(), needed: total });
    }
    if header.compression() != 0 {
        return Err(BatchError::UnsupportedCompression { codec: header.compression() });
    }
    if header.record_count < 0 {
        return Err(BatchError::BadRecordCount {
            record_count: header.record_count,
            last_offset_delta: header.last_offset_delta,
        });
    }
    Ok(RecordIter { header, rest: &batch[BATCH_HEADER_LEN..total], index: 0, failed: false })
}

impl<'a> RecordIter<'a> {
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
    use crate::record::builder::BatchBuilder;
    use crate::record::{set_base_offset, validate};
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
        fn builder_validate_reader_round_trip(
            input in proptest::collection::vec(arb_record(), 1..30),
            base_offset in 0i64..1 << 40,
        ) {
            let records = input;
            let mut batch = build(&records);
            set_base_offset(&mut batch, base_offset);
            let header = validate(&batch).unwrap();
            prop_assert_eq!(header.record_count as usize, records.len());
            prop_assert_eq!(header.max_timestamp, records.iter().map(|r| r.0).max().unwrap());
            let read: Vec<Record<'_>> = records_of(&batch);
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

    fn records_of(batch: &[u8]) -> Vec<Record<'_>> {
        records(batch).unwrap().collect::<Result<Vec<_>, _>>().unwrap()
    }

    #[test]
    fn compressed_batches_are_refused() {
        let mut batch = build(&[(1, None, Some(b"x".to_vec()), vec![])]);
        batch[22] |= 0x02; // attributes low byte: snappy
        assert_eq!(records(&batch).err(), Some(BatchError::UnsupportedCompression { codec: 2 }));
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
