//! The client commands of the `ringlog` binary: `topic`, `produce`, `consume`, `group`,
//! `cluster`.
//!
//! Owns: argument parsing for those commands (clap), their output formats, and turning errors into
//! one `ringlog: <error>` line and exit status 1. Depends on `client` only (builds without the
//! `broker` feature); builds its own tokio runtime.

mod cluster;
mod consume;
mod group;
mod produce;
mod topic;

use std::process::ExitCode;

use clap::{Args, Subcommand};
use thiserror::Error;

use crate::client::{ClientConfig, ClientError, DEFAULT_BOOTSTRAP};

pub use cluster::ClusterCommand;
pub use consume::{ConsumeArgs, FromOffset};
pub use group::{GroupCommand, ResetArgs, ResetTo};
pub use produce::{AcksArg, ProduceArgs};
pub use topic::{DurabilityArg, TopicCommand};

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Create, list, describe or delete topics.
    Topic {
        #[command(subcommand)]
        command: TopicCommand,
    },
    /// Produce one record per line of stdin.
    Produce(ProduceArgs),
    /// Print a topic's records, one value per line (as a consumer-group member with --group).
    Consume(ConsumeArgs),
    /// List, describe, reset or delete consumer groups.
    Group {
        #[command(subcommand)]
        command: GroupCommand,
    },
    /// The cluster as one node sees it: nodes, liveness, the controller leader.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
}

/// How a command prints what it found: for people, or for scripts (stable field names).
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Where to reach the cluster; every client command takes it.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// Any broker's native-protocol address.
    #[arg(long, value_name = "ADDR", env = "RINGLOG_BOOTSTRAP", default_value = DEFAULT_BOOTSTRAP)]
    pub bootstrap: String,
    /// How long to wait for a connection or an answer; also how long a topic change is sent
    /// again while a cluster that just started is still forming.
    #[arg(
        long,
        value_name = "MS",
        env = "RINGLOG_REQUEST_TIMEOUT_MS",
        default_value_t = 30_000,
        value_parser = clap::value_parser!(u64).range(1..=3_600_000)
    )]
    pub request_timeout_ms: u64,
}

impl ConnectArgs {
    fn client_config(&self) -> ClientConfig {
        ClientConfig {
            client_id: "ringlog-cli".to_owned(),
            request_timeout: std::time::Duration::from_millis(self.request_timeout_ms),
            ..ClientConfig::new(self.bootstrap.clone())
        }
    }
}

#[derive(Debug, Error)]
pub(crate) enum CliError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{context}: {source}")]
    Io { context: &'static str, source: std::io::Error },
    #[error("{0}")]
    Input(String),
    /// The reader of our stdout went away (`| head`): not a failure.
    #[error("stdout closed")]
    StdoutClosed,
}

impl CliError {
    fn stdout(source: std::io::Error) -> CliError {
        if source.kind() == std::io::ErrorKind::BrokenPipe {
            CliError::StdoutClosed
        } else {
            CliError::Io { context: "writing to stdout", source }
        }
    }
}

