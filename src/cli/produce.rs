//! `ringlog produce TOPIC`: one record per stdin line.
//!
//! Owns: splitting stdin into records (zero-copy slices of large reads), keys by separator, and
//! reporting the first failed record. Throughput comes from the producer: records are batched per
//! partition and requests pipelined; delivery results are checked in windows, not one by one.

use std::collections::VecDeque;
use std::io::Read;
use std::str::FromStr;

use bytes::{Bytes, BytesMut};
use clap::Args;
use tokio::sync::mpsc;

use super::{CliError, ConnectArgs};
use crate::client::{ClientError, DeliveryFuture, Producer, ProducerConfig};
use crate::record::compression::Compression;

const STDIN_READ_BYTES: usize = 1 << 20;
/// Delivery results held before the oldest are awaited; bounds memory for endless input.
const PENDING_DELIVERIES_MAX: usize = 1 << 18;

#[derive(Debug, Args)]
pub struct ProduceArgs {
    pub topic: String,
    /// Send every record to this partition instead of partitioning by key (or round-robin).
    #[arg(long)]
    pub partition: Option<u32>,
    /// Split each line at the first SEP: key before, value after.
    #[arg(long, value_name = "SEP")]
    pub key_separator: Option<String>,
    /// Acknowledgement level: 0 (none), 1 (leader) or all.
    #[arg(long, default_value = "1", value_name = "0|1|all")]
    pub acks: AcksArg,
    /// Compress every batch's records with this codec (Kafka's compression.type).
    #[arg(long, default_value = "none", value_name = "none|gzip|snappy|lz4|zstd")]
    pub compression: Compression,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// `--acks`: 0, 1, or all (-1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcksArg(pub i8);

impl FromStr for AcksArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "0" => Ok(AcksArg(0)),
            "1" => Ok(AcksArg(1)),
            "all" | "-1" => Ok(AcksArg(-1)),
            other => Err(format!("{other:?} is not an acks level (0, 1 or all)")),
        }
    }
}

struct Failures {
    failed: u64,
    first: Option<(u64, ClientError)>,
}

impl Failures {
    async fn check(&mut self, line: u64, delivery: DeliveryFuture) {
        if let Err(e) = delivery.await {
            self.failed += 1;
            if self.first.is_none() {
                self.first = Some((line, e));
            }
        }
    }
}

pub(super) async fn run(args: ProduceArgs) -> Result<(), CliError> {
    if args.key_separator.as_deref() == Some("") {
        return Err(CliError::Input("--key-separator must not be empty".to_owned()));
    }
    let config =
        ProducerConfig { acks: args.acks.0, compression: args.compression, ..ProducerConfig::default() };
    let producer = Producer::connect(args.connect.client_config(), config).await?;
    let mut chunks = spawn_stdin_reader();
    let mut line_number = 0u64;
    let mut pending: VecDeque<(u64, DeliveryFuture)> = VecDeque::new();
    let mut failures = Failures { failed: 0, first: None };
    let mut input_error = None;
    'input: while let Some(chunk) = chunks.recv().await {
        let mut chunk = match chunk {
            Ok(chunk) => chunk,
            Err(source) => {
                input_error = Some(CliError::Io { context: "reading stdin", source });
                break;
            }
        };
        while !chunk.is_empty() {
            // Chunks hold whole lines, except a last line without a newline at the very end.
            let line = match chunk.iter().position(|&b| b == b'\n') {
                Some(newline) => {
                    let line = chunk.slice(..newline);
                    chunk = chunk.slice(newline + 1..);
                    line
                }
                None => std::mem::take(&mut chunk),
            };
            line_number += 1;
            match send_line(&producer, &args, line, line_number).await {
                Ok(delivery) => pending.push_back((line_number, delivery)),
                Err(e) => {
                    input_error = Some(e);
                    break 'input;
                }
            }
            if pending.len() >= PENDING_DELIVERIES_MAX {
                for (line, delivery) in pending.drain(..PENDING_DELIVERIES_MAX / 2) {
                    failures.check(line, delivery).await;
                }
            }
        }
    }
    // Deliver what was accepted even when the input stopped early.
    producer.flush().await;
    for (line, delivery) in pending {
        failures.check(line, delivery).await;
    }
    if let Some(e) = input_error {
        return Err(e);
    }
    match failures.first {
        None => Ok(()),
        Some((line, e)) => Err(CliError::Input(format!(
            "{} of {line_number} records failed; first, from line {line}: {e}",
            failures.failed
        ))),
    }
}

/// Reads stdin on its own thread (tokio's stdin needs a feature this crate does not enable, and
/// would use a blocking thread anyway), handing over chunks that end at a line boundary: large
/// reads, split without copying.
fn spawn_stdin_reader() -> mpsc::Receiver<std::io::Result<Bytes>> {
    let (tx, rx) = mpsc::channel(4);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = BytesMut::new();
        loop {
            let filled = buf.len();
            buf.resize(filled + STDIN_READ_BYTES, 0);
            let read = stdin.read(&mut buf[filled..]);
            buf.truncate(filled + *read.as_ref().unwrap_or(&0));
            let chunk = match read {
                Ok(0) => {
                    if !buf.is_empty() {
                        let _ = tx.blocking_send(Ok(buf.split().freeze()));
                    }
                    return;
                }
                Ok(_) => match buf.iter().rposition(|&b| b == b'\n') {
                    Some(last_newline) => Ok(buf.split_to(last_newline + 1).freeze()),
                    None => continue,
                },
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e),
            };
            let failed = chunk.is_err();
            if tx.blocking_send(chunk).is_err() || failed {
                return;
            }
        }
    });
    rx
}

async fn send_line(
    producer: &Producer,
    args: &ProduceArgs,
    line: Bytes,
    line_number: u64,
) -> Result<DeliveryFuture, CliError> {
    let (key, value) = match &args.key_separator {
        None => (None, line),
        Some(sep) => {
            let sep = sep.as_bytes();
            let Some(at) = line.windows(sep.len()).position(|w| w == sep) else {
                return Err(CliError::Input(format!(
                    "line {line_number}: no key separator {:?} in the line",
                    String::from_utf8_lossy(sep)
                )));
            };
            (Some(line.slice(..at)), line.slice(at + sep.len()..))
        }
    };
    let delivery = match args.partition {
        Some(p) => producer.send_to(&args.topic, p, key, value).await?,
        None => producer.send(&args.topic, key, value).await?,
    };
    Ok(delivery)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ProduceArgs,
    }

    #[test]
    fn parses_compression() {
        let parse =
            |extra: &[&str]| Cli::try_parse_from(["produce", "t"].iter().chain(extra)).map(|c| c.args);
        assert_eq!(parse(&[]).unwrap().compression, Compression::None);
        assert_eq!(parse(&["--compression", "zstd"]).unwrap().compression, Compression::Zstd);
        assert_eq!(parse(&["--compression", "snappy"]).unwrap().compression, Compression::Snappy);
        let err = parse(&["--compression", "brotli"]).err().unwrap().to_string();
        assert!(err.contains("not a compression codec"), "{err}");
    }
}
