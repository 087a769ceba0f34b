//! Recovery scan over the bytes of a segment: which batches are whole, valid and in offset order,
//! and where the log really ends.
//!
//! Owns: the decision, batch by batch, between "valid batch", "clean end" (zero bytes left by
//! preallocation or aligned writes), "need more bytes" and "damaged: truncate here". Pure logic over
//! a byte slice so it is unit- and property-tested without glommio; `segment` drives it over file
//! reads. Depends on `crate::record` only. Must never accept a batch that fails its crc32c, length,
//! magic or offset-continuity check, and must keep every valid batch before the damage.

use crate::record::{self, BatchError, BatchHeader, BATCH_HEADER_LEN, BATCH_LENGTH_PREFIX};

/// Why a scan of a buffer stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanEnd {
    /// The buffer ends inside the batch starting at `position` (which needs `needed_bytes` in all).
    /// At the end of the file this is a torn tail unless the remaining bytes are all zero.
    NeedMore { position: usize, needed_bytes: usize },
    /// Zero bytes where the next batch would start: the clean end of a preallocated segment.
    Zeroes { position: usize },
    /// The batch at `position` is damaged or out of order; the log must be truncated there.
    Invalid { position: usize, detail: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanOutcome {
    /// Bytes of valid batches from the start of the buffer.
    pub valid_bytes: usize,
    /// The offset the next batch must start with.
    pub next_offset: i64,
    pub end: ScanEnd,
}

/// Scans `buf`, which starts at a batch boundary where the next batch must have base offset
/// `expected_offset`. Calls `on_batch(position, header)` for every valid batch, in order.
/// A batch longer than `batch_bytes_max` is treated as damage (a scribbled length field must not
/// make recovery read gigabytes).
pub fn scan_batches(
    buf: &[u8],
    expected_offset: i64,
    batch_bytes_max: usize,
    mut on_batch: impl FnMut(usize, &BatchHeader),
) -> ScanOutcome {
    let mut position = 0usize;
    let mut next_offset = expected_offset;
    let end = loop {
        let rest = &buf[position..];
        if rest.len() >= BATCH_LENGTH_PREFIX && rest[..BATCH_LENGTH_PREFIX].iter().all(|b| *b == 0) {
            break ScanEnd::Zeroes { position };
        }
        if rest.len() < BATCH_HEADER_LEN {
            break ScanEnd::NeedMore { position, needed_bytes: BATCH_HEADER_LEN };
        }
        let header = match BatchHeader::parse(rest) {
            Ok(h) => h,
            Err(e) => break ScanEnd::Invalid { position, detail: e.to_string() },
        };
        let total = header.total_len();
        if total > batch_bytes_max {
            break ScanEnd::Invalid {
                position,
                detail: format!("batch length {total} exceeds the scan limit of {batch_bytes_max} bytes"),
            };
        }
        if rest.len() < total {
            break ScanEnd::NeedMore { position, needed_bytes: total };
        }
        let header = match record::validate(rest) {
            Ok(h) => h,
            Err(e) => break ScanEnd::Invalid { position, detail: e.to_string() },
        };
        if header.base_offset != next_offset {
            break ScanEnd::Invalid {
                position,
                detail: format!("batch base offset {} where {next_offset} was expected", header.base_offset),
            };
        }
        if header.last_offset_delta < 0 || header.record_count <= 0 {
            let e = BatchError::BadRecordCount {
                record_count: header.record_count,
                last_offset_delta: header.last_offset_delta,
            };
            break ScanEnd::Invalid { position, detail: e.to_string() };
        }
        on_batch(position, &header);
        next_offset = header.last_offset() + 1;
        position += total;
    };
    ScanOutcome { valid_bytes: position, next_offset, end }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// One RecordBatch v2 with a single record of `value_len` bytes, crc32c over bytes 21...
    pub(crate) fn batch(base_offset: i64, records: i32, timestamp_ms: i64, value_len: usize) -> Vec<u8> {
        // One record: length varint, attributes, timestamp delta, offset delta, key len -1,
        // value len, value, headers count 0. Lengths kept < 64 so each varint is one byte.
        let value_len = value_len.min(60);
        let mut rec = vec![0u8, 0, 0, 1];
        rec.push((value_len as u8) << 1);
        rec.extend(std::iter::repeat_n(0xab_u8, value_len));
        rec.push(0);
        let mut body = Vec::new();
        for _ in 0..records {
            body.push((rec.len() as u8) << 1);
            body.extend_from_slice(&rec);
        }
        let mut b = Vec::with_capacity(BATCH_HEADER_LEN + body.len());
        b.extend_from_slice(&base_offset.to_be_bytes());
        b.extend_from_slice(&((BATCH_HEADER_LEN - BATCH_LENGTH_PREFIX + body.len()) as i32).to_be_bytes());
        b.extend_from_slice(&0i32.to_be_bytes());
        b.push(2);
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&(records - 1).to_be_bytes());
        b.extend_from_slice(&timestamp_ms.to_be_bytes());
        b.extend_from_slice(&timestamp_ms.to_be_bytes());
        b.extend_from_slice(&(-1i64).to_be_bytes());
        b.extend_from_slice(&(-1i16).to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
        b.extend_from_slice(&records.to_be_bytes());
        b.extend_from_slice(&body);
        let crc = crc32c::crc32c(&b[21..]);
        b[17..21].copy_from_slice(&crc.to_be_bytes());
        b
    }

    /// A log of batches with `records[i]` records each, starting at offset `base`, and each
    /// batch's (position, base offset, length).
    fn log(base: i64, records: &[i32]) -> (Vec<u8>, Vec<(usize, i64, usize)>) {
        let mut out = Vec::new();
        let mut layout = Vec::new();
        let mut offset = base;
        for (i, r) in records.iter().enumerate() {
            let b = batch(offset, *r, 1000 + i as i64, i % 50);
            layout.push((out.len(), offset, b.len()));
            offset += i64::from(*r);
            out.extend_from_slice(&b);
        }
        (out, layout)
    }

    #[test]
    fn clean_log_with_zero_padding_ends_cleanly() {
        let (mut bytes, layout) = log(100, &[1, 3, 2]);
        let valid = bytes.len();
        bytes.extend_from_slice(&[0u8; 4096]);
        let mut seen = Vec::new();
        let out = scan_batches(&bytes, 100, 1 << 20, |p, h| seen.push((p, h.base_offset)));
        assert_eq!(out.valid_bytes, valid);
        assert_eq!(out.next_offset, 106);
        assert_eq!(out.end, ScanEnd::Zeroes { position: valid });
        assert_eq!(seen, layout.iter().map(|(p, o, _)| (*p, *o)).collect::<Vec<_>>());
    }

    #[test]
    fn offset_gap_is_damage() {
        let (bytes, _) = log(100, &[1, 1]);
        let out = scan_batches(&bytes, 99, 1 << 20, |_, _| {});
        assert_eq!(out.valid_bytes, 0);
        assert!(matches!(out.end, ScanEnd::Invalid { position: 0, .. }));
    }

    proptest! {
        #[test]
        fn truncation_keeps_every_whole_batch_before_the_cut(
            records in prop::collection::vec(1i32..5, 1..20),
            cut_seed in any::<prop::sample::Index>(),
        ) {
            let (bytes, layout) = log(7, &records);
            let cut = cut_seed.index(bytes.len() + 1);
            let out = scan_batches(&bytes[..cut], 7, 1 << 20, |_, _| {});
            let whole: Vec<_> = layout.iter().filter(|(p, _, l)| p + l <= cut).collect();
            let expected_valid = whole.last().map(|(p, _, l)| p + l).unwrap_or(0);
            prop_assert_eq!(out.valid_bytes, expected_valid);
            if cut < bytes.len() {
                let is_need_more = matches!(out.end, ScanEnd::NeedMore { .. });
                prop_assert!(is_need_more);
            }
        }

        #[test]
        fn scribbled_batch_is_never_accepted_and_earlier_ones_are_kept(
            records in prop::collection::vec(1i32..5, 1..20),
            at_seed in any::<prop::sample::Index>(),
            xor in 1u8..=255,
        ) {
            let (mut bytes, layout) = log(0, &records);
            let at = at_seed.index(bytes.len());
            bytes[at] ^= xor;
            let damaged = layout.iter().position(|(p, _, l)| at >= *p && at < p + l).unwrap();
            let mut accepted = Vec::new();
            let out = scan_batches(&bytes, 0, 1 << 20, |p, _| accepted.push(p));
            // Every batch before the damaged one is kept.
            prop_assert!(accepted.len() >= damaged);
            for (i, p) in accepted.iter().enumerate().take(damaged) {
                prop_assert_eq!(*p, layout[i].0);
            }
            // The damaged batch is accepted only if the flip hit a byte outside the crc that the
            // format allows to change (the partition leader epoch); never otherwise.
            let (pos, _, _) = layout[damaged];
            let in_epoch = (12..16).contains(&(at - pos));
            if !in_epoch {
                prop_assert!(!accepted.contains(&pos));
                prop_assert!(out.valid_bytes <= pos);
            }
        }
    }
}
