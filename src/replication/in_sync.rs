//! Which followers of a leader are in sync (issue 11, stop 14): Kafka's rule, counted in Raft
//! ticks. A follower stays in sync while, at some moment of the last `lag_ticks`, it held
//! everything the leader held then (Kafka's `replica.lag.time.max.ms`: caught up to the leader's
//! log end at least once within it). One that fell out joins again once it has been heard since
//! and holds every committed entry (Kafka: its log end reaches the high watermark), so a
//! restarted follower is counted in sync only when it has caught up, not while it copies.
//! A new leader starts with every follower in sync, as a Kafka leader inherits the ISR, so an
//! election does not empty the ISR for the few ticks its followers take to answer; a follower
//! that does not answer the new leader leaves after `lag_ticks`.
//!
//! Pure and tick-driven, like the group that owns it: `lead` when it becomes leader, `heard` for
//! each message of the term from a follower, `observe` at every tick, `in_sync` to read.
//! Depends on nothing.

use std::collections::{BTreeMap, VecDeque};

/// How many snapshots of the leader's log end cover the window: a caught-up time is known to
/// within `lag_ticks / SNAPSHOTS` (never later than it was, so a follower may leave that much
/// early, never late), in a few bytes per group whatever the write rate.
const SNAPSHOTS: u64 = 8;

#[derive(Debug, Clone, Copy)]
struct Follower {
    /// The last tick a message of this term came from it.
    heard: u64,
    /// The latest tick at which it is known to have held everything the leader held.
    caught_up: u64,
    in_sync: bool,
    /// When it last left the in-sync set (it joins again only if heard after that).
    left: u64,
}

#[derive(Debug, Clone)]
pub struct InSyncTracker {
    lag_ticks: u64,
    /// (tick, leader's last index then), one every `lag_ticks / SNAPSHOTS` ticks, oldest first,
    /// none older than the window.
    ends: VecDeque<(u64, u64)>,
    /// Empty unless leading.
    followers: BTreeMap<u64, Follower>,
}

impl InSyncTracker {
    pub fn new(lag_ticks: u64) -> InSyncTracker {
        InSyncTracker { lag_ticks: lag_ticks.max(1), ends: VecDeque::new(), followers: BTreeMap::new() }
    }

    /// This replica leads from tick `now`: every follower starts in sync (see the module doc).
    pub fn lead(&mut self, now: u64, followers: impl IntoIterator<Item = u64>) {
        self.ends.clear();
        self.followers = followers
            .into_iter()
            .map(|id| (id, Follower { heard: now, caught_up: now, in_sync: true, left: 0 }))
            .collect();
    }

    /// This replica no longer leads.
    pub fn stop(&mut self) {
        self.ends.clear();
        self.followers.clear();
    }

    /// A message of the leader's term came from follower `from`.
    pub fn heard(&mut self, from: u64, now: u64) {
        if let Some(f) = self.followers.get_mut(&from) {
            f.heard = now;
        }
    }

    /// At tick `now` the leader's log ends at `last_index`, `committed` is committed, and
    /// `matched` gives each follower's match index (raft-rs's progress).
    pub fn observe(
        &mut self,
        now: u64,
        last_index: u64,
        committed: u64,
        matched: impl IntoIterator<Item = (u64, u64)>,
    ) {
        let step = (self.lag_ticks / SNAPSHOTS).max(1);
        if self.ends.back().is_none_or(|&(at, _)| now >= at + step) {
            self.ends.push_back((now, last_index));
        }
        while self.ends.front().is_some_and(|&(at, _)| at + self.lag_ticks < now) {
            self.ends.pop_front();
        }
        for (id, matched) in matched {
            let Some(f) = self.followers.get_mut(&id) else { continue };
            // The follower held, when last heard, what the leader held at the latest snapshot
            // its match index reaches.
            let reached = if matched >= last_index {
                Some(now)
            } else {
                self.ends.iter().rev().find(|&&(_, end)| end <= matched).map(|&(at, _)| at)
            };
            if let Some(at) = reached {
                f.caught_up = f.caught_up.max(at.min(f.heard));
            }
            if f.in_sync && now.saturating_sub(f.caught_up) > self.lag_ticks {
                f.in_sync = false;
                f.left = now;
            } else if !f.in_sync && f.heard > f.left && matched >= committed {
                f.in_sync = true;
                f.caught_up = f.caught_up.max(f.heard);
            }
        }
    }

