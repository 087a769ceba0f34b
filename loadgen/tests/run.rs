//! ringlog-loadgen end to end: a 3-second workload against a real broker (one loadgen starts
//! itself, as a user without `--bootstrap` gets), over the native and over the Kafka protocol,
//! checking that every produced message was consumed and that the report is complete and
//! consistent.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

const LOADGEN: &str = env!("CARGO_BIN_EXE_ringlog-loadgen");

/// The `ringlog` binary cargo built next to loadgen (`cargo test --workspace` builds it).
fn ringlog_binary() -> PathBuf {
    let path = PathBuf::from(LOADGEN).with_file_name("ringlog");
    assert!(path.is_file(), "{} is missing: build it first (cargo build --bin ringlog)", path.display());
    path
}

fn percentiles_ordered(p: &Value, what: &str) {
    let get = |k: &str| p[k].as_u64().unwrap_or_else(|| panic!("{what}.{k} missing: {p}"));
    assert!(get("count") > 0, "{what} recorded nothing");
    assert!(get("p50") >= 1, "{what}.p50");
    assert!(get("p50") <= get("p90") && get("p90") <= get("p99"), "{what}: {p}");
    assert!(
        get("p99") <= get("p999") && get("p999") <= get("p9999") && get("p9999") <= get("max"),
        "{what}: {p}"
    );
}

