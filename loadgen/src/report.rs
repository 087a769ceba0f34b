//! The run's results: the JSON report, the readable summary and the per-second time series.
//!
//! Owns: the report's field names (a stable interface: scripts read them), percentiles, and the
//! description of the machine and broker the run used.

use serde::Serialize;

use crate::stats::{quantile_us, Tally};
use crate::workload::Workload;

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub p9999: u64,
    pub max: u64,
}

impl Percentiles {
    pub fn of(h: &hdrhistogram::Histogram<u64>) -> Percentiles {
        Percentiles {
            count: h.len(),
            mean: if h.is_empty() { 0.0 } else { (h.mean() * 10.0).round() / 10.0 },
            p50: quantile_us(h, 0.50),
            p90: quantile_us(h, 0.90),
            p99: quantile_us(h, 0.99),
            p999: quantile_us(h, 0.999),
            p9999: quantile_us(h, 0.9999),
            max: if h.is_empty() { 0 } else { h.max() },
        }
    }
}

/// One second of the run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Point {
    /// Seconds since the run started (warm-up included).
    pub t_s: f64,
    pub produce_msgs_per_s: f64,
    pub consume_msgs_per_s: f64,
    pub publish_p99_us: u64,
    pub e2e_p99_us: u64,
    /// Messages acknowledged but not yet consumed, summed over consumer groups.
    pub backlog_msgs: i64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct BrokerInfo {
    pub bootstrap: String,
    pub protocol: String,
    /// True when loadgen started the broker itself (no `--bootstrap`).
    pub started_by_loadgen: bool,
    /// The `ringlog` binary and its version, when loadgen started it.
    pub binary: Option<String>,
    pub version: Option<String>,
    /// ringlog's shard count: from the native handshake, or the ready line of a broker loadgen
    /// started; unknown (null) for a Kafka-protocol broker loadgen did not start.
    pub shards: Option<u32>,
    /// Kafka protocol: brokers in the cluster (Metadata).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub brokers: Option<u32>,
    /// Kafka protocol: the version used of each API (the highest both sides speak).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka_api_versions: Option<std::collections::BTreeMap<String, i16>>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct MachineInfo {
    pub hostname: String,
    pub kernel: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub memory_bytes: u64,
    /// 1-minute load average at the start of the run: other work on the machine skews results.
    pub load_average_1m_at_start: f64,
}

impl MachineInfo {
    pub fn detect() -> MachineInfo {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let meminfo = read("/proc/meminfo");
        MachineInfo {
            hostname: read("/proc/sys/kernel/hostname").trim().to_string(),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split(':').nth(1)))
                .unwrap_or_default()
                .trim()
                .to_string(),
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            memory_bytes: meminfo
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map_or(0, |kb| kb * 1024),
            load_average_1m_at_start: read("/proc/loadavg")
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0),
        }
    }
}

/// A backlog drain's figures (see `Workload::backlog_bytes`).
#[derive(Debug, Clone, Serialize)]
pub struct Backlog {
    /// Bytes of message values in the backlog.
    pub bytes: u64,
    /// Time to produce it, and to read it all from the beginning, seconds.
    pub fill_s: f64,
    pub drain_s: f64,
}

/// The JSON report. Throughput is over the measured window; MB = 10^6 bytes of message values.
/// For a backlog drain the produce rate is over the fill and the consume rate over the drain.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub produce_msgs_per_s: f64,
    pub produce_mb_per_s: f64,
    pub consume_msgs_per_s: f64,
    pub consume_mb_per_s: f64,
    /// Send to acknowledgement, from the intended send time.
    pub publish_latency_us: Percentiles,
    /// Intended send time (carried in the message) to consumed.
    pub e2e_latency_us: Percentiles,
    /// Whole run, warm-up and drain included.
    pub produced_msgs: u64,
    pub consumed_msgs: u64,
    /// Messages that should have been consumed: produced × consumer groups (0 without consumers).
    pub expected_consumed_msgs: u64,
    pub produce_errors: u64,
    pub consume_errors: u64,
    pub first_error: Option<String>,
    pub measured_s: f64,
    pub warmup_s: f64,
    /// A backlog drain's phases; absent for the other workloads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backlog: Option<Backlog>,
    pub workload: Workload,
    pub broker: BrokerInfo,
    /// How consumers got their partitions.
    pub consumer_assignment: &'static str,
    pub machine: MachineInfo,
    pub timeline: Vec<Point>,
    pub loadgen_version: &'static str,
    pub started_unix_ms: u64,
}

impl Report {
    /// Throughput and latency figures from the measured tally.
    pub fn rates(measured: &Tally, seconds: f64) -> (f64, f64, f64, f64) {
        let per_s = |v: u64| if seconds > 0.0 { v as f64 / seconds } else { 0.0 };
        (
            round(per_s(measured.produced_msgs), 1),
            round(per_s(measured.produced_bytes) / 1e6, 3),
            round(per_s(measured.consumed_msgs), 1),
            round(per_s(measured.consumed_bytes) / 1e6, 3),
        )
    }

