//! The broker process: starting and stopping the shards, one glommio executor per shard, pinned
//! to a core, and wiring each shard's listeners to the protocols.
//!
//! Owns: the data-directory lock, executor placement and io_memory sizing, the start-up
//! rendezvous (mesh peer ids), signal handling, the listening sockets (`listeners`), the admin
//! HTTP listener (`admin`) and the two-phase shutdown (drain connections everywhere, then close
//! partitions everywhere). This is the only module that knows glommio's executor API, so a patched glommio
//! could be swapped in here. The top layer: it may depend on every other module; none depends on
//! it.

pub mod admin;
pub mod listeners;

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::time::Duration;

use glommio::channels::channel_mesh::MeshBuilder;
use glommio::{LocalExecutorBuilder, Placement, PoolPlacement};
use thiserror::Error;

use crate::config::BrokerConfig;
use crate::metadata::{self, MetadataStore};
use crate::server::{Listener, Shutdown};
use crate::shard::mesh::ShardMsg;
use crate::shard::Shard;
use crate::storage::descriptors::DescriptorBudget;

#[derive(Debug, Error)]
pub enum StartError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error("data directory {path} is in use by another ringlog process (lock file {path}/.lock)")]
    Locked { path: String },
    #[error(transparent)]
    Metadata(#[from] metadata::MetadataError),
    #[error("cannot start shard {shard}: {message}")]
    Shard { shard: usize, message: String },
    #[error("shard {shard} failed: {message}")]
    ShardFailed { shard: usize, message: String },
    #[error(transparent)]
    Listen(#[from] listeners::ListenError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

/// What the shards agree on while starting; mutexes here are start-up only, never on a request.
struct Rendezvous {
    shards: usize,
    /// The Kafka listener's bound address, when it is on.
    kafka: Option<SocketAddr>,
    /// Each shard's direct address, in shard order.
    direct: Vec<SocketAddr>,
    native: SocketAddr,
    admin: SocketAddr,
    peers: Mutex<Vec<Option<usize>>>,
    ready: AtomicUsize,
    /// The first failure of any shard, at start-up or later: (shard, what happened and what to do).
    failed: Mutex<Option<(usize, String)>>,
    /// Shards whose connections are drained (the first phase of shutdown).
    drained: AtomicUsize,
    /// Shards that ended without draining (an error or a panic): nothing routes through them any
    /// more, so the others need not wait for them to drain.
    gone: AtomicUsize,
    /// Shard threads that have ended or are unwinding a panic.
    stopped: AtomicUsize,
    /// A waker per running shard, for `nudge_shards`.
    nudges: Mutex<Vec<Option<Waker>>>,
}

impl Rendezvous {
    /// Records `shard`'s failure (the first one wins) and counts it as gone.
    fn fail(&self, shard: usize, message: String) {
        lock(&self.failed).get_or_insert((shard, message));
        self.gone.fetch_add(1, Ordering::AcqRel);
    }

    /// Called on `shard`'s thread: a task that does nothing but hand its waker to the main
    /// thread, which wakes it every few milliseconds (`nudge_shards`).
    ///
    /// Why: glommio 0.9's executor loop reports "ran nothing" when its preemption timer fired
    /// before the first task ran (the thread was descheduled longer than `task_slice_us`
    /// between arming the timer and running, which a loaded machine does), and then sleeps in
    /// the kernel with runnable tasks queued until some completion or timer comes — at start-up,
    /// never. A wake from another thread writes the shard's eventfd, and the next turn of the
    /// loop arms a fresh timer and runs the queue: the hang becomes a stall of at most one nudge
    /// interval. A timer inside the shard cannot do this, as its task would have to run to
    /// re-arm it. Fixed upstream after 0.9 ("do not park the executor while a task queue is
    /// still runnable").
    fn accept_nudges(self: &Arc<Self>, shard: usize) {
        let rendezvous = self.clone();
        glommio::spawn_local(std::future::poll_fn(move |cx| {
            lock(&rendezvous.nudges)[shard] = Some(cx.waker().clone());
            std::task::Poll::<()>::Pending
        }))
        .detach();
    }

    fn stop_nudges(&self, shard: usize) {
        lock(&self.nudges)[shard] = None;
    }

    /// Wakes every running shard (`accept_nudges`); a shard that is awake only finds one more
    /// task that returns at once.
    fn nudge_shards(&self) {
        for waker in lock(&self.nudges).iter().flatten() {
            waker.wake_by_ref();
        }
    }
}

async fn poll_until(mut done: impl FnMut() -> bool) {
    while !done() {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit and logs how it is shared out
/// (`storage::descriptors`); an operator raises the hard limit (`LimitNOFILE`, tuning.md).
fn raise_open_files_limit(shards: usize) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot read RLIMIT_NOFILE");
        return;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        } else {
            tracing::warn!(error = %std::io::Error::last_os_error(), hard = limit.rlim_max,
                "cannot raise the soft RLIMIT_NOFILE to the hard limit");
        }
    }
    let budget = DescriptorBudget::for_limit(limit.rlim_cur);
    tracing::info!(
        open_files_max = limit.rlim_cur,
        active_files_per_shard = budget.active_files_per_shard(shards),
        "RLIMIT_NOFILE soft limit {} (hard {}): {} active segment files open per shard at most \
         (partitions in use; idle ones hold none), {} descriptors for connections, {} reserved",
        limit.rlim_cur,
        limit.rlim_max,
        budget.active_files_per_shard(shards),
        limit.rlim_cur - budget.reserved - budget.active_files_max(),
        budget.reserved
    );
}

/// With `fsync_scope = filesystem` each sync round writes back everything dirty on the data
/// directory's filesystem: on the root filesystem that includes every other program's writes.
fn warn_if_syncs_share_the_root_filesystem(config: &BrokerConfig) {
    use std::os::unix::fs::MetadataExt;
    if config.fsync_scope != crate::config::FsyncScopeSetting::Filesystem {
        return;
    }
    let device = |path: &std::path::Path| std::fs::metadata(path).map(|m| m.dev()).ok();
    if let (Some(data), Some(root)) = (device(&config.data_dir), device(std::path::Path::new("/"))) {
        if data == root {
            tracing::warn!(
                data_dir = %config.data_dir.display(),
                "the data directory is on the root filesystem: with fsync_scope = filesystem every \
                 sync round (one syncfs per shard) also writes back what other programs wrote there; \
                 give the data directory a filesystem of its own, or set fsync_scope = file"
            );
        }
    }
}

/// Runs a broker until SIGINT/SIGTERM; returns after every partition is flushed and closed.
pub fn run(config: BrokerConfig) -> Result<(), StartError> {
    let config = Arc::new(config);
    let data_dir = config.data_dir.clone();
    std::fs::create_dir_all(data_dir.join("topics"))
        .map_err(|source| StartError::DataDir { path: data_dir.display().to_string(), source })?;
    let _lock = lock_data_dir(&data_dir)?;
    let shards = config.shard_count();
    raise_open_files_limit(shards);
    let mut store = MetadataStore::open(&data_dir, shards)?;
    // A cluster's __consumer_offsets is replicated: its controller creates it once enough nodes
    // have registered (cluster::Cluster::ensure_offsets_topic).
    if config.cluster().ok().flatten().is_none() {
        crate::groups::ensure_offsets_topic(&mut store, &config, shards)?;
    }
    remove_orphan_topic_dirs(&data_dir, &store);
    warn_if_syncs_share_the_root_filesystem(&config);
    let topics: Arc<Vec<metadata::TopicMeta>> = Arc::new(store.topics().cloned().collect());
    let io_memory = config.io_memory_for(shards);
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    tracing::info!(
        data_dir = %data_dir.display(),
        shards,
        cores = cores.len(),
        io_memory_bytes = io_memory,
        topics = topics.len(),
        listen = %config.listen,
        "starting ringlog {}", env!("CARGO_PKG_VERSION")
    );
    tracing::info!("configuration: {config:?}");

    let shutdown = Arc::new(Shutdown::default());
    install_signal_handlers(shutdown.clone())?;
    let listeners = listeners::bind(&config, shards)?;
    let (native_addr, admin_addr) = (listeners.native_addr(), listeners.admin_addr());
    let peer_addr = listeners.peer_addr();
    let rendezvous = Arc::new(Rendezvous {
        shards,
        kafka: listeners.kafka_addr(),
        direct: listeners.direct_addrs(),
        native: native_addr,
        admin: admin_addr,
        peers: Mutex::new(vec![None; shards]),
        ready: AtomicUsize::new(0),
        failed: Mutex::new(None),
        drained: AtomicUsize::new(0),
        gone: AtomicUsize::new(0),
        stopped: AtomicUsize::new(0),
        nudges: Mutex::new(vec![None; shards]),
    });
    report_shard_panics(rendezvous.clone());
    let shard_listeners = listeners.into_shards()?;
    let mesh = MeshBuilder::<ShardMsg, _>::full(shards, 1024);
    let mut store = Some(store);
    let mut handles = Vec::with_capacity(shards);
    for (id, listeners) in shard_listeners.into_iter().enumerate() {
        let placement = match cores.get(id % cores.len().max(1)) {
            Some(core) => Placement::Fixed(core.id),
            None => Placement::Unbound,
        };
        // Two blocking threads on the shard's core: a group commit's syncfs must not queue behind
        // an unlink freeing a large segment step by step.
        let blocking_pool = match &placement {
            Placement::Fixed(cpu) => glommio::CpuSet::online()
                .map(|online| PoolPlacement::Custom(vec![online.filter(|l| l.cpu == *cpu); 2]))
                .unwrap_or(PoolPlacement::Unbound(2)),
            _ => PoolPlacement::Unbound(2),
        };
        let ctx = ShardStart {
            id,
            config: config.clone(),
            topics: topics.clone(),
            store: if id == 0 { store.take() } else { None },
            rendezvous: rendezvous.clone(),
            shutdown: shutdown.clone(),
            mesh: mesh.clone(),
            listeners: Some(listeners),
        };
        let handle = LocalExecutorBuilder::new(placement)
            .name(&format!("shard-{id}"))
            .io_memory(io_memory)
            .blocking_thread_pool_placement(blocking_pool)
            .spin_before_park(Duration::from_micros(config.spin_before_park_us))
            .preempt_timer(Duration::from_micros(config.task_slice_us))
            .spawn(move || async move { ctx.run().await })
            .map_err(|e| StartError::Shard { shard: id, message: e.to_string() })?;
        handles.push(handle);
    }

    // Readiness, or the first failure, from the main thread.
    loop {
        // Bound first: a guard in the `if let` scrutinee would be held while the other shards
        // still take this lock to learn that start-up failed.
        let failed = lock(&rendezvous.failed).clone();
        if let Some((shard, message)) = failed {
            stop_after_failure(&shutdown, &rendezvous, handles, &config);
            return Err(StartError::Shard { shard, message });
        }
        if rendezvous.ready.load(Ordering::Acquire) == shards {
            break;
        }
        rendezvous.nudge_shards();
        std::thread::sleep(Duration::from_millis(5));
    }
    let direct: Vec<String> = rendezvous.direct.iter().map(SocketAddr::to_string).collect();
    let kafka = rendezvous.kafka.map_or_else(|| "off".to_string(), |a| a.to_string());
    let cluster = match (config.cluster(), peer_addr) {
        (Ok(Some(cluster)), Some(peer)) => format!(" node={} peer={peer}", cluster.node_id),
        _ => String::new(),
    };
    let ready = format!(
        "ringlog ready: native={native_addr} kafka={kafka} shards={shards} direct={} data_dir={} admin={admin_addr}{cluster}",
        direct.join(","),
        data_dir.display(),
    );
    tracing::info!("{ready}");
    println!("{ready}");

    // Serving: until every shard stopped (shutdown), or one failed, which stops them all.
    loop {
        let failed = lock(&rendezvous.failed).clone();
        if let Some((shard, message)) = failed {
            tracing::error!(shard, "shard {shard} failed, stopping the broker: {message}");
            stop_after_failure(&shutdown, &rendezvous, handles, &config);
            return Err(StartError::ShardFailed { shard, message });
        }
        if rendezvous.stopped.load(Ordering::Acquire) >= shards {
            break;
        }
        rendezvous.nudge_shards();
        // Each nudge costs an idle shard a wake-up and its spin; a stall after the rare race
        // may take this long.
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut failure = None;
    for (id, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(message)) => failure = Some(StartError::ShardFailed { shard: id, message }),
            Err(e) => failure = Some(StartError::ShardFailed { shard: id, message: e.to_string() }),
        }
    }
    match failure {
        Some(e) => Err(e),
        None => {
            tracing::info!("ringlog stopped cleanly");
            Ok(())
        }
    }
}

