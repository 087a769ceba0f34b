//! Three-node clusters of real `ringlog serve` processes on loopback: starting them, reading
//! `/v1/cluster`, waiting for what they agree on.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::Broker;

pub use super::free_ports;

/// `GET path` on an admin listener: the status line and the body.
pub fn get(admin: &str, path: &str) -> Option<(String, String)> {
    let mut stream = TcpStream::connect(admin).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.to_string(), body.to_string()))
}

/// The node's `/v1/cluster` view.
pub fn status(node: &Broker) -> Option<Value> {
    let (line, body) = get(&node.admin, "/v1/cluster")?;
    assert!(line.contains("200"), "{line}: {body}");
    serde_json::from_str(&body).ok()
}

/// Polls `check` until it answers, for at most 40 s; then fails with every node's log.
#[track_caller]
pub fn wait_for<T>(what: &str, nodes: &[&Broker], mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if let Some(value) = check() {
            return value;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = nodes.iter().map(|n| n.log()).collect();
            panic!("timed out waiting for {what}; logs:\n{}", logs.join("\n-----\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The controller leader every given node agrees on, once each sees `expected` nodes registered
/// and alive.
pub fn agreed_leader(nodes: &[&Broker], expected: usize) -> Option<u64> {
    let mut leaders = Vec::new();
    for node in nodes {
        let s = status(node)?;
        let listed = s["nodes"].as_array()?;
        let up = listed.iter().filter(|n| n["alive"] == true && n["registered"] == true).count();
        if up != expected {
            return None;
        }
        leaders.push(s["controller_leader"].as_u64()?);
    }
    leaders.windows(2).all(|w| w[0] == w[1]).then(|| leaders[0])
}

/// Node `id` of the cluster `seeds` on `dir`, 50 ms Raft ticks; odd nodes run two shards and
/// even ones one, so replicas live on shards other than 0 and nodes of different shard counts
/// replicate together.
pub fn start_node(dir: &std::path::Path, id: u64, seeds: &str) -> Broker {
    start_node_with(dir, id, seeds, &[])
}

/// A node with options beyond the cluster's own (`--set KEY=VALUE` each).
pub fn start_node_with(dir: &std::path::Path, id: u64, seeds: &str, extra: &[String]) -> Broker {
    let mut sets = vec![
        format!("node_id={id}"),
        format!("seeds={seeds}"),
        "admin_listen=127.0.0.1:0".to_string(),
        "raft_tick_ms=50".to_string(),
    ];
    sets.extend(extra.iter().cloned());
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    Broker::start_in(dir, shards_of(id), &sets)
}

/// How many shards node `id` runs (see `start_node`).
pub fn shards_of(id: u64) -> usize {
    1 + (id % 2) as usize
}

/// Nodes 1, 2 and 3 on loopback, each with its own data directory: their peer ports, their
/// directories (kept while the test runs) and the running brokers.
pub fn start_three() -> (Vec<u16>, Vec<tempfile::TempDir>, Vec<Broker>) {
    start_three_with(&[])
}

/// `start_three` with options beyond the cluster's own on every node.
pub fn start_three_with(extra: &[String]) -> (Vec<u16>, Vec<tempfile::TempDir>, Vec<Broker>) {
    let ports = free_ports(3);
    let seeds = seeds(&ports);
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes = (0..3).map(|i| start_node_with(dirs[i].path(), i as u64 + 1, &seeds, extra)).collect();
    (ports, dirs, nodes)
}

/// The `seeds` setting of nodes 1, 2, … listening for peers on `ports` of loopback.
pub fn seeds(ports: &[u16]) -> String {
    let seeds: Vec<String> =
        ports.iter().enumerate().map(|(i, p)| format!("{}@127.0.0.1:{p}", i + 1)).collect();
    seeds.join(",")
}

/// Creates `topic` through `node`'s CLI with `partitions` partitions of `replication_factor`
/// copies, and checks the CLI says so.
pub fn create_replicated(node: &Broker, topic: &str, partitions: u32, replication_factor: u16) {
    let (partitions, factor) = (partitions.to_string(), replication_factor.to_string());
    let args = ["topic", "create", topic, "--partitions", &partitions, "--replication-factor", &factor];
    let created = super::run_cli(&node.addr, &args, None).ok();
    assert!(created.contains(&format!("{partitions} partitions")), "{created}");
}

/// Per partition from `topic describe --format json` on `node`: (leader, isr sorted, replicas
/// sorted).
pub type Described = Vec<(Option<u64>, Vec<u64>, Vec<u64>)>;

pub fn describe(node: &Broker, topic: &str) -> Option<Described> {
    let out = super::run_cli(&node.addr, &["topic", "describe", topic, "--format", "json"], None);
    if !out.status.success() {
        return None;
    }
    let json: Value = serde_json::from_str(&out.stdout).ok()?;
    let ids = |v: &Value| -> Vec<u64> {
        let mut ids: Vec<u64> = v.as_array().into_iter().flatten().filter_map(Value::as_u64).collect();
        ids.sort_unstable();
        ids
    };
    let partitions = json["partitions"].as_array()?;
    Some(partitions.iter().map(|p| (p["leader"].as_u64(), ids(&p["isr"]), ids(&p["replicas"]))).collect())
}

/// SIGSTOP or SIGCONT to a running node.
pub fn signal(node: &Broker, signal: i32) {
    let pid = node.child.as_ref().expect("node running").id() as i32;
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "signal {signal} to {pid}");
}
