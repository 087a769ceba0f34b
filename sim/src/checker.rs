//! Invariants, checked while the simulation runs and at its end:
//!
//! - at most one leader per term in each group;
//! - committed entries never change or disappear: every replica's committed prefix is the same
//!   (term, bytes, offsets) at every index, whenever it is looked at (log matching, leader
//!   completeness), from its anchor on (what a replica compacted, or never held because it
//!   restarted its log from a snapshot, it cannot show); and at the end every batch each disk
//!   holds below its commit is the committed entry at that offset, byte for byte;
//! - a leader never serves a high watermark below one a leader of an earlier term served;
//! - every acknowledged produce is in the final log exactly once, at the offsets it was
//!   acknowledged with, and no record appears twice (so an idempotent producer's retry is never
//!   written twice). The final log is the checker's own copy of every committed entry, taken
//!   when a replica first showed it committed and held to every replica's disk after, so entries
//!   every replica has since compacted away still count;
//! - a retry of an idempotent batch already committed is answered as a duplicate, never refused,
//!   whichever replica leads (`world::producers`), also one restarted from a snapshot below it;
//! - an answer never changes: a record acknowledged again (a retry) has the offset it first had;
//! - after the faults end, every group has one serving leader and every replica has caught up.

use std::collections::BTreeMap;

use bytes::Bytes;
use ringlog::record::{reader, BatchHeader};
use ringlog::replication::group::{Proposed, RaftGroup, Role};
use ringlog::replication::replica_log::ReplicaLog;
use ringlog::replication::store::ReplicaStore;
use ringlog::replication::wire::GroupKey;

use crate::disk::SimDisk;

struct CommittedEntry {
    term: u64,
    data: Bytes,
    end_offset: i64,
}

struct Pending {
    group: GroupKey,
    node: u64,
    proposed: Proposed,
    ids: Vec<u64>,
}

/// A node as the checker sees it: id, whether it is up, its groups and their disks.
pub type NodeView<'a> = (u64, bool, Vec<(GroupKey, &'a RaftGroup<ReplicaLog>, &'a SimDisk)>);
type NodesView<'a> = [NodeView<'a>];

pub struct Checker {
    failure: Option<String>,
    committed: BTreeMap<GroupKey, BTreeMap<u64, CommittedEntry>>,
    checked_commit: BTreeMap<(u64, GroupKey), u64>,
    leaders: BTreeMap<(GroupKey, u64), u64>,
    /// The highest high watermark served in each term.
    served_high_watermarks: BTreeMap<(GroupKey, u64), i64>,
    pending: Vec<Pending>,
    /// Record id → (group, offset) it was acknowledged at.
    acknowledged: BTreeMap<u64, (GroupKey, i64)>,
    /// Records of committed entries (the first place each was committed at).
    committed_records: BTreeMap<u64, (GroupKey, i64)>,
    pub elections: u64,
}

impl Checker {
    pub fn new(_groups: u32) -> Checker {
        Checker {
            failure: None,
            committed: BTreeMap::new(),
            checked_commit: BTreeMap::new(),
            leaders: BTreeMap::new(),
            served_high_watermarks: BTreeMap::new(),
            pending: Vec::new(),
            acknowledged: BTreeMap::new(),
            committed_records: BTreeMap::new(),
            elections: 0,
        }
    }

    pub fn fail(&mut self, reason: String) {
        self.failure.get_or_insert(reason);
    }

    pub fn failed(&self) -> bool {
        self.failure.is_some()
    }

    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    pub fn acknowledged(&self) -> usize {
        self.acknowledged.len()
    }

    pub fn is_acknowledged(&self, id: u64) -> bool {
        self.acknowledged.contains_key(&id)
    }

    /// Whether record `id` is in a committed entry.
    pub fn is_committed(&self, id: u64) -> bool {
        self.committed_records.contains_key(&id)
    }

    pub fn proposed(&mut self, group: GroupKey, node: u64, proposed: Proposed, ids: Vec<u64>) {
        self.pending.push(Pending { group, node, proposed, ids });
    }

    /// The node crashed and came back: its commit index starts again from its disk, and the
    /// produces it had not acknowledged never will be (their clients lost the connection).
    pub fn restarted(&mut self, node: u64) {
        self.checked_commit.retain(|(n, _), _| *n != node);
        self.pending.retain(|p| p.node != node);
    }

    pub fn observe(&mut self, nodes: &NodesView<'_>, now: u64) {
        for (id, alive, groups) in nodes {
            if !alive {
                continue;
            }
            for (key, group, disk) in groups {
                self.observe_group(*id, *key, group, disk, now);
            }
        }
    }

