//! Retention decisions: which whole segments, oldest first, are beyond the size or time limit.
//!
//! Owns: the pure rule, so it is tested without files. `partition` applies it. Depends on nothing.
//! Never selects the active (last) segment, nor a segment holding offsets at or above the high
//! watermark (its data may not be durable yet; deleting it would move the log start past the high
//! watermark).

/// What retention needs to know about one segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetentionInput {
    pub base_offset: i64,
    pub next_offset: i64,
    pub size_bytes: u64,
    /// Largest batch max timestamp in the segment (i64::MIN when empty).
    pub max_timestamp_ms: i64,
}

/// How many leading segments of `segments` (ordered by offset, last = active) to delete.
pub fn segments_to_delete(
    segments: &[RetentionInput],
    retention_bytes: Option<u64>,
    retention_ms: Option<u64>,
    now_ms: i64,
    high_watermark: i64,
) -> usize {
    let total_bytes: u64 = segments.iter().map(|s| s.size_bytes).sum();
    let mut excess_bytes = retention_bytes.map(|limit| total_bytes.saturating_sub(limit));
    let mut count = 0;
    for s in segments.iter().take(segments.len().saturating_sub(1)) {
        if s.next_offset > high_watermark {
            break;
        }
        // Kafka's rule: delete a segment only if the log stays at or above the limit without it.
        let over_size = excess_bytes.is_some_and(|excess| excess >= s.size_bytes);
        let expired = retention_ms.is_some_and(|limit_ms| {
            s.max_timestamp_ms != i64::MIN && now_ms.saturating_sub(s.max_timestamp_ms) > limit_ms as i64
        });
        if !(over_size || expired) {
            break;
        }
        if let Some(excess) = excess_bytes.as_mut() {
            *excess = excess.saturating_sub(s.size_bytes);
        }
        count += 1;
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(sizes_and_ts: &[(u64, i64)]) -> Vec<RetentionInput> {
        let mut base = 0;
        sizes_and_ts
            .iter()
            .map(|(size, ts)| {
                let s = RetentionInput {
                    base_offset: base,
                    next_offset: base + 10,
                    size_bytes: *size,
                    max_timestamp_ms: *ts,
                };
                base += 10;
                s
            })
            .collect()
    }

    #[test]
    fn size_retention_keeps_at_least_the_limit() {
        let s = segs(&[(100, 0), (100, 0), (100, 0), (50, 0)]);
        assert_eq!(segments_to_delete(&s, Some(150), None, 0, 40), 2);
        assert_eq!(segments_to_delete(&s, Some(251), None, 0, 40), 0);
        assert_eq!(segments_to_delete(&s, Some(0), None, 0, 40), 3, "never the active segment");
    }

    #[test]
    fn time_retention_deletes_expired_prefix_only() {
        let s = segs(&[(1, 100), (1, 5000), (1, 200), (1, 100)]);
        assert_eq!(segments_to_delete(&s, None, Some(1000), 2000, 40), 1);
        assert_eq!(segments_to_delete(&s, None, Some(1000), 10_000, 40), 3);
    }

    #[test]
    fn nothing_at_or_above_the_high_watermark() {
        let s = segs(&[(100, 0), (100, 0), (100, 0)]);
        assert_eq!(segments_to_delete(&s, Some(0), None, 0, 5), 0);
        assert_eq!(segments_to_delete(&s, Some(0), None, 0, 15), 1);
        assert_eq!(segments_to_delete(&s, Some(0), None, 0, 20), 2);
    }
}
