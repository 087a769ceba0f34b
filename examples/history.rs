//! Native-protocol clients that record what they did as a history for
//! `scripts/checker/kafka_history.py` (its docstring has the format), so the nemesis
//! (`scripts/nemesis`) judges ringlog's own client beside the Kafka ones.
//!
//! ```text
//! history producer --bootstrap A,B,C --topic T --history FILE [--name N] [--rate R]
//! history group    --bootstrap A,B,C --topic T --history FILE [--name N] [--group G]
//! history reader   --bootstrap A,B,C --topic T --history FILE [--name N] --partitions P
//! ```
//!
//! - `producer`: `acks=all`, unique values `<name>-<n>` at about `--rate` a second, round-robin
//!   over the partitions. The native protocol has no producer ids (no idempotence), so the
//!   producer never retries a batch (`retries: 0`): a retry of a batch whose first attempt did
//!   commit would be a duplicate the checker rightly reports. A record that fails is recorded as
//!   `fail` (it may or may not be written) and never sent again.
//! - `group`: a `GroupConsumer` member (server-side range assignment) that commits each poll's
//!   offsets itself and records `assign`, `revoke`, `poll`, `commit` / `commit_unknown`.
//! - `reader`: a plain `Consumer` with every partition assigned from 0 and no offset reset
//!   policy, so an out-of-range answer is recorded as a `reset` (and the position kept).
//!
//! The client library talks to one bootstrap address; a node killed or paused would leave it
//! blind, so each role rebuilds its client on the next address of `--bootstrap` once failures
//! have lasted `--rotate-after-ms` (positions are kept and recorded as a new `assign`).
//!
//! Every history line is written with one `write` call as it happens, so a killed client leaves
//! what it saw. Runs until SIGTERM or SIGINT. Exit status 0 unless the client itself could not
//! run (bad arguments, no history file): the history judges the broker.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use ringlog::client::{
    ClientConfig, ClientError, Consumer, ConsumerConfig, ConsumerRecord, GroupConsumer, GroupConsumerConfig,
    Offset, OffsetReset, Partitioner, Producer, ProducerConfig, RebalanceListener, RevokeCommit,
};
use ringlog::protocol::ACKS_ALL;
use serde_json::{json, Value};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Role {
    Producer,
    Group,
    Reader,
}

#[derive(Debug, Parser)]
#[command(about = "ringlog native clients that record a history for the checker")]
struct Args {
    role: Role,
    /// Native listeners, `host:port,host:port,...`; the client starts with the first.
    #[arg(long)]
    bootstrap: String,
    #[arg(long)]
    topic: String,
    /// The history file (JSON lines, appended).
    #[arg(long)]
    history: String,
    /// The process name in the history (default: the role, prefixed "native-").
    #[arg(long)]
    name: Option<String>,
    #[arg(long, default_value = "native-history-group")]
    group: String,
    /// producer: records a second.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// reader: the topic's partition count.
    #[arg(long, default_value_t = 3)]
    partitions: u32,
    /// How long any one request may take (a paused node must not hold a client for long).
    #[arg(long, default_value_t = 5000)]
    request_timeout_ms: u64,
    /// Failures lasting this long make the client move to the next bootstrap address.
    #[arg(long, default_value_t = 3000)]
    rotate_after_ms: u64,
}

/// The history file, shared by the tasks of one process.
#[derive(Clone)]
struct History {
    file: Arc<Mutex<File>>,
    process: Arc<str>,
}

impl History {
    fn open(path: &str, process: &str) -> std::io::Result<History> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(History { file: Arc::new(Mutex::new(file)), process: Arc::from(process) })
    }

    /// Appends one event; `fields` must be a JSON object.
    fn event(&self, kind: &str, fields: Value) {
        let mut event = json!({ "type": kind, "process": &*self.process, "time": unix_now() });
        if let (Some(out), Value::Object(more)) = (event.as_object_mut(), fields) {
            out.extend(more);
        }
        let mut line = event.to_string();
        line.push('\n');
        // One write per line: a line is either whole in the file or (killed mid-write) the
        // torn last one, which the checker ignores. A failed write cannot be recorded anywhere
        // else; say so on stderr and let the run's checks notice the missing events.
        let mut file = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = file.write_all(line.as_bytes()) {
            eprintln!("{}: history write failed: {e}", self.process);
        }
    }
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The bootstrap addresses in turn.
struct Bootstraps {
    addresses: Vec<String>,
    next: usize,
}

