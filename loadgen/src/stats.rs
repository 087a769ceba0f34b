//! Latency histograms and counters, recorded by producer and consumer tasks and collected once a
//! second by the reporter.
//!
//! Owns: what is counted and when it counts as measured. Each task records into its own
//! `TaskStats` behind a mutex that only the reporter ever contends for, once a second; the
//! reporter folds each task's interval into the progress line and the time series. A message is
//! measured when its intended send time falls in the measurement window (after warm-up, before
//! the end); consumption counts for throughput when it happens inside the window.

use hdrhistogram::Histogram;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::message::Clock;

/// Latencies in microseconds, 1 µs to 1 hour, 3 significant digits (0.1%).
const LATENCY_US_MAX: u64 = 3_600_000_000;

pub fn latency_histogram() -> Histogram<u64> {
    // Constant bounds that hdrhistogram accepts; failure would be a programming error.
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("constant histogram bounds are valid")
}

/// Records `done - intended` in microseconds. Measuring from the intended send time (not from
/// when the send really started) is the coordinated-omission correction: see `rate`.
pub fn record_latency(h: &mut Histogram<u64>, intended_us: u64, done_us: u64) {
    h.saturating_record(done_us.saturating_sub(intended_us).clamp(1, LATENCY_US_MAX));
}

/// The measurement window, in `Clock` microseconds.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub start_us: u64,
    pub end_us: u64,
}

impl Window {
    pub fn contains(&self, us: u64) -> bool {
        (self.start_us..self.end_us).contains(&us)
    }

    pub fn seconds(&self) -> f64 {
        (self.end_us - self.start_us) as f64 / 1e6
    }
}

/// Counts and latencies over some span of time.
#[derive(Clone)]
pub struct Tally {
    pub publish_us: Histogram<u64>,
    pub e2e_us: Histogram<u64>,
    pub produced_msgs: u64,
    pub produced_bytes: u64,
    pub consumed_msgs: u64,
    pub consumed_bytes: u64,
}

impl Tally {
    pub fn new() -> Tally {
        Tally {
            publish_us: latency_histogram(),
            e2e_us: latency_histogram(),
            produced_msgs: 0,
            produced_bytes: 0,
            consumed_msgs: 0,
            consumed_bytes: 0,
        }
    }

    pub fn add(&mut self, other: &Tally) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.publish_us.add(&other.publish_us);
        let _ = self.e2e_us.add(&other.e2e_us);
        self.produced_msgs += other.produced_msgs;
        self.produced_bytes += other.produced_bytes;
        self.consumed_msgs += other.consumed_msgs;
        self.consumed_bytes += other.consumed_bytes;
    }

    pub fn reset(&mut self) {
        self.publish_us.reset();
        self.e2e_us.reset();
        self.produced_msgs = 0;
        self.produced_bytes = 0;
        self.consumed_msgs = 0;
        self.consumed_bytes = 0;
    }
}

/// One task's figures.
pub struct TaskStats {
    /// Since the reporter last looked (all traffic, warm-up included).
    pub interval: Tally,
    /// Inside the measurement window only.
    pub measured: Tally,
    /// Whole run: messages acknowledged (producers) or consumed (consumers).
    pub acked_total: u64,
    pub consumed_total: u64,
    /// Messages consumed that loadgen did not write (another writer in the topic).
    pub foreign_total: u64,
    pub errors: u64,
    pub first_error: Option<String>,
}

impl TaskStats {
    fn new() -> TaskStats {
        TaskStats {
            interval: Tally::new(),
            measured: Tally::new(),
            acked_total: 0,
            consumed_total: 0,
            foreign_total: 0,
            errors: 0,
            first_error: None,
        }
    }

    pub fn published(&mut self, intended_us: u64, done_us: u64, bytes: usize, window: &Window) {
        self.acked_total += 1;
        record_latency(&mut self.interval.publish_us, intended_us, done_us);
        self.interval.produced_msgs += 1;
        self.interval.produced_bytes += bytes as u64;
        if window.contains(intended_us) {
            record_latency(&mut self.measured.publish_us, intended_us, done_us);
            self.measured.produced_msgs += 1;
            self.measured.produced_bytes += bytes as u64;
        }
    }

