//! Server-side partition assignors: range, roundrobin and sticky, as Kafka's consumers define them.
//!
//! Owns: turning (members and their subscriptions, partition counts, previous owners) into an
//! assignment in which every partition of a subscribed topic goes to exactly one subscribed member.
//! Pure functions: deterministic for the same input (members are taken in member-id order).

use std::collections::{BTreeMap, BTreeSet};

/// Assignor names the coordinator can run itself.
pub const ASSIGNORS: &[&str] = &["range", "roundrobin", "sticky"];

/// A member's input to an assignor.
#[derive(Debug, Clone, Default)]
pub struct Subscriber {
    pub topics: Vec<String>,
    /// What the member owned in the previous generation (sticky keeps it where it can).
    pub owned: Vec<(String, u32)>,
}

/// member id → its partitions, as (topic, sorted partitions), topics sorted.
pub type Assignment = BTreeMap<String, Vec<(String, Vec<u32>)>>;

/// Runs the named assignor; `None` if the name is not one of [`ASSIGNORS`].
/// `partition_count` gives a topic's partitions (`None`: the topic does not exist, so it is skipped).
pub fn assign(
    name: &str,
    members: &BTreeMap<String, Subscriber>,
    partition_count: &dyn Fn(&str) -> Option<u32>,
) -> Option<Assignment> {
    let flat = match name {
        "range" => range(members, partition_count),
        "roundrobin" => round_robin(members, partition_count),
        "sticky" => sticky(members, partition_count),
        _ => return None,
    };
    Some(group_by_topic(members, flat))
}

fn group_by_topic(
    members: &BTreeMap<String, Subscriber>,
    flat: BTreeMap<String, Vec<(String, u32)>>,
) -> Assignment {
    let mut out = Assignment::new();
    for id in members.keys() {
        let mut per_topic: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for (topic, p) in flat.get(id).into_iter().flatten() {
            per_topic.entry(topic.clone()).or_default().push(*p);
        }
        let mut topics: Vec<(String, Vec<u32>)> = per_topic.into_iter().collect();
        for (_, ps) in &mut topics {
            ps.sort_unstable();
        }
        out.insert(id.clone(), topics);
    }
    out
}

/// Every existing topic anyone subscribes to, with its partition count.
fn subscribed_topics(
    members: &BTreeMap<String, Subscriber>,
    partition_count: &dyn Fn(&str) -> Option<u32>,
) -> BTreeMap<String, u32> {
    let names: BTreeSet<&String> = members.values().flat_map(|m| &m.topics).collect();
    names.into_iter().filter_map(|t| partition_count(t).map(|n| (t.clone(), n))).collect()
}

fn subscribes(m: &Subscriber, topic: &str) -> bool {
    m.topics.iter().any(|t| t == topic)
}

/// Per topic, the subscribed members in id order get contiguous ranges; the first
/// `partitions % members` get one more.
fn range(
    members: &BTreeMap<String, Subscriber>,
    partition_count: &dyn Fn(&str) -> Option<u32>,
) -> BTreeMap<String, Vec<(String, u32)>> {
    let mut out: BTreeMap<String, Vec<(String, u32)>> = BTreeMap::new();
    for (topic, n) in subscribed_topics(members, partition_count) {
        let subs: Vec<&String> =
            members.iter().filter(|(_, m)| subscribes(m, &topic)).map(|(id, _)| id).collect();
        let (per, extra) = (n as usize / subs.len(), n as usize % subs.len());
        let mut next = 0u32;
        for (i, id) in subs.into_iter().enumerate() {
            let take = per + usize::from(i < extra);
            for _ in 0..take {
                out.entry(id.clone()).or_default().push((topic.clone(), next));
                next += 1;
            }
        }
        debug_assert_eq!(next, n, "range assigned every partition of {topic}");
    }
    out
}

/// All partitions in (topic, partition) order dealt to members in turn, skipping members not
/// subscribed to the partition's topic.
fn round_robin(
    members: &BTreeMap<String, Subscriber>,
    partition_count: &dyn Fn(&str) -> Option<u32>,
) -> BTreeMap<String, Vec<(String, u32)>> {
    let ids: Vec<&String> = members.keys().collect();
    let mut out: BTreeMap<String, Vec<(String, u32)>> = BTreeMap::new();
    let mut turn = 0usize;
    for (topic, n) in subscribed_topics(members, partition_count) {
        for p in 0..n {
            // Some member subscribes to `topic` (that is how it got here), so this ends.
            loop {
                let id = ids[turn % ids.len()];
                turn += 1;
                if subscribes(&members[id], &topic) {
                    out.entry(id.clone()).or_default().push((topic.clone(), p));
                    break;
                }
            }
        }
    }
    out
}