/// After a shard failed: asks every shard to stop and joins them if they all do within the
/// shutdown grace (plus a margin); otherwise leaves them, so the process exits with the error
/// instead of waiting on a shard that cannot finish. Their partitions then recover on the next
/// start as after a crash.
fn stop_after_failure(
    shutdown: &Shutdown,
    rendezvous: &Rendezvous,
    handles: Vec<glommio::ExecutorJoinHandle<Result<(), String>>>,
    config: &BrokerConfig,
) {
    shutdown.request();
    let deadline =
        std::time::Instant::now() + Duration::from_millis(config.shutdown_grace_ms) + Duration::from_secs(2);
    while rendezvous.stopped.load(Ordering::Acquire) < handles.len() {
        rendezvous.nudge_shards();
        if std::time::Instant::now() >= deadline {
            tracing::warn!("shards still running after a shard failed; exiting without waiting for them");
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    for h in handles {
        let _ = h.join();
    }
}

/// Makes a panic in a shard's thread a failure of the broker: logged with where it happened and
/// recorded in the rendezvous, so the main thread stops everything instead of waiting for a shard
/// that is gone. Other threads' panics keep the default behaviour.
fn report_shard_panics(rendezvous: Arc<Rendezvous>) {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        let thread = std::thread::current();
        // glommio names an executor's thread `<name>-<executor id>`: here `shard-<shard>-<n>`.
        let Some(shard) = thread
            .name()
            .and_then(|n| n.strip_prefix("shard-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|id| id.parse::<usize>().ok())
        else {
            return;
        };
        let payload = info.payload();
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_string());
        let place = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        let message = format!(
            "its thread panicked{place}: {what}. This is a bug in ringlog; please report it with this \
             log. The broker stopped; its partitions recover on the next start"
        );
        tracing::error!(shard, "shard {shard}: {message}");
        rendezvous.fail(shard, message);
        // try_lock: this thread may be the one holding it.
        if let Ok(mut nudges) = rendezvous.nudges.try_lock() {
            nudges[shard] = None;
        }
        rendezvous.stopped.fetch_add(1, Ordering::AcqRel);
    }));
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct ShardStart {
    id: usize,
    config: Arc<BrokerConfig>,
    topics: Arc<Vec<metadata::TopicMeta>>,
    store: Option<MetadataStore>,
    rendezvous: Arc<Rendezvous>,
    shutdown: Arc<Shutdown>,
    mesh: MeshBuilder<ShardMsg, glommio::channels::channel_mesh::Full>,
    /// This shard's descriptors of the broker's sockets (shard 0's include the admin listener).
    listeners: Option<listeners::ShardListeners>,
}

impl ShardStart {
    async fn run(mut self) -> Result<(), String> {
        self.rendezvous.accept_nudges(self.id);
        let store = self.store.take();
        let listeners = self.listeners.take();
        let result = self.start(store, listeners).await;
        self.rendezvous.stop_nudges(self.id);
        if let Err(message) = &result {
            self.rendezvous.fail(self.id, message.clone());
        }
        self.rendezvous.stopped.fetch_add(1, Ordering::AcqRel);
        result
    }

    fn failed(&self) -> bool {
        lock(&self.rendezvous.failed).is_some()
    }

    /// What a shard that could not open its partitions reports: the failure and, when the process
    /// ran out of descriptors, the budget and the way out.
    fn open_failure(&self, e: &crate::shard::BrokerError) -> String {
        if !e.is_out_of_descriptors() {
            return format!("opening its partitions failed: {e}");
        }
        let budget = DescriptorBudget::current()
            .map_or_else(|| "raise RLIMIT_NOFILE (LimitNOFILE= in the systemd unit)".into(), |b| b.explain());
        format!("opening its partitions failed: {e}. The process ran out of file descriptors: {budget}")
    }

    async fn start(
        &self,
        store: Option<MetadataStore>,
        listeners: Option<listeners::ShardListeners>,
    ) -> Result<(), String> {
        let rv = &self.rendezvous;
        let (senders, mut receivers) =
            self.mesh.clone().join().await.map_err(|_| "cannot join the shard mesh")?;
        lock(&rv.peers)[self.id] = Some(senders.peer_id());

        poll_until(|| self.failed() || lock(&rv.peers).iter().all(Option::is_some)).await;
        if self.failed() {
            return Err("another shard failed to start".into());
        }
        let advertised_host = self.config.advertised_host.clone();
        let endpoints: Vec<SocketAddr> = rv
            .direct
            .iter()
            .map(|a| match advertised_host.as_deref().and_then(|h| h.parse().ok()) {
                Some(ip) => SocketAddr::new(ip, a.port()),
                None => *a,
            })
            .collect();
        let peer_of_shard: Vec<usize> = lock(&rv.peers).iter().flatten().copied().collect();

        let shard =
            Shard::open(self.id as u32, self.config.clone(), endpoints, &self.topics, senders, peer_of_shard)
                .await
                .map_err(|e| self.open_failure(&e))?;
        if let Some(store) = store {
            crate::controller::install(&shard, store);
        }
        // Groups are rebuilt before the mesh is served, so no group request sees a half-loaded shard.
        crate::groups::load(&shard).await?;
        // Shard 0 opens this shard's replicas through its host, over the mesh: it is there first.
        if let (Ok(Some(seeds)), true) =
            (self.config.cluster(), self.id as u32 != crate::cluster::shards::CLUSTER_SHARD)
        {
            crate::cluster::shards::start_shard(&shard, seeds.node_id);
        }
        if let Some(addr) = rv.kafka {
            let advertised = match &self.config.kafka_advertised_listener {
                Some(a) => crate::kafka::parse_host_port(a)?,
                None => (addr.ip().to_string(), addr.port()),
            };
            let _ = shard.kafka_endpoint.set(advertised);
        }

        for (_, receiver) in receivers.streams() {
            let shard = shard.clone();
            glommio::spawn_local(async move {
                while let Some(msg) = receiver.recv().await {
                    shard.handle(msg);
                }
            })
            .detach();
        }
        let housekeeping = glommio::spawn_local(shard.clone().housekeeping());
        let group_timers = glommio::spawn_local(crate::groups::run_timers(shard.clone()));
        let started = std::time::Instant::now();
        let open = listeners.ok_or("no listeners were bound for this shard")?.open();
        let admin = open.admin.map(|l| glommio::spawn_local(admin::serve(shard.clone(), l, started)));
        if let (Ok(Some(seeds)), Some(peer)) = (self.config.cluster(), open.peer) {
            let me = crate::cluster::NodeInfo {
                id: seeds.node_id,
                peer: seeds.peer_listen.to_string(),
                native: rv.native.to_string(),
                kafka: shard.kafka_endpoint.get().map(|(host, port)| format!("{host}:{port}")),
                admin: rv.admin.to_string(),
            };
            crate::cluster::start(&shard, seeds, peer, me).map_err(|e| e.to_string())?;
        }
        rv.ready.fetch_add(1, Ordering::AcqRel);

        let mut listeners = vec![
            Listener::new::<crate::native::Native>(open.native),
            Listener::new::<crate::native::Native>(open.direct),
        ];
        listeners.extend(open.kafka.map(Listener::new::<crate::kafka::Kafka>));
        crate::server::serve(shard.clone(), listeners, self.shutdown.clone()).await;

        // Phase 1 is over on this shard: no connection of ours will send new work. Other shards
        // may still route requests here until they are drained too, so keep serving the mesh.
        rv.drained.fetch_add(1, Ordering::AcqRel);
        poll_until(|| rv.drained.load(Ordering::Acquire) + rv.gone.load(Ordering::Acquire) >= rv.shards)
            .await;
        drop(housekeeping);
        drop(group_timers);
        drop(admin);
        shard.close_partitions().await;
        tracing::info!(shard = self.id, "shard stopped");
        Ok(())
    }
}

fn install_signal_handlers(shutdown: Arc<Shutdown>) -> Result<(), StartError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).map_err(StartError::Signals)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if shutdown.requested() {
                    tracing::warn!("second signal {signal}: exiting without a clean shutdown");
                    std::process::exit(130);
                }
                tracing::info!("signal {signal}: shutting down (finishing in-flight requests)");
                shutdown.request();
            }
        })
        .map_err(StartError::Signals)?;
    Ok(())
}

/// An exclusive flock on `<data_dir>/.lock`, held for the life of the process.
fn lock_data_dir(data_dir: &std::path::Path) -> Result<std::fs::File, StartError> {
    let path = data_dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| StartError::DataDir { path: path.display().to_string(), source })?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(StartError::Locked { path: data_dir.display().to_string() });
    }
    Ok(file)
}

/// A crash between a topic's removal from the metadata file and the removal of its files leaves a
/// directory behind; it holds no topic anyone can reach, so it is removed at start.
fn remove_orphan_topic_dirs(data_dir: &std::path::Path, store: &MetadataStore) {
    let Ok(entries) = std::fs::read_dir(data_dir.join("topics")) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if store.get(&name).is_none() {
            tracing::warn!(topic = %name, "removing files of a deleted topic");
            if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                tracing::warn!("could not remove {}: {e}", entry.path().display());
            }
        }
    }
}
