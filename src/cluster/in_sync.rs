//! Every replicated partition's in-sync replicas as this node knows them (issue 11, stop 14;
//! docs/replication.md, "In-sync replicas"). A partition's leader computes its in-sync set
//! (`replication::in_sync`); every node sends each peer, in every keepalive, the partitions it
//! leads whose set is short, and keeps the latest report of each peer. A partition no live peer
//! reports short and whose leader is known has all its replicas in sync, so a healthy cluster
//! reports nothing, and any node answers any partition within a keepalive of its leader.
//!
//! Owns: the reports received and the rule that picks one answer per partition from this node's
//! replica, the reports and the replica set. No IO, no clock of its own (times are given).
//! Depends on `replication::wire`.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::replication::wire::{GroupKey, ShortInSync};

/// One peer's report: when it came and, per partition, the leader's term and in-sync set.
type Report = (Instant, HashMap<GroupKey, (u64, Vec<u64>)>);

/// The latest report of each peer.
#[derive(Debug, Default)]
pub struct Reports {
    by_node: BTreeMap<u64, Report>,
}

impl Reports {
    /// Peer `from`'s report, received at `at`: it replaces the one before.
    pub fn record(&mut self, from: u64, at: Instant, report: Vec<ShortInSync>) {
        let shorts = report.into_iter().map(|s| (s.group, (s.term, s.in_sync))).collect();
        self.by_node.insert(from, (at, shorts));
    }

    /// The report of `key` with the highest term among the peers' reports younger than `fresh`
    /// at `now` (a peer that stopped reporting is down, and what it said no longer holds).
    pub fn newest(&self, key: GroupKey, now: Instant, fresh: Duration) -> Option<(u64, &[u64])> {
        self.by_node
            .values()
            .filter(|(at, _)| now.saturating_duration_since(*at) < fresh)
            .filter_map(|(_, shorts)| shorts.get(&key).map(|(term, in_sync)| (*term, in_sync.as_slice())))
            .max_by_key(|&(term, _)| term)
    }
}

/// What this node knows of one partition.
#[derive(Debug, Clone, Copy)]
pub struct Known<'a> {
    /// Its replica set, the preferred leader first.
    pub replicas: &'a [u64],
    /// This node's replica, when it has one: the leader it knows and its term.
    pub local: Option<(Option<u64>, u64)>,
    /// When this node leads the partition: the members it has in sync.
    pub led: Option<&'a [u64]>,
    /// The newest live report of the partition being short: its leader's term and set.
    pub reported: Option<(u64, &'a [u64])>,
}

/// The partition's in-sync replicas in replica-set order, `None` when this node knows no
/// leader (it cannot say who is in sync with none). The leader's own view wins; then a
/// report at least as new as what this node's replica knows; then, with a leader known and
/// nothing reported short, every replica.
pub fn in_sync(known: Known<'_>) -> Option<Vec<u64>> {
    let members = |set: &[u64]| known.replicas.iter().copied().filter(|id| set.contains(id)).collect();
    if let Some(led) = known.led {
        return Some(members(led));
    }
    let local_term = known.local.map_or(0, |(_, term)| term);
    if let Some((_, set)) = known.reported.filter(|&(term, _)| term >= local_term) {
        return Some(members(set));
    }
    known.local.and_then(|(leader, _)| leader).map(|_| known.replicas.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: GroupKey = GroupKey { topic_id: 12, partition: 1 };

    fn known<'a>(local: Option<(Option<u64>, u64)>) -> Known<'a> {
        Known { replicas: &[2, 3, 1], local, led: None, reported: None }
    }

    #[test]
    fn the_leader_answers_first_then_a_current_report_then_the_replica_set() {
        // The leader's own view, in replica-set order.
        let led = Known { led: Some(&[1, 3]), ..known(Some((Some(1), 5))) };
        assert_eq!(in_sync(led), Some(vec![3, 1]));
        // A follower (or a node without a replica) takes the leader's report...
        let reported = Known { reported: Some((5, &[1, 2])), ..known(Some((Some(1), 5))) };
        assert_eq!(in_sync(reported), Some(vec![2, 1]));
        assert_eq!(in_sync(Known { reported: Some((5, &[1])), ..known(None) }), Some(vec![1]));
        // ...unless its replica already knows a newer term (the report's leader was deposed).
        let stale = Known { reported: Some((4, &[1])), ..known(Some((Some(2), 5))) };
        assert_eq!(in_sync(stale), Some(vec![2, 3, 1]));
        // Nothing reported short and a leader known: all in sync.
        assert_eq!(in_sync(known(Some((Some(2), 5)))), Some(vec![2, 3, 1]));
        // No leader known here: nothing to say.
        assert_eq!(in_sync(known(Some((None, 6)))), None);
        assert_eq!(in_sync(known(None)), None);
    }

    #[test]
    fn reports_expire_and_the_highest_term_wins() {
        let t0 = Instant::now();
        let fresh = Duration::from_secs(3);
        let mut reports = Reports::default();
        let short = |term, in_sync: &[u64]| ShortInSync { group: KEY, term, in_sync: in_sync.to_vec() };
        reports.record(1, t0, vec![short(4, &[1])]);
        reports.record(2, t0 + Duration::from_secs(2), vec![short(5, &[2, 3])]);
        assert_eq!(reports.newest(KEY, t0 + Duration::from_secs(2), fresh), Some((5, &[2, 3][..])));
        // Node 2's next report says nothing is short: node 1's older term is all that is left.
        reports.record(2, t0 + Duration::from_secs(2), Vec::new());
        assert_eq!(reports.newest(KEY, t0 + Duration::from_secs(2), fresh), Some((4, &[1][..])));
        // Node 1 has not reported for 3 s: down, and its report with it.
        assert_eq!(reports.newest(KEY, t0 + Duration::from_secs(3), fresh), None);
        assert_eq!(reports.newest(GroupKey { partition: 2, ..KEY }, t0, fresh), None);
    }
}
