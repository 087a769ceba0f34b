//! `ringlog consume TOPIC [--group G]`: print records.
//!
//! Owns: choosing partitions and start offsets, the stop rule (the high watermarks seen at start,
//! `--count`, or never with `--follow`) and the output format. Depends on `client::{Admin,
//! Consumer, GroupConsumer}`. Output goes through a BufWriter flushed after every poll; a closed
//! stdout ends the command quietly.
//!
//! With `--group`, the group decides the partitions and where each starts (its committed
//! offsets), and the command commits as it goes: at most every `--commit-interval-ms`, always
//! for records already printed and flushed (at-least-once), and once more when it stops. It
//! stops after `--count` records, or without `--follow` once its partitions are caught up; with
//! `--follow`, on SIGINT or SIGTERM, leaving the group so the others take over at once.

use std::collections::HashMap;
use std::io::Write;
use std::str::FromStr;
use std::time::Duration;

use clap::Args;

use super::{CliError, ConnectArgs};
use crate::client::{
    Admin, Assignor, ClientError, Consumer, ConsumerConfig, ConsumerRecord, GroupConsumer,
    GroupConsumerConfig, Offset, OffsetReset,
};

/// Long-poll wait per fetch; the broker answers as soon as data arrives.
const POLL_WAIT: Duration = Duration::from_millis(500);

#[derive(Debug, Args)]
pub struct ConsumeArgs {
    pub topic: String,
    /// Only this partition (default: all).
    #[arg(long)]
    pub partition: Option<u32>,
    /// Where to start on every partition: beginning, end, or an offset.
    #[arg(long, default_value = "beginning", value_name = "beginning|end|OFFSET")]
    pub from: FromOffset,
    /// Stop after this many records.
    #[arg(long)]
    pub count: Option<u64>,
    /// Keep waiting for new records instead of stopping at the end.
    #[arg(long)]
    pub follow: bool,
    /// Print partition, offset, timestamp_ms, key and value, tab-separated.
    #[arg(long)]
    pub print_meta: bool,
    /// Consume as a member of this consumer group: the group assigns the partitions, they start
    /// at its committed offsets (`--from beginning|end` where it has none), and this command
    /// commits as it goes.
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,
    /// With --group: commit the printed records' offsets at most this often.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub commit_interval_ms: u64,
    /// With --group: the group removes this member after this long without a heartbeat.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    pub session_timeout_ms: u64,
    /// With --group: how the group divides partitions among members.
    #[arg(long, default_value = "range", value_name = "range|roundrobin|sticky")]
    pub assignor: Assignor,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FromOffset {
    Beginning,
    End,
    At(i64),
}

impl FromStr for FromOffset {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "beginning" => Ok(FromOffset::Beginning),
            "end" => Ok(FromOffset::End),
            other => match other.parse::<i64>() {
                Ok(o) if o >= 0 => Ok(FromOffset::At(o)),
                _ => Err(format!("{other:?} is not beginning, end or an offset")),
            },
        }
    }
}

