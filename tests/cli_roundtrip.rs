//! End-to-end through the `ringlog` CLI against a real broker: round trip, restarts, torn tails,
//! retention.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::Broker;

/// Parses `--print-meta` lines: partition, offset, timestamp, key, value.
fn parse_meta(out: &str) -> Vec<(u32, i64, String, String)> {
    out.lines()
        .map(|l| {
            let f: Vec<&str> = l.splitn(5, '\t').collect();
            assert_eq!(f.len(), 5, "bad --print-meta line: {l:?}");
            (f[0].parse().unwrap(), f[1].parse().unwrap(), f[3].to_string(), f[4].to_string())
        })
        .collect()
}

fn keyed_lines(from: usize, to: usize) -> String {
    (from..to).map(|i| format!("user-{}:like-{i}\n", i % 997)).collect()
}

/// Every produced record comes back exactly once, in produce order within each partition, and a
/// key always lands on the same partition.
fn check_keyed(records: &[(u32, i64, String, String)], expected: usize) {
    assert_eq!(records.len(), expected, "record count");
    let mut seen = vec![false; expected];
    let mut key_partition: HashMap<&str, u32> = HashMap::new();
    let mut last_in_partition: HashMap<u32, (i64, usize)> = HashMap::new();
    for (p, offset, key, value) in records {
        let i: usize = value.strip_prefix("like-").unwrap().parse().unwrap();
        assert!(!seen[i], "record {i} delivered twice");
        seen[i] = true;
        assert_eq!(key, &format!("user-{}", i % 997));
        let owner = *key_partition.entry(key.as_str()).or_insert(*p);
        assert_eq!(owner, *p, "key {key} seen on partitions {owner} and {p}");
        if let Some((last_offset, last_i)) = last_in_partition.insert(*p, (*offset, i)) {
            assert!(*offset > last_offset, "offsets not increasing on partition {p}");
            assert!(i > last_i, "partition {p}: record {i} after {last_i}");
        }
    }
    assert!(seen.iter().all(|s| *s));
}

#[test]
fn round_trip_100k_keyed_records_over_8_partitions() {
    let broker = Broker::start(2, &[]);
    broker.cli(&["topic", "create", "post-likes", "--partitions", "8"], None).ok();
    let listed = broker.cli(&["topic", "list"], None).ok();
    assert_eq!(listed.lines().collect::<Vec<_>>(), vec!["post-likes"]);
    broker
        .cli(&["produce", "post-likes", "--key-separator", ":"], Some(keyed_lines(0, 100_000).as_bytes()))
        .ok();
    let out = broker.cli(&["consume", "post-likes", "--from", "beginning", "--print-meta"], None).ok();
    let records = parse_meta(&out);
    check_keyed(&records, 100_000);
    let partitions: std::collections::HashSet<u32> = records.iter().map(|r| r.0).collect();
    assert_eq!(partitions.len(), 8, "997 keys should reach all 8 partitions");
    let describe = broker.cli(&["topic", "describe", "post-likes"], None).ok();
    assert!(describe.contains("post-likes"), "{describe}");
}

#[test]
fn sigterm_restart_keeps_everything_and_offsets_continue() {
    let mut broker = Broker::start(2, &[]);
    broker.cli(&["topic", "create", "t", "--partitions", "4"], None).ok();
    broker.cli(&["produce", "t", "--key-separator", ":"], Some(keyed_lines(0, 5_000).as_bytes())).ok();
    broker.stop();
    broker.restart();
    assert_eq!(broker.cli(&["topic", "list"], None).ok().trim(), "t");
    broker.cli(&["produce", "t", "--key-separator", ":"], Some(keyed_lines(5_000, 8_000).as_bytes())).ok();
    let records = parse_meta(&broker.cli(&["consume", "t", "--print-meta"], None).ok());
    check_keyed(&records, 8_000);
    // Offsets are dense per partition: new produces continued right after the old end.
    let mut by_partition: HashMap<u32, Vec<i64>> = HashMap::new();
    for (p, offset, _, _) in &records {
        by_partition.entry(*p).or_default().push(*offset);
    }
    for (p, offsets) in by_partition {
        let expected: Vec<i64> = (0..offsets.len() as i64).collect();
        assert_eq!(offsets, expected, "partition {p} offsets are not dense");
    }
}

#[test]
fn kill9_with_fsync_durability_keeps_every_acknowledged_record() {
    let mut broker = Broker::start(2, &["default_durability=\"fsync\""]);
    broker.cli(&["topic", "create", "durable", "--partitions", "3", "--durability", "fsync"], None).ok();
    broker
        .cli(
            &["produce", "durable", "--key-separator", ":", "--acks", "all"],
            Some(keyed_lines(0, 20_000).as_bytes()),
        )
        .ok();
    broker.kill9();
    broker.restart();
    let records = parse_meta(&broker.cli(&["consume", "durable", "--print-meta"], None).ok());
    check_keyed(&records, 20_000);
    broker
        .cli(&["produce", "durable", "--key-separator", ":"], Some(keyed_lines(20_000, 21_000).as_bytes()))
        .ok();
    let records = parse_meta(&broker.cli(&["consume", "durable", "--print-meta"], None).ok());
    check_keyed(&records, 21_000);
    assert!(!broker.log().contains("panicked"), "{}", broker.log());
}

