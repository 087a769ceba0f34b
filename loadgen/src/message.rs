//! The messages loadgen sends: a 16-byte header (intended send time, producer, magic) followed by
//! filler, and the keys. The send time inside each message is what end-to-end latency is measured
//! from, so it needs no coordination between producers and consumers.
//!
//! Times are microseconds since the run's `Clock` epoch (a monotonic `Instant`): producers and
//! consumers share one process, so a monotonic clock is exact and immune to wall-clock steps.

use std::time::Instant;

pub const HEADER_BYTES: usize = 16;
/// "RLG1": tells loadgen's messages from anything else found in a topic.
const MAGIC: u32 = 0x524c_4731;

/// The run's time base.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: Instant,
}

impl Clock {
    pub fn new() -> Clock {
        Clock { epoch: Instant::now() }
    }

    pub fn micros(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_micros() as u64
    }

    pub fn now_micros(&self) -> u64 {
        self.micros(Instant::now())
    }
}

/// Writes the header into the first 16 bytes of `buf`.
pub fn write_header(buf: &mut [u8], intended_us: u64, producer: u32) {
    debug_assert!(buf.len() >= HEADER_BYTES);
    buf[0..8].copy_from_slice(&intended_us.to_le_bytes());
    buf[8..12].copy_from_slice(&producer.to_le_bytes());
    buf[12..16].copy_from_slice(&MAGIC.to_le_bytes());
}

/// The intended send time of a loadgen message; `None` for anything else.
pub fn read_header(value: &[u8]) -> Option<u64> {
    let header = value.get(..HEADER_BYTES)?;
    if u32::from_le_bytes(header[12..16].try_into().ok()?) != MAGIC {
        return None;
    }
    Some(u64::from_le_bytes(header[0..8].try_into().ok()?))
}

/// SplitMix64: small, fast, good enough to spread keys and sizes; seeded per producer.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `low..=high`.
    pub fn between(&mut self, low: usize, high: usize) -> usize {
        debug_assert!(low <= high);
        low + (self.next_u64() % (high - low + 1) as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_foreign_values_are_ignored() {
        let mut buf = vec![0u8; 100];
        write_header(&mut buf, 123_456_789, 7);
        assert_eq!(read_header(&buf), Some(123_456_789));
        assert_eq!(read_header(b"hello, this is not ours"), None);
        assert_eq!(read_header(&buf[..10]), None);
    }

    #[test]
    fn sizes_stay_in_range() {
        let mut rng = Rng::new(1);
        let sizes: Vec<usize> = (0..1000).map(|_| rng.between(100, 110)).collect();
        assert!(sizes.iter().all(|s| (100..=110).contains(s)));
        assert!(sizes.contains(&100) && sizes.contains(&110));
    }
}
