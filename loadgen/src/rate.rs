//! Rate control: when each message is meant to be sent.
//!
//! At a fixed rate the schedule is a grid `start + k / rate` that never waits for the system
//! under test: if a send is late (the producer was blocked), the next intended times are already
//! in the past and those messages go out back to back until the schedule is caught up. Latency is
//! then measured from the *intended* time, so a stall shows up in every message it delayed —
//! the coordinated-omission correction — instead of only in the one message that was stuck.
//! At max rate there is no grid: the intended time is simply when the send starts.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Schedule {
    start: Instant,
    /// Messages per second; `None` = max rate.
    rate: Option<f64>,
    sent: u64,
}

impl Schedule {
    /// `rate` messages/s from `start`; 0 means as fast as possible.
    pub fn new(start: Instant, rate: f64) -> Schedule {
        debug_assert!(rate >= 0.0 && rate.is_finite());
        Schedule { start, rate: (rate > 0.0).then_some(rate), sent: 0 }
    }

    /// The intended send time of the next message (`now` at max rate).
    pub fn next(&mut self, now: Instant) -> Instant {
        let k = self.sent;
        self.sent += 1;
        match self.rate {
            Some(rate) => self.start + Duration::from_secs_f64(k as f64 / rate),
            None => now,
        }
    }

    pub fn is_fixed_rate(&self) -> bool {
        self.rate.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_rate_is_a_grid_that_ignores_late_sends() {
        let start = Instant::now();
        let mut s = Schedule::new(start, 1000.0);
        let times: Vec<Instant> = (0..5).map(|_| s.next(start)).collect();
        for (k, t) in times.iter().enumerate() {
            assert_eq!(*t - start, Duration::from_millis(k as u64));
        }
        // The producer was stuck for a second: the schedule does not slide.
        let late = start + Duration::from_secs(1);
        assert_eq!(s.next(late) - start, Duration::from_millis(5));
        assert!(s.is_fixed_rate());
    }

    #[test]
    fn fixed_rate_sends_the_requested_count_per_second() {
        let start = Instant::now();
        let mut s = Schedule::new(start, 2500.0);
        let in_first_second = std::iter::repeat_with(|| s.next(start))
            .take_while(|t| *t - start < Duration::from_secs(1))
            .count();
        assert_eq!(in_first_second, 2500);
    }

    #[test]
    fn max_rate_sends_now() {
        let start = Instant::now();
        let mut s = Schedule::new(start, 0.0);
        let now = start + Duration::from_millis(42);
        assert_eq!(s.next(now), now);
        assert!(!s.is_fixed_rate());
    }
}