fn torn_tail(damage: impl Fn(&std::path::Path)) {
    let mut broker = Broker::start(1, &[]);
    broker.cli(&["topic", "create", "torn", "--partitions", "1"], None).ok();
    // Several produce calls, so the log holds several batches.
    for chunk in 0..5 {
        let lines: String = (chunk * 100..(chunk + 1) * 100).map(|i| format!("v-{i}\n")).collect();
        broker.cli(&["produce", "torn"], Some(lines.as_bytes())).ok();
    }
    broker.stop();
    let segments = common::segments(&broker.data_dir(), "torn", 0);
    damage(segments.last().unwrap());
    broker.restart();
    let values: Vec<String> =
        broker.cli(&["consume", "torn"], None).ok().lines().map(str::to_string).collect();
    assert!(values.len() < 500, "the damaged batch must not be served");
    assert!(values.len() >= 400, "only the last batch was damaged; got {}", values.len());
    let expected: Vec<String> = (0..values.len()).map(|i| format!("v-{i}")).collect();
    assert_eq!(values, expected, "what survives is exactly the undamaged prefix");
    let log = broker.log();
    assert!(
        log.to_lowercase().contains("torn") || log.to_lowercase().contains("truncat"),
        "no report in log:\n{log}"
    );
    // New produces continue at the truncated end.
    broker.cli(&["produce", "torn"], Some(b"after\n")).ok();
    let out = broker.cli(&["consume", "torn", "--print-meta"], None).ok();
    let last = out.lines().last().unwrap().to_string();
    assert!(last.ends_with("\tafter"), "{last}");
    assert!(last.starts_with(&format!("0\t{}\t", values.len())), "{last}");
}

#[test]
fn torn_tail_truncated_file_is_cut_back_to_last_valid_batch() {
    torn_tail(|seg| {
        let len = std::fs::metadata(seg).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(seg).unwrap();
        f.set_len(len - 7).unwrap();
    });
}

#[test]
fn torn_tail_scribbled_bytes_are_cut_back_to_last_valid_batch() {
    torn_tail(|seg| {
        use std::io::{Seek, SeekFrom, Write};
        let len = std::fs::metadata(seg).unwrap().len();
        let mut f = std::fs::OpenOptions::new().write(true).open(seg).unwrap();
        f.seek(SeekFrom::Start(len - 20)).unwrap();
        f.write_all(&[0xab; 20]).unwrap();
    });
}

#[test]
fn retention_deletes_old_segments_and_consumers_can_reset() {
    let broker = Broker::start(1, &["housekeeping_interval_ms=200", "batch_bytes_max=262144"]);
    broker
        .cli(
            &[
                "topic",
                "create",
                "short",
                "--partitions",
                "1",
                "--segment-bytes",
                "262144",
                "--retention-bytes",
                "524288",
            ],
            None,
        )
        .ok();
    let value = "x".repeat(1000);
    for round in 0..10 {
        let lines: String = (0..100).map(|i| format!("{round}-{i}-{value}\n")).collect();
        broker.cli(&["produce", "short"], Some(lines.as_bytes())).ok();
    }
    let started = Instant::now();
    loop {
        let out = broker.cli(&["consume", "short", "--from", "0", "--count", "1"], None);
        if !out.status.success() {
            assert!(out.stderr.to_lowercase().contains("out of range"), "{}", out.stderr);
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "retention never deleted offset 0");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Reset to earliest: the consumer starts at the new log start and reads to the end.
    let values = broker.cli(&["consume", "short", "--from", "beginning"], None).ok();
    let values: Vec<&str> = values.lines().collect();
    assert!(!values.is_empty() && values.len() < 1000, "{}", values.len());
    assert!(values.last().unwrap().starts_with("9-99-"));
    let segments = common::segments(&broker.data_dir(), "short", 0);
    assert!(segments.len() <= 4, "old segments remain: {segments:?}");
}

/// The partition rows of `ringlog topic describe NAME`.
fn described_partitions(broker: &Broker, topic: &str) -> usize {
    let out = broker.cli(&["topic", "describe", topic], None).ok();
    out.lines().skip_while(|l| !l.starts_with("PARTITION")).skip(1).count()
}

#[test]
fn a_local_topic_grows_through_the_cli_and_keeps_its_partitions_across_a_restart() {
    let mut broker = Broker::start(2, &[]);
    broker.cli(&["topic", "create", "local-likes", "--partitions", "2"], None).ok();
    broker.cli(&["produce", "local-likes", "--partition", "0"], Some(b"before-0\nbefore-1\n")).ok();
    let checked =
        broker.cli(&["topic", "alter", "local-likes", "--partitions", "5", "--validate-only"], None).ok();
    assert!(checked.contains("from 2 to 5 partitions (validate only"), "{checked}");
    assert_eq!(described_partitions(&broker, "local-likes"), 2, "validate only changed nothing");
    let grown = broker.cli(&["topic", "alter", "local-likes", "--partitions", "5"], None).ok();
    assert!(grown.contains("now has 5 partitions"), "{grown}");
    for (count, says) in [("5", "already has 5 partitions"), ("1", "cannot be removed")] {
        let refused = broker.cli(&["topic", "alter", "local-likes", "--partitions", count], None);
        assert!(!refused.status.success() && refused.stderr.contains(says), "{}", refused.stderr);
    }
    let unknown = broker.cli(&["topic", "alter", "nobody", "--partitions", "3"], None);
    assert!(
        !unknown.status.success() && unknown.stderr.contains("UnknownTopicOrPartition"),
        "{}",
        unknown.stderr
    );
    broker.cli(&["produce", "local-likes", "--partition", "4"], Some(b"after\n")).ok();

    broker.stop();
    broker.restart();
    assert_eq!(described_partitions(&broker, "local-likes"), 5);
    let read =
        |p: &str| broker.cli(&["consume", "local-likes", "--partition", p, "--from", "beginning"], None).ok();
    assert_eq!(read("0").lines().collect::<Vec<_>>(), ["before-0", "before-1"]);
    assert_eq!(read("4").lines().collect::<Vec<_>>(), ["after"]);
}
