//! Choosing a partition for a record.
//!
//! Owns: Kafka's murmur2 (bit-for-bit the Java client's `Utils.murmur2`, so keyed records land on
//! the partition Kafka would pick) and round-robin for records without a key. Pure functions and
//! a counter; no I/O.

/// How the producer picks a partition when the caller names none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Partitioner {
    /// Keyed records: `(murmur2(key) & 0x7fffffff) % partitions`, as Kafka's default
    /// partitioner. Records without a key: round-robin.
    #[default]
    KeyHash,
    /// Every record round-robin, key or not.
    RoundRobin,
}

impl Partitioner {
    /// The partition for a record, `round_robin` being the caller's per-topic counter.
    pub fn partition(self, key: Option<&[u8]>, partitions: u32, round_robin: &mut u32) -> u32 {
        debug_assert!(partitions > 0);
        match (self, key) {
            (Partitioner::KeyHash, Some(key)) => key_partition(key, partitions),
            _ => {
                let p = *round_robin % partitions;
                *round_robin = round_robin.wrapping_add(1);
                p
            }
        }
    }
}

/// Kafka's default partition for a keyed record.
pub fn key_partition(key: &[u8], partitions: u32) -> u32 {
    ((murmur2(key) & 0x7fff_ffff) as u32) % partitions
}

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`), seed 0x9747b28c.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cases of Kafka's `UtilsTest.testMurmur2`.
    #[test]
    fn murmur2_matches_kafka() {
        let cases: &[(&[u8], i32)] = &[
            (b"21", -973932308),
            (b"foobar", -790332482),
            (b"a-little-bit-long-string", -985981536),
            (b"a-little-bit-longer-string", -1486304829),
            (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
            (b"abc", 479470107),
        ];
        for (key, want) in cases {
            assert_eq!(murmur2(key), *want, "murmur2({:?})", String::from_utf8_lossy(key));
        }
    }

    #[test]
    fn key_hash_is_stable_and_in_range() {
        let mut rr = 0;
        for n in 1..20u32 {
            let p = Partitioner::KeyHash.partition(Some(b"foobar"), n, &mut rr);
            assert_eq!(p, ((-790332482i32 & 0x7fff_ffff) as u32) % n);
        }
        assert_eq!(rr, 0, "keyed records do not advance round-robin");
    }

    #[test]
    fn round_robin_cycles() {
        let mut rr = 0;
        let got: Vec<u32> = (0..7).map(|_| Partitioner::KeyHash.partition(None, 3, &mut rr)).collect();
        assert_eq!(got, vec![0, 1, 2, 0, 1, 2, 0]);
        let got: Vec<u32> =
            (0..3).map(|_| Partitioner::RoundRobin.partition(Some(b"k"), 3, &mut rr)).collect();
        assert_eq!(got, vec![1, 2, 0]);
    }
}