    fn observe_group(
        &mut self,
        node: u64,
        key: GroupKey,
        group: &RaftGroup<ReplicaLog>,
        disk: &SimDisk,
        now: u64,
    ) {
        if group.role() == Role::Leader {
            let leader = *self.leaders.entry((key, group.term())).or_insert_with(|| {
                self.elections += 1;
                node
            });
            if leader != node {
                return self.fail(format!(
                    "{now} ms: two leaders in term {} of p{}: n{leader} and n{node}",
                    group.term(),
                    key.partition
                ));
            }
        }
        // Below its anchor a replica has no entries to show (compacted, or before the snapshot
        // its log restarted from).
        let checked = self.checked_commit.get(&(node, key)).copied().unwrap_or(0);
        let from = checked.max(group.store().anchor().index);
        let to = group.commit_index();
        let log = self.committed.entry(key).or_default();
        let mut broken = None;
        for index in from + 1..=to {
            // What the disk holds where the replica places the entry: a reader gets that.
            let Some((entry, end_offset)) = disk.entry_at(group.store(), index) else {
                broken = Some(format!(
                    "{now} ms: n{node} p{}: committed index {index} is not in its log",
                    key.partition
                ));
                break;
            };
            match log.get(&index) {
                Some(known)
                    if known.term != entry.term
                        || known.data != entry.data
                        || known.end_offset != end_offset =>
                {
                    broken = Some(format!(
                        "{now} ms: n{node} p{}: committed entry {index} changed: term {} -> {}, end offset {} -> {}",
                        key.partition, known.term, entry.term, known.end_offset, end_offset
                    ));
                    break;
                }
                Some(_) => {}
                None => {
                    for (id, offset) in record_ids(&entry.data) {
                        self.committed_records.entry(id).or_insert((key, offset));
                    }
                    log.insert(index, CommittedEntry { term: entry.term, data: entry.data, end_offset });
                }
            }
        }
        if let Some(reason) = broken {
            return self.fail(reason);
        }
        if to > checked {
            self.checked_commit.insert((node, key), to);
        }
        // Only leaders serve, so clients see only their high watermarks. A leader of a later term
        // must never serve less than one of an earlier term did. (An old leader cut off from the
        // others keeps serving what it has until it notices, as in Kafka: clients fence it with
        // the leader epoch. And a follower may be ahead of its leader for a moment: two followers
        // can commit an entry before the leader's own write is durable.)
        if group.is_serving() {
            let (hw, term) = (group.high_watermark(), group.term());
            let earlier = self.served_high_watermarks.range((key, 0)..(key, term)).map(|(_, hw)| *hw).max();
            if let Some(before) = earlier.filter(|&before| before > hw) {
                return self.fail(format!(
                    "{now} ms: n{node} p{} serves high watermark {hw} in term {term}, below {before} served in an earlier term",
                    key.partition
                ));
            }
            let served = self.served_high_watermarks.entry((key, term)).or_insert(hw);
            *served = (*served).max(hw);
        }
        // Acknowledge what the proposing leader now has committed under the term it proposed in.
        // A retry answered with an earlier batch's offsets (`Proposed::retry`) is acknowledged
        // once the leader's high watermark passes them while the term it answered in lasts.
        let mut still_pending = Vec::new();
        let mut answered = Vec::new();
        for p in std::mem::take(&mut self.pending) {
            if p.node != node || p.group != key {
                still_pending.push(p);
                continue;
            }
            if p.proposed.retry {
                if group.term() != p.proposed.term {
                    continue;
                }
                if group.high_watermark() > p.proposed.last_offset {
                    answered.push(p);
                } else {
                    still_pending.push(p);
                }
                continue;
            }
            if p.proposed.index > to {
                still_pending.push(p);
                continue;
            }
            let Some(entry) = self.committed.get(&key).and_then(|log| log.get(&p.proposed.index)) else {
                still_pending.push(p);
                continue;
            };
            if entry.term == p.proposed.term {
                answered.push(p);
            }
        }
        self.pending = still_pending;
        for p in answered {
            for (i, id) in p.ids.iter().enumerate() {
                let at = (key, p.proposed.base_offset + i as i64);
                if let Some(before) = self.acknowledged.insert(*id, at).filter(|before| *before != at) {
                    return self.fail(format!(
                        "{now} ms: record {id} acknowledged at {at:?} by n{node}, earlier at {before:?}"
                    ));
                }
            }
        }
    }

