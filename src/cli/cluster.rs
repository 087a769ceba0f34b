//! `ringlog cluster status`: one node's view of its cluster, read from its admin listener
//! (`GET /v1/cluster`), as a table or as the JSON the admin API returns (field names are stable:
//! README "Cluster").

use clap::Subcommand;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{CliError, Format};

/// Largest answer read from the admin listener.
const RESPONSE_BYTES_MAX: u64 = 1 << 20;

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Nodes, whether this node hears from each, the controller leader.
    Status {
        /// The admin listener of any node (its `admin=` in the ready line).
        #[arg(long, value_name = "ADDR", env = "RINGLOG_ADMIN", default_value = "127.0.0.1:9293")]
        admin: String,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
}

pub(crate) async fn run(command: ClusterCommand) -> Result<(), CliError> {
    let ClusterCommand::Status { admin, format } = command;
    let body = get(&admin, "/v1/cluster").await?;
    let status: Value = serde_json::from_str(&body).map_err(|e| {
        CliError::Input(format!("{admin} answered /v1/cluster with something that is not JSON: {e}"))
    })?;
    let text = match format {
        Format::Json => serde_json::to_string_pretty(&status).unwrap_or_default(),
        Format::Text => render(&status),
    };
    println!("{text}");
    Ok(())
}

async fn get(admin: &str, path: &str) -> Result<String, CliError> {
    let io = |context| move |source| CliError::Io { context, source };
    let mut stream =
        tokio::net::TcpStream::connect(admin).await.map_err(io("connecting to the admin listener"))?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {admin}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(io("sending to the admin listener"))?;
    let mut response = String::new();
    stream
        .take(RESPONSE_BYTES_MAX)
        .read_to_string(&mut response)
        .await
        .map_err(io("reading from the admin listener"))?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((response.as_str(), ""));
    let status_line = head.lines().next().unwrap_or_default();
    if !status_line.contains(" 200 ") {
        return Err(CliError::Input(format!("{admin}{path}: {status_line}: {}", body.trim())));
    }
    Ok(body.to_string())
}

fn render(status: &Value) -> String {
    let field = |v: &Value, k: &str| match &v[k] {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => if *b { "yes" } else { "no" }.to_string(),
        other => other.to_string(),
    };
    let mut out = format!(
        "cluster {}, as node {} sees it: controller leader {} (term {})\n",
        field(status, "cluster_id"),
        field(status, "node_id"),
        field(status, "controller_leader"),
        field(status, "controller_term"),
    );
    out.push_str(&format!(
        "{:<6}{:<7}{:<12}{:<24}{:<24}{}\n",
        "NODE", "ALIVE", "REGISTERED", "PEER", "NATIVE", "KAFKA"
    ));
    for node in status["nodes"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<6}{:<7}{:<12}{:<24}{:<24}{}\n",
            field(node, "id"),
            field(node, "alive"),
            field(node, "registered"),
            field(node, "peer"),
            field(node, "native"),
            field(node, "kafka"),
        ));
    }
    out.push_str(&format!(
        "under-replicated partitions: {}, leaderless partitions: {}",
        field(status, "under_replicated_partitions"),
        field(status, "leaderless_partitions")
    ));
    if status["stopped_replicas"].as_u64().is_some_and(|n| n > 0) {
        out.push_str(&format!(
            "\nreplicas stopped on a storage error on this node: {} (reopened once they can be; see its log)",
            field(status, "stopped_replicas")
        ));
    }
    if let Value::String(failure) = &status["failure"] {
        out.push_str(&format!("\nthis node has left the controller group: {failure}"));
    }
    out
}
