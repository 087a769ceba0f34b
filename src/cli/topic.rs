//! `ringlog topic create|alter|list|describe|delete`.
//!
//! Owns: those subcommands' arguments and output. Depends on `client::Admin`.

use std::io::Write;

use clap::{Args, Subcommand, ValueEnum};

use super::{CliError, ConnectArgs, Format};
use crate::client::{Admin, Durability, TopicDescription, TopicSettings};

#[derive(Debug, Subcommand)]
pub enum TopicCommand {
    /// Create a topic.
    Create(CreateArgs),
    /// List topic names, one per line.
    List {
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Show a topic's effective config and, per partition, its shard, log start and high
    /// watermark, and for a replicated topic its leader, epoch and replicas.
    Describe {
        name: String,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Raise a topic's partition count (Kafka's CreatePartitions): existing partitions keep
    /// their data and keep serving; a replicated topic's new partitions keep its replication
    /// factor, their leaders spread over the nodes.
    Alter {
        name: String,
        /// The new total number of partitions: more than the topic has.
        #[arg(long)]
        partitions: u32,
        /// Check the request on the broker and change nothing.
        #[arg(long)]
        validate_only: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Delete a topic and its data.
    Delete {
        name: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    pub name: String,
    #[arg(long)]
    pub partitions: u32,
    /// Keep each partition on this many nodes of the cluster (a Raft group each; writes are
    /// acknowledged once a majority holds them). Default: min(3, nodes) in a cluster, 1 on a
    /// single node (which refuses more).
    #[arg(long, value_name = "N")]
    pub replication_factor: Option<u16>,
    /// Delete segments older than this (-1 = keep forever).
    #[arg(long, value_name = "MS", allow_negative_numbers = true)]
    pub retention_ms: Option<i64>,
    /// Per partition: delete the oldest segments beyond this size (-1 = unlimited).
    #[arg(long, value_name = "BYTES", allow_negative_numbers = true)]
    pub retention_bytes: Option<i64>,
    /// Roll the active segment at this size.
    #[arg(long, value_name = "BYTES")]
    pub segment_bytes: Option<i64>,
    /// Roll the active segment at this age.
    #[arg(long, value_name = "MS")]
    pub segment_ms: Option<i64>,
    /// When a produce is acknowledged: after the write reached the device, or after fdatasync.
    #[arg(long, value_enum)]
    pub durability: Option<DurabilityArg>,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DurabilityArg {
    Written,
    Fsync,
}

pub(super) async fn run(command: TopicCommand) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    match command {
        TopicCommand::Create(args) => {
            let admin = Admin::connect(args.connect.client_config()).await?;
            let settings = TopicSettings {
                retention_bytes: args.retention_bytes,
                retention_ms: args.retention_ms,
                segment_bytes: args.segment_bytes,
                segment_ms: args.segment_ms,
                durability: args.durability.map(|d| match d {
                    DurabilityArg::Written => Durability::Written,
                    DurabilityArg::Fsync => Durability::Fsync,
                }),
            };
            let partitions = match args.replication_factor {
                Some(rf) => admin.create_replicated_topic(&args.name, args.partitions, rf, &settings).await?,
                None => admin.create_topic(&args.name, args.partitions, &settings).await?,
            };
            writeln!(out, "created topic {} with {} partitions", args.name, partitions.len())
                .map_err(CliError::stdout)?;
        }
        TopicCommand::Alter { name, partitions, validate_only, connect } => {
            let admin = Admin::connect(connect.client_config()).await?;
            let now = admin.create_partitions(&name, partitions, validate_only).await?;
            if validate_only {
                writeln!(
                    out,
                    "topic {name} can grow from {} to {partitions} partitions (validate only: nothing changed)",
                    now.len()
                )
            } else {
                writeln!(out, "topic {name} now has {} partitions", now.len())
            }
            .map_err(CliError::stdout)?;
        }
        TopicCommand::List { format, connect } => {
            let admin = Admin::connect(connect.client_config()).await?;
            let names = admin.list_topics().await?;
            match format {
                Format::Text => {
                    for name in names {
                        writeln!(out, "{name}").map_err(CliError::stdout)?;
                    }
                }
                Format::Json => {
                    writeln!(out, "{}", serde_json::json!({ "topics": names })).map_err(CliError::stdout)?
                }
            }
        }
        TopicCommand::Describe { name, format, connect } => {
            let admin = Admin::connect(connect.client_config()).await?;
            let description = admin.describe_topic(&name).await?;
            let text = match format {
                Format::Text => format_description(&description),
                Format::Json => format!("{:#}\n", description_json(&description)),
            };
            out.write_all(text.as_bytes()).map_err(CliError::stdout)?;
        }
        TopicCommand::Delete { name, connect } => {
            let admin = Admin::connect(connect.client_config()).await?;
            admin.delete_topic(&name).await?;
            writeln!(out, "deleted topic {name}").map_err(CliError::stdout)?;
        }
    }
    out.flush().map_err(CliError::stdout)
}

/// `topic describe --format json`: field names scripts may rely on (docs/replication.md). A
/// local topic's partitions have no leader, replicas, in-sync replicas or epoch (null, [], [],
/// null).
fn description_json(d: &TopicDescription) -> serde_json::Value {
    let partitions: Vec<serde_json::Value> = d
        .partitions
        .iter()
        .map(|p| {
            let r = p.replication.as_ref();
            serde_json::json!({
                "partition": p.partition,
                "shard": p.shard,
                "leader": r.and_then(|r| r.leader),
                "leader_epoch": r.map(|r| r.leader_epoch),
                "replicas": r.map(|r| r.replicas.clone()).unwrap_or_default(),
                "isr": r.map(|r| r.isr.clone()).unwrap_or_default(),
                "log_start": p.log_start_offset,
                "high_watermark": p.high_watermark,
            })
        })
        .collect();
    serde_json::json!({ "name": d.name, "partitions": partitions })
}

fn format_description(d: &TopicDescription) -> String {
    fn setting(v: Option<i64>) -> String {
        match v {
            None => "broker default".to_owned(),
            Some(-1) => "unlimited".to_owned(),
            Some(v) => v.to_string(),
        }
    }
    let durability = match d.config.durability {
        None => "broker default",
        Some(Durability::Written) => "written",
        Some(Durability::Fsync) => "fsync",
    };
    let mut s = format!(
        "topic: {}\npartitions: {}\nretention_ms: {}\nretention_bytes: {}\nsegment_bytes: {}\nsegment_ms: {}\ndurability: {}\n",
        d.name,
        d.partitions.len(),
        setting(d.config.retention_ms),
        setting(d.config.retention_bytes),
        setting(d.config.segment_bytes),
        setting(d.config.segment_ms),
        durability,
    );
    let replicated = d.partitions.iter().any(|p| p.replication.is_some());
    s.push_str(&format!("{:<10} {:<6} {:>16} {:>16}", "PARTITION", "SHARD", "LOG_START", "HIGH_WATERMARK"));
    if replicated {
        s.push_str(&format!(" {:>6} {:>6} {:<12} ISR", "LEADER", "EPOCH", "REPLICAS"));
    }
    s.push('\n');
    for p in &d.partitions {
        s.push_str(&format!(
            "{:<10} {:<6} {:>16} {:>16}",
            p.partition, p.shard, p.log_start_offset, p.high_watermark
        ));
        if let Some(r) = &p.replication {
            let leader = r.leader.map_or_else(|| "none".to_owned(), |id| id.to_string());
            let list = |ids: &[u64]| ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
            let isr = if r.isr.is_empty() { "none".to_owned() } else { list(&r.isr) };
            s.push_str(&format!(" {:>6} {:>6} {:<12} {}", leader, r.leader_epoch, list(&r.replicas), isr));
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::PartitionInfo;

    #[test]
    fn description_lists_config_then_partitions() {
        let d = TopicDescription {
            name: "orders".into(),
            partitions: vec![
                PartitionInfo {
                    partition: 0,
                    shard: 1,
                    log_start_offset: 0,
                    high_watermark: 12,
                    replication: None,
                },
                PartitionInfo {
                    partition: 1,
                    shard: 0,
                    log_start_offset: 5,
                    high_watermark: 9,
                    replication: None,
                },
            ],
            config: TopicSettings {
                retention_ms: Some(-1),
                segment_bytes: Some(1 << 30),
                durability: Some(Durability::Fsync),
                ..Default::default()
            },
        };
        let text = format_description(&d);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "topic: orders");
        assert!(lines.contains(&"retention_ms: unlimited"));
        assert!(lines.contains(&"segment_bytes: 1073741824"));
        assert!(lines.contains(&"durability: fsync"));
        let rows: Vec<Vec<&str>> = lines[8..].iter().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(rows, vec![vec!["0", "1", "0", "12"], vec!["1", "0", "5", "9"]]);
    }

    #[test]
    fn a_replicated_partition_shows_its_leader_replicas_and_in_sync_replicas() {
        let replicated = |partition, leader, isr: Vec<u64>| PartitionInfo {
            partition,
            shard: 0,
            log_start_offset: 0,
            high_watermark: 40,
            replication: Some(crate::client::ReplicaInfo {
                replicas: vec![2, 3, 1],
                leader,
                leader_epoch: 4,
                leader_address: None,
                isr,
            }),
        };
        let d = TopicDescription {
            name: "likes".into(),
            partitions: vec![replicated(0, Some(2), vec![2, 1]), replicated(1, None, Vec::new())],
            config: TopicSettings::default(),
        };
        let text = format_description(&d);
        let rows: Vec<Vec<&str>> = text
            .lines()
            .skip_while(|l| !l.starts_with("PARTITION"))
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(rows[0][4..], ["LEADER", "EPOCH", "REPLICAS", "ISR"]);
        assert_eq!(rows[1][4..], ["2", "4", "2,3,1", "2,1"]);
        assert_eq!(rows[2][4..], ["none", "4", "2,3,1", "none"]);
        let json = description_json(&d);
        assert_eq!(json["partitions"][0]["isr"], serde_json::json!([2, 1]));
        assert_eq!(json["partitions"][0]["replicas"], serde_json::json!([2, 3, 1]));
        assert_eq!(json["partitions"][1]["isr"], serde_json::json!([]));
        assert_eq!(json["partitions"][1]["leader"], serde_json::Value::Null);
    }
}
