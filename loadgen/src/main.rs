//! ringlog-loadgen: the bundled benchmark. Runs an OpenMessaging-Benchmark-style workload against
//! a broker (or a broker of its own), prints live progress and a summary, and writes a JSON report
//! and an SVG chart.
//!
//! Layout: `workload` (what to run) → `run` (tasks and phases; `rate` decides when each message
//! is sent, `message` what it carries, `stats` what is recorded; `native` and `kafka` speak the
//! two protocols) → `report` and `chart` (what is written). `broker` starts a local broker when no
//! `--bootstrap` is given. Depends on the ringlog client and record format only (no broker
//! runtime) and on the `kafka-protocol` codecs.

/// The benchmark's own allocations must not be what limits it; see Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod broker;
mod chart;
mod kafka;
mod message;
mod native;
mod rate;
mod report;
mod run;
mod stats;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use thiserror::Error;

use workload::{Acks, Keys, Protocol, Workload};

#[derive(Debug, Error)]
pub enum LoadgenError {
    #[error("workload: {0}")]
    Workload(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("broker: {0}")]
    Broker(String),
    #[error(transparent)]
    Client(#[from] ringlog::client::ClientError),
    #[error(transparent)]
    Kafka(#[from] kafka::KafkaError),
    #[error("a loadgen task failed: {0}")]
    Task(String),
}

/// Flags override the workload file, which overrides the defaults.
#[derive(Parser, Debug)]
#[command(
    name = "ringlog-loadgen",
    version,
    about = "Benchmark a Kafka-family broker: ringlog over its native protocol, or ringlog, Apache Kafka \
             or Redpanda over the Kafka protocol",
    after_help = "Consumers are assigned their share of the partitions explicitly (consumer i of a group \
                  reads partitions p with p % consumers == i, from the beginning); no consumer-group \
                  protocol is used, over either protocol."
)]
struct Cli {
    /// Broker address (Kafka: host:port[,host:port...]); without it loadgen starts a ringlog broker
    /// of its own in a temporary directory and uses its native or Kafka listener.
    #[arg(long)]
    bootstrap: Option<String>,
    /// native: ringlog's protocol, shard-aware. kafka: the Kafka wire protocol (Produce, Fetch,
    /// ListOffsets, Metadata, CreateTopics, DeleteTopics; no consumer groups, no compression).
    #[arg(long, value_enum)]
    protocol: Option<Protocol>,
    /// TOML workload file (see loadgen/workloads/).
    #[arg(long)]
    workload: Option<PathBuf>,
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    topics: Option<u32>,
    /// Partitions per topic.
    #[arg(long)]
    partitions: Option<u32>,
    /// Message value size in bytes (at least 16).
    #[arg(long)]
    message_size: Option<usize>,
    /// With it, sizes are uniform between --message-size and this.
    #[arg(long)]
    message_size_max: Option<usize>,
    /// none, random, or a key-space size N.
    #[arg(long)]
    keys: Option<Keys>,
    /// Producers per topic.
    #[arg(long)]
    producers: Option<u32>,
    /// Consumers per topic and group.
    #[arg(long)]
    consumers: Option<u32>,
    /// Consumer groups, each reading every message.
    #[arg(long)]
    consumer_groups: Option<u32>,
    /// Target produce rate in messages per second over all producers; 0 = max rate.
    #[arg(long)]
    rate: Option<f64>,
    /// Measured duration, seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Warm-up before measuring, seconds.
    #[arg(long)]
    warmup: Option<f64>,
    /// 0, 1 or all.
    #[arg(long)]
    acks: Option<Acks>,
    #[arg(long)]
    batch_bytes: Option<usize>,
    #[arg(long)]
    linger_ms: Option<u64>,
    /// fsync or written: the created topics' durability (ringlog only; over the Kafka protocol a
    /// broker that refuses the `ringlog.durability` topic config gets the topics without it).
    #[arg(long)]
    durability: Option<String>,
    /// Kafka protocol: the created topics' replication factor (-1: the broker's default).
    #[arg(long)]
    replication_factor: Option<i16>,
    /// Backlog drain: produce this many bytes of message values first, then start the consumers
    /// from the beginning; the report's consume rate is the drain rate.
    #[arg(long)]
    backlog_bytes: Option<u64>,
    /// Write the JSON report here.
    #[arg(long)]
    report_json: Option<PathBuf>,
    /// Write the SVG chart here (default: next to --report-json, with .svg).
    #[arg(long)]
    chart: Option<PathBuf>,
    /// Keep the topics the run created.
    #[arg(long)]
    keep_topics: bool,
    /// No live progress lines.
    #[arg(long)]
    quiet: bool,
    /// Local broker only: shard count.
    #[arg(long)]
    broker_shards: Option<usize>,
    /// Local broker only: a broker option KEY=VALUE (repeatable).
    #[arg(long = "broker-set", value_name = "KEY=VALUE")]
    broker_set: Vec<String>,
}