pub(super) async fn run(args: ConsumeArgs) -> Result<(), CliError> {
    if args.group.is_some() {
        return run_group(args).await;
    }
    let client = args.connect.client_config();
    let description = Admin::connect(client.clone()).await?.describe_topic(&args.topic).await?;
    let partitions: Vec<_> = match args.partition {
        None => description.partitions.clone(),
        Some(p) => match description.partitions.iter().find(|info| info.partition == p) {
            Some(info) => vec![info.clone()],
            None => {
                return Err(ClientError::UnknownPartition {
                    topic: args.topic.clone(),
                    partition: p,
                    partitions: description.partitions.len() as u32,
                }
                .into())
            }
        },
    };
    let initial_offset = match args.from {
        FromOffset::Beginning => Offset::Beginning,
        FromOffset::End => Offset::End,
        FromOffset::At(o) => Offset::At(o),
    };
    // Without --follow: stop at the high watermark each partition had when we started.
    let mut remaining: HashMap<u32, i64> = HashMap::new();
    if !args.follow {
        for p in &partitions {
            let empty = match args.from {
                FromOffset::Beginning => p.high_watermark <= p.log_start_offset,
                FromOffset::End => true,
                FromOffset::At(o) => o >= p.high_watermark,
            };
            if !empty {
                remaining.insert(p.partition, p.high_watermark);
            }
        }
        if remaining.is_empty() || args.count == Some(0) {
            return Ok(());
        }
    }
    let config = ConsumerConfig { initial_offset, ..ConsumerConfig::default() };
    let mut consumer = Consumer::connect(client, config).await?;
    let assignment = |parts: &mut dyn Iterator<Item = u32>| parts.map(|p| (args.topic.clone(), p)).collect();
    if args.follow {
        consumer.assign(assignment(&mut partitions.iter().map(|p| p.partition)));
    } else {
        consumer.assign(assignment(&mut remaining.keys().copied()));
    }

    let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    let mut printed = 0u64;
    loop {
        let records = consumer.poll(POLL_WAIT).await?;
        for record in &records {
            if !args.follow && remaining.get(&record.partition).is_none_or(|&end| record.offset >= end) {
                continue;
            }
            print_record(&mut out, record, args.print_meta).map_err(CliError::stdout)?;
            printed += 1;
            if args.count.is_some_and(|n| printed >= n) {
                return out.flush().map_err(CliError::stdout);
            }
        }
        out.flush().map_err(CliError::stdout)?;
        if !args.follow {
            let before = remaining.len();
            remaining.retain(|&p, &mut end| consumer.position(&args.topic, p).is_none_or(|pos| pos < end));
            if remaining.is_empty() {
                return Ok(());
            }
            if remaining.len() != before {
                consumer.assign(assignment(&mut remaining.keys().copied()));
            }
        }
    }
}

async fn run_group(args: ConsumeArgs) -> Result<(), CliError> {
    let group_id = args.group.clone().unwrap_or_default();
    let auto_offset_reset = match args.from {
        FromOffset::Beginning => OffsetReset::Beginning,
        FromOffset::End => OffsetReset::End,
        FromOffset::At(_) => {
            return Err(CliError::Input(
                "--from OFFSET cannot be used with --group: the group's committed offsets decide where \
                 it reads (move them with `ringlog group reset`)"
                    .to_owned(),
            ))
        }
    };
    if args.partition.is_some() {
        return Err(CliError::Input(
            "--partition cannot be used with --group: the group assigns partitions".into(),
        ));
    }
    if args.session_timeout_ms < 3 {
        return Err(CliError::Input("--session-timeout-ms must be at least 3".into()));
    }
    let session_timeout = Duration::from_millis(args.session_timeout_ms);
    let config = GroupConsumerConfig {
        session_timeout,
        heartbeat_interval: session_timeout / 3,
        assignor: args.assignor,
        auto_commit: true,
        auto_commit_interval: Duration::from_millis(args.commit_interval_ms),
        auto_offset_reset,
        ..GroupConsumerConfig::new(group_id)
    };
    let mut consumer = GroupConsumer::connect(args.connect.client_config(), config).await?;
    consumer.subscribe(vec![args.topic.clone()]);
    let outcome = consume_group(&mut consumer, &args).await;
    // Commit what was printed and leave, also after an error (a closed stdout, a signal).
    let closed = consumer.close().await;
    outcome?;
    closed.map_err(CliError::from)
}