/// Runs one client command to completion. On failure prints one `ringlog: <error>` line to
/// stderr and returns status 1.
pub fn run(cmd: ClientCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ringlog: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cmd {
            ClientCommand::Topic { command } => topic::run(command).await,
            ClientCommand::Produce(args) => produce::run(args).await,
            ClientCommand::Consume(args) => consume::run(args).await,
            ClientCommand::Group { command } => group::run(command).await,
            ClientCommand::Cluster { command } => cluster::run(command).await,
        }
    });
    match result {
        Ok(()) | Err(CliError::StdoutClosed) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringlog: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser)]
    struct TestCli {
        #[command(subcommand)]
        command: ClientCommand,
    }

    fn parse(args: &[&str]) -> Result<ClientCommand, clap::Error> {
        TestCli::try_parse_from(std::iter::once("ringlog").chain(args.iter().copied())).map(|c| c.command)
    }

    #[test]
    fn command_tree_is_consistent() {
        TestCli::command().debug_assert();
    }

    #[test]
    fn parses_topic_create() {
        let cmd = parse(&[
            "topic",
            "create",
            "orders",
            "--partitions",
            "6",
            "--retention-ms",
            "60000",
            "--durability",
            "written",
            "--bootstrap",
            "h:1",
        ])
        .unwrap();
        let ClientCommand::Topic { command: TopicCommand::Create(create) } = cmd else { panic!("{cmd:?}") };
        assert_eq!(create.name, "orders");
        assert_eq!(create.partitions, 6);
        assert_eq!(create.retention_ms, Some(60000));
        assert_eq!(create.durability, Some(DurabilityArg::Written));
        assert_eq!(create.connect.bootstrap, "h:1");
        assert_eq!(create.connect.client_config().request_timeout, std::time::Duration::from_secs(30));
        assert!(parse(&["topic", "create", "orders"]).is_err(), "--partitions is required");
        let cmd =
            parse(&["topic", "create", "o", "--partitions", "1", "--request-timeout-ms", "1500"]).unwrap();
        let ClientCommand::Topic { command: TopicCommand::Create(create) } = cmd else { panic!("{cmd:?}") };
        assert_eq!(create.connect.client_config().request_timeout, std::time::Duration::from_millis(1500));
        for bad in ["0", "soon"] {
            let args = ["topic", "create", "o", "--partitions", "1", "--request-timeout-ms", bad];
            assert!(parse(&args).is_err(), "--request-timeout-ms {bad}");
        }
    }

    #[test]
    fn parses_produce_and_consume() {
        let ClientCommand::Produce(p) =
            parse(&["produce", "t", "--acks", "all", "--key-separator", ":"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(p.acks, AcksArg(-1));
        assert_eq!(p.key_separator.as_deref(), Some(":"));
        assert!(parse(&["produce", "t", "--acks", "2"]).is_err());

        let ClientCommand::Consume(c) =
            parse(&["consume", "t", "--from", "42", "--count", "5", "--print-meta"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(c.from, FromOffset::At(42));
        assert_eq!(c.count, Some(5));
        assert!(c.print_meta && !c.follow);
        let ClientCommand::Consume(c) = parse(&["consume", "t"]).unwrap() else { panic!() };
        assert_eq!(c.from, FromOffset::Beginning);
        assert_eq!(c.connect.bootstrap, DEFAULT_BOOTSTRAP);
        assert!(parse(&["consume", "t", "--from", "middle"]).is_err());
        let ClientCommand::Consume(c) = parse(&["consume", "t", "--group", "g", "--follow"]).unwrap() else {
            panic!()
        };
        assert_eq!(c.group.as_deref(), Some("g"));
        assert_eq!(c.commit_interval_ms, 1000);
    }

    #[test]
    fn parses_group_commands() {
        let ClientCommand::Group { command: GroupCommand::Reset(r) } = parse(&[
            "group",
            "reset",
            "billing",
            "--topic",
            "orders",
            "--to",
            "2026-11-28T12:00:00Z",
            "--partition",
            "1",
            "--partition",
            "3",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!((r.group.as_str(), r.topic.as_str()), ("billing", "orders"));
        assert_eq!(r.partitions, vec![1, 3]);
        assert_eq!(r.to, ResetTo(crate::client::ResetTarget::Timestamp(1_795_867_200_000)));
        assert!(parse(&["group", "reset", "g", "--topic", "t"]).is_err(), "--to is required");
        assert!(matches!(
            parse(&["group", "describe", "g"]).unwrap(),
            ClientCommand::Group { command: GroupCommand::Describe { .. } }
        ));
        assert!(matches!(
            parse(&["group", "list"]).unwrap(),
            ClientCommand::Group { command: GroupCommand::List { .. } }
        ));
        assert!(matches!(
            parse(&["group", "delete", "g"]).unwrap(),
            ClientCommand::Group { command: GroupCommand::Delete { .. } }
        ));
    }
}