impl Cli {
    fn workload(&self) -> Result<Workload, LoadgenError> {
        let mut w = match &self.workload {
            Some(path) => Workload::from_file(path)?,
            None => Workload::default(),
        };
        macro_rules! set {
            ($($flag:ident => $field:ident),* $(,)?) => {
                $(if let Some(v) = self.$flag.clone() { w.$field = v; })*
            };
        }
        set!(protocol => protocol, name => name, topics => topics, partitions => partitions,
             message_size => message_size, keys => keys, producers => producers, consumers => consumers,
             consumer_groups => consumer_groups, rate => rate, duration => duration_s, warmup => warmup_s,
             acks => acks, batch_bytes => batch_bytes, linger_ms => linger_ms,
             backlog_bytes => backlog_bytes);
        if self.message_size_max.is_some() {
            w.message_size_max = self.message_size_max;
        }
        if self.durability.is_some() {
            w.topic_config.durability = self.durability.clone();
        }
        if self.replication_factor.is_some() {
            w.topic_config.replication_factor = self.replication_factor;
        }
        w.validate()?;
        Ok(w)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ringlog-loadgen: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, LoadgenError> {
    let workload = cli.workload()?;
    let local = match &cli.bootstrap {
        Some(_) => None,
        None => {
            let binary = broker::find_binary().ok_or_else(|| {
                LoadgenError::Broker(
                    "no --bootstrap given and no `ringlog` binary next to ringlog-loadgen or on PATH to start \
                     one (build it: cargo build --release --bin ringlog)"
                        .into(),
                )
            })?;
            let b = broker::LocalBroker::start(&binary, cli.broker_shards, &cli.broker_set)?;
            eprintln!(
                "ringlog-loadgen: no --bootstrap given: started a local broker ({} serve) at {} (Kafka \
                 listener {}) with data in {} (log {}, metrics http://{}/metrics); it is stopped and removed \
                 after the run",
                binary.display(),
                b.native,
                b.kafka.as_deref().unwrap_or("off"),
                b.dir.display(),
                b.log.display(),
                b.admin.as_deref().unwrap_or("-")
            );
            Some(b)
        }
    };
    let bootstrap = match (&cli.bootstrap, &local, workload.protocol) {
        (Some(bootstrap), _, _) => bootstrap.clone(),
        (None, Some(b), Protocol::Native) => b.native.clone(),
        (None, Some(b), Protocol::Kafka) => b.kafka.clone().ok_or_else(|| {
            LoadgenError::Broker(format!(
                "the local broker {} reported no Kafka listener (kafka=off in its ready line); its log: {}",
                b.binary.display(),
                b.log.display()
            ))
        })?,
        (None, None, _) => String::new(),
    };
    let broker_info = report::BrokerInfo {
        bootstrap: bootstrap.clone(),
        protocol: match workload.protocol {
            Protocol::Native => "native".into(),
            Protocol::Kafka => "kafka".into(),
        },
        started_by_loadgen: local.is_some(),
        binary: local.as_ref().map(|b| b.binary.display().to_string()),
        version: local.as_ref().and_then(|b| b.version()),
        shards: local.as_ref().and_then(|b| b.shards),
        brokers: None,
        kafka_api_versions: None,
    };
    let target =
        run::Target { bootstrap, broker: broker_info, keep_topics: cli.keep_topics, progress: !cli.quiet };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| LoadgenError::Io { what: "starting the tokio runtime".into(), source })?;
    let result = runtime.block_on(run::run(workload, target));
    drop(runtime);
    if let Some(b) = local {
        b.stop()?;
    }
    let report = result?;
    print!("{}", report.summary());
    if let Some(path) = &cli.report_json {
        write(path, &report.to_json())?;
        eprintln!("ringlog-loadgen: report written to {}", path.display());
    }
    let chart_path = cli.chart.clone().or_else(|| cli.report_json.as_ref().map(|p| p.with_extension("svg")));
    if let Some(path) = chart_path {
        let title = format!("ringlog-loadgen: {} against {}", report.workload.name, report.broker.bootstrap);
        write(&path, &chart::render(&title, &report.timeline, report.warmup_s))?;
        eprintln!("ringlog-loadgen: chart written to {}", path.display());
    }
    let complete = report.produce_errors == 0
        && report.consume_errors == 0
        && report.consumed_msgs >= report.expected_consumed_msgs;
    Ok(if complete { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn write(path: &std::path::Path, text: &str) -> Result<(), LoadgenError> {
    std::fs::write(path, text)
        .map_err(|source| LoadgenError::Io { what: format!("writing {}", path.display()), source })
}