/// Runs loadgen with `args` against a broker of its own; returns the report and stderr.
fn run_loadgen(args: &[&str]) -> (Value, String) {
    ringlog_binary();
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("report.json");
    let out = Command::new(LOADGEN).args(args).arg("--report-json").arg(&report_path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "loadgen failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    assert!(stderr.contains("no --bootstrap given: started a local broker"), "{stderr}");
    assert!(stdout.contains("p99.99"), "summary: {stdout}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    let svg = std::fs::read_to_string(report_path.with_extension("svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("<polyline"));
    (report, stderr)
}

fn count(report: &Value, k: &str) -> u64 {
    report[k].as_u64().unwrap_or_else(|| panic!("{k} missing: {report}"))
}

fn num(report: &Value, k: &str) -> f64 {
    report[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {report}"))
}

/// Every produced message was consumed, exactly once per consumer group, without errors.
fn everything_consumed(report: &Value) {
    assert!(count(report, "produced_msgs") > 0);
    assert_eq!(count(report, "consumed_msgs"), count(report, "produced_msgs"), "{report}");
    assert_eq!(count(report, "expected_consumed_msgs"), count(report, "produced_msgs"));
    assert_eq!(
        (count(report, "produce_errors"), count(report, "consume_errors")),
        (0, 0),
        "{}",
        report["first_error"]
    );
    assert!(report["consumer_assignment"].as_str().unwrap().contains("no consumer-group protocol"));
}

/// The fixed-rate workload both protocols run.
const FIXED_RATE: &str = "--duration 3 --warmup 1 --topics 2 --partitions 3 --producers 2 --consumers 2 \
                          --rate 1000 --message-size 200 --keys 50 --acks all --broker-shards 2";

/// 1000 msgs/s over 3 measured seconds: the schedule sends 3000 intended in the window. Rates are
/// derived from counts and fixed sizes, so they must agree with each other exactly.
fn fixed_rate_report_is_consistent(report: &Value, stderr: &str) {
    assert!(stderr.contains("measure]"), "live progress lines: {stderr}");
    everything_consumed(report);
    assert_eq!(num(report, "measured_s"), 3.0);
    let produce_rate = num(report, "produce_msgs_per_s");
    assert!(produce_rate > 0.0 && produce_rate <= 1000.0 + 1.0, "{produce_rate}");
    assert!((num(report, "produce_mb_per_s") - produce_rate * 200.0 / 1e6).abs() < 0.001);
    assert!(
        (num(report, "consume_mb_per_s") - num(report, "consume_msgs_per_s") * 200.0 / 1e6).abs() < 0.001
    );
    assert!(count(report, "produced_msgs") as f64 >= produce_rate * 3.0, "the whole run includes the window");
    percentiles_ordered(&report["publish_latency_us"], "publish_latency_us");
    percentiles_ordered(&report["e2e_latency_us"], "e2e_latency_us");
    let measured_publishes = report["publish_latency_us"]["count"].as_f64().unwrap();
    assert!((measured_publishes - produce_rate * 3.0).abs() < 1.0, "{measured_publishes} vs {produce_rate}");

    // The workload, broker and machine are echoed.
    let w = &report["workload"];
    assert_eq!((w["topics"].as_u64(), w["partitions"].as_u64()), (Some(2), Some(3)));
    assert_eq!((w["keys"].as_u64(), w["acks"].as_str()), (Some(50), Some("all")));
    assert_eq!(w["rate"].as_f64(), Some(1000.0));
    assert_eq!(report["broker"]["started_by_loadgen"], true);
    assert_eq!(report["broker"]["shards"], 2);
    assert!(report["broker"]["version"].as_str().unwrap().starts_with("ringlog"));
    assert!(report["machine"]["cpus"].as_u64().unwrap() >= 1);
    let timeline = report["timeline"].as_array().unwrap();
    assert!(timeline.len() >= 4, "one point per second over 4 s: {}", timeline.len());
    assert!(timeline.iter().any(|p| p["produce_msgs_per_s"].as_f64().unwrap() > 0.0));
}

#[test]
fn three_second_workload_consumes_everything_and_reports_consistently() {
    let mut args: Vec<&str> = FIXED_RATE.split_whitespace().collect();
    args.extend(["--name", "e2e test"]);
    let (report, stderr) = run_loadgen(&args);
    fixed_rate_report_is_consistent(&report, &stderr);
    assert_eq!(report["broker"]["protocol"], "native");
    assert_eq!(report["workload"]["protocol"], "native");
    assert!(report["broker"].get("kafka_api_versions").is_none());
}

/// The same workload through ringlog's Kafka listener: loadgen's own Kafka client creates the
/// topics (CreateTopics), finds the leaders (Metadata), produces, fetches, and reads the drain
/// targets (ListOffsets).
#[test]
fn kafka_protocol_workload_consumes_everything_and_reports_consistently() {
    let mut args: Vec<&str> = FIXED_RATE.split_whitespace().collect();
    args.extend(["--protocol", "kafka", "--name", "e2e kafka"]);
    let (report, stderr) = run_loadgen(&args);
    fixed_rate_report_is_consistent(&report, &stderr);
    let broker = &report["broker"];
    assert_eq!(broker["protocol"], "kafka");
    assert_eq!(report["workload"]["protocol"], "kafka");
    assert_eq!(broker["brokers"], 1);
    for api in ["Produce", "Fetch", "Metadata", "ListOffsets", "CreateTopics", "DeleteTopics"] {
        assert!(broker["kafka_api_versions"][api].as_i64().is_some_and(|v| v >= 1), "{api}: {broker}");
    }
}

/// Max rate over the Kafka protocol with acks=1: full batches, several requests in flight and the
/// producer's buffer limit all come into play, and still every message arrives.
#[test]
fn kafka_protocol_at_max_rate_consumes_everything() {
    let args = "--protocol kafka --duration 2 --warmup 0.5 --partitions 2 --rate 0 --message-size 1024 \
                --acks 1 --batch-bytes 65536 --quiet";
    let (report, _) = run_loadgen(&args.split_whitespace().collect::<Vec<_>>());
    everything_consumed(&report);
    assert!(num(&report, "produce_msgs_per_s") > 0.0);
    percentiles_ordered(&report["publish_latency_us"], "publish_latency_us");
    percentiles_ordered(&report["e2e_latency_us"], "e2e_latency_us");
}

#[test]
fn unreachable_kafka_broker_is_a_clear_error() {
    let out = Command::new(LOADGEN)
        .args(["--protocol", "kafka", "--bootstrap", "127.0.0.1:1", "--duration", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("connecting to Kafka broker 127.0.0.1:1"), "{stderr}");
}

#[test]
fn bad_workload_values_are_refused_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("w.toml");
    std::fs::write(&file, "partitions = 4\nmessage_sizes = 10\n").unwrap();
    let out = Command::new(LOADGEN).arg("--workload").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("message_sizes"));
}

#[test]
fn backlog_drain_reads_everything_the_fill_wrote_over_both_protocols() {
    ringlog_binary();
    for protocol in ["native", "kafka"] {
        let dir = tempfile::tempdir().unwrap();
        let report_path = dir.path().join("report.json");
        let out = Command::new(LOADGEN)
            .args(["--protocol", protocol, "--backlog-bytes", "20000000", "--message-size", "1000"])
            .args(["--partitions", "3", "--producers", "1", "--consumers", "2", "--quiet"])
            .arg("--report-json")
            .arg(&report_path)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{protocol}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("backlog drain: 20.0 MB produced"), "{protocol}: {stdout}");
        let report: Value = serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
        everything_consumed(&report);
        assert_eq!(count(&report, "produced_msgs"), 20_000, "{protocol}: the fill stops at the backlog size");
        let backlog = &report["backlog"];
        assert_eq!(backlog["bytes"].as_u64(), Some(20_000_000), "{protocol}: {report}");
        let (fill_s, drain_s) = (backlog["fill_s"].as_f64().unwrap(), backlog["drain_s"].as_f64().unwrap());
        assert!(fill_s > 0.0 && drain_s > 0.0, "{protocol}: {backlog}");
        // The rates are the phases' own: bytes over each phase's time.
        let consume = num(&report, "consume_mb_per_s");
        assert!((consume - 20.0 / drain_s).abs() <= 0.01 * consume + 0.01, "{protocol}: {report}");
        assert_eq!(report["workload"]["backlog_bytes"].as_u64(), Some(20_000_000));
    }
}
