//! The `ringlog` binary: `ringlog serve` runs the broker; every other subcommand is a client.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use ringlog::config::BrokerConfig;

mod alloc;

/// Large blocks are address-space reservations, so a wire count that sizes a `Vec` cannot abort
/// the process (see `alloc`).
#[global_allocator]
static GLOBAL: alloc::ReservingAllocator = alloc::ReservingAllocator;

#[derive(Parser)]
#[command(name = "ringlog", version, about = "A thread-per-core event-streaming broker in the Kafka family")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a broker. With no options a single node: data in ./ringlog-data, native protocol on
    /// 127.0.0.1:9292, one shard per core. With --seeds, a node of a cluster.
    Serve(ServeArgs),
    #[command(flatten)]
    Client(ringlog::cli::ClientCommand),
}

#[derive(Args)]
struct ServeArgs {
    /// TOML config file; see README "Configuration" for every option.
    #[arg(long, env = "RINGLOG_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (option `data_dir`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Native protocol listen address (option `listen`).
    #[arg(long)]
    listen: Option<String>,
    /// Kafka protocol listen address, `off` to disable (option `kafka_listen`).
    #[arg(long)]
    kafka_listen: Option<String>,
    /// Number of shards, 0 = one per core (option `shards`).
    #[arg(long)]
    shards: Option<usize>,
    /// First per-shard direct port, 0 = pick free ports (option `shard_port_base`).
    #[arg(long)]
    shard_port_base: Option<u16>,
    /// This node's id in a cluster (option `node_id`).
    #[arg(long)]
    node_id: Option<u64>,
    /// Every node of the cluster as ID@HOST:PORT,... with its replication address (option `seeds`).
    #[arg(long)]
    seeds: Option<String>,
    /// Replication listen address; default: this node's address in --seeds (option `peer_listen`).
    #[arg(long)]
    peer_listen: Option<String>,
    /// Any option as KEY=VALUE, e.g. `--set default_durability=written`. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Log filter (tracing env-filter syntax), e.g. `info`, `ringlog=debug`.
    #[arg(long, env = "RINGLOG_LOG", default_value = "info")]
    log: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Client(cmd) => ringlog::cli::run(cmd),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    // Before the shards allocate: see `alloc::split_arenas`. Without it, huge pages go for the
    // whole process so that purged memory stays purged; not fatal either way: the broker works
    // with huge pages, its memory only creeps up.
    if let Err(e) = alloc::split_arenas() {
        tracing::warn!("small blocks stay in mimalloc's default arena ({e}); turning huge pages off instead");
        if let Err(e) = alloc::disable_transparent_huge_pages() {
            tracing::warn!("could not turn transparent huge pages off (prctl PR_SET_THP_DISABLE): {e}");
        }
    }
    let mut overrides: Vec<(String, String)> = Vec::new();
    if let Some(v) = &args.data_dir {
        overrides.push(("data_dir".into(), v.display().to_string()));
    }
    if let Some(v) = &args.listen {
        overrides.push(("listen".into(), v.clone()));
    }
    if let Some(v) = &args.kafka_listen {
        // Always a string option, even when it looks like a TOML literal.
        overrides.push(("kafka_listen".into(), format!("\"{v}\"")));
    }
    if let Some(v) = args.shards {
        overrides.push(("shards".into(), v.to_string()));
    }
    if let Some(v) = args.shard_port_base {
        overrides.push(("shard_port_base".into(), v.to_string()));
    }
    if let Some(v) = args.node_id {
        overrides.push(("node_id".into(), v.to_string()));
    }
    if let Some(v) = &args.seeds {
        overrides.push(("seeds".into(), format!("\"{v}\"")));
    }
    if let Some(v) = &args.peer_listen {
        overrides.push(("peer_listen".into(), format!("\"{v}\"")));
    }
    for kv in &args.set {
        let Some((k, v)) = kv.split_once('=') else {
            eprintln!("ringlog: --set {kv}: expected KEY=VALUE");
            return ExitCode::from(2);
        };
        overrides.push((k.trim().to_string(), v.trim().to_string()));
    }
    let config = match BrokerConfig::load(args.config.as_deref(), std::env::vars(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ringlog: {e}");
            return ExitCode::from(2);
        }
    };
    // Idle shards hand what mimalloc holds free back to the kernel (see `ringlog::allocator`).
    ringlog::allocator::set_release_free_memory(alloc::release_free_memory);
    match ringlog::broker::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringlog: {e}");
            ExitCode::FAILURE
        }
    }
}