    /// Whether follower `id` is in sync; false for one this tracker does not follow (and on a
    /// replica that does not lead).
    pub fn in_sync(&self, id: u64) -> bool {
        self.followers.get(&id).is_some_and(|f| f.in_sync)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::builder::BatchBuilder;
    use crate::replication::epochs::LeaderEpochs;
    use crate::replication::group::{GroupSettings, RaftGroup};
    use crate::replication::replica_log::{CacheLimits, ReplicaLog, ReplicaState};

    /// Ticks `ticks`, the leader's log ending at `end(t)`, committed to `end(t)`, followers 2 and
    /// 3 heard at tick `t` with match index `matched(id, t)`, or silent (None: raft-rs keeps the
    /// match index it had).
    fn run(
        tracker: &mut InSyncTracker,
        ticks: std::ops::Range<u64>,
        end: impl Fn(u64) -> u64,
        matched: impl Fn(u64, u64) -> Option<u64>,
    ) {
        let mut last = BTreeMap::from([(2, 0), (3, 0)]);
        for t in ticks {
            for id in [2, 3] {
                if let Some(m) = matched(id, t) {
                    tracker.heard(id, t);
                    last.insert(id, m);
                }
            }
            tracker.observe(t, end(t), end(t), last.clone());
        }
    }

    #[test]
    fn a_follower_keeping_up_under_writes_stays_and_a_silent_one_leaves_after_the_lag() {
        let mut tracker = InSyncTracker::new(40);
        tracker.lead(0, [2, 3]);
        // The leader appends 10 entries a tick; follower 2 is always 3 ticks behind, follower 3
        // answers until tick 100, then falls silent (its match frozen at 1,000).
        let end = |t: u64| 10 * t;
        run(&mut tracker, 0..100, end, |id, t| {
            Some(if id == 2 { (10 * t).saturating_sub(30) } else { 10 * t })
        });
        assert!(tracker.in_sync(2) && tracker.in_sync(3));
        for t in 100..200 {
            tracker.heard(2, t);
            tracker.observe(t, end(t), end(t), [(2, end(t) - 30), (3, 1_000)]);
            // Out no later than the lag after it last caught up (tick 100), and not before
            // the lag less one snapshot step (40 / 8 = 5 ticks).
            if t <= 135 {
                assert!(tracker.in_sync(3), "tick {t}");
            }
            if t > 140 {
                assert!(!tracker.in_sync(3), "tick {t}");
            }
            assert!(tracker.in_sync(2), "tick {t}");
        }
    }

    #[test]
    fn an_idle_partition_keeps_a_follower_only_while_it_is_heard() {
        let mut tracker = InSyncTracker::new(20);
        tracker.lead(0, [2, 3]);
        // Nothing is written: both hold the whole log, but 3 stops answering at tick 10.
        run(&mut tracker, 0..60, |_| 5, |id, t| (id == 2 || t < 10).then_some(5));
        assert!(tracker.in_sync(2));
        assert!(!tracker.in_sync(3));
        // It answers again, holding everything: back at once.
        run(&mut tracker, 60..61, |_| 5, |_, _| Some(5));
        assert!(tracker.in_sync(3));
    }

    #[test]
    fn a_follower_that_left_joins_again_only_once_it_holds_every_committed_entry() {
        let mut tracker = InSyncTracker::new(20);
        tracker.lead(0, [2, 3]);
        let end = |t: u64| 100 + t;
        // Follower 3 restarts far behind and copies 2 entries a tick: it is heard, catching up.
        run(&mut tracker, 0..30, end, |id, t| Some(if id == 2 { end(t) } else { 2 * t }));
        assert!(!tracker.in_sync(3), "out while it copies");
        let mut joined = None;
        for t in 30..200 {
            let m3 = (2 * t).min(end(t));
            tracker.heard(2, t);
            tracker.heard(3, t);
            tracker.observe(t, end(t), end(t), [(2, end(t)), (3, m3)]);
            if tracker.in_sync(3) && joined.is_none() {
                joined = Some(t);
                assert!(m3 >= end(t), "joined at tick {t} holding {m3} of {}", end(t));
            }
        }
        assert_eq!(joined, Some(100));
    }

    /// Polls every group and delivers their messages, writes durable at once, until quiet;
    /// messages to or from `cut` are lost.
    fn deliver(groups: &mut [RaftGroup<ReplicaLog>], cut: Option<u64>) {
        for _ in 0..100 {
            let mut mail = Vec::new();
            for group in groups.iter_mut() {
                let output = group.poll().unwrap();
                group.store_mut().take_writes();
                mail.extend(output.send);
                if let Some(persist) = output.persist {
                    group.persisted(persist.number);
                    mail.extend(persist.then_send);
                }
            }
            if mail.is_empty() {
                return;
            }
            for m in mail.into_iter().filter(|m| cut.is_none_or(|c| m.to != c && m.from != c)) {
                groups[(m.to - 1) as usize].step(m).unwrap();
            }
        }
        panic!("the groups did not settle");
    }

    fn tick(groups: &mut [RaftGroup<ReplicaLog>], cut: Option<u64>) {
        for group in groups.iter_mut() {
            group.tick();
        }
        deliver(groups, cut);
    }

    #[test]
    fn a_groups_leader_drops_a_cut_off_follower_and_takes_it_back_once_it_has_caught_up() {
        let settings = GroupSettings { in_sync_lag_ticks: 20, ..GroupSettings::default() };
        let mut groups: Vec<_> = (1..=3)
            .map(|id| {
                let state = ReplicaState::new(vec![1, 2, 3], 0);
                let store =
                    ReplicaLog::open(state, LeaderEpochs::default(), [], CacheLimits::default()).unwrap();
                RaftGroup::new(id, format!("t-0@{id}"), settings, store, id).unwrap()
            })
            .collect();
        groups[0].campaign().unwrap();
        deliver(&mut groups, None);
        for _ in 0..5 {
            tick(&mut groups, None);
        }
        assert!(groups[0].is_serving());
        let progress = |group: &RaftGroup<ReplicaLog>| -> Vec<(u64, bool, Option<i64>)> {
            group.followers().map(|f| (f.id, f.in_sync, f.lag)).collect()
        };
        assert_eq!(progress(&groups[0]), vec![(2, true, Some(0)), (3, true, Some(0))]);
        assert_eq!(progress(&groups[1]).len(), 0, "a follower follows no one");
        // Node 3 is cut off while the leader takes a record a tick: out once 20 ticks have
        // passed since it was last heard (a heartbeat, every 2 ticks), while node 2 stays.
        for t in 0..30 {
            groups[0].propose(record(t)).unwrap();
            tick(&mut groups, Some(3));
            let in_sync = progress(&groups[0])[1].1;
            assert!(in_sync || t >= 18, "tick {t}: out too early: {:?}", progress(&groups[0]));
            assert!(!in_sync || t < 21, "tick {t}: still in: {:?}", progress(&groups[0]));
        }
        assert_eq!(progress(&groups[0])[0], (2, true, Some(0)));
        assert!(progress(&groups[0])[1].2.is_some_and(|lag| lag >= 30), "{:?}", progress(&groups[0]));
        // Back: it copies what it lacks and joins again, with nothing left to copy.
        let mut ticks = 0;
        while !progress(&groups[0])[1].1 {
            ticks += 1;
            assert!(ticks < 20, "node 3 did not rejoin: {:?}", progress(&groups[0]));
            tick(&mut groups, None);
        }
        assert_eq!(progress(&groups[0])[1], (3, true, Some(0)));
    }

    fn record(i: u32) -> bytes::BytesMut {
        let mut builder = BatchBuilder::new();
        builder.push(1_700_000_000_000, None, Some(format!("v{i}").as_bytes()), &[]);
        builder.finish()
    }

    #[test]
    fn a_new_leader_keeps_its_followers_for_the_lag_and_a_deposed_one_has_none() {
        let mut tracker = InSyncTracker::new(10);
        tracker.lead(50, [2, 3]);
        // Neither has answered yet (raft-rs resets match indexes at election).
        run(&mut tracker, 50..60, |_| 7, |_, _| None);
        assert!(tracker.in_sync(2) && tracker.in_sync(3), "grace while they answer");
        run(&mut tracker, 60..62, |_| 7, |id, _| (id == 2).then_some(7));
        assert!(tracker.in_sync(2) && !tracker.in_sync(3));
        tracker.stop();
        assert!(!tracker.in_sync(2));
    }
}