    pub fn to_json(&self) -> String {
        // Plain data with string keys: serialization cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The readable summary printed at the end of a run.
    pub fn summary(&self) -> String {
        let w = &self.workload;
        let rate = if w.rate > 0.0 { format!("{} msgs/s", w.rate) } else { "max rate".into() };
        let mut s = String::new();
        s.push_str(&format!(
            "workload {}: {} topic(s) × {} partition(s), {} B messages, {} producer(s), {} consumer(s) × {} group(s), {rate}, acks={}\n",
            w.name,
            w.topics,
            w.partitions,
            w.message_size,
            w.producers * w.topics,
            w.consumers * w.topics,
            w.consumer_groups,
            match w.acks {
                crate::workload::Acks::None => "0",
                crate::workload::Acks::Leader => "1",
                crate::workload::Acks::All => "all",
            }
        ));
        if let Some(b) = &self.backlog {
            s.push_str(&format!(
                "backlog drain: {:.1} MB produced in {:.1} s, then read from the beginning in {:.1} s\n",
                b.bytes as f64 / 1e6,
                b.fill_s,
                b.drain_s
            ));
        }
        s.push_str(&format!(
            "broker {} ({}{}), measured {:.1} s after {:.1} s warm-up\n",
            self.broker.bootstrap,
            self.broker.protocol,
            if self.broker.started_by_loadgen { ", started by loadgen" } else { "" },
            self.measured_s,
            self.warmup_s
        ));
        s.push_str(&format!(
            "produce  {:>12.0} msgs/s  {:>9.2} MB/s\nconsume  {:>12.0} msgs/s  {:>9.2} MB/s\n",
            self.produce_msgs_per_s, self.produce_mb_per_s, self.consume_msgs_per_s, self.consume_mb_per_s
        ));
        s.push_str("latency µs       p50       p90       p99     p99.9    p99.99       max\n");
        for (name, p) in [("publish", &self.publish_latency_us), ("end-to-end", &self.e2e_latency_us)] {
            s.push_str(&format!(
                "{name:<10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
                p.p50, p.p90, p.p99, p.p999, p.p9999, p.max
            ));
        }
        s.push_str(&format!(
            "messages produced {} consumed {} (expected {}), errors produce {} consume {}\n",
            self.produced_msgs,
            self.consumed_msgs,
            self.expected_consumed_msgs,
            self.produce_errors,
            self.consume_errors
        ));
        if let Some(e) = &self.first_error {
            s.push_str(&format!("first error: {e}\n"));
        }
        s
    }
}

pub fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::record_latency;

    fn report() -> Report {
        let mut measured = Tally::new();
        for us in 1..=1000u64 {
            record_latency(&mut measured.publish_us, 0, us);
            record_latency(&mut measured.e2e_us, 0, us * 2);
        }
        measured.produced_msgs = 10_000;
        measured.produced_bytes = 10_000 * 1024;
        measured.consumed_msgs = 10_000;
        measured.consumed_bytes = 10_000 * 1024;
        let (produce_msgs_per_s, produce_mb_per_s, consume_msgs_per_s, consume_mb_per_s) =
            Report::rates(&measured, 2.0);
        Report {
            produce_msgs_per_s,
            produce_mb_per_s,
            consume_msgs_per_s,
            consume_mb_per_s,
            publish_latency_us: Percentiles::of(&measured.publish_us),
            e2e_latency_us: Percentiles::of(&measured.e2e_us),
            produced_msgs: 12_000,
            consumed_msgs: 12_000,
            expected_consumed_msgs: 12_000,
            produce_errors: 0,
            consume_errors: 0,
            first_error: None,
            measured_s: 2.0,
            warmup_s: 1.0,
            backlog: None,
            workload: Workload::default(),
            broker: BrokerInfo {
                bootstrap: "127.0.0.1:9292".into(),
                protocol: "native".into(),
                ..Default::default()
            },
            consumer_assignment: crate::run::CONSUMER_ASSIGNMENT,
            machine: MachineInfo::detect(),
            timeline: vec![Point { t_s: 1.0, produce_msgs_per_s: 5.0, ..Default::default() }],
            loadgen_version: "test",
            started_unix_ms: 1,
        }
    }

    #[test]
    fn json_report_has_the_issue_fields() {
        let v: serde_json::Value = serde_json::from_str(&report().to_json()).unwrap();
        for field in ["produce_msgs_per_s", "produce_mb_per_s", "consume_msgs_per_s", "consume_mb_per_s"] {
            assert!(v[field].is_number(), "{field}");
        }
        assert_eq!(v["produce_msgs_per_s"], 5000.0);
        assert_eq!(v["produce_mb_per_s"], 5.12);
        for lat in ["publish_latency_us", "e2e_latency_us"] {
            for p in ["p50", "p99", "p999", "max"] {
                assert!(v[lat][p].is_u64(), "{lat}.{p}");
            }
        }
        assert_eq!(v["publish_latency_us"]["p50"], 500);
        assert_eq!(v["publish_latency_us"]["max"], 1000);
        assert_eq!(v["e2e_latency_us"]["p99"], 1980);
        assert_eq!(v["workload"]["partitions"], 1);
        assert_eq!(v["workload"]["acks"], "1");
        assert_eq!(v["broker"]["bootstrap"], "127.0.0.1:9292");
        assert!(v["machine"]["cpus"].as_u64().unwrap() >= 1);
        assert_eq!(v["timeline"][0]["produce_msgs_per_s"], 5.0);
    }

    #[test]
    fn summary_names_every_percentile() {
        let s = report().summary();
        for needle in ["p99.99", "5000 msgs/s", "5.12 MB/s", "end-to-end", "expected 12000"] {
            assert!(s.contains(needle), "{needle} in\n{s}");
        }
    }

    #[test]
    fn empty_histograms_report_zeros() {
        let p = Percentiles::of(&crate::stats::latency_histogram());
        assert_eq!(p, Percentiles::default());
    }
}
