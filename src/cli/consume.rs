//! `ringlog consume TOPIC`: print records.
//!
//! Owns: choosing partitions and start offsets, the stop rule (the high watermarks seen at start,
//! `--count`, or never with `--follow`) and the output format. Depends on `client::{Admin,
//! Consumer}`. Output goes through a BufWriter flushed after every poll; a closed stdout ends
//! the command quietly.

use std::collections::HashMap;
use std::io::Write;
use std::str::FromStr;
use std::time::Duration;

use clap::Args;

use super::{CliError, ConnectArgs};
use crate::client::{Admin, ClientError, Consumer, ConsumerConfig, ConsumerRecord, Offset};

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
    let client = args.connect.client_config();
    let description = Admin::connect(client.clone()).await?.describe_topic(&args.topic).await?;
    let partitions: Vec<_> = match args.partition {
        None => description.partitions.clone(),
        Some(p) => match description.partitions.iter().find(|info| info.partition == p) {
            Some(info) => vec![*info],
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
}