impl Bootstraps {
    fn new(list: &str) -> Bootstraps {
        let addresses = list.split(',').map(str::trim).filter(|a| !a.is_empty()).map(str::to_owned).collect();
        Bootstraps { addresses, next: 0 }
    }

    fn next_config(&mut self, args: &Args, name: &str) -> ClientConfig {
        let bootstrap = self.addresses[self.next % self.addresses.len()].clone();
        self.next += 1;
        ClientConfig {
            bootstrap,
            client_id: name.to_owned(),
            request_timeout: Duration::from_millis(args.request_timeout_ms),
        }
    }
}

/// Since when a client has failed without a success in between.
#[derive(Default)]
struct FailureStreak {
    since: Option<Instant>,
}

impl FailureStreak {
    fn ok(&mut self) {
        self.since = None;
    }

    /// Records a failure; true once the streak has lasted `limit`.
    fn failed(&mut self, limit: Duration) -> bool {
        self.since.get_or_insert_with(Instant::now).elapsed() >= limit
    }
}

fn value_text(record: &ConsumerRecord) -> String {
    record.value.as_deref().map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default()
}

async fn producer(args: Args, history: History, name: String, mut stop: watch::Receiver<bool>) -> i32 {
    let mut bootstraps = Bootstraps::new(&args.bootstrap);
    let rotate_after = Duration::from_millis(args.rotate_after_ms);
    // Failures seen by the delivery tasks since the main loop last looked; a success clears it.
    let failing = Arc::new(Mutex::new(FailureStreak::default()));
    let config = ProducerConfig {
        acks: ACKS_ALL,
        retries: 0,
        partitioner: Partitioner::RoundRobin,
        linger: Duration::from_millis(5),
        ..ProducerConfig::default()
    };
    let (mut sent, acked, failed) = (0u64, Arc::new(Mutex::new(0u64)), Arc::new(Mutex::new(0u64)));
    let mut deliveries = tokio::task::JoinSet::new();
    let started = Instant::now();
    'connect: while !*stop.borrow() {
        let client = bootstraps.next_config(&args, &name);
        let producer = match Producer::connect(client.clone(), config.clone()).await {
            Ok(p) => p,
            Err(e) => {
                history.event("error", json!({ "detail": format!("connect to {}: {e}", client.bootstrap) }));
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        lock(&failing).ok();
        loop {
            if *stop.borrow() {
                break 'connect;
            }
            let due = (started.elapsed().as_secs_f64() * args.rate) as u64;
            while sent < due {
                let value = format!("{name}-{sent}");
                sent += 1;
                history.event("send", json!({ "value": &value }));
                match producer.send(&args.topic, None, Bytes::from(value.clone())).await {
                    Ok(delivery) => {
                        let (history, acked, failed, failing) =
                            (history.clone(), acked.clone(), failed.clone(), failing.clone());
                        deliveries.spawn(async move {
                            match delivery.await {
                                Ok(at) => {
                                    *lock(&acked) += 1;
                                    lock(&failing).ok();
                                    history.event(
                                        "ack",
                                        json!({ "value": value, "partition": at.partition, "offset": at.offset }),
                                    );
                                }
                                Err(e) => {
                                    *lock(&failed) += 1;
                                    lock(&failing).failed(Duration::ZERO);
                                    history.event("fail", json!({ "value": value, "error": e.to_string() }));
                                }
                            }
                        });
                    }
                    Err(e) => {
                        *lock(&failed) += 1;
                        history.event("fail", json!({ "value": value, "error": e.to_string() }));
                        lock(&failing).failed(Duration::ZERO);
                    }
                }
            }
            // Reap finished delivery tasks so the set does not grow with the run.
            while deliveries.try_join_next().is_some() {}
            if lock(&failing).failed_for(rotate_after) {
                history.event(
                    "error",
                    json!({ "detail": format!("failing through {}; next bootstrap", client.bootstrap) }),
                );
                // Dropping the producer lets its sender finish what it holds; the deliveries
                // still resolve and are recorded.
                drop(producer);
                continue 'connect;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                _ = stop.changed() => {}
            }
        }
    }
    // Whatever is still in flight resolves (acknowledged or failed) within the request timeout.
    let drain = tokio::time::timeout(Duration::from_millis(3 * args.request_timeout_ms), async {
        while deliveries.join_next().await.is_some() {}
    });
    let unresolved = if drain.await.is_err() { deliveries.len() } else { 0 };
    println!("sent {sent} acked {} failed {} unresolved {unresolved}", *lock(&acked), *lock(&failed));
    0
}

impl FailureStreak {
    /// Whether failures with no success between have lasted `limit` (without adding one).
    fn failed_for(&self, limit: Duration) -> bool {
        self.since.is_some_and(|s| s.elapsed() >= limit)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn reader(args: Args, history: History, name: String, mut stop: watch::Receiver<bool>) -> i32 {
    let mut bootstraps = Bootstraps::new(&args.bootstrap);
    let rotate_after = Duration::from_millis(args.rotate_after_ms);
    let partitions: Vec<u32> = (0..args.partitions).collect();
    // The next offset to read per partition, kept across client rebuilds.
    let mut positions: BTreeMap<u32, i64> = partitions.iter().map(|&p| (p, 0)).collect();
    let config = ConsumerConfig { auto_offset_reset: None, ..ConsumerConfig::default() };
    'connect: while !*stop.borrow() {
        let client = bootstraps.next_config(&args, &name);
        let mut consumer = match Consumer::connect(client.clone(), config.clone()).await {
            Ok(c) => c,
            Err(e) => {
                history.event("error", json!({ "detail": format!("connect to {}: {e}", client.bootstrap) }));
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        consumer.assign(partitions.iter().map(|&p| (args.topic.clone(), p)).collect());
        for (&p, &at) in &positions {
            if let Err(e) = consumer.seek(&args.topic, p, Offset::At(at)) {
                history.event("error", json!({ "detail": format!("seek {p} to {at}: {e}") }));
                continue 'connect;
            }
        }
        let at: BTreeMap<String, i64> = positions.iter().map(|(p, o)| (p.to_string(), *o)).collect();
        history.event("assign", json!({ "partitions": &partitions, "positions": at }));
        let mut streak = FailureStreak::default();
        while !*stop.borrow() {
            let polled = tokio::select! {
                polled = consumer.poll(Duration::from_millis(200)) => polled,
                _ = stop.changed() => break 'connect,
            };
            match polled {
                Ok(records) => {
                    streak.ok();
                    if records.is_empty() {
                        continue;
                    }
                    let mut out = Vec::with_capacity(records.len());
                    for r in &records {
                        out.push(json!([r.partition, r.offset, value_text(r)]));
                        positions.insert(r.partition, r.offset + 1);
                    }
                    history.event("poll", json!({ "records": out }));
                }
                Err(ClientError::OffsetOutOfRange {
                    partition,
                    offset,
                    log_start_offset,
                    high_watermark,
                    ..
                }) => {
                    // No reset policy: the position stays, and the broker's answer is an
                    // anomaly for the checker (a consumer that read only committed records is
                    // never out of range while the log keeps everything).
                    history.event(
                        "reset",
                        json!({ "partition": partition, "detail": format!(
                            "offset {offset} out of range (log start {log_start_offset}, high watermark {high_watermark})"
                        ) }),
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue 'connect;
                }
                Err(e) => {
                    history.event("error", json!({ "detail": e.to_string() }));
                    if streak.failed(rotate_after) {
                        continue 'connect;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    0
}

/// Records the group's rebalances in the history.
struct Rebalances {
    history: History,
    group: String,
}

impl RebalanceListener for Rebalances {
    fn on_revoked(&mut self, partitions: &[(Arc<str>, u32)], _commit: &mut RevokeCommit) {
        let partitions: Vec<u32> = partitions.iter().map(|(_, p)| *p).collect();
        self.history.event("revoke", json!({ "partitions": partitions }));
    }

    fn on_lost(&mut self, partitions: &[(Arc<str>, u32)]) {
        let partitions: Vec<u32> = partitions.iter().map(|(_, p)| *p).collect();
        self.history.event("revoke", json!({ "partitions": partitions }));
    }

    fn on_assigned(&mut self, partitions: &[(Arc<str>, u32)]) {
        // No positions: the member starts each partition at the group's last commit (or the
        // log start), which the checker finds in the history.
        let partitions: Vec<u32> = partitions.iter().map(|(_, p)| *p).collect();
        self.history.event("assign", json!({ "partitions": partitions, "group": &self.group }));
    }
}

async fn group(args: Args, history: History, name: String, mut stop: watch::Receiver<bool>) -> i32 {
    let mut bootstraps = Bootstraps::new(&args.bootstrap);
    let rotate_after = Duration::from_millis(args.rotate_after_ms);
    let config = GroupConsumerConfig {
        session_timeout: Duration::from_secs(6),
        rebalance_timeout: Duration::from_secs(10),
        heartbeat_interval: Duration::from_millis(500),
        auto_commit: false,
        auto_offset_reset: OffsetReset::Beginning,
        ..GroupConsumerConfig::new(args.group.clone())
    };
    'connect: while !*stop.borrow() {
        let client = bootstraps.next_config(&args, &name);
        let mut consumer = match GroupConsumer::connect(client.clone(), config.clone()).await {
            Ok(c) => c,
            Err(e) => {
                history.event("error", json!({ "detail": format!("connect to {}: {e}", client.bootstrap) }));
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        consumer.set_rebalance_listener(Rebalances { history: history.clone(), group: args.group.clone() });
        consumer.subscribe(vec![args.topic.clone()]);
        let mut streak = FailureStreak::default();
        loop {
            let polled = tokio::select! {
                polled = consumer.poll(Duration::from_millis(200)) => polled,
                _ = stop.changed() => break 'connect,
            };
            let records = match polled {
                Ok(records) => {
                    // Only records end a failure streak: `poll` hides transient failures (it
                    // retries them for up to the request timeout and answers no records), and
                    // while the producers write, a member that reads nothing is stuck.
                    if !records.is_empty() {
                        streak.ok();
                    }
                    records
                }
                Err(e) => {
                    history.event("error", json!({ "detail": e.to_string() }));
                    if streak.failed(rotate_after) {
                        // A new member on the next address; the old one's session expires.
                        continue 'connect;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if records.is_empty() {
                continue;
            }
            let mut next: BTreeMap<u32, i64> = BTreeMap::new();
            let mut out = Vec::with_capacity(records.len());
            for r in &records {
                out.push(json!([r.partition, r.offset, value_text(r)]));
                next.insert(r.partition, r.offset + 1);
            }
            history.event("poll", json!({ "records": out }));
            let offsets = next.iter().map(|(&p, &o)| ((args.topic.clone(), p), o));
            let kind = match consumer.commit_offsets(offsets).await {
                Ok(()) => "commit",
                Err(e) => {
                    history.event("error", json!({ "detail": format!("commit: {e}") }));
                    "commit_unknown"
                }
            };
            for (p, o) in next {
                history.event(kind, json!({ "group": &args.group, "partition": p, "offset": o }));
            }
        }
    }
    0
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    let name = args.name.clone().unwrap_or_else(|| {
        format!(
            "native-{}",
            match args.role {
                Role::Producer => "producer",
                Role::Group => "group",
                Role::Reader => "reader",
            }
        )
    });
    if Bootstraps::new(&args.bootstrap).addresses.is_empty() {
        eprintln!("--bootstrap names no address");
        std::process::exit(2);
    }
    let history = match History::open(&args.history, &name) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("cannot open history {}: {e}", args.history);
            std::process::exit(2);
        }
    };
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
        match term {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        let _ = stop_tx.send(true);
    });
    let status = match args.role {
        Role::Producer => producer(args, history, name.clone(), stop).await,
        Role::Group => group(args, history, name.clone(), stop).await,
        Role::Reader => reader(args, history, name.clone(), stop).await,
    };
    eprintln!("{name}: done");
    std::process::exit(status);
}
