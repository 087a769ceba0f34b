//! Every replicated partition's leader and in-sync replicas as this node knows them (issue 11,
//! stops 14 and 15; docs/replication.md, "In-sync replicas", "Leaders a node holds no replica
//! of"). A partition's leader computes its in-sync set (`replication::in_sync`); every node sends
//! each peer, in every keepalive, the partitions it leads whose set is short or that some node
//! holds no replica of, and keeps the latest report of each peer. A partition no live peer
//! reports short and whose leader is known has all its replicas in sync, so a healthy cluster
//! whose partitions are on every node reports nothing, and any node answers any partition within
//! a keepalive of its leader.
//!
//! Owns: the reports received and the rule that picks one answer per partition from this node's
//! replica, the reports and the replica set. No IO, no clock of its own (times are given).
//! Depends on `replication::wire`.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::replication::wire::{GroupKey, LeaderReport};

/// One peer's report: when it was last confirmed, its digest (`wire::report_digest`; 0 when the
/// peer sends none) and, per partition, the leader's term and in-sync set.
type Report = (Instant, u64, HashMap<GroupKey, (u64, Vec<u64>)>);

/// The latest report of each peer.
#[derive(Debug, Default)]
pub struct Reports {
    by_node: BTreeMap<u64, Report>,
}

impl Reports {
    /// Peer `from`'s report with its `digest`, received whole at `at`: it replaces the one before.
    pub fn record(&mut self, from: u64, at: Instant, digest: u64, report: Vec<LeaderReport>) {
        let shorts = report.into_iter().map(|s| (s.group, (s.term, s.in_sync))).collect();
        self.by_node.insert(from, (at, digest, shorts));
    }

    /// Peer `from` says at `at` that its report is unchanged since the one with `digest`. When
    /// that is the one held, it holds as if received now; otherwise (the whole report that
    /// changed it was lost) the one held ages until the next whole report replaces it, which the
    /// sender sends well within `fresh`. Whether it was confirmed.
    pub fn confirm(&mut self, from: u64, at: Instant, digest: u64) -> bool {
        match self.by_node.get_mut(&from) {
            Some((confirmed, held, _)) if *held == digest && digest != 0 => {
                *confirmed = at;
                true
            }
            _ => false,
        }
    }

    /// The report of `key` with the highest term among the peers' reports younger than `fresh`
    /// at `now` (a peer that stopped reporting is down, and what it said no longer holds).
    pub fn newest(&self, key: GroupKey, now: Instant, fresh: Duration) -> Option<Reported<'_>> {
        self.by_node
            .iter()
            .filter(|(_, (at, _, _))| now.saturating_duration_since(*at) < fresh)
            .filter_map(|(&leader, (_, _, reports))| {
                let (term, in_sync) = reports.get(&key)?;
                Some(Reported { leader, term: *term, in_sync })
            })
            .max_by_key(|reported| reported.term)
    }
}

/// A leader's report of one partition: only a partition's leader reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reported<'a> {
    pub leader: u64,
    pub term: u64,
    pub in_sync: &'a [u64],
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
    /// The newest live report of the partition from its leader.
    pub reported: Option<Reported<'a>>,
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
    if let Some(reported) = known.reported.filter(|r| r.term >= local_term) {
        return Some(members(reported.in_sync));
    }
    known.local.and_then(|(leader, _)| leader).map(|_| known.replicas.to_vec())
}