/// Keeps each partition with its previous owner while that owner stays within its balanced
/// share, then gives the rest to the least-loaded subscribed members. With the same members and
/// a balanced previous assignment, nothing moves.
fn sticky(
    members: &BTreeMap<String, Subscriber>,
    partition_count: &dyn Fn(&str) -> Option<u32>,
) -> BTreeMap<String, Vec<(String, u32)>> {
    let topics = subscribed_topics(members, partition_count);
    let all: Vec<(String, u32)> =
        topics.iter().flat_map(|(t, &n)| (0..n).map(move |p| (t.clone(), p))).collect();
    let base = all.len() / members.len();
    let mut extra_slots = all.len() % members.len();
    let mut out: BTreeMap<String, Vec<(String, u32)>> =
        members.keys().map(|id| (id.clone(), Vec::new())).collect();
    let mut taken: BTreeSet<(String, u32)> = BTreeSet::new();
    // Pass 1: up to `base` previous partitions each; pass 2: one more for owners that had more,
    // while the remainder allows it.
    for pass in 0..2 {
        for (id, m) in members {
            let mut owned: Vec<&(String, u32)> = m.owned.iter().collect();
            owned.sort();
            for tp in owned {
                let have = out[id].len();
                let limit = if pass == 0 { base } else { base + 1 };
                if have >= limit || (pass == 1 && extra_slots == 0) {
                    break;
                }
                let valid = topics.get(&tp.0).is_some_and(|&n| tp.1 < n) && subscribes(m, &tp.0);
                if valid && taken.insert(tp.clone()) {
                    if let Some(list) = out.get_mut(id) {
                        list.push(tp.clone());
                    }
                    if pass == 1 {
                        extra_slots -= 1;
                    }
                }
            }
        }
    }
    for tp in all {
        if taken.contains(&tp) {
            continue;
        }
        let target = out
            .iter()
            .filter(|(id, _)| subscribes(&members[*id], &tp.0))
            .min_by_key(|(id, list)| (list.len(), (*id).clone()))
            .map(|(id, _)| id.clone());
        if let Some(id) = target {
            if let Some(list) = out.get_mut(&id) {
                list.push(tp.clone());
            }
            taken.insert(tp);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn members(n: usize, topics: &[&str]) -> BTreeMap<String, Subscriber> {
        (0..n)
            .map(|i| {
                let topics = topics.iter().map(|t| t.to_string()).collect();
                (format!("m{i:02}"), Subscriber { topics, owned: Vec::new() })
            })
            .collect()
    }

    fn counts(topics: &HashMap<String, u32>) -> impl Fn(&str) -> Option<u32> + '_ {
        move |t| topics.get(t).copied()
    }

    /// Every partition of every subscribed topic exactly once, and only to subscribers.
    fn check_exactly_once(
        members: &BTreeMap<String, Subscriber>,
        topics: &HashMap<String, u32>,
        a: &Assignment,
    ) -> Result<(), TestCaseError> {
        let mut seen: HashMap<(String, u32), usize> = HashMap::new();
        for (id, list) in a {
            for (topic, ps) in list {
                prop_assert!(subscribes(&members[id], topic), "{id} got {topic} without subscribing");
                for p in ps {
                    *seen.entry((topic.clone(), *p)).or_default() += 1;
                }
            }
        }
        for (topic, &n) in topics {
            let subscribed = members.values().any(|m| subscribes(m, topic));
            for p in 0..n {
                let c = seen.get(&(topic.clone(), p)).copied().unwrap_or(0);
                prop_assert_eq!(c, usize::from(subscribed), "{}/{} assigned {} times", topic, p, c);
            }
        }
        Ok(())
    }

    fn sizes(a: &Assignment) -> Vec<usize> {
        a.values().map(|l| l.iter().map(|(_, ps)| ps.len()).sum()).collect()
    }

    fn spread(v: &[usize]) -> usize {
        v.iter().max().unwrap_or(&0) - v.iter().min().unwrap_or(&0)
    }

    proptest! {
        #[test]
        fn every_assignor_assigns_each_partition_once(
            n_members in 1usize..8,
            partitions in proptest::collection::vec(1u32..20, 1..4),
            subscriptions in proptest::collection::vec(proptest::collection::vec(any::<bool>(), 4), 8),
            name in prop::sample::select(ASSIGNORS),
        ) {
            let topics: HashMap<String, u32> =
                partitions.iter().enumerate().map(|(i, &n)| (format!("t{i}"), n)).collect();
            let mut ms = members(n_members, &[]);
            for (i, m) in ms.values_mut().enumerate() {
                m.topics = (0..partitions.len()).filter(|&t| subscriptions[i][t]).map(|t| format!("t{t}")).collect();
                m.topics.push("missing-topic".into());
            }
            let a = assign(name, &ms, &counts(&topics)).unwrap();
            check_exactly_once(&ms, &topics, &a)?;
        }

        #[test]
        fn same_subscriptions_balance_within_one(
            n_members in 1usize..9,
            partitions in proptest::collection::vec(1u32..30, 1..4),
        ) {
            let topics: HashMap<String, u32> =
                partitions.iter().enumerate().map(|(i, &n)| (format!("t{i}"), n)).collect();
            let names: Vec<String> = topics.keys().cloned().collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let ms = members(n_members, &refs);
            // Round robin and sticky balance over all partitions; range balances each topic.
            for name in ["roundrobin", "sticky"] {
                let a = assign(name, &ms, &counts(&topics)).unwrap();
                prop_assert!(spread(&sizes(&a)) <= 1, "{name}: {:?}", sizes(&a));
            }
            let a = assign("range", &ms, &counts(&topics)).unwrap();
            for topic in topics.keys() {
                let per: Vec<usize> = a.values()
                    .map(|l| l.iter().filter(|(t, _)| t == topic).map(|(_, ps)| ps.len()).sum())
                    .collect();
                prop_assert!(spread(&per) <= 1, "range {topic}: {per:?}");
            }
        }

        #[test]
        fn sticky_keeps_owners_when_membership_is_unchanged(
            n_members in 1usize..8,
            partitions in proptest::collection::vec(1u32..30, 1..3),
            seed_with in prop::sample::select(ASSIGNORS),
        ) {
            let topics: HashMap<String, u32> =
                partitions.iter().enumerate().map(|(i, &n)| (format!("t{i}"), n)).collect();
            let names: Vec<String> = topics.keys().cloned().collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let mut ms = members(n_members, &refs);
            // A balanced start (round robin, or sticky from scratch) stays exactly as it was.
            let seed = if seed_with == "range" { "roundrobin" } else { seed_with };
            let first = assign(seed, &ms, &counts(&topics)).unwrap();
            for (id, m) in ms.iter_mut() {
                m.owned = first[id].iter().flat_map(|(t, ps)| ps.iter().map(move |p| (t.clone(), *p))).collect();
            }
            let second = assign("sticky", &ms, &counts(&topics)).unwrap();
            prop_assert_eq!(&first, &second);
        }

        #[test]
        fn sticky_moves_only_what_a_new_member_needs(n_members in 1usize..6, n in 1u32..40) {
            let topics: HashMap<String, u32> = [("t".to_string(), n)].into_iter().collect();
            let mut ms = members(n_members, &["t"]);
            let first = assign("sticky", &ms, &counts(&topics)).unwrap();
            for (id, m) in ms.iter_mut() {
                m.owned = first[id].iter().flat_map(|(t, ps)| ps.iter().map(move |p| (t.clone(), *p))).collect();
            }
            ms.insert("zz-new".into(), Subscriber { topics: vec!["t".into()], owned: vec![] });
            let second = assign("sticky", &ms, &counts(&topics)).unwrap();
            check_exactly_once(&ms, &topics, &second)?;
            prop_assert!(spread(&sizes(&second)) <= 1);
            let new_count: usize = second["zz-new"].iter().map(|(_, ps)| ps.len()).sum();
            let moved: usize = first.iter().map(|(id, list)| {
                list.iter().flat_map(|(t, ps)| ps.iter().map(move |p| (t, p)))
                    .filter(|(t, p)| !second[id].iter().any(|(t2, ps2)| t2 == *t && ps2.contains(p)))
                    .count()
            }).sum();
            prop_assert_eq!(moved, new_count, "only the new member's share moved");
        }
    }

    #[test]
    fn range_matches_kafka() {
        let topics: HashMap<String, u32> = [("t".to_string(), 7)].into_iter().collect();
        let a = assign("range", &members(3, &["t"]), &counts(&topics)).unwrap();
        assert_eq!(a["m00"], vec![("t".to_string(), vec![0, 1, 2])]);
        assert_eq!(a["m01"], vec![("t".to_string(), vec![3, 4])]);
        assert_eq!(a["m02"], vec![("t".to_string(), vec![5, 6])]);
        assert!(assign("unknown", &members(1, &["t"]), &counts(&topics)).is_none());
    }
}