    /// Every batch a replica's disk holds below its commit is the committed entry at that offset:
    /// the part of its log below its anchor, which `observe` cannot read, included.
    fn disks_hold_the_committed_log(&self, nodes: &NodesView<'_>, key: GroupKey) -> Option<String> {
        let log = self.committed.get(&key)?;
        let by_base: BTreeMap<i64, &Bytes> = log
            .values()
            .filter_map(|e| Some((BatchHeader::parse(&e.data).ok()?.base_offset, &e.data)))
            .collect();
        for (id, _, groups) in nodes {
            for (_, group, disk) in groups.iter().filter(|(k, _, _)| *k == key) {
                let Some(commit_end) = group.store().end_offset(group.commit_index()) else { continue };
                for (base, batch) in disk.batches_below(commit_end) {
                    if by_base.get(&base) != Some(&batch) {
                        return Some(format!(
                            "n{id} p{}: the batch at offset {base}, below its commit, is not the committed one",
                            key.partition
                        ));
                    }
                }
            }
        }
        None
    }

    /// After the faults have ended and the cluster has had time to settle.
    pub fn check_end(&mut self, nodes: &NodesView<'_>, now: u64) {
        if self.failed() {
            return;
        }
        self.observe(nodes, now);
        let keys: Vec<GroupKey> =
            nodes.first().map(|(_, _, g)| g.iter().map(|(k, _, _)| *k).collect()).unwrap_or_default();
        for key in keys {
            let replicas: Vec<(u64, &RaftGroup<ReplicaLog>)> = nodes
                .iter()
                .filter_map(|(id, _, groups)| {
                    groups.iter().find(|(k, _, _)| *k == key).map(|(_, g, _)| (*id, *g))
                })
                .collect();
            let serving: Vec<u64> =
                replicas.iter().filter(|(_, g)| g.is_serving()).map(|(id, _)| *id).collect();
            if serving.len() != 1 {
                return self.fail(format!(
                    "{now} ms: p{} has {} serving leaders after the faults ended: {serving:?}",
                    key.partition,
                    serving.len()
                ));
            }
            if let Some(reason) = self.disks_hold_the_committed_log(nodes, key) {
                return self.fail(format!("{now} ms: {reason}"));
            }
            let commits: Vec<(u64, u64, u64)> =
                replicas.iter().map(|(id, g)| (*id, g.commit_index(), g.store().last_index())).collect();
            if commits.iter().any(|&(_, commit, last)| commit != commits[0].1 || last != commit) {
                return self.fail(format!(
                    "{now} ms: p{} replicas did not converge (node, commit, last): {commits:?}",
                    key.partition
                ));
            }
        }
        // Every acknowledged record exactly once, where it was acknowledged; nothing twice.
        let mut found: BTreeMap<u64, (GroupKey, i64)> = BTreeMap::new();
        for (key, log) in &self.committed {
            for (index, entry) in log {
                // A new leader's entry: a control batch, which consumers skip.
                if BatchHeader::parse(&entry.data).is_ok_and(|h| h.is_control()) {
                    continue;
                }
                let records = match reader::records(&entry.data) {
                    Ok(records) => records,
                    Err(e) => {
                        return self.fail(format!("p{} entry {index} is not a batch: {e}", key.partition))
                    }
                };
                for record in records {
                    let Ok(record) = record else {
                        return self.fail(format!("p{} entry {index} has a damaged record", key.partition));
                    };
                    let id =
                        record.value.and_then(|v| v.try_into().ok()).map(u64::from_be_bytes).unwrap_or(0);
                    if let Some(first) = found.insert(id, (*key, record.offset)) {
                        return self.fail(format!(
                            "record {id} is in the log twice: {first:?} and ({key:?}, {})",
                            record.offset
                        ));
                    }
                }
            }
        }
        for (id, at) in &self.acknowledged {
            match found.get(id) {
                Some(where_found) if where_found == at => {}
                other => {
                    return self
                        .fail(format!("acknowledged record {id} at {at:?} is at {other:?} in the final log"))
                }
            }
        }
    }
}

/// The record ids of a committed entry with their offsets (none for a control batch).
fn record_ids(data: &Bytes) -> Vec<(u64, i64)> {
    if BatchHeader::parse(data).is_ok_and(|h| h.is_control()) {
        return Vec::new();
    }
    let Ok(records) = reader::records(data) else { return Vec::new() };
    records
        .flatten()
        .filter_map(|r| Some((u64::from_be_bytes(r.value?.try_into().ok()?), r.offset)))
        .collect()
}