/// The partition's leader and its term as this node knows them: its own replica's view when
/// that names a leader, else the leader's own report unless this node's replica knows a newer
/// term (the reporter was deposed since). A node with no replica of the partition knows its
/// leader only from reports.
pub fn leader(known: Known<'_>) -> Option<(u64, u64)> {
    if let Some((Some(leader), term)) = known.local {
        return Some((leader, term));
    }
    let local_term = known.local.map_or(0, |(_, term)| term);
    known.reported.filter(|r| r.term >= local_term).map(|r| (r.leader, r.term))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: GroupKey = GroupKey { topic_id: 12, partition: 1 };

    fn report(leader: u64, term: u64, in_sync: &[u64]) -> Reported<'_> {
        Reported { leader, term, in_sync }
    }

    fn known<'a>(local: Option<(Option<u64>, u64)>) -> Known<'a> {
        Known { replicas: &[2, 3, 1], local, led: None, reported: None }
    }

    #[test]
    fn the_leader_answers_first_then_a_current_report_then_the_replica_set() {
        // The leader's own view, in replica-set order.
        let led = Known { led: Some(&[1, 3]), ..known(Some((Some(1), 5))) };
        assert_eq!(in_sync(led), Some(vec![3, 1]));
        // A follower (or a node without a replica) takes the leader's report...
        let reported = Known { reported: Some(report(1, 5, &[1, 2])), ..known(Some((Some(1), 5))) };
        assert_eq!(in_sync(reported), Some(vec![2, 1]));
        assert_eq!(in_sync(Known { reported: Some(report(1, 5, &[1])), ..known(None) }), Some(vec![1]));
        // ...unless its replica already knows a newer term (the report's leader was deposed).
        let stale = Known { reported: Some(report(1, 4, &[1])), ..known(Some((Some(2), 5))) };
        assert_eq!(in_sync(stale), Some(vec![2, 3, 1]));
        // Nothing reported short and a leader known: all in sync.
        assert_eq!(in_sync(known(Some((Some(2), 5)))), Some(vec![2, 3, 1]));
        // No leader known here: nothing to say.
        assert_eq!(in_sync(known(Some((None, 6)))), None);
        assert_eq!(in_sync(known(None)), None);
    }

    #[test]
    fn a_replica_that_names_a_leader_answers_first_then_the_leaders_own_report() {
        assert_eq!(leader(known(Some((Some(2), 5)))), Some((2, 5)));
        // A newer report does not overrule a replica that knows a leader: the replica hears the
        // new term from the group itself within a heartbeat.
        assert_eq!(
            leader(Known { reported: Some(report(3, 6, &[3])), ..known(Some((Some(2), 5))) }),
            Some((2, 5))
        );
        // No replica here (a partition on fewer nodes than the cluster): the report is all.
        assert_eq!(leader(Known { reported: Some(report(3, 6, &[3])), ..known(None) }), Some((3, 6)));
        // A replica between leaders takes a report of its term or later, not an older one.
        assert_eq!(
            leader(Known { reported: Some(report(3, 6, &[3])), ..known(Some((None, 6))) }),
            Some((3, 6))
        );
        assert_eq!(leader(Known { reported: Some(report(3, 5, &[3])), ..known(Some((None, 6))) }), None);
        assert_eq!(leader(known(None)), None);
    }

    #[test]
    fn reports_expire_and_the_highest_term_wins() {
        let t0 = Instant::now();
        let fresh = Duration::from_secs(3);
        let mut reports = Reports::default();
        let short = |term, in_sync: &[u64]| LeaderReport { group: KEY, term, in_sync: in_sync.to_vec() };
        reports.record(1, t0, 0, vec![short(4, &[1])]);
        reports.record(2, t0 + Duration::from_secs(2), 0, vec![short(5, &[2, 3])]);
        assert_eq!(reports.newest(KEY, t0 + Duration::from_secs(2), fresh), Some(report(2, 5, &[2, 3])));
        // Node 2's next report says nothing is short: node 1's older term is all that is left.
        reports.record(2, t0 + Duration::from_secs(2), 0, Vec::new());
        assert_eq!(reports.newest(KEY, t0 + Duration::from_secs(2), fresh), Some(report(1, 4, &[1])));
        // Node 1 has not reported for 3 s: down, and its report with it.
        assert_eq!(reports.newest(KEY, t0 + Duration::from_secs(3), fresh), None);
        assert_eq!(reports.newest(GroupKey { partition: 2, ..KEY }, t0, fresh), None);
    }

    #[test]
    fn an_unchanged_report_is_confirmed_by_its_digest_and_a_missed_change_ages_out() {
        let t0 = Instant::now();
        let fresh = Duration::from_secs(3);
        let at = |s| t0 + Duration::from_secs(s);
        let mut reports = Reports::default();
        let held = vec![LeaderReport { group: KEY, term: 4, in_sync: vec![1] }];
        let digest = crate::replication::wire::report_digest(&held);
        reports.record(1, t0, digest, held);
        // Keepalives without the report, with the same digest: it holds as if just received.
        assert!(reports.confirm(1, at(2), digest));
        assert!(reports.confirm(1, at(4), digest));
        assert_eq!(reports.newest(KEY, at(6), fresh), Some(report(1, 4, &[1])));
        // The whole report that changed it was lost: a digest that is not the one held confirms
        // nothing, so what is held ages out instead of standing for the new report.
        assert!(!reports.confirm(1, at(5), digest ^ 1));
        assert_eq!(reports.newest(KEY, at(7), fresh), None);
        // A peer that sends no digest, or one never heard whole, confirms nothing.
        assert!(!reports.confirm(2, at(5), digest));
        reports.record(3, at(5), 0, Vec::new());
        assert!(!reports.confirm(3, at(6), 0));
    }
}
