//! Clock faults (issue 13). A node's Raft groups know time only as ticks of its timer
//! (`cluster::replicas::run_ticks`: a glommio sleep of `raft_tick_ms` per tick, on the monotonic
//! clock). Here one node's timer misbehaves for a while: it jumps (a burst of ticks at once, as a
//! timer catching up after the clock leapt forward would give: more than the broker's sleep loop,
//! which fires once, so election timers expire at once), stands still (no ticks, while messages
//! still arrive and are answered), or runs fast or slow. Raft's safety must not depend on clocks:
//! one leader per term and committed entries stay put whatever the timers do; pre-vote and
//! check-quorum must keep a node whose clock races from disrupting a healthy leader for good, and
//! a leader whose clock stands still from serving forever after it lost its quorum.

use ringlog::replication::rng::SeededRng;

use super::{Event, MoreEvent, World, TICK_MS};

#[derive(Debug, Clone)]
pub struct ClockFaults {
    /// Some node's clock misbehaves about this often (0: never).
    pub every_ms: u64,
}

impl ClockFaults {
    pub fn from_seed(rng: &mut SeededRng) -> ClockFaults {
        ClockFaults { every_ms: if rng.chance(600_000) { rng.range(500, 5_000) } else { 0 } }
    }
}

/// A node's timer.
#[derive(Debug, Clone)]
pub struct NodeClock {
    pub tick_ms: u64,
    /// No ticks before this (ms).
    pub still_until: u64,
    /// The timer runs at `tick_ms` until this, then true again.
    pub odd_until: u64,
}

impl Default for NodeClock {
    fn default() -> Self {
        NodeClock { tick_ms: TICK_MS, still_until: 0, odd_until: 0 }
    }
}

impl NodeClock {
    pub fn stands_still(&mut self, now: u64) -> bool {
        if self.odd_until != 0 && now >= self.odd_until {
            *self = NodeClock::default();
        }
        now < self.still_until
    }
}

impl World {
    pub(super) fn schedule_clock_fault(&mut self) {
        let every = self.scenario.clock.every_ms;
        if every > 0 {
            let at = self.more_rng.range(every / 2, every * 3 / 2);
            self.schedule(at, Event::More(MoreEvent::Clock));
        }
    }

    pub(super) fn clock_fault(&mut self) {
        if !self.faults {
            return;
        }
        let node = self.more_rng.range(1, self.scenario.nodes + 1);
        let length = self.more_rng.range(200, 4_000);
        let now = self.now;
        match self.more_rng.range(0, 4) {
            0 => {
                // Ticks are counted per timer period: a jump of `ticks` periods.
                let ticks = self.more_rng.range(5, 200);
                self.log(|| format!("n{node} clock jumps {} ms ahead", ticks * TICK_MS));
                // A stopped process (paused) has no timer to jump.
                if self.node(node).alive && self.node(node).paused_until.is_none() {
                    for _ in 0..ticks {
                        for group in self.node(node).groups.values_mut() {
                            group.tick();
                        }
                        self.drive(node);
                        self.tick_controller(node);
                    }
                }
            }
            1 => {
                self.log(|| format!("n{node} clock stands still for {length} ms"));
                let clock = &mut self.node(node).clock;
                clock.still_until = now + length;
                clock.odd_until = now + length;
            }
            kind => {
                let tick_ms = if kind == 2 {
                    self.more_rng.range(1, TICK_MS / 2)
                } else {
                    TICK_MS * self.more_rng.range(2, 6)
                };
                self.log(|| {
                    format!("n{node} clock ticks every {tick_ms} ms instead of {TICK_MS} for {length} ms")
                });
                let clock = &mut self.node(node).clock;
                clock.tick_ms = tick_ms;
                clock.odd_until = now + length;
            }
        }
        self.schedule_clock_fault();
    }

    pub(super) fn reset_clock(&mut self, node: u64) {
        self.node(node).clock = NodeClock::default();
    }
}