/// Polls and prints until the stop rule says so or a signal arrives.
async fn consume_group(consumer: &mut GroupConsumer, args: &ConsumeArgs) -> Result<(), CliError> {
    use tokio::signal::unix::{signal, SignalKind};
    let stop_signal =
        |kind| signal(kind).map_err(|source| CliError::Io { context: "installing a signal handler", source });
    let mut interrupt = stop_signal(SignalKind::interrupt())?;
    let mut terminate = stop_signal(SignalKind::terminate())?;
    let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    let mut printed = 0u64;
    loop {
        let records = tokio::select! {
            records = consumer.poll(POLL_WAIT) => records?,
            _ = interrupt.recv() => return Ok(()),
            _ = terminate.recv() => return Ok(()),
        };
        for (i, record) in records.iter().enumerate() {
            print_record(&mut out, record, args.print_meta).map_err(CliError::stdout)?;
            printed += 1;
            if args.count.is_some_and(|n| printed >= n) {
                out.flush().map_err(CliError::stdout)?;
                // The poll's records not printed stay the group's: each partition goes back to
                // its first one, so the commit on leaving covers only what was printed.
                let mut rewound: Vec<(&str, u32)> = Vec::new();
                for unprinted in &records[i + 1..] {
                    let partition = (&*unprinted.topic, unprinted.partition);
                    if !rewound.contains(&partition) {
                        rewound.push(partition);
                        consumer.seek(partition.0, partition.1, unprinted.offset)?;
                    }
                }
                return Ok(());
            }
        }
        out.flush().map_err(CliError::stdout)?;
        if !args.follow && records.is_empty() && consumer.generation_id() >= 0 {
            let caught_up = consumer.assignment().iter().all(|(topic, partition)| {
                match (consumer.position(topic, *partition), consumer.high_watermark(topic, *partition)) {
                    (Some(position), Some(end)) => position >= end,
                    _ => false,
                }
            });
            if caught_up {
                return Ok(());
            }
        }
    }
}

fn print_record(out: &mut impl Write, r: &ConsumerRecord, print_meta: bool) -> std::io::Result<()> {
    if print_meta {
        write!(out, "{}\t{}\t{}\t", r.partition, r.offset, r.timestamp_ms)?;
        out.write_all(r.key.as_deref().unwrap_or_default())?;
        out.write_all(b"\t")?;
    }
    out.write_all(r.value.as_deref().unwrap_or_default())?;
    out.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::sync::Arc;

    #[test]
    fn formats_records() {
        let r = ConsumerRecord {
            topic: Arc::from("t"),
            partition: 2,
            offset: 40,
            timestamp_ms: 1_700_000_000_000,
            key: None,
            value: Some(Bytes::from_static(b"hello")),
        };
        let mut out = Vec::new();
        print_record(&mut out, &r, false).unwrap();
        print_record(&mut out, &r, true).unwrap();
        let keyed = ConsumerRecord { key: Some(Bytes::from_static(b"k")), value: None, ..r };
        print_record(&mut out, &keyed, true).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "hello\n2\t40\t1700000000000\t\thello\n2\t40\t1700000000000\tk\t\n"
        );
    }

    #[test]
    fn parses_from() {
        assert_eq!("end".parse::<FromOffset>(), Ok(FromOffset::End));
        assert_eq!("0".parse::<FromOffset>(), Ok(FromOffset::At(0)));
        assert!("-3".parse::<FromOffset>().is_err());
    }

    #[tokio::test]
    async fn group_mode_refuses_explicit_offsets_and_partitions() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: ConsumeArgs,
        }
        let parse = |extra: &[&str]| {
            Cli::try_parse_from(["consume", "t", "--group", "g"].iter().chain(extra)).unwrap().args
        };
        let err = run(parse(&["--from", "5"])).await.unwrap_err();
        assert!(err.to_string().contains("ringlog group reset"), "{err}");
        let err = run(parse(&["--partition", "1"])).await.unwrap_err();
        assert!(err.to_string().contains("assigns partitions"), "{err}");
        let args = parse(&["--assignor", "sticky", "--commit-interval-ms", "50"]);
        assert_eq!((args.assignor, args.commit_interval_ms), (Assignor::Sticky, 50));
    }
}
