//! Rate control: when each message is meant to be sent.
//!
//! At a fixed rate the schedule is a grid `start + k / rate` that never waits for the system
//! under test: if a send is late (the producer was blocked), the next intended times are already
//! in the past and those messages go out back to back until the schedule is caught up. Latency is
//! then measured from the *intended* time, so a stall shows up in every message it delayed —
//! the coordinated-omission correction — instead of only in the one message that was stuck.
//! At max rate there is no grid: the intended time is simply when the send starts.
//!
//! Waiting for an intended time uses a `timerfd` ([`PreciseSleep`]), not tokio's timer: tokio
//! rounds every deadline up to its next millisecond tick, which would put up to a millisecond of
//! loadgen's own lateness into every fixed-rate latency figure.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::stats::Recorder;

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

/// A one-shot monotonic timer with the kernel's hrtimer precision, awaited on the tokio reactor.
pub struct PreciseSleep {
    fd: AsyncFd<OwnedFd>,
}

impl PreciseSleep {
    pub fn new() -> io::Result<PreciseSleep> {
        // SAFETY: plain syscall; the returned descriptor is checked and then owned.
        let raw =
            unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: an `OwnedFd` stays open and returns the same descriptor until it is dropped.
        let fd =
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(io::Error::from)?;
        Ok(PreciseSleep { fd })
    }

    /// Returns at `deadline`. A timer that fails is reported once per failure and tokio's coarser
    /// timer used instead, so it costs precision, not the run. Cancel-safe.
    pub async fn until(&mut self, deadline: Instant, recorder: &Recorder) {
        if let Err(e) = self.try_until(deadline).await {
            recorder.stats.lock().error(format!("precise timer: {e}"));
            tokio::time::sleep_until(deadline.into()).await;
        }
    }

    /// Returns at `deadline` (immediately if it has passed). Cancel-safe: dropping the future
    /// leaves the timer armed, and the next call re-arms it.
    pub async fn try_until(&mut self, deadline: Instant) -> io::Result<()> {
        let Some(wait) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else {
            return Ok(());
        };
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec {
                tv_sec: wait.as_secs() as libc::time_t,
                tv_nsec: wait.subsec_nanos() as libc::c_long,
            },
        };
        let fd = self.fd.get_ref().as_raw_fd();
        // SAFETY: `spec` is a valid itimerspec; the old value is not asked for.
        if unsafe { libc::timerfd_settime(fd, 0, &spec, std::ptr::null_mut()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        loop {
            let mut ready = self.fd.readable().await?;
            let mut expirations = 0u64;
            // SAFETY: reads 8 bytes into a u64 owned here.
            let n = unsafe { libc::read(fd, (&mut expirations as *mut u64).cast(), 8) };
            if n == 8 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::WouldBlock {
                return Err(err);
            }
            ready.clear_ready();
        }
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

    #[tokio::test]
    async fn precise_sleep_never_wakes_early() {
        let mut sleep = PreciseSleep::new().unwrap();
        for wait_us in [50u64, 300, 1500] {
            let start = Instant::now();
            sleep.try_until(start + Duration::from_micros(wait_us)).await.unwrap();
            let waited = start.elapsed();
            assert!(waited >= Duration::from_micros(wait_us), "woke early: {waited:?}");
        }
        // A deadline in the past returns at once.
        sleep.try_until(Instant::now() - Duration::from_millis(1)).await.unwrap();
    }
}