    pub fn consumed(&mut self, intended_us: Option<u64>, now_us: u64, bytes: usize, window: &Window) {
        let Some(intended_us) = intended_us else {
            self.foreign_total += 1;
            return;
        };
        self.consumed_total += 1;
        record_latency(&mut self.interval.e2e_us, intended_us, now_us);
        self.interval.consumed_msgs += 1;
        self.interval.consumed_bytes += bytes as u64;
        if window.contains(intended_us) {
            record_latency(&mut self.measured.e2e_us, intended_us, now_us);
        }
        if window.contains(now_us) {
            self.measured.consumed_msgs += 1;
            self.measured.consumed_bytes += bytes as u64;
        }
    }

    pub fn error(&mut self, message: String) {
        self.errors(1, || message);
    }

    /// `count` messages failed for one reason (a batch's worth); the message is built only if it
    /// is the run's first.
    pub fn errors(&mut self, count: u64, message: impl FnOnce() -> String) {
        self.errors += count;
        if self.first_error.is_none() {
            self.first_error = Some(message());
        }
    }
}

/// What a producer or consumer task records into, with the run's time base and window.
#[derive(Clone)]
pub struct Recorder {
    pub stats: SharedStats,
    pub clock: Clock,
    pub window: Window,
}

/// A task's stats, shared with the reporter.
#[derive(Clone)]
pub struct SharedStats(Arc<Mutex<TaskStats>>);

impl SharedStats {
    pub fn new() -> SharedStats {
        SharedStats(Arc::new(Mutex::new(TaskStats::new())))
    }

    pub fn lock(&self) -> MutexGuard<'_, TaskStats> {
        // A panicking task leaves counters, nothing half-updated that matters.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The value at `quantile` in microseconds (0 when empty).
pub fn quantile_us(h: &Histogram<u64>, quantile: f64) -> u64 {
    if h.is_empty() {
        0
    } else {
        h.value_at_quantile(quantile)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::rate::Schedule;

    /// A synchronous sender at 1000 msgs/s against a server that answers in 100 µs, except one
    /// request that takes 200 ms. Measured from the actual send, the stall hides in one sample
    /// (the 199 messages that should have gone out meanwhile were simply sent late, fast); measured
    /// from the intended send time, every delayed message carries its wait.
    #[test]
    fn latency_from_intended_time_corrects_coordinated_omission() {
        let start = Instant::now();
        let mut schedule = Schedule::new(start, 1000.0);
        let mut corrected = latency_histogram();
        let mut naive = latency_histogram();
        let mut server_free = start;
        for k in 0..1000 {
            let intended = schedule.next(server_free);
            let sent = intended.max(server_free);
            let service = if k == 500 { Duration::from_millis(200) } else { Duration::from_micros(100) };
            let done = sent + service;
            server_free = done;
            let us = |t: Instant| (t - start).as_micros() as u64;
            record_latency(&mut corrected, us(intended), us(done));
            record_latency(&mut naive, us(sent), us(done));
        }
        assert_eq!(corrected.len(), 1000);
        assert!(quantile_us(&naive, 0.99) < 1_000, "naive p99 misses the stall");
        assert!(quantile_us(&corrected, 0.99) > 100_000, "corrected p99 shows it");
        assert!(quantile_us(&corrected, 0.9) > 10_000, "about 200 messages were delayed");
        assert_eq!(naive.max(), corrected.max(), "the worst single wait is the same");
    }

    #[test]
    fn only_the_window_is_measured() {
        let window = Window { start_us: 1_000, end_us: 2_000 };
        let mut s = TaskStats::new();
        s.published(500, 600, 10, &window); // warm-up
        s.published(1_500, 1_700, 10, &window);
        s.consumed(Some(1_500), 2_500, 10, &window); // sent in the window, consumed after it
        s.consumed(None, 1_600, 10, &window);
        assert_eq!((s.acked_total, s.consumed_total, s.foreign_total), (2, 1, 1));
        assert_eq!((s.interval.produced_msgs, s.measured.produced_msgs), (2, 1));
        assert_eq!(s.measured.publish_us.len(), 1);
        assert_eq!(s.measured.e2e_us.len(), 1, "its latency counts");
        assert_eq!(s.measured.consumed_msgs, 0, "its consumption is outside the throughput window");
        assert_eq!(window.seconds(), 0.001);
    }

    #[test]
    fn tallies_add_up() {
        let mut a = Tally::new();
        let mut b = Tally::new();
        record_latency(&mut a.publish_us, 0, 10);
        record_latency(&mut b.publish_us, 0, 1_000);
        b.produced_msgs = 3;
        a.add(&b);
        assert_eq!((a.publish_us.len(), a.produced_msgs), (2, 3));
        a.reset();
        assert!(a.publish_us.is_empty());
    }
}
