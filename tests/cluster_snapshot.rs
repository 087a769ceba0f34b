//! A follower behind its leader's log start, on three real `ringlog serve` processes (issue 11,
//! stop 18): with one follower killed (SIGKILL), the leader leaves it out of the in-sync
//! replicas, compacts past it and retention deletes the segments it lacks — a dead follower does
//! not stop retention. Restarted, the follower is sent a snapshot, restarts its log at the
//! leader's anchor (past its old end) and catches up from there; every batch it then holds is
//! byte for byte the leader's. 128 KiB segments, 256 KiB retention, compaction every 4 entries.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::cluster::{start_three_with, wait_for};
use common::Broker;
use serde_json::Value;

const TOPIC: &str = "snap-orders";

/// (leader, log start, high watermark) of partition 0 as `node` sees its own replica.
fn partition(node: &Broker) -> Option<(Option<u64>, i64, i64)> {
    let out = node.cli(&["topic", "describe", TOPIC, "--format", "json"], None);
    if !out.status.success() {
        return None;
    }
    let json: Value = serde_json::from_str(&out.stdout).ok()?;
    let p = &json["partitions"][0];
    Some((p["leader"].as_u64(), p["log_start"].as_i64()?, p["high_watermark"].as_i64()?))
}

/// `count` records of about 2 KiB from `from` on, acknowledged by every replica in sync.
fn produce(node: &Broker, from: usize, count: usize) {
    let lines: String = (from..from + count).map(|i| format!("order-{i}-{}\n", "o".repeat(2000))).collect();
    let out = node.cli(&["produce", TOPIC, "--acks", "all"], Some(lines.as_bytes()));
    assert!(out.status.success(), "produce: {}", out.stderr);
}

/// Node `node`'s replica directory of partition 0.
fn replica_dir(node: &Broker) -> PathBuf {
    let topics = node.data_dir().join("replicated");
    let topic = std::fs::read_dir(&topics)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(&format!("{TOPIC}.")))
        .unwrap();
    topic.join("0")
}

/// Every batch in the segment files of `dir`, by base offset (preallocated zeros end a file).
fn batches(dir: &Path) -> BTreeMap<i64, Vec<u8>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|x| x != "log") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let mut at = 0;
        while at + 12 <= bytes.len() {
            let len = i32::from_be_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            if len <= 0 {
                break;
            }
            let end = at + 12 + len as usize;
            let base = i64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
            out.insert(base, bytes[at..end].to_vec());
            at = end;
        }
    }
    out
}

fn last_offset(batch: &[u8]) -> i64 {
    i64::from_be_bytes(batch[..8].try_into().unwrap())
        + i64::from(i32::from_be_bytes(batch[23..27].try_into().unwrap()))
}

#[test]
fn a_follower_killed_while_retention_passes_it_catches_up_from_a_snapshot() {
    let extra = [
        "replica_lag_time_max_ms=1000".to_string(),
        "housekeeping_interval_ms=200".to_string(),
        "raft_compaction_keep_entries=2".to_string(),
        "raft_compaction_step_entries=4".to_string(),
        "offsets_topic_partitions=1".to_string(),
        // Segments may be as small as the largest batch: 64 KiB batches, 128 KiB segments.
        "batch_bytes_max=65536".to_string(),
    ];
    let (_, _dirs, mut nodes) = start_three_with(&extra);
    let all: Vec<&Broker> = nodes.iter().collect();
    let args = [
        "topic",
        "create",
        TOPIC,
        "--partitions",
        "1",
        "--replication-factor",
        "3",
        "--segment-bytes",
        "131072",
        "--retention-bytes",
        "262144",
    ];
    wait_for("a controller leader known to every node", &all, || {
        common::cluster::agreed_leader(&all, 3).map(|_| ())
    });
    let created = nodes[0].cli(&args, None);
    assert!(created.status.success(), "{} {}", created.stdout, created.stderr);
    let leader = wait_for("a leader of the topic on every node", &all, || {
        let leaders: Vec<u64> = all.iter().map(|n| partition(n).and_then(|p| p.0)).collect::<Option<_>>()?;
        leaders.windows(2).all(|w| w[0] == w[1]).then(|| leaders[0])
    });
    let leader = (leader - 1) as usize;
    let gone = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    produce(&nodes[leader], 0, 20);
    let (_, _, old_end) = wait_for("the follower to hold the first records", &all, || {
        let (_, start, hw) = partition(&nodes[gone])?;
        (hw > 0 && Some(hw) == partition(&nodes[leader]).map(|p| p.2)).then_some((None::<u64>, start, hw))
    });

    nodes[gone].kill9();
    // Small produces (a batch of about 40 KiB each), so the log holds many entries for the
    // leader to forget.
    for round in 0..24 {
        produce(&nodes[leader], 20 + 20 * round, 20);
    }
    let survivors = [&nodes[leader], &nodes[other]];
    let leader_start =
        wait_for("retention on the leader to pass the dead follower's log end", &survivors, || {
            let (_, start, _) = partition(&nodes[leader])?;
            (start > old_end).then_some(start)
        });
    eprintln!("node {} killed at log end {old_end}; the leader's log now starts at {leader_start}", gone + 1);

    nodes[gone].restart();
    let all: Vec<&Broker> = nodes.iter().collect();
    let (start, hw) = wait_for("the restarted follower to catch up", &all, || {
        let (_, start, hw) = partition(&nodes[gone])?;
        let (_, _, leader_hw) = partition(&nodes[leader])?;
        (start > old_end && hw == leader_hw).then_some((start, hw))
    });
    eprintln!("node {} restarted its log at {start} and holds up to {hw}", gone + 1);
    assert!(nodes[gone].log().contains("log restarted from the leader's snapshot"), "{}", nodes[gone].log());
    // It keeps up from its new start like any follower.
    for round in 0..12 {
        produce(&nodes[leader], 500 + 20 * round, 20);
    }
    let hw = wait_for("the follower to keep up", &all, || {
        let (_, _, hw) = partition(&nodes[gone])?;
        let (_, _, leader_hw) = partition(&nodes[leader])?;
        (hw == leader_hw && hw >= 740).then_some(hw)
    });
    for node in &mut nodes {
        node.stop();
    }

    // Every batch the follower holds below the high watermark is the leader's, from its log
    // start on without a gap.
    let follower = batches(&replica_dir(&nodes[gone]));
    let leader_batches = batches(&replica_dir(&nodes[leader]));
    let mut next = *follower.keys().next().unwrap();
    assert!(next >= start && next > old_end, "the follower's first batch at {next}");
    let mut compared = 0;
    for (&base, batch) in follower.range(..hw) {
        assert_eq!(base, next, "a gap in the follower's log");
        if let Some(theirs) = leader_batches.get(&base) {
            assert_eq!(batch, theirs, "batch at offset {base}");
            compared += 1;
        }
        next = last_offset(batch) + 1;
    }
    assert_eq!(next, hw, "the follower holds everything up to the high watermark");
    // Retention keeps about two segments on each: what both still hold is compared.
    assert!(compared >= 5, "{compared} batches compared");
}
